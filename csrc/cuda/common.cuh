// Shared helpers of the CUDA kernels: argument checks, layouts, activations, 16-byte vectors.
#pragma once

// Not ATen/cuda/CUDAContext.h: it pulls in cusolverDn.h, which this machine's toolkit lacks.
// Only the headers used (not <ATen/ATen.h>, every op's declaration, parsed twice by nvcc)
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "../check.h"

#include <cstdint>
#include <string>

namespace falconnet_cuda {

// ---------------------------------------------------------------------------------------------
// Activations. Runtime codes: the activation only touches the epilogue, so a uniform branch
// costs less than tripling the number of kernel instantiations.

enum Activation : int { kActNone = 0, kActRelu = 1, kActRelu6 = 2 };

inline int parse_activation(const std::string& activation) {
  if (activation == "none") return kActNone;
  if (activation == "relu") return kActRelu;
  if (activation == "relu6") return kActRelu6;
  FALCONNET_CHECK(false, "activation must be one of ('none', 'relu', 'relu6'), got '", activation, "'");
  return kActNone;
}

// NaN propagates as in torch.relu / relu6 (a comparison with NaN is false).
__device__ __forceinline__ float apply_activation(float z, int act) {
  if (act == kActRelu) return z < 0.f ? 0.f : z;
  if (act == kActRelu6) return z < 0.f ? 0.f : (z > 6.f ? 6.f : z);
  return z;
}

// d act / dz as a 0/1 mask, the derivative PyTorch's relu and relu6 use (reference.activation_grad).
__device__ __forceinline__ float activation_mask(float z, int act) {
  if (act == kActRelu) return z > 0.f ? 1.f : 0.f;
  if (act == kActRelu6) return (z > 0.f && z < 6.f) ? 1.f : 0.f;
  return 1.f;
}

// ---------------------------------------------------------------------------------------------
// Element conversion. c10::Half / c10::BFloat16 convert to and from float on the device
// (bf16 -> f32 is a shift; f32 -> bf16/f16 rounds to nearest even).

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// 16 bytes of T: 8 bf16/f16 or 4 f32. Loads and stores of Vec16 compile to LDG.128 / STG.128.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / static_cast<int>(sizeof(T));
  T v[kSize];
};

template <typename T>
__device__ __forceinline__ Vec16<T> load_vec16(const T* p) {
  return *reinterpret_cast<const Vec16<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_vec16(T* p, const Vec16<T>& v) {
  *reinterpret_cast<Vec16<T>*>(p) = v;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15) == 0; }

// ---------------------------------------------------------------------------------------------
// cp.async (sm_80+): 16-byte global -> shared copies that complete in the background, so the
// next tile's loads are in flight while the current tile is computed.

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ---------------------------------------------------------------------------------------------
// Layouts. The Python op hands over NCHW-contiguous or channels_last tensors; the output takes
// x's format, channels_last exactly when x is channels_last and not also plain-contiguous
// (the rule of falconnet_kernels.ops._out_format).

inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

inline at::MemoryFormat memory_format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline const char* device_type_name(const at::Tensor& t) {
  return t.is_cuda() ? "cuda" : t.is_cpu() ? "cpu" : t.is_meta() ? "meta" : "a non-CUDA device";
}

// Boundary checks: every tensor on x's CUDA device with x's dtype; errors name the argument.
inline void check_input(const at::Tensor& t, const char* name, const at::Tensor& x) {
  FALCONNET_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", device_type_name(t));
  FALCONNET_CHECK(t.get_device() == x.get_device(), name, " must be on x's device (cuda:", static_cast<int>(x.get_device()),
                  "), got cuda:", static_cast<int>(t.get_device()));
  FALCONNET_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype (", x.scalar_type(), "), got ",
                  t.scalar_type());
}

inline void check_x(const at::Tensor& x, const char* name) {
  FALCONNET_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", device_type_name(x));
  FALCONNET_CHECK(x.dim() == 4, name, " must be a 4-D (N, C, H, W) tensor, got shape ", x.sizes());
  const auto st = x.scalar_type();
  FALCONNET_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, name,
                  " must be float32, float16 or bfloat16 on CUDA, got ", st);
}

inline int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

inline int num_sms(int device) { return device_attribute(cudaDevAttrMultiProcessorCount, device); }

// Shared memory one block may use after opting in (cudaFuncSetAttribute), 227 KB on Hopper.
inline size_t smem_optin_limit(int device) {
  return static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace falconnet_cuda

// Dispatch over the three CUDA dtypes, naming the C++ type scalar_t inside.
#define FALCONNET_DISPATCH_FLOATING(TYPE, NAME, ...)                                   \
  [&] {                                                                                \
    switch (TYPE) {                                                                    \
      case at::kFloat: {                                                               \
        using scalar_t = float;                                                        \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case at::kHalf: {                                                                \
        using scalar_t = c10::Half;                                                    \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      case at::kBFloat16: {                                                            \
        using scalar_t = c10::BFloat16;                                                \
        return __VA_ARGS__();                                                          \
      }                                                                                \
      default:                                                                         \
        FALCONNET_CHECK(false, NAME, ": unsupported dtype ", TYPE);                    \
    }                                                                                  \
  }()
