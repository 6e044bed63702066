"""AdapterFusion (Pfeiffer et al. 2021), its second stage: N trained adapters frozen, the fusion's
query / key / value trained, gradients flowing on to x (the layers below).

Providers: eager, as AdapterHub computes it (each adapter on its own: down, act, up, scale, and its
residual output, which the fusion does not use; the up outputs stacked; query, key and value (before
the softmax) as nn.Linear; matmul scores, softmax, matmul mix, residual) vs peftkern.nn.AdapterFusion
(ops.adapter_stack: x read once for all N adapters, each output written once into the stack; value
applied once to the mix).

Pruning (AdapterDrop, Rücklé et al. 2021: a fusion of 8 adapters pruned to the 2 it weights most
keeps its results at +68% inference speed): the rows ``adapters=8 kept=2`` are the fusion over 8
adapters after ``AdapterFusion.keep`` of 2 (both providers then run over the 2 kept ones); the 8 -> 2
speedup is the ``adapters=8`` peftkern row's time over the ``adapters=8 kept=2`` one's.

Cost of one step, T tokens, es = element size: the products dominate,
  flops   forward   4*T*d*r*N (adapters) + 2*T*d*d*(N + 2) (key on N outputs, query, value) + 4*T*N*d
          full      3x the forward, less the adapters' weight gradients (frozen)
  bytes   forward   read x, write out, write the stack and the keys (saved):  (2 + 2N)*T*d*es
          full      + read them back, read grad_out, write dx:                (5 + 4N)*T*d*es
"""

import itertools

import torch
import torch.nn.functional as F

from tests import reference

from .harness import Case, input_sets_for, mode_work

FAMILY = "adapter_fusion"
TOKENS = 16384


class AdapterHubFusion(torch.nn.Module):
    """The eager computation of AdapterHub's fusion layer over N bottleneck adapters."""

    def __init__(self, fusion):
        super().__init__()
        self.fusion = fusion  # a peftkern AdapterFusion: the same parameters, read eagerly

    def forward(self, x):
        f, m = self.fusion, self.fusion.adapters
        act = reference.ACTIVATIONS[m.activation]
        ups = []
        for n in range(m.num_adapters):
            up = F.linear(act(F.linear(x, m.down_weight[n], m.down_bias[n])), m.up_weight[n], m.up_bias[n])
            up = up * m.scale
            _adapter_output = up + x  # noqa: F841  (AdapterHub's adapter returns it; the fusion ignores it)
            ups.append(up)
        stack = torch.stack(ups, dim=-2)
        return reference.adapter_fusion(
            x,
            stack,
            f.query.weight,
            f.query.bias,
            f.key.weight,
            f.key.bias,
            f.value.weight,
            None,
            f.temperature,
        )


def build(provider, d, N, r, dtype, device, seed=0, kept=None):
    """The module of a provider: a fusion over N frozen random adapters, projections trainable;
    `kept` set: the same fusion pruned to its first `kept` adapters (``AdapterFusion.keep``)."""
    import peftkern

    torch.manual_seed(seed)
    fusion = peftkern.nn.AdapterFusion(d, N, r, init="lora", device=device, dtype=dtype)
    with torch.no_grad():
        for p in fusion.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    fusion.adapters.requires_grad_(False)
    if kept is not None:
        fusion.keep(list(range(kept)))
    return AdapterHubFusion(fusion) if provider == "eager" else fusion


def _work(provider, mode, T, d, N, r, dtype, device="cuda", kept=None):
    def make():
        module = build(provider, d, N, r, dtype, device, kept=kept)
        es = torch.finfo(dtype).bits // 8
        n = input_sets_for(2 * T * d * es)
        train = mode != "inference"
        xs = [torch.randn(T, d, device=device, dtype=dtype).requires_grad_(train) for _ in range(n)]
        grad = torch.randn(T, d, device=device, dtype=dtype)
        params = [p for p in module.parameters() if p.requires_grad]
        return mode_work(mode, lambda i: module(xs[i]), grad, lambda i: [xs[i], *params], n)

    return make


def step_cost(mode, T, d, N, r, es):
    """(ideal bytes, flops) of one step; see the module docstring."""
    fwd = 4 * T * d * r * N + 2 * T * d * d * (N + 2) + 4 * T * N * d
    full = 3 * fwd - 2 * T * d * r * N * 2  # no weight gradients for the frozen adapters
    bytes_ = {"inference": 2, "forward": 2 + 2 * N, "full": 5 + 4 * N}[mode] * T * d * es
    return bytes_, {"inference": fwd, "forward": fwd, "full": full}[mode]


def _cases(shapes, modes, dtype, device):
    """shapes: (T, d, r, N, kept or None); both providers in each mode."""
    for (T, d, r, N, kept), mode, provider in itertools.product(shapes, modes, ("eager", "peftkern")):
        ideal, fl = step_cost(mode, T, d, N if kept is None else kept, r, torch.finfo(dtype).bits // 8)
        shape = dict(tokens=T, d=d, r=r, adapters=N, **({} if kept is None else dict(kept=kept)))
        yield Case(
            FAMILY,
            shape,
            dtype,
            mode,
            provider,
            _work(provider, mode, T, d, N, r, dtype, device, kept),
            ideal,
            fl,
        )


def cases(quick=False):
    shapes = [(TOKENS, 768, 48, N, None) for N in (2, 4, 8)]  # BERT-base, AdapterHub's reduction factor 16
    if not quick:
        shapes += [(TOKENS, 4096, 256, N, None) for N in (2, 4, 8)]
    yield from _cases(shapes, ("inference", "forward", "full"), torch.bfloat16, "cuda")
    # AdapterDrop's pruning: the fusion of 8 pruned to 2, at inference and in the training forward
    yield from _cases([(TOKENS, 768, 48, 8, 2)], ("inference", "forward"), torch.bfloat16, "cuda")


def cpu_cases():
    """The CPU table (bench.run without a GPU): a fusion of 4 MiniLM-sized adapters, float32; and the
    fusion of 8 against the same pruned to 2, at inference."""
    T, d, r = 1024, 384, 24
    yield from _cases([(T, d, r, 4, None)], ("inference", "full"), torch.float32, "cpu")
    yield from _cases([(T, d, r, 8, None), (T, d, r, 8, 2)], ("inference",), torch.float32, "cpu")
