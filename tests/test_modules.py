"""What every op and module owes its caller, across the families: outputs that are fresh tensors
(not views), and checkpoints that round-trip into a fresh module."""

import io

import pytest
import torch
from torch import nn

import peftkern
from peftkern import ops

from .conftest import randn

# ---------------------------------------------------------------- fresh outputs


def op_calls():
    """(name, thunk) for every public op; each thunk returns the op's output."""
    x = randn(2, 3, 40, requires_grad=True)
    w, b = randn(24, 40), randn(24)
    scores = randn(24, 40)
    bits = ops.pack_mask(scores, 0.1)
    ids = torch.tensor([0, -1, 1, 0, 1, -1])
    q = randn(2, 4, 5, 8, requires_grad=True)
    k = v = randn(2, 2, 6, 8)
    pk = pv = randn(2, 3, 8)
    return [
        ("adapter", lambda: ops.adapter(x, randn(8, 40), randn(8), randn(40, 8), randn(40))),
        ("lora_linear", lambda: ops.lora_linear(x, w, b, randn(4, 40), randn(24, 4), scaling=2.0)),
        (
            "lora_linear_multi",
            lambda: ops.lora_linear_multi(
                x, w, b, randn(2, 4, 40), randn(2, 24, 4), ids, scalings=[1.0, 2.0]
            ),
        ),
        ("dropout_mask", lambda: ops.dropout_mask(x, torch.tensor([1, 2]), 0.5)),
        ("masked_linear", lambda: ops.masked_linear(x, w, b, scores, threshold=0.1)),
        ("masked_linear_packed", lambda: ops.masked_linear_packed(x, w, b, bits)),
        ("masked_linear_multi", lambda: ops.masked_linear_multi(x, w, b, torch.stack([bits, bits]), ids)),
        ("pack_mask", lambda: ops.pack_mask(scores, 0.1)),
        ("unpack_mask", lambda: ops.unpack_mask(bits, (24, 40))),
        ("prefix_attention", lambda: ops.prefix_attention(q, k, v, pk, pv, causal=True)),
    ]


@pytest.mark.parametrize("name", [n for n, _ in op_calls()])
def test_op_outputs_are_fresh_tensors(name):
    """A view output (of a buffer reshaped inside the op) warns under FSDP2, and an in-place op on
    it would skip FSDP's pre-backward hook; nn.Linear-like ops must return fresh tensors."""
    out = dict(op_calls())[name]()
    assert not out._is_view(), f"{name} returned a view"


def module_calls():
    """(name, module, thunk) for every module; thunk(module) runs its forward."""
    x = randn(2, 5, 32)
    pk, pv = randn(2, 3, 8), randn(2, 3, 8)
    return [
        ("Adapter", peftkern.nn.Adapter(32, 8), lambda m: m(x)),
        ("LoRALinear", peftkern.nn.LoRALinear(32, 16, 4), lambda m: m(x)),
        ("MaskedLinear", peftkern.nn.MaskedLinear(32, 16), lambda m: m(x)),
        ("PrefixKV", peftkern.nn.PrefixKV(2, 2, 8, 3), lambda m: m(1)[0]),
        ("PrefixKV.v", peftkern.nn.PrefixKV(2, 2, 8, 3), lambda m: m(1)[1]),
        ("PrefixKV projected", peftkern.nn.PrefixKV(2, 2, 8, 3, projection_dim=6), lambda m: m(0)[0]),
        (
            "PrefixSelfAttention",
            peftkern.nn.PrefixSelfAttention(32, 4, num_kv_heads=2),
            lambda m: m(x, pk, pv),
        ),
        ("SoftPrompt", peftkern.nn.SoftPrompt(3, 32), lambda m: m(x)[0]),
    ]


@pytest.mark.parametrize("name", [n for n, _, _ in module_calls()])
def test_module_outputs_are_fresh_tensors(name):
    _, module, call = next(c for c in module_calls() if c[0] == name)
    out = call(module)
    assert not out._is_view(), f"{name} returned a view"


# ---------------------------------------------------------------- checkpoints


def perturbed(module):
    """Every floating-point tensor of the state moved off its initial value, so a load that is skipped
    or partial shows in the output."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * (0.01 if name.endswith("scores") else 0.2))
    return module


def merged_lora():
    m = perturbed(peftkern.nn.LoRALinear(32, 16, 4, lora_alpha=8))
    m.merge()
    return m


def baked_mask():
    return perturbed(peftkern.nn.MaskedLinear(32, 16)).bake()


def frozen_prefix():
    m = perturbed(peftkern.nn.PrefixKV(2, 2, 8, 3, num_tasks=2, projection_dim=6))
    m.freeze_projection()
    return m


def inputs():
    """Drawn per test (after the seed fixture)."""
    return {
        "x": randn(2, 5, 32),
        "ids": torch.tensor([1, 0]),
        "prefix": (randn(2, 3, 8), randn(2, 3, 8)),
    }


# name -> (trained module factory, fresh module factory, forward(module, inputs))
CHECKPOINT_CASES = {
    "Adapter": (
        lambda: perturbed(peftkern.nn.Adapter(32, 8)),
        lambda: peftkern.nn.Adapter(32, 8),
        lambda m, i: m(i["x"]),
    ),
    "Adapter silu lora-init": (
        lambda: perturbed(peftkern.nn.Adapter(32, 8, activation="silu", scale=0.5, init="lora")),
        lambda: peftkern.nn.Adapter(32, 8, activation="silu", scale=0.5, init="lora"),
        lambda m, i: m(i["x"]),
    ),
    "LoRALinear with dropout (eval)": (
        lambda: perturbed(peftkern.nn.LoRALinear(32, 16, 4, lora_dropout=0.1, use_rslora=True)).eval(),
        lambda: peftkern.nn.LoRALinear(32, 16, 4, lora_dropout=0.1, use_rslora=True).eval(),
        lambda m, i: m(i["x"]),
    ),
    "LoRALinear from_linear": (
        lambda: perturbed(peftkern.nn.LoRALinear.from_linear(nn.Linear(32, 16, bias=False), 4)),
        lambda: peftkern.nn.LoRALinear(32, 16, 4, bias=False),
        lambda m, i: m(i["x"]),
    ),
    "LoRALinear merged": (
        merged_lora,
        lambda: peftkern.nn.LoRALinear(32, 16, 4, lora_alpha=8),
        lambda m, i: m(i["x"]),
    ),
    "MaskedLinear": (
        lambda: perturbed(peftkern.nn.MaskedLinear(32, 16)),
        lambda: peftkern.nn.MaskedLinear(32, 16),
        lambda m, i: m(i["x"]),
    ),
    "MaskedLinear bf16": (
        lambda: perturbed(
            peftkern.nn.MaskedLinear(32, 16, dtype=torch.bfloat16, scores_dtype=torch.bfloat16)
        ),
        lambda: peftkern.nn.MaskedLinear(32, 16, dtype=torch.bfloat16, scores_dtype=torch.bfloat16),
        lambda m, i: m(i["x"].bfloat16()),
    ),
    "baked mask": (baked_mask, lambda: nn.Linear(32, 16), lambda m, i: m(i["x"])),
    "PrefixKV per task": (
        lambda: perturbed(peftkern.nn.PrefixKV(2, 2, 8, 3, num_tasks=2)),
        lambda: peftkern.nn.PrefixKV(2, 2, 8, 3, num_tasks=2),
        lambda m, i: torch.stack(m(1, i["ids"])),
    ),
    "PrefixKV projected": (
        lambda: perturbed(peftkern.nn.PrefixKV(2, 2, 8, 3, num_tasks=2, projection_dim=6)),
        lambda: peftkern.nn.PrefixKV(2, 2, 8, 3, num_tasks=2, projection_dim=6),
        lambda m, i: torch.stack(m(1, i["ids"])),
    ),
    "PrefixKV frozen projection": (
        frozen_prefix,
        lambda: peftkern.nn.PrefixKV(2, 2, 8, 3, num_tasks=2),  # a frozen one loads as plain prefixes
        lambda m, i: torch.stack(m(1, i["ids"])),
    ),
    "PrefixSelfAttention": (
        lambda: perturbed(peftkern.nn.PrefixSelfAttention(32, 4, num_kv_heads=2, causal=True)),
        lambda: peftkern.nn.PrefixSelfAttention(32, 4, num_kv_heads=2, causal=True),
        lambda m, i: m(i["x"], *i["prefix"]),
    ),
    "SoftPrompt per task": (
        lambda: perturbed(peftkern.nn.SoftPrompt(3, 32, num_tasks=2)),
        lambda: peftkern.nn.SoftPrompt(3, 32, num_tasks=2),
        lambda m, i: m(i["x"], task_ids=i["ids"])[0],
    ),
}


def saved_and_loaded(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


@pytest.mark.parametrize("via", ["state_dict", "torch.save"])
@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_checkpoint_round_trip_into_a_fresh_module(case, via):
    make_trained, make_fresh, forward = CHECKPOINT_CASES[case]
    trained = make_trained()
    fresh = make_fresh()
    i = inputs()
    with torch.no_grad():
        want = forward(trained, i)
        assert not torch.equal(forward(fresh, i), want), "a fresh module already equals the trained one"
        state = trained.state_dict()
        fresh.load_state_dict(saved_and_loaded(state) if via == "torch.save" else state)
        assert torch.equal(forward(fresh, i), want)
    for (name, a), b in zip(trained.named_parameters(), fresh.parameters()):
        assert a.requires_grad == b.requires_grad or case == "PrefixKV frozen projection", name


def test_merged_lora_checkpoint_marks_the_layer_merged():
    """The merged weight already holds the update: a loaded merged checkpoint must not add it again,
    and loading an unmerged checkpoint into a merged layer unmerges the flag with the weight."""
    trained = merged_lora()
    assert "merged" in trained.state_dict()
    fresh = peftkern.nn.LoRALinear(32, 16, 4, lora_alpha=8)
    assert set(fresh.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    fresh.load_state_dict(trained.state_dict())
    assert fresh.merged
    fresh.load_state_dict(peftkern.nn.LoRALinear(32, 16, 4, lora_alpha=8).state_dict())
    assert not fresh.merged
