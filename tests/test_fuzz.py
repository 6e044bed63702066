"""Property-based fuzzing (hypothesis) of every op's CPU path and of the modules' constructors.

Value properties: random shapes (0-size leading dims, 1, odd sizes up to ~70), dtypes (float32,
float64, bfloat16, float16), layouts (contiguous, strided views of a bigger tensor, transposed,
expanded) and values (normal; huge where the float64 result still fits the dtype; a few inf / -inf /
NaN entries) against tests/reference.py evaluated in float64:
  finite inputs     the output and every gradient within conftest's relative tolerance, or, for an
                    ill-conditioned example (a sum that cancels, a sharp softmax), within the
                    tolerance times a float64 bound of the formula's rounding error (the sum of the
                    terms' magnitudes; see close_to_reference);
  non-finite inputs the output's NaN / +inf / -inf pattern equals the eager formula's in the op's
                    compute precision (check_nonfinite says why not float64's), and the entries
                    finite in all agree with the float64 reference within the tolerance.
Bad-input properties: a valid call with ONE corruption (wrong rank, mismatched size, zero size,
wrong dtype, a tensor on the meta device standing in for a wrong device, not a tensor, ids out of
range, bad activation / scalar / scalings / mask...) raises TypeError (dtypes, types) or ValueError
(shapes, values, devices) whose message names the corrupted argument (or, for a size or dtype that
several arguments share, one that disagrees with it). Same for the modules' constructors.

Profiles: "peftkern-ci" (default: derandomized, bounded for CI) and "peftkern-deep" (20x the
examples, random each run). Select with PEFTKERN_HYPOTHESIS_PROFILE=peftkern-deep, or with
``--hypothesis-profile=peftkern-deep`` once conftest.py registers the profiles (hypothesis loads the
command-line profile before test modules are imported): ``from tests.test_fuzz import
register_profiles; register_profiles()`` there.
"""

import math
import os
import re

import pytest

pytest.importorskip("hypothesis", reason="the property-based tests need hypothesis (make's venv has it)")

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st

from peftkern import nn as pknn
from peftkern import ops

from . import reference as ref
from .conftest import REL_TOL

# ---------------------------------------------------------------- profiles

PROFILES = ("peftkern-ci", "peftkern-deep")


def register_profiles():
    """peftkern-ci: derandomized (the same examples every run) and bounded; a failing test stops at its
    first counterexample, unshrunk (the failure message and the printed draws describe it).
    peftkern-deep: 20x the examples, fresh ones every run, shrunk, every distinct failure reported.
    max_examples is the unit each test scales by its weight (see fuzz())."""
    common = dict(
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    settings.register_profile(
        "peftkern-ci",
        max_examples=10,
        derandomize=True,
        report_multiple_bugs=False,
        phases=(Phase.explicit, Phase.generate, Phase.target),
        **common,
    )
    settings.register_profile("peftkern-deep", max_examples=200, derandomize=False, **common)


register_profiles()
# hypothesis loads its own "ci" profile (100 examples, shrinking) where a CI variable is set; ours
# replaces it and "default", and a profile named on the command line wins.
if settings.get_current_profile_name() in ("default", "ci"):
    settings.load_profile(os.environ.get("PEFTKERN_HYPOTHESIS_PROFILE", "peftkern-ci"))


# examples per test, in units of the profile's max_examples (peftkern-ci: 10), by the cost of one example
WEIGHT_VALUES = 15  # a reference evaluation in float64 plus gradients: ~10-60 ms
WEIGHT_NONFINITE = 12
WEIGHT_BAD_INPUT = 5  # per (op, corruption kind): ~5 ms
WEIGHT_MODULES = 3  # per (module, corruption kind): ~2 ms


def fuzz(weight):
    """The current profile with max_examples scaled by this test's weight (cost per example)."""
    base = settings.default
    return settings(base, max_examples=max(1, round(base.max_examples * weight)))


# ---------------------------------------------------------------- values and layouts

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# "huge": the magnitude of the inputs an output is linear in, chosen so the float64 result (and the
# gradients) still fit the dtype; examples where they would not are rejected (assume).
HUGE = {torch.float64: 1e100, torch.float32: 1e15, torch.bfloat16: 1e15, torch.float16: 3e2}
SPECIALS = (math.inf, -math.inf, math.nan)

dtypes = st.sampled_from(DTYPES)
features = st.one_of(st.sampled_from([1, 2, 7, 8, 31, 32, 33, 64, 65, 70]), st.integers(1, 70))
small = st.integers(1, 9)
leading = st.lists(st.sampled_from([0, 1, 2, 3, 5, 7]), min_size=0, max_size=3)


class Arg:
    """One input: a leaf (base) in the op's dtype and the view the op receives (strided, transposed,
    expanded or the leaf itself). Gradients are compared on the leaf, through the same view."""

    def __init__(self, base, view, layout):
        self.base, self.view, self.layout = base, view, layout

    def __call__(self, t=None):
        return self.view(self.base if t is None else t)

    def __repr__(self):
        return f"Arg({tuple(self.base.shape)} {self.base.dtype} {self.layout} -> {tuple(self().shape)})"


def _identity(t):
    return t


def _layout(draw, shape, allow, expand=True):
    """(shape of the leaf, view from the leaf to `shape`, label)."""
    kinds = ["contiguous"]
    if allow and shape:
        kinds += ["strided"] + (["expanded"] if expand else []) + (["transposed"] if len(shape) >= 2 else [])
    kind = draw(st.sampled_from(kinds), label="layout")
    if kind == "contiguous":
        return shape, _identity, kind
    dim = draw(st.integers(0, len(shape) - 1), label="layout dim")
    if kind == "strided":  # every other element of a tensor twice as long along dim
        index = (slice(None),) * dim + (slice(None, None, 2),)
        return shape[:dim] + (2 * shape[dim],) + shape[dim + 1 :], lambda t: t[index], f"strided({dim})"
    if kind == "expanded":  # stride 0 along dim
        return shape[:dim] + (1,) + shape[dim + 1 :], lambda t: t.expand(shape), f"expanded({dim})"
    return shape[:-2] + (shape[-1], shape[-2]), lambda t: t.transpose(-1, -2), "transposed"


def draw_arg(draw, gen, shape, dtype, scale=1.0, layout=True, specials=False, name="arg"):
    shape = tuple(int(s) for s in shape)
    base_shape, view, label = _layout(draw, shape, layout)
    base = (torch.randn(base_shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if specials and base.numel():
        for _ in range(draw(st.integers(1, 3), label=f"{name} specials")):
            pos = draw(st.integers(0, base.numel() - 1), label=f"{name} special index")
            base.view(-1)[pos] = draw(st.sampled_from(SPECIALS), label=f"{name} special value")
    return Arg(base, view, label)


def draw_ints(draw, gen, shape, lo, hi, dtype, layout=True):
    """An integer Arg with values in [lo, hi)."""
    shape = tuple(shape)
    base_shape, view, label = _layout(draw, shape, layout)
    base = torch.randint(lo, hi, base_shape, generator=gen, dtype=torch.int64).to(dtype)
    return Arg(base, view, label)


def generator(draw):
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    torch.manual_seed(seed)  # the upstream gradient and dropout follow it: examples replay exactly
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- checks


def _fits(t, dtype):
    """t (a float64 reference value) is finite and far enough from the dtype's largest value."""
    return (
        t is None
        or bool(torch.isfinite(t).all())
        and (t.numel() == 0 or t.abs().max().item() < torch.finfo(dtype).max / 8)
    )


def _rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if not bool(torch.isfinite(got).all()):
        return math.inf
    denom = want.norm()
    return ((got - want).norm() / denom).item() if denom > 0 else got.norm().item()


EAGER_FACTOR = 2.0


def with_magnitude(ref_fn, magnitude, signed=()):
    """Marks ref_fn as a sum of products: magnitude(*args) is the same formula with its scalar
    factors made non-negative, evaluated by check_finite on |args| (except the positions in `signed`,
    e.g. scores, which choose a mask), so every term counts positively."""
    ref_fn.magnitude, ref_fn.signed = magnitude, frozenset(signed)
    return ref_fn


def _magnitude_inputs(ref_fn, ts):
    """The inputs of ref_fn.magnitude: each float64 tensor detached, in absolute value except at the
    `signed` positions and for integer tensors; a new leaf that requires grad as the original does."""
    return [
        None
        if t is None
        else (
            t.detach() if i in ref_fn.signed or not t.is_floating_point() else t.detach().abs()
        ).requires_grad_(t.requires_grad)
        for i, t in enumerate(ts)
    ]


def close_to_reference(got, want, dtype, what, eager_value, bound=None):
    """got within conftest's relative tolerance for dtype of the float64 reference `want`, or, where
    the example is ill-conditioned (a sum that cancels to a small value, a sharp softmax):
      - for a sum of products, where `bound` (the same sum over the terms' absolute values, see
        with_magnitude) is given: ||got - want|| <= tol * ||bound||, the classic forward error bound
        of floating-point dot products (each term and partial sum off by a relative rounding error);
      - otherwise within EAGER_FACTOR x the error of the same eager formula evaluated in the storage
        dtype (eager_value() lists it on the op's input layout and on contiguous copies, whose
        summation orders differ: the larger error counts, so one lucky order does not set the bar)."""
    tol = REL_TOL[dtype]
    err = _rel_err(got, want)
    if err <= tol:
        return
    if bound is not None and math.isfinite(err) and bool(torch.isfinite(bound).all()):
        abs_err = (got.detach().double() - want.detach().double()).norm().item()
        limit = tol * bound.detach().double().norm().item()
        assert abs_err <= limit, (
            f"{what}: relative error {err:.3g} > {tol:g} ({dtype}), and the error {abs_err:.3g} > {tol:g} x "
            f"the norm of the terms' magnitudes ({limit:.3g})"
        )
        return
    errs = [math.inf if e is None else _rel_err(e, want) for e in eager_value()]
    eager_err = max([tol] + [e for e in errs if math.isfinite(e)])
    assert err <= EAGER_FACTOR * eager_err, (
        f"{what}: relative error {err:.3g} > {tol:g} ({dtype}) and > {EAGER_FACTOR:g}x the eager "
        f"formula's {eager_err:.3g} in the storage dtype"
    )


def check_finite(fn, ref_fn, args, names, dtype, grads=True):
    """Like conftest.check_against_reference, on Args (the op and the reference see the same views
    of the leaves; gradients are compared on the leaves), rejecting examples whose float64 result
    or gradients would not fit the dtype.

    Each value is compared by close_to_reference."""
    leaves = [None if a is None else a.base for a in args]
    leaves64 = [ref.f64(t) for t in leaves]

    def views(ts):
        return [None if a is None else a(t) for a, t in zip(args, ts)]

    expected = ref_fn(*views(leaves64))
    assume(_fits(expected, dtype))
    grads = grads and expected.requires_grad
    if grads:
        upstream = torch.randn(expected.shape, dtype=torch.float64).to(dtype) + 0.5
        expected.backward(upstream.double())
        assume(
            all(
                _fits(t64.grad, t.dtype)
                for t, t64 in zip(leaves, leaves64)
                if t is not None and t.requires_grad
            )
        )
    bound, bound_grads = None, {}
    if getattr(ref_fn, "bounds", None) is not None:
        bound_leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves64]
        bound_views = views(bound_leaves)
        g = upstream.double() if grads else torch.zeros_like(expected)
        with torch.no_grad():
            bound, view_bounds = ref_fn.bounds(*[None if t is None else t.detach() for t in bound_views], g)
        if grads:  # through the views to the leaves (an expanded leaf sums its positions' bounds)
            for name, leaf, view, b in zip(names, bound_leaves, bound_views, view_bounds):
                if leaf is not None:
                    bound_grads[name] = torch.autograd.grad(view, leaf, b)[0]
    elif getattr(ref_fn, "magnitude", None) is not None:
        mag_leaves = _magnitude_inputs(ref_fn, leaves64)
        bound = ref_fn.magnitude(*views(mag_leaves))
        if grads:
            bound.backward(upstream.double().abs())
            bound_grads = {n: None if t is None else t.grad for n, t in zip(names, mag_leaves)}
    eager = []

    def eager_values():  # the reference formula in the storage dtype, on the views and on contiguous copies
        if not eager:
            for layout in (views, lambda ts: [None if t is None else t.contiguous() for t in views(ts)]):
                same = [
                    None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in leaves
                ]
                with torch.enable_grad():
                    e = ref_fn(*layout(same))
                if grads:
                    e.backward(upstream)
                eager.append((e.detach(), {n: (None if t is None else t.grad) for n, t in zip(names, same)}))
        return eager

    out = fn(*views(leaves))
    assert out.dtype == dtype, f"output dtype {out.dtype} != {dtype}"
    close_to_reference(out, expected, dtype, "out", lambda: [e[0] for e in eager_values()], bound)
    if not grads:
        return out
    out.backward(upstream)
    for name, t, t64 in zip(names, leaves, leaves64):
        if t is not None and t.requires_grad:
            assert t.grad is not None, f"no gradient for {name}"
            assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
            expected_grad = torch.zeros_like(t64) if t64.grad is None else t64.grad
            coarser = max(dtype, t.dtype, key=lambda d: REL_TOL[d])
            close_to_reference(
                t.grad,
                expected_grad,
                coarser,
                f"grad {name}",
                lambda n=name: [e[1][n] for e in eager_values()],
                bound_grads.get(name),
            )
    return out


def assert_same_nonfinite(out, expected, pattern, dtype, eager_value, what="out", bound=None):
    """out's NaN / +inf / -inf entries are those of `pattern` (the eager formula in the op's compute
    precision); the entries finite in all agree with the float64 reference (close_to_reference)."""
    out, expected, pattern = out.detach().double(), expected.detach().double(), pattern.detach().double()
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, b = test(out), test(pattern)
        if not torch.equal(a, b):
            where = (a != b).nonzero()[:4]
            got = [out[tuple(i)].item() for i in where]
            want = [expected[tuple(i)].item() for i in where]
            raise AssertionError(
                f"{what}: {kind} pattern differs from the reference at {where.tolist()} "
                f"({a.sum().item()} vs {b.sum().item()} entries): op {got}, reference {want}"
            )
    both = torch.isfinite(out) & torch.isfinite(expected) & torch.isfinite(pattern)
    close_to_reference(
        out[both],
        expected[both],
        dtype,
        f"{what} (entries finite in both)",
        lambda: [e[both] for e in eager_value()],
        None if bound is None else bound.detach().double()[both],
    )


def check_nonfinite(fn, ref_fn, args, dtype):
    """Where inf and NaN go is the eager formula's in the precision the op computes in (float32 for
    the 16-bit dtypes, float64 for float64), cast to the storage dtype: the float64 reference can
    differ there because PyTorch's own kernels do (float32 erf-GeLU gives NaN at +inf, float64
    gives inf). The finite entries are held to the float64 reference."""
    leaves = [None if a is None else a.base for a in args]
    compute = torch.float64 if dtype == torch.float64 else torch.float32

    def as_compute(t):
        return t.detach().to(compute) if t.is_floating_point() else t

    with torch.no_grad():
        out = fn(*[None if a is None else a(t) for a, t in zip(args, leaves)])
        expected = ref_fn(*[None if a is None else a(ref.f64(t)) for a, t in zip(args, leaves)])
        pattern = ref_fn(*[None if a is None else a(as_compute(t)) for a, t in zip(args, leaves)]).to(dtype)

    def eager_value():  # the reference formula in the storage dtype, on the views and on contiguous copies
        with torch.no_grad():
            ins = [None if a is None else a(t) for a, t in zip(args, leaves)]
            return [
                ref_fn(*ins).double(),
                ref_fn(*[None if t is None else t.contiguous() for t in ins]).double(),
            ]

    bound = None
    if getattr(ref_fn, "magnitude", None) is not None:
        with torch.no_grad():
            mag = _magnitude_inputs(ref_fn, [ref.f64(t) for t in leaves])
            bound = ref_fn.magnitude(*[None if a is None else a(t) for a, t in zip(args, mag)])

    assert out.dtype == dtype
    assert_same_nonfinite(out, expected, pattern, dtype, eager_value, bound=bound)


def requires(draw, args, names, trainable):
    """Marks a random non-empty subset of the trainable leaves as requiring grad."""
    present = [n for n in trainable if args[names.index(n)] is not None]
    chosen = draw(st.lists(st.sampled_from(present), min_size=1, unique=True), label="requires grad")
    for n in chosen:
        args[names.index(n)].base.requires_grad_()


# ---------------------------------------------------------------- adapter

ADAPTER_NAMES = ("x", "w_down", "b_down", "w_up", "b_up", "residual")


def adapter_case(draw, specials):
    gen = generator(draw)
    dtype = draw(dtypes, label="dtype")
    lead, d, r = draw(leading, label="lead"), draw(features, label="d"), draw(features, label="r")
    huge = not specials and draw(st.booleans(), label="huge")
    sx = HUGE[dtype] if huge else 1.0
    nf = {n: specials and draw(st.booleans(), label=f"{n} non-finite") for n in ADAPTER_NAMES}
    args = [
        draw_arg(draw, gen, (*lead, d), dtype, sx, specials=nf["x"], name="x"),
        draw_arg(draw, gen, (r, d), dtype, d**-0.5, specials=nf["w_down"], name="w_down"),
        draw_arg(draw, gen, (r,), dtype, 0.1, specials=nf["b_down"], name="b_down")
        if draw(st.booleans(), label="b_down")
        else None,
        draw_arg(draw, gen, (d, r), dtype, r**-0.5, specials=nf["w_up"], name="w_up"),
        draw_arg(draw, gen, (d,), dtype, 0.1, specials=nf["b_up"], name="b_up")
        if draw(st.booleans(), label="b_up")
        else None,
        draw_arg(draw, gen, (*lead, d), dtype, sx, specials=nf["residual"], name="residual")
        if draw(st.booleans(), label="residual")
        else None,
    ]
    activation = draw(st.sampled_from(ops.ADAPTER_ACTIVATIONS), label="activation")
    scale = draw(st.sampled_from([1.0, 0.5, -2.0, 0.0, 3.25]), label="scale")

    def fn(x, wd, bd, wu, bu, res):
        return ops.adapter(x, wd, bd, wu, bu, activation=activation, scale=scale, residual=res)

    def ref_fn(x, wd, bd, wu, bu, res):
        return ref.adapter(x, wd, bd, wu, bu, activation, scale, res)

    def magnitude(x, wd, bd, wu, bu, res):  # on |inputs|: relu is the identity, |act(z)| <= |z|
        return ref.adapter(x, wd, bd, wu, bu, "relu", abs(scale), res)

    return fn, with_magnitude(ref_fn, magnitude), args, dtype


@fuzz(WEIGHT_VALUES)
@given(st.data())
def test_adapter_matches_reference(data):
    fn, ref_fn, args, dtype = adapter_case(data.draw, specials=False)
    requires(data.draw, args, ADAPTER_NAMES, ADAPTER_NAMES)
    check_finite(fn, ref_fn, args, ADAPTER_NAMES, dtype)


@fuzz(WEIGHT_NONFINITE)
@given(st.data())
def test_adapter_nonfinite_pattern(data):
    fn, ref_fn, args, dtype = adapter_case(data.draw, specials=True)
    check_nonfinite(fn, ref_fn, args, dtype)


# ---------------------------------------------------------------- LoRA

LORA_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def lora_case(draw, specials, dropout):
    gen = generator(draw)
    dtype = draw(dtypes, label="dtype")
    lead = draw(leading, label="lead")
    n_in, n_out, r = draw(features, label="in"), draw(features, label="out"), draw(features, label="r")
    huge = not specials and draw(st.booleans(), label="huge")
    nf = {n: specials and draw(st.booleans(), label=f"{n} non-finite") for n in LORA_NAMES}
    args = [
        draw_arg(draw, gen, (*lead, n_in), dtype, HUGE[dtype] if huge else 1.0, specials=nf["x"], name="x"),
        draw_arg(draw, gen, (n_out, n_in), dtype, n_in**-0.5, specials=nf["weight"], name="weight"),
        draw_arg(draw, gen, (n_out,), dtype, 0.1, specials=nf["bias"], name="bias")
        if draw(st.booleans(), label="bias")
        else None,
        draw_arg(draw, gen, (r, n_in), dtype, n_in**-0.5, specials=nf["lora_A"], name="lora_A"),
        draw_arg(draw, gen, (n_out, r), dtype, r**-0.5, specials=nf["lora_B"], name="lora_B"),
    ]
    scaling = draw(st.sampled_from([1.0, 2.0, 0.125, -1.5, 0.0]), label="scaling")
    p = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]), label="dropout_p") if dropout else 0.0
    training = draw(st.booleans(), label="training")
    seed = draw(st.integers(0, 2**31), label="dropout seed")
    mask = None
    if p > 0 and training:  # the dropout factors the op draws after torch.manual_seed(seed)
        views = [None if a is None else a().detach() for a in args]
        torch.manual_seed(seed)
        _, _, seed_offset = torch.ops.peftkern.lora_linear_forward(*views, scaling, p, True, False)
        mask = ops.dropout_mask(views[0], seed_offset, p).double()

    def fn(*ts):
        torch.manual_seed(seed)
        return ops.lora_linear(*ts, scaling=scaling, dropout_p=p, training=training)

    def ref_fn(*ts, scaling=scaling):
        return ref.lora_linear(*ts, scaling, None if mask is None else mask.to(ts[0].dtype))

    return fn, with_magnitude(ref_fn, lambda *ts: ref_fn(*ts, scaling=abs(scaling))), args, dtype


@fuzz(WEIGHT_VALUES)
@given(st.data())
def test_lora_linear_matches_reference(data):
    fn, ref_fn, args, dtype = lora_case(data.draw, specials=False, dropout=True)
    requires(data.draw, args, LORA_NAMES, LORA_NAMES)
    check_finite(fn, ref_fn, args, LORA_NAMES, dtype)


@fuzz(WEIGHT_NONFINITE)
@given(st.data())
def test_lora_linear_nonfinite_pattern(data):
    fn, ref_fn, args, dtype = lora_case(data.draw, specials=True, dropout=False)
    check_nonfinite(fn, ref_fn, args, dtype)


def lora_multi_case(draw, specials):
    gen = generator(draw)
    dtype = draw(dtypes, label="dtype")
    lead = draw(leading, label="lead")
    n_in, n_out, r = draw(features, label="in"), draw(features, label="out"), draw(features, label="r")
    L = draw(small, label="L")
    huge = not specials and draw(st.booleans(), label="huge")
    nf = {n: specials and draw(st.booleans(), label=f"{n} non-finite") for n in LORA_NAMES}
    args = [
        draw_arg(draw, gen, (*lead, n_in), dtype, HUGE[dtype] if huge else 1.0, specials=nf["x"], name="x"),
        draw_arg(draw, gen, (n_out, n_in), dtype, n_in**-0.5, specials=nf["weight"], name="weight"),
        draw_arg(draw, gen, (n_out,), dtype, 0.1, specials=nf["bias"], name="bias")
        if draw(st.booleans(), label="bias")
        else None,
        draw_arg(draw, gen, (L, r, n_in), dtype, n_in**-0.5, specials=nf["lora_A"], name="lora_A"),
        draw_arg(draw, gen, (L, n_out, r), dtype, r**-0.5, specials=nf["lora_B"], name="lora_B"),
    ]
    tokens = math.prod(lead)
    ids = draw_ints(draw, gen, (tokens,), -1, L, draw(st.sampled_from([torch.int32, torch.int64])))
    scal = [draw(st.sampled_from([1.0, 2.0, 0.5, -1.0, 0.0]), label="scaling") for _ in range(L)]
    as_tensor = draw(st.booleans(), label="scalings as a tensor")
    scalings = torch.tensor(scal, dtype=draw(dtypes, label="scalings dtype")) if as_tensor else scal

    def fn(*ts):
        return ops.lora_linear_multi(*ts, ids(), scalings=scalings)

    def ref_fn(x, w, b, A, B, scal=scal):
        return ref.lora_linear_multi(x, w, b, A, B, ids(), torch.tensor(scal, dtype=torch.float64))

    magnitude = lambda *ts: ref_fn(*ts, scal=[abs(s) for s in scal])  # noqa: E731
    return fn, with_magnitude(ref_fn, magnitude), args, dtype


@fuzz(WEIGHT_VALUES)
@given(st.data())
def test_lora_linear_multi_matches_reference(data):
    fn, ref_fn, args, dtype = lora_multi_case(data.draw, specials=False)
    requires(data.draw, args, LORA_NAMES, LORA_NAMES)
    check_finite(fn, ref_fn, args, LORA_NAMES, dtype)


@fuzz(WEIGHT_NONFINITE)
@given(st.data())
def test_lora_linear_multi_nonfinite_pattern(data):
    fn, ref_fn, args, dtype = lora_multi_case(data.draw, specials=True)
    check_nonfinite(fn, ref_fn, args, dtype)


# ---------------------------------------------------------------- mask tuning

MASK_NAMES = ("x", "weight", "bias", "scores")


def threshold_for(draw, scores):
    """A threshold: fixed values, or exactly one of the scores (the comparison is strict)."""
    finite = scores[torch.isfinite(scores)]
    choices = [0.0, 0.5, -0.25, 1e-3]
    if finite.numel():
        i = draw(st.integers(0, finite.numel() - 1), label="tie index")
        choices.append(finite.reshape(-1)[i].float().item())
    return draw(st.sampled_from(choices), label="threshold")


def masked_case(draw, specials):
    gen = generator(draw)
    dtype = draw(dtypes, label="dtype")
    scores_dtype = draw(st.sampled_from([torch.float32, dtype]), label="scores dtype")
    lead = draw(leading, label="lead")
    n_in, n_out = draw(features, label="in"), draw(features, label="out")
    huge = not specials and draw(st.booleans(), label="huge")
    nf = {n: specials and draw(st.booleans(), label=f"{n} non-finite") for n in MASK_NAMES}
    args = [
        draw_arg(draw, gen, (*lead, n_in), dtype, HUGE[dtype] if huge else 1.0, specials=nf["x"], name="x"),
        draw_arg(draw, gen, (n_out, n_in), dtype, n_in**-0.5, specials=nf["weight"], name="weight"),
        draw_arg(draw, gen, (n_out,), dtype, 0.1, specials=nf["bias"], name="bias")
        if draw(st.booleans(), label="bias")
        else None,
        draw_arg(draw, gen, (n_out, n_in), scores_dtype, specials=nf["scores"], name="scores"),
    ]
    threshold = threshold_for(draw, args[3]())

    def fn(x, w, b, s):
        return ops.masked_linear(x, w, b, s, threshold=threshold)

    def ref_fn(x, w, b, s):
        return ref.masked_linear(x, w, b, s, threshold)

    return fn, with_magnitude(ref_fn, ref_fn, signed=[3]), args, dtype


@fuzz(WEIGHT_VALUES)
@given(st.data())
def test_masked_linear_matches_reference(data):
    fn, ref_fn, args, dtype = masked_case(data.draw, specials=False)
    requires(data.draw, args, MASK_NAMES, MASK_NAMES)
    check_finite(fn, ref_fn, args, MASK_NAMES, dtype)


@fuzz(WEIGHT_NONFINITE)
@given(st.data())
def test_masked_linear_nonfinite_pattern(data):
    fn, ref_fn, args, dtype = masked_case(data.draw, specials=True)
    check_nonfinite(fn, ref_fn, args, dtype)


def keep_bits(draw, gen, keep):
    """ref.mask_bits of a bool mask, with random garbage in the trailing bits past in_features
    (which the ops must ignore) when drawn, in a random layout."""
    bits = ref.mask_bits(keep)
    cols = keep.shape[1]
    if cols % 32 and draw(st.booleans(), label="garbage in the trailing bits"):
        garbage = torch.randint(0, 2**31, (keep.shape[0],), generator=gen, dtype=torch.int64)
        garbage = (garbage << (cols % 32)) & 0xFFFFFFFF
        last = (bits[:, -1].to(torch.int64) & 0xFFFFFFFF) | garbage
        bits[:, -1] = torch.where(last >= 2**31, last - 2**32, last).to(torch.int32)
    base_shape, view, label = _layout(draw, tuple(bits.shape), True, expand=False)
    base = torch.zeros(base_shape, dtype=torch.int32)
    view(base).copy_(bits)
    return Arg(base, view, label)


def packed_case(draw, specials, tasks):
    """masked_linear_packed (tasks = None) or masked_linear_multi (tasks >= 0)."""
    gen = generator(draw)
    dtype = draw(dtypes, label="dtype")
    lead = draw(leading, label="lead")
    n_in, n_out = draw(features, label="in"), draw(features, label="out")
    huge = not specials and draw(st.booleans(), label="huge")
    nf = {n: specials and draw(st.booleans(), label=f"{n} non-finite") for n in MASK_NAMES}
    x = draw_arg(draw, gen, (*lead, n_in), dtype, HUGE[dtype] if huge else 1.0, specials=nf["x"], name="x")
    w = draw_arg(draw, gen, (n_out, n_in), dtype, n_in**-0.5, specials=nf["weight"], name="weight")
    b = (
        draw_arg(draw, gen, (n_out,), dtype, 0.1, specials=nf["bias"], name="bias")
        if draw(st.booleans(), label="bias")
        else None
    )
    n_masks = 1 if tasks is None else tasks
    scores = [torch.randn(n_out, n_in, generator=gen) for _ in range(n_masks)]
    if specials and nf["scores"]:
        for s in scores:
            s.view(-1)[draw(st.integers(0, s.numel() - 1))] = draw(st.sampled_from(SPECIALS))
    threshold = draw(st.sampled_from([0.0, 0.3, -0.5]), label="threshold")
    bits = [keep_bits(draw, gen, s > threshold)() for s in scores]
    args = [x, w, b]
    if tasks is None:

        def fn(x, w, b):
            return ops.masked_linear_packed(x, w, b, bits[0])

        def ref_fn(x, w, b):
            return ref.masked_linear(x, w, b, scores[0].double(), threshold)

        return fn, with_magnitude(ref_fn, ref_fn), args, dtype
    stack = torch.stack(bits) if bits else torch.zeros(0, n_out, (n_in + 31) // 32, dtype=torch.int32)
    ids = draw_ints(
        draw, gen, (math.prod(lead),), -1, tasks, draw(st.sampled_from([torch.int32, torch.int64]))
    )

    def fn(x, w, b):
        return ops.masked_linear_multi(x, w, b, stack, ids())

    def ref_fn(x, w, b):  # a per-token loop over single-mask calls
        x2 = x.reshape(-1, n_in)
        rows = [
            F.linear(x2[t], w, b) if i < 0 else ref.masked_linear(x2[t], w, b, scores[i].double(), threshold)
            for t, i in enumerate(ids().tolist())
        ]
        return (torch.stack(rows) if rows else x2.new_zeros(0, n_out)).reshape(*lead, n_out)

    return fn, with_magnitude(ref_fn, ref_fn), args, dtype


@fuzz(WEIGHT_VALUES)
@given(st.data(), st.sampled_from([None, 0, 1, 2, 3]))
def test_masked_linear_packed_and_multi_match_reference(data, tasks):
    fn, ref_fn, args, dtype = packed_case(data.draw, specials=False, tasks=tasks)
    with torch.no_grad():
        check_finite(fn, ref_fn, args, MASK_NAMES[:3], dtype, grads=False)


@fuzz(WEIGHT_NONFINITE)
@given(st.data(), st.sampled_from([None, 0, 1, 2, 3]))
def test_masked_linear_packed_and_multi_nonfinite_pattern(data, tasks):
    fn, ref_fn, args, dtype = packed_case(data.draw, specials=True, tasks=tasks)
    check_nonfinite(fn, ref_fn, args, dtype)


@fuzz(WEIGHT_NONFINITE)
@given(st.data())
def test_pack_unpack_match_the_documented_layout(data):
    draw = data.draw
    gen = generator(draw)
    dtype = draw(dtypes, label="dtype")
    rows, cols = draw(st.integers(0, 9), label="rows"), draw(st.integers(0, 70), label="cols")
    scores = draw_arg(draw, gen, (rows, cols), dtype, specials=draw(st.booleans()), name="scores")()
    threshold = threshold_for(draw, scores)
    keep = scores.float() > threshold
    bits = ops.pack_mask(scores, threshold)
    assert bits.dtype == torch.int32 and torch.equal(bits, ref.mask_bits(keep))
    assert torch.equal(ops.unpack_mask(bits, (rows, cols)), keep)
    # any bits, in any layout: bit j of word w of row n is element (n, 32 w + j)
    words = (cols + 31) // 32
    raw = draw_ints(draw, gen, (rows, words), -(2**31), 2**31, torch.int32)
    shifts = torch.arange(cols, dtype=torch.int64)
    expected = ((raw().to(torch.int64)[:, shifts // 32] >> (shifts % 32)) & 1).bool()
    assert torch.equal(ops.unpack_mask(raw(), (rows, cols)), expected)


# ---------------------------------------------------------------- prefix attention

PREFIX_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")
head_dims = st.one_of(st.sampled_from([1, 7, 8, 16, 33, 64, 70]), st.integers(1, 70))


def mask_shape(draw, target, ranks):
    rank = draw(st.sampled_from(ranks), label="mask rank")
    dims = target[len(target) - rank :]
    return tuple(draw(st.sampled_from([1, n]), label="mask dim") for n in dims)


def prefix_case(draw, specials, mask_ranks=(2, 4)):
    gen = generator(draw)
    dtype = draw(dtypes, label="dtype")
    B, Hkv, G = (
        draw(st.integers(0, 3), label="B"),
        draw(st.integers(1, 3), label="Hkv"),
        draw(small.map(lambda n: 1 + n % 3), label="G"),
    )
    H = Hkv * G
    L, S, P = (
        draw(st.integers(0, 9), label="L"),
        draw(st.integers(0, 9), label="S"),
        draw(st.integers(0, 9), label="P"),
    )
    D = draw(head_dims, label="D")
    tasks = draw(st.sampled_from([0, 0, 1, 2, 3]), label="tasks")
    huge = not specials and draw(st.booleans(), label="huge")
    sv = HUGE[dtype] if huge else 1.0
    # Non-finite values only where the result is defined by the formula: in values and the additive
    # mask. An infinite score (inf in q, k or prefix_k) gives NaN in eager's math attention but not in
    # PyTorch's CPU flash kernel, which the op runs: eager itself has no single answer there.
    scores_only = ("q", "k", "prefix_k")
    nf = {
        n: specials and n not in scores_only and draw(st.booleans(), label=f"{n} non-finite")
        for n in PREFIX_NAMES + ("mask",)
    }
    lead = (tasks,) if tasks else ()
    # inf in a value times a probability that underflowed is NaN: PyTorch's CPU flash kernel rounds
    # probabilities to 16 bits for the product with V, eager keeps float32, so they part where a
    # probability is below 2^-24. Near-uniform attention (small q) keeps every probability far above.
    sq = 1e-2 if nf["v"] or nf["prefix_v"] else 1.0
    args = [
        draw_arg(draw, gen, (B, H, L, D), dtype, sq, specials=nf["q"], name="q"),
        draw_arg(draw, gen, (B, Hkv, S, D), dtype, specials=nf["k"], name="k"),
        draw_arg(draw, gen, (B, Hkv, S, D), dtype, sv, specials=nf["v"], name="v"),
        draw_arg(draw, gen, (*lead, Hkv, P, D), dtype, specials=nf["prefix_k"], name="prefix_k"),
        draw_arg(draw, gen, (*lead, Hkv, P, D), dtype, sv, specials=nf["prefix_v"], name="prefix_v"),
    ]
    ids = (
        draw_ints(draw, gen, (B,), 0, tasks, draw(st.sampled_from([torch.int32, torch.int64])))
        if tasks
        else None
    )
    mask_kind = draw(st.sampled_from([None, "bool", "additive"]), label="attn_mask")
    attn_mask = None
    if mask_kind:
        shape = mask_shape(draw, (B, H, L, S), mask_ranks)
        if mask_kind == "bool":
            attn_mask = draw_ints(draw, gen, shape, 0, 2, torch.bool)
        else:
            attn_mask = draw_arg(draw, gen, shape, dtype, specials=nf["mask"], name="attn_mask")
            if draw(st.booleans(), label="-inf in the additive mask") and attn_mask.base.numel():
                hide = torch.rand(attn_mask.base.shape, generator=gen) < 0.3
                attn_mask.base.masked_fill_(hide, -math.inf)
    causal = draw(st.booleans(), label="causal")
    if nf["v"]:
        # The op never reads a key a query cannot see, so inf or NaN there does not reach that
        # query; eager attention multiplies it by a zero probability (NaN). By design, not compared.
        attn_mask, causal = None, False
    scale = draw(st.sampled_from([None, 0.5, 0.05, 2.0]), label="scale")
    note(f"B={B} H={H} Hkv={Hkv} L={L} S={S} P={P} D={D} tasks={tasks} mask={mask_kind} causal={causal}")

    def opts():
        return dict(
            prefix_ids=None if ids is None else ids(),
            attn_mask=None if attn_mask is None else attn_mask(),
            causal=causal,
            scale=scale,
        )

    def fn(*ts):
        return ops.prefix_attention(*ts, **opts())

    def ref_fn(*ts):
        o = opts()
        if o["attn_mask"] is not None and o["attn_mask"].dtype != torch.bool:
            o["attn_mask"] = o["attn_mask"].to(ts[0].dtype)  # the reference's dtype (float64 or eager's)
        return ref.prefix_attention(*ts, **o)

    ref_fn.bounds = lambda *ts: prefix_attention_bounds(ref_fn, *ts, ids=opts()["prefix_ids"], scale=scale)
    return fn, ref_fn, args, dtype


def prefix_attention_bounds(ref_fn, q, k, v, pk, pv, g, ids, scale):
    """float64 bounds (up to the rounding unit) of the error of attention computed in finite
    precision, for out and the gradients of q, k, v, prefix_k, prefix_v given the upstream g: each
    output is a sum over keys of probability-weighted terms (the backward's dS = P (dP - rowsum(g o))
    included), counted in absolute value, and each probability weighted by 1 + scale |q| |k|, the
    condition number of softmax for that score (a score rounded relatively moves p by that much)."""
    B, H, L, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], pk.shape[-2]
    G, N = H // Hkv, P + S
    scale = D**-0.5 if scale is None else abs(scale)
    eye = torch.eye(N, dtype=torch.float64)
    probs = ref_fn(q, k, eye[P:].expand(B, Hkv, S, N), pk, eye[:P].expand(*pk.shape[:-1], N))  # [B,H,L,N]
    out = ref_fn(q, k, v, pk, pv).abs()

    def per_sample(t):
        return t.expand(B, *t.shape) if ids is None else t[ids]

    keys = torch.cat([per_sample(pk), k], 2).repeat_interleave(G, 1).abs()  # [B, H, N, D]
    values = torch.cat([per_sample(pv), v], 2).repeat_interleave(G, 1).abs()
    qa, ga = q.abs(), g.abs()
    amp = probs * (1 + scale * qa @ keys.transpose(-1, -2))
    out_bound = amp @ values + amp.sum(-1, keepdim=True) * out
    ds = amp * (ga @ values.transpose(-1, -2) + (ga * out).sum(-1, keepdim=True))
    grad_q = scale * ds @ keys

    def split(t):  # [B, H, N, D] -> (prefix part in pk's shape, sequence part in k's shape)
        t = t.view(B, Hkv, G, N, D).sum(2)
        pre = t[:, :, :P]
        pre = (
            pre.sum(0) if ids is None else torch.zeros(pk.shape, dtype=t.dtype).index_add_(0, ids.long(), pre)
        )
        return pre, t[:, :, P:]

    grad_pk, grad_k = split(scale * ds.transpose(-1, -2) @ qa)
    grad_pv, grad_v = split(amp.transpose(-1, -2) @ ga)
    return out_bound, [grad_q, grad_k, grad_v, grad_pk, grad_pv]


@fuzz(WEIGHT_VALUES)
@given(st.data())
def test_prefix_attention_matches_reference(data):
    fn, ref_fn, args, dtype = prefix_case(data.draw, specials=False)
    requires(data.draw, args, PREFIX_NAMES, PREFIX_NAMES)
    check_finite(fn, ref_fn, args, PREFIX_NAMES, dtype)


@fuzz(WEIGHT_NONFINITE)
@given(st.data())
def test_prefix_attention_nonfinite_pattern(data):
    fn, ref_fn, args, dtype = prefix_case(data.draw, specials=True)
    check_nonfinite(fn, ref_fn, args, dtype)


@fuzz(WEIGHT_NONFINITE)
@given(st.data())
def test_prefix_attention_mask_of_any_broadcastable_rank(data):
    """attn_mask is documented as broadcastable to [B, H, L, S]: ranks 0 to 4."""
    fn, ref_fn, args, dtype = prefix_case(data.draw, specials=False, mask_ranks=(0, 1, 2, 3, 4))
    check_finite(fn, ref_fn, args, PREFIX_NAMES, dtype, grads=False)


# ---------------------------------------------------------------- bad input: the ops
#
# Each op has a small valid call (params -> named arguments) and a table of its tensor arguments'
# shapes in symbols (a symbol shared by two arguments must agree; an int is a broadcast dim of 1).
# A corruption changes ONE thing and says which exception and which argument names it expects.

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
NON_FLOATS = (torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64)
BAD_DTYPES = {  # per argument kind: the dtypes that are wrong whatever the call
    "ids": (torch.float32, torch.float64, torch.bool, torch.int16, torch.uint8),
    "bits": (torch.int64, torch.int16, torch.uint8, torch.float32, torch.bool),
    "scalings": (torch.int64, torch.int32, torch.bool, torch.complex64),
}
tiny = st.integers(1, 9)


def tensor_of(shape, dtype, lo=0, hi=2):
    shape = tuple(shape)
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, dtype=torch.float64).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape).bool()
    return torch.randint(lo, hi, shape).to(dtype)


class OpSpec:
    """draw_params(draw) -> p (sizes by symbol, dtype, flags); shapes(p) -> {tensor argument: shape in
    symbols}; kinds(p) -> {tensor argument: kind} (like: x's dtype; scores; ids; bits; scalings; mask);
    build(p) -> the named arguments; call(kw) -> the op's result."""

    def __init__(self, name, draw_params, shapes, kinds, build, call, min1=(), related=None, scalars=None):
        self.name, self.draw_params, self.shapes, self.kinds = name, draw_params, shapes, kinds
        self.build, self.call, self.min1 = build, call, min1
        self.related = related or {}  # symbol -> arguments that constrain it without carrying it
        self.scalars = scalars  # draw -> (argument, bad value, exception types) or None


def _sizes(p, shape):
    return tuple(s if isinstance(s, int) else p[s] for s in shape)


def _build_tensors(p, shapes, kinds, extra):
    kw = {}
    for name, shape in shapes.items():
        kind = kinds[name]
        size = _sizes(p, shape)
        if kind in ("like", "floating"):
            kw[name] = tensor_of(size, p["dtype"])
        elif kind == "scores":
            kw[name] = tensor_of(size, p["scores_dtype"])
        elif kind == "ids":
            kw[name] = tensor_of(size, p["ids_dtype"], *p["ids_range"])
        elif kind == "bits":
            kw[name] = torch.randint(-(2**31), 2**31, size, dtype=torch.int64).to(torch.int32)
        elif kind == "scalings":
            kw[name] = tensor_of(size, torch.float32)
        elif kind == "mask":
            kw[name] = tensor_of(size, p["mask_dtype"])
    kw.update(extra)
    return kw


def _lead(draw):
    return tuple(draw(st.lists(st.integers(0, 3), max_size=2), label="lead"))


def _lead_symbols(p):
    return tuple(f"l{i}" for i in range(len(p["lead"])))


def _with_lead(p):
    p.update({f"l{i}": n for i, n in enumerate(p["lead"])})
    return p


# adapter
def _adapter_params(draw):
    return _with_lead(
        dict(
            dtype=draw(dtypes, label="dtype"),
            lead=_lead(draw),
            d=draw(tiny, label="d"),
            r=draw(tiny, label="r"),
            b_down=draw(st.booleans(), label="b_down"),
            b_up=draw(st.booleans(), label="b_up"),
            residual=draw(st.booleans(), label="residual"),
        )
    )


def _adapter_shapes(p):
    lead = _lead_symbols(p)
    s = {"x": (*lead, "d"), "w_down": ("r", "d"), "b_down": ("r",), "w_up": ("d", "r"), "b_up": ("d",)}
    s["residual"] = (*lead, "d")
    return {n: v for n, v in s.items() if p.get(n, True)}


ADAPTER = OpSpec(
    "adapter",
    _adapter_params,
    _adapter_shapes,
    lambda p: dict.fromkeys(_adapter_shapes(p), "like"),
    lambda p: _build_tensors(
        p, _adapter_shapes(p), dict.fromkeys(_adapter_shapes(p), "like"), dict(activation="gelu", scale=1.0)
    ),
    lambda kw: ops.adapter(
        kw["x"],
        kw["w_down"],
        kw.get("b_down"),
        kw["w_up"],
        kw.get("b_up"),
        activation=kw["activation"],
        scale=kw["scale"],
        residual=kw.get("residual"),
    ),
    min1=("d", "r"),
    scalars=[
        ("activation", "tanh", ValueError),
        ("activation", "GELU", ValueError),
        ("activation", "gelu ", ValueError),
        ("activation", "", ValueError),
        ("activation", "relu6", ValueError),
        ("activation", None, (TypeError, ValueError)),
        ("activation", 1, (TypeError, ValueError)),
        ("activation", torch.relu, (TypeError, ValueError)),
        ("scale", "abc", (TypeError, ValueError)),
        ("scale", None, (TypeError, ValueError)),
        ("scale", [1.0], (TypeError, ValueError)),
    ],
)


# lora_linear
def _lora_params(draw):
    return _with_lead(
        dict(
            dtype=draw(dtypes, label="dtype"),
            lead=_lead(draw),
            n_in=draw(tiny, label="in"),
            n_out=draw(tiny, label="out"),
            r=draw(tiny, label="r"),
            bias=draw(st.booleans(), label="bias"),
        )
    )


def _lora_shapes(p):
    s = {
        "x": (*_lead_symbols(p), "n_in"),
        "weight": ("n_out", "n_in"),
        "bias": ("n_out",),
        "lora_A": ("r", "n_in"),
        "lora_B": ("n_out", "r"),
    }
    return {n: v for n, v in s.items() if p.get(n, True)}


LORA = OpSpec(
    "lora_linear",
    _lora_params,
    _lora_shapes,
    lambda p: dict.fromkeys(_lora_shapes(p), "like"),
    lambda p: _build_tensors(
        p, _lora_shapes(p), dict.fromkeys(_lora_shapes(p), "like"), dict(scaling=1.0, dropout_p=0.0)
    ),
    lambda kw: ops.lora_linear(
        kw["x"],
        kw["weight"],
        kw.get("bias"),
        kw["lora_A"],
        kw["lora_B"],
        scaling=kw["scaling"],
        dropout_p=kw["dropout_p"],
        training=True,
    ),
    min1=("n_in", "n_out", "r"),
    scalars=[
        ("dropout_p", -0.1, ValueError),
        ("dropout_p", 1.0, ValueError),
        ("dropout_p", 1.5, ValueError),
        ("dropout_p", math.nan, ValueError),
        ("dropout_p", math.inf, ValueError),
        ("dropout_p", "0.1x", (TypeError, ValueError)),
        ("scaling", None, (TypeError, ValueError)),
        ("scaling", "two", (TypeError, ValueError)),
    ],
)


# lora_linear_multi
def _multi_lora_params(draw):
    p = _lora_params(draw)
    p.update(
        L=draw(st.integers(1, 4), label="L"),
        ids_dtype=draw(st.sampled_from([torch.int32, torch.int64]), label="ids dtype"),
        scalings_tensor=draw(st.booleans(), label="scalings as a tensor"),
    )
    p["tokens"] = math.prod(p["lead"])
    p["ids_range"] = (-1, p["L"])
    return p


def _multi_lora_shapes(p):
    s = _lora_shapes(p)
    s.update(lora_A=("L", "r", "n_in"), lora_B=("L", "n_out", "r"), adapter_ids=("tokens",))
    if p["scalings_tensor"]:
        s["scalings"] = ("L",)
    return s


def _multi_lora_kinds(p):
    k = dict.fromkeys(_multi_lora_shapes(p), "like")
    k.update(adapter_ids="ids", scalings="scalings")
    return {n: k[n] for n in _multi_lora_shapes(p)}


MULTI_LORA = OpSpec(
    "lora_linear_multi",
    _multi_lora_params,
    _multi_lora_shapes,
    _multi_lora_kinds,
    lambda p: _build_tensors(
        p,
        _multi_lora_shapes(p),
        _multi_lora_kinds(p),
        {} if p["scalings_tensor"] else dict(scalings=[1.0] * p["L"]),
    ),
    lambda kw: ops.lora_linear_multi(
        kw["x"],
        kw["weight"],
        kw.get("bias"),
        kw["lora_A"],
        kw["lora_B"],
        kw["adapter_ids"],
        scalings=kw["scalings"],
    ),
    min1=("n_in", "n_out", "r", "L"),
    related={"tokens": ("x",)},
    scalars=[
        ("scalings", "shorter", ValueError),
        ("scalings", "longer", ValueError),
        ("scalings", "nested", (TypeError, ValueError)),
        ("scalings", "text", (TypeError, ValueError)),
        ("scalings", None, (TypeError, ValueError)),
    ],
)


# masked_linear, masked_linear_packed, masked_linear_multi
def _masked_params(draw):
    p = _lora_params(draw)
    p["scores_dtype"] = draw(st.sampled_from([torch.float32, p["dtype"]]), label="scores dtype")
    p["words"] = (p["n_in"] + 31) // 32
    p["T"] = draw(st.integers(0, 3), label="tasks")
    p["ids_dtype"] = draw(st.sampled_from([torch.int32, torch.int64]), label="ids dtype")
    p["ids_range"] = (-1, p["T"])
    p["tokens"] = math.prod(p["lead"])
    return p


def _masked_shapes(which):
    def shapes(p):
        s = {"x": (*_lead_symbols(p), "n_in"), "weight": ("n_out", "n_in"), "bias": ("n_out",)}
        if not p["bias"]:
            del s["bias"]
        if which == "masked_linear":
            s["scores"] = ("n_out", "n_in")
        elif which == "masked_linear_packed":
            s["mask_bits"] = ("n_out", "words")
        else:
            s.update(mask_bits_stack=("T", "n_out", "words"), task_ids=("tokens",))
        return s

    return shapes


def _masked_kinds(which):
    def kinds(p):
        k = dict.fromkeys(_masked_shapes(which)(p), "like")
        for n, kind in (
            ("scores", "scores"),
            ("mask_bits", "bits"),
            ("mask_bits_stack", "bits"),
            ("task_ids", "ids"),
        ):
            if n in k:
                k[n] = kind
        return k

    return kinds


def _masked_spec(which, call, scalars=None):
    return OpSpec(
        which,
        _masked_params,
        _masked_shapes(which),
        _masked_kinds(which),
        lambda p: _build_tensors(
            p,
            _masked_shapes(which)(p),
            _masked_kinds(which)(p),
            dict(threshold=0.0) if which == "masked_linear" else {},
        ),
        call,
        min1=("n_in", "n_out"),
        related={"words": ("x", "weight"), "tokens": ("x",)},
        scalars=scalars,
    )


MASKED = _masked_spec(
    "masked_linear",
    lambda kw: ops.masked_linear(
        kw["x"], kw["weight"], kw.get("bias"), kw["scores"], threshold=kw["threshold"]
    ),
    scalars=[("threshold", None, (TypeError, ValueError)), ("threshold", "0.x", (TypeError, ValueError))],
)
PACKED = _masked_spec(
    "masked_linear_packed",
    lambda kw: ops.masked_linear_packed(kw["x"], kw["weight"], kw.get("bias"), kw["mask_bits"]),
)
MASKED_MULTI = _masked_spec(
    "masked_linear_multi",
    lambda kw: ops.masked_linear_multi(
        kw["x"], kw["weight"], kw.get("bias"), kw["mask_bits_stack"], kw["task_ids"]
    ),
)


# pack_mask, unpack_mask
def _pack_params(draw):
    rows, cols = draw(st.integers(0, 9), label="rows"), draw(st.integers(0, 70), label="cols")
    return dict(dtype=draw(dtypes, label="dtype"), rows=rows, cols=cols, words=(cols + 31) // 32)


PACK = OpSpec(
    "pack_mask",
    _pack_params,
    lambda p: {"scores": ("rows", "cols")},
    lambda p: {"scores": "floating"},
    lambda p: dict(scores=tensor_of((p["rows"], p["cols"]), p["dtype"]), threshold=0.0),
    lambda kw: ops.pack_mask(kw["scores"], kw["threshold"]),
    scalars=[("threshold", None, (TypeError, ValueError)), ("threshold", "high", (TypeError, ValueError))],
)
UNPACK = OpSpec(
    "unpack_mask",
    _pack_params,
    lambda p: {"bits": ("rows", "words")},
    lambda p: {"bits": "bits"},
    lambda p: dict(
        bits=tensor_of((p["rows"], p["words"]), torch.int32, -(2**31), 2**31), shape=[p["rows"], p["cols"]]
    ),
    lambda kw: ops.unpack_mask(kw["bits"], kw["shape"]),
    scalars=[
        ("shape", "negative", ValueError),
        ("shape", "rank1", ValueError),
        ("shape", "rank3", ValueError),
        ("shape", "words", ValueError),
        ("shape", "huge", ValueError),
        ("shape", "2**63", ValueError),
        ("shape", "-2**63-1", ValueError),
        ("shape", "2.5", (TypeError, ValueError)),
        ("shape", "text", (TypeError, ValueError)),
        ("shape", "None", (TypeError, ValueError)),
    ],
)


# prefix_attention
def _prefix_params(draw):
    p = dict(
        dtype=draw(dtypes, label="dtype"),
        B=draw(st.integers(1, 3), label="B"),
        Hkv=draw(st.integers(1, 3), label="Hkv"),
        G=draw(st.integers(1, 3), label="G"),
        L=draw(st.integers(0, 5), label="L"),
        S=draw(st.integers(0, 5), label="S"),
        P=draw(st.integers(0, 5), label="P"),
        D=draw(st.integers(1, 9), label="D"),
        T=draw(st.sampled_from([0, 1, 2, 3]), label="tasks"),
        ids_dtype=draw(st.sampled_from([torch.int32, torch.int64]), label="ids dtype"),
        mask=draw(st.sampled_from([None, torch.bool, "dtype"]), label="attn_mask"),
        causal=draw(st.booleans(), label="causal"),
    )
    p["H"] = p["Hkv"] * p["G"]
    p["per_task"] = p["T"] > 0
    p["ids_range"] = (0, max(p["T"], 1))
    p["mask_dtype"] = p["dtype"] if p["mask"] == "dtype" else torch.bool
    if p["mask"]:
        rank = draw(st.integers(0, 4), label="mask rank")
        full = ("B", "H", "L", "S")[4 - rank :]
        p["mask_shape"] = tuple(s if draw(st.booleans(), label="mask dim") else 1 for s in full)
    return p


def _prefix_shapes(p):
    task = ("T",) if p["per_task"] else ()
    s = {
        "q": ("B", "H", "L", "D"),
        "k": ("B", "Hkv", "S", "D"),
        "v": ("B", "Hkv", "S", "D"),
        "prefix_k": (*task, "Hkv", "P", "D"),
        "prefix_v": (*task, "Hkv", "P", "D"),
    }
    if p["per_task"]:
        s["prefix_ids"] = ("B",)
    if p["mask"]:
        s["attn_mask"] = p["mask_shape"]
    return s


def _prefix_kinds(p):
    k = dict.fromkeys(_prefix_shapes(p), "like")
    k.update(prefix_ids="ids", attn_mask="mask")
    return {n: k[n] for n in _prefix_shapes(p)}


PREFIX = OpSpec(
    "prefix_attention",
    _prefix_params,
    _prefix_shapes,
    _prefix_kinds,
    lambda p: _build_tensors(p, _prefix_shapes(p), _prefix_kinds(p), dict(causal=p["causal"], scale=None)),
    lambda kw: ops.prefix_attention(
        kw["q"],
        kw["k"],
        kw["v"],
        kw["prefix_k"],
        kw["prefix_v"],
        prefix_ids=kw.get("prefix_ids"),
        attn_mask=kw.get("attn_mask"),
        causal=kw["causal"],
        scale=kw["scale"],
    ),
    min1=("D", "Hkv", "T"),
    related={"H": ("k",), "Hkv": ("q",)},
    scalars=[
        ("scale", "abc", (TypeError, ValueError)),
        ("scale", [0.5], (TypeError, ValueError)),
        ("attn_mask", "requires grad", ValueError),
        ("prefix_ids", "with a shared prefix", ValueError),
        ("prefix_ids", "missing", ValueError),
    ],
)

SPECS = {s.name: s for s in (ADAPTER, LORA, MULTI_LORA, MASKED, PACKED, MASKED_MULTI, PACK, UNPACK, PREFIX)}


def mentions(message, name):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", message) is not None


def expect_error(call, exc, names, what):
    """call() raises exc (a type or tuple) with a message naming one of `names`; any other outcome,
    another exception type included, fails with a description."""
    exc = exc if isinstance(exc, tuple) else (exc,)
    want = "/".join(e.__name__ for e in exc) + " naming " + " or ".join(repr(n) for n in sorted(names))
    try:
        result = call()
    except exc as e:
        assert any(mentions(str(e), n) for n in names), f"{what}: {type(e).__name__} does not name it: {e}"
        return
    except Exception as e:
        raise AssertionError(f"{what}: raised {type(e).__name__} instead of {want}: {e}") from e
    shape = getattr(result, "shape", None)
    device = getattr(result, "device", None)
    raise AssertionError(
        f"{what}: no exception (expected {want}); returned {type(result).__name__} {shape} {device}"
    )


def _shared_partners(spec, p, shapes, symbol):
    kinds = spec.kinds(p)
    # a mask's dim of size 1 broadcasts to any size: it does not constrain the symbol
    names = {
        n for n, shape in shapes.items() if symbol in shape and not (kinds[n] == "mask" and p[symbol] == 1)
    }
    return names | set(spec.related.get(symbol, ()))


def corrupt(spec, kind, draw, p, kw):
    """(corrupted arguments, expected exception, names one of which the message must contain, what),
    or None when this kind does not apply to the drawn call."""
    shapes, kinds = spec.shapes(p), spec.kinds(p)
    tensors = [n for n in shapes if isinstance(kw.get(n), torch.Tensor)]
    kw = dict(kw)
    if kind == "rank":
        name = draw(st.sampled_from(tensors), label="argument")
        n = len(shapes[name])
        if name in ("x",):
            ranks = [0]  # x is [..., d]: any rank >= 1 is valid
        elif kinds[name] == "mask":
            ranks = [5, 6]  # broadcastable to [B, H, L, S]: up to 4 dims
        else:
            ranks = [r for r in range(6) if r != n]
        r = draw(st.sampled_from(ranks), label="new rank")
        old = tuple(kw[name].shape)
        shape = (1,) * (r - n) + old if r > n else old[n - r :]
        kw[name] = tensor_of(
            shape, kw[name].dtype, *(p.get("ids_range", (0, 2)) if kinds[name] == "ids" else (0, 2))
        )
        return kw, ValueError, {name}, f"{name} of rank {r} {list(shape)}"
    if kind == "size":
        candidates = []
        for name, shape in shapes.items():
            for dim, sym in enumerate(shape):
                if not isinstance(sym, str) or len(_shared_partners(spec, p, shapes, sym)) < 2:
                    continue
                if sym == "H" and p["Hkv"] == 1 and not any("H" in shapes[n] for n in shapes if n != name):
                    continue  # any H is a multiple of Hkv = 1
                candidates.append((name, dim, sym))
        assume(candidates)
        name, dim, sym = draw(st.sampled_from(candidates), label="argument and dim")
        old = p[sym]
        values = [v for v in (old + 1, old + 2, 2 * old + 1, old - 1) if v >= 1 and v != old]
        if kinds[name] == "mask":
            values = [v for v in values if v != 1]
        if sym == "H" and not any("H" in shapes[n] for n in shapes if n != name):
            values = [v for v in values if v % p["Hkv"]]
        assume(values)
        new = draw(st.sampled_from(values), label="new size")
        shape = list(kw[name].shape)
        shape[dim] = new
        kw[name] = tensor_of(
            shape, kw[name].dtype, *(p.get("ids_range", (0, 2)) if kinds[name] == "ids" else (0, 2))
        )
        partners = _shared_partners(spec, p, shapes, sym) | {name}
        return kw, ValueError, partners, f"{name} with dim {dim} ({sym}) = {new} instead of {old}"
    if kind == "zero":
        symbols = [s for s in spec.min1 if any(s in shape for shape in shapes.values())]
        assume(symbols)
        sym = draw(st.sampled_from(symbols), label="symbol")
        q = dict(p, **{sym: 0})
        if "words" in q:
            q["words"] = (q["n_in"] + 31) // 32 if "n_in" in q else q["words"]
        if "G" in q:
            q["H"] = q["G"] * q["Hkv"]
        if sym == "T":
            assume(p["T"] > 0)
            q["ids_range"] = (0, 1)
        new = spec.build(q)
        new.update({k: v for k, v in kw.items() if k not in new and not isinstance(v, torch.Tensor)})
        if "scalings" in kw and not isinstance(kw["scalings"], torch.Tensor):
            new["scalings"] = [1.0] * q.get("L", 1)
        partners = _shared_partners(spec, q, spec.shapes(q), sym)
        return new, ValueError, partners, f"{sym} = 0"
    if kind == "dtype":
        name = draw(st.sampled_from(tensors), label="argument")
        k = kinds[name]
        if k in BAD_DTYPES:
            bad = BAD_DTYPES[k]
        elif k == "floating":
            bad = NON_FLOATS
        elif k == "scores":
            bad = NON_FLOATS + tuple(d for d in FLOAT_DTYPES if d not in (torch.float32, p["dtype"]))
        else:  # like x (or q); a mask may also be bool
            bad = tuple(d for d in NON_FLOATS if not (k == "mask" and d == torch.bool))
            bad += tuple(d for d in FLOAT_DTYPES if d != p["dtype"])
        assume(bad)
        dtype = draw(st.sampled_from(bad), label="new dtype")
        kw[name] = tensor_of(kw[name].shape, dtype)
        names = {name}
        if k == "like" and dtype.is_floating_point and name in ("x", "q", "scores"):
            names |= {n for n in tensors if kinds[n] == "like"}  # the reference's dtype: any other disagrees
        return kw, TypeError, names, f"{name} of dtype {dtype}"
    if kind == "meta":
        name = draw(st.sampled_from(tensors), label="argument")
        kw[name] = kw[name].to("meta")
        return kw, ValueError, {name}, f"{name} on the meta device (the others on cpu)"
    if kind == "not_a_tensor":
        name = draw(st.sampled_from(tensors), label="argument")
        values = [1.0, "tensor", None] + (
            [] if name == "scalings" else [kw[name].tolist()]
        )  # a float list: valid
        kw[name] = draw(st.sampled_from(values), label="value")
        if kw[name] is None and name in ("bias", "b_down", "b_up", "residual", "attn_mask"):
            kw[name] = 2.0  # None is valid there
        return kw, (TypeError, ValueError), {name}, f"{name} = {type(kw[name]).__name__} {kw[name]!r:.40}"
    if kind == "ids":
        name = next(n for n in tensors if kinds[n] == "ids")
        ids = kw[name]
        assume(ids.numel() > 0)
        lo, hi = p["ids_range"]
        bad = draw(
            st.sampled_from([hi, hi + 1, lo - 1, lo - 2, 2**31 - 1, 2**40, -(2**40), 2**62]), label="bad id"
        )
        dtype = ids.dtype if -(2**31) <= bad < 2**31 else torch.int64
        new = ids.to(dtype).clone()
        new[draw(st.integers(0, ids.numel() - 1), label="position")] = bad
        kw[name] = new
        return kw, ValueError, {name}, f"{name} holding {bad} (valid: [{lo}, {hi}))"
    if kind in ("value", "type"):  # a non-tensor argument: a bad value of the right type, or a wrong type
        entries = [e for e in spec.scalars if isinstance(e[2], tuple) == (kind == "type")]
        name, value, exc = draw(st.sampled_from(entries), label="corruption")
        if spec.name == "lora_linear_multi":
            L = p["L"]
            value = {
                "shorter": [1.0] * (L - 1),
                "longer": [1.0] * (L + 1),
                "nested": [[1.0] * L],
                "text": ["a"] * L,
                None: None,
            }[value]
        elif spec.name == "unpack_mask":
            rows, cols = p["rows"], p["cols"]
            value = {
                "negative": [-rows - 1, cols],
                "rank1": [rows * cols],
                "rank3": [rows, cols, 1],
                "words": [rows, cols + 32],
                "huge": [rows, 2**62],
                "2**63": [rows, 2**63],
                "-2**63-1": [rows, -(2**63) - 1],
                "2.5": [rows + 0.5, cols],
                "text": "rows",
                "None": None,
            }[value]
            if value == [rows, cols + 32]:
                exc, names = ValueError, {"shape", "bits"}
                return (
                    dict(kw, shape=value),
                    exc,
                    names,
                    f"shape = {value} (bits hold {p['words']} words a row)",
                )
        elif spec.name == "prefix_attention" and name in ("attn_mask", "prefix_ids"):
            if value == "requires grad":
                kw["attn_mask"] = torch.zeros(p["L"], p["S"], dtype=p["dtype"], requires_grad=True)
            elif value == "with a shared prefix":
                assume(p["T"] == 0)
                kw["prefix_ids"] = torch.zeros(p["B"], dtype=torch.int64)
            else:
                assume(p["T"] > 0)
                kw["prefix_ids"] = None
                return kw, exc, {"prefix_ids", "prefix_k"}, "per-task prefixes without prefix_ids"
            return kw, exc, {name}, f"{name} {value}"
        kw[name] = value
        return kw, exc, {name}, f"{name} = {value!r:.60}"
    raise AssertionError(kind)


TENSOR_KINDS = {  # the corruptions of tensor arguments that apply to each op
    "adapter": ("rank", "size", "zero", "dtype", "meta", "not_a_tensor"),
    "lora_linear": ("rank", "size", "zero", "dtype", "meta", "not_a_tensor"),
    "lora_linear_multi": ("rank", "size", "zero", "dtype", "meta", "not_a_tensor", "ids"),
    "masked_linear": ("rank", "size", "zero", "dtype", "meta", "not_a_tensor"),
    "masked_linear_packed": ("rank", "size", "zero", "dtype", "meta", "not_a_tensor"),
    "masked_linear_multi": ("rank", "size", "zero", "dtype", "meta", "not_a_tensor", "ids"),
    # one tensor argument: on meta the whole call is a (valid) meta computation
    "pack_mask": ("rank", "dtype", "not_a_tensor"),
    "unpack_mask": ("rank", "dtype", "not_a_tensor"),
    "prefix_attention": ("rank", "size", "zero", "dtype", "meta", "not_a_tensor", "ids"),
}
BAD_KINDS = {  # plus "value" / "type" where the op has non-tensor arguments to corrupt that way
    op: kinds
    + tuple(
        k
        for k in ("value", "type")
        if any(isinstance(e[2], tuple) == (k == "type") for e in SPECS[op].scalars or ())
    )
    for op, kinds in TENSOR_KINDS.items()
}


@pytest.mark.parametrize(
    "op,kind",
    [pytest.param(op, kind, id=f"{op}-{kind}") for op, kinds in BAD_KINDS.items() for kind in kinds],
)
@fuzz(WEIGHT_BAD_INPUT)
@given(data=st.data())
def test_bad_input_raises_naming_the_argument(op, kind, data):
    spec = SPECS[op]
    p = spec.draw_params(data.draw)
    if op == "prefix_attention" and kind == "ids":
        assume(p["T"] > 0)
    if op == "lora_linear_multi" and kind in ("value", "type"):
        assume(not p["scalings_tensor"])
    torch.manual_seed(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    kw = spec.build(p)
    with torch.no_grad():
        spec.call(kw)  # the call is valid before the corruption
    bad, exc, names, what = corrupt(spec, kind, data.draw, p, kw)
    note(f"{op}: {what}")
    expect_error(lambda: spec.call(bad), exc, names, f"{op}: {what}")


# ---------------------------------------------------------------- bad input: the modules' constructors


def _adapter_kwargs(draw):
    return dict(
        d_model=draw(tiny, label="d_model"),
        bottleneck=draw(tiny, label="bottleneck"),
        activation=draw(st.sampled_from(ops.ADAPTER_ACTIVATIONS), label="activation"),
        init=draw(st.sampled_from(["houlsby", "lora"]), label="init"),
    )


def _lora_kwargs(draw):
    return dict(
        in_features=draw(tiny, label="in_features"),
        out_features=draw(tiny, label="out_features"),
        r=draw(tiny, label="r"),
        lora_dropout=draw(st.sampled_from([0.0, 0.1, 0.5]), label="lora_dropout"),
    )


def _masked_kwargs(draw):
    return dict(in_features=draw(tiny, label="in_features"), out_features=draw(tiny, label="out_features"))


def _prefix_kv_kwargs(draw):
    return dict(
        num_layers=draw(tiny, label="num_layers"),
        num_kv_heads=draw(tiny, label="num_kv_heads"),
        head_dim=draw(tiny, label="head_dim"),
        prefix_len=draw(st.integers(0, 5), label="prefix_len"),
        num_tasks=draw(st.integers(1, 3), label="num_tasks"),
        projection_dim=draw(st.sampled_from([None, 1, 4]), label="projection_dim"),
    )


def _attention_kwargs(draw):
    kv, g, d = (
        draw(st.integers(1, 3), label="kv heads"),
        draw(st.integers(1, 3), label="group"),
        draw(tiny, label="hd"),
    )
    return dict(embed_dim=kv * g * d, num_heads=kv * g, num_kv_heads=kv)


def _soft_prompt_kwargs(draw):
    return dict(
        num_tokens=draw(tiny, label="num_tokens"),
        d_model=draw(tiny, label="d_model"),
        num_tasks=draw(st.integers(1, 3), label="num_tasks"),
    )


MODULES = {  # class, valid kwargs, {dim: its minimum}, {string argument: bad values}
    "Adapter": (
        pknn.Adapter,
        _adapter_kwargs,
        {"d_model": 1, "bottleneck": 1},
        {"activation": ["tanh", "GELU", "", "swish"], "init": ["xavier", "HOULSBY", "", "zeros"]},
    ),
    "LoRALinear": (pknn.LoRALinear, _lora_kwargs, {"in_features": 1, "out_features": 1, "r": 1}, {}),
    "MaskedLinear": (pknn.MaskedLinear, _masked_kwargs, {"in_features": 1, "out_features": 1}, {}),
    "PrefixKV": (
        pknn.PrefixKV,
        _prefix_kv_kwargs,
        {
            "num_layers": 1,
            "num_kv_heads": 1,
            "head_dim": 1,
            "prefix_len": 0,
            "num_tasks": 1,
            "projection_dim": 1,
        },
        {},
    ),
    "PrefixSelfAttention": (
        pknn.PrefixSelfAttention,
        _attention_kwargs,
        {"embed_dim": 1, "num_heads": 1, "num_kv_heads": 1},
        {},
    ),
    "SoftPrompt": (pknn.SoftPrompt, _soft_prompt_kwargs, {"num_tokens": 1, "d_model": 1, "num_tasks": 1}, {}),
}
MODULE_KINDS = {
    name: ("dim", "dim_type", "huge_dim", "device", "dtype")
    + (("name",) if spec[3] else ())
    + (("dropout",) if name == "LoRALinear" else ())
    + (("scores_dtype",) if name == "MaskedLinear" else ())
    for name, spec in MODULES.items()
}


@pytest.mark.parametrize(
    "module,kind",
    [pytest.param(m, k, id=f"{m}-{k}") for m, kinds in MODULE_KINDS.items() for k in kinds],
)
@fuzz(WEIGHT_MODULES)
@given(data=st.data())
def test_module_constructor_bad_input(module, kind, data):
    cls, valid, dims, names = MODULES[module]
    draw = data.draw
    kwargs = valid(draw)
    cls(**kwargs)  # valid before the corruption
    exc = (TypeError, ValueError)
    if kind == "dim":
        name = draw(st.sampled_from(sorted(dims)), label="argument")
        value = draw(st.sampled_from([dims[name] - 1, -1, -7]), label="value")
        exc = ValueError
    elif kind == "dim_type":
        name = draw(st.sampled_from(sorted(dims)), label="argument")
        none_ok = name in ("projection_dim", "num_kv_heads")  # None is their documented default
        value = draw(st.sampled_from([2.5, "8", [4], "4" if none_ok else None]), label="value")
    elif kind == "huge_dim":  # too large for int64: no allocation is attempted
        name = draw(st.sampled_from(sorted(dims)), label="argument")
        value = draw(st.sampled_from([2**63, 2**64 + 1, -(2**63) - 1]), label="value")
        kwargs["device"] = "meta"
    elif kind == "device":
        name = "device"
        value = draw(st.sampled_from(["bogus", "cpu:bogus", "gpu", "cuda:x", "", "cpu:-2"]), label="value")
    elif kind == "dtype":
        name = "dtype"
        value = draw(st.sampled_from([torch.int64, torch.int32, torch.bool, "float32", 3]), label="value")
    elif kind == "scores_dtype":
        name = "scores_dtype"
        value = draw(st.sampled_from([torch.int64, torch.bool, "float32"]), label="value")
    elif kind == "name":
        name = draw(st.sampled_from(sorted(names)), label="argument")
        value = draw(st.sampled_from(names[name] + [None, 3]), label="value")
        exc = ValueError if isinstance(value, str) else (TypeError, ValueError)
    else:
        name = "lora_dropout"
        value = draw(st.sampled_from([-0.1, 1.0, 1.5, math.nan, math.inf, "0.1"]), label="value")
        exc = ValueError if isinstance(value, float) else (TypeError, ValueError)
    kwargs[name] = value
    note(f"{module}({kwargs})")
    expect_error(lambda: cls(**kwargs), exc, {name}, f"{module}: {name}={value!r}")
