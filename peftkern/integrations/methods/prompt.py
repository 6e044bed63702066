"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): named
``peftkern.nn.SoftPrompt`` modules on the model as ``peftkern_prompt.<name>``.

A pre-hook on the model's forward prepends each sample's prompts to its input embeddings (and
extends the mask, the position ids, the token type ids and token-level labels); a forward hook
trims the token-level outputs back. With a KV cache that already holds tokens (``generate()``'s
later steps) the prompts are in the cache: the hooks then only extend the mask and shift the
positions.

A mixed batch (``peftkern.tasks``): every sample gets N = the longest prompt of the batch in
front; a sample with a shorter prompt (or none) has its own right before its tokens and masked
padding before that, and explicit position ids that start its prompt at 0, so each sample
computes as alone. Saved: ``peftkern_prompt.<param>``.

An encoder-decoder (T5, BART; Lester et al.'s T5): the prompts go in front of the encoder's input
(as peft's SEQ_2_SEQ_LM prompt tuning), and the source mask gains as many ones for the encoder's
self-attention and the decoder's cross-attention; the decoder and its labels are untouched, and the
encoder's outputs keep the prompts' states (the decoder attends to them). A pre-hook on the encoder
prepends them (generate() calls the encoder alone) and a pre-hook on the base model extends the mask
the decoder gets. A mixed batch on BART (learned positions) needs prompts of one length.

P-tuning's template (``PromptConfig(placeholder_token_id=...)``; Liu et al. 2021, §3): nothing is
prepended. The pre-hook (the encoder's on an encoder-decoder: the decoder's inputs never get rows)
looks the input_ids up with each placeholder read as id 0 and puts row k of the sample's prompt
(its task's, with task_ids) where its k-th placeholder stands, then calls the model with those
inputs_embeds; the mask, labels, position ids and outputs are the call's own. A call whose samples
hold no placeholder (generate()'s decode steps) runs as it came. Checking each sample's count costs
one host sync per call. A model that derives its positions from input_ids (RoBERTa: padding-aware)
gets those positions from the original ids. Not in a mixed batch of named prompts (peftkern.tasks).
"""

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from ...nn import SoftPrompt, routing
from ..config import PromptConfig
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
from . import Method, active_of, add_to_dict_child, factory, remove_from_dict_child

ATTR = "peftkern_prompt"
_PREPENDED = CallStack("peftkern_prompt_prepended")  # per call: how many columns the pre-hook put in front


_SEQ2SEQ_TYPES = ("t5", "mt5", "bart", "mbart")
_PLAN_KWARG = "peftkern_prompt_plan"  # the base's pre-hook hands its plan of the call to the encoder's


@dataclass
class PromptPlan:
    d_model: int
    encoder: Optional[str] = None  # an encoder-decoder: the encoder, which gets the prompts
    base: str = ""


class Prompt(Method):
    config_class = PromptConfig

    def plan(self, model, config):
        cname = type(config).__name__
        hf = hf_config(model, cname)
        seq2seq = getattr(hf, "is_encoder_decoder", False)
        if seq2seq and hf.model_type not in _SEQ2SEQ_TYPES:
            raise ValueError(
                f"{cname}: prompts on encoder-decoders are supported for model types {_SEQ2SEQ_TYPES}; "
                f"{type(model).__name__} is {hf.model_type!r}"
            )
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"{cname}: {type(model).__name__} has no input embedding (get_input_embeddings)")
        pad = getattr(hf, "pad_token_id", None)
        if config.placeholder_token_id is not None and config.placeholder_token_id == pad:
            raise ValueError(
                f"{cname}: placeholder_token_id {pad} is the model's pad_token_id; padding would be taken "
                "for template positions: choose an id of its own (outside the vocabulary will do)"
            )
        if config.init_token_ids is not None:
            check_vocabulary(model, config.init_token_ids, cname)
        if not seq2seq:
            return PromptPlan(emb.embedding_dim)
        names = {m: n for n, m in model.named_modules()}
        return PromptPlan(emb.embedding_dim, names[model.get_encoder()], base_name(model))

    def _build(self, plan, config, fac):
        return SoftPrompt(
            config.num_virtual_tokens,
            plan.d_model,
            num_tasks=config.num_tasks,
            encoder=config.encoder,
            encoder_hidden_size=config.encoder_hidden_size,
            encoder_num_layers=config.encoder_num_layers,
            **fac,
        )

    def expected_shapes(self, model, plan, config):
        meta = self._build(plan, config, dict(device="meta"))
        return {f"{ATTR}.{n}": t.shape for n, t in meta.named_parameters()}

    def apply(self, model, plan, config, name):
        new = self._build(plan, config, factory(model, model)).train(model.training)
        new.placeholder_token_id = config.placeholder_token_id  # the hooks read it per call
        if config.init_token_ids is not None:
            _init_from_tokens(new, model, config)
        first = not hasattr(model, ATTR)
        add_to_dict_child(model, ATTR, name, new)
        if first:
            model._peftkern_active = getattr(model, "_peftkern_active", ())
            if plan.encoder is None:
                model._peftkern_prompt_hooks = (
                    model.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True),
                    model.register_forward_hook(_prompt_hook, with_kwargs=True, always_call=True),
                )
            else:
                base = model.get_submodule(plan.base) if plan.base else model
                encoder = model.get_submodule(plan.encoder)
                model._peftkern_prompt_hooks = (
                    base.register_forward_pre_hook(
                        functools.partial(_seq2seq_pre_hook, model), with_kwargs=True
                    ),
                    encoder.register_forward_pre_hook(
                        functools.partial(_encoder_pre_hook, model), with_kwargs=True
                    ),
                )
        return {f"{ATTR}.{n}": f"{ATTR}.{name}.{n}" for n, _ in new.named_parameters()}

    def remove(self, model, plan, name):
        if remove_from_dict_child(model, ATTR, name):
            for h in model._peftkern_prompt_hooks:
                h.remove()
            del model._peftkern_prompt_hooks

    def merge(self, model, plan, name):
        prompt = getattr(model, ATTR)[name]
        if prompt.prompt is None:
            prompt.merge_encoder()
            return [f"the prompt encoder of '{name}' evaluated once into plain (frozen) prompts"]
        return []

    def site_keys(self, plan):
        return [("", "virtual tokens!")]

    def mixed_refusal(self, plan, config):
        if config.placeholder_token_id is not None:
            return "its prompt fills a template (placeholder_token_id), which is not routed per sample"
        return (
            f"it holds {config.num_tasks} task prompts (chosen by task_ids)" if config.num_tasks > 1 else ""
        )


@torch.no_grad()
def _init_from_tokens(prompt: SoftPrompt, model, config) -> None:
    """Prompt tuning's init from words: the tokens' embeddings, repeated or cut to N (as peft)."""
    table = model.get_input_embeddings().weight
    ids = torch.tensor(repeated_to(config.init_token_ids, config.num_virtual_tokens), device=table.device)
    words = table[ids].to(prompt.prompt.device, prompt.prompt.dtype)
    prompt.prompt.copy_(words.expand_as(prompt.prompt))


def _plan_call(module, kwargs, batch, device):
    """(N columns in front, each row's prompt length [batch] or None when every row has N, and
    build(embeds, mask) -> (embeds, mask) with the prompts in front)."""
    prompts = getattr(module, ATTR)
    names, route = routing.resolve(module, list(prompts.keys()), active_of(module))
    if route is None:
        if not names:
            return 0, None, None
        prompt = prompts[names[0]]
        ids = task_ids_of(kwargs, prompt.num_tasks, batch, device, "PromptConfig")
        if _placeholder(prompt) is not None:
            return 0, None, _Template(prompt, ids)
        return prompt.num_tokens, None, lambda embeds, mask: prompt(embeds, mask, ids)
    kwargs.pop("task_ids", None)
    kind = getattr(getattr(module, "config", None), "model_type", None)
    if kind in ("roberta", "xlm-roberta"):  # its positions start at padding_idx + 1, not 0
        raise ValueError(f"PromptConfig: a batch of mixed prompts is not supported on {kind} models")
    chosen = [s[0] if s else None for s in route.project(prompts.keys())]
    templates = sorted({n for n in chosen if n and _placeholder(prompts[n]) is not None})
    if templates:
        raise ValueError(
            f"PromptConfig: prompts {templates} fill a template (placeholder_token_id); a mixed batch of "
            "them (peftkern.tasks) is not supported"
        )
    if batch % len(chosen):
        raise ValueError(
            f"PromptConfig: {batch} rows do not split over the {len(chosen)} samples of peftkern.tasks"
        )
    per = batch // len(chosen)
    lengths = torch.tensor([prompts[n].num_tokens if n else 0 for n in chosen]).repeat_interleave(per)
    N = int(lengths.max())
    if kind in ("bart", "mbart") and int(lengths.min()) != N:  # the encoder's positions count the padding
        raise ValueError(
            f"PromptConfig: a batch of prompts of different lengths ({sorted(set(lengths.tolist()))}) is "
            f"not supported on {kind} models (the encoder's learned positions would count the padding)"
        )

    def build(embeds, mask):
        E = embeds.shape[-1]
        rows = []
        for n in chosen:
            p = prompts[n].prompts()[0].to(embeds.dtype) if n else embeds.new_zeros(0, E)
            rows.append(torch.cat([embeds.new_zeros(N - p.shape[0], E), p]))
        front = torch.stack(rows).repeat_interleave(per, dim=0)
        m = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device) if mask is None else mask
        return torch.cat([front, embeds], dim=1), torch.cat([_front_mask(lengths, N, m), m], dim=1)

    return N, lengths, build


def _placeholder(prompt) -> Optional[int]:
    return getattr(prompt, "placeholder_token_id", None)


class _Template:
    """One call's template filling: ``fill(holder, kwargs)`` swaps the call's input_ids for its
    inputs_embeds, ``E[b, l] = P[b, k]`` where input_ids[b, l] is the k-th placeholder of sample b (P
    its prompt rows [N, E]), else the token's embedding."""

    def __init__(self, prompt: SoftPrompt, task_ids: Optional[Tensor]):
        self.prompt, self.task_ids = prompt, task_ids

    def fill(self, holder, kwargs, past: int = 0) -> None:
        pid, N = _placeholder(self.prompt), self.prompt.num_tokens
        who = f"PromptConfig(placeholder_token_id={pid})"
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError(
                f"{who}: the template's positions are read from input_ids; this call gave inputs_embeds "
                "(pass input_ids holding the placeholders)"
            )
        if ids.dim() != 2:
            raise ValueError(f"{who}: input_ids must be [B, L]; got {tuple(ids.shape)}")
        found = ids == pid
        counts = found.sum(1)
        bad = (counts != 0) & (counts != N)
        any_bad, any_found = torch.stack([bad.any(), found.any()]).tolist()  # the call's one host sync
        if any_bad:
            raise ValueError(
                f"{who}: each sample's input_ids must hold the placeholder num_virtual_tokens={N} times "
                f"(its template) or not at all; the samples hold it {counts.tolist()} times"
            )
        if not any_found:
            return
        if kwargs.get("position_ids") is None:
            positions = _positions_from_ids(holder, ids, past)
            if positions is not None:
                kwargs["position_ids"] = positions
        embeds = holder.get_input_embeddings()(ids.masked_fill(found, 0))  # the id may be out of the table
        rows = self.prompt.prompts()
        rows = rows[0].expand(ids.shape[0], -1, -1) if self.task_ids is None else rows[self.task_ids]
        k = (found.cumsum(1) - 1).clamp_(0, N - 1)  # each placeholder's rank in its sample
        picked = rows.to(embeds.dtype).gather(1, k[..., None].expand(-1, -1, embeds.shape[-1]))
        kwargs["inputs_embeds"] = torch.where(found[..., None], picked, embeds)
        kwargs["input_ids"] = None


def _positions_from_ids(holder, ids, past):
    """The positions a model that derives them from input_ids (RoBERTa's padding-aware ones, in its
    ``*Embeddings`` module and its copies') would take, which it cannot from inputs_embeds; None for
    any other model."""
    for m in holder.modules():
        make = getattr(m, "create_position_ids_from_input_ids", None)
        named = type(m).__name__.endswith("Embeddings")
        if make is not None and named and isinstance(getattr(m, "padding_idx", None), int):
            return make(ids, m.padding_idx, past)
    return None


def _front_mask(lengths, N, like):
    """[rows, N]: 1 on each row's prompt (the last lengths[i] columns), 0 on the padding before it."""
    slots = torch.arange(N, device=like.device)[None]
    return (slots >= N - lengths.to(like.device)[:, None]).to(like.dtype)


def _prompt_pre_hook(module, args, kwargs):
    _PREPENDED.push(0)
    kwargs = bound(module, args, kwargs)
    batch, length, device = batch_and_length(kwargs)
    N, lengths, build = _plan_call(module, kwargs, batch, device)
    if isinstance(build, _Template):
        build.fill(module, kwargs, past_length(kwargs))
        return (), kwargs
    if N == 0:
        return (), kwargs
    mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"PromptConfig: attention_mask must be the 2-D padding mask [B, L]; got {tuple(mask.shape)} "
            "(generate() makes a 4-D mask for a static cache, which has no room for the prompts: use the "
            "default dynamic cache)"
        )
    shift = N if lengths is None else lengths.to(device)[:, None]
    if past_length(kwargs) > 0:  # a cache that holds the prompts already: extend the mask only
        if mask is None and lengths is not None:  # generate() drops an all-ones mask: the padding needs one
            mask = torch.ones(batch, past_length(kwargs) - N + length, dtype=torch.long, device=device)
        if mask is not None:
            front = mask.new_ones(batch, N) if lengths is None else _front_mask(lengths, N, mask)
            kwargs["attention_mask"] = torch.cat([front, mask], dim=1)
        if positions is not None:
            kwargs["position_ids"] = positions + shift
        elif lengths is not None:  # the model would count the padding before shorter prompts
            text = past_length(kwargs) - N + torch.arange(length, device=device)[None]
            kwargs["position_ids"] = text + shift
        return (), kwargs
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = module.get_input_embeddings()(kwargs["input_ids"])
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"], kwargs["attention_mask"] = build(embeds, mask)
    if lengths is not None:  # each row's prompt starts at position 0, its tokens right after
        text = torch.arange(length, device=device).expand(batch, length) if positions is None else positions
        slots = torch.arange(N, device=device)[None] - (N - lengths.to(device)[:, None])
        kwargs["position_ids"] = torch.cat([slots.clamp(min=0).to(text.dtype), text + shift], dim=-1)
    elif positions is not None:
        head = torch.arange(N, device=device, dtype=positions.dtype).expand(*positions.shape[:-1], N)
        kwargs["position_ids"] = torch.cat([head, positions + N], dim=-1)
    types = kwargs.get("token_type_ids")
    if types is not None:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, N), types], dim=1)
    labels = kwargs.get("labels")
    if isinstance(labels, Tensor) and labels.dim() >= 2 and labels.shape[1] == length:
        kwargs["labels"] = torch.cat([labels.new_full((batch, N, *labels.shape[2:]), -100), labels], dim=1)
    _PREPENDED.set_top(N)
    return (), kwargs


def _extended(mask, N, lengths):
    return torch.cat(
        [mask.new_ones(mask.shape[0], N) if lengths is None else _front_mask(lengths, N, mask), mask], 1
    )


def _source_mask(kwargs):
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"PromptConfig: attention_mask must be the 2-D padding mask [B, S]; got {tuple(mask.shape)}"
        )
    return mask


def _seq2seq_pre_hook(holder, module, args, kwargs):
    """On an encoder-decoder's base: the source mask gains the prompts' columns (the decoder's
    cross-attention reads it); the encoder's pre-hook gets this call's plan."""
    kwargs = bound(module, args, kwargs)
    batch, device = seq2seq_rows(kwargs)
    N, lengths, build = _plan_call(holder, kwargs, batch, device)
    if isinstance(build, _Template):  # the source keeps its length: only the encoder's pre-hook acts
        if kwargs.get("encoder_outputs") is None:
            kwargs[_PLAN_KWARG] = (N, lengths, build)
        return (), kwargs
    if N == 0:
        return (), kwargs
    encoder_outputs = kwargs.get("encoder_outputs")
    source = encoder_outputs[0].shape[1] - N if encoder_outputs is not None else None
    mask = _source_mask(kwargs)
    if mask is None and lengths is not None:  # the padding before shorter prompts needs a mask
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        mask = torch.ones(batch, x.shape[1] if x is not None else source, dtype=torch.long, device=device)
    if mask is not None and (source is None or mask.shape[1] == source):
        kwargs["attention_mask"] = _extended(mask, N, lengths)
    if encoder_outputs is None:
        kwargs[_PLAN_KWARG] = (N, lengths, build)
    return (), kwargs


def _encoder_pre_hook(holder, module, args, kwargs):
    """On an encoder-decoder's encoder: the prompts in front of its input embeddings, and its mask
    extended (unless the base's pre-hook did)."""
    kwargs = bound(module, args, kwargs)
    plan = kwargs.pop(_PLAN_KWARG, None)
    batch, length, device = batch_and_length(kwargs)
    N, lengths, build = plan if plan is not None else _plan_call(holder, kwargs, batch, device)
    if isinstance(build, _Template):
        build.fill(holder, kwargs)
        return (), kwargs
    if N == 0:
        return (), kwargs
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = holder.get_input_embeddings()(kwargs["input_ids"])
    mask = _source_mask(kwargs)
    done = mask is not None and mask.shape[1] == N + length  # extended by the base's pre-hook
    kwargs["input_ids"] = None
    kwargs["inputs_embeds"], extended = build(embeds, mask[:, N:] if done else mask)
    kwargs["attention_mask"] = mask if done else extended
    return (), kwargs


def _prompt_hook(module, args, kwargs, output):
    """Trims the token-level outputs of a call whose inputs the pre-hook prefixed with the prompts."""
    N = _PREPENDED.pop()
    if not N or output is None:
        return output
    embeds = kwargs.get("inputs_embeds")
    return _trim(output, embeds.shape[1], lambda t: t[:, N:])


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
