"""pytest-benchmark entry: `pytest bench/ --benchmark-only` times the quick cases of every family."""

import glob
import importlib
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = []
if torch.cuda.is_available():
    for path in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        mod = importlib.import_module(f"bench.{os.path.basename(path)[:-3]}")
        CASES += [c for c in mod.cases(quick=True) if c.mode != "inference"]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"{c.family}-{c.shape_str}-{c.dtype}-{c.mode}-{c.provider}".replace(" ", ",")
)
def test_benchmark(benchmark, case):
    work = case.make()

    def setup():
        if work.prepare:
            work.prepare(0)
        torch.cuda.synchronize()

    def step():
        work.step(0)
        torch.cuda.synchronize()

    benchmark.extra_info.update(ideal_bytes=case.ideal_bytes, flops=case.flops)
    benchmark.pedantic(step, setup=setup, rounds=20, warmup_rounds=3)
