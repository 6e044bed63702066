"""Save the PEFT parameters apart from the base model, and load them into a fresh base.

    peftkern.save_pretrained(model, "out/")      # out/peftkern_config.json, out/peftkern_weights.safetensors
    model = peftkern.from_pretrained(AutoModel.from_pretrained(base), "out/")

The weights file holds only what inject made trainable (LoRA factors, mask scores, adapters,
BitFit's biases, modules_to_save), under the model's own parameter names; the config records the
file's SHA-256, so a corrupt file is refused even where its header still parses.
"""

import dataclasses
import hashlib
import json
import os
import warnings
from typing import Optional

import torch
from torch import nn

from ..nn.adapter import STACKED_PARAMS
from .config import AdapterConfig, config_from_dict
from .inject import DEFAULT_NAME, _check_name, apply, copy_into, expected_saved_shapes, injection_state, plan

CONFIG_NAME = "peftkern_config.json"
WEIGHTS_NAME = "peftkern_weights.safetensors"
FORMAT_VERSION = 1


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - transformers installs it
        raise ImportError(
            "peftkern.save_pretrained / from_pretrained need safetensors (pip install safetensors)"
        ) from e
    return safetensors.torch


def _save_one(model, state, name, path) -> None:
    a = state.adapters[name]
    if a.merged:
        raise ValueError(
            f"save_pretrained: adapter {name!r} was merged (peftkern.merge), so its parameters are gone or "
            "folded into the base; save before merging"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    tensors = {saved: params[n].detach().cpu().contiguous() for saved, n in a.params.items()}
    data = _safetensors().save(tensors, metadata={"format": "pt"})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, WEIGHTS_NAME), "wb") as f:  # the weights first: a config names a whole file
        f.write(data)
    config = {"peftkern_format": FORMAT_VERSION, "weights_sha256": hashlib.sha256(data).hexdigest()}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump({**config, **a.config.to_dict()}, f, indent=2)


def save_pretrained(model: nn.Module, path, names=None) -> None:
    """Writes the config and the parameters of named adapters (not merged ones) of an injected model:
    one adapter to directory `path` (``peftkern_config.json``, ``peftkern_weights.safetensors``),
    several to ``path/<name>/`` each. `names`: a name, a list, or None for every adapter."""
    state = injection_state(model)
    if state is None or not state.adapters:
        raise ValueError("save_pretrained: the model holds no peftkern adapter (call peftkern.inject first)")
    chosen = list(state.adapters) if names is None else [names] if isinstance(names, str) else list(names)
    for n in chosen:
        if n not in state.adapters:
            raise ValueError(
                f"save_pretrained: no adapter named {n!r}; the model holds {sorted(state.adapters)}"
            )
    if len(chosen) == 1:
        _save_one(model, state, chosen[0], path)
        return
    for n in chosen:
        _save_one(model, state, n, os.path.join(path, n))


def _read(path):
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"from_pretrained: {p} is missing (not a peftkern.save_pretrained directory?)"
            )
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"from_pretrained: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.pop("peftkern_format", None) != FORMAT_VERSION:
        raise ValueError(f"from_pretrained: {cfg_path} is not a peftkern config of format {FORMAT_VERSION}")
    digest = d.pop("weights_sha256", None)
    config = config_from_dict(d)
    with open(w_path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(
            f"from_pretrained: {w_path} does not match the SHA-256 its config records: truncated, corrupt, "
            "or not the file saved with this config"
        )
    try:
        tensors = _safetensors().load(data)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"from_pretrained: cannot read {w_path} ({e})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"from_pretrained: {name} in {w_path} is {t.dtype}, not a floating-point tensor")
    return config, tensors


def _check_names_and_shapes(expected, tensors, path, who="from_pretrained") -> None:
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{who}: the base model has {name} {tuple(shape)}, which {path} lacks")
        if tensors[name].shape != shape:
            raise ValueError(
                f"{who}: {name} is {tuple(tensors[name].shape)} in {path} but {tuple(shape)} in the "
                "base model"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{who}: {path} holds {extra[0]}, which the base model has no place for")


def load_adapter(model: nn.Module, path, name: str = DEFAULT_NAME) -> nn.Module:
    """Adds the adapter saved at `path` to `model` (a base, or a model holding other adapters) under
    `name`, loads its parameters and makes it the active one; returns the model. Every check
    (config, file, names, shapes) runs before the model changes: on any error it is left as it was.
    A fusion's checkpoint holds its adapters, so the directories its config names are not read."""
    config, tensors = _read(path)
    _check_name(injection_state(model), name, "load_adapter")
    p = plan(model, config)
    _check_names_and_shapes(expected_saved_shapes(model, p), tensors, path)
    apply(model, p, name)
    params = injection_state(model).adapters[name].params
    copy_into(model, {params[k]: t for k, t in tensors.items()})
    return model


def from_pretrained(base_model: nn.Module, path, name: Optional[str] = None) -> nn.Module:
    """Loads what save_pretrained wrote into `base_model` (a freshly loaded base, in place): one
    adapter (under `name`, default "default"), or every ``path/<name>/`` of a save of several,
    under their names (the last one active). Returns the model."""
    if os.path.isfile(os.path.join(path, CONFIG_NAME)) or not os.path.isdir(path):
        return load_adapter(base_model, path, DEFAULT_NAME if name is None else name)
    subdirs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, CONFIG_NAME)))
    if not subdirs:
        _read(path)  # raises: names the missing file
    for d in subdirs:
        load_adapter(base_model, os.path.join(path, d), d)
    return base_model


# the fields a fusion's sources must share with it (the sites and the bottleneck are checked on the model)
_FUSION_SHARED = ("activation", "scale")


def fused_adapter_weights(model: nn.Module, p) -> dict:
    """AdapterConfig(fusion=...): the frozen adapters of every fusion site of plan `p`, read from the
    sources' checkpoints and stacked in the config's order: {"<site>.adapter.adapters.down_weight":
    [N, r, d], ...}. Each source must be an AdapterConfig checkpoint of single adapters, with the
    same sites, bottleneck, activation and scale; raises a ValueError naming it otherwise."""
    config, stacks = p.config, {}
    for name, path in config.fusion.items():
        who = f"AdapterConfig: fusion[{name!r}] ({path})"
        try:
            source, tensors = _read(path)
        except (OSError, TypeError, ValueError) as e:  # a damaged config raises its fields' TypeErrors
            raise ValueError(f"{who}: {e}") from None
        if (
            not isinstance(source, AdapterConfig)
            or source.fusion is not None
            or source.num_experts != 1
            or source.gate
        ):
            raise ValueError(
                f"{who} must be a checkpoint of single adapters (AdapterConfig without fusion, "
                f"num_experts or gate); it holds {type(source).__name__} {source.to_dict()}"
            )
        for field in _FUSION_SHARED:
            if getattr(source, field) != getattr(config, field):
                raise ValueError(
                    f"{who} has {field}={getattr(source, field)!r}, the fusion {getattr(config, field)!r}"
                )
        if source.trains_layer_norms():  # AdapterFusion's adapters are Pfeiffer's, which train no norm
            warnings.warn(
                f"{who} trained its blocks' layer norms (train_layer_norms); the fusion reads its adapters "
                "only, over the base's norms",
                stacklevel=3,
            )
        try:  # its modules_to_save (a task head, say) are not the fusion's: only its adapters are read
            sp = plan(model, dataclasses.replace(source, modules_to_save=None, train_layer_norms=False))
        except ValueError as e:
            raise ValueError(f"{who} does not fit this model: {e}") from None
        sites, ours = ({s.name: _reads(s) for s in q.sites.sites} for q in (sp, p))
        if sites.keys() != ours.keys():
            raise ValueError(f"{who} places adapters at {sorted(sites)}, the fusion at {sorted(ours)}")
        for n in sites:
            if sites[n] != ours[n]:
                raise ValueError(f"{who}'s adapter at {n} reads {sites[n]}, the fusion's {ours[n]}")
        expected = expected_saved_shapes(model, sp)
        adapters = {n: t for n, t in tensors.items() if any(n.startswith(f"{s}.adapter.") for s in sites)}
        _check_names_and_shapes(expected, adapters, path, who)
        for s in p.sites.sites:
            r = config.bottleneck_for(s.d_model)
            have = tensors[f"{s.name}.adapter.down.weight"].shape[0]
            if have != r:
                raise ValueError(f"{who} has bottleneck {have} at {s.name}, the fusion {r}")
            for ours, theirs in STACKED_PARAMS.items():
                stacks.setdefault(f"{s.name}.adapter.adapters.{ours}", []).append(
                    tensors[f"{s.name}.adapter.{theirs}"]
                )
    return {n: torch.stack(ts) for n, ts in stacks.items()}


def _reads(site) -> str:
    """What the adapter of a site reads (sources and fusion must agree)."""
    if site.kind == "serial":
        return "the module's output"
    if site.kind == "parallel":
        return "the module's input"
    return f"the module's argument {site.residual_arg[0]}"
