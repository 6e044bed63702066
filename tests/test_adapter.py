"""peftkern.ops.adapter and peftkern.nn.Adapter against the float64 eager reference."""

import copy
import io

import pytest
import torch

from peftkern.nn import Adapter
from peftkern.ops import ADAPTER_ACTIVATIONS, adapter

from . import reference as ref
from .conftest import DEVICES, assert_close, check_against_reference, poison_cuda_cache, randn

CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtypes_for(device):
    return CUDA_DTYPES if device == "cuda" else CPU_DTYPES


def make_inputs(lead, d, r, dtype, device, bias=True, residual=False, requires_grad=False):
    # Weights at 1/sqrt(fan_in) keep activations O(1) so relative errors mean something.
    x = randn(*lead, d, dtype=dtype, device=device, requires_grad=requires_grad)
    w_down = randn(r, d, dtype=dtype, device=device, scale=d**-0.5, requires_grad=requires_grad)
    w_up = randn(d, r, dtype=dtype, device=device, scale=r**-0.5, requires_grad=requires_grad)
    b_down = randn(r, dtype=dtype, device=device, scale=0.1, requires_grad=requires_grad) if bias else None
    b_up = randn(d, dtype=dtype, device=device, scale=0.1, requires_grad=requires_grad) if bias else None
    res = randn(*lead, d, dtype=dtype, device=device, requires_grad=requires_grad) if residual else None
    return x, w_down, b_down, w_up, b_up, res


def check_forward_backward(inputs, dtype, activation="gelu", scale=1.0):
    def fn(x, wd, bd, wu, bu, res):
        return adapter(x, wd, bd, wu, bu, activation=activation, scale=scale, residual=res)

    def ref_fn(x, wd, bd, wu, bu, res):
        return ref.adapter(x, wd, bd, wu, bu, activation, scale, res)

    out = check_against_reference(
        fn, ref_fn, inputs, ("x", "w_down", "b_down", "w_up", "b_up", "residual"), dtype
    )
    assert out.shape == inputs[0].shape


# ---------------------------------------------------------------- forward and every gradient

SHAPES = [  # (leading shape, d, r): tokens 1, 7, 1000; odd d; ranks 1 to 200 (not tile multiples)
    ((1,), 33, 1),
    ((7,), 33, 8),
    ((7,), 768, 64),
    ((1000,), 33, 200),
    ((4, 250), 768, 8),
    ((2, 5, 100), 768, 200),
    ((1000,), 768, 1),
    ((1, 7), 768, 33),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,d,r", SHAPES)
def test_forward_and_gradients(device, lead, d, r):
    for dtype in dtypes_for(device):
        inputs = make_inputs(lead, d, r, dtype, device, requires_grad=True)
        check_forward_backward(inputs, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ADAPTER_ACTIVATIONS)
def test_activations(device, activation):
    for dtype in dtypes_for(device):
        inputs = make_inputs((130,), 96, 24, dtype, device, requires_grad=True)
        check_forward_backward(inputs, dtype, activation=activation, scale=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_bias_and_residual_variants(device, bias, residual):
    for dtype in dtypes_for(device):
        inputs = make_inputs((3, 41), 72, 16, dtype, device, bias=bias, residual=residual, requires_grad=True)
        check_forward_backward(inputs, dtype, activation="silu", scale=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    for dtype in dtypes_for(device):
        base = randn(2 * 96, 50, dtype=dtype, device=device)
        x = base.t()[:, ::2].detach().requires_grad_()  # [50, 96] with strides (1, 100)
        assert not x.is_contiguous()
        _, w_down, b_down, w_up, b_up, _ = make_inputs((1,), 96, 12, dtype, device, requires_grad=True)
        w_down_t = w_down.detach().t().contiguous().t().requires_grad_()  # same values, column-major
        residual = randn(50, 192, dtype=dtype, device=device)[:, ::2].requires_grad_()
        check_forward_backward((x, w_down_t, b_down, w_up, b_up, residual), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    for dtype in dtypes_for(device):
        inputs = make_inputs((0,), 40, 8, dtype, device, requires_grad=True)
        x, w_down, b_down, w_up, b_up, _ = inputs
        out = adapter(x, w_down, b_down, w_up, b_up)
        assert out.shape == (0, 40)
        out.sum().backward()
        assert x.grad.shape == (0, 40)
        for t in (w_down, b_down, w_up, b_up):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients_are_computed(device):
    x, w_down, b_down, w_up, b_up, _ = make_inputs((9,), 48, 8, torch.float32, device)
    x.requires_grad_()
    w_up.requires_grad_()
    adapter(x, w_down, b_down, w_up, b_up).sum().backward()
    assert x.grad is not None and w_up.grad is not None
    assert w_down.grad is None and b_down.grad is None and b_up.grad is None

    # The backward op returns None (and computes nothing) for entries not asked for.
    z = torch.ops.peftkern.adapter_forward(x, w_down, b_down, w_up, b_up, None, "gelu", 1.0, True)[1]
    grads = torch.ops.peftkern.adapter_backward(
        torch.randn_like(x), x, z, w_down, w_up, "gelu", 1.0, True, [False, False, True, False, False]
    )
    assert [g is None for g in grads] == [True, True, False, True, True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_inference_saves_no_bottleneck(device):
    x, w_down, b_down, w_up, b_up, _ = make_inputs((5,), 16, 4, torch.float32, device)
    out, z = torch.ops.peftkern.adapter_forward(x, w_down, b_down, w_up, b_up, None, "gelu", 1.0, False)
    assert z.numel() == 0
    with torch.no_grad():
        assert torch.equal(adapter(x, w_down, b_down, w_up, b_up), out)


def test_gradcheck_float64():
    for activation in ADAPTER_ACTIVATIONS:
        for residual in (False, True):
            inputs = make_inputs((2, 3), 7, 3, torch.float64, "cpu", residual=residual, requires_grad=True)
            fn = lambda x, wd, bd, wu, bu, res=None: adapter(  # noqa: E731
                x, wd, bd, wu, bu, activation=activation, scale=0.7, residual=res
            )
            args = inputs if residual else inputs[:5]
            assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        for residual in (False, True):
            x, w_down, b_down, w_up, b_up, res = make_inputs(
                (3, 5), 24, 8, dtype, device, residual=residual, requires_grad=True
            )
            torch.library.opcheck(
                torch.ops.peftkern.adapter_forward.default,
                (x, w_down, b_down, w_up, b_up, res, "gelu", 0.5, True),
            )
            z = torch.ops.peftkern.adapter_forward(x, w_down, b_down, w_up, b_up, res, "gelu", 0.5, True)[1]
            g = torch.randn_like(x)
            torch.library.opcheck(
                torch.ops.peftkern.adapter_backward.default,
                (
                    g,
                    x.detach(),
                    z.detach(),
                    w_down.detach(),
                    w_up.detach(),
                    "gelu",
                    0.5,
                    not residual,
                    [True, True, True, True, False],
                ),
            )


# ---------------------------------------------------------------- bad input


def good(device="cpu", dtype=torch.float32):
    x, w_down, b_down, w_up, b_up, _ = make_inputs((4,), 32, 8, dtype, device)
    return dict(x=x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)


def call(**kw):
    args = good()
    extra = {k: kw.pop(k) for k in ("activation", "scale", "residual") if k in kw}
    args.update(kw)
    return adapter(args["x"], args["w_down"], args["b_down"], args["w_up"], args["b_up"], **extra)


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(w_down=torch.randn(8, 31)), ValueError, r"w_down must have shape \[r, d\] with d = 32"),
        (dict(w_down=torch.randn(8)), ValueError, r"w_down must have shape"),
        (dict(w_up=torch.randn(8, 32)), ValueError, r"w_up must have shape \[d, r\] = \[32, 8\]"),
        (dict(w_up=torch.randn(32, 7)), ValueError, r"w_up must have shape \[d, r\] = \[32, 8\]"),
        (dict(b_down=torch.randn(9)), ValueError, r"b_down must have shape \[r\] = \[8\]"),
        (dict(b_up=torch.randn(31)), ValueError, r"b_up must have shape \[d\] = \[32\]"),
        (dict(residual=torch.randn(5, 32)), ValueError, r"residual must have x's shape"),
        (
            dict(activation="tanh"),
            ValueError,
            r"activation must be one of 'gelu', 'gelu_tanh', 'relu', 'silu'; got 'tanh'",
        ),
        (
            dict(w_up=torch.randn(32, 8, dtype=torch.float64)),
            TypeError,
            r"w_up has dtype Double but x has dtype Float",
        ),
        (
            dict(b_down=torch.randn(8, dtype=torch.bfloat16)),
            TypeError,
            r"b_down has dtype BFloat16 but x has dtype Float",
        ),
        (dict(x=torch.randint(0, 5, (4, 32))), TypeError, r"x must be a floating-point tensor"),
        (
            dict(x=torch.randn(4, 0), w_down=torch.randn(8, 0), w_up=torch.randn(0, 8), b_up=None),
            ValueError,
            r"x must have shape \[\.\.\., d\] with d >= 1",
        ),
        (
            dict(w_down=torch.randn(0, 32), w_up=torch.randn(32, 0), b_down=None),
            ValueError,
            r"bottleneck size r = w_down.shape\[0\] must be at least 1",
        ),
    ],
)
def test_bad_input(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        call(**kwargs)


@pytest.mark.cuda
def test_bad_input_mixed_devices():
    args = good("cuda")
    with pytest.raises(ValueError, match=r"w_down is on cpu but x is on cuda:0"):
        adapter(args["x"], args["w_down"].cpu(), args["b_down"], args["w_up"], args["b_up"])
    with pytest.raises(ValueError, match=r"residual is on cpu but x is on cuda:0"):
        adapter(
            args["x"], args["w_down"], args["b_down"], args["w_up"], args["b_up"], residual=torch.randn(4, 32)
        )


# ---------------------------------------------------------------- CUDA kernels specifically


@pytest.mark.cuda
@pytest.mark.parametrize(
    "lead,d,r",
    [
        ((1,), 8, 16),
        ((63,), 64, 16),
        ((64,), 64, 32),
        ((65,), 4096, 64),
        ((129,), 1000, 128),
        ((300,), 520, 256),
        ((33,), 36, 9),
        ((2, 100), 768, 48),
        ((257,), 4104, 250),
    ],
)
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_kernel_shapes(lead, d, r, dtype):
    """Every padded rank (16..256), row counts around the 64-row block, d around the 64/128-column
    chunks and vector width, with outputs poisoned so an unwritten element fails."""
    for residual in (False, True):
        inputs = make_inputs(lead, d, r, dtype, "cuda", residual=residual, requires_grad=True)
        poison_cuda_cache()
        check_forward_backward(inputs, dtype, activation="gelu_tanh", scale=0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_misaligned_pointers(dtype):
    """Contiguous views whose data pointer is not 16-byte aligned take the element-wise path."""
    d, r, rows = 64, 16, 70
    storage = randn(rows * d + 1, dtype=dtype, device="cuda")
    x = storage[1:].view(rows, d).detach().requires_grad_()
    assert x.data_ptr() % 16 != 0
    _, w_down, b_down, w_up, b_up, _ = make_inputs((1,), d, r, dtype, "cuda", requires_grad=True)
    check_forward_backward((x, w_down, b_down, w_up, b_up, None), dtype)


@pytest.mark.cuda
def test_cuda_large_rank_takes_composite_path():
    inputs = make_inputs((40,), 64, 300, torch.bfloat16, "cuda", requires_grad=True)
    check_forward_backward(inputs, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_backward_is_deterministic():
    inputs = make_inputs((3000,), 768, 64, torch.bfloat16, "cuda", requires_grad=True)
    grads = []
    for _ in range(2):
        for t in inputs:
            if t is not None:
                t.grad = None
        adapter(*inputs[:5]).pow(2).sum().backward()
        grads.append([t.grad.clone() for t in inputs if t is not None])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_graph_capture():
    x, w_down, b_down, w_up, b_up, _ = make_inputs((256,), 512, 32, torch.bfloat16, "cuda")
    w_down.requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph
        adapter(x, w_down, b_down, w_up, b_up).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    w_down.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = adapter(x, w_down, b_down, w_up, b_up)
        out.float().sum().backward()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    leaves = [ref.f64(t) for t in (x, w_down, b_down, w_up, b_up)]
    expected = ref.adapter(*leaves)
    assert_close(out, expected, torch.bfloat16, "graph replay out")
    expected.sum().backward()
    assert_close(w_down.grad, leaves[1].grad, torch.bfloat16, "graph replay grad w_down")


# ---------------------------------------------------------------- the module


def test_module_houlsby_init_is_identity():
    torch.manual_seed(0)
    m = Adapter(64, 16)
    assert torch.count_nonzero(m.up.weight) == 0 and torch.count_nonzero(m.up.bias) == 0
    w = m.down.weight
    assert w.abs().max() <= 0.02 and 0.005 < w.std() < 0.015
    x = torch.randn(3, 5, 64)
    assert torch.equal(m(x), x)
    r = torch.randn(3, 5, 64)
    assert torch.equal(m(x, r), r)


def test_module_lora_init_and_reset():
    torch.manual_seed(0)
    m = Adapter(256, 8, init="lora")
    bound = 1 / 256**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 256
    assert m.down.weight.abs().max() <= bound and m.down.weight.std() > bound / 3
    assert torch.count_nonzero(m.up.weight) == 0
    with torch.no_grad():
        m.up.weight.normal_()
    m.reset_parameters()
    assert torch.count_nonzero(m.up.weight) == 0


def test_module_matches_reference_and_trains():
    torch.manual_seed(0)
    m = Adapter(48, 12, activation="relu", scale=0.25, init="lora")
    with torch.no_grad():
        m.up.weight.normal_(0, 0.1)
        m.up.bias.normal_(0, 0.1)
    x = torch.randn(6, 48, requires_grad=True)
    out = m(x)
    leaves = [ref.f64(t) for t in (x, m.down.weight, m.down.bias, m.up.weight, m.up.bias)]
    expected = ref.adapter(*leaves, activation="relu", scale=0.25)
    assert_close(out, expected, torch.float32)
    out.sum().backward()
    expected.sum().backward()
    assert_close(m.down.weight.grad, leaves[1].grad, torch.float32, "grad down.weight")
    assert_close(m.up.weight.grad, leaves[3].grad, torch.float32, "grad up.weight")


def test_module_state_dict_round_trip_and_repr():
    m = Adapter(32, 4, activation="silu", scale=0.5, init="lora")
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    m2 = Adapter(32, 4, activation="silu", scale=0.5, init="houlsby")
    m2.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert set(m.state_dict()) == {"down.weight", "down.bias", "up.weight", "up.bias"}
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    x = torch.randn(2, 32)
    assert torch.equal(m(x), m2(x))
    assert "d_model=32, bottleneck=4, activation='silu', scale=0.5, init='lora'" in repr(m)
    assert torch.equal(copy.deepcopy(m)(x), m(x))


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        Adapter(8, 2, activation="tanh")
    with pytest.raises(ValueError, match="init must be one of"):
        Adapter(8, 2, init="xavier")
    with pytest.raises(ValueError, match=r"bottleneck must be in \[1, "):
        Adapter(8, 0)


def test_module_autocast_cpu():
    m = Adapter(32, 8, init="lora")
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    leaves = [ref.f64(t.to(torch.bfloat16)) for t in (x, m.down.weight, m.down.bias, m.up.weight, m.up.bias)]
    assert_close(out, ref.adapter(*leaves), torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_module_compiles_fullgraph(device):
    torch._dynamo.reset()
    m = Adapter(40, 8, init="lora").to(device)
    with torch.no_grad():
        m.up.weight.normal_(0, 0.1)
    compiled = torch.compile(m, fullgraph=True, dynamic=False)
    x = torch.randn(3, 7, 40, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, out_c = m(x), compiled(x2)
    assert torch.allclose(out, out_c, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    grad_w = m.down.weight.grad.clone()
    m.zero_grad()
    out_c.square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m.down.weight.grad, grad_w, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the per-row gate (UniPELT)

GATE_SHAPES = [((7,), 33, 8), ((4, 250), 768, 64), ((1000,), 33, 200), ((3,), 48, 1)]


def make_gate(lead, dtype, device):
    """Values in (0, 1), as sigmoid(W_g x) gives; a leaf that requires a gradient."""
    return torch.sigmoid(randn(*lead, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,d,r", GATE_SHAPES)
@pytest.mark.parametrize("residual", [False, True])
def test_gate_forward_and_every_gradient(device, lead, d, r, residual):
    for dtype in dtypes_for(device):
        *inputs, res = make_inputs(lead, d, r, dtype, device, residual=residual, requires_grad=True)
        gate = make_gate(lead, dtype, device)

        def fn(x, wd, bd, wu, bu, res, g):
            return adapter(x, wd, bd, wu, bu, scale=0.7, residual=res, gate=g)

        def ref_fn(x, wd, bd, wu, bu, res, g):
            return ref.adapter(x, wd, bd, wu, bu, "gelu", 0.7, res, g)

        names = ("x", "w_down", "b_down", "w_up", "b_up", "residual", "gate")
        check_against_reference(fn, ref_fn, (*inputs, res, gate), names, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_gate_gradient_alone_and_frozen_adapter(device, bias):
    """Only the gate trains (the rows pass alone on CUDA): its gradient, and none for the rest."""
    for dtype in dtypes_for(device):
        x, wd, bd, wu, bu, _ = make_inputs((37,), 48, 8, dtype, device, bias=bias)
        gate = make_gate((37,), dtype, device)

        def fn(x, wd, bd, wu, bu, g):
            return adapter(x, wd, bd, wu, bu, activation="relu", gate=g)

        def ref_fn(x, wd, bd, wu, bu, g):
            return ref.adapter(x, wd, bd, wu, bu, "relu", 1.0, None, g)

        check_against_reference(
            fn, ref_fn, (x, wd, bd, wu, bu, gate), ("x", "wd", "bd", "wu", "bu", "gate"), dtype
        )
        assert wd.grad is None and wu.grad is None


def test_gate_gradcheck_float64():
    x, wd, bd, wu, bu, res = make_inputs(
        (2, 3), 6, 3, torch.float64, "cpu", residual=True, requires_grad=True
    )
    gate = make_gate((2, 3), torch.float64, "cpu")
    torch.autograd.gradcheck(
        lambda *t: adapter(*t[:5], activation="silu", scale=1.3, residual=t[5], gate=t[6]),
        (x, wd, bd, wu, bu, res, gate),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gate_opcheck(device):
    x, wd, bd, wu, bu, _ = make_inputs((3, 5), 16, 4, torch.float32, device, requires_grad=True)
    gate = make_gate((3, 5), torch.float32, device)
    torch.library.opcheck(
        torch.ops.peftkern.adapter_forward.default, (x, wd, bd, wu, bu, None, "gelu", 0.5, True, gate)
    )
    z = torch.ops.peftkern.adapter_forward(x, wd, bd, wu, bu, None, "gelu", 0.5, True, gate)[1].detach()
    args = (torch.randn_like(x), x.detach(), z, wd.detach(), wu.detach(), "gelu", 0.5, True, [True] * 5)
    torch.library.opcheck(
        torch.ops.peftkern.adapter_backward.default, (*args, gate.detach(), bu.detach(), True)
    )


def test_gate_bad_input():
    x, wd, bd, wu, bu, _ = make_inputs((4, 5), 16, 4, torch.float32, "cpu")
    with pytest.raises(
        ValueError, match=r"adapter: gate must have x's shape without its last dimension, \[4, 5\]"
    ):
        adapter(x, wd, bd, wu, bu, gate=torch.rand(4, 5, 1))
    with pytest.raises((TypeError, ValueError), match="adapter: gate"):
        adapter(x, wd, bd, wu, bu, gate=torch.rand(4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="adapter: gate must be a tensor or None"):
        adapter(x, wd, bd, wu, bu, gate=0.5)
