// Mask tuning by ATen ops (any device): the keep mask, and the packed-bit layout of
// csrc/kernels/mask.h. peftkern's CPU path, and the CUDA path's slow cases.
#pragma once

#include <ATen/core/Tensor.h>

namespace peftkern::cpu {

// bool [..]: float32(scores) > float32(threshold) (strict; NaN is dropped).
at::Tensor keep_mask(const at::Tensor& scores, double threshold);

// int32 [rows, ceil(cols / 32)] from a bool [rows, cols] mask: bit j of word w is column 32 w + j.
at::Tensor pack_bits(const at::Tensor& keep);

// bool [rows, cols] from packed bits.
at::Tensor unpack_bits(const at::Tensor& bits, int64_t cols);

}  // namespace peftkern::cpu
