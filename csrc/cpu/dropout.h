// peftkern's dropout on the CPU: the Philox mask of csrc/kernels/philox.h (the same one the CUDA
// kernels generate for a given seed and offset), and seeds drawn from torch's CPU generator.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>

namespace peftkern::cpu {

// float32 [rows, cols] of dropout factors: 1/(1-p) where an element is kept, 0 where dropped.
at::Tensor dropout_mask(int64_t rows, int64_t cols, uint64_t seed, uint64_t offset, double p);

// A fresh (seed, offset) from torch's default CPU generator (follows torch.manual_seed).
std::pair<uint64_t, uint64_t> next_seed_offset();

}  // namespace peftkern::cpu
