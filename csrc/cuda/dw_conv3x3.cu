// Depthwise 3x3 conv (padding 1, stride 1 or 2) with fused bias and activation: the folded
// RepSO operator. y = act(dwconv3x3(x, weight) + bias), weight (C, 1, 3, 3).
//
// The two numbers, for N images of C x H x W, output Ho x Wo, element size s bytes:
//   forward:  FLOPs 18*N*C*Ho*Wo; minimum bytes (N*C*H*W + N*C*Ho*Wo)*s. 9 MACs per output
//             element against ~4 bytes (bf16, stride 1) is ~4.5 FLOP/byte: memory-bound, the
//             roofline is the copy rate (SPEC section 6: cuDNN reaches ~20% of it).
//   backward: FLOPs 36*N*C*Ho*Wo (+18*N*C*Ho*Wo to recompute z for the activation mask);
//             minimum bytes (2*N*C*H*W + N*C*Ho*Wo)*s (read x, grad_y; write grad_x), plus one
//             write and read of grad_z when the activation is not "none".
//
// Design:
// - channels_last (the benchmarked layout): a thread owns V = 16/s consecutive channels (one
//   16-byte vector) of WB consecutive output pixels of one row. Neighbouring threads take the
//   neighbouring channel vectors of the same pixels, so every load and store of a warp is a
//   run of 16-byte vectors: coalesced. Each input vector of the 3 x ((WB-1)*S+3) window is
//   loaded once per thread and used for all the outputs that need it (reuse in registers, the
//   remaining 3x overlap between rows and neighbouring threads is served by L1/L2).
// - Forward weights are read in their own (C, 9) layout and dtype; on the channels_last path a
//   thread's channel vector is fixed for its whole grid-stride loop, so its 9*V weights and V
//   biases are loaded once into registers (no host-side re-layout launches, which at the 7x7
//   shapes would cost as much as the op). The backward re-lays them out once as float32 (9, C)
//   (one small kernel) for 16-byte loads per tap.
// - NCHW, or channels_last rows that are not 16-byte aligned: the same kernels with V = 1 and
//   general strides; consecutive threads then take consecutive output columns (coalesced).
// - Backward: kernel A recomputes z (only when the activation is not "none"), forms
//   grad_z = grad_y * act'(z) (exact in the storage dtype: the mask is 0 or 1), writes it when
//   it differs from grad_y, and reduces grad_weight and grad_bias: per-thread float32 registers
//   across a grid-stride loop (channels_last fast path: each thread keeps one channel vector),
//   then shared-memory atomics per block, then one global atomicAdd per (channel, tap) per block.
//   Kernel B computes grad_x as the transposed conv of grad_z.

#include "common.cuh"

#include <torch/library.h>

#include <algorithm>

namespace falconnet_cuda {
namespace {

constexpr int kThreads = 256;
// The forward keeps 9*V weights per thread in registers (~150 registers): blocks of 128 threads
// let three of them share an SM (12 warps) where 256-thread blocks would fit only one.
constexpr int kFwdThreads = 128;

struct DwShape {
  int64_t N;
  int C, H, W, Ho, Wo;
  int stride;
  bool channels_last;
  // Element strides of the input (x, grad_x) and output (y, grad_y) tensors.
  int64_t xsN, xsC, xsH, xsW;
  int64_t ysN, ysC, ysH, ysW;
};

DwShape make_dw_shape(const at::Tensor& x, int stride, bool cl) {
  DwShape s;
  s.N = x.size(0);
  s.C = static_cast<int>(x.size(1));
  s.H = static_cast<int>(x.size(2));
  s.W = static_cast<int>(x.size(3));
  s.Ho = (s.H - 1) / stride + 1;
  s.Wo = (s.W - 1) / stride + 1;
  s.stride = stride;
  s.channels_last = cl;
  const int64_t C = s.C;
  if (cl) {
    s.xsC = 1, s.xsW = C, s.xsH = C * s.W, s.xsN = C * s.W * s.H;
    s.ysC = 1, s.ysW = C, s.ysH = C * s.Wo, s.ysN = C * s.Wo * s.Ho;
  } else {
    s.xsW = 1, s.xsH = s.W, s.xsC = static_cast<int64_t>(s.H) * s.W, s.xsN = C * s.H * s.W;
    s.ysW = 1, s.ysH = s.Wo, s.ysC = static_cast<int64_t>(s.Ho) * s.Wo, s.ysN = C * s.Ho * s.Wo;
  }
  return s;
}

// V consecutive channels as floats: one 16-byte load when V > 1 (channels_last, aligned).
template <typename T, int V>
__device__ __forceinline__ void load_channels(const T* p, float* out) {
  if constexpr (V == 1) {
    out[0] = to_float(*p);
  } else {
    static_assert(V == Vec16<T>::kSize, "vector width must be 16 bytes");
    const Vec16<T> r = load_vec16(p);
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = to_float(r.v[e]);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_channels(T* p, const float* in) {
  if constexpr (V == 1) {
    *p = from_float<T>(in[0]);
  } else {
    Vec16<T> r;
#pragma unroll
    for (int e = 0; e < V; ++e) r.v[e] = from_float<T>(in[e]);
    store_vec16(p, r);
  }
}

// V channels of one tap of the (9, C) float32 weights.
template <int V>
__device__ __forceinline__ void load_tap(const float* w9, int tap, int C, int c0, float* out) {
  const float* p = w9 + static_cast<int64_t>(tap) * C + c0;
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int e = 0; e < V; e += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + e));
      out[e] = v.x, out[e + 1] = v.y, out[e + 2] = v.z, out[e + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = __ldg(p + e);
  }
}

// A work item: V channels starting at c0 of WB output columns starting at w0, in row `row` of
// image n. Channels vary fastest across threads in channels_last, columns in NCHW.
struct Item {
  int64_t n;
  int row, w0, c0;
};

__device__ __forceinline__ Item decode_item(const DwShape& s, int64_t idx, int V, int WB, int rows, int cols) {
  const int CV = s.C / V;
  const int WG = (cols + WB - 1) / WB;
  Item it;
  int cv, wg;
  if (s.channels_last) {
    cv = static_cast<int>(idx % CV);
    idx /= CV;
    wg = static_cast<int>(idx % WG);
    idx /= WG;
    it.row = static_cast<int>(idx % rows);
    it.n = idx / rows;
  } else {
    wg = static_cast<int>(idx % WG);
    idx /= WG;
    it.row = static_cast<int>(idx % rows);
    idx /= rows;
    cv = static_cast<int>(idx % CV);
    it.n = idx / CV;
  }
  it.c0 = cv * V;
  it.w0 = wg * WB;
  return it;
}

__host__ __device__ inline int64_t dw_items(const DwShape& s, int V, int WB, int rows, int cols) {
  return s.N * rows * static_cast<int64_t>((cols + WB - 1) / WB) * (s.C / V);
}

template <typename T>
struct DwArgs {
  const T* x;
  const T* gy;     // backward: grad_y
  const float* w9;    // backward: (9, C) float32
  const float* bias;  // backward: (C,) float32 or nullptr
  const T* weight;    // forward: (C, 9) in the input dtype, as given
  const T* bias_t;    // forward: (C,) in the input dtype, or nullptr
  T* out;          // forward: y; backward A: grad_z (or nullptr); backward B: grad_x
  const T* gz;     // backward B: grad_z
  float* gw;       // backward A: (C, 9) accumulators
  float* gb;       // backward A: (C,) accumulators
  DwShape s;
  int act;
};

// The 9 taps and the bias of V channels, as floats.
template <int V>
struct TapWeights {
  float w[9][V];
  float b[V];
};

// Forward: from the (C, 9) weight and (C,) bias in the input dtype (no host-side re-layout,
// which at the 7x7 shapes would cost as much as the op).
template <typename T, int V>
__device__ __forceinline__ void load_weights_native(const DwArgs<T>& a, int c0, TapWeights<V>& tw) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
#pragma unroll
    for (int t = 0; t < 9; ++t) tw.w[t][e] = to_float(a.weight[(c0 + e) * 9 + t]);
    tw.b[e] = a.bias_t != nullptr ? to_float(a.bias_t[c0 + e]) : 0.f;
  }
}

// Backward: from the (9, C) float32 re-layout, 16-byte loads.
template <typename T, int V>
__device__ __forceinline__ void load_weights_taps(const DwArgs<T>& a, int c0, TapWeights<V>& tw) {
#pragma unroll
  for (int t = 0; t < 9; ++t) load_tap<V>(a.w9, t, a.s.C, c0, tw.w[t]);
#pragma unroll
  for (int e = 0; e < V; ++e) tw.b[e] = a.bias != nullptr ? __ldg(a.bias + c0 + e) : 0.f;
}

// z (conv + bias, before the activation) of WB outputs x V channels at (n, ho, w0.., c0..).
template <typename T, int V, int S, int WB>
__device__ __forceinline__ void conv_window(const DwArgs<T>& a, const Item& it, const TapWeights<V>& tw,
                                            float (&z)[WB][V]) {
  const DwShape& s = a.s;
  constexpr int NU = (WB - 1) * S + 3;  // input columns the WB outputs touch
#pragma unroll
  for (int o = 0; o < WB; ++o)
#pragma unroll
    for (int e = 0; e < V; ++e) z[o][e] = tw.b[e];
  const T* xn = a.x + it.n * s.xsN + it.c0 * s.xsC;
#pragma unroll
  for (int kh = 0; kh < 3; ++kh) {
    const int hi = it.row * S - 1 + kh;
    if (hi < 0 || hi >= s.H) continue;
    const T* xrow = xn + hi * s.xsH;
    const int wi0 = it.w0 * S - 1;
#pragma unroll
    for (int u = 0; u < NU; ++u) {
      const int wi = wi0 + u;
      if (wi < 0 || wi >= s.W) continue;
      float xv[V];
      load_channels<T, V>(xrow + wi * s.xsW, xv);
#pragma unroll
      for (int o = 0; o < WB; ++o) {
#pragma unroll
        for (int kw = 0; kw < 3; ++kw) {
          if (o * S + kw == u) {
#pragma unroll
            for (int e = 0; e < V; ++e) z[o][e] = fmaf(tw.w[kh * 3 + kw][e], xv[e], z[o][e]);
          }
        }
      }
    }
  }
}

// kFixedChannels: the launch guarantees that a thread's channel vector is the same for all its
// items (channels_last, grid-stride step a multiple of the channel vectors), so its 9*V weights
// are loaded once, into registers.
template <typename T, int V, int S, int WB, bool kFixedChannels>
__global__ void __launch_bounds__(kFwdThreads) dw_conv3x3_forward_kernel(const DwArgs<T> a) {
  const DwShape& s = a.s;
  const int64_t items = dw_items(s, V, WB, s.Ho, s.Wo);
  const int64_t first = blockIdx.x * static_cast<int64_t>(kFwdThreads) + threadIdx.x;
  TapWeights<V> tw;
  if (kFixedChannels && first < items) load_weights_native<T, V>(a, decode_item(s, first, V, WB, s.Ho, s.Wo).c0, tw);
  for (int64_t idx = first; idx < items; idx += static_cast<int64_t>(gridDim.x) * kFwdThreads) {
    const Item it = decode_item(s, idx, V, WB, s.Ho, s.Wo);
    if (!kFixedChannels) load_weights_native<T, V>(a, it.c0, tw);
    float z[WB][V];
    conv_window<T, V, S, WB>(a, it, tw, z);
    T* yrow = a.out + it.n * s.ysN + it.c0 * s.ysC + it.row * s.ysH;
#pragma unroll
    for (int o = 0; o < WB; ++o) {
      if (it.w0 + o >= s.Wo) break;
#pragma unroll
      for (int e = 0; e < V; ++e) z[o][e] = apply_activation(z[o][e], a.act);
      store_channels<T, V>(yrow + (it.w0 + o) * s.ysW, z[o]);
    }
  }
}

// Backward A: grad_z, grad_weight, grad_bias. kFixedChannels: the launch guarantees that a
// thread's channel vector never changes across its grid-stride loop, so partial sums stay in
// registers until the end; otherwise they are flushed after every item.
template <typename T, int V, int S, int WB, bool kFixedChannels>
__global__ void __launch_bounds__(kThreads) dw_conv3x3_grad_weight_kernel(const DwArgs<T> a, bool smem_acc) {
  extern __shared__ float acc_s[];  // (C, 10): 9 taps + bias, when smem_acc
  const DwShape& s = a.s;
  if (smem_acc) {
    for (int e = threadIdx.x; e < s.C * 10; e += kThreads) acc_s[e] = 0.f;
    __syncthreads();
  }
  float gw[9][V], gb[V];
  auto zero = [&] {
#pragma unroll
    for (int t = 0; t < 9; ++t)
#pragma unroll
      for (int e = 0; e < V; ++e) gw[t][e] = 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e) gb[e] = 0.f;
  };
  auto flush = [&](int c0) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float* dst = smem_acc ? acc_s + (c0 + e) * 10 : nullptr;
#pragma unroll
      for (int t = 0; t < 9; ++t) {
        if (smem_acc) atomicAdd(dst + t, gw[t][e]);
        else atomicAdd(a.gw + (c0 + e) * 9 + t, gw[t][e]);
      }
      if (smem_acc) atomicAdd(dst + 9, gb[e]);
      else atomicAdd(a.gb + c0 + e, gb[e]);
    }
  };
  zero();
  int c_last = -1;
  constexpr int NU = (WB - 1) * S + 3;
  const int64_t items = dw_items(s, V, WB, s.Ho, s.Wo);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < items;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const Item it = decode_item(s, idx, V, WB, s.Ho, s.Wo);
    c_last = it.c0;
    float gz[WB][V];
    const int64_t yoff = it.n * s.ysN + it.c0 * s.ysC + it.row * s.ysH;
#pragma unroll
    for (int o = 0; o < WB; ++o) {
      if (it.w0 + o < s.Wo) {
        load_channels<T, V>(a.gy + yoff + (it.w0 + o) * s.ysW, gz[o]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) gz[o][e] = 0.f;
      }
    }
    if (a.act != kActNone) {
      TapWeights<V> tw;
      load_weights_taps<T, V>(a, it.c0, tw);
      float z[WB][V];
      conv_window<T, V, S, WB>(a, it, tw, z);
#pragma unroll
      for (int o = 0; o < WB; ++o) {
#pragma unroll
        for (int e = 0; e < V; ++e) gz[o][e] *= activation_mask(z[o][e], a.act);
        if (it.w0 + o < s.Wo) store_channels<T, V>(a.out + yoff + (it.w0 + o) * s.ysW, gz[o]);
      }
    }
#pragma unroll
    for (int o = 0; o < WB; ++o)
#pragma unroll
      for (int e = 0; e < V; ++e) gb[e] += gz[o][e];
    const T* xn = a.x + it.n * s.xsN + it.c0 * s.xsC;
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
      const int hi = it.row * S - 1 + kh;
      if (hi < 0 || hi >= s.H) continue;
      const T* xrow = xn + hi * s.xsH;
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        const int wi = it.w0 * S - 1 + u;
        if (wi < 0 || wi >= s.W) continue;
        float xv[V];
        load_channels<T, V>(xrow + wi * s.xsW, xv);
#pragma unroll
        for (int o = 0; o < WB; ++o)
#pragma unroll
          for (int kw = 0; kw < 3; ++kw)
            if (o * S + kw == u) {
#pragma unroll
              for (int e = 0; e < V; ++e) gw[kh * 3 + kw][e] = fmaf(gz[o][e], xv[e], gw[kh * 3 + kw][e]);
            }
      }
    }
    if (!kFixedChannels) {
      flush(it.c0);
      zero();
    }
  }
  if (kFixedChannels && c_last >= 0) flush(c_last);
  if (smem_acc) {
    __syncthreads();
    for (int e = threadIdx.x; e < s.C * 10; e += kThreads) {
      const int c = e / 10, t = e - c * 10;
      if (t < 9) atomicAdd(a.gw + c * 9 + t, acc_s[e]);
      else atomicAdd(a.gb + c, acc_s[e]);
    }
  }
}

// Backward B: grad_x[h, w] = sum over taps (kh, kw) with h = ho*S - 1 + kh, w = wo*S - 1 + kw of
// weight[kh, kw] * grad_z[ho, wo]. A thread owns WB input columns (WB even when S = 2).
template <typename T, int V, int S, int WB>
__global__ void __launch_bounds__(kThreads) dw_conv3x3_grad_input_kernel(const DwArgs<T> a) {
  const DwShape& s = a.s;
  static_assert(S == 1 || WB % 2 == 0, "stride 2 needs an even column group");
  // grad_z columns the WB input columns touch: wo in [wo_base, wo_base + NU).
  constexpr int NU = S == 1 ? WB + 2 : WB / 2 + 1;
  const int64_t items = dw_items(s, V, WB, s.H, s.W);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; idx < items;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const Item it = decode_item(s, idx, V, WB, s.H, s.W);
    float acc[WB][V];
#pragma unroll
    for (int o = 0; o < WB; ++o)
#pragma unroll
      for (int e = 0; e < V; ++e) acc[o][e] = 0.f;
    const T* gzn = a.gz + it.n * s.ysN + it.c0 * s.ysC;
    const int wo_base = S == 1 ? it.w0 - 1 : it.w0 / 2;
#pragma unroll
    for (int kh = 0; kh < 3; ++kh) {
      const int num = it.row + 1 - kh;  // = ho * S
      if (num < 0 || num % S != 0) continue;
      const int ho = num / S;
      if (ho >= s.Ho) continue;
      float w[3][V];
#pragma unroll
      for (int kw = 0; kw < 3; ++kw) load_tap<V>(a.w9, kh * 3 + kw, s.C, it.c0, w[kw]);
      const T* gzrow = gzn + ho * s.ysH;
#pragma unroll
      for (int u = 0; u < NU; ++u) {
        const int wo = wo_base + u;
        if (wo < 0 || wo >= s.Wo) continue;
        float gv[V];
        load_channels<T, V>(gzrow + wo * s.ysW, gv);
#pragma unroll
        for (int o = 0; o < WB; ++o)
#pragma unroll
          for (int kw = 0; kw < 3; ++kw) {
            // input column w0 + o = wo*S - 1 + kw  <=>  wo - wo_base = u
            const bool hit = S == 1 ? (o + 2 - kw == u) : ((o + 1 - kw) >= 0 && (o + 1 - kw) % 2 == 0 && (o + 1 - kw) / 2 == u);
            if (hit) {
#pragma unroll
              for (int e = 0; e < V; ++e) acc[o][e] = fmaf(w[kw][e], gv[e], acc[o][e]);
            }
          }
      }
    }
    T* gxrow = a.out + it.n * s.xsN + it.c0 * s.xsC + it.row * s.xsH;
#pragma unroll
    for (int o = 0; o < WB; ++o) {
      if (it.w0 + o >= s.W) break;
      store_channels<T, V>(gxrow + (it.w0 + o) * s.xsW, acc[o]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

constexpr int kWB = 4;      // output columns per thread (forward, grad_input)
constexpr int kWBGrad = 2;  // output columns per thread in the weight-gradient kernel (registers)

int64_t grid_for(int64_t items, int sms) {
  return std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, static_cast<int64_t>(sms) * 16));
}

void check_dw_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias, int64_t stride) {
  check_x(x, "x");
  check_input(weight, "weight", x);
  const int64_t C = x.size(1);
  FALCONNET_CHECK(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1 && weight.size(2) == 3 &&
                      weight.size(3) == 3,
                  "weight must have shape (", C, ", 1, 3, 3) for x with ", C, " channels, got ", weight.sizes());
  FALCONNET_CHECK(stride == 1 || stride == 2, "stride must be 1 or 2, got ", stride);
  if (bias.has_value()) {
    check_input(*bias, "bias", x);
    FALCONNET_CHECK(bias->dim() == 1 && bias->size(0) == C, "bias must have shape (", C, ",), got ", bias->sizes());
  }
}

// Dispatch a kernel template over (vector width, stride): V = 16-byte vectors when the
// channels_last rows allow it, else 1.
template <typename T, template <typename, int, int> class Launch, typename... Args>
void dispatch_v_s(bool vec, int stride, Args&&... args) {
  constexpr int V = Vec16<T>::kSize;
  if (vec) {
    if (stride == 1) Launch<T, V, 1>::run(args...);
    else Launch<T, V, 2>::run(args...);
  } else {
    if (stride == 1) Launch<T, 1, 1>::run(args...);
    else Launch<T, 1, 2>::run(args...);
  }
}

template <typename T, int V, int S>
struct LaunchForward {
  static void run(const DwArgs<T>& a, int sms, cudaStream_t stream) {
    const int64_t items = dw_items(a.s, V, kWB, a.s.Ho, a.s.Wo);
    const int CV = a.s.C / V;
    const int64_t blocks = (items + kFwdThreads - 1) / kFwdThreads;
    if (a.s.channels_last && kFwdThreads % CV == 0) {
      // One resident wave of blocks, several items per thread: its weights (loaded once into
      // registers) are reused for all of them.
      auto kernel = dw_conv3x3_forward_kernel<T, V, S, kWB, true>;
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kFwdThreads, 0));
      const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(std::max(per_sm, 1)) * sms));
      kernel<<<static_cast<unsigned>(grid), kFwdThreads, 0, stream>>>(a);
    } else {
      const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(blocks, static_cast<int64_t>(sms) * 32));
      dw_conv3x3_forward_kernel<T, V, S, kWB, false><<<static_cast<unsigned>(grid), kFwdThreads, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename T, int V, int S>
struct LaunchGradWeight {
  static void run(const DwArgs<T>& a, int sms, cudaStream_t stream, size_t smem_limit) {
    const int64_t items = dw_items(a.s, V, kWBGrad, a.s.Ho, a.s.Wo);
    const int CV = a.s.C / V;
    const size_t smem = sizeof(float) * 10 * a.s.C;
    const bool smem_acc = smem <= std::min<size_t>(smem_limit, 96 * 1024);
    // Fixed channels per thread when the grid-stride step is a multiple of the channel vectors
    // (channels_last only: there the channel vector is the fastest index).
    const bool fixed = a.s.channels_last && kThreads % CV == 0;
    const int64_t grid = grid_for(items, sms);
    const size_t dyn = smem_acc ? smem : 0;
    if (fixed) {
      auto kernel = dw_conv3x3_grad_weight_kernel<T, V, S, kWBGrad, true>;
      if (dyn > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn)));
      kernel<<<static_cast<unsigned>(grid), kThreads, dyn, stream>>>(a, smem_acc);
    } else {
      auto kernel = dw_conv3x3_grad_weight_kernel<T, V, S, kWBGrad, false>;
      if (dyn > 48 * 1024)
        C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(dyn)));
      kernel<<<static_cast<unsigned>(grid), kThreads, dyn, stream>>>(a, smem_acc);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename T, int V, int S>
struct LaunchGradInput {
  static void run(const DwArgs<T>& a, int sms, cudaStream_t stream) {
    const int64_t items = dw_items(a.s, V, kWB, a.s.H, a.s.W);
    dw_conv3x3_grad_input_kernel<T, V, S, kWB><<<static_cast<unsigned>(grid_for(items, sms)), kThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// Backward prologue and epilogue as one small kernel each (instead of several ATen launches,
// which at the 7x7 shapes would cost as much as the op). Prologue: weights as float32 (9, C), the
// V channels of one tap contiguous for 16-byte loads, and the bias as float32 (zeros if none).
template <typename T>
__global__ void __launch_bounds__(kThreads) dw_prepare_weights(const T* weight, const T* bias, float* w9, float* bias_f,
                                                               int C) {
  for (int e = blockIdx.x * kThreads + threadIdx.x; e < 10 * C; e += gridDim.x * kThreads) {
    if (e < 9 * C) {
      const int tap = e / C, c = e - tap * C;
      w9[e] = to_float(weight[c * 9 + tap]);
    } else {
      const int c = e - 9 * C;
      bias_f[c] = bias != nullptr ? to_float(bias[c]) : 0.f;
    }
  }
}

// Epilogue: the float32 sums (C, 9) and (C,) to the dtype.
template <typename T>
__global__ void __launch_bounds__(kThreads) dw_finalize_grads(const float* acc, T* grad_weight, T* grad_bias, int C) {
  for (int e = blockIdx.x * kThreads + threadIdx.x; e < 10 * C; e += gridDim.x * kThreads) {
    if (e < 9 * C) grad_weight[e] = from_float<T>(acc[e]);
    else grad_bias[e - 9 * C] = from_float<T>(acc[e]);
  }
}

template <typename T>
bool vector_ok(const DwShape& s, std::initializer_list<const void*> ptrs) {
  if (!s.channels_last || s.C % Vec16<T>::kSize != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && !aligned16(p)) return false;
  return true;
}

at::Tensor dw_conv3x3_forward_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, int64_t stride, c10::string_view activation) {
  check_dw_args(x_in, weight, bias, stride);
  const int act = parse_activation(std::string(activation.data(), activation.size()));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = is_channels_last(x_in);
  const auto fmt = memory_format_of(cl);
  const at::Tensor x = x_in.contiguous(fmt);
  const DwShape s = make_dw_shape(x, static_cast<int>(stride), cl);
  at::Tensor y = at::empty({s.N, s.C, s.Ho, s.Wo}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  const at::Tensor w = weight.contiguous();  // (C, 1, 3, 3): tap t of channel c at c*9 + t
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int sms = num_sms(x.get_device());
  cudaStream_t stream = current_stream();
  FALCONNET_DISPATCH_FLOATING(x.scalar_type(), "dw_conv3x3_forward", [&] {
    DwArgs<scalar_t> a{};
    a.x = x.data_ptr<scalar_t>();
    a.weight = w.data_ptr<scalar_t>();
    a.bias_t = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    a.out = y.data_ptr<scalar_t>();
    a.s = s;
    a.act = act;
    const bool vec = vector_ok<scalar_t>(s, {a.x, a.out});
    dispatch_v_s<scalar_t, LaunchForward>(vec, s.stride, a, sms, stream);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dw_conv3x3_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, int64_t stride, c10::string_view activation) {
  check_dw_args(x_in, weight, bias, stride);
  check_input(grad_y_in, "grad_y", x_in);
  const int act = parse_activation(std::string(activation.data(), activation.size()));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = is_channels_last(x_in);
  const auto fmt = memory_format_of(cl);
  const at::Tensor x = x_in.contiguous(fmt);
  const DwShape s = make_dw_shape(x, static_cast<int>(stride), cl);
  FALCONNET_CHECK(grad_y_in.sizes() == at::IntArrayRef({s.N, s.C, s.Ho, s.Wo}), "grad_y must have the output's shape (",
                  s.N, ", ", s.C, ", ", s.Ho, ", ", s.Wo, "), got ", grad_y_in.sizes());
  const at::Tensor gy = grad_y_in.contiguous(fmt);  // indexed with the output strides of x's layout

  at::Tensor gx = at::empty_like(x, x.options().memory_format(fmt));
  if (x.numel() == 0) return {gx, at::zeros_like(weight), at::zeros({s.C}, x.options())};
  at::Tensor grad_weight = at::empty({s.C, 1, 3, 3}, weight.options());
  at::Tensor grad_bias = at::empty({s.C}, x.options());
  {
    const at::Tensor w = weight.contiguous();
    const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
    // One float32 scratch: w9 (9, C) | bias (C) | sums of grad_weight (C, 9) | grad_bias (C).
    at::Tensor scratch = at::empty({20 * static_cast<int64_t>(s.C)}, x.options().dtype(at::kFloat));
    float* w9 = scratch.data_ptr<float>();
    float* bias_f = w9 + 9 * s.C;
    float* acc = w9 + 10 * s.C;
    C10_CUDA_CHECK(cudaMemsetAsync(acc, 0, sizeof(float) * 10 * s.C, current_stream()));
    const int small_grid = std::min((10 * s.C + kThreads - 1) / kThreads, 1024);
    const int dev = x.get_device();
    const int sms = num_sms(dev);
    const size_t smem_limit = smem_optin_limit(dev);
    cudaStream_t stream = current_stream();
    // grad_z differs from grad_y only under an activation; then it is materialized once.
    at::Tensor gz = act == kActNone ? gy : at::empty_like(gy, gy.options().memory_format(fmt));
    FALCONNET_DISPATCH_FLOATING(x.scalar_type(), "dw_conv3x3_backward", [&] {
      dw_prepare_weights<scalar_t><<<small_grid, kThreads, 0, stream>>>(
          w.data_ptr<scalar_t>(), bias_c.defined() ? bias_c.data_ptr<scalar_t>() : nullptr, w9, bias_f, s.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      DwArgs<scalar_t> a{};
      a.x = x.data_ptr<scalar_t>();
      a.gy = gy.data_ptr<scalar_t>();
      a.w9 = w9;
      a.bias = bias_f;
      a.out = act == kActNone ? nullptr : gz.data_ptr<scalar_t>();
      a.gw = acc;
      a.gb = acc + 9 * s.C;
      a.s = s;
      a.act = act;
      const bool vec = vector_ok<scalar_t>(s, {a.x, a.gy, a.out, gx.data_ptr()});
      dispatch_v_s<scalar_t, LaunchGradWeight>(vec, s.stride, a, sms, stream, smem_limit);
      DwArgs<scalar_t> b = a;
      b.gz = gz.data_ptr<scalar_t>();
      b.out = gx.data_ptr<scalar_t>();
      dispatch_v_s<scalar_t, LaunchGradInput>(vec, s.stride, b, sms, stream);
      dw_finalize_grads<scalar_t><<<small_grid, kThreads, 0, stream>>>(acc, grad_weight.data_ptr<scalar_t>(),
                                                                        grad_bias.data_ptr<scalar_t>(), s.C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gx, grad_weight, grad_bias};
}

}  // namespace
}  // namespace falconnet_cuda

TORCH_LIBRARY_IMPL(falconnet_C, CUDA, m) {
  m.impl("dw_conv3x3_forward", &falconnet_cuda::dw_conv3x3_forward_cuda);
  m.impl("dw_conv3x3_backward", &falconnet_cuda::dw_conv3x3_backward_cuda);
}
