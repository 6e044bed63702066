"""Ladder side-tuning (Sung, Cho, Bansal 2022, LST, §3): a ``peftkern.nn.LadderSideNetwork`` per
named adapter on the model's base (``<base>.peftkern_lst.<name>``), run by hooks beside the frozen
backbone:

- a pre-hook on the base model turns gradient recording off for the backbone (restored by the base
  model's forward hook, which always runs, exception or not): no backbone activation is saved;
- a pre-hook on the first block starts the side state from the block's input (the embeddings'
  output), ``s_0 = down_0(h_0)``, and a forward hook on each block i runs side block i on
  ``mix(s_{i-1}, down_i(h_i))`` with the block's own arguments (the same attention mask; no cache;
  the side's own rotary position embeddings where the model has them), with gradient recording
  as the caller had it;
- the output of the backbone's final norm (Llama's ``model.norm``), or of its last block where it
  has none (BERT), is replaced by ``up(norm_side(s_L))``: the model's head (and BERT's pooler) read
  the side network's state.

The side blocks are the backbone's own block class built from a copy of the model's config with
hidden size, FFN size and head dim divided by r (the head count kept, as the paper's T5 side
networks, whose d_model, d_ff and d_kv are divided), initialised by structural pruning of the
backbone's weights. The paper ranks the rows and columns to keep by their Fisher information on
task data; peftkern prunes without data, by a **magnitude criterion**:

- hidden dims (one set for every side block, the side's final norm and the ladders' outputs): the
  d / r largest ``imp_h[k]`` = sum over every block of the squared entries of every parameter
  along its hidden axis at k (the q/k/v/up/gate weights' columns, the output projections' rows
  and biases, the norms' weights and biases), plus the final norm's;
- FFN neurons, per block: the ff / r largest sums of squares along the FFN axis (the up / gate
  rows and biases, the down projection's columns);
- head dims, per block and per key-value group g (query heads ``g * H/KV .. (g+1) * H/KV - 1``
  share key-value head g): the hd / r largest ``sum_h q[h, j] + k[g, j]`` (q: sums of squares of
  the query rows and the output projection's columns at that head dim; k: of the key and value
  rows); with rotary embeddings the dims are kept in rotate-half pairs (j, j + hd/2), ranked by the
  pair's sum. Ties go to the lower index; kept indices stay in ascending order.

Which parameters carry which axis is a table of BERT-style (BERT, RoBERTa), Llama-style (Llama,
Mistral, Qwen2), T5 and BART block parameter names; a block with another parameter is refused.

T5 (the paper's model) and BART get a ``peftkern.nn.ladder.LadderSideEncoderDecoder``: a side
network beside the encoder and one beside the decoder (T5Blocks at d_model, d_ff, d_kv / r, heads
kept). Each stack's own call (generate() runs the encoder once) turns gradient recording off and
runs its side; the side encoder ends at ``norm_enc(s^enc_L)`` (no upsampler), which the side
decoder's cross-attention reads (with the backbone's encoder mask); the decoder's final norm output
becomes ``up(norm_dec(s^dec_L))``, so T5's own ``* d_model**-0.5`` (where it scales) and lm_head
follow. Side block 0 of each stack has its own relative position bias table, as the authors' side
T5Blocks (``has_relative_attention_bias=(i == 0)``), started from the backbone's (the head count is
kept, so nothing of it is pruned) and trained; the later side blocks reuse its bias. One set of
hidden dims serves both stacks (the cross-attention's keys and values read the encoder's), ranked
over both; the cross-attention's head dims are pruned apart from the self-attention's. The backbone
encoder's output (``encoder_last_hidden_state``) stays the backbone's. BART runs the same way, with
no final norms (BART has none): the side encoder's last state itself goes to the side decoder's
cross-attention, the side decoder's ``up(s^dec_L)`` replaces the last decoder block's output
(lm_head and final_logits_bias follow); a layerdrop above 0 is refused (a skipped last block would
skip the side's exit). Other encoder-decoders (mBART, ...) are refused.
Not routed per sample; no cached decoding (the side blocks keep no cache: pass use_cache=False to
generate; an encoder-decoder's beam search and num_return_sequences > 1 are refused: they expand the
encoder outputs into new tensors, which no longer carry the side encoder's). Saved:
``<base>.peftkern_lst.<param>``. Merge has nothing to fold: the side stays.
"""

import copy
import inspect
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ...nn import routing
from ...nn.ladder import LadderSideEncoderDecoder, LadderSideNetwork
from ..config import LSTConfig
from ..virtual_tokens import CallStack, base_name, bound, forward_signature, hf_config, past_length
from . import Method, active_of, add_to_dict_child, copies, factory, remove_from_dict_child

ATTR = "peftkern_lst"
_CALLS = CallStack("peftkern_lst_calls")  # the side network's state of each base-model call

# each block parameter's axes: h hidden, f FFN neuron, q query-head dims (heads * hd), k key/value dims
_ROLES: Dict[str, Tuple[str, ...]] = {
    # BERT-style (BertLayer, RobertaLayer)
    "attention.self.query.weight": ("q", "h"),
    "attention.self.query.bias": ("q",),
    "attention.self.key.weight": ("k", "h"),
    "attention.self.key.bias": ("k",),
    "attention.self.value.weight": ("k", "h"),
    "attention.self.value.bias": ("k",),
    "attention.output.dense.weight": ("h", "q"),
    "attention.output.dense.bias": ("h",),
    "attention.output.LayerNorm.weight": ("h",),
    "attention.output.LayerNorm.bias": ("h",),
    "intermediate.dense.weight": ("f", "h"),
    "intermediate.dense.bias": ("f",),
    "output.dense.weight": ("h", "f"),
    "output.dense.bias": ("h",),
    "output.LayerNorm.weight": ("h",),
    "output.LayerNorm.bias": ("h",),
    # Llama-style (LlamaDecoderLayer, Mistral, Qwen2's q/k/v biases)
    "self_attn.q_proj.weight": ("q", "h"),
    "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("k", "h"),
    "self_attn.k_proj.bias": ("k",),
    "self_attn.v_proj.weight": ("k", "h"),
    "self_attn.v_proj.bias": ("k",),
    "self_attn.o_proj.weight": ("h", "q"),
    "self_attn.o_proj.bias": ("h",),
    "mlp.gate_proj.weight": ("f", "h"),
    "mlp.up_proj.weight": ("f", "h"),
    "mlp.down_proj.weight": ("h", "f"),
    "input_layernorm.weight": ("h",),
    "post_attention_layernorm.weight": ("h",),
    # T5 (T5Block: self-attention, the decoder's cross-attention, the FFN, plain or gated): no biases;
    # "cq" / "ck" the cross-attention's own head dims; "-" an axis kept whole (the relative position
    # bias table, [buckets, heads]: the side keeps the head count)
    "layer.0.SelfAttention.q.weight": ("q", "h"),
    "layer.0.SelfAttention.k.weight": ("k", "h"),
    "layer.0.SelfAttention.v.weight": ("k", "h"),
    "layer.0.SelfAttention.o.weight": ("h", "q"),
    "layer.0.SelfAttention.relative_attention_bias.weight": ("-", "-"),
    "layer.0.layer_norm.weight": ("h",),
    "layer.1.EncDecAttention.q.weight": ("cq", "h"),
    "layer.1.EncDecAttention.k.weight": ("ck", "h"),
    "layer.1.EncDecAttention.v.weight": ("ck", "h"),
    "layer.1.EncDecAttention.o.weight": ("h", "cq"),
    **{
        f"layer.{i}.{n}": role
        for i in (1, 2)  # the FFN: layer.1 in encoder blocks, layer.2 in decoder blocks
        for n, role in (
            ("layer_norm.weight", ("h",)),
            ("DenseReluDense.wi.weight", ("f", "h")),
            ("DenseReluDense.wi_0.weight", ("f", "h")),
            ("DenseReluDense.wi_1.weight", ("f", "h")),
            ("DenseReluDense.wo.weight", ("h", "f")),
        )
    },
    # BART-style (BartEncoderLayer, BartDecoderLayer; q/k/v from the Llama-style rows above, with biases)
    "self_attn.out_proj.weight": ("h", "q"),
    "self_attn.out_proj.bias": ("h",),
    "encoder_attn.q_proj.weight": ("cq", "h"),
    "encoder_attn.q_proj.bias": ("cq",),
    "encoder_attn.k_proj.weight": ("ck", "h"),
    "encoder_attn.k_proj.bias": ("ck",),
    "encoder_attn.v_proj.weight": ("ck", "h"),
    "encoder_attn.v_proj.bias": ("ck",),
    "encoder_attn.out_proj.weight": ("h", "cq"),
    "encoder_attn.out_proj.bias": ("h",),
    "fc1.weight": ("f", "h"),
    "fc1.bias": ("f",),
    "fc2.weight": ("h", "f"),
    "fc2.bias": ("h",),
    **{
        f"{n}.{x}": ("h",)
        for n in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
        for x in ("weight", "bias")
    },
}
# the base model's final norm after its blocks, where it has one
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "layernorm")
# block arguments the side blocks do not share with the backbone's (its cache holds the backbone's)
_NO_CACHE = {"cache": None, "past_key_values": None, "past_key_value": None, "use_cache": False}


@dataclass
class LSTPlan:
    base: str  # model.base_model's name ("" when the model is its own base)
    blocks: str  # the nn.ModuleList of the backbone's blocks
    num_layers: int
    final_norm: Optional[str]  # the base's norm after the blocks (None: the last block is the exit)
    d_model: int
    d_ff: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary: bool  # the base computes rotary position embeddings (base_model.rotary_emb)
    # encoder-decoders (T5): this plan is the encoder's, ``decoder`` the decoder's; ``stack`` the
    # stack module (the base's encoder / decoder) whose call the hooks run the side beside
    stack: Optional[str] = None
    decoder: Optional["LSTPlan"] = None

    @property
    def exit(self) -> str:
        return self.final_norm or f"{self.blocks}.{self.num_layers - 1}"

    @property
    def stacks(self) -> Tuple["LSTPlan", ...]:
        return (self,) if self.decoder is None else (self, self.decoder)


def _join(*parts) -> str:
    return ".".join(p for p in parts if p)


def _int_field(hf, field, cname) -> int:
    v = getattr(hf, field, None)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{cname}: the model's config has no positive int {field} ({v!r:.40})")
    return v


def _is_norm(m) -> bool:
    return isinstance(m, nn.Module) and "norm" in type(m).__name__.lower()


def _check_saved(model, config, inside) -> None:
    """modules_to_save must lie after the backbone (it runs under no_grad: a copy there never trains)."""
    for n in copies.plan(model, config):
        if any(n == b or n.startswith(b + ".") for b in inside) or any(
            p.startswith("embed") or p == "shared" for p in n.split(".")
        ):
            raise ValueError(
                f"LSTConfig: modules_to_save matched {n}, which runs inside the frozen backbone (under "
                "no_grad in LST, so it would not train); name modules after it, a task head say"
            )


def _small_config(hf, plan, r):
    """A copy of the (stack's) config at the side's widths: hidden, FFN and head dim / r, heads kept."""
    small = copy.deepcopy(hf)
    if plan.stack is not None:  # encoder-decoders: their own field names (BART's head dim: d_model / heads)
        small.d_model = plan.d_model // r
        if getattr(hf, "model_type", None) == "t5":
            small.d_ff, small.d_kv = plan.d_ff // r, plan.head_dim // r
        else:
            small.encoder_ffn_dim, small.decoder_ffn_dim = hf.encoder_ffn_dim // r, hf.decoder_ffn_dim // r
        return small
    small.hidden_size = plan.d_model // r
    small.intermediate_size = plan.d_ff // r
    if getattr(hf, "head_dim", None) is not None:
        small.head_dim = plan.head_dim // r
    return small


class LST(Method):
    config_class = LSTConfig
    routes_per_sample = False

    def plan(self, model, config):
        cname = "LSTConfig"
        hf = hf_config(model, cname)
        kind = getattr(hf, "model_type", None)
        if getattr(hf, "is_encoder_decoder", False):
            return self._plan_encoder_decoder(model, config, hf, kind)
        base = base_name(model)
        bm = model.get_submodule(base) if base else model
        blocks = next(
            (
                n
                for n, m in bm.named_modules()
                if isinstance(m, nn.ModuleList) and len(m) == hf.num_hidden_layers
            ),
            None,
        )
        if blocks is None:
            raise ValueError(
                f"{cname}: {type(model).__name__} has no nn.ModuleList of its {hf.num_hidden_layers} blocks"
            )
        block = bm.get_submodule(blocks)[0]
        unknown = [n for n, _ in block.named_parameters() if n not in _ROLES]
        if unknown:
            raise ValueError(
                f"{cname}: cannot prune {type(block).__name__}'s parameter {unknown[0]!r} into a side block: "
                "peftkern's LST knows BERT-style (BertLayer, RobertaLayer) and Llama-style (Llama, Mistral, "
                "Qwen2) blocks, without other adapters in them"
            )
        r = config.reduction_factor
        d = _int_field(hf, "hidden_size", cname)
        ff = _int_field(hf, "intermediate_size", cname)
        heads = _int_field(hf, "num_attention_heads", cname)
        kv = getattr(hf, "num_key_value_heads", None) or heads
        hd = getattr(hf, "head_dim", None) or d // heads
        rotary = isinstance(getattr(bm, "rotary_emb", None), nn.Module)
        for what, size in (("hidden_size", d), ("intermediate_size", ff), ("head dim", hd)):
            if size % r:
                raise ValueError(f"{cname}: reduction_factor {r} must divide the model's {what} ({size})")
        if rotary and (hd // r) % 2:
            raise ValueError(
                f"{cname}: the side's head dim {hd} / {r} = {hd // r} must be even (rotary embeddings rotate "
                "dims in pairs)"
            )
        if heads % kv or (getattr(hf, "head_dim", None) is None and heads * hd != d):
            raise ValueError(
                f"{cname}: {heads} heads of dim {hd}, {kv} key-value heads do not fit hidden {d}"
            )
        final = next((a for a in _FINAL_NORMS if _is_norm(getattr(bm, a, None))), None)
        if final is not None:
            for n, p in getattr(bm, final).named_parameters():
                if tuple(p.shape) != (d,):
                    raise ValueError(f"{cname}: the final norm's {n} is {tuple(p.shape)}, not ({d},)")
        full_blocks = _join(base, blocks)
        _check_saved(model, config, [full_blocks])
        return LSTPlan(
            base,
            full_blocks,
            hf.num_hidden_layers,
            _join(base, final) if final else None,
            d,
            ff,
            heads,
            kv,
            hd,
            rotary,
        )

    def _plan_encoder_decoder(self, model, config, hf, kind) -> LSTPlan:
        """T5 (the paper's model) and BART: a side network beside the encoder and one beside the
        decoder."""
        cname = "LSTConfig"
        base = base_name(model)
        bm = model.get_submodule(base) if base else model
        stacks = [getattr(bm, s, None) for s in ("encoder", "decoder")]
        # (the stack's blocks, its final norm (None: the last block is the exit), FFN and heads fields)
        layout = {
            "t5": ("block", "final_layer_norm", ("d_ff", "d_ff"), ("num_heads", "num_heads")),
            "bart": (
                "layers",
                None,
                ("encoder_ffn_dim", "decoder_ffn_dim"),
                ("encoder_attention_heads", "decoder_attention_heads"),
            ),
        }.get(kind)
        blocks = [getattr(s, layout[0], None) if layout else None for s in stacks]
        if layout is None or not all(isinstance(b, nn.ModuleList) and len(b) for b in blocks):
            raise ValueError(
                f"{cname}: {type(model).__name__} (model_type {kind!r}) is an encoder-decoder; among "
                "encoder-decoders peftkern's LST runs T5 and BART (an encoder and a decoder stack of "
                "T5Blocks or BART layers) only"
            )
        for field in ("encoder_layerdrop", "decoder_layerdrop"):
            if getattr(hf, field, 0) or 0:  # a skipped last block would skip the side's exit too
                raise ValueError(
                    f"{cname}: LST needs every block to run; the model's {field} is {getattr(hf, field)}"
                )
        r = config.reduction_factor
        d = _int_field(hf, "d_model", cname)
        plans = []
        for j, (name, stack, blist) in enumerate(zip(("encoder", "decoder"), stacks, blocks)):
            ff = _int_field(hf, layout[2][j], cname)
            heads = _int_field(hf, layout[3][j], cname)
            hd = _int_field(hf, "d_kv", cname) if kind == "t5" else d // heads
            if kind != "t5" and heads * hd != d:
                raise ValueError(f"{cname}: {heads} {name} heads do not divide d_model {d}")
            for what, size in (("d_model", d), (layout[2][j], ff), ("head dim", hd)):
                if size % r:
                    raise ValueError(f"{cname}: reduction_factor {r} must divide the model's {what} ({size})")
            unknown = [n for n, _ in blist[0].named_parameters() if n not in _ROLES]
            if unknown:
                raise ValueError(
                    f"{cname}: cannot prune {type(blist[0]).__name__}'s parameter {unknown[0]!r} into a side "
                    "block: peftkern's LST knows T5's and BART's blocks without other adapters in them"
                )
            final = layout[1]
            if final is not None and not _is_norm(getattr(stack, final, None)):
                raise ValueError(f"{cname}: the {kind} {name} has no {final}")
            full = _join(base, name)
            plans.append(
                LSTPlan(
                    base,
                    f"{full}.{layout[0]}",
                    len(blist),
                    _join(full, final) if final else None,
                    d,
                    ff,
                    heads,
                    heads,
                    hd,
                    False,
                    stack=full,
                )
            )
        _check_saved(model, config, [p.stack for p in plans])
        plans[0].decoder = plans[1]
        return plans[0]

    # -- building ------------------------------------------------------------------------------------

    def _build(self, model, plan, config, fac, prune: bool):
        keep = prune_indices(model, plan, config.reduction_factor) if prune else None
        if plan.decoder is None:
            return self._build_stack(model, plan, config, fac, keep, upsample=True)
        enc = self._build_stack(model, plan, config, fac, keep, upsample=False)
        dec_keep = None if keep is None else {"h": keep["h"], "blocks": keep["decoder"]}
        return LadderSideEncoderDecoder(enc, self._build_stack(model, plan.decoder, config, fac, dec_keep))

    def _build_stack(self, model, plan, config, fac, keep, upsample=True) -> LadderSideNetwork:
        r = config.reduction_factor
        hf = model.get_submodule(plan.stack).config if plan.stack is not None else model.config
        small = _small_config(hf, plan, r)
        big_blocks = model.get_submodule(plan.blocks)
        blocks = []
        for i, big in enumerate(big_blocks):
            cls = type(big)
            params = inspect.signature(cls.__init__).parameters
            kw = {"layer_idx": i} if "layer_idx" in params else {}
            if "has_relative_attention_bias" in params:  # T5: a side block has its own table where its
                # backbone block has one (the first), as the authors' side T5Blocks
                kw["has_relative_attention_bias"] = any(
                    getattr(m, "has_relative_attention_bias", False) for m in big.modules()
                )
            with torch.device(fac.get("device") or "cpu"):
                side = cls(small, **kw)
            blocks.append(side if fac.get("dtype") is None else side.to(fac["dtype"]))
        norm = None
        if plan.final_norm is not None:
            norm = copy.deepcopy(model.get_submodule(plan.final_norm))
            h = keep["h"] if keep else torch.arange(plan.d_model // r)
            for n, p in list(norm.named_parameters()):
                setattr(norm, n, nn.Parameter(p.detach().index_select(0, h.to(p.device)).to(**fac)))
            if isinstance(norm, nn.LayerNorm):
                norm.normalized_shape = (plan.d_model // r,)
        if keep is not None:
            for i, (big, side) in enumerate(zip(big_blocks, blocks)):
                _copy_pruned(big, side, {**keep["blocks"][i], "h": keep["h"]})
        net = LadderSideNetwork(
            blocks, plan.d_model, plan.d_model // r, gate=config.gate, norm=norm, upsample=upsample, **fac
        )
        if plan.rotary:  # the side's rotary embedding, of its head dim (buffers only: nothing saved)
            rope = model.get_submodule(plan.base).rotary_emb if plan.base else model.rotary_emb
            with torch.device(fac.get("device") or "cpu"):
                net.rotary = type(rope)(config=small)
        return net

    def expected_shapes(self, model, plan, config):
        meta = self._build(model, plan, config, dict(device="meta"), prune=False)
        prefix = _join(plan.base, ATTR)
        return {f"{prefix}.{n}": t.shape for n, t in meta.named_parameters()}

    def apply(self, model, plan, config, name):
        bm = model.get_submodule(plan.base) if plan.base else model
        fac = factory(model, model)
        net = self._build(model, plan, config, fac, prune=True).train(model.training)
        first = not hasattr(bm, ATTR)
        add_to_dict_child(bm, ATTR, name, net)
        if first:
            bm._peftkern_active = getattr(bm, "_peftkern_active", ())
            hooks = []
            for st in plan.stacks:
                # an encoder-decoder's stacks are called apart (generate() runs the encoder once), so
                # each stack's call, not the base's, turns gradient recording off and runs its side
                part = None if plan.decoder is None else st.stack.rsplit(".", 1)[-1]
                owner = bm if part is None else model.get_submodule(st.stack)
                blocks = model.get_submodule(st.blocks)
                hooks += [
                    owner.register_forward_pre_hook(_BaseStart(part, bm), with_kwargs=True),
                    owner.register_forward_hook(_BaseEnd(part), with_kwargs=True, always_call=True),
                    blocks[0].register_forward_pre_hook(_SideStart(), with_kwargs=True),
                ]
                last = len(blocks) - 1
                for i, b in enumerate(blocks):
                    exits = st.final_norm is None and i == last
                    hooks.append(b.register_forward_hook(_SideStep(i, exits), with_kwargs=True))
                if st.final_norm is not None:
                    hooks.append(model.get_submodule(st.exit).register_forward_hook(_SideExit(part)))
            bm._peftkern_lst_hooks = hooks
        prefix = _join(plan.base, ATTR)
        return {f"{prefix}.{n}": f"{prefix}.{name}.{n}" for n, _ in net.named_parameters()}

    def remove(self, model, plan, name):
        bm = model.get_submodule(plan.base) if plan.base else model
        if remove_from_dict_child(bm, ATTR, name):
            for h in bm._peftkern_lst_hooks:
                h.remove()
            del bm._peftkern_lst_hooks

    def merge(self, model, plan, name):
        return [f"the LST side network of '{name}' stays (it does not fold into the base weights)"]

    def site_keys(self, plan):
        return [(plan.base, "ladder side network!")]

    def mixed_refusal(self, plan, config):
        return "LST's side network replaces the backbone's output for the whole batch"


# -- pruning ---------------------------------------------------------------------------------------


def _sizes(plan) -> Dict[str, int]:
    q, k = plan.heads * plan.head_dim, plan.kv_heads * plan.head_dim
    return {"h": plan.d_model, "f": plan.d_ff, "q": q, "k": k, "cq": q, "ck": k}


def _importance(block: nn.Module, plan) -> Dict[str, Tensor]:
    """Per axis role, the sum of squares of every parameter's entries at each index (float64)."""
    sizes = _sizes(plan)
    imp = {k: torch.zeros(n, dtype=torch.float64) for k, n in sizes.items()}
    for n, p in block.named_parameters():
        sq = p.detach().to(device="cpu", dtype=torch.float64) ** 2
        for ax, role in enumerate(_ROLES[n]):
            if role == "-":
                continue
            if sq.shape[ax] != sizes[role]:
                raise ValueError(
                    f"LSTConfig: {type(block).__name__}'s {n} is {tuple(p.shape)}; its axis {ax} should be "
                    f"{sizes[role]} (the model's config and its weights disagree)"
                )
            others = [a for a in range(sq.dim()) if a != ax]
            imp[role] += sq.sum(dim=others) if others else sq
    return imp


def top_indices(importance: Tensor, k: int) -> Tensor:
    """The indices of the k largest entries (ties to the lower index), in ascending order."""
    return torch.argsort(-importance, stable=True)[:k].sort().values


def _head_dims(imp_q: Tensor, imp_k: Tensor, plan, keep: int) -> Tuple[Tensor, Tensor]:
    """The kept query and key/value inner indices: per key-value group, the same head dims."""
    H, KV, hd = plan.heads, plan.kv_heads, plan.head_dim
    group = imp_q.view(KV, H // KV, hd).sum(1) + imp_k.view(KV, hd)
    kept = []
    for g in range(KV):
        if plan.rotary:
            half = hd // 2
            js = top_indices(group[g, :half] + group[g, half:], keep // 2)
            kept.append(torch.cat([js, js + half]))
        else:
            kept.append(top_indices(group[g], keep))
    kept = torch.stack(kept)  # [KV, keep]
    k_idx = (torch.arange(KV)[:, None] * hd + kept).reshape(-1)
    q_idx = (torch.arange(H)[:, None] * hd + kept.repeat_interleave(H // KV, 0)).reshape(-1)
    return q_idx, k_idx


def prune_indices(model: nn.Module, plan: LSTPlan, r: int) -> dict:
    """{"h": kept hidden dims, "blocks": [{"f", "q", "k", "cq", "ck": kept indices}] per block (and
    "decoder": the same for the decoder's blocks)}, by the module docstring's magnitude criterion. An
    encoder-decoder keeps one set of hidden dims for both stacks (its cross-attention's keys and
    values read the encoder's hidden dims), ranked over both stacks' blocks and final norms."""
    imps = [[_importance(b, st) for b in model.get_submodule(st.blocks)] for st in plan.stacks]
    imp_h = sum(i["h"] for stack in imps for i in stack)
    for st in plan.stacks:
        if st.final_norm is not None:
            for p in model.get_submodule(st.final_norm).parameters():
                imp_h = imp_h + p.detach().to(device="cpu", dtype=torch.float64) ** 2
    per_stack = []
    for st, stack in zip(plan.stacks, imps):
        per_block = []
        for i in stack:
            q, k = _head_dims(i["q"], i["k"], st, st.head_dim // r)
            cq, ck = _head_dims(i["cq"], i["ck"], st, st.head_dim // r)
            per_block.append({"f": top_indices(i["f"], st.d_ff // r), "q": q, "k": k, "cq": cq, "ck": ck})
        per_stack.append(per_block)
    out = {"h": top_indices(imp_h, plan.d_model // r), "blocks": per_stack[0]}
    if plan.decoder is not None:
        out["decoder"] = per_stack[1]
    return out


@torch.no_grad()
def _copy_pruned(big: nn.Module, side: nn.Module, keep: Dict[str, Tensor]) -> None:
    bigs = dict(big.named_parameters())
    for n, p in side.named_parameters():
        t = bigs[n].detach()
        for ax, role in enumerate(_ROLES[n]):
            if role != "-":
                t = t.index_select(ax, keep[role].to(t.device))
        if t.shape != p.shape:
            raise ValueError(
                f"LSTConfig: the side block's {n} is {tuple(p.shape)}, the pruned backbone's {tuple(t.shape)}"
            )
        p.copy_(t)


# -- hooks -------------------------------------------------------------------------------------------


class _Run:
    """One base-model (or T5 stack) call with an LST active: its network, the caller's grad mode, the
    side state."""

    def __init__(self, net: LadderSideNetwork, grad: bool, held: nn.Module):
        self.net, self.grad, self.held = net, grad, held  # held: the adapter's module (T5: the pair)
        self.side: Optional[Tensor] = None
        self.rotary = None  # the side's (cos, sin), computed once per call
        self.bias = self.cross_bias = None  # T5: the side's own position biases, from its first block
        self.encoded: Optional[Tensor] = None  # T5's encoder: norm_enc(s^enc_L), for the side decoder


# T5: the side encoder's output rides on the backbone encoder's output tensor (the one the decoder's
# cross-attention is called with, also when generate() runs the encoder once and the decoder per token)
_ENCODED = "_peftkern_lst_encoded"


def _active_net(base) -> Optional[LadderSideNetwork]:
    held = getattr(base, ATTR)
    names, route = routing.resolve(base, list(held.keys()), active_of(base))
    if route is not None:  # inject's sample checks refuse this first
        raise ValueError("LST: " + LST().mixed_refusal(None, None))
    if not names:
        return None
    route = routing.for_module(base)
    together = active_of(base) if route is None else route.samples[0]
    if len(together) > 1:  # their parameters would sit in the backbone, which runs without gradient
        raise ValueError(
            f"LST: adapter {names[0]!r} runs the backbone without gradient, so it cannot apply together "
            f"with other adapters ({sorted(n for n in together if n != names[0])}); activate it alone"
        )
    return held[names[0]]


class _BaseStart:
    """On the base model (T5: on each stack): gradient recording off for the backbone (the caller's
    mode kept)."""

    def __init__(self, part: Optional[str] = None, base: Optional[nn.Module] = None):
        self.part, self.base = part, base  # part: "encoder" / "decoder" of a T5 pair, None: one stack

    def __call__(self, module, args, kwargs):
        held = _active_net(module if self.part is None else self.base)
        net = held if held is None or self.part is None else getattr(held, self.part)
        run = None if net is None else _Run(net, torch.is_grad_enabled(), held)
        _CALLS.push(run)  # pushed first: _BaseEnd pops it even when this raises
        if run is None:
            return None
        if past_length(bound(module, args, kwargs)) > 0:
            raise ValueError(
                "LST: the side network keeps no cache, so it cannot decode from cached keys and values; "
                "call generate(..., use_cache=False) (or the model with past_key_values=None)"
            )
        torch.set_grad_enabled(False)
        return None


class _BaseEnd:
    def __init__(self, part: Optional[str] = None):
        self.part = part

    def __call__(self, module, args, kwargs, output):
        run = _CALLS.pop()
        if run is not None:
            torch.set_grad_enabled(run.grad)
            if run.encoded is not None and output is not None:
                setattr(output[0], _ENCODED, (run.held, run.encoded))
        return None


def _hidden_name(block) -> str:
    return next(iter(forward_signature(block).parameters))


class _SideStart:
    """On the first block: s_0 = down_0(its input)."""

    def __call__(self, block, args, kwargs):
        run = _CALLS.top()
        if run is None:
            return None
        h0 = args[0] if args else kwargs[_hidden_name(block)]
        with torch.set_grad_enabled(run.grad):
            run.side = run.net.start(h0)
        return None


def _side_kwargs(block, args, kwargs, run, side: Tensor) -> dict:
    kw = bound(block, args, kwargs)
    kw.pop(_hidden_name(block), None)
    kw.update({k: v for k, v in _NO_CACHE.items() if k in kw})
    if kw.get("encoder_hidden_states") is not None:  # T5's decoder: cross-attend to the side encoder
        found = getattr(kw["encoder_hidden_states"], _ENCODED, None)
        if found is None or found[0] is not run.held:
            raise ValueError(
                "LST: the decoder's encoder_hidden_states are not the output of this model's encoder run "
                "with the same LST adapter active, so the side decoder has no side encoder output to "
                "cross-attend to (pass input_ids, not encoder_outputs computed elsewhere; generate() with "
                "num_beams > 1 or num_return_sequences > 1 expands them into new tensors: not supported)"
            )
        kw["encoder_hidden_states"] = found[1]
    for k, v in (("position_bias", run.bias), ("encoder_decoder_position_bias", run.cross_bias)):
        if k in kw:  # T5: the side's biases (its first block's own table), not the backbone's
            kw[k] = v
    if kw.get("position_embeddings") is not None:
        rope = getattr(run.net, "rotary", None)
        if rope is None:
            raise ValueError("LST: the backbone's blocks take rotary position embeddings, the side has none")
        if run.rotary is None:
            pos = kw.get("position_ids")
            if pos is None:
                pos = torch.arange(side.shape[1], device=side.device)[None]
            run.rotary = rope(side, pos)
        kw["position_embeddings"] = run.rotary
    return kw


class _SideStep:
    """On block i: s_i = side_block_i(mix(s_{i-1}, down_i(h_i))); on the exit block, its output
    becomes up(s_L) and gradient recording comes back."""

    def __init__(self, i: int, exits: bool):
        self.i, self.exits = i, exits

    def __call__(self, block, args, kwargs, output):
        run = _CALLS.top()
        if run is None or run.side is None:
            return None
        h = output[0] if isinstance(output, (tuple, list)) else output
        with torch.set_grad_enabled(run.grad):
            kw = _side_kwargs(block, args, kwargs, run, run.side)
            if "position_bias" in kw:  # T5: the biases side block 0 computes go to the next ones
                run.side, rest = run.net.step(self.i, run.side, h, with_rest=True, **kw)
                run.bias, run.cross_bias = (*rest, None, None)[:2]
            else:
                run.side = run.net.step(self.i, run.side, h, **kw)
            if not self.exits:
                return None
            if run.net.up is None:  # an encoder's side (BART: no final norm): kept for the side decoder
                run.encoded, run.side = run.net.finish(run.side), None
                return None
            out = run.net.finish(run.side)
        torch.set_grad_enabled(run.grad)
        run.side = None
        return (out, *output[1:]) if isinstance(output, (tuple, list)) else out


class _SideExit:
    """On the base's final norm: its output becomes up(norm_side(s_L)); gradient recording comes back.
    On T5's encoder's: its output stays, norm_enc(s^enc_L) is kept for the side decoder."""

    def __init__(self, part: Optional[str] = None):
        self.part = part

    def __call__(self, norm, args, output):
        run = _CALLS.top()
        if run is None or run.side is None:
            return None
        if self.part == "encoder":
            with torch.set_grad_enabled(run.grad):
                run.encoded = run.net.finish(run.side)
            run.side = None
            return None
        torch.set_grad_enabled(run.grad)
        out = run.net.finish(run.side)
        run.side = None
        return out
