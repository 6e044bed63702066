"""Kronecker adapters: KronA's linear layer and Compacter's adapter.

KronA, ``out = x Wᵀ + b + s · x (A ⊗ B)ᵀ`` (T rows, [out, in] base, A [out_a, in_a], B [out_b, in_b]):
  eager / peft   form ``kron(A, B)`` [out, in] every call, then a second full GEMM (peft's LoKr
                 ``Linear``, and the same formula written by hand: tests/reference.py)
  compile        torch.compile of the eager formula
  peftkern       ``ops.krona_linear``: ``A · X · Bᵀ`` as two small GEMMs added into the base
                 output (baddbmm), ``[out, in]`` never formed, the intermediate recomputed in backward
Ideal bytes (es = element size): forward reads x and W, writes out: (T·in + in·out + T·out)·es;
backward reads grad, x, W and writes dx: (2·T·out + T·in + in·out)·es (+ the tiny A, B).
Flops: the base GEMM 2·T·in·out per product (forward 1, backward 1 for dx: W frozen) and KronA's
2·T·(in·out_b + in_a·out) forward, about twice that backward (ops/kron.py counts them).

Compacter (an adapter whose down / up weights are PHM sums ``Σ_i A_i ⊗ s_i t_iᵀ``):
  eager     the PHM weights built and the adapter written by hand (tests/reference.py)
  compile   torch.compile of it
  peftkern  ``nn.adapter.Compacter``: the same weights built per step (tiny against [T, d]), then
            the fused ``ops.adapter``
"""

import itertools

import torch

import peftkern
from peftkern.nn.adapter import Compacter
from peftkern.nn.krona import factorization
from tests import reference

from .harness import Case, Skip, input_sets_for, mode_work

FAMILY = "krona"
TARGET = dict(tokens=8192, n_in=4096, n_out=4096, out_a=64, in_a=64)  # 64 x 64 factors
COMPACTER = dict(tokens=16384, d=4096, r=128, phm_dim=4)  # AdapterHub's reduction 32


def _krona_params(n_in, n_out, out_a, in_a, dtype, device):
    g = torch.Generator().manual_seed(0)

    def rnd(*s, scale):
        return (torch.randn(*s, generator=g) * scale).to(device, dtype)

    W = rnd(n_out, n_in, scale=n_in**-0.5)
    b = rnd(n_out, scale=0.1)
    A = rnd(out_a, in_a, scale=in_a**-0.5).requires_grad_()
    B = rnd(n_out // out_a, n_in // in_a, scale=(n_in // in_a) ** -0.5).requires_grad_()
    return W, b, A, B


def _peft_lokr(W, b, A, B, scaling):
    """peft's LoKr Linear over nn.Linear(W, b), its w1 / w2 set to A / B."""
    try:
        import peft
        from peft.tuners.lokr.layer import Linear as LoKrLinear
    except ImportError as e:
        raise Skip(f"peft is not installed ({e})") from None
    base = torch.nn.Linear(W.shape[1], W.shape[0], device=W.device, dtype=W.dtype)
    with torch.no_grad():
        base.weight.copy_(W)
        base.bias.copy_(b)
    base.requires_grad_(False)
    r = max(B.shape)  # full-rank w2
    layer = LoKrLinear(base, "default", peft.LoKrConfig(r=r, alpha=scaling * r), r=r, alpha=scaling * r)
    with torch.no_grad():
        layer.lokr_w1["default"] = torch.nn.Parameter(A.detach().clone())
        layer.lokr_w2["default"] = torch.nn.Parameter(B.detach().clone())
    return layer.to(W.device, W.dtype), [layer.lokr_w1["default"], layer.lokr_w2["default"]]


def _krona_work(provider, mode, T, n_in, n_out, out_a, in_a, dtype, device="cuda", scaling=0.5):
    def make():
        torch.manual_seed(0)
        W, b, A, B = _krona_params(n_in, n_out, out_a, in_a, dtype, device)
        params = [A, B]
        if provider == "peftkern":

            def fn(x):
                return peftkern.ops.krona_linear(x, W, b, A, B, scaling=scaling)
        elif provider == "peft":
            layer, params = _peft_lokr(W, b, A, B, scaling)
            fn = layer
        else:

            def eager(x):
                return reference.krona_linear(x, W, b, A, B, scaling)

            fn = eager if provider == "eager" else torch.compile(eager)
        es = torch.finfo(dtype).bits // 8
        n = input_sets_for((n_in + n_out) * T * es)
        train = mode != "inference"
        xs = [torch.randn(T, n_in, device=device, dtype=dtype).requires_grad_(train) for _ in range(n)]
        grad = torch.randn(T, n_out, device=device, dtype=dtype)
        return mode_work(mode, lambda i: fn(xs[i]), grad, lambda i: [xs[i], *params], n)

    return make


def _krona_ideal(mode, T, n_in, n_out, es):
    fwd = (T * n_in + n_in * n_out + T * n_out) * es
    bwd = (2 * T * n_out + T * n_in + n_in * n_out) * es
    return {"inference": fwd, "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _krona_flops(mode, T, n_in, n_out, out_a, in_a):
    out_b = n_out // out_a
    fwd = 2 * T * n_in * n_out + 2 * T * (n_in * out_b + in_a * n_out)
    bwd = 2 * T * n_in * n_out + 4 * T * (n_in * out_b + in_a * n_out)
    return {"inference": fwd, "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _compacter_work(provider, mode, T, d, r, n, dtype, device="cuda"):
    def make():
        torch.manual_seed(0)
        m = Compacter(d, r, phm_dim=n, scale=0.5, device=device, dtype=dtype)
        with torch.no_grad():  # mid-training values, not the 1e-4 rule
            for t in m.parameters():
                t.normal_(0, 0.3)
        dn, up = m.down, m.up
        params = list(dict.fromkeys(m.parameters()))

        def eager(x):
            return reference.compacter(
                x, dn.phm_rule, dn.phm_left, dn.phm_right, dn.bias, up.phm_rule, up.phm_left, up.phm_right,
                up.bias, scale=0.5,
            )  # fmt: skip

        fn = {"peftkern": m, "eager": eager}.get(provider) or torch.compile(eager)
        es = torch.finfo(dtype).bits // 8
        nsets = input_sets_for(2 * T * d * es)
        train = mode != "inference"
        xs = [torch.randn(T, d, device=device, dtype=dtype).requires_grad_(train) for _ in range(nsets)]
        grad = torch.randn(T, d, device=device, dtype=dtype)
        return mode_work(mode, lambda i: fn(xs[i]), grad, lambda i: [xs[i], *params], nsets)

    return make


def _compacter_ideal(mode, T, d, r, es):
    w = (2 * d * r + d + r) * es
    fwd = 2 * T * d * es + T * r * es + w
    bwd = 3 * T * d * es + T * r * es + 2 * w
    return {"inference": 2 * T * d * es + w, "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _compacter_flops(mode, T, d, r):
    return {"inference": 4, "forward": 4, "backward": 8, "full": 12}[mode] * T * d * r


def _krona_case(T, n_in, n_out, out_a, in_a, dtype, mode, provider, device="cuda"):
    es = torch.finfo(dtype).bits // 8
    return Case(
        FAMILY,
        dict(tokens=T, n_in=n_in, n_out=n_out, out_a=out_a, in_a=in_a),
        dtype,
        mode,
        provider,
        _krona_work(provider, mode, T, n_in, n_out, out_a, in_a, dtype, device),
        _krona_ideal(mode, T, n_in, n_out, es),
        _krona_flops(mode, T, n_in, n_out, out_a, in_a),
    )


def _compacter_case(T, d, r, n, dtype, mode, provider, device="cuda"):
    es = torch.finfo(dtype).bits // 8
    return Case(
        FAMILY,
        dict(tokens=T, d=d, r=r, phm_dim=n),
        dtype,
        mode,
        provider,
        _compacter_work(provider, mode, T, d, r, n, dtype, device),
        _compacter_ideal(mode, T, d, r, es),
        _compacter_flops(mode, T, d, r),
    )


MODES = ("forward", "backward", "full")


def cases(quick=False):
    krona = [(8192, 4096, 4096, 64, 64, torch.bfloat16)]
    if not quick:
        krona += [(8192, 4096, 4096, 64, 64, torch.float32), (4096, 768, 768, 24, 24, torch.bfloat16)]
    for shape, mode, provider in itertools.product(krona, MODES, ("eager", "compile", "peft", "peftkern")):
        yield _krona_case(*shape, mode, provider)
    for mode, provider in itertools.product(MODES, ("eager", "compile", "peftkern")):
        c = COMPACTER
        yield _compacter_case(c["tokens"], c["d"], c["r"], c["phm_dim"], torch.bfloat16, mode, provider)


def cpu_cases():
    """The CPU table: a MiniLM-sized KronA (384 -> 384, peft's factors 16 x 16 of (16, 24)) and
    Compacter (d 384, r 12, phm_dim 4), float32, T 1024."""
    T = 1024
    (out_a, _), (in_a, _) = factorization(384), factorization(384)
    for mode, provider in itertools.product(("forward", "full"), ("eager", "peft", "peftkern")):
        yield _krona_case(T, 384, 384, out_a, in_a, torch.float32, mode, provider, "cpu")
    for mode, provider in itertools.product(("forward", "full"), ("eager", "peftkern")):
        yield _compacter_case(T, 384, 12, 4, torch.float32, mode, provider, "cpu")
