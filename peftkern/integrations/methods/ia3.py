"""(IA)^3 (Liu et al. 2022): named learned vectors on linear layers (``IA3Linear.add_ia3``), as
Hugging Face peft's ``tuners/ia3``.

Sites: ``target_modules``, or the preset's (peft's ``TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING``:
the keys and values, and the FFN's down projection). Of those, ``feedforward_modules`` (or the
preset's, peft's ``..._FEEDFORWARD_MODULES_MAPPING``) get an input scale ``[in]``, the others an
output scale ``[out]`` (``out = l * (W x + b)``); the feed-forward modules must be target modules
(a ValueError otherwise, as peft). Saved: ``<linear>.ia3_l``, 1-D. Merge: an output vector folds
into the weight's rows and the bias, a feed-forward one into the weight's columns (peft's merge);
the layer becomes a plain ``nn.Linear`` again once it holds no vector. A mixed batch gathers each
row's vector (a composite, slower than one task per batch).

peft checkpoints (``from_peft``): peft saves ``<module>.ia3_l`` as ``[out, 1]`` (output scale) or
``[1, in]`` (feed-forward); the orientation must match this adapter's site kind.
"""

from dataclasses import dataclass
from typing import List, Tuple

import torch
from torch import nn

from ...nn.ia3 import IA3Linear
from ..config import IA3Config
from ..targets import matches, model_type, preset_for
from . import Method, base_modules, describe, linears, module_names, parameter_uses, remove_linear_adapter


@dataclass
class IA3Plan:
    sites: List[Tuple[str, bool]]  # (linear, feedforward)


def _presets(model, config):
    preset = preset_for(model, type(config).__name__)
    if preset.ia3 is None:
        raise ValueError(
            f"{type(config).__name__}: no (IA)³ preset for model_type {model_type(model)!r} (Hugging Face "
            "peft has no default for it either); pass target_modules and feedforward_modules"
        )
    return preset


class IA3(Method):
    config_class = IA3Config

    def plan(self, model, config):
        pattern, feedforward = config.target_modules, config.feedforward_modules
        if pattern is None:
            pattern = _presets(model, config).ia3
        if feedforward is None:  # as peft: the model type's list, also under given target_modules
            feedforward = _presets(model, config).ia3_feedforward
        found = linears(model, config, pattern, "target_modules", kinds=(IA3Linear,))
        sites = {n for n, _ in found}
        stray = [n for n, _ in base_modules(model) if n and matches(n, feedforward) and n not in sites]
        if stray:
            raise ValueError(
                f"{describe(config)}: feedforward_modules must be a subset of target_modules; it matches "
                f"{stray[0]}" + (f" (and {len(stray) - 1} more)" if len(stray) > 1 else "") + ", which "
                "target_modules does not"
            )
        return IA3Plan([(n, matches(n, feedforward)) for n, _ in found])

    def expected_shapes(self, model, plan, config):
        modules = module_names(model)
        return {
            f"{s}.ia3_l": torch.Size((modules[s].in_features if ff else modules[s].out_features,))
            for s, ff in plan.sites
        }

    def apply(self, model, plan, config, name):
        modules, saved = module_names(model), {}
        for s, ff in plan.sites:
            m = IA3Linear.adapt(modules[s])
            m.add_ia3(name, feedforward=ff, init_ones=config.init_ia3_weights)
            saved[f"{s}.ia3_l"] = f"{s}.ia3_l.{name}"
        return saved

    def remove(self, model, plan, name):
        remove_linear_adapter(model, [s for s, _ in plan.sites], name)

    @torch.no_grad()
    def merge(self, model, plan, name):
        uses = parameter_uses(model)
        modules = module_names(model)
        for s, _ in plan.sites:
            m = modules[s]
            merged = m.merged([name])
            for attr in ("weight", "bias"):
                p = getattr(m, attr)
                if p is None:
                    continue
                if uses[id(p)] > 1:  # tied (an LM head's): into a copy
                    setattr(m, attr, nn.Parameter(merged[attr], requires_grad=p.requires_grad))
                else:
                    p.copy_(merged[attr])
            m.remove(name)
            if not m.names():
                m.restore()
        return [f"(IA)³ merged into {len(plan.sites)} linear layers ({name!r})"]

    def site_keys(self, plan):
        return [(s, "linear") for s, _ in plan.sites]

    peft_type = "IA3"

    def from_peft(self, model, plan, config, state):
        modules, out = module_names(model), {}
        for s, ff in plan.sites:
            key = f"{s}.ia3_l"
            if key not in state:
                continue
            t = state[key]
            n = modules[s].in_features if ff else modules[s].out_features
            want = (1, n) if ff else (n, 1)
            if tuple(t.shape) != want:
                kind = "feed-forward (input scale, [1, in])" if ff else "output scale ([out, 1])"
                raise ValueError(
                    f"IA3.from_peft: peft's {key} is {tuple(t.shape)}; this adapter's {s} is a {kind} site, "
                    f"so {want}: the config's feedforward_modules must be peft's"
                )
            out[key] = state.pop(key).reshape(n)
        return out
