"""Prefix tuning (Li & Liang 2021), P-tuning v2, prompt tuning, P-tuning and VPT modules."""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.prefix_attention import prefix_attention
from . import _checks


def _check_task_ids(task_ids: Optional[Tensor], num_tasks: int, who: str) -> None:
    if task_ids is None:
        return
    if task_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{who}: task_ids must be an int32 or int64 tensor; got {task_ids.dtype}")
    if task_ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(task_ids)).tolist()  # one device-to-host copy
    if lo < 0 or hi >= num_tasks:
        raise ValueError(f"{who}: task_ids must be in [0, {num_tasks}); got values in [{lo}, {hi}]")


class PrefixKV(nn.Module):
    """The learned prefix keys and values of every attention layer.

    Without ``projection_dim``: the prefixes are one parameter ``prefix``
    ``[num_tasks, num_layers, 2, num_kv_heads, prefix_len, head_dim]`` (~ N(0, init_std^2)).
    With ``projection_dim``: Li & Liang's reparametrisation used in training, as peft's PrefixEncoder
    builds it: ``embedding [num_tasks * prefix_len, Hkv * D] -> Linear(Hkv * D, projection_dim) -> tanh
    -> Linear(projection_dim, num_layers * 2 * Hkv * D)`` (one output block per layer);
    ``freeze_projection()`` evaluates it once and keeps the prefixes as the plain (frozen) parameter.

    ``forward(layer, task_ids=None)`` -> ``(prefix_k, prefix_v)`` of that layer: ``[Hkv, P, D]`` with a
    single task, ``[T, Hkv, P, D]`` otherwise (hand ``task_ids`` to the attention as ``prefix_ids``;
    here they are only checked). They are fresh contiguous tensors, not views of the parameter.

    ``gate_dim`` (UniPELT, Mao et al. 2022): also a ``gate`` (``PrefixGate(num_layers, gate_dim)``), one
    learned gate per layer of the attention's input hidden states: ``self.gate(layer, h)`` -> ``[...]``,
    handed to ``ops.prefix_attention(..., prefix_gate=g[:, None, :])``.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        prefix_len: int,
        *,
        num_tasks: int = 1,
        projection_dim: Optional[int] = None,
        init_std: float = 0.02,
        gate_dim: Optional[int] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_layers = _checks.dim("PrefixKV", "num_layers", num_layers)
        num_kv_heads = _checks.dim("PrefixKV", "num_kv_heads", num_kv_heads)
        head_dim = _checks.dim("PrefixKV", "head_dim", head_dim)
        prefix_len = _checks.dim("PrefixKV", "prefix_len", prefix_len, minimum=0)
        num_tasks = _checks.dim("PrefixKV", "num_tasks", num_tasks)
        if projection_dim is not None:
            projection_dim = _checks.dim("PrefixKV", "projection_dim", projection_dim)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.prefix_len, self.num_tasks, self.projection_dim = prefix_len, num_tasks, projection_dim
        factory = _checks.factory("PrefixKV", device, dtype)
        width = num_kv_heads * head_dim
        if projection_dim is None:
            shape = (num_tasks, num_layers, 2, num_kv_heads, prefix_len, head_dim)
            self.prefix = nn.Parameter(torch.randn(shape, **factory) * init_std)
            self.embedding = self.down = self.up = None
        else:
            self.prefix = None
            self.embedding = nn.Embedding(num_tasks * prefix_len, width, **factory)
            self.down = nn.Linear(width, projection_dim, **factory)
            self.up = nn.Linear(projection_dim, num_layers * 2 * width, **factory)
        self.gate = None if gate_dim is None else PrefixGate(num_layers, gate_dim, **factory)

    def _projected(self, layers: slice) -> Tensor:
        """[T, n_layers, 2, Hkv, P, D] from the reparametrisation, computing only `layers`."""
        T, P, Hkv, D = self.num_tasks, self.prefix_len, self.num_kv_heads, self.head_dim
        block = 2 * Hkv * D
        rows = slice(layers.start * block, layers.stop * block)
        h = torch.tanh(self.down(self.embedding.weight))
        out = F.linear(h, self.up.weight[rows], self.up.bias[rows])  # [T * P, n * 2 * Hkv * D]
        n = layers.stop - layers.start
        return out.view(T, P, n, 2, Hkv, D).permute(0, 2, 3, 4, 1, 5)

    def forward(self, layer: int, task_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"PrefixKV: layer must be in [0, {self.num_layers}); got {layer}")
        _check_task_ids(task_ids, self.num_tasks, "PrefixKV")
        kv = (
            self.prefix[:, layer]
            if self.prefix is not None
            else self._projected(slice(layer, layer + 1))[:, 0]
        )
        # Fresh contiguous copies (a few KB), never views of the parameter: FSDP2 frees the
        # unsharded parameter after this module's forward, and a view would outlive it.
        if self.num_tasks == 1 and task_ids is None:
            k, v = kv[0, 0], kv[0, 1]
        else:
            k, v = kv[:, 0], kv[:, 1]
        return k.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def freeze_projection(self) -> None:
        """Replace the reparametrisation by the prefixes it gives now (for inference)."""
        if self.prefix is not None:
            return
        prefix = self._projected(slice(0, self.num_layers)).contiguous()
        self.embedding = self.down = self.up = None
        self.prefix = nn.Parameter(prefix, requires_grad=False)

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"prefix_len={self.prefix_len}, num_tasks={self.num_tasks}, projection_dim={self.projection_dim}"
        )


class PrefixGate(nn.Module):
    """UniPELT's prefix gates (Mao et al. 2022): one ``Linear(d_model, 1)`` per attention layer, stacked:
    ``weight [num_layers, d_model]``, ``bias [num_layers]`` (each row initialised as nn.Linear's).

    ``forward(layer, hidden [..., d_model])`` -> ``sigmoid(hidden @ weight[layer] + bias[layer])``,
    shape ``hidden.shape[:-1]``: the share of each token's attention output its layer's prefix keeps.
    Only that layer's row is read."""

    def __init__(self, num_layers: int, d_model: int, *, device=None, dtype=None):
        super().__init__()
        self.num_layers = _checks.dim("PrefixGate", "num_layers", num_layers)
        self.d_model = _checks.dim("PrefixGate", "d_model", d_model)
        factory = _checks.factory("PrefixGate", device, dtype)
        self.weight = nn.Parameter(torch.empty(num_layers, d_model, **factory))
        self.bias = nn.Parameter(torch.empty(num_layers, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.d_model)  # nn.Linear(d_model, 1)'s weight and bias bound
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    def forward(self, layer: int, hidden: Tensor) -> Tensor:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"PrefixGate: layer must be in [0, {self.num_layers}); got {layer}")
        if hidden.shape[-1] != self.d_model:
            raise ValueError(f"PrefixGate: hidden must be [..., {self.d_model}]; got {tuple(hidden.shape)}")
        w, b = self.weight[layer : layer + 1], self.bias[layer : layer + 1]  # under autocast F.linear casts
        return torch.sigmoid(F.linear(hidden, w.to(hidden.dtype), b.to(hidden.dtype))).squeeze(-1)

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, d_model={self.d_model}"


class PrefixSelfAttention(nn.Module):
    """Multi-head self-attention (q/k/v/o projections, optional grouped-query heads, causal flag)
    whose keys and values are prefixed: ``forward(x [B, L, E], prefix_k, prefix_v, prefix_ids=None)``
    -> ``[B, L, E]`` through peftkern.ops.prefix_attention. With P = 0 it is plain attention.
    No attention dropout."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: Optional[int] = None,
        causal: bool = False,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        embed_dim = _checks.dim("PrefixSelfAttention", "embed_dim", embed_dim)
        num_heads = _checks.dim("PrefixSelfAttention", "num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        num_kv_heads = _checks.dim("PrefixSelfAttention", "num_kv_heads", num_kv_heads)
        if embed_dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(
                f"PrefixSelfAttention: embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads}) "
                f"and num_heads of num_kv_heads ({num_kv_heads})"
            )
        factory = _checks.factory("PrefixSelfAttention", device, dtype)
        self.embed_dim, self.num_heads, self.num_kv_heads, self.causal = (
            embed_dim,
            num_heads,
            num_kv_heads,
            causal,
        )
        self.head_dim = embed_dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, *, causal: bool = False) -> "PrefixSelfAttention":
        """Reuses a torch MultiheadAttention's weights (copied). Inputs are [B, L, E] whatever the MHA's
        batch_first; its attention dropout is not applied."""
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(
                "PrefixSelfAttention.from_mha: needs same q/k/v dims, no add_bias_kv, no add_zero_attn"
            )
        w = mha.in_proj_weight
        layer = cls(
            mha.embed_dim,
            mha.num_heads,
            causal=causal,
            bias=mha.in_proj_bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        E = mha.embed_dim
        with torch.no_grad():
            for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
                proj.weight.copy_(w[i * E : (i + 1) * E])
                if proj.bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[i * E : (i + 1) * E])
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if layer.out_proj.bias is not None:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer

    def forward(
        self, x: Tensor, prefix_k: Tensor, prefix_v: Tensor, prefix_ids: Optional[Tensor] = None
    ) -> Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = prefix_attention(q, k, v, prefix_k, prefix_v, prefix_ids=prefix_ids, causal=self.causal)
        # out_proj by hand: nn.Linear with a bias returns a view for 3-D input, and this module's
        # output must be a fresh tensor (FSDP2 hooks it; an in-place op on a view would skip that).
        y = F.linear(out.transpose(1, 2).reshape(B, L, self.embed_dim), self.out_proj.weight)
        return y if self.out_proj.bias is None else y.add_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"causal={self.causal}"
        )


class SoftPrompt(nn.Module):
    """Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021) input prompts: prepends each
    sample's task prompt ``[num_tokens, d_model]`` to its input embeddings and extends the attention mask.

    ``forward(inputs_embeds [B, L, E], attention_mask=None [B, L], task_ids=None [B])`` ->
    ``(embeds [B, N + L, E], mask [B, N + L] or None)``. ``prompts()`` -> ``[num_tasks, N, E]``.

    ``encoder=None``: the prompts are the parameter ``prompt``; ``from_embeddings(token_embeddings)``
    starts them from given token embeddings (``[N, E]``, or ``[T, N, E]`` per task).
    ``encoder="mlp"`` / ``"lstm"``: P-tuning's prompt encoder, laid out as peft's ``PromptEncoder``
    (so its weights load as they are): ``embedding [num_tasks * N, E]``, then for "mlp" ``mlp_head`` =
    Linear(E, h), ReLU, Linear(h, h), ReLU, Linear(h, E); for "lstm" ``lstm_head`` = a bidirectional
    LSTM(E, h, encoder_num_layers) and ``mlp_head`` = Linear(2h, 2h), ReLU, Linear(2h, E); h is
    ``encoder_hidden_size`` (default E). Each task's N tokens run through it as one sequence.
    ``merge_encoder()`` evaluates it once and keeps the prompts (frozen) instead.
    """

    def __init__(
        self,
        num_tokens: int,
        d_model: int,
        *,
        num_tasks: int = 1,
        encoder: Optional[str] = None,
        encoder_hidden_size: Optional[int] = None,
        encoder_num_layers: int = 2,
        init_std: float = 0.02,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_tokens = _checks.dim("SoftPrompt", "num_tokens", num_tokens)
        d_model = _checks.dim("SoftPrompt", "d_model", d_model)
        num_tasks = _checks.dim("SoftPrompt", "num_tasks", num_tasks)
        if encoder not in (None, "mlp", "lstm"):
            raise ValueError(f"SoftPrompt: encoder must be None, 'mlp' or 'lstm'; got {encoder!r:.40}")
        hidden = d_model if encoder_hidden_size is None else encoder_hidden_size
        hidden = _checks.dim("SoftPrompt", "encoder_hidden_size", hidden)
        encoder_num_layers = _checks.dim("SoftPrompt", "encoder_num_layers", encoder_num_layers)
        factory = _checks.factory("SoftPrompt", device, dtype)
        self.num_tokens, self.d_model, self.num_tasks, self.encoder = num_tokens, d_model, num_tasks, encoder
        self.prompt = self.embedding = self.lstm_head = self.mlp_head = None
        if encoder is None:
            self.prompt = nn.Parameter(torch.randn(num_tasks, num_tokens, d_model, **factory) * init_std)
            return
        self.embedding = nn.Embedding(num_tasks * num_tokens, d_model, **factory)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(
                d_model,
                hidden,
                num_layers=encoder_num_layers,
                bidirectional=True,
                batch_first=True,
                **factory,
            )
            widths = [2 * hidden, 2 * hidden, d_model]
        else:
            widths = [d_model, hidden, hidden, d_model]
        layers = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Linear(a, b, **factory)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
        self.mlp_head = nn.Sequential(*layers)

    @classmethod
    def from_embeddings(cls, token_embeddings: Tensor) -> "SoftPrompt":
        emb = token_embeddings if token_embeddings.dim() == 3 else token_embeddings.unsqueeze(0)
        layer = cls(emb.shape[1], emb.shape[2], num_tasks=emb.shape[0], device=emb.device, dtype=emb.dtype)
        with torch.no_grad():
            layer.prompt.copy_(emb)
        return layer

    def prompts(self) -> Tensor:
        """Every task's prompt, ``[num_tasks, N, E]``."""
        if self.prompt is not None:
            return self.prompt
        x = self.embedding.weight.view(self.num_tasks, self.num_tokens, self.d_model)
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)

    @torch.no_grad()
    def merge_encoder(self) -> None:
        """Replace P-tuning's encoder by the prompts it gives now (for inference)."""
        if self.prompt is not None:
            return
        prompt = self.prompts().detach().clone()
        self.embedding = self.lstm_head = self.mlp_head = None
        self.encoder = None
        self.prompt = nn.Parameter(prompt, requires_grad=False)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Optional[Tensor] = None,
        task_ids: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        B = inputs_embeds.shape[0]
        prompts = self.prompts()
        if task_ids is None:
            if self.num_tasks > 1:
                raise ValueError(
                    f"SoftPrompt: {self.num_tasks} task prompts; task_ids [B] must choose one per sample"
                )
            prompts = prompts[0].expand(B, -1, -1)
        else:
            _check_task_ids(task_ids, self.num_tasks, "SoftPrompt")
            if task_ids.shape != (B,):
                raise ValueError(
                    f"SoftPrompt: task_ids must be [{B}] (one per sample); got {tuple(task_ids.shape)}"
                )
            prompts = prompts[task_ids]
        embeds = torch.cat([prompts.to(inputs_embeds.dtype), inputs_embeds], dim=1)
        if attention_mask is None:
            return embeds, None
        ones = attention_mask.new_ones(B, self.num_tokens)
        return embeds, torch.cat([ones, attention_mask], dim=1)

    def extra_repr(self) -> str:
        return (
            f"num_tokens={self.num_tokens}, d_model={self.d_model}, num_tasks={self.num_tasks}, "
            f"encoder={self.encoder!r}"
        )


class VisualPrompt(nn.Module):
    """Visual prompt tuning (Jia et al. 2022): ``num_tokens`` learned tokens ``prompt [N, E]`` for the
    token sequence of a ViT block (CLS first).

    ``insert(h [B, 1 + S, E])`` -> ``[B, 1 + N + S, E]``: the prompts after the CLS token.
    ``replace(h [B, 1 + N + S, E])``: the N tokens after CLS become these prompts (VPT-deep).
    ``VisualPrompt.remove(h [B, 1 + N + S, E], N)`` -> ``[B, 1 + S, E]`` (after the last block).
    Initialised uniform in ``±init_range``; None: the paper's ``sqrt(6 / (3 * patch_area + E))``.
    """

    def __init__(
        self,
        num_tokens: int,
        d_model: int,
        *,
        patch_area: int = 256,
        init_range: Optional[float] = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        num_tokens = _checks.dim("VisualPrompt", "num_tokens", num_tokens)
        d_model = _checks.dim("VisualPrompt", "d_model", d_model)
        patch_area = _checks.dim("VisualPrompt", "patch_area", patch_area)
        factory = _checks.factory("VisualPrompt", device, dtype)
        self.num_tokens, self.d_model = num_tokens, d_model
        bound = math.sqrt(6.0 / (3 * patch_area + d_model)) if init_range is None else float(init_range)
        prompt = torch.empty(num_tokens, d_model, **factory)
        self.prompt = nn.Parameter(prompt if prompt.is_meta else prompt.uniform_(-bound, bound))

    def _tokens(self, h: Tensor) -> Tensor:
        return self.prompt.to(h.dtype).expand(h.shape[0], -1, -1)

    def insert(self, h: Tensor) -> Tensor:
        return torch.cat([h[:, :1], self._tokens(h), h[:, 1:]], dim=1)

    def replace(self, h: Tensor) -> Tensor:
        return torch.cat([h[:, :1], self._tokens(h), h[:, 1 + self.num_tokens :]], dim=1)

    @staticmethod
    def remove(h: Tensor, num_tokens: int) -> Tensor:
        return torch.cat([h[:, :1], h[:, 1 + num_tokens :]], dim=1)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, d_model={self.d_model}"
