// Shifted-window moments for RepSO's exact one-conv training (falconnet_kernels/repso_moments.py,
// docs/repso_training.md): per channel, the K*K means and the K*K x K*K covariance of the
// zero-padded KxK window shifts of x, and the backward that turns their gradients into grad_x.
//
// Numerics. Everything accumulates in double. The moments are formed from w = xp - a, where xp is
// x zero-padded and a a per-channel shift (a sample of x): shifting every value of xp, padding
// included, by the same constant leaves the covariance unchanged, and makes E[w_p] small, so
// cov = E[w_p w_q] - E[w_p] E[w_q] no longer cancels (mean/std)^2 digits. For float32 or bf16 input
// w and the products w_p w_q are exact in double; the only error is the summation's, about
// M * 2^-53 relative to sum |w_p w_q| (M = N*H*W), far below float32 rounding.
// The backward uses the same shift (the saved centre mean) so its terms are centred too.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

namespace {

// GCC/Clang vector extension: 4 doubles (one AVX2 register, half an AVX-512 one)
typedef double Vec4 __attribute__((vector_size(32)));
constexpr int64_t kBlock = 8;

inline Vec4 load4(const double* p) {
  Vec4 v;
  std::memcpy(&v, p, sizeof(Vec4));
  return v;
}

// Small images make short inner loops, so G images of one channel are interleaved column by
// column: plane[r][t * G + g] is padded position (r, t) of image g, and every row loop runs over
// W * G values. Fill it with w = x - a inside and -a in the padding; lanes g >= n_img (the last,
// partial group) stay 0, which adds nothing to any sum.
// About 128 values per row, in groups of equal size (16 images at Wp = 9: two groups of 8, not 14 + 2).
inline int64_t lanes_for(int64_t N, int64_t Wp) {
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(N, 128 / Wp));
  const int64_t groups = (N + most - 1) / most;
  return (N + groups - 1) / groups;
}

template <typename scalar_t>
void fill_planes(const scalar_t* x, int64_t image_stride, int64_t n_img, int64_t G, int64_t H, int64_t W, int64_t P,
                 double a, double* plane) {
  const int64_t Wp = W + 2 * P, WpG = Wp * G;
  for (int64_t r = 0; r < H + 2 * P; ++r) {
    double* row = plane + r * WpG;
    for (int64_t t = 0; t < Wp; ++t)
      for (int64_t g = 0; g < G; ++g) row[t * G + g] = g < n_img ? -a : 0.0;
  }
  for (int64_t g = 0; g < n_img; ++g) {
    const scalar_t* xi = x + g * image_stride;
    for (int64_t i = 0; i < H; ++i) {
      double* row = plane + (i + P) * WpG + P * G + g;
      const scalar_t* xr = xi + i * W;
      for (int64_t j = 0; j < W; ++j) row[j * G] = static_cast<double>(xr[j]) - a;
    }
  }
}

// The forward in O(K (2K-1)) products per position instead of K^2 (K^2+1)/2. With p = (pi, pj),
// q = (qi, qj), qi >= pi (cov is symmetric), the second moment is a sum over row pairs at row lag
// D = qi - pi and column lag d = qj - pj:
//   sum_{r in [pi, pi+H)} sum_{t in [pj, pj+W)} w[r][t] w[r+D][t+d]       (padded coordinates)
// so it suffices to accumulate, per padded row r, the lag products w[r][t] w[r+D][t+d] in
// per-column accumulators (column windows are then sums over t). The row windows [pi, pi+H)
// all contain the "middle" rows [K-1, H), which share one accumulator; every other padded row
// keeps its own.
template <typename scalar_t, typename stat_t>
void moments_forward_kernel(const scalar_t* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t K,
                            stat_t* mean_out, stat_t* cov_out) {
  const int64_t P = K / 2, KK = K * K, L = 2 * K - 1;
  const int64_t Hp = H + 2 * P, Wp = W + 2 * P, plane_size = Hp * Wp;
  const double M = static_cast<double>(N * H * W);
  // slot of each padded row: 0 for the middle rows, 1 + i for the i-th other row
  std::vector<int64_t> slot(Hp);
  int64_t n_slots = 1;
  for (int64_t r = 0; r < Hp; ++r) slot[r] = (r >= K - 1 && r < H) ? 0 : n_slots++;
  const int64_t G = lanes_for(N, Wp), WpG = Wp * G;
  const int64_t lag_block = K * L * WpG;  // one slot: (D, d + K-1, t, g)
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> plane(plane_size * G), lag(n_slots * lag_block), sums(n_slots * WpG), ew(KK);
    std::vector<double> lag_cols(n_slots * K * L * Wp), sum_cols(n_slots * Wp);
    for (int64_t c = c0; c < c1; ++c) {
      const double a = static_cast<double>(x[(c * H + H / 2) * W + W / 2]);
      std::fill(lag.begin(), lag.end(), 0.0);
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t n0 = 0; n0 < N; n0 += G) {
        fill_planes(x + (n0 * C + c) * H * W, C * H * W, std::min(G, N - n0), G, H, W, P, a, plane.data());
        for (int64_t r = 0; r < Hp; ++r) {
          const double* row = plane.data() + r * WpG;
          double* s = sums.data() + slot[r] * WpG;
          for (int64_t u = 0; u < WpG; ++u) s[u] += row[u];
          for (int64_t D = 0; D < K && r + D < Hp; ++D) {
            const double* other = plane.data() + (r + D) * WpG;
            for (int64_t d = -(K - 1); d <= K - 1; ++d) {
              if (D == 0 && d < 0) continue;  // the mirror of d > 0 (assembled by symmetry)
              double* acc = lag.data() + slot[r] * lag_block + (D * L + d + K - 1) * WpG;
              const int64_t u0 = std::max<int64_t>(0, -d) * G, u1 = std::min<int64_t>(Wp, Wp - d) * G;
              const double* shifted = other + d * G;
              for (int64_t u = u0; u < u1; ++u) acc[u] += row[u] * shifted[u];
            }
          }
        }
      }
      // fold the lanes (images) into per-column totals, with independent sums per column
      for (int64_t k = 0; k < n_slots * K * L; ++k) {
        const double* src = lag.data() + k * WpG;
        double* dst = lag_cols.data() + k * Wp;
        for (int64_t t = 0; t < Wp; ++t) dst[t] = 0.0;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t t = 0; t < Wp; ++t) dst[t] += src[t * G + g];
      }
      for (int64_t k = 0; k < n_slots; ++k) {
        double* dst = sum_cols.data() + k * Wp;
        for (int64_t t = 0; t < Wp; ++t) dst[t] = 0.0;
        for (int64_t g = 0; g < G; ++g)
          for (int64_t t = 0; t < Wp; ++t) dst[t] += sums[k * WpG + t * G + g];
      }
      // assemble: sum each accumulator over its column window and its row window's slots
      auto window_sum = [&](const double* base, int64_t stride, int64_t pi, int64_t pj) {
        double total = 0;
        for (int64_t r = pi; r < pi + H; ++r) {
          if (slot[r] == 0 && r != K - 1) continue;  // the middle slot, counted once
          const double* v = base + slot[r] * stride;
          for (int64_t t = pj; t < pj + W; ++t) total += v[t];
        }
        return total;
      };
      for (int64_t p = 0; p < KK; ++p) {
        ew[p] = window_sum(sum_cols.data(), Wp, p / K, p % K) / M;
        mean_out[c * KK + p] = static_cast<stat_t>(ew[p] + a);
      }
      for (int64_t p = 0; p < KK; ++p) {
        for (int64_t q = p; q < KK; ++q) {
          // order the pair so that the second row is not above the first
          int64_t pi = p / K, pj = p % K, qi = q / K, qj = q % K;
          if (qi < pi || (qi == pi && qj < pj)) {
            std::swap(pi, qi);
            std::swap(pj, qj);
          }
          const int64_t D = qi - pi, d = qj - pj;
          const double second = window_sum(lag_cols.data() + (D * L + d + K - 1) * Wp, K * L * Wp, pi, pj) / M;
          const stat_t v = static_cast<stat_t>(second - ew[p] * ew[q]);
          cov_out[(c * KK + p) * KK + q] = v;
          cov_out[(c * KK + q) * KK + p] = v;
        }
      }
    }
  });
}

// grad_x(v) = 1/M sum_{valid p} [ c_p + sum_q G[p,q] w(v - p + q) ],  valid p: output v - p + P in range,
// with G = grad_cov + grad_cov^T, w = xp - a (a = the centre mean), c_p = grad_mean[p] - (G E[w])_p.
// For each v this is a (2K-1)^2 stencil on w plus a constant, which depend on v only through the
// set of valid row offsets and the set of valid column offsets: one stencil for the interior and
// a few for the border rows and columns, built once per channel.
template <typename scalar_t, typename stat_t>
void moments_backward_kernel(const stat_t* grad_mean, const stat_t* grad_cov, const scalar_t* x, const stat_t* mean,
                             int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, scalar_t* grad_x) {
  const int64_t P = K / 2, KK = K * K, L = 2 * K - 1, LL = L * L;
  const int64_t Hp = H + 2 * P, Wp = W + 2 * P, plane_size = Hp * Wp;
  const double inv_M = 1.0 / static_cast<double>(N * H * W);
  // valid offsets along one axis of length n at position i: [max(0, i + P - (n-1)), min(K-1, i + P)];
  // positions with the same range form contiguous runs (both ends are monotone in i)
  auto classes = [&](int64_t n, std::vector<int64_t>& cls, std::vector<std::array<int64_t, 2>>& range,
                     std::vector<std::array<int64_t, 2>>& span) {
    cls.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      const std::array<int64_t, 2> r = {std::max<int64_t>(0, i + P - (n - 1)), std::min<int64_t>(K - 1, i + P)};
      if (range.empty() || range.back() != r) {
        range.push_back(r);
        span.push_back({i, i});
      }
      cls[i] = static_cast<int64_t>(range.size()) - 1;
      span.back()[1] = i + 1;
    }
  };
  std::vector<int64_t> row_cls, col_cls;
  std::vector<std::array<int64_t, 2>> row_range, col_range, row_span, col_span;
  classes(H, row_cls, row_range, row_span);
  classes(W, col_cls, col_range, col_span);
  const int64_t n_rc = row_range.size(), n_cc = col_range.size();
  std::vector<int64_t> q_stencil(KK);
  for (int64_t q = 0; q < KK; ++q) q_stencil[q] = (q / K) * L + q % K;

  const int64_t lanes = lanes_for(N, Wp), WpG = Wp * lanes;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<double> plane(plane_size * lanes), G(KK * KK), cst(KK), stencil(LL), row_out(W * lanes);
    // per (row class, column class): constant, tap weights and tap offsets (relative to v in the plane)
    std::vector<double> cls_cst(n_rc * n_cc), tap_weight(n_rc * n_cc * LL);
    std::vector<int64_t> tap_offset(n_rc * n_cc * LL), n_taps(n_rc * n_cc);
    for (int64_t c = c0; c < c1; ++c) {
      const double a = static_cast<double>(mean[c * KK + KK / 2]);
      for (int64_t p = 0; p < KK; ++p)
        for (int64_t q = 0; q < KK; ++q)
          G[p * KK + q] = static_cast<double>(grad_cov[(c * KK + p) * KK + q]) +
                          static_cast<double>(grad_cov[(c * KK + q) * KK + p]);
      for (int64_t p = 0; p < KK; ++p) {
        double t = static_cast<double>(grad_mean[c * KK + p]);
        for (int64_t q = 0; q < KK; ++q) t -= G[p * KK + q] * (static_cast<double>(mean[c * KK + q]) - a);
        cst[p] = t;
      }
      for (int64_t rc = 0; rc < n_rc; ++rc) {
        for (int64_t cc = 0; cc < n_cc; ++cc) {
          const int64_t k = rc * n_cc + cc;
          std::fill(stencil.begin(), stencil.end(), 0.0);
          double total = 0;
          for (int64_t pi = row_range[rc][0]; pi <= row_range[rc][1]; ++pi)
            for (int64_t pj = col_range[cc][0]; pj <= col_range[cc][1]; ++pj) {
              const int64_t p = pi * K + pj;
              total += cst[p];
              // w(v - p + q) sits at lag d = q - p, index (qi - pi + K-1, qj - pj + K-1)
              double* st = stencil.data() + (K - 1 - pi) * L + (K - 1 - pj);
              const double* g = G.data() + p * KK;
              for (int64_t q = 0; q < KK; ++q) st[q_stencil[q]] += g[q];
            }
          cls_cst[k] = total;
          int64_t n = 0;
          for (int64_t d = 0; d < LL; ++d) {
            if (stencil[d] == 0.0) continue;
            tap_weight[k * LL + n] = stencil[d];
            tap_offset[k * LL + n++] = (d / L - (K - 1)) * WpG + (d % L - (K - 1)) * lanes;
          }
          n_taps[k] = n;
        }
      }
      for (int64_t n0 = 0; n0 < N; n0 += lanes) {
        const int64_t n_img = std::min(lanes, N - n0);
        fill_planes(x + (n0 * C + c) * H * W, C * H * W, n_img, lanes, H, W, P, a, plane.data());
        for (int64_t i = 0; i < H; ++i) {
          const double* centre = plane.data() + (i + P) * WpG + P * lanes;
          for (int64_t cc = 0; cc < n_cc; ++cc) {
            const int64_t k = row_cls[i] * n_cc + cc;
            const double* tw = tap_weight.data() + k * LL;
            const int64_t* to = tap_offset.data() + k * LL;
            const int64_t nt = n_taps[k];
            const double c_k = cls_cst[k];
            int64_t u = col_span[cc][0] * lanes;
            const int64_t u_end = col_span[cc][1] * lanes;
            for (; u + kBlock <= u_end; u += kBlock) {
              // 8 values in two 4-wide registers across all taps (an array accumulator is kept
              // in memory by GCC: 4x slower)
              Vec4 acc0 = {c_k, c_k, c_k, c_k}, acc1 = acc0;
              for (int64_t t = 0; t < nt; ++t) {
                const double* src = centre + to[t] + u;
                acc0 += tw[t] * load4(src);
                acc1 += tw[t] * load4(src + 4);
              }
              std::memcpy(row_out.data() + u, &acc0, sizeof(Vec4));
              std::memcpy(row_out.data() + u + 4, &acc1, sizeof(Vec4));
            }
            for (; u < u_end; ++u) {
              double acc = c_k;
              for (int64_t t = 0; t < nt; ++t) acc += tw[t] * centre[to[t] + u];
              row_out[u] = acc;
            }
          }
          for (int64_t g = 0; g < n_img; ++g) {
            scalar_t* gx = grad_x + ((n0 + g) * C + c) * H * W + i * W;
            for (int64_t j = 0; j < W; ++j) gx[j] = static_cast<scalar_t>(row_out[j * lanes + g] * inv_M);
          }
        }
      }
    }
  });
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 4, "repso_moments: x must be a 4-D (N, C, H, W) tensor, got ", x.sizes());
  TORCH_CHECK(K >= 1 && K % 2 == 1, "repso_moments: K must be a positive odd integer, got ", K);
  TORCH_CHECK(x.device().is_cpu(), "repso_moments (C++): x must be a CPU tensor");
}

at::ScalarType stat_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> repso_moments_forward(const at::Tensor& x_in, int64_t K) {
  check_x(x_in, K);
  const at::Tensor x = x_in.contiguous();  // channel planes; a channels_last input is copied once
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), KK = K * K;
  auto opts = x.options().dtype(stat_type(x.scalar_type()));
  at::Tensor mean = at::empty({C, KK}, opts), cov = at::empty({C, KK, KK}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "repso_moments_forward", [&] {
    if (x.scalar_type() == at::kDouble) {
      moments_forward_kernel<scalar_t, double>(x.const_data_ptr<scalar_t>(), N, C, H, W, K,
                                               mean.data_ptr<double>(), cov.data_ptr<double>());
    } else {
      moments_forward_kernel<scalar_t, float>(x.const_data_ptr<scalar_t>(), N, C, H, W, K,
                                              mean.data_ptr<float>(), cov.data_ptr<float>());
    }
  });
  return {mean, cov};
}

at::Tensor repso_moments_backward(const at::Tensor& grad_mean_in, const at::Tensor& grad_cov_in, const at::Tensor& x_in,
                                  const at::Tensor& mean_in, int64_t K) {
  check_x(x_in, K);
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), KK = K * K;
  const auto st = stat_type(x.scalar_type());
  TORCH_CHECK(mean_in.sizes() == at::IntArrayRef({C, KK}), "repso_moments_backward: mean must have shape (", C, ", ",
              KK, "), got ", mean_in.sizes());
  TORCH_CHECK(grad_cov_in.sizes() == at::IntArrayRef({C, KK, KK}), "repso_moments_backward: grad_cov must have shape (",
              C, ", ", KK, ", ", KK, "), got ", grad_cov_in.sizes());
  const at::Tensor grad_mean = grad_mean_in.to(st).contiguous(), grad_cov = grad_cov_in.to(st).contiguous();
  const at::Tensor mean = mean_in.to(st).contiguous();
  at::Tensor grad_x = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "repso_moments_backward", [&] {
    if (st == at::kDouble) {
      moments_backward_kernel<scalar_t, double>(grad_mean.const_data_ptr<double>(), grad_cov.const_data_ptr<double>(),
                                                x.const_data_ptr<scalar_t>(), mean.const_data_ptr<double>(), N, C, H,
                                                W, K, grad_x.data_ptr<scalar_t>());
    } else {
      moments_backward_kernel<scalar_t, float>(grad_mean.const_data_ptr<float>(), grad_cov.const_data_ptr<float>(),
                                               x.const_data_ptr<scalar_t>(), mean.const_data_ptr<float>(), N, C, H, W,
                                               K, grad_x.data_ptr<scalar_t>());
    }
  });
  // hand back the caller's layout (channels_last in, channels_last out)
  return grad_x.contiguous(x_in.suggest_memory_format());
}

}  // namespace

// Development builds load this file alone beside the installed extension, under another namespace
// (-DFALCONNET_OPS_NAMESPACE=falconnet_dev) so the two registrations do not collide.
#ifndef FALCONNET_OPS_NAMESPACE
#define FALCONNET_OPS_NAMESPACE falconnet_C
#endif

TORCH_LIBRARY_FRAGMENT(FALCONNET_OPS_NAMESPACE, m) {
  // mean (C, K*K), cov (C, K*K, K*K) of the zero-padded KxK window shifts; float64 for float64 x, else float32
  m.def("repso_moments_forward(Tensor x, int K) -> (Tensor, Tensor)");
  // -> grad_x from the gradients of mean and cov
  m.def("repso_moments_backward(Tensor grad_mean, Tensor grad_cov, Tensor x, Tensor mean, int K) -> Tensor");
}

TORCH_LIBRARY_IMPL(FALCONNET_OPS_NAMESPACE, CPU, m) {
  m.impl("repso_moments_forward", &repso_moments_forward);
  m.impl("repso_moments_backward", &repso_moments_backward);
}
