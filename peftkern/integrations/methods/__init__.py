"""One file per PEFT method, as Hugging Face peft's ``tuners/<method>/``: each holds its method's
sites (where it goes on a model), the modules it builds there, the parameters it saves, its merge,
and how it routes each sample to its own named adapter. ``inject.py`` drives them through the
``Method`` interface below, so a new method is one new file plus one line in ``METHODS``.

Saved names: a checkpoint holds the parameters under the names a model with that adapter alone
had before names existed (``<linear>.lora_A``, ``<site>.adapter.down.weight``); in the model they
live under the adapter's name (``<linear>.lora_A.<name>``, ``<site>.adapter.<name>.down.weight``),
so one checkpoint loads under any name and old checkpoints load as they are.
"""

from typing import Dict, List, Tuple

import torch
from torch import nn

# what a gated method's mixed_refusal says (the _multi ops take no gate)
GATED_REFUSAL = "gated (UniPELT) adapters are not routed per sample yet"


class Method:
    """What inject needs of a method. ``plan`` raises a ValueError before anything changes; ``apply``
    returns {saved name: model parameter name} of what it made."""

    config_class: type = type(None)
    # in a mixed batch (peftkern.tasks), whether this method's adapters can be routed per sample
    routes_per_sample = True

    def plan(self, model: nn.Module, config):
        raise NotImplementedError

    def expected_shapes(self, model: nn.Module, plan, config) -> Dict[str, torch.Size]:
        raise NotImplementedError

    def apply(self, model: nn.Module, plan, config, name: str) -> Dict[str, str]:
        raise NotImplementedError

    def remove(self, model: nn.Module, plan, name: str) -> None:
        raise NotImplementedError

    def merge(self, model: nn.Module, plan, name: str) -> List[str]:
        """Folds what can fold; returns the phrases merge prints."""
        return []

    def site_keys(self, plan) -> List[Tuple[str, str]]:
        """(module name, slot) pairs this adapter occupies. In a mixed batch a sample uses one adapter
        per slot; a slot ending in "!" takes one adapter of a sample even when applied together
        (two masks on one weight)."""
        return []

    def mixed_refusal(self, plan, config) -> str:
        """Why this adapter cannot be routed per sample ('' when it can)."""
        return ""

    # the peft_type of Hugging Face peft's checkpoints of this method ("" when it has none)
    peft_type = ""

    def from_peft(
        self, model: nn.Module, plan, config, state: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """{saved name: tensor} of every parameter ``expected_shapes`` names, from the state dict of a
        peft checkpoint of this method (``state``: its keys without peft's ``base_model.model.``, the
        module names of `model`, e.g. ``bert.encoder.layer.0.attention.self.query.lora_A.weight``).
        Pops the keys it reads, so the caller can name those left over."""
        raise ValueError(
            f"{type(self).__name__}: peftkern reads no Hugging Face peft checkpoint of this method"
        )


def module_names(model: nn.Module) -> Dict[str, nn.Module]:
    return dict(model.named_modules())


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def factory(module: nn.Module, model: nn.Module) -> dict:
    p = next(module.parameters(), None)
    p = next(model.parameters(), None) if p is None else p
    return {} if p is None else dict(device=p.device, dtype=p.dtype)


def describe(config) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items() if k != "method")
    return f"{type(config).__name__}({fields})"


def base_modules(model: nn.Module):
    """(name, module) of the model's own modules: none inside what peftkern added (adapters, copies)."""
    containers = [n + "." for n, m in model.named_modules() if getattr(m, "_peftkern_container", False)]
    for n, m in model.named_modules():
        if not any(n.startswith(c) or n + "." == c for c in containers):
            yield n, m


def base_parameters(model: nn.Module):
    """(name, parameter) of the model's own parameters: none of what peftkern added."""
    modules = dict(base_modules(model))
    for n, t in model.named_parameters():
        owner, _, attr = n.rpartition(".")
        m = modules.get(owner)
        if m is not None and attr in m._parameters:
            yield n, t


def matched(model, config, pattern, what) -> List[Tuple[str, nn.Module]]:
    from ..targets import matches

    found = [(n, m) for n, m in base_modules(model) if n and matches(n, pattern)]
    if not found:
        raise ValueError(
            f"{describe(config)} matched no module of {type(model).__name__} ({what} {pattern!r})"
        )
    return found


def linears(model, config, pattern, what, kinds=None):
    """The matched modules, each an nn.Linear or a peftkern layer of `kinds` (the linear layer this
    method builds its adapters on; default ``AdaptedLinear``). One linear layer holds adapters of one
    kind: a layer another method turned into its own kind is refused."""
    from ...nn import AdaptedLinear

    kinds = (AdaptedLinear,) if kinds is None else tuple(kinds)
    found = matched(model, config, pattern, what)
    for n, m in found:
        if type(m) is not nn.Linear and type(m) not in kinds and isinstance(m, nn.Linear):
            raise ValueError(
                f"{type(config).__name__}: {what} matched {n}, which holds another method's adapters "
                f"({type(m).__name__}); a linear layer takes adapters of one kind "
                f"({', '.join(k.__name__ for k in kinds)} for this one): delete those adapters first, or "
                "leave this layer out"
            )
        if type(m) is not nn.Linear and type(m) not in kinds:
            raise ValueError(
                f"{type(config).__name__}: {what} matched {n} ({type(m).__name__}), which is not an "
                f"nn.Linear; name linear layers only"
            )
    return found


def target_linears(model, config, preset_field: str, kinds=None) -> List[str]:
    """The names of the linear layers ``config.target_modules`` matches, or, when it is None, the
    preset's `preset_field` for the model's architecture (``Preset.lora``, ``Preset.linears``)."""
    from ..targets import preset_for

    pattern = config.target_modules
    if pattern is None:
        pattern = getattr(preset_for(model, type(config).__name__), preset_field)
    return [n for n, _ in linears(model, config, pattern, "target_modules", kinds)]


def parameter_uses(model: nn.Module) -> Dict[int, int]:
    """id(tensor) -> how many parameter names hold it (above 1: tied, e.g. an LM head's weight)."""
    uses: Dict[int, int] = {}
    for _, t in model.named_parameters(remove_duplicate=False):
        uses[id(t)] = uses.get(id(t), 0) + 1
    return uses


def remove_linear_adapter(model: nn.Module, sites, name: str) -> None:
    """Removes adapter `name` from each site's peftkern linear layer (AdaptedLinear, IA3Linear,
    KronALinear); a layer left with none becomes the plain nn.Linear again."""
    modules = module_names(model)
    for s in sites:
        m = modules[s]
        m.remove(name)
        if not m.names():
            m.restore()


def add_to_dict_child(module: nn.Module, attr: str, name: str, new: nn.Module) -> None:
    """module.<attr> is a ModuleDict of named adapters; adds `new` as its entry `name`."""
    holder = getattr(module, attr, None)
    if holder is None:
        holder = nn.ModuleDict()
        holder._peftkern_container = True
        module.add_module(attr, holder.train(module.training))
    holder[name] = new


def remove_from_dict_child(module: nn.Module, attr: str, name: str) -> bool:
    """Deletes entry `name`; removes the ModuleDict when it is empty; True when it did."""
    holder = getattr(module, attr)
    del holder[name]
    if len(holder):
        return False
    delattr(module, attr)
    return True


def renamed(params: Dict[str, torch.Tensor], saved_prefix: str, model_prefix: str) -> Dict[str, str]:
    """{saved_prefix + n: model_prefix + n} for the parameter names n of a new module."""
    return {saved_prefix + n: model_prefix + n for n in params}


def active_of(module: nn.Module):
    return getattr(module, "_peftkern_active", ())


def set_active_on(module: nn.Module, names) -> None:
    module._peftkern_active = tuple(names)
