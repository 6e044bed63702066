// Philox seeds for peftkern's CUDA kernels from torch's CUDA generator: follows torch.manual_seed
// and is safe inside CUDA graph capture (the kernel then reads seed and offset from device memory).
#pragma once

#ifdef PEFTKERN_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>

#include <mutex>

#include "kernels/dropout.h"

namespace peftkern::ops {

// Advances the default generator of `device` by `increment` (a multiple of 4) and returns the
// state to use: every (row, column group) of one launch takes its own Philox counter.
inline kernels::PhiloxArgs next_cuda_philox(const at::Device& device, uint64_t increment = 4) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(increment);
  }
  kernels::PhiloxArgs args;
  args.captured = state.captured_;
  if (state.captured_) {
    args.seed_ptr = state.seed_.ptr;
    args.offset_ptr = state.offset_.ptr;
    args.offset_intragraph = state.offset_intragraph_;
  } else {
    args.seed = state.seed_.val;
    args.offset = state.offset_.val;
  }
  return args;
}

}  // namespace peftkern::ops
#endif
