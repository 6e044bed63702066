"""Virtual-token methods on Hugging Face models: prefix tuning / P-tuning v2 (``PrefixConfig``),
prompt tuning / P-tuning (``PromptConfig``) and VPT (``VPTConfig``).

Prefix: the ``peftkern.nn.PrefixKV`` goes on the model's base (``model.base_model``) as
``peftkern_prefix``, for the model types whose position rule is known (``_POSITION_RULES``);
peftkern's attention function is registered with transformers' ``AttentionInterface`` (and sdpa's
mask function with ``AttentionMaskInterface``) and the model is set to use it. A forward pre-hook
on the base shifts the position ids by P and hands the prefix module and the task ids to every
attention call through the forward's keyword arguments, which transformers passes down to the
attention function; so activation checkpointing's recompute sees the same call, and each layer
computes its prefix inside its own (checkpointed) region. Task ids set by ``peftkern.task_ids``
live in a context variable, which the worker threads of nn.DataParallel do not see: pass them to
the forward there (or use DistributedDataParallel).

Prompt: the ``peftkern.nn.SoftPrompt`` goes on the model itself as ``peftkern_prompt``; a pre-hook
on the model's forward prepends the prompts to the input embeddings (and extends the mask, the
position ids, the token type ids and token-level labels), a forward hook trims the token-level
outputs back. With a KV cache that already holds tokens (``generate()``'s later steps) the prompts
are in the cache: the hooks then only extend the mask and shift the positions.

VPT: a ``peftkern.nn.VisualPrompt`` goes on the first transformer block (on every block when deep)
as ``peftkern_vpt``: hooks insert the prompts after the CLS token before the first block, replace
them before each later block (deep) and remove them from the last block's output (the hidden states
between blocks, ``output_hidden_states``, keep them).

The hooks find everything through the module they run on and keep no state between calls.
"""

import contextlib
import contextvars
import inspect
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import PrefixKV, SoftPrompt, VisualPrompt
from ..nn.prefix_attention import _check_task_ids
from ..ops.prefix_attention import prefix_attention
from .config import PrefixConfig, PromptConfig, VPTConfig

ATTENTION_NAME = "peftkern_prefix"  # the name registered with transformers' AttentionInterface
PREFIX_ATTR, PROMPT_ATTR, VPT_ATTR = "peftkern_prefix", "peftkern_prompt", "peftkern_vpt"
# the keyword arguments the base's pre-hook adds for the attention function
_PREFIX_KWARG, _TASK_IDS_KWARG = "peftkern_prefix", "peftkern_task_ids"
_TASK_IDS = contextvars.ContextVar("peftkern_task_ids", default=None)


@dataclass
class TokensPlan:
    kind: str  # "prefix" | "prompt" | "vpt"
    owners: List[str]  # the modules (names; "" = the model) that each get a new module
    dims: dict  # the new modules' shape arguments (and, for VPT, the last block's name)


# -- planning -------------------------------------------------------------------------------------


def _hf_config(model, cname):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ValueError(
            f"{cname} needs a Hugging Face transformers model (with .config.num_hidden_layers); got "
            f"{type(model).__name__}"
        )
    return config


def _base_name(model) -> str:
    """The name of model.base_model among model's modules ("" when the model is its own base)."""
    base = getattr(model, "base_model", model)
    for n, m in model.named_modules():
        if m is base:
            return n
    return ""


def plan(model: nn.Module, config) -> TokensPlan:
    cname = type(config).__name__
    hf = _hf_config(model, cname)
    if isinstance(config, PrefixConfig):
        return _plan_prefix(model, config, hf, cname)
    if isinstance(config, PromptConfig):
        if getattr(hf, "is_encoder_decoder", False):
            raise ValueError(
                f"{cname}: {type(model).__name__} is an encoder-decoder; prompts are supported on "
                "decoder-only and encoder-only models"
            )
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"{cname}: {type(model).__name__} has no input embedding (get_input_embeddings)")
        if config.init_token_ids is not None and max(config.init_token_ids) >= emb.num_embeddings:
            raise ValueError(
                f"{cname}: init_token_ids holds {max(config.init_token_ids)}, beyond the model's vocabulary "
                f"({emb.num_embeddings} tokens)"
            )
        return TokensPlan("prompt", [""], dict(d_model=emb.embedding_dim))
    assert isinstance(config, VPTConfig)
    blocks = _vit_blocks(model, hf)
    if blocks is None or not hasattr(getattr(model, "base_model", model), "embeddings"):
        raise ValueError(
            f"{cname}: VPT needs a ViT-style model (base_model.embeddings, then an nn.ModuleList of "
            f"{hf.num_hidden_layers} blocks); {type(model).__name__} has not"
        )
    patch = getattr(hf, "patch_size", 16)
    patch = patch[0] * patch[1] if isinstance(patch, (tuple, list)) else patch * patch
    owners = blocks if config.deep else blocks[:1]
    return TokensPlan("vpt", owners, dict(d_model=hf.hidden_size, patch_area=patch, last_block=blocks[-1]))


def _vit_blocks(model, hf) -> Optional[List[str]]:
    """The names of the transformer blocks of the model's base (the first nn.ModuleList of
    num_hidden_layers modules: ``layers.N``, ``encoder.layer.N``)."""
    base_name = _base_name(model)
    base = model.get_submodule(base_name) if base_name else model
    for n, m in base.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == hf.num_hidden_layers:
            full = ".".join(p for p in (base_name, n) if p)
            return [f"{full}.{i}" for i in range(len(m))]
    return None


def _plan_prefix(model, config, hf, cname) -> TokensPlan:
    try:
        import transformers  # noqa: F401
    except ImportError:  # pragma: no cover - the test environment has transformers
        raise ImportError(f"{cname} needs Hugging Face transformers (its AttentionInterface)") from None
    can_set = getattr(model, "_can_set_attn_implementation", lambda: True)
    if not (getattr(model, "_supports_attention_backend", False) and can_set()):
        raise ValueError(
            f"{cname}: {type(model).__name__} does not take its attention from transformers' "
            "AttentionInterface, so peftkern cannot put the prefix there"
        )
    if getattr(hf, "is_encoder_decoder", False) or getattr(hf, "add_cross_attention", False):
        raise ValueError(
            f"{cname}: {type(model).__name__} has cross-attention (an encoder-decoder); prefixes are "
            "supported on decoder-only and encoder-only models"
        )
    kind = getattr(hf, "model_type", None)
    if kind not in _POSITION_RULES:
        raise ValueError(
            f"{cname}: peftkern knows how the positions of these model types start after P past tokens: "
            f"{sorted(_POSITION_RULES)}; {type(model).__name__} is {kind!r}"
        )
    if getattr(hf, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{cname}: the model's config sets attn_logit_softcapping={hf.attn_logit_softcapping!r}, which "
            "peftkern.ops.prefix_attention does not compute"
        )
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    dims = dict(num_layers=hf.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim)
    return TokensPlan("prefix", [_base_name(model)], dims)


def attribute(tp: TokensPlan) -> str:
    return {"prefix": PREFIX_ATTR, "prompt": PROMPT_ATTR, "vpt": VPT_ATTR}[tp.kind]


def build(tp: TokensPlan, config, factory: dict) -> nn.Module:
    """A new module of the plan (factory: device and dtype; device="meta" for shapes only)."""
    d = tp.dims
    if tp.kind == "prefix":
        return PrefixKV(
            d["num_layers"],
            d["num_kv_heads"],
            d["head_dim"],
            config.num_virtual_tokens,
            num_tasks=config.num_tasks,
            projection_dim=config.projection_dim,
            **factory,
        )
    if tp.kind == "prompt":
        return SoftPrompt(
            config.num_virtual_tokens,
            d["d_model"],
            num_tasks=config.num_tasks,
            encoder=config.encoder,
            encoder_hidden_size=config.encoder_hidden_size,
            encoder_num_layers=config.encoder_num_layers,
            **factory,
        )
    return VisualPrompt(config.num_tokens, d["d_model"], patch_area=d["patch_area"], **factory)


def saved_params(tp: TokensPlan, owner: str, module: nn.Module) -> Dict[str, Tensor]:
    """The parameters of the new module on `owner`, under their model names."""
    prefix = (owner + "." if owner else "") + attribute(tp) + "."
    return {prefix + n: t for n, t in module.named_parameters()}


def expected_shapes(tp: TokensPlan, config) -> Dict[str, torch.Size]:
    meta = build(tp, config, dict(device="meta"))
    shapes = {}
    for owner in tp.owners:
        shapes.update({n: t.shape for n, t in saved_params(tp, owner, meta).items()})
    return shapes


# -- applying -------------------------------------------------------------------------------------


def apply(model: nn.Module, tp: TokensPlan, config, factory: dict) -> List[str]:
    """Builds the new modules of `tp`, attaches them and their hooks; returns their parameter names."""
    names = []
    for owner_name in tp.owners:
        owner = model.get_submodule(owner_name) if owner_name else model
        new = build(tp, config, factory).train(model.training)
        if tp.kind == "prompt" and config.init_token_ids is not None:
            _init_from_tokens(new, model, config)
        owner.add_module(attribute(tp), new)
        names += list(saved_params(tp, owner_name, new))
    owner = model.get_submodule(tp.owners[0]) if tp.owners[0] else model
    if tp.kind == "prefix":
        _register_attention()
        model.set_attn_implementation(ATTENTION_NAME)  # a refusal is logged, not raised: check
        if model.config._attn_implementation != ATTENTION_NAME:
            raise ValueError(
                f"PrefixConfig: {type(model).__name__} would not switch to peftkern's attention "
                f"(it uses {model.config._attn_implementation!r})"
            )
        owner.register_forward_pre_hook(_prefix_pre_hook, with_kwargs=True)
    elif tp.kind == "prompt":
        owner.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True)
        owner.register_forward_hook(_prompt_hook, with_kwargs=True)
    else:  # the first block inserts the prompts, the next ones replace them (deep), the last removes them
        owner.register_forward_pre_hook(_vpt_insert_hook, with_kwargs=True)
        for name in tp.owners[1:]:
            model.get_submodule(name).register_forward_pre_hook(_vpt_replace_hook, with_kwargs=True)
        last = model.get_submodule(tp.dims["last_block"])
        last._peftkern_vpt_tokens = config.num_tokens
        last.register_forward_hook(_vpt_remove_hook)
    return names


@torch.no_grad()
def _init_from_tokens(prompt: SoftPrompt, model, config) -> None:
    """Prompt tuning's init from words: the tokens' embeddings, repeated or cut to N (as peft)."""
    table = model.get_input_embeddings().weight
    ids = torch.tensor(config.init_token_ids, device=table.device)
    N = config.num_virtual_tokens
    ids = ids.repeat((N + len(ids) - 1) // len(ids))[:N]
    words = table[ids].to(prompt.prompt.device, prompt.prompt.dtype)
    prompt.prompt.copy_(words.expand_as(prompt.prompt))


# -- task ids ------------------------------------------------------------------------------------


@contextlib.contextmanager
def task_ids(ids: Tensor):
    """Chooses each sample's task prefix or prompt for every peftkern-injected model called inside
    the block (for a forward or ``generate()`` that cannot take ``task_ids`` itself)::

        with peftkern.task_ids(torch.tensor([0, 2, 1])):
            out = model.generate(input_ids, ...)
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"peftkern.task_ids: ids must be an int tensor [B]; got {type(ids).__name__}")
    token = _TASK_IDS.set(ids)
    try:
        yield
    finally:
        _TASK_IDS.reset(token)


def _task_ids(kwargs, num_tasks: int, batch: int, device, cname: str) -> Optional[Tensor]:
    """The call's task ids (its ``task_ids`` argument, else peftkern.task_ids's, which a single-task
    model ignores), checked; None with one task. Ids for B samples serve a batch of k * B rows
    (generate()'s beams and return sequences: each sample's rows are adjacent), repeated per row;
    on the inputs' device."""
    ids = kwargs.pop("task_ids", None)
    if ids is None and num_tasks > 1:
        ids = _TASK_IDS.get()
    if ids is None:
        if num_tasks > 1:
            raise ValueError(
                f"{cname}(num_tasks={num_tasks}): pass task_ids [B] to the model's forward, or call it "
                "inside peftkern.task_ids(ids)"
            )
        return None
    if not isinstance(ids, Tensor) or ids.dim() != 1 or not ids.numel() or batch % ids.numel():
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{cname}: task_ids must be an int tensor [{batch}] (one per sample); got {shape}")
    _check_task_ids(ids, num_tasks, cname)
    if num_tasks == 1:
        return None
    ids = ids.to(device)
    return ids if ids.numel() == batch else ids.repeat_interleave(batch // ids.numel())


def _bound(module, args, kwargs) -> dict:
    """The call's arguments, all by name (models call their base positionally: BERT's heads)."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(module.forward)
    bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            bound.update(bound.pop(name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and bound.get(name):
            raise TypeError(f"peftkern: {type(module).__name__} was called with extra positional arguments")
    return bound


def _batch_and_length(kwargs):
    x = kwargs.get("input_ids")
    x = kwargs.get("inputs_embeds") if x is None else x
    if x is None:
        raise ValueError("peftkern: the model was called without input_ids or inputs_embeds")
    return x.shape[0], x.shape[1], x.device


def _cache(kwargs):
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _past_length(kwargs) -> int:
    cache = _cache(kwargs)
    return 0 if cache is None else int(cache.get_seq_length())


# -- prefix ---------------------------------------------------------------------------------------


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, prefix_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # a bool mask [B, 1, L, S], or None


def _prefix_pre_hook(module, args, kwargs):
    """On the base model: positions shifted by P; the prefix module and task ids for the attention."""
    kwargs = _bound(module, args, kwargs)
    prefix: PrefixKV = getattr(module, PREFIX_ATTR)
    batch, _, device = _batch_and_length(kwargs)
    ids = _task_ids(kwargs, prefix.num_tasks, batch, device, "PrefixConfig")
    positions = kwargs.get("position_ids")
    if positions is None:
        rule = _POSITION_RULES[module.config.model_type]
        kwargs["position_ids"] = rule(module, kwargs, _past_length(kwargs) + prefix.prefix_len)
    else:
        kwargs["position_ids"] = positions + prefix.prefix_len
    kwargs[_PREFIX_KWARG], kwargs[_TASK_IDS_KWARG] = prefix, ids
    return (), kwargs


def _arange_positions(base, kwargs, start):
    """Llama, BERT and most models: the tokens at start, start + 1, ..."""
    _, length, device = _batch_and_length(kwargs)
    return torch.arange(start, start + length, device=device).unsqueeze(0)


def _roberta_positions(base, kwargs, start):
    """RoBERTa: non-padding tokens count from padding_idx + 1 (after `start` earlier tokens); padding
    tokens sit at padding_idx."""
    pad = base.embeddings.padding_idx
    ids = kwargs.get("input_ids")
    if ids is None:
        batch, length, device = _batch_and_length(kwargs)
        return torch.arange(pad + 1 + start, pad + 1 + start + length, device=device).expand(batch, length)
    keep = ids.ne(pad).long()
    return (keep.cumsum(1) + start) * keep + pad


# model_type -> the positions its base makes for the sequence after `start` earlier tokens (what a
# peft prefix of P past tokens gives: start = cache length + P)
_ARANGE_TYPES = (
    "bert gemma gpt2 granite llama mistral mixtral olmo olmo2 phi3 qwen2 qwen2_moe qwen3 qwen3_moe".split()
)
_POSITION_RULES = {
    **{t: _arange_positions for t in _ARANGE_TYPES},
    "roberta": _roberta_positions,
    "xlm-roberta": _roberta_positions,
}


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
    prefix: Optional[PrefixKV] = kwargs.get(_PREFIX_KWARG)
    if prefix is None:
        raise RuntimeError(
            f"peftkern's prefix attention was called by {type(module).__name__} without the prefix: call "
            "the model peftkern.inject changed (its base model adds the prefix to the call's arguments)"
        )
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise RuntimeError(f"peftkern's prefix attention: {type(module).__name__} has no layer_idx")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise ValueError(f"peftkern's prefix attention does not compute {name} ({type(module).__name__})")
    prefix_k, prefix_v = prefix(layer)
    window = kwargs.get("sliding_window")
    if window is not None and prefix_k.shape[-2] + key.shape[2] > window:
        raise ValueError(
            f"peftkern's prefix attention: {type(module).__name__} attends within a sliding window of "
            f"{window} keys, and the prefix ({prefix_k.shape[-2]}) plus the sequence ({key.shape[2]}) pass it"
        )
    prefix_k = prefix_k.to(query.device, query.dtype)
    prefix_v = prefix_v.to(query.device, query.dtype)
    ids = kwargs.get(_TASK_IDS_KWARG)
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    L, S = query.shape[2], key.shape[2]
    if attention_mask is not None:
        causal = False  # the model's mask holds the causal pattern
        attention_mask = attention_mask[..., :S]
    elif causal and 1 < L < S:  # an empty static cache's prefill: the keys past L are unwritten
        key, value, S = key[:, :, :L], value[:, :, :L], L
    if dropout > 0.0 and module.training:
        return _prefix_attention_with_dropout(
            query, key, value, prefix_k, prefix_v, ids, attention_mask, causal, scaling, dropout
        )
    out = prefix_attention(
        query,
        key,
        value,
        prefix_k,
        prefix_v,
        prefix_ids=ids,
        attn_mask=attention_mask,
        causal=causal,
        scale=scaling,
    )
    return out.transpose(1, 2), None


def _prefix_attention_with_dropout(q, k, v, prefix_k, prefix_v, ids, mask, causal, scale, p):
    """Attention dropout in training: the concatenated KV through SDPA (slow; the fused op has no
    dropout). Set the model's attention dropout to 0 for the fused path."""
    global _warned_dropout
    if not _warned_dropout:
        warnings.warn(
            f"peftkern prefix attention: the model's attention dropout is {p} in training, so the prefix "
            "runs the slow composite path (concatenated keys and values through SDPA); set the config's "
            "attention dropout to 0 for the fused path",
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
    # the prefix columns in front: always visible (True, or 0 added)
    full = F.pad(seq, (P, 0), value=True if seq.dtype == torch.bool else 0.0)
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=full, dropout_p=p, scale=scale, enable_gqa=Hkv != H
    )
    return out.transpose(1, 2), None


# -- prompts --------------------------------------------------------------------------------------


def _prompt_pre_hook(module, args, kwargs):
    kwargs = _bound(module, args, kwargs)
    prompt: SoftPrompt = getattr(module, PROMPT_ATTR)
    N = prompt.num_tokens
    batch, length, device = _batch_and_length(kwargs)
    ids = _task_ids(kwargs, prompt.num_tasks, batch, device, "PromptConfig")
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"PromptConfig: attention_mask must be the 2-D padding mask [B, L]; got {tuple(mask.shape)} "
            "(generate() makes a 4-D mask for a static cache, which has no room for the prompts: use the "
            "default dynamic cache)"
        )
    if _past_length(kwargs) > 0:  # a cache that holds the prompts already: extend the mask only
        if mask is not None:
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, N), mask], dim=1)
        if positions is not None:
            kwargs["position_ids"] = positions + N
        return (), kwargs
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = module.get_input_embeddings()(kwargs["input_ids"])
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"], kwargs["attention_mask"] = prompt(embeds, mask, ids)
    if positions is not None:
        head = torch.arange(N, device=device, dtype=positions.dtype).expand(*positions.shape[:-1], N)
        kwargs["position_ids"] = torch.cat([head, positions + N], dim=-1)
    types = kwargs.get("token_type_ids")
    if types is not None:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, N), types], dim=1)
    labels = kwargs.get("labels")
    if isinstance(labels, Tensor) and labels.dim() >= 2 and labels.shape[1] == length:
        kwargs["labels"] = torch.cat([labels.new_full((batch, N, *labels.shape[2:]), -100), labels], dim=1)
    return (), kwargs


def _prompt_hook(module, args, kwargs, output):
    """Trims the token-level outputs of a call whose inputs the pre-hook prefixed with the prompts."""
    embeds = kwargs.get("inputs_embeds")
    cache = _cache(kwargs)
    if embeds is None or (cache is not None and cache.get_seq_length() != embeds.shape[1]):
        return output  # a later decoding step: nothing was prepended
    total, N = embeds.shape[1], getattr(module, PROMPT_ATTR).num_tokens
    return _trim(output, total, lambda t: t[:, N:])


_TOKEN_SCORES = ("start_logits", "end_logits")  # question answering: [B, total], one score per token


def _trim(output, total, cut):
    """Applies `cut` to the token-level tensors of a model output: those [B, total, ...] of 3 or more
    dimensions (logits, hidden states; a sequence-level [B, C] never, whatever C is) and a question
    answering model's token scores."""
    if isinstance(output, Tensor):
        return cut(output) if output.dim() >= 3 and output.shape[1] == total else output
    if isinstance(output, dict):  # ModelOutput
        for k in ("logits", "last_hidden_state", "hidden_states", *_TOKEN_SCORES):
            t = output.get(k)
            if k in _TOKEN_SCORES and isinstance(t, Tensor) and t.dim() == 2 and t.shape[1] == total:
                output[k] = cut(t)
            elif t is not None:
                output[k] = _trim(t, total, cut)
        return output
    if isinstance(output, tuple):
        return type(output)(_trim(t, total, cut) for t in output)
    return output


# -- VPT ------------------------------------------------------------------------------------------


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden_states(args, kwargs, h):
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _vpt_insert_hook(layer, args, kwargs):
    """On the first block: its input [B, 1 + S, E] gains the prompts after CLS."""
    return _with_hidden_states(args, kwargs, getattr(layer, VPT_ATTR).insert(_hidden_states(args, kwargs)))


def _vpt_replace_hook(layer, args, kwargs):
    """VPT-deep, on each later block: its own prompts replace the previous block's prompt tokens."""
    return _with_hidden_states(args, kwargs, getattr(layer, VPT_ATTR).replace(_hidden_states(args, kwargs)))


def _vpt_remove_hook(block, args, output):
    """On the last block: the prompt tokens leave its output."""
    N = block._peftkern_vpt_tokens
    if isinstance(output, Tensor):
        return VisualPrompt.remove(output, N)
    return (VisualPrompt.remove(output[0], N), *output[1:])
