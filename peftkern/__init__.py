"""peftkern: fused CUDA kernels for parameter-efficient fine-tuning, as PyTorch ops and modules.

peftkern.ops           one autograd op per PEFT computation (torch.ops.peftkern.* underneath)
peftkern.nn            drop-in torch.nn modules built on those ops
peftkern.integrations  model surgery (inject, merge, save/load) and interop with Hugging Face peft

    model = peftkern.inject(model, peftkern.LoRAConfig(r=8), name="a")   # or another method's config
    peftkern.inject(model, peftkern.AdapterConfig(bottleneck=16), name="b")
    with peftkern.tasks(["a", "b", None]): out = model(**batch)      # each sample its own adapter
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
    AdaLoRAConfig,
    AdapterConfig,
    BitFitConfig,
    IA3Config,
    KronAConfig,
    LoRAConfig,
    LSTConfig,
    MaskConfig,
    PrefixConfig,
    PromptConfig,
    VPTConfig,
    active,
    adalora_orth_loss,
    adapters,
    delete_adapter,
    from_pretrained,
    inject,
    load_adapter,
    merge,
    print_trainable_parameters,
    prune_fusion,
    save_pretrained,
    set_active,
    task_ids,
    tasks,
    trainable_parameters,
    unipelt,
    update_ranks,
)
from .nn.adamix import adamix_pair  # noqa: E402


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
    "IA3Config",
    "AdaLoRAConfig",
    "KronAConfig",
    "LSTConfig",
    "update_ranks",
    "adalora_orth_loss",
    "task_ids",
    "tasks",
    "adapters",
    "active",
    "set_active",
    "delete_adapter",
    "load_adapter",
    "unipelt",
    "adamix_pair",
    "prune_fusion",
]
__version__ = "0.1.0"
