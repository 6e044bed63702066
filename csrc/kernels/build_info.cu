#include "build_info.h"

#define PEFTKERN_STRINGIFY_(...) #__VA_ARGS__
#define PEFTKERN_STRINGIFY(...)  PEFTKERN_STRINGIFY_(__VA_ARGS__)

namespace peftkern::kernels {

const char* compiled_cuda_archs() {
#ifdef __CUDA_ARCH_LIST__
  return PEFTKERN_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

}  // namespace peftkern::kernels
