// What the torch-free launcher tests share: CUDA error checks, the "no GPU: skipped" exit, host
// conversions to and from the kernels' element types, device buffers, and the comparisons.
// Host code only (compiled by the host C++ compiler, linked against the kernels library).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/kernel_types.h"

#define CHECK_CUDA(expr)                                                                         \
  do {                                                                                           \
    const cudaError_t e_ = (expr);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)

namespace launcher_test {

// CTest's SKIP_RETURN_CODE: the test ran on a machine without a (suitable) GPU.
constexpr int kSkipped = 77;

// True when a CUDA device is visible; otherwise prints why the test is skipped.
inline bool gpu_available() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return false;
  }
  return true;
}

// ------------------------------------------------------------------ element types

template <typename T> constexpr peftkern::DType dtype_of();
template <> constexpr peftkern::DType dtype_of<float>() { return peftkern::DType::kFloat32; }
template <> constexpr peftkern::DType dtype_of<__half>() { return peftkern::DType::kFloat16; }
template <> constexpr peftkern::DType dtype_of<__nv_bfloat16>() { return peftkern::DType::kBFloat16; }

template <typename T> const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>)
    return "f32";
  else if constexpr (std::is_same_v<T, __half>)
    return "f16";
  else
    return "bf16";
}

// double -> T (round to nearest even, as the kernels' from_float) and back. Integer types convert
// as integers.
template <typename T> inline T from_double(double v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return __float2bfloat16_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<T, __half>)
    return __float2half_rn(static_cast<float>(v));
  else
    return static_cast<T>(v);
}
template <typename T> inline double to_double(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    return static_cast<double>(__bfloat162float(v));
  else if constexpr (std::is_same_v<T, __half>)
    return static_cast<double>(__half2float(v));
  else
    return static_cast<double>(v);
}
// The value a kernel sees after v is stored as T: references are computed from rounded inputs.
template <typename T> inline double round_to(double v) { return to_double(from_double<T>(static_cast<float>(v))); }
template <typename T> inline void round_all(std::vector<double>& v) {
  for (auto& e : v) e = round_to<T>(e);
}

// ------------------------------------------------------------------ device buffers

// n elements of T on the device (plus 16 bytes of slack, so a vector access at the end stays inside
// the allocation). Not copyable.
template <typename T> struct Device {
  T* ptr = nullptr;
  size_t n = 0;
  // Filled with 0xFF bytes: NaN for floating types, -1 for integers, so an element a kernel should
  // have written but did not makes the comparison fail.
  explicit Device(size_t count) : n(count) {
    CHECK_CUDA(cudaMalloc(reinterpret_cast<void**>(&ptr), n * sizeof(T) + 16));
    CHECK_CUDA(cudaMemset(ptr, 0xFF, n * sizeof(T) + 16));
  }
  // host values converted to T
  explicit Device(const std::vector<double>& host) : Device(host.size()) {
    std::vector<T> tmp(n);
    for (size_t i = 0; i < n; ++i) tmp[i] = from_double<T>(host[i]);
    upload(tmp);
  }
  // host values as they are (integers, packed bits)
  static Device raw(const std::vector<T>& host) {
    Device d(host.size());
    d.upload(host);
    return d;
  }
  Device(Device&& o) noexcept : ptr(o.ptr), n(o.n) { o.ptr = nullptr; }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  ~Device() { cudaFree(ptr); }

  void upload(const std::vector<T>& host) {
    CHECK_CUDA(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> raw_host() const {
    std::vector<T> tmp(n);
    CHECK_CUDA(cudaMemcpy(tmp.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost));
    return tmp;
  }
  std::vector<double> host() const {
    const std::vector<T> tmp = raw_host();
    std::vector<double> out(n);
    for (size_t i = 0; i < n; ++i) out[i] = to_double(tmp[i]);
    return out;
  }
};

// ------------------------------------------------------------------ comparisons

// ||got - want|| / ||want|| <= tol; any non-finite element of got fails (unwritten outputs are NaN).
inline bool close(const std::string& what, const std::vector<double>& got, const std::vector<double>& want,
                  double tol) {
  if (got.size() != want.size()) {
    std::printf("FAIL %s: %zu elements, expected %zu\n", what.c_str(), got.size(), want.size());
    return false;
  }
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      std::printf("FAIL %s: element %zu is %f\n", what.c_str(), i, got[i]);
      return false;
    }
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);  // all-zero reference: absolute
  const bool ok = err <= tol;                                          // false for a NaN error
  std::printf("%s %s: relative error %.3g (tolerance %.0e)\n", ok ? "ok  " : "FAIL", what.c_str(), err, tol);
  return ok;
}

// Element for element equality (masks, packed bits, copies); prints the first mismatch.
template <typename T>
inline bool equal(const std::string& what, const std::vector<T>& got, const std::vector<T>& want) {
  if (got.size() != want.size()) {
    std::printf("FAIL %s: %zu elements, expected %zu\n", what.c_str(), got.size(), want.size());
    return false;
  }
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(got[i] == want[i])) {  // NaN never matches
      std::printf("FAIL %s: element %zu is %.9g, expected %.9g\n", what.c_str(), i, double(got[i]), double(want[i]));
      return false;
    }
  }
  std::printf("ok   %s: %zu elements equal\n", what.c_str(), got.size());
  return true;
}

}  // namespace launcher_test
