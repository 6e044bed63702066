// The dropout-factor kernel (see dropout.h): one thread per four columns of a row, grid-stride.
#include <algorithm>

#include "dropout.h"
#include "kernel_types.h"
#include "philox.h"

namespace peftkern::kernels {
namespace {

constexpr int kDropoutThreads = 256;

__global__ void __launch_bounds__(kDropoutThreads) dropout_mask_kernel(int64_t rows, int64_t cols, const DropoutArgs d, float* out) {
  const SeedOffset so = resolve_seed_offset(d);
  if (d.seed_offset_out && blockIdx.x == 0 && threadIdx.x == 0) {
    d.seed_offset_out[0] = int64_t(so.seed);
    d.seed_offset_out[1] = int64_t(so.offset);
  }
  const int64_t groups = ceil_div<int64_t>(cols, 4);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < rows * groups;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / groups, q = i % groups;
    float f[4];
    dropout_factors4(so.seed, so.offset, row, q, d.p, f);
    for (int e = 0; e < 4 && q * 4 + e < cols; ++e) out[row * cols + q * 4 + e] = f[e];
  }
}

}  // namespace

cudaError_t dropout_mask(int64_t rows, int64_t cols, const DropoutArgs& dropout, float* out, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  const int64_t groups = rows * ceil_div<int64_t>(cols, 4);
  const int64_t blocks = std::min<int64_t>(ceil_div<int64_t>(groups, kDropoutThreads), 65535);
  dropout_mask_kernel<<<static_cast<unsigned>(blocks), kDropoutThreads, 0, stream>>>(rows, cols, dropout, out);
  return cudaGetLastError();
}

}  // namespace peftkern::kernels
