"""peftkern.ops.lora_linear, peftkern.nn.LoRALinear and the peft interop against eager formulas."""

import math

import pytest
import torch
from torch import nn

from peftkern.nn import LoRALinear
from peftkern.ops import dora_linear, dora_weight_norm, dropout_mask, lora_linear, lora_linear_multi

from . import reference as ref
from .conftest import (
    DEVICES,
    assert_close,
    check_against_reference,
    count_cuda_syncs,
    poison_cuda_cache,
    randn,
)
from .test_adapter import dtypes_for

NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def make_inputs(lead, n_in, n_out, r, dtype, device, bias=True, grad=("x", "lora_A", "lora_B")):
    t = dict(
        x=randn(*lead, n_in, dtype=dtype, device=device),
        weight=randn(n_out, n_in, dtype=dtype, device=device, scale=n_in**-0.5),
        bias=randn(n_out, dtype=dtype, device=device, scale=0.1) if bias else None,
        lora_A=randn(r, n_in, dtype=dtype, device=device, scale=n_in**-0.5),
        lora_B=randn(n_out, r, dtype=dtype, device=device, scale=r**-0.5),
    )
    for name in grad:
        if t[name] is not None:
            t[name].requires_grad_()
    return tuple(t[n] for n in NAMES)


def seeded_mask(inputs, scaling, p, seed):
    """The dropout mask lora_linear draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    detached = [None if t is None else t.detach() for t in inputs]
    _, _, seed_offset = torch.ops.peftkern.lora_linear_forward(*detached, scaling, p, True, False)
    return dropout_mask(inputs[0], seed_offset, p)


def check_lora(inputs, dtype, scaling=2.0, p=0.0, seed=0):
    mask = seeded_mask(inputs, scaling, p, seed) if p > 0 else None

    def fn(*ts):
        torch.manual_seed(seed)
        return lora_linear(*ts, scaling=scaling, dropout_p=p, training=True)

    def ref_fn(*ts):
        return ref.lora_linear(
            *ts, scaling, None if mask is None else mask.to(device="cpu", dtype=torch.float64)
        )

    return check_against_reference(fn, ref_fn, inputs, NAMES, dtype)


# ---------------------------------------------------------------- forward and every gradient

SHAPES = [  # (leading, in, out, r)
    ((1,), 33, 17, 1),
    ((7,), 33, 65, 8),
    ((1000,), 96, 40, 64),
    ((4, 250), 64, 128, 200),
    ((2, 3, 7), 768, 768, 16),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,n_in,n_out,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_forward_and_gradients(device, lead, n_in, n_out, r, p):
    for dtype in dtypes_for(device):
        inputs = make_inputs(lead, n_in, n_out, r, dtype, device, grad=NAMES)
        check_lora(inputs, dtype, scaling=0.5, p=p)


@pytest.mark.parametrize("device", DEVICES)
def test_no_bias_and_frozen_base(device):
    for dtype in dtypes_for(device):
        inputs = make_inputs((3, 21), 48, 56, 8, dtype, device, bias=False)
        check_lora(inputs, dtype, p=0.1)
        assert inputs[1].grad is None  # frozen weight: no gradient


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients_are_computed(device):
    x, w, b, A, B = make_inputs((9,), 24, 40, 4, torch.float32, device, grad=())
    u = torch.ops.peftkern.lora_linear_forward(x, w, b, A, B, 1.0, 0.0, True, True)[1]
    empty = torch.empty(0, dtype=torch.int64, device=device)
    grads = torch.ops.peftkern.lora_linear_backward(
        torch.randn(9, 40, device=device), x, w, A, B, u, empty, 1.0, 0.0, [False, False, False, True, False]
    )
    assert [g is None for g in grads] == [True, True, True, False, True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_zero_and_eval_are_exact(device):
    x, w, b, A, B = make_inputs((50,), 32, 24, 8, torch.float32, device, grad=())
    plain = lora_linear(x, w, b, A, B, scaling=1.5, dropout_p=0.0)
    assert torch.equal(lora_linear(x, w, b, A, B, scaling=1.5, dropout_p=0.4, training=False), plain)
    assert_close(plain, ref.lora_linear(*(ref.f64(t) for t in (x, w, b, A, B)), 1.5), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_follows_manual_seed(device):
    x, w, b, A, B = make_inputs((64,), 40, 24, 8, torch.float32, device, grad=())
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(lora_linear(x, w, b, A, B, scaling=1.0, dropout_p=0.5))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_statistics(device):
    p = 0.3
    x = torch.empty(512, 1001, device=device)
    torch.manual_seed(5)
    w, A, B = (
        torch.randn(8, 1001, device=device),
        torch.randn(4, 1001, device=device),
        torch.randn(8, 4, device=device),
    )
    _, _, seed_offset = torch.ops.peftkern.lora_linear_forward(x, w, None, A, B, 1.0, p, True, False)
    m = dropout_mask(x, seed_offset, p)
    assert m.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])
    kept = (m > 0).double().mean().item()
    n = m.numel()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma
    # independent across rows and columns: no row or column is all kept or all dropped
    assert 0 < (m > 0).double().mean(0).min() and (m > 0).double().mean(0).max() < 1
    assert 0 < (m > 0).double().mean(1).min() and (m > 0).double().mean(1).max() < 1


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_seen_through_the_op(device, p):
    """The dropout lora_linear applies, read off its own output and gradient: with W = 0 and
    A = B = I the op computes dropout(x), and its gradient to x is the mask itself."""
    rows, n = 2000, 64
    x = torch.ones(rows, n, device=device, requires_grad=True)
    w = torch.zeros(n, n, device=device)
    eye = torch.eye(n, device=device)

    def call():
        return lora_linear(x, w, None, eye, eye, scaling=1.0, dropout_p=p)

    torch.manual_seed(3)
    out = call()
    kept = out != 0
    # kept values are scaled by 1 / (1 - p), dropped ones are exactly 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)), rtol=1e-6, atol=0)
    # the keep rate lies within binomial bounds (5 sigma)
    count = out.numel()
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / count)
    # the backward regenerates the same mask: d out / d x is the factor the forward applied
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, out.detach())
    # the mask follows torch.manual_seed and differs from one call to the next
    again = call().detach()
    torch.manual_seed(3)
    assert torch.equal(call().detach(), out.detach())
    assert not torch.equal(again, out.detach())
    torch.manual_seed(4)
    assert not torch.equal(call().detach(), out.detach())


def test_gradcheck_float64():
    for p in (0.0, 0.3):
        inputs = make_inputs((2, 3), 6, 5, 3, torch.float64, "cpu", grad=NAMES)

        def fn(*ts):
            torch.manual_seed(0)  # the same mask at every evaluation
            return lora_linear(*ts, scaling=0.7, dropout_p=p)

        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        for p in (0.0, 0.2):
            x, w, b, A, B = make_inputs((3, 5), 24, 16, 8, dtype, device, grad=NAMES)
            torch.library.opcheck(
                torch.ops.peftkern.lora_linear_forward.default, (x, w, b, A, B, 0.5, p, True, True)
            )
            _, u, so = torch.ops.peftkern.lora_linear_forward(x, w, b, A, B, 0.5, p, True, True)
            g = torch.randn(3, 5, 16, dtype=dtype, device=device)
            args = (
                g,
                x.detach(),
                w.detach(),
                A.detach(),
                B.detach(),
                u.detach(),
                so,
                0.5,
                p,
                [True, False, False, True, True],
            )
            torch.library.opcheck(torch.ops.peftkern.lora_linear_backward.default, args)
            if p > 0:
                torch.library.opcheck(torch.ops.peftkern.dropout_mask.default, (x.detach(), so, p))


# ---------------------------------------------------------------- bad input


def call(**kw):
    x, w, b, A, B = make_inputs((4,), 32, 16, 8, torch.float32, "cpu", grad=())
    args = dict(x=x, weight=w, bias=b, lora_A=A, lora_B=B)
    opts = dict(scaling=1.0)
    for k, v in kw.items():
        (opts if k in ("scaling", "dropout_p", "training") else args)[k] = v
    return lora_linear(*(args[n] for n in NAMES), **opts)


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (
            dict(lora_B=torch.randn(16, 7)),
            ValueError,
            r"lora_B must have shape \[out_features, r\] = \[16, 8\]",
        ),
        (
            dict(lora_A=torch.randn(8, 31)),
            ValueError,
            r"lora_A must have shape \[r, in_features\] with r >= 1 and in_features = 32",
        ),
        (
            dict(weight=torch.randn(16, 31)),
            ValueError,
            r"weight must have shape \[out_features, in_features\] with in_features = 32",
        ),
        (
            dict(weight=torch.randn(15, 32), bias=None),
            ValueError,
            r"lora_B must have shape \[out_features, r\] = \[15, 8\]",
        ),
        (dict(bias=torch.randn(17)), ValueError, r"bias must have shape \[out_features\] = \[16\]"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\); got 1"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\); got -0.1"),
        (dict(dropout_p=1.5, training=False), ValueError, r"dropout_p must be in \[0, 1\)"),
        (
            dict(lora_A=torch.randn(8, 32, dtype=torch.float64)),
            TypeError,
            r"lora_A has dtype Double but x has dtype Float",
        ),
        (dict(x=torch.randint(0, 3, (4, 32))), TypeError, r"x must be a floating-point tensor"),
    ],
)
def test_bad_input(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        call(**kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_checks_the_dropout_seed(device):
    """A direct backward call with dropout_p > 0 must hold the forward's (seed, offset): an eval-mode
    forward's empty seed_offset, a wrong dtype or another device raise instead of reading it."""
    x, w, b, A, B = make_inputs((9,), 24, 40, 4, torch.float32, device, grad=())
    u = torch.ops.peftkern.lora_linear_forward(x, w, b, A, B, 1.0, 0.0, False, True)[1]
    g = torch.randn(9, 40, device=device)
    need = [True, False, False, True, True]
    bad_seeds = [
        torch.empty(0, dtype=torch.int64, device=device),
        torch.zeros(2, dtype=torch.int32, device=device),
        torch.zeros(3, dtype=torch.int64, device=device),
    ]
    if device == "cuda":
        bad_seeds.append(torch.zeros(2, dtype=torch.int64))
    for bad in bad_seeds:
        with pytest.raises(
            ValueError, match=r"with dropout_p > 0, seed_offset must be the forward's int64 \[2\]"
        ):
            torch.ops.peftkern.lora_linear_backward(g, x, w, A, B, u, bad, 1.0, 0.1, need)


def test_dropout_mask_checks_its_arguments():
    x = torch.empty(4, 8)
    so = torch.tensor([3, 4])
    with pytest.raises(ValueError, match=r"dropout_mask: p must be in \[0, 1\); got 1"):
        dropout_mask(x, so, 1.0)
    with pytest.raises(ValueError, match=r"dropout_mask: seed_offset must be int64 \[2\]"):
        dropout_mask(x, so.int(), 0.5)
    # a strided seed_offset is read by value, not by its storage
    strided = torch.tensor([3, 99, 4, 99])[::2]
    assert torch.equal(dropout_mask(x, strided, 0.5), dropout_mask(x, so, 0.5))


@pytest.mark.cuda
def test_bad_input_wrong_device():
    x, w, b, A, B = make_inputs((4,), 32, 16, 8, torch.float32, "cuda", grad=())
    with pytest.raises(ValueError, match=r"lora_A is on cpu but x is on cuda:0"):
        lora_linear(x, w, b, A.cpu(), B, scaling=1.0)
    with pytest.raises(ValueError, match=r"weight is on cpu but x is on cuda:0"):
        lora_linear(x, w.cpu(), b, A, B, scaling=1.0)


# ---------------------------------------------------------------- CUDA specifics


@pytest.mark.cuda
@pytest.mark.parametrize(
    "lead,n_in,n_out,r",
    [
        ((1,), 4096, 4096, 16),
        ((130,), 4096, 14336, 8),
        ((257,), 520, 72, 64),
        ((64,), 36, 1000, 256),
        ((33,), 100, 100, 33),
        ((3, 100), 768, 512, 128),
    ],
)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_kernel_shapes(lead, n_in, n_out, r, p):
    for dtype in dtypes_for("cuda"):
        inputs = make_inputs(lead, n_in, n_out, r, dtype, "cuda", grad=("x", "lora_A", "lora_B"))
        poison_cuda_cache()
        check_lora(inputs, dtype, scaling=0.5, p=p, seed=3)


@pytest.mark.cuda
def test_cuda_same_mask_as_cpu():
    """The CPU and CUDA paths generate one mask from one (seed, offset)."""
    x = torch.randn(37, 70)
    so = torch.tensor([123456789, 8], dtype=torch.int64)
    assert torch.equal(dropout_mask(x, so, 0.4), dropout_mask(x.cuda(), so.cuda(), 0.4).cpu())


@pytest.mark.cuda
def test_cuda_addmm_update_matches_fused(monkeypatch):
    inputs = make_inputs((300,), 256, 384, 16, torch.bfloat16, "cuda", grad=())
    fused = lora_linear(*inputs, scaling=2.0)
    monkeypatch.setenv("PEFTKERN_LORA_UPDATE", "addmm")
    assert_close(lora_linear(*inputs, scaling=2.0), fused.double(), torch.bfloat16)


@pytest.mark.cuda
def test_cuda_graph_capture_with_dropout():
    """Inside a CUDA graph every replay draws a new mask (seed/offset read on device)."""
    x, w, b, A, B = make_inputs((128,), 64, 64, 8, torch.float32, "cuda", grad=())
    lora_linear(x, w, b, A, B, scaling=1.0, dropout_p=0.5)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_linear(x, w, b, A, B, scaling=1.0, dropout_p=0.5)
    graph.replay()
    first = out.clone()
    graph.replay()
    assert not torch.equal(first, out)


# ---------------------------------------------------------------- the module


def test_module_init_is_base_linear():
    torch.manual_seed(0)
    m = LoRALinear(64, 32, 8, lora_alpha=16)
    assert m.scaling == 2.0 and torch.count_nonzero(m.lora_B) == 0
    assert not m.weight.requires_grad and not m.bias.requires_grad and m.lora_A.requires_grad
    bound = 1 / math.sqrt(64)
    assert m.lora_A.abs().max() <= bound and m.lora_A.std() > bound / 3
    x = torch.randn(5, 64)
    assert torch.allclose(m(x), nn.functional.linear(x, m.weight, m.bias), atol=1e-6)
    assert LoRALinear(64, 32, 16, lora_alpha=8, use_rslora=True).scaling == 8 / 4


def test_module_from_linear_shares_weight():
    linear = nn.Linear(20, 12)
    m = LoRALinear.from_linear(linear, 4, lora_alpha=8, lora_dropout=0.1)
    assert m.weight is linear.weight and m.bias is linear.bias and not linear.weight.requires_grad
    assert m.lora_A.shape == (4, 20) and m.lora_B.shape == (12, 4) and m.lora_A.dtype == linear.weight.dtype
    assert set(m.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


def test_module_trains_and_freezes_base():
    torch.manual_seed(0)
    m = LoRALinear(24, 16, 4, lora_alpha=8)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(10, 24, requires_grad=True)
    out = m(x)
    leaves = [ref.f64(t) for t in (x, m.weight, m.bias, m.lora_A, m.lora_B)]
    expected = ref.lora_linear(*leaves, m.scaling)
    assert_close(out, expected, torch.float32)
    out.sum().backward()
    expected.sum().backward()
    assert m.weight.grad is None and m.bias.grad is None
    assert_close(m.lora_A.grad, leaves[3].grad, torch.float32, "grad lora_A")
    assert_close(x.grad, leaves[0].grad, torch.float32, "grad x")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_module_merge_unmerge_round_trip(dtype, tol):
    torch.manual_seed(0)
    m = LoRALinear(32, 24, 8, lora_alpha=16, dtype=dtype).eval()
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
    x = torch.randn(6, 32, dtype=dtype)
    w0 = m.weight.detach().clone()
    y = m(x)
    m.merge()
    assert m.merged
    assert_close(m(x), y.double(), dtype, "merged forward", tol=max(tol, 1e-5))
    m.merge()  # idempotent
    m.unmerge()
    assert not m.merged
    assert_close(m.weight, w0.double(), dtype, "weight after unmerge", tol=tol)
    assert_close(m(x), y.double(), dtype, "unmerged forward", tol=max(tol, 1e-5))


def test_module_repr_dropout_and_bad_args():
    m = LoRALinear(8, 4, 2, lora_dropout=0.5, bias=False)
    assert "in_features=8, out_features=4, r=2" in repr(m) and "merged=False" in repr(m)
    m.train()
    x = torch.randn(200, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        m.lora_B.normal_()
    a = m(x)
    m.eval()
    assert not torch.equal(a, m(x))  # dropout only in training
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        LoRALinear(8, 4, 2, lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"r must be in \[1, "):
        LoRALinear(8, 4, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_module_compiles_fullgraph(device):
    torch._dynamo.reset()
    m = LoRALinear(40, 24, 8, lora_dropout=0.0).to(device)
    with torch.no_grad():
        m.lora_B.normal_(0, 0.1)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    x = torch.randn(3, 7, 40, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, out_c = m(x), compiled(x2)
    assert torch.allclose(out, out_c, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    ga = m.lora_A.grad.clone()
    m.zero_grad()
    out_c.square().sum().backward()
    assert torch.allclose(m.lora_A.grad, ga, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- multi-adapter batches


def make_multi(lead, n_in, n_out, r, L, dtype, device, none_fraction=0.2):
    x = randn(*lead, n_in, dtype=dtype, device=device, requires_grad=True)
    w = randn(n_out, n_in, dtype=dtype, device=device, scale=n_in**-0.5)
    b = randn(n_out, dtype=dtype, device=device, scale=0.1)
    A = randn(L, r, n_in, dtype=dtype, device=device, scale=n_in**-0.5, requires_grad=True)
    B = randn(L, n_out, r, dtype=dtype, device=device, scale=r**-0.5, requires_grad=True)
    tokens = x.numel() // n_in
    ids = torch.randint(0, L, (tokens,), device=device)
    ids[torch.rand(tokens, device=device) < none_fraction] = -1
    scalings = torch.rand(L, device=device) + 0.5
    return (x, w, b, A, B), ids, scalings


def check_multi(inputs, ids, scalings, dtype):
    def fn(x, w, b, A, B):
        return lora_linear_multi(x, w, b, A, B, ids, scalings=scalings)

    def ref_fn(x, w, b, A, B):
        return ref.lora_linear_multi(x, w, b, A, B, ids, scalings.double())

    return check_against_reference(fn, ref_fn, inputs, NAMES, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,L,r", [((1,), 1, 4), ((7,), 3, 8), ((200,), 8, 16), ((2, 50), 5, 1)])
def test_multi_matches_per_token_loop(device, lead, L, r):
    for dtype in dtypes_for(device):
        inputs, ids, scalings = make_multi(lead, 40, 24, r, L, dtype, device)
        check_multi(inputs, ids, scalings, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_no_adapter_is_the_base_linear(device):
    (x, w, b, A, B), ids, scalings = make_multi((30,), 16, 12, 4, 3, torch.float32, device)
    ids = torch.full_like(ids, -1)
    assert torch.equal(
        lora_linear_multi(x, w, b, A, B, ids, scalings=scalings), nn.functional.linear(x, w, b)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_multi_with_one_adapter_is_lora_linear(device):
    (x, w, b, A, B), ids, _ = make_multi((33,), 16, 12, 4, 1, torch.float32, device, none_fraction=0.0)
    multi = lora_linear_multi(x, w, b, A, B, ids, scalings=[0.75])
    assert torch.allclose(multi, lora_linear(x, w, b, A[0], B[0], scaling=0.75), rtol=1e-5, atol=1e-6)


def test_multi_gradcheck_float64():
    (x, w, b, A, B), ids, scalings = make_multi((6,), 5, 4, 2, 3, torch.float64, "cpu")
    w.requires_grad_()
    fn = lambda x, w, b, A, B: lora_linear_multi(x, w, b, A, B, ids, scalings=scalings)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, A, B))


@pytest.mark.parametrize("device", DEVICES)
def test_multi_opcheck(device):
    (x, w, b, A, B), ids, scalings = make_multi((9,), 16, 8, 4, 3, torch.float32, device)
    torch.library.opcheck(
        torch.ops.peftkern.lora_linear_multi_forward.default, (x, w, b, A, B, ids, scalings)
    )
    g = torch.randn(9, 8, device=device)
    torch.library.opcheck(
        torch.ops.peftkern.lora_linear_multi_backward.default,
        (g, x.detach(), w, A.detach(), B.detach(), ids, scalings, [True, False, False, True, True]),
    )


def test_multi_bad_input():
    (x, w, b, A, B), ids, scalings = make_multi((6,), 8, 4, 2, 3, torch.float32, "cpu")
    with pytest.raises(
        ValueError, match=r"adapter_ids must be in \[-1, L\) = \[-1, 3\); got values in \[-1, 3\]"
    ):
        lora_linear_multi(x, w, b, A, B, torch.tensor([0, 1, 2, 3, -1, 0]), scalings=scalings)
    with pytest.raises(
        ValueError, match=r"adapter_ids must be in \[-1, L\) = \[-1, 3\); got values in \[-2, 1\]"
    ):
        lora_linear_multi(x, w, b, A, B, torch.tensor([0, 1, -2, 1, -1, 0]), scalings=scalings)
    with pytest.raises(TypeError, match=r"adapter_ids must be an int32 or int64 tensor; got Float"):
        lora_linear_multi(x, w, b, A, B, ids.float(), scalings=scalings)
    with pytest.raises(ValueError, match=r"adapter_ids must have shape \[tokens\] = \[6\]"):
        lora_linear_multi(x, w, b, A, B, ids[:5], scalings=scalings)
    with pytest.raises(ValueError, match=r"scalings must have shape \[L\] = \[3\]"):
        lora_linear_multi(x, w, b, A, B, ids, scalings=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"lora_B must have shape \[L, out_features, r\] = \[3, 4, 2\]"):
        lora_linear_multi(x, w, b, A, B[:2], ids, scalings=scalings)
    with pytest.raises(
        ValueError, match=r"lora_A must have shape \[L, r, in_features\] with in_features = 8"
    ):
        lora_linear_multi(x, w, b, A[0], B, ids, scalings=scalings)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "tokens,L,r", [(16, 1, 16), (256, 8, 16), (4096, 64, 16), (1000, 7, 200), (130, 3, 33)]
)
def test_cuda_multi_kernel(tokens, L, r):
    for dtype in dtypes_for("cuda"):
        inputs, ids, scalings = make_multi((tokens,), 256, 136, r, L, dtype, "cuda")
        poison_cuda_cache()
        out = lora_linear_multi(*inputs, ids, scalings=scalings)
        expected = ref.lora_linear_multi(*(ref.f64(t) for t in inputs), ids, scalings.double())
        assert_close(out, expected, dtype)


@pytest.mark.cuda
def test_cuda_multi_in_graph_capture():
    inputs, ids, scalings = make_multi((300,), 64, 64, 8, 4, torch.float16, "cuda")
    x, w, b, A, B = (t.detach() for t in inputs)
    lora_linear_multi(x, w, b, A, B, ids, scalings=scalings)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_linear_multi(x, w, b, A, B, ids, scalings=scalings)
    ids.copy_(torch.randint(-1, 4, ids.shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(
        out,
        ref.lora_linear_multi(*(ref.f64(t) for t in (x, w, b, A, B)), ids, scalings.double()),
        torch.float16,
    )


@pytest.mark.cuda
def test_cuda_multi_reads_the_ids_with_one_sync():
    """The ids' range check costs one device-to-host copy (it used to take three), and the fused
    forward none besides."""
    inputs, ids, scalings = make_multi((300,), 64, 64, 8, 4, torch.float16, "cuda")
    x, w, b, A, B = (t.detach() for t in inputs)
    assert count_cuda_syncs(lambda: lora_linear_multi(x, w, b, A, B, ids, scalings=scalings)) == 1


# ---------------------------------------------------------------- DoRA (composite over lora_linear)

DORA_NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")


def make_dora_inputs(lead, n_in, n_out, r, dtype, device, bias=True, grad=DORA_NAMES):
    x, w, b, A, B = make_inputs(lead, n_in, n_out, r, dtype, device, bias=bias, grad=())
    # a magnitude near the row norms, as DoRA starts, but not equal to them
    m = (torch.linalg.vector_norm(w.float(), dim=1) * (1 + 0.3 * torch.rand(n_out, device=device))).to(dtype)
    inputs = (x, w, b, A, B, m)
    return tuple(t if t is None or n not in grad else t.requires_grad_() for n, t in zip(DORA_NAMES, inputs))


@pytest.mark.parametrize("device", DEVICES)
def test_dora_weight_norm_matches_the_materialised_norm(device):
    for n_in, n_out, r in ((33, 17, 1), (129, 64, 8), (7, 200, 16)):
        _, w, _, A, B = make_inputs((1,), n_in, n_out, r, torch.float32, device, grad=())
        expected = torch.linalg.vector_norm(w.double() + 1.7 * B.double() @ A.double(), dim=1)
        assert_close(dora_weight_norm(w, A, B, scaling=1.7), expected, torch.float32, "norm")
        # a Conv1D-style [in, out] weight goes in as its transposed view, and ‖W_i‖ may be given
        stored = w.t().contiguous()
        got = dora_weight_norm(stored.t(), A, B, scaling=1.7, weight_norm=torch.linalg.vector_norm(w, dim=1))
        assert_close(got, expected, torch.float32, "norm, transposed weight")
        assert got.dtype == torch.float32 and not got.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_dora_weight_norm_of_half_weights_keeps_float32_accuracy(device):
    """bf16 / fp16 weights: W·Aᵀ is accumulated and kept in float32 (not rounded to the weight's
    dtype), which matters where W + s·B·A is smaller than W (here about a third of it)."""
    n_in, n_out, r, s = 512, 64, 8, 1.0
    g = torch.Generator().manual_seed(0)
    A = torch.randn(r, n_in, generator=g) / n_in**0.5
    B = torch.randn(n_out, r, generator=g)
    w = -0.7 * s * B @ A + 0.3 * torch.randn(n_out, n_in, generator=g) / n_in**0.5
    A, B = A.to(device), B.to(device)
    for dtype in (torch.bfloat16, torch.float16):
        wd = w.to(device=device, dtype=dtype)
        expected = torch.linalg.vector_norm(wd.double() + s * B.double() @ A.double(), dim=1)
        got = dora_weight_norm(wd, A, B, scaling=s)
        assert_close(got, expected, torch.float32, f"norm, {dtype} weight", tol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_dora_weight_norm_of_a_fresh_adapter_is_the_row_norm_exactly(device):
    """B = 0: the result is torch.linalg.norm(W, dim=1) bit for bit, the value peft starts the
    magnitude at, so DoRA's scale is exactly 1. The square root of a norm's square is not always the
    norm again (a million one-element rows: a few are off by an ulp on this CPU), which the old
    sqrt(‖W_i‖² + 0) form returned."""
    for dtype in (torch.float32, torch.float64) if device == "cpu" else (torch.float32,):
        rows = torch.linspace(1, 4, 1_000_000, dtype=dtype, device=device)[:, None]
        for w in (rows, randn(1000, 1000, dtype=dtype, device=device)):
            A = randn(8, w.shape[1], dtype=dtype, device=device)
            B = torch.zeros(w.shape[0], 8, dtype=dtype, device=device)
            got = dora_weight_norm(w, A, B, scaling=2.0)
            assert torch.equal(got, torch.linalg.norm(w, dim=1)), (
                (got - torch.linalg.norm(w, dim=1)).abs().max()
            )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(10,), (2, 5)], ids=["2d", "3d"])
def test_dora_linear_of_a_fresh_adapter_is_the_base_linear(device, lead):
    """DoRA's init (B = 0, magnitude = ‖W_i‖): F.linear(x, W, b) under torch.allclose's defaults,
    whose absolute tolerance (1e-8) meets outputs near 0. A bias added after the GEMM rounds apart
    from F.linear's, which adds it inside (1000 inputs: the GEMM sums in blocks)."""
    for dtype in (torch.float32, torch.float64) if device == "cpu" else (torch.float32,):
        for bias in (True, False):
            x, w, b, A, _ = make_inputs(lead, 1000, 1000, 8, dtype, device, bias=bias, grad=())
            x = torch.rand_like(x)  # peft's check feeds torch.rand
            B = torch.zeros(1000, 8, dtype=dtype, device=device)
            out = dora_linear(x, w, b, A, B, torch.linalg.norm(w, dim=1), scaling=2.0)
            expected = torch.nn.functional.linear(x, w, b)
            assert torch.allclose(out, expected), (dtype, bias, (out - expected).abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "lead,n_in,n_out,r", [((7,), 33, 17, 1), ((2, 5), 64, 129, 8), ((3, 1, 4), 40, 24, 16)]
)
def test_dora_linear_matches_reference(device, lead, n_in, n_out, r):
    for dtype in dtypes_for(device):
        for bias in (True, False):
            inputs = make_dora_inputs(lead, n_in, n_out, r, dtype, device, bias=bias)
            check_against_reference(
                lambda *ts: dora_linear(*ts, scaling=0.8),
                lambda *ts: ref.dora_linear(*ts, 0.8),
                inputs,
                DORA_NAMES,
                dtype,
            )


@pytest.mark.parametrize("device", DEVICES)
def test_dora_linear_with_dropout_matches_peft_form(device):
    """In training with dropout, peft's form: the base product on x and on dropout(x), the mask drawn
    by torch's generator as nn.Dropout draws it."""
    p = 0.3
    inputs = make_dora_inputs((6, 5), 48, 40, 8, torch.float32, device)
    torch.manual_seed(11)
    mask = torch.nn.functional.dropout(torch.ones_like(inputs[0]), p)

    def fn(*ts):
        torch.manual_seed(11)
        return dora_linear(*ts, scaling=1.3, dropout_p=p)

    out = check_against_reference(
        fn, lambda *ts: ref.dora_linear(*ts, 1.3, mask.double().cpu()), inputs, DORA_NAMES, torch.float32
    )
    assert not torch.allclose(out, dora_linear(*inputs, scaling=1.3, dropout_p=p, training=False))


def test_dora_gradcheck_float64():
    """To the inputs the detached norm does not depend on (the reference test checks the others: a
    numerical gradient would follow the norm through weight, lora_A and lora_B)."""
    for p in (0.0, 0.4):
        inputs = make_dora_inputs((2, 3), 6, 5, 3, torch.float64, "cpu", grad=("x", "bias", "magnitude"))

        def fn(*ts):
            torch.manual_seed(0)
            return dora_linear(*ts, scaling=0.7, dropout_p=p)

        assert torch.autograd.gradcheck(fn, inputs)


def test_dora_bad_input():
    x, w, b, A, B, m = make_dora_inputs((3,), 8, 6, 2, torch.float32, "cpu", grad=())
    cases = [
        (
            dict(magnitude=m[:5]),
            r"dora_linear: magnitude must have shape \[out_features\] = \[6\]; got \(5,\)",
        ),
        (dict(bias=b[:2]), r"dora_linear: bias must have shape \[out_features\] = \[6\]; got \(2,\)"),
        (dict(bias=b.double()), r"dora_linear: bias must have x's dtype torch.float32; got torch.float64"),
        (dict(lora_B=B[:, :1]), r"dora_weight_norm: expected weight \[out, in\], lora_A \[r, in\], lora_B"),
        (dict(weight_norm=m[:2]), r"dora_weight_norm: weight_norm must be \[6\]; got \(2,\)"),
    ]
    for change, message in cases:
        args = dict(x=x, weight=w, bias=b, lora_A=A, lora_B=B, magnitude=m, weight_norm=None)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            dora_linear(**args, scaling=1.0)
    for p in (1.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"dora_linear: dropout_p must be in \[0, 1\); got"):
            dora_linear(x, w, b, A, B, m, scaling=1.0, dropout_p=p)
    with pytest.raises(
        ValueError, match=r"dora_linear: weight must have shape \[out_features, in_features\]"
    ):
        dora_linear(x, w[0], b, A, B, m, scaling=1.0)
    with pytest.raises(TypeError, match=r"dora_linear: x must be a floating-point tensor; got torch.int64"):
        dora_linear(x.long(), w, b, A, B, m, scaling=1.0)
    with pytest.raises(TypeError, match=r"dora_linear: magnitude must be a tensor; got list"):
        dora_linear(x, w, b, A, B, [1.0] * 6, scaling=1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_transposed_weight_view_is_not_copied(device):
    """A Conv1D base keeps its weight [in, out]; lora_linear takes the .t() view by strides: right
    values and gradients, and no out x in copy in the forward or the backward."""
    x, w, b, A, B = make_inputs((4, 9), 96, 80, 8, torch.float32, device)
    stored = w.detach().t().contiguous().requires_grad_()  # [in, out], as Conv1D stores it

    def fn(x, stored, b, A, B):
        return lora_linear(x, stored.t(), b, A, B, scaling=2.0)

    check_against_reference(
        fn,
        lambda x, s, b, A, B: ref.lora_linear(x, s.t(), b, A, B, 2.0),
        (x, stored, b, A, B),
        NAMES,
        torch.float32,
    )
    stored.requires_grad_(False)
    with torch.profiler.profile(record_shapes=True) as prof:
        lora_linear(x, stored.t(), b, A, B, scaling=2.0).sum().backward()
    copies = [e for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert not [e for e in copies if list(stored.shape) in e.input_shapes or [80, 96] in e.input_shapes]


# ---------------------------------------------------------------- the per-row gate (UniPELT)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "lead,n_in,n_out,r", [((7,), 33, 65, 8), ((1000,), 96, 40, 64), ((2, 3, 7), 768, 768, 16)]
)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gate_forward_and_every_gradient(device, lead, n_in, n_out, r, p):
    for dtype in dtypes_for(device):
        inputs = make_inputs(lead, n_in, n_out, r, dtype, device, grad=NAMES)
        gate = (
            torch.sigmoid(randn(*lead, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_()
        )
        mask = seeded_mask(inputs, 0.5, p, 3) if p > 0 else None

        def fn(*ts):
            torch.manual_seed(3)
            return lora_linear(*ts[:5], scaling=0.5, dropout_p=p, training=True, gate=ts[5])

        def ref_fn(*ts):
            m = None if mask is None else mask.to(device="cpu", dtype=torch.float64)
            return ref.lora_linear(*ts[:5], 0.5, m, gate=ts[5])

        check_against_reference(fn, ref_fn, (*inputs, gate), (*NAMES, "gate"), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_gradient_alone(device):
    """A frozen LoRA with a trained gate: the gate's gradient alone (on CUDA, the rows pass only)."""
    for dtype in dtypes_for(device):
        inputs = make_inputs((41,), 24, 40, 4, dtype, device, grad=())
        gate = torch.sigmoid(randn(41, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_()

        def fn(*ts):
            return lora_linear(*ts[:5], scaling=2.0, gate=ts[5])

        def ref_fn(*ts):
            return ref.lora_linear(*ts[:5], 2.0, gate=ts[5])

        check_against_reference(fn, ref_fn, (*inputs, gate), (*NAMES, "gate"), dtype)


def test_gate_gradcheck_float64():
    x, w, b, A, B = make_inputs((2, 3), 5, 4, 2, torch.float64, "cpu", grad=NAMES)
    gate = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *t: lora_linear(*t[:5], scaling=0.7, gate=t[5]), (x, w, b, A, B, gate))


@pytest.mark.parametrize("device", DEVICES)
def test_gate_opcheck(device):
    x, w, b, A, B = make_inputs((3, 5), 24, 16, 8, torch.float32, device, grad=NAMES)
    gate = torch.rand(3, 5, device=device, requires_grad=True)
    torch.library.opcheck(
        torch.ops.peftkern.lora_linear_forward.default, (x, w, b, A, B, 0.5, 0.0, True, True, gate)
    )
    _, u, so = torch.ops.peftkern.lora_linear_forward(x, w, b, A, B, 0.5, 0.0, True, True, gate)
    g = torch.randn(3, 5, 16, device=device)
    detached = [t.detach() for t in (x, w, A, B, u)]
    args = (
        g,
        *detached[:4],
        detached[4],
        so,
        0.5,
        0.0,
        [True, False, False, True, True],
        gate.detach(),
        True,
    )
    torch.library.opcheck(torch.ops.peftkern.lora_linear_backward.default, args)


def test_gate_bad_input():
    x, w, b, A, B = make_inputs((4,), 8, 6, 2, torch.float32, "cpu", grad=())
    with pytest.raises(ValueError, match=r"lora_linear: gate must have x's shape without its last dimension"):
        lora_linear(x, w, b, A, B, scaling=1.0, gate=torch.rand(5))
    with pytest.raises(TypeError, match="lora_linear: gate must be a tensor or None"):
        lora_linear(x, w, b, A, B, scaling=1.0, gate=[0.5] * 4)
