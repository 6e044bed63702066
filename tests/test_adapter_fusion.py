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


def stack_reference(fusion, p64, x64):
    """Every adapter of the fusion on x64, [..., N, d], from its float64 parameters p64."""
    m = fusion.adapters
    return ref.adapter_stack(
        x64,
        p64["adapters.down_weight"],
        p64["adapters.down_bias"],
        p64["adapters.up_weight"],
        p64["adapters.up_bias"],
        m.activation,
        m.scale,
    )


def fusion_reference(fusion, x64, residual64=None):
    """The module's parameters in float64 through the eager formulas (x64, residual64: float64
    leaves); returns (out, params64)."""
    p64 = {n: ref.f64(p) for n, p in fusion.named_parameters()}
    stack = stack_reference(fusion, p64, x64)
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


# ---------------------------------------------------------------- pruning (AdapterDrop, Rücklé et al. 2021)


def fusion_weights_reference(fusion, x64):
    """The fusion's attention weights [..., N], written out in float64 from its parameters."""
    p64 = {n: ref.f64(p).detach() for n, p in fusion.named_parameters()}
    stack = stack_reference(fusion, p64, x64)
    q = (
        x64
        if fusion.query is None
        else torch.nn.functional.linear(x64, p64["query.weight"], p64["query.bias"])
    )
    k = stack if fusion.key is None else torch.nn.functional.linear(stack, p64["key.weight"], p64["key.bias"])
    scores = (k * q.unsqueeze(-2)).sum(-1)
    return torch.softmax(scores / fusion.temperature, dim=-1)


@pytest.mark.parametrize("kept", [[3, 0], [1], [0, 1, 2, 3, 4], [4, 2, 1]])
def test_fusion_keep_is_the_fusion_over_the_kept_adapters(kept):
    fusion = random_fusion(48, 5, 8, temperature=1.5)
    original = {n: p.detach().clone() for n, p in fusion.named_parameters()}
    fusion.keep(kept)
    assert fusion.num_adapters == fusion.adapters.num_adapters == len(kept)
    assert fusion.adapters.down_weight.shape == (len(kept), 8, 48)
    x = randn(3, 7, 48, requires_grad=True)
    out = fusion(x)
    # the written-out fusion over the kept adapters only: its softmax runs over N = len(kept)
    x64 = ref.f64(x)
    stack = ref.adapter_stack(
        x64,
        *(
            ref.f64(original[f"adapters.{n}"])[kept]
            for n in ("down_weight", "down_bias", "up_weight", "up_bias")
        ),
        "gelu",
        1.0,
    )
    p = {
        n: ref.f64(original[n])
        for n in ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight")
    }
    want = ref.adapter_fusion(
        x64,
        stack,
        p["query.weight"],
        p["query.bias"],
        p["key.weight"],
        p["key.bias"],
        p["value.weight"],
        None,
        1.5,
    )
    assert_close(out, want, torch.float32)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g.double())
    assert_close(x.grad, x64.grad, torch.float32, "grad x")
    for n in ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight"):
        assert torch.equal(fusion.get_parameter(n).detach(), original[n])  # the projections unchanged


def test_fusion_records_its_weights_only_when_asked():
    fusion = random_fusion(32, 4, 8, temperature=2.0)
    x = randn(2, 5, 32)
    fusion(x)
    assert fusion.last_weights is None
    fusion.record_weights = True
    fusion(x)
    want = fusion_weights_reference(fusion, ref.f64(x))
    assert fusion.last_weights.shape == (2, 5, 4) and not fusion.last_weights.requires_grad
    assert_close(fusion.last_weights, want, torch.float32)
    fusion.keep([2, 0])
    assert fusion.last_weights is None


def test_fusion_keep_keeps_requires_grad_and_bad_indices():
    fusion = random_fusion(16, 3, 4)
    fusion.adapters.requires_grad_(False)
    fusion.keep([2])
    assert not fusion.adapters.down_weight.requires_grad and fusion.query.weight.requires_grad
    fusion = random_fusion(16, 3, 4)
    for bad, exc, message in [
        ([], TypeError, "AdapterFusion.keep: indices must be a non-empty sequence"),
        (1, TypeError, "AdapterFusion.keep: indices must be a non-empty sequence"),
        ([True], TypeError, "AdapterFusion.keep: indices must be ints"),
        ([0.0], TypeError, "AdapterFusion.keep: indices must be ints"),
        ([3], ValueError, "AdapterFusion.keep: index 3 is out of range for 3 adapters"),
        ([-1], ValueError, "AdapterFusion.keep: index -1 is out of range"),
        ([1, 1], ValueError, "AdapterFusion.keep: indices must be distinct"),
    ]:
        with pytest.raises(exc, match=message):
            fusion.keep(bad)
    assert fusion.num_adapters == 3


# ---------------------------------------------------------------- peftkern.prune_fusion on a model

transformers = pytest.importorskip("transformers")


def fused_bert(tmp_path, n=4):
    """A tiny BERT with a fusion over n saved pfeiffer adapters (random), the fusion's projections
    random (so the adapters' weights differ); {name: dir}."""
    import peftkern

    from .tiny_models import bert

    dirs = {}
    for i in range(n):
        model = peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5, placement="pfeiffer"))
        randomize(model, 10 + i)
        dirs[f"task{i}"] = str(tmp_path / f"task{i}")
        peftkern.save_pretrained(model, dirs[f"task{i}"])
    model = peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5, placement="pfeiffer", fusion=dirs))
    randomize(model, 3, scale=0.6)
    return model, dirs


def randomize(model, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():
            if t.requires_grad:
                t.copy_(torch.randn(t.shape, generator=g) * scale)


def batches():
    g = torch.Generator().manual_seed(5)
    out = []
    for lengths in ([9, 4, 6], [2, 9]):
        ids = torch.randint(0, 97, (len(lengths), 9), generator=g)
        mask = (torch.arange(9)[None] < torch.tensor(lengths)[:, None]).long()
        out.append(dict(input_ids=ids, attention_mask=mask))
    return out


def fusion_sites(model):
    from peftkern.nn import AdapterFusion

    return {
        n: m.adapter["default"]
        for n, m in model.named_modules()
        if isinstance(getattr(m, "adapter", None), torch.nn.ModuleDict)
        and isinstance(m.adapter["default"], AdapterFusion)
    }


def test_prune_fusion_keeps_the_adapters_weighted_most(tmp_path):
    import peftkern

    model, dirs = fused_bert(tmp_path)
    sites = fusion_sites(model)
    assert len(sites) == 2 and all(f.num_adapters == 4 for f in sites.values())
    # the reference: each site's input captured, its weights written out, the padding left out
    inputs = {s: [] for s in sites}
    hooks = [
        f.register_forward_pre_hook(lambda f, a, s=s: inputs[s].append(a[0].detach()))
        for s, f in sites.items()
    ]
    with torch.no_grad():
        for b in batches():
            model(**b)
    for h in hooks:
        h.remove()
    site_means = {}
    for s, f in sites.items():
        total, count = torch.zeros(4, dtype=torch.float64), 0.0
        for x, b in zip(inputs[s], batches()):
            p = fusion_weights_reference(f, ref.f64(x))
            m = b["attention_mask"].double()
            total += (p * m[..., None]).sum((0, 1))
            count += m.sum().item()
        site_means[s] = total / count
    score = torch.stack(list(site_means.values())).mean(0)
    best = sorted(sorted(range(4), key=lambda i: -score[i].item())[:2])
    x = batches()[0]
    with torch.no_grad():
        full = model(**x).last_hidden_state
    result = peftkern.prune_fusion(model, batches(), 2)
    assert result.kept == [f"task{i}" for i in best]
    for i in range(4):
        assert abs(result.weights[f"task{i}"] - score[i].item()) <= 1e-5 * score[i].item()
    for s in sites:
        assert_close(torch.tensor(result.site_weights[s]), site_means[s], torch.float32)
    assert all(f.num_adapters == 2 for f in fusion_sites(model).values())
    assert list(peftkern.adapters(model)["default"].fusion) == result.kept
    assert not model.training and not any(f.record_weights for f in sites.values())
    # the pruned model is the fusion built over the kept adapters alone, with the same projections
    kept_dirs = {n: dirs[n] for n in result.kept}
    from .tiny_models import bert

    twin = peftkern.inject(
        bert(), peftkern.AdapterConfig(bottleneck=5, placement="pfeiffer", fusion=kept_dirs)
    )
    twin_params = dict(twin.named_parameters())
    with torch.no_grad():
        for n, t in model.named_parameters():
            if t.requires_grad:
                twin_params[n].copy_(t)
        got, want = model(**x).last_hidden_state, twin(**x).last_hidden_state
    assert_close(got, want.double(), torch.float32)
    assert rel_err(got, full) > 1e-4  # pruning changed the model (two adapters left of four)
    # save and load: the checkpoint holds the kept adapters, from_pretrained builds fusions of 2
    peftkern.save_pretrained(model, tmp_path / "pruned")
    loaded = peftkern.from_pretrained(bert(), tmp_path / "pruned")
    assert list(peftkern.adapters(loaded)["default"].fusion) == result.kept
    assert all(f.num_adapters == 2 for f in fusion_sites(loaded).values())
    with torch.no_grad():
        assert_close(loaded(**x).last_hidden_state, want.double(), torch.float32)


def test_prune_fusion_tensor_batches_count_every_token(tmp_path):
    import peftkern

    model, _ = fused_bert(tmp_path, n=3)
    sites = fusion_sites(model)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(9))
    inputs = {}
    hooks = [
        f.register_forward_pre_hook(lambda f, a, s=s: inputs.setdefault(s, a[0].detach()))
        for s, f in sites.items()
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    score = torch.stack(
        [fusion_weights_reference(f, ref.f64(inputs[s])).mean((0, 1)) for s, f in sites.items()]
    ).mean(0)
    result = peftkern.prune_fusion(model, [ids], 3)  # k = N: nothing dropped, the weights reported
    assert result.kept == ["task0", "task1", "task2"]
    for i in range(3):
        assert abs(result.weights[f"task{i}"] - score[i].item()) <= 1e-5 * score[i].item()


def test_prune_fusion_bad_input(tmp_path):
    import peftkern

    from .tiny_models import bert

    with pytest.raises(ValueError, match="prune_fusion: the model holds no peftkern adapter"):
        peftkern.prune_fusion(bert(), batches(), 1)
    plain = peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5))
    with pytest.raises(ValueError, match=r"prune_fusion: the model holds 0 AdapterFusion adapters"):
        peftkern.prune_fusion(plain, batches(), 1)
    model, _ = fused_bert(tmp_path, n=3)
    cases = [
        (dict(k=0), ValueError, r"prune_fusion: k must be in \[1, 3\]"),
        (dict(k=4), ValueError, r"prune_fusion: k must be in \[1, 3\]"),
        (dict(k=True), TypeError, "prune_fusion: k must be an int"),
        (dict(k=2.0), TypeError, "prune_fusion: k must be an int"),
        (dict(name="other"), ValueError, "prune_fusion: 'other' is no AdapterFusion adapter"),
        (dict(data=batches()[0]), TypeError, "prune_fusion: data must be an iterable of batches"),
        (dict(data=[]), ValueError, "prune_fusion: data held no batch"),
        (dict(data=[[1, 2]]), TypeError, "prune_fusion: a batch must be a dict of model arguments"),
    ]
    for kw, exc, message in cases:
        args = {"data": batches(), "k": 2, **kw}
        with pytest.raises(exc, match=message):
            peftkern.prune_fusion(model, args.pop("data"), args.pop("k"), **args)
    all_padding = [
        dict(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.zeros(2, 4, dtype=torch.long))
    ]
    with pytest.raises(ValueError, match="prune_fusion: the fusion at .* saw no token"):
        peftkern.prune_fusion(model, all_padding, 2)
    assert all(f.num_adapters == 3 for f in fusion_sites(model).values())  # refused: unchanged
    with (
        peftkern.tasks(["default", None]),
        pytest.raises(ValueError, match="prune_fusion: a mixed batch is set"),
    ):
        peftkern.prune_fusion(model, batches(), 2)
