"""KronA: peftkern.ops.krona_linear, peftkern.nn.KronALinear, KronAConfig through inject, against the
float64 formula (tests/reference.py) and Hugging Face peft's LoKr with full-rank factors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkern
from peftkern.integrations.peft import load_peft_weights
from peftkern.nn import KronALinear
from peftkern.nn.krona import factorization
from peftkern.ops import krona_linear

from . import reference as ref
from . import tiny_models
from .conftest import DEVICES, assert_close, check_against_reference, poison_cuda_cache, randn
from .test_adapter import dtypes_for

peft = pytest.importorskip("peft")

NAMES = ("x", "weight", "bias", "kron_A", "kron_B")


def make_inputs(lead, a, b, dtype, device, bias=True, grad=("x", "kron_A", "kron_B"), contiguous=True):
    (out_a, in_a), (out_b, in_b) = a, b
    n_in, n_out = in_a * in_b, out_a * out_b
    x = randn(*lead, n_in, dtype=dtype, device=device)
    if not contiguous:  # a transposed view of the same values' shape
        x = randn(n_in, *lead, dtype=dtype, device=device).movedim(0, -1)
        assert not x.is_contiguous() or x.numel() <= n_in
    t = dict(
        x=x,
        weight=randn(n_out, n_in, dtype=dtype, device=device, scale=n_in**-0.5),
        bias=randn(n_out, dtype=dtype, device=device, scale=0.1) if bias else None,
        kron_A=randn(out_a, in_a, dtype=dtype, device=device, scale=in_a**-0.5),
        kron_B=randn(out_b, in_b, dtype=dtype, device=device, scale=in_b**-0.5),
    )
    for name in grad:
        if t[name] is not None:
            t[name].requires_grad_()
    return tuple(t[n] for n in NAMES)


def check(inputs, dtype, scaling=0.7):
    return check_against_reference(
        lambda *ts: krona_linear(*ts, scaling=scaling),
        lambda *ts: ref.krona_linear(*ts, scaling),
        inputs,
        NAMES,
        dtype,
    )


SHAPES = [((3, 5), (4, 2)), ((1, 7), (6, 1)), ((8, 4), (4, 8)), ((2, 3), (5, 7))]  # not square


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("factors", SHAPES)
def test_op_matches_the_formula_float32(T, factors):
    check(make_inputs((T,), *factors, torch.float32, "cpu"), torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(0,), (7,), (2, 5), (2, 3, 4)])
def test_op_every_dtype_and_leading_shape(device, lead):
    for dtype in dtypes_for(device):
        if device == "cuda":
            poison_cuda_cache()
        check(make_inputs(lead, (3, 5), (4, 2), dtype, device, grad=NAMES), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_op_non_contiguous_and_without_bias(device):
    inputs = make_inputs((6, 5), (2, 3), (5, 7), torch.float32, device, bias=False, contiguous=False)
    assert not inputs[0].is_contiguous()
    check(inputs, torch.float32)


def test_op_gradcheck_float64_and_opcheck():
    inputs = make_inputs((2, 3), (3, 2), (2, 3), torch.float64, "cpu", grad=NAMES)
    assert torch.autograd.gradcheck(lambda *ts: krona_linear(*ts, scaling=1.3), inputs)
    torch.library.opcheck(torch.ops.peftkern.krona_linear, (*inputs, 1.3))


def test_op_index_convention_is_torch_kron():
    A, B = torch.randn(3, 2, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    x = torch.randn(9, 10, dtype=torch.float64)
    zero = torch.zeros(12, 10, dtype=torch.float64)
    assert torch.allclose(krona_linear(x, zero, None, A, B, scaling=1.0), x @ torch.kron(A, B).T)


def test_op_frozen_weight_gets_no_gradient_and_under_compile():
    x, w, b, A, B = make_inputs((5,), (2, 4), (3, 2), torch.float32, "cpu")
    out = torch.compile(lambda *t: krona_linear(*t, scaling=0.5), fullgraph=True)(x, w, b, A, B)
    assert_close(out, ref.krona_linear(*(ref.f64(t) for t in (x, w, b, A, B)), 0.5), torch.float32)
    out.sum().backward()
    assert w.grad is None and A.grad is not None


def test_op_bad_inputs_name_the_argument():
    x, w, b, A, B = make_inputs((4,), (3, 5), (4, 2), torch.float32, "cpu", grad=())
    with pytest.raises(TypeError, match="krona_linear: kron_A must be a tensor"):
        krona_linear(x, w, b, None, B, scaling=1.0)
    with pytest.raises(TypeError, match="krona_linear: scaling must be a real number"):
        krona_linear(x, w, b, A, B, scaling="1")
    with pytest.raises(
        ValueError, match=r"kron_A \(3, 4\) ⊗ kron_B \(4, 2\) is \[12, 8\]; weight is \[12, 10\]"
    ):
        krona_linear(x, w, b, torch.randn(3, 4), B, scaling=1.0)
    with pytest.raises(ValueError, match="kron_B must be a 2-D matrix"):
        krona_linear(x, w, b, A, B[None], scaling=1.0)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 10\]"):
        krona_linear(x[:, :9], w, b, A, B, scaling=1.0)
    with pytest.raises(ValueError, match=r"bias must have shape \[12\]"):
        krona_linear(x, w, b[:5], A, B, scaling=1.0)
    with pytest.raises(ValueError, match="kron_B must have x's dtype torch.float32; got torch.float64"):
        krona_linear(x, w, b, A, B.double(), scaling=1.0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        krona_linear(x.long(), w, b, A, B, scaling=1.0)
    with pytest.raises(ValueError, match="kron_A is on meta but x is on cpu"):
        krona_linear(x, w, b, A.to("meta"), B, scaling=1.0)


def test_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in list(range(1, 200)) + [384, 768, 1000, 4096, 1536]:
        for f in (-1, 1, 2, 3, 4, 8, 16, 64):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


# -- the module ------------------------------------------------------------------------------------


def adapted(n_in=10, n_out=12, names=(("a", 3, 5, 0.5),)):
    lin = nn.Linear(n_in, n_out).double()
    m = KronALinear.adapt(lin)
    for name, out_a, in_a, s in names:
        m.add(name, out_a, in_a, scaling=s)
        with torch.no_grad():
            m.kron_A[name].normal_()  # not the zero init: the update must show
    return m


def expected(m, x, names):
    w = m.weight + sum(m.krona_scaling[n] * torch.kron(m.kron_A[n], m.kron_B[n]) for n in names)
    return F.linear(x, w, m.bias)


def test_module_starts_as_its_base_and_adapts_in_place():
    lin = nn.Linear(10, 12)
    w, b = lin.weight, lin.bias
    m = KronALinear.adapt(lin)
    assert m is lin and m.weight is w and m.bias is b
    m.add("a", 3, 5)
    assert m.kron_A["a"].shape == (3, 5) and m.kron_B["a"].shape == (4, 2) and not m.kron_A["a"].any()
    m._peftkern_active = ("a",)
    x = torch.randn(4, 10)
    assert torch.equal(m(x), F.linear(x, w, b))
    m.remove("a")
    m.restore()
    assert type(lin) is nn.Linear and not hasattr(lin, "kron_A")


def test_module_several_active_add_and_merge_keeps_outputs():
    m = adapted(names=(("a", 3, 5, 0.5), ("b", 2, 2, -1.5)))
    x = torch.randn(2, 7, 10, dtype=torch.float64)
    m._peftkern_active = ("a", "b")
    assert torch.allclose(m(x), expected(m, x, ["a", "b"]))
    m._peftkern_active = ("b",)
    assert torch.allclose(m(x), expected(m, x, ["b"]))
    assert torch.allclose(m.merged_weight(["a"]), m.weight + 0.5 * torch.kron(m.kron_A["a"], m.kron_B["a"]))


def test_module_mixed_batch_equals_each_task_alone():
    from peftkern.nn import routing

    m = adapted(names=(("a", 3, 5, 0.5), ("b", 2, 2, -1.5)))
    x = torch.randn(4, 3, 10, dtype=torch.float64, requires_grad=True)
    samples = [("a",), ("b",), (), ("a",)]
    with routing.routed(routing.SampleRoute(samples)):
        out = m(x)
    for i, s in enumerate(samples):
        assert torch.allclose(out[i], expected(m, x[i], s))
    out.sum().backward()
    assert m.kron_A["a"].grad is not None and m.kron_B["b"].grad is not None


def test_module_bad_arguments():
    m = KronALinear.adapt(nn.Linear(10, 12))
    with pytest.raises(ValueError, match=r"out_a \(5\) must divide out_features \(12\)"):
        m.add("a", 5, 5)
    with pytest.raises(ValueError, match="name must be a non-empty string without '.'"):
        m.add("a.b", 3, 5)
    m.add("a", 3, 5)
    with pytest.raises(ValueError, match="already holds an update named 'a'"):
        m.add("a", 3, 5)
    with pytest.raises(ValueError, match=r"restore: it still holds \['a'\]"):
        m.restore()
    with pytest.raises(TypeError, match="expects an nn.Linear; got Conv1d"):
        KronALinear.adapt(nn.Conv1d(2, 2, 1))


@pytest.mark.cuda
def test_module_bf16_autocast_on_cuda():
    m = adapted().float().cuda()
    m._peftkern_active = ("a",)
    x = torch.randn(5, 10, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, expected(m.double(), x.double(), ["a"]), torch.bfloat16)


# -- inject, peft's LoKr ---------------------------------------------------------------------------


def test_config_checks():
    with pytest.raises(ValueError, match="decompose_factor must be -1 or a positive int; got 0"):
        peftkern.KronAConfig(decompose_factor=0)
    with pytest.raises(TypeError, match="decompose_factor must be an int"):
        peftkern.KronAConfig(decompose_factor=2.0)
    with pytest.raises(ValueError, match="scaling must be a finite float"):
        peftkern.KronAConfig(scaling=float("nan"))


def test_inject_refuses_a_layer_of_another_method():
    model = peftkern.inject(tiny_models.bert(), peftkern.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="holds another method's adapters"):
        peftkern.inject(model, peftkern.KronAConfig(), name="k")


def lokr_pair(base, arch_targets, alpha=3.0, r=64):
    """peft's LoKr with full-rank factors (r large, no decompose_both), w1 non-zero."""
    cfg = peft.LoKrConfig(r=r, alpha=alpha, target_modules=arch_targets)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    torch.manual_seed(3)
    for n, t in theirs.named_parameters():
        if "lokr_w" in n:
            with torch.no_grad():
                t.normal_(0, 0.3)
    ours = peftkern.inject(
        copy.deepcopy(base), peftkern.KronAConfig(target_modules=arch_targets, scaling=alpha / r)
    )
    return theirs, ours


def copy_lokr(theirs, ours):
    """peft's w1, w2 into KronA's A, B (the saved names' map, through from_peft)."""
    state = {k.replace(".default", ""): v for k, v in theirs.state_dict().items() if "lokr_" in k}
    load_peft_weights(ours, state)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_logits_and_gradients_are_peft_lokr_s(arch):
    base = getattr(tiny_models, arch)()
    targets = ["query", "value"] if arch == "bert" else ["q_proj", "v_proj", "down_proj"]
    theirs, ours = lokr_pair(base, targets)
    copy_lokr(theirs, ours)
    ids = torch.randint(0, 97, (2, 9))

    def out(m):
        o = m(input_ids=ids)
        return o.last_hidden_state if arch == "bert" else o.logits

    a, b = out(ours), out(theirs)
    assert_close(a, b, torch.float32)
    probe = torch.randn_like(a)  # not a norm: a LayerNorm output's mean square is constant
    (a * probe).sum().backward()
    (b * probe).sum().backward()
    grads = {n: t.grad for n, t in theirs.named_parameters() if t.requires_grad}
    checked = 0
    for n, t in ours.named_parameters():
        if t.requires_grad:
            peft_name = "base_model.model." + n.replace("kron_A.default", "lokr_w1.default").replace(
                "kron_B.default", "lokr_w2.default"
            )
            assert_close(t.grad, grads[peft_name], torch.float32, f"grad {n}")
            checked += 1
    assert checked == len(grads) > 0


def test_load_peft_weights_of_a_saved_lokr_checkpoint(tmp_path):
    base = tiny_models.bert()
    theirs, ours = lokr_pair(base, ["query", "value"])
    theirs.save_pretrained(tmp_path / "lokr")
    load_peft_weights(ours, tmp_path / "lokr")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert_close(
            ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state, torch.float32
        )


def test_load_peft_weights_refuses_low_rank_lokr():
    base = tiny_models.bert()
    low = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(r=2, target_modules=["query", "value"]))
    state = {k.replace(".default", ""): v for k, v in low.state_dict().items() if "lokr_" in k}
    assert any("lokr_w2_a" in k for k in state)
    ours = peftkern.inject(copy.deepcopy(base), peftkern.KronAConfig(target_modules=["query", "value"]))
    with pytest.raises(
        ValueError, match=r"holds low-rank factors \(lokr_w2_a, lokr_w2_b\); KronA takes full-rank"
    ):
        load_peft_weights(ours, state)


def test_save_load_merge_delete_and_mixed_batch(tmp_path):
    base = tiny_models.bert()
    model = peftkern.inject(
        copy.deepcopy(base), peftkern.KronAConfig(decompose_factor=4, scaling=2.0), name="a"
    )
    peftkern.inject(model, peftkern.KronAConfig(target_modules=["key"]), name="b")
    with torch.no_grad():
        for n, t in model.named_parameters():
            if "kron_A" in n:
                t.normal_()
    ids = torch.randint(0, 97, (3, 9))
    outs = {}
    for name in ("a", "b"):
        peftkern.set_active(model, name)
        outs[name] = model(input_ids=ids).last_hidden_state
    peftkern.set_active(model, None)
    outs[None] = model(input_ids=ids).last_hidden_state
    with peftkern.tasks(["a", None, "b"]):
        mixed = model(input_ids=ids).last_hidden_state
    for i, name in enumerate(["a", None, "b"]):
        assert_close(mixed[i], outs[name][i], torch.float32)
    q = model.encoder.layer[0].attention.self.query
    assert q.kron_A["a"].shape == (4, 4) and q.kron_B["a"].shape == (8, 8)  # decompose_factor 4 of 32 x 32

    peftkern.set_active(model, "a")
    peftkern.save_pretrained(model, tmp_path, names="a")
    loaded = peftkern.from_pretrained(copy.deepcopy(base), tmp_path)
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, outs["a"])
    peftkern.merge(loaded, verbose=False)
    assert type(loaded.encoder.layer[0].attention.self.query) is nn.Linear
    assert_close(loaded(input_ids=ids).last_hidden_state, outs["a"], torch.float32)

    peftkern.delete_adapter(model, "b")
    assert type(model.encoder.layer[0].attention.self.key) is nn.Linear


# -- MiniLM -----------------------------------------------------------------------------------------


def test_minilm_fine_tune_lowers_the_loss():
    minilm_tests = pytest.importorskip("tests.test_minilm")
    D, LAYERS = minilm_tests.D, minilm_tests.LAYERS
    encoder = copy.deepcopy(minilm_tests._base())
    torch.manual_seed(1)
    peftkern.inject(encoder, peftkern.KronAConfig(scaling=1.0))
    trainable, _ = peftkern.trainable_parameters(encoder)
    a, b = factorization(D), factorization(D)  # query and value: 384 -> 384, (16, 24) each side
    assert a == (16, 24)
    assert trainable == LAYERS * 2 * (a[0] * b[0] + a[1] * b[1])
    _, losses = minilm_tests.train(minilm_tests.Classifier(encoder), 1e-2)
    assert losses[-1] < 0.7 * losses[0], losses
