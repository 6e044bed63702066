"""LoRA: peft's formula in eager PyTorch vs torch.compile of it vs Hugging Face peft's lora.Linear vs
the addmm_ fusion practice vs peftkern (fused kernels; and with PEFTKERN_LORA_UPDATE=addmm).

Frozen base weight, x requires grad (deeper layers' LoRA need dx). Ideal bytes per step
(es = element size; W = in*out*es; small = the rank-r factors and hidden):
  forward    read x, read W, write out                        (T*in + T*out)*es + W + small
  backward   read grad_out, read x (for d lora_A), read W, write dx   (T*out + 2*T*in)*es + W + small
  full       forward + backward
The base product dominates the flops (2*T*in*out each way): at these shapes LoRA steps are
matmul-bound, and what the fused kernels save is the extra passes of the update and of dropout.
Predicted occupancy (sm_90, bench/results/static_sm90.md; 4 warps per block):
at
the target (bf16, r 16 -> RP 16) the forward kernel 4 blocks per SM (112 registers), the rows
backward 4, the columns backward 3 (136 registers), the reduce 6 (256 threads).

peft interop ("lora-peft"): a Hugging Face peft lora.Linear as peft computes it (the baseline) vs the
same layer after peftkern.integrations.peft.fuse, for DoRA (ideal: the LoRA step's bytes plus one
read of W for the row norms), two active adapters (rank 2r) and an adapter_names batch of samples
from 8 adapters (inference; ideal as the multi-adapter case). Both providers get the same layer, its
adapters in bf16 (peft's default keeps them in float32 and casts x up for them: slower still).

Multi-adapter (inference): eager per-adapter loop (index with each adapter's token ids) vs
peftkern.ops.lora_linear_multi; ideal bytes: read x, read W, read the adapters used, write out.
"""

import itertools
import os

import torch
import torch.nn.functional as F
from torch import nn

import peftkern

from .harness import Case, Skip, Work, input_sets_for, mode_work

FAMILY = "lora"


class EagerLoRA(nn.Module):
    """What peft computes for a plain LoRA layer, written out as a user would."""

    def __init__(self, n_in, n_out, r, alpha, p):
        super().__init__()
        self.base = nn.Linear(n_in, n_out)
        self.lora_A, self.lora_B = nn.Linear(n_in, r, bias=False), nn.Linear(r, n_out, bias=False)
        self.dropout, self.scaling = nn.Dropout(p), alpha / r
        self.base.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


class AddmmLoRA(EagerLoRA):
    """The known good practice: the update added in place into the base output by cuBLAS."""

    def forward(self, x):
        out = self.base(x)
        u = self.lora_A(self.dropout(x))
        return (
            out.view(-1, out.shape[-1])
            .addmm_(u.view(-1, u.shape[-1]), self.lora_B.weight.t(), alpha=self.scaling)
            .view(out.shape)
        )


class EnvLoRA(nn.Module):
    """peftkern.nn.LoRALinear with PEFTKERN_LORA_UPDATE set while it runs."""

    def __init__(self, layer, value):
        super().__init__()
        self.layer, self.value = layer, value

    def forward(self, x):
        old = os.environ.get("PEFTKERN_LORA_UPDATE")
        os.environ["PEFTKERN_LORA_UPDATE"] = self.value
        try:
            return self.layer(x)
        finally:
            if old is None:
                del os.environ["PEFTKERN_LORA_UPDATE"]
            else:
                os.environ["PEFTKERN_LORA_UPDATE"] = old


def _peft_layer(eager, r, alpha, p):
    try:
        import peft
    except ImportError:
        raise Skip("peft not installed")
    holder = nn.Module()
    holder.base = nn.Linear(eager.base.in_features, eager.base.out_features).to(eager.base.weight)
    holder.base.load_state_dict(eager.base.state_dict())
    model = peft.get_peft_model(
        holder, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["base"])
    )
    layer = model.base_model.model.base
    layer.lora_A["default"].weight.data.copy_(eager.lora_A.weight)
    layer.lora_B["default"].weight.data.copy_(eager.lora_B.weight)
    return layer


def _module(provider, n_in, n_out, r, p, dtype, device):
    alpha = 2 * r
    eager = EagerLoRA(n_in, n_out, r, alpha, p).to(device, dtype)
    with torch.no_grad():
        eager.lora_B.weight.normal_(0, r**-0.5)  # a trained adapter, not B = 0
    if provider == "eager":
        return eager
    if provider == "compile":
        return torch.compile(eager)
    if provider == "addmm":
        m = AddmmLoRA(n_in, n_out, r, alpha, p).to(device, dtype)
        m.load_state_dict(eager.state_dict())
        return m
    if provider == "peft":
        return _peft_layer(eager, r, alpha, p)
    fused = peftkern.nn.LoRALinear(
        n_in, n_out, r, lora_alpha=alpha, lora_dropout=p, device=device, dtype=dtype
    )
    with torch.no_grad():
        fused.weight.copy_(eager.base.weight)
        fused.bias.copy_(eager.base.bias)
        fused.lora_A.copy_(eager.lora_A.weight)
        fused.lora_B.copy_(eager.lora_B.weight)
    if provider == "peftkern-addmm":
        if p > 0:
            raise Skip("the addmm update is the dropout-free path")
        return EnvLoRA(fused, "addmm")
    return fused


def _work(provider, mode, T, n_in, n_out, r, p, dtype, device="cuda"):
    def make():
        torch.manual_seed(0)
        module = _module(provider, n_in, n_out, r, p, dtype, device).train(mode != "inference")
        es = torch.finfo(dtype).bits // 8
        n = input_sets_for((T * n_in + T * n_out) * es)
        train = mode != "inference"
        xs = [torch.randn(T, n_in, device=device, dtype=dtype).requires_grad_(train) for _ in range(n)]
        grad = torch.randn(T, n_out, device=device, dtype=dtype)
        return mode_work(mode, lambda i: module(xs[i]), grad, lambda i: [xs[i], *module.parameters()], n)

    return make


def _ideal(mode, T, n_in, n_out, r, es):
    w = n_in * n_out * es
    small = (r * (n_in + n_out) + T * r) * es
    fwd = (T * n_in + T * n_out) * es + w + small
    bwd = (T * n_out + 2 * T * n_in) * es + w + 2 * small
    return {"inference": fwd - T * r * es, "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _flops(mode, T, n_in, n_out, r):
    fwd = 2 * T * n_in * n_out + 2 * T * r * (n_in + n_out)
    bwd = 2 * T * n_in * n_out + 4 * T * r * (n_in + n_out)
    return {"inference": fwd, "forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# ---------------------------------------------------------------- multi-adapter


def _multi_work(provider, T, L, n, r, dtype, device="cuda"):
    def make():
        torch.manual_seed(0)
        x = torch.randn(T, n, device=device, dtype=dtype)
        w = torch.randn(n, n, device=device, dtype=dtype) * n**-0.5
        b = torch.randn(n, device=device, dtype=dtype) * 0.1
        A = torch.randn(L, r, n, device=device, dtype=dtype) * n**-0.5
        B = torch.randn(L, n, r, device=device, dtype=dtype) * r**-0.5
        ids = torch.randint(0, L, (T,), device=device)
        scalings = torch.full((L,), 2.0, device=device)
        if provider == "peftkern":

            def step(i):
                with torch.no_grad():
                    return peftkern.ops.lora_linear_multi(x, w, b, A, B, ids, scalings=scalings)
        else:

            def step(i):  # eager: one gather, two matmuls and a scatter per adapter
                with torch.no_grad():
                    out = F.linear(x, w, b)
                    for a in range(L):
                        idx = (ids == a).nonzero(as_tuple=True)[0]
                        if idx.numel():
                            out.index_add_(0, idx, F.linear(F.linear(x[idx], A[a]), B[a]) * scalings[a])
                    return out

        return Work(step, None, 1)

    return make


# ---------------------------------------------------------------- peft interop


def _peft_interop_work(case, provider, mode, T, n, r, dtype, device="cuda"):
    """One peft lora.Linear (base n -> n) with the adapters `case` needs, peft's forward or fused
    (tests/test_peft_interop.py builds it on the CPU)."""

    def make():
        try:
            import peft
        except ImportError:
            raise Skip("peft not installed")
        from peftkern.integrations.peft import fuse

        torch.manual_seed(0)
        holder = nn.Module()
        holder.base = nn.Linear(n, n, device=device, dtype=dtype)
        config = dict(r=r, lora_alpha=2 * r, target_modules=["base"], use_dora=case == "dora")
        model = peft.get_peft_model(holder, peft.LoraConfig(**config))
        names = ["default"] + [f"a{i}" for i in range({"dora": 0, "two adapters": 1, "mixed 8": 7}[case])]
        for name in names[1:]:
            model.add_adapter(name, peft.LoraConfig(**config))
        layer = model.base_model.model.base
        with torch.no_grad():
            for name in names:
                layer.lora_B[name].weight.normal_(0, r**-0.5)  # a trained adapter, not B = 0
        if case == "two adapters":
            model.base_model.set_adapter(names)
        layer.to(dtype).train(mode != "inference")
        if provider == "peftkern" and len(fuse(model).fused) != 1:
            raise RuntimeError(f"{case}: the layer did not fuse")
        batch = 16 if case == "mixed 8" else 1
        es = torch.finfo(dtype).bits // 8
        n_sets = input_sets_for(2 * T * n * es) if device == "cuda" else 1
        train = mode != "inference"
        xs = [
            torch.randn(batch, T // batch, n, device=device, dtype=dtype).requires_grad_(train)
            for _ in range(n_sets)
        ]
        grad = torch.randn(batch, T // batch, n, device=device, dtype=dtype)
        kwargs = {"adapter_names": [names[i % len(names)] for i in range(batch)]} if case == "mixed 8" else {}
        return mode_work(
            mode, lambda i: layer(xs[i], **kwargs), grad, lambda i: [xs[i], *layer.parameters()], n_sets
        )

    return make


def _peft_interop_cases(dtype, es):
    T, n, r = 8192, 4096, 16
    runs = [("dora", m) for m in ("forward", "full", "inference")]
    runs += [("two adapters", m) for m in ("full", "inference")] + [("mixed 8", "inference")]
    for (case, mode), provider in itertools.product(runs, ("peft", "peftkern")):
        if case == "mixed 8":
            ideal, flops = (2 * T * n + n * n + 8 * 2 * n * r) * es, 2 * T * n * n + 4 * T * n * r
        else:
            rank = 2 * r if case == "two adapters" else r
            ideal = _ideal(mode, T, n, n, rank, es) + (n * n * es if case == "dora" else 0)
            flops = _flops(mode, T, n, n, rank)
        yield Case(
            "lora-peft",
            dict(case=case, tokens=T, n=n, r=r),
            dtype,
            mode,
            provider,
            _peft_interop_work(case, provider, mode, T, n, r, dtype),
            ideal,
            flops,
            tags={"baseline": True} if provider == "peft" else {},
        )


def cases(quick=False):
    dtype = torch.bfloat16
    es = 2
    providers = ("eager", "compile", "peft", "addmm", "peftkern", "peftkern-addmm")
    if quick:
        shapes = [(8192, 4096, 4096, 16, p) for p in (0.0, 0.1)]
    else:
        shapes = list(
            itertools.product((2048, 8192, 32768), ((4096, 4096), (4096, 14336)), (8, 16, 64), (0.0, 0.1))
        )
        shapes = [(T, io[0], io[1], r, p) for T, io, r, p in shapes]
    for (T, n_in, n_out, r, p), mode, provider in itertools.product(
        shapes, ("forward", "backward", "full", "inference"), providers
    ):
        if mode == "inference" and p > 0:
            continue  # dropout is off in inference: the p = 0 rows cover it
        yield Case(
            FAMILY,
            dict(tokens=T, n_in=n_in, n_out=n_out, r=r, dropout=p),
            dtype,
            mode,
            provider,
            _work(provider, mode, T, n_in, n_out, r, p, dtype),
            _ideal(mode, T, n_in, n_out, r, es),
            _flops(mode, T, n_in, n_out, r),
        )
    multi = [(4096, 64)] if quick else list(itertools.product((16, 256, 4096), (1, 8, 64)))
    n, r = 4096, 16
    for (T, L), provider in itertools.product(multi, ("eager", "peftkern")):
        ideal = (2 * T * n + n * n + min(L, T) * 2 * n * r) * es
        yield Case(
            "lora-multi",
            dict(tokens=T, adapters=L, n=n, r=r),
            dtype,
            "inference",
            provider,
            _multi_work(provider, T, L, n, r, dtype),
            ideal,
            2 * T * n * n + 4 * T * n * r,
        )
    yield from _peft_interop_cases(dtype, es)


def cpu_cases():
    """The CPU table (bench.run without a GPU): a MiniLM-sized LoRA layer (384 -> 384, r 8, float32)
    against eager and peft's lora.Linear; the multi-adapter op against the eager loop."""
    T, n, r, dtype = 1024, 384, 8, torch.float32
    runs = [("full", 0.0), ("full", 0.1), ("inference", 0.0)]
    for (mode, p), provider in itertools.product(runs, ("eager", "peft", "peftkern")):
        yield Case(
            FAMILY,
            dict(tokens=T, n_in=n, n_out=n, r=r, dropout=p),
            dtype,
            mode,
            provider,
            _work(provider, mode, T, n, n, r, p, dtype, "cpu"),
            _ideal(mode, T, n, n, r, 4),
            _flops(mode, T, n, n, r),
        )
    T, L = 256, 8
    for provider in ("eager", "peftkern"):
        yield Case(
            "lora-multi",
            dict(tokens=T, adapters=L, n=n, r=r),
            dtype,
            "inference",
            provider,
            _multi_work(provider, T, L, n, r, dtype, "cpu"),
            (2 * T * n + n * n + L * 2 * n * r) * 4,
            2 * T * n * n + 4 * T * n * r,
        )
