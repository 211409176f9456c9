// BatchNorm with batch statistics followed by an activation (none / relu / relu6), training
// forward and backward, channels_last: what ConvBN runs in training on the CPU
// (falconnet/layers/conv_bn.py, _BatchNormAct).
//
// Two numbers, per element of x (M = N*H*W values per channel): a handful of FLOPs, so only bytes
// count. The floor is 5 activation-sized passes: forward read x, write y; backward read grad_y
// and x, write grad_x. nn.BatchNorm2d + F.relu6 make 13 (forward: statistics read, normalize
// read + write, clamp read + write; backward: mask read 2 + write, then BatchNorm's backward
// reduction read 2 and its grad_x pass read 2 + write); torch's native_batch_norm + an in-place
// clamp with the mask from the output make 10. Here: forward 3 (statistics read x; normalize +
// activation read x, write y), backward 5 (reduction read grad_y and x; grad_x read both, write):
// the backward recomputes z = x * scale + shift for the activation's mask instead of keeping or
// reading y, so the mask costs no pass at all.
//
// Layout: channels_last, so one pixel's C values are contiguous and every pass is a plain
// stream over x with the SIMD lanes across channels; per-channel accumulators stay in L1
// (2 x C floats). Pixels are split into one contiguous range per thread (at::parallel_for):
// each thread streams its own part of the tensor.
//
// Numerics. The statistics accumulate d = x - s (s: the channel's first value, so that a mean
// far from zero does not cancel digits out of E[d^2] - E[d]^2) and d^2 in float over at most
// kFlush pixels, then in double: each float partial sum carries about sqrt(kFlush) * 2^-24 of its
// size, and the double totals add nothing. float64 x accumulates in double throughout. The
// backward's sums (of grad and grad * (x - mean)) work the same way.
#include "cpu/common.h"

#include <torch/library.h>

#include <cmath>

namespace falconnet::cpu {
namespace {

constexpr int64_t kFlush = 64;  // pixels per float partial sum

// one per-thread set of per-channel accumulators, float partials flushed into double totals
template <typename A>
struct ChannelSums {
  int64_t C;
  std::vector<A> part0, part1;
  std::vector<double> total0, total1;
  explicit ChannelSums(int64_t channels)
      : C(channels), part0(channels), part1(channels), total0(channels), total1(channels) {}
  void flush() {
    for (int64_t c = 0; c < C; ++c) {
      total0[c] += static_cast<double>(part0[c]);
      total1[c] += static_cast<double>(part1[c]);
      part0[c] = part1[c] = A(0);
    }
  }
};

// Runs body(p0, p1, sums) over contiguous pixel ranges, one per thread, and adds every thread's
// totals into total0 / total1 (C doubles each).
template <typename A, typename Body>
void reduce_pixels(int64_t P, int64_t C, std::vector<double>& total0, std::vector<double>& total1, const Body& body) {
  std::mutex merge;
  at::parallel_for(0, P, 4 * kFlush, [&](int64_t b, int64_t e) {
    ChannelSums<A> sums(C);
    for (int64_t p0 = b; p0 < e; p0 += kFlush) {
      body(p0, std::min(e, p0 + kFlush), sums);
      sums.flush();
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t c = 0; c < C; ++c) {
      total0[c] += sums.total0[c];
      total1[c] += sums.total1[c];
    }
  });
}

// The per-channel affine map of the normalization, z = x * scale + shift, in A: the forward applies
// it and the backward recomputes it (the same code, hence the same z, for the activation's mask).
template <typename A>
struct Affine {
  std::vector<A> scale, shift, mean;
  std::vector<double> scale_d;  // gamma * invstd before rounding (the backward's constants start from it)
};

template <typename A>
Affine<A> affine_of(const double* mean, const double* invstd, const at::Tensor& weight, const at::Tensor& bias,
                    int64_t C) {
  Affine<A> f{std::vector<A>(C), std::vector<A>(C), std::vector<A>(C), std::vector<double>(C)};
  const at::Tensor w = weight.defined() ? weight.to(at::kDouble).contiguous() : weight;
  const at::Tensor b = bias.defined() ? bias.to(at::kDouble).contiguous() : bias;
  for (int64_t c = 0; c < C; ++c) {
    const double s = invstd[c] * (w.defined() ? w.const_data_ptr<double>()[c] : 1.0);
    f.scale_d[c] = s;
    f.scale[c] = static_cast<A>(s);
    f.shift[c] = static_cast<A>((b.defined() ? b.const_data_ptr<double>()[c] : 0.0) - mean[c] * s);
    f.mean[c] = static_cast<A>(mean[c]);
  }
  return f;
}

template <typename A>
inline typename Simd<A>::vec mask_vec(typename Simd<A>::vec z, Activation act) {
  using V = typename Simd<A>::vec;
  const V zero = Simd<A>::zero(), one = Simd<A>::splat(A(1));
  if (act == Activation::kRelu) return z > zero ? one : zero;
  return (z > zero) & (z < Simd<A>::splat(A(6))) ? one : zero;
}

void check_input(const at::Tensor& x, const char* op) {
  check_cpu(x, "x");
  FALCONNET_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  FALCONNET_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                  ": x must be float32 or float64, got ", x.scalar_type());
  FALCONNET_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), op, ": x must be channels_last-contiguous");
  FALCONNET_CHECK(x.numel() > x.size(1), op, ": expected more than 1 value per channel, got ", x.sizes());
}

void check_param(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_cpu(*t, name);
  FALCONNET_CHECK(t->dim() == 1 && t->size(0) == x.size(1), name, " must be (", x.size(1), ",), got ", t->sizes());
}

// Both ops' argument checks; returns the parsed activation.
Activation check_args(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                      const c10::optional<at::Tensor>& bias, c10::string_view activation, const char* op) {
  check_input(x, op);
  check_param(weight, x, "weight");
  check_param(bias, x, "bias");
  return parse_activation(std::string_view(activation.data(), activation.size()));
}

// -> (y, mean, invstd): mean and invstd in float64 (C,) (the saved statistics; the caller updates the
// running statistics from them)
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward(const at::Tensor& x,
                                                               const c10::optional<at::Tensor>& weight,
                                                               const c10::optional<at::Tensor>& bias, double eps,
                                                               c10::string_view activation) {
  const Activation act = check_args(x, weight, bias, activation, "bn_act_forward");
  const int64_t C = x.size(1), P = x.numel() / C;
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kDouble));
  at::Tensor invstd = at::empty({C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_forward", [&] {
    using A = scalar_t;
    using S = Simd<A>;
    using V = typename S::vec;
    constexpr int64_t L = S::lanes;
    const int64_t Cv = C / L * L;
    const A* xp = x.const_data_ptr<A>();
    std::vector<A> shift_s(xp, xp + C);  // the first pixel's values
    std::vector<double> s1(C), s2(C);
    reduce_pixels<A>(P, C, s1, s2, [&](int64_t p0, int64_t p1, ChannelSums<A>& sums) {
      for (int64_t p = p0; p < p1; ++p) {
        const A* row = xp + p * C;
        int64_t c = 0;
        for (; c < Cv; c += L) {
          const V d = S::load(row + c) - S::load(shift_s.data() + c);
          S::store(sums.part0.data() + c, S::load(sums.part0.data() + c) + d);
          S::store(sums.part1.data() + c, S::load(sums.part1.data() + c) + d * d);
        }
        for (; c < C; ++c) {
          const A d = row[c] - shift_s[c];
          sums.part0[c] += d;
          sums.part1[c] += d * d;
        }
      }
    });
    double* m = mean.data_ptr<double>();
    double* r = invstd.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      const double md = s1[c] / static_cast<double>(P);
      const double var = std::max(s2[c] / static_cast<double>(P) - md * md, 0.0);  // biased
      m[c] = static_cast<double>(shift_s[c]) + md;
      r[c] = 1.0 / std::sqrt(var + eps);
    }
    const Affine<A> f = affine_of<A>(m, r, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), C);
    A* yp = y.data_ptr<A>();
    at::parallel_for(0, P, 4 * kFlush, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p) {
        const A* row = xp + p * C;
        A* out = yp + p * C;
        int64_t c = 0;
        for (; c < Cv; c += L) {
          const V z = S::load(row + c) * S::load(f.scale.data() + c) + S::load(f.shift.data() + c);
          S::store(out + c, activate_vec<A>(z, act));
        }
        for (; c < C; ++c) out[c] = activate(row[c] * f.scale[c] + f.shift[c], act);
      }
    });
  });
  return {y, mean, invstd};
}

// -> (grad_x, grad_weight, grad_bias) for y = act(batch_norm(x)) with the forward's saved mean and
// invstd; grad_weight / grad_bias undefined when weight / bias are absent, grad_x when not needed
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward(const at::Tensor& grad_y_in, const at::Tensor& x,
                                                                const c10::optional<at::Tensor>& weight,
                                                                const c10::optional<at::Tensor>& bias,
                                                                const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                                                c10::string_view activation, bool need_x) {
  const Activation act = check_args(x, weight, bias, activation, "bn_act_backward");
  FALCONNET_CHECK(grad_y_in.sizes() == x.sizes() && grad_y_in.scalar_type() == x.scalar_type(),
                  "bn_act_backward: grad_y must match x (", x.sizes(), " ", x.scalar_type(), "), got ",
                  grad_y_in.sizes(), " ", grad_y_in.scalar_type());
  const int64_t C = x.size(1), P = x.numel() / C;
  FALCONNET_CHECK(mean_in.numel() == C && invstd_in.numel() == C, "bn_act_backward: mean and invstd must have ", C,
                  " values");
  const at::Tensor grad_y = grad_y_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor mean = mean_in.to(at::kDouble).contiguous(), invstd = invstd_in.to(at::kDouble).contiguous();
  const at::Tensor w = weight.has_value() && weight->defined() ? *weight : at::Tensor();
  const at::Tensor b = bias.has_value() && bias->defined() ? *bias : at::Tensor();
  at::Tensor grad_x = need_x ? at::empty_like(x, at::MemoryFormat::ChannelsLast) : at::Tensor();
  std::vector<double> sum_g(C), sum_gd(C);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bn_act_backward", [&] {
    using A = scalar_t;
    using S = Simd<A>;
    using V = typename S::vec;
    constexpr int64_t L = S::lanes;
    const int64_t Cv = C / L * L;
    const A* xp = x.const_data_ptr<A>();
    const A* gp = grad_y.const_data_ptr<A>();
    const double* m = mean.const_data_ptr<double>();
    const double* r = invstd.const_data_ptr<double>();
    const Affine<A> f = affine_of<A>(m, r, w, b, C);
    // the gradient through the activation, from z recomputed as the forward computed it
    auto masked = [&](V g, V xv, int64_t c) {
      if (act == Activation::kNone) return g;
      const V z = xv * S::load(f.scale.data() + c) + S::load(f.shift.data() + c);
      return g * mask_vec<A>(z, act);
    };
    auto masked1 = [&](A g, A xv, int64_t c) {
      return g * activation_mask(xv * f.scale[c] + f.shift[c], act);
    };
    // pass 1: sum of g' and of g' (x - mean) per channel
    reduce_pixels<A>(P, C, sum_g, sum_gd, [&](int64_t p0, int64_t p1, ChannelSums<A>& sums) {
      for (int64_t p = p0; p < p1; ++p) {
        const A* xr = xp + p * C;
        const A* gr = gp + p * C;
        int64_t c = 0;
        for (; c < Cv; c += L) {
          const V xv = S::load(xr + c);
          const V g = masked(S::load(gr + c), xv, c);
          S::store(sums.part0.data() + c, S::load(sums.part0.data() + c) + g);
          S::store(sums.part1.data() + c, S::load(sums.part1.data() + c) + g * (xv - S::load(f.mean.data() + c)));
        }
        for (; c < C; ++c) {
          const A g = masked1(gr[c], xr[c], c);
          sums.part0[c] += g;
          sums.part1[c] += g * (xr[c] - f.mean[c]);
        }
      }
    });
    if (!need_x) return;
    // pass 2: grad_x = k (g' - a - (x - mean) b), k = gamma invstd, a = sum g' / M,
    // b = invstd^2 sum g'(x - mean) / M; as k g' + u x + v
    const std::vector<A>& k = f.scale;  // gamma * invstd
    std::vector<A> u(C), v(C);
    for (int64_t c = 0; c < C; ++c) {
      const double kc = f.scale_d[c];
      const double a = sum_g[c] / static_cast<double>(P);
      const double bb = r[c] * r[c] * sum_gd[c] / static_cast<double>(P);
      u[c] = static_cast<A>(-kc * bb);
      v[c] = static_cast<A>(kc * (bb * m[c] - a));
    }
    A* out = grad_x.data_ptr<A>();
    at::parallel_for(0, P, 4 * kFlush, [&](int64_t b0, int64_t b1) {
      for (int64_t p = b0; p < b1; ++p) {
        const A* xr = xp + p * C;
        const A* gr = gp + p * C;
        A* o = out + p * C;
        int64_t c = 0;
        for (; c < Cv; c += L) {
          const V xv = S::load(xr + c);
          const V g = masked(S::load(gr + c), xv, c);
          S::store(o + c, S::load(k.data() + c) * g + S::load(u.data() + c) * xv + S::load(v.data() + c));
        }
        for (; c < C; ++c) o[c] = k[c] * masked1(gr[c], xr[c], c) + u[c] * xr[c] + v[c];
      }
    });
  });
  at::Tensor grad_w, grad_b;
  if (w.defined()) {
    grad_w = at::empty({C}, w.options().dtype(at::kDouble));
    double* gw = grad_w.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) gw[c] = sum_gd[c] * invstd.const_data_ptr<double>()[c];
    grad_w = grad_w.to(w.scalar_type());
  }
  if (b.defined()) grad_b = at::tensor(at::ArrayRef<double>(sum_g), b.options().dtype(at::kDouble)).to(b.scalar_type());
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace falconnet::cpu

// Development builds load a file alone beside the installed extension, under another namespace
// (-DFALCONNET_OPS_NAMESPACE=falconnet_dev), as csrc/cpu/repso_moments.cpp.
#ifndef FALCONNET_OPS_NAMESPACE
#define FALCONNET_OPS_NAMESPACE falconnet_C
#endif

TORCH_LIBRARY_FRAGMENT(FALCONNET_OPS_NAMESPACE, m) {
  // y = activation(batch_norm(x)) with batch statistics; x float32/float64 channels_last; -> (y, mean,
  // invstd), the statistics float64 (C,); eps as nn.BatchNorm2d's
  m.def("bn_act_forward(Tensor x, Tensor? weight, Tensor? bias, float eps, str activation) -> (Tensor, Tensor, Tensor)");
  // -> (grad_x, grad_weight, grad_bias) from the forward's mean and invstd
  m.def("bn_act_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd,"
        " str activation, bool need_x) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(FALCONNET_OPS_NAMESPACE, CPU, m) {
  m.impl("bn_act_forward", &falconnet::cpu::bn_act_forward);
  m.impl("bn_act_backward", &falconnet::cpu::bn_act_backward);
}
