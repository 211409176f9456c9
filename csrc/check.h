// FALCONNET_CHECK(cond, parts...): TORCH_CHECK with the message built here, as one std::string,
// without std::ostream's number formatting.
//
// On the H100 machine (torch 2.11.0+cu130, g++ 13.3, 2026-11-26/27), a TORCH_CHECK whose message
// streamed an integer (an int64_t, or an IntArrayRef / Device, which print theirs) killed the
// process with SIGSEGV instead of raising; one streaming only string literals, a std::string or
// a ScalarType raised. The same held for a check compiled by g++ as by nvcc
// (benchmarks/results/2026-11-27-h100/segv_probe.py). Integers are therefore turned into text by
// std::to_string, and c10::str receives a single std::string, which it passes on unstreamed.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>
#include <string_view>
#include <type_traits>

namespace falconnet {
namespace check_detail {

inline std::string part(std::string_view s) { return std::string(s); }
inline std::string part(const std::string& s) { return s; }  // exact: c10::Device converts from a string too
inline std::string part(const char* s) { return s; }
inline std::string part(at::ScalarType t) { return c10::toString(t); }

inline std::string part(at::IntArrayRef sizes) {  // "[2, 3]", as c10 prints a shape
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

inline std::string part(const c10::Device& d) {  // "cpu", "cuda:1"
  std::string out = c10::DeviceTypeName(d.type(), /*lower_case=*/true);
  return d.has_index() ? out + ":" + std::to_string(static_cast<int>(d.index())) : out;
}

template <typename T, std::enable_if_t<std::is_integral_v<T> || std::is_floating_point_v<T>, int> = 0>
std::string part(T v) {
  return std::to_string(v);
}

}  // namespace check_detail

template <typename... Args>
std::string check_message(const Args&... args) {
  std::string out;
  ((out += check_detail::part(args)), ...);
  return out;
}

}  // namespace falconnet

#define FALCONNET_CHECK(cond, ...) TORCH_CHECK(cond, ::falconnet::check_message(__VA_ARGS__))
