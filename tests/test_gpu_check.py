"""The GPU day's tooling, on the CPU: scripts/gpu_summary.py's report from planted logs, the targets'
grading (bench/targets.py), scripts/static_budget.py's parsing and occupancy arithmetic, and the
--case-timeout of tests/conftest.py. (scripts/gpu_check.sh --dry-run itself runs in CI.)"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_summary  # noqa: E402
import static_budget  # noqa: E402

from bench import targets  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_adapter" name="test_a[cuda]"/>
<testcase classname="tests.test_adapter" name="test_b[cuda]">
<failure message="AssertionError: out: relative error 0.5">x</failure></testcase>
<testcase classname="tests.test_mask" name="test_c[cuda]"><skipped message="no"/></testcase>
<testcase classname="tests.test_cuda_graphs" name="test_d"/>
</testsuite></testsuites>"""


def _row(provider, median, mem=100.0, mode="forward", **extra):
    return dict(
        family="adapter",
        shape="tokens=16384 d=4096 r=64",
        dtype="bfloat16",
        mode=mode,
        provider=provider,
        median_ms=median,
        peak_mem_mb=mem,
        frac_copy_bw=0.65,
        **extra,
    )


def test_summary_from_planted_logs(tmp_path):
    logs = tmp_path / "logs"
    (logs / "bench").mkdir(parents=True)
    (tmp_path / "pytest.xml").write_text(JUNIT)
    (logs / "stages.tsv").write_text(
        "stage\tbox_s\ttook_s\tstatus\nbuild\t150\t97\tok\ntests\t150\t150\tout of time\n"
    )
    (logs / "sanitize-memcheck.log").write_text(
        "3 passed in 9s\n========= ERROR SUMMARY: 3 errors\nexit status 1\n"
    )
    (logs / "sanitize-racecheck.log").write_text("========= ERROR SUMMARY: 0 errors\nexit status 124\n")
    rows = [_row("eager", 3.0), _row("peftkern", 2.0)]
    (logs / "bench" / "H100_2026-12-07_quick.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    (logs / "ctest.log").write_text("100% tests passed, 0 tests failed out of 3\n")
    md = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "gpu_summary.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "| build | 150 | 97 | ok |" in md and "| tests | 150 | 150 | out of time |" in md
    assert (
        "| adapter | 1 | 1 | 0 |" in md
        and "| mask | 0 | 0 | 1 |" in md
        and "| cross-family | 1 | 0 | 0 |" in md
    )
    assert "| all | 2 | 1 | 1 |" in md
    assert "tests.test_adapter::test_b[cuda]: AssertionError: out: relative error 0.5" in md
    assert "| memcheck | 3 | 1 | 3 passed in 9s |" in md
    assert "| racecheck | 0 | out of time |" in md and "| synccheck | | not run | |" in md
    assert "100% tests passed, 0 tests failed out of 3" in md
    # 3.0 / 2.0 = 1.50 >= 1.5 met; 65% copy bandwidth < 70% not met; no full rows
    assert "| 14 | adapter forward >= 1.5x eager | 1.50 | 1.50 | yes |" in md
    assert "| 14 | adapter forward >= 70% of copy bandwidth | 0.65 | 0.70 | **no** |" in md
    assert "| 14 | adapter full >= 1.4x eager |  | 1.40 | no peftkern row" in md


def test_grade_memory_and_missing_baseline():
    rows = [_row("eager", 3.0, mem=300.0, mode="full"), _row("peftkern", 2.5, mem=200.0, mode="full")]
    graded = {g["target"]: g for g in targets.grade(rows)}
    assert graded["adapter full >= 1.4x eager"]["figure"] == pytest.approx(1.2)
    assert graded["adapter full >= 1.4x eager"]["met"] is False
    assert graded["adapter full >= torch.compile"]["figure"] is None
    assert graded["adapter full >= torch.compile"]["note"] == "no compile row"
    assert "skipped" not in graded and len(graded) == len(targets.TARGETS)


def test_summary_families_cover_every_test_file():
    """Each family's test files exist, so a rename cannot silently move its tests to cross-family."""
    for stems in gpu_summary.FAMILIES.values():
        for stem in stems:
            assert os.path.exists(os.path.join(ROOT, "tests", stem + ".py")), stem


PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kILi64EEvv' for 'sm_90'
ptxas info    : Function properties for _Z1kILi64EEvv
    24 bytes stack frame, 20 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 640 bytes smem, 400 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'
ptxas info    : Function properties for _Z1gv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 400 bytes cmem[0]
"""
PTX = """
.visible .entry _Z1kILi64EEvv(
)
.maxntid 128, 1, 1
{
	// peftkern.dynamic_smem 104448
	ret;
}
.visible .entry _Z1gv(
)
{
	ret;
}
"""


def test_static_budget_parses_ptxas_and_ptx():
    res = static_budget.parse_ptxas(PTXAS)
    assert res == {
        "_Z1kILi64EEvv": dict(stack=24, spill_st=20, spill_ld=36, regs=255, smem=640),
        "_Z1gv": dict(stack=0, spill_st=0, spill_ld=0, regs=40, smem=0),
    }
    assert static_budget.parse_ptx(PTX) == {"_Z1kILi64EEvv": (128, 104448), "_Z1gv": (None, 0)}
    assert (
        static_budget.short_name(
            "void peftkern::kernels::(anonymous namespace)::lowrank_forward_kernel<float, 64>"
            "(peftkern::kernels::LowRankForwardArgs, peftkern::kernels::(anonymous namespace)::FwdVec)"
        )
        == "lowrank_forward_kernel<float, 64>"
    )


def test_static_budget_occupancy_and_judgement():
    # 255 registers round to 256 per thread: 8192 per warp, 8 warps per SM, 2 blocks of 4 warps
    assert static_budget.blocks_per_sm("sm_90", 128, 255, 0) == (2, "registers")
    # 104448 + 1024 reserved bytes: 2 blocks in sm_90's 228 KB, 1 in sm_80's 164 KB
    assert static_budget.blocks_per_sm("sm_90", 128, 64, 104448) == (2, "shared memory")
    assert static_budget.blocks_per_sm("sm_80", 128, 64, 104448) == (1, "shared memory")
    assert static_budget.blocks_per_sm("sm_80", 128, 64, 214016)[0] == 0
    assert static_budget.blocks_per_sm("sm_90", 1024, 16, 0) == (2, "threads")

    def row(name, **kw):
        return dict(
            dict(
                file="x.cu", name=name, threads=128, dyn=0, stack=0, spill_st=0, spill_ld=0, regs=64, smem=0
            ),
            **kw,
        )

    rows = [
        row("lowrank_forward_kernel<float, 64>", dyn=104448),  # over sm_86/89, but the host checks
        row("mask_apply_kernel<float>", dyn=104448),  # over sm_86/89 and nothing checks
        row("masked_matvec_kernel<float>", spill_st=4, spill_ld=4),
        row("dropout_mask_kernel", threads=None),
        row("fine_kernel"),
    ]
    problems = static_budget.judge(rows)
    assert len(problems) == 3
    assert "mask_apply_kernel<float>: 104448 B" in problems[0] and "sm_86, sm_89" in problems[0]
    assert "masked_matvec_kernel<float>: spills 4 B stores, 4 B loads" == problems[1]
    assert "dropout_mask_kernel: no __launch_bounds__" in problems[2]
    assert rows[0]["fits"] == {"sm_80": True, "sm_86": False, "sm_89": False}


def test_case_timeout_fails_a_stuck_test(tmp_path):
    (tmp_path / "conftest.py").write_text(open(os.path.join(ROOT, "tests", "conftest.py")).read())
    (tmp_path / "test_stuck.py").write_text(
        textwrap.dedent(
            """
            import time

            def test_stuck():
                time.sleep(30)

            def test_quick():
                assert True
            """
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--case-timeout",
            "1",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout
    assert "TimeoutError" in proc.stdout and "over --case-timeout=1 s" in proc.stdout
    assert "1 failed, 1 passed" in proc.stdout


def test_static_budget_explained_spills(monkeypatch):
    def row(name, **kw):
        base = dict(
            file="x.cu", name=name, threads=128, dyn=0, stack=0, spill_st=0, spill_ld=0, regs=64, smem=0
        )
        return dict(base, **kw)

    monkeypatch.setattr(static_budget, "SPILLS_EXPLAINED", {"a<float>": "why it stays", "b<float>": "stale"})
    rows = [row("a<float>", stack=8, spill_st=4, spill_ld=4), row("b<float>")]
    problems = static_budget.judge(rows)
    assert problems == ["b<float>: listed in SPILLS_EXPLAINED but no longer spills: remove it"]
    md = static_budget.markdown(rows, problems, "90", "nvcc test")
    assert "- `a<float>`: why it stays" in md and "1 spilling (1 explained below)" in md
