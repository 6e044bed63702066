"""Mask tuning (Zhao et al. 2020, Piggyback): named binary masks over frozen linear weights
(``AdaptedLinear.add_mask``), trained through a straight-through estimator.

Sites: ``target_modules``, or every linear layer of the preset's blocks. Saved: ``<linear>.scores``
``[out, in]`` (float32). Merge: the masked weight replaces the weight (a copy). Many task masks
share one weight; a mixed batch runs each row through its sample's mask with
``ops.masked_linear_multi`` (packed bits), or, in training, ``ops.masked_linear`` per mask task.
"""

from dataclasses import dataclass
from typing import List

import torch

from ...nn import AdaptedLinear
from ..config import MaskConfig
from . import Method, module_names, remove_linear_adapter, target_linears
from .lora import merge_into_weights


@dataclass
class MaskPlan:
    sites: List[str]


class Mask(Method):
    config_class = MaskConfig

    def plan(self, model, config):
        return MaskPlan(target_linears(model, config, "linears"))

    def expected_shapes(self, model, plan, config):
        modules = module_names(model)
        return {f"{s}.scores": torch.Size(modules[s].weight.shape) for s in plan.sites}

    def apply(self, model, plan, config, name):
        modules = module_names(model)
        for s in plan.sites:
            AdaptedLinear.adapt(modules[s]).add_mask(
                name, threshold=config.threshold, score_init=config.score_init
            )
        return {f"{s}.scores": f"{s}.scores.{name}" for s in plan.sites}

    def remove(self, model, plan, name):
        remove_linear_adapter(model, plan.sites, name)

    def merge(self, model, plan, name):
        merge_into_weights(model, plan.sites, name)
        return [f"{len(plan.sites)} masks baked into their weights ({name!r})"]

    def site_keys(self, plan):
        return [(s, "linear") for s in plan.sites] + [(s, "mask!") for s in plan.sites]
