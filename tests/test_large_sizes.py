"""The memory-bound ops on tensors of more than 2^31 elements, where a 32-bit index, offset or grid
product would overflow: the adapter and LoRA on x [2^20, 2^12], LoRA with an output over 2^31
elements, mask tuning on a [2^16 + 1, 2^15] weight (mat-vec and mask-apply paths, packed and
per-task masks, pack_mask), prefix attention with B * H * L * D > 2^31 (with the sequence part, and
prefix-only forward + backward).

Each op runs once on the whole tensor; its result is checked against the float64 eager formula
computed chunk by chunk on the GPU (memory stays bounded), chunk by chunk with the relative error
of conftest (REL_TOL of the dtype), so an error anywhere, the last chunks past 2^31 included, is
seen. Each test skips when the GPU has less free memory than it needs (its estimate is in the
test) and stays under about 30 GiB; memory is freed after every test, also after a failure."""

import gc
import sys

import pytest
import torch
import torch.nn.functional as F

from peftkern.ops import (
    adapter,
    lora_linear,
    lora_linear_multi,
    masked_linear,
    masked_linear_multi,
    masked_linear_packed,
    pack_mask,
    prefix_attention,
)

from . import reference as ref
from .conftest import REL_TOL

GiB = 1 << 30
BIG = 1 << 31  # the tensors under test hold more elements than this


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    # pytest keeps a failed test's traceback (and with it the test's tensors) in sys.last_*: drop it
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def require_free(gib):
    """Skips the test unless the GPU has gib GiB free."""
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    if free < gib * GiB:
        pytest.skip(f"needs {gib} GiB of free GPU memory; {free / GiB:.1f} GiB free")


def big_randn(*shape, dtype=torch.bfloat16, device="cuda", scale=1.0):
    """Random values generated on the device in the storage dtype (a float64 staging copy of these
    tensors would not fit)."""
    t = torch.randn(*shape, dtype=dtype, device=device)
    return t.mul_(scale) if scale != 1.0 else t


def chunks(n, size):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def assert_chunk_close(out, expected, dtype, what):
    """conftest.assert_close computed on the device (a chunk is too large to copy to the host
    twice per check): ||out - ref|| / ||ref|| in float64 <= REL_TOL[dtype], no NaN or inf."""
    out, expected = out.detach().double(), expected.detach().double()
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed output)"
    denom = expected.norm()
    err = ((out - expected).norm() / denom).item() if denom > 0 else out.norm().item()
    tol = REL_TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype})"


# ---------------------------------------------------------------- adapter


def check_adapter(rows, d, r, chunk, device="cuda"):
    """Forward and the x gradient. The upstream gradient is out itself (loss = ||out||^2 / 2), so
    no third x-sized tensor is needed: x, out and dx."""
    dtype = torch.bfloat16
    x = big_randn(rows, d, device=device).requires_grad_()
    w_down = big_randn(r, d, device=device, scale=d**-0.5)
    b_down = big_randn(r, device=device, scale=0.1)
    w_up = big_randn(d, r, device=device, scale=r**-0.5)
    b_up = big_randn(d, device=device, scale=0.1)
    out = adapter(x, w_down, b_down, w_up, b_up)
    out.backward(out.detach())
    weights = [ref.f64(t) for t in (w_down, b_down, w_up, b_up)]
    for sl in chunks(rows, chunk):
        x64 = x.detach()[sl].double().requires_grad_()
        expected = ref.adapter(x64, *weights)
        assert_chunk_close(out[sl], expected, dtype, f"out rows {sl.start}:{sl.stop}")
        expected.backward(out.detach()[sl].double())
        assert_chunk_close(x.grad[sl], x64.grad, dtype, f"grad x rows {sl.start}:{sl.stop}")


@pytest.mark.cuda
def test_adapter_x_over_2_31_elements():
    rows, d = 1 << 20, 1 << 12  # x, out, dx: 2^32 elements (8 GiB) each
    assert rows * d > BIG
    require_free(28)
    check_adapter(rows, d, 16, chunk=1 << 13)


# ---------------------------------------------------------------- LoRA


def lora_inputs(rows, n_in, n_out, r, device):
    x = big_randn(rows, n_in, device=device)
    w = big_randn(n_out, n_in, device=device, scale=n_in**-0.5)
    b = big_randn(n_out, device=device, scale=0.1)
    A = big_randn(r, n_in, device=device, scale=n_in**-0.5)
    B = big_randn(n_out, r, device=device, scale=r**-0.5)
    return x, w, b, A, B


def check_lora(rows, n_in, n_out, r, chunk, device="cuda"):
    dtype = torch.bfloat16
    x, w, b, A, B = lora_inputs(rows, n_in, n_out, r, device)
    with torch.no_grad():
        out = lora_linear(x, w, b, A, B, scaling=2.0)
    w64, b64, A64, B64 = (t.double() for t in (w, b, A, B))
    for sl in chunks(rows, chunk):
        expected = ref.lora_linear(x[sl].double(), w64, b64, A64, B64, 2.0)
        assert_chunk_close(out[sl], expected, dtype, f"out rows {sl.start}:{sl.stop}")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "rows,n_in,n_out,r,need_gib",
    [
        (1 << 20, 1 << 12, 64, 8, 12),  # x: 2^32 elements
        ((3 << 18) + 5, 72, 1 << 12, 16, 10),  # out: 3 * 2^30 + 20480 elements
    ],
    ids=["x_over_2_31", "out_over_2_31"],
)
def test_lora_linear_over_2_31_elements(rows, n_in, n_out, r, need_gib):
    assert max(rows * n_in, rows * n_out) > BIG
    require_free(need_gib)
    check_lora(rows, n_in, n_out, r, chunk=1 << 14)


def lora_multi_reference(x64, w64, b64, A64, B64, ids, scalings):
    """out[t] = x[t] W^T + b + s[i] (x[t] A[i]^T) B[i]^T, i = ids[t] (-1: none): the formula of
    reference.lora_linear_multi, vectorised over the tokens of each adapter."""
    out = F.linear(x64, w64, b64)
    for i in range(A64.shape[0]):
        rows = (ids == i).to(torch.float64).unsqueeze(1)
        out = out + rows * (float(scalings[i]) * F.linear(F.linear(x64, A64[i]), B64[i]))
    return out


def check_lora_multi(rows, n_in, n_out, r, L, chunk, device="cuda"):
    dtype = torch.bfloat16
    x, w, b, _, _ = lora_inputs(rows, n_in, n_out, r, device)
    A = big_randn(L, r, n_in, device=device, scale=n_in**-0.5)
    B = big_randn(L, n_out, r, device=device, scale=r**-0.5)
    ids = torch.randint(-1, L, (rows,), device=device)
    scalings = torch.rand(L, device=device) + 0.5
    with torch.no_grad():
        out = lora_linear_multi(x, w, b, A, B, ids, scalings=scalings)
    w64, b64, A64, B64 = (t.double() for t in (w, b, A, B))
    for sl in chunks(rows, chunk):
        expected = lora_multi_reference(x[sl].double(), w64, b64, A64, B64, ids[sl], scalings.tolist())
        assert_chunk_close(out[sl], expected, dtype, f"out rows {sl.start}:{sl.stop}")


@pytest.mark.cuda
def test_lora_linear_multi_x_over_2_31_elements():
    rows, n_in = 1 << 20, 1 << 12  # x: 2^32 elements, tokens of 3 adapters (and none) interleaved
    assert rows * n_in > BIG
    require_free(12)
    check_lora_multi(rows, n_in, 64, 8, 3, chunk=1 << 14)


# ---------------------------------------------------------------- mask tuning

MASK_OUT, MASK_IN = (1 << 16) + 1, 1 << 15  # weight: 2^31 + 2^15 elements


def check_masked(rows, n_out, n_in, chunk, device="cuda"):
    """masked_linear (scores), masked_linear_packed (its packed bits) and masked_linear_multi (two
    packed masks, thresholds 0 and 0.5, and -1) on one large weight; reference by weight-row chunks."""
    dtype = torch.bfloat16
    w = big_randn(n_out, n_in, device=device, scale=n_in**-0.5)
    scores = torch.randn(n_out, n_in, device=device)  # float32
    x = big_randn(rows, n_in, device=device)
    b = big_randn(n_out, device=device, scale=0.1)
    ids = torch.arange(rows, device=device) % 3 - 1  # -1, 0, 1, -1, ...
    with torch.no_grad():
        out = masked_linear(x, w, b, scores, threshold=0.0)
        stack = torch.stack([pack_mask(scores, 0.0), pack_mask(scores, 0.5)])
        packed = masked_linear_packed(x, w, b, stack[0])
        multi = masked_linear_multi(x, w, b, stack, ids)
    x64 = x.double()
    pick = torch.where(ids < 0, torch.full_like(ids, 2), ids)
    for sl in chunks(n_out, chunk):
        w64, b64 = w[sl].double(), b[sl].double()
        keep0, keep1 = scores[sl] > 0.0, scores[sl] > 0.5
        per_task = torch.stack(
            [F.linear(x64, w64 * keep0, b64), F.linear(x64, w64 * keep1, b64), F.linear(x64, w64, b64)]
        )
        what = f"weight rows {sl.start}:{sl.stop}"
        assert_chunk_close(out[:, sl], per_task[0], dtype, f"masked_linear {what}")
        assert_chunk_close(packed[:, sl], per_task[0], dtype, f"masked_linear_packed {what}")
        expected_multi = per_task[pick, torch.arange(rows, device=device)]
        assert_chunk_close(multi[:, sl], expected_multi, dtype, f"masked_linear_multi {what}")


@pytest.mark.cuda
@pytest.mark.parametrize(
    "rows,need_gib",
    [
        (5, 16),  # <= 16 rows: the mat-vec reads the weight and the scores / bits (4 + 8 GiB)
        (64, 22),  # the mask-apply pass builds weight * mask (4 GiB more) for cuBLAS
    ],
)
def test_masked_linear_weight_over_2_31_elements(rows, need_gib):
    assert MASK_OUT * MASK_IN > BIG
    require_free(need_gib)
    check_masked(rows, MASK_OUT, MASK_IN, chunk=4096)


def pack_bits_reference(keep):
    """reference.mask_bits vectorised (on keep's device): bit j of int32 word w of row n is element
    (n, 32 w + j), trailing bits 0."""
    rows, cols = keep.shape
    words = (cols + 31) // 32
    padded = torch.zeros(rows, words * 32, dtype=torch.int64, device=keep.device)
    padded[:, :cols] = keep
    shifts = torch.arange(32, dtype=torch.int64, device=keep.device)
    v = (padded.view(rows, words, 32) << shifts).sum(-1)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def check_pack_mask(n_out, n_in, chunk, device="cuda"):
    small = torch.rand(3, 100) > 0.5  # the vectorised packing is reference.mask_bits
    assert torch.equal(pack_bits_reference(small.to(device)).cpu(), ref.mask_bits(small))
    scores = torch.randn(n_out, n_in, device=device)
    bits = pack_mask(scores, 0.25)
    assert bits.shape == (n_out, (n_in + 31) // 32) and bits.dtype == torch.int32
    for sl in chunks(n_out, chunk):
        expected = pack_bits_reference(scores[sl] > 0.25)
        assert torch.equal(bits[sl], expected), f"bits rows {sl.start}:{sl.stop}"


@pytest.mark.cuda
def test_pack_mask_scores_over_2_31_elements():
    assert MASK_OUT * MASK_IN > BIG
    require_free(12)  # float32 scores: 8 GiB
    check_pack_mask(MASK_OUT, MASK_IN, chunk=2048)


# ---------------------------------------------------------------- prefix attention

# q, out: B * H * L * D = 520 * 2^22 > 2^31 elements (4.1 GiB each in bf16); k, v: a quarter (GQA)
B, H, HKV, L, P, D, TASKS = 520, 32, 8, 1024, 16, 128, 3


def prefix_inputs(B, H, Hkv, L, S, P, D, T, device, grad=False):
    q = big_randn(B, H, L, D, device=device).requires_grad_(grad)
    k = big_randn(B, Hkv, S, D, device=device)
    v = big_randn(B, Hkv, S, D, device=device)
    pk = big_randn(T, Hkv, P, D, device=device).requires_grad_(grad)
    pv = big_randn(T, Hkv, P, D, device=device).requires_grad_(grad)
    ids = torch.randint(0, T, (B,), device=device)
    return q, k, v, pk, pv, ids


def check_prefix_with_sequence(B, H, Hkv, L, P, D, T, chunk, device="cuda"):
    """Forward over [prefix; sequence] (S = L, causal): PyTorch's fused attention for the sequence,
    the prefix kernel and the merge over the whole batch."""
    dtype = torch.bfloat16
    q, k, v, pk, pv, ids = prefix_inputs(B, H, Hkv, L, L, P, D, T, device)
    with torch.no_grad():
        out = prefix_attention(q, k, v, pk, pv, prefix_ids=ids, causal=True)
    pk64, pv64 = pk.double(), pv.double()
    for sl in chunks(B, chunk):
        expected = ref.prefix_attention(
            q[sl].double(), k[sl].double(), v[sl].double(), pk64, pv64, prefix_ids=ids[sl], causal=True
        )
        assert_chunk_close(out[sl], expected, dtype, f"out samples {sl.start}:{sl.stop}")


@pytest.mark.cuda
def test_prefix_attention_with_sequence_over_2_31_elements():
    assert B * H * L * D > BIG
    require_free(18)  # q, out 4.1 GiB each, k, v 1 GiB each, reference chunks ~4 GiB
    check_prefix_with_sequence(B, H, HKV, L, P, D, TASKS, chunk=4)


def check_prefix_only(B, H, Hkv, L, P, D, T, chunk, device="cuda"):
    """S = 0 (no sequence keys): the prefix kernels alone, forward and backward (dq, dprefix_k,
    dprefix_v) over the whole batch. Upstream gradient: out itself (loss = ||out||^2 / 2)."""
    dtype = torch.bfloat16
    q, k, v, pk, pv, ids = prefix_inputs(B, H, Hkv, L, 0, P, D, T, device, grad=True)
    out = prefix_attention(q, k, v, pk, pv, prefix_ids=ids)
    out.backward(out.detach())
    pk64, pv64 = ref.f64(pk), ref.f64(pv)  # leaves: their gradients sum over the chunks
    for sl in chunks(B, chunk):
        q64 = q.detach()[sl].double().requires_grad_()
        expected = ref.prefix_attention(q64, k[sl].double(), v[sl].double(), pk64, pv64, prefix_ids=ids[sl])
        what = f"samples {sl.start}:{sl.stop}"
        assert_chunk_close(out[sl], expected, dtype, f"out {what}")
        expected.backward(out.detach()[sl].double())
        assert_chunk_close(q.grad[sl], q64.grad, dtype, f"grad q {what}")
    assert_chunk_close(pk.grad, pk64.grad, dtype, "grad prefix_k")
    assert_chunk_close(pv.grad, pv64.grad, dtype, "grad prefix_v")


@pytest.mark.cuda
def test_prefix_attention_prefix_only_forward_backward_over_2_31_elements():
    assert B * H * L * D > BIG
    require_free(18)  # q, out, dq 4.1 GiB each, the kernel's probability workspace 1 GiB, reference
    check_prefix_only(B, H, HKV, L, P, D, TASKS, chunk=16)
