#include "cpu/dropout.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <mutex>

#include "kernels/philox.h"

namespace peftkern::cpu {

at::Tensor dropout_mask(int64_t rows, int64_t cols, uint64_t seed, uint64_t offset, double p) {
  at::Tensor out = at::empty({rows, cols}, at::kFloat);
  float* data = out.data_ptr<float>();
  const int64_t groups = ceil_div<int64_t>(cols, 4);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      for (int64_t q = 0; q < groups; ++q) {
        float f[4];
        dropout_factors4(seed, offset, row, q, static_cast<float>(p), f);
        for (int64_t e = 0; e < 4 && q * 4 + e < cols; ++e) data[row * cols + q * 4 + e] = f[e];
      }
  });
  return out;
}

std::pair<uint64_t, uint64_t> next_seed_offset() {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  return {gen->random64(), 0};
}

}  // namespace peftkern::cpu
