"""The compute-sanitizer subset: every hand-written CUDA kernel launched at least once, at odd sizes
(rows, features and ranks that are multiples of no tile; features off the 16-byte vector paths)
and in each dtype it covers, small enough to run under memcheck, racecheck, initcheck and synccheck
in seconds (scripts/gpu_check.sh's sanitize stage: ``pytest -m sanitize``). Each case is also checked
against the float64 reference, so a run without a sanitizer is a correctness test too.

Kernels launched, by test:
  adapter / lora           lowrank_forward_kernel, lowrank_backward_rows_kernel, _cols_kernel,
                           _reduce_kernel (with dropout: the Philox path of each); dropout_mask_kernel
  multi                    the multi-adapter grouping and the segmented forward (LoRA and adapter)
  mask                     mask_apply_kernel, mask_ste_kernel, masked_matvec_kernel (scores, packed
                           bits, per-token task bits)
  prefix_attention         prefix_attention_forward_kernel, _backward_kernel
  *_gated                  the same kernels with a per-row gate (UniPELT): the gated epilogue, the
                           rows kernel's dgate, the gated bias sums; the gated prefix merge / backward
  prefix_attention_biased  the prefix kernels with an additive prefix bias (T5), gated and not
  ia3_forward_backward     ia3_column_partials_kernel (both modes), ia3_column_finalize_kernel,
                           ia3_zero_scale_partials_kernel and _finalize_kernel (zero columns rescued)
"""

import pytest
import torch

from peftkern import ops

from . import reference
from .conftest import assert_close, check_against_reference, randn

pytestmark = [pytest.mark.cuda, pytest.mark.sanitize]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = 77  # one full 64-row block and a partial one; two 32-row tiles and a partial one
# (features, rank): 33 features take the scalar (unvectorised) loads, 96 the 16-byte ones;
# ranks 7 and 40 pad to 16 and 64 on chip
SIZES = [(33, 7), (96, 40)]


def _ids(dtype):
    return str(dtype).replace("torch.", "")


def _adapter_inputs(d, r, dtype):
    """x, w_down, b_down, w_up, b_up on the GPU, each requiring a gradient."""
    return (
        randn(ROWS, d, dtype=dtype, device="cuda", requires_grad=True),
        randn(r, d, dtype=dtype, device="cuda", scale=d**-0.5, requires_grad=True),
        randn(r, dtype=dtype, device="cuda", scale=0.1, requires_grad=True),
        randn(d, r, dtype=dtype, device="cuda", scale=r**-0.5, requires_grad=True),
        randn(d, dtype=dtype, device="cuda", scale=0.1, requires_grad=True),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d,r", SIZES)
def test_adapter_forward_backward(dtype, d, r):
    x, wd, bd, wu, bu = _adapter_inputs(d, r, dtype)
    check_against_reference(
        lambda *t: ops.adapter(*t, activation="gelu", scale=0.5),
        lambda *t: reference.adapter(*t, activation="gelu", scale=0.5),
        (x, wd, bd, wu, bu),
        ("x", "w_down", "b_down", "w_up", "b_up"),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d,r", SIZES)
def test_lora_with_dropout(dtype, d, r):
    n_out = d + 5
    x = randn(ROWS, d, dtype=dtype, device="cuda", requires_grad=True)
    w = randn(n_out, d, dtype=dtype, device="cuda", scale=d**-0.5)
    b = randn(n_out, dtype=dtype, device="cuda", scale=0.1)
    A = randn(r, d, dtype=dtype, device="cuda", scale=d**-0.5, requires_grad=True)
    B = randn(n_out, r, dtype=dtype, device="cuda", scale=r**-0.5, requires_grad=True)
    p, seed = 0.25, 1234
    torch.manual_seed(seed)
    _, _, seed_offset = torch.ops.peftkern.lora_linear_forward(
        x.detach(), w, b, A.detach(), B.detach(), 2.0, p, True, False
    )
    mask = ops.dropout_mask(x, seed_offset, p)  # dropout_mask_kernel
    assert set(mask.unique().tolist()) == {0.0, 1 / (1 - p)}

    def fn(*t):
        torch.manual_seed(seed)  # the same (seed, offset) as the mask above
        return ops.lora_linear(*t, scaling=2.0, dropout_p=p, training=True)

    check_against_reference(
        fn,
        lambda *t: reference.lora_linear(*t, 2.0, mask=mask.double()),
        (x, w, b, A, B),
        ("x", "weight", "bias", "lora_A", "lora_B"),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_multi_adapter_forward(dtype):
    d, r, L = 33, 7, 3
    x = randn(ROWS, d, dtype=dtype, device="cuda")
    ids = torch.randint(-1, L, (ROWS,), device="cuda")
    w = randn(d, d, dtype=dtype, device="cuda", scale=d**-0.5)
    b = randn(d, dtype=dtype, device="cuda", scale=0.1)
    A = randn(L, r, d, dtype=dtype, device="cuda", scale=d**-0.5)
    B = randn(L, d, r, dtype=dtype, device="cuda", scale=r**-0.5)
    scalings = torch.tensor([0.5, 1.0, 2.0], device="cuda")
    out = ops.lora_linear_multi(x, w, b, A, B, ids, scalings=scalings)
    f = reference.f64
    expected = reference.lora_linear_multi(f(x), f(w), f(b), f(A), f(B), ids.cpu(), scalings.cpu())
    assert_close(out, expected, dtype, "lora_linear_multi")

    wd, bd = (
        randn(L, r, d, dtype=dtype, device="cuda", scale=d**-0.5),
        randn(L, r, dtype=dtype, device="cuda"),
    )
    wu, bu = (
        randn(L, d, r, dtype=dtype, device="cuda", scale=r**-0.5),
        randn(L, d, dtype=dtype, device="cuda"),
    )
    out = ops.adapter_multi(x, wd, bd, wu, bu, ids)
    expected = reference.adapter_multi(f(x), f(wd), f(bd), f(wu), f(bu), ids)
    assert_close(out, expected, dtype, "adapter_multi")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_mask_kernels(dtype):
    n_in, n_out, threshold = 100, 77, 0.0  # 100 inputs: a partial 32-bit mask word per row
    x = randn(ROWS, n_in, dtype=dtype, device="cuda", requires_grad=True)
    w = randn(n_out, n_in, dtype=dtype, device="cuda", scale=n_in**-0.5)
    b = randn(n_out, dtype=dtype, device="cuda", scale=0.1)
    scores = randn(n_out, n_in, device="cuda", requires_grad=True)
    # mask_apply_kernel (forward) and mask_ste_kernel (backward)
    check_against_reference(
        lambda *t: ops.masked_linear(*t, threshold=threshold),
        lambda *t: reference.masked_linear(*t, threshold),
        (x, w, b, scores),
        ("x", "weight", "bias", "scores"),
        dtype,
    )
    bits = ops.pack_mask(scores, threshold)
    tasks = torch.stack([bits, ops.pack_mask(-scores, threshold)])
    f = reference.f64
    for rows in (1, 7, 16):  # masked_matvec_kernel: scores, packed bits, per-token task bits
        xs = x.detach()[:rows]
        with torch.no_grad():
            expected = reference.masked_linear(f(xs), f(w), f(b), scores.detach().double(), threshold)
            assert_close(ops.masked_linear(xs, w, b, scores, threshold=threshold), expected, dtype, "scores")
            assert_close(ops.masked_linear_packed(xs, w, b, bits), expected, dtype, "packed bits")
            task_ids = torch.arange(rows, device="cuda") % 3 - 1  # -1 (unmasked), 0, 1
            out = ops.masked_linear_multi(xs, w, b, tasks, task_ids)
        for t, i in enumerate(task_ids.tolist()):
            s = None if i < 0 else (scores if i == 0 else -scores).detach().double()
            ref = f(xs[t : t + 1]) @ (f(w) if s is None else f(w) * (s > threshold)).T + f(b)
            assert_close(out[t : t + 1], ref, dtype, f"task bits, row {t}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
@pytest.mark.parametrize("D", [64, 40])
def test_prefix_attention_forward_backward(dtype, D):
    B, H, Hkv, L, S, P, T = 3, 4, 2, 7, 9, 5, 2  # GQA; causal with L != S; per-sample task prefixes
    q = randn(B, H, L, D, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(B, Hkv, S, D, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(B, Hkv, S, D, dtype=dtype, device="cuda", requires_grad=True)
    pk = randn(T, Hkv, P, D, dtype=dtype, device="cuda", requires_grad=True)
    pv = randn(T, Hkv, P, D, dtype=dtype, device="cuda", requires_grad=True)
    ids = torch.tensor([1, 0, 1], device="cuda")

    def fn(q, k, v, pk, pv):
        return ops.prefix_attention(q, k, v, pk, pv, prefix_ids=ids, causal=True)

    check_against_reference(
        fn,
        lambda q, k, v, pk, pv: reference.prefix_attention(q, k, v, pk, pv, prefix_ids=ids, causal=True),
        (q, k, v, pk, pv),
        ("q", "k", "v", "prefix_k", "prefix_v"),
        dtype,
    )


def _gate(shape, dtype):
    return torch.sigmoid(randn(*shape, dtype=torch.float64)).to("cuda", dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d,r", SIZES)
def test_adapter_gated(dtype, d, r):
    x, wd, bd, wu, bu = _adapter_inputs(d, r, dtype)
    gate = _gate((ROWS,), dtype)
    check_against_reference(
        lambda *t: ops.adapter(*t[:5], activation="gelu", scale=0.5, gate=t[5]),
        lambda *t: reference.adapter(*t[:5], activation="gelu", scale=0.5, gate=t[5]),
        (x, wd, bd, wu, bu, gate),
        ("x", "w_down", "b_down", "w_up", "b_up", "gate"),
        dtype,
    )
    frozen = [t.detach() for t in (x, wd, bd, wu, bu)]  # the gate's gradient alone: the rows kernel only
    gate2 = _gate((ROWS,), dtype)
    check_against_reference(
        lambda *t: ops.adapter(*t[:5], gate=t[5]),
        lambda *t: reference.adapter(*t[:5], gate=t[5]),
        (*frozen, gate2),
        ("x", "w_down", "b_down", "w_up", "b_up", "gate"),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_lora_gated_with_dropout(dtype):
    d, r, n_out = 96, 40, 101
    x = randn(ROWS, d, dtype=dtype, device="cuda", requires_grad=True)
    w = randn(n_out, d, dtype=dtype, device="cuda", scale=d**-0.5)
    b = randn(n_out, dtype=dtype, device="cuda", scale=0.1)
    A = randn(r, d, dtype=dtype, device="cuda", scale=d**-0.5, requires_grad=True)
    B = randn(n_out, r, dtype=dtype, device="cuda", scale=r**-0.5, requires_grad=True)
    gate = _gate((ROWS,), dtype)
    p, seed = 0.25, 99
    torch.manual_seed(seed)
    _, _, seed_offset = torch.ops.peftkern.lora_linear_forward(
        x.detach(), w, b, A.detach(), B.detach(), 2.0, p, True, False
    )
    mask = ops.dropout_mask(x, seed_offset, p)

    def fn(*t):
        torch.manual_seed(seed)
        return ops.lora_linear(*t[:5], scaling=2.0, dropout_p=p, training=True, gate=t[5])

    check_against_reference(
        fn,
        lambda *t: reference.lora_linear(*t[:5], 2.0, mask=mask.double(), gate=t[5]),
        (x, w, b, A, B, gate),
        ("x", "weight", "bias", "lora_A", "lora_B", "gate"),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
def test_prefix_attention_gated(dtype):
    B, H, Hkv, L, S, P, D, T = 3, 4, 2, 7, 9, 5, 40, 2
    q = randn(B, H, L, D, dtype=dtype, device="cuda", requires_grad=True)
    k = randn(B, Hkv, S, D, dtype=dtype, device="cuda", requires_grad=True)
    v = randn(B, Hkv, S, D, dtype=dtype, device="cuda", requires_grad=True)
    pk = randn(T, Hkv, P, D, dtype=dtype, device="cuda", requires_grad=True)
    pv = randn(T, Hkv, P, D, dtype=dtype, device="cuda", requires_grad=True)
    ids = torch.tensor([1, 0, 1], device="cuda")
    gate = _gate((B, 1, L), dtype)  # expanded over the heads: stride 0
    check_against_reference(
        lambda *t: ops.prefix_attention(*t[:5], prefix_ids=ids, causal=True, prefix_gate=t[5]),
        lambda *t: reference.prefix_attention_gated(*t[:5], t[5], prefix_ids=ids, causal=True),
        (q, k, v, pk, pv, gate),
        ("q", "k", "v", "prefix_k", "prefix_v", "prefix_gate"),
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_ids)
def test_prefix_attention_biased(dtype):
    """The biased forward and backward instances, without and with a gate: a [1, H, L, P] bias (stride
    0 over the batch) and a strided [B, H, L, P] one (key stride 2)."""
    B, H, Hkv, L, S, P, D, T = 3, 4, 2, 7, 9, 5, 40, 2
    ids = torch.tensor([1, 0, 1], device="cuda")
    biases = [
        randn(1, H, L, P, dtype=dtype, device="cuda", scale=2.0),
        randn(B, H, L, 2 * P, dtype=dtype, device="cuda", scale=2.0)[..., ::2],
    ]
    for bias, gated in zip(biases, (False, True)):
        q = randn(B, H, L, D, dtype=dtype, device="cuda", requires_grad=True)
        k = randn(B, Hkv, S, D, dtype=dtype, device="cuda", requires_grad=True)
        v = randn(B, Hkv, S, D, dtype=dtype, device="cuda", requires_grad=True)
        pk = randn(T, Hkv, P, D, dtype=dtype, device="cuda", requires_grad=True)
        pv = randn(T, Hkv, P, D, dtype=dtype, device="cuda", requires_grad=True)
        names = ("q", "k", "v", "prefix_k", "prefix_v")
        opts = dict(prefix_ids=ids, causal=True)
        if gated:
            check_against_reference(
                lambda *t: ops.prefix_attention(*t[:5], prefix_bias=bias, prefix_gate=t[5], **opts),
                lambda *t: reference.prefix_attention_gated(*t[:5], t[5], prefix_bias=bias.double(), **opts),
                (q, k, v, pk, pv, _gate((B, 1, L), dtype)),
                (*names, "prefix_gate"),
                dtype,
            )
        else:
            check_against_reference(
                lambda *t: ops.prefix_attention(*t, prefix_bias=bias, **opts),
                lambda *t: reference.prefix_attention(*t, prefix_bias=bias.double(), **opts),
                (q, k, v, pk, pv),
                names,
                dtype,
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("d", [33, 96])
def test_ia3_forward_backward(dtype, d):
    """ia3_column_partials_kernel (both modes: output scale, and input scale rewriting grad_h in
    place), ia3_column_finalize_kernel, ia3_zero_scale_partials_kernel and _finalize_kernel (two zero
    columns rescued); 33 features
    take the scalar (unpaired) loads, 96 the paired ones."""
    for scale_input in (False, True):
        n_out = d + 8
        x = randn(ROWS, d, dtype=dtype, device="cuda", requires_grad=True)
        w = randn(n_out, d, dtype=dtype, device="cuda", scale=d**-0.5)
        b = randn(n_out, dtype=dtype, device="cuda", scale=0.5)
        n = d if scale_input else n_out
        vec = (torch.rand(n, device="cuda") + 0.5).to(dtype)
        if not scale_input:
            vec[0] = vec[n - 1] = 0.0
        check_against_reference(
            lambda *t: ops.ia3_linear(*t, scale_input=scale_input),
            lambda *t: reference.ia3_linear(*t, scale_input),
            (x, w, b, vec.requires_grad_()),
            ("x", "weight", "bias", "ia3_scale"),
            dtype,
        )
