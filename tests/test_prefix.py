"""peftkern.ops.prefix_attention and the prefix / prompt modules against torch.cat + SDPA."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftkern.nn import PrefixKV, PrefixSelfAttention, SoftPrompt
from peftkern.ops import prefix_attention

from . import reference as ref
from .conftest import DEVICES, assert_close, check_against_reference, poison_cuda_cache, randn
from .test_adapter import dtypes_for

NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def make_inputs(B, H, Hkv, L, S, P, D, dtype, device, tasks=0, grad=NAMES):
    t = dict(q=randn(B, H, L, D, dtype=dtype, device=device), k=randn(B, Hkv, S, D, dtype=dtype, device=device),
             v=randn(B, Hkv, S, D, dtype=dtype, device=device))
    lead = (tasks,) if tasks else ()
    t["prefix_k"] = randn(*lead, Hkv, P, D, dtype=dtype, device=device)
    t["prefix_v"] = randn(*lead, Hkv, P, D, dtype=dtype, device=device)
    for n in grad:
        t[n].requires_grad_()
    ids = torch.randint(0, tasks, (B,), device=device) if tasks else None
    return tuple(t[n] for n in NAMES), ids


def check_prefix(inputs, ids, dtype, causal=False, scale=None):
    fn = lambda *ts: prefix_attention(*ts, prefix_ids=ids, causal=causal, scale=scale)  # noqa: E731
    ref_fn = lambda *ts: ref.prefix_attention(*ts, prefix_ids=ids, causal=causal, scale=scale)  # noqa: E731
    return check_against_reference(fn, ref_fn, inputs, NAMES, dtype)


SHAPES = [  # B, H, Hkv, L, S, P, D
    (2, 4, 4, 5, 7, 3, 16),
    (1, 8, 2, 33, 33, 0, 32),
    (3, 4, 1, 17, 40, 65, 64),
    (2, 2, 2, 70, 130, 16, 128),
    (1, 2, 1, 1, 50, 8, 64),  # decode: one query over a cache
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_gradients(device, shape, causal):
    for dtype in dtypes_for(device):
        inputs, ids = make_inputs(*shape, dtype, device)
        check_prefix(inputs, ids, dtype, causal=causal)


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


@pytest.mark.parametrize("device", DEVICES)
def test_queries_that_see_nothing_output_zero(device):
    """causal, P = 0, L > S: the first L - S queries see no key at all; they output 0 (SDPA: NaN)."""
    for dtype in dtypes_for(device):
        (q, k, v, pk, pv), _ = make_inputs(1, 2, 2, 10, 4, 0, 64, dtype, device, grad=())
        out = prefix_attention(q, k, v, pk, pv, causal=True)
        assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
        expected = ref.prefix_attention(*(ref.f64(t) for t in (q, k, v, pk, pv)), causal=True)
        assert_close(out[:, :, 6:], expected[:, :, 6:], dtype)


def test_gradcheck_float64():
    for causal in (False, True):
        inputs, ids = make_inputs(2, 2, 1, 3, 4, 2, 4, torch.float64, "cpu", tasks=3)
        fn = lambda *ts: prefix_attention(*ts, prefix_ids=ids, causal=causal)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        for tasks in (0, 3):
            inputs, ids = make_inputs(2, 4, 2, 5, 6, 3, 64, dtype, device, tasks=tasks)
            torch.library.opcheck(torch.ops.peftkern.prefix_attention_forward.default, (*inputs, ids, True, 0.125))
            out, lse = torch.ops.peftkern.prefix_attention_forward(*inputs, ids, True, 0.125)
            g = torch.randn_like(out)
            args = (g, *(t.detach() for t in inputs), ids, out.detach(), lse.detach(), True, 0.125,
                    [True, True, False, True, True])
            torch.library.opcheck(torch.ops.peftkern.prefix_attention_backward.default, args)


# ---------------------------------------------------------------- bad input

def call(**kw):
    (q, k, v, pk, pv), _ = make_inputs(2, 4, 2, 5, 6, 3, 16, torch.float32, "cpu", grad=())
    t = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    opts = {}
    for key, val in kw.items():
        (opts if key in ("prefix_ids", "causal", "scale") else t)[key] = val
    return prefix_attention(*(t[n] for n in NAMES), **opts)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(k=torch.randn(2, 2, 6, 8), v=torch.randn(2, 2, 6, 8)), ValueError,
     r"k must have shape \[B, Hkv, S, D\] with head dim D = 16 \(q's\); got \[2, 2, 6, 8\]"),
    (dict(k=torch.randn(2, 3, 6, 16), v=torch.randn(2, 3, 6, 16)), ValueError,
     r"q's heads H = 4 must be a multiple of k's heads Hkv = 3"),
    (dict(prefix_k=torch.randn(4, 3, 16), prefix_v=torch.randn(4, 3, 16)), ValueError,
     r"prefix_k must have shape \[Hkv, P, D\] = \[2, P, 16\] or \[T, 2, P, 16\]; got \[4, 3, 16\]"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)), ValueError,
     r"prefix_k holds 3 task prefixes \[T, Hkv, P, D\]; prefix_ids \[B\] must say which one each sample uses"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16), prefix_ids=torch.tensor([0, 3])),
     ValueError, r"prefix_ids must be in \[0, T\) = \[0, 3\); got values in \[0, 3\]"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16), prefix_ids=torch.tensor([-1, 0])),
     ValueError, r"prefix_ids must be in \[0, T\) = \[0, 3\); got values in \[-1, 0\]"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16), prefix_ids=torch.tensor([0.0, 1.0])),
     TypeError, r"prefix_ids must be an int32 or int64 tensor; got Float"),
    (dict(prefix_ids=torch.tensor([0, 0])), ValueError, r"prefix_ids given but prefix_k is one shared prefix"),
    (dict(k=torch.randn(3, 2, 6, 16), v=torch.randn(3, 2, 6, 16)), ValueError, r"k has batch 3 but q has batch 2"),
    (dict(v=torch.randn(2, 2, 7, 16)), ValueError, r"v must have k's shape \[2, 2, 6, 16\]; got \[2, 2, 7, 16\]"),
    (dict(prefix_v=torch.randn(2, 4, 16)), ValueError, r"prefix_v must have prefix_k's shape \[2, 3, 16\]"),
    (dict(q=torch.randn(2, 4, 16)), ValueError, r"q must have shape \[B, H, L, D\]"),
    (dict(k=torch.randn(2, 2, 6, 16, dtype=torch.float64)), TypeError, r"k has dtype Double but q has dtype Float"),
])
def test_bad_input(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        call(**kwargs)


@pytest.mark.cuda
def test_bad_input_wrong_device():
    (q, k, v, pk, pv), _ = make_inputs(2, 4, 2, 5, 6, 3, 64, torch.bfloat16, "cuda", grad=())
    with pytest.raises(ValueError, match=r"prefix_k is on cpu but q is on cuda:0"):
        prefix_attention(q, k, v, pk.cpu(), pv)


# ---------------------------------------------------------------- CUDA kernels

@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 8, 2, 300, 300, 64, 128), (1, 4, 4, 129, 257, 100, 64),
                                   (3, 4, 2, 64, 64, 64, 64), (2, 2, 1, 1, 1000, 16, 128), (1, 2, 2, 200, 70, 0, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_shapes(shape, causal):
    for dtype in (torch.float16, torch.bfloat16):
        inputs, _ = make_inputs(*shape, dtype, "cuda")
        if causal and shape[5] == 0 and shape[3] > shape[4]:
            continue  # rows that see nothing: covered by test_queries_that_see_nothing_output_zero
        poison_cuda_cache()
        check_prefix(inputs, None, dtype, causal=causal)


@pytest.mark.cuda
def test_cuda_strided_inputs_from_projections():
    """q/k/v as transposed views of [B, L, H*D] projections (D contiguous), as a model makes them."""
    B, L, H, Hkv, D = 2, 100, 4, 2, 64
    x = randn(B, L, H * D, dtype=torch.bfloat16, device="cuda")
    q = x.view(B, L, H, D).transpose(1, 2).detach().requires_grad_()
    kv = randn(B, L, 2 * Hkv * D, dtype=torch.bfloat16, device="cuda")
    k = kv[..., :Hkv * D].view(B, L, Hkv, D).transpose(1, 2).detach().requires_grad_()
    v = kv[..., Hkv * D:].view(B, L, Hkv, D).transpose(1, 2).detach().requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    pk = randn(Hkv, 16, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    pv = randn(Hkv, 16, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    check_prefix((q, k, v, pk, pv), None, torch.bfloat16, causal=True)


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
    expected = F.linear(att.transpose(1, 2).reshape(B, L, 64), layer.out_proj.weight.double(),
                        layer.out_proj.bias.double())
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
