"""LoRA (Hu et al. 2021): named low-rank updates on linear layers (``AdaptedLinear.add_lora``).

Sites: ``target_modules``, or the preset's query and value projections (peft's defaults). Saved:
``<linear>.lora_A`` ``[r, in]`` and ``<linear>.lora_B`` ``[out, r]`` (gated, UniPELT's: also
``<linear>.lora_gate_weight`` ``[1, in]`` and ``<linear>.lora_gate_bias`` ``[1]``). Merge: the update
folds into the base weight and the layer becomes a plain ``nn.Linear`` again once it holds no other
adapter; a gated LoRA is refused (its gate reads the input). A mixed batch routes each row to its
sample's LoRA with ``ops.lora_linear_multi`` (not a gated one: it has no gate yet).
"""

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from ...nn import AdaptedLinear
from ..config import LoRAConfig
from . import (
    GATED_REFUSAL,
    Method,
    module_names,
    parameter_uses,
    remove_linear_adapter,
    target_linears,
)


@dataclass
class LoRAPlan:
    sites: List[str]


class LoRA(Method):
    config_class = LoRAConfig

    def plan(self, model, config):
        return LoRAPlan(target_linears(model, config, "lora"))

    def expected_shapes(self, model, plan, config):
        modules, r, shapes = module_names(model), config.r, {}
        for s in plan.sites:
            m = modules[s]
            shapes[f"{s}.lora_A"] = torch.Size((r, m.in_features))
            shapes[f"{s}.lora_B"] = torch.Size((m.out_features, r))
            if config.gate:
                shapes[f"{s}.lora_gate_weight"] = torch.Size((1, m.in_features))
                shapes[f"{s}.lora_gate_bias"] = torch.Size((1,))
        return shapes

    def apply(self, model, plan, config, name):
        modules, saved = module_names(model), {}
        for s in plan.sites:
            m = AdaptedLinear.adapt(modules[s])
            m.add_lora(
                name,
                config.r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                gate=config.gate,
            )
            attrs = ("lora_A", "lora_B") + (("lora_gate_weight", "lora_gate_bias") if config.gate else ())
            saved.update({f"{s}.{a}": f"{s}.{a}.{name}" for a in attrs})
        return saved

    def remove(self, model, plan, name):
        remove_linear_adapter(model, plan.sites, name)

    def merge(self, model, plan, name):
        modules = module_names(model)
        gated = [s for s in plan.sites if modules[s].gated(name)]
        if gated:  # before anything changes
            raise ValueError(
                f"merge: {name!r} is a gated (UniPELT) LoRA: its gate depends on the input, so it cannot "
                f"fold into the weights ({gated[0]}, ...); keep it unmerged"
            )
        merge_into_weights(model, plan.sites, name)
        return [f"LoRA merged into {len(plan.sites)} linear layers ({name!r})"]

    def site_keys(self, plan):
        return [(s, "linear") for s in plan.sites]

    def mixed_refusal(self, plan, config):
        return GATED_REFUSAL if config.gate else ""

    peft_type = "LORA"

    def from_peft(self, model, plan, config, state):
        if config.gate:
            raise ValueError("LoRA.from_peft: a gated (UniPELT) LoRA has no peft checkpoint")
        return {
            f"{s}.{a}": state.pop(f"{s}.{a}.weight")
            for s in plan.sites
            for a in ("lora_A", "lora_B")
            if f"{s}.{a}.weight" in state
        }


@torch.no_grad()
def merge_into_weights(model, sites, name):
    """Applies adapter `name` to each site's weight (a tied weight, an LM head's, into a copy) and
    removes it."""
    uses = parameter_uses(model)
    modules = module_names(model)
    for s in sites:
        m = modules[s]
        merged = m.merged_weight([name])
        if uses[id(m.weight)] > 1 or name in m.scores:  # tied, or a mask (the base tensor may be shared)
            m.weight = nn.Parameter(merged, requires_grad=False)
        else:
            m.weight.copy_(merged)
        m.remove(name)
        if not m.names():
            m.restore()
