"""Model surgery: ``inject`` a PEFT method into any model, count, and ``merge`` for deployment.

    model = peftkern.inject(model, peftkern.LoRAConfig(r=8))     # in place; only LoRA trains
    peftkern.print_trainable_parameters(model)
    ...train...
    peftkern.merge(model)                                        # LoRA folded in, masks baked

The base model's parameter names never change: LoRA and masks replace an ``nn.Linear`` by a
``LoRALinear`` / ``MaskedLinear`` that holds the same ``weight`` and ``bias`` Parameters, and an
adapter becomes a child ``adapter`` of the module it follows, applied by a forward hook. So the
base's own ``save_pretrained`` still writes a checkpoint the base loads (the extra keys are the
PEFT parameters), and ``peftkern.save_pretrained`` writes the PEFT parameters alone.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..nn import (
    AdaMixAdapter,
    Adapter,
    AdapterFusion,
    LoRALinear,
    MaskedLinear,
    MultiAdapter,
    PrefixKV,
    SoftPrompt,
    VisualPrompt,
)
from . import virtual_tokens
from .config import (
    AdapterConfig,
    BitFitConfig,
    LoRAConfig,
    MaskConfig,
    PrefixConfig,
    PromptConfig,
    VPTConfig,
    _Config,
    config_from_dict,
)
from .targets import matches, preset_for

_STATE = "_peftkern"  # the attribute inject sets on the model it changed
_PEFTKERN_MODULES = (
    Adapter,
    AdaMixAdapter,
    AdapterFusion,
    MultiAdapter,
    LoRALinear,
    MaskedLinear,
    PrefixKV,
    SoftPrompt,
    VisualPrompt,
)
_TOKEN_CONFIGS = (PrefixConfig, PromptConfig, VPTConfig)
_ADAPTER_KINDS = ("adapter", "parallel_adapter")


@dataclass
class InjectionState:
    config: _Config
    # what save_pretrained writes: the parameters inject made trainable, and a fusion's frozen adapters
    param_names: List[str]
    merged: bool = False


@dataclass
class _Site:
    name: str  # the module replaced (lora, mask) or that holds the adapter
    kind: str  # "lora" | "mask" | "adapter" | "parallel_adapter"
    # parallel_adapter: (name, position) of the module's argument that carries the FFN input as the
    # residual it adds (BertOutput's input_tensor); None: the module is the FFN, its input the FFN input
    residual_arg: Optional[tuple] = None
    d_model: int = 0  # adapters


@dataclass
class Plan:
    """What inject will do to a model, worked out before anything changes."""

    config: _Config
    sites: List[_Site] = field(default_factory=list)
    # existing parameters that train (BitFit's biases, modules_to_save)
    selected: List[str] = field(default_factory=list)
    tokens: Optional[virtual_tokens.TokensPlan] = None  # prefix, prompt, VPT


def injection_state(model: nn.Module) -> Optional[InjectionState]:
    return getattr(model, _STATE, None)


def _describe(config) -> str:
    fields = ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items() if k != "method")
    return f"{type(config).__name__}({fields})"


def _out_features(module: nn.Module, model: nn.Module, config_name: str, name: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    raise ValueError(
        f"{config_name}: cannot tell the width of {name} ({type(module).__name__}): target an "
        "nn.Linear, or a model whose config has hidden_size"
    )


def _matched(model, config, pattern, what) -> List[Tuple[str, nn.Module]]:
    found = [(n, m) for n, m in model.named_modules() if n and matches(n, pattern)]
    if not found:
        raise ValueError(
            f"{_describe(config)} matched no module of {type(model).__name__} ({what} {pattern!r})"
        )
    return found


def _linears(model, config, pattern, what):
    found = _matched(model, config, pattern, what)
    for n, m in found:
        if type(m) is not nn.Linear:
            raise ValueError(
                f"{type(config).__name__}: {what} matched {n} ({type(m).__name__}), which is not an "
                f"nn.Linear; name linear layers only"
            )
    return found


def plan(model: nn.Module, config: _Config) -> Plan:
    """The sites and selected parameters of `config` on `model`; raises before changing anything."""
    if not isinstance(config, _Config):
        raise TypeError(
            "inject: config must be an AdapterConfig, LoRAConfig, MaskConfig, BitFitConfig, PrefixConfig, "
            f"PromptConfig or VPTConfig; got {type(config).__name__}"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"inject: model must be a torch.nn.Module; got {type(model).__name__}")
    for n, m in model.named_modules():
        state = injection_state(m)
        if state is not None or isinstance(m, _PEFTKERN_MODULES):
            where = f"its submodule {n}" if n else "it"
            holds = _describe(state.config) if state is not None else f"a peftkern {type(m).__name__}"
            raise ValueError(
                f"inject: {_describe(config)} on a model already injected ({where} holds "
                f"{holds}); load a fresh base model to inject again"
            )
    # a checked copy: the caller's object may have been edited since it was built, or may be later
    config = config_from_dict(config.to_dict())
    cname = type(config).__name__
    p = Plan(config)
    explicit = getattr(config, "target_modules", None)
    if isinstance(config, (LoRAConfig, MaskConfig)):
        kind = "lora" if isinstance(config, LoRAConfig) else "mask"
        pattern = explicit
        if pattern is None:
            preset = preset_for(model, cname)
            pattern = preset.lora if kind == "lora" else preset.linears
        p.sites = [_Site(n, kind) for n, _ in _linears(model, config, pattern, "target_modules")]
    elif isinstance(config, AdapterConfig):
        p.sites = _adapter_sites(model, config, explicit)
    elif isinstance(config, BitFitConfig):
        names = [
            n
            for n, _ in model.named_parameters()
            if (
                n.rsplit(".", 1)[-1] == "bias" if config.bias_names is None else matches(n, config.bias_names)
            )
        ]
        if not names:
            raise ValueError(
                f"{_describe(config)} matched no parameter of {type(model).__name__} "
                f"({'parameters named bias' if config.bias_names is None else repr(config.bias_names)})"
            )
        p.selected += names
    elif isinstance(config, _TOKEN_CONFIGS):
        p.tokens = virtual_tokens.plan(model, config)
    if config.modules_to_save is not None:
        for n, m in _matched(model, config, config.modules_to_save, "modules_to_save"):
            p.selected += [f"{n}.{pn}" for pn, _ in m.named_parameters()]
    p.selected = list(dict.fromkeys(p.selected))
    return p


def _adapter_sites(model, config: AdapterConfig, explicit) -> List[_Site]:
    cname = type(config).__name__
    parallel = config.placement == "parallel"
    residual_arg = None
    if explicit is not None:
        names = [n for n, _ in _matched(model, config, explicit, "target_modules")]
    else:
        preset = preset_for(model, cname)
        patterns = {
            "houlsby": [preset.attention_output, preset.ffn_output],
            "pfeiffer": [preset.ffn_output],
            "parallel": [preset.ffn],
        }[config.placement]
        names = [
            n for pat in patterns for n, _ in _matched(model, config, pat, f"the {config.placement} preset")
        ]
        residual_arg = preset.ffn_residual_arg if parallel else None
    if config.drop_layers:
        names = _drop_lowest_layers(model, config, names)
    modules = dict(model.named_modules())
    sites = []
    for n in names:
        m = modules[n]
        if hasattr(m, "adapter"):
            raise ValueError(
                f"{cname}: {n} already has an attribute 'adapter'; cannot place an adapter there"
            )
        if parallel and isinstance(m, nn.Linear) and m.in_features != m.out_features:
            raise ValueError(
                f"{cname}: a parallel adapter reads {n}'s input ({m.in_features} features) and adds to its "
                f"output ({m.out_features}); they must be the same width"
            )
        d = _out_features(m, model, cname, n)
        sites.append(_Site(n, "parallel_adapter" if parallel else "adapter", residual_arg, d))
    return sites


def _block_index(model: nn.Module, name: str) -> Optional[int]:
    """The index of module `name` in the outermost nn.ModuleList on its path (a transformer's blocks:
    BERT's ``encoder.layer``, Llama's ``model.layers``, T5's ``encoder.block``, GPT-2's ``h``); None
    when no ModuleList holds it."""
    module = model
    for part in name.split("."):
        if isinstance(module, nn.ModuleList):
            return int(part)
        module = getattr(module, part)
    return None


def _drop_lowest_layers(model, config: AdapterConfig, names: List[str]) -> List[str]:
    """AdapterDrop: the sites of `names` outside the lowest config.drop_layers blocks."""
    n_drop, kept, blocks = config.drop_layers, [], set()
    for n in names:
        i = _block_index(model, n)
        if i is None:
            raise ValueError(
                f"AdapterConfig: drop_layers={n_drop} drops adapters by transformer block, but {n} lies in "
                "none (no nn.ModuleList of blocks holds it); target block modules only"
            )
        blocks.add(i)
        if i >= n_drop:
            kept.append(n)
    if not kept:
        raise ValueError(
            f"{_describe(config)}: drop_layers={n_drop} removed every adapter (the sites lie in blocks "
            f"{min(blocks)} to {max(blocks)})"
        )
    return kept


def _factory(module: nn.Module, model: nn.Module) -> dict:
    p = next(module.parameters(), None)
    p = next(model.parameters(), None) if p is None else p
    return {} if p is None else dict(device=p.device, dtype=p.dtype)


def _build(site: _Site, module: nn.Module, model: nn.Module, config, meta: bool = False) -> nn.Module:
    """The new module of a site: the replacement (lora, mask) or the adapter child. On "meta" (meta=True)
    only its shapes are real (plan-time checks)."""
    if site.kind == "lora":
        kw = dict(
            lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, use_rslora=config.use_rslora
        )
        if meta:
            return LoRALinear(
                module.in_features,
                module.out_features,
                config.r,
                bias=module.bias is not None,
                device="meta",
                **kw,
            )
        return LoRALinear.from_linear(module, config.r, **kw)
    if site.kind == "mask":
        kw = dict(threshold=config.threshold, score_init=config.score_init)
        if meta:
            return MaskedLinear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta", **kw
            )
        return MaskedLinear.from_linear(module, **kw)
    kw = dict(activation=config.activation, scale=config.scale, init=config.init)
    kw.update(dict(device="meta") if meta else _factory(module, model))
    d, r = site.d_model, config.bottleneck_for(site.d_model)
    if config.fusion is not None:  # the adapters frozen: inject loads them, the fusion trains
        fusion = AdapterFusion(d, len(config.fusion), r, **kw)
        fusion.adapters.requires_grad_(False)
        return fusion
    if config.num_experts > 1:
        return AdaMixAdapter(d, r, config.num_experts, **kw)
    return Adapter(d, r, **kw)


def _param_prefix(site: _Site) -> str:
    return site.name + (".adapter." if site.kind in _ADAPTER_KINDS else ".")


def _saved_params(site: _Site, new: nn.Module) -> Dict[str, torch.Tensor]:
    """The parameters of a site's new module that save_pretrained writes, under their model names:
    an adapter child's all (a fusion's frozen adapters too); a replacement's the trainable ones (not
    the base weight and bias it holds)."""
    prefix = _param_prefix(site)
    return {
        prefix + n: t for n, t in new.named_parameters() if site.kind in _ADAPTER_KINDS or t.requires_grad
    }


def expected_saved_shapes(model: nn.Module, p: Plan) -> Dict[str, torch.Size]:
    """Name -> shape of every parameter save_pretrained writes after inject(model, p.config)."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    shapes = {n: params[n].shape for n in p.selected}
    for site in p.sites:
        new = _build(site, modules[site.name], model, p.config, meta=True)
        shapes.update({n: t.shape for n, t in _saved_params(site, new).items()})
    if p.tokens is not None:
        shapes.update(virtual_tokens.expected_shapes(p.tokens, p.config))
    return shapes


# Hooks: module-level functions that find everything through the module they run on and keep no
# state between calls, so deep copies, DataParallel replicas, threads and activation-checkpointing
# recomputes each see only their own call (AdapterDrop's draws aside: see _dropped).
@torch.compiler.disable  # eager under torch.compile: inductor would draw from its own generator
def _uniform() -> float:
    return torch.rand((), device="cpu").item()


def _dropped(module) -> bool:
    """AdapterDrop: whether this call of `module` skips its adapter. In training mode only, one draw
    per adapter and call from torch's default CPU generator (no GPU sync, whatever the default
    device; torch.utils.checkpoint restores that generator for its recompute, which so draws the
    same); none when drop_prob is 0. The generator is the process's: threads drawing at once (the
    replicas of nn.DataParallel) interleave their draws, so a checkpointed recompute there does not
    see its own; use DistributedDataParallel."""
    p = module._peftkern_drop_prob
    return p > 0 and module.training and _uniform() < p


def _apply_adapter(module, output, x=None):
    if isinstance(output, tuple):  # modules returning (hidden, extras...): adapt the hidden states
        return (_apply_adapter(module, output[0], x), *output[1:])
    return module.adapter(output) if x is None else module.adapter(x, residual=output)


def _serial_adapter_hook(module, args, kwargs, output):
    return output if _dropped(module) else _apply_adapter(module, output)


def _parallel_adapter_hook(module, args, kwargs, output):
    """On the FFN itself: out = ffn(x) + scale * adapter_branch(x)."""
    if _dropped(module):
        return output
    return _apply_adapter(module, output, args[0] if args else next(iter(kwargs.values())))


def _parallel_adapter_residual_hook(module, args, kwargs):
    """On a module that adds the FFN input x as its residual (BertOutput: LayerNorm(dropout(dense(h))
    + x)): x becomes x + scale * adapter_branch(x), so the adapter's output joins the FFN's."""
    if _dropped(module):
        return None  # the arguments as they are
    name, position = module._peftkern_residual_arg
    if name in kwargs:
        kwargs = {**kwargs, name: module.adapter(kwargs[name])}
    else:
        args = (*args[:position], module.adapter(args[position]), *args[position + 1 :])
    return args, kwargs


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply(model: nn.Module, p: Plan) -> nn.Module:
    """Carries out a plan: freezes the model, builds the sites, leaves the new or selected
    parameters trainable, and marks the model injected."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    names = list(p.selected)
    for site in p.sites:
        target = modules[site.name]
        new = _build(site, target, model, p.config).train(target.training)
        names += list(_saved_params(site, new))
        if site.kind in ("lora", "mask"):
            _set_module(model, site.name, new)
            continue
        target.add_module("adapter", new)
        target._peftkern_drop_prob = p.config.drop_prob
        if site.kind == "adapter":
            target.register_forward_hook(_serial_adapter_hook, with_kwargs=True)
        elif site.residual_arg is None:
            target.register_forward_hook(_parallel_adapter_hook, with_kwargs=True)
        else:
            target._peftkern_residual_arg = site.residual_arg
            target.register_forward_pre_hook(_parallel_adapter_residual_hook, with_kwargs=True)
    if p.tokens is not None:
        names += virtual_tokens.apply(model, p.tokens, p.config, _factory(model, model))
    params = dict(model.named_parameters(remove_duplicate=False))
    for n in p.selected:
        params[n].requires_grad_(True)
    setattr(model, _STATE, InjectionState(p.config, names))
    return model


def inject(model: nn.Module, config: _Config) -> nn.Module:
    """Puts the PEFT method of `config` into `model` in place and returns it.

    Every parameter is frozen except the method's new parameters (LoRA factors, mask scores,
    adapters, prefixes, prompts) or selected ones (BitFit's biases) and those of
    ``config.modules_to_save``. Raises a ValueError naming the config when it matches nothing, when
    the model is already injected, when a target is the wrong kind of module, or when the model
    cannot take the method (a prefix on a model type whose positions peftkern does not know, say);
    the model is unchanged then."""
    p = plan(model, config)
    fused = None
    if isinstance(p.config, AdapterConfig) and p.config.fusion is not None:
        from .checkpoint import fused_adapter_weights  # checkpoint imports this module

        fused = fused_adapter_weights(model, p)  # read and checked before the model changes
    apply(model, p)
    if fused is not None:
        _copy_into(model, fused)
    return model


def _copy_into(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


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
def merge(model: nn.Module, verbose: bool = True) -> nn.Module:
    """For deployment: folds each LoRA update into its base weight and bakes each mask (both become
    plain ``nn.Linear`` layers, named as before), replaces each AdaMix adapter by its
    ``merge_experts()`` Adapter, and evaluates a prefix's reparametrisation or P-tuning's prompt
    encoder once into plain virtual tokens; adapters and fusions stay, as an adapter's
    nonlinearity cannot fold into a weight. Returns the model; with `verbose` prints what it
    merged. A merged model cannot be saved with peftkern.save_pretrained (its LoRA and mask
    parameters, or the prefix's projection, are gone)."""
    state = injection_state(model)
    if state is None:
        raise ValueError("merge: the model holds no peftkern method (call peftkern.inject first)")
    lora = masks = adapters = mixtures = fusions = projections = 0
    uses = {}
    for _, t in model.named_parameters(remove_duplicate=False):
        uses[id(t)] = uses.get(id(t), 0) + 1
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            linear.bias = module.bias
            if uses[id(module.weight)] > 1:  # tied (an LM head and its embeddings): merge into a copy
                linear.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
            else:
                module.merge()
                linear.weight = module.weight
            _set_module(model, name, linear)
            lora += 1
        elif isinstance(module, MaskedLinear):
            _set_module(model, name, module.bake().requires_grad_(False))
            masks += 1
        elif isinstance(module, AdaMixAdapter):
            _set_module(model, name, module.merge_experts())
            mixtures += 1
        elif isinstance(module, Adapter):
            adapters += 1
        elif isinstance(module, AdapterFusion):
            fusions += 1
        elif isinstance(module, PrefixKV) and module.prefix is None:
            module.freeze_projection()
            projections += 1
        elif isinstance(module, SoftPrompt) and module.prompt is None:
            module.merge_encoder()
            projections += 1
    state.merged = True
    if verbose:
        parts = []
        if lora:
            parts.append(f"LoRA merged into {lora} linear layers")
        if masks:
            parts.append(f"{masks} masks baked into their weights")
        if mixtures:
            parts.append(f"{mixtures} AdaMix adapters merged into one adapter each (their experts averaged)")
        if adapters:
            parts.append(f"{adapters} adapters kept (an adapter cannot merge into a weight)")
        if fusions:
            parts.append(f"{fusions} adapter fusions kept")
        if projections:
            parts.append("the prefix / prompt encoder evaluated once into plain (frozen) virtual tokens")
        print(
            "peftkern.merge: " + ("; ".join(parts) or f"nothing to merge for {type(state.config).__name__}")
        )
    return model
