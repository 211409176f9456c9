// Shifted-window moments for RepSO's exact one-conv training (falconnet_kernels/repso_moments.py,
// docs/repso_training.md): per channel, the K*K means and the K*K x K*K covariance of the
// zero-padded KxK window shifts of x, and the backward that turns their gradients into grad_x.
//
// Also here: the kernels of RepSO's one-node CPU training backward (the depthwise conv's weight
// gradient, grad_x fused with the conv's input gradient) and dw_conv3x3's channels_last backward,
// which share the channels_last machinery (16-channel blocks, padded planes, register-blocked runs).
//
// Numerics. The moments are formed from w = xp - a, where xp is x zero-padded and a a per-channel
// shift (a sample of x, or a row mean): shifting every value of xp, padding included, by the same
// constant leaves the covariance unchanged, and makes E[w_p] small, so
// cov = E[w_p w_q] - E[w_p] E[w_q] no longer cancels (mean/std)^2 digits. The per-channel path and
// float64 x accumulate in double (for float32 or bf16 input w and the products are exact there).
// The channels_last fast path for float32/bf16 x computes in float and adds its float sums into
// double totals every 64 positions (the error analysis is at kFlush and in
// docs/repso_training.md). The backward uses the same shift (the saved centre mean) so its terms
// are centred too.
#include <ATen/Dispatch.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
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

// ---------------------------------------------------------------------------------------------
// Channels_last, K = 3, C a multiple of 16: vectorized across channels.
//
// x[n, h, w, c0:c0+16] is one 64-byte line, so a block of 16 channels is read as whole lines and
// every arithmetic op works on 8 channels at once (one AVX-512 register of doubles). Per block and
// image, the padded plane of w = xp - a is built once in double ([Hp + 2][Wp + 4][16], with zero
// guard rows/columns so every lag read is in bounds, -a in the zero padding). The accumulation is
// the per-channel kernel's lag decomposition, with the per-column accumulators replaced by one
// accumulator set per (row slot, column slot) class: the "middle" rows and columns that every
// window contains share one slot each, every other padded row or column has its own. Within a run
// of positions of one class, its 13 lag products and the plain sum stay in registers.
namespace cl3 {

constexpr int64_t kCB = 16;    // channels per block: one cache line of float32
constexpr int64_t kV = 8;      // doubles per 64-byte line
constexpr int64_t kLags = 13;  // (D, d) with D in 0..2, d in -2..2, D == 0 only for d >= 0
constexpr int64_t kAcc = kLags + 1;  // plus the plain sum
constexpr int kLagD[kLags] = {0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2};
constexpr int kLagd[kLags] = {0, 1, 2, -2, -1, 0, 1, 2, -2, -1, 0, 1, 2};
// A zeroed buffer of n doubles starting on a 64-byte boundary: every 8-double load and store of
// the planes, accumulators and stencils then stays within one cache line.
struct Aligned {
  std::vector<double> storage;
  double* data;
  explicit Aligned(int64_t n) : storage(n + kV, 0.0) {
    const auto address = reinterpret_cast<std::uintptr_t>(storage.data());
    data = storage.data() + ((64 - address % 64) % 64) / sizeof(double);
  }
};

inline int64_t lag_index(int64_t D, int64_t d) { return D == 0 ? d : 3 + (D - 1) * 5 + (d + 2); }

// Both kernels compute in a type A: double for float64 x, float for float32 and bf16 x (16 lanes
// per AVX-512 register instead of 8, half the instructions; see forward() and backward()). One
// 64-byte vector holds Simd<A>::lanes channels; a block of 16 channels is kCB / lanes such "parts".
using falconnet::cpu::Simd;  // csrc/cpu/common.h: one 64-byte vector of A
using falconnet::cpu::with_run_length;

// One vector of A rounded to the output dtype; STREAM: a non-temporal store for float output (see
// falconnet::cpu::use_streaming_stores; the output is 64-byte aligned in the kernels that ask).
template <bool STREAM, typename A, typename scalar_t>
inline void store_out(scalar_t* out, typename Simd<A>::vec v) {
  constexpr int L = Simd<A>::lanes;
  if constexpr (STREAM && std::is_same_v<scalar_t, float> && std::is_same_v<A, float>) {
    if (falconnet::cpu::stream_vec<A, /*ALIGNED=*/true>(out, v)) return;
  }
  if constexpr (std::is_same_v<scalar_t, A>) {
    std::memcpy(out, &v, sizeof(v));
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    typedef float F __attribute__((vector_size(L * sizeof(float))));
    const F f = __builtin_convertvector(v, F);
    std::memcpy(out, &f, sizeof(F));
  } else {
    A tmp[L];
    std::memcpy(tmp, &v, sizeof(v));
    for (int c = 0; c < L; ++c) out[c] = static_cast<scalar_t>(tmp[c]);
  }
}

// Simd<A>::lanes values of x converted to A
template <typename A, typename scalar_t>
inline typename Simd<A>::vec load_as(const scalar_t* in) {
  using S = Simd<A>;
  if constexpr (std::is_same_v<scalar_t, A>) {
    return S::load(in);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    typedef float F __attribute__((vector_size(S::lanes * sizeof(float))));
    F f;
    std::memcpy(&f, in, sizeof(F));
    return __builtin_convertvector(f, typename S::vec);
  } else {
    A tmp[S::lanes];
    for (int64_t c = 0; c < S::lanes; ++c) tmp[c] = static_cast<A>(in[c]);
    return S::load(tmp);
  }
}

// The 16 channels of one block sit on one cache line per position, C values apart: reading an
// image's lines one after another waits on memory at every line (the hardware prefetchers do not
// follow such a stride far enough ahead). Requesting the next image's lines while this one is
// computed hides that latency (measured 1.1-1.3x on the kernels at 128@56).
template <typename scalar_t>
inline void prefetch_image(const scalar_t* x, int64_t C, int64_t H, int64_t W) {
  for (int64_t v = 0; v < H * W; ++v) __builtin_prefetch(x + v * C);
}

// The padded plane of one image and one block of 16 channels, w = x - a in A, as kCB / lanes parts
// (so that the five rows the backward's stencil reads fit in L1 at 56 x 58 columns):
// plane[h * part_stride + (r * Wc + t + 2) * lanes + c] for padded row r in [0, Hp), column t in
// [0, Wp); the guards (columns -2, -1, Wp, Wp+1, and the rows past Hp) stay 0 from the allocation.
template <typename A, typename scalar_t>
void fill_plane_as(const scalar_t* x, int64_t C, int64_t H, int64_t W, const A* a, A* plane, int64_t part_stride) {
  using S = Simd<A>;
  constexpr int64_t L = S::lanes, n_parts = kCB / L;
  const int64_t Wp = W + 2, Wc = Wp + 4, Hp = H + 2;
  typename S::vec shift[n_parts];
  for (int64_t h = 0; h < n_parts; ++h) shift[h] = S::load(a + h * L);
  auto store = [](A* p, typename S::vec v) { std::memcpy(p, &v, sizeof(v)); };
  for (int64_t r = 0; r < Hp; ++r) {
    A* row = plane + (r * Wc + 2) * L;
    if (r == 0 || r == Hp - 1) {
      for (int64_t t = 0; t < Wp; ++t)
        for (int64_t h = 0; h < n_parts; ++h) store(row + t * L + h * part_stride, -shift[h]);
      continue;
    }
    for (int64_t h = 0; h < n_parts; ++h) {
      store(row + h * part_stride, -shift[h]);
      store(row + (Wp - 1) * L + h * part_stride, -shift[h]);
    }
    const scalar_t* in = x + (r - 1) * W * C;
    for (int64_t t = 1; t < Wp - 1; ++t, in += C)
      for (int64_t h = 0; h < n_parts; ++h) store(row + t * L + h * part_stride, load_as<A>(in + h * L) - shift[h]);
  }
}

// slot of each padded index along an axis of length n (padded n + 2): 0 for the middle [2, n),
// 1 + k for the k-th other index; returns the number of slots
inline int64_t slots(int64_t n, std::vector<int64_t>& slot) {
  slot.resize(n + 2);
  int64_t count = 1;
  for (int64_t r = 0; r < n + 2; ++r) slot[r] = (r >= 2 && r < n) ? 0 : count++;
  return count;
}

// Float accumulators are added into the double totals after at most this many positions: each
// product is exact inside the FMA and only the running sum rounds, so a chunk's error is about
// sqrt(kFlush) * 2^-24 of its size, and independent chunks' errors average out in the double sum
// (measured: float32 statistics within 4e-7 of the float64 reference, as with double throughout).
constexpr int64_t kFlush = 64;

// Whether a row-by-row walk of an H x W plane adds its float sums into the double totals after row
// i: about every kFlush positions, and after the last row.
inline bool flush_after_row(int64_t i, int64_t H, int64_t W) { return i + 1 == H || ((i + 1) * W) % kFlush < W; }

// total[t * kCB + c] += acc[t][c] in double for t < n and every lane c, then acc[t] = 0.
template <typename V>
inline void flush_sums(V* acc, int n, double* total) {
  constexpr int64_t lanes = sizeof(V) / sizeof(acc[0][0]);
  for (int t = 0; t < n; ++t) {
    std::remove_reference_t<decltype(acc[0][0])> tmp[lanes];
    std::memcpy(tmp, &acc[t], sizeof(V));
    for (int64_t c = 0; c < lanes; ++c) total[t * kCB + c] += static_cast<double>(tmp[c]);
    acc[t] = V{};
  }
}

// NP adjacent positions of one padded row (u: the first) into the 13 lag accumulators and the sum
// s: the NP values stay in registers, and each partner value is loaded once for every position
// and lag that uses it (3 NP + 10 loads for 14 NP products, instead of 14 NP).
// ROWS: which partner rows (bit D for row D): all three, or with 16 registers two passes over the
// same positions, rows 0 and 1 with the sum (9 accumulators) then row 2 (5), since the 14
// accumulators, the value and a partner spill 16 registers.
template <int NP, typename A, int ROWS = 7>
__attribute__((always_inline)) inline void lag_run(const A* u, int64_t row_stride, typename Simd<A>::vec* s) {
  using S = Simd<A>;
  using V = typename S::vec;
  constexpr int64_t L = S::lanes;
  V w[NP];
  [&]<int... Q>(std::integer_sequence<int, Q...>) {
    ((w[Q] = S::load(u + Q * L)), ...);
    if constexpr (ROWS & 1) ((s[kLags] += w[Q]), ...);
  }(std::make_integer_sequence<int, NP>{});
  // row D = 0: lags d = 0, 1, 2 (accumulators 0..2); value t meets position q = t - d
  if constexpr (ROWS & 1) [&]<int... T>(std::integer_sequence<int, T...>) {
    auto feed = [&]<int T1>(std::integral_constant<int, T1>) {
      const V v = T1 < NP ? w[T1 < NP ? T1 : 0] : S::load(u + T1 * L);
      [&]<int... D>(std::integer_sequence<int, D...>) {
        ((T1 - D >= 0 && T1 - D < NP ? (void)(s[D] += w[(T1 - D >= 0 && T1 - D < NP) ? T1 - D : 0] * v) : (void)0),
         ...);
      }(std::make_integer_sequence<int, 3>{});
    };
    (feed(std::integral_constant<int, T>{}), ...);
  }(std::make_integer_sequence<int, NP + 2>{});
  // rows D = 1, 2: lags d = -2..2 (accumulators 3 + 5 (D - 1) + d + 2); value t (column t - 2)
  // meets position q = t - 2 - d
  for (int Dr = 1; Dr <= 2; ++Dr) {
    if (!(ROWS & (1 << Dr))) continue;
    const A* src = u + Dr * row_stride - 2 * L;
    V* acc = s + 3 + 5 * (Dr - 1);
    [&]<int... T>(std::integer_sequence<int, T...>) {
      auto feed = [&]<int T1>(std::integral_constant<int, T1>) {
        const V v = S::load(src + T1 * L);
        [&]<int... E>(std::integer_sequence<int, E...>) {  // E = d + 2; q = T1 - E
          ((T1 - E >= 0 && T1 - E < NP ? (void)(acc[E] += w[(T1 - E >= 0 && T1 - E < NP) ? T1 - E : 0] * v)
                                       : (void)0),
           ...);
        }(std::make_integer_sequence<int, 5>{});
      };
      (feed(std::integral_constant<int, T>{}), ...);
    }(std::make_integer_sequence<int, NP + 4>{});
  }
}

// One class block: padded rows [r0, r1) x columns [t0, t1) of n_img planes (pointers to row 0,
// column 0, one part of the block), all of one (row slot, column slot) class; its 13 lag products
// and the plain sum stay in registers, added into the double totals acc ([kAcc][16]) at the end
// (double) or every ~kFlush positions (float).
template <typename A>
inline void accumulate_block(const A* plane, int64_t plane_stride, int64_t n_img, int64_t row_stride, int64_t r0,
                             int64_t r1, int64_t t0, int64_t t1, double* acc) {
  using S = Simd<A>;
  using V = typename S::vec;
  constexpr int64_t L = S::lanes;
  constexpr bool is_double = std::is_same_v<A, double>;
  typedef double D __attribute__((vector_size(L * sizeof(double))));
  V s[kAcc];
  auto flush = [&] {
#pragma GCC unroll 14
    for (int l = 0; l < kAcc; ++l) {
      if constexpr (is_double) {
        S::store(acc + l * kCB, S::load(acc + l * kCB) + s[l]);
      } else {  // the L float lanes widened to L doubles
        D total;
        std::memcpy(&total, acc + l * kCB, sizeof(D));
        total += __builtin_convertvector(s[l], D);
        std::memcpy(acc + l * kCB, &total, sizeof(D));
      }
      s[l] = V{};
    }
  };
#pragma GCC unroll 14
  for (int l = 0; l < kAcc; ++l) s[l] = V{};
  int64_t pending = 0;
  for (int64_t g = 0; g < n_img; ++g)
    for (int64_t r = r0; r < r1; ++r) {
      const A* row = plane + g * plane_stride + r * row_stride;
      // runs of 4: 4 values, 14 accumulators and a partner fit 32 vector registers (runs of 8
      // spilled the accumulators); with 16 registers two passes (lag_run's ROWS), runs of 1 then
      // of 2: 0.88-0.97x the time of one pass of runs of 1 (AVX2, 1 thread, batch 16, min of 20
      // alternated calls: 512@14 5.24 -> 4.86 ms, 1024@7 4.39 -> 4.25, 128@56 10.73 -> 9.37; the
      // same sums in the same order)
      if constexpr (falconnet::cpu::kWideRegs) {
        for (int64_t t = t0; t < t1; t += 4)
          with_run_length<4>(t1 - t, [&](auto np) { lag_run<decltype(np)::value, A>(row + t * L, row_stride, s); });
      } else {
        for (int64_t t = t0; t < t1; ++t) lag_run<1, A, 3>(row + t * L, row_stride, s);
        for (int64_t t = t0; t < t1; t += 2)
          with_run_length<2>(t1 - t, [&](auto np) { lag_run<decltype(np)::value, A, 4>(row + t * L, row_stride, s); });
      }
      pending += t1 - t0;
      if (!is_double && pending >= kFlush) {
        flush();
        pending = 0;
      }
    }
  flush();
}

// runs of equal slot along a padded axis: (i0, i1, slot)
inline std::vector<std::array<int64_t, 3>> slot_runs(const std::vector<int64_t>& slot) {
  std::vector<std::array<int64_t, 3>> runs;
  for (int64_t i = 0; i < static_cast<int64_t>(slot.size()); ++i) {
    if (runs.empty() || runs.back()[2] != slot[i]) runs.push_back({i, i, slot[i]});
    runs.back()[1] = i + 1;
  }
  return runs;
}

// A 3x3 depthwise weight (C, 9) as one 16-channel block's taps: out[t][c] = weight[c0 + c][t], in A
// (the stencil kernels read one tap's 16 channels as vectors).
template <typename A, typename scalar_t>
inline void block_taps(const scalar_t* weight, int64_t c0, A* out) {
  for (int64_t t = 0; t < 9; ++t)
    for (int64_t c = 0; c < kCB; ++c) out[t * kCB + c] = static_cast<A>(weight[(c0 + c) * 9 + t]);
}

// Planes of this many images at once (about 256 KiB, in L2): at small maps one class block then
// spans all of them, so the accumulators' register loads and stores are paid once per group.
inline int64_t images_per_group(int64_t N, int64_t plane_doubles) {
  return std::max<int64_t>(1, std::min<int64_t>(N, (int64_t{1} << 15) / plane_doubles));
}

template <typename scalar_t, typename stat_t, typename A>
void forward_as(const scalar_t* x, int64_t N, int64_t C, int64_t H, int64_t W, stat_t* mean_out, stat_t* cov_out) {
  constexpr int64_t L = Simd<A>::lanes;
  const int64_t Hp = H + 2, Wp = W + 2, Wc = Wp + 4, row_stride = Wc * L;
  const double M = static_cast<double>(N * H * W);
  std::vector<int64_t> rslot, cslot;
  const int64_t n_rs = slots(H, rslot), n_cs = slots(W, cslot);
  const std::vector<std::array<int64_t, 3>> row_runs = slot_runs(rslot), col_runs = slot_runs(cslot);
  // a representative padded index of each slot (for the window test)
  std::vector<int64_t> rrep(n_rs), crep(n_cs);
  for (int64_t r = Hp - 1; r >= 0; --r) rrep[rslot[r]] = r;
  for (int64_t t = Wp - 1; t >= 0; --t) crep[cslot[t]] = t;
  // the slots inside the window with top-left padded corner pi (rows) or pj (columns)
  std::array<std::vector<int64_t>, 3> in_rows, in_cols;
  for (int64_t o = 0; o < 3; ++o) {
    for (int64_t rs = 0; rs < n_rs; ++rs)
      if (rrep[rs] >= o && rrep[rs] < o + H) in_rows[o].push_back(rs);
    for (int64_t cs = 0; cs < n_cs; ++cs)
      if (crep[cs] >= o && crep[cs] < o + W) in_cols[o].push_back(cs);
  }
  const int64_t part_stride = (Hp + 2) * row_stride, plane_stride = (kCB / L) * part_stride;
  const int64_t G = images_per_group(N, plane_stride * static_cast<int64_t>(sizeof(A)) / 8);
  at::parallel_for(0, C / kCB, 1, [&](int64_t b0, int64_t b1) {
    Aligned plane_buf(G * plane_stride * static_cast<int64_t>(sizeof(A)) / 8 + 1), acc_buf(n_rs * n_cs * kAcc * kCB);
    A* const plane = reinterpret_cast<A*>(plane_buf.data);
    double* const acc = acc_buf.data;
    const int64_t acc_size = n_rs * n_cs * kAcc * kCB;
    std::vector<double> ew(9 * kCB), total(kCB);
    std::vector<A> a(kCB);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCB;
      // the shift: the mean of image 0's centre row (a single sample can sit a few std from the
      // mean, and float accumulation loses (mean(w) / std)^2 of its precision to the cancellation)
      const scalar_t* centre_row = x + (H / 2) * W * C + c0;
      for (int64_t c = 0; c < kCB; ++c) {
        double t = 0;
        for (int64_t j = 0; j < W; ++j) t += static_cast<double>(centre_row[j * C + c]);
        a[c] = static_cast<A>(t / static_cast<double>(W));
      }
      std::fill(acc, acc + acc_size, 0.0);
      for (int64_t n0 = 0; n0 < N; n0 += G) {
        const int64_t n_img = std::min(G, N - n0);
        for (int64_t g = 0; g < n_img; ++g)
          fill_plane_as<A>(x + (n0 + g) * H * W * C + c0, C, H, W, a.data(), plane + g * plane_stride, part_stride);
        for (int64_t g = n0 + n_img; g < std::min(N, n0 + 2 * n_img); ++g) prefetch_image(x + g * H * W * C + c0, C, H, W);
        for (const auto& rr : row_runs)
          for (const auto& cr : col_runs)
            for (int64_t h = 0; h < kCB; h += L)
              accumulate_block<A>(plane + (h / L) * part_stride + 2 * L, plane_stride, n_img, row_stride, rr[0],
                                  rr[1], cr[0], cr[1], acc + (rr[2] * n_cs + cr[2]) * kAcc * kCB + h);
      }
      // sum of accumulator l over the classes inside the window with top-left padded corner (pi, pj)
      // (the slot lists per window are fixed: in_rows / in_cols), in the ISA's own vectors: a
      // loop-carried 8-double vector went through the stack with AVX2
      auto window_sum = [&](int64_t l, int64_t pi, int64_t pj) {
        using SD = Simd<double>;
        constexpr int64_t LD = SD::lanes;
        typename SD::vec part[kCB / LD] = {};
        for (const int64_t rs : in_rows[pi])
          for (const int64_t cs : in_cols[pj]) {
            const double* v = acc + ((rs * n_cs + cs) * kAcc + l) * kCB;
#pragma GCC unroll 8
            for (int64_t h = 0; h < kCB / LD; ++h) part[h] += SD::load(v + h * LD);
          }
#pragma GCC unroll 8
        for (int64_t h = 0; h < kCB / LD; ++h) SD::store(total.data() + h * LD, part[h]);
      };
      for (int64_t p = 0; p < 9; ++p) {
        window_sum(kLags, p / 3, p % 3);
        for (int64_t c = 0; c < kCB; ++c) {
          ew[p * kCB + c] = total[c] / M;
          mean_out[(c0 + c) * 9 + p] = static_cast<stat_t>(ew[p * kCB + c] + static_cast<double>(a[c]));
        }
      }
      for (int64_t p = 0; p < 9; ++p) {
        for (int64_t q = p; q < 9; ++q) {
          int64_t pi = p / 3, pj = p % 3, qi = q / 3, qj = q % 3;
          if (qi < pi || (qi == pi && qj < pj)) {
            std::swap(pi, qi);
            std::swap(pj, qj);
          }
          window_sum(lag_index(qi - pi, qj - pj), pi, pj);
          for (int64_t c = 0; c < kCB; ++c) {
            const stat_t v = static_cast<stat_t>(total[c] / M - ew[p * kCB + c] * ew[q * kCB + c]);
            cov_out[((c0 + c) * 9 + p) * 9 + q] = v;
            cov_out[((c0 + c) * 9 + q) * 9 + p] = v;
          }
        }
      }
    }
  });
}

// float32/bf16 x computes in float, except on maps under 3 pixels high or wide: there most window
// positions are padding, whose value is the constant -a, and the float sums of their a^2 products
// would carry an error of about 2^-24 a^2 into covariance entries that are 0 (a review found
// 2.4e-2 relative error in a branch weight's gradient at 1 x 3 maps); double makes them exact.
template <typename scalar_t, typename stat_t>
void forward(const scalar_t* x, int64_t N, int64_t C, int64_t H, int64_t W, stat_t* mean_out, stat_t* cov_out) {
  if (std::is_same_v<scalar_t, double> || H < 3 || W < 3)
    forward_as<scalar_t, stat_t, double>(x, N, C, H, W, mean_out, cov_out);
  else
    forward_as<scalar_t, stat_t, float>(x, N, C, H, W, mean_out, cov_out);
}

// grad_x(v) = cst_k + sum_taps st_k[tap] w(v + tap) for the class k of v (see
// moments_backward_kernel; 1/M is folded into cst and st), with per-channel stencils as [25][16]
// values; with the conv (CONV), plus its input gradient sum_taps cw[tap] gy(v - tap).
// NP adjacent positions of one row and NPART parts (part_stride apart in the planes, lanes apart in
// st, cw, k0 and out), each part sharing its stencil ([25][16], that part's lanes): per stencil row
// and part, NP + 4 plane loads and 5 weight loads feed 5 NP products (the same plane value serves
// five positions), instead of two loads per product. That is the source; GCC folds most of those
// loads back into the FMAs (109 of 124 FMAs of the AVX2 conv build take a memory operand). Forcing
// one load per value and longer runs (a column walk of 8 positions) measured slower: see
// benchmarks/results/2026-11-28-cpu-avx2-2/.
template <int NP, int NPART, bool CONV, bool STREAM, typename A, typename scalar_t>
__attribute__((always_inline)) inline void stencil_run(const A* u, const A* gyp, int64_t row_stride,
                                                       int64_t part_stride, const A* st, const A* cw, const A* k0,
                                                       scalar_t* out, int64_t out_stride) {
  using S = Simd<A>;
  using V = typename S::vec;
  constexpr int64_t L = S::lanes;
  V acc[NPART][NP];
  // every index below is a compile-time constant (index sequences, not loops), so acc stays in
  // registers: a loop the compiler does not fully unroll spills it
  [&]<int... I>(std::integer_sequence<int, I...>) {  // I = part * NP + position
    ((acc[I / NP][I % NP] = S::load(k0 + (I / NP) * L)), ...);
  }(std::make_integer_sequence<int, NPART * NP>{});
  // one row of a (2R+1)-wide stencil w over the plane row src (its column -R at src) for part P:
  // plane value t feeds positions q = t - d for every d, one plane register live at a time
  auto row_pass = [&]<int R, int P>(std::integral_constant<int, R>, std::integral_constant<int, P>, const A* src,
                                    const V* w) {
    auto feed = [&]<int T>(std::integral_constant<int, T>) {
      const V v = S::load(src + T * L);
      [&]<int... D>(std::integer_sequence<int, D...>) {
        ((T - D >= 0 && T - D < NP ? (void)(acc[P][(T - D >= 0 && T - D < NP) ? T - D : 0] += w[D] * v) : (void)0),
         ...);
      }(std::make_integer_sequence<int, 2 * R + 1>{});
    };
    [&]<int... T>(std::integer_sequence<int, T...>) {
      (feed(std::integral_constant<int, T>{}), ...);
    }(std::make_integer_sequence<int, NP + 2 * R>{});
  };
  auto for_parts = [&](auto&& f) {
    [&]<int... P>(std::integer_sequence<int, P...>) {
      (f(std::integral_constant<int, P>{}), ...);
    }(std::make_integer_sequence<int, NPART>{});
  };
  for (int di = -2; di <= 2; ++di)
    for_parts([&](auto part) {
      constexpr int P = decltype(part)::value;
      const A* wrow = st + (di + 2) * 5 * kCB + P * L;
      const V w[5] = {S::load(wrow), S::load(wrow + kCB), S::load(wrow + 2 * kCB), S::load(wrow + 3 * kCB),
                      S::load(wrow + 4 * kCB)};
      row_pass(std::integral_constant<int, 2>{}, part, u + P * part_stride + di * row_stride - 2 * L, w);
    });
  if constexpr (CONV) {
    // gy(v - tap) for tap (ki - 1, kj - 1): plane row di = 1 - ki, column offset 1 - kj
    for (int di = -1; di <= 1; ++di)
      for_parts([&](auto part) {
        constexpr int P = decltype(part)::value;
        const A* wrow = cw + (1 - di) * 3 * kCB + P * L;
        const V w[3] = {S::load(wrow + 2 * kCB), S::load(wrow + kCB), S::load(wrow)};
        row_pass(std::integral_constant<int, 1>{}, part, gyp + P * part_stride + di * row_stride - L, w);
      });
  }
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (store_out<STREAM, A>(out + (I % NP) * out_stride + (I / NP) * L, acc[I / NP][I % NP]), ...);
  }(std::make_integer_sequence<int, NPART * NP>{});
}

// Parts (Simd<A>::lanes channels of a 16-channel block) per stencil call: with 32 vector registers
// one; with 16 (AVX2), two. A position's 34 products are one chain of dependent FMAs, and with 16
// registers the runs hold 1-2 positions, so one part's chains left the FMA units waiting; two
// parts double the independent chains and halve the calls (at 7 x 7 the column classes cut each
// row into runs of 1, 2, 2, 1, 1). Measured (AVX2, batch 16, 2 threads, min of 20 alternated
// calls, one part -> two): 1024@7 4.22 -> 2.70 ms, 512@14 6.10 -> 4.08, 128@56 17.0 -> 14.7.
constexpr int64_t kStencilParts = falconnet::cpu::kWideRegs ? 1 : 2;

// positions [j, j1) of one row: runs of at most 8 (8 accumulators, 12 plane values and 5 weights
// fill 25 of the 32 vector registers)
template <bool CONV, bool STREAM, typename A, typename scalar_t>
inline void stencil_row(const A* centre, const A* gy_centre, int64_t row_stride, int64_t part_stride, const A* st,
                        const A* cw, const A* k0, scalar_t* out_row, int64_t C, int64_t j, int64_t j1) {
  constexpr int64_t L = Simd<A>::lanes;
  constexpr int NPART = std::min<int64_t>(kStencilParts, kCB / L);
  // with the conv's taps, runs of 4 (runs of 8 spilled)
  constexpr int64_t kRun = falconnet::cpu::kWideRegs ? (CONV ? 4 : 8) : (CONV ? 2 : 4);  // halved for 16 registers
  for (; j < j1; j += kRun) {
    const A* u = centre + j * L;
    const A* g = CONV ? gy_centre + j * L : nullptr;
    scalar_t* out = out_row + j * C;
    with_run_length<kRun>(j1 - j, [&](auto np) {
      stencil_run<decltype(np)::value, NPART, CONV, STREAM>(u, g, row_stride, part_stride, st, cw, k0, out, C);
    });
  }
}

// values rounded once from double to A
template <typename A>
inline void round_to(const double* src, int64_t n, A* dst) {
  if constexpr (std::is_same_v<A, double>) {
    std::memcpy(dst, src, n * sizeof(double));
  } else {
    int64_t i = 0;
    using SD = Simd<double>;
    typedef A F __attribute__((vector_size(SD::lanes * sizeof(A))));
    for (; i + SD::lanes <= n; i += SD::lanes) {
      const F f = __builtin_convertvector(SD::load(src + i), F);
      std::memcpy(dst + i, &f, sizeof(f));
    }
    for (; i < n; ++i) dst[i] = static_cast<A>(src[i]);
  }
}

// Precision of the float path (float32 and bf16 x): grad_x is a sum of 26 centred terms (the
// constant and 25 taps; 9 more with the conv), each rounded once in float; the error is a few
// float32 ulps of the largest term, as in PyTorch's own float32 BatchNorm backward (which sums in
// float32 too). The stencils and constants are formed in double and rounded once. float64 x keeps
// double throughout.
// grad_y and conv_weight (C, 1, 3, 3), when given, add the input gradient of the depthwise conv
// y = conv(x, conv_weight, padding 1) for grad_y: the whole grad_x of RepSO's one-conv training step
// in one pass (falconnet/layers/repso_train.py).
template <typename scalar_t, typename stat_t, typename A>
void backward_as(const stat_t* grad_mean, const stat_t* grad_cov, const scalar_t* x, const stat_t* mean, int64_t N,
                 int64_t C, int64_t H, int64_t W, scalar_t* grad_x, const scalar_t* grad_y,
                 const scalar_t* conv_weight) {
  using S = Simd<A>;
  constexpr int64_t L = S::lanes;
  // one zero guard row above each part and two below, two zero guard columns each side: every
  // position reads its full 5 x 5 neighbourhood, and a class's unreachable taps are 0 in its stencil
  const int64_t Hp = H + 2, Wp = W + 2, Wc = Wp + 4, row_stride = Wc * L, part_stride = (Hp + 3) * row_stride;
  const double inv_M = 1.0 / static_cast<double>(N * H * W);
  const bool with_conv = grad_y != nullptr;
  // large outputs skip the read-for-ownership of every line (float output, 64-byte aligned)
  const int64_t bytes = N * C * H * W * static_cast<int64_t>(sizeof(scalar_t));
  const bool stream = std::is_same_v<scalar_t, float> && reinterpret_cast<std::uintptr_t>(grad_x) % 64 == 0 &&
                      falconnet::cpu::use_streaming_stores((with_conv ? 3 : 2) * bytes);
  // valid offsets along an axis of length n at index i: [max(0, i + 1 - (n-1)), min(2, i + 1)];
  // runs of equal range
  auto classes = [](int64_t n, std::vector<std::array<int64_t, 4>>& cls) {  // (lo, hi, i0, i1)
    for (int64_t i = 0; i < n; ++i) {
      const int64_t lo = std::max<int64_t>(0, i + 2 - n), hi = std::min<int64_t>(2, i + 1);
      if (cls.empty() || cls.back()[0] != lo || cls.back()[1] != hi) cls.push_back({lo, hi, i, i});
      cls.back()[3] = i + 1;
    }
  };
  std::vector<std::array<int64_t, 4>> rcls, ccls;
  classes(H, rcls);
  classes(W, ccls);
  const int64_t n_rc = rcls.size(), n_cc = ccls.size(), n_k = n_rc * n_cc;
  // A class with valid offsets pi in [pi0, pi1] reaches stencil rows di = qi - pi in [-pi1, 2 - pi0]
  // (columns alike); its other taps stay 0, so every class runs the same unrolled 25-tap code.
  // Per block of 16 channels: the shift a, the class stencils and constants, the conv taps, formed
  // once (in double, rounded once) for every image.
  const int64_t n_blocks = C / kCB;
  const int64_t per_double = sizeof(double) / sizeof(A);  // the Aligned buffers are double arrays
  const int64_t st_size = n_k * 25 * kCB, cc_size = n_k * kCB;
  Aligned stencil_buf(n_blocks * st_size / per_double + 1), cls_cst_buf(n_blocks * cc_size / per_double + 1),
      cw_buf(n_blocks * 9 * kCB / per_double + 1), shift_buf(n_blocks * kCB / per_double + 1);
  A* const stencils = reinterpret_cast<A*>(stencil_buf.data);
  A* const cls_csts = reinterpret_cast<A*>(cls_cst_buf.data);
  A* const cws = reinterpret_cast<A*>(cw_buf.data);  // [block][9][16]: conv weight tap, channel
  A* const shifts = reinterpret_cast<A*>(shift_buf.data);
  using SD = Simd<double>;
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> G(81 * kCB), cst(9 * kCB), st_d(st_size), cc_d(cc_size);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCB;
      A* const a = shifts + b * kCB;
      for (int64_t c = 0; c < kCB; ++c) a[c] = static_cast<A>(mean[(c0 + c) * 9 + 4]);
      // G and the constants carry the 1/M of the statistics
      for (int64_t p = 0; p < 9; ++p)
        for (int64_t q = 0; q < 9; ++q)
          for (int64_t c = 0; c < kCB; ++c)
            G[(p * 9 + q) * kCB + c] = (static_cast<double>(grad_cov[((c0 + c) * 9 + p) * 9 + q]) +
                                        static_cast<double>(grad_cov[((c0 + c) * 9 + q) * 9 + p])) * inv_M;
      for (int64_t p = 0; p < 9; ++p)
        for (int64_t c = 0; c < kCB; ++c) {
          double t = static_cast<double>(grad_mean[(c0 + c) * 9 + p]) * inv_M;
          for (int64_t q = 0; q < 9; ++q)
            t -= G[(p * 9 + q) * kCB + c] * (static_cast<double>(mean[(c0 + c) * 9 + q]) - static_cast<double>(a[c]));
          cst[p * kCB + c] = t;
        }
      std::fill(st_d.begin(), st_d.end(), 0.0);
      std::fill(cc_d.begin(), cc_d.end(), 0.0);
      for (int64_t rc = 0; rc < n_rc; ++rc)
        for (int64_t cc = 0; cc < n_cc; ++cc) {
          const int64_t k = rc * n_cc + cc;
          for (int64_t pi = rcls[rc][0]; pi <= rcls[rc][1]; ++pi)
            for (int64_t pj = ccls[cc][0]; pj <= ccls[cc][1]; ++pj) {
              const int64_t p = pi * 3 + pj;
              for (int64_t c = 0; c < kCB; ++c) cc_d[k * kCB + c] += cst[p * kCB + c];
              for (int64_t q = 0; q < 9; ++q) {
                double* st = st_d.data() + (k * 25 + (q / 3 - pi + 2) * 5 + (q % 3 - pj + 2)) * kCB;
                const double* g = G.data() + (p * 9 + q) * kCB;
                for (int64_t c = 0; c < kCB; c += SD::lanes) SD::store(st + c, SD::load(st + c) + SD::load(g + c));
              }
            }
        }
      round_to(st_d.data(), st_size, stencils + b * st_size);
      round_to(cc_d.data(), cc_size, cls_csts + b * cc_size);
      if (with_conv) block_taps(conv_weight, c0, cws + b * 9 * kCB);
    }
  });
  // Work items (image n, block b). Image-major order (consecutive items walk one image's blocks)
  // where an image's block is large: each thread then streams its own range of images, and a
  // pixel's other blocks (same pages, neighbouring lines) come from the cache rather than from
  // memory once per block. Block-major (consecutive items walk one block's images) at small maps,
  // where a block's stencils (14 KB) are what must stay in L1. Measured in one process, rounds
  // alternated (2026-11-26 11:58 UTC, batch 16, channels_last, 2 threads, with the conv's
  // gradient), block-major -> image-major: 128@56 4.85 -> 3.89 ms, 256@28 1.86 -> 1.72, 512@14
  // 0.88 -> 0.74, 1024@7 0.53 -> 0.57 (medians of 6); a whole FalconNet step at 224 px did not
  // move beyond the noise (0.99x). On the AVX2 machine (16 registers, two parts a stencil call)
  // image-major wins at 1024@7 as well: 3.29 -> 2.97 ms and 3.51 -> 2.95 (2 threads, medians of 30
  // alternated calls, both orders; 2026-11-27 11:35 UTC); why the two machines differ is unmeasured.
  const bool image_major = H * W >= 196 || !falconnet::cpu::kWideRegs;
  at::parallel_for(0, N * n_blocks, 1, [&](int64_t i0, int64_t i1) {
    Aligned plane_buf((kCB / L) * part_stride / per_double + 1),
        gy_buf(with_conv ? (kCB / L) * part_stride / per_double + 1 : 0);
    A* const plane = reinterpret_cast<A*>(plane_buf.data);
    A* const gy_plane = reinterpret_cast<A*>(gy_buf.data);
    std::vector<A> zero(kCB, A(0));
    auto image_of = [&](int64_t item) { return image_major ? item / n_blocks : item % N; };
    auto block_of = [&](int64_t item) { return image_major ? item % n_blocks : item / N; };
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t n = image_of(item), b = block_of(item), c0 = b * kCB;
      const A* const stencil = stencils + b * st_size;
      const A* const cls_cst = cls_csts + b * cc_size;
      const A* const cw = cws + b * 9 * kCB;
      fill_plane_as<A>(x + n * H * W * C + c0, C, H, W, shifts + b * kCB, plane + row_stride, part_stride);
      if (with_conv)  // grad_y zero-padded
        fill_plane_as<A>(grad_y + n * H * W * C + c0, C, H, W, zero.data(), gy_plane + row_stride, part_stride);
      if (item + 1 < i1) {
        const int64_t next = image_of(item + 1) * H * W * C + block_of(item + 1) * kCB;
        prefetch_image(x + next, C, H, W);
        if (with_conv) prefetch_image(grad_y + next, C, H, W);
      }
      // kStencilParts parts at a time: their five stencil rows stay in L1
      constexpr int64_t kStep = std::min<int64_t>(kStencilParts, kCB / L) * L;
      for (int64_t h = 0; h < kCB; h += kStep)
        for (int64_t rc = 0; rc < n_rc; ++rc)
          for (int64_t i = rcls[rc][2]; i < rcls[rc][3]; ++i) {
            // image (i, 0): padded (i + 1, 1), below the guard row
            const int64_t centre_at = (h / L) * part_stride + (i + 2) * row_stride + 3 * L;
            scalar_t* out_row = grad_x + ((n * H + i) * W) * C + c0 + h;
            for (int64_t cc = 0; cc < n_cc; ++cc) {
              const int64_t k = rc * n_cc + cc;
              const A* st = stencil + k * 25 * kCB + h;
              const A* k0 = cls_cst + k * kCB + h;
              // the full 5 x 5 at every position (constant bounds, fully unrolled): branchy loops
              // over each border class's own tap rectangle cost more at small maps than the zero taps
              auto row = [&]<bool CONV, bool STREAM>() {
                stencil_row<CONV, STREAM, A>(plane + centre_at, CONV ? gy_plane + centre_at : nullptr, row_stride,
                                             part_stride, st, CONV ? cw + h : nullptr, k0, out_row, C, ccls[cc][2],
                                             ccls[cc][3]);
              };
              if (with_conv)
                stream ? row.template operator()<true, true>() : row.template operator()<true, false>();
              else
                stream ? row.template operator()<false, true>() : row.template operator()<false, false>();
            }
          }
    }
    if (stream) falconnet::cpu::stream_fence();  // make the non-temporal stores visible before the op returns
  });
}

template <typename scalar_t, typename stat_t>
void backward(const stat_t* grad_mean, const stat_t* grad_cov, const scalar_t* x, const stat_t* mean, int64_t N,
              int64_t C, int64_t H, int64_t W, scalar_t* grad_x, const scalar_t* grad_y = nullptr,
              const scalar_t* conv_weight = nullptr) {
  using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  backward_as<scalar_t, stat_t, A>(grad_mean, grad_cov, x, mean, N, C, H, W, grad_x, grad_y, conv_weight);
}

// The weight and bias gradients of the depthwise 3x3 conv y = conv(x, w, padding 1) (C, 1, 3, 3):
// grad_w[c, ki, kj] = sum_v gy(v) x(v + (ki - 1, kj - 1)), grad_b[c] = sum_v gy(v), x zero-padded.
// Per block of 16 channels and image: a zero-padded plane of x; runs of up to 8 positions of a row
// keep their gy values in registers and share each plane load among three taps; float products,
// float sums added into double about every kFlush positions (as the moments forward). Results in
// stat_t.
template <typename scalar_t, typename stat_t>
void conv_weight_grad(const scalar_t* grad_y, const scalar_t* x, int64_t N, int64_t C, int64_t H, int64_t W,
                      stat_t* grad_w, stat_t* grad_b) {
  using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using S = Simd<A>;
  using V = typename S::vec;
  constexpr int64_t L = S::lanes;
  const int64_t Hp = H + 2, Wp = W + 2, Wc = Wp + 4, row_stride = Wc * L, part_stride = (Hp + 2) * row_stride;
  at::parallel_for(0, C / kCB, 1, [&](int64_t b0, int64_t b1) {
    const int64_t per_double = sizeof(double) / sizeof(A);
    Aligned plane_buf((kCB / L) * part_stride / per_double + 1);
    A* const plane = reinterpret_cast<A*>(plane_buf.data);
    std::vector<A> zero(kCB, A(0));
    std::vector<double> total(10 * kCB);  // [tap or bias][channel]
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kCB;
      std::fill(total.begin(), total.end(), 0.0);
      for (int64_t n = 0; n < N; ++n) {
        fill_plane_as<A>(x + n * H * W * C + c0, C, H, W, zero.data(), plane, part_stride);
        if (n + 1 < N) {
          prefetch_image(x + (n + 1) * H * W * C + c0, C, H, W);
          prefetch_image(grad_y + (n + 1) * H * W * C + c0, C, H, W);
        }
        for (int64_t h = 0; h < kCB; h += L) {
          V acc[10];
          for (auto& v : acc) v = V{};
          for (int64_t i = 0; i < H; ++i) {
            const scalar_t* gy_row = grad_y + ((n * H + i) * W) * C + c0 + h;
            // x at image (i + di, j + dj): padded (i + 1 + di, j + 1 + dj)
            const A* centre = plane + (h / L) * part_stride + (i + 1) * row_stride + 3 * L;
            constexpr int64_t kRun = falconnet::cpu::kWideRegs ? 8 : 4;  // 10 accumulators + kRun gy values
            for (int64_t j = 0; j < W; j += kRun) {
              const int64_t np = std::min<int64_t>(kRun, W - j);
              auto run = [&]<int NP>(std::integral_constant<int, NP>) {
                V g[NP];
                [&]<int... Q>(std::integer_sequence<int, Q...>) {
                  ((g[Q] = load_as<A>(gy_row + (j + Q) * C)), ...);
                  ((acc[9] += g[Q]), ...);
                }(std::make_integer_sequence<int, NP>{});
                for (int di = -1; di <= 1; ++di) {
                  const A* src = centre + di * row_stride + (j - 1) * L;
                  V* a3 = acc + (di + 1) * 3;
                  // plane value t (column j - 1 + t) meets position q = t - D through tap kj = D
                  auto feed = [&]<int T>(std::integral_constant<int, T>) {
                    const V v = S::load(src + T * L);
                    [&]<int... D>(std::integer_sequence<int, D...>) {
                      ((T - D >= 0 && T - D < NP ? (void)(a3[D] += g[(T - D >= 0 && T - D < NP) ? T - D : 0] * v)
                                                 : (void)0),
                       ...);
                    }(std::make_integer_sequence<int, 3>{});
                  };
                  [&]<int... T>(std::integer_sequence<int, T...>) {
                    (feed(std::integral_constant<int, T>{}), ...);
                  }(std::make_integer_sequence<int, NP + 2>{});
                }
              };
              with_run_length<kRun>(np, run);
            }
            if (flush_after_row(i, H, W)) flush_sums(acc, 10, total.data() + h);
          }
        }
      }
      for (int64_t c = 0; c < kCB; ++c) {
        for (int64_t t = 0; t < 9; ++t) grad_w[(c0 + c) * 9 + t] = static_cast<stat_t>(total[t * kCB + c]);
        grad_b[c0 + c] = static_cast<stat_t>(total[9 * kCB + c]);
      }
    }
  });
}

// The backward of falconnet_kernels.dw_conv3x3 (y = act(conv(x, w, padding 1) + b), stride 1) on
// the channels_last layout, C a multiple of 16: per block of 16 channels and image, one pass
// forms grad_z = grad_y * act'(z) (z recomputed from a zero-padded plane of x when the activation
// needs it) into a zero-padded plane, accumulating grad_w and grad_b, and a second pass over that
// plane writes grad_x = the 3x3 correlation of grad_z with the flipped kernel. x and grad_y are
// read once, each copied into its plane first (loaded a position at a time in the first pass
// instead, grad_y's loads stalled on memory: the copy made the backward 0.50 / 0.53 / 0.78 /
// 0.84x as long at 128@56 / 256@28 / 512@14 / 1024@7, batch 16, relu, 2 AVX2 cores, 2026-11-28),
// grad_x written once. Float products, float sums added into double about every kFlush positions.
// A thread walks the images in its outer loop and its range of channel blocks inside, so that
// consecutive items read adjacent lines of the same pixels (with the blocks outside, each item's
// lines lay C values apart in a fresh image). 2026-11-28, 2-core Zen 5 (AVX-512), batch 16, relu6,
// alternated A/B (benchmarks/results/2026-11-28-cpu-avx512/): the order alone 0.89-0.99x the time;
// with the flush every ~kFlush positions instead of every row, 0.73 / 0.78 / 0.87 / 0.95x at
// 1024@7 / 512@14 / 256@28 / 128@56 (2 threads; 1 thread 0.72-0.84x, 1.00x at 128@56).
template <typename scalar_t>
void dw3x3_backward(const scalar_t* grad_y, const scalar_t* x, const scalar_t* weight, const scalar_t* bias,
                    falconnet::cpu::Activation act, int64_t N, int64_t C, int64_t H, int64_t W, scalar_t* grad_x,
                    double* grad_w, double* grad_b) {
  using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using S = Simd<A>;
  using V = typename S::vec;
  using falconnet::cpu::Activation;
  constexpr int64_t L = S::lanes, n_parts = kCB / L;
  const int64_t Hp = H + 2, Wp = W + 2, Wc = Wp + 4, row_stride = Wc * L, part_stride = (Hp + 2) * row_stride;
  at::parallel_for(0, C / kCB, 1, [&](int64_t b0, int64_t b1) {
    const int64_t per_double = sizeof(double) / sizeof(A);
    Aligned x_buf(n_parts * part_stride / per_double + 1), gz_buf(n_parts * part_stride / per_double + 1);
    A* const xplane = reinterpret_cast<A*>(x_buf.data);
    A* const gzplane = reinterpret_cast<A*>(gz_buf.data);
    // per block of the range: its taps, bias and double totals (grad_w, grad_b)
    const int64_t nb = b1 - b0;
    std::vector<A> zero(kCB, A(0)), wl_all(nb * 9 * kCB), bl_all(nb * kCB, A(0));
    std::vector<double> total_all(nb * 10 * kCB, 0.0);
    for (int64_t b = b0; b < b1; ++b) {
      block_taps(weight, b * kCB, wl_all.data() + (b - b0) * 9 * kCB);
      if (bias != nullptr)
        for (int64_t c = 0; c < kCB; ++c) bl_all[(b - b0) * kCB + c] = static_cast<A>(bias[b * kCB + c]);
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t c0 = b * kCB;
        const A* const wl = wl_all.data() + (b - b0) * 9 * kCB;
        const A* const bl = bl_all.data() + (b - b0) * kCB;
        double* const total = total_all.data() + (b - b0) * 10 * kCB;
        const scalar_t* xn = x + n * H * W * C + c0;
        const scalar_t* gyn = grad_y + n * H * W * C + c0;
        fill_plane_as<A>(xn, C, H, W, zero.data(), xplane, part_stride);
        // grad_y into the grad_z plane (zero padding) the same way, before the positions are
        // walked: read there, a position at a time (C values apart), each load waited on memory
        fill_plane_as<A>(gyn, C, H, W, zero.data(), gzplane, part_stride);
        for (int64_t h = 0; h < n_parts; ++h) {
          V w[9];
          for (int t = 0; t < 9; ++t) w[t] = S::load(wl + t * kCB + h * L);
          const V b_h = S::load(bl + h * L), zero_v = V{}, six = zero_v + A(6);
          V acc[10];
          for (auto& v : acc) v = V{};
          A* const xp = xplane + h * part_stride;
          A* const gp = gzplane + h * part_stride;
          // grad_z = grad_y * act'(z) in place in its plane, with the weight and bias sums
          for (int64_t i = 0; i < H; ++i) {
            for (int64_t j = 0; j < W; ++j) {
              const A* u = xp + (i * Wc + j + 2) * L;  // padded (i, j): the window's top-left
              V xs[9];
              for (int t = 0; t < 9; ++t) xs[t] = S::load(u + (t / 3) * row_stride + (t % 3) * L);
              A* const gzp = gp + ((i + 1) * Wc + j + 3) * L;
              V g = S::load(gzp);
              if (act != Activation::kNone) {
                V z = b_h;
                for (int t = 0; t < 9; ++t) z += w[t] * xs[t];
                const auto keep = act == Activation::kRelu ? (z > zero_v) : ((z > zero_v) & (z < six));
                g = keep ? g : zero_v;
                std::memcpy(gzp, &g, sizeof(V));
              }
              for (int t = 0; t < 9; ++t) acc[t] += g * xs[t];
              acc[9] += g;
            }
            // float sums into double about every kFlush positions and at the end (every row, the
            // flush took more time than the sums at 7x7 maps: 160 conversions and adds a row of 7)
            if (flush_after_row(i, H, W)) flush_sums(acc, 10, total + h * L);
          }
          // grad_x(v) = sum_taps w[ki][kj] grad_z(v - (ki - 1, kj - 1))
          for (int64_t i = 0; i < H; ++i)
            for (int64_t j = 0; j < W; ++j) {
              const A* u = gp + (i * Wc + j + 2) * L;  // grad_z at padded (i, j) = image (i - 1, j - 1)
              V out = V{};
              for (int t = 0; t < 9; ++t) out += w[8 - t] * S::load(u + (t / 3) * row_stride + (t % 3) * L);
              store_out<false, A>(grad_x + ((n * H + i) * W + j) * C + c0 + h * L, out);
            }
        }
      }
    for (int64_t b = b0; b < b1; ++b) {
      const double* const total = total_all.data() + (b - b0) * 10 * kCB;
      for (int64_t c = 0; c < kCB; ++c) {
        for (int t = 0; t < 9; ++t) grad_w[(b * kCB + c) * 9 + t] = total[t * kCB + c];
        grad_b[b * kCB + c] = total[9 * kCB + c];
      }
    }
  });
}

}  // namespace cl3

// The channels_last fast path applies to K = 3, C a multiple of 16, x channels_last-contiguous.
bool use_cl3(const at::Tensor& x, int64_t K) {
  return K == 3 && x.dim() == 4 && x.size(1) % cl3::kCB == 0 && x.size(1) > 0 &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// ---------------------------------------------------------------------------------------------
// The fold (falconnet/layers/repso_train.py, _fold_batch_stats), per channel c and branch b with
// embedded kernel k_b (K*K), batch-statistics BatchNorm (gamma_b, beta_b, eps_b):
//   m_b = k_b . mean,  v_b = max(k_b^T cov k_b, 0),  r_b = 1/sqrt(v_b + eps_b),  s_b = gamma_b r_b
//   folded = sum_b s_b k_b,  bias = sum_b (beta_b - m_b s_b)
// At small maps the same math as ~20 tensor ops (and their backward, batched 9x9 products among
// them) costs more than the moments kernels; here it is one pass over (C, B, K*K), in double.
// Most embedded kernels are sparse (1x3, 3x1, 1x1, identity: 3 or 1 of 9 taps), so every product
// runs over the nonzero taps of k only: at K = 3 with the default seven branches that is a third
// of the dense work. KK is a template constant for K = 3 (fixed trip counts the compiler unrolls).
namespace fold {

// A vector's lanes of channels at a time, one per lane of a vector of doubles: the per-channel
// math is a few hundred dependent scalar operations (9x9 quadratic forms, a square root per
// branch), which run at a fraction of the FMA rate one channel at a time. Per group the inputs are
// gathered into [index][lane] arrays (lanes past C stay 0 and are never stored); a branch's
// products run over the taps that are nonzero in any lane (the embedded 1x3, 3x1, 1x1 and identity
// kernels have 3 or 1 of 9: a third of the dense work at K = 3 with the default branches).
// The vector is the ISA's own (4 doubles with AVX2, 8 with AVX-512, 2 with SSE): the former fixed
// 8-double (64-byte) vector, without AVX-512, went through the stack at every loop-carried sum (GCC
// moved it in 128-bit pieces through general registers): ~25k cycles per group of 8 channels in
// the backward against ~1k of arithmetic; 2.3-3x faster since, the same results bit for bit.
using VecD = falconnet::cpu::Simd<double>::vec;
constexpr int64_t kLanes = falconnet::cpu::Simd<double>::lanes;
inline VecD loadv(const double* p) { return falconnet::cpu::Simd<double>::load(p); }
inline void storev(double* p, VecD v) { falconnet::cpu::Simd<double>::store(p, v); }

template <typename T>
inline void gather(const T* src, int64_t stride, int64_t n, int64_t lanes, double* dst) {  // dst[i][lane]
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t i = 0; i < n; ++i) dst[i * kLanes + l] = static_cast<double>(src[l * stride + i]);
}

template <typename T>
inline void scatter(const double* src, int64_t n, int64_t lanes, T* dst, int64_t stride) {
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t i = 0; i < n; ++i) dst[l * stride + i] = static_cast<T>(src[i * kLanes + l]);
}

// the taps of k ([KK][kLanes]) that are nonzero in some lane
inline int64_t nonzeros(const double* k, int64_t KK, int64_t* idx) {
  int64_t n = 0;
  for (int64_t p = 0; p < KK; ++p) {
    bool any = false;
    for (int64_t l = 0; l < kLanes; ++l) any |= k[p * kLanes + l] != 0.0;
    if (any) idx[n++] = p;
  }
  return n;
}

inline VecD rsqrt_of(VecD v) {
#if defined(__AVX512F__)
  return reinterpret_cast<VecD>(_mm512_div_pd(_mm512_set1_pd(1.0), _mm512_sqrt_pd(reinterpret_cast<__m512d>(v))));
#elif defined(__AVX__)
  return reinterpret_cast<VecD>(_mm256_div_pd(_mm256_set1_pd(1.0), _mm256_sqrt_pd(reinterpret_cast<__m256d>(v))));
#else
  double t[kLanes];
  storev(t, v);
  for (int64_t l = 0; l < kLanes; ++l) t[l] = 1.0 / std::sqrt(t[l]);
  return loadv(t);
#endif
}

// Where the fold finds a channel group's branch kernels (embedded in K x K), gammas and betas, as
// [index][lane] arrays (k zero-filled by the caller), and where its backward puts their gradients.
// Dense: (C, B, K*K) kernels and (C, B) gamma and beta (repso_fold_forward / _backward).
template <typename T>
struct Dense {
  const T *kernels, *gamma, *beta;
  T *g_kernels, *g_gamma, *g_beta;
  int64_t B, KK;
  void load(int64_t c0, int64_t lanes, double* k, double* gm, double* bt) const {
    gather(kernels + c0 * B * KK, B * KK, B * KK, lanes, k);
    gather(gamma + c0 * B, B, B, lanes, gm);
    if (bt) gather(beta + c0 * B, B, B, lanes, bt);
  }
  void store(int64_t c0, int64_t lanes, const double* gk, const double* g_gm, const double* g_bt) const {
    scatter(gk, B * KK, lanes, g_kernels + c0 * B * KK, B * KK);
    scatter(g_gm, B, lanes, g_gamma + c0 * B, B);
    scatter(g_bt, B, lanes, g_beta + c0 * B, B);
  }
};

// Branches: the parameters themselves (repso_fold_forward_params / _backward_params): branch b <
// n_w has the (C, 1, kh_b, kw_b) weight w[b], centred in K x K; branch n_w, when B = n_w + 1, is the
// identity (1 at the centre). gamma[b], beta[b] (C). The backward writes each parameter's own
// gradient (the taps outside a branch's window and the identity's kernel have none). This replaces
// a gather of the (C, B, K*K) kernels and a scatter of their gradients by index_select (~120 us
// each at C = 1024, 2 AVX2 cores) plus a concatenation of the parameters and of the gradients.
template <typename T>
struct Branches {
  std::vector<const T*> w, gamma, beta;
  std::vector<T*> g_w, g_gamma, g_beta;
  std::vector<int64_t> kh, kw;
  int64_t B, K;
  // f(lane) for each lane of the group: a full group's in a loop of constant trip count (unrolled)
  template <typename F>
  static void for_lanes(int64_t lanes, F&& f) {
    if (lanes == kLanes) {
#pragma GCC unroll 8
      for (int64_t l = 0; l < kLanes; ++l) f(l);
    } else {
      for (int64_t l = 0; l < lanes; ++l) f(l);
    }
  }
  void load(int64_t c0, int64_t lanes, double* k, double* gm, double* bt) const {
    const int64_t KK = K * K;
    for (int64_t b = 0; b < B; ++b) {
      double* kb = k + b * KK * kLanes;
      if (b < static_cast<int64_t>(w.size())) {
        const int64_t h = kh[b], v = kw[b], hv = h * v, corner = (K - h) / 2 * K + (K - v) / 2;
        const T* src = w[b] + c0 * hv;
        for (int64_t i = 0; i < h; ++i)
          for (int64_t j = 0; j < v; ++j) {
            double* dst = kb + (corner + i * K + j) * kLanes;
            const T* from = src + i * v + j;
            for_lanes(lanes, [&](int64_t l) { dst[l] = static_cast<double>(from[l * hv]); });
          }
      } else {
        for_lanes(lanes, [&](int64_t l) { kb[(KK / 2) * kLanes + l] = 1.0; });
      }
      for_lanes(lanes, [&](int64_t l) { gm[b * kLanes + l] = static_cast<double>(gamma[b][c0 + l]); });
      if (bt) for_lanes(lanes, [&](int64_t l) { bt[b * kLanes + l] = static_cast<double>(beta[b][c0 + l]); });
    }
  }
  void store(int64_t c0, int64_t lanes, const double* gk, const double* g_gm, const double* g_bt) const {
    const int64_t KK = K * K;
    for (int64_t b = 0; b < B; ++b) {
      if (b < static_cast<int64_t>(w.size())) {
        const double* gkb = gk + b * KK * kLanes;
        const int64_t h = kh[b], v = kw[b], hv = h * v, corner = (K - h) / 2 * K + (K - v) / 2;
        T* dst = g_w[b] + c0 * hv;
        for (int64_t i = 0; i < h; ++i)
          for (int64_t j = 0; j < v; ++j) {
            const double* from = gkb + (corner + i * K + j) * kLanes;
            T* to = dst + i * v + j;
            for_lanes(lanes, [&](int64_t l) { to[l * hv] = static_cast<T>(from[l]); });
          }
      }
      for_lanes(lanes, [&](int64_t l) { g_gamma[b][c0 + l] = static_cast<T>(g_gm[b * kLanes + l]); });
      for_lanes(lanes, [&](int64_t l) { g_beta[b][c0 + l] = static_cast<T>(g_bt[b * kLanes + l]); });
    }
  }
};

template <typename T, typename Src>
void forward(const T* mean, const T* cov, const Src& src, const double* eps, int64_t C, int64_t B, int64_t KK, T* folded,
             T* bias, T* bmean, T* bvar) {
  const int64_t groups = (C + kLanes - 1) / kLanes;
  at::parallel_for(0, groups, 8, [&](int64_t g0, int64_t g1) {
    std::vector<double> mu(KK * kLanes), cv(KK * KK * kLanes), k(B * KK * kLanes), gm(B * kLanes), bt(B * kLanes),
        f(KK * kLanes), out_m(B * kLanes), out_v(B * kLanes), sh(kLanes);
    std::vector<int64_t> idx(KK);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t c0 = grp * kLanes, lanes = std::min(kLanes, C - c0);
      std::fill(mu.begin(), mu.end(), 0.0), std::fill(cv.begin(), cv.end(), 0.0), std::fill(k.begin(), k.end(), 0.0);
      std::fill(gm.begin(), gm.end(), 0.0), std::fill(bt.begin(), bt.end(), 0.0);
      gather(mean + c0 * KK, KK, KK, lanes, mu.data());
      gather(cov + c0 * KK * KK, KK * KK, KK * KK, lanes, cv.data());
      src.load(c0, lanes, k.data(), gm.data(), bt.data());
      std::fill(f.begin(), f.end(), 0.0);
      VecD shift = {};
      for (int64_t b = 0; b < B; ++b) {
        const double* kb = k.data() + b * KK * kLanes;
        const int64_t n = nonzeros(kb, KK, idx.data());
        VecD m = {}, v = {};
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = idx[i];
          VecD row = {};
          for (int64_t j = 0; j < n; ++j) row += loadv(cv.data() + (p * KK + idx[j]) * kLanes) * loadv(kb + idx[j] * kLanes);
          m += loadv(kb + p * kLanes) * loadv(mu.data() + p * kLanes);
          v += loadv(kb + p * kLanes) * row;
        }
        const VecD zero = {};
        v = v < zero ? zero : v;
        const VecD s = loadv(gm.data() + b * kLanes) * rsqrt_of(v + eps[b]);
        for (int64_t i = 0; i < n; ++i) {
          double* fp = f.data() + idx[i] * kLanes;
          storev(fp, loadv(fp) + s * loadv(kb + idx[i] * kLanes));
        }
        shift += loadv(bt.data() + b * kLanes) - m * s;
        storev(out_m.data() + b * kLanes, m);
        storev(out_v.data() + b * kLanes, v);
      }
      storev(sh.data(), shift);
      scatter(f.data(), KK, lanes, folded + c0 * KK, KK);
      scatter(sh.data(), 1, lanes, bias + c0, 1);
      scatter(out_m.data(), B, lanes, bmean + c0 * B, B);
      scatter(out_v.data(), B, lanes, bvar + c0 * B, B);
    }
  });
}

// The gradients of folded and bias back to mean, cov, the kernels, gamma and beta:
//   g_s = gF . k - g_bias m,  g_m = -g_bias s,  g_gamma = g_s r,  g_v = -g_s gamma r^3 / 2 (0 where
//   the clamp cut v),  g_k = s gF + g_m mean + g_v (cov + cov^T) k,  g_mean = sum_b g_m k,
//   g_cov = sum_b g_v k k^T,  g_beta = g_bias.
// (cov + cov^T) is formed once per channel; v = k^T cov k = k . ((cov + cov^T) k) / 2.
template <typename T, typename Src>
void backward(const T* grad_folded, const T* grad_bias, const T* mean, const T* cov, const Src& src, const double* eps,
              int64_t C, int64_t B, int64_t KK, T* g_mean, T* g_cov) {
  const int64_t groups = (C + kLanes - 1) / kLanes;
  at::parallel_for(0, groups, 8, [&](int64_t g0, int64_t g1) {
    std::vector<double> mu(KK * kLanes), cv(KK * KK * kLanes), sym(KK * KK * kLanes), k(B * KK * kLanes),
        gm(B * kLanes), gF(KK * kLanes), gb(kLanes), sk(KK * kLanes), gk(B * KK * kLanes), o_mean(KK * kLanes),
        o_cov(KK * KK * kLanes), o_gamma(B * kLanes), o_beta(B * kLanes);
    std::vector<int64_t> idx(KK);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t c0 = grp * kLanes, lanes = std::min(kLanes, C - c0);
      for (auto* v : {&mu, &cv, &k, &gm, &gF, &gb, &o_mean, &o_cov}) std::fill(v->begin(), v->end(), 0.0);
      gather(mean + c0 * KK, KK, KK, lanes, mu.data());
      gather(cov + c0 * KK * KK, KK * KK, KK * KK, lanes, cv.data());
      src.load(c0, lanes, k.data(), gm.data(), nullptr);
      gather(grad_folded + c0 * KK, KK, KK, lanes, gF.data());
      gather(grad_bias + c0, 1, 1, lanes, gb.data());
      for (int64_t p = 0; p < KK; ++p)
        for (int64_t q = 0; q < KK; ++q)
          storev(sym.data() + (p * KK + q) * kLanes,
                 loadv(cv.data() + (p * KK + q) * kLanes) + loadv(cv.data() + (q * KK + p) * kLanes));
      const VecD g_bias = loadv(gb.data()), zero = {};
      for (int64_t b = 0; b < B; ++b) {
        const double* kb = k.data() + b * KK * kLanes;
        const int64_t n = nonzeros(kb, KK, idx.data());
        for (int64_t p = 0; p < KK; ++p) {
          VecD t = {};
          for (int64_t j = 0; j < n; ++j) t += loadv(sym.data() + (p * KK + idx[j]) * kLanes) * loadv(kb + idx[j] * kLanes);
          storev(sk.data() + p * kLanes, t);
        }
        VecD m = {}, v = {}, gFk = {};
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = idx[i];
          const VecD kp = loadv(kb + p * kLanes);
          m += kp * loadv(mu.data() + p * kLanes);
          v += kp * loadv(sk.data() + p * kLanes);
          gFk += kp * loadv(gF.data() + p * kLanes);
        }
        v *= 0.5;
        const auto clamped = v < zero;  // clamp_min's gradient is 0 below the bound
        v = clamped ? zero : v;
        const VecD g = loadv(gm.data() + b * kLanes), rs = rsqrt_of(v + eps[b]), s = g * rs;
        const VecD g_s = gFk - g_bias * m, g_m = -g_bias * s;
        const VecD g_v = clamped ? zero : -0.5 * g_s * g * rs * rs * rs;
        storev(o_gamma.data() + b * kLanes, g_s * rs);
        storev(o_beta.data() + b * kLanes, g_bias);
        double* gkb = gk.data() + b * KK * kLanes;
        for (int64_t p = 0; p < KK; ++p)
          storev(gkb + p * kLanes, s * loadv(gF.data() + p * kLanes) + g_m * loadv(mu.data() + p * kLanes) +
                                       g_v * loadv(sk.data() + p * kLanes));
        for (int64_t i = 0; i < n; ++i) {
          double* o = o_mean.data() + idx[i] * kLanes;
          storev(o, loadv(o) + g_m * loadv(kb + idx[i] * kLanes));
        }
        for (int64_t i = 0; i < n; ++i) {
          const VecD gvk = g_v * loadv(kb + idx[i] * kLanes);
          for (int64_t j = 0; j < n; ++j) {
            double* o = o_cov.data() + (idx[i] * KK + idx[j]) * kLanes;
            storev(o, loadv(o) + gvk * loadv(kb + idx[j] * kLanes));
          }
        }
      }
      scatter(o_mean.data(), KK, lanes, g_mean + c0 * KK, KK);
      scatter(o_cov.data(), KK * KK, lanes, g_cov + c0 * KK * KK, KK * KK);
      src.store(c0, lanes, gk.data(), o_gamma.data(), o_beta.data());
    }
  });
}

void check(const at::Tensor& mean, const at::Tensor& cov, const at::Tensor& kernels, const at::Tensor& gamma,
           const at::Tensor& eps) {
  FALCONNET_CHECK(mean.dim() == 2, "repso_fold: mean must be (C, K*K), got ", mean.sizes());
  const int64_t C = mean.size(0), KK = mean.size(1);
  FALCONNET_CHECK(cov.sizes() == at::IntArrayRef({C, KK, KK}), "repso_fold: cov must be (C, K*K, K*K), got ", cov.sizes());
  FALCONNET_CHECK(kernels.dim() == 3 && kernels.size(0) == C && kernels.size(2) == KK,
                  "repso_fold: kernels must be (C, B, K*K), got ", kernels.sizes());
  const int64_t B = kernels.size(1);
  FALCONNET_CHECK(gamma.sizes() == at::IntArrayRef({C, B}), "repso_fold: gamma and beta must be (C, B), got ",
                  gamma.sizes());
  FALCONNET_CHECK(eps.numel() == B, "repso_fold: eps must have B entries, got ", eps.numel());
  for (const at::Tensor* t : {&cov, &kernels, &gamma})
    FALCONNET_CHECK(t->scalar_type() == mean.scalar_type() && t->device().is_cpu(),
                    "repso_fold: every tensor must be a CPU tensor of mean's dtype");
}

}  // namespace fold

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> repso_fold_forward(const at::Tensor& mean,
                                                                            const at::Tensor& cov,
                                                                            const at::Tensor& kernels,
                                                                            const at::Tensor& gamma,
                                                                            const at::Tensor& beta,
                                                                            const at::Tensor& eps) {
  fold::check(mean, cov, kernels, gamma, eps);
  FALCONNET_CHECK(beta.sizes() == gamma.sizes() && beta.scalar_type() == mean.scalar_type(),
                  "repso_fold: beta must be like gamma");
  const int64_t C = mean.size(0), KK = mean.size(1), B = kernels.size(1);
  const at::Tensor mu = mean.contiguous(), cv = cov.contiguous(), k = kernels.contiguous(), g = gamma.contiguous(),
                   bt = beta.contiguous(), e = eps.to(at::kDouble).contiguous();
  at::Tensor folded = at::empty({C, KK}, mean.options()), bias = at::empty({C}, mean.options());
  at::Tensor bmean = at::empty({C, B}, mean.options()), bvar = at::empty({C, B}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "repso_fold_forward", [&] {
    const fold::Dense<scalar_t> src{k.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                    bt.const_data_ptr<scalar_t>(), nullptr, nullptr, nullptr, B, KK};
    fold::forward<scalar_t>(mu.const_data_ptr<scalar_t>(), cv.const_data_ptr<scalar_t>(), src, e.const_data_ptr<double>(),
                            C, B, KK, folded.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), bmean.data_ptr<scalar_t>(),
                            bvar.data_ptr<scalar_t>());
  });
  return {folded, bias, bmean, bvar};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> repso_fold_backward(
    const at::Tensor& grad_folded, const at::Tensor& grad_bias, const at::Tensor& mean, const at::Tensor& cov,
    const at::Tensor& kernels, const at::Tensor& gamma, const at::Tensor& eps) {
  fold::check(mean, cov, kernels, gamma, eps);
  const int64_t C = mean.size(0), KK = mean.size(1), B = kernels.size(1);
  const auto dt = mean.scalar_type();
  const at::Tensor gF = grad_folded.to(dt).contiguous(), gb = grad_bias.to(dt).contiguous();
  FALCONNET_CHECK(gF.sizes() == mean.sizes() && gb.numel() == C, "repso_fold_backward: gradient shapes");
  const at::Tensor mu = mean.contiguous(), cv = cov.contiguous(), k = kernels.contiguous(), g = gamma.contiguous(),
                   e = eps.to(at::kDouble).contiguous();
  at::Tensor g_mean = at::empty_like(mu), g_cov = at::empty_like(cv), g_k = at::empty_like(k),
             g_gamma = at::empty_like(g), g_beta = at::empty_like(g);
  AT_DISPATCH_FLOATING_TYPES(dt, "repso_fold_backward", [&] {
    const fold::Dense<scalar_t> src{k.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), nullptr,
                                    g_k.data_ptr<scalar_t>(), g_gamma.data_ptr<scalar_t>(), g_beta.data_ptr<scalar_t>(),
                                    B, KK};
    fold::backward<scalar_t>(gF.const_data_ptr<scalar_t>(), gb.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(),
                             cv.const_data_ptr<scalar_t>(), src, e.const_data_ptr<double>(), C, B, KK,
                             g_mean.data_ptr<scalar_t>(), g_cov.data_ptr<scalar_t>());
  });
  return {g_mean, g_cov, g_k, g_gamma, g_beta};
}

// The fold with the branch parameters as they are (fold::Branches): weights[b] (C, 1, kh, kw) for
// the n_w conv branches, gammas and betas (C) for all B = n_w or n_w + 1 (the identity last). Values
// in mean's dtype (parameters of another dtype are converted); gradients in each parameter's.
namespace fold {

int64_t window_of(const at::Tensor& mean) {
  FALCONNET_CHECK(mean.dim() == 2 && mean.device().is_cpu() && at::isFloatingType(mean.scalar_type()),
                  "repso_fold: mean must be a (C, K*K) floating-point CPU tensor, got ", mean.sizes(), " ",
                  mean.scalar_type());
  const int64_t KK = mean.size(1);
  int64_t K = 1;
  while (K * K < KK) K += 2;
  FALCONNET_CHECK(K * K == KK, "repso_fold: mean must be (C, K*K) for an odd K, got ", mean.sizes());
  return K;
}

// the parameters in dtype dt, contiguous, checked against C, K and each other
std::vector<at::Tensor> prepared(at::TensorList ts, at::ScalarType dt, int64_t C, int64_t K, bool weights,
                                 const char* what) {
  std::vector<at::Tensor> out;
  for (size_t b = 0; b < ts.size(); ++b) {
    const at::Tensor& t = ts[b];
    FALCONNET_CHECK(t.device().is_cpu(), "repso_fold: ", what, "[", b, "] must be a CPU tensor");
    if (weights) {
      FALCONNET_CHECK(t.dim() == 4 && t.size(0) == C && t.size(1) == 1 && t.size(2) % 2 == 1 && t.size(3) % 2 == 1 &&
                          t.size(2) <= K && t.size(3) <= K,
                      "repso_fold: ", what, "[", b, "] must be (", C,
                      ", 1, kh, kw) with odd kh, kw <= ", K, ", got ", t.sizes());
    } else {
      FALCONNET_CHECK(t.dim() == 1 && t.size(0) == C, "repso_fold: ", what, "[", b, "] must be (",
                      C, "), got ", t.sizes());
    }
    // (asked first: .to and .contiguous are a dispatch each even when they return t, ~1 us apiece)
    out.push_back(t.scalar_type() == dt && t.is_contiguous() ? t : t.to(dt).contiguous());
  }
  return out;
}

template <typename T>
Branches<T> branches(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& gamma,
                     const std::vector<at::Tensor>* beta, int64_t K) {
  Branches<T> src;
  src.B = static_cast<int64_t>(gamma.size()), src.K = K;
  for (const auto& t : w) {
    src.w.push_back(t.const_data_ptr<T>());
    src.kh.push_back(t.size(2));
    src.kw.push_back(t.size(3));
  }
  for (const auto& t : gamma) src.gamma.push_back(t.const_data_ptr<T>());
  if (beta)
    for (const auto& t : *beta) src.beta.push_back(t.const_data_ptr<T>());
  return src;
}

void check_counts(at::TensorList weights, at::TensorList gammas, const at::Tensor& eps) {
  const size_t n_w = weights.size(), B = gammas.size();
  FALCONNET_CHECK(n_w >= 1 && (B == n_w || B == n_w + 1),
                  "repso_fold: gammas must have one entry per weight (plus one for the identity), got ",
                  n_w, " weights and ", B, " gammas");
  FALCONNET_CHECK(eps.numel() == static_cast<int64_t>(B), "repso_fold: eps must have B = ", B,
                  " entries, got ", eps.numel());
}

}  // namespace fold

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> repso_fold_forward_params(
    const at::Tensor& mean, const at::Tensor& cov, at::TensorList weights, at::TensorList gammas, at::TensorList betas,
    const at::Tensor& eps) {
  fold::check_counts(weights, gammas, eps);
  FALCONNET_CHECK(betas.size() == gammas.size(), "repso_fold: betas must pair with gammas, got ",
                  betas.size(), " and ", gammas.size());
  const int64_t K = fold::window_of(mean), C = mean.size(0), KK = mean.size(1), B = gammas.size();
  FALCONNET_CHECK(cov.sizes() == at::IntArrayRef({C, KK, KK}) && cov.scalar_type() == mean.scalar_type(),
                  "repso_fold: cov must be (C, K*K, K*K) of mean's dtype, got ", cov.sizes());
  const auto dt = mean.scalar_type();
  const auto w = fold::prepared(weights, dt, C, K, true, "weights"), g = fold::prepared(gammas, dt, C, K, false, "gammas"),
             bt = fold::prepared(betas, dt, C, K, false, "betas");
  const at::Tensor mu = mean.contiguous(), cv = cov.contiguous(), e = eps.to(at::kDouble).contiguous();
  at::Tensor folded = at::empty({C, KK}, mean.options()), bias = at::empty({C}, mean.options());
  at::Tensor bmean = at::empty({C, B}, mean.options()), bvar = at::empty({C, B}, mean.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "repso_fold_forward_params", [&] {
    const auto src = fold::branches<scalar_t>(w, g, &bt, K);
    fold::forward<scalar_t>(mu.const_data_ptr<scalar_t>(), cv.const_data_ptr<scalar_t>(), src, e.const_data_ptr<double>(),
                            C, B, KK, folded.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), bmean.data_ptr<scalar_t>(),
                            bvar.data_ptr<scalar_t>());
  });
  return {folded, bias, bmean, bvar};
}

// -> gradients of mean, cov and of every parameter: weights..., gammas..., betas... (each in its
// parameter's dtype and shape)
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> repso_fold_backward_params(
    const at::Tensor& grad_folded, const at::Tensor& grad_bias, const at::Tensor& mean, const at::Tensor& cov,
    at::TensorList weights, at::TensorList gammas, const at::Tensor& eps) {
  fold::check_counts(weights, gammas, eps);
  const int64_t K = fold::window_of(mean), C = mean.size(0), KK = mean.size(1), B = gammas.size();
  FALCONNET_CHECK(cov.sizes() == at::IntArrayRef({C, KK, KK}) && cov.scalar_type() == mean.scalar_type(),
                  "repso_fold: cov must be (C, K*K, K*K) of mean's dtype, got ", cov.sizes());
  const auto dt = mean.scalar_type();
  const at::Tensor gF = grad_folded.to(dt).contiguous(), gb = grad_bias.to(dt).contiguous();
  FALCONNET_CHECK(gF.sizes() == mean.sizes() && gb.numel() == C, "repso_fold_backward: gradient shapes");
  const auto w = fold::prepared(weights, dt, C, K, true, "weights"), g = fold::prepared(gammas, dt, C, K, false, "gammas");
  const at::Tensor mu = mean.contiguous(), cv = cov.contiguous(), e = eps.to(at::kDouble).contiguous();
  at::Tensor g_mean = at::empty_like(mu), g_cov = at::empty_like(cv);
  std::vector<at::Tensor> g_w, g_gamma, g_beta;
  for (const auto& t : w) g_w.push_back(at::empty_like(t));
  for (int64_t b = 0; b < B; ++b) g_gamma.push_back(at::empty({C}, mean.options())), g_beta.push_back(at::empty({C}, mean.options()));
  AT_DISPATCH_FLOATING_TYPES(dt, "repso_fold_backward_params", [&] {
    auto src = fold::branches<scalar_t>(w, g, nullptr, K);
    for (auto& t : g_w) src.g_w.push_back(t.data_ptr<scalar_t>());
    for (int64_t b = 0; b < B; ++b) src.g_gamma.push_back(g_gamma[b].data_ptr<scalar_t>()), src.g_beta.push_back(g_beta[b].data_ptr<scalar_t>());
    fold::backward<scalar_t>(gF.const_data_ptr<scalar_t>(), gb.const_data_ptr<scalar_t>(), mu.const_data_ptr<scalar_t>(),
                             cv.const_data_ptr<scalar_t>(), src, e.const_data_ptr<double>(), C, B, KK,
                             g_mean.data_ptr<scalar_t>(), g_cov.data_ptr<scalar_t>());
  });
  std::vector<at::Tensor> grads;
  auto as = [&](const at::Tensor& g, at::ScalarType t) { return g.scalar_type() == t ? g : g.to(t); };
  for (size_t b = 0; b < g_w.size(); ++b) grads.push_back(as(g_w[b], weights[b].scalar_type()));
  for (int64_t b = 0; b < B; ++b) grads.push_back(as(g_gamma[b], gammas[b].scalar_type()));
  for (int64_t b = 0; b < B; ++b) grads.push_back(as(g_beta[b], gammas[b].scalar_type()));
  return {g_mean, g_cov, grads};
}

void check_x(const at::Tensor& x, int64_t K) {
  FALCONNET_CHECK(x.dim() == 4, "repso_moments: x must be a 4-D (N, C, H, W) tensor, got ", x.sizes());
  FALCONNET_CHECK(K >= 1 && K % 2 == 1, "repso_moments: K must be a positive odd integer, got ", K);
  FALCONNET_CHECK(x.device().is_cpu(), "repso_moments (C++): x must be a CPU tensor");
  FALCONNET_CHECK(x.size(0) * x.size(2) * x.size(3) > 0,
                  "repso_moments: x must have at least one position per channel, got ", x.sizes());
}

at::ScalarType stat_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> repso_moments_forward(const at::Tensor& x_in, int64_t K) {
  check_x(x_in, K);
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), KK = K * K;
  auto opts = x_in.options().dtype(stat_type(x_in.scalar_type()));
  at::Tensor mean = at::empty({C, KK}, opts), cov = at::empty({C, KK, KK}, opts);
  if (use_cl3(x_in, K)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "repso_moments_forward_cl3", [&] {
      if (x_in.scalar_type() == at::kDouble) {
        cl3::forward<scalar_t, double>(x_in.const_data_ptr<scalar_t>(), N, C, H, W, mean.data_ptr<double>(),
                                       cov.data_ptr<double>());
      } else {
        cl3::forward<scalar_t, float>(x_in.const_data_ptr<scalar_t>(), N, C, H, W, mean.data_ptr<float>(),
                                      cov.data_ptr<float>());
      }
    });
    return {mean, cov};
  }
  const at::Tensor x = x_in.contiguous();  // channel planes; another channels_last input is copied once
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
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3), KK = K * K;
  const auto st = stat_type(x_in.scalar_type());
  FALCONNET_CHECK(mean_in.sizes() == at::IntArrayRef({C, KK}), "repso_moments_backward: mean must have shape (", C, ", ",
                  KK, "), got ", mean_in.sizes());
  FALCONNET_CHECK(grad_cov_in.sizes() == at::IntArrayRef({C, KK, KK}), "repso_moments_backward: grad_cov must have shape (",
                  C, ", ", KK, ", ", KK, "), got ", grad_cov_in.sizes());
  FALCONNET_CHECK(grad_mean_in.sizes() == at::IntArrayRef({C, KK}), "repso_moments_backward: grad_mean must have shape (",
                  C, ", ", KK, "), got ", grad_mean_in.sizes());
  const at::Tensor grad_mean = grad_mean_in.to(st).contiguous(), grad_cov = grad_cov_in.to(st).contiguous();
  const at::Tensor mean = mean_in.to(st).contiguous();
  if (use_cl3(x_in, K)) {
    at::Tensor grad_x = at::empty_like(x_in, at::MemoryFormat::ChannelsLast);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_in.scalar_type(), "repso_moments_backward_cl3", [&] {
      if (st == at::kDouble) {
        cl3::backward<scalar_t, double>(grad_mean.const_data_ptr<double>(), grad_cov.const_data_ptr<double>(),
                                        x_in.const_data_ptr<scalar_t>(), mean.const_data_ptr<double>(), N, C, H, W,
                                        grad_x.data_ptr<scalar_t>());
      } else {
        cl3::backward<scalar_t, float>(grad_mean.const_data_ptr<float>(), grad_cov.const_data_ptr<float>(),
                                       x_in.const_data_ptr<scalar_t>(), mean.const_data_ptr<float>(), N, C, H, W,
                                       grad_x.data_ptr<scalar_t>());
      }
    });
    return grad_x;
  }
  const at::Tensor x = x_in.contiguous();
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

// The two kernels of RepSO's one-conv training backward on the channels_last fast path
// (use_cl3: K = 3, C a multiple of 16): the conv's weight and bias gradients, and the whole grad_x
// (moments backward plus the conv's input gradient) in one pass.
void check_cl3_pair(const char* op, const at::Tensor& x, const at::Tensor& grad_y) {
  FALCONNET_CHECK(use_cl3(x, 3), op, ": x must be a channels_last (N, C, H, W) CPU tensor with C a multiple of 16, got ",
                  x.sizes(), x.is_contiguous(at::MemoryFormat::ChannelsLast) ? "" : " (not channels_last)");
  FALCONNET_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor");
  FALCONNET_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(), op,
                  ": grad_y must have x's shape and dtype, got ", grad_y.sizes(), " ", grad_y.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> repso_conv_weight_grad(const at::Tensor& grad_y_in, const at::Tensor& x) {
  check_cl3_pair("repso_conv_weight_grad", x, grad_y_in);
  const at::Tensor grad_y = grad_y_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto st = stat_type(x.scalar_type());
  at::Tensor grad_w = at::empty({C, 1, 3, 3}, x.options().dtype(st)), grad_b = at::empty({C}, x.options().dtype(st));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "repso_conv_weight_grad", [&] {
    if (st == at::kDouble)
      cl3::conv_weight_grad<scalar_t, double>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), N, C,
                                              H, W, grad_w.data_ptr<double>(), grad_b.data_ptr<double>());
    else
      cl3::conv_weight_grad<scalar_t, float>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), N, C,
                                             H, W, grad_w.data_ptr<float>(), grad_b.data_ptr<float>());
  });
  return {grad_w, grad_b};
}

at::Tensor repso_train_backward_x(const at::Tensor& grad_mean_in, const at::Tensor& grad_cov_in, const at::Tensor& x,
                                  const at::Tensor& mean_in, const at::Tensor& grad_y_in,
                                  const at::Tensor& weight_in) {
  check_cl3_pair("repso_train_backward_x", x, grad_y_in);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto st = stat_type(x.scalar_type());
  FALCONNET_CHECK(mean_in.sizes() == at::IntArrayRef({C, 9}) && grad_mean_in.sizes() == mean_in.sizes() &&
                      grad_cov_in.sizes() == at::IntArrayRef({C, 9, 9}),
                  "repso_train_backward_x: mean and grad_mean must be (", C, ", 9), grad_cov (", C, ", 9, 9), got ",
                  mean_in.sizes(), ", ", grad_mean_in.sizes(), ", ", grad_cov_in.sizes());
  FALCONNET_CHECK(weight_in.sizes() == at::IntArrayRef({C, 1, 3, 3}) && weight_in.scalar_type() == x.scalar_type(),
                  "repso_train_backward_x: weight must be (", C, ", 1, 3, 3) of x's dtype ", x.scalar_type(), ", got ",
                  weight_in.sizes(), " ", weight_in.scalar_type());
  const at::Tensor grad_mean = grad_mean_in.to(st).contiguous(), grad_cov = grad_cov_in.to(st).contiguous();
  const at::Tensor mean = mean_in.to(st).contiguous(), weight = weight_in.contiguous();
  const at::Tensor grad_y = grad_y_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "repso_train_backward_x", [&] {
    if (st == at::kDouble)
      cl3::backward<scalar_t, double>(grad_mean.const_data_ptr<double>(), grad_cov.const_data_ptr<double>(),
                                      x.const_data_ptr<scalar_t>(), mean.const_data_ptr<double>(), N, C, H, W,
                                      grad_x.data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(),
                                      weight.const_data_ptr<scalar_t>());
    else
      cl3::backward<scalar_t, float>(grad_mean.const_data_ptr<float>(), grad_cov.const_data_ptr<float>(),
                                     x.const_data_ptr<scalar_t>(), mean.const_data_ptr<float>(), N, C, H, W,
                                     grad_x.data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(),
                                     weight.const_data_ptr<scalar_t>());
  });
  return grad_x;
}

}  // namespace

namespace falconnet::cpu {

// dw_conv3x3's backward on the layout the RepSO kernels use (csrc/cpu/dw_conv3x3.cpp calls this
// when it applies): stride 1, x channels_last, C a multiple of 16. Returns false (and touches
// nothing) otherwise.
bool dw3x3_backward_channels_last(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, Activation act, at::Tensor& grad_x,
                                  at::Tensor& grad_w, at::Tensor& grad_b) {
  if (!use_cl3(x, 3) || x.numel() == 0) return false;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const at::Tensor gy = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = weight.contiguous();
  const at::Tensor bvec = bias ? bias->contiguous() : at::Tensor();
  if (w.scalar_type() != x.scalar_type() || (bias && bvec.scalar_type() != x.scalar_type())) return false;
  grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor gw = at::empty({C, 9}, x.options().dtype(at::kDouble)), gb = at::empty({C}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "dw3x3_backward_channels_last", [&] {
    cl3::dw3x3_backward<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                  w.const_data_ptr<scalar_t>(), bias ? bvec.const_data_ptr<scalar_t>() : nullptr, act,
                                  N, C, H, W, grad_x.data_ptr<scalar_t>(), gw.data_ptr<double>(),
                                  gb.data_ptr<double>());
  });
  grad_w = gw.view(weight.sizes()).to(weight.scalar_type());
  grad_b = gb.to(weight.scalar_type());
  return true;
}

}  // namespace falconnet::cpu

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
  // RepSO's fold of B batch-statistics branches: -> folded (C, K*K), bias (C), branch means and biased variances (C, B)
  m.def("repso_fold_forward(Tensor mean, Tensor cov, Tensor kernels, Tensor gamma, Tensor beta, Tensor eps)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // -> gradients of mean, cov, kernels, gamma, beta
  m.def("repso_fold_backward(Tensor grad_folded, Tensor grad_bias, Tensor mean, Tensor cov, Tensor kernels,"
        " Tensor gamma, Tensor eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // the same fold with the branch parameters as they are: weights[b] (C, 1, kh, kw), gammas and
  // betas (C) per BatchNorm (the identity's last when there is one more than weights)
  m.def("repso_fold_forward_params(Tensor mean, Tensor cov, Tensor[] weights, Tensor[] gammas, Tensor[] betas,"
        " Tensor eps) -> (Tensor, Tensor, Tensor, Tensor)");
  // -> gradients of mean, cov and of weights..., gammas..., betas... (betas' gradients: grad_bias each)
  m.def("repso_fold_backward_params(Tensor grad_folded, Tensor grad_bias, Tensor mean, Tensor cov, Tensor[] weights,"
        " Tensor[] gammas, Tensor eps) -> (Tensor, Tensor, Tensor[])");
  // RepSO one-conv training backward, channels_last, K = 3, C % 16 == 0: the depthwise conv's
  // weight (C, 1, 3, 3) and bias gradients in the statistics dtype
  m.def("repso_conv_weight_grad(Tensor grad_y, Tensor x) -> (Tensor, Tensor)");
  // -> grad_x = the moments backward plus the conv's input gradient for grad_y and weight
  m.def("repso_train_backward_x(Tensor grad_mean, Tensor grad_cov, Tensor x, Tensor mean, Tensor grad_y,"
        " Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(FALCONNET_OPS_NAMESPACE, CPU, m) {
  m.impl("repso_moments_forward", &repso_moments_forward);
  m.impl("repso_moments_backward", &repso_moments_backward);
  m.impl("repso_fold_forward", &repso_fold_forward);
  m.impl("repso_fold_backward", &repso_fold_backward);
  m.impl("repso_fold_forward_params", &repso_fold_forward_params);
  m.impl("repso_fold_backward_params", &repso_fold_backward_params);
  m.impl("repso_conv_weight_grad", &repso_conv_weight_grad);
  m.impl("repso_train_backward_x", &repso_train_backward_x);
}
