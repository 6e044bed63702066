"""Prefix tuning (Li & Liang 2021) and P-tuning v2: named ``peftkern.nn.PrefixKV`` modules on the
model's base (``model.base_model``) as ``peftkern_prefix.<name>``, read by peftkern's attention
function, which injection registers with transformers' ``AttentionInterface`` (and sdpa's mask
function with ``AttentionMaskInterface``) and sets the model to use.

A forward pre-hook on the base shifts each sample's position ids by its prefix length P and hands
the prefixes to every attention call through the forward's keyword arguments, which transformers
passes down to the attention function; so activation checkpointing's recompute sees the same call,
and each layer computes its prefix inside its own (checkpointed) region. The prefix never enters
the KV cache, so ``generate()`` works with any cache.

A mixed batch (``peftkern.tasks``): the samples are grouped by prefix length (a sample of no prefix
has length 0); each group is one ``ops.prefix_attention`` call over the stacked prefixes of its
names, chosen per sample by ``prefix_ids``. One group (all prefixes of one length) is one call.
Saved: ``<base>.peftkern_prefix.<param>``.

A gated prefix (UniPELT, ``PrefixConfig(gate=True)``): a forward pre-hook on each attention module
(the one whose ``layer_idx`` the attention function reads) computes the layer's gate
``sigmoid(h @ w_g.T + b_g)`` ``[B, L]`` from the hidden states it is called with and hands it to
the attention function through that call's keyword arguments (so a checkpointed layer's recompute
computes it again, from the same input); the attention scales the prefix's share of each query's
output by it (``ops.prefix_attention(..., prefix_gate=g[:, None, :])``). Not routed per sample.

An encoder-decoder (T5, mT5, BART, mBART; ``PrefixConfig.sites``): its attention modules are found
by name (SEQ2SEQ_SITES) and each is marked with its site and prefix layer (the PrefixKV's layers
run over the encoder's blocks, then the decoder's self-attentions, then its cross-attentions, of
the sites chosen; -1 marks a module of a site left out, which attends as the base). The base's
pre-hook hands the prefixes to both stacks; the encoder's own pre-hook does when generate() calls
the encoder alone. T5's relative position bias arrives as ``position_bias`` over the sequence keys:
it joins the mask, and the prefix keys get ``prefix_bias`` from the stack's bias table as P tokens
before the sequence (``compute_bias`` with P more past tokens), as peft's cache gives them. BART's
decoder positions start at P: a forward hook on the decoder's ``embed_positions`` looks them up
again shifted (per sample in a mixed batch).

``PrefixConfig(init_token_ids=...)``: after the surgery, one eval forward of the model with every
peftkern adapter off on those tokens (and, on an encoder-decoder, the same tokens as the decoder's
input) through peftkern's attention with no prefix, which records the keys and values each attention
call is given (post-rotary, as a cache keeps them) into the new prefix's layers.
"""

import contextvars
import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn import PrefixKV, routing
from ...ops.prefix_attention import prefix_attention
from ..config import PREFIX_SITES, PrefixConfig
from ..virtual_tokens import (
    CallStack,
    base_name,
    batch_and_length,
    bound,
    check_vocabulary,
    hf_config,
    past_length,
    repeated_to,
    seq2seq_rows,
    task_ids_of,
)
from . import (
    GATED_REFUSAL,
    Method,
    active_of,
    add_to_dict_child,
    base_modules,
    factory,
    remove_from_dict_child,
)

ATTENTION_NAME = "peftkern_prefix"  # the name registered with transformers' AttentionInterface
ATTR = "peftkern_prefix"
_PREFIX_KWARG = "peftkern_prefix"  # the keyword argument the base's pre-hook adds for the attention function
_GATE_KWARG = "peftkern_prefix_gate"  # the one an attention module's pre-hook adds: a gated prefix's gate
# init_token_ids: while set, {prefix layer: (key, value)} the attention function records (one model call)
_CAPTURE = contextvars.ContextVar("peftkern_prefix_capture", default=None)


@dataclass
class PrefixPlan:
    base: str  # the base model's name ("" = the model)
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int = 0
    attention_modules: Optional[List[str]] = None  # a gated prefix: the modules whose input gates it
    # encoder-decoders: each attention module's (site, prefix layer; -1: none), the encoder (whose
    # pre-hook hands it the prefix when generate() calls it alone), the decoder, whether its positions
    # shift by P (BART: learned positions and a decoder prefix), and T5's relative position bias:
    # each self-attention module -> the module of its stack that holds the bias
    sites: Optional[Dict[str, Tuple[str, int]]] = None
    site_names: Optional[List[str]] = None
    encoder: Optional[str] = None
    decoder: Optional[str] = None
    shift_decoder_positions: bool = False
    relative_bias: Optional[Dict[str, str]] = None


@dataclass
class PrefixGroup:
    """Samples attending to prefixes of one length: ``samples`` (None: all), the stacked prefixes'
    modules (empty: no prefix), and each sample's index into them."""

    samples: Optional[List[int]]
    prefixes: List[PrefixKV]
    ids: Optional[Tensor]  # [samples] int64, or None: one prefix (its own task ids, if any)
    task_ids: Optional[Tensor] = None  # a single multi-task prefix's per-row task ids
    # T5: the prefix keys' bias per (bias table, L, past, dtype), computed by a stack's first layer
    # and read by the others (the group lives for one model call); a trainable table is not kept
    biases: Dict[tuple, Tensor] = field(default_factory=dict)


class Prefix(Method):
    config_class = PrefixConfig

    def plan(self, model, config):
        cname = type(config).__name__
        hf = hf_config(model, cname)
        if config.init_token_ids is not None:
            check_vocabulary(model, config.init_token_ids, cname)
            if routing.current() is not None:
                raise ValueError(
                    f"{cname}: init_token_ids runs the model once; inject outside peftkern.tasks"
                )
        try:
            import transformers  # noqa: F401
        except ImportError:  # pragma: no cover - the test environment has transformers
            raise ImportError(f"{cname} needs Hugging Face transformers (its AttentionInterface)") from None
        can_set = getattr(model, "_can_set_attn_implementation", lambda: True)
        if getattr(hf, "is_encoder_decoder", False):
            if not can_set():
                raise ValueError(
                    f"{cname}: {type(model).__name__} cannot change its attention implementation"
                )
            return _seq2seq_plan(model, config, hf, cname)
        if config.sites is not None:
            raise ValueError(
                f"{cname}: sites picks an encoder-decoder's attentions; {type(model).__name__} is not one"
            )
        if not (getattr(model, "_supports_attention_backend", False) and can_set()):
            raise ValueError(
                f"{cname}: {type(model).__name__} does not take its attention from transformers' "
                "AttentionInterface, so peftkern cannot put the prefix there"
            )
        if getattr(hf, "add_cross_attention", False):
            raise ValueError(
                f"{cname}: {type(model).__name__} has cross-attention (a decoder of an encoder-decoder); "
                "inject the prefix into the whole encoder-decoder (T5, BART), or a model without it"
            )
        kind = getattr(hf, "model_type", None)
        if kind not in POSITION_RULES:
            raise ValueError(
                f"{cname}: peftkern knows how the positions of these model types start after P past tokens: "
                f"{sorted(POSITION_RULES)}; {type(model).__name__} is {kind!r}"
            )
        if getattr(hf, "attn_logit_softcapping", None) is not None:
            raise ValueError(
                f"{cname}: the model's config sets attn_logit_softcapping="
                f"{hf.attn_logit_softcapping!r}, which "
                "peftkern.ops.prefix_attention does not compute"
            )
        heads = hf.num_attention_heads
        kv_heads = getattr(hf, "num_key_value_heads", None) or heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        attention = _attention_modules(model, hf.num_hidden_layers, cname) if config.gate else None
        return PrefixPlan(
            base_name(model), hf.num_hidden_layers, kv_heads, head_dim, hf.hidden_size, attention
        )

    def _build(self, plan, config, fac):
        return PrefixKV(
            plan.num_layers,
            plan.num_kv_heads,
            plan.head_dim,
            config.num_virtual_tokens,
            num_tasks=config.num_tasks,
            projection_dim=config.projection_dim,
            gate_dim=plan.hidden_size if config.gate else None,
            **fac,
        )

    def _prefix(self, plan):
        return (plan.base + "." if plan.base else "") + ATTR

    def expected_shapes(self, model, plan, config):
        meta = self._build(plan, config, dict(device="meta"))
        return {f"{self._prefix(plan)}.{n}": t.shape for n, t in meta.named_parameters()}

    def apply(self, model, plan, config, name):
        base = model.get_submodule(plan.base) if plan.base else model
        new = self._build(plan, config, factory(model, model)).train(model.training)
        new.sites = plan.site_names  # a plain attribute: later prefixes must take the same sites
        first = not hasattr(base, "_peftkern_prefix_hook")
        add_to_dict_child(base, ATTR, name, new)
        if first:
            _register_attention()
            model.set_attn_implementation(ATTENTION_NAME)  # a refusal is logged, not raised: check
            if model.config._attn_implementation != ATTENTION_NAME:
                remove_from_dict_child(base, ATTR, name)
                raise ValueError(
                    f"PrefixConfig: {type(model).__name__} would not switch to peftkern's attention "
                    f"(it uses {model.config._attn_implementation!r})"
                )
            base._peftkern_active = getattr(base, "_peftkern_active", ())
            base._peftkern_prefix_hook = base.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)
        if plan.sites is not None:
            _hook_seq2seq(model, base, plan)
        for n in plan.attention_modules or ():  # a gated prefix: its gates read these modules' input
            m = model.get_submodule(n)
            if not hasattr(m, "_peftkern_prefix_gate_hook"):  # stays, as the base's hook: no gate, no-op
                m._peftkern_prefix_gate_hook = m.register_forward_pre_hook(_gate_pre_hook, with_kwargs=True)
        if config.init_token_ids is not None:
            _init_from_tokens(model, plan, config, new)
        p = self._prefix(plan)
        return {f"{p}.{n}": f"{p}.{name}.{n}" for n, _ in new.named_parameters()}

    def remove(self, model, plan, name):
        base = model.get_submodule(plan.base) if plan.base else model
        remove_from_dict_child(base, ATTR, name)
        # The hook and peftkern's attention stay (transformers may not switch back): with no prefix
        # left the hook hands the attention an empty group, plain attention.

    def merge(self, model, plan, name):
        base = model.get_submodule(plan.base) if plan.base else model
        prefix = getattr(base, ATTR)[name]
        if prefix.prefix is None:
            prefix.freeze_projection()
            return [f"the prefix '{name}' evaluated once from its projection into plain (frozen) prefixes"]
        return []

    def site_keys(self, plan):
        return [(plan.base, "virtual tokens!")]

    def mixed_refusal(self, plan, config):
        if config.gate:
            return GATED_REFUSAL
        return (
            f"it holds {config.num_tasks} task prefixes (chosen by task_ids)" if config.num_tasks > 1 else ""
        )


@torch.no_grad()
def _init_from_tokens(model, plan: PrefixPlan, config, prefix: PrefixKV) -> None:
    """The prefix's keys and values from real words: the model's own, for the ids repeated or cut to
    P, with every peftkern adapter off (prefixes included), in eval mode; modes and active adapters
    are restored after."""
    P = config.num_virtual_tokens
    ids = repeated_to(config.init_token_ids, P)
    table = model.get_input_embeddings().weight
    ids = torch.tensor([ids], dtype=torch.int64, device=table.device)
    active = [(m, m._peftkern_active) for m in model.modules() if hasattr(m, "_peftkern_active")]
    modes = [(m, m.training) for m in model.modules()]
    store: Dict[int, Tuple[Tensor, Tensor]] = {}
    token = _CAPTURE.set(store)
    try:
        for m, _ in active:
            m._peftkern_active = ()
        model.eval()
        kwargs = dict(input_ids=ids, use_cache=False)
        if plan.sites is not None:
            kwargs["decoder_input_ids"] = ids
        model(**kwargs)
    finally:
        _CAPTURE.reset(token)
        for m, names in active:
            m._peftkern_active = names
        for m, training in modes:
            m.training = training
    shape = (prefix.num_kv_heads, P, prefix.head_dim)
    for layer in range(plan.num_layers):
        if layer not in store:
            raise RuntimeError(
                f"PrefixConfig: init_token_ids: the model's forward did not reach the attention of prefix "
                f"layer {layer} through peftkern's attention function"
            )
        for kv, t in enumerate(store[layer]):
            if tuple(t.shape) != (1, *shape):
                raise RuntimeError(
                    f"PrefixConfig: init_token_ids: layer {layer}'s {'kv'[kv]} is {tuple(t.shape)}, the "
                    f"prefix's [1, {', '.join(map(str, shape))}]"
                )
            prefix.prefix[:, layer, kv] = t[0].to(prefix.prefix.dtype)  # every task the same words


def _attention_modules(model, num_layers, cname) -> List[str]:
    """The attention modules of a model (the innermost modules with a ``layer_idx``, what
    transformers hands its attention function), one per layer, in layer order."""
    found = [(n, m) for n, m in base_modules(model) if isinstance(getattr(m, "layer_idx", None), int)]
    inner = [(n, m) for n, m in found if not any(o.startswith(n + ".") for o, _ in found)]
    layers = sorted(m.layer_idx for _, m in inner)
    if layers != list(range(num_layers)):
        raise ValueError(
            f"{cname}: gate=True gates each layer's prefix from its attention module's input; peftkern "
            f"looks for one module with a layer_idx per layer ({num_layers}) and found {layers} in "
            f"{type(model).__name__}"
        )
    return [n for n, _ in sorted(inner, key=lambda nm: nm[1].layer_idx)]


# -- encoder-decoders ------------------------------------------------------------------------------

# model_type -> each site's attention modules (regexes over module names, full match; group 2 is
# the block), from transformers' modeling_t5.py / modeling_bart.py
_T5_SITES = {
    "encoder": r"(.*\.)?encoder\.block\.(\d+)\.layer\.0\.SelfAttention",
    "decoder": r"(.*\.)?decoder\.block\.(\d+)\.layer\.0\.SelfAttention",
    "cross": r"(.*\.)?decoder\.block\.(\d+)\.layer\.1\.EncDecAttention",
}
_BART_SITES = {
    "encoder": r"(.*\.)?encoder\.layers\.(\d+)\.self_attn",
    "decoder": r"(.*\.)?decoder\.layers\.(\d+)\.self_attn",
    "cross": r"(.*\.)?decoder\.layers\.(\d+)\.encoder_attn",
}
SEQ2SEQ_SITES = {"t5": _T5_SITES, "mt5": _T5_SITES, "bart": _BART_SITES, "mbart": _BART_SITES}
_LEARNED_POSITIONS = ("bart", "mbart")  # the decoder's positions come from its embed_positions


def _seq2seq_plan(model, config, hf, cname) -> PrefixPlan:
    kind = hf.model_type
    if kind not in SEQ2SEQ_SITES:
        raise ValueError(
            f"{cname}: peftkern knows the attentions of these encoder-decoders: {sorted(SEQ2SEQ_SITES)}; "
            f"{type(model).__name__} is {kind!r}"
        )
    chosen = config.sites or list(PREFIX_SITES)
    base = model.get_submodule(base_name(model)) if base_name(model) else model
    for other in getattr(base, ATTR, {}).values():
        if getattr(other, "sites", None) != chosen:
            raise ValueError(
                f"{cname}: the model's prefixes take the sites {other.sites}; a prefix of sites {chosen} "
                "cannot join them (delete them first)"
            )
    found = {site: [] for site in PREFIX_SITES}
    for n, m in base_modules(model):
        for site, pattern in SEQ2SEQ_SITES[kind].items():
            hit = re.fullmatch(pattern, n)
            if hit:
                found[site].append((int(hit.group(2)), n, m))
    sites, index = {}, 0
    for site in PREFIX_SITES:
        blocks = sorted(found[site], key=lambda bnm: bnm[0])
        if not blocks or [b for b, _, _ in blocks] != list(range(len(blocks))):
            raise ValueError(
                f"{cname}: expected one {site} attention module per block in {type(model).__name__}, found "
                f"{[n for _, n, _ in blocks]}"
            )
        for _, n, _ in blocks:
            sites[n] = (site, index if site in chosen else -1)
            index += site in chosen
    modules = {n: m for site in chosen for _, n, m in found[site]}
    shapes = {
        (getattr(m, "n_heads", None) or m.num_heads, getattr(m, "key_value_proj_dim", None) or m.head_dim)
        for m in modules.values()
    }
    if len(shapes) != 1:
        raise ValueError(
            f"{cname}: the attentions of sites {chosen} differ in (heads, head_dim): {sorted(shapes)}"
        )
    ((heads, head_dim),) = shapes
    relative = {}
    for stack in ("encoder", "decoder"):  # T5: layer 0's self-attention holds its stack's bias
        holders = [n for _, n, m in found[stack] if getattr(m, "has_relative_attention_bias", False)]
        relative.update({n: holders[0] for _, n, _ in found[stack] if holders})
    names = {m: n for n, m in model.named_modules()}
    in_order = [n for n, (_, i) in sorted(sites.items(), key=lambda kv: kv[1][1]) if i >= 0]
    return PrefixPlan(
        base_name(model),
        index,
        heads,
        head_dim,
        hf.d_model,
        in_order if config.gate else None,
        sites=sites,
        site_names=chosen,
        encoder=names[model.get_encoder()],
        decoder=names[model.get_decoder()],
        shift_decoder_positions=kind in _LEARNED_POSITIONS and "decoder" in chosen,
        relative_bias=relative,
    )


def _hook_seq2seq(model, base, plan: PrefixPlan) -> None:
    """Marks each attention module with its site and prefix layer; the encoder's pre-hook (generate()
    calls the encoder alone) and BART's decoder position shift. The hooks stay, as the base's."""
    for n, site in plan.sites.items():
        m = model.get_submodule(n)
        m._peftkern_prefix_site = site
        source = plan.relative_bias.get(n)
        if source is not None:  # a bound method in __dict__: not a submodule, copies with the model
            m.__dict__["_peftkern_relative_bias"] = model.get_submodule(source).compute_bias
    encoder = model.get_submodule(plan.encoder)
    if not hasattr(encoder, "_peftkern_prefix_hook"):
        hook = functools.partial(_encoder_pre_hook, base)
        encoder._peftkern_prefix_hook = encoder.register_forward_pre_hook(hook, with_kwargs=True)
    decoder = model.get_submodule(plan.decoder)
    decoder._peftkern_prefix_shift = plan.shift_decoder_positions
    positions = getattr(decoder, "embed_positions", None)
    if plan.shift_decoder_positions and not hasattr(decoder, "_peftkern_prefix_hooks"):
        decoder._peftkern_prefix_hooks = (
            decoder.register_forward_pre_hook(_decoder_pre_hook, with_kwargs=True),
            decoder.register_forward_hook(_decoder_hook, with_kwargs=True, always_call=True),
            positions.register_forward_hook(_decoder_positions_hook, with_kwargs=True),
        )


def _prefix_layer(module) -> Optional[int]:
    """The prefix layer an attention module reads (-1: none at its site; None: no layer_idx)."""
    site = getattr(module, "_peftkern_prefix_site", None)
    return site[1] if site is not None else getattr(module, "layer_idx", None)


def _encoder_pre_hook(base, module, args, kwargs):
    """On an encoder-decoder's encoder: the prefixes, when it is called without the base (generate())."""
    if _PREFIX_KWARG in kwargs:
        return None
    kwargs = bound(module, args, kwargs)
    batch, _, device = batch_and_length(kwargs)
    kwargs[_PREFIX_KWARG] = _groups(base, kwargs, batch, device)
    return (), kwargs


_DECODER_SHIFT = CallStack("peftkern_prefix_decoder_shift")  # per decoder call: its rows' P, or None


def _decoder_pre_hook(module, args, kwargs):
    groups = kwargs.get(_PREFIX_KWARG)
    shift = None
    if groups and module._peftkern_prefix_shift:
        x = args[0] if args else kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        shift = _row_shift(groups, x.shape[0])
    _DECODER_SHIFT.push(shift)


def _decoder_hook(module, args, kwargs, output):
    _DECODER_SHIFT.pop()
    return output


def _decoder_positions_hook(module, args, kwargs, output):
    """BART's decoder positions start at P, as peft's P cached prefix tokens make them."""
    shift = _DECODER_SHIFT.top()
    if shift is None:
        return output
    positions = kwargs.get("position_ids")
    if positions is None:
        ids, cache_length = args[0], (args[1] if len(args) > 1 else kwargs.get("cache_length", 0))
        positions = torch.arange(cache_length, cache_length + ids.shape[1], device=module.weight.device)
    if isinstance(shift, Tensor):
        shift = shift.to(positions.device)
    return nn.Embedding.forward(module, positions.reshape(1, -1) + shift + module.offset)


def _row_shift(groups, rows):
    """Each row's P: an int when all rows share it, else int64 [rows, 1]."""
    if len(groups) == 1:
        g = groups[0]
        return g.prefixes[0].prefix_len if g.prefixes else 0
    samples = sum(len(g.samples) for g in groups)
    return _shift(groups, samples).repeat_interleave(rows // samples, dim=0)


def _gated(group: PrefixGroup) -> bool:
    return any(p.gate is not None for p in group.prefixes)


def _gate_pre_hook(module, args, kwargs):
    """On an attention module: a gated prefix's gate for this layer, from the module's input hidden
    states, added to the call's keyword arguments (the attention function reads it there)."""
    groups = kwargs.get(_PREFIX_KWARG)
    if not groups or not any(_gated(g) for g in groups):
        return None
    if len(groups) > 1 or groups[0].samples is not None or len(groups[0].prefixes) > 1:
        raise ValueError(f"peftkern's prefix attention: {GATED_REFUSAL}")
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    gate = groups[0].prefixes[0].gate(_prefix_layer(module), hidden)
    return args, {**kwargs, _GATE_KWARG: gate}


# -- the base's pre-hook ---------------------------------------------------------------------------


def _groups(base, kwargs, batch, device) -> List[PrefixGroup]:
    prefixes = getattr(base, ATTR, None)
    if prefixes is None:  # every prefix deleted
        return [PrefixGroup(None, [], None)]
    names, route = routing.resolve(base, list(prefixes.keys()), active_of(base))
    if route is None:
        if not names:
            return [PrefixGroup(None, [], None)]
        prefix = prefixes[names[0]]
        ids = task_ids_of(kwargs, prefix.num_tasks, batch, device, "PrefixConfig")
        return [PrefixGroup(None, [prefix], None, ids)]
    kwargs.pop("task_ids", None)
    by_length = {}
    for i, s in enumerate(route.project(prefixes.keys())):
        length = prefixes[s[0]].prefix_len if s else 0
        by_length.setdefault(length, []).append((i, s[0] if s else None))
    groups = []
    for length, members in sorted(by_length.items()):
        used = list(dict.fromkeys(n for _, n in members if n is not None))
        index = {n: j for j, n in enumerate(used)}
        ids = torch.tensor([index[n] for _, n in members], dtype=torch.int64) if used else None
        groups.append(PrefixGroup([i for i, _ in members], [prefixes[n] for n in used], ids))
    return groups


def _shift(groups, batch) -> Tensor:
    """Each sample's prefix length, int64 [batch, 1]."""
    shift = torch.zeros(batch, 1, dtype=torch.int64)
    for g in groups:
        length = g.prefixes[0].prefix_len if g.prefixes else 0
        if g.samples is None:
            shift[:] = length
        else:
            shift[g.samples] = length
    return shift


def _prefix_pre_hook(module, args, kwargs):
    """On the base model: positions shifted by each sample's P; the prefixes for the attention."""
    kwargs = bound(module, args, kwargs)
    if getattr(module.config, "is_encoder_decoder", False):  # positions: see _hook_seq2seq
        batch, device = seq2seq_rows(kwargs)
        kwargs[_PREFIX_KWARG] = _groups(module, kwargs, batch, device)
        return (), kwargs
    batch, _, device = batch_and_length(kwargs)
    groups = _groups(module, kwargs, batch, device)
    route = routing.current()
    samples = len(route) if route is not None and groups[0].samples is not None else batch
    shift = _shift(groups, samples)
    if batch != samples:  # beams / return sequences of each sample, adjacent
        shift = shift.repeat_interleave(batch // samples, dim=0)
    positions = kwargs.get("position_ids")
    uniform = len(groups) == 1
    if positions is None:
        rule = POSITION_RULES[module.config.model_type]
        start = past_length(kwargs) + (int(shift[0, 0]) if uniform else shift.to(device))
        kwargs["position_ids"] = rule(module, kwargs, start)
    else:
        kwargs["position_ids"] = positions + (int(shift[0, 0]) if uniform else shift.to(device))
    kwargs[_PREFIX_KWARG] = groups
    return (), kwargs


def _arange_positions(base, kwargs, start):
    """Llama, BERT and most models: the tokens at start, start + 1, ... (start: an int, or [B, 1])."""
    _, length, device = batch_and_length(kwargs)
    return start + torch.arange(length, device=device).unsqueeze(0)


def _roberta_positions(base, kwargs, start):
    """RoBERTa: non-padding tokens count from padding_idx + 1 (after `start` earlier tokens); padding
    tokens sit at padding_idx."""
    pad = base.embeddings.padding_idx
    ids = kwargs.get("input_ids")
    if ids is None:
        batch, length, device = batch_and_length(kwargs)
        return (pad + 1 + start + torch.arange(length, device=device)).expand(batch, length)
    keep = ids.ne(pad).long()
    return (keep.cumsum(1) + start) * keep + pad


# model_type -> the positions its base makes for the sequence after `start` earlier tokens (what a
# peft prefix of P past tokens gives: start = cache length + P)
_ARANGE_TYPES = (
    "bert gemma gpt2 granite llama mistral mixtral olmo olmo2 phi3 qwen2 qwen2_moe qwen3 qwen3_moe".split()
)
POSITION_RULES = {
    **{t: _arange_positions for t in _ARANGE_TYPES},
    "roberta": _roberta_positions,
    "xlm-roberta": _roberta_positions,
}


# -- the attention function ------------------------------------------------------------------------


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, prefix_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # a bool mask [B, 1, L, S], or None


_warned_dropout = False


def prefix_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """transformers' attention-function signature: q ``[B, H, L, D]``, k, v ``[B, Hkv, S, D]`` (after
    the cache), the model's mask over the sequence keys; returns ``(out [B, L, H, D], None)``."""
    groups: Optional[List[PrefixGroup]] = kwargs.get(_PREFIX_KWARG)
    if groups is None:
        raise RuntimeError(
            f"peftkern's prefix attention was called by {type(module).__name__} without the prefix: call "
            "the model peftkern.inject changed (its base model adds the prefix to the call's arguments)"
        )
    layer = _prefix_layer(module)
    if layer is None:
        raise RuntimeError(f"peftkern's prefix attention: {type(module).__name__} has no layer_idx")
    capture = _CAPTURE.get()
    if capture is not None and layer >= 0:  # init_token_ids: the layer's own keys and values
        capture[layer] = (key.detach().clone(), value.detach().clone())
    if layer < 0:  # an encoder-decoder's attention of a site without a prefix
        groups = [PrefixGroup(None, [], None)]
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"peftkern's prefix attention does not compute {name} ({type(module).__name__})")
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    L, S = query.shape[2], key.shape[2]
    if attention_mask is not None:
        causal = False  # the model's mask holds the causal pattern
        attention_mask = attention_mask[..., :S]
    elif causal and 1 < L < S:  # an empty static cache's prefill: the keys past L are unwritten
        key, value, S = key[:, :, :L], value[:, :, :L], L
    # T5: its relative position bias [1, H, L, S] over the sequence keys joins the mask (a self-
    # attention's; the cross-attention's is zeros), and reaches the prefix keys (see _attend)
    site = getattr(module, "_peftkern_prefix_site", (None,))[0]
    position_bias = kwargs.get("position_bias") if site != "cross" else None
    if position_bias is not None:
        bias = position_bias[..., :S].to(query.dtype)
        if attention_mask is None:
            attention_mask = bias
        elif attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, bias, float("-inf"))
        else:
            attention_mask = attention_mask + bias
    relative = module.__dict__.get("_peftkern_relative_bias") if site != "cross" else None
    relative = None if relative is None else (relative, S - L)
    window = kwargs.get("sliding_window")
    gate = kwargs.get(_GATE_KWARG)
    if len(groups) == 1 and groups[0].samples is None:
        return _attend(
            module,
            groups[0],
            layer,
            query,
            key,
            value,
            attention_mask,
            causal,
            scaling,
            dropout,
            window,
            gate=gate,
            relative=relative,
        ), None
    B, per = query.shape[0], query.shape[0] // max(1, sum(len(g.samples) for g in groups))
    out = query.new_empty(B, L, query.shape[1], query.shape[3])
    for g in groups:
        rows = (torch.tensor(g.samples)[:, None] * per + torch.arange(per)).reshape(-1).to(query.device)
        mask = attention_mask
        if mask is not None and mask.shape[0] == B:
            mask = mask.index_select(0, rows)
        sub = [t.index_select(0, rows) for t in (query, key, value)]
        y = _attend(module, g, layer, *sub, mask, causal, scaling, dropout, window, per, relative=relative)
        out = out.index_copy(0, rows, y)
    return out, None


def _attend(
    module,
    group,
    layer,
    query,
    key,
    value,
    mask,
    causal,
    scaling,
    dropout,
    window,
    per=1,
    gate=None,
    relative=None,
):
    """One group's attention, ``[b, L, H, D]``; `gate` ``[b, L]``: a gated prefix's gate; `relative`
    (T5): ``(compute_bias, past)``, the bias of the prefix keys as P tokens before the sequence."""
    Hkv, D = key.shape[1], key.shape[3]
    prefix_gate = None
    if _gated(group):
        if group.samples is not None or len(group.prefixes) > 1:
            raise ValueError(f"peftkern's prefix attention: {GATED_REFUSAL}")
        if gate is None:
            raise RuntimeError(
                f"peftkern's prefix attention: the prefix is gated, but {type(module).__name__}'s gate "
                "pre-hook did not run (call the attention module, not its forward)"
            )
        if gate.shape != query.shape[:1] + query.shape[2:3]:
            raise ValueError(
                f"peftkern's prefix attention: the gate is {tuple(gate.shape)}, the queries "
                f"[{query.shape[0]}, {query.shape[2]}] tokens"
            )
        prefix_gate = gate.to(query.dtype)[:, None, :]  # [B, 1, L]: one gate per token, shared by heads
    if group.prefixes:
        pairs = [p(layer) for p in group.prefixes]
        if len(pairs) == 1 and group.ids is None:
            prefix_k, prefix_v = pairs[0]
            ids = group.task_ids
            if ids is not None and ids.numel() != query.shape[0]:  # an encoder-decoder's beams
                ids = ids.repeat_interleave(query.shape[0] // ids.numel())
        else:  # stacked [T, Hkv, P, D], each row's index
            prefix_k = torch.stack([k if k.dim() == 3 else k[0] for k, _ in pairs])
            prefix_v = torch.stack([v if v.dim() == 3 else v[0] for _, v in pairs])
            ids = group.ids.repeat_interleave(per).to(query.device)
    else:
        prefix_k = prefix_v = key.new_empty(Hkv, 0, D)
        ids = None
    if window is not None and prefix_k.shape[-2] + key.shape[2] > window:
        raise ValueError(
            f"peftkern's prefix attention: {type(module).__name__} attends within a sliding window of "
            f"{window} keys, and the prefix ({prefix_k.shape[-2]}) plus the sequence ({key.shape[2]}) pass it"
        )
    prefix_k = prefix_k.to(query.device, query.dtype)
    prefix_v = prefix_v.to(query.device, query.dtype)
    P = prefix_k.shape[-2]
    prefix_bias = None
    if relative is not None and P > 0:
        compute_bias, past = relative
        slot = (id(getattr(compute_bias, "__self__", compute_bias)), query.shape[2], past, query.dtype)
        prefix_bias = group.biases.get(slot)
        if prefix_bias is None:
            prefix_bias = compute_bias(query.shape[2], P, device=query.device, past_seen_tokens=past + P)
            prefix_bias = prefix_bias.to(query.dtype)  # [1, H, L, P]
            if not prefix_bias.requires_grad:
                group.biases[slot] = prefix_bias
    trains_bias = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (mask, prefix_bias)
    )
    if (dropout > 0.0 and module.training) or trains_bias:
        p = dropout if module.training else 0.0
        return _prefix_attention_composite(
            query, key, value, prefix_k, prefix_v, ids, mask, causal, scaling, p, prefix_gate, prefix_bias
        )
    kw = {} if prefix_gate is None else dict(prefix_gate=prefix_gate)
    if prefix_bias is not None:
        kw["prefix_bias"] = prefix_bias
    out = prefix_attention(
        query,
        key,
        value,
        prefix_k,
        prefix_v,
        prefix_ids=ids,
        attn_mask=mask,
        causal=causal,
        scale=scaling,
        **kw,
    )
    return out.transpose(1, 2)


def _prefix_attention_composite(
    q, k, v, prefix_k, prefix_v, ids, mask, causal, scale, p, gate=None, prefix_bias=None
):
    """The slow composite path: the concatenated KV through SDPA, for attention dropout in training
    (the fused op has none; set the model's attention dropout to 0 for the fused path) and for an
    additive bias that trains (T5's relative position bias with a trainable base: the fused op
    passes no gradient to its masks). `gate` (broadcastable to ``[B, H, L]``): a gated prefix; the
    probabilities are written out (softmax over prefix and sequence, dropout, the prefix columns
    scaled by the gate), slower still. `prefix_bias` ``[1, H, L, P]``: added to the prefix scores."""
    global _warned_dropout
    if not _warned_dropout:
        why = (
            f"the model's attention dropout is {p} in training"
            if p > 0
            else "the attention's position bias requires grad (a trainable base)"
        )
        warnings.warn(
            f"peftkern prefix attention: {why}, so the prefix runs the slow composite path (concatenated "
            "keys and values through SDPA); set the config's attention dropout to 0 and keep the base "
            "frozen for the fused path",
            stacklevel=3,
        )
        _warned_dropout = True
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if prefix_k.dim() == 4:
        prefix_k, prefix_v = prefix_k[ids], prefix_v[ids]
    else:
        prefix_k, prefix_v = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
    P = prefix_k.shape[2]
    keys, values = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
    seq = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if causal:
        seq = seq.tril(S - L)
    if mask is not None:
        seq = mask & seq if mask.dtype == torch.bool else torch.where(seq, mask.to(q.dtype), float("-inf"))
    # the prefix columns in front: always visible (True, or 0 added, or the prefix bias added)
    if prefix_bias is not None:
        if seq.dtype == torch.bool:
            seq = torch.zeros_like(seq, dtype=q.dtype).masked_fill(~seq, float("-inf"))
        shape = torch.broadcast_shapes(seq.shape[:-1], prefix_bias.shape[:-1])
        full = torch.cat([prefix_bias.expand(*shape, P), seq.expand(*shape, S)], dim=-1)
    else:
        full = F.pad(seq, (P, 0), value=True if seq.dtype == torch.bool else 0.0)
    if gate is not None:
        return _gated_attention_with_dropout(q, keys, values, full, P, scale, p, gate)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=full, dropout_p=p, scale=scale, enable_gqa=Hkv != H
    )
    return out.transpose(1, 2)


def _gated_attention_with_dropout(q, keys, values, full, P, scale, p, gate):
    """The composite path of a gated prefix: ``out = (dropout(softmax(q k^T * scale + mask)) * G) v``
    over the concatenated keys, G the gate on the P prefix columns and 1 on the sequence's."""
    B, H, L, D = q.shape
    if keys.shape[1] != H:  # grouped-query heads
        keys = keys.repeat_interleave(H // keys.shape[1], dim=1)
        values = values.repeat_interleave(H // values.shape[1], dim=1)
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    scale = D**-0.5 if scale is None else scale
    scores = torch.matmul(q.to(math_dtype), keys.to(math_dtype).transpose(-1, -2)) * scale
    if full.dtype == torch.bool:
        scores = scores.masked_fill(~full, float("-inf"))
    else:
        scores = scores + full.to(math_dtype)
    probs = F.dropout(torch.softmax(scores, dim=-1), p, training=True)
    g = gate.to(math_dtype).expand(B, H, L)[..., None]  # [B, H, L, 1]
    probs = torch.cat([probs[..., :P] * g, probs[..., P:]], dim=-1)
    out = torch.matmul(probs, values.to(math_dtype)).to(q.dtype)
    return out.transpose(1, 2)
