"""Each CUDA kernel instance's static budget, read from the compiler without a GPU.

python scripts/static_budget.py [--arch 90] [--out bench/results/static_sm90.md] [--jobs N]

Compiles every csrc/kernels/*.cu for one arch (device code only, the extension build's nvcc flags)
and reads, per kernel instance:
  ptxas -v      registers per thread, stack frame, spill stores and loads, static shared memory
  the PTX       the launch block size (.maxntid, from __launch_bounds__: every kernel must have one)
                and the dynamic shared memory its launcher gives it (the PEFTKERN_DYNAMIC_SMEM
                comment, common.cuh; the largest the launcher asks for)
and gives the blocks per SM these allow on sm_80 and sm_90 (the registers of this arch's build;
the limiter named), and whether the shared memory per block fits sm_80, sm_86 and sm_89.

Exit status 1 (CI fails) when an instance spills, when a kernel lacks __launch_bounds__, or when an
instance's shared memory per block is over what sm_80, sm_86 or sm_89 allow with the opt-in
attribute, unless its launcher's host side checks the device's limit and takes the composite there
(DEVICE_CHECKED below, with where). Static shared memory over the 48 KB a kernel gets without the
opt-in cannot compile, so that case is nvcc's to catch.
"""

import argparse
import concurrent.futures as cf
import glob
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-SM resources (CUDA C Programming Guide, compute capabilities table). smem: the largest
# carveout per SM and the opt-in maximum per block; 1 KB per block is reserved by the system.
ARCHS = {
    "sm_80": dict(regs=65536, threads=2048, blocks=32, smem_sm=167936, smem_block=166912),
    "sm_86": dict(regs=65536, threads=1536, blocks=16, smem_sm=102400, smem_block=101376),
    "sm_89": dict(regs=65536, threads=1536, blocks=24, smem_sm=102400, smem_block=101376),
    "sm_90": dict(regs=65536, threads=2048, blocks=32, smem_sm=233472, smem_block=232448),
}
RESERVED_SMEM = 1024
OCCUPANCY_ARCHS = ("sm_80", "sm_90")
FIT_ARCHS = ("sm_80", "sm_86", "sm_89")

# Kernels whose launch is decided by a host check of the device's per-block shared memory (an
# instance too large for a device runs the composite path there, never the kernel).
DEVICE_CHECKED = {
    "lowrank_forward_kernel": "csrc/ops/lowrank.h lowrank_fused (kernels::lowrank_forward_smem_bytes)",
    "lowrank_backward_rows_kernel": "csrc/ops/lowrank.h lowrank_fused (kernels::lowrank_backward_smem_bytes)",
    "lowrank_backward_cols_kernel": "csrc/ops/lowrank.h lowrank_fused (kernels::lowrank_backward_smem_bytes)",
}


# Instances that still spill, each with why it stays (the table prints the reason). A spill not
# listed here fails CI; an entry that no longer spills is reported, so the list cannot go stale.
SPILLS_EXPLAINED = {}


def nvcc_flags():
    """The device flags the setuptools build gives nvcc (torch's common ones, then setup.py's)."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        common = list(COMMON_NVCC_FLAGS)
    except ImportError:
        common = []
    return ["-std=c++17", "-O3", "-lineinfo", *common, f"-I{ROOT}/csrc", f"-I{ROOT}/csrc/kernels"]


def compile_one(nvcc, src, arch, tmp):
    stem = os.path.splitext(os.path.basename(src))[0]
    keep = os.path.join(tmp, stem)
    os.makedirs(keep, exist_ok=True)
    cmd = [nvcc, *nvcc_flags(), "-cubin", f"-arch=sm_{arch}", "--resource-usage", "--keep"]
    cmd += ["--keep-dir", keep, src, "-o", os.path.join(keep, stem + ".cubin")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"static_budget: nvcc failed on {src}:\n{proc.stderr[-4000:]}")
    ptx = "".join(open(p).read() for p in glob.glob(os.path.join(keep, "*.ptx")))
    return stem, proc.stdout + proc.stderr, ptx


def parse_ptxas(text):
    """{mangled entry name: resources} from ptxas' -v report (entry functions only)."""
    out, entry = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            entry = m.group(1)
            out[entry] = dict(stack=0, spill_st=0, spill_ld=0, regs=0, smem=0)
            continue
        if entry is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[entry].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[entry]["regs"] = int(m.group(1))
            m = re.search(r"(\d+) bytes smem", line)
            out[entry]["smem"] = int(m.group(1)) if m else 0
            entry = None
    return out


def parse_ptx(ptx):
    """{mangled entry name: (max threads or None, dynamic smem bytes)} from the PTX."""
    out = {}
    for m in re.finditer(r"\.entry (\S+)\((.*?)\n\}", ptx, re.S):
        body = m.group(2)
        ntid = re.search(r"\.maxntid (\d+), (\d+), (\d+)", body)
        dyn = re.search(r"// peftkern\.dynamic_smem (\d+)", body)
        threads = math.prod(int(g) for g in ntid.groups()) if ntid else None
        out[m.group(1)] = (threads, int(dyn.group(1)) if dyn else 0)
    return out


def demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    pretty = proc.stdout.splitlines()
    return dict(zip(names, pretty)) if len(pretty) == len(names) else {n: n for n in names}


def short_name(pretty):
    """'void peftkern::kernels::(anonymous namespace)::lowrank_forward_kernel<float, 64>(args)' ->
    'lowrank_forward_kernel<float, 64>'."""
    name = pretty.replace("(anonymous namespace)::", "").split("(", 1)[0]
    return re.sub(r"\bpeftkern::(?:\w+::)*", "", re.sub(r"^void ", "", name))


def blocks_per_sm(arch, threads, regs, smem_block):
    a = ARCHS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = {
        "registers": (a["regs"] // regs_per_warp) // warps,
        "threads": a["threads"] // threads,
        "blocks": a["blocks"],
        "shared memory": a["smem_sm"] // (smem_block + RESERVED_SMEM) if smem_block else a["blocks"],
    }
    if smem_block > a["smem_block"]:
        return 0, "shared memory over the per-block limit"
    n = min(limits.values())
    return n, min(limits, key=limits.get)


def find_nvcc():
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc") or sys.exit("static_budget: nvcc not found (set CUDA_HOME)")
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\S+),", out)
    return nvcc, f"nvcc {m.group(1) if m else '(unknown version)'}"


def analyse(nvcc, arch, jobs):
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "kernels", "*.cu")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(jobs) as pool:
        for stem, report, ptx in pool.map(lambda s: compile_one(nvcc, s, arch, tmp), sources):
            res, launch = parse_ptxas(report), parse_ptx(ptx)
            pretty = demangle(list(res))
            for entry, r in res.items():
                threads, dyn = launch.get(entry, (None, 0))
                rows.append(
                    dict(file=stem + ".cu", name=short_name(pretty[entry]), threads=threads, dyn=dyn, **r)
                )
    return sorted(rows, key=lambda r: (r["file"], r["name"]))


def judge(rows):
    problems = []
    for r in rows:
        base = r["name"].split("<", 1)[0]
        r["total_smem"] = r["smem"] + r["dyn"]
        r["fits"] = {a: r["total_smem"] <= ARCHS[a]["smem_block"] for a in FIT_ARCHS}
        if r["threads"]:
            for a in OCCUPANCY_ARCHS:
                r[a] = blocks_per_sm(a, r["threads"], r["regs"], r["total_smem"])
        else:
            problems.append(f"{r['name']}: no __launch_bounds__ (its block size is not in the compiled code)")
        spills = r["spill_st"] or r["spill_ld"]
        r["why"] = SPILLS_EXPLAINED.get(r["name"], "") if spills else ""
        if spills and not r["why"]:
            problems.append(f"{r['name']}: spills {r['spill_st']} B stores, {r['spill_ld']} B loads")
        if not spills and r["name"] in SPILLS_EXPLAINED:
            problems.append(f"{r['name']}: listed in SPILLS_EXPLAINED but no longer spills: remove it")
        too_big = [a for a, ok in r["fits"].items() if not ok]
        if too_big and base not in DEVICE_CHECKED:
            problems.append(
                f"{r['name']}: {r['total_smem']} B of shared memory per block, over the limit of "
                f"{', '.join(too_big)}, and no host check of the device's limit"
            )
    return problems


def markdown(rows, problems, arch, nvcc_version):
    n_stack = sum(r["stack"] > 0 for r in rows)
    n_spill = sum(r["spill_st"] + r["spill_ld"] > 0 for r in rows)
    regs = [r["regs"] for r in rows]
    lines = [
        f"# Static budget of every kernel instance (sm_{arch})",
        "",
        f"Written by `scripts/static_budget.py` with {nvcc_version} (`make static-budget`; CI "
        "runs it after the build and fails on a spill or on shared memory a device cannot give). From ptxas' "
        f"-v report of a device-only sm_{arch} build with the extension's nvcc flags and from the PTX: "
        "registers per thread, stack frame, spill stores / loads, static shared memory; the launch block "
        "size (`__launch_bounds__`), the dynamic shared memory the launcher gives "
        "(`PEFTKERN_DYNAMIC_SMEM`, the most it asks for). Blocks per SM: what registers, threads and "
        "shared memory allow together, with "
        f"the registers of this sm_{arch} build and 1 KB reserved per block; the limiter is named. "
        '"fits": shared memory per block within the opt-in maximum (sm_80 163 KB, sm_86 / sm_89 99 KB); an '
        "instance that does not fit runs only where its launcher's host check allows (low-rank kernels: "
        "`lowrank_fused` in csrc/ops/lowrank.h, else the composite path).",
        "",
        f"Summary: {len(rows)} instances; registers {min(regs)}-{max(regs)} per thread; "
        f"{n_stack} with a stack frame; {n_spill} spilling "
        f"({sum(bool(r.get('why')) for r in rows)} explained below). "
        + ("No problem found." if not problems else f"{len(problems)} problems (below)."),
        "",
        "| file | kernel instance | threads | regs | stack B | spill st/ld B | static smem B "
        "| dynamic smem B | blocks/SM sm_80 | blocks/SM sm_90 | fits sm_80 / 86 / 89 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        occ = [f"{r[a][0]} ({r[a][1]})" if a in r else "?" for a in OCCUPANCY_ARCHS]
        fits = " / ".join("yes" if r["fits"][a] else "no" for a in FIT_ARCHS)
        lines.append(
            f"| {r['file']} | `{r['name']}` | {r['threads'] or '?'} | {r['regs']} | {r['stack']} | "
            f"{r['spill_st']}/{r['spill_ld']} | {r['smem']} | {r['dyn']} | {occ[0]} | {occ[1]} | {fits} |"
        )
    explained = [r for r in rows if r.get("why")]
    if explained:
        lines += ["", "## Spills that stay, and why", *[f"- `{r['name']}`: {r['why']}" for r in explained]]
    if problems:
        lines += ["", "## Problems", *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90", help="compute capability digits (default 90)")
    ap.add_argument("--out", default=None, help="Markdown table path (default: stdout only)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 2)))
    args = ap.parse_args(argv)
    nvcc, version = find_nvcc()
    rows = analyse(nvcc, args.arch, args.jobs)
    if not rows:
        sys.exit("static_budget: no kernel instance found in the ptxas report")
    problems = judge(rows)
    text = markdown(rows, problems, args.arch, version)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    print(text.split("\n| file")[0])
    for p in problems:
        print("static_budget: " + p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
