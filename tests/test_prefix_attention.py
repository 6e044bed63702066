"""peftkern.ops.prefix_attention and the prefix / prompt modules against the float64 eager formula
(torch.cat of the prefix in front of K and V, then softmax attention)."""

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from peftkern.nn import PrefixKV, PrefixSelfAttention, SoftPrompt
from peftkern.ops import prefix_attention

from . import reference as ref
from .conftest import DEVICES, assert_close, check_against_reference, poison_cuda_cache, randn
from .test_adapter import dtypes_for

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def make_inputs(B, H, Hkv, L, S, P, D, dtype, device, tasks=0, grad=NAMES):
    t = dict(
        q=randn(B, H, L, D, dtype=dtype, device=device),
        k=randn(B, Hkv, S, D, dtype=dtype, device=device),
        v=randn(B, Hkv, S, D, dtype=dtype, device=device),
    )
    lead = (tasks,) if tasks else ()
    t["prefix_k"] = randn(*lead, Hkv, P, D, dtype=dtype, device=device)
    t["prefix_v"] = randn(*lead, Hkv, P, D, dtype=dtype, device=device)
    for n in grad:
        t[n].requires_grad_()
    ids = torch.randint(0, tasks, (B,), device=device) if tasks else None
    return tuple(t[n] for n in NAMES), ids


def check_prefix(inputs, ids, dtype, causal=False, scale=None, attn_mask=None):
    opts = dict(prefix_ids=ids, causal=causal, scale=scale, attn_mask=attn_mask)

    def fn(*ts):
        return prefix_attention(*ts, **opts)

    def ref_fn(*ts):
        return ref.prefix_attention(*ts, **opts)

    return check_against_reference(fn, ref_fn, inputs, NAMES, dtype)


# The sequence part's kernel follows torch.nn.attention.sdpa_kernel, as SDPA does: "default" is the
# op's own choice (CPU: PyTorch's CPU flash kernel), "math" the ATen composite.
SEQ_BACKENDS = {"default": None, "math": [SDPBackend.MATH]}
CUDA_SEQ_BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}


def backend(name, table=SEQ_BACKENDS):
    chosen = table[name]
    return contextlib.nullcontext() if chosen is None else sdpa_kernel(chosen)


SHAPES = [  # B, H, Hkv, L, S, P, D
    (2, 4, 4, 5, 7, 3, 16),
    (1, 8, 2, 33, 33, 0, 32),  # P = 0: plain attention
    (3, 4, 1, 17, 40, 65, 64),
    (2, 2, 2, 70, 130, 16, 128),
    (1, 2, 1, 1, 50, 8, 64),  # decode: one query over a cache
    (2, 4, 2, 9, 4, 5, 16),  # L > S: causal rows i < L - S see only the prefix
    (2, 2, 1, 6, 0, 5, 16),  # S = 0: the prefix alone
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_gradients(device, shape, causal):
    for dtype in dtypes_for(device):
        inputs, ids = make_inputs(*shape, dtype, device)
        check_prefix(inputs, ids, dtype, causal=causal)


@pytest.mark.parametrize("seq_backend", SEQ_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 4, 2, 9, 4, 5, 16), (2, 4, 4, 6, 11, 3, 8), (1, 2, 1, 12, 12, 4, 24)])
def test_cpu_sequence_backends(seq_backend, shape):
    """The merge algebra and the merged-statistics backward on each CPU sequence kernel."""
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for causal in (False, True):
            inputs, _ = make_inputs(*shape, dtype, "cpu")
            with backend(seq_backend):
                check_prefix(inputs, None, dtype, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_per_sample_task_prefixes(device, causal):
    """Mixed-task batch: each sample's prefix chosen by prefix_ids; prefix gradients summed over the
    samples sharing a task (and zero for a task nobody uses)."""
    for dtype in dtypes_for(device):
        inputs, _ = make_inputs(5, 4, 2, 9, 12, 6, 64, dtype, device, tasks=4)
        ids = torch.tensor([2, 0, 2, 2, 0], device=device)
        check_prefix(inputs, ids, dtype, causal=causal)
        assert not inputs[3].grad[1].any() and not inputs[3].grad[3].any()


@pytest.mark.parametrize("device", DEVICES)
def test_custom_scale(device):
    inputs, _ = make_inputs(2, 2, 2, 6, 6, 4, 64, torch.float32, device)
    check_prefix(inputs, None, torch.float32, scale=0.3)


def padding_mask(B, S, lengths, device):
    """[B, 1, 1, S] bool, True on each sample's first lengths[b] keys (right padding)."""
    return (torch.arange(S, device=device)[None] < torch.tensor(lengths, device=device)[:, None])[
        :, None, None
    ]


MASKS = {  # name -> (B, H, L, S) -> mask
    "bool_2d": lambda B, H, L, S, dev: torch.rand(L, S, device=dev) > 0.3,
    "bool_padding": lambda B, H, L, S, dev: padding_mask(B, S, [S, S // 2, 0][:B], dev),
    "bool_4d_full": lambda B, H, L, S, dev: torch.rand(B, H, L, S, device=dev) > 0.5,
    "additive_b1ls": lambda B, H, L, S, dev: torch.randn(B, 1, L, S, device=dev),
    "additive_padding": lambda B, H, L, S, dev: torch.zeros(B, 1, 1, S, device=dev).masked_fill(
        ~padding_mask(B, S, [S, 1, S // 3][:B], dev), float("-inf")
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("causal", [False, True])
def test_attn_mask(device, mask_kind, causal):
    """attn_mask over the sequence keys, combined with causal; prefix keys stay visible, so rows
    whose sequence keys are all masked (a fully padded sample, say) attend to the prefix alone."""
    for dtype in dtypes_for(device):
        for shape in [(3, 4, 2, 7, 10, 3, 16), (3, 2, 1, 12, 5, 4, 32)]:  # L < S and L > S
            B, H, Hkv, L, S, P, D = shape
            inputs, _ = make_inputs(*shape, dtype, device)
            mask = MASKS[mask_kind](B, H, L, S, device)
            if mask.dtype != torch.bool:
                mask = mask.to(dtype)
            check_prefix(inputs, None, dtype, causal=causal, attn_mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_attn_mask_with_task_prefixes_and_math_backend(device):
    inputs, _ = make_inputs(3, 4, 2, 8, 8, 5, 16, torch.float32, device, tasks=2)
    ids = torch.tensor([1, 0, 1], device=device)
    mask = padding_mask(3, 8, [8, 3, 0], device)
    for name in SEQ_BACKENDS:
        for t in inputs:
            t.grad = None
        with backend(name):
            check_prefix(inputs, ids, torch.float32, causal=True, attn_mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_queries_that_see_nothing_output_zero(device):
    """P = 0 and no visible sequence key (causal L > S, or a fully masked row): the output is 0 (SDPA
    gives NaN) and the gradients are finite; other rows match the reference."""
    for dtype in dtypes_for(device):
        inputs, _ = make_inputs(1, 2, 2, 10, 4, 0, 64, dtype, device)
        out = check_prefix(inputs, None, dtype, causal=True)
        assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
        inputs, _ = make_inputs(2, 2, 1, 5, 6, 0, 16, dtype, device)
        mask = padding_mask(2, 6, [6, 0], device)
        out = check_prefix(inputs, None, dtype, attn_mask=mask)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["additive mask", "prefix key", "prefix key, S = 0"])
def test_infinite_scores_give_the_rows_eager_gives(device, where):
    """A +inf score makes eager softmax NaN. The op must say the same, not drop the part holding
    it as if that part had no key (its lse is +inf, not the -inf of an empty part). Scores of -inf
    (a masked key) are ignored in both."""
    for dtype in dtypes_for(device):
        B, H, Hkv, L, S, P, D = 2, 2, 1, 4, 0 if "S = 0" in where else 5, 3, 16
        (q, k, v, pk, pv), _ = make_inputs(B, H, Hkv, L, S, P, D, dtype, device, grad=())
        mask = None
        if where == "additive mask":
            mask = torch.zeros(L, S, dtype=dtype, device=device)
            mask[1, 2], mask[2, 0] = math.inf, -math.inf
        else:
            pk[0, 1, 0] = math.inf  # score +inf where q[..., 0] > 0, -inf where it is < 0
        out = prefix_attention(q, k, v, pk, pv, attn_mask=mask)
        f64 = [t.double() for t in (q, k, v, pk, pv)]
        want = ref.prefix_attention(*f64, attn_mask=None if mask is None else mask.double())
        nan = torch.isnan(want)
        assert nan.any() and not nan.all(), "the case must have NaN rows and finite ones"
        assert torch.equal(torch.isnan(out), nan), f"{dtype}: NaN rows differ from eager's"
        assert_close(out[~nan], want[~nan].to(dtype), dtype, f"{where}: rows without a +inf score")


@pytest.mark.parametrize("device", DEVICES)
def test_attn_mask_of_every_broadcastable_rank(device):
    """attn_mask may have any rank up to 4 (a [S] padding row, a scalar), as SDPA's may."""
    B, H, Hkv, L, S, P, D = 2, 4, 2, 3, 6, 2, 8
    for dtype in dtypes_for(device):
        inputs, _ = make_inputs(B, H, Hkv, L, S, P, D, dtype, device)
        for shape in [(), (S,), (1,), (L, S), (H, 1, S), (B, 1, L, S)]:
            mask = torch.rand(shape, device=device) > 0.3
            for t in inputs:
                t.grad = None
            check_prefix(inputs, None, dtype, attn_mask=mask)


@pytest.mark.parametrize("device", DEVICES)
def test_log_sum_exp_output(device):
    """The op's lse is the row log-sum-exp over [prefix; sequence] (+inf for a row that sees no
    key), and it is not differentiable (autograd would drop its gradient)."""
    B, H, Hkv, L, S, P, D = 2, 4, 2, 9, 4, 3, 16
    (q, k, v, pk, pv), _ = make_inputs(B, H, Hkv, L, S, P, D, torch.float64, device)
    mask = padding_mask(B, S, [4, 0], device)
    out, lse = torch.ops.peftkern.prefix_attention_forward(q, k, v, pk, pv, None, mask, True, D**-0.5)
    assert lse.dtype == torch.float64 and not lse.requires_grad and out.requires_grad
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(H // Hkv, 1)
    scores = q.detach() @ keys.detach().transpose(-1, -2) * D**-0.5
    i, j = torch.arange(L, device=device)[:, None], torch.arange(S, device=device)[None]
    hidden = (j > i + (S - L)) | ~mask
    scores[..., P:] = scores[..., P:].masked_fill(hidden, float("-inf"))
    assert_close(lse, torch.logsumexp(scores, -1), torch.float64, "lse")
    (q, k, v, pk, pv), _ = make_inputs(1, 2, 2, 6, 3, 0, 16, torch.float32, device)
    _, lse = torch.ops.peftkern.prefix_attention_forward(q, k, v, pk, pv, None, None, True, 0.25)
    assert torch.equal(lse[..., :3], torch.full_like(lse[..., :3], float("inf")))
    assert torch.isfinite(lse[..., 3:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_empty_inputs(device):
    B, L, H, Hkv, D = 2, 11, 4, 2, 16
    dtype = torch.float32
    q = randn(B, L, H, D, dtype=dtype, device=device).transpose(1, 2).requires_grad_()
    kv = randn(B, L, 2 * Hkv, D, dtype=dtype, device=device)
    k = kv[:, :, :Hkv].transpose(1, 2).detach().requires_grad_()
    v = kv[:, :, Hkv:].transpose(1, 2).detach().requires_grad_()
    pk = randn(D, 5, Hkv, dtype=dtype, device=device).permute(2, 1, 0).requires_grad_()
    pv = randn(Hkv, 5, D, dtype=dtype, device=device, requires_grad=True)
    assert not (q.is_contiguous() or k.is_contiguous() or pk.is_contiguous())
    out = check_prefix((q, k, v, pk, pv), None, dtype, causal=True)
    assert out.shape == (B, H, L, D) and out.transpose(1, 2).is_contiguous()
    for shape in [(0, 4, 2, 5, 6, 3, 16), (2, 4, 2, 0, 6, 3, 16), (2, 4, 2, 5, 0, 0, 16)]:
        inputs, _ = make_inputs(*shape, dtype, device)
        out = prefix_attention(*inputs, causal=True)
        assert out.shape == (shape[0], shape[1], shape[3], shape[6]) and not out.isnan().any()
        out.sum().backward()
        for t in inputs:
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_gradcheck_float64():
    for causal in (False, True):
        inputs, ids = make_inputs(2, 2, 1, 3, 4, 2, 4, torch.float64, "cpu", tasks=3)
        mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True] * 4])
        for attn_mask in (None, mask):
            for name in SEQ_BACKENDS:
                fn = lambda *ts: prefix_attention(*ts, prefix_ids=ids, causal=causal, attn_mask=attn_mask)  # noqa: E731
                with backend(name):
                    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        for tasks in (0, 3):
            for mask in (None, torch.rand(5, 6, device=device) > 0.4):
                inputs, ids = make_inputs(2, 4, 2, 5, 6, 3, 64, dtype, device, tasks=tasks)
                fwd_args = (*inputs, ids, mask, True, 0.125)
                torch.library.opcheck(torch.ops.peftkern.prefix_attention_forward.default, fwd_args)
                out, lse = torch.ops.peftkern.prefix_attention_forward(*fwd_args)
                g = torch.randn_like(out)
                args = (
                    g,
                    *(t.detach() for t in inputs),
                    ids,
                    mask,
                    out.detach(),
                    lse.detach(),
                    True,
                    0.125,
                    [True, True, False, True, True],
                )
                torch.library.opcheck(torch.ops.peftkern.prefix_attention_backward.default, args)


# ---------------------------------------------------------------- bad input


def call(**kw):
    (q, k, v, pk, pv), _ = make_inputs(2, 4, 2, 5, 6, 3, 16, torch.float32, "cpu", grad=())
    t = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    opts = {}
    for key, val in kw.items():
        (opts if key in ("prefix_ids", "causal", "scale", "attn_mask") else t)[key] = val
    return prefix_attention(*(t[n] for n in NAMES), **opts)


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (
            dict(k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 8)),
            ValueError,
            r"k must have shape \[B, Hkv, S, D\] with head dim D = 16 \(q's\); got \[2, 2, 6, 8\]",
        ),
        (
            dict(k=torch.randn(2, 3, 6, 16), v=torch.randn(2, 3, 6, 16)),
            ValueError,
            r"q's heads H = 4 must be a multiple of k's heads Hkv = 3",
        ),
        (
            dict(prefix_k=torch.randn(4, 3, 16), prefix_v=torch.randn(4, 3, 16)),
            ValueError,
            r"prefix_k must have shape \[Hkv, P, D\] = \[2, P, 16\] or \[T, 2, P, 16\]; got \[4, 3, 16\]",
        ),
        (
            dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)),
            ValueError,
            r"prefix_k holds 3 task prefixes \[T, Hkv, P, D\]; "
            r"prefix_ids \[B\] must say which one each sample uses",
        ),
        (
            dict(
                prefix_k=torch.randn(3, 2, 3, 16),
                prefix_v=torch.randn(3, 2, 3, 16),
                prefix_ids=torch.tensor([0, 3]),
            ),
            ValueError,
            r"prefix_ids must be in \[0, T\) = \[0, 3\); got values in \[0, 3\]",
        ),
        (
            dict(
                prefix_k=torch.randn(3, 2, 3, 16),
                prefix_v=torch.randn(3, 2, 3, 16),
                prefix_ids=torch.tensor([-1, 0]),
            ),
            ValueError,
            r"prefix_ids must be in \[0, T\) = \[0, 3\); got values in \[-1, 0\]",
        ),
        (
            dict(
                prefix_k=torch.randn(3, 2, 3, 16),
                prefix_v=torch.randn(3, 2, 3, 16),
                prefix_ids=torch.tensor([0.0, 1.0]),
            ),
            TypeError,
            r"prefix_ids must be an int32 or int64 tensor; got Float",
        ),
        (
            dict(prefix_ids=torch.tensor([0, 0])),
            ValueError,
            r"prefix_ids given but prefix_k is one shared prefix",
        ),
        (
            dict(k=torch.randn(3, 2, 6, 16), v=torch.randn(3, 2, 6, 16)),
            ValueError,
            r"k has batch 3 but q has batch 2",
        ),
        (
            dict(v=torch.randn(2, 2, 7, 16)),
            ValueError,
            r"v must have k's shape \[2, 2, 6, 16\]; got \[2, 2, 7, 16\]",
        ),
        (
            dict(prefix_v=torch.randn(2, 4, 16)),
            ValueError,
            r"prefix_v must have prefix_k's shape \[2, 3, 16\]",
        ),
        (dict(q=torch.randn(2, 4, 16)), ValueError, r"q must have shape \[B, H, L, D\]"),
        (
            dict(k=torch.randn(2, 2, 6, 16, dtype=torch.float64)),
            TypeError,
            r"k has dtype Double but q has dtype Float",
        ),
        (
            dict(attn_mask=torch.ones(5, 6, dtype=torch.int64)),
            TypeError,
            r"attn_mask must be a bool tensor \(True = attend\) or an additive mask of q's dtype Float; "
            r"got Long",
        ),
        (
            dict(attn_mask=torch.ones(5, 6, dtype=torch.float64)),
            TypeError,
            r"attn_mask must be a bool tensor",
        ),
        (
            dict(attn_mask=torch.ones(5, 7, dtype=torch.bool)),
            ValueError,
            r"attn_mask must be broadcastable to \[B, H, L, S\] = \[2, 4, 5, 6\]; got \[5, 7\]",
        ),
        (
            dict(attn_mask=torch.ones(3, 1, 5, 6, dtype=torch.bool)),
            ValueError,
            r"attn_mask must be broadcastable",
        ),
        (
            dict(attn_mask=torch.ones(1, 2, 4, 5, 6, dtype=torch.bool)),
            ValueError,
            r"attn_mask must be broadcastable",
        ),
        (
            dict(attn_mask=torch.zeros(5, 6, requires_grad=True)),
            ValueError,
            r"attn_mask requires grad, but no gradient flows to the mask",
        ),
    ],
)
def test_bad_input(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        call(**kwargs)


def test_no_enabled_backend_raises():
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):  # no CPU kernel of that kind
        with pytest.raises(NotImplementedError, match=r"no enabled attention backend supports these inputs"):
            call()


@pytest.mark.cuda
def test_bad_input_wrong_device():
    (q, k, v, pk, pv), _ = make_inputs(2, 4, 2, 5, 6, 3, 64, torch.bfloat16, "cuda", grad=())
    with pytest.raises(ValueError, match=r"prefix_k is on cpu but q is on cuda:0"):
        prefix_attention(q, k, v, pk.cpu(), pv)
    with pytest.raises(ValueError, match=r"attn_mask is on cpu but q is on cuda:0"):
        prefix_attention(q, k, v, pk, pv, attn_mask=torch.ones(5, 6, dtype=torch.bool))


# ---------------------------------------------------------------- CUDA

CUDA_SHAPES = [  # B, H, Hkv, L, S, P, D
    (2, 8, 2, 300, 300, 64, 128),
    (1, 4, 4, 129, 257, 100, 64),
    (3, 4, 2, 64, 64, 64, 64),
    (2, 8, 2, 1, 1000, 16, 128),  # decode
    (1, 2, 2, 200, 70, 0, 64),  # P = 0, L > S
    (2, 4, 1, 77, 50, 33, 80),  # head dim 80 (kernel tile 128), L > S
    (2, 2, 2, 40, 90, 20, 256),
    (2, 4, 2, 33, 0, 40, 64),  # S = 0
]


@pytest.mark.cuda
@pytest.mark.parametrize("seq_backend", CUDA_SEQ_BACKENDS)
@pytest.mark.parametrize("shape", CUDA_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_shapes_per_backend(seq_backend, shape, causal):
    """Each sequence kernel the op can choose (forced through sdpa_kernel), with the prefix kernel;
    shapes it does not support are skipped by the op's own eligibility rules (NotImplementedError)."""
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        inputs, _ = make_inputs(*shape, dtype, "cuda")
        poison_cuda_cache()
        with backend(seq_backend, CUDA_SEQ_BACKENDS):
            try:
                check_prefix(inputs, None, dtype, causal=causal)
            except NotImplementedError as e:
                assert "no enabled attention backend" in str(e)
                assert seq_backend != "math" and (dtype == torch.float32 or seq_backend == "cudnn")


@pytest.mark.cuda
@pytest.mark.parametrize("seq_backend", ["efficient", "cudnn", "math"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_cuda_attn_mask(seq_backend, mask_kind):
    for dtype in (torch.float16, torch.bfloat16):
        for causal in (False, True):
            for shape in [(3, 8, 2, 100, 130, 16, 64), (3, 4, 4, 90, 33, 7, 128)]:
                B, H, Hkv, L, S, P, D = shape
                inputs, ids = make_inputs(*shape, dtype, "cuda", tasks=2)
                ids = torch.tensor([1, 0, 1], device="cuda")
                mask = MASKS[mask_kind](B, H, L, S, "cuda")
                mask = mask if mask.dtype == torch.bool else mask.to(dtype)
                poison_cuda_cache()
                with backend(seq_backend, CUDA_SEQ_BACKENDS):
                    check_prefix(inputs, ids, dtype, causal=causal, attn_mask=mask)


@pytest.mark.cuda
def test_cuda_per_task_prefixes_gqa_and_odd_head_dim():
    for D in (64, 72, 256, 33):  # 33: not a multiple of 8, the composite path
        for dtype in (torch.bfloat16, torch.float16):
            inputs, _ = make_inputs(5, 8, 2, 70, 90, 40, D, dtype, "cuda", tasks=3)
            ids = torch.tensor([2, 0, 2, 1, 0], device="cuda")
            poison_cuda_cache()
            check_prefix(inputs, ids, dtype, causal=True)


@pytest.mark.cuda
def test_cuda_strided_inputs_from_projections():
    """q/k/v as transposed views of [B, L, H*D] projections (D contiguous), as a model makes them."""
    B, L, H, Hkv, D = 2, 100, 4, 2, 64
    x = randn(B, L, H * D, dtype=torch.bfloat16, device="cuda")
    q = x.view(B, L, H, D).transpose(1, 2).detach().requires_grad_()
    kv = randn(B, L, 2 * Hkv * D, dtype=torch.bfloat16, device="cuda")
    k = kv[..., : Hkv * D].view(B, L, Hkv, D).transpose(1, 2).detach().requires_grad_()
    v = kv[..., Hkv * D :].view(B, L, Hkv, D).transpose(1, 2).detach().requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    pk = randn(Hkv, 16, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    pv = randn(Hkv, 16, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    check_prefix((q, k, v, pk, pv), None, torch.bfloat16, causal=True)


@pytest.mark.cuda
def test_cuda_misaligned_views():
    """Inputs and grad_out at an odd element offset (.contiguous() keeps them there), as torch.cat's
    backward hands on a gradient slice: the op copies them rather than fault on 16-byte loads."""
    B, H, Hkv, L, S, P, D = 2, 4, 2, 50, 60, 10, 64
    dtype = torch.bfloat16

    def odd(*shape):
        n = math.prod(shape)
        return randn(n + 1, dtype=dtype, device="cuda")[1:].view(shape)

    q, k, v, pk, pv = odd(B, H, L, D), odd(B, Hkv, S, D), odd(B, Hkv, S, D), odd(Hkv, P, D), odd(Hkv, P, D)
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    out, lse = torch.ops.peftkern.prefix_attention_forward(q, k, v, pk, pv, None, None, True, D**-0.5)
    expected = ref.prefix_attention(*(ref.f64(t) for t in (q, k, v, pk, pv)), causal=True)
    assert_close(out, expected, dtype)
    g = odd(B, H, L, D)
    grads = torch.ops.peftkern.prefix_attention_backward(
        g, q, k, v, pk, pv, None, None, out, lse, True, D**-0.5, [True] * 5
    )
    leaves = [ref.f64(t).requires_grad_() for t in (q, k, v, pk, pv)]
    ref.prefix_attention(*leaves, causal=True).backward(g.double())
    for name, got, leaf in zip(NAMES, grads, leaves):
        assert_close(got, leaf.grad, dtype, f"grad {name}")
    # the same through torch.cat's backward
    x = torch.cat(
        [
            randn(B, H, L, 3, dtype=dtype, device="cuda"),
            prefix_attention(*(t.detach().requires_grad_() for t in (q, k, v, pk, pv)), causal=True),
        ],
        -1,
    )
    x.sum().backward()


@pytest.mark.cuda
def test_cuda_prefix_gradients_are_deterministic():
    inputs, _ = make_inputs(6, 8, 2, 200, 100, 64, 128, torch.bfloat16, "cuda", tasks=3)
    ids = torch.tensor([0, 1, 2, 0, 1, 2], device="cuda")
    grads = []
    for _ in range(2):
        for t in inputs:
            t.grad = None
        prefix_attention(*inputs, prefix_ids=ids, causal=True).float().square().sum().backward()
        grads.append([inputs[3].grad.clone(), inputs[4].grad.clone()])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.cuda
def test_cuda_ids_check_is_one_host_copy():
    """The prefix_ids range check is the op's only device-to-host transfer (one sync)."""
    inputs, _ = make_inputs(4, 4, 2, 30, 40, 8, 64, torch.bfloat16, "cuda", tasks=3, grad=())
    ids = torch.tensor([0, 2, 1, 2], device="cuda")
    prefix_attention(*inputs, prefix_ids=ids, causal=True)  # warm up (lazy initialisation may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prefix_attention(*inputs, prefix_ids=ids, causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.cuda
def test_cuda_graph_capture_with_out_of_range_task():
    """Under graph capture prefix_ids is not checked; a sample with an out-of-range id attends to
    no prefix (the kernel bounds the id) instead of reading past the prefix stack."""
    inputs, _ = make_inputs(3, 4, 2, 40, 50, 8, 64, torch.float16, "cuda", tasks=2, grad=())
    q, k, v, pk, pv = inputs
    ids = torch.tensor([0, 1, 0], device="cuda")
    prefix_attention(q, k, v, pk, pv, prefix_ids=ids, causal=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = prefix_attention(q, k, v, pk, pv, prefix_ids=ids, causal=True)
    ids.copy_(torch.tensor([1, 7, 0], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for b, i in enumerate([1, None, 0]):
        sl = slice(b, b + 1)
        pkb = pk[i] if i is not None else pk[0, :, :0]
        pvb = pv[i] if i is not None else pv[0, :, :0]
        expected = ref.prefix_attention(*(ref.f64(t) for t in (q[sl], k[sl], v[sl], pkb, pvb)), causal=True)
        assert_close(out[sl], expected, torch.float16)


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_with_empty_prefix_is_plain_attention(causal):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    layer = PrefixSelfAttention.from_mha(mha, causal=causal)
    x = torch.randn(3, 9, 64)
    empty = torch.empty(4, 0, 16)
    mask = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1) if causal else None
    expected, _ = mha(x, x, x, need_weights=False, attn_mask=mask)
    assert_close(layer(x, empty, empty), expected.double(), torch.float32)


def test_self_attention_gqa_with_prefix_matches_reference():
    torch.manual_seed(0)
    layer = PrefixSelfAttention(64, 8, num_kv_heads=2, causal=True)
    kv = PrefixKV(1, 2, 8, 5, num_tasks=3)
    pk, pv = kv(0)
    ids = torch.tensor([1, 2])
    x = torch.randn(2, 7, 64)
    out = layer(x, pk, pv, prefix_ids=ids)
    B, L = 2, 7
    q = layer.q_proj(x).view(B, L, 8, 8).transpose(1, 2)
    k = layer.k_proj(x).view(B, L, 2, 8).transpose(1, 2)
    v = layer.v_proj(x).view(B, L, 2, 8).transpose(1, 2)
    att = ref.prefix_attention(*(t.double() for t in (q, k, v, pk, pv)), prefix_ids=ids, causal=True)
    expected = F.linear(
        att.transpose(1, 2).reshape(B, L, 64), layer.out_proj.weight.double(), layer.out_proj.bias.double()
    )
    assert_close(out, expected, torch.float32)
    assert "num_kv_heads=2, causal=True" in repr(layer)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        PrefixSelfAttention(60, 8)


def test_prefix_kv_shapes_projection_and_freeze():
    direct = PrefixKV(3, 2, 16, 5)
    pk, pv = direct(1)
    assert pk.shape == (2, 5, 16) and pv.shape == (2, 5, 16) and pk.requires_grad
    multi = PrefixKV(3, 2, 16, 5, num_tasks=4)
    assert multi(0)[0].shape == (4, 2, 5, 16)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 4\)"):
        multi(0, task_ids=torch.tensor([4]))
    with pytest.raises(ValueError, match=r"layer must be in \[0, 3\)"):
        multi(3)

    proj = PrefixKV(3, 2, 16, 5, num_tasks=2, projection_dim=24)
    before = [proj(layer) for layer in range(3)]
    # the reparametrisation, written out: embedding -> Linear -> tanh -> Linear, layer block `layer`
    h = torch.tanh(proj.down(proj.embedding.weight))
    full = proj.up(h).view(2, 5, 3, 2, 2, 16)
    for layer in range(3):
        assert torch.allclose(before[layer][0], full[:, :, layer, 0].permute(0, 2, 1, 3), atol=1e-6)
        assert torch.allclose(before[layer][1], full[:, :, layer, 1].permute(0, 2, 1, 3), atol=1e-6)
    sum(t.sum() for kv in before for t in kv).backward()
    assert proj.embedding.weight.grad is not None and proj.up.weight.grad is not None
    proj.freeze_projection()
    assert proj.embedding is None and not proj.prefix.requires_grad
    for layer in range(3):
        after = proj(layer)
        assert torch.allclose(after[0], before[layer][0].detach(), atol=1e-6)
        assert torch.allclose(after[1], before[layer][1].detach(), atol=1e-6)


def test_soft_prompt():
    torch.manual_seed(0)
    sp = SoftPrompt(3, 8, num_tasks=2)
    x = torch.randn(4, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 4)
    ids = torch.tensor([0, 1, 1, 0])
    out, m = sp(x, mask, task_ids=ids)
    assert out.shape == (4, 8, 8) and torch.equal(out[:, 3:], x)
    assert torch.equal(out[1, :3], sp.prompt[1]) and torch.equal(out[0, :3], sp.prompt[0])
    assert torch.equal(m, torch.cat([torch.ones(4, 3, dtype=mask.dtype), mask], 1))
    with pytest.raises(ValueError, match="task_ids"):
        sp(x)
    emb = nn.Embedding(100, 8)
    init = SoftPrompt.from_embeddings(emb.weight[torch.tensor([5, 6, 7])].detach())
    out, m = init(x)
    assert m is None and torch.equal(out[:, :3], emb.weight[5:8].detach().expand(4, 3, 8))
    out.sum().backward()
    assert init.prompt.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_module_compiles_fullgraph(device):
    torch._dynamo.reset()
    layer = PrefixSelfAttention(64, 4, num_kv_heads=2, causal=True).to(device)
    kv = PrefixKV(1, 2, 16, 4).to(device)
    compiled = torch.compile(lambda x: layer(x, *kv(0)), fullgraph=True, dynamic=False)
    x = torch.randn(2, 6, 64, device=device)
    out, out_c = layer(x, *kv(0)), compiled(x)
    assert torch.allclose(out, out_c, rtol=1e-5, atol=1e-6)
    out_c.sum().backward()
    assert kv.prefix.grad is not None


# ---------------------------------------------------------------- the per-row prefix gate (UniPELT)

GATE_SHAPES = [  # B, H, Hkv, L, S, P, D
    (2, 4, 4, 5, 7, 3, 16),
    (3, 4, 1, 17, 40, 65, 64),
    (2, 4, 2, 9, 4, 5, 16),
    (2, 2, 1, 6, 0, 5, 16),  # S = 0
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", GATE_SHAPES)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_gate_forward_and_every_gradient(device, shape, per_head, causal):
    """The gate scales the prefix's share of each row (one per token shared by the heads, or one
    per head and token): forward and every gradient, the gate's included."""
    B, H, _, L = shape[:4]
    for dtype in dtypes_for(device):
        inputs, _ = make_inputs(*shape, dtype, device)
        gate = torch.sigmoid(randn(B, H if per_head else 1, L, dtype=torch.float64))
        gate = gate.to(device=device, dtype=dtype).requires_grad_()

        def fn(*ts):
            return prefix_attention(*ts[:5], causal=causal, prefix_gate=ts[5])

        def ref_fn(*ts):
            return ref.prefix_attention_gated(*ts[:5], ts[5], causal=causal)

        check_against_reference(fn, ref_fn, (*inputs, gate), (*NAMES, "prefix_gate"), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_with_task_prefixes_and_padding(device):
    for dtype in dtypes_for(device):
        inputs, ids = make_inputs(4, 4, 2, 7, 9, 6, 64, dtype, device, tasks=3)
        mask = padding_mask(4, 9, [9, 3, 0, 6], device)
        gate = (
            torch.sigmoid(randn(4, 1, 7, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_()
        )

        def fn(*ts):
            return prefix_attention(*ts[:5], prefix_ids=ids, attn_mask=mask, prefix_gate=ts[5])

        def ref_fn(*ts):
            return ref.prefix_attention_gated(*ts[:5], ts[5], prefix_ids=ids, attn_mask=mask)

        check_against_reference(fn, ref_fn, (*inputs, gate), (*NAMES, "prefix_gate"), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_gradient_alone(device):
    for dtype in dtypes_for(device):
        inputs, _ = make_inputs(2, 4, 2, 9, 11, 5, 32, dtype, device, grad=())
        gate = (
            torch.sigmoid(randn(2, 1, 9, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_()
        )
        check_against_reference(
            lambda *ts: prefix_attention(*ts[:5], prefix_gate=ts[5]),
            lambda *ts: ref.prefix_attention_gated(*ts[:5], ts[5]),
            (*inputs, gate),
            (*NAMES, "prefix_gate"),
            dtype,
        )


def test_gate_gradcheck_float64():
    inputs, _ = make_inputs(2, 2, 1, 3, 4, 2, 4, torch.float64, "cpu")
    gate = torch.rand(2, 2, 3, dtype=torch.float64, requires_grad=True)
    with sdpa_kernel([SDPBackend.MATH]):
        torch.autograd.gradcheck(lambda *t: prefix_attention(*t[:5], prefix_gate=t[5]), (*inputs, gate))


@pytest.mark.parametrize("device", DEVICES)
def test_gate_opcheck(device):
    inputs, _ = make_inputs(2, 4, 2, 5, 6, 3, 16, torch.float32, device)
    gate = torch.rand(2, 4, 5, device=device, requires_grad=True)
    args = (*inputs, None, None, False, None, gate)
    torch.library.opcheck(torch.ops.peftkern.prefix_attention_forward.default, args)


def test_gate_bad_input():
    inputs, _ = make_inputs(2, 4, 2, 5, 6, 3, 16, torch.float32, "cpu", grad=())
    with pytest.raises(
        ValueError, match=r"prefix_attention: prefix_gate must be broadcastable to \[B, H, L\]"
    ):
        prefix_attention(*inputs, prefix_gate=torch.rand(2, 4, 6))
    with pytest.raises(ValueError, match=r"prefix_attention: prefix_gate must be 3-D"):
        prefix_attention(*inputs, prefix_gate=torch.rand(2, 5))
    with pytest.raises((TypeError, ValueError), match="prefix_attention: prefix_gate"):
        prefix_attention(*inputs, prefix_gate=torch.rand(2, 1, 5, dtype=torch.float64))


# ---------------------------------------------------------------- the additive prefix bias (T5)

# B, H, Hkv, L, S, P, D: GQA, L > S (causal rows that see only the prefix), S = 0, P = 0
BIAS_SHAPES = [
    (2, 4, 2, 9, 11, 5, 16),
    (3, 4, 1, 17, 40, 65, 64),
    (2, 4, 2, 9, 4, 5, 16),
    (2, 2, 1, 6, 0, 5, 16),
]
BIAS_BROADCASTS = {  # name -> the bias shape for (B, H, L, P)
    "1HLP": lambda B, H, L, P: (1, H, L, P),
    "B11P": lambda B, H, L, P: (B, 1, 1, P),
    "BHLP": lambda B, H, L, P: (B, H, L, P),
}


def make_bias(shape, dtype, device, scale=2.0):
    """A bias large enough to move the softmax (the test fails if it is dropped), frozen."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def check_biased(inputs, bias, dtype, gate=None, **opts):
    """Output and every gradient (the gate's too, when given) against the reference's one additive
    mask over [prefix; sequence] keys."""
    if gate is None:
        return check_against_reference(
            lambda *ts: prefix_attention(*ts, prefix_bias=bias, **opts),
            lambda *ts: ref.prefix_attention(*ts, prefix_bias=bias.double(), **opts),
            inputs,
            NAMES,
            dtype,
        )
    return check_against_reference(
        lambda *ts: prefix_attention(*ts[:5], prefix_bias=bias, prefix_gate=ts[5], **opts),
        lambda *ts: ref.prefix_attention_gated(*ts[:5], ts[5], prefix_bias=bias.double(), **opts),
        (*inputs, gate),
        (*NAMES, "prefix_gate"),
        dtype,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", BIAS_SHAPES)
@pytest.mark.parametrize("broadcast", BIAS_BROADCASTS)
@pytest.mark.parametrize("causal", [False, True])
def test_prefix_bias_forward_and_gradients(device, shape, broadcast, causal):
    B, H, _, L, _, P, _ = shape
    for dtype in dtypes_for(device):
        for name in SEQ_BACKENDS if device == "cpu" else ["default"]:
            inputs, _ = make_inputs(*shape, dtype, device)
            bias = make_bias(BIAS_BROADCASTS[broadcast](B, H, L, P), dtype, device)
            with backend(name):
                check_biased(inputs, bias, dtype, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gated", [False, True])
def test_prefix_bias_with_task_prefixes_causal_and_attn_mask(device, gated):
    """Stacked task prefixes (one bias for all, of their common P), padding and causal masks over
    the sequence keys, and the gate, whose gradient sees the biased probabilities."""
    B, H, Hkv, L, S, P, D = 4, 4, 2, 7, 9, 6, 64
    for dtype in dtypes_for(device):
        for mask in (padding_mask(B, S, [9, 3, 0, 6], device), MASKS["additive_b1ls"](B, H, L, S, device)):
            mask = mask if mask.dtype == torch.bool else mask.to(dtype)
            inputs, _ = make_inputs(B, H, Hkv, L, S, P, D, dtype, device, tasks=3)
            ids = torch.tensor([2, 0, 2, 1], device=device)
            bias = make_bias((1, H, L, P), dtype, device)
            gate = None
            if gated:
                gate = torch.sigmoid(randn(B, 1, L, dtype=torch.float64)).to(device=device, dtype=dtype)
                gate.requires_grad_()
            check_biased(inputs, bias, dtype, gate, prefix_ids=ids, attn_mask=mask, causal=True)


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_bias_strided_ranks_and_infinities(device):
    """A bias of lower rank ([L, P], [P]), a non-contiguous view, one broadcast over the keys, and
    -inf entries that hide prefix keys (a row whose keys are all hidden, with S = 0, outputs 0)."""
    B, H, Hkv, L, S, P, D = 2, 4, 2, 5, 6, 7, 32
    for dtype in dtypes_for(device):
        cases = [
            make_bias((L, P), dtype, device),
            make_bias((P,), dtype, device),
            make_bias((1, H, P, L), dtype, device).transpose(-1, -2),  # key stride L, row stride 1
            make_bias((B, H, L, 2 * P), dtype, device)[..., ::2],  # key stride 2
            make_bias((B, H, L, 1), dtype, device),  # key stride 0
        ]
        for bias in cases:
            inputs, _ = make_inputs(B, H, Hkv, L, S, P, D, dtype, device)
            check_biased(inputs, bias, dtype, causal=True)
        hidden = make_bias((B, H, L, P), dtype, device)
        hidden[..., 1::2] = -math.inf  # every other prefix key hidden
        inputs, _ = make_inputs(B, H, Hkv, L, S, P, D, dtype, device)
        check_biased(inputs, hidden, dtype)
        hidden[0, :, 2] = -math.inf  # with S = 0, sample 0's query 2 sees no key at all
        inputs, _ = make_inputs(B, H, Hkv, L, 0, P, D, dtype, device)
        out = check_biased(inputs, hidden, dtype)
        assert torch.equal(out[0, :, 2], torch.zeros_like(out[0, :, 2]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias_shape", [(1, 4, 5, 0), (1, 1, 1, 1), ()])
def test_prefix_bias_with_empty_prefix(device, bias_shape):
    """P = 0: the bias (of size 0 or 1 on the key axis) has nothing to add; plain attention."""
    for dtype in dtypes_for(device):
        inputs, _ = make_inputs(2, 4, 2, 5, 6, 0, 16, dtype, device)
        check_biased(inputs, make_bias(bias_shape, dtype, device), dtype, causal=True)


def test_prefix_bias_gradcheck_float64():
    inputs, ids = make_inputs(2, 2, 1, 3, 4, 2, 4, torch.float64, "cpu", tasks=3)
    bias = torch.randn(1, 2, 3, 2, dtype=torch.float64)
    gate = torch.rand(2, 1, 3, dtype=torch.float64, requires_grad=True)
    for name in SEQ_BACKENDS:
        with backend(name):
            torch.autograd.gradcheck(
                lambda *t: prefix_attention(
                    *t[:5], prefix_ids=ids, causal=True, prefix_bias=bias, prefix_gate=t[5]
                ),
                (*inputs, gate),
            )


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_bias_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        for gated in (False, True):
            inputs, ids = make_inputs(2, 4, 2, 5, 6, 3, 64, dtype, device, tasks=2)
            bias = make_bias((1, 4, 5, 3), dtype, device)
            gate = torch.rand(2, 4, 5, device=device, dtype=dtype, requires_grad=True) if gated else None
            fwd_args = (*inputs, ids, None, True, 0.125, gate, bias)
            torch.library.opcheck(torch.ops.peftkern.prefix_attention_forward.default, fwd_args)
            out, lse = torch.ops.peftkern.prefix_attention_forward(*fwd_args)
            g = torch.randn_like(out)
            detached = (t.detach() for t in inputs)
            bwd_args = (g, *detached, ids, None, out.detach(), lse.detach(), True, 0.125, [True] * 5)
            bwd_args += (None if gate is None else gate.detach(), gated, bias)
            torch.library.opcheck(torch.ops.peftkern.prefix_attention_backward.default, bwd_args)


@pytest.mark.parametrize(
    "bias,exc,message",
    [
        (
            torch.zeros(2, 4, 5, 4),
            ValueError,
            r"prefix_attention: prefix_bias must be broadcastable to \[B, H, L, P\] = \[2, 4, 5, 3\]; "
            r"got \[2, 4, 5, 4\]",
        ),
        (torch.zeros(3, 1, 1, 3), ValueError, r"prefix_bias must be broadcastable to \[B, H, L, P\]"),
        (torch.zeros(1, 1, 4, 5, 3), ValueError, r"prefix_bias must be broadcastable to \[B, H, L, P\]"),
        (
            torch.zeros(1, 4, 5, 3, dtype=torch.float64),
            TypeError,
            r"prefix_attention: prefix_bias must be an additive float tensor of q's dtype Float; got Double",
        ),
        (
            torch.ones(1, 4, 5, 3, dtype=torch.bool),
            TypeError,
            r"prefix_bias must be an additive float tensor",
        ),
        (
            torch.zeros(1, 4, 5, 3, requires_grad=True),
            ValueError,
            r"prefix_attention: prefix_bias requires grad, but no gradient flows to the prefix bias",
        ),
        ([[0.0] * 3] * 5, TypeError, r"prefix_attention: prefix_bias must be a tensor or None; got list"),
    ],
)
def test_prefix_bias_bad_input(bias, exc, message):
    inputs, _ = make_inputs(2, 4, 2, 5, 6, 3, 16, torch.float32, "cpu", grad=())
    with pytest.raises(exc, match=message):
        prefix_attention(*inputs, prefix_bias=bias)


def test_prefix_bias_requiring_grad_is_accepted_without_grad():
    """Under no_grad nothing would flow anyway: a bias that requires grad is read as it is."""
    inputs, _ = make_inputs(2, 4, 2, 5, 6, 3, 16, torch.float32, "cpu", grad=())
    bias = torch.randn(1, 4, 5, 3, requires_grad=True)
    with torch.no_grad():
        out = prefix_attention(*inputs, prefix_bias=bias)
        want = ref.prefix_attention(*(t.double() for t in inputs), prefix_bias=bias.double())
    assert_close(out, want, torch.float32)


@pytest.mark.cuda
def test_prefix_bias_wrong_device():
    inputs, _ = make_inputs(2, 4, 2, 5, 6, 3, 64, torch.bfloat16, "cuda", grad=())
    with pytest.raises(ValueError, match=r"prefix_attention: prefix_bias is on cpu but q is on cuda:0"):
        prefix_attention(*inputs, prefix_bias=torch.zeros(1, 4, 5, 3, dtype=torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("shape", [CUDA_SHAPES[i] for i in (0, 1, 5, 6, 7)])  # D = 128, 64, 80, 256; S = 0
def test_cuda_prefix_bias_kernels(gated, shape):
    """Each biased kernel instance (head-dim tiles 64, 128, 256; gated or not) on shapes that are
    multiples of no tile, with poisoned memory, a [1, H, L, P] bias and a [B, H, L, P] one with
    strides (key stride 2)."""
    B, H, Hkv, L, S, P, D = shape
    for dtype in (torch.float16, torch.bfloat16):
        for bias in (
            make_bias((1, H, L, P), dtype, "cuda"),
            make_bias((B, H, L, 2 * P), dtype, "cuda")[..., ::2],
        ):
            inputs, _ = make_inputs(*shape, dtype, "cuda")
            gate = None
            if gated:
                gate = torch.sigmoid(randn(B, 1, L, dtype=torch.float64)).to("cuda", dtype).requires_grad_()
            poison_cuda_cache()
            check_biased(inputs, bias, dtype, gate, causal=True)
