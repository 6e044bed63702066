"""UniPELT (Mao et al. 2022): LoRA, prefix tuning and a bottleneck adapter on one model, each
submodule's contribution scaled per token by its own learned gate ``sigmoid(W_g x + b_g)``.

In peftkern it is three named adapters applied together, each with ``gate=True``::

    peftkern.unipelt(model)          # unipelt_lora, unipelt_adapter, unipelt_prefix, all active

is the same as::

    peftkern.inject(model, peftkern.LoRAConfig(r=8, gate=True), name="unipelt_lora")
    peftkern.inject(model, peftkern.AdapterConfig(bottleneck=48, placement="pfeiffer", gate=True),
                    name="unipelt_adapter")
    peftkern.inject(model, peftkern.PrefixConfig(num_virtual_tokens=10, gate=True), name="unipelt_prefix")
    peftkern.set_active(model, ["unipelt_lora", "unipelt_adapter", "unipelt_prefix"])
"""

from typing import List, Tuple

from torch import nn

from .config import AdapterConfig, LoRAConfig, PrefixConfig, Targets
from .inject import _check_name, apply, injection_state, plan, set_active


def unipelt_names(name: str) -> Tuple[str, str, str]:
    """The names `unipelt` gives its adapters: ``<name>_lora``, ``<name>_adapter``, ``<name>_prefix``."""
    return f"{name}_lora", f"{name}_adapter", f"{name}_prefix"


def unipelt(
    model: nn.Module,
    name: str = "unipelt",
    *,
    r: int = 8,
    lora_alpha=None,
    bottleneck: int = 48,
    placement: str = "pfeiffer",
    num_virtual_tokens: int = 10,
    target_modules: Targets = None,
    modules_to_save: Targets = None,
) -> nn.Module:
    """Injects UniPELT into `model` in place and returns it: a gated LoRA (rank `r`, on
    `target_modules`, default the preset's query and value projections) as ``<name>_lora``, a gated
    bottleneck adapter (`bottleneck`, after the FFN: ``placement="pfeiffer"`` as in the paper) as
    ``<name>_adapter`` and a gated prefix (`num_virtual_tokens` per layer) as ``<name>_prefix``, the
    three active together. `modules_to_save` (a new task head) trains with the LoRA (one copy: the
    three apply to every sample together). The paper's defaults: r = 8, bottleneck 48, 10 prefix tokens.

    Every config and name is checked, and every site planned, before the model changes. The three are
    ordinary named adapters: ``save_pretrained`` writes each, ``set_active`` / ``delete_adapter`` take
    them by name; a gated LoRA does not merge, and the gated adapters are not routed per sample in a
    mixed batch yet (a ValueError says so)."""
    names = unipelt_names(name)
    configs = [
        LoRAConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=target_modules,
            modules_to_save=modules_to_save,
            gate=True,
        ),
        AdapterConfig(bottleneck=bottleneck, placement=placement, gate=True),
        PrefixConfig(num_virtual_tokens=num_virtual_tokens, gate=True),
    ]
    state = injection_state(model)
    for n in names:
        _check_name(state, n, "unipelt")
    plans: List = [plan(model, c) for c in configs]  # raises before anything changes
    for n, p in zip(names, plans):
        apply(model, p, n)
    set_active(model, list(names))
    return model
