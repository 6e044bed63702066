"""What the build compiled, as peftkern.build_info() reports it (CI sets PEFTKERN_REQUIRE_CUDA_ARCHS:
the CUDA kernels must then have been compiled for those archs)."""

import os

import torch

import peftkern

from .conftest import CUDA


def test_build_info():
    info = peftkern.build_info()
    required = os.environ.get("PEFTKERN_REQUIRE_CUDA_ARCHS")  # CI: the kernels must have been compiled
    if required:
        assert info["cuda"], info
        for arch in required.replace(",", ";").split(";"):
            assert arch.split("+")[0] in info["cuda_archs"], (arch, info)
    assert isinstance(info["cuda"], bool)
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert info["build_system"] in ("setuptools", "cmake")
    if info["cuda"]:
        assert info["cuda_version"] and info["cuda_archs"], info
    if CUDA:
        assert info["cuda"], "a GPU is visible but peftkern was built without its CUDA kernels"
