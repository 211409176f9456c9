// Shared pieces of the CPU kernels: activation, SIMD vectors, memory layouts, pixel-tile I/O.
//
// Vectors are GCC/Clang vector extensions as wide as the build's ISA: 64 bytes (one zmm register)
// with AVX-512, 32 bytes (ymm) with AVX/AVX2, 16 bytes elsewhere (SSE, NEON). Register blocks are
// sized from the ISA's vector-register count (kAccRegs). That keeps one source for every x86 and
// ARM build without at::vec's CPU_CAPABILITY dispatch (the extension is compiled once, for the
// machine it runs on; setup.py passes -march=native). A 64-byte vector on a 16-register AVX2
// machine, as this file had until 2026-11-27, is two ymm halves and a block of 24 accumulators
// spills: the forward kernels then ran 2-6x slower than oneDNN there instead of faster.
#pragma once

// Only the headers used (not <ATen/ATen.h>, every op's declaration: half of each file's compile)
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>

#include "../check.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string_view>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace falconnet::cpu {

// ---------------------------------------------------------------------------------------------
// The build's vector ISA

#if defined(__AVX512F__)
inline constexpr int kVecBytes = 64, kVecRegs = 32;
#elif defined(__AVX__)
inline constexpr int kVecBytes = 32, kVecRegs = 16;
#elif defined(__aarch64__)
inline constexpr int kVecBytes = 16, kVecRegs = 32;
#else
inline constexpr int kVecBytes = 16, kVecRegs = 16;
#endif
// Accumulators one register block may keep: three quarters of the vector registers, the rest
// left for the loaded rows and broadcast weights of the inner loop.
inline constexpr int kAccRegs = kVecRegs * 3 / 4;
// 32 vector registers (AVX-512, NEON): the kernels' register-run lengths were tuned for these;
// with 16 (AVX2) they take shorter runs so that their accumulators do not spill.
inline constexpr bool kWideRegs = kVecRegs >= 32;

// ---------------------------------------------------------------------------------------------
// Activation

enum class Activation { kNone, kRelu, kRelu6 };

inline Activation parse_activation(std::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "relu") return Activation::kRelu;
  if (name == "relu6") return Activation::kRelu6;
  FALCONNET_CHECK(false, "activation must be one of 'none', 'relu', 'relu6', got '", name, "'");
}

// NaN-propagating, as torch.relu / relu6.
template <typename A>
inline A activate(A z, Activation act) {
  if (act == Activation::kNone) return z;
  A r = z < A(0) ? A(0) : z;
  if (act == Activation::kRelu6) r = r > A(6) ? A(6) : r;
  return r;
}

// d act(z)/dz as the 0/1 mask PyTorch's relu / relu6 use (0 at the kinks).
template <typename A>
inline A activation_mask(A z, Activation act) {
  if (act == Activation::kNone) return A(1);
  if (act == Activation::kRelu) return z > A(0) ? A(1) : A(0);
  return (z > A(0) && z < A(6)) ? A(1) : A(0);
}

// ---------------------------------------------------------------------------------------------
// SIMD vectors

template <typename A>
struct Simd {
  typedef A vec __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / static_cast<int>(sizeof(A));
  static inline vec load(const A* p) {
    vec v;
    std::memcpy(&v, p, sizeof(vec));
    return v;
  }
  static inline void store(A* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
  static inline vec zero() { return vec{}; }
  static inline vec splat(A s) { return vec{} + s; }
  // Sum of the lanes as a tree (log2(lanes) adds), not a serial chain.
  static inline A sum(vec v) {
    A tmp[lanes];
    std::memcpy(tmp, &v, sizeof(vec));
    for (int width = lanes / 2; width >= 1; width /= 2)
      for (int i = 0; i < width; ++i) tmp[i] += tmp[i + width];
    return tmp[0];
  }
};

// activate() on a vector of Simd<A>, lane by lane (NaN-propagating, as torch.relu / relu6).
template <typename A>
inline typename Simd<A>::vec activate_vec(typename Simd<A>::vec o, Activation act) {
  if (act == Activation::kNone) return o;
  const typename Simd<A>::vec zero = Simd<A>::zero(), six = Simd<A>::splat(A(6));
  o = o < zero ? zero : o;
  if (act == Activation::kRelu6) o = o > six ? six : o;
  return o;
}

// The type the kernels compute and accumulate in: float for bfloat16 storage.
template <typename S>
using compute_t = at::opmath_type<S>;

// ---------------------------------------------------------------------------------------------
// Memory layouts of an (N, C, H, W) tensor

enum class Layout { kNCHW, kNHWC };

// The kernels read NCHW-contiguous or channels_last tensors; anything else is copied once.
inline at::Tensor collapsible(const at::Tensor& t) {
  if (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
  return t.contiguous();
}

inline Layout layout_of(const at::Tensor& t) {
  return t.is_contiguous() ? Layout::kNCHW : Layout::kNHWC;
}

// The output's memory format follows x: channels_last when x is channels_last and not also
// plain contiguous (the rule of falconnet_kernels/ops.py's fake kernels).
inline at::MemoryFormat output_format(const at::Tensor& x) {
  return (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast))
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// ---------------------------------------------------------------------------------------------
// Input checks (at the boundary, once; errors name the argument)

inline void check_float_dtype(const at::Tensor& x, const char* name) {
  auto dt = x.scalar_type();
  FALCONNET_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16, name,
                  " must be float32, float64 or bfloat16 on the CPU, got ", dt);
}

inline void check_like(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* name) {
  if (!t.has_value()) return;
  FALCONNET_CHECK(t->device() == x.device(), name, " must be on the same device as x (", x.device(), "), got ",
                  t->device());
  FALCONNET_CHECK(t->scalar_type() == x.scalar_type(), name, " must have the same dtype as x (", x.scalar_type(),
                  "), got ", t->scalar_type());
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  FALCONNET_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the C++ CPU kernel, got ", t.device());
}

// ---------------------------------------------------------------------------------------------
// Pixel tiles: the kernels work on T consecutive pixels of the flattened (N*H*W) pixel index at a
// time, held channel-major in a small buffer (buf[c*T + p]) so that the SIMD lanes run over
// pixels. NCHW rows are already pixel-contiguous (a tile is a few memcpy-like row segments, split
// where it crosses an image); channels_last tiles are transposed on the way in and out.

struct PixelView {
  int64_t C;   // channels
  int64_t HW;  // pixels per image
  Layout layout;
};

// Square float transposes in registers (the channels_last tiles' loads and stores): kTr x kTr,
// one register a row. TrVec / tr_* name the ISA's float vector and its loads and stores.
#if defined(__AVX512F__)
#define FALCONNET_TRANSPOSE 1
constexpr int kTr = 16;
using TrVec = __m512;
inline TrVec tr_load(const float* p) { return _mm512_loadu_ps(p); }
inline void tr_store(float* p, TrVec v) { _mm512_storeu_ps(p, v); }
inline void tr_stream(float* p, TrVec v) { _mm512_stream_ps(p, v); }
// 16x16: rows r[i] (16 floats each) -> columns.
inline void transpose_block(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4q + s] now holds, in each 128-bit lane L, row-group L's... regroup 128-bit blocks.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}
#elif defined(__AVX__)
#define FALCONNET_TRANSPOSE 1
constexpr int kTr = 8;
using TrVec = __m256;
inline TrVec tr_load(const float* p) { return _mm256_loadu_ps(p); }
inline void tr_store(float* p, TrVec v) { _mm256_storeu_ps(p, v); }
inline void tr_stream(float* p, TrVec v) { _mm256_stream_ps(p, v); }
// 8x8: rows r[i] (8 floats each) -> columns.
inline void transpose_block(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
#endif

#if defined(FALCONNET_TRANSPOSE)
// Reads one vector of every 64-byte line of [p, p + bytes) in address order, so that the
// transposing loads after it (8 or 16 pixel rows read a column block at a time, C * 4 bytes
// apart) find the lines in the cache. On the 2-core AVX2 machine (Zen 3, 2026-11-27) the
// transposing loads stalled on memory even with the tile prefetched: loading the channels_last
// input tiles alone took 7.4 ms at 128->32@56 (1 thread) against 2.8 ms for a sequential read of
// the same bytes; with this pass first the fused SF-Conv forward ran 1.05-1.33x faster at 7 of the 8 shapes
// (benchmarks/results/2026-11-27-cpu-avx2-3/). AVX-512 builds leave it out: there it gained 3-6%
// at 2 threads but lost 5-8% where the input is cache-resident (2026-11-26, 1024->256@7, 512->128@14).
inline void touch_lines(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  __m256 any = _mm256_setzero_ps();
  for (int64_t off = 0; off < bytes; off += 64)
    any = _mm256_or_ps(any, _mm256_loadu_ps(reinterpret_cast<const float*>(c + off)));
  asm volatile("" : : "x"(any));
}
#endif

// dst[c*T + p] = src pixel (p0 + p), channel c, for p < count; zero for count <= p < T.
// touch: read a channels_last tile's lines in address order first (AVX2 builds; see touch_lines);
// false where the caller prefetched the tile already (SpreadPrefetch).
template <typename S, typename A>
void load_tile(const S* src, const PixelView& v, int64_t p0, int count, A* dst, int T, bool touch = true) {
  const int64_t C = v.C;
  if (v.layout == Layout::kNHWC) {
    const S* base = src + p0 * C;
#if defined(FALCONNET_TRANSPOSE)
    if constexpr (std::is_same_v<S, float> && std::is_same_v<A, float>) {
      if (count == T && T % kTr == 0 && C % kTr == 0) {
        if constexpr (!kWideRegs)
          if (touch) touch_lines(base, T * C * static_cast<int64_t>(sizeof(float)));
        for (int p = 0; p < T; p += kTr)
          for (int64_t c = 0; c < C; c += kTr) {
            TrVec r[kTr];
            for (int i = 0; i < kTr; ++i) r[i] = tr_load(base + (p + i) * C + c);
            transpose_block(r);
            for (int i = 0; i < kTr; ++i) tr_store(dst + (c + i) * T + p, r[i]);
          }
        return;
      }
    }
#endif
    for (int p = 0; p < count; ++p)
      for (int64_t c = 0; c < C; ++c) dst[c * T + p] = static_cast<A>(base[p * C + c]);
  } else {
    int done = 0;
    while (done < count) {
      const int64_t p = p0 + done;
      const int64_t n = p / v.HW, hw = p % v.HW;
      const int len = static_cast<int>(std::min<int64_t>(count - done, v.HW - hw));
      const S* s = src + n * C * v.HW + hw;
      for (int64_t c = 0; c < C; ++c) {
        const S* row = s + c * v.HW;
        A* d = dst + c * T + done;
        for (int i = 0; i < len; ++i) d[i] = static_cast<A>(row[i]);
      }
      done += len;
    }
  }
  if (count < T)
    for (int64_t c = 0; c < C; ++c) std::fill(dst + c * T + count, dst + (c + 1) * T, A(0));
}

// dst pixel (p0 + p), channel c = src[c*T + p], for p < count.
// With stream, full aligned 64-byte vectors go out as non-temporal stores (the caller fences).
template <typename S, typename A>
void store_tile(S* dst, const PixelView& v, int64_t p0, int count, const A* src, int T, bool stream = false) {
  const int64_t C = v.C;
  if (v.layout == Layout::kNHWC) {
    S* base = dst + p0 * C;
#if defined(FALCONNET_TRANSPOSE)
    if constexpr (std::is_same_v<S, float> && std::is_same_v<A, float>) {
      if (count == T && T % kTr == 0 && C % kTr == 0) {
        for (int p = 0; p < T; p += kTr)
          for (int64_t c = 0; c < C; c += kTr) {
            TrVec r[kTr];
            for (int i = 0; i < kTr; ++i) r[i] = tr_load(src + (c + i) * T + p);
            transpose_block(r);
            if (stream && (reinterpret_cast<uintptr_t>(base) & (sizeof(TrVec) - 1)) == 0)
              for (int i = 0; i < kTr; ++i) tr_stream(base + (p + i) * C + c, r[i]);
            else
              for (int i = 0; i < kTr; ++i) tr_store(base + (p + i) * C + c, r[i]);
          }
        return;
      }
    }
#endif
    for (int p = 0; p < count; ++p)
      for (int64_t c = 0; c < C; ++c) base[p * C + c] = static_cast<S>(src[c * T + p]);
  } else {
    int done = 0;
    while (done < count) {
      const int64_t p = p0 + done;
      const int64_t n = p / v.HW, hw = p % v.HW;
      const int len = static_cast<int>(std::min<int64_t>(count - done, v.HW - hw));
      S* d0 = dst + n * C * v.HW + hw;
      for (int64_t c = 0; c < C; ++c) {
        S* row = d0 + c * v.HW;
        const A* s = src + c * T + done;
        for (int i = 0; i < len; ++i) row[i] = static_cast<S>(s[i]);
      }
      done += len;
    }
  }
}

// Prefetch the pixels [p0, p0 + count) of every channel into the cache. Issued one tile ahead,
// it hides the DRAM latency behind the current tile's compute; the hardware prefetcher alone
// falls behind on the channels_last transposing loads (16 rows read a column block at a time)
// and on NCHW tiles (C separate 128-byte row pieces).
template <typename S>
inline void prefetch_tile(const S* src, const PixelView& v, int64_t p0, int count) {
  constexpr int64_t kLine = 64;
  if (v.layout == Layout::kNHWC) {
    const char* begin = reinterpret_cast<const char*>(src + p0 * v.C);
    const int64_t bytes = count * v.C * static_cast<int64_t>(sizeof(S));
    for (int64_t off = 0; off < bytes; off += kLine) __builtin_prefetch(begin + off, 0, 2);
  } else {
    const int64_t n = p0 / v.HW, hw = p0 % v.HW;
    const int64_t len = std::min<int64_t>(count, v.HW - hw) * static_cast<int64_t>(sizeof(S));
    const S* s = src + n * v.C * v.HW + hw;
    for (int64_t c = 0; c < v.C; ++c) {
      const char* row = reinterpret_cast<const char*>(s + c * v.HW);
      for (int64_t off = 0; off < len; off += kLine) __builtin_prefetch(row + off, 0, 2);
      __builtin_prefetch(row + len - 1, 0, 2);
    }
  }
}

// Software prefetch of a contiguous byte range (a later channels_last tile) spread over the
// compute of the current one: start() splits its lines into `slices` slices, each step() issues
// the next. All lines at once (prefetch_tile) measured no gain on the 2-core AVX2 machine, and
// neither did a demand pass (touch_lines) that stalls the core until the lines arrive; a few lines
// between blocks of FMAs keep the memory busy while the core computes.
class SpreadPrefetch {
 public:
  void start(const void* p, int64_t bytes, int64_t slices) {
    p_ = static_cast<const char*>(p);
    end_ = bytes;
    off_ = 0;
    per_ = ((bytes + 63) / 64 + slices - 1) / slices * 64;
  }
  void step() {
    const int64_t e = std::min(end_, off_ + per_);
    for (; off_ < e; off_ += 64) __builtin_prefetch(p_ + off_, 0, 3);
  }

 private:
  const char* p_ = nullptr;
  int64_t end_ = 0, off_ = 0, per_ = 0;
};

// NCHW super-tiles: reads every 64-byte line of pixels [p0, p1) of each channel row, row by row
// (the pieces of consecutive images in turn), before the tiles of that range are computed. An
// NCHW tile is C rows HW pixels apart, so computing tile by tile reads C streams that each move
// one tile (64 or 128 bytes) at a time: more than the hardware prefetchers follow, and the
// one-tile-ahead software prefetch (prefetch_tile) did not hide them on the 2-core AVX2 machine.
// A pass along each row over a few hundred pixels first turns them into short sequential runs.
// One byte a line; the OR into an asm sink keeps the loads.
template <typename S>
inline void touch_rows(const S* src, const PixelView& v, int64_t p0, int64_t p1) {
  unsigned char any = 0;
  while (p0 < p1) {
    const int64_t n = p0 / v.HW, hw = p0 % v.HW;
    const int64_t len = std::min<int64_t>(p1 - p0, v.HW - hw);
    const int64_t bytes = len * static_cast<int64_t>(sizeof(S));
    const unsigned char* base = reinterpret_cast<const unsigned char*>(src + n * v.C * v.HW + hw);
    for (int64_t c = 0; c < v.C; ++c) {
      const unsigned char* row = base + c * v.HW * static_cast<int64_t>(sizeof(S));
      for (int64_t off = 0; off < bytes; off += 64) any |= row[off];
      any |= row[bytes - 1];
    }
    p0 += len;
  }
  asm volatile("" : : "r"(any));
}

// Streaming (non-temporal) stores skip the read-for-ownership of each output line, which saves a
// third of the DRAM traffic of a large output; but they also keep the output out of the cache,
// so they only pay when the op's footprint (input + output) is a sizeable part of the last-level
// cache and the output would likely be evicted (or come from fresh, cold pages) anyway. 32 MiB
// is the L3 of the 2-core AMD dev machine and of a Zen CCX (sysconf reports the host's total in
// a VM, so it is not asked). Measured there, 1 thread, batch 16, 56x56: 32->128 channels_last
// 0.94 ms streaming vs 2.9 ms with plain stores, 128->32 NCHW 1.9 vs 2.8 ms.
// The threshold is a quarter of the L3 (was a half): at 64->256@28, batch 16 (footprint 16.06
// MB, output 12.8 MB), plain stores made the op bimodal, 0.24 ms when the output buffer was
// still cache-hot from the previous call but 0.47-0.84 ms when it was not (new pages: ~470 minor
// faults per call), and the latter is what pytest-benchmark's back-to-back rounds saw (1.04x
// dense). Streaming gives 0.38-0.46 ms in every state (1.8-2.1x dense, 2026-11-26, 2 threads);
// 256->64@28 is unchanged (0.45-0.52 ms) and whole-model FalconNet inference (batch 8) showed no
// change beyond the noise (median 51-57 vs 55-65 ms). Shapes at 14x14 and below stay under it.
constexpr int64_t kLastLevelCacheBytes = int64_t{32} << 20;

inline bool use_streaming_stores(int64_t footprint_bytes) { return footprint_bytes > kLastLevelCacheBytes / 4; }

// One vector of A stored non-temporally where the ISA has such a store (AVX, AVX-512) and p is
// aligned to the vector; returns false (nothing stored) otherwise. ALIGNED: the caller guarantees
// the alignment (no test).
template <typename A, bool ALIGNED = false>
inline bool stream_vec(A* p, typename Simd<A>::vec v) {
#if defined(__AVX__)
  if (!ALIGNED && (reinterpret_cast<uintptr_t>(p) & (kVecBytes - 1)) != 0) return false;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<A, float>) return _mm512_stream_ps(p, reinterpret_cast<__m512>(v)), true;
  if constexpr (std::is_same_v<A, double>) return _mm512_stream_pd(p, reinterpret_cast<__m512d>(v)), true;
#else
  if constexpr (std::is_same_v<A, float>) return _mm256_stream_ps(p, reinterpret_cast<__m256>(v)), true;
  if constexpr (std::is_same_v<A, double>) return _mm256_stream_pd(p, reinterpret_cast<__m256d>(v)), true;
#endif
#endif
  (void)p;
  (void)v;
  return false;
}

// f(std::integral_constant<int, min(n, MaxNP)>): for kernels that take a run length (how many
// positions or pixels share registers) as a compile-time constant; this picks it for n >= 1.
template <int MaxNP, typename F>
inline void with_run_length(int64_t n, F&& f) {
  if constexpr (MaxNP == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    if (n >= MaxNP)
      f(std::integral_constant<int, MaxNP>{});
    else
      with_run_length<MaxNP - 1>(n, f);
  }
}

// Streaming stores are weakly ordered: a thread that made them fences before the op returns.
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Runs worker(grab) on each of the intra-op threads; grab(begin, end) hands out the next chunk of
// [0, n) (false when none is left). Chunks are taken dynamically rather than split statically as
// at::parallel_for does: on a machine whose cores are shared with other processes, a thread that
// gets less CPU simply takes fewer chunks, instead of the whole op waiting for its fixed half.
// Each worker keeps its own scratch (and partial sums) across the chunks it takes.
template <typename Worker>
void parallel_dynamic(int64_t n, const Worker& worker) {
  if (n <= 0) return;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  // ~8 chunks per worker balance the load; more would only add atomic traffic
  const int64_t chunk = std::clamp<int64_t>(n / (8 * workers), 1, 64);
  std::atomic<int64_t> next{0};
  auto grab = [&](int64_t& begin, int64_t& end) {
    begin = next.fetch_add(chunk, std::memory_order_relaxed);
    if (begin >= n) return false;
    end = std::min(n, begin + chunk);
    return true;
  };
  at::parallel_for(0, workers, 1, [&](int64_t wb, int64_t we) {
    for (int64_t w = wb; w < we; ++w) worker(grab);
  });
}

// A weight tensor in the compute type, contiguous (a no-op for float32/float64 weights).
inline at::Tensor weight_in_compute_type(const at::Tensor& w) {
  auto dt = w.scalar_type() == at::kBFloat16 ? at::kFloat : w.scalar_type();
  return w.to(dt).contiguous();
}

}  // namespace falconnet::cpu
