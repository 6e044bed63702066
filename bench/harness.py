"""Shared benchmark machinery: CUDA-event timing, peak memory, achieved bandwidth, result files.

A bench file (bench/bench_<family>.py) exposes ``cases(quick: bool) -> Iterable[Case]``. Each Case
names a family, shape, dtype, mode (one of MODES) and provider (eager |
compile | peftkern | a peer library), and knows how to build its work (``make``) and the bytes and
flops an ideal kernel must move for it. ``run_cases`` times them and returns rows; ``write_results``
stores JSON, CSV and a Markdown table under bench/results/, named by GPU and date.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# inference: a forward under no_grad; decode: the same at one query row per sequence (attention);
# train: forward, backward and optimizer step of a whole model (bench_model)
MODES = ("forward", "backward", "full", "inference", "decode", "train")


@dataclass
class Work:
    """One timed step of a case; for mode "backward", `prepare` runs untimed before each step."""

    step: Callable[[int], object]  # step(i): run on input set i
    prepare: Optional[Callable[[int], object]] = None  # untimed, before step(i) (backward: forward)
    n_sets: int = 1


def mode_work(
    mode: str,
    run: Callable[[int], torch.Tensor],
    grad: Optional[torch.Tensor],
    grad_holders: Callable[[int], Iterable[torch.Tensor]],
    n_sets: int,
) -> Work:
    """The timed step of one mode, given run(i) (the forward on input set i) and the tensors whose
    .grad must start empty before each step (as after zero_grad(set_to_none=True)):
      inference  run under no_grad            forward   the training forward
      full       forward + backward           backward  the backward alone (forward untimed)"""

    def clear(i):
        for t in grad_holders(i):
            t.grad = None

    if mode in ("inference", "decode"):

        def step(i):
            with torch.no_grad():
                return run(i)

        return Work(step, None, n_sets)
    if mode == "forward":
        return Work(run, clear, n_sets)
    if mode == "full":
        return Work(lambda i: run(i).backward(grad), clear, n_sets)
    if mode != "backward":
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    state = {}

    def prepare(i):
        clear(i)
        state["out"] = run(i)

    return Work(lambda i: state.pop("out").backward(grad), prepare, n_sets)


@dataclass
class Case:
    family: str
    shape: dict
    dtype: torch.dtype
    mode: str
    provider: str
    make: Callable[[], Work]  # builds inputs/modules; may raise Skip
    ideal_bytes: float  # bytes an ideal kernel must move for one step
    flops: float = 0.0
    tags: dict = field(default_factory=dict)

    @property
    def shape_str(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.shape.items())


class Skip(Exception):
    """Raised by Case.make when a provider is unavailable (library missing, shape unsupported)."""


class ProviderFailed(Exception):
    """Raised by a peer library's work when that library itself fails on the case (its row says so,
    with the message: it is that provider's result). Never for peftkern, eager or compile."""


def input_sets_for(bytes_per_set: float, l2_bytes: Optional[int] = None, cap: int = 8) -> int:
    """Enough distinct input sets that cycling through them keeps the working set out of L2."""
    if not torch.cuda.is_available():
        return 1  # the CPU table: no L2 to keep out of on a GPU
    if l2_bytes is None:
        l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    return max(1, min(cap, math.ceil(3 * l2_bytes / max(bytes_per_set, 1))))


def measure_copy_bandwidth(n_bytes: int = 1 << 30, reps: int = 20, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (on the
    CPU: a 256 MB tensor copy, timed by the wall clock)."""
    if device == "cpu":
        src = torch.ones(256 << 20, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        return 2 * src.numel() / statistics.median(times)
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n_bytes / statistics.median(times)


def _percentile(sorted_vals: List[float], q: float) -> float:
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def time_work_cpu(work: Work, warmup: int = 2, reps: int = 5, min_time_s: float = 0.5) -> dict:
    """Median, p20 and p80 of one step in milliseconds on the CPU (the wall clock around each step).
    A step over 0.2 s (a whole model) gets one warm-up and 3 timed runs, so the table keeps to minutes."""
    for i in range(warmup):
        if work.prepare:
            work.prepare(i % work.n_sets)
        t0 = time.perf_counter()
        work.step(i % work.n_sets)
        if time.perf_counter() - t0 > 0.2:
            reps, min_time_s = 3, 0.0
            break
    times: List[float] = []
    i = 0
    while i < reps or sum(times) / 1e3 < min_time_s:
        k = i % work.n_sets
        if work.prepare:
            work.prepare(k)
        t0 = time.perf_counter()
        work.step(k)
        times.append((time.perf_counter() - t0) * 1e3)
        i += 1
        if i >= 20 * reps:
            break
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p20_ms": _percentile(times, 0.2),
        "p80_ms": _percentile(times, 0.8),
        "reps": len(times),
    }


def time_work(work: Work, warmup: int = 5, reps: int = 30, min_time_s: float = 0.25) -> dict:
    """Median, p20 and p80 of one step in milliseconds (CUDA events around each step)."""
    for i in range(warmup):
        if work.prepare:
            work.prepare(i % work.n_sets)
        work.step(i % work.n_sets)
    torch.cuda.synchronize()
    times: List[float] = []
    total, i = 0.0, 0
    while i < reps or total < min_time_s:
        k = i % work.n_sets
        if work.prepare:
            work.prepare(k)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work.step(k)
        end.record()
        end.synchronize()
        t = start.elapsed_time(end)
        times.append(t)
        total += t / 1e3
        i += 1
        if i >= 50 * reps:
            break
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p20_ms": _percentile(times, 0.2),
        "p80_ms": _percentile(times, 0.8),
        "reps": len(times),
    }


def peak_memory_bytes(work: Work) -> int:
    """Peak memory allocated during one step, above what was allocated before it."""
    if work.prepare:
        work.prepare(0)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    work.step(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_cases(cases: Iterable[Case], copy_bw: float, log=print, device: str = "cuda") -> List[dict]:
    """Times each case on `device` (cuda: CUDA events and peak memory; cpu: the wall clock, no
    peak memory)."""
    cuda = device == "cuda"
    rows = []
    for case in cases:
        row = {
            "family": case.family,
            "shape": case.shape_str,
            "dtype": str(case.dtype).replace("torch.", ""),
            "mode": case.mode,
            "provider": case.provider,
            **case.tags,
        }
        try:
            work = case.make()
            row.update(time_work(work) if cuda else time_work_cpu(work))
            row["peak_mem_mb"] = peak_memory_bytes(work) / 2**20 if cuda else None
            secs = row["median_ms"] / 1e3
            row["ideal_mb"] = case.ideal_bytes / 2**20
            row["gbps"] = case.ideal_bytes / secs / 1e9
            row["frac_copy_bw"] = case.ideal_bytes / secs / copy_bw
            row["tflops"] = case.flops / secs / 1e12 if case.flops else None
            if "tokens" in case.tags:
                row["tokens_per_s"] = case.tags["tokens"] / secs
        except Skip as e:
            row["skipped"] = str(e)
        except ProviderFailed as e:
            row["skipped"] = f"fails: {e}"
        except torch.cuda.OutOfMemoryError as e:  # large shapes on smaller cards
            row["skipped"] = f"out of memory: {str(e).splitlines()[0]}"
        finally:
            work = None
            if cuda:
                torch.cuda.empty_cache()
        log(format_row(row))
        rows.append(row)
    add_speedups(rows)
    return rows


def add_speedups(rows: List[dict]) -> None:
    """speedup = eager median / this provider's median, for the same family, shape, dtype and mode. The
    eager row is provider "eager", or the row a case tags as its baseline (bench_model: HF peft)."""
    key = lambda r: (r["family"], r["shape"], r["dtype"], r["mode"], r.get("variant", ""))  # noqa: E731
    eager = {
        key(r): r["median_ms"]
        for r in rows
        if (r["provider"] == "eager" or r.get("baseline")) and "median_ms" in r
    }
    for r in rows:
        if "median_ms" in r and key(r) in eager:
            r["speedup_vs_eager"] = eager[key(r)] / r["median_ms"]


def format_row(r: dict) -> str:
    head = f"{r['family']:16s} {r['shape']:34s} {r['dtype']:8s} {r['mode']:9s} {r['provider']:10s}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    mem = "      n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:9.1f}"
    return (
        f"{head} {r['median_ms']:9.4f} ms [{r['p20_ms']:.4f}, {r['p80_ms']:.4f}]  "
        f"{mem} MB  {r['gbps']:7.0f} GB/s ({100 * r['frac_copy_bw']:4.0f}% copy)"
        + (f"  {r['tokens_per_s']:,.0f} tokens/s, {r['tflops']:.0f} TFLOPS" if "tokens_per_s" in r else "")
    )


def gpu_slug() -> str:
    name = torch.cuda.get_device_name(0)
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def markdown_table(rows: List[dict], meta: dict) -> str:
    lines = [
        f"# peftkern benchmarks: {meta['gpu']} ({meta['date']})",
        "",
        f"torch {meta['torch']}, CUDA {meta['cuda']}, peftkern build {meta['build']}. "
        f"Measured {'device-to-device' if meta.get('device', 'cuda') == 'cuda' else 'memory'} copy "
        f"bandwidth: {meta['copy_bw_gbps']:.0f} GB/s (read + write). "
        + (
            "Times are CUDA-event medians [p20, p80];"
            if meta.get("device", "cuda") == "cuda"
            else "CPU rows: wall-clock medians [p20, p80] of the CPU path (what users without a GPU run: "
            "real figures); peak memory is not measured on the CPU;"
        )
        + " bandwidth is the bytes an ideal kernel must move "
        "over the median time; speedup is eager time / this time, same run. Whole-model rows (mode "
        "train) also give tokens/s and TFLOPS (bench/bench_model.py counts the flops).",
        "",
        "| family | shape | dtype | mode | provider | median ms | p20 | p80 | peak MB | GB/s | % copy BW "
        "| speedup vs eager | tokens/s | TFLOPS |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(
                f"| {r['family']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} "
                f"| skipped: {r['skipped']} | | | | | | | | |"
            )
            continue
        sp = r.get("speedup_vs_eager")
        tokens = f"{r['tokens_per_s']:,.0f} | {r['tflops']:.0f}" if "tokens_per_s" in r else " | "
        lines.append(
            f"| {r['family']} | {r['shape']} | {r['dtype']} | {r['mode']} | {r['provider']} | "
            f"{r['median_ms']:.4f} | {r['p20_ms']:.4f} | {r['p80_ms']:.4f} | "
            f"{'' if r['peak_mem_mb'] is None else format(r['peak_mem_mb'], '.1f')} | "
            f"{r['gbps']:.0f} | {100 * r['frac_copy_bw']:.0f}% | {'' if sp is None else f'{sp:.2f}x'} | "
            f"{tokens} |"
        )
    return "\n".join(lines) + "\n"


def write_results(rows: List[dict], meta: dict, out_dir: str = RESULTS_DIR, tag: str = "") -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{meta['gpu_slug']}_{meta['date']}{('_' + tag) if tag else ''}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    keys = sorted({k for r in rows for k in r})
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(stem + ".md", "w") as f:
        f.write(markdown_table(rows, meta))
    paths = [stem + ext for ext in (".json", ".csv", ".md")]
    if plot_speedups(rows, meta, stem + ".png"):
        paths.append(stem + ".png")
    return paths


def plot_speedups(rows: List[dict], meta: dict, path: str) -> bool:
    """Bar chart of speedup vs eager per case and provider (log scale); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = [
        r for r in rows if "speedup_vs_eager" in r and r["provider"] != "eager" and not r.get("baseline")
    ]
    if not measured:
        return False
    labels = sorted({(r["family"], r["shape"], r["dtype"], r["mode"]) for r in measured})
    providers = sorted({r["provider"] for r in measured})
    index = {lab: i for i, lab in enumerate(labels)}
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(labels) * len(providers)), 6))
    for k, prov in enumerate(providers):
        pts = [
            (index[(r["family"], r["shape"], r["dtype"], r["mode"])], r["speedup_vs_eager"])
            for r in measured
            if r["provider"] == prov
        ]
        ax.bar([i + k * width for i, _ in pts], [v for _, v in pts], width, label=prov)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup vs eager (same run)")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{f} {m}\n{s}\n{d}" for f, s, d, m in labels], rotation=90, fontsize=6)
    ax.set_title(f"peftkern vs eager, {meta['gpu']} ({meta['date']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def run_meta(copy_bw: float, device: str = "cuda") -> dict:
    import peftkern

    if device == "cpu":
        label = f"CPU (no GPU visible): {cpu_name()}, {torch.get_num_threads()} threads"
        if torch.cuda.is_available():
            label = f"CPU (--device cpu): {cpu_name()}, {torch.get_num_threads()} threads"
        slug = "CPU-" + re.sub(r"[^A-Za-z0-9]+", "-", cpu_name()).strip("-")[:40]
    else:
        label, slug = torch.cuda.get_device_name(0), gpu_slug()
    return {
        "device": device,
        "gpu": label,
        "gpu_slug": slug,
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "build": peftkern.build_info(),
        "copy_bw_gbps": copy_bw / 1e9,
    }
