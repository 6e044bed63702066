"""Every public op of peftkern.ops inside a CUDA graph: captured the standard way (warm-up on a side
stream, then torch.cuda.CUDAGraph + torch.cuda.graph), forward and, where the op has one, backward
(out.backward(gw) inside the capture; the leaves' .grad set to None before the capture, so the
graph writes the gradients instead of accumulating them). Every replay gets NEW values copied into
the static inputs and is checked against the float64 eager formula of tests/reference.py for those
values. Before each replay the graph's outputs are poisoned (NaN), so an element a replay does not
rewrite fails the finiteness check.

Also: LoRA dropout draws a new mask on every replay (and the backward of a replay uses that
replay's mask); out-of-range ids, which the ops cannot range-check on the host under capture, act
as -1 (base only / unmasked) in lora_linear_multi and masked_linear_multi."""

import math

import pytest
import torch
import torch.nn.functional as F

from peftkern.ops import (
    adapter,
    dropout_mask,
    lora_linear,
    lora_linear_multi,
    masked_linear,
    masked_linear_multi,
    masked_linear_packed,
    pack_mask,
    prefix_attention,
)

from . import reference as ref
from .conftest import REL_TOL, assert_close, randn
from .test_adapter import dtypes_for

DEVICE = "cuda"
CUDA_DTYPES = dtypes_for("cuda")
THRESHOLD = 0.0
LORA_NAMES = ("x", "weight", "bias", "lora_A", "lora_B")

# ---------------------------------------------------------------- helpers


def capture(step, leaves=(), before_capture=None):
    """Captures step() (it returns the tensors to check) in a CUDA graph: three warm-up calls on a
    side stream, then the capture. Each leaf's .grad is set to None before every warm-up call and
    before the capture, so the captured backward allocates the gradients in the graph's pool and
    every replay rewrites them. before_capture() runs between the warm-up and the capture (e.g. to
    put ids there that an eager call would refuse). Returns (static outputs, replay)."""

    def clear_grads():
        for t in leaves:
            t.grad = None

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            clear_grads()
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if before_capture is not None:
        before_capture()
    clear_grads()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()

    def replay():
        graph.replay()
        torch.cuda.synchronize()

    return static, replay


def refill(t, scale=1.0):
    """New random values into a static input, in place (autograd leaves included)."""
    with torch.no_grad():
        t.copy_(randn(*t.shape, dtype=t.dtype, device=t.device, scale=scale))


def refill_all(tensors, scales):
    for t, s in zip(tensors, scales):
        if t is not None:
            refill(t, s)


def poison(outputs, inputs=()):
    """NaN (integers: a bit pattern) into the graph's outputs before a replay: the replay must
    rewrite every element. Outputs sharing storage with a static input are left alone."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    with torch.no_grad():
        for t in outputs:
            if t is None or t.untyped_storage().data_ptr() in taken:
                continue
            t.fill_(float("nan") if t.is_floating_point() else 0x5A5A5A5A)


def upstream(shape, dtype):
    """The static upstream gradient: nonzero mean, as conftest.check_against_reference uses."""
    return (randn(*shape, device=DEVICE) + 0.5).to(dtype)


def refill_upstream(gw):
    with torch.no_grad():
        gw.copy_(randn(*gw.shape, device=DEVICE) + 0.5)


def check_out_and_grads(static, inputs, names, ref_fn, gw, dtype):
    """static = (out, grads of the inputs that require one, in order) after a replay, against
    ref_fn on float64 copies of the inputs' current values, backward with the same gw."""
    leaves = [ref.f64(t) for t in inputs]
    expected = ref_fn(*leaves)
    assert_close(static[0], expected, dtype, "replay out")
    if gw is None:
        return
    expected.backward(gw.double())
    grads = iter(static[1:])
    for name, t, t64 in zip(names, inputs, leaves):
        if t is None or not t.requires_grad:
            continue
        g = next(grads)
        assert g is not None, f"no gradient for {name} after the captured backward"
        assert g.shape == t.shape and g.dtype == t.dtype
        expected_grad = torch.zeros_like(t64) if t64.grad is None else t64.grad
        # a gradient stored in a coarser dtype than the op's is held to that dtype's bound
        coarser = max(dtype, t.dtype, key=lambda d: REL_TOL[d])
        assert_close(g, expected_grad, coarser, f"replay grad {name}")


def graph_forward_backward(fn, inputs, backward=True, before_capture=None):
    """Captures out = fn(*inputs) (+ out.backward(gw) when backward and some input requires grad).
    Returns (static, replay, gw); static = (out, grads of the inputs that require one); gw is the
    static upstream gradient (None without a backward)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad] if backward else []
    with torch.no_grad():
        probe = fn(*inputs)
    gw = upstream(probe.shape, probe.dtype) if leaves else None
    del probe

    def step():
        out = fn(*inputs)
        if leaves:
            out.backward(gw)
        return (out, *[t.grad for t in leaves])

    static, replay = capture(step, leaves, before_capture)
    return static, replay, gw


# ---------------------------------------------------------------- adapter


def make_adapter(lead, d, r, dtype):
    x = randn(*lead, d, dtype=dtype, device=DEVICE, requires_grad=True)
    w_down = randn(r, d, dtype=dtype, device=DEVICE, scale=d**-0.5, requires_grad=True)
    b_down = randn(r, dtype=dtype, device=DEVICE, scale=0.1, requires_grad=True)
    w_up = randn(d, r, dtype=dtype, device=DEVICE, scale=r**-0.5, requires_grad=True)
    b_up = randn(d, dtype=dtype, device=DEVICE, scale=0.1, requires_grad=True)
    scales = (1.0, d**-0.5, 0.1, r**-0.5, 0.1)
    return (x, w_down, b_down, w_up, b_up), scales


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_adapter(dtype, with_residual):
    inputs, scales = make_adapter((3, 37), 257, 24, dtype)
    residual = randn(3, 37, 257, dtype=dtype, device=DEVICE) if with_residual else None  # frozen
    activation = "silu" if with_residual else "gelu"

    def fn(x, wd, bd, wu, bu):
        return adapter(x, wd, bd, wu, bu, activation=activation, scale=0.7, residual=residual)

    def ref_fn(x, wd, bd, wu, bu):
        res = None if residual is None else ref.f64(residual)
        return ref.adapter(x, wd, bd, wu, bu, activation, 0.7, res)

    static, replay, gw = graph_forward_backward(fn, inputs)
    for _ in range(2):
        refill_all(inputs, scales)
        if residual is not None:
            refill(residual)
        refill_upstream(gw)
        poison(static, (*inputs, residual, gw))
        replay()
        check_out_and_grads(static, inputs, ("x", "w_down", "b_down", "w_up", "b_up"), ref_fn, gw, dtype)


# ---------------------------------------------------------------- lora_linear


def make_lora(lead, n_in, n_out, r, dtype, grad=LORA_NAMES):
    t = dict(
        x=randn(*lead, n_in, dtype=dtype, device=DEVICE),
        weight=randn(n_out, n_in, dtype=dtype, device=DEVICE, scale=n_in**-0.5),
        bias=randn(n_out, dtype=dtype, device=DEVICE, scale=0.1),
        lora_A=randn(r, n_in, dtype=dtype, device=DEVICE, scale=n_in**-0.5),
        lora_B=randn(n_out, r, dtype=dtype, device=DEVICE, scale=r**-0.5),
    )
    for name in grad:
        t[name].requires_grad_()
    scales = (1.0, n_in**-0.5, 0.1, n_in**-0.5, r**-0.5)
    return tuple(t[n] for n in LORA_NAMES), scales


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("grad", [LORA_NAMES, ("x", "lora_A", "lora_B")], ids=["all", "frozen_base"])
def test_lora_linear(dtype, grad):
    inputs, scales = make_lora((5, 27), 129, 200, 16, dtype, grad)

    def fn(*ts):
        return lora_linear(*ts, scaling=1.5)

    def ref_fn(*ts):
        return ref.lora_linear(*ts, 1.5)

    static, replay, gw = graph_forward_backward(fn, inputs)
    for _ in range(2):
        refill_all(inputs, scales)
        refill_upstream(gw)
        poison(static, (*inputs, gw))
        replay()
        check_out_and_grads(static, inputs, LORA_NAMES, ref_fn, gw, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_lora_linear_dropout_new_mask_every_replay(dtype):
    """Each replay draws a new mask (Philox seed/offset read on the device), its backward uses the
    same mask, and both match the eager formula with the mask dropout_mask gives for the
    (seed, offset) that replay used (the op's third output: the raw op carries the autograd)."""
    p, scaling = 0.3, 2.0
    inputs, _ = make_lora((256,), 129, 72, 8, dtype, grad=("x", "lora_A", "lora_B"))
    x, w, b, A, B = inputs
    gw = upstream((256, 72), dtype)

    def step():
        out, _, seed_offset = torch.ops.peftkern.lora_linear_forward(x, w, b, A, B, scaling, p, True, True)
        out.backward(gw)
        return out, seed_offset, x.grad, A.grad, B.grad

    static, replay = capture(step, (x, A, B))
    runs = []
    for _ in range(2):  # identical inputs: only the mask changes
        poison(static, (*inputs, gw))
        replay()
        runs.append([t.clone() for t in static])
    (out0, so0, gx0, *_), (out1, so1, gx1, *_) = runs
    assert not torch.equal(so0, so1), "both replays used one (seed, offset)"
    assert not torch.equal(out0, out1), "both replays drew the same dropout mask"
    assert not torch.equal(gx0, gx1)
    for out, seed_offset, gx, gA, gB in runs:
        mask = dropout_mask(x, seed_offset, p)
        dropped = (mask == 0).double().mean().item()
        assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / mask.numel())  # 5 sigma
        assert check_mask_values(mask, p)
        leaves = [ref.f64(t) for t in inputs]
        expected = ref.lora_linear(*leaves, scaling, mask.double())
        assert_close(out, expected, dtype, "replay out")
        expected.backward(gw.double())
        assert_close(gx, leaves[0].grad, dtype, "replay grad x")
        assert_close(gA, leaves[3].grad, dtype, "replay grad lora_A")
        assert_close(gB, leaves[4].grad, dtype, "replay grad lora_B")


def check_mask_values(mask, p):
    """Every factor is 0 or 1/(1-p)."""
    keep = torch.tensor(1 / (1 - p), dtype=mask.dtype, device=mask.device)
    return bool(((mask == 0) | torch.isclose(mask, keep)).all())


@pytest.mark.cuda
def test_lora_linear_dropout_public_op_differs_per_replay():
    """The public op (forward + backward captured): two replays with identical inputs give different
    outputs and x gradients; with dropout off (eval) they are identical."""
    inputs, _ = make_lora((300,), 96, 64, 8, torch.float32, grad=("x", "lora_A", "lora_B"))
    for training, differ in ((True, True), (False, False)):

        def fn(*ts):
            return lora_linear(*ts, scaling=2.0, dropout_p=0.25, training=training)

        static, replay, gw = graph_forward_backward(fn, inputs)
        runs = []
        for _ in range(2):
            poison(static, (*inputs, gw))
            replay()
            runs.append([t.clone() for t in static])
        for a, b in zip(*runs):
            assert torch.isfinite(a).all() and torch.isfinite(b).all()
            assert torch.equal(a, b) != differ
        if not training:
            ref_fn = lambda *ts: ref.lora_linear(*ts, 2.0)  # noqa: E731
            check_out_and_grads(static, inputs, LORA_NAMES, ref_fn, gw, torch.float32)


# ---------------------------------------------------------------- lora_linear_multi


def make_multi(tokens, n_in, n_out, r, L, dtype):
    x = randn(tokens, n_in, dtype=dtype, device=DEVICE, requires_grad=True)
    w = randn(n_out, n_in, dtype=dtype, device=DEVICE, scale=n_in**-0.5)  # frozen base
    b = randn(n_out, dtype=dtype, device=DEVICE, scale=0.1, requires_grad=True)
    A = randn(L, r, n_in, dtype=dtype, device=DEVICE, scale=n_in**-0.5, requires_grad=True)
    B = randn(L, n_out, r, dtype=dtype, device=DEVICE, scale=r**-0.5, requires_grad=True)
    scales = (1.0, n_in**-0.5, 0.1, n_in**-0.5, r**-0.5)
    return (x, w, b, A, B), scales


def as_base_only(ids, L):
    """The ids as the op treats them: anything outside [0, L) is -1."""
    return torch.where((ids < 0) | (ids >= L), torch.full_like(ids, -1), ids)


def run_multi(inputs, scales, ids, scalings, dtype, id_sets, capture_ids=None):
    """Captures lora_linear_multi forward + backward with static ids / scalings (capture_ids, when
    given, copied into ids after the eager warm-up, just before the capture), then for each id set:
    new values everywhere, replay, check against the per-token reference."""
    L = inputs[3].shape[0]

    def fn(x, w, b, A, B):
        return lora_linear_multi(x, w, b, A, B, ids, scalings=scalings)

    before = None if capture_ids is None else (lambda: ids.copy_(capture_ids))
    static, replay, gw = graph_forward_backward(fn, inputs, before_capture=before)
    for new_ids in id_sets:
        refill_all(inputs, scales)
        refill_upstream(gw)
        ids.copy_(new_ids)
        scalings.copy_(torch.rand(L, device=DEVICE) + 0.5)
        poison(static, (*inputs, gw, ids, scalings))
        replay()
        ids_ref = as_base_only(ids, L)

        def ref_fn(x, w, b, A, B):
            return ref.lora_linear_multi(x, w, b, A, B, ids_ref, scalings.double())

        check_out_and_grads(static, inputs, LORA_NAMES, ref_fn, gw, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("tokens,L,r", [(45, 3, 8), (200, 5, 16), (130, 2, 33)])
def test_lora_linear_multi(dtype, tokens, L, r):
    inputs, scales = make_multi(tokens, 130, 72, r, L, dtype)
    ids = torch.randint(-1, L, (tokens,), device=DEVICE)
    scalings = torch.rand(L, device=DEVICE) + 0.5
    id_sets = [torch.randint(-1, L, (tokens,), device=DEVICE) for _ in range(2)]
    run_multi(inputs, scales, ids, scalings, dtype, id_sets)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("tokens", [6, 200])
def test_lora_linear_multi_out_of_range_ids_act_as_base_only(dtype, tokens):
    """Under capture the ids' range cannot be read on the host: capturing with out-of-range ids in
    the static ids does not raise, and on replay those tokens get the base output only (forward)
    and no adapter gradient (backward)."""
    L = 2
    inputs, scales = make_multi(tokens, 96, 40, 8, L, dtype)
    ids = torch.randint(0, L, (tokens,), device=DEVICE)  # in range for the eager warm-up
    scalings = torch.rand(L, device=DEVICE) + 0.5
    if tokens == 6:
        bad = [torch.tensor(v, device=DEVICE) for v in ([0, 1, 5, -1, 7, -3], [7, -3, 1, 0, 2, -1])]
    else:
        bad = [torch.randint(-4, L + 4, (tokens,), device=DEVICE) for _ in range(2)]
    # the capture sees out-of-range ids in the static tensor
    run_multi(inputs, scales, ids, scalings, dtype, bad, capture_ids=bad[0])


# ---------------------------------------------------------------- masked_linear


def make_masked(rows, n_in, n_out, dtype, scores_dtype, grad):
    t = dict(
        x=randn(rows, n_in, dtype=dtype, device=DEVICE),
        weight=randn(n_out, n_in, dtype=dtype, device=DEVICE, scale=n_in**-0.5),
        bias=randn(n_out, dtype=dtype, device=DEVICE, scale=0.1),
        scores=randn(n_out, n_in, dtype=scores_dtype, device=DEVICE),  # about half kept at 0
    )
    for name in grad:
        t[name].requires_grad_()
    scales = (1.0, n_in**-0.5, 0.1, 1.0)
    return tuple(t[n] for n in ("x", "weight", "bias", "scores")), scales


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize(
    "rows,grad",
    [
        (45, ("x", "bias", "scores")),  # mask applied to the weight, cuBLAS, straight-through backward
        (45, ("x", "weight", "bias", "scores")),
        (7, ()),  # inference, <= 16 rows: the mat-vec applies the mask while reading the weight
        (40, ()),
    ],
)
def test_masked_linear(dtype, rows, grad):
    for scores_dtype in sorted({torch.float32, dtype}, key=str):
        inputs, scales = make_masked(rows, 129, 77, dtype, scores_dtype, grad)

        def fn(x, w, b, s):
            return masked_linear(x, w, b, s, threshold=THRESHOLD)

        def ref_fn(x, w, b, s):
            return ref.masked_linear(x, w, b, s, THRESHOLD)

        static, replay, gw = graph_forward_backward(fn, inputs)
        for _ in range(2):
            refill_all(inputs, scales)
            if gw is not None:
                refill_upstream(gw)
            poison(static, (*inputs, gw))
            replay()
            check_out_and_grads(static, inputs, ("x", "weight", "bias", "scores"), ref_fn, gw, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("scores_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(77, 129), (33, 1000)])
def test_pack_mask(scores_dtype, shape):
    scores = randn(*shape, dtype=scores_dtype, device=DEVICE)
    threshold = 0.2
    (bits,), replay = capture(lambda: (pack_mask(scores, threshold),))
    for _ in range(2):
        refill(scores)
        poison((bits,), (scores,))
        replay()
        assert torch.equal(bits.cpu(), ref.mask_bits(scores.float().cpu() > threshold))


def masked_reference(x, w, b, keeps, task_ids):
    """Row t: x[t] @ (w * keeps[i]).T + b with i = task_ids[t] (None: every row uses keeps[0]); an
    id outside [0, len(keeps)) uses the unmasked weight. float64."""
    x64, w64, b64 = (t.detach().double() for t in (x, w, b))
    outs = [F.linear(x64, w64 * k.double(), b64) for k in keeps] + [F.linear(x64, w64, b64)]
    if task_ids is None:
        return outs[0]
    ids = task_ids.to(torch.long)
    ids = torch.where((ids < 0) | (ids >= len(keeps)), torch.full_like(ids, len(keeps)), ids)
    stacked = torch.stack(outs)  # [tasks + 1, rows, out]
    return stacked[ids, torch.arange(x.shape[0], device=x.device)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("rows", [7, 40])  # the mat-vec on the bits; the unpacked weight and cuBLAS
def test_masked_linear_packed(dtype, rows):
    x = randn(rows, 129, dtype=dtype, device=DEVICE)
    w = randn(77, 129, dtype=dtype, device=DEVICE, scale=129**-0.5)
    b = randn(77, dtype=dtype, device=DEVICE, scale=0.1)
    scores = randn(77, 129, device=DEVICE)
    bits = pack_mask(scores, THRESHOLD)
    (out,), replay = capture(lambda: (masked_linear_packed(x, w, b, bits),))
    for _ in range(2):
        refill(x)
        refill(w, 129**-0.5)
        refill(b, 0.1)
        refill(scores)
        bits.copy_(pack_mask(scores, THRESHOLD))
        poison((out,), (x, w, b, bits))
        replay()
        assert_close(out, masked_reference(x, w, b, [scores > THRESHOLD], None), dtype, "replay out")


def run_masked_multi(rows, tasks, dtype, id_sets, capture_ids):
    """masked_linear_multi captured with static x, weight, bias, bits stack and ids (capture_ids
    copied in before the capture); each id set: new values everywhere, replay, per-row reference."""
    x = randn(rows, 129, dtype=dtype, device=DEVICE)
    w = randn(77, 129, dtype=dtype, device=DEVICE, scale=129**-0.5)
    b = randn(77, dtype=dtype, device=DEVICE, scale=0.1)
    scores = [randn(77, 129, device=DEVICE) for _ in range(tasks)]
    stack = torch.stack([pack_mask(s, THRESHOLD) for s in scores])
    ids = torch.randint(-1, tasks, (rows,), device=DEVICE)  # in range: the eager warm-up checks them
    (out,), replay = capture(
        lambda: (masked_linear_multi(x, w, b, stack, ids),), before_capture=lambda: ids.copy_(capture_ids)
    )
    for new_ids in id_sets:
        refill(x)
        refill(w, 129**-0.5)
        refill(b, 0.1)
        for s in scores:
            refill(s)
        stack.copy_(torch.stack([pack_mask(s, THRESHOLD) for s in scores]))
        ids.copy_(new_ids)
        poison((out,), (x, w, b, stack, ids))
        replay()
        expected = masked_reference(x, w, b, [s > THRESHOLD for s in scores], ids)
        assert_close(out, expected, dtype, "replay out")
        for t, i in enumerate(ids.tolist()):  # row by row, so a wrong row is named
            assert_close(out[t], expected[t], dtype, f"row {t} (task id {i})")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("rows", [7, 16, 40])  # <= 16: the per-token mat-vec; > 16: a product per task
def test_masked_linear_multi(dtype, rows):
    tasks = 3
    id_sets = [torch.randint(-1, tasks, (rows,), device=DEVICE) for _ in range(2)]
    run_masked_multi(rows, tasks, dtype, id_sets, id_sets[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("rows", [6, 40])
def test_masked_linear_multi_out_of_range_ids_act_as_unmasked(dtype, rows):
    """Out-of-range task ids in the static ids at capture time do not raise, and on replay those
    rows equal the unmasked product (id -1), for the mat-vec (<= 16 rows) and the per-task path."""
    tasks = 2
    if rows == 6:
        id_sets = [torch.tensor(v, device=DEVICE) for v in ([0, 1, 5, -1, 7, -3], [-3, 7, 0, 2, -1, 1])]
    else:
        id_sets = [torch.randint(-4, tasks + 4, (rows,), device=DEVICE) for _ in range(2)]
    run_masked_multi(rows, tasks, dtype, id_sets, id_sets[0])


# ---------------------------------------------------------------- prefix_attention


def prefix_reference(q, k, v, pk, pv, ids, causal):
    """Sample by sample (float64 leaves): a sample whose id is outside [0, T) attends to no prefix."""
    T = pk.shape[0]
    outs = []
    for b, i in enumerate(ids.tolist()):
        sl = slice(b, b + 1)
        pkb, pvb = (pk[i], pv[i]) if 0 <= i < T else (pk[0, :, :0], pv[0, :, :0])
        outs.append(ref.prefix_attention(q[sl], k[sl], v[sl], pkb, pvb, causal=causal))
    return torch.cat(outs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_prefix_attention(dtype, causal):
    """Forward + backward (q, k, v and both prefixes), per-task prefixes with static prefix_ids:
    new in-range ids on the first replay, an out-of-range id on the second (that sample attends to
    no prefix and gives its task no gradient)."""
    B, H, Hkv, L, S, P, D, T = 3, 4, 2, 37, 45, 9, 64, 2
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    shapes = [(B, H, L, D), (B, Hkv, S, D), (B, Hkv, S, D), (T, Hkv, P, D), (T, Hkv, P, D)]
    inputs = tuple(randn(*s, dtype=dtype, device=DEVICE, requires_grad=True) for s in shapes)
    ids = torch.tensor([0, 1, 0], device=DEVICE)

    def fn(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, prefix_ids=ids, causal=causal)

    static, replay, gw = graph_forward_backward(fn, inputs)
    for new_ids in ([1, 0, 1], [1, 7, 0]):
        refill_all(inputs, (1.0,) * 5)
        refill_upstream(gw)
        ids.copy_(torch.tensor(new_ids, device=DEVICE))
        poison(static, (*inputs, gw, ids))
        replay()

        def ref_fn(q, k, v, pk, pv):
            return prefix_reference(q, k, v, pk, pv, ids, causal)

        check_out_and_grads(static, inputs, names, ref_fn, gw, dtype)
