"""Runs every bench/bench_*.py and prints one table; results go to bench/results/<GPU>_<date>.*

python -m bench.run                 # every family, every shape
python -m bench.run --quick         # the issues' target shapes and a few more
python -m bench.run --family adapter --mode forward full
python -m bench.run --quick --targets-first --budget-s 80   # scripts/gpu_check.sh's bench stage
python -m bench.run --quick --list                          # the cases, in order, without running them
"""

import argparse
import glob
import importlib
import os
import sys
import time

import torch

from .harness import (
    MODES,
    add_speedups,
    markdown_table,
    measure_copy_bandwidth,
    run_cases,
    run_meta,
    write_results,
)
from .targets import case_is_target

HERE = os.path.dirname(os.path.abspath(__file__))


def families():
    return sorted(
        os.path.basename(p)[len("bench_") : -3] for p in glob.glob(os.path.join(HERE, "bench_*.py"))
    )


def select_cases(args):
    """The cases of the chosen families, modes and providers; with --targets-first, those a target
    grades (bench/targets.py) before the rest, each group in the families' order."""
    sel = []
    for fam in args.family or families():
        mod = importlib.import_module(f"bench.bench_{fam}")
        if args.device == "cpu" and not hasattr(mod, "cpu_cases"):
            continue  # a family the CPU table leaves out (its module docstring says why)
        found = mod.cpu_cases() if args.device == "cpu" else mod.cases(quick=args.quick)
        sel += [
            c
            for c in found
            if (args.mode is None or c.mode in args.mode)
            and (args.provider is None or c.provider in args.provider)
        ]
    if args.targets_first:
        sel.sort(key=lambda c: not case_is_target(c))  # stable
    return sel


def skip_row(case):
    return {
        "family": case.family,
        "shape": case.shape_str,
        "dtype": str(case.dtype).replace("torch.", ""),
        "mode": case.mode,
        "provider": case.provider,
        **case.tags,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="*", default=None, help=f"of {families()} (default all)")
    ap.add_argument("--mode", nargs="*", default=None, help=" ".join(MODES))
    ap.add_argument("--provider", nargs="*", default=None)
    ap.add_argument("--quick", action="store_true", help="target shapes only")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    ap.add_argument("--targets-first", action="store_true", help="the cases bench/targets.py grades first")
    ap.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    ap.add_argument("--list", action="store_true", help="print the cases in order and stop")
    ap.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default=None,
        help="cuda: the GPU table; cpu: the CPU table (every family's CPU path; default without a GPU)",
    )
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu" and not args.list:
            print("bench: no CUDA GPU visible: the CPU table (every family's CPU path, float32)", flush=True)
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    if args.list:
        for c in select_cases(args):
            print(f"{c.family:16s} {c.shape_str:40s} {str(c.dtype):16s} {c.mode:9s} {c.provider}")
        return 0
    copy_bw = measure_copy_bandwidth(device=args.device)
    where = (
        torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    )
    print(f"{where}: copy {copy_bw / 1e9:.0f} GB/s (read + write)", flush=True)
    rows, start = [], time.monotonic()
    for case in select_cases(args):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            rows.append(dict(skip_row(case), skipped=f"time budget of {args.budget_s:g} s spent"))
            continue
        rows += run_cases([case], copy_bw, log=lambda s: print(s, flush=True), device=args.device)
    add_speedups(rows)  # across cases: each run_cases call saw one
    meta = run_meta(copy_bw, args.device)
    tag = args.tag or ("quick" if args.quick or args.device == "cpu" else "")
    paths = write_results(rows, meta, args.out, tag)
    print()
    print(markdown_table(rows, meta))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
