"""Prefix attention: eager (expand the prefix, torch.cat it in front of K and V, then
F.scaled_dot_product_attention, letting torch pick its backend; GQA by repeating kv heads as
Hugging Face models do) vs torch.compile of it vs peftkern.ops.prefix_attention. bf16.

Ideal bytes per step (es = 2): forward reads q, k, v, the prefix once, writes out (and lse):
  es * (B*H*L*D + 2*B*Hkv*S*D + 2*Hkv*P*D + B*H*L*D) + 4*B*H*L
backward reads q, k, v, prefix, out, dout, lse and writes dq, dk, dv, dprefix: about twice that.
Flops: 4*B*H*L*(P + S)*D forward (causal: the sequence part about halves), 2.5x that backward.
Decode: one query per sample over a cache of S tokens; the floor is SDPA over the cache alone.
"""

import itertools

import torch
import torch.nn.functional as F

import peftkern

from .harness import Case, input_sets_for, mode_work

FAMILY = "prefix"

try:
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # older torch: a boolean mask
    causal_lower_right = None


def _mask(L, K, device):
    if causal_lower_right is not None:
        return causal_lower_right(L, K)
    i = torch.arange(L, device=device)[:, None]
    return torch.arange(K, device=device)[None] <= i + (K - L)


def eager_prefix(q, k, v, pk, pv, causal):
    B, H, L, _ = q.shape
    keys = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], 2)
    values = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], 2)
    if keys.shape[1] != H:
        keys = keys.repeat_interleave(H // keys.shape[1], 1)
        values = values.repeat_interleave(H // values.shape[1], 1)
    mask = _mask(L, keys.shape[2], q.device) if causal else None
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def sdpa_without_prefix(q, k, v, pk, pv, causal):
    H = q.shape[1]
    if k.shape[1] != H:
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    return F.scaled_dot_product_attention(q, k, v)


def fused_prefix(q, k, v, pk, pv, causal):
    return peftkern.ops.prefix_attention(q, k, v, pk, pv, causal=causal)


_compiled = torch.compile(eager_prefix)


def _work(provider, mode, B, H, Hkv, L, S, P, D, causal, dtype):
    fn = {"eager": eager_prefix, "compile": _compiled, "peftkern": fused_prefix,
          "sdpa-no-prefix": sdpa_without_prefix}[provider]

    def make():
        torch.manual_seed(0)
        train = mode not in ("inference", "decode")
        n = input_sets_for(2 * (2 * B * H * L * D + 2 * B * Hkv * S * D))
        sets = []
        for _ in range(n):
            q = torch.randn(B, H, L, D, device="cuda", dtype=dtype).requires_grad_(train)
            k = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype).requires_grad_(train)
            v = torch.randn(B, Hkv, S, D, device="cuda", dtype=dtype).requires_grad_(train)
            sets.append((q, k, v))
        pk = torch.randn(Hkv, P, D, device="cuda", dtype=dtype).requires_grad_(train)
        pv = torch.randn(Hkv, P, D, device="cuda", dtype=dtype).requires_grad_(train)
        grad = torch.randn(B, H, L, D, device="cuda", dtype=dtype)
        return mode_work(mode, lambda i: fn(*sets[i], pk, pv, causal), grad, lambda i: (*sets[i], pk, pv), n)
    return make


def _ideal(mode, B, H, Hkv, L, S, P, D):
    fwd = 2 * (2 * B * H * L * D + 2 * B * Hkv * S * D + 2 * Hkv * P * D) + 4 * B * H * L
    return {"forward": fwd, "inference": fwd, "decode": fwd, "backward": 2 * fwd, "full": 3 * fwd}[mode]


def _flops(mode, B, H, L, S, P, D, causal):
    keys = P + (S / 2 if causal and L > 1 else S)
    fwd = 4 * B * H * L * keys * D
    return {"forward": fwd, "inference": fwd, "decode": fwd, "backward": 2.5 * fwd, "full": 3.5 * fwd}[mode]


def cases(quick=False):
    dtype = torch.bfloat16
    if quick:
        shapes = [(8, 32, 32, 2048, 2048, 64, 128, True), (8, 32, 8, 2048, 2048, 64, 128, True),
                  (8, 32, 32, 2048, 2048, 64, 128, False)]
        decode = [(8, 32, 8, 2048, 64, 128), (1, 32, 32, 8192, 64, 128)]
    else:
        shapes = [(B, 32, Hkv, L, L, P, D, c) for B, Hkv, L, P, D, c in itertools.product(
            (1, 8, 32), (32, 8), (512, 2048, 8192), (16, 64, 256), (64, 128), (True, False))]
        decode = [(B, 32, Hkv, S, P, D) for B, Hkv, S, P, D in itertools.product(
            (1, 8, 32), (32, 8), (512, 2048, 8192), (16, 64, 256), (64, 128))]
    for (B, H, Hkv, L, S, P, D, causal), mode, provider in itertools.product(
            shapes, ("forward", "backward", "full"), ("eager", "compile", "peftkern")):
        if causal and causal_lower_right is None and B * H * L * (P + S) * 2 > 8 << 30:
            continue  # a boolean mask makes SDPA materialise the scores: skip where they pass 8 GB
        yield Case(FAMILY, dict(B=B, H=H, Hkv=Hkv, L=L, S=S, P=P, D=D, causal=causal), dtype, mode, provider,
                   _work(provider, mode, B, H, Hkv, L, S, P, D, causal, dtype), _ideal(mode, B, H, Hkv, L, S, P, D),
                   _flops(mode, B, H, L, S, P, D, causal))
    for (B, H, Hkv, S, P, D), provider in itertools.product(decode, ("eager", "sdpa-no-prefix", "peftkern")):
        yield Case(FAMILY, dict(B=B, H=H, Hkv=Hkv, L=1, S=S, P=P, D=D, causal=False), dtype, "decode", provider,
                   _work(provider, "decode", B, H, Hkv, 1, S, P, D, False, dtype), _ideal("decode", B, H, Hkv, 1, S, P, D),
                   _flops("decode", B, H, 1, S, P, D, False))
