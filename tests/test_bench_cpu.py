"""The CPU table (`make bench` without a GPU): every family gives CPU cases, the harness times them
on the CPU and labels the table, a peer library's failure is that provider's row, and bench.run
exits 0 with its files written."""

import importlib

import pytest
import torch

from bench import harness, run


def test_every_family_has_cpu_cases():
    for fam in run.families():
        mod = importlib.import_module(f"bench.bench_{fam}")
        cases = list(mod.cpu_cases())
        assert cases, fam
        assert {c.dtype for c in cases} == {torch.float32}, fam
        assert any(c.provider == "peftkern" for c in cases), fam
        baselines = {c.provider for c in cases} - {"peftkern"}
        assert baselines & {"eager", "peft"}, (fam, baselines)


def _case(make, provider="peftkern"):
    return harness.Case("tiny", dict(n=8), torch.float32, "forward", provider, make, 64.0)


def test_cpu_timing_and_label():
    x = torch.randn(64, 64)
    rows = harness.run_cases(
        [_case(lambda: harness.Work(lambda i: x @ x)), _case(lambda: harness.Work(lambda i: x @ x), "eager")],
        copy_bw=1e10,
        log=lambda s: None,
        device="cpu",
    )
    assert all(r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in rows)
    assert all(r["peak_mem_mb"] is None for r in rows)
    assert rows[0]["speedup_vs_eager"] == pytest.approx(rows[1]["median_ms"] / rows[0]["median_ms"])
    meta = harness.run_meta(1e10, "cpu")
    assert meta["gpu"].startswith("CPU (") and f"{torch.get_num_threads()} threads" in meta["gpu"]
    table = harness.markdown_table(rows, meta)
    assert "# peftkern benchmarks: CPU (" in table and "peak memory is not measured on the CPU" in table


def test_peer_failure_is_its_row():
    def make():
        raise harness.ProviderFailed("ValueError: Model does not support past key values")

    (row,) = harness.run_cases([_case(make, "peft")], copy_bw=1e10, log=lambda s: None, device="cpu")
    assert row["skipped"] == "fails: ValueError: Model does not support past key values"
    assert "| skipped: fails: ValueError: Model does not support past key values |" in harness.markdown_table(
        [row], harness.run_meta(1e10, "cpu")
    )


def test_peft_prefix_on_bert_is_reported_as_failing(monkeypatch):
    """bench_model's peft provider turns peft's own exception into ProviderFailed; peftkern's and
    eager's exceptions are not caught."""
    from bench import bench_model

    def broken(*args):
        raise ValueError("Model does not support past key values which are required for prefix tuning.")

    wrapped = bench_model._peer_failures(broken)
    with pytest.raises(harness.ProviderFailed, match="ValueError: Model does not support past key values"):
        wrapped()
    monkeypatch.setattr(bench_model, "build_model", broken)
    with pytest.raises(harness.ProviderFailed):
        bench_model._work("bert", bench_model.MINILM, "prefix", "peft", 2, 8, torch.float32, "cpu")()
    with pytest.raises(ValueError):
        bench_model._work("bert", bench_model.MINILM, "prefix", "peftkern", 2, 8, torch.float32, "cpu")()


def test_bench_run_on_the_cpu_exits_0_and_writes(tmp_path, capsys):
    assert (
        run.main(["--device", "cpu", "--family", "adapter", "--mode", "inference", "--out", str(tmp_path)])
        == 0
    )
    written = sorted(p.suffix for p in tmp_path.iterdir())
    assert {".json", ".csv", ".md"} <= set(written)
    md = next(tmp_path.glob("*.md")).read_text()
    assert "CPU (" in md and "| adapter | tokens=1024 d=384 r=64 | float32 | inference | peftkern |" in md
