// What nvcc compiled, as seen from inside a .cu file.
#pragma once

namespace peftkern::kernels {

// nvcc's __CUDA_ARCH_LIST__ for this build, e.g. "800,900".
const char* compiled_cuda_archs();

}  // namespace peftkern::kernels
