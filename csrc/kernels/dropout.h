// LoRA's dropout on x: the argument structs the low-rank kernels take, and a launcher that writes
// the dropout factors themselves (for the dropout_mask op and the slow path). The mask is the
// Philox function of philox.h, so a (seed, offset) pair gives one mask on the CPU and the GPU.
// Raw pointers and a stream; no torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace peftkern::kernels {

// Where a launch takes its Philox seed and offset: values, or device pointers inside a CUDA graph
// capture (a torch-free mirror of at::PhiloxCudaState).
struct PhiloxArgs {
  uint64_t seed = 0, offset = 0;
  const int64_t* seed_ptr = nullptr;
  const int64_t* offset_ptr = nullptr;
  uint64_t offset_intragraph = 0;
  bool captured = false;
};

// Dropout on x (see philox.h for the mask). p == 0: none.
struct DropoutArgs {
  float p = 0.f;
  PhiloxArgs philox;                     // forward: drawn from the generator
  int64_t* seed_offset_out = nullptr;    // forward: receives the (seed, offset) used, device [2]
  const int64_t* seed_offset = nullptr;  // backward and mask: the forward's (seed, offset), device [2]
};

// The dropout factors (0 or 1/(1-p)) the kernels apply to x [rows, cols], written as float32,
// for the seed and offset of `dropout` (a saved pair, or the generator's; then also written to
// dropout.seed_offset_out when set).
cudaError_t dropout_mask(int64_t rows, int64_t cols, const DropoutArgs& dropout, float* out, cudaStream_t stream);

#if defined(__CUDACC__)
struct SeedOffset {
  uint64_t seed, offset;
};

// The launch's Philox seed and offset: the forward's saved pair, or the generator's state (read
// from device memory when the launch was captured in a CUDA graph).
__device__ __forceinline__ SeedOffset resolve_seed_offset(const DropoutArgs& d) {
  if (d.seed_offset) return {uint64_t(d.seed_offset[0]), uint64_t(d.seed_offset[1])};
  const PhiloxArgs& p = d.philox;
  if (p.captured) return {uint64_t(*p.seed_ptr), uint64_t(*p.offset_ptr) + p.offset_intragraph};
  return {p.seed, p.offset};
}
#endif

}  // namespace peftkern::kernels
