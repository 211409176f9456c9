// Depthwise 3x3 conv (padding 1, stride 1 or 2) with fused bias and activation on the CPU: the
// folded RepSO operator. Forward and backward.
//
// Two numbers (N images, C channels, H x W in, Ho x Wo out):
//   FLOPs forward  = 2 * 9 * N*C*Ho*Wo
//   bytes forward  = N*C*(H*W + Ho*Wo) * sizeof(T)      (weights and bias: 10*C values)
// 18 FLOP per output element against 8 (stride 1) bytes in float32: ~2 FLOP/byte, memory-bound
// on any CPU once the loop is vectorized. Backward: 4x the forward FLOPs (grad_x and grad_weight),
// bytes = N*C*(2*H*W + Ho*Wo) * sizeof(T) (+ one more read of x when the activation needs z).
//
// Loop order and layout, and why:
// * NCHW: one (image, channel) plane at a time. The plane is copied once into a zero-padded
//   (H+2) x (W+2) buffer in the compute type, so the 9 taps are plain shifted rows with no
//   boundary tests and the SIMD lanes run along W. Backward parallelises over channels (each
//   thread owns grad_weight[c] and grad_bias[c], no reduction needed) and, per plane, recomputes
//   z (for the activation mask), reduces grad_weight/grad_bias and scatters grad_x into a padded
//   buffer, all while the plane is in cache.
// * channels_last: the SIMD lanes run along C (contiguous), one output row (n, oh) per task, the
//   weights transposed once to (9, C). float32/float64 with C a multiple of the vector width walk
//   a row a block of 8 output pixels at a time, every channel of the block before the next, each
//   input column loaded once per block and fed to every pixel whose window holds it (dw_pixels;
//   the row's first and last blocks skip the columns outside the image), bias + activation fused
//   into the one store; other cases accumulate blocks of kChannelBlock channels in a small buffer,
//   the 9 taps bounds-checked per pixel. Backward: pass 1 over output rows computes grad_z =
//   grad_y * act'(z), keeps it in a scratch tensor and reduces grad_weight/grad_bias in per-thread
//   partials; pass 2 over input rows gathers grad_x (a gather, not a scatter, so rows are
//   independent across threads). Backward, stride 1, C a multiple of 16: the
//   one-pass kernel of csrc/cpu/repso_moments.cpp instead (padded per-block planes of x and grad_z;
//   with the forward below, 1.00-1.66x oneDNN's forward+backward vs 0.55-1.24x before,
//   benchmarks/results/2026-11-26-cpu-2/bench_dw_after.md).
#include "cpu/common.h"

#include <torch/library.h>

namespace falconnet::cpu {

// csrc/cpu/repso_moments.cpp: the one-pass backward for stride 1, channels_last, C % 16 == 0
// (false when it does not apply)
bool dw3x3_backward_channels_last(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, Activation act, at::Tensor& grad_x,
                                  at::Tensor& grad_w, at::Tensor& grad_b);

namespace {

struct DwShape {
  int64_t N, C, H, W, Ho, Wo;
  int stride;
};

constexpr int kChannelBlock = 64;

// z = depthwise conv + bias (before the activation) of one padded plane, into out (Ho x Wo).
template <typename A, int STRIDE>
void dw_plane_conv(const A* __restrict xp, int64_t Wp, const A* __restrict w, A b, int64_t Ho, int64_t Wo,
                   A* __restrict out) {
  const A w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const A* r0 = xp + oh * STRIDE * Wp;
    const A* r1 = r0 + Wp;
    const A* r2 = r1 + Wp;
    A* o = out + oh * Wo;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const int64_t i = ow * STRIDE;
      o[ow] = b + w0 * r0[i] + w1 * r0[i + 1] + w2 * r0[i + 2] + w3 * r1[i] + w4 * r1[i + 1] + w5 * r1[i + 2] +
              w6 * r2[i] + w7 * r2[i + 1] + w8 * r2[i + 2];
    }
  }
}

template <typename A>
void dw_plane_conv_any(const A* xp, int64_t Wp, const A* w, A b, const DwShape& s, A* out) {
  if (s.stride == 1)
    dw_plane_conv<A, 1>(xp, Wp, w, b, s.Ho, s.Wo, out);
  else
    dw_plane_conv<A, 2>(xp, Wp, w, b, s.Ho, s.Wo, out);
}

// xp (H+2) x (W+2) = zero-padded copy of one plane.
template <typename S, typename A>
void load_padded_plane(const S* plane, int64_t H, int64_t W, A* xp) {
  const int64_t Wp = W + 2;
  std::fill(xp, xp + Wp, A(0));
  std::fill(xp + (H + 1) * Wp, xp + (H + 2) * Wp, A(0));
  for (int64_t h = 0; h < H; ++h) {
    A* row = xp + (h + 1) * Wp;
    row[0] = A(0);
    row[W + 1] = A(0);
    const S* src = plane + h * W;
    for (int64_t w = 0; w < W; ++w) row[w + 1] = static_cast<A>(src[w]);
  }
}

template <typename A>
void apply_activation(A* z, int64_t n, Activation act) {
  if (act == Activation::kNone) return;
  for (int64_t i = 0; i < n; ++i) z[i] = activate(z[i], act);
}

template <typename A>
void apply_mask(A* gz, const A* z, int64_t n, Activation act) {
  if (act == Activation::kRelu) {
    for (int64_t i = 0; i < n; ++i) gz[i] = z[i] > A(0) ? gz[i] : A(0);
  } else if (act == Activation::kRelu6) {
    for (int64_t i = 0; i < n; ++i) gz[i] = (z[i] > A(0) && z[i] < A(6)) ? gz[i] : A(0);
  }
}

// ---------------------------------------------------------------------------------------------
// NCHW

template <typename S>
void dw_forward_nchw(const S* x, const compute_t<S>* w, const compute_t<S>* b, S* y, const DwShape& s,
                     Activation act) {
  using A = compute_t<S>;
  const int64_t Wp = s.W + 2, plane_in = s.H * s.W, plane_out = s.Ho * s.Wo;
  at::parallel_for(0, s.N * s.C, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> xp((s.H + 2) * Wp), z(plane_out);
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t c = nc % s.C;
      load_padded_plane(x + nc * plane_in, s.H, s.W, xp.data());
      dw_plane_conv_any(xp.data(), Wp, w + 9 * c, b ? b[c] : A(0), s, z.data());
      apply_activation(z.data(), plane_out, act);
      S* out = y + nc * plane_out;
      for (int64_t i = 0; i < plane_out; ++i) out[i] = static_cast<S>(z[i]);
    }
  });
}

template <typename S>
void dw_backward_nchw(const S* gy, const S* x, const compute_t<S>* w, const compute_t<S>* b, S* gx,
                      compute_t<S>* gw, compute_t<S>* gb, const DwShape& s, Activation act) {
  using A = compute_t<S>;
  const int64_t Wp = s.W + 2, plane_in = s.H * s.W, plane_out = s.Ho * s.Wo;
  at::parallel_for(0, s.C, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> xp((s.H + 2) * Wp), gxp((s.H + 2) * Wp), gz(plane_out), z;
    if (act != Activation::kNone) z.resize(plane_out);
    for (int64_t c = begin; c < end; ++c) {
      A wsum[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0};
      A bsum = 0;
      const A* wc = w + 9 * c;
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t nc = n * s.C + c;
        load_padded_plane(x + nc * plane_in, s.H, s.W, xp.data());
        const S* g = gy + nc * plane_out;
        for (int64_t i = 0; i < plane_out; ++i) gz[i] = static_cast<A>(g[i]);
        if (act != Activation::kNone) {
          dw_plane_conv_any(xp.data(), Wp, wc, b ? b[c] : A(0), s, z.data());
          apply_mask(gz.data(), z.data(), plane_out, act);
        }
        for (int64_t i = 0; i < plane_out; ++i) bsum += gz[i];
        std::fill(gxp.begin(), gxp.end(), A(0));
        for (int dy = 0; dy < 3; ++dy)
          for (int dx = 0; dx < 3; ++dx) {
            const A wt = wc[dy * 3 + dx];
            A dot = 0;
            for (int64_t oh = 0; oh < s.Ho; ++oh) {
              const A* __restrict grow = gz.data() + oh * s.Wo;
              const A* __restrict xrow = xp.data() + (oh * s.stride + dy) * Wp + dx;
              A* __restrict gxrow = gxp.data() + (oh * s.stride + dy) * Wp + dx;
              if (s.stride == 1) {
                for (int64_t ow = 0; ow < s.Wo; ++ow) {
                  dot += grow[ow] * xrow[ow];
                  gxrow[ow] += wt * grow[ow];
                }
              } else {
                for (int64_t ow = 0; ow < s.Wo; ++ow) {
                  dot += grow[ow] * xrow[2 * ow];
                  gxrow[2 * ow] += wt * grow[ow];
                }
              }
            }
            wsum[dy * 3 + dx] += dot;
          }
        S* out = gx + nc * plane_in;
        for (int64_t h = 0; h < s.H; ++h)
          for (int64_t ww = 0; ww < s.W; ++ww) out[h * s.W + ww] = static_cast<S>(gxp[(h + 1) * Wp + ww + 1]);
      }
      for (int t = 0; t < 9; ++t) gw[9 * c + t] = wsum[t];
      gb[c] = bsum;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// channels_last

// acc[0:len] += wt[0:len] * src[0:len] for one tap, len <= kChannelBlock.
template <typename S, typename A>
inline void axpy_block(A* __restrict acc, const A* __restrict wt, const S* __restrict src, int64_t len) {
  if (len == kChannelBlock) {
#pragma GCC unroll 4
    for (int c = 0; c < kChannelBlock; ++c) acc[c] += wt[c] * static_cast<A>(src[c]);
  } else {
    for (int64_t c = 0; c < len; ++c) acc[c] += wt[c] * static_cast<A>(src[c]);
  }
}

// z row (Wo x C) = conv + bias for output row (n, oh); wt is (9, C).
template <typename S, typename A>
void dw_row_conv_nhwc(const S* x, const A* wt, const A* b, const DwShape& s, int64_t n, int64_t oh, A* zrow) {
  const int64_t C = s.C;
  for (int64_t ow = 0; ow < s.Wo; ++ow) {
    for (int64_t c0 = 0; c0 < C; c0 += kChannelBlock) {
      const int64_t len = std::min<int64_t>(kChannelBlock, C - c0);
      alignas(64) A acc[kChannelBlock];
      for (int64_t c = 0; c < len; ++c) acc[c] = b ? b[c0 + c] : A(0);
      for (int dy = 0; dy < 3; ++dy) {
        const int64_t ih = oh * s.stride + dy - 1;
        if (ih < 0 || ih >= s.H) continue;
        for (int dx = 0; dx < 3; ++dx) {
          const int64_t iw = ow * s.stride + dx - 1;
          if (iw < 0 || iw >= s.W) continue;
          axpy_block(acc, wt + (dy * 3 + dx) * C + c0, x + ((n * s.H + ih) * s.W + iw) * C + c0, len);
        }
      }
      std::copy(acc, acc + len, zrow + ow * C + c0);
    }
  }
}

// One vector of channels of P consecutive output pixels of a row. rows[dy] = the address of x at
// input row oh * S + dy - 1, column ow * S - 1 (the first pixel's left tap), channel c, as an
// integer (that column may lie outside the image: it is skipped, and no pointer is formed to it);
// 0 for a row outside the image. Columns j outside [j_lo, j_hi] are outside the image. Per input row: its 3 weight vectors, then
// each of the (P - 1) * S + 3 columns loaded once and fed to every pixel whose window holds it:
// P accumulators + 3 weights + 1 column = 12 registers at P = 8, so it fits AVX2's 16. Per output
// vector that is 9 FMAs against (3 * (P + 2) + 9) / P = 4.9 loads (stride 1). The row-walk kernel it
// replaced kept 9 weight vectors in registers and loaded every tap: 13.5 loads (9 of x, 4.5 of
// the half-line's second weights), and this machine sustains ~1.5 vector loads a cycle (2 FMAs):
// 10.8 cycles a vector from L1 against 5.6 here (a standalone loop, C = 16, 2.9 GHz).
template <typename A, int P, int S, bool EDGE>
__attribute__((always_inline)) inline void dw_pixels(const std::uintptr_t* rows, int64_t C, const A* wt,
                                                     typename Simd<A>::vec bias, Activation act, int j_lo, int j_hi,
                                                     A* out) {
  using V = Simd<A>;
  using vec = typename V::vec;
  vec acc[P];
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) acc[p] = bias;
#pragma GCC unroll 3
  for (int dy = 0; dy < 3; ++dy) {
    std::uintptr_t r = rows[dy];
    if (r == 0) continue;
    const std::uintptr_t step = C * sizeof(A);
    const vec w0 = V::load(wt + (dy * 3) * C), w1 = V::load(wt + (dy * 3 + 1) * C), w2 = V::load(wt + (dy * 3 + 2) * C);
#pragma GCC unroll 32
    for (int j = 0; j < (P - 1) * S + 3; ++j) {
      // one pointer step a column: with the offsets j * C folded instead, GCC keeps 3 (P + 2)
      // pointers live across the channel loop and spills them (3x slower)
      const std::uintptr_t col = r;
      r += step;
      asm("" : "+r"(r));
      if (EDGE && (j < j_lo || j > j_hi)) continue;  // a column outside the image
      const vec xv = V::load(reinterpret_cast<const A*>(col));
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) {
        const int dx = j - p * S;
        if (dx == 0) acc[p] += w0 * xv;
        if (dx == 1) acc[p] += w1 * xv;
        if (dx == 2) acc[p] += w2 * xv;
      }
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) V::store(out + p * C, activate_vec<A>(acc[p], act));
}

// Output pixels [ow, ow + P) of row (n, oh), every channel: a block of pixels at a time, all its
// channels before the next block, so the input rows and the output are walked in address order.
template <typename A, int P, int S>
inline void dw_block(const A* const* rows, const A* wt, const A* b, const DwShape& s, int64_t ow, Activation act,
                     A* out_row) {
  using V = Simd<A>;
  constexpr int L = V::lanes;
  const int64_t C = s.C, iw0 = ow * S - 1;  // the block's first input column
  // its columns j inside the image: 0 <= iw0 + j <= W - 1
  const int j_lo = iw0 < 0 ? static_cast<int>(-iw0) : 0;
  const int j_hi = static_cast<int>(std::min<int64_t>((P - 1) * S + 2, s.W - 1 - iw0));
  // the tests per column only in the row's first and last blocks (in every block they cost 8-12%
  // at stride 2)
  const bool edge = j_lo > 0 || j_hi < (P - 1) * S + 2;
  for (int64_t c = 0; c < C; c += L) {
    std::uintptr_t r[3];
    for (int dy = 0; dy < 3; ++dy)
      r[dy] = rows[dy] ? reinterpret_cast<std::uintptr_t>(rows[dy]) + (iw0 * C + c) * sizeof(A) : 0;
    const typename V::vec bias = b ? V::load(b + c) : V::zero();
    if (edge)
      dw_pixels<A, P, S, true>(r, C, wt + c, bias, act, j_lo, j_hi, out_row + ow * C + c);
    else
      dw_pixels<A, P, S, false>(r, C, wt + c, bias, act, j_lo, j_hi, out_row + ow * C + c);
  }
}

// One output row (n, oh) of the channels_last forward, C a multiple of the vector width: blocks of
// 8 pixels and one of the 1-7 left (dw_pixels; the first and last blocks skip the columns outside
// the image). Each block of 8 first prefetches the newest input row's columns of the block after
// it (at stride 1 the two other rows were read by the row above, and are in L2; at stride 2 only
// the top one was, and the middle row is prefetched too: 0.92-0.98x the time at batch 16 128@112,
// 256@56, 512@28 and batch 8 128@112, 1 and 2 threads, AVX-512, 2026-11-28,
// benchmarks/results/2026-11-28-cpu-avx512/ab/dwab.py). Until 2026-11-28 maps of at
// most 64 pixels (stride 1, C % 16 == 0) took a padded-plane kernel in repso_moments.cpp; against
// it this measured 0.72-0.89x the time at 1024@7, 512@7, 256@8 and 128@8 (batch 8-128), 1.00x at
// batch 4 and 1.40x at batch 2 (1024@7: 91 vs 64 us), so it was removed.
template <typename A, int S>
void dw_row_blocks(const A* x, const A* wt, const A* b, const DwShape& s, int64_t n, int64_t oh, Activation act,
                   A* out_row) {
  const int64_t C = s.C;
  const A* rows[3];
  for (int dy = 0; dy < 3; ++dy) {
    const int64_t ih = oh * S + dy - 1;
    rows[dy] = ih >= 0 && ih < s.H ? x + (n * s.H + ih) * s.W * C : nullptr;
  }
  const A* newest = rows[2] ? rows[2] : rows[1];
  const A* middle = S == 2 && rows[2] ? rows[1] : nullptr;  // stride 2: not read by the row above either
  int64_t ow = 0;
  for (; ow + 8 <= s.Wo; ow += 8) {
    if (newest) {  // byte offsets within the row, so no pointer is formed past it
      const int64_t from = ((ow + 8) * S + 1) * C * static_cast<int64_t>(sizeof(A));
      const int64_t to = std::min<int64_t>(from + 8 * S * C * static_cast<int64_t>(sizeof(A)),
                                           s.W * C * static_cast<int64_t>(sizeof(A)));
      for (const A* row : {newest, middle})
        if (row)
          for (int64_t o = from; o < to; o += 64) __builtin_prefetch(reinterpret_cast<const char*>(row) + o, 0, 3);
    }
    dw_block<A, 8, S>(rows, wt, b, s, ow, act, out_row);
  }
  if (ow < s.Wo)  // the 1-7 pixels left, one block
    with_run_length<7>(s.Wo - ow, [&](auto p) { dw_block<A, decltype(p)::value, S>(rows, wt, b, s, ow, act, out_row); });
}

template <typename S>
void dw_forward_nhwc(const S* x, const compute_t<S>* wt, const compute_t<S>* b, S* y, const DwShape& s,
                     Activation act) {
  using A = compute_t<S>;
  constexpr int L = Simd<A>::lanes;
  if constexpr (std::is_same_v<S, A>) {
    if (s.C % L == 0) {
      // Each block prefetches the newest input row's next block (dw_row_blocks). Against no prefetch
      // (2026-11-28, AVX2 machine, 2 threads, median of 25 alternated per-round ratios): batch 16
      // 32@112 / 128@56 / 256@28 1.08 / 1.20 / 1.11x the time without it, batch 8 128@56 1.22x,
      // and cache-resident inputs (3.2 MB: batch 4 128@56, batch 8 256@28 and 512@14) 1.14 /
      // 1.12 / 1.01x, so it is always on. Two or three blocks ahead, or the output's lines
      // prefetched too: 0.92-1.16x, no consistent gain.
      at::parallel_for(0, s.N * s.Ho, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t n = row / s.Ho, oh = row % s.Ho;
          A* out_row = y + row * s.Wo * s.C;
          if (s.stride == 1)
            dw_row_blocks<A, 1>(x, wt, b, s, n, oh, act, out_row);
          else
            dw_row_blocks<A, 2>(x, wt, b, s, n, oh, act, out_row);
        }
      });
      return;
    }
  }
  at::parallel_for(0, s.N * s.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> zrow(s.Wo * s.C);
    for (int64_t row = begin; row < end; ++row) {
      dw_row_conv_nhwc(x, wt, b, s, row / s.Ho, row % s.Ho, zrow.data());
      apply_activation(zrow.data(), s.Wo * s.C, act);
      S* out = y + row * s.Wo * s.C;
      for (int64_t i = 0; i < s.Wo * s.C; ++i) out[i] = static_cast<S>(zrow[i]);
    }
  });
}

template <typename S>
void dw_backward_nhwc(const S* gy, const S* x, const compute_t<S>* wt, const compute_t<S>* b, S* gx,
                      compute_t<S>* gw_tc /* (9, C) */, compute_t<S>* gb, const DwShape& s, Activation act) {
  using A = compute_t<S>;
  const int64_t C = s.C;
  std::vector<A> gz_all(s.N * s.Ho * s.Wo * C);
  std::mutex merge;
  // Pass 1: grad_z, grad_weight, grad_bias.
  at::parallel_for(0, s.N * s.Ho, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> pw(9 * C, A(0)), pb(C, A(0)), zrow;
    if (act != Activation::kNone) zrow.resize(s.Wo * C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / s.Ho, oh = row % s.Ho;
      A* gz = gz_all.data() + row * s.Wo * C;
      const S* g = gy + row * s.Wo * C;
      for (int64_t i = 0; i < s.Wo * C; ++i) gz[i] = static_cast<A>(g[i]);
      if (act != Activation::kNone) {
        dw_row_conv_nhwc(x, wt, b, s, n, oh, zrow.data());
        apply_mask(gz, zrow.data(), s.Wo * C, act);
      }
      for (int64_t ow = 0; ow < s.Wo; ++ow) {
        const A* __restrict gzp = gz + ow * C;
        for (int64_t c = 0; c < C; ++c) pb[c] += gzp[c];
        for (int dy = 0; dy < 3; ++dy) {
          const int64_t ih = oh * s.stride + dy - 1;
          if (ih < 0 || ih >= s.H) continue;
          for (int dx = 0; dx < 3; ++dx) {
            const int64_t iw = ow * s.stride + dx - 1;
            if (iw < 0 || iw >= s.W) continue;
            const S* __restrict xp = x + ((n * s.H + ih) * s.W + iw) * C;
            A* __restrict w = pw.data() + (dy * 3 + dx) * C;
            for (int64_t c = 0; c < C; ++c) w[c] += gzp[c] * static_cast<A>(xp[c]);
          }
        }
      }
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t i = 0; i < 9 * C; ++i) gw_tc[i] += pw[i];
    for (int64_t c = 0; c < C; ++c) gb[c] += pb[c];
  });
  // Pass 2: grad_x[ih, iw] = sum over the taps that read (ih, iw) of w * grad_z.
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(C);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / s.H, ih = row % s.H;
      for (int64_t iw = 0; iw < s.W; ++iw) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (int dy = 0; dy < 3; ++dy) {
          const int64_t oh_s = ih + 1 - dy;  // = oh * stride
          if (oh_s < 0 || oh_s % s.stride != 0 || oh_s / s.stride >= s.Ho) continue;
          const int64_t oh = oh_s / s.stride;
          for (int dx = 0; dx < 3; ++dx) {
            const int64_t ow_s = iw + 1 - dx;
            if (ow_s < 0 || ow_s % s.stride != 0 || ow_s / s.stride >= s.Wo) continue;
            const int64_t ow = ow_s / s.stride;
            const A* __restrict gzp = gz_all.data() + ((n * s.Ho + oh) * s.Wo + ow) * C;
            const A* __restrict w = wt + (dy * 3 + dx) * C;
            A* __restrict a = acc.data();
            for (int64_t c = 0; c < C; ++c) a[c] += w[c] * gzp[c];
          }
        }
        S* out = gx + ((n * s.H + ih) * s.W + iw) * C;
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<S>(acc[c]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points

DwShape check_dw_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t stride) {
  check_cpu(x, "x");
  check_float_dtype(x, "x");
  FALCONNET_CHECK(x.dim() == 4, "x must be a 4-D (N, C, H, W) tensor, got shape ", x.sizes());
  const int64_t C = x.size(1);
  FALCONNET_CHECK(weight.sizes() == at::IntArrayRef({C, 1, 3, 3}), "weight must have shape (", C,
                  ", 1, 3, 3) for x with ", C, " channels, got ", weight.sizes());
  FALCONNET_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  check_like(weight, x, "weight");
  check_like(bias, x, "bias");
  if (bias.has_value())
    FALCONNET_CHECK(bias->dim() == 1 && bias->size(0) == C, "bias must have shape (", C, ",), got ", bias->sizes());
  DwShape s;
  s.N = x.size(0);
  s.C = C;
  s.H = x.size(2);
  s.W = x.size(3);
  s.stride = static_cast<int>(stride);
  s.Ho = (s.H - 1) / stride + 1;
  s.Wo = (s.W - 1) / stride + 1;
  return s;
}

// weight (C, 1, 3, 3) in the compute type: as (C, 9) for NCHW, transposed to (9, C) for NHWC.
at::Tensor dw_weight_for(const at::Tensor& weight, Layout layout) {
  at::Tensor w = weight_in_compute_type(weight).view({weight.size(0), 9});
  return layout == Layout::kNHWC ? w.t().contiguous() : w;
}

at::Tensor dw_conv3x3_forward_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, int64_t stride,
                                  c10::string_view activation) {
  const DwShape s = check_dw_inputs(x_in, weight, bias, stride);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const at::Tensor x = collapsible(x_in);
  at::Tensor y = at::empty({s.N, s.C, s.Ho, s.Wo}, x.options().memory_format(output_format(x_in)));
  if (y.numel() == 0) return y;
  const Layout layout = layout_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_conv3x3_forward_cpu", [&] {
    using A = compute_t<scalar_t>;
    const at::Tensor w = dw_weight_for(weight, layout);
    at::Tensor b;
    if (bias) b = weight_in_compute_type(*bias);
    const A* bp = bias ? b.data_ptr<A>() : nullptr;
    // y's format follows x_in, which is always x's layout (channels_last x gives channels_last y;
    // a plain-contiguous or copied x gives contiguous y), so the kernels write y in x's layout.
    if (layout == Layout::kNCHW)
      dw_forward_nchw<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<A>(), bp, y.data_ptr<scalar_t>(), s, act);
    else
      dw_forward_nhwc<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<A>(), bp, y.data_ptr<scalar_t>(), s, act);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_conv3x3_backward_cpu(const at::Tensor& grad_y_in,
                                                                        const at::Tensor& x_in,
                                                                        const at::Tensor& weight,
                                                                        const c10::optional<at::Tensor>& bias,
                                                                        int64_t stride, c10::string_view activation) {
  const DwShape s = check_dw_inputs(x_in, weight, bias, stride);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  check_cpu(grad_y_in, "grad_y");
  FALCONNET_CHECK(grad_y_in.scalar_type() == x_in.scalar_type(), "grad_y must have the same dtype as x (",
                  x_in.scalar_type(), "), got ", grad_y_in.scalar_type());
  FALCONNET_CHECK(grad_y_in.sizes() == at::IntArrayRef({s.N, s.C, s.Ho, s.Wo}), "grad_y must have the output's shape (",
                  s.N, ", ", s.C, ", ", s.Ho, ", ", s.Wo, "), got ", grad_y_in.sizes());
  const at::Tensor x = collapsible(x_in);
  const Layout layout = layout_of(x);
  // The kernels want grad_y and grad_x in x's layout.
  const auto fmt = layout == Layout::kNHWC ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor grad_y = grad_y_in.contiguous(fmt);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor grad_w = at::zeros(weight.sizes(), weight.options());
  at::Tensor grad_b = at::zeros({s.C}, weight.options());
  if (x.numel() == 0 || grad_y.numel() == 0) {
    if (grad_x.numel()) grad_x.zero_();
    return {grad_x.contiguous(output_format(x_in)), grad_w, grad_b};
  }
  // stride 1, channels_last, C a multiple of 16: the one-pass kernel in repso_moments.cpp
  if (s.stride == 1 && dw3x3_backward_channels_last(grad_y, x, weight, bias, act, grad_x, grad_w, grad_b))
    return {grad_x.contiguous(output_format(x_in)), grad_w, grad_b};
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw_conv3x3_backward_cpu", [&] {
    using A = compute_t<scalar_t>;
    const at::Tensor w = dw_weight_for(weight, layout);
    at::Tensor b;
    if (bias) b = weight_in_compute_type(*bias);
    const A* bp = bias ? b.data_ptr<A>() : nullptr;
    const auto acc_opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value);
    at::Tensor gw = at::zeros({layout == Layout::kNHWC ? 9 : s.C, layout == Layout::kNHWC ? s.C : 9}, acc_opts);
    at::Tensor gb = at::zeros({s.C}, acc_opts);
    if (layout == Layout::kNCHW) {
      dw_backward_nchw<scalar_t>(grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<A>(), bp,
                                 grad_x.data_ptr<scalar_t>(), gw.data_ptr<A>(), gb.data_ptr<A>(), s, act);
    } else {
      dw_backward_nhwc<scalar_t>(grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<A>(), bp,
                                 grad_x.data_ptr<scalar_t>(), gw.data_ptr<A>(), gb.data_ptr<A>(), s, act);
      gw = gw.t();
    }
    grad_w.view({s.C, 9}).copy_(gw);
    grad_b.copy_(gb);
  });
  return {grad_x.contiguous(output_format(x_in)), grad_w, grad_b};
}

}  // namespace
}  // namespace falconnet::cpu

TORCH_LIBRARY_IMPL(falconnet_C, CPU, m) {
  m.impl("dw_conv3x3_forward", &falconnet::cpu::dw_conv3x3_forward_cpu);
  m.impl("dw_conv3x3_backward", &falconnet::cpu::dw_conv3x3_backward_cpu);
}
