"""Model surgery and interop with other libraries.

Submodules load on first use (``peftkern.integrations.peft``), so ``import peftkern`` never
imports Hugging Face peft or transformers; each imports its library only when called.
"""

import importlib

_SUBMODULES = ("peft",)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_SUBMODULES})


__all__ = list(_SUBMODULES)
