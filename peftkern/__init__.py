"""peftkern: fused CUDA kernels for parameter-efficient fine-tuning, as PyTorch ops and modules.

peftkern.ops           one autograd op per PEFT computation (torch.ops.peftkern.* underneath)
peftkern.nn            drop-in torch.nn modules built on those ops
peftkern.integrations  model surgery (inject, merge, save/load) and interop with Hugging Face peft

    model = peftkern.inject(model, peftkern.LoRAConfig(r=8))   # or another method's config
    peftkern.save_pretrained(model, path); peftkern.from_pretrained(fresh_base, path)
"""

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "peftkern's compiled extension (peftkern._C) is missing or failed to load: "
        f"{e}. Build it from the repository root with `pip install --no-build-isolation -e .` "
        "(or `make build`), using the same torch you run with."
    ) from e

from . import integrations, nn, ops  # noqa: E402
from .integrations import (  # noqa: E402
    AdapterConfig,
    BitFitConfig,
    LoRAConfig,
    MaskConfig,
    PrefixConfig,
    PromptConfig,
    VPTConfig,
    from_pretrained,
    inject,
    merge,
    print_trainable_parameters,
    save_pretrained,
    task_ids,
    trainable_parameters,
)


def build_info() -> dict:
    """What this build compiled: {'cuda': bool, 'cuda_version': str | None, 'cuda_archs': [str],
    'torch_version': str (the torch it was built against), 'build_system': 'setuptools' | 'cmake', ...}."""
    return dict(_C.build_info())


__all__ = [
    "ops",
    "nn",
    "integrations",
    "build_info",
    "inject",
    "merge",
    "save_pretrained",
    "from_pretrained",
    "trainable_parameters",
    "print_trainable_parameters",
    "AdapterConfig",
    "LoRAConfig",
    "MaskConfig",
    "BitFitConfig",
    "PrefixConfig",
    "PromptConfig",
    "VPTConfig",
    "task_ids",
]
__version__ = "0.1.0"
