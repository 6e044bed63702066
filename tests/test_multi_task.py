"""Many named adapters on one model, any method each, and a batch whose samples each go through
their own (peftkern.tasks): each sample must compute, forward and every gradient, as it does
through a model that holds only its adapter."""

import pytest
import torch

import peftkern
from peftkern.integrations.inject import injection_state
from tests.tiny_models import bert as tiny_bert
from tests.tiny_models import bert_head
from tests.tiny_models import llama as tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

CONFIGS = {
    "lora": lambda: peftkern.LoRAConfig(r=4, lora_alpha=8),
    "lora_r2": lambda: peftkern.LoRAConfig(r=2, target_modules=["query", "key", "value"]),
    "houlsby": lambda: peftkern.AdapterConfig(bottleneck=5, scale=0.5),
    "pfeiffer": lambda: peftkern.AdapterConfig(bottleneck=3, placement="pfeiffer"),
    "parallel": lambda: peftkern.AdapterConfig(bottleneck=4, placement="parallel", scale=2.0),
    "mask": lambda: peftkern.MaskConfig(),
    "mask2": lambda: peftkern.MaskConfig(target_modules=["query", "dense"]),
    "bitfit": lambda: peftkern.BitFitConfig(),
    "prefix": lambda: peftkern.PrefixConfig(num_virtual_tokens=3),
    "prefix5": lambda: peftkern.PrefixConfig(num_virtual_tokens=5),
    "prompt": lambda: peftkern.PromptConfig(num_virtual_tokens=4),
    "prompt2": lambda: peftkern.PromptConfig(num_virtual_tokens=2),
}


def randomize(model, names, seed=3):
    """Every parameter of the named adapters, random (mask scores around their threshold, so masks
    drop some weights)."""
    g = torch.Generator().manual_seed(seed)
    state = injection_state(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            for saved, p in sorted(state.adapters[n].params.items()):
                t = params[p]
                if saved.endswith(".scores"):
                    t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * 0.02)
                else:
                    t.add_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * 0.2)


def saved_tensors(model, name):
    state = injection_state(model)
    params = dict(model.named_parameters())
    return {s: params[p].detach().clone() for s, p in state.adapters[name].params.items()}


def alone(make_base, name, config, tensors, dtype):
    """A fresh base holding only adapter `name`, with the given parameters."""
    model = make_base().to(dtype)
    if name is None:
        return model
    peftkern.inject(model, config, name=name)
    state = injection_state(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for s, t in tensors.items():
            params[state.adapters[name].params[s]].copy_(t)
    return model


def hidden(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def check_mixed(make_base, methods, tasks, dtype=torch.float64, tol=1e-10, train=False, L=7):
    base = make_base().to(dtype)
    configs = {n: CONFIGS[n]() for n in methods}
    for n, c in configs.items():
        peftkern.inject(base, c, name=n)
    randomize(base, methods)
    tensors = {n: saved_tensors(base, n) for n in methods}
    base.train(train)
    B = len(tasks)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 97, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :2] = 0  # one left-padded sample
    out = hidden(base(input_ids=ids, attention_mask=mask, tasks=tasks))
    weights = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    (out * weights).sum().backward()
    state = injection_state(base)
    params = dict(base.named_parameters())
    for name in dict.fromkeys(tasks):
        rows = [i for i, t in enumerate(tasks) if t == name]
        ref_model = alone(make_base, name, configs.get(name), tensors.get(name, {}), dtype).train(train)
        ref = hidden(ref_model(input_ids=ids[rows], attention_mask=mask[rows]))
        err = ((out[rows] - ref).norm() / ref.norm()).item()
        assert err <= tol, f"{name}: output relative error {err:.3g}"
        if name is None:
            continue
        (ref * weights[rows]).sum().backward()
        ref_params = dict(ref_model.named_parameters())
        ref_names = injection_state(ref_model).adapters[name].params
        for s, p in state.adapters[name].params.items():
            got, want = params[p].grad, ref_params[ref_names[s]].grad
            if want is None:  # unused by the output (the pooler's bias): none in the mixed model either
                assert got is None or not got.any(), f"{name}: {s} got a gradient it should not"
                continue
            assert got is not None, f"{name}: no gradient for {s}"
            gerr = ((got - want).norm() / want.norm().clamp_min(1e-6)).item()  # key biases: ~0 grads
            assert gerr <= tol, f"{name}: gradient of {s}: relative error {gerr:.3g}"
    return base


@pytest.mark.parametrize(
    "methods, tasks",
    [
        (["lora", "lora_r2"], ["lora", "lora_r2", None, "lora"]),
        (["houlsby", "pfeiffer"], ["pfeiffer", None, "houlsby", "houlsby"]),
        (["parallel", "houlsby"], ["parallel", "houlsby", None]),
        (["bitfit", "lora"], ["bitfit", "lora", None]),
        (["prefix", "prefix5"], ["prefix5", "prefix", None, "prefix"]),
        (["prompt", "prompt2"], ["prompt", None, "prompt2"]),
        (
            ["lora", "houlsby", "prefix", "prompt", "bitfit"],
            ["lora", "houlsby", "prefix", None, "prompt", "bitfit"],
        ),
    ],
)
def test_mixed_batch_equals_each_sample_alone_float64(methods, tasks):
    check_mixed(tiny_bert, methods, tasks, train=True)


def test_mixed_masks_in_training_and_inference():
    # training: one STE product per mask task; inference: masked_linear_multi over packed bits
    check_mixed(tiny_bert, ["mask", "mask2", "lora"], ["mask", "mask2", "lora", None], train=True)
    base = tiny_bert().double()
    for n in ("mask", "mask2"):
        peftkern.inject(base, CONFIGS[n](), name=n)
    randomize(base, ["mask", "mask2"])
    ids = torch.randint(0, 97, (3, 6))
    with torch.no_grad():
        out = base(input_ids=ids, tasks=["mask2", None, "mask"]).last_hidden_state
        for i, n in enumerate(["mask2", None, "mask"]):
            peftkern.set_active(base, n)
            ref = base(input_ids=ids[i : i + 1]).last_hidden_state
            assert ((out[i : i + 1] - ref).norm() / ref.norm()).item() < 1e-10


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_mixed_families_float32(make):
    methods = ["lora", "houlsby", "prefix", "mask"] if make is tiny_bert else ["lora", "prefix", "prompt"]
    if make is tiny_llama:
        CONFIGS_L = {"houlsby": None}  # noqa: F841  (llama presets cover lora, prefix, prompt here)
    tasks = [methods[i % len(methods)] for i in range(5)] + [None]
    check_mixed(make, methods, tasks, dtype=torch.float32, tol=1e-5, train=False)


def test_a_task_head_per_adapter():
    make = lambda: bert_head("BertForSequenceClassification", num_labels=3)  # noqa: E731
    CONFIGS["lora_head"] = lambda: peftkern.LoRAConfig(r=4, modules_to_save=["classifier"])
    CONFIGS["houlsby_head"] = lambda: peftkern.AdapterConfig(bottleneck=4, modules_to_save=["classifier"])
    try:
        check_mixed(make, ["lora_head", "houlsby_head"], ["houlsby_head", "lora_head", None], train=True)
    finally:
        del CONFIGS["lora_head"], CONFIGS["houlsby_head"]


def test_generate_gives_each_sample_its_own_tokens():
    model = tiny_llama()
    for n in ("lora", "prefix", "prompt"):
        peftkern.inject(model, CONFIGS[n](), name=n)
    randomize(model, ["lora", "prefix", "prompt"])
    ids = torch.randint(3, 97, (4, 5), generator=torch.Generator().manual_seed(1))
    tasks = ["prompt", "lora", None, "prefix"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad(), peftkern.tasks(tasks):
        mixed = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    for i, name in enumerate(tasks):
        peftkern.set_active(model, name)
        with torch.no_grad():
            alone = model.generate(
                input_ids=ids[i : i + 1], attention_mask=torch.ones_like(ids[i : i + 1]), **kw
            )
        n = alone.shape[1]  # alone may stop early at the end-of-sequence token; the batch pads after it
        assert torch.equal(mixed[i, :n], alone[0]) and not mixed[i, n:].any(), (name, mixed[i], alone[0])
    assert len({tuple(t.tolist()) for t in mixed[:, 5:]}) > 1  # the adapters change the tokens


def _op_counts(model, ids, tasks):
    with torch.profiler.profile() as prof, torch.no_grad():
        model(input_ids=ids, tasks=tasks)
    counts = {}
    for e in prof.events():
        if e.name.startswith("peftkern::"):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def test_a_mixed_batch_runs_the_multi_ops_once_per_site_whatever_the_task_count():
    model = tiny_bert()
    names = [f"lora{i}" for i in range(4)] + [f"adapter{i}" for i in range(4)]
    for n in names:
        peftkern.inject(
            model, peftkern.LoRAConfig(r=2) if n.startswith("lora") else CONFIGS["houlsby"](), name=n
        )
    ids = torch.randint(0, 97, (8, 6))
    two = _op_counts(model, ids, ["lora0", "adapter0"] * 4)
    eight = _op_counts(model, ids, names)
    # BERT tiny: 2 layers x (query, value) LoRA sites, 2 x 2 houlsby sites: one op call each
    assert (
        two.get("peftkern::lora_linear_multi_forward")
        == eight.get("peftkern::lora_linear_multi_forward")
        == 4
    )
    assert two.get("peftkern::adapter_multi_forward") == eight.get("peftkern::adapter_multi_forward") == 4
    assert "peftkern::lora_linear_forward" not in eight and "peftkern::adapter_forward" not in eight


def test_save_and_load_by_name(tmp_path):
    model = tiny_bert()
    for n in ("lora", "houlsby", "mask"):
        peftkern.inject(model, CONFIGS[n](), name=n)
    randomize(model, ["lora", "houlsby", "mask"])
    ids = torch.randint(0, 97, (3, 6))
    tasks = ["mask", "lora", "houlsby"]
    with torch.no_grad():
        want = model(input_ids=ids, tasks=tasks).last_hidden_state
    peftkern.save_pretrained(model, tmp_path / "all")  # several: one directory each
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["houlsby", "lora", "mask"]
    peftkern.save_pretrained(model, tmp_path / "one", names="lora")  # one: the directory itself
    assert (tmp_path / "one" / "peftkern_config.json").is_file()
    loaded = peftkern.from_pretrained(tiny_bert(), tmp_path / "all")
    assert list(peftkern.adapters(loaded)) == ["houlsby", "lora", "mask"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, tasks=tasks).last_hidden_state, want)
    other = peftkern.inject(tiny_bert(), CONFIGS["houlsby"](), name="houlsby")
    peftkern.load_adapter(other, tmp_path / "one", name="renamed")  # any saved adapter, under any name
    with torch.no_grad():
        got = other(input_ids=ids[1:2], tasks=["renamed"]).last_hidden_state
    assert ((got - want[1:2]).norm() / want[1:2].norm()).item() < 1e-6
    peftkern.delete_adapter(loaded, "mask")
    assert list(peftkern.adapters(loaded)) == ["houlsby", "lora"]
    assert not any(".scores." in n for n, _ in loaded.named_parameters())


def test_bad_names_and_combinations_raise_before_anything_runs():
    model = tiny_bert()
    for n in ("lora", "mask", "mask2", "prefix", "prompt"):
        peftkern.inject(model, CONFIGS[n](), name=n)
    peftkern.inject(model, peftkern.AdapterConfig(bottleneck=4, num_experts=2), name="adamix")
    ids = torch.randint(0, 97, (2, 5))
    calls = []
    handle = model.embeddings.register_forward_hook(lambda *a: calls.append(1))
    cases = [
        (["lora", "nope"], r"no adapter named 'nope'; the model holds \['adamix', 'lora', 'mask', 'mask2'"),
        ([["mask", "mask2"], None], r"adapters \['mask', 'mask2'\] cannot apply together to one sample"),
        ([["prefix", "prompt"], None], r"adapters \['prefix', 'prompt'\] cannot apply together"),
        ([["lora", "mask"], "lora"], r"adapters \['lora', 'mask'\] cannot apply together .* batch is mixed"),
        (["adamix", None], r"adapter 'adamix' cannot serve a mixed batch .*AdaMix"),
        (["lora"], r"1 entries for a batch of 2 samples"),
    ]
    for tasks, message in cases:
        with pytest.raises(ValueError, match=message):
            model(input_ids=ids, tasks=tasks)
    assert not calls  # nothing ran
    handle.remove()
    with pytest.raises(ValueError, match="masks .* cannot apply together|cannot apply together"):
        peftkern.set_active(model, ["mask", "mask2"])
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        peftkern.inject(model, CONFIGS["lora"](), name="")
    with pytest.raises(TypeError, match="peftkern.tasks: expects a non-empty list"):
        with peftkern.tasks("lora"):
            pass


def test_merge_merges_one_named_adapter_and_refuses_ambiguity():
    model = tiny_bert()
    for n in ("lora", "lora_r2"):
        peftkern.inject(model, CONFIGS[n](), name=n)
    randomize(model, ["lora", "lora_r2"])
    ids = torch.randint(0, 97, (2, 5))
    peftkern.set_active(model, ["lora", "lora_r2"])
    with pytest.raises(ValueError, match="2 adapters are active"):
        peftkern.merge(model)
    with pytest.raises(ValueError, match="active together"):
        peftkern.merge(model, "lora")
    peftkern.set_active(model, "lora")
    with pytest.raises(ValueError, match="a mixed batch is set"), peftkern.tasks(["lora", None]):
        peftkern.merge(model, "lora")
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
        peftkern.merge(model, "lora", verbose=False)
        after = model(input_ids=ids).last_hidden_state
    assert ((after - before).norm() / before.norm()).item() < 1e-6
    with pytest.raises(ValueError, match=r"merged into its base weights, so 'lora_r2' cannot apply"):
        peftkern.set_active(model, "lora_r2")


def test_mixed_training_under_gradient_checkpointing():
    """The recompute in the backward runs outside the routed call: it must route as the forward did."""
    methods, tasks = ["lora", "houlsby", "bitfit"], ["lora", None, "houlsby", "bitfit"]
    plain = check_mixed(tiny_bert, methods, tasks, train=True)
    grads = {n: t.grad.clone() for n, t in plain.named_parameters() if t.grad is not None}

    def checkpointed():
        m = tiny_bert()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return m

    model = check_mixed(checkpointed, methods, tasks, train=True)
    for n, t in model.named_parameters():
        if n in grads:
            assert torch.allclose(t.grad, grads[n], rtol=1e-9, atol=1e-12), n


def test_mam_a_prefix_and_a_parallel_adapter_together_per_sample():
    """He et al.'s MAM adapter as two named adapters applied together (a prefix on attention, a
    parallel adapter on the FFN): a sample naming both computes as a model with both active."""
    methods = ["prefix", "parallel", "lora"]
    model = tiny_bert().double()
    for n in methods:
        peftkern.inject(model, CONFIGS[n](), name=n)
    randomize(model, methods)
    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(4))
    tasks = [["prefix", "parallel"], "lora", ["prefix", "parallel"]]
    out = model(input_ids=ids, tasks=tasks).last_hidden_state
    weights = torch.randn(out.shape, dtype=torch.float64)
    (out * weights).sum().backward()
    mixed_grads = {n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None}
    model.zero_grad()
    peftkern.set_active(model, ["prefix", "parallel"])
    rows = [0, 2]
    ref = model(input_ids=ids[rows]).last_hidden_state
    assert ((out[rows] - ref).norm() / ref.norm()).item() < 1e-10
    (ref * weights[rows]).sum().backward()
    for n, t in model.named_parameters():
        if ".prefix." in n or ".parallel." in n:
            assert t.grad is not None and torch.allclose(mixed_grads[n], t.grad, rtol=1e-9, atol=1e-12), n
    base_only = tiny_bert().double()
    peftkern.set_active(model, None)  # the active names off: the base model
    with torch.no_grad():
        assert torch.allclose(
            model(input_ids=ids).last_hidden_state, base_only(input_ids=ids).last_hidden_state
        )


# -- regressions found by review ------------------------------------------------------------------


def _grads(model):
    return {n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None}


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_two_routed_forwards_then_one_backward(reentrant):
    """Each recompute must route as its own forward did, also when another routed forward ran since."""
    methods = ["lora", "houlsby"]

    def build(checkpointed):
        model = tiny_bert().double()
        for n in methods:
            peftkern.inject(model, CONFIGS[n](), name=n)
        randomize(model, methods)
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        if reentrant:  # the reentrant checkpoint needs an input that requires a gradient
            model.embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        return model

    ids = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(8))
    results = []
    for checkpointed in (False, True):
        model = build(checkpointed)
        a = model(input_ids=ids, tasks=["lora", "houlsby", None]).last_hidden_state
        b = model(input_ids=ids, tasks=["houlsby", None, "lora"]).last_hidden_state
        (a.square().sum() + (b * 0.5).sum()).backward()
        results.append(_grads(model))
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys() and plain
    for n in plain:
        assert torch.allclose(checkpointed[n], plain[n], rtol=1e-9, atol=1e-12), n


def test_a_hand_written_checkpoint_after_two_routes_raises_rather_than_guess():
    model = tiny_bert().double()
    peftkern.inject(model, CONFIGS["lora"](), name="lora")
    randomize(model, ["lora"])
    model.train()
    layer = model.encoder.layer[0]
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    outs = []
    for tasks in (["lora", None], [None, "lora"]):
        with peftkern.tasks(tasks):
            outs.append(torch.utils.checkpoint.checkpoint(lambda t: layer(t)[0], x, use_reentrant=False))
    with pytest.raises(RuntimeError, match="after forwards under different peftkern.tasks"):
        sum(o.sum() for o in outs).backward()


def test_deleting_the_last_prefix_leaves_a_working_model():
    model = tiny_llama()
    ids = torch.randint(3, 97, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    peftkern.inject(model, CONFIGS["prefix"](), name="prefix")
    peftkern.delete_adapter(model, "prefix")
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)
    peftkern.inject(model, CONFIGS["prefix5"](), name="again")  # and a prefix can come back
    randomize(model, ["again"])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before, rtol=1e-3, atol=1e-3)


def test_deleting_one_method_keeps_another_on_the_same_module_switchable():
    """LoRA and BitFit on one linear: deleting the LoRA must leave BitFit following set_active."""
    model = tiny_bert().double()
    peftkern.inject(model, peftkern.LoRAConfig(r=2, target_modules=["value"]), name="lora")
    peftkern.inject(model, peftkern.BitFitConfig(bias_names=["value.bias"]), name="bitfit")
    randomize(model, ["bitfit"])
    peftkern.delete_adapter(model, "lora")
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        peftkern.set_active(model, "bitfit")
        on = model(input_ids=ids).last_hidden_state
        peftkern.set_active(model, None)
        off = model(input_ids=ids).last_hidden_state
    assert (on - off).abs().max() > 1e-3  # BitFit applies when active ...
    fresh = tiny_bert().double()
    with torch.no_grad():
        assert torch.allclose(off, fresh(input_ids=ids).last_hidden_state, atol=1e-12)  # ... and not when not


def test_a_head_copy_holds_no_other_adapters_state():
    make = lambda: bert_head("BertForSequenceClassification", num_labels=3)  # noqa: E731
    model = make()
    peftkern.inject(model, peftkern.BitFitConfig(), name="bitfit")
    peftkern.inject(model, peftkern.LoRAConfig(r=2, modules_to_save=["classifier"]), name="lora")
    copy = model.classifier.peftkern_copies["lora"]
    assert type(copy) is torch.nn.Linear and not copy._forward_hooks
    assert sorted(n for n, _ in copy.named_parameters()) == ["bias", "weight"]
    state = injection_state(model)
    assert all(".peftkern_copies.lora.peftkern" not in p for p in state.adapters["lora"].params.values())
    ids = torch.randint(0, 97, (3, 6))
    randomize(model, ["bitfit", "lora"])
    out = model(input_ids=ids, tasks=["lora", "bitfit", None]).logits
    for i, n in enumerate(["lora", "bitfit", None]):
        peftkern.set_active(model, n)
        with torch.no_grad():
            ref = model(input_ids=ids[i : i + 1]).logits
        assert torch.allclose(out[i : i + 1], ref, rtol=1e-5, atol=1e-6), n


def test_frozen_masks_with_an_input_that_needs_a_gradient():
    """Mixed masks whose scores are frozen, under an input that requires a gradient: the gradient
    flows to the input (the forward-only multi op must not be picked)."""
    model = tiny_bert().double()
    for n in ("mask", "mask2"):
        peftkern.inject(model, CONFIGS[n](), name=n)
    randomize(model, ["mask", "mask2"])
    model.requires_grad_(False)
    embeds = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    tasks = ["mask2", None, "mask"]
    out = model(inputs_embeds=embeds, tasks=tasks).last_hidden_state
    out.square().sum().backward()
    for i, n in enumerate(tasks):
        peftkern.set_active(model, n)
        e = embeds[i : i + 1].detach().requires_grad_(True)
        model(inputs_embeds=e).last_hidden_state.square().sum().backward()
        assert torch.allclose(embeds.grad[i : i + 1], e.grad, rtol=1e-9, atol=1e-12), n


def test_a_merged_adapter_cannot_be_deleted():
    model = tiny_bert()
    peftkern.inject(model, CONFIGS["lora"](), name="lora")
    peftkern.merge(model, "lora", verbose=False)
    with pytest.raises(ValueError, match="'lora' is merged into the base model"):
        peftkern.delete_adapter(model, "lora")
    with pytest.raises(ValueError, match="merged into its base"):
        peftkern.inject(model, CONFIGS["houlsby"](), name="houlsby")


def test_packed_masks_follow_a_replaced_scores_tensor():
    model = tiny_bert()
    for n in ("mask", "mask2"):
        peftkern.inject(model, CONFIGS[n](), name=n)
    randomize(model, ["mask", "mask2"])
    ids = torch.randint(0, 97, (2, 5))
    tasks = ["mask", "mask2"]
    with torch.no_grad():
        model(input_ids=ids, tasks=tasks)  # packs the bits
        q = model.encoder.layer[0].attention.self.query
        q.scores["mask"].data = torch.rand_like(q.scores["mask"]) * 0.02
        out = model(input_ids=ids, tasks=tasks).last_hidden_state
        peftkern.set_active(model, "mask")
        ref = model(input_ids=ids[:1]).last_hidden_state
    assert torch.allclose(out[:1], ref, rtol=1e-5, atol=1e-6)


def test_tasks_entries_must_match_the_batch_outside_generate():
    model = tiny_bert()
    peftkern.inject(model, CONFIGS["lora"](), name="lora")
    ids = torch.randint(0, 97, (4, 5))
    with (
        pytest.raises(ValueError, match="2 entries for a batch of 4 samples"),
        peftkern.tasks(["lora", None]),
    ):
        model(input_ids=ids)
