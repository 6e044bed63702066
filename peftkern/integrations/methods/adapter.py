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

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...nn import AdaMixAdapter, Adapter, AdapterFusion, routing
from ...nn._autocast import autocast_tensors
from ...nn.adapter import PHM_INIT_RANGE, Compacter
from ...ops.adapter import adapter_multi
from ..config import AdapterConfig
from ..targets import preset_for
from . import GATED_REFUSAL, Method, active_of, add_to_dict_child, describe, factory, matched, module_names

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
        return AdapterPlan(sites)

    def expected_shapes(self, model, plan, config):
        modules, shapes = module_names(model), {}
        rule = _shared_rule(config, plan, modules, model, meta=True)
        for s in plan.sites:
            new = build(s, modules[s.name], model, config, meta=True, rule=rule)
            shapes.update({f"{s.name}.{ATTR}.{n}": t.shape for n, t in _own_parameters(new, rule)})
        if rule is not None:
            shapes[SHARED_RULE] = rule.shape
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
        return saved

    def remove(self, model, plan, name):
        modules = module_names(model)
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
        return [f"{kept} {what} kept ({name!r}: an adapter cannot merge into a weight)"]

    def site_keys(self, plan):
        return [(s.name, f"adapter:{s.kind}") for s in plan.sites]

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
