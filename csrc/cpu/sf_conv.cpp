// SF-Conv pair on the CPU: y = act(W2 . shuffle . W1 x + bias) + residual, forward and backward.
//
// Two numbers (per pixel; P = N*H*W pixels; w1: (G, c_h, k), w2: (c_h, m, G), C_in = G*k,
// C_out = c_h*m):
//   FLOPs forward  = 2 * (C_in*c_h + C_out*G)       (dense 1x1: 2 * C_in*C_out)
//   bytes forward  = (C_in + C_out) * sizeof(T)     (+ C_out*sizeof(T) with a residual)
// e.g. 32 -> 128 (k = c_h = 8, G = 4, m = 16): 1536 FLOP vs 640 bytes in float32, 2.4 FLOP/byte,
// against 8192 FLOP for the dense conv (12.8 FLOP/byte). On the 2-core AVX-512 dev machine dense
// oneDNN reaches ~200 GFLOP/s per core and an L3-resident copy ~120 GB/s (2 threads), so the
// dense 1x1 conv sits near the compute roof and SF-Conv, with 2.7x (128 -> 32) to 16x (256 ->
// 1024) fewer FLOPs, should be limited by bytes and by how cheaply it can reorder them.
//   backward: 4 * the forward MACs (+ 2x the forward again when an activation needs z), bytes
//   = (C_in [x] + C_out [grad_y] + C_in [grad_x]) * sizeof(T); grad_w1/grad_w2 are tiny.
//
// Loop order and layout, and why:
// * Work unit = a tile of T = 32 (float) consecutive pixels of the flattened N*H*W index (so 7x7
//   images do not waste lanes: a tile may span images). Tiles are handed out in chunks on demand
//   (parallel_dynamic): on a shared machine a static split waits for the slower core.
// * Inside a tile everything is channel-major with the SIMD lanes over pixels: buf[c*T + p].
//   Both stages are then small GEMMs "weights (rows x K) times tile (K x T)" whose B rows are
//   contiguous vectors and whose A entries are broadcast scalars: stage 1 per group g
//   (c_h x k) . (k x T), stage 2 per hidden channel j (m x G) . (G x T). No shape of the
//   FalconNet range (k, c_h, m, G in 4..64) fills a vector along a channel axis in both stages,
//   but every shape fills it along pixels. Narrow groups (c_h <= 4) are batched 3 at a time into
//   one register block so k = 4 loops still keep 24 accumulators busy (AVX-512; AVX2 builds run
//   c_h = 4 one group a block, in one loop: stage1).
// * The hidden tile is written as hidden[j][g][p]: the layout stage 2 reads as contiguous rows.
//   It is G*c_h*T values (<= 128 KiB for C_in = 1024), L1/L2-resident, never written to memory.
// * NCHW rows are pixel-contiguous already: a float32/float64 tile that lies in one image is
//   read and written in place (no copy); other tiles go through the buffers. In AVX2 builds the
//   input rows are first read a super-tile (a few hundred pixels of every row) at a time, row by
//   row (super_tile, common.h: touch_rows): tile by tile they were C_in streams of one line each.
// * channels_last: the input tile is transposed with 16x16 (AVX-512) or 8x8 (AVX2) in-register
//   transposes (common.h).
//   The output is written without a transpose when m is a multiple of the vector width and G is
//   small (<= 16; <= 32 in AVX2 builds): stage 2 then runs with lanes over output channels
//   ("lanes" kernels below), which costs 1 broadcast per FMA but saves the transpose that
//   dominates when each output value takes only G MACs. With more groups the pixel-lane kernel +
//   transpose measured faster.
// * The epilogue (bias, activation, residual) is applied in stage 2's registers before the
//   single store. Outputs whose op footprint exceeds a quarter of the L3 go out as streaming stores.
//   channels_last input tiles ahead are prefetched a slice at a time between the current tile's
//   blocks of FMAs (SpreadPrefetch: two tiles on in AVX2 builds; one in AVX-512 builds, where the
//   tensors outgrow a quarter of the L3, else the next tile at once); AVX2 NCHW: super-tiles.
// * Backward recomputes the hidden tile (and z when the activation needs its mask) instead of
//   storing it. grad_w1 / grad_w2 / grad_bias are reductions over pixels: each thread keeps them
//   with the SIMD lanes unreduced (acc[..][lane]) so the inner loop stays a plain vector FMA,
//   and the lanes and threads are summed once at the end (the thread order of that final sum
//   varies, so results can differ run to run in the last bits). The backward's tiles are 64
//   pixels (kNVB): the accumulators outgrow L1 at wide shapes (G*c_h*m*16 floats: 1.5 MB at
//   512 -> 384), and each of their loads/stores then serves 4 FMAs instead of 2: the backward
//   8-20% faster (2026-11-26 10:20 UTC, 2 threads, batch 16, channels_last, A/B builds:
//   512->384@14 2.42 -> 1.92 ms, 128->32@56 4.06 -> 3.57, 32->128@56 2.35 -> 2.15).
//
// Measured (scripts/cpu_kernel_timing.py, float32, batch 16, 2 threads, shared machine; see the
// final report of issue 3 for the table): forward geomean ~2x dense in both layouts.
//
// Vector width and register blocks follow the build's ISA (common.h: kVecBytes, kAccRegs). Until
// 2026-11-27 they were AVX-512's everywhere; on a 2-core AVX2 machine (AMD EPYC, Zen 3, 16 ymm
// registers) the 64-byte vectors split in two and the 24-accumulator blocks spilled: the forward
// ran 0.15-0.49x dense oneDNN (channels_last, batch 16). With 32-byte vectors, 12-accumulator
// blocks, 8x8 transposes and AVX streaming stores: benchmarks/results/2026-11-27-cpu-avx2/. There
// the channels_last input tile alone (load_tile) took half the forward at 128->32@56, stalled on
// memory; a sequential pass over its lines before the transposes (common.h: touch_lines) made the
// forward 1.05-1.33x and the backward 1.04-1.31x faster at 7 or 8 of the 8 shapes
// (benchmarks/results/2026-11-27-cpu-avx2-3/; 0.94-0.95x at one shape in the 2-thread runs).
// What was measured on the AVX-512 machine while the kernel took this shape, and what was tried
// and not kept (prefetch variants, stage 1 from the transposes' registers, T = 64, ...):
// docs/sf_conv_cpu_log.md.
#include "cpu/common.h"

#include <torch/library.h>

#include <utility>

namespace falconnet::cpu {
namespace {

// What happens to a finished output block before it is stored: bias, activation, residual
// (y = act(z + bias) + residual), and whether to store with non-temporal (streaming) stores.
template <typename A>
struct Epilogue {
  const A* bias = nullptr;  // one value per output row
  const A* res = nullptr;   // residual rows, row stride res_rs
  int64_t res_rs = 0;
  Activation act = Activation::kNone;
  bool stream = false;

  Epilogue rows_from(int r) const {
    Epilogue e = *this;
    if (e.bias) e.bias += r;
    if (e.res) e.res += r * res_rs;
    return e;
  }
};

// Streaming stores skip the read-for-ownership of the output lines and keep a large output from
// evicting the input: worth it only when the output is bigger than the caches anyway.
template <typename A>
inline void store_vec(A* p, typename Simd<A>::vec v, bool stream) {
  if (stream && stream_vec<A>(p, v)) return;
  Simd<A>::store(p, v);
}

// acc[r][0:NV] = sum_q a[r*a_rs + q*a_cs] * b[q*b_rs + 0:NV*L]: the register-blocked product both
// kernel families share (gemm_block: rows x pixel lanes; lanes_block: pixels x channel lanes).
// Each b row is loaded once and used R times; each a entry is a broadcast used NV times.
template <typename A, int NV, int R>
__attribute__((always_inline)) inline void accumulate(const A* __restrict a, int64_t a_rs, int64_t a_cs,
                                                      const A* __restrict b, int64_t b_rs, int K,
                                                      typename Simd<A>::vec (&acc)[R][NV]) {
  using V = Simd<A>;
  using vec = typename V::vec;
  constexpr int L = V::lanes;
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
  for (int q = 0; q < K; ++q) {
    vec bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      bv[v] = V::load(b + q * b_rs + v * L);
      // GCC otherwise folds this load back into each of the R FMAs that use it (R loads, not 1).
      // AVX-512 builds only, where it was measured: 2026-11-28, 2-core Zen 5, alternated A/B
      // (benchmarks/results/2026-11-28-cpu-avx512/): backward 0.90-0.99x the time at the 56x56 to
      // 14x14 shapes in both layouts, 0.96-1.01x at 7x7; forward 0.94-1.04x (one 2-thread run 1.07x
      // at 128->512@14).
      if constexpr (kWideRegs) asm("" : "+v"(bv[v]));
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const A s = a[r * a_rs + q * a_cs];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += bv[v] * s;
    }
  }
}

// C[r][0:T] = epi(sum_q A[r*a_rs + q*a_cs] * B[q*b_rs + 0:T]), for R rows: one register block of
// R x NV vector accumulators.
template <typename A, int NV, int R>
inline void gemm_block(const A* __restrict a, int64_t a_rs, int64_t a_cs, const A* __restrict b, int64_t b_rs,
                       int K, A* __restrict c, int64_t c_rs, const Epilogue<A>* epi) {
  using V = Simd<A>;
  using vec = typename V::vec;
  constexpr int L = V::lanes;
  vec acc[R][NV];
  accumulate<A, NV, R>(a, a_rs, a_cs, b, b_rs, K, acc);
  if (epi == nullptr) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) V::store(c + r * c_rs + v * L, acc[r][v]);
    return;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      vec o = acc[r][v];
      if (epi->bias) o += epi->bias[r];
      o = activate_vec<A>(o, epi->act);
      if (epi->res) o += V::load(epi->res + r * epi->res_rs + v * L);
      store_vec<A>(c + r * c_rs + v * L, o, epi->stream);
    }
  }
}

template <typename A, int NV>
void gemm_rows(int R, const A* a, int64_t a_rs, int64_t a_cs, const A* b, int64_t b_rs, int K, A* c, int64_t c_rs,
               const Epilogue<A>* epi = nullptr) {
  // accumulators RB*NV <= kAccRegs (24 of AVX-512's 32 registers)
  constexpr int RB = std::min(kAccRegs / NV, NV >= 4 ? 6 : (NV >= 2 ? 8 : 12));
  static_assert(RB <= 12, "gemm_rows dispatches blocks of 1 to 12 rows");
  Epilogue<A> shifted;
  for (int r = 0; r < R;) {
    // The last two blocks split the rows left evenly when the last would be short: its few
    // independent accumulators cannot hide the FMA latency (R = 16 at RB = 6: 6 + 5 + 5, not
    // 6 + 6 + 4). AVX2, 2026-11-27, A/B of builds: 1024->256@7 forward 0.87-0.92 -> 0.74-0.75 ms.
    // R = 8 (6 + 2 against 4 + 4) measured -8% to +10% over four runs and stays as it was.
    const int left = R - r;
    const int rows = left <= RB ? left : (left < 2 * RB && left > RB + 2 ? (left + 1) / 2 : RB);
    if (epi) shifted = epi->rows_from(r);
    const Epilogue<A>* e = epi ? &shifted : nullptr;
    const A* ar = a + r * a_rs;
    A* cr = c + r * c_rs;
    // A switch, not with_run_length: through its lambda the forward took 1.04-1.21x and the
    // backward 1.05-1.10x the time at the 56x56-14x14 shapes (AVX-512, 2026-11-28,
    // benchmarks/results/2026-11-28-cpu-avx512/ab/gemm_rows_with_run_length_not_kept.patch).
    switch (rows) {
#define FALCONNET_CASE(n)                                                                  \
  case n:                                                                                  \
    if constexpr (n <= RB) gemm_block<A, NV, n>(ar, a_rs, a_cs, b, b_rs, K, cr, c_rs, e); \
    break;
      FALCONNET_CASE(1)
      FALCONNET_CASE(2)
      FALCONNET_CASE(3)
      FALCONNET_CASE(4)
      FALCONNET_CASE(5)
      FALCONNET_CASE(6)
      FALCONNET_CASE(7)
      FALCONNET_CASE(8)
      FALCONNET_CASE(9)
      FALCONNET_CASE(10)
      FALCONNET_CASE(11)
      FALCONNET_CASE(12)
#undef FALCONNET_CASE
      default:
        break;
    }
    r += rows;
  }
}

// ---------------------------------------------------------------------------------------------
// Channel-lane kernels for channels_last: SIMD lanes over output channels, a register block of
// PB pixels. out[pb][0:MV*L] = epi(sum_q h[pb*h_ps + q*h_qs] * w[q*w_qs + 0:MV*L]), where h
// entries are broadcast and w rows are contiguous. Used when a stage's output width (m, or c_h
// for stage 1) is a multiple of the vector width: then channels_last rows are read and written
// directly, with no transpose.

template <typename A>
struct LaneEpilogue {
  const A* bias = nullptr;  // per output column
  const A* res = nullptr;   // residual rows, pixel stride res_ps
  int64_t res_ps = 0;
  Activation act = Activation::kNone;
  bool stream = false;
};

template <typename A, int PB, int MV>
inline void lanes_block(const A* __restrict h, int64_t h_ps, int64_t h_qs, const A* __restrict w, int64_t w_qs,
                        int K, A* __restrict out, int64_t o_ps, const LaneEpilogue<A>* epi) {
  using V = Simd<A>;
  using vec = typename V::vec;
  constexpr int L = V::lanes;
  vec acc[PB][MV];
  accumulate<A, MV, PB>(h, h_ps, h_qs, w, w_qs, K, acc);
  if (epi == nullptr) {
#pragma GCC unroll 16
    for (int p = 0; p < PB; ++p)
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) V::store(out + p * o_ps + v * L, acc[p][v]);
    return;
  }
  vec bv[MV];
#pragma GCC unroll 4
  for (int v = 0; v < MV; ++v) bv[v] = epi->bias ? V::load(epi->bias + v * L) : V::zero();
#pragma GCC unroll 16
  for (int p = 0; p < PB; ++p) {
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) {
      vec o = activate_vec<A>(acc[p][v] + bv[v], epi->act);
      if (epi->res) o += V::load(epi->res + p * epi->res_ps + v * L);
      store_vec<A>(out + p * o_ps + v * L, o, epi->stream);
    }
  }
}

// All T pixels of a tile, `cols` output columns (a multiple of the vector width).
template <typename A, int T>
void lanes_tile(int64_t cols, const A* h, int64_t h_ps, int64_t h_qs, const A* w, int64_t w_qs, int K, A* out,
                int64_t o_ps, const LaneEpilogue<A>* epi) {
  constexpr int L = Simd<A>::lanes;
  LaneEpilogue<A> e;
  for (int64_t c0 = 0; c0 < cols;) {
    const bool two = cols - c0 >= 2 * L;
    if (epi) {
      e = *epi;
      if (e.bias) e.bias += c0;
      if (e.res) e.res += c0;
    }
    const LaneEpilogue<A>* ep = epi ? &e : nullptr;
    if (two) {
      constexpr int PB = std::min(T, kAccRegs >= 16 ? 8 : 4);  // 8 (AVX-512) pixels x 2 vectors = 16 accumulators
      static_assert(T % PB == 0);
      for (int p = 0; p < T; p += PB) {
        LaneEpilogue<A> ep_p;
        if (ep) {
          ep_p = *ep;
          if (ep_p.res) ep_p.res += p * ep_p.res_ps;
        }
        lanes_block<A, PB, 2>(h + p * h_ps, h_ps, h_qs, w + c0, w_qs, K, out + p * o_ps + c0, o_ps,
                              ep ? &ep_p : nullptr);
      }
      c0 += 2 * L;
    } else {
      constexpr int PB = std::min(T, kAccRegs >= 16 ? 16 : 8);  // 16 (AVX-512) pixels x 1 vector
      static_assert(T % PB == 0);
      for (int p = 0; p < T; p += PB) {
        LaneEpilogue<A> ep_p;
        if (ep) {
          ep_p = *ep;
          if (ep_p.res) ep_p.res += p * ep_p.res_ps;
        }
        lanes_block<A, PB, 1>(h + p * h_ps, h_ps, h_qs, w + c0, w_qs, K, out + p * o_ps + c0, o_ps,
                              ep ? &ep_p : nullptr);
      }
      c0 += L;
    }
  }
}

// acc[(r*o_rs + q*o_cs)*L + lane] += sum_v X[r][v*L + lane] * Y[q][v*L + lane]: the pixel
// reduction of a weight gradient, lanes kept apart. RA x RB register block.
template <typename A, int NV, int RA, int RB>
inline void outer_block(const A* __restrict x, int64_t x_rs, const A* __restrict y, int64_t y_rs, A* __restrict acc,
                        int64_t o_rs, int64_t o_cs) {
  using V = Simd<A>;
  constexpr int L = V::lanes;
  typename V::vec xv[RA][NV], yv[RB][NV];
#pragma GCC unroll 8
  for (int r = 0; r < RA; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) xv[r][v] = V::load(x + r * x_rs + v * L);
#pragma GCC unroll 8
  for (int q = 0; q < RB; ++q)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) yv[q][v] = V::load(y + q * y_rs + v * L);
#pragma GCC unroll 8
  for (int r = 0; r < RA; ++r)
#pragma GCC unroll 8
    for (int q = 0; q < RB; ++q) {
      A* o = acc + (r * o_rs + q * o_cs) * L;
      typename V::vec s = V::load(o);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) s += xv[r][v] * yv[q][v];
      V::store(o, s);
    }
}

// outer_acc's register block: RA x rows and RB y rows of NV vectors each, (RA + RB) * NV <=
// kAccRegs (24 of AVX-512's 32 registers: 4 + 2 rows at NV = 4, 4 + 4 below)
template <int NV>
constexpr int outer_x_rows() { return kAccRegs >= 24 || NV < 4 ? 4 : 2; }
template <int NV>
constexpr int outer_y_rows() { return std::clamp(kAccRegs / NV - outer_x_rows<NV>(), 1, 4); }

template <typename A, int NV, int RA>
inline void outer_row_block(int Q, const A* x, int64_t x_rs, const A* y, int64_t y_rs, A* acc, int64_t o_rs,
                            int64_t o_cs) {
  constexpr int RB = outer_y_rows<NV>();
  int q = 0;
  for (; q + RB <= Q; q += RB) outer_block<A, NV, RA, RB>(x, x_rs, y + q * y_rs, y_rs, acc + q * o_cs * Simd<A>::lanes, o_rs, o_cs);
  A* o = acc + q * o_cs * Simd<A>::lanes;
  const A* yq = y + q * y_rs;
  switch (Q - q) {
    case 1: outer_block<A, NV, RA, 1>(x, x_rs, yq, y_rs, o, o_rs, o_cs); break;
    case 2: outer_block<A, NV, RA, 2>(x, x_rs, yq, y_rs, o, o_rs, o_cs); break;
    case 3: outer_block<A, NV, RA, 3>(x, x_rs, yq, y_rs, o, o_rs, o_cs); break;
    default: break;
  }
}

// For r < R, q < Q: acc[(r*o_rs + q*o_cs)*L + lane] += sum over the tile's pixels in that lane.
template <typename A, int NV>
void outer_acc(int R, int Q, const A* x, int64_t x_rs, const A* y, int64_t y_rs, A* acc, int64_t o_rs, int64_t o_cs) {
  constexpr int L = Simd<A>::lanes;
  constexpr int RA = outer_x_rows<NV>();
  int r = 0;
  for (; r + RA <= R; r += RA) outer_row_block<A, NV, RA>(Q, x + r * x_rs, x_rs, y, y_rs, acc + r * o_rs * L, o_rs, o_cs);
  const A* xr = x + r * x_rs;
  A* o = acc + r * o_rs * L;
  switch (R - r) {
    case 1: outer_row_block<A, NV, 1>(Q, xr, x_rs, y, y_rs, o, o_rs, o_cs); break;
    case 2: outer_row_block<A, NV, 2>(Q, xr, x_rs, y, y_rs, o, o_rs, o_cs); break;
    case 3: outer_row_block<A, NV, 3>(Q, xr, x_rs, y, y_rs, o, o_rs, o_cs); break;
    default: break;
  }
}

struct SfShape {
  int64_t G, c_h, k, m, C_in, C_out;
};

// Stage 1 for narrow groups (c_h * NV <= 8 accumulators): GB groups side by side in one register
// block, so that short per-group loops (k = 4) still keep ~24 independent accumulators busy and
// the per-call overhead is paid once per GB groups. KEEP: load each b vector into a register once
// (as accumulate does in AVX-512 builds) instead of letting GCC fold it into its R FMAs. AVX-512,
// 2026-11-28, 2-core Zen 5, alternated A/B (benchmarks/results/2026-11-28-cpu-avx512/): with b the
// transposed channels_last tile (L1), 128->32@56 forward 0.83-0.89x the time; with b the NCHW input
// read in place, 1.09-1.17x, so that case keeps the folded loads.
template <typename A, int NV, int R, int GB, bool KEEP>
inline void gemm_groups_block(const A* __restrict a, int64_t a_gs, int64_t a_rs, const A* __restrict b,
                              int64_t b_gs, int64_t b_rs, int K, A* __restrict c, int64_t c_gs, int64_t c_rs) {
  using V = Simd<A>;
  using vec = typename V::vec;
  constexpr int L = V::lanes;
  vec acc[GB][R][NV];
#pragma GCC unroll 8
  for (int u = 0; u < GB; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[u][r][v] = V::zero();
  for (int q = 0; q < K; ++q) {
#pragma GCC unroll 8
    for (int u = 0; u < GB; ++u) {
      vec bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        bv[v] = V::load(b + u * b_gs + q * b_rs + v * L);
        if constexpr (KEEP) asm("" : "+v"(bv[v]));
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const A w = a[u * a_gs + r * a_rs + q];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[u][r][v] += bv[v] * w;
      }
    }
  }
#pragma GCC unroll 8
  for (int u = 0; u < GB; ++u)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) V::store(c + u * c_gs + r * c_rs + v * L, acc[u][r][v]);
}

template <typename A, int NV, int R, bool KEEP>
void gemm_groups(int64_t G, const A* a, int64_t a_gs, int64_t a_rs, const A* b, int64_t b_gs, int64_t b_rs, int K,
                 A* c, int64_t c_gs, int64_t c_rs) {
  constexpr int GB = std::max(1, kAccRegs / (R * NV));
  int64_t g = 0;
  for (; g + GB <= G; g += GB)
    gemm_groups_block<A, NV, R, GB, KEEP>(a + g * a_gs, a_gs, a_rs, b + g * b_gs, b_gs, b_rs, K, c + g * c_gs, c_gs,
                                          c_rs);
  for (; g < G; ++g)
    gemm_groups_block<A, NV, R, 1, KEEP>(a + g * a_gs, a_gs, a_rs, b + g * b_gs, b_gs, b_rs, K, c + g * c_gs, c_gs,
                                         c_rs);
}

SfShape sf_shape_of(const at::Tensor& w1, const at::Tensor& w2) {
  SfShape s;
  s.G = w1.size(0);
  s.c_h = w1.size(1);
  s.k = w1.size(2);
  s.m = w2.size(1);
  s.C_in = s.G * s.k;
  s.C_out = s.c_h * s.m;
  return s;
}

// Stage 1: hidden[j][g][0:T] = sum_i w1[g, j, i] * x[g*k + i][0:T], x rows with stride x_rs.
// in_place: x is the NCHW input itself, not a tile buffer (gemm_groups_block's KEEP).
template <typename A, int NV>
void stage1(const SfShape& s, const A* w1, const A* x, int64_t x_rs, A* hidden, bool in_place = false) {
  constexpr int T = NV * Simd<A>::lanes;
  const int k = static_cast<int>(s.k);
  const int64_t a_gs = s.c_h * s.k, b_gs = s.k * x_rs, c_rs = s.G * T;
  // AVX2 (12 accumulators) takes c_h = 3, 4 group by group too (GB = 2, 1): one call per group
  // through gemm_rows cost 5% of the forward at 128->32@56 (c_h = k = 4; 2026-11-27, alternated
  // A/B, 1 and 2 threads, both layouts: benchmarks/results/2026-11-27-cpu-avx2-5/).
  constexpr int kGroupsUpTo = kWideRegs ? kAccRegs / 3 : kAccRegs;
  const auto groups = [&](auto rows) {
    constexpr int R = decltype(rows)::value;
    if (in_place)
      gemm_groups<A, NV, R, false>(s.G, w1, a_gs, s.k, x, b_gs, x_rs, k, hidden, T, c_rs);
    else
      gemm_groups<A, NV, R, kWideRegs>(s.G, w1, a_gs, s.k, x, b_gs, x_rs, k, hidden, T, c_rs);
  };
  if (s.c_h * NV <= kGroupsUpTo && s.c_h <= 4) {
    with_run_length<4>(static_cast<int>(s.c_h), groups);
    return;
  }
  for (int64_t g = 0; g < s.G; ++g)
    gemm_rows<A, NV>(s.c_h, w1 + g * a_gs, s.k, 1, x + g * b_gs, x_rs, k, hidden + g * T, c_rs);
}

void check_sf_inputs(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                     const c10::optional<at::Tensor>& bias) {
  check_cpu(x, "x");
  check_float_dtype(x, "x");
  FALCONNET_CHECK(x.dim() == 4, "x must be a 4-D (N, C, H, W) tensor, got shape ", x.sizes());
  FALCONNET_CHECK(w1.dim() == 3, "w1 must have shape (G, c_h, k), got ", w1.sizes());
  FALCONNET_CHECK(w2.dim() == 3, "w2 must have shape (c_h, m, G), got ", w2.sizes());
  check_like(w1, x, "w1");
  check_like(w2, x, "w2");
  check_like(bias, x, "bias");
  const int64_t G = w1.size(0), c_h = w1.size(1), k = w1.size(2);
  FALCONNET_CHECK(w2.size(0) == c_h && w2.size(2) == G, "w2 must have shape (c_h=", c_h, ", m, G=", G,
                  ") to match w1 ", w1.sizes(), ", got ", w2.sizes());
  FALCONNET_CHECK(x.size(1) == G * k, "x must have C_in = G*k = ", G * k, " channels (w1 is ", w1.sizes(), "), got ",
                  x.size(1));
  const int64_t C_out = c_h * w2.size(1);
  if (bias.has_value())
    FALCONNET_CHECK(bias->dim() == 1 && bias->size(0) == C_out, "bias must have shape (", C_out, ",), got ",
                    bias->sizes());
}

// NV = vectors per tile row: 2 gives T = 32 float / 16 double pixels, enough reuse of each
// broadcast weight (2 FMAs) while R*NV accumulators stay in registers.
constexpr int kNV = 2;
// The backward's tile: twice as wide, so each lane-wise weight-gradient accumulator (in L2 once
// G*c_h*m*16 floats outgrow L1) takes 4 FMAs a load/store instead of 2.
constexpr int kNVB = 4;

// Tiles per NCHW super-tile (common.h: touch_rows): as many as keep the touched rows of `rows_a`
// + `rows_b` channels within kSuperTileBytes, so that they stay in L2 while the tiles use them.
// 0 (tile by tile) when neither tensor is NCHW, when a row's run would be shorter than
// kSuperTileMinRun bytes, or in AVX-512 builds (not measured there).
// 2-core AVX2 machine, 2026-11-27, NCHW float32, batch 16, alternated against the previous build
// (benchmarks/results/2026-11-27-cpu-avx2-5/): forward 128->32@56 1.46-1.52x -> 1.89-2.12x dense
// at 2 threads, 1.13-1.21x -> 1.55-1.88x at 1 (two runs each); the backward 1.04-1.16x ->
// 1.18-1.43x there. 64 KB and 256 KB measured
// within 5% of 128 KB; a 1-tile run (1024->256@7 at 64 KB) lost 10% to the prefetch.
constexpr int64_t kSuperTileBytes = int64_t{128} << 10;
constexpr int64_t kSuperTileMinRun = 256;
inline int64_t super_tile(int T, int64_t rows_a, int64_t rows_b, size_t elem) {
  if (kWideRegs || rows_a + rows_b == 0) return 0;
  const int64_t tiles = kSuperTileBytes / ((rows_a + rows_b) * static_cast<int64_t>(elem) * T);
  return tiles * T * static_cast<int64_t>(elem) >= kSuperTileMinRun ? tiles : 0;
}

// channels_last input tiles are prefetched this many tiles ahead, spread over the current tile's
// compute (SpreadPrefetch). AVX2 builds: 2 tiles, always. 2026-11-27, 2-core Zen 3, alternated A/B
// (median per-round ratio, benchmarks/results/2026-11-27-cpu-avx2-5/): forward 0.84-0.94x the time
// at the 56x56 and 28x28 shapes, 0.93-1.03x at 14x14 and 7x7 (1 and 2 threads); backward (x and
// grad_y) 0.87-0.94x at 32->128@56, 128->32@56 and 64->256@28, 1.02-1.04x at 256->64@28 and
// 512->128@14, within 3% elsewhere (2 threads). Distances 1-4 measured alike. A channels_last
// residual is prefetched alongside (it had the one-tile-ahead prefetch before): with a residual,
// 0.57-0.93x the time of the x-only spread at the 56x56, 28x28 and 14x14 shapes. For NCHW rows the
// same spread (C_in row pieces a tile) measured 0.93-1.06x the super-tiles' time, which stay.
// AVX-512 builds: 1 tile, where the op's tensors outgrow a quarter of the L3 (as for streaming
// stores), else the one-tile-ahead prefetch_tile. 2026-11-28, 2-core Zen 5 (AVX-512), alternated A/B
// against prefetch_tile (benchmarks/results/2026-11-28-cpu-avx512/): forward 0.64-0.69x the time
// at 128->32@56, 0.92-0.96x at 32->128@56 and 64->256@28, 0.85-1.00x at 256->64@28 (1 and 2
// threads); backward 0.87-0.93x at the 56x56 and 28x28 shapes; at 14x14 and 7x7, where the tensors
// stay in the L3, 1.00-1.05x (hence the footprint condition). Distance 2 took 1.07x distance 1's
// time at 128->32@56.
inline int64_t spread_ahead(int64_t footprint_bytes) {
  if constexpr (!kWideRegs) return 2;
  return use_streaming_stores(footprint_bytes) ? 1 : 0;
}

// Whether `tile` starts a new super-tile of its chunk (ending at `end`); if so, `touched` moves to
// the super-tile's end and q1 is its last pixel + 1.
inline bool super_tile_starts(int64_t tile, int64_t end, int64_t super, int T, int64_t P, int64_t& touched,
                              int64_t& q1) {
  if (super == 0 || tile < touched) return false;
  touched = std::min(end, tile + super);
  q1 = std::min(P, touched * T);
  return true;
}

// The tile `ahead` tiles on within the chunk: its first pixel and pixel count (0, 0 past the chunk,
// so that no pointer is formed past the tensors).
inline std::pair<int64_t, int64_t> tile_ahead(int64_t tile, int64_t ahead, int64_t end, int T, int64_t P) {
  if (tile + ahead >= end) return {0, 0};
  const int64_t q = (tile + ahead) * T;
  return {q, std::min<int64_t>(T, P - q)};
}

template <typename S>
void sf_forward_impl(const at::Tensor& x, const at::Tensor& w1c, const at::Tensor& w2c, const at::Tensor* bias,
                     const at::Tensor* residual, Activation act, at::Tensor& y, const SfShape& s) {
  using A = compute_t<S>;
  constexpr int T = kNV * Simd<A>::lanes;
  // float32/float64 NCHW tensors are read and written in place when a tile lies in one image
  // (its rows are then T contiguous pixels); other tiles go through the channel-major buffers.
  constexpr bool kInPlace = std::is_same_v<S, A>;
  const int64_t N = x.size(0), HW = x.size(2) * x.size(3), P = N * HW;
  const int64_t tiles = (P + T - 1) / T;
  const PixelView xin{s.C_in, HW, layout_of(x)}, yout{s.C_out, HW, layout_of(y)};
  PixelView rin{s.C_out, HW, Layout::kNCHW};
  if (residual) rin.layout = layout_of(*residual);
  const S* xp = x.data_ptr<S>();
  S* yp = y.data_ptr<S>();
  const S* rp = residual ? residual->data_ptr<S>() : nullptr;
  const A* w1 = w1c.data_ptr<A>();
  const A* w2 = w2c.data_ptr<A>();
  std::vector<A> bias_c;
  if (bias) {
    const at::Tensor b = bias->to(c10::CppTypeToScalarType<A>::value).contiguous();
    bias_c.assign(b.data_ptr<A>(), b.data_ptr<A>() + s.C_out);
  }
  const int64_t footprint = (x.numel() + y.numel()) * static_cast<int64_t>(sizeof(S));
  const bool stream = use_streaming_stores(footprint);
  // channels_last output without a transpose: stage 2 with lanes over output channels when m
  // fills whole vectors (and the residual, if any, is channels_last too). It pays off when the
  // output side dominates, i.e. few MACs (G) per output value; with G > 16 the pixel-lane kernel's
  // better load/FMA ratio wins over the cost of transposing the output (measured, 1 core, AVX-512).
  // AVX2 builds take it up to G = 32: 128->32@56 and 256->64@28 (G = 32, m = 8) then take 0.86-0.91x
  // and 0.89-0.96x the time (median of per-round ratios, alternated, 1 and 2 threads); at G = 64
  // (512->128@14, 1024->256@7) it lost 6-9% (2026-11-27, 2-core Zen 3;
  // benchmarks/results/2026-11-27-cpu-avx2-5/).
  constexpr int L = Simd<A>::lanes;
  constexpr int64_t kLanesMaxGroups = kWideRegs ? 16 : 32;
  const bool lanes2 = kInPlace && yout.layout == Layout::kNHWC && s.m % L == 0 && s.G <= kLanesMaxGroups &&
                      (rp == nullptr || rin.layout == Layout::kNHWC);
  // w2t (c_h, G, m): the weight rows the channel-lane kernel reads as vectors
  const at::Tensor w2t = lanes2 ? w2c.permute({0, 2, 1}).contiguous() : at::Tensor();
  // NCHW inputs (and residuals) are read a super-tile at a time (touch_rows), in AVX2 builds
  const int64_t super = super_tile(T, xin.layout == Layout::kNCHW ? s.C_in : 0,
                                   rp && rin.layout == Layout::kNCHW ? s.C_out : 0, sizeof(S));
  const int64_t ahead = spread_ahead(footprint);
  // channels_last: the input tile `ahead` tiles on is prefetched a slice at a time while this one
  // computes (slices: before stage 1 and after each hidden channel's stage 2); a channels_last
  // residual alongside (an NCHW one: super-tiles)
  const bool spread = ahead > 0 && xin.layout == Layout::kNHWC;
  const bool spread_r = spread && rp && rin.layout == Layout::kNHWC;
  parallel_dynamic(tiles, [&](const auto& grab) {
    std::vector<A> xt(s.C_in * T), hidden(s.G * s.c_h * T), out(s.C_out * T), res;
    if (rp) res.resize(s.C_out * T);
    int64_t begin = 0, end = 0, touched = 0, q1 = 0;
    SpreadPrefetch pf, pf_r;
    while (grab(begin, end)) for (int64_t tile = begin; tile < end; ++tile) {
      if (super_tile_starts(tile, end, super, T, P, touched, q1)) {
        if (xin.layout == Layout::kNCHW) touch_rows(xp, xin, tile * T, q1);
        if (rp && rin.layout == Layout::kNCHW) touch_rows(rp, rin, tile * T, q1);
      }
      if (spread) {
        const auto [q, n_px] = tile_ahead(tile, ahead, end, T, P);
        pf.start(xp + q * s.C_in, n_px * s.C_in * static_cast<int64_t>(sizeof(S)), s.c_h + 1);
        if (spread_r) pf_r.start(rp + q * s.C_out, n_px * s.C_out * static_cast<int64_t>(sizeof(S)), s.c_h + 1);
        pf.step();
        pf_r.step();
      }
      // the first `ahead` tiles of a chunk were not prefetched: touched in load_tile
      const bool touch = !spread || tile < begin + ahead;
      if (!super && !spread && tile + 1 < end) {
        const int64_t p1 = (tile + 1) * T;
        prefetch_tile(xp, xin, p1, static_cast<int>(std::min<int64_t>(T, P - p1)));
        if (rp) prefetch_tile(rp, rin, p1, static_cast<int>(std::min<int64_t>(T, P - p1)));
      }
      const int64_t p0 = tile * T;
      const int count = static_cast<int>(std::min<int64_t>(T, P - p0));
      if (lanes2 && count == T) {
        load_tile(xp, xin, p0, count, xt.data(), T, touch);
        stage1<A, kNV>(s, w1, xt.data(), T, hidden.data());
        LaneEpilogue<A> epi;
        epi.bias = bias ? bias_c.data() : nullptr;
        epi.act = act;
        epi.stream = stream;
        if (rp) {
          epi.res = reinterpret_cast<const A*>(rp) + p0 * s.C_out;
          epi.res_ps = s.C_out;
        }
        A* yrow = reinterpret_cast<A*>(yp) + p0 * s.C_out;
        const A* w2tp = w2t.data_ptr<A>();
        for (int64_t j = 0; j < s.c_h; ++j) {
          LaneEpilogue<A> ej = epi;
          if (ej.bias) ej.bias += j * s.m;
          if (ej.res) ej.res += j * s.m;
          lanes_tile<A, T>(s.m, hidden.data() + j * s.G * T, 1, T, w2tp + j * s.G * s.m, s.m, s.G,
                           yrow + j * s.m, s.C_out, &ej);
          if (spread) pf.step(), pf_r.step();
        }
        continue;
      }
      const int64_t n0 = p0 / HW, hw0 = p0 % HW;
      const bool one_image = count == T && hw0 + T <= HW;
      auto in_place = [&](const PixelView& v) { return kInPlace && one_image && v.layout == Layout::kNCHW; };

      const A* xin_rows = xt.data();
      int64_t x_rs = T;
      if (in_place(xin)) {
        xin_rows = reinterpret_cast<const A*>(xp) + n0 * s.C_in * HW + hw0;
        x_rs = HW;
      } else {
        load_tile(xp, xin, p0, count, xt.data(), T, touch);
      }
      stage1<A, kNV>(s, w1, xin_rows, x_rs, hidden.data(), xin_rows != xt.data());

      Epilogue<A> epi;
      epi.bias = bias ? bias_c.data() : nullptr;
      epi.act = act;
      if (rp) {
        if (in_place(rin)) {
          epi.res = reinterpret_cast<const A*>(rp) + n0 * s.C_out * HW + hw0;
          epi.res_rs = HW;
        } else {
          load_tile(rp, rin, p0, count, res.data(), T);
          epi.res = res.data();
          epi.res_rs = T;
        }
      }
      const bool out_in_place = in_place(yout);
      A* out_rows = out_in_place ? reinterpret_cast<A*>(yp) + n0 * s.C_out * HW + hw0 : out.data();
      const int64_t o_rs = out_in_place ? HW : T;
      epi.stream = stream && out_in_place;
      for (int64_t j = 0; j < s.c_h; ++j) {
        const Epilogue<A> ej = epi.rows_from(j * s.m);
        gemm_rows<A, kNV>(s.m, w2 + j * s.m * s.G, s.G, 1, hidden.data() + j * s.G * T, T, s.G,
                          out_rows + j * s.m * o_rs, o_rs, &ej);
        if (spread) pf.step(), pf_r.step();
      }
      if (!out_in_place) store_tile(yp, yout, p0, count, out.data(), T, stream);
    }
    if (stream) stream_fence();
  });
}

at::Tensor sf_conv_forward_cpu(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
                               const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual_in,
                               c10::string_view activation) {
  check_sf_inputs(x_in, w1, w2, bias);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const SfShape s = sf_shape_of(w1, w2);
  const at::Tensor x = collapsible(x_in);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  c10::optional<at::Tensor> residual;
  if (residual_in.has_value()) {
    check_like(residual_in, x, "residual");
    FALCONNET_CHECK(residual_in->sizes() == at::IntArrayRef({N, s.C_out, H, W}), "residual must have the output's shape (",
                    N, ", ", s.C_out, ", ", H, ", ", W, "), got ", residual_in->sizes());
    residual = collapsible(*residual_in);
  }
  at::Tensor y = at::empty({N, s.C_out, H, W}, x.options().memory_format(output_format(x_in)));
  if (y.numel() == 0) return y;
  const at::Tensor w1c = weight_in_compute_type(w1), w2c = weight_in_compute_type(w2);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "sf_conv_forward_cpu", [&] {
    sf_forward_impl<scalar_t>(x, w1c, w2c, bias ? &*bias : nullptr, residual ? &*residual : nullptr, act, y, s);
  });
  return y;
}

template <typename S>
void sf_backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& w1c, const at::Tensor& w2c,
                      const at::Tensor* bias, Activation act, at::Tensor& grad_x, at::Tensor& gw1_out,
                      at::Tensor& gw2_out, at::Tensor& gb_out, const SfShape& s) {
  using A = compute_t<S>;
  constexpr int L = Simd<A>::lanes;
  constexpr int T = kNVB * L;
  const int64_t N = x.size(0), HW = x.size(2) * x.size(3), P = N * HW;
  const int64_t tiles = (P + T - 1) / T;
  const PixelView xin{s.C_in, HW, layout_of(x)}, gyin{s.C_out, HW, layout_of(grad_y)},
      gxout{s.C_in, HW, layout_of(grad_x)};
  const S* xp = x.data_ptr<S>();
  const S* gyp = grad_y.data_ptr<S>();
  S* gxp = grad_x.data_ptr<S>();
  const A* w1 = w1c.data_ptr<A>();
  const A* w2 = w2c.data_ptr<A>();
  std::vector<A> bias_c(s.C_out, A(0));
  if (bias) {
    const at::Tensor b = bias->to(c10::CppTypeToScalarType<A>::value).contiguous();
    std::copy(b.data_ptr<A>(), b.data_ptr<A>() + s.C_out, bias_c.begin());
  }
  const int64_t n_w1 = s.G * s.c_h * s.k, n_w2 = s.c_h * s.m * s.G;
  // Reduced weight gradients (compute type), summed over the threads' partial results.
  std::vector<A> gw1(n_w1, A(0)), gw2(n_w2, A(0)), gb(s.C_out, A(0));
  std::mutex merge;
  const int64_t super = super_tile(T, xin.layout == Layout::kNCHW ? s.C_in : 0,
                                   gyin.layout == Layout::kNCHW ? s.C_out : 0, sizeof(S));
  const int64_t ahead = spread_ahead((2 * x.numel() + grad_y.numel()) * static_cast<int64_t>(sizeof(S)));
  // channels_last x and grad_y `ahead` tiles on, prefetched a slice at a time (as the forward)
  const bool spread_x = ahead > 0 && xin.layout == Layout::kNHWC;
  const bool spread_gy = ahead > 0 && gyin.layout == Layout::kNHWC;
  parallel_dynamic(tiles, [&](const auto& grab) {
    std::vector<A> xt(s.C_in * T), hidden(s.G * s.c_h * T), gz(s.C_out * T), z, ghid(s.G * s.c_h * T),
        gxt(s.C_in * T);
    if (act != Activation::kNone) z.resize(s.C_out * T);
    // Lane-wise partial sums: [weight index][lane].
    std::vector<A> acc_w1(n_w1 * L, A(0)), acc_w2(n_w2 * L, A(0)), acc_b(s.C_out * T, A(0));
    int64_t begin = 0, end = 0, touched = 0, q1 = 0;
    SpreadPrefetch pf_x, pf_gy;
    auto pf_step = [&] {
      pf_x.step();
      pf_gy.step();
    };
    while (grab(begin, end)) for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t p0 = tile * T;
      const int count = static_cast<int>(std::min<int64_t>(T, P - p0));
      if (super_tile_starts(tile, end, super, T, P, touched, q1)) {
        if (xin.layout == Layout::kNCHW) touch_rows(xp, xin, p0, q1);
        if (gyin.layout == Layout::kNCHW) touch_rows(gyp, gyin, p0, q1);
      }
      if (spread_x || spread_gy) {
        const auto [q, n_px] = tile_ahead(tile, ahead, end, T, P);
        const int64_t slices = 2 * s.c_h + 1;
        pf_x.start(xp + q * s.C_in, spread_x ? n_px * s.C_in * static_cast<int64_t>(sizeof(S)) : 0, slices);
        pf_gy.start(gyp + q * s.C_out, spread_gy ? n_px * s.C_out * static_cast<int64_t>(sizeof(S)) : 0, slices);
      }
      pf_step();
      const bool cold = tile < begin + ahead;  // not prefetched: touched in load_tile
      load_tile(xp, xin, p0, count, xt.data(), T, !spread_x || cold);
      // zero beyond count: padded pixels add nothing
      load_tile(gyp, gyin, p0, count, gz.data(), T, !spread_gy || cold);
      stage1<A, kNVB>(s, w1, xt.data(), T, hidden.data());
      if (act != Activation::kNone) {
        for (int64_t j = 0; j < s.c_h; ++j)
          gemm_rows<A, kNVB>(s.m, w2 + j * s.m * s.G, s.G, 1, hidden.data() + j * s.G * T, T, s.G,
                            z.data() + j * s.m * T, T);
        for (int64_t c = 0; c < s.C_out; ++c) {
          const A b = bias_c[c];
          A* gr = gz.data() + c * T;
          const A* zr = z.data() + c * T;
          for (int p = 0; p < T; ++p) gr[p] *= activation_mask(zr[p] + b, act);
        }
      }
      for (int64_t c = 0; c < s.C_out * T; ++c) acc_b[c] += gz[c];
      // grad_w2[j, t, g] += sum_p gz[j*m + t][p] * hidden[j][g][p]
      for (int64_t j = 0; j < s.c_h; ++j) {
        outer_acc<A, kNVB>(s.m, s.G, gz.data() + j * s.m * T, T, hidden.data() + j * s.G * T, T,
                          acc_w2.data() + j * s.m * s.G * L, s.G, 1);
        pf_step();
      }
      // grad_hidden[j][g] = sum_t w2[j, t, g] * gz[j*m + t]
      for (int64_t j = 0; j < s.c_h; ++j) {
        gemm_rows<A, kNVB>(s.G, w2 + j * s.m * s.G, 1, s.G, gz.data() + j * s.m * T, T, s.m,
                          ghid.data() + j * s.G * T, T);
        pf_step();
      }
      // grad_w1[g, j, i] += sum_p grad_hidden[j][g][p] * x[g*k + i][p]
      for (int64_t g = 0; g < s.G; ++g)
        outer_acc<A, kNVB>(s.c_h, s.k, ghid.data() + g * T, s.G * T, xt.data() + g * s.k * T, T,
                          acc_w1.data() + g * s.c_h * s.k * L, s.k, 1);
      // grad_x[g*k + i] = sum_j w1[g, j, i] * grad_hidden[j][g]
      for (int64_t g = 0; g < s.G; ++g)
        gemm_rows<A, kNVB>(s.k, w1 + g * s.c_h * s.k, 1, s.k, ghid.data() + g * T, s.G * T, s.c_h,
                          gxt.data() + g * s.k * T, T);
      store_tile(gxp, gxout, p0, count, gxt.data(), T);
    }
    std::vector<A> part_w1(n_w1), part_w2(n_w2), part_b(s.C_out);
    for (int64_t i = 0; i < n_w1; ++i) part_w1[i] = Simd<A>::sum(Simd<A>::load(acc_w1.data() + i * L));
    for (int64_t i = 0; i < n_w2; ++i) part_w2[i] = Simd<A>::sum(Simd<A>::load(acc_w2.data() + i * L));
    for (int64_t c = 0; c < s.C_out; ++c) {
      A t = 0;
      for (int p = 0; p < T; ++p) t += acc_b[c * T + p];
      part_b[c] = t;
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t i = 0; i < n_w1; ++i) gw1[i] += part_w1[i];
    for (int64_t i = 0; i < n_w2; ++i) gw2[i] += part_w2[i];
    for (int64_t c = 0; c < s.C_out; ++c) gb[c] += part_b[c];
  });
  auto to_out = [](const std::vector<A>& v, at::Tensor& out) {
    at::Tensor t = at::from_blob(const_cast<A*>(v.data()), {static_cast<int64_t>(v.size())},
                                 at::TensorOptions().dtype(c10::CppTypeToScalarType<A>::value));
    out.view({-1}).copy_(t);
  };
  to_out(gw1, gw1_out);
  to_out(gw2, gw2_out);
  to_out(gb, gb_out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sf_conv_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  check_sf_inputs(x_in, w1, w2, bias);
  const Activation act = parse_activation(std::string_view(activation.data(), activation.size()));
  const SfShape s = sf_shape_of(w1, w2);
  const at::Tensor x = collapsible(x_in);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  check_cpu(grad_y_in, "grad_y");
  FALCONNET_CHECK(grad_y_in.scalar_type() == x.scalar_type(), "grad_y must have the same dtype as x (", x.scalar_type(),
                  "), got ", grad_y_in.scalar_type());
  FALCONNET_CHECK(grad_y_in.sizes() == at::IntArrayRef({N, s.C_out, H, W}), "grad_y must have the output's shape (", N,
                  ", ", s.C_out, ", ", H, ", ", W, "), got ", grad_y_in.sizes());
  const at::Tensor grad_y = collapsible(grad_y_in);
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(output_format(x_in)));
  at::Tensor gw1 = at::zeros(w1.sizes(), w1.options());
  at::Tensor gw2 = at::zeros(w2.sizes(), w2.options());
  at::Tensor gb = at::zeros({s.C_out}, w2.options());
  if (N * H * W == 0) return {grad_x, gw1, gw2, gb};
  const at::Tensor w1c = weight_in_compute_type(w1), w2c = weight_in_compute_type(w2);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "sf_conv_backward_cpu", [&] {
    sf_backward_impl<scalar_t>(grad_y, x, w1c, w2c, bias ? &*bias : nullptr, act, grad_x, gw1, gw2, gb, s);
  });
  return {grad_x, gw1, gw2, gb};
}

}  // namespace
}  // namespace falconnet::cpu

TORCH_LIBRARY_IMPL(falconnet_C, CPU, m) {
  m.impl("sf_conv_forward", &falconnet::cpu::sf_conv_forward_cpu);
  m.impl("sf_conv_backward", &falconnet::cpu::sf_conv_backward_cpu);
}
