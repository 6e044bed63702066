"""Build defaults, in one place for setup.py and CMakeLists.txt.

python scripts/build_config.py archs       the default TORCH_CUDA_ARCH_LIST
python scripts/build_config.py wheel-cuda  "<libnvrtc path>|<include dir>;<include dir>..." from torch's
                                           nvidia-* wheels (a minimal toolkit may lack libnvrtc and the
                                           cuBLAS/cuSPARSE headers that torch's CUDA headers include)
"""

import glob
import os
import re
import sys

DEFAULT_CUDA_ARCHS = "8.0;9.0"  # Ampere, Hopper
_LIBRARY_HEADERS = ("cublas_v2.h", "cusparse.h")


def _nvidia_roots():
    try:
        import nvidia  # namespace package of the nvidia-* wheels that torch depends on
    except ImportError:
        return []
    return list(nvidia.__path__)


def wheel_include_dirs():
    """The nvidia-wheel include dirs holding cuBLAS / cuSPARSE headers."""
    return [
        inc
        for root in _nvidia_roots()
        for inc in sorted(glob.glob(os.path.join(root, "*", "include")))
        if any(os.path.exists(os.path.join(inc, h)) for h in _LIBRARY_HEADERS)
    ]


def wheel_nvrtc():
    """libnvrtc.so.<major> from the nvidia wheels, or ""."""
    libs = [
        p
        for root in _nvidia_roots()
        for p in glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so.*"))
        if re.search(r"libnvrtc\.so\.\d+$", p)
    ]
    return (sorted(libs) or [""])[0]


def toolkit_has_library_headers(cuda_home):
    return os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h"))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what == "archs":
        sys.stdout.write(DEFAULT_CUDA_ARCHS)
    elif what == "wheel-cuda":
        sys.stdout.write(wheel_nvrtc() + "|" + ";".join(wheel_include_dirs()))
    else:
        sys.exit(__doc__)
