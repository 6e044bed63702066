"""BitFit (Ben Zaken et al. 2022): only bias terms train. Each named BitFit holds its own copy of
the matched biases (``<module>.peftkern_bias.<name>``, starting at the base's values), and a forward
hook adds ``task bias - base bias`` to the module's output, so the base stays as it was for the
other tasks. A mixed batch gathers each row's bias difference (a zero row for samples of other
tasks). Saved: ``<module>.bias`` (the task's biases, under the base's names). Merge: the task's
biases are copied into the base's.

BitFit adds no bias where a model has none: a model without any parameter named ``bias`` (T5 and
mT5: bias-free linears, T5LayerNorm without a bias; T5's ``relative_attention_bias`` is an embedding
table, not a bias term) is refused with a ValueError that says so. BART / mBART train every bias of
their linears and LayerNorms (``final_logits_bias`` is a buffer, not a parameter).
"""

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from ...nn import routing
from ..config import BitFitConfig
from ..targets import matches
from . import Method, active_of, base_parameters, describe, module_names

ATTR = "peftkern_bias"
# modules whose bias adds along the output's last dimension (what the hook relies on)
_ADDITIVE = (nn.Linear, nn.LayerNorm)
_ADDITIVE_NAMES = ("Conv1D",)  # transformers' GPT-2 linear


@dataclass
class BitFitPlan:
    modules: List[str]  # each holds a matched `bias`


class BitFit(Method):
    config_class = BitFitConfig

    def plan(self, model, config):
        names = [
            n
            for n, _ in base_parameters(model)
            if (
                n.rsplit(".", 1)[-1] == "bias" if config.bias_names is None else matches(n, config.bias_names)
            )
        ]
        if not names and config.bias_names is None:
            raise ValueError(_no_bias_message(model, config))
        if not names:
            raise ValueError(
                f"{describe(config)} matched no parameter of {type(model).__name__} "
                f"({'parameters named bias' if config.bias_names is None else repr(config.bias_names)})"
            )
        modules, found = module_names(model), []
        for n in names:
            owner, _, attr = n.rpartition(".")
            m = modules[owner]
            additive = isinstance(m, _ADDITIVE) or type(m).__name__ in _ADDITIVE_NAMES
            if attr != "bias" or not additive:
                raise ValueError(
                    f"BitFitConfig: {n} is not the bias of a linear or layer-norm module "
                    f"({type(m).__name__}); "
                    "BitFit trains the biases that add to such a module's output"
                )
            found.append(owner)
        return BitFitPlan(found)

    def expected_shapes(self, model, plan, config):
        modules = module_names(model)
        return {f"{m}.bias": modules[m].bias.shape for m in plan.modules}

    def apply(self, model, plan, config, name):
        modules = module_names(model)
        for m in plan.modules:
            module = modules[m]
            if not hasattr(module, ATTR):
                module.add_module(ATTR, nn.ParameterDict().train(module.training))
                getattr(module, ATTR)._peftkern_container = True
                module._peftkern_active = getattr(module, "_peftkern_active", ())
                module._peftkern_bias_hook = module.register_forward_hook(_bias_hook)
            getattr(module, ATTR)[name] = nn.Parameter(module.bias.detach().clone())
        return {f"{m}.bias": f"{m}.{ATTR}.{name}" for m in plan.modules}

    def remove(self, model, plan, name):
        modules = module_names(model)
        for m in plan.modules:
            module = modules[m]
            held = getattr(module, ATTR)
            del held[name]
            if not len(held):
                delattr(module, ATTR)
                module._peftkern_bias_hook.remove()
                del module._peftkern_bias_hook

    @torch.no_grad()
    def merge(self, model, plan, name):
        modules = module_names(model)
        for m in plan.modules:
            modules[m].bias.copy_(getattr(modules[m], ATTR)[name])
        self.remove(model, plan, name)
        return [f"the BitFit biases of '{name}' copied into {len(plan.modules)} base biases"]

    def site_keys(self, plan):
        return [(m, "bias!") for m in plan.modules]


# model types whose blocks hold no bias term at all, and why (what BitFit's refusal says)
_BIAS_FREE = {
    "t5": "T5's linear layers are bias=False and T5LayerNorm has no bias",
    "mt5": "mT5's linear layers are bias=False and its T5LayerNorm has no bias",
}


def _no_bias_message(model, config) -> str:
    kind = getattr(getattr(model, "config", None), "model_type", None)
    why = _BIAS_FREE.get(kind, "none of its parameters is named bias")
    return (
        f"{describe(config)}: {type(model).__name__} (model_type {kind!r}) has no bias terms ({why}), so "
        "BitFit has nothing to train; it adds no biases. Use another method (LoRAConfig, AdapterConfig, "
        "MaskConfig), or bias_names for parameters of other names"
    )


def _bias_hook(module, args, output):
    held = getattr(module, ATTR)
    names, route = routing.resolve(module, list(held.keys()), active_of(module))
    base = module.bias
    if route is None:
        if not names:
            return output
        return output + (held[names[0]] - base).to(output.dtype)
    used = [n for n in held.keys() if any(n in s for s in route.samples)]
    deltas = torch.stack([torch.zeros_like(base)] + [held[n] - base for n in used]).to(output.dtype)
    d = output.shape[-1]
    ids = route.ids(used, output.numel() // d, output.device, f"BitFit at a {type(module).__name__}")
    return output + deltas.index_select(0, ids + 1).view(output.shape)
