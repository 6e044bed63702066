"""Bottleneck adapter: eager `x + s * up(act(down(x)))` vs torch.compile of it vs peftkern.

Ideal bytes per step (es = element size, W = weights and biases):
  inference  read x, write out                                   2*T*d*es + W
  forward    + write the pre-activation z (saved for backward)   2*T*d*es + T*r*es + W
  backward   read grad_out and x, write dx, read z, write dW     3*T*d*es + T*r*es + 2W
  full       forward + backward

Predicted occupancy (sm_90, bench/results/static_sm90.md; 4 warps per block):
at the target (bf16, r 64 -> RP 64)
the forward kernel runs 3 blocks per SM (shared memory, 63.5 KB each), the rows backward 3 and the
columns backward 3 (registers: 164 and 145 per thread): 12 warps per SM, 19% of the 64 the SM holds.
"""

import itertools

import torch

import peftkern
from tests import reference

from .harness import Case, input_sets_for, mode_work

FAMILY = "adapter"
TARGET = dict(tokens=16384, d=4096, r=64)  # the target shape (bf16)


def _modules(d, r, dtype, device, scale=0.5):
    eager = reference.EagerAdapter(d, r, scale).to(device, dtype)
    with torch.no_grad():  # random non-zero weights (an adapter mid-training, not at init)
        for p in eager.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    fused = peftkern.nn.Adapter(d, r, scale=scale).to(device, dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def _work(provider, mode, T, d, r, dtype, device="cuda"):
    def make():
        torch.manual_seed(0)
        eager, fused = _modules(d, r, dtype, device)
        module = {"eager": eager, "compile": torch.compile(eager), "peftkern": fused}[provider]
        es = torch.finfo(dtype).bits // 8
        n = input_sets_for(2 * T * d * es)
        train = mode != "inference"
        xs = [torch.randn(T, d, device=device, dtype=dtype).requires_grad_(train) for _ in range(n)]
        grad = torch.randn(T, d, device=device, dtype=dtype)
        return mode_work(mode, lambda i: module(xs[i]), grad, lambda i: [xs[i], *module.parameters()], n)

    return make


def _ideal(mode, T, d, r, es):
    w = (2 * d * r + d + r) * es
    fwd = 2 * T * d * es + T * r * es + w
    bwd = 3 * T * d * es + T * r * es + 2 * w
    return {"inference": 2 * T * d * es + w, "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _flops(mode, T, d, r):
    return {"inference": 4, "forward": 4, "backward": 8, "full": 12}[mode] * T * d * r


def cases(quick=False):
    if quick:
        shapes = [
            (TARGET["tokens"], TARGET["d"], TARGET["r"], torch.bfloat16),
            (4096, 768, 16, torch.bfloat16),
            (16384, 4096, 64, torch.float32),
        ]
    else:
        shapes = [
            (T, d, r, dt)
            for dt, T, d, r in itertools.product(
                (torch.bfloat16, torch.float32), (4096, 16384, 65536), (768, 4096), (16, 64, 256)
            )
        ]
    for (T, d, r, dtype), mode, provider in itertools.product(
        shapes, ("forward", "backward", "full", "inference"), ("eager", "compile", "peftkern")
    ):
        es = torch.finfo(dtype).bits // 8
        yield Case(
            FAMILY,
            dict(tokens=T, d=d, r=r),
            dtype,
            mode,
            provider,
            _work(provider, mode, T, d, r, dtype),
            _ideal(mode, T, d, r, es),
            _flops(mode, T, d, r),
        )


def cpu_cases():
    """The CPU table (bench.run without a GPU): a MiniLM-sized adapter, float32, against eager."""
    T, d, r, dtype = 1024, 384, 64, torch.float32
    for mode, provider in itertools.product(("forward", "full", "inference"), ("eager", "peftkern")):
        yield Case(
            FAMILY,
            dict(tokens=T, d=d, r=r),
            dtype,
            mode,
            provider,
            _work(provider, mode, T, d, r, dtype, "cpu"),
            _ideal(mode, T, d, r, 4),
            _flops(mode, T, d, r),
        )
