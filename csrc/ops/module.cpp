// The Python module peftkern._C. It binds no op: ops are reached through torch.ops.peftkern.*,
// registered when this library loads. It only reports what was compiled.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <sstream>
#include <string>

#ifdef PEFTKERN_WITH_CUDA
#include <cuda_runtime_api.h>

#include "kernels/build_info.h"
#include "kernels/lowrank.h"
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  py::list archs;
#ifdef PEFTKERN_WITH_CUDA
  // nvcc's __CUDA_ARCH_LIST__, e.g. "800,900" -> ["8.0", "9.0"]
  std::stringstream ss(peftkern::kernels::compiled_cuda_archs());
  for (std::string arch; std::getline(ss, arch, ',');)
    if (!arch.empty()) {
      const int v = std::stoi(arch);
      archs.append(std::to_string(v / 100) + "." + std::to_string(v % 100 / 10));
    }
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["lowrank_fused_max_rank"] = peftkern::kernels::kLowRankMaxFusedRank;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
#endif
  info["cuda_archs"] = archs;
  info["torch_version"] = TORCH_VERSION;
#ifdef PEFTKERN_BUILT_WITH_CMAKE
  info["build_system"] = "cmake";
#else
  info["build_system"] = "setuptools";
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "peftkern's compiled ops (registered under torch.ops.peftkern)";
  m.def("build_info", &build_info,
        "What this build of peftkern compiled: CUDA or not, CUDA version, archs, torch version.");
}
