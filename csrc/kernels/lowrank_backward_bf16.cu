// The low-rank backward kernels for __nv_bfloat16 (lowrank_backward.cuh), one dtype per translation unit.
#include "lowrank_backward.cuh"

namespace peftkern::kernels::lowrank_backward_detail {
template cudaError_t launch<__nv_bfloat16>(const LowRankBackwardArgs&, const Plan&, unsigned char*, bool, cudaStream_t);
}  // namespace peftkern::kernels::lowrank_backward_detail
