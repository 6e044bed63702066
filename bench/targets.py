"""The issues' GPU targets (H100, bf16), in one place: bench.run runs their cases first
(``--targets-first``) and scripts/gpu_summary.py grades a run's rows against them.

Each target names the peftkern row (family, a subset of the shape, dtype, mode) and what it is
measured against: another provider's row of the same case (``vs``; figure = that median / peftkern's
median, so 1.5 means 1.5x faster), the same rows' peak memory (``metric="memory"``: figure =
that peak / peftkern's, above 1 = less memory), or the measured copy bandwidth
(``metric="copy_bw"``: figure = the fraction of it). ``at_least`` is the bar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass(frozen=True)
class Target:
    issue: str
    what: str
    family: str
    shape: dict
    mode: str
    at_least: float
    vs: Optional[str] = "eager"
    metric: str = "time"  # time | memory | copy_bw
    dtype: str = "bfloat16"
    provider: str = "peftkern"
    extra: dict = field(default_factory=dict)  # kept for the report


ADAPTER = dict(tokens=16384, d=4096, r=64)
LORA = dict(tokens=8192, n_in=4096, n_out=4096, r=16)
PTUNING_V2 = dict(B=32, H=16, L=128, S=128, P=64, D=64)
LLAMA = dict(B=8, H=32, Hkv=8, L=2048, S=2048, P=64, D=128)
ADALORA = dict(tokens=8192, n_in=4096, n_out=4096, r=12, kept=8)

TARGETS: List[Target] = [
    Target("14", "adapter forward >= 1.5x eager", "adapter", ADAPTER, "forward", 1.5),
    Target(
        "14", "adapter forward >= 70% of copy bandwidth", "adapter", ADAPTER, "forward", 0.7, None, "copy_bw"
    ),
    Target("14", "adapter full >= 1.4x eager", "adapter", ADAPTER, "full", 1.4),
    Target("14", "adapter full >= torch.compile", "adapter", ADAPTER, "full", 1.0, "compile"),
    Target("14", "LoRA full (dropout 0.1) >= 1.3x eager", "lora", dict(LORA, dropout=0.1), "full", 1.3),
    Target("14", "LoRA full (dropout 0) >= 1.15x eager", "lora", dict(LORA, dropout=0.0), "full", 1.15),
    Target(
        "14",
        "LoRA full (dropout 0.1): less peak memory",
        "lora",
        dict(LORA, dropout=0.1),
        "full",
        1.0,
        "eager",
        "memory",
    ),
    Target(
        "14",
        "multi-adapter LoRA, 64 adapters >= 5x the eager loop",
        "lora-multi",
        dict(adapters=64),
        "inference",
        5.0,
    ),
    Target("15", "mask full >= 1.3x eager", "mask", dict(tokens=2048, n_in=4096, n_out=4096), "full", 1.3),
    Target(
        "15",
        "mask full: less peak memory",
        "mask",
        dict(tokens=2048, n_in=4096, n_out=4096),
        "full",
        1.0,
        "eager",
        "memory",
    ),
    Target(
        "15",
        "packed decode (1 token) >= 2.5x eager",
        "mask-packed",
        dict(tokens=1, n_in=4096),
        "inference",
        2.5,
    ),
    Target(
        "15",
        "packed decode (16 tokens) >= 2.5x eager",
        "mask-packed",
        dict(tokens=16, n_in=4096),
        "inference",
        2.5,
    ),
    Target(
        "15",
        "packed decode (16 tokens) <= 1.15x the plain linear",
        "mask-packed",
        dict(tokens=16, n_in=4096),
        "inference",
        1 / 1.15,
        "plain-linear",
    ),
    Target("16", "prefix full, P-tuning v2 >= 1.2x cat + SDPA", "prefix_attention", PTUNING_V2, "full", 1.2),
    Target("16", "prefix forward, Llama-like >= 1.0x", "prefix_attention", LLAMA, "forward", 1.0),
    Target("16", "prefix full, Llama-like >= 1.0x", "prefix_attention", LLAMA, "full", 1.0),
    Target(
        "16",
        "prefix full, Llama-like: less peak memory",
        "prefix_attention",
        LLAMA,
        "full",
        1.0,
        "eager",
        "memory",
    ),
    Target(
        "16",
        "prefix decode (S 8192) within 1.1x of SDPA over the cache",
        "prefix_attention",
        dict(L=1, S=8192),
        "decode",
        1 / 1.1,
        "sdpa-seq-only",
    ),
    Target("37", "AdaLoRA full, 8 of 12 ranks kept >= 1.15x eager", "adalora", ADALORA, "full", 1.15),
    Target("37", "AdaLoRA full: less peak memory", "adalora", ADALORA, "full", 1.0, "eager", "memory"),
    Target("37", "IA3 k/v full >= 1.15x eager", "ia3", dict(tokens=8192, scale="output"), "full", 1.15),
    Target(
        "37",
        "IA3 k/v full: less peak memory",
        "ia3",
        dict(tokens=8192, scale="output"),
        "full",
        1.0,
        "eager",
        "memory",
    ),
    Target(
        "37",
        "KronA full (64x64) >= 1.15x peft LoKr",
        "krona",
        dict(tokens=8192, out_a=64),
        "full",
        1.15,
        "peft",
    ),
    Target(
        "37",
        "KronA full: less peak memory than peft",
        "krona",
        dict(tokens=8192, out_a=64),
        "full",
        1.0,
        "peft",
        "memory",
    ),
    Target("37", "Compacter full >= 1.15x eager", "krona", dict(tokens=16384, phm_dim=4), "full", 1.15),
]


def shape_of(row: dict) -> dict:
    """The shape dict of a result row (its "k=v k=v" string)."""
    return dict(kv.split("=", 1) for kv in row["shape"].split())


def _matches(t: Target, row: dict, provider: str) -> bool:
    if (row["family"], row["dtype"], row["mode"], row["provider"]) != (t.family, t.dtype, t.mode, provider):
        return False
    shape = shape_of(row)
    return all(shape.get(k) == str(v) for k, v in t.shape.items())


def case_is_target(case) -> bool:
    """Whether a bench Case is a row some target reads (its peftkern row or its baseline)."""
    row = {
        "family": case.family,
        "dtype": str(case.dtype).replace("torch.", ""),
        "mode": case.mode,
        "provider": case.provider,
        "shape": case.shape_str,
    }
    return any(case.provider in (t.provider, t.vs) and _matches(t, row, case.provider) for t in TARGETS)


def grade(rows: List[dict]) -> List[dict]:
    """One entry per target: the figure (None when a row is missing or was skipped), pass or not."""
    out = []
    for t in TARGETS:
        mine = [r for r in rows if _matches(t, r, t.provider) and "median_ms" in r]
        base = [r for r in rows if t.vs and _matches(t, r, t.vs) and "median_ms" in r]
        figure, note = None, ""
        if not mine:
            note = "no peftkern row (not run, skipped or out of time)"
        elif t.metric == "copy_bw":
            figure = mine[0]["frac_copy_bw"]
        elif not base:
            note = f"no {t.vs} row"
        elif t.metric == "memory":
            figure = base[0]["peak_mem_mb"] / max(mine[0]["peak_mem_mb"], 1e-9)
        else:
            figure = base[0]["median_ms"] / mine[0]["median_ms"]
        out.append(
            dict(
                issue=t.issue,
                target=t.what,
                figure=figure,
                at_least=t.at_least,
                met=None if figure is None else figure >= t.at_least,
                note=note,
            )
        )
    return out
