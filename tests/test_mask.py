"""peftkern.ops.masked_linear (+ packed and multi-task), pack/unpack, peftkern.nn.MaskedLinear."""

import io

import pytest
import torch
from torch import nn

from peftkern.nn import MaskedLinear
from peftkern.ops import masked_linear, masked_linear_multi, masked_linear_packed, pack_mask, unpack_mask

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

NAMES = ("x", "weight", "bias", "scores")
THRESHOLD = 0.0


def make_inputs(lead, n_in, n_out, dtype, device, scores_dtype=torch.float32, grad=("x", "bias", "scores")):
    t = dict(
        x=randn(*lead, n_in, dtype=dtype, device=device),
        weight=randn(n_out, n_in, dtype=dtype, device=device, scale=n_in**-0.5),
        bias=randn(n_out, dtype=dtype, device=device, scale=0.1),
        scores=randn(n_out, n_in, dtype=scores_dtype, device=device),  # about half kept at threshold 0
    )
    for name in grad:
        t[name].requires_grad_()
    return tuple(t[n] for n in NAMES)


def check_masked(inputs, dtype, threshold=THRESHOLD):
    fn = lambda x, w, b, s: masked_linear(x, w, b, s, threshold=threshold)  # noqa: E731
    ref_fn = lambda x, w, b, s: ref.masked_linear(x, w, b, s, threshold)  # noqa: E731
    return check_against_reference(fn, ref_fn, inputs, NAMES, dtype)


# ---------------------------------------------------------------- forward and every gradient

SHAPES = [((1,), 33, 17), ((7,), 64, 40), ((1000,), 96, 72), ((4, 25), 768, 33), ((2, 3, 5), 31, 100)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,n_in,n_out", SHAPES)
def test_forward_and_gradients(device, lead, n_in, n_out):
    for dtype in dtypes_for(device):
        for scores_dtype in {torch.float32, dtype}:
            check_masked(make_inputs(lead, n_in, n_out, dtype, device, scores_dtype), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradient_when_not_frozen(device):
    for dtype in dtypes_for(device):
        check_masked(make_inputs((20,), 48, 24, dtype, device, grad=NAMES), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 5, 16, 17])
def test_inference_small_batches(device, tokens):
    """Up to 16 rows without a gradient, CUDA applies the mask while reading the weight."""
    for dtype in dtypes_for(device):
        x, w, b, s = make_inputs((tokens,), 200, 136, dtype, device, grad=())
        with torch.no_grad():
            out = masked_linear(x, w, b, s, threshold=0.3)
        assert_close(out, ref.masked_linear(*(ref.f64(t) for t in (x, w, b, s)), 0.3), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_is_strict(device):
    threshold = 0.25  # exactly representable in every float dtype
    for dtype in dtypes_for(device):
        w = torch.ones(3, 4, dtype=dtype, device=device)
        s = torch.tensor([[0.25, 0.5, 0.0, 0.25]] * 3, dtype=torch.float32, device=device)
        s[1, 0] = torch.nextafter(torch.tensor(0.25), torch.tensor(1.0)).item()  # just above: kept
        s[2, 3] = float("nan")  # dropped
        x = torch.eye(4, dtype=dtype, device=device)
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                out = masked_linear(x, w, None, s, threshold=threshold)
            kept = out.t().cpu().float()  # out[i, n] = w_eff[n, i]
            expected = torch.tensor([[0, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.float32)
            assert torch.equal(kept, expected)
        assert torch.equal(unpack_mask(pack_mask(s, threshold), (3, 4)).cpu(), expected.bool())


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients(device):
    x, w, b, s = make_inputs((6,), 40, 8, torch.float32, device, grad=())
    bits = torch.ops.peftkern.masked_linear_forward(x, w, b, s, 0.0, True)[1]
    grads = torch.ops.peftkern.masked_linear_backward(
        torch.randn(6, 8, device=device), x, w, s, bits, [False, False, False, True]
    )
    assert [g is None for g in grads] == [True, True, True, False]


def test_gradcheck_float64():
    # scores are left out: their straight-through gradient is by design not the derivative of the
    # step function (zero); the STE gradient is checked against the eager STE formula above.
    x, w, b, s = make_inputs(
        (3, 2), 9, 5, torch.float64, "cpu", scores_dtype=torch.float64, grad=("x", "weight", "bias")
    )
    fn = lambda x, w, b: masked_linear(x, w, b, s, threshold=0.1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b, s = make_inputs((3, 4), 40, 24, dtype, device, grad=NAMES)
        torch.library.opcheck(torch.ops.peftkern.masked_linear_forward.default, (x, w, b, s, 0.1, True))
        bits = torch.ops.peftkern.masked_linear_forward(x, w, b, s, 0.1, True)[1]
        g = torch.randn(3, 4, 24, dtype=dtype, device=device)
        torch.library.opcheck(
            torch.ops.peftkern.masked_linear_backward.default,
            (g, x.detach(), w.detach(), s.detach(), bits, [True, True, True, True]),
        )
        torch.library.opcheck(torch.ops.peftkern.pack_mask.default, (s.detach(), 0.1))
        torch.library.opcheck(torch.ops.peftkern.unpack_mask.default, (bits, [24, 40]))
        with torch.no_grad():
            torch.library.opcheck(
                torch.ops.peftkern.masked_linear_packed.default, (x.detach(), w.detach(), b.detach(), bits)
            )
            stack = torch.stack([bits, bits])
            ids = torch.tensor([0, 1, -1] * 4, device=device)
            torch.library.opcheck(
                torch.ops.peftkern.masked_linear_multi.default,
                (x.detach(), w.detach(), b.detach(), stack, ids),
            )


# ---------------------------------------------------------------- bits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (3, 31), (4, 32), (2, 33), (6, 64), (3, 100), (2, 1000)])
def test_pack_unpack_round_trip(device, shape):
    scores = torch.randn(*shape, device=device)
    bits = pack_mask(scores, 0.2)
    assert bits.dtype == torch.int32 and bits.shape == (shape[0], (shape[1] + 31) // 32)
    keep = scores.cpu() > 0.2
    assert torch.equal(bits.cpu(), ref.mask_bits(keep))  # the documented layout, bit by bit
    assert torch.equal(unpack_mask(bits, shape).cpu(), keep)
    # bits in any layout: a transposed copy and every other row of a taller tensor
    rows, words = bits.shape
    for strided in (bits.t().contiguous().t(), torch.stack([bits, bits], 1).flatten(0, 1)[::2]):
        assert not strided.is_contiguous() or rows == 1 or words == 1
        assert torch.equal(unpack_mask(strided, shape).cpu(), keep)


def test_packed_mask_is_a_sixteenth_of_a_bf16_weight():
    w = torch.empty(4096, 4096, dtype=torch.bfloat16)
    bits = pack_mask(torch.randn(4096, 4096), 0.0)
    assert bits.numel() * bits.element_size() * 16 == w.numel() * w.element_size()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tokens", [1, 4, 16, 40])
def test_packed_and_multi_equal_the_unpacked_op(device, tokens):
    for dtype in dtypes_for(device):
        x, w, b, _ = make_inputs((tokens,), 100, 72, dtype, device, grad=())
        scores = [randn(72, 100, device=device) for _ in range(3)]
        stack = torch.stack([pack_mask(s, 0.1) for s in scores])
        with torch.no_grad():
            expected = [masked_linear(x, w, b, s, threshold=0.1) for s in scores]
            assert_close(masked_linear_packed(x, w, b, stack[1]), expected[1].double(), dtype, "packed")
            ids = torch.randint(-1, 3, (tokens,), device=device)
            multi = masked_linear_multi(x, w, b, stack, ids)
        plain = nn.functional.linear(x, w, b)
        for t, i in enumerate(ids.tolist()):  # a per-token loop over single-mask calls
            want = plain[t] if i < 0 else expected[i][t]
            assert_close(multi[t], want.double(), dtype, f"token {t} (task {i})")


def test_packed_ops_are_forward_only():
    x, w, b, s = make_inputs((3,), 16, 8, torch.float32, "cpu", grad=("x",))
    out = masked_linear_packed(x, w, b, pack_mask(s, 0.0))
    with pytest.raises(RuntimeError, match="masked_linear_packed is forward only"):
        out.sum().backward()


# ---------------------------------------------------------------- bad input


def test_bad_input():
    x, w, b, s = make_inputs((4,), 40, 8, torch.float32, "cpu", grad=())
    with pytest.raises(ValueError, match=r"scores must have the weight's shape \[8, 40\]; got \[8, 39\]"):
        masked_linear(x, w, b, s[:, :39], threshold=0.0)
    with pytest.raises(TypeError, match=r"scores must be a floating-point tensor; got Bool"):
        masked_linear(x, w, b, s > 0, threshold=0.0)
    with pytest.raises(
        TypeError, match=r"scores must be float32 or the weight's dtype \(Float\); got BFloat16"
    ):
        masked_linear(x, w, b, s.bfloat16(), threshold=0.0)
    bits = pack_mask(s, 0.0)
    with pytest.raises(ValueError, match=r"mask_bits must have shape \[8, 2\]"):
        masked_linear_packed(x, w, b, bits[:, :1])
    with pytest.raises(TypeError, match=r"mask_bits must be int32"):
        masked_linear_packed(x, w, b, bits.long())
    with pytest.raises(ValueError, match=r"bits must have shape \[8, 3\] .*; got \[8, 2\]"):
        unpack_mask(bits, (8, 70))
    stack = torch.stack([bits, bits])
    with pytest.raises(
        ValueError, match=r"task_ids must be in \[-1, tasks\) = \[-1, 2\); got values in \[0, 2\]"
    ):
        masked_linear_multi(x, w, b, stack, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match=r"task_ids must be an int32 or int64 tensor; got Float"):
        masked_linear_multi(x, w, b, stack, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match=r"task_ids must have shape \[tokens\] = \[4\]"):
        masked_linear_multi(x, w, b, stack, torch.tensor([0, 1]))
    with pytest.raises(
        ValueError, match=r"weight must have shape \[out_features, in_features\] with in_features = 40"
    ):
        masked_linear(x, w[:, :30], b, s[:, :30], threshold=0.0)


@pytest.mark.cuda
def test_bad_input_wrong_device():
    x, w, b, s = make_inputs((4,), 40, 8, torch.float32, "cuda", grad=())
    with pytest.raises(ValueError, match=r"scores is on cpu but weight is on cuda:0"):
        masked_linear(x, w, b, s.cpu(), threshold=0.0)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("lead,n_in,n_out", [((64,), 4096, 4096), ((300,), 1000, 520), ((33,), 36, 1000)])
def test_cuda_kernel_shapes(lead, n_in, n_out):
    for dtype in dtypes_for("cuda"):
        for scores_dtype in {torch.float32, dtype}:
            inputs = make_inputs(lead, n_in, n_out, dtype, "cuda", scores_dtype, grad=NAMES)
            poison_cuda_cache()
            check_masked(inputs, dtype, threshold=0.1)


@pytest.mark.cuda
def test_cuda_pack_matches_cpu():
    s = torch.randn(300, 1000)
    assert torch.equal(pack_mask(s.cuda(), 0.05).cpu(), pack_mask(s, 0.05))


# ---------------------------------------------------------------- the module


def test_module_starts_as_the_pretrained_layer():
    m = MaskedLinear(64, 32)
    assert m.threshold == 5e-3 and m.score_init == 1e-2 and m.scores.dtype == torch.float32
    assert not m.weight.requires_grad and m.scores.requires_grad
    assert m.mask().all() and m.sparsity() == 0.0
    x = torch.randn(4, 64)
    assert torch.allclose(m(x), nn.functional.linear(x, m.weight, m.bias), atol=1e-6)


def test_module_from_linear_bake_and_packed_mask():
    linear = nn.Linear(40, 24)
    m = MaskedLinear.from_linear(linear, threshold=0.0)
    assert m.weight is linear.weight and m.bias is linear.bias and not linear.weight.requires_grad
    with torch.no_grad():
        m.scores.normal_()
    x = torch.randn(5, 40)
    baked = m.bake()
    assert isinstance(baked, nn.Linear) and torch.allclose(baked(x), m(x), atol=1e-6)
    assert m.sparsity() == pytest.approx(1 - m.mask().float().mean().item())
    assert 0.3 < m.sparsity() < 0.7
    assert torch.equal(unpack_mask(m.packed_mask(), (24, 40)), m.mask())
    assert torch.allclose(masked_linear_packed(x, m.weight, m.bias, m.packed_mask()), m(x), atol=1e-6)


def test_module_trains_scores_only():
    m = MaskedLinear(16, 8, threshold=0.0)
    with torch.no_grad():
        m.scores.normal_()
    x = torch.randn(10, 16, requires_grad=True)
    out = m(x)
    leaves = [ref.f64(t) for t in (x, m.weight, m.bias, m.scores)]
    expected = ref.masked_linear(*leaves, 0.0)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert m.weight.grad is None and m.bias.grad is None
    assert_close(m.scores.grad, leaves[3].grad, torch.float32, "grad scores")
    assert_close(x.grad, leaves[0].grad, torch.float32, "grad x")


def test_module_state_dict_and_repr():
    m = MaskedLinear(12, 6, threshold=0.01)
    with torch.no_grad():
        m.scores.normal_()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    m2 = MaskedLinear(12, 6, threshold=0.01)
    m2.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randn(3, 12)
    assert torch.equal(m(x), m2(x)) and set(m.state_dict()) == {"weight", "bias", "scores"}
    assert "threshold=0.01, score_init=0.01" in repr(m)
    with pytest.raises(ValueError, match=r"in_features must be in \[1, "):
        MaskedLinear(0, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_module_compiles_fullgraph(device):
    torch._dynamo.reset()
    m = MaskedLinear(40, 24, threshold=0.0).to(device)
    with torch.no_grad():
        m.scores.normal_()
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    x = torch.randn(3, 7, 40, device=device)
    out, out_c = m(x), compiled(x)
    assert torch.allclose(out, out_c, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    gs = m.scores.grad.clone()
    m.zero_grad()
    out_c.square().sum().backward()
    assert torch.allclose(m.scores.grad, gs, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
def test_cuda_multi_reads_the_ids_with_one_sync():
    """Up to 16 tokens (the mat-vec path) the only device-to-host copy is the ids' range check."""
    x, w, b, _ = make_inputs((12,), 100, 72, torch.bfloat16, "cuda", grad=())
    stack = torch.stack([pack_mask(randn(72, 100, device="cuda"), 0.1) for _ in range(3)])
    ids = torch.randint(-1, 3, (12,), device="cuda")
    assert count_cuda_syncs(lambda: masked_linear_multi(x, w, b, stack, ids)) == 1
