"""Builds peftkern._C with torch's BuildExtension (ninja).

CUDA kernels are compiled when torch is a CUDA build and a CUDA toolkit is found (CUDA_HOME, or
/usr/local/cuda); no GPU is needed to compile them. Otherwise the build is CPU-only and says so.
Install with the torch already in the environment:  pip install --no-build-isolation -e .

Environment:
  TORCH_CUDA_ARCH_LIST  target archs, default scripts/build_config.py's (Ampere, Hopper)
  PEFTKERN_CPU_ONLY=1   skip the CUDA kernels even when a toolkit is there
  MAX_JOBS              parallel compile jobs (nvcc is memory-hungry)
  PEFTKERN_REQUIRE_CUDA_ARCHS  fail instead of falling back to a CPU-only build (CI sets it)
"""

import glob
import os
import re
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import build_config  # noqa: E402  (the build defaults, shared with CMakeLists.txt)


def log(msg):
    print(f"peftkern setup: {msg}", file=sys.stderr, flush=True)


def find_cuda_home():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def nvcc_version(cuda_home):
    out = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True
    ).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_library_header_dirs(cuda_home):
    """Where cublas_v2.h / cusparse.h live when the toolkit lacks them (torch's nvidia wheels)."""
    return [] if build_config.toolkit_has_library_headers(cuda_home) else build_config.wheel_include_dirs()


import torch  # noqa: E402

cuda_home = None if os.environ.get("PEFTKERN_CPU_ONLY") == "1" else find_cuda_home()
with_cuda = torch.version.cuda is not None and cuda_home is not None
if with_cuda:
    os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", build_config.DEFAULT_CUDA_ARCHS)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

sources = sorted(glob.glob("csrc/ops/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cxx_flags = ["-O3"]
nvcc_flags = ["-O3", "-lineinfo"]
define_macros = []
if with_cuda:
    version = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if version and version[0] != torch_major:
        log(
            f"WARNING: nvcc is CUDA {version[0]}.{version[1]} but torch was built with CUDA "
            f"{torch.version.cuda}; the build may fail or the kernels may not load"
        )
    sources += sorted(glob.glob("csrc/kernels/*.cu"))
    for inc in cuda_library_header_dirs(cuda_home):
        cxx_flags += ["-idirafter", inc]  # after the toolkit's own headers
    define_macros.append(("PEFTKERN_WITH_CUDA", None))
    shown = f"{version[0]}.{version[1]}" if version else "(unknown version)"
    log(
        f"building with CUDA kernels: nvcc {shown} at {cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}"
    )
    Extension = CUDAExtension
    extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
else:
    reason = (
        "PEFTKERN_CPU_ONLY=1"
        if os.environ.get("PEFTKERN_CPU_ONLY") == "1"
        else "torch is a CPU build"
        if torch.version.cuda is None
        else "no CUDA toolkit found (set CUDA_HOME)"
    )
    if os.environ.get("PEFTKERN_REQUIRE_CUDA_ARCHS"):
        sys.exit(
            f"peftkern setup: PEFTKERN_REQUIRE_CUDA_ARCHS is set but the CUDA kernels cannot be "
            f"built: {reason}"
        )
    log(f"building CPU-only ({reason}): no CUDA kernels")
    Extension = CppExtension
    extra = {"cxx": cxx_flags}

ext = Extension(
    name="peftkern._C",
    sources=sources,
    include_dirs=[os.path.join(ROOT, "csrc")],
    define_macros=define_macros,
    extra_compile_args=extra,
)


class PersistentBuildExtension(BuildExtension):
    """BuildExtension that keeps its objects (and ninja's log) in build/ across builds.

    pip's editable install points build_temp at a fresh temporary folder on every run, so ninja found
    no objects and recompiled everything (7 min on 2 cores). A fixed folder lets ninja rebuild only
    what changed (it tracks headers through nvcc's and gcc's depfiles)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", f"temp-{sys.implementation.cache_tag}")


setup(
    packages=find_packages(include=["peftkern", "peftkern.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": PersistentBuildExtension.with_options(use_ninja=True)},
)
