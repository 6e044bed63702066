"""Runs every bench/bench_*.py and prints one table; results go to bench/results/<GPU>_<date>.*

python -m bench.run                 # every family, every shape
python -m bench.run --quick         # the issues' target shapes and a few more
python -m bench.run --family adapter --mode forward full
"""

import argparse
import glob
import importlib
import os
import sys

import torch

from .harness import MODES, markdown_table, measure_copy_bandwidth, run_cases, run_meta, write_results

HERE = os.path.dirname(os.path.abspath(__file__))


def families():
    return sorted(
        os.path.basename(p)[len("bench_") : -3] for p in glob.glob(os.path.join(HERE, "bench_*.py"))
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="*", default=None, help=f"of {families()} (default all)")
    ap.add_argument("--mode", nargs="*", default=None, help=" ".join(MODES))
    ap.add_argument("--provider", nargs="*", default=None)
    ap.add_argument("--quick", action="store_true", help="target shapes only")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="", help="suffix of the result file names")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench: no CUDA GPU visible; the benchmarks time CUDA kernels against eager PyTorch on a GPU.",
            file=sys.stderr,
        )
        return 2

    copy_bw = measure_copy_bandwidth()
    print(
        f"{torch.cuda.get_device_name(0)}: device-to-device copy {copy_bw / 1e9:.0f} GB/s (read + write)",
        flush=True,
    )
    rows = []
    for fam in args.family or families():
        mod = importlib.import_module(f"bench.bench_{fam}")
        sel = [
            c
            for c in mod.cases(quick=args.quick)
            if (args.mode is None or c.mode in args.mode)
            and (args.provider is None or c.provider in args.provider)
        ]
        rows += run_cases(sel, copy_bw, log=lambda s: print(s, flush=True))
    meta = run_meta(copy_bw)
    tag = args.tag or ("quick" if args.quick else "")
    paths = write_results(rows, meta, args.out, tag)
    print()
    print(markdown_table(rows, meta))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
