// The low-rank backward kernels for __half (lowrank_backward.cuh), one dtype per translation unit.
#include "lowrank_backward.cuh"

namespace peftkern::kernels::lowrank_backward_detail {
template cudaError_t launch<__half>(const LowRankBackwardArgs&, const Plan&, unsigned char*, bool, cudaStream_t);
}  // namespace peftkern::kernels::lowrank_backward_detail
