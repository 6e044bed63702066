"""Visual prompt tuning (Jia et al. 2022): named ``peftkern.nn.VisualPrompt`` modules on the first
transformer block (on every block when deep) as ``peftkern_vpt.<name>``: hooks insert the prompts
after the CLS token before the first block, replace them before each later block (deep) and remove
them from the last block's output (the hidden states between blocks, ``output_hidden_states``,
keep them). One VPT applies to the whole batch (not routed per sample). Saved:
``<block>.peftkern_vpt.<param>``.
"""

from dataclasses import dataclass
from typing import List

from torch import Tensor, nn

from ...nn import VisualPrompt, routing
from ..config import VPTConfig
from ..virtual_tokens import base_name, hf_config
from . import Method, active_of, add_to_dict_child, factory, remove_from_dict_child

ATTR = "peftkern_vpt"


@dataclass
class VPTPlan:
    blocks: List[str]  # every block; the prompts go on the first (all when deep)
    d_model: int
    patch_area: int


def _vit_blocks(model, hf):
    """The names of the transformer blocks of the model's base (the first nn.ModuleList of
    num_hidden_layers modules: ``layers.N``, ``encoder.layer.N``)."""
    base = base_name(model)
    module = model.get_submodule(base) if base else model
    for n, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == hf.num_hidden_layers:
            full = ".".join(p for p in (base, n) if p)
            return [f"{full}.{i}" for i in range(len(m))]
    return None


class VPT(Method):
    config_class = VPTConfig
    routes_per_sample = False

    def plan(self, model, config):
        cname = type(config).__name__
        hf = hf_config(model, cname)
        blocks = _vit_blocks(model, hf)
        if blocks is None or not hasattr(getattr(model, "base_model", model), "embeddings"):
            raise ValueError(
                f"{cname}: VPT needs a ViT-style model (base_model.embeddings, then an nn.ModuleList of "
                f"{hf.num_hidden_layers} blocks); {type(model).__name__} has not"
            )
        patch = getattr(hf, "patch_size", 16)
        patch = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
        return VPTPlan(blocks, hf.hidden_size, patch)

    def _owners(self, plan, config):
        return plan.blocks if config.deep else plan.blocks[:1]

    def _build(self, plan, config, fac):
        return VisualPrompt(config.num_tokens, plan.d_model, patch_area=plan.patch_area, **fac)

    def expected_shapes(self, model, plan, config):
        meta = self._build(plan, config, dict(device="meta"))
        return {
            f"{o}.{ATTR}.{n}": t.shape for o in self._owners(plan, config) for n, t in meta.named_parameters()
        }

    def apply(self, model, plan, config, name):
        saved = {}
        owners = self._owners(plan, config)
        for i, o in enumerate(owners):
            block = model.get_submodule(o)
            new = self._build(plan, config, factory(model, model)).train(model.training)
            first = not hasattr(block, ATTR)
            add_to_dict_child(block, ATTR, name, new)
            if first:
                block._peftkern_active = ()
                hook = _vpt_insert_hook if o == plan.blocks[0] else _vpt_replace_hook
                block._peftkern_vpt_hook = block.register_forward_pre_hook(hook, with_kwargs=True)
            saved.update({f"{o}.{ATTR}.{n}": f"{o}.{ATTR}.{name}.{n}" for n, _ in new.named_parameters()})
        last = model.get_submodule(plan.blocks[-1])
        if not hasattr(last, "_peftkern_vpt_tokens"):
            last._peftkern_vpt_tokens = {}
            last._peftkern_active = getattr(last, "_peftkern_active", ())
            last._peftkern_vpt_remove = last.register_forward_hook(_vpt_remove_hook)
        last._peftkern_vpt_tokens[name] = config.num_tokens
        return saved

    def remove(self, model, plan, name):
        for o in plan.blocks:
            block = model.get_submodule(o)
            if name in getattr(block, ATTR, {}) and remove_from_dict_child(block, ATTR, name):
                block._peftkern_vpt_hook.remove()
                del block._peftkern_vpt_hook
        last = model.get_submodule(plan.blocks[-1])
        last._peftkern_vpt_tokens.pop(name)
        if not last._peftkern_vpt_tokens:
            last._peftkern_vpt_remove.remove()
            del last._peftkern_vpt_remove, last._peftkern_vpt_tokens

    def site_keys(self, plan):
        return [("", "virtual tokens!")]

    def mixed_refusal(self, plan, config):
        return "VPT prompts apply to the whole batch"


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden_states(args, kwargs, h):
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _active_prompt(block, own):
    names, _ = routing.resolve(block, own, active_of(block))
    return names[0] if names else None


def _vpt_insert_hook(layer, args, kwargs):
    """On the first block: its input [B, 1 + S, E] gains the prompts after CLS."""
    name = _active_prompt(layer, list(getattr(layer, ATTR).keys()))
    if name is None:
        return None
    return _with_hidden_states(args, kwargs, getattr(layer, ATTR)[name].insert(_hidden_states(args, kwargs)))


def _vpt_replace_hook(layer, args, kwargs):
    """VPT-deep, on each later block: its own prompts replace the previous block's prompt tokens."""
    name = _active_prompt(layer, list(getattr(layer, ATTR).keys()))
    if name is None:
        return None
    return _with_hidden_states(args, kwargs, getattr(layer, ATTR)[name].replace(_hidden_states(args, kwargs)))


def _vpt_remove_hook(block, args, output):
    """On the last block: the prompt tokens leave its output."""
    name = _active_prompt(block, list(block._peftkern_vpt_tokens))
    if name is None:
        return output
    N = block._peftkern_vpt_tokens[name]
    if isinstance(output, Tensor):
        return VisualPrompt.remove(output, N)
    return (VisualPrompt.remove(output[0], N), *output[1:])
