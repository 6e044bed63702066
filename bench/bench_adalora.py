"""AdaLoRA: peft's SVDLinear formula in eager PyTorch (tests/reference.adalora_linear:
``base(x) + (x @ (A * E).T @ B.T) * alpha / (ranknum + 1e-5)``) vs torch.compile of it vs peftkern
(``AdaptedLinear.add_adalora``: Λ folded into A, the fused LoRA op).

Shapes: T 8192, 4096 -> 4096, init_r 12, either every rank kept ("kept=12") or 8 kept after the final
rank pattern ("kept=8": peft still computes all 12 ranks with 4 zero E, peftkern gathers the 8 kept
rows of A' and columns of B: the compact path). Frozen base weight, x requires grad. Ideal bytes are
the LoRA step's (bench_lora._ideal) at the kept rank: the base product dominates, and what peftkern
saves is the update's extra passes and the pruned ranks' work.
"""

import itertools

import torch
from torch import nn

from peftkern.nn import AdaptedLinear
from tests import reference

from .bench_lora import _flops, _ideal
from .harness import Case, input_sets_for, mode_work

FAMILY = "adalora"
ALPHA = 32.0


class EagerAdaLoRA(nn.Module):
    """What peft's SVDLinear computes (no dropout), the formula of tests/reference.py."""

    def __init__(self, n_in, n_out, r):
        super().__init__()
        self.base = nn.Linear(n_in, n_out).requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, n_in) * 0.02)
        self.lora_E = nn.Parameter(torch.randn(r, 1))
        self.lora_B = nn.Parameter(torch.randn(n_out, r) * 0.02)
        self.r = r

    def forward(self, x):
        b = self.base
        return reference.adalora_linear(
            x, b.weight, b.bias, self.lora_A, self.lora_E, self.lora_B, ALPHA, self.r
        )


def _module(provider, n_in, n_out, r, kept, dtype, device):
    eager = EagerAdaLoRA(n_in, n_out, r).to(device, dtype)
    keep = torch.arange(r, device=device) < kept
    with torch.no_grad():
        eager.lora_E.masked_fill_(~keep[:, None], 0.0)  # the pruned ranks, as peft's mask leaves them
    if provider == "eager":
        return eager
    if provider == "compile":
        return torch.compile(eager)
    fused = AdaptedLinear.adapt(nn.Linear(n_in, n_out, device=device, dtype=dtype).requires_grad_(False))
    fused.add_adalora("a", r, lora_alpha=ALPHA)
    fused._peftkern_active = ("a",)
    with torch.no_grad():
        fused.weight.copy_(eager.base.weight)
        fused.bias.copy_(eager.base.bias)
        for a in ("lora_A", "lora_E", "lora_B"):
            getattr(fused, a)["a"].copy_(getattr(eager, a))
    if kept < r:
        fused.set_rank_pattern("a", keep, final=True)
    return fused


def _work(provider, mode, T, n_in, n_out, r, kept, dtype, device="cuda"):
    def make():
        torch.manual_seed(0)
        module = _module(provider, n_in, n_out, r, kept, dtype, device).train(mode != "inference")
        es = torch.finfo(dtype).bits // 8
        n = input_sets_for((T * n_in + T * n_out) * es) if device == "cuda" else 1
        train = mode != "inference"
        xs = [torch.randn(T, n_in, device=device, dtype=dtype).requires_grad_(train) for _ in range(n)]
        grad = torch.randn(T, n_out, device=device, dtype=dtype)
        return mode_work(mode, lambda i: module(xs[i]), grad, lambda i: [xs[i], *module.parameters()], n)

    return make


def _cases(shapes, modes, providers, dtype, device):
    es = torch.finfo(dtype).bits // 8
    for (T, n_in, n_out, r, kept), mode, provider in itertools.product(shapes, modes, providers):
        yield Case(
            FAMILY,
            dict(tokens=T, n_in=n_in, n_out=n_out, r=r, kept=kept),
            dtype,
            mode,
            provider,
            _work(provider, mode, T, n_in, n_out, r, kept, dtype, device),
            _ideal(mode, T, n_in, n_out, kept, es),
            _flops(mode, T, n_in, n_out, kept),
        )


def cases(quick=False):
    shapes = [(8192, 4096, 4096, 12, 8), (8192, 4096, 4096, 12, 12)]
    if not quick:
        shapes += [(2048, 4096, 4096, 12, 8), (32768, 4096, 4096, 12, 8), (8192, 4096, 14336, 12, 8)]
    modes = ("forward", "backward", "full", "inference")
    yield from _cases(shapes, modes, ("eager", "compile", "peftkern"), torch.bfloat16, "cuda")


def cpu_cases():
    """The CPU table: a MiniLM-sized layer (384 -> 384, T 1024, init_r 12, 8 kept or all), float32,
    eager vs peftkern."""
    shapes = [(1024, 384, 384, 12, 8), (1024, 384, 384, 12, 12)]
    yield from _cases(shapes, ("full", "inference"), ("eager", "peftkern"), torch.float32, "cpu")
