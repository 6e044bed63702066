"""Model surgery and interop with other libraries.

``inject`` and its configs, ``merge``, ``save_pretrained`` / ``from_pretrained`` and the parameter
counts import nothing beyond torch (a model is read through ``model.config.model_type`` only); they
are re-exported as ``peftkern.inject`` etc. Interop submodules load on first use
(``peftkern.integrations.peft``), so ``import peftkern`` never imports Hugging Face peft or
transformers.
"""

import importlib

from .checkpoint import from_pretrained, load_adapter, save_pretrained
from .config import (
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
)
from .inject import (
    active,
    adapters,
    delete_adapter,
    inject,
    merge,
    print_trainable_parameters,
    set_active,
    tasks,
    trainable_parameters,
)
from .methods.adalora import adalora_orth_loss, update_ranks
from .methods.adapter import FusionPruning, prune_fusion
from .unipelt import unipelt
from .virtual_tokens import task_ids

_SUBMODULES = ("peft",)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_SUBMODULES})


__all__ = [
    *_SUBMODULES,
    "AdaLoRAConfig",
    "AdapterConfig",
    "BitFitConfig",
    "FusionPruning",
    "IA3Config",
    "KronAConfig",
    "LoRAConfig",
    "LSTConfig",
    "MaskConfig",
    "PrefixConfig",
    "PromptConfig",
    "VPTConfig",
    "active",
    "adalora_orth_loss",
    "adapters",
    "delete_adapter",
    "from_pretrained",
    "inject",
    "load_adapter",
    "merge",
    "print_trainable_parameters",
    "prune_fusion",
    "save_pretrained",
    "set_active",
    "task_ids",
    "tasks",
    "trainable_parameters",
    "update_ranks",
    "unipelt",
]
