"""(IA)³: eager as peft computes it (tests/reference.py: ``F.linear(x, W, b) * l`` for the keys and
values, ``F.linear(x * l, W, b)`` for the FFN's down projection) vs torch.compile of it vs
peftkern.ops.ia3_linear. bf16, frozen W and b, x and l require grad.

Bytes beyond the GEMMs per step (e = 2, W = in * out; the ops/ia3.py docstring's table):
  output scale  forward   eager 2*T*out*e (the multiply)      peftkern 2*W*e (fold l into W's rows)
                backward  eager 5*T*out*e (g*l, sum(g*z))     peftkern 2*W*e (fold) + 2*T*out*e (d l)
  input scale   forward   eager 2*T*in*e (x*l)                peftkern 2*W*e (fold l into W's columns)
                backward  eager 6*T*in*e (dh*l, sum(x*dh))    peftkern 3*T*in*e (one pass: dx in place, d l)
Memory: for the output scale eager autograd keeps the unscaled z [T, out] for d l; peftkern keeps
the op's output instead, which the next op holds anyway. The ideal bytes below are the GEMMs'
operands plus peftkern's passes.
"""

import itertools

import torch

import peftkern
from tests import reference

from .harness import Case, input_sets_for, mode_work

FAMILY = "ia3"


def eager_ia3(x, w, b, vec, scale_input):
    return reference.ia3_linear(x, w, b, vec, scale_input)


def fused_ia3(x, w, b, vec, scale_input):
    return peftkern.ops.ia3_linear(x, w, b, vec, scale_input=scale_input)


_compiled = torch.compile(eager_ia3)


def _work(provider, mode, T, n_in, n_out, scale_input, dtype, device="cuda"):
    fn = {"eager": eager_ia3, "compile": _compiled, "peftkern": fused_ia3}[provider]

    def make():
        torch.manual_seed(0)
        w = torch.randn(n_out, n_in, device=device, dtype=dtype) * n_in**-0.5
        b = torch.randn(n_out, device=device, dtype=dtype) * 0.1
        train = mode != "inference"
        vec = (torch.rand(n_in if scale_input else n_out, device=device, dtype=dtype) + 0.5).requires_grad_(
            train
        )
        n = input_sets_for(2 * T * (n_in + n_out))
        xs = [torch.randn(T, n_in, device=device, dtype=dtype).requires_grad_(train) for _ in range(n)]
        grad = torch.randn(T, n_out, device=device, dtype=dtype)
        return mode_work(mode, lambda i: fn(xs[i], w, b, vec, scale_input), grad, lambda i: (xs[i], vec), n)

    return make


def _ideal(mode, T, n_in, n_out, scale_input, es=2):
    w = n_in * n_out
    gemm_fwd = T * n_in + w + T * n_out
    gemm_bwd = T * n_out + w + T * n_in
    if scale_input:
        fwd, bwd = gemm_fwd + 2 * w, gemm_bwd + 3 * T * n_in
    else:
        fwd, bwd = gemm_fwd + 2 * w, gemm_bwd + 2 * w + 2 * T * n_out
    return es * {"inference": fwd, "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _flops(mode, T, n_in, n_out):
    return {"inference": 2, "forward": 2, "backward": 2, "full": 4}[mode] * T * n_in * n_out


def _case(T, n_in, n_out, scale_input, mode, provider, dtype, device="cuda"):
    return Case(
        FAMILY,
        dict(tokens=T, n_in=n_in, n_out=n_out, scale="input" if scale_input else "output"),
        dtype,
        mode,
        provider,
        _work(provider, mode, T, n_in, n_out, scale_input, dtype, device),
        _ideal(mode, T, n_in, n_out, scale_input, torch.empty(0, dtype=dtype).element_size()),
        _flops(mode, T, n_in, n_out),
    )


def cases(quick=False):
    dtype = torch.bfloat16
    # keys / values (output scale, 4096 -> 4096) and the FFN down projection (input scale, 16384 -> 4096)
    shapes = [(8192, 4096, 4096, False), (8192, 16384, 4096, True)]
    if not quick:
        shapes += [
            (T, i, o, s) for T in (1, 16, 2048) for i, o, s in ((4096, 4096, False), (16384, 4096, True))
        ]
    for (T, n_in, n_out, s), mode, provider in itertools.product(
        shapes, ("forward", "backward", "full"), ("eager", "compile", "peftkern")
    ):
        yield _case(T, n_in, n_out, s, mode, provider, dtype)


def cpu_cases():
    """The CPU table: MiniLM-sized (IA)³ sites, float32: a value projection 384 -> 384 and the FFN
    down projection 1536 -> 384, 1024 tokens, against eager."""
    for (n_in, n_out, s), mode, provider in itertools.product(
        ((384, 384, False), (1536, 384, True)), ("forward", "full"), ("eager", "peftkern")
    ):
        yield _case(1024, n_in, n_out, s, mode, provider, torch.float32, "cpu")
