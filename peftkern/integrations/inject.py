"""Model surgery: ``inject`` named PEFT adapters of any method into any model, choose which apply
(``set_active``, or per sample with ``tasks``), count, ``merge`` for deployment.

    peftkern.inject(model, LoRAConfig(r=8), name="sentiment")      # in place; only the adapter trains
    peftkern.inject(model, AdapterConfig(bottleneck=32), name="topic")
    peftkern.set_active(model, "topic")                             # or ["a", "b"] together, or None
    with peftkern.tasks(["sentiment", "topic", None]):              # one entry per sample
        logits = model(**batch).logits
    peftkern.merge(model, "topic")

The base model's parameter names never change: LoRA and masks turn an ``nn.Linear`` into an
``AdaptedLinear`` in place (same weight and bias Parameters), adapters become children of the
modules they follow, applied by hooks. Each method lives in one file under ``methods/``; this module
only drives them.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..nn import routing
from . import virtual_tokens
from .config import (
    AdapterConfig,
    _Config,
    config_from_dict,
)
from .methods import Method, copies, describe
from .methods.adalora import AdaLoRA
from .methods.adapter import AdapterMethod
from .methods.bitfit import BitFit
from .methods.ia3 import IA3
from .methods.krona import KronA
from .methods.lora import LoRA
from .methods.lst import LST
from .methods.mask import Mask
from .methods.prefix import Prefix
from .methods.prompt import Prompt
from .methods.vpt import VPT

_STATE = "_peftkern"  # the attribute inject sets on the model it changed
METHODS: Dict[type, Method] = {
    m.config_class: m
    for m in (LoRA(), AdaLoRA(), Mask(), AdapterMethod(), BitFit(), Prefix(), Prompt(), VPT(), KronA(), IA3())
}
METHODS[LST.config_class] = LST()
DEFAULT_NAME = "default"
_ROUTE_TOKENS = virtual_tokens.CallStack("peftkern_route_tokens")


@dataclass
class Plan:
    """What inject will do to a model, worked out before anything changes."""

    config: _Config
    method: Method
    sites: object  # the method's plan
    copies: List[str] = field(default_factory=list)  # modules_to_save


@dataclass
class AdapterState:
    config: _Config
    plan: Plan
    params: Dict[str, str]  # saved name -> model parameter name
    merged: bool = False


@dataclass
class PeftState:
    adapters: Dict[str, AdapterState] = field(default_factory=dict)
    active: Tuple[str, ...] = ()
    checked: set = field(default_factory=set)  # routes' samples _check_samples passed (until adapters change)
    checkpointable: Optional[List[nn.Module]] = None  # modules that may hold _gradient_checkpointing_func

    @property
    def config(self) -> _Config:
        """The config of the model's one adapter."""
        if len(self.adapters) != 1:
            raise ValueError(f"the model holds {len(self.adapters)} named adapters: {sorted(self.adapters)}")
        return next(iter(self.adapters.values())).config

    @property
    def merged(self) -> List[str]:
        return [n for n, a in self.adapters.items() if a.merged]

    @property
    def param_names(self) -> List[str]:
        return [p for a in self.adapters.values() for p in a.params.values()]


def injection_state(model: nn.Module) -> Optional[PeftState]:
    return getattr(model, _STATE, None)


def plan(model: nn.Module, config: _Config) -> Plan:
    """The sites of `config` on `model`; raises before changing anything."""
    if not isinstance(config, _Config):
        raise TypeError(
            "inject: config must be an AdapterConfig, LoRAConfig, MaskConfig, BitFitConfig, PrefixConfig, "
            "PromptConfig, VPTConfig, IA3Config, AdaLoRAConfig, KronAConfig or LSTConfig; got "
            f"{type(config).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject: model must be a torch.nn.Module; got {type(model).__name__}")
    for n, m in model.named_modules():
        if n and injection_state(m) is not None:
            raise ValueError(
                f"inject: {describe(config)}: its submodule {n} holds peftkern adapters already; inject into "
                "the model that holds them"
            )
    # a checked copy: the caller's object may have been edited since it was built, or may be later
    config = config_from_dict(config.to_dict())
    method = METHODS[type(config)]
    return Plan(config, method, method.plan(model, config), copies.plan(model, config))


def expected_saved_shapes(model: nn.Module, p: Plan) -> Dict[str, torch.Size]:
    """Saved name -> shape of every parameter save_pretrained writes for an adapter of plan `p`."""
    shapes = copies.expected_shapes(model, p.copies)
    shapes.update(p.method.expected_shapes(model, p.sites, p.config))
    return shapes


def _check_name(state: Optional[PeftState], name, who: str) -> str:
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{who}: name must be a non-empty string without '.'; got {name!r:.40}")
    if state is not None and name in state.adapters:
        raise ValueError(f"{who}: the model already holds an adapter named {name!r}; delete_adapter it first")
    if state is not None and state.merged:
        raise ValueError(
            f"{who}: the model has {state.merged} merged into its base; load a fresh base model "
            "to add adapters"
        )
    return name


def apply(model: nn.Module, p: Plan, name: str = DEFAULT_NAME) -> nn.Module:
    """Carries out a plan under `name`: on the first adapter freezes the model; builds the adapter
    (trainable), makes it the active one, and records it."""
    state = injection_state(model)
    _check_name(state, name, "inject")
    if state is None:
        model.requires_grad_(False)
        state = PeftState()
        setattr(model, _STATE, state)
        model.register_forward_pre_hook(_route_pre_hook, with_kwargs=True, prepend=True)
        model.register_forward_hook(_route_hook, with_kwargs=True, always_call=True)
    params = copies.apply(model, p.copies, name)
    params.update(p.method.apply(model, p.sites, p.config, name))
    state.adapters[name] = AdapterState(p.config, p, params)
    state.checked.clear()
    set_active(model, name)
    return model


def inject(model: nn.Module, config: _Config, name: str = DEFAULT_NAME) -> nn.Module:
    """Adds the PEFT adapter of `config` to `model` under `name`, in place, makes it the active one
    and returns the model.

    The first adapter freezes every parameter of the model; each adapter's own parameters (LoRA
    factors, mask scores, adapters, prefixes, prompts, BitFit's bias copies, copies of
    ``config.modules_to_save``) train. Raises a ValueError naming the config when it matches
    nothing, when the name is taken, when a target is the wrong kind of module, or when the model
    cannot take the method (a prefix on a model type whose positions peftkern does not know, say);
    the model is unchanged then."""
    state = injection_state(model)
    _check_name(state, name, "inject")
    p = plan(model, config)
    fused = None
    if isinstance(p.config, AdapterConfig) and p.config.fusion is not None:
        from .checkpoint import fused_adapter_weights  # checkpoint imports this module

        fused = fused_adapter_weights(model, p)  # read and checked before the model changes
    apply(model, p, name)
    if fused is not None:
        copy_into(model, {injection_state(model).adapters[name].params[k]: t for k, t in fused.items()})
    return model


def copy_into(model: nn.Module, tensors: Dict[str, Tensor]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


def _state_or_raise(model, who) -> PeftState:
    state = injection_state(model)
    if state is None or not state.adapters:
        raise ValueError(f"{who}: the model holds no peftkern adapter (call peftkern.inject first)")
    return state


def adapters(model: nn.Module) -> Dict[str, _Config]:
    """{name: config} of the model's adapters, in the order they were added."""
    state = injection_state(model)
    return {} if state is None else {n: a.config for n, a in state.adapters.items()}


def active(model: nn.Module) -> Tuple[str, ...]:
    """The names that apply to every sample when no ``tasks`` are given."""
    state = injection_state(model)
    return () if state is None else state.active


def _names(entry, who) -> Tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, (list, tuple)) and all(isinstance(n, str) for n in entry):
        return tuple(dict.fromkeys(entry))
    raise TypeError(f"{who}: expected a name, a list of names or None; got {entry!r:.60}")


def _check_samples(state: PeftState, samples: Sequence[Tuple[str, ...]], who: str) -> None:
    """Raises a ValueError naming them when a sample names an unknown adapter, when adapters of one
    sample cannot apply together, or when a mixed batch needs what an adapter cannot route."""
    known = state.adapters
    for s in samples:
        for n in s:
            if n not in known:
                raise ValueError(f"{who}: no adapter named {n!r}; the model holds {sorted(known)}")
            if state.merged and n not in state.merged:
                raise ValueError(
                    f"{who}: the model has {state.merged} merged into its base weights, so {n!r} cannot "
                    "apply; load a fresh base model for it"
                )
    slots: Dict[Tuple[str, str], List[Tuple[str, ...]]] = {}
    for i, s in enumerate(samples):
        for n in s:
            for key in known[n].plan.method.site_keys(known[n].plan.sites):
                occupants = slots.setdefault(key, [()] * len(samples))
                occupants[i] = (*occupants[i], n)
            for module in known[n].plan.copies:
                occupants = slots.setdefault((module, "modules_to_save!"), [()] * len(samples))
                occupants[i] = (*occupants[i], n)
    for (module, slot), occupants in slots.items():
        where = f"{module or 'the model'} ({slot.rstrip('!')})"
        uniform = all(o == occupants[0] for o in occupants)
        for o in occupants:
            if len(o) > 1 and (slot.endswith("!") or not uniform):
                raise ValueError(
                    f"{who}: adapters {list(o)} cannot apply together to one sample: they share {where}"
                    + ("" if slot.endswith("!") else " and the batch is mixed (one adapter per sample there)")
                )
        if uniform:
            continue
        present = sorted({n for o in occupants for n in o})
        for n in present:
            a = known[n]
            why = a.plan.method.mixed_refusal(a.plan.sites, a.config) or (
                ""
                if a.plan.method.routes_per_sample
                else f"{type(a.config).__name__} is not routed per sample"
            )
            if why:
                raise ValueError(f"{who}: adapter {n!r} cannot serve a mixed batch at {where}: {why}")
        acts = {n: known[n].config.activation for n in present if isinstance(known[n].config, AdapterConfig)}
        if len(set(acts.values())) > 1:
            raise ValueError(
                f"{who}: a mixed batch runs the adapters at {where} in one op; their activations "
                f"differ: {acts}"
            )


def set_active(model: nn.Module, names) -> None:
    """The adapters that apply to every sample when no ``tasks`` are given: a name, several (applied
    together: LoRA updates add, serial adapters stack), or None (the base model)."""
    state = _state_or_raise(model, "set_active")
    chosen = _names(names, "set_active")
    _check_samples(state, [chosen], "set_active")
    state.active = chosen
    for m in model.modules():
        if hasattr(m, "_peftkern_active"):
            m._peftkern_active = chosen


def delete_adapter(model: nn.Module, name: str) -> None:
    """Removes adapter `name` and its parameters (its modules, hooks and copies; an AdaptedLinear with
    no adapter left is an nn.Linear again)."""
    state = _state_or_raise(model, "delete_adapter")
    if name not in state.adapters:
        raise ValueError(
            f"delete_adapter: no adapter named {name!r}; the model holds {sorted(state.adapters)}"
        )
    if state.adapters[name].merged:
        raise ValueError(
            f"delete_adapter: {name!r} is merged into the base model, so it cannot be taken out; load a "
            "fresh base model instead"
        )
    a = state.adapters.pop(name)
    state.checked.clear()
    copies.remove(model, a.plan.copies, name)
    a.plan.method.remove(model, a.plan.sites, name)
    state.active = tuple(n for n in state.active if n != name)
    for m in model.modules():
        if hasattr(m, "_peftkern_active"):
            m._peftkern_active = state.active


# -- per-sample routing ------------------------------------------------------------------------------


@contextlib.contextmanager
def tasks(names_per_sample: Sequence):
    """Each sample's adapters for every peftkern model called inside the block: one entry per sample,
    a name, a list of names (applied together) or None (the base model)::

        with peftkern.tasks(["sentiment", "topic", None, "ner"]):
            logits = model(**batch).logits          # also model.generate(...)

    Every sample computes through its own adapters in one pass per layer (``lora_linear_multi``,
    ``adapter_multi``, ``masked_linear_multi``, prefix ids, per-sample prompts, a bias gather), and
    each adapter's gradients come from its own samples only. The model checks the names when
    called, before anything runs. Under ``generate()`` the batch holds each sample's beams (or
    returned sequences), adjacent; a plain forward must have one row per entry (or pass
    ``tasks=[...]`` to the forward itself)."""
    if not isinstance(names_per_sample, (list, tuple)) or not names_per_sample:
        raise TypeError(
            "peftkern.tasks: expects a non-empty list with one entry per sample; "
            f"got {names_per_sample!r:.60}"
        )
    route = routing.SampleRoute([_names(e, "peftkern.tasks") for e in names_per_sample], beams=True)
    with routing.routed(route):
        yield route


def _call_batch(args, kwargs) -> Optional[int]:
    for k in ("input_ids", "inputs_embeds", "pixel_values"):
        t = kwargs.get(k)
        if isinstance(t, Tensor) and t.dim():
            return t.shape[0]
    for t in args:
        if isinstance(t, Tensor) and t.dim():
            return t.shape[0]
    return None


class _RoutedCheckpoint:
    """A model's ``_gradient_checkpointing_func`` (transformers' checkpointed layers) that runs the
    layer under the route of its forward, in the forward and again in the backward's recompute."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, fn, *args, **kwargs):
        return self.inner(routing.replaying(fn, routing.current()), *args, **kwargs)


def _route_checkpointed_layers(model, state: "PeftState") -> None:
    # transformers sets _gradient_checkpointing_func on the modules with a gradient_checkpointing
    # flag; they are found once, and each training call checks only them
    if state.checkpointable is None:
        state.checkpointable = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    for m in state.checkpointable:
        f = m.__dict__.get("_gradient_checkpointing_func")
        if f is not None and not isinstance(f, _RoutedCheckpoint):
            m._gradient_checkpointing_func = _RoutedCheckpoint(f)


def _generating(kwargs) -> bool:
    """A call of generate()'s loop (which holds each sample's beams or returned sequences)."""
    return kwargs.get("past_key_values") is not None or kwargs.get("cache_position") is not None


def _route_pre_hook(model, args, kwargs):
    """On the injected model: the call's route (its ``tasks`` argument, or peftkern.tasks's), checked."""
    given = kwargs.pop("tasks", None)
    route = routing.current() if given is None else None
    if given is not None:
        if not isinstance(given, (list, tuple)) or not given:
            raise TypeError(f"tasks: expects a non-empty list with one entry per sample; got {given!r:.60}")
        route = routing.SampleRoute([_names(e, "tasks") for e in given])
    if model.training and torch.is_grad_enabled():  # gradient_checkpointing_enable() may come any time
        _route_checkpointed_layers(model, injection_state(model))
    if route is None:
        _ROUTE_TOKENS.push(None)
        return args, kwargs
    state = injection_state(model)
    if route.samples not in state.checked:  # once per batch composition, not per generate() step
        _check_samples(state, route.samples, "peftkern.tasks")
        if len(state.checked) > 4096:  # a server's many batch compositions: keep it bounded
            state.checked.clear()
        state.checked.add(route.samples)
    batch = _call_batch(args, kwargs)
    beams = route.beams and _generating(kwargs)
    if batch is not None and (batch % len(route) or (batch != len(route) and not beams)):
        raise ValueError(
            f"peftkern.tasks: {len(route)} entries for a batch of {batch} samples; give one per sample"
            + (" (or its beams, inside generate())" if route.beams else "")
        )
    _ROUTE_TOKENS.push(routing._ROUTE.set(route))
    return args, kwargs


def _route_hook(model, args, kwargs, output):
    token = _ROUTE_TOKENS.pop()
    if token is not None:
        routing._ROUTE.reset(token)
    return output


# -- counting and merging --------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    trainable = total = 0
    for t in model.parameters():
        total += t.numel()
        trainable += t.numel() if t.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    trainable, total = trainable_parameters(model)
    print(
        f"trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / max(total, 1):.4f}"
    )


@torch.no_grad()
def merge(model: nn.Module, name: Optional[str] = None, verbose: bool = True) -> nn.Module:
    """For deployment: folds adapter `name` (default: the active one) into the model. LoRA updates
    fold into their base weights and masks are baked (the layers become plain ``nn.Linear`` again
    once no other adapter is on them), BitFit's biases and ``modules_to_save`` copies are copied
    into the base's, AdaMix mixtures become their ``merge_experts()`` adapters, and a prefix's
    reparametrisation or P-tuning's prompt encoder is evaluated once into plain virtual tokens;
    adapters and fusions stay, as an adapter's nonlinearity cannot fold into a weight. Refused when
    several adapters are active or a mixed batch (``peftkern.tasks``) is set. A merged model cannot
    be saved with peftkern.save_pretrained, and no other adapter applies on its merged base."""
    state = _state_or_raise(model, "merge")
    route = routing.current()
    if route is not None and len(set(route.samples)) > 1:
        raise ValueError(f"merge: a mixed batch is set ({route}); merge outside peftkern.tasks")
    if name is None:
        if len(state.active) != 1:
            raise ValueError(
                f"merge: {len(state.active)} adapters are active ({list(state.active)}); "
                "name the one to merge"
            )
        name = state.active[0]
    if name not in state.adapters:
        raise ValueError(f"merge: no adapter named {name!r}; the model holds {sorted(state.adapters)}")
    if state.active not in ((), (name,)):
        raise ValueError(
            f"merge: adapters {list(state.active)} are active together; set_active(model, {name!r}) first"
        )
    a = state.adapters[name]
    if a.merged:
        raise ValueError(f"merge: {name!r} is merged already")
    parts = a.plan.method.merge(model, a.plan.sites, name)
    modules = dict(model.named_modules())
    for m in a.plan.copies:
        modules[m].load_state_dict(getattr(modules[m], copies.ATTR)[name].state_dict(), strict=False)
    copies.remove(model, a.plan.copies, name)
    if a.plan.copies:
        parts.append(f"the copies of {a.plan.copies} copied into the base")
    a.merged = True
    state.checked.clear()
    set_active(model, name)
    if verbose:
        print("peftkern.merge: " + ("; ".join(parts) or f"nothing to merge for {type(a.config).__name__}"))
    return model
