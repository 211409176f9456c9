// SF-Conv pair on CUDA: y = act(sf(x; w1, w2) + bias) + residual, and its backward.
//
// Definition (falconnet_kernels/reference.py, SPEC section 4), per pixel p:
//   H[g, j]     = sum_i w1[g, j, i] * x[g*k + i]         w1: (G, c_h, k)   stage 1
//   z[j*m + t]  = sum_g w2[j, t, g] * H[g, j]            w2: (c_h, m, G)   stage 2
//   y           = act(z + bias) + residual
//
// The two numbers, for P pixels and element size s bytes:
//   forward:  FLOPs 2*P*(C_in*c_h + C_out*G);  minimum bytes P*(C_in + C_out)*s (+ P*C_out*s with
//             a residual). Per pixel in bf16: 256 -> 64 is 8192 FLOP against 640 bytes, 12.8
//             FLOP/byte; an H100 does ~20 fp32-FMA FLOP per byte of HBM (67 TFLOP/s, 3.35 TB/s),
//             so the default configs are memory-bound on CUDA cores except 512 -> 128 (19.2
//             FLOP/byte) and 1024 -> 256 (25.6), which sit at the FMA roofline.
//   backward: FLOPs 4*P*(C_in*c_h + C_out*G) for grad_x and the hidden gradients, 2*P*C_in*C_out
//             for the dense weight gradient D on tensor cores (below), +2*P*(C_in*c_h + C_out*G)
//             to recompute z for a mask; minimum bytes P*(2*C_in + C_out)*s (read x, grad_y;
//             write grad_x). This design moves P*(2*C_in + 2*C_out)*s without an activation
//             (grad_y is read twice: by the grad_x kernel and by the GEMM), and P*(C_in +
//             2*C_out)*s more with one (the mask pass reads x and grad_y, writes grad_z).
//
// Forward design (sf_conv_forward_tiled):
// - Persistent grid, one block of 256 threads per slot. Each block stages w1 and w2 in shared
//   memory once, as float32 (w2 transposed to [g][j][t] so that a thread's m weights are one
//   16-byte row), and then loops over pixel tiles. Weights are <= ~33K values, so this is
//   paid once per block instead of once per tile.
// - The x tile is loaded with 16-byte cp.async copies (channels_last: a tile of pixels is one
//   contiguous run of memory, so the loads are perfectly coalesced); with two buffers the next
//   tile is in flight while the current one is computed.
// - Compute: a warp owns (32*PX pixels, JX hidden channels j). Lanes are pixels, so every weight
//   read from shared memory is a warp-wide broadcast (one wavefront), and rows are padded by 16
//   bytes so the per-lane x reads are conflict-free. For each window g a thread computes its
//   PX*JX hidden values H[g, j] in registers and immediately accumulates them into PX*JX*m
//   outputs (stage 2 is a sum over g), so the hidden tensor never exists anywhere in full,
//   not even in shared memory. Register tiling (PX pixels share each weight, JX channels share
//   each x value) keeps shared-memory traffic at or under the FMA rate.
// - Epilogue: bias and activation in registers, then the tile goes through shared memory so
//   that the global stores (and the residual loads) are 16-byte and coalesced as well.
// - k and m are template parameters (register arrays need compile-time sizes): the 8 default
//   FalconNet configs use (k, m) in {(4,8), (8,8), (8,16), (16,16), (16,32), (32,32)}. Any other
//   config, or one whose weights do not fit in shared memory, runs sf_conv_forward_generic
//   (one thread per (pixel, j), weights read through L1) - correct for every valid shape.
//
// Backward design (three launches):
//   1. grad_z = grad_y * act'(z + bias): the forward kernel with a "mask" epilogue (z is
//      recomputed on chip, never stored); skipped when the activation is "none" (grad_z = grad_y).
//   2. grad_x: the transpose of an SF-Conv pair is again an SF-Conv pair, with G' = c_h windows of
//      k' = m channels, c_h' = G, m' = k, w1'[j, g, t] = w2[j, t, g], w2'[g, i, j] = w1[g, j, i]:
//      the same fast forward kernel computes it, hidden grad_H on chip.
//   3. grad_w1, grad_w2, grad_bias from D = grad_z^T x, the gradient of the dense equivalent
//      weight: one tensor-core GEMM over the pixels (cuBLAS), then two tiny contractions with
//      the weights (see weight_grads for the algebra and why).
//   D and the contractions are float32; the weight gradients are rounded to the dtype once.
//
// All arithmetic is float32 whatever the storage dtype.

#include "common.cuh"

#include <torch/library.h>

#include <algorithm>

namespace falconnet_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct SfShape {
  int64_t n_img;  // images; 1 for channels_last (all pixels form one contiguous run)
  int64_t hw;     // pixels per image; N*H*W for channels_last
  int C_in, C_out, G, ch, k, m;
  bool channels_last;

  __host__ __device__ int64_t pixels() const { return n_img * hw; }
  // Element offset of channel c of pixel p (p counts over n_img*hw) in a tensor of C channels.
  __host__ __device__ int64_t offset(int64_t p, int c, int C) const {
    if (channels_last) return p * C + c;
    const int64_t n = p / hw;
    return (n * C + c) * hw + (p - n * hw);
  }
};

SfShape make_shape(const at::Tensor& x, int64_t G, int64_t ch, int64_t k, int64_t m, bool cl) {
  SfShape s;
  const int64_t N = x.size(0), HW = x.size(2) * x.size(3);
  s.n_img = cl ? 1 : N;
  s.hw = cl ? N * HW : HW;
  s.C_in = static_cast<int>(G * k);
  s.C_out = static_cast<int>(ch * m);
  s.G = static_cast<int>(G);
  s.ch = static_cast<int>(ch);
  s.k = static_cast<int>(k);
  s.m = static_cast<int>(m);
  s.channels_last = cl;
  return s;
}

// Tiles never cross images, so an NCHW tile is TP contiguous pixels of each channel plane.
struct TileInfo {
  int64_t first_pixel;
  int count;
};

__device__ __forceinline__ TileInfo tile_info(const SfShape& s, int64_t tile, int tp) {
  const int64_t tiles_per_img = (s.hw + tp - 1) / tp;
  const int64_t n = tile / tiles_per_img;
  const int64_t s0 = (tile - n * tiles_per_img) * tp;
  TileInfo t;
  t.first_pixel = n * s.hw + s0;
  const int64_t left = s.hw - s0;
  t.count = static_cast<int>(left < tp ? left : tp);
  return t;
}

inline int64_t num_tiles(const SfShape& s, int tp) { return s.n_img * ((s.hw + tp - 1) / tp); }

// Round a byte count up to 16 so every shared-memory region starts 16-byte aligned.
__host__ __device__ inline size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// Row pitch (elements) of a shared tile of C values per pixel: an odd number of 16-byte units,
// so that the 8 lanes of a 128-byte wavefront reading 16 bytes from consecutive rows hit
// distinct banks.
template <typename T>
__host__ __device__ inline int padded_pitch(int C) {
  const int vec = 16 / static_cast<int>(sizeof(T));
  const int units = (C + vec - 1) / vec;
  return (units % 2 == 0 ? units + 1 : units) * vec;
}

// Load N consecutive T from shared memory into floats, with the widest aligned accesses.
template <typename T, int N>
__device__ __forceinline__ void load_row(const T* p, float* out) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int V = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < N / V; ++v) {
      const Vec16<T> r = load_vec16(p + v * V);
#pragma unroll
      for (int e = 0; e < V; ++e) out[v * V + e] = to_float(r.v[e]);
    }
  } else if constexpr (kBytes % 8 == 0 && sizeof(T) == 2) {
#pragma unroll
    for (int v = 0; v < N / 4; ++v) {
      const uint2 r = *reinterpret_cast<const uint2*>(p + v * 4);
      const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
      for (int q = 0; q < 4; ++q) out[v * 4 + q] = to_float(e[q]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) out[e] = to_float(p[e]);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward, tiled fast path.

// (row, column) of the flat index e = threadIdx.x + n*kThreads in rows of `cols` entries,
// advanced without a division per step (the tile loops run once per 16 bytes).
struct RowWalk {
  int r, c, cols, dr, dc;
  __device__ __forceinline__ explicit RowWalk(int cols_) : cols(cols_) {
    r = threadIdx.x / cols;
    c = threadIdx.x - r * cols;
    dr = kThreads / cols;
    dc = kThreads - dr * cols;
  }
  __device__ __forceinline__ void step() {
    r += dr;
    c += dc;
    if (c >= cols) {
      c -= cols;
      ++r;
    }
  }
};

// Epilogue combination with a second tensor of y's shape:
//   kCombineAdd: y = act(z + bias) + residual                (the forward op)
//   kCombineMul: y = act'(z + bias) * grad_y  (mask_mode)    (grad_z of the backward; exact,
//                                                             the mask being 0 or 1)
enum Combine : int { kCombineAdd = 0, kCombineMul = 1 };

template <typename T>
__device__ __forceinline__ float combine_with(float v, float other, int combine) {
  return combine == kCombineMul ? v * other : v + other;
}

template <typename T>
struct FwdArgs {
  const T* x;
  // Weights in their own dtype and strides (the backward passes permuted views): w1[g, j, i] at
  // w1 + g*w1s[0] + j*w1s[1] + i*w1s[2], w2[j, t, g] likewise. Converting and re-laying them out
  // inside the kernel saves the small host-side conversion kernels, which at the 7x7 shapes
  // would cost as much as the op.
  const T* w1;
  const T* w2;
  int64_t w1s[3], w2s[3];
  const T* bias;  // (C_out,) or nullptr
  const T* other;     // like y, or nullptr: the residual (kCombineAdd) or grad_y (kCombineMul)
  T* y;
  SfShape s;
  int act;
  int combine;        // how `other` joins the result: kCombineAdd or kCombineMul
  bool mask_mode;     // epilogue emits act'(z + bias) instead of act(z + bias): y = grad_z
  int tp;        // pixels per tile
  int nbuf;      // x buffers (2: double-buffered cp.async)
  bool vec_io;   // channels_last with 16-byte aligned rows: cp.async and 16-byte stores
  int64_t tiles;
};

template <typename T>
__device__ __forceinline__ void fwd_load_tile(const FwdArgs<T>& a, const TileInfo& t, T* xs, int ldx) {
  const SfShape& s = a.s;
  if (a.vec_io) {
    constexpr int V = Vec16<T>::kSize;
    const int per_row = s.C_in / V;
    const int total = t.count * per_row;
    const T* src = a.x + t.first_pixel * s.C_in;
    RowWalk w(per_row);
    for (int e = threadIdx.x; e < total; e += kThreads, w.step()) cp_async16(xs + w.r * ldx + w.c * V, src + static_cast<int64_t>(e) * V);
  } else if (s.channels_last) {
    const int total = t.count * s.C_in;
    const T* src = a.x + t.first_pixel * s.C_in;
    for (int e = threadIdx.x; e < total; e += kThreads) {
      const int r = e / s.C_in;
      xs[r * ldx + (e - r * s.C_in)] = src[e];
    }
  } else {
    // NCHW: threads walk along pixels of one channel plane (coalesced), transposing into rows.
    const int total = t.count * s.C_in;
    for (int e = threadIdx.x; e < total; e += kThreads) {
      const int c = e / t.count;
      const int r = e - c * t.count;
      xs[r * ldx + c] = a.x[s.offset(t.first_pixel + r, c, s.C_in)];
    }
  }
}

template <typename T>
__device__ __forceinline__ void fwd_store_tile(const FwdArgs<T>& a, const TileInfo& t, const T* ys, int ldy) {
  const SfShape& s = a.s;
  if (a.vec_io) {
    constexpr int V = Vec16<T>::kSize;
    const int per_row = s.C_out / V;
    const int total = t.count * per_row;
    const int64_t base = t.first_pixel * s.C_out;
    RowWalk w(per_row);
    for (int e = threadIdx.x; e < total; e += kThreads, w.step()) {
      Vec16<T> v = load_vec16(ys + w.r * ldy + w.c * V);
      if (a.other != nullptr) {
        const Vec16<T> o = load_vec16(a.other + base + static_cast<int64_t>(e) * V);
#pragma unroll
        for (int q = 0; q < V; ++q) v.v[q] = from_float<T>(combine_with<T>(to_float(v.v[q]), to_float(o.v[q]), a.combine));
      }
      store_vec16(a.y + base + static_cast<int64_t>(e) * V, v);
    }
  } else {
    const int total = t.count * s.C_out;
    for (int e = threadIdx.x; e < total; e += kThreads) {
      int r, c;
      if (s.channels_last) {
        r = e / s.C_out;
        c = e - r * s.C_out;
      } else {
        c = e / t.count;
        r = e - c * t.count;
      }
      const int64_t off = s.offset(t.first_pixel + r, c, s.C_out);
      T v = ys[r * ldy + c];
      if (a.other != nullptr) v = from_float<T>(combine_with<T>(to_float(v), to_float(a.other[off]), a.combine));
      a.y[off] = v;
    }
  }
}

// K = k, M = m; JX hidden channels and PX pixels (32 apart) per thread.
// Register cap 128 (2 blocks of 256 threads per SM): the memory-bound configs fit two blocks
// in shared memory and want them; ptxas picks the same cap unasked for most instantiations.
template <typename T, int K, int M, int JX, int PX>
__global__ void __launch_bounds__(kThreads, 2) sf_conv_forward_tiled(const FwdArgs<T> a) {
  extern __shared__ float4 smem_f4[];
  const SfShape& s = a.s;
  const int G = s.G, ch = s.ch;
  float* w1s = reinterpret_cast<float*>(smem_f4);
  float* w2s = w1s + G * ch * K;
  float* bs = w2s + G * ch * M;
  const int ldx = padded_pitch<T>(s.C_in);
  const int ldy = padded_pitch<T>(s.C_out);
  char* tile_base = reinterpret_cast<char*>(bs) + round16(sizeof(float) * s.C_out);
  const size_t x_bytes = round16(sizeof(T) * a.tp * ldx);
  T* ys = reinterpret_cast<T*>(tile_base + a.nbuf * x_bytes);

  // Stage the weights once per block as float32: w1s[g][j][i] = w1[g, j, i] and
  // w2s[g][j][t] = w2[j, t, g] (transposed so a thread's m weights are contiguous). Both loops
  // walk the weights in their logical order, which is memory order for the forward's contiguous
  // weights: coalesced reads, scattered shared-memory writes.
  for (int e = threadIdx.x; e < G * ch * K; e += kThreads) {
    const int gj = e / K, i = e - gj * K;
    const int g = gj / ch, j = gj - g * ch;
    w1s[e] = to_float(a.w1[g * a.w1s[0] + j * a.w1s[1] + i * a.w1s[2]]);
  }
  for (int e = threadIdx.x; e < G * ch * M; e += kThreads) {
    const int jt = e / G, g = e - jt * G;
    const int j = jt / M, t = jt - j * M;
    w2s[(g * ch + j) * M + t] = to_float(a.w2[j * a.w2s[0] + t * a.w2s[1] + g * a.w2s[2]]);
  }
  for (int e = threadIdx.x; e < s.C_out; e += kThreads) bs[e] = a.bias != nullptr ? to_float(a.bias[e]) : 0.f;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int jgroups = ch / JX;
  const int items = jgroups * (a.tp / (32 * PX));

  int64_t tile = blockIdx.x;
  if (tile < a.tiles) fwd_load_tile(a, tile_info(s, tile, a.tp), reinterpret_cast<T*>(tile_base), ldx);
  cp_async_commit();
  for (int it = 0; tile < a.tiles; tile += gridDim.x, ++it) {
    const int cur = a.nbuf == 2 ? (it & 1) : 0;
    const int64_t next = tile + gridDim.x;
    if (a.nbuf == 2) {
      if (next < a.tiles)
        fwd_load_tile(a, tile_info(s, next, a.tp), reinterpret_cast<T*>(tile_base + (cur ^ 1) * x_bytes), ldx);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // x tile (and, on the first pass, the weights) visible to all

    const T* xs = reinterpret_cast<const T*>(tile_base + cur * x_bytes);
    for (int item = warp; item < items; item += kWarps) {
      const int j0 = (item % jgroups) * JX;
      const int row0 = (item / jgroups) * 32 * PX + lane;
      float acc[PX][JX][M];
#pragma unroll
      for (int q = 0; q < PX; ++q)
#pragma unroll
        for (int jj = 0; jj < JX; ++jj)
#pragma unroll
          for (int t = 0; t < M; ++t) acc[q][jj][t] = 0.f;

      for (int g = 0; g < G; ++g) {
        float xv[PX][K];
#pragma unroll
        for (int q = 0; q < PX; ++q) load_row<T, K>(xs + (row0 + 32 * q) * ldx + g * K, xv[q]);
        float h[PX][JX];
        const float* w1g = w1s + (g * ch + j0) * K;
#pragma unroll
        for (int jj = 0; jj < JX; ++jj) {
#pragma unroll
          for (int q = 0; q < PX; ++q) h[q][jj] = 0.f;
#pragma unroll
          for (int i = 0; i < K; i += 4) {
            const float4 w = *reinterpret_cast<const float4*>(w1g + jj * K + i);
#pragma unroll
            for (int q = 0; q < PX; ++q) {
              h[q][jj] = fmaf(w.x, xv[q][i], h[q][jj]);
              h[q][jj] = fmaf(w.y, xv[q][i + 1], h[q][jj]);
              h[q][jj] = fmaf(w.z, xv[q][i + 2], h[q][jj]);
              h[q][jj] = fmaf(w.w, xv[q][i + 3], h[q][jj]);
            }
          }
        }
        const float* w2g = w2s + (g * ch + j0) * M;
#pragma unroll
        for (int jj = 0; jj < JX; ++jj) {
#pragma unroll
          for (int t = 0; t < M; t += 4) {
            const float4 w = *reinterpret_cast<const float4*>(w2g + jj * M + t);
#pragma unroll
            for (int q = 0; q < PX; ++q) {
              acc[q][jj][t] = fmaf(w.x, h[q][jj], acc[q][jj][t]);
              acc[q][jj][t + 1] = fmaf(w.y, h[q][jj], acc[q][jj][t + 1]);
              acc[q][jj][t + 2] = fmaf(w.z, h[q][jj], acc[q][jj][t + 2]);
              acc[q][jj][t + 3] = fmaf(w.w, h[q][jj], acc[q][jj][t + 3]);
            }
          }
        }
      }

      // Epilogue: bias, activation, round to T, stage the row segment in shared memory.
      constexpr int V = Vec16<T>::kSize;
#pragma unroll
      for (int q = 0; q < PX; ++q) {
        T* yrow = ys + (row0 + 32 * q) * ldy;
#pragma unroll
        for (int jj = 0; jj < JX; ++jj) {
          const int c0 = (j0 + jj) * M;
          T out[M];
#pragma unroll
          for (int t = 0; t < M; ++t) {
            const float zb = acc[q][jj][t] + bs[c0 + t];
            out[t] = from_float<T>(a.mask_mode ? activation_mask(zb, a.act) : apply_activation(zb, a.act));
          }
          if constexpr (M % V == 0) {
#pragma unroll
            for (int t = 0; t < M; t += V) {
              Vec16<T> v;
#pragma unroll
              for (int e = 0; e < V; ++e) v.v[e] = out[t + e];
              store_vec16(yrow + c0 + t, v);
            }
          } else {
#pragma unroll
            for (int t = 0; t < M; ++t) yrow[c0 + t] = out[t];
          }
        }
      }
    }
    __syncthreads();  // y tile complete; x buffer `cur` free
    if (a.nbuf == 1) {
      if (next < a.tiles) fwd_load_tile(a, tile_info(s, next, a.tp), reinterpret_cast<T*>(tile_base), ldx);
      cp_async_commit();
    }
    fwd_store_tile(a, tile_info(s, tile, a.tp), ys, ldy);
  }
  cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// Forward, generic path: any (k, m), weights read through L1. One thread per (pixel, j); the m
// outputs of that j are produced 32 at a time (stage 1 is recomputed per chunk when m > 32).

template <typename T>
__global__ void __launch_bounds__(kThreads) sf_conv_forward_generic(const FwdArgs<T> a) {
  const SfShape& s = a.s;
  const int64_t P = s.pixels();
  const int64_t items = P * s.ch;
  for (int64_t item = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; item < items;
       item += static_cast<int64_t>(gridDim.x) * kThreads) {
    // Lanes are consecutive pixels of one j: weight loads are warp-uniform.
    const int j = static_cast<int>(item / P);
    const int64_t p = item - j * P;
    for (int t0 = 0; t0 < s.m; t0 += 32) {
      float acc[32];
#pragma unroll
      for (int t = 0; t < 32; ++t) acc[t] = 0.f;
      for (int g = 0; g < s.G; ++g) {
        const T* w1g = a.w1 + g * a.w1s[0] + j * a.w1s[1];
        float h = 0.f;
        for (int i = 0; i < s.k; ++i)
          h = fmaf(to_float(w1g[i * a.w1s[2]]), to_float(a.x[s.offset(p, g * s.k + i, s.C_in)]), h);
        const T* w2g = a.w2 + j * a.w2s[0] + t0 * a.w2s[1] + g * a.w2s[2];
#pragma unroll
        for (int t = 0; t < 32; ++t)
          if (t0 + t < s.m) acc[t] = fmaf(to_float(w2g[t * a.w2s[1]]), h, acc[t]);
      }
#pragma unroll
      for (int t = 0; t < 32; ++t) {
        if (t0 + t < s.m) {
          const int c = j * s.m + t0 + t;
          const int64_t off = s.offset(p, c, s.C_out);
          const float zb = acc[t] + (a.bias != nullptr ? to_float(a.bias[c]) : 0.f);
          float v = a.mask_mode ? activation_mask(zb, a.act) : apply_activation(zb, a.act);
          if (a.other != nullptr) v = combine_with<T>(to_float(from_float<T>(v)), to_float(a.other[off]), a.combine);
          a.y[off] = from_float<T>(v);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward launcher.

struct FastConfig {
  int tp = 0, nbuf = 0;
  size_t smem = 0;
  int64_t tiles = 0;
};

// Pick the tile (pixels) and buffering of the tiled kernel, or tp = 0 when nothing fits.
template <typename T>
FastConfig plan_forward(const SfShape& s, int K, int M, int JX, int PX, size_t smem_limit, int sms) {
  FastConfig best;
  const size_t weights = round16(sizeof(float) * s.G * s.ch * (K + M)) + round16(sizeof(float) * s.C_out);
  const int ldx = padded_pitch<T>(s.C_in), ldy = padded_pitch<T>(s.C_out);
  const int jgroups = s.ch / JX;
  const int chunk = 32 * PX;
  // Tile = `chunks` pixel chunks of 32*PX. Wanted, in this order: enough (chunk, j group) items
  // to keep the 8 warps busy; x tiles of >= 8 KB so a block keeps bytes in flight; at least two
  // tiles per SM (the 14x14 and 7x7 shapes have few pixels); and double buffering, which is
  // worth more than a bigger tile, so every size is tried double-buffered first.
  const int min_chunks = std::max(1, (kWarps + jgroups - 1) / jgroups);
  int chunks = min_chunks;
  while (static_cast<size_t>(chunks) * chunk * s.C_in * sizeof(T) < 8192 && chunks < 16) chunks *= 2;
  const int64_t per_two_waves = s.pixels() / (2 * static_cast<int64_t>(sms) * chunk);
  chunks = static_cast<int>(std::min<int64_t>(chunks, std::max<int64_t>(min_chunks, per_two_waves)));
  const int64_t max_chunks = std::max<int64_t>(1, (s.hw + chunk - 1) / chunk);
  chunks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(chunks, max_chunks)));
  for (int nbuf = 2; nbuf >= 1; --nbuf) {
    // Double-buffered tiles below min_chunks would idle warps; the PX = 1 variant covers that.
    const int smallest = nbuf == 2 ? std::min(chunks, min_chunks) : 1;
    for (int c = chunks; c >= smallest && c >= 1; c = c / 2) {
      const int tp = c * chunk;
      const size_t bytes = weights + nbuf * round16(sizeof(T) * tp * ldx) + round16(sizeof(T) * tp * ldy);
      if (bytes <= smem_limit) {
        best.tp = tp;
        best.nbuf = nbuf;
        best.smem = bytes;
        best.tiles = num_tiles(s, tp);
        return best;
      }
    }
  }
  return best;
}

template <typename T, int K, int M, int JX, int PX>
void launch_forward_tiled(FwdArgs<T> a, const FastConfig& cfg, int sms, cudaStream_t stream) {
  a.tp = cfg.tp;
  a.nbuf = cfg.nbuf;
  a.tiles = cfg.tiles;
  auto kernel = sf_conv_forward_tiled<T, K, M, JX, PX>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(cfg.smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, cfg.smem));
  FALCONNET_CHECK(per_sm > 0, "sf_conv_forward: the tiled kernel cannot be resident (", cfg.smem, " bytes of shared memory)");
  const int64_t grid = std::min<int64_t>(a.tiles, static_cast<int64_t>(per_sm) * sms);
  kernel<<<static_cast<unsigned>(grid), kThreads, cfg.smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
struct TiledVariant {
  int K, M, JX, PX;
  void (*launch)(FwdArgs<T>, const FastConfig&, int, cudaStream_t);
};

#define FALCONNET_SF_VARIANT(K, M, JX, PX) TiledVariant<T>{K, M, JX, PX, &launch_forward_tiled<T, K, M, JX, PX>}

// Run the tiled kernel if one of its variants matches (k, m); false otherwise. The (k, m) pairs
// are those of the default FalconNet configs and, swapped, of their transposes (grad_x runs the
// forward kernel on the transposed pair); JX*m <= 32 accumulators per pixel. PX = 2 pixels per
// thread halves the weight reads; PX = 1 halves the tile, for configs whose weights fill shared
// memory or whose pixels are few. The variant with the best plan wins: enough tiles to fill the
// SMs, then double buffering, then PX = 2.
template <typename T>
bool forward_fast(FwdArgs<T>& a, size_t smem_limit, int sms, cudaStream_t stream) {
  static const TiledVariant<T> variants[] = {
      FALCONNET_SF_VARIANT(4, 8, 2, 2),   FALCONNET_SF_VARIANT(4, 8, 2, 1),   FALCONNET_SF_VARIANT(8, 4, 4, 2),
      FALCONNET_SF_VARIANT(8, 4, 4, 1),   FALCONNET_SF_VARIANT(8, 8, 4, 2),   FALCONNET_SF_VARIANT(8, 8, 4, 1),
      FALCONNET_SF_VARIANT(8, 16, 2, 2),  FALCONNET_SF_VARIANT(8, 16, 2, 1),  FALCONNET_SF_VARIANT(16, 8, 4, 2),
      FALCONNET_SF_VARIANT(16, 8, 4, 1),  FALCONNET_SF_VARIANT(16, 16, 2, 2), FALCONNET_SF_VARIANT(16, 16, 2, 1),
      FALCONNET_SF_VARIANT(16, 32, 1, 2), FALCONNET_SF_VARIANT(16, 32, 1, 1), FALCONNET_SF_VARIANT(32, 16, 2, 2),
      FALCONNET_SF_VARIANT(32, 16, 2, 1), FALCONNET_SF_VARIANT(32, 32, 1, 2), FALCONNET_SF_VARIANT(32, 32, 1, 1),
  };
  const TiledVariant<T>* chosen = nullptr;
  FastConfig chosen_cfg;
  int chosen_score = -1;
  for (const auto& v : variants) {
    if (a.s.k != v.K || a.s.m != v.M || a.s.ch % v.JX != 0) continue;
    const FastConfig cfg = plan_forward<T>(a.s, v.K, v.M, v.JX, v.PX, smem_limit, sms);
    if (cfg.tp == 0) continue;
    const int score = 4 * (cfg.tiles >= sms) + 2 * (cfg.nbuf == 2) + (v.PX == 2);
    if (score > chosen_score) {
      chosen = &v;
      chosen_cfg = cfg;
      chosen_score = score;
    }
  }
  if (chosen == nullptr) return false;
  chosen->launch(a, chosen_cfg, sms, stream);
  return true;
}

#undef FALCONNET_SF_VARIANT

void check_weights(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const c10::optional<at::Tensor>& bias) {
  check_input(w1, "w1", x);
  check_input(w2, "w2", x);
  FALCONNET_CHECK(w1.dim() == 3, "w1 must have shape (G, c_h, k), got ", w1.sizes());
  FALCONNET_CHECK(w2.dim() == 3, "w2 must have shape (c_h, m, G), got ", w2.sizes());
  FALCONNET_CHECK(w2.size(0) == w1.size(1) && w2.size(2) == w1.size(0), "w2 must have shape (c_h=", w1.size(1),
                  ", m, G=", w1.size(0), ") to match w1 ", w1.sizes(), ", got ", w2.sizes());
  FALCONNET_CHECK(x.size(1) == w1.size(0) * w1.size(2), "x must have C_in = G*k = ", w1.size(0) * w1.size(2),
                  " channels (w1 is ", w1.sizes(), "), got ", x.size(1));
  FALCONNET_CHECK(w1.numel() > 0 && w2.numel() > 0, "w1 and w2 must be non-empty");
  if (bias.has_value()) {
    check_input(*bias, "bias", x);
    const int64_t C_out = w2.size(0) * w2.size(1);
    FALCONNET_CHECK(bias->dim() == 1 && bias->size(0) == C_out, "bias must have shape (", C_out, ",), got ", bias->sizes());
  }
}

// Run the forward kernels: y (allocated by the caller, in x's layout) from x, w1 (G, c_h, k),
// w2 (c_h, m, G) (any strides), an optional bias (C_out,), and `other` joined by `combine`.
void run_forward(const at::Tensor& x, bool cl, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& bias,
                 const at::Tensor& other, int combine, int act, bool mask_mode, at::Tensor& y) {
  const int64_t G = w1.size(0), ch = w1.size(1), k = w1.size(2), m = w2.size(1);
  const int dev = x.get_device();
  const int sms = num_sms(dev);
  const size_t smem_limit = smem_optin_limit(dev);
  cudaStream_t stream = current_stream();
  FALCONNET_DISPATCH_FLOATING(x.scalar_type(), "sf_conv_forward", [&] {
    FwdArgs<scalar_t> a{};
    a.x = x.data_ptr<scalar_t>();
    a.w1 = w1.data_ptr<scalar_t>();
    a.w2 = w2.data_ptr<scalar_t>();
    for (int d = 0; d < 3; ++d) {
      a.w1s[d] = w1.stride(d);
      a.w2s[d] = w2.stride(d);
    }
    a.bias = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    a.other = other.defined() ? other.data_ptr<scalar_t>() : nullptr;
    a.y = y.data_ptr<scalar_t>();
    a.s = make_shape(x, G, ch, k, m, cl);
    a.act = act;
    a.combine = combine;
    a.mask_mode = mask_mode;
    constexpr int V = Vec16<scalar_t>::kSize;
    a.vec_io = cl && a.s.C_in % V == 0 && a.s.C_out % V == 0 && aligned16(a.x) && aligned16(a.y) &&
               (a.other == nullptr || aligned16(a.other));
    if (!forward_fast<scalar_t>(a, smem_limit, sms, stream)) {
      const int64_t items = a.s.pixels() * a.s.ch;
      const int64_t grid = std::min<int64_t>((items + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 8);
      sf_conv_forward_generic<scalar_t><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

at::Tensor sf_conv_forward_cuda(const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& residual_in,
                                c10::string_view activation) {
  check_x(x_in, "x");
  check_weights(x_in, w1, w2, bias);
  const int act = parse_activation(std::string(activation.data(), activation.size()));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = is_channels_last(x_in);
  const auto fmt = memory_format_of(cl);
  const at::Tensor x = x_in.contiguous(fmt);
  const int64_t C_out = w2.size(0) * w2.size(1);
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_input(*residual_in, "residual", x);
    FALCONNET_CHECK(residual_in->sizes() == at::IntArrayRef({x.size(0), C_out, x.size(2), x.size(3)}),
                    "residual must have the output's shape (", x.size(0), ", ", C_out, ", ", x.size(2), ", ", x.size(3),
                    "), got ", residual_in->sizes());
    residual = residual_in->contiguous(fmt);
  }
  at::Tensor y = at::empty({x.size(0), C_out, x.size(2), x.size(3)}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  run_forward(x, cl, w1, w2, b, residual, kCombineAdd, act, /*mask_mode=*/false, y);
  return y;
}

// ---------------------------------------------------------------------------------------------
// Backward: weight gradients through the dense gradient.
//
// With D = grad_z^T x, the (C_out, C_in) gradient of the dense equivalent W[j*m+t, g*k+i] =
// w2[j,t,g] * w1[g,j,i], the chain rule through that product gives
//   grad_w1[g, j, i] = sum_t D[j*m+t, g*k+i] * w2[j, t, g]
//   grad_w2[j, t, g] = sum_i D[j*m+t, g*k+i] * w1[g, j, i]
// (expand D: sum_p grad_z[p, j*m+t] x[p, g*k+i], and the sums over t / i give grad_H and H).
// D is one GEMM over the pixels with a long reduction, exactly what cuBLAS's tensor cores do at
// the memory rate (C_in*C_out/(C_in+C_out) <= 205 FLOP/byte at the 8 shapes, under the H100's
// ~295 bf16 FLOP/byte), and it reads x and grad_z once. A fused CUDA-core reduction would
// instead spend 2*(C_in*c_h + C_out*G) FMAs per pixel behind shared-memory loads. D is
// accumulated and kept in float32 (mm with out_dtype float32), the contractions are tiny.

// Both contractions in one launch, one thread per weight gradient element, written in the weight
// dtype: grad_w1 (G, c_h, k) first, then grad_w2 (c_h, m, G). D is (C_out, C_in) float32.
template <typename T>
__global__ void __launch_bounds__(kThreads) sf_conv_contract_dense_grad(const float* __restrict__ D, const T* w1,
                                                                         const T* w2, T* gw1, T* gw2, int G, int ch,
                                                                         int k, int m) {
  const int C_in = G * k;
  const int n1 = G * ch * k, n2 = ch * m * G;
  for (int e = blockIdx.x * kThreads + threadIdx.x; e < n1 + n2; e += gridDim.x * kThreads) {
    float v = 0.f;
    if (e < n1) {
      const int gj = e / k, i = e - gj * k;
      const int g = gj / ch, j = gj - g * ch;
      for (int t = 0; t < m; ++t) v = fmaf(D[(j * m + t) * C_in + g * k + i], to_float(w2[(j * m + t) * G + g]), v);
      gw1[e] = from_float<T>(v);
    } else {
      const int f = e - n1;
      const int jt = f / G, g = f - jt * G;  // jt = j*m + t, the output channel
      const int j = jt / m;
      for (int i = 0; i < k; ++i) v = fmaf(D[jt * C_in + g * k + i], to_float(w1[(g * ch + j) * k + i]), v);
      gw2[f] = from_float<T>(v);
    }
  }
}

// grad_w1, grad_w2 (in the weights' dtype) and grad_bias (in grad_z's dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grads(const at::Tensor& x, const at::Tensor& gz,
                                                            const at::Tensor& w1_in, const at::Tensor& w2_in) {
  const at::Tensor w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const int64_t G = w1.size(0), ch = w1.size(1), k = w1.size(2), m = w2.size(1);
  const int64_t C_in = G * k, C_out = ch * m;
  // (P, C) views: free in channels_last, one copy in NCHW.
  const at::Tensor x2 = x.permute({0, 2, 3, 1}).reshape({-1, C_in});
  const at::Tensor gz2 = gz.permute({0, 2, 3, 1}).reshape({-1, C_out});
  const at::Tensor D = x.scalar_type() == at::kFloat ? at::mm(gz2.t(), x2) : at::mm(gz2.t(), x2, at::kFloat);
  at::Tensor gw1 = at::empty_like(w1), gw2 = at::empty_like(w2);
  const int64_t n = w1.numel() + w2.numel();
  const int grid = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1024));
  FALCONNET_DISPATCH_FLOATING(w1.scalar_type(), "sf_conv_backward", [&] {
    sf_conv_contract_dense_grad<scalar_t><<<grid, kThreads, 0, current_stream()>>>(
        D.data_ptr<float>(), w1.data_ptr<scalar_t>(), w2.data_ptr<scalar_t>(), gw1.data_ptr<scalar_t>(),
        gw2.data_ptr<scalar_t>(), static_cast<int>(G), static_cast<int>(ch), static_cast<int>(k), static_cast<int>(m));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // float32 accumulation, one rounding to the dtype
  at::Tensor gb = at::sum(gz, {0, 2, 3}, /*keepdim=*/false, gz.scalar_type());
  return {gw1, gw2, gb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sf_conv_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& w1, const at::Tensor& w2,
    const c10::optional<at::Tensor>& bias, c10::string_view activation) {
  check_x(x_in, "x");
  check_weights(x_in, w1, w2, bias);
  check_input(grad_y_in, "grad_y", x_in);
  const int act = parse_activation(std::string(activation.data(), activation.size()));
  const int64_t C_out = w2.size(0) * w2.size(1);
  FALCONNET_CHECK(grad_y_in.sizes() == at::IntArrayRef({x_in.size(0), C_out, x_in.size(2), x_in.size(3)}),
                  "grad_y must have the output's shape (", x_in.size(0), ", ", C_out, ", ", x_in.size(2), ", ",
                  x_in.size(3), "), got ", grad_y_in.sizes());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = is_channels_last(x_in);
  const auto fmt = memory_format_of(cl);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor gy = grad_y_in.contiguous(fmt);  // the kernels index both in x's layout

  at::Tensor gx = at::empty_like(x, x.options().memory_format(fmt));
  if (x.numel() == 0) return {gx, at::zeros_like(w1), at::zeros_like(w2), at::zeros({C_out}, x.options())};
  {
    // 1. grad_z = grad_y * act'(z + bias): the forward kernel in mask mode (z recomputed on chip).
    at::Tensor gz = gy;
    if (act != kActNone) {
      gz = at::empty_like(gy, gy.options().memory_format(fmt));
      const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
      run_forward(x, cl, w1, w2, b, gy, kCombineMul, act, /*mask_mode=*/true, gz);
    }
    // 2. grad_x: the transpose of an SF-Conv pair is an SF-Conv pair with the roles swapped:
    //    G' = c_h windows of k' = m channels of grad_z, c_h' = G, m' = k, and
    //    w1'[j, g, t] = w2[j, t, g], w2'[g, i, j] = w1[g, j, i]. So the fast forward kernel runs it.
    run_forward(gz, cl, w2.permute({0, 2, 1}), w1.permute({0, 2, 1}), at::Tensor(), at::Tensor(), kCombineAdd,
                kActNone, /*mask_mode=*/false, gx);
    // 3. grad_w1, grad_w2, grad_bias.
    auto [gw1, gw2, gb] = weight_grads(x, gz, w1, w2);
    return {gx, gw1, gw2, gb};
  }
}

}  // namespace
}  // namespace falconnet_cuda

TORCH_LIBRARY_IMPL(falconnet_C, CUDA, m) {
  m.impl("sf_conv_forward", &falconnet_cuda::sf_conv_forward_cuda);
  m.impl("sf_conv_backward", &falconnet_cuda::sf_conv_backward_cuda);
}
