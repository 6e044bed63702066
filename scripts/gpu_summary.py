"""gpu_check.md from what scripts/gpu_check.sh left in $OUT/logs: the device, each stage's time,
the CUDA tests passed / failed / skipped per family (pytest.xml), the sanitizer errors per tool,
and the benchmark rows graded against bench/targets.py.

python scripts/gpu_summary.py OUT [--dry-run]   (Markdown on stdout)
"""

import argparse
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# test file stem -> family (the README's layout table); the rest are cross-family
FAMILIES = {
    "adapter": (
        "test_adapter",
        "test_adapter_multi",
        "test_adapter_fusion",
        "test_adamix",
        "test_side_tuning",
    ),
    "lora": ("test_lora", "test_peft_interop"),
    "mask": ("test_mask",),
    "prefix_attention": ("test_prefix_attention", "test_virtual_tokens"),
}
FAMILY_OF = {stem: fam for fam, stems in FAMILIES.items() for stem in stems}
TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")


def device_line():
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            name = torch.cuda.get_device_name(0)
            return f"{name} (sm_{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}"
        return f"no CUDA GPU visible, torch {torch.__version__}"
    except ImportError:
        return "torch not importable"


def stages(logs):
    path = os.path.join(logs, "stages.tsv")
    if not os.path.exists(path):
        return ["(no stage ran)"]
    rows = [line.rstrip("\n").split("\t") for line in open(path)][1:]
    lines = ["| stage | box s | took s | status |", "|---|---:|---:|---|"]
    lines += [f"| {s} | {box} | {took} | {status} |" for s, box, took, status in rows]
    took = sum(int(r[2]) for r in rows)
    lines.append(f"| all but pack | {sum(int(r[1]) for r in rows)} | {took} | |")
    return lines


def tests(xml_path):
    if not os.path.exists(xml_path):
        return ["No pytest.xml: the tests stage did not run or did not finish."], []
    counts = defaultdict(Counter)
    failures = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        # classname: tests.test_adapter (or tests.test_adapter.TestClass)
        stem = next((p for p in case.get("classname", "").split(".") if p.startswith("test_")), "?")
        family = FAMILY_OF.get(stem, "cross-family")
        kinds = {child.tag for child in case}
        outcome = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
        counts[family][outcome] += 1
        if outcome == "failed":
            child = next(c for c in case if c.tag in ("failure", "error"))
            msg = (child.get("message") or child.text or "").strip().splitlines()
            failures.append(f"{case.get('classname')}::{case.get('name')}: {msg[0][:200] if msg else ''}")
    lines = ["| family | passed | failed | skipped |", "|---|---:|---:|---:|"]
    total = Counter()
    for fam in list(FAMILIES) + ["cross-family"]:
        c = counts.get(fam, Counter())
        total.update(c)
        lines.append(f"| {fam} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    lines.append(f"| all | {total['passed']} | {total['failed']} | {total['skipped']} |")
    return lines, failures


def ctest(logs):
    path = os.path.join(logs, "ctest.log")
    if not os.path.exists(path):
        return "CTest: not run."
    found = re.findall(r"\d+% tests passed.*", open(path, errors="replace").read())
    return "CTest (C++ launcher tests): " + (found[-1] if found else "no result line (see logs/ctest.log)")


def sanitizer(logs, dry):
    lines = ["| tool | errors | exit | pytest |", "|---|---:|---|---|"]
    for tool in TOOLS:
        path = os.path.join(logs, f"sanitize-{tool}.log")
        if not os.path.exists(path):
            lines.append(f"| {tool} | | not run | |")
            continue
        text = open(path, errors="replace").read()
        if dry:
            lines.append(f"| {tool} | | dry run: command printed, not run | |")
            continue
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        status = re.findall(r"exit status (\d+)", text)
        exit_s = {None: "?", "0": "0", "124": "out of time", "137": "out of time"}.get(
            status[-1] if status else None, status[-1] if status else "?"
        )
        result = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", text, re.M)
        lines.append(
            f"| {tool} | {errors[-1] if errors else '?'} | {exit_s} | {result[-1] if result else ''} |"
        )
    return lines


def bench(logs):
    from bench.targets import grade

    paths = sorted(glob.glob(os.path.join(logs, "bench", "*.json")))
    if not paths:
        return ["No benchmark rows (bench stage not run, listed only, or out of time before writing)."]
    rows = json.load(open(paths[-1]))["rows"]
    timed = sum("median_ms" in r for r in rows)
    lines = [
        f"{timed} rows timed, {len(rows) - timed} skipped ({os.path.basename(paths[-1])}).",
        "",
        "| issue | target | figure | bar | met |",
        "|---|---|---:|---:|---|",
    ]
    for g in grade(rows):
        fig = "" if g["figure"] is None else f"{g['figure']:.2f}"
        met = g["note"] if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['issue']} | {g['target']} | {fig} | {g['at_least']:.2f} | {met} |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    logs = os.path.join(args.out, "logs")
    test_lines, failures = tests(os.path.join(args.out, "pytest.xml"))
    parts = [
        f"# peftkern GPU check{' (dry run)' if args.dry_run else ''}",
        "",
        f"Device: {device_line()}. Stages: {os.environ.get('PEFTKERN_GPU_CHECK_STAGES', '?')}.",
        "",
        "## Stages",
        *stages(logs),
        "",
        "## CUDA tests (pytest -m cuda)",
        *test_lines,
        "",
        ctest(logs),
        "",
    ]
    if failures:
        parts += ["Failures (first 30):", *[f"- {f}" for f in failures[:30]], ""]
    parts += ["## compute-sanitizer (tests/test_sanitize.py)", *sanitizer(logs, args.dry_run), ""]
    parts += ["## Benchmarks against the targets (bench/targets.py)", *bench(logs), ""]
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
