"""Many adapters in one batch, each token its own: the eager loop over adapters a user writes
(`reference.adapter_multi`: a boolean mask per adapter, gather, adapter, scatter) vs
peftkern.ops.adapter_multi (device-side grouping, one fused kernel).

Ideal bytes per step (es = element size, W = L adapters' weights and biases):
  inference  read x, write out                                   2*T*d*es + W
  forward    + write the pre-activation z (saved for backward)   2*T*d*es + T*r*es + W
  backward   read grad_out and x, write dx, read z, write dW     3*T*d*es + T*r*es + 2W
  full       forward + backward
At the target (T 16k, d 4096, r 64, L 64, bf16) W is 67 MB against 134 MB for x: the weights are a
third of the inference floor.
"""

import itertools

import torch

from tests import reference

from .harness import Case, input_sets_for, mode_work

FAMILY = "adapter_multi"
TARGET = dict(tokens=16384, d=4096, r=64)  # the shape (bf16), at 16 and 64 adapters
NO_ADAPTER = 0.1  # share of tokens with id -1 (served by the base model alone)


def make_weights(L, d, r, dtype, device, generator=None):
    """Random non-zero adapters (mid-training, not at init), requiring grad."""
    shapes = dict(w_down=(L, r, d), b_down=(L, r), w_up=(L, d, r), b_up=(L, d))
    return {
        n: (torch.randn(s, generator=generator) * s[-1] ** -0.5).to(device, dtype).requires_grad_()
        for n, s in shapes.items()
    }


def make_ids(T, L, device, generator=None):
    ids = torch.randint(0, L, (T,), generator=generator)
    ids[torch.rand(T, generator=generator) < NO_ADAPTER] = -1
    return ids.to(device)


def forward_fn(provider, weights, scale=0.5):
    """run(x, ids) of a provider."""
    import peftkern

    w = [weights[n] for n in ("w_down", "b_down", "w_up", "b_up")]
    if provider == "eager":
        return lambda x, ids: reference.adapter_multi(x, *w, ids, "gelu", scale)
    return lambda x, ids: peftkern.ops.adapter_multi(x, *w, ids, scale=scale)


def _work(provider, mode, T, d, r, L, dtype, device="cuda"):
    def make():
        g = torch.Generator().manual_seed(0)
        weights = make_weights(L, d, r, dtype, device, g)
        run = forward_fn(provider, weights)
        es = torch.finfo(dtype).bits // 8
        n = input_sets_for(2 * T * d * es)
        train = mode != "inference"
        xs = [torch.randn(T, d, generator=g).to(device, dtype).requires_grad_(train) for _ in range(n)]
        ids = [make_ids(T, L, device, g) for _ in range(n)]
        grad = torch.randn(T, d, generator=g).to(device, dtype)
        return mode_work(mode, lambda i: run(xs[i], ids[i]), grad, lambda i: [xs[i], *weights.values()], n)

    return make


def ideal_bytes(mode, T, d, r, L, es):
    w = L * (2 * d * r + d + r) * es
    fwd = 2 * T * d * es + T * r * es + w
    bwd = 3 * T * d * es + T * r * es + 2 * w
    return {"inference": 2 * T * d * es + w, "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def flops(mode, T, d, r):
    return {"inference": 4, "forward": 4, "backward": 8, "full": 12}[mode] * T * d * r


def cases(quick=False):
    T, d, r = TARGET["tokens"], TARGET["d"], TARGET["r"]
    shapes = [(T, d, r, L, torch.bfloat16) for L in (16, 64)]
    if not quick:
        shapes += [(4096, 768, 16, L, dt) for L in (4, 16, 64) for dt in (torch.bfloat16, torch.float32)]
    for (T, d, r, L, dtype), mode, provider in itertools.product(
        shapes, ("inference", "forward", "full"), ("eager", "peftkern")
    ):
        es = torch.finfo(dtype).bits // 8
        yield Case(
            FAMILY,
            dict(tokens=T, d=d, r=r, adapters=L),
            dtype,
            mode,
            provider,
            _work(provider, mode, T, d, r, L, dtype),
            ideal_bytes(mode, T, d, r, L, es),
            flops(mode, T, d, r),
        )


def cpu_cases():
    """The CPU table (bench.run without a GPU): 8 MiniLM-sized adapters, one per token, float32."""
    T, d, r, L, dtype = 1024, 384, 16, 8, torch.float32
    for mode, provider in itertools.product(("inference", "full"), ("eager", "peftkern")):
        yield Case(
            FAMILY,
            dict(tokens=T, d=d, r=r, adapters=L),
            dtype,
            mode,
            provider,
            _work(provider, mode, T, d, r, L, dtype, "cpu"),
            ideal_bytes(mode, T, d, r, L, 4),
            flops(mode, T, d, r),
        )
