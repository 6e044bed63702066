"""KronA (Edalati et al. 2022): named Kronecker-product updates on linear layers (``KronALinear``).

Sites: ``target_modules``, or LoRA's preset (the query and value projections). Factor shapes: A
``[out_l, in_m]``, B ``[out_k, in_n]`` with ``(out_l, out_k) = factorization(out, decompose_factor)``
and ``(in_m, in_n) = factorization(in, decompose_factor)``, as peft's LoKr. Saved:
``<linear>.kron_A`` and ``<linear>.kron_B``. Merge: ``scaling · kron(A, B)`` (formed once) folds into
the base weight, and the layer becomes a plain ``nn.Linear`` again once it holds no other update.
A mixed batch adds each task's update to its rows (a composite, slower than one task per batch).

peft: LoKr with full-rank factors (``lokr_w1``, ``lokr_w2``: no ``decompose_both``, and r at least
half the larger side of w2, so peft keeps w2 whole) is this form; ``from_peft`` reads ``lokr_w1`` as A
and ``lokr_w2`` as B, and refuses a checkpoint whose factors are low-rank (``lokr_w1_a`` ...). The
checkpoint holds no scaling: give ``KronAConfig(scaling=alpha / r)`` of peft's config.
"""

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from ...nn.krona import KronALinear, factorization
from ..config import KronAConfig
from . import Method, module_names, parameter_uses, remove_linear_adapter, target_linears

LOW_RANK_KEYS = ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass
class KronAPlan:
    sites: List[str]


def factor_shapes(linear: nn.Linear, decompose_factor: int):
    """((out_a, in_a), (out_b, in_b)) of a linear layer's A and B."""
    out_l, out_k = factorization(linear.out_features, decompose_factor)
    in_m, in_n = factorization(linear.in_features, decompose_factor)
    return (out_l, in_m), (out_k, in_n)


class KronA(Method):
    config_class = KronAConfig

    def plan(self, model, config):
        return KronAPlan(target_linears(model, config, "lora", kinds=(KronALinear,)))

    def expected_shapes(self, model, plan, config):
        modules, shapes = module_names(model), {}
        for s in plan.sites:
            a, b = factor_shapes(modules[s], config.decompose_factor)
            shapes[f"{s}.kron_A"], shapes[f"{s}.kron_B"] = torch.Size(a), torch.Size(b)
        return shapes

    def apply(self, model, plan, config, name):
        modules, saved = module_names(model), {}
        for s in plan.sites:
            m = KronALinear.adapt(modules[s])
            (out_a, in_a), _ = factor_shapes(m, config.decompose_factor)
            m.add(name, out_a, in_a, scaling=config.scaling)
            saved.update({f"{s}.{a}": f"{s}.{a}.{name}" for a in ("kron_A", "kron_B")})
        return saved

    def remove(self, model, plan, name):
        remove_linear_adapter(model, plan.sites, name)

    @torch.no_grad()
    def merge(self, model, plan, name):
        uses = parameter_uses(model)
        modules = module_names(model)
        for s in plan.sites:
            m = modules[s]
            merged = m.merged_weight([name])
            if uses[id(m.weight)] > 1:  # tied (an LM head's): into a copy
                m.weight = nn.Parameter(merged, requires_grad=False)
            else:
                m.weight.copy_(merged)
            m.remove(name)
            if not m.names():
                m.restore()
        return [f"KronA merged into {len(plan.sites)} linear layers ({name!r})"]

    def site_keys(self, plan):
        return [(s, "linear") for s in plan.sites]

    peft_type = "LOKR"

    def from_peft(self, model, plan, config, state):
        for s in plan.sites:
            low = [k for k in LOW_RANK_KEYS if f"{s}.{k}" in state]
            if low:
                raise ValueError(
                    f"KronA.from_peft: the LoKr checkpoint's {s} holds low-rank factors ({', '.join(low)}); "
                    "KronA takes full-rank lokr_w1 and lokr_w2 only (peft's LoKr without decompose_both, "
                    "with r at least half of w2's larger side)"
                )
        out = {}
        for s in plan.sites:
            for ours, theirs in (("kron_A", "lokr_w1"), ("kron_B", "lokr_w2")):
                if f"{s}.{theirs}" in state:
                    out[f"{s}.{ours}"] = state.pop(f"{s}.{theirs}")
        return out
