"""bench/bench_adapter_multi.py and bench/bench_adapter_fusion.py on the CPU with tiny shapes, so
the GPU run does not fail on its first call: both providers of each compute the same thing, and
the cases carry their costs."""

import torch

from bench import bench_adapter_fusion, bench_adapter_multi

from .conftest import assert_close


def test_adapter_multi_providers_agree():
    g = torch.Generator().manual_seed(0)
    weights = bench_adapter_multi.make_weights(5, 24, 4, torch.float64, "cpu", g)
    x = torch.randn(40, 24, dtype=torch.float64, generator=g, requires_grad=True)
    ids = bench_adapter_multi.make_ids(40, 5, "cpu", g)
    assert (ids == -1).any() and (ids >= 0).any()
    outs = {p: bench_adapter_multi.forward_fn(p, weights)(x, ids) for p in ("eager", "peftkern")}
    assert_close(outs["peftkern"], outs["eager"], torch.float64)
    grads = {p: torch.autograd.grad(outs[p].sum(), [x, *weights.values()]) for p in outs}
    for a, b in zip(grads["peftkern"], grads["eager"]):
        assert_close(a, b, torch.float64)


def test_adapter_fusion_providers_agree():
    mods = {p: bench_adapter_fusion.build(p, 32, 3, 8, torch.float64, "cpu") for p in ("eager", "peftkern")}
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    outs = {p: m(x) for p, m in mods.items()}
    assert_close(outs["peftkern"], outs["eager"], torch.float64)
    for p, m in mods.items():
        trainable = [t for t in m.parameters() if t.requires_grad]
        assert len(trainable) == 5  # query weight and bias, key weight and bias, value weight
        grads = torch.autograd.grad(outs[p].sum(), [x, *trainable])
        if p == "eager":
            eager_grads = grads
        else:
            ours = grads
    names = ["x", "query.weight", "query.bias", "key.weight", "key.bias", "value.weight"]
    for name, a, b in zip(names, ours, eager_grads):
        if name == "key.bias":  # no gradient in exact arithmetic (the same shift of every score)
            assert a.abs().max() < 1e-12 and b.abs().max() < 1e-12
        else:
            assert_close(a, b, torch.float64, f"grad {name}")


def test_cases_carry_their_costs():
    for mod in (bench_adapter_multi, bench_adapter_fusion):
        cases = list(mod.cases(quick=True))
        assert {c.provider for c in cases} == {"eager", "peftkern"}
        assert {c.mode for c in cases} == {"inference", "forward", "full"}
        assert all(c.ideal_bytes > 0 and c.flops > 0 for c in cases)
    multi = [c for c in bench_adapter_multi.cases(quick=True)]
    assert {c.shape["adapters"] for c in multi} == {16, 64}
    assert all(c.shape["tokens"] == 16384 and c.shape["d"] == 4096 and c.shape["r"] == 64 for c in multi)
    fusion = [c for c in bench_adapter_fusion.cases(quick=True)]
    assert {c.shape["adapters"] for c in fusion} == {2, 4, 8}
    # the inference floor: x read, out written, the adapters' weights once
    T, d, r, L, es = 16384, 4096, 64, 64, 2
    assert (
        bench_adapter_multi.ideal_bytes("inference", T, d, r, L, es)
        == 2 * T * d * es + L * (2 * d * r + d + r) * es
    )
