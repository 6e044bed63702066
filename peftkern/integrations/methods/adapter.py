"""Bottleneck adapters (Houlsby, Pfeiffer, parallel / AdaptFormer), AdapterDrop, AdaMix and
AdapterFusion: each site module gets a child ``adapter`` (a ModuleDict of named adapters) and a
hook that applies them.

Sites: ``target_modules``, or the preset's placement (houlsby: the attention output and FFN
output projections; pfeiffer: the FFN output; parallel: the FFN, or BertOutput's residual input,
or, where the FFN is no module of its own (BART's inline fc1 -> act -> fc2), its output projection
reading the input of the preset's ``ffn_input`` sibling: a forward pre-hook on fc1 hands its input
to the hook on fc2, which adds the adapter's branch of it to fc2's output).
Saved: ``<site>.adapter.<param>`` (``down.weight`` ...; a gated adapter's ``gate.weight`` and
``gate.bias``; a fusion's ``adapters.*`` and its query, key and value). Merge: an AdaMix mixture
becomes its ``merge_experts()`` adapter; the rest stay.

``train_layer_norms``: each adapter's copy of the affine of the norms in its sites' blocks, a child
``adapter_norm`` (ModuleDict) of each norm module, applied by a forward hook there; saved as
``<norm>.adapter_norm.weight`` / ``.bias``; merge copies it into the base's norm. ``prune_fusion``
(AdapterDrop) cuts every fusion site to the k adapters it weights most (bottom of this file).

Compacter (``phm_dim`` set): each adapter is a ``peftkern.nn.adapter.Compacter``, its down and up
weights built from PHM factors on each call (then the same fused op); saved as the site's
``down.phm_left`` ... and, with ``shared_phm_rule``, the one rule under ``adapter_phm_rule`` (tied
into every PHM layer of the model; loading it sets them all). Merge: each Compacter becomes the plain
``Adapter`` of its built weights.

Several names applied together at one site: serial adapters stack (each reads the previous one's
output), parallel ones add their branches. A mixed batch runs each row through its sample's
adapter with one ``ops.adapter_multi`` per site (bottlenecks zero-padded to the largest, each scale
folded into its up-projection); AdaMix mixtures, fusions and gated (UniPELT) adapters are not
routed per sample.
"""

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...nn import AdaMixAdapter, Adapter, AdapterFusion, routing
from ...nn._autocast import autocast_tensors
from ...nn.adapter import PHM_INIT_RANGE, Compacter
from ...ops.adapter import adapter_multi
from ..config import AdapterConfig
from ..targets import preset_for
from . import (
    GATED_REFUSAL,
    Method,
    active_of,
    add_to_dict_child,
    base_modules,
    describe,
    factory,
    matched,
    module_names,
    remove_from_dict_child,
)

ATTR = "adapter"  # the ModuleDict of named adapters on a site module


@dataclass
class Site:
    name: str  # the module that holds the adapter
    kind: str  # "serial" | "parallel" | "residual" | "split"
    # residual: (name, position) of the module's argument that carries the FFN input as the residual
    # it adds (BertOutput's input_tensor)
    residual_arg: Optional[tuple] = None
    d_model: int = 0
    # split: the module whose input the adapter reads (BART's fc1); its output adds to this one's (fc2)
    input_module: Optional[str] = None


@dataclass
class AdapterPlan:
    sites: List[Site] = field(default_factory=list)
    # train_layer_norms: {norm module name: its formula (NORM_KINDS)}, the norms of the sites' blocks
    norms: Dict[str, str] = field(default_factory=dict)


def _out_features(module, model, config_name, name) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    raise ValueError(
        f"{config_name}: cannot tell the width of {name} ({type(module).__name__}): target an "
        "nn.Linear, or a model whose config has hidden_size"
    )


def block_index(model: nn.Module, name: str) -> Optional[int]:
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
        i = block_index(model, n)
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
            f"{describe(config)}: drop_layers={n_drop} removed every adapter (the sites lie in blocks "
            f"{min(blocks)} to {max(blocks)})"
        )
    return kept


SHARED_RULE = "adapter_phm_rule"  # the saved name of a Compacter's shared PHM rule (model-level, once)


def _shared_rule(config, plan, modules, model, meta=False):
    """A Compacter's PHM rule shared by all its layers (``shared_phm_rule``), AdapterHub's init; else None."""
    if config.phm_dim is None or not config.shared_phm_rule:
        return None
    n = config.phm_dim
    kw = dict(device="meta") if meta else factory(modules[plan.sites[0].name], model)
    rule = nn.Parameter(torch.empty(n, n, n, **kw))
    if not meta:
        with torch.no_grad():
            rule.normal_(0.0, PHM_INIT_RANGE)
    return rule


def _own_parameters(adapter, rule):
    """(name, tensor) of an adapter's parameters, without the shared rule (saved once, SHARED_RULE)."""
    return [(n, t) for n, t in adapter.named_parameters() if rule is None or t is not rule]


def build(site: Site, module, model, config, meta=False, rule=None) -> nn.Module:
    """The adapter of a site (on "meta" with meta=True: shapes only); `rule`: a Compacter's shared PHM
    rule (``config.phm_dim`` set, ``shared_phm_rule``)."""
    kw = dict(activation=config.activation, scale=config.scale, init=config.init)
    kw.update(dict(device="meta") if meta else factory(module, model))
    d, r = site.d_model, config.bottleneck_for(site.d_model)
    if config.phm_dim is not None:
        del kw["init"]  # Compacter's own init
        return Compacter(
            d, r, phm_dim=config.phm_dim, phm_rank=config.phm_rank, rule=rule, gate=config.gate, **kw
        )
    if config.fusion is not None:  # the adapters frozen: inject loads them, the fusion trains
        fusion = AdapterFusion(d, len(config.fusion), r, **kw)
        fusion.adapters.requires_grad_(False)
        return fusion
    if config.num_experts > 1:
        return AdaMixAdapter(d, r, config.num_experts, **kw)
    return Adapter(d, r, gate=config.gate, **kw)


class AdapterMethod(Method):
    config_class = AdapterConfig

    def plan(self, model, config):
        cname = type(config).__name__
        parallel = config.placement == "parallel"
        residual_arg = ffn_input = None
        if config.target_modules is not None:
            names = [n for n, _ in matched(model, config, config.target_modules, "target_modules")]
        else:
            preset = preset_for(model, cname)
            patterns = {
                "houlsby": [preset.attention_output, preset.ffn_output],
                "pfeiffer": [preset.ffn_output],
                "parallel": [preset.ffn],
            }[config.placement]
            names = [
                n
                for pat in patterns
                for n, _ in matched(model, config, pat, f"the {config.placement} preset")
            ]
            residual_arg = preset.ffn_residual_arg if parallel else None
            ffn_input = preset.ffn_input if parallel else None
        if config.drop_layers:
            names = _drop_lowest_layers(model, config, names)
        modules = module_names(model)
        sites = []
        for n in names:
            m = modules[n]
            held = getattr(m, ATTR, None)
            if held is not None and not (
                isinstance(held, nn.ModuleDict) and hasattr(m, "_peftkern_adapters")
            ):
                raise ValueError(
                    f"{cname}: {n} already has an attribute 'adapter'; cannot place an adapter there"
                )
            source = None
            if ffn_input is not None:  # the FFN's input is another module's (BART: fc1 of fc2)
                parent = n.rpartition(".")[0]
                source = f"{parent}.{ffn_input}" if parent else ffn_input
                reader = modules.get(source)
                if reader is None:
                    raise ValueError(
                        f"{cname}: the parallel preset reads the FFN input of {n} from {source}, which "
                        f"{type(model).__name__} does not have"
                    )
            else:
                reader = m
            if parallel and isinstance(reader, nn.Linear) and isinstance(m, nn.Linear):
                if reader.in_features != m.out_features:
                    read = n if source is None else source
                    raise ValueError(
                        f"{cname}: a parallel adapter reads {read}'s input ({reader.in_features} features) "
                        f"and adds to {n}'s output ({m.out_features}); they must be the same width"
                    )
            if not parallel:
                kind = "serial"
            else:
                kind = "split" if source else ("parallel" if residual_arg is None else "residual")
            sites.append(Site(n, kind, residual_arg, _out_features(m, model, cname, n), source))
        if config.phm_dim is not None:  # Compacter: its PHM layers split d_model and the bottleneck
            for s in sites:
                r = config.bottleneck_for(s.d_model)
                if s.d_model % config.phm_dim or r % config.phm_dim:
                    raise ValueError(
                        f"{cname}: phm_dim ({config.phm_dim}) must divide d_model ({s.d_model}) and the "
                        f"bottleneck ({r}) at {s.name}"
                    )
        norms = _block_norms(model, config, [s.name for s in sites]) if config.trains_layer_norms() else {}
        return AdapterPlan(sites, norms)

    def expected_shapes(self, model, plan, config):
        modules, shapes = module_names(model), {}
        rule = _shared_rule(config, plan, modules, model, meta=True)
        for s in plan.sites:
            new = build(s, modules[s.name], model, config, meta=True, rule=rule)
            shapes.update({f"{s.name}.{ATTR}.{n}": t.shape for n, t in _own_parameters(new, rule)})
        if rule is not None:
            shapes[SHARED_RULE] = rule.shape
        for n in plan.norms:
            shapes.update({f"{n}.{NORM_ATTR}.{p}": t.shape for p, t in _affine(modules[n]).items()})
        return shapes

    def apply(self, model, plan, config, name):
        modules, saved = module_names(model), {}
        rule = _shared_rule(config, plan, modules, model)
        for s in plan.sites:
            m = modules[s.name]
            new = build(s, m, model, config, rule=rule).train(m.training)
            if not hasattr(m, "_peftkern_adapters"):
                m._peftkern_adapters, m._peftkern_adapter_hooks = {}, {}
                m._peftkern_active = getattr(m, "_peftkern_active", ())
            add_to_dict_child(m, ATTR, name, new)
            m._peftkern_adapters[name] = dict(
                kind=s.kind, residual_arg=s.residual_arg, drop_prob=config.drop_prob
            )
            if s.kind not in m._peftkern_adapter_hooks:
                if s.kind == "residual":
                    h = m.register_forward_pre_hook(_residual_hook, with_kwargs=True)
                elif s.kind == "split":
                    h = _split_hooks(modules[s.input_module], m)
                else:
                    h = m.register_forward_hook(_HOOKS[s.kind], with_kwargs=True)
                m._peftkern_adapter_hooks[s.kind] = h
                if s.kind == "serial" and "split" in m._peftkern_adapter_hooks:
                    m._peftkern_adapter_hooks["split"].move_last(m)
            saved.update(
                {f"{s.name}.{ATTR}.{n}": f"{s.name}.{ATTR}.{name}.{n}" for n, _ in _own_parameters(new, rule)}
            )
        if rule is not None:  # saved once; in the model, tied into every PHM layer (the first site's name)
            saved[SHARED_RULE] = f"{plan.sites[0].name}.{ATTR}.{name}.down.phm_rule"
        for n, kind in plan.norms.items():
            m = modules[n]
            copy = _NormAffine(m)
            add_to_dict_child(m, NORM_ATTR, name, copy)
            if not hasattr(m, "_peftkern_norm_hook"):
                m._peftkern_norm_kind = kind
                m._peftkern_norm_hook = m.register_forward_hook(_norm_hook, with_kwargs=True)
                m._peftkern_active = getattr(m, "_peftkern_active", ())
            saved.update({f"{n}.{NORM_ATTR}.{p}": f"{n}.{NORM_ATTR}.{name}.{p}" for p in _affine(m)})
        return saved

    def remove(self, model, plan, name):
        modules = module_names(model)
        for n in plan.norms:
            _remove_norm_copy(modules[n], name)
        for s in plan.sites:
            m = modules[s.name]
            del getattr(m, ATTR)[name]
            m._peftkern_adapters.pop(name)
            m._peftkern_active = tuple(n for n in m._peftkern_active if n != name)
            kinds = {v["kind"] for v in m._peftkern_adapters.values()}
            for kind in list(m._peftkern_adapter_hooks):
                if kind not in kinds:
                    m._peftkern_adapter_hooks.pop(kind).remove()
                    if kind == "split":  # the input module's hook went with it
                        modules[s.input_module].__dict__.pop(FEED, None)
                        m.__dict__.pop(FEED, None)
            if not m._peftkern_adapters:
                delattr(m, ATTR)
                # _peftkern_active stays: other methods' state on this module reads it
                for attr in ("_peftkern_adapters", "_peftkern_adapter_hooks"):
                    m.__dict__.pop(attr, None)

    def merge(self, model, plan, name):
        modules, mixtures, kept, compacters = module_names(model), 0, 0, 0
        for n in plan.norms:  # the adapter's layer-norm affine becomes the base's
            m = modules[n]
            for p, t in _affine(getattr(m, NORM_ATTR)[name]).items():
                getattr(m, p).copy_(t)
            _remove_norm_copy(m, name)
        for s in plan.sites:
            holder = getattr(modules[s.name], ATTR)
            if isinstance(holder[name], Compacter):
                holder[name] = holder[name].to_adapter()
                compacters += 1
            elif isinstance(holder[name], AdaMixAdapter):
                holder[name] = holder[name].merge_experts()
                mixtures += 1
            else:
                kept += 1
        if compacters:
            return [f"{compacters} Compacters became plain adapters ({name!r}: their PHM weights built once)"]
        if mixtures:
            return [
                f"{mixtures} AdaMix adapters merged into one adapter each ({name!r}: their experts averaged)"
            ]
        what = "adapter fusions" if isinstance(holder[name], AdapterFusion) else "adapters"
        parts = [f"{kept} {what} kept ({name!r}: an adapter cannot merge into a weight)"]
        if plan.norms:
            parts.append(f"its {len(plan.norms)} layer norms' weights copied into the base's")
        return parts

    def site_keys(self, plan):
        # a norm takes one adapter's affine per sample, also when adapters apply together
        norms = [(n, "layer norm!") for n in plan.norms]
        return [(s.name, f"adapter:{s.kind}") for s in plan.sites] + norms

    def mixed_refusal(self, plan, config):
        if config.fusion is not None:
            return "an AdapterFusion attends over all its adapters for every row"
        if config.num_experts > 1:
            return "an AdaMix mixture draws its experts per call (merge it first: peftkern.merge)"
        if config.gate:
            return GATED_REFUSAL
        return ""


# -- hooks: they find everything through the module they run on ------------------------------------
@torch.compiler.disable  # eager under torch.compile: inductor would draw from its own generator
def _uniform() -> float:
    return torch.rand((), device="cpu").item()


def _dropped(module, name) -> bool:
    """AdapterDrop: whether this call skips adapter `name`: in training mode only, one draw per adapter
    and call from torch's default CPU generator (no GPU sync; torch.utils.checkpoint restores that
    generator for its recompute, which so draws the same); none when drop_prob is 0."""
    p = module._peftkern_adapters[name]["drop_prob"]
    return p > 0 and module.training and _uniform() < p


def _apply(module, kind, x, residual):
    """The site's output for its adapters of `kind`: x the adapters' input, residual what they add to
    (None: x itself, a serial adapter)."""
    own = [n for n, v in module._peftkern_adapters.items() if v["kind"] == kind]
    names, route = routing.resolve(module, own, active_of(module))
    adapters = getattr(module, ATTR)
    if route is None:
        out = x if residual is None else residual
        for n in names:
            if not _dropped(module, n):
                out = adapters[n](out) if kind == "serial" else adapters[n](x, residual=out)
        return out
    used = [n for n in own if any(n in s for s in route.samples)]
    gated = [n for n in used if getattr(adapters[n], "gate", None) is not None]
    if gated:  # the model refuses such a batch before it runs (inject's sample check)
        raise ValueError(f"the adapters at a {type(module).__name__}: {gated}: {GATED_REFUSAL}")
    lead, d = x.shape[:-1], x.shape[-1]
    rows = x.numel() // d if d else 0
    ids = route.ids(used, rows, x.device, f"the adapters at a {type(module).__name__}")
    for j, n in enumerate(used):
        if _dropped(module, n):
            ids = torch.where(ids == j, -1, ids)
    w_down, b_down, w_up, b_up = _stacked([adapters[n] for n in used], x)
    act = adapters[used[0]].activation
    res = None if residual is None else residual.reshape(-1, d)
    out = adapter_multi(
        x.reshape(-1, d), w_down, b_down, w_up, b_up, ids, activation=act, scale=1.0, residual=res
    )
    return out.reshape(*lead, d)


def _stacked(adapters, x):
    """[L, r, d], [L, r], [L, d, r], [L, d]: bottlenecks zero-padded to the largest, scales in the up."""
    r = max(a.bottleneck for a in adapters)
    parts = []
    for a in adapters:
        wd, bd, wu, bu = autocast_tensors(x, [a.down.weight, a.down.bias, a.up.weight, a.up.bias])
        pad = r - a.bottleneck
        parts.append(
            (F.pad(wd, (0, 0, 0, pad)), F.pad(bd, (0, pad)), F.pad(wu, (0, pad)) * a.scale, bu * a.scale)
        )
    return [torch.stack(t) for t in zip(*parts)]


def _on_hidden(output, fn):
    if isinstance(output, tuple):  # modules returning (hidden, extras...): adapt the hidden states
        return (fn(output[0]), *output[1:])
    return fn(output)


def _serial_hook(module, args, kwargs, output):
    return _on_hidden(output, lambda h: _apply(module, "serial", h, None))


def _parallel_hook(module, args, kwargs, output):
    """On the FFN itself: out = ffn(x) + scale * adapter_branch(x)."""
    x = args[0] if args else next(iter(kwargs.values()))
    return _on_hidden(output, lambda h: _apply(module, "parallel", x, h))


def _residual_hook(module, args, kwargs):
    """On a module that adds the FFN input x as its residual (BertOutput: LayerNorm(dropout(dense(h))
    + x)): x becomes x + scale * adapter_branch(x), so the adapter's output joins the FFN's."""
    names = [v["residual_arg"] for v in module._peftkern_adapters.values() if v["kind"] == "residual"]
    arg, position = names[0]
    if arg in kwargs:
        return args, {**kwargs, arg: _apply(module, "residual", kwargs[arg], kwargs[arg])}
    return (
        *args[:position],
        _apply(module, "residual", args[position], args[position]),
        *args[position + 1 :],
    ), kwargs


class _FFNInput:
    """What a split site's input module (BART's fc1) hands to its output module (fc2) within one
    call: the input tensor, taken (and dropped) by fc2's hook. A plain object held by both modules
    (``_peftkern_ffn_input``), not a module, so neither becomes the other's child; a deepcopy of the
    model copies it once for both."""

    __slots__ = ("x",)

    def __init__(self):
        self.x = None


class _SplitHandles:
    """A split site's two hooks: the input module's pre-hook and the output module's hook."""

    def __init__(self, keep, add):
        self.keep, self.add = keep, add

    def remove(self):
        self.keep.remove()
        self.add.remove()

    def move_last(self, module):
        """The branch joins after the serial adapters at the module (whichever was injected first), as
        a parallel adapter on an FFN module adds to the FFN's output after an adapter inside it (T5:
        houlsby on DenseReluDense.wo, parallel on DenseReluDense)."""
        self.add.remove()
        self.add = module.register_forward_hook(_split_hook, with_kwargs=True)


FEED = "_peftkern_ffn_input"  # the _FFNInput a split site's two modules share


def _split_hooks(reader, module) -> _SplitHandles:
    """A split site's two hooks: on `reader` (fc1) keep its input; on `module` (fc2) add the
    adapters' branch of that input to the output."""
    feed = _FFNInput()
    setattr(reader, FEED, feed)
    setattr(module, FEED, feed)
    return _SplitHandles(
        reader.register_forward_pre_hook(_keep_input_hook, with_kwargs=True),
        module.register_forward_hook(_split_hook, with_kwargs=True),
    )


def _keep_input_hook(reader, args, kwargs):
    getattr(reader, FEED).x = args[0] if args else next(iter(kwargs.values()))


def _split_hook(module, args, kwargs, output):
    """On the FFN's output projection (fc2): out = fc2(h) + scale * adapter_branch(fc1's input)."""
    feed = getattr(module, FEED)
    x, feed.x = feed.x, None  # taken, so the holder keeps no activations past the call
    if x is None:
        raise RuntimeError(
            f"peftkern: the parallel adapter at a {type(module).__name__} reads the FFN input of the module "
            "before it, which did not run before it in this call"
        )
    return _on_hidden(output, lambda h: _apply(module, "split", x, h))


_HOOKS = {"serial": _serial_hook, "parallel": _parallel_hook}


# -- train_layer_norms: each adapter's own copy of its blocks' layer norms' affine ------------------
NORM_ATTR = "adapter_norm"  # the ModuleDict of named affine copies on a norm module
# the norms whose formula the hook computes with another affine: "layer_norm" F.layer_norm (bias
# optional), "rms_norm" F.rms_norm, "hf_rms" Llama's (normalised in float32, cast to the input's dtype,
# then times the weight: Mistral, Qwen2, Qwen3 alike), "t5" T5's (cast to the weight's dtype when it is
# half, then times the weight). Gemma's (1 + weight) and other norms are refused, never guessed.
_NORM_CLASSES = {
    "LlamaRMSNorm": "hf_rms",
    "MistralRMSNorm": "hf_rms",
    "Qwen2RMSNorm": "hf_rms",
    "Qwen3RMSNorm": "hf_rms",
    "T5LayerNorm": "t5",
    "MT5LayerNorm": "t5",
}


def _norm_kind(module, strict: bool = True) -> Optional[str]:
    """The formula of a norm module (see _NORM_CLASSES); None: not a norm. A norm whose formula
    peftkern does not know raises when asked for (strict), else stays the base's, with a warning."""
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        return "rms_norm"
    kind = _NORM_CLASSES.get(type(module).__name__)
    if kind is None and type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
        if not strict:
            warnings.warn(
                f"AdapterConfig: the placement's default trains the blocks' layer norms, but peftkern does "
                f"not know the formula of {type(module).__name__}: it stays the base's (pass "
                "train_layer_norms=False to silence this)",
                stacklevel=2,
            )
            return None
        raise ValueError(
            f"AdapterConfig: train_layer_norms trains the layer norms of the adapters' blocks, but peftkern "
            f"does not know the formula of {type(module).__name__}; pass train_layer_norms=False"
        )
    return kind


def _affine(module) -> Dict[str, torch.Tensor]:
    """{"weight": ..., "bias": ...} of a norm module (or of a copy), the ones it has."""
    return {p: getattr(module, p) for p in ("weight", "bias") if getattr(module, p, None) is not None}


def _block_norms(model, config, names) -> Dict[str, str]:
    """{name: formula} of the norm modules inside the transformer blocks that hold the sites `names`
    (a block: the module at the index of the outermost nn.ModuleList on a site's path, as drop_layers
    reads it). The final norm and the embeddings' lie in no block: they stay the base's. Asked for
    (train_layer_norms=True), a site in no block and a block without norms raise; by default (None,
    the placement's paper's choice) they train none."""
    strict, blocks = config.train_layer_norms is True, set()
    for n in names:
        module, parts, prefix = model, n.split("."), None
        for i, part in enumerate(parts):
            if isinstance(module, nn.ModuleList):
                prefix = ".".join(parts[: i + 1])
                break
            module = getattr(module, part)
        if prefix is None and not strict:
            continue
        if prefix is None:
            raise ValueError(
                f"{describe(config)}: train_layer_norms trains the layer norms of the adapters' transformer "
                f"blocks, but {n} lies in none (no nn.ModuleList of blocks holds it); pass "
                "train_layer_norms=False"
            )
        blocks.add(prefix)
    norms = {}
    for n, m in base_modules(model):
        if any(n.startswith(b + ".") for b in blocks):
            kind = _norm_kind(m, strict)
            if kind is not None and getattr(m, "weight", None) is not None:  # no affine: nothing to train
                norms[n] = kind
    if not norms and strict:
        raise ValueError(
            f"{describe(config)}: train_layer_norms found no LayerNorm / RMSNorm with a weight in the "
            f"adapters' blocks ({sorted(blocks)[:3]}...); pass train_layer_norms=False"
        )
    return norms


class _NormAffine(nn.Module):
    """One adapter's copy of a norm module's affine parameters (weight, and bias where it has one),
    initialised from the base's (so the adapter starts as the base model)."""

    def __init__(self, norm):
        super().__init__()
        for p, t in _affine(norm).items():
            self.register_parameter(p, nn.Parameter(t.detach().clone()))


def _normalized(module, kind, x, weight, bias):
    """The norm's formula with affine (weight, bias); weight None: the normalised x alone."""
    if kind == "layer_norm":
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    if kind == "rms_norm":
        return F.rms_norm(x, module.normalized_shape, weight, module.eps)
    h = x.to(torch.float32)
    if kind == "hf_rms":
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype)
    else:  # t5: the variance in float32, the product in x's dtype, half when the weight is
        h = x * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        if module.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(module.weight.dtype)
    return h if weight is None else weight * h


def _norm_hook(module, args, kwargs, output):
    """On a norm module: the norm of its input with the active adapter's affine (the base's output when
    none is active); in a mixed batch each row's affine from its sample's adapter, the base's for the
    rest (x normalised once, then scaled and shifted per row). The base's own output is discarded
    there: the cost of one norm, next to the block's GEMMs."""
    own = list(getattr(module, NORM_ATTR))
    names, route = routing.resolve(module, own, active_of(module))
    if route is None and not names:
        return output
    copies, kind = getattr(module, NORM_ATTR), module._peftkern_norm_kind
    x = args[0] if args else next(iter(kwargs.values()))
    if route is None:  # one name at most: inject's check refuses two on one norm
        c = copies[names[0]]
        return _normalized(module, kind, x, c.weight, getattr(c, "bias", None))
    used = [n for n in own if any(n in s for s in route.samples)]
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    ids = route.ids(used, rows, x.device, f"the layer norm copies at a {type(module).__name__}")
    ids = torch.where(ids < 0, len(used), ids)  # the base's affine: the last row of the stacks
    y = _normalized(module, kind, x, None, None).reshape(-1, d)
    y = torch.stack([copies[n].weight for n in used] + [module.weight])[ids] * y
    if getattr(module, "bias", None) is not None:
        y = y + torch.stack([copies[n].bias for n in used] + [module.bias])[ids]
    return y.reshape(output.shape)


def _remove_norm_copy(module, name) -> None:
    if remove_from_dict_child(module, NORM_ATTR, name):  # no copy left: the base's norm again
        module._peftkern_norm_hook.remove()
        for attr in ("_peftkern_norm_hook", "_peftkern_norm_kind"):
            module.__dict__.pop(attr, None)
        # _peftkern_active stays: other methods' state on this module reads it


# -- AdapterDrop's fusion pruning ------------------------------------------------------------------
@dataclass
class FusionPruning:
    """What ``prune_fusion`` kept: ``kept`` the adapters' names (the stack's order, as in the
    config's fusion dict); ``weights`` every adapter's mean fusion weight (the mean over the fusion
    sites of each site's mean over tokens), the ranking pruning used; ``site_weights`` each site's
    mean per adapter (the stack's order before pruning)."""

    kept: List[str]
    weights: Dict[str, float]
    site_weights: Dict[str, List[float]]


def _token_mask(batch, lead):
    """The batch's padding mask over tokens of shape `lead` (attention_mask, or the decoder's for a
    decoder site); None: every token counts (a tensor batch, or no mask of that shape)."""
    if not isinstance(batch, dict):
        return None
    for key in ("attention_mask", "decoder_attention_mask"):
        m = batch.get(key)
        if isinstance(m, torch.Tensor) and tuple(m.shape) == tuple(lead):
            return m
    return None


@torch.no_grad()
def prune_fusion(model: nn.Module, data, k: int, *, name: Optional[str] = None) -> FusionPruning:
    """AdapterDrop's pruning of an AdapterFusion (Rücklé et al. 2021, §5 "AdapterFusion pruning"):
    keeps the k adapters the fusion weights most on held-out `data`, in every fusion site alike.

    Runs the model in eval mode without gradients over `data` (an iterable of batches: a dict of
    model keyword arguments, or a tensor passed as the first argument) with fusion `name` (None:
    the model's one AdapterFusion) active, and records at each site the fusion's attention
    weights p ``[..., N]`` (the softmax over the N adapters). A site's mean weight of adapter n is
    Σ_tokens m·p_n / Σ_tokens m, m the batch's ``attention_mask`` (``decoder_attention_mask`` at a
    decoder site) where its shape is the site's tokens, else 1 (every token); an adapter's score is
    the mean of its site means over the sites (each layer counts alike, as the paper averages over
    layers). The k best (ties: the first in the stack) are kept at every site, as in the paper,
    which keeps the same adapters in all layers: each fusion's stacked adapters and the config's
    fusion dict are cut to them, so ``ops.adapter_stack`` runs over N = k, ``save_pretrained``
    writes k adapters and ``from_pretrained`` builds fusions of k. The fusion's query, key and
    value stay as they are: the pruned fusion is the softmax over the kept adapters only. In place;
    returns a ``FusionPruning``. Optimizers built before hold the dropped tensors: build them again.
    """
    from ..inject import injection_state, set_active  # inject imports this module

    state = injection_state(model)
    if state is None or not state.adapters:
        raise ValueError("prune_fusion: the model holds no peftkern adapter (call peftkern.inject first)")
    fusions = [
        n for n, a in state.adapters.items() if isinstance(a.config, AdapterConfig) and a.config.fusion
    ]
    if name is None:
        if len(fusions) != 1:
            raise ValueError(
                f"prune_fusion: the model holds {len(fusions)} AdapterFusion adapters ({fusions}); name one"
            )
        name = fusions[0]
    if name not in fusions:
        raise ValueError(
            f"prune_fusion: {name!r} is no AdapterFusion adapter of the model (its fusions: {fusions})"
        )
    a = state.adapters[name]
    n_adapters = len(a.config.fusion)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"prune_fusion: k must be an int; got {type(k).__name__} {k!r:.40}")
    if not 1 <= k <= n_adapters:
        raise ValueError(f"prune_fusion: k must be in [1, {n_adapters}] (the fusion's adapters); got {k}")
    if isinstance(data, (dict, torch.Tensor)) or not hasattr(data, "__iter__"):
        raise TypeError(
            "prune_fusion: data must be an iterable of batches (dicts of model arguments, or tensors); "
            f"got {type(data).__name__}"
        )
    if routing.current() is not None:
        raise ValueError("prune_fusion: a mixed batch is set (peftkern.tasks); prune outside it")
    modules = module_names(model)
    sites = [s.name for s in a.plan.sites.sites]
    fusion_of = {s: getattr(modules[s], ATTR)[name] for s in sites}
    sums = {s: torch.zeros(n_adapters, dtype=torch.float64) for s in sites}
    counts = dict.fromkeys(sites, 0.0)
    batch_now = {}

    def record(site):
        def hook(fusion, args, output):
            p = fusion.last_weights.to(torch.float64)  # [..., N]
            m = _token_mask(batch_now.get("batch"), p.shape[:-1])
            m = torch.ones(p.shape[:-1], dtype=torch.float64) if m is None else m.to(torch.float64)
            m = m.to(p.device)
            sums[site] += (p * m[..., None]).reshape(-1, n_adapters).sum(0).cpu()
            counts[site] += float(m.sum())

        return hook

    was_training, before = model.training, state.active
    handles, batches = [], 0
    try:
        if name not in before:
            set_active(model, name)
        model.eval()
        for s, f in fusion_of.items():
            f.record_weights = True
            handles.append(f.register_forward_hook(record(s)))
        for batch in data:
            batch_now["batch"] = batch
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, torch.Tensor):
                model(batch)
            else:
                raise TypeError(
                    f"prune_fusion: a batch must be a dict of model arguments or a tensor; got "
                    f"{type(batch).__name__}"
                )
            batches += 1
    finally:
        for h in handles:
            h.remove()
        for f in fusion_of.values():
            f.record_weights, f.last_weights = False, None
        model.train(was_training)
        if name not in before:
            set_active(model, before or None)
    if not batches:
        raise ValueError("prune_fusion: data held no batch")
    for s in sites:
        if counts[s] == 0:
            raise ValueError(
                f"prune_fusion: the fusion at {s} saw no token over data (every token padding, or the "
                "site never ran)"
            )
    site_means = {s: sums[s] / counts[s] for s in sites}
    score = torch.stack(list(site_means.values())).mean(0)
    names = list(a.config.fusion)
    ranked = sorted(range(n_adapters), key=lambda i: (-float(score[i]), i))
    kept = sorted(ranked[:k])
    for f in fusion_of.values():
        f.keep(kept)
    config = dataclasses.replace(a.config, fusion={names[i]: a.config.fusion[names[i]] for i in kept})
    a.config = a.plan.config = config  # save_pretrained writes it: from_pretrained builds fusions of k
    return FusionPruning(
        kept=[names[i] for i in kept],
        weights={names[i]: float(score[i]) for i in range(n_adapters)},
        site_weights={s: [float(v) for v in site_means[s]] for s in sites},
    )
