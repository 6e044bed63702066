#include "cpu/mask.h"

#include <ATen/ATen.h>

#include "kernels/kernel_types.h"

namespace peftkern::cpu {

at::Tensor keep_mask(const at::Tensor& scores, double threshold) {
  return scores.to(at::kFloat).gt(static_cast<float>(threshold));
}

at::Tensor pack_bits(const at::Tensor& keep) {
  const int64_t rows = keep.size(0), cols = keep.size(1), words = mask_words(cols);
  const at::Tensor padded = at::constant_pad_nd(keep.to(at::kLong), {0, words * 32 - cols});
  const at::Tensor pow2 = at::ones({32}, keep.options().dtype(at::kLong))
                              .bitwise_left_shift(at::arange(32, keep.options().dtype(at::kLong)));
  // sum_j bit_j * 2^j in int64, then wrapped to int32 (bit 31 becomes the sign bit)
  return (padded.view({rows, words, 32}) * pow2).sum(-1).to(at::kInt);
}

at::Tensor unpack_bits(const at::Tensor& bits, int64_t cols) {
  const int64_t rows = bits.size(0), words = bits.size(1);
  const at::Tensor shifts = at::arange(32, bits.options());
  return bits.unsqueeze(-1)
      .bitwise_right_shift(shifts)
      .bitwise_and(1)
      .reshape({rows, words * 32})  // a view unless bits was strided
      .narrow(1, 0, cols)
      .to(at::kBool);
}

}  // namespace peftkern::cpu
