"""peftkern.ops.adapter_stack (N adapters on the same tokens) and peftkern.nn.AdapterFusion against
the float64 eager formulas (AdapterFusion as AdapterHub computes it)."""

import pytest
import torch

from peftkern.nn import Adapter, AdapterFusion
from peftkern.ops import ADAPTER_ACTIVATIONS, adapter, adapter_stack

from . import reference as ref
from .conftest import DEVICES, REL_TOL, assert_close, randn, rel_err

CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def dtypes_for(device):
    return CUDA_DTYPES if device == "cuda" else CPU_DTYPES


def make_stack(lead, d, r, N, dtype, device, bias=True, requires_grad=False):
    x = randn(*lead, d, dtype=dtype, device=device, requires_grad=requires_grad)
    w_down = randn(N, r, d, dtype=dtype, device=device, scale=d**-0.5, requires_grad=requires_grad)
    w_up = randn(N, d, r, dtype=dtype, device=device, scale=r**-0.5, requires_grad=requires_grad)
    b_down = randn(N, r, dtype=dtype, device=device, scale=0.1, requires_grad=requires_grad) if bias else None
    b_up = randn(N, d, dtype=dtype, device=device, scale=0.1, requires_grad=requires_grad) if bias else None
    return x, w_down, b_down, w_up, b_up


def check_stack(inputs, dtype, activation="gelu", scale=1.0):
    """Forward and every gradient against the float64 reference. In float16/bfloat16 each error may
    also reach twice that of the eager formula run in the same dtype: a degenerate shape (one token,
    r = 1, no residual) leaves one rounding of the saved bottleneck unaveraged, for eager code too."""
    names = ("x", "w_down", "b_down", "w_up", "b_up")

    def run(fn, tensors):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return out, [None if t is None else t.grad for t in leaves]

    torch.manual_seed(1)
    x, w_down = inputs[0], inputs[1]
    grad = torch.randn(*x.shape[:-1], w_down.shape[0], x.shape[-1], dtype=torch.float64) + 0.5
    grad = grad.to(dtype).to(x.device)
    ours = run(lambda *t: adapter_stack(*t, activation=activation, scale=scale), inputs)
    expected = run(lambda *t: ref.adapter_stack(*t, activation, scale), [ref.f64(t) for t in inputs])
    eager = None
    if dtype in (torch.float16, torch.bfloat16):
        eager = run(lambda *t: ref.adapter_stack(*t, activation, scale), inputs)
    assert ours[0].shape == (*x.shape[:-1], w_down.shape[0], x.shape[-1]) and ours[0].dtype == dtype
    pairs = [("out", ours[0], expected[0], None if eager is None else eager[0])]
    pairs += [
        (f"grad {n}", a, b, None if eager is None else e)
        for n, a, b, e in zip(names, ours[1], expected[1], eager[1] if eager else [None] * 5)
        if a is not None
    ]
    for what, got, want, eager_got in pairs:
        tol = REL_TOL[dtype] if eager_got is None else max(REL_TOL[dtype], 2 * rel_err(eager_got, want))
        assert_close(got, want, dtype, what, tol)


# ---------------------------------------------------------------- adapter_stack

STACK_SHAPES = [((1,), 33, 1, 1), ((7,), 33, 8, 2), ((130,), 96, 24, 4), ((2, 3, 25), 72, 16, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,d,r,N", STACK_SHAPES)
def test_stack_forward_and_gradients(device, lead, d, r, N):
    for dtype in dtypes_for(device):
        check_stack(make_stack(lead, d, r, N, dtype, device, requires_grad=True), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ADAPTER_ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_stack_activations_and_bias(device, activation, bias):
    for dtype in dtypes_for(device):
        check_stack(make_stack((40,), 48, 12, 3, dtype, device, bias, True), dtype, activation, scale=0.25)


@pytest.mark.parametrize("device", DEVICES)
def test_stack_slice_is_the_single_adapter_without_residual(device):
    x, w_down, b_down, w_up, b_up = make_stack((5, 11), 64, 16, 3, torch.float32, device)
    out = adapter_stack(x, w_down, b_down, w_up, b_up, scale=0.5)
    for n in range(3):
        single = adapter(x, w_down[n], b_down[n], w_up[n], b_up[n], scale=0.5)
        assert_close(out[..., n, :], single - x, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_stack_non_contiguous_and_empty(device):
    x = randn(64, 90, device=device).t()[::3].requires_grad_()  # [30, 64]
    _, w_down, b_down, w_up, b_up = make_stack((1,), 64, 8, 2, torch.float32, device, requires_grad=True)
    w_down_t = w_down.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not w_down_t.is_contiguous()
    check_stack((x, w_down_t, b_down, w_up, b_up), torch.float32)
    x0, w_down, b_down, w_up, b_up = make_stack((0,), 16, 4, 2, torch.float32, device, requires_grad=True)
    out = adapter_stack(x0, w_down, b_down, w_up, b_up)
    assert out.shape == (0, 2, 16)
    out.sum().backward()
    for t in (w_down, b_down, w_up, b_up):
        assert t.grad is not None and not t.grad.any()


def test_stack_gradcheck_float64():
    inputs = make_stack((2, 3), 7, 3, 3, torch.float64, "cpu", requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: adapter_stack(*t, activation="silu", scale=0.7), inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_stack_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        x, w_down, b_down, w_up, b_up = make_stack((3, 5), 24, 8, 3, dtype, device, requires_grad=True)
        args = (x, w_down, b_down, w_up, b_up, "gelu", 0.5, True)
        torch.library.opcheck(torch.ops.peftkern.adapter_stack_forward.default, args)
        z = torch.ops.peftkern.adapter_stack_forward(*args)[1].detach()
        g = torch.randn(3, 5, 3, 24, dtype=dtype, device=device)
        torch.library.opcheck(
            torch.ops.peftkern.adapter_stack_backward.default,
            (g, x.detach(), z, w_down.detach(), w_up.detach(), "gelu", 0.5, [True, True, True, True, True]),
        )


def stack_call(**kw):
    x, w_down, b_down, w_up, b_up = make_stack((4,), 32, 8, 3, torch.float32, "cpu")
    args = dict(x=x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up)
    extra = {k: kw.pop(k) for k in ("activation", "scale") if k in kw}
    args.update(kw)
    return adapter_stack(**args, **extra)


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(w_down=torch.randn(8, 32)), ValueError, r"w_down must have shape \[N, r, d\]"),
        (dict(w_up=torch.randn(3, 8, 32)), ValueError, r"w_up must have shape \[N, d, r\] = \[3, 32, 8\]"),
        (dict(b_down=torch.randn(3, 7)), ValueError, r"b_down must have shape \[N, r\] = \[3, 8\]"),
        (dict(b_up=torch.randn(32)), ValueError, r"b_up must have shape \[N, d\] = \[3, 32\]"),
        (dict(x=torch.randn(4, 32).half()), TypeError, r"w_down has dtype .* but x has dtype"),
        (dict(activation="elu"), ValueError, r"activation must be one of"),
        (dict(x=None), TypeError, r"x must be a tensor"),
    ],
)
def test_stack_bad_input(kwargs, exc, message):
    with pytest.raises(exc, match="adapter_stack: " + message):
        stack_call(**kwargs)


# ---------------------------------------------------------------- AdapterFusion


def random_fusion(d, N, r, dtype=torch.float32, **kw):
    fusion = AdapterFusion(d, N, r, init="lora", dtype=dtype, **kw)
    with torch.no_grad():  # trained-looking adapters and projections, so every path carries signal
        for p in fusion.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
    return fusion


def fusion_reference(fusion, x64, residual64=None):
    """The module's parameters in float64 through the eager formulas (x64, residual64: float64
    leaves); returns (out, params64)."""
    m = fusion.adapters
    p64 = {n: ref.f64(p) for n, p in fusion.named_parameters()}
    stack = ref.adapter_stack(
        x64,
        p64["adapters.down_weight"],
        p64["adapters.down_bias"],
        p64["adapters.up_weight"],
        p64["adapters.up_bias"],
        m.activation,
        m.scale,
    )
    out = ref.adapter_fusion(
        x64,
        stack,
        p64.get("query.weight"),
        p64.get("query.bias"),
        p64.get("key.weight"),
        p64.get("key.bias"),
        p64.get("value.weight"),
        residual64,
        fusion.temperature,
    )
    return out, p64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [1, 2, 5])
@pytest.mark.parametrize(
    "flags",
    [
        dict(),
        dict(query=False),
        dict(key=False),
        dict(value=False),
        dict(query=False, key=False, value=False),
    ],
)
def test_fusion_forward_and_gradients(device, N, flags):
    for dtype in dtypes_for(device):
        fusion = random_fusion(48, N, 8, dtype, temperature=2.0, **flags).to(device)
        x = randn(3, 7, 48, dtype=dtype, device=device, requires_grad=True)
        residual = randn(3, 7, 48, dtype=dtype, device=device, requires_grad=True)
        out = fusion(x, residual)
        x64, residual64 = ref.f64(x), ref.f64(residual)
        expected, p64 = fusion_reference(fusion, x64, residual64)
        assert_close(out, expected, dtype)
        g = torch.randn_like(out) + 0.5
        out.backward(g)
        expected.backward(g.double())
        for name, p in fusion.named_parameters():
            if name == "key.bias":  # q . b_key is added to every adapter's score: no gradient, exactly
                assert p.grad.abs().max() <= 1e-2 * fusion.key.weight.grad.abs().max()
                continue
            assert_close(p.grad, p64[name].grad, dtype, f"grad {name}")
        assert_close(x.grad, x64.grad, dtype, "grad x")
        assert_close(residual.grad, residual64.grad, dtype, "grad residual")


def test_fusion_gradcheck_and_float64_reference():
    fusion = random_fusion(24, 3, 4, torch.float64)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fusion(t), (x,))
    x_ref = x.detach().clone().requires_grad_()
    out, expected = fusion(x), fusion_reference(fusion, x_ref)[0]
    assert_close(out, expected, torch.float64)
    gx = torch.autograd.grad(out.sum(), x)[0]
    gref = torch.autograd.grad(expected.sum(), x_ref)[0]
    assert_close(gx, gref, torch.float64)


def test_fusion_of_one_adapter_with_identity_value_is_that_adapter():
    a = Adapter(32, 8, init="lora", activation="relu", scale=0.5)
    torch.nn.init.normal_(a.up.weight, std=0.2)
    fusion = AdapterFusion.from_adapters([a])
    x = torch.randn(6, 32)
    assert_close(fusion(x), a(x), torch.float32)  # softmax over one adapter is 1; value = I


def test_fusion_from_adapters_freezes_them_and_trains_the_fusion():
    adapters = [Adapter(32, 8, init="lora") for _ in range(3)]
    for a in adapters:
        torch.nn.init.normal_(a.up.weight, std=0.2)
    fusion = AdapterFusion.from_adapters(adapters)
    x = torch.randn(10, 32)
    for n in range(3):  # the stacked adapters are the given ones
        stack = adapter_stack(
            x,
            fusion.adapters.down_weight,
            fusion.adapters.down_bias,
            fusion.adapters.up_weight,
            fusion.adapters.up_bias,
        )
        assert_close(stack[:, n], adapters[n](x) - x, torch.float32)
    fusion(x).pow(2).sum().backward()
    assert all(p.grad is None for p in fusion.adapters.parameters())
    assert fusion.query.weight.grad.abs().sum() > 0 and fusion.key.weight.grad.abs().sum() > 0
    assert fusion.value.weight.grad.abs().sum() > 0
    trainable = sum(p.numel() for p in fusion.parameters() if p.requires_grad)
    assert trainable == 2 * (32 * 32 + 32) + 32 * 32


def test_fusion_bad_arguments():
    with pytest.raises(TypeError, match="AdapterFusion: query must be a bool"):
        AdapterFusion(16, 2, 4, query=1)
    with pytest.raises(ValueError, match="AdapterFusion: value_init must be one of"):
        AdapterFusion(16, 2, 4, value_init="zeros")
    with pytest.raises(ValueError, match="AdapterFusion: temperature must be a finite positive float"):
        AdapterFusion(16, 2, 4, temperature=0.0)
    with pytest.raises(ValueError, match="MultiAdapter: num_adapters must be in"):
        AdapterFusion(16, 0, 4)
    with pytest.raises(ValueError, match="MultiAdapter.from_adapters: adapter 1 has"):
        AdapterFusion.from_adapters([Adapter(16, 4), Adapter(16, 4, activation="relu")])


def test_fusion_compiles_fullgraph():
    fusion = random_fusion(32, 3, 8)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = torch.compile(fusion, fullgraph=True, backend="eager")(x)
    assert_close(out, fusion(x), torch.float32)
    out.sum().backward()
    assert x.grad is not None and fusion.adapters.up_weight.grad is not None


@pytest.mark.cuda
def test_cuda_fusion_matches_the_cpu_module():
    fusion = random_fusion(256, 4, 32)
    x = torch.randn(4, 100, 256, requires_grad=True)
    fusion_cuda = random_fusion(256, 4, 32).cuda()
    fusion_cuda.load_state_dict(fusion.state_dict())
    x_cuda = x.detach().cuda().requires_grad_()
    out, out_cuda = fusion(x), fusion_cuda(x_cuda)
    assert_close(out_cuda, out, torch.float32)
    g = torch.randn_like(out)
    out.backward(g)
    out_cuda.backward(g.cuda())
    assert_close(x_cuda.grad, x.grad, torch.float32, "grad x")
    for (name, p), p_cuda in zip(fusion.named_parameters(), fusion_cuda.parameters()):
        assert_close(p_cuda.grad, p.grad, torch.float32, f"grad {name}")
