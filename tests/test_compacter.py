"""Compacter (AdapterConfig(phm_dim=...)): peftkern.nn.adapter.Compacter / PHMLinear against the float64
formula (tests/reference.py), and through inject: the shared rule tied and saved once, save/load,
merge into a plain adapter, a mixed batch, AdapterDrop, bad configs."""

import copy

import pytest
import torch
from torch import nn

import peftkern
from peftkern.nn.adapter import Adapter, Compacter, PHMLinear

from . import reference as ref
from . import tiny_models
from .conftest import DEVICES, assert_close, check_against_reference, poison_cuda_cache, randn
from .test_adapter import dtypes_for

NAMES = ("x", "rule_down", "left_down", "right_down", "b_down", "rule_up", "left_up", "right_up", "b_up")


def compacter_params(m: Compacter):
    d, u = m.down, m.up
    return [d.phm_rule, d.phm_left, d.phm_right, d.bias, u.phm_rule, u.phm_left, u.phm_right, u.bias]


def randomised(m: Compacter):
    """Values of order one (not the 1e-4 rule), so every gradient shows."""
    with torch.no_grad():
        for t in compacter_params(m):
            t.copy_(torch.randn_like(t) * 0.5)
    return m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead", [(1,), (7,), (33,), (2, 3, 5), (0,)])
@pytest.mark.parametrize("n, rank, d, r", [(2, 1, 12, 4), (4, 2, 16, 8), (3, 3, 9, 6)])
def test_forward_and_every_gradient_match_the_formula(device, lead, n, rank, d, r):
    for dtype in dtypes_for(device):
        if device == "cuda":
            poison_cuda_cache()
        m = randomised(Compacter(d, r, phm_dim=n, phm_rank=rank, scale=0.7, device=device, dtype=dtype))
        x = randn(*lead, d, dtype=dtype, device=device, requires_grad=True)
        leaves = [x, *compacter_params(m)]

        def fn(*ts):
            return m(ts[0])

        def ref_fn(*ts):
            return ref.compacter(*ts, activation="gelu", scale=0.7)

        check_against_reference(fn, ref_fn, leaves, NAMES, dtype)


def test_gradcheck_float64_with_a_shared_rule_and_a_gate():
    rule = nn.Parameter(torch.randn(2, 2, 2, dtype=torch.float64))
    m = randomised(Compacter(6, 4, phm_dim=2, phm_rank=2, rule=rule, gate=True, dtype=torch.float64))
    assert m.down.phm_rule is m.up.phm_rule is rule
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    params = list(dict.fromkeys(m.parameters()))

    def fn(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(m, dict(zip(names, ps)), tie_weights=True):
            return m(x)

    names = [n for n, t in m.named_parameters()]
    assert torch.autograd.gradcheck(fn, (x, *params))


def test_weight_is_the_phm_sum_and_non_contiguous_input():
    m = randomised(Compacter(12, 6, phm_dim=3, phm_rank=2, dtype=torch.float64))
    w = ref.phm_weight(m.down.phm_rule, m.down.phm_left, m.down.phm_right)
    assert torch.allclose(m.down.weight, w) and w.shape == (6, 12)
    x = torch.randn(12, 5, dtype=torch.float64).T
    assert not x.is_contiguous()
    expected = ref.adapter(x, w, m.down.bias, m.up.weight, m.up.bias)
    assert torch.allclose(m(x), expected)


def test_adapterhub_init_and_to_adapter():
    torch.manual_seed(0)
    m = Compacter(64, 16, phm_dim=4)
    assert m.down.phm_rule is not m.up.phm_rule  # no rule given: each PHM layer its own
    assert m.down.phm_rule.std() < 3e-4 and not m.down.bias.any() and not m.up.bias.any()
    bound = (6 / (16 // 4 + 1)) ** 0.5  # Glorot-uniform on [out/n, rank]
    assert m.down.phm_left.abs().max() <= bound
    randomised(m)
    x = torch.randn(3, 64)
    plain = m.to_adapter()
    assert type(plain) is Adapter
    assert torch.allclose(plain(x), m(x), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(
        ValueError, match=r"phm_dim \(3\) must divide d_model \(16\) and the bottleneck \(6\)"
    ):
        Compacter(16, 6, phm_dim=3)
    with pytest.raises(ValueError, match=r"PHMLinear: rule must be a Parameter of shape \[2, 2, 2\]"):
        PHMLinear(4, 4, 2, 1, rule=nn.Parameter(torch.zeros(3, 3, 3)))
    with pytest.raises(ValueError, match="phm_dim must be"):
        peftkern.AdapterConfig(phm_dim=0)
    with pytest.raises(
        ValueError, match="phm_dim \\(Compacter\\) builds single adapters; it cannot take fusion"
    ):
        peftkern.AdapterConfig(phm_dim=2, fusion={"a": "/tmp/a"})
    with pytest.raises(ValueError, match="cannot take num_experts"):
        peftkern.AdapterConfig(phm_dim=2, num_experts=2)
    with pytest.raises(ValueError, match="init must stay 'houlsby'"):
        peftkern.AdapterConfig(phm_dim=2, init="lora")
    with pytest.raises(TypeError, match="shared_phm_rule must be a bool"):
        peftkern.AdapterConfig(phm_dim=2, shared_phm_rule=1)
    # tiny BERT: d_model 32, bottleneck 32 // 16 = 2
    with pytest.raises(
        ValueError, match=r"phm_dim \(4\) must divide d_model \(32\) and the bottleneck \(2\)"
    ):
        peftkern.inject(tiny_models.bert(), peftkern.AdapterConfig(phm_dim=4))


def injected(shared=True, **kw):
    model = peftkern.inject(
        tiny_models.bert(), peftkern.AdapterConfig(bottleneck=8, phm_dim=4, shared_phm_rule=shared, **kw)
    )
    with torch.no_grad():
        for n, t in model.named_parameters():
            if t.requires_grad:
                t.copy_(torch.randn_like(t) * 0.3)
    return model


def rules(model):
    return {id(m.phm_rule) for m in model.modules() if isinstance(m, PHMLinear)}


@pytest.mark.parametrize("shared", [True, False])
def test_inject_trainable_count_save_load_and_tied_rule(shared, tmp_path):
    model = injected(shared)
    sites = 2 * 2  # houlsby: 2 layers x (attention output, FFN output)
    d, r, n, k = 32, 8, 4, 1
    per_site = 2 * n * (d // n + r // n) * k + r + d  # factors of down and up, their biases
    rule_count = n**3 * (1 if shared else 2 * sites)
    norms = 2 * 2 * 2 * d  # houlsby's default: each block's two LayerNorms, weight and bias
    assert peftkern.trainable_parameters(model)[0] == sites * per_site + rule_count + norms
    assert len(rules(model)) == (1 if shared else 2 * sites)
    ids = torch.randint(0, 97, (2, 9))
    out = model(input_ids=ids).last_hidden_state
    (out * torch.randn_like(out)).sum().backward()
    if shared:
        rule = next(m.phm_rule for m in model.modules() if isinstance(m, PHMLinear))
        assert rule.grad is not None and rule.grad.abs().sum() > 0
    peftkern.save_pretrained(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "peftkern_weights.safetensors"))
    assert sum("phm_rule" in k for k in saved) == (1 if shared else 2 * sites)
    assert ("adapter_phm_rule" in saved) == shared
    loaded = peftkern.from_pretrained(tiny_models.bert(), tmp_path)
    assert len(rules(loaded)) == len(rules(model))  # tied again
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)


def test_merge_into_plain_adapters_keeps_outputs():
    model = injected()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        peftkern.merge(model, verbose=False)
        after = model(input_ids=ids).last_hidden_state
    assert not any(isinstance(m, Compacter) for m in model.modules())
    assert any(type(m) is Adapter for m in model.modules())
    assert_close(after, before, torch.float32)


def test_mixed_batch_equals_each_task_alone_and_adapterdrop():
    model = injected()
    peftkern.inject(model, peftkern.AdapterConfig(bottleneck=8, phm_dim=2, phm_rank=2), name="b")
    ids = torch.randint(0, 97, (3, 9))
    outs = {}
    with torch.no_grad():
        for name in ("default", "b", None):
            peftkern.set_active(model, name)
            outs[name] = model(input_ids=ids).last_hidden_state
        with peftkern.tasks(["b", None, "default"]):
            mixed = model(input_ids=ids).last_hidden_state
    for i, name in enumerate(["b", None, "default"]):
        assert_close(mixed[i], outs[name][i], torch.float32)
    assert len(rules(model)) == 2  # one shared rule per named Compacter

    dropped = injected(drop_layers=1, drop_prob=0.5)
    assert not hasattr(dropped.encoder.layer[0].output.dense, "adapter")
    dropped.train()
    dropped(input_ids=ids)


def test_minilm_fine_tune_lowers_the_loss():
    minilm_tests = pytest.importorskip("tests.test_minilm")
    D, LAYERS = minilm_tests.D, minilm_tests.LAYERS
    encoder = copy.deepcopy(minilm_tests._base())
    torch.manual_seed(1)
    # AdapterHub's Compacter: reduction_factor 32, phm_dim 4, rank 1, shared rule, houlsby, gelu, and
    # the norms frozen (the houlsby placement's default would train them)
    peftkern.inject(encoder, peftkern.AdapterConfig(phm_dim=4, reduction_factor=32, train_layer_norms=False))
    r, n = D // 32, 4
    per_site = 2 * n * (D // n + r // n) + r + D
    assert peftkern.trainable_parameters(encoder)[0] == LAYERS * 2 * per_site + n**3
    _, losses = minilm_tests.train(minilm_tests.Classifier(encoder), 3e-3)
    assert losses[-1] < 0.7 * losses[0], losses
