"""Prefix attention, bf16: eager (tests/reference.py: expand the prefix, torch.cat it in front of K
and V, then F.scaled_dot_product_attention with grouped-query heads and a bottom-right causal mask,
letting torch pick its kernel) vs peftkern.ops.prefix_attention vs SDPA over the sequence alone (the
floor: what attention costs without a prefix); torch.compile of the eager code in the full run.

Shapes (the issue's targets; --quick runs the first two):
  P-tuning v2 (BERT-large-like)  B 32, H 16, L = S 128, P 64, D 64, not causal
  Llama-like                     B 8, H 32, Hkv 8, L = S 2048, P 64, D 128, causal
  decode                         B 1 and 32, H 32, Hkv 8, L 1, S 8192, P 64, D 128
Ideal bytes (es = 2): forward reads q, k, v, the prefix once, writes out (and a float32 lse):
  es * (2*B*H*L*D + 2*B*Hkv*S*D + 2*Hkv*P*D) + 4*B*H*L
the backward reads those and dout, writes dq, dk, dv, dprefix: about twice that.
Flops: 4*B*H*L*(P + S')*D forward, S' = S/2 when causal (L = S); the backward 2.5x that.

Predicted occupancy (sm_90, bench/results/static_sm90.md; 4 warps per block):
the prefix forward kernel 4 blocks
per SM at D 64 (128 registers) and 3 at D 128 (160), the prefix backward 3 at both (136, 166): the
sequence part is PyTorch's fused attention, whose occupancy is its own.
"""

import itertools

import torch
import torch.nn.functional as F

import peftkern
from tests import reference

from .harness import Case, input_sets_for, mode_work

FAMILY = "prefix_attention"


def eager_prefix(q, k, v, pk, pv, causal):
    return reference.prefix_attention(q, k, v, pk, pv, causal=causal)


def sdpa_sequence_only(q, k, v, pk, pv, causal):  # L = S in every causal shape here
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


def fused_prefix(q, k, v, pk, pv, causal):
    return peftkern.ops.prefix_attention(q, k, v, pk, pv, causal=causal)


_compiled = torch.compile(eager_prefix)
PROVIDERS = {
    "eager": eager_prefix,
    "compile": _compiled,
    "peftkern": fused_prefix,
    "sdpa-seq-only": sdpa_sequence_only,
}


def _work(provider, mode, B, H, Hkv, L, S, P, D, causal, dtype, device="cuda"):
    fn = PROVIDERS[provider]

    def make():
        torch.manual_seed(0)
        train = mode not in ("inference", "decode")
        n = input_sets_for(2 * (2 * B * H * L * D + 2 * B * Hkv * S * D))
        sets = []
        for _ in range(n):
            q = torch.randn(B, H, L, D, device=device, dtype=dtype).requires_grad_(train)
            k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype).requires_grad_(train)
            v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype).requires_grad_(train)
            sets.append((q, k, v))
        pk = torch.randn(Hkv, P, D, device=device, dtype=dtype).requires_grad_(train)
        pv = torch.randn(Hkv, P, D, device=device, dtype=dtype).requires_grad_(train)
        grad = torch.randn(B, H, L, D, device=device, dtype=dtype)
        return mode_work(mode, lambda i: fn(*sets[i], pk, pv, causal), grad, lambda i: (*sets[i], pk, pv), n)

    return make


def _ideal(mode, B, H, Hkv, L, S, P, D):
    fwd = 2 * (2 * B * H * L * D + 2 * B * Hkv * S * D + 2 * Hkv * P * D) + 4 * B * H * L
    return {"forward": fwd, "inference": fwd, "decode": fwd, "backward": 2 * fwd, "full": 3 * fwd}[mode]


def _flops(mode, B, H, L, S, P, D, causal):
    keys = P + (S / 2 if causal and L > 1 else S)
    fwd = 4 * B * H * L * keys * D
    return {"forward": fwd, "inference": fwd, "decode": fwd, "backward": 2.5 * fwd, "full": 3.5 * fwd}[mode]


TRAINING_SHAPES = [  # B, H, Hkv, L, S, P, D, causal
    (32, 16, 16, 128, 128, 64, 64, False),  # P-tuning v2, BERT-large-like
    (8, 32, 8, 2048, 2048, 64, 128, True),  # Llama-like
]
DECODE_SHAPES = [(1, 32, 8, 8192, 64, 128), (32, 32, 8, 8192, 64, 128)]  # B, H, Hkv, S, P, D


def cases(quick=False):
    dtype = torch.bfloat16
    shapes, decode = TRAINING_SHAPES, ([] if quick else DECODE_SHAPES)
    providers = ("eager", "sdpa-seq-only", "peftkern") + (() if quick else ("compile",))
    for (B, H, Hkv, L, S, P, D, causal), mode, provider in itertools.product(
        shapes, ("forward", "full"), providers
    ):
        yield Case(
            FAMILY,
            dict(B=B, H=H, Hkv=Hkv, L=L, S=S, P=P, D=D, causal=causal),
            dtype,
            mode,
            provider,
            _work(provider, mode, B, H, Hkv, L, S, P, D, causal, dtype),
            _ideal(mode, B, H, Hkv, L, S, P, D),
            _flops(mode, B, H, L, S, P, D, causal),
        )
    for (B, H, Hkv, S, P, D), provider in itertools.product(decode, ("eager", "sdpa-seq-only", "peftkern")):
        yield Case(
            FAMILY,
            dict(B=B, H=H, Hkv=Hkv, L=1, S=S, P=P, D=D, causal=False),
            dtype,
            "decode",
            provider,
            _work(provider, "decode", B, H, Hkv, 1, S, P, D, False, dtype),
            _ideal("decode", B, H, Hkv, 1, S, P, D),
            _flops("decode", B, H, 1, S, P, D, False),
        )


def cpu_cases():
    """The CPU table (bench.run without a GPU): P-tuning v2 on a MiniLM-sized encoder layer (B 8,
    H 12, L = S 128, P 20, D 32, float32) against cat + SDPA and SDPA over the sequence alone."""
    B, H, Hkv, L, S, P, D, dtype = 8, 12, 12, 128, 128, 20, 32, torch.float32
    for mode, provider in itertools.product(("forward", "full"), ("eager", "sdpa-seq-only", "peftkern")):
        yield Case(
            FAMILY,
            dict(B=B, H=H, Hkv=Hkv, L=L, S=S, P=P, D=D, causal=False),
            dtype,
            mode,
            provider,
            _work(provider, mode, B, H, Hkv, L, S, P, D, False, dtype, "cpu"),
            _ideal(mode, B, H, Hkv, L, S, P, D) * 2,
            _flops(mode, B, H, L, S, P, D, False),
        )
