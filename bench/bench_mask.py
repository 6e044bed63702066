"""Mask tuning: eager `F.linear(x, W * STE(S > t).to(W.dtype))` (tests/reference.py: a
straight-through autograd function, as the papers' code does) vs torch.compile of it vs
peftkern.masked_linear. bf16 weight, float32 scores, x requires grad.

Ideal bytes per step (es = 2, W = in*out):
  forward    read x, W (2 B), S (4 B); write out                   2*T*in + 6*W + 2*T*out
  backward   read grad_out, x, W, the packed mask; write dx and d scores (4 B)
                                                                   2*T*out + 4*T*in + 6*W + W/8
  inference  read x, W, S; write out                               2*T*in + 6*W + 2*T*out
At large T the two products dominate (2*T*in*out flops each way); at decode sizes it is bytes.

Packed inference (the serving path): masked_linear_packed vs eager (unpack the bits, materialise
W * m, then linear) vs a plain linear with the unmasked W (the floor: it reads W alone).

Predicted occupancy (sm_90, bench/results/static_sm90.md; 8 warps per block):
mask_apply 4 blocks of 256
threads (32 warps), mask_ste 8 (64 warps, full); the packed mat-vec 2 blocks of 8 warps (98
registers) with 32 KB of x staged at 16 tokens.
"""

import itertools

import torch
import torch.nn.functional as F

import peftkern
from tests import reference

from .harness import Case, Work, input_sets_for, mode_work

FAMILY = "mask"
THRESHOLD = 0.0


def eager_masked(x, w, b, s):
    return reference.masked_linear(x, w, b, s, THRESHOLD)


def fused_masked(x, w, b, s):
    return peftkern.ops.masked_linear(x, w, b, s, threshold=THRESHOLD)


_compiled = torch.compile(eager_masked)


def _work(provider, mode, T, n_in, n_out, dtype, device="cuda"):
    fn = {"eager": eager_masked, "compile": _compiled, "peftkern": fused_masked}[provider]

    def make():
        torch.manual_seed(0)
        w = torch.randn(n_out, n_in, device=device, dtype=dtype) * n_in**-0.5
        b = torch.randn(n_out, device=device, dtype=dtype) * 0.1
        s = torch.randn(n_out, n_in, device=device).requires_grad_(mode != "inference")
        n = input_sets_for(2 * T * (n_in + n_out))
        train = mode != "inference"
        xs = [torch.randn(T, n_in, device=device, dtype=dtype).requires_grad_(train) for _ in range(n)]
        grad = torch.randn(T, n_out, device=device, dtype=dtype)
        return mode_work(mode, lambda i: fn(xs[i], w, b, s), grad, lambda i: (xs[i], s), n)

    return make


def _ideal(mode, T, n_in, n_out):
    w = n_in * n_out
    fwd = 2 * T * n_in + 6 * w + 2 * T * n_out + w // 8
    bwd = 2 * T * n_out + 2 * T * n_in + 2 * w + w // 8 + 2 * T * n_in + 4 * w
    return {"inference": fwd - w // 8, "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _flops(mode, T, n_in, n_out):
    return {"inference": 2, "forward": 2, "backward": 4, "full": 6}[mode] * T * n_in * n_out


def _packed_work(provider, T, n_in, n_out, dtype, device="cuda"):
    def make():
        torch.manual_seed(0)
        w = torch.randn(n_out, n_in, device=device, dtype=dtype) * n_in**-0.5
        b = torch.randn(n_out, device=device, dtype=dtype) * 0.1
        bits = peftkern.ops.pack_mask(torch.randn(n_out, n_in, device=device), THRESHOLD)
        n = input_sets_for(2 * n_in * n_out)  # the weight is what must not sit in L2
        ws = [w] + [w.clone() for _ in range(n - 1)]
        x = torch.randn(T, n_in, device=device, dtype=dtype)
        shifts = torch.arange(32, device=device, dtype=torch.int32)

        def eager(i):  # unpack, materialise W * m, then linear
            keep = ((bits.unsqueeze(-1) >> shifts) & 1).view(n_out, -1)[:, :n_in].to(dtype)
            return F.linear(x, ws[i] * keep, b)

        step = {
            "eager": eager,
            "plain-linear": lambda i: F.linear(x, ws[i], b),
            "peftkern": lambda i: peftkern.ops.masked_linear_packed(x, ws[i], b, bits),
        }[provider]

        def run(i):
            with torch.no_grad():
                return step(i)

        return Work(run, None, n)

    return make


def cases(quick=False):
    dtype = torch.bfloat16
    sizes = ((768, 768), (4096, 4096), (4096, 14336))
    tokens = (1, 16, 512, 2048, 8192)
    if quick:
        shapes = [(2048, 4096, 4096), (16, 4096, 4096), (1, 4096, 4096)]
    else:
        shapes = [(T, i, o) for T, (i, o) in itertools.product(tokens, sizes)]
    for (T, n_in, n_out), mode, provider in itertools.product(
        shapes, ("forward", "backward", "full", "inference"), ("eager", "compile", "peftkern")
    ):
        yield Case(
            FAMILY,
            dict(tokens=T, n_in=n_in, n_out=n_out),
            dtype,
            mode,
            provider,
            _work(provider, mode, T, n_in, n_out, dtype),
            _ideal(mode, T, n_in, n_out),
            _flops(mode, T, n_in, n_out),
        )
    packed = (
        [(1, 4096, 4096), (16, 4096, 4096)]
        if quick
        else [(T, i, o) for T, (i, o) in itertools.product((1, 4, 16, 64), sizes)]
    )
    for (T, n_in, n_out), provider in itertools.product(packed, ("eager", "plain-linear", "peftkern")):
        ideal = 2 * n_in * n_out + n_in * n_out // 8 + 2 * T * (n_in + n_out)
        yield Case(
            "mask-packed",
            dict(tokens=T, n_in=n_in, n_out=n_out),
            dtype,
            "inference",
            provider,
            _packed_work(provider, T, n_in, n_out, dtype),
            ideal,
            2 * T * n_in * n_out,
        )


def cpu_cases():
    """The CPU table (bench.run without a GPU): a MiniLM-sized masked linear (384 -> 1536, float32)
    against eager; the packed mask at decode sizes against eager and the plain linear."""
    dtype, n_in, n_out = torch.float32, 384, 1536
    for mode, provider in itertools.product(("full", "inference"), ("eager", "peftkern")):
        yield Case(
            FAMILY,
            dict(tokens=1024, n_in=n_in, n_out=n_out),
            dtype,
            mode,
            provider,
            _work(provider, mode, 1024, n_in, n_out, dtype, "cpu"),
            _ideal(mode, 1024, n_in, n_out),
            _flops(mode, 1024, n_in, n_out),
        )
    for T, provider in itertools.product((1, 16), ("eager", "plain-linear", "peftkern")):
        yield Case(
            "mask-packed",
            dict(tokens=T, n_in=n_in, n_out=n_out),
            dtype,
            "inference",
            provider,
            _packed_work(provider, T, n_in, n_out, dtype, "cpu"),
            4 * n_in * n_out + n_in * n_out // 8 + 4 * T * (n_in + n_out),
            2 * T * n_in * n_out,
        )
