"""peftkern.integrations.peft against Hugging Face peft itself, on small models built from configs
with random weights (nothing is downloaded)."""

import collections
import copy
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peftkern.integrations.peft import call_counts, coverage, fuse, unfuse  # noqa: E402

from . import tiny_models  # noqa: E402
from .conftest import DEVICES, assert_close  # noqa: E402


def tiny_llama(device, dtype=torch.float32):
    return tiny_models.llama(hidden_size=64, intermediate_size=96, vocab_size=101).to(
        device=device, dtype=dtype
    )


def tiny_gpt2(device, dtype=torch.float32):
    """GPT-2: transformers Conv1D layers, weights stored [in, out] (peft's fan_in_fan_out)."""
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=101, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same base weights on every call (a reload must find them)
        return transformers.GPT2LMHeadModel(config).eval().to(device=device, dtype=dtype)


TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
BASES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def make_visible(model):
    """peft starts lora_B at zero and DoRA's magnitude at the row norms: move both off."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            if "lora_magnitude" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))


def lora_model(device, dtype=torch.float32, arch="llama", **config):
    cfg = dict(r=8, lora_alpha=16, target_modules=TARGETS[arch], lora_dropout=0.0)
    cfg.update(config)
    if arch == "gpt2":
        cfg["fan_in_fan_out"] = True
    model = peft.get_peft_model(BASES[arch](device, dtype), peft.LoraConfig(**cfg))
    make_visible(model)
    return model


def add_adapter(model, name, arch="llama", **config):
    cfg = dict(r=4, lora_alpha=12, target_modules=TARGETS[arch][:2], lora_dropout=0.0)
    cfg.update(config)
    if arch == "gpt2":
        cfg["fan_in_fan_out"] = True
    model.add_adapter(name, peft.LoraConfig(**cfg))
    make_visible(model)


def run(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_matches_peft(device):
    model = lora_model(device)
    ids = torch.randint(0, 101, (2, 9), device=device)
    logits_peft, grads_peft = run(model, ids)

    report = fuse(model)
    assert len(report.fused) == 2 * 3 and not report.skipped
    assert all(name.endswith(("q_proj", "v_proj", "down_proj")) for name in report.fused)
    logits_fused, grads_fused = run(model, ids)
    assert_close(logits_fused, logits_peft.double(), torch.float32, "logits")
    assert set(grads_fused) == set(grads_peft) and all("lora_" in n for n in grads_fused)
    for name in grads_peft:
        assert_close(grads_fused[name], grads_peft[name].double(), torch.float32, f"grad {name}")

    assert len(unfuse(model)) == 6
    logits_back, _ = run(model, ids)
    assert torch.equal(logits_back, logits_peft)


def test_fused_forward_really_calls_peftkern(monkeypatch):
    import peftkern.integrations.peft as integ

    calls = []
    real = integ.lora_linear
    monkeypatch.setattr(integ, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = lora_model("cpu")
    fuse(model)
    model(input_ids=torch.randint(0, 101, (1, 5)))
    assert len(calls) == 6


def test_dropout_in_training_and_eval():
    model = lora_model("cpu", lora_dropout=0.2)
    ids = torch.randint(0, 101, (2, 7))
    model.eval()
    ref_eval = model(input_ids=ids).logits.detach()
    fuse(model)
    assert_close(model(input_ids=ids).logits, ref_eval.double(), torch.float32, "eval logits")
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    torch.manual_seed(2)
    c = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c)  # dropout active, following torch.manual_seed
    a.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_merge_disable_and_save_pretrained(tmp_path):
    model = lora_model("cpu")
    ids = torch.randint(0, 101, (1, 6))
    expected = model(input_ids=ids).logits.detach()
    fuse(model)
    model.save_pretrained(tmp_path)
    with model.disable_adapter():  # peft's own path: the base model alone
        base = model(input_ids=ids).logits.detach()
    assert not torch.allclose(base, expected)
    model.merge_adapter()  # merged: fused forward defers to peft's base-layer path
    assert_close(model(input_ids=ids).logits, expected.double(), torch.float32, "merged")
    model.unmerge_adapter()

    loaded = peft.PeftModel.from_pretrained(tiny_llama("cpu"), tmp_path)
    fuse(loaded)
    assert_close(loaded(input_ids=ids).logits, expected.double(), torch.float32, "reloaded")


@pytest.mark.cuda
def test_bf16_model_with_fp32_adapters_on_cuda():
    model = lora_model("cuda", dtype=torch.bfloat16)
    for name, p in model.named_parameters():  # peft's autocast_adapter_dtype keeps adapters in fp32
        if "lora_" in name:
            p.data = p.data.float()
    ids = torch.randint(0, 101, (2, 33), device="cuda")
    expected = model(input_ids=ids).logits.detach()
    fuse(model)
    assert_close(model(input_ids=ids).logits, expected.double(), torch.bfloat16, "bf16 logits")


def test_readme_example_from_a_fresh_interpreter():
    """`import peftkern; peftkern.integrations.peft.fuse(model)` (the README's line) in a new process:
    the integrations are reachable from the package, and importing peftkern pulls in neither peft nor
    transformers."""
    code = """
import sys
import peftkern
assert "peft" not in sys.modules and "transformers" not in sys.modules, "import peftkern imported HF"
import peft, transformers
cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=2, vocab_size=50)
lora = peft.LoraConfig(r=4, target_modules=["q_proj"])
model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lora)
report = peftkern.integrations.peft.fuse(model)
assert len(report.fused) == 1, report
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ---------------------------------------------------------------- the cases peft users hit

# case -> (peft LoraConfig options, second adapter active with it, the call path every layer takes)
FEATURES = {
    "lora": ({}, False, "fused: LoRA"),
    "lora_B bias": ({"lora_bias": True}, False, "fused: LoRA"),
    "DoRA": ({"use_dora": True}, False, "fused: DoRA"),
    "two adapters": ({}, True, None),  # layers holding both: several adapters; the others: LoRA
}


def feature_model(arch, feature, device="cpu", dtype=torch.float32):
    config, two, _ = FEATURES[feature]
    torch.manual_seed(0)
    model = lora_model(device, dtype, arch=arch, **config)
    if two:
        add_adapter(model, "second", arch=arch)
        model.base_model.set_adapter(["default", "second"])
    return model


def layer_calls(model, ids):
    """The number of peft lora.Linear forwards one model call makes."""
    return sum(1 for m in model.modules() if isinstance(m, peft.tuners.lora.Linear)) * (1 if ids.dim() else 0)


def check_fused_path(model, expected, before):
    """Every lora.Linear forward since `before` (call_counts) took a fused path (`expected`, or
    any fused path when None), none went to peft."""
    now = call_counts(model)
    new = {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}
    assert new and all(k.startswith("fused") for k in new), new
    if expected is not None:
        assert set(new) == {expected}, new


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_feature_matches_peft(arch, feature, train):
    """Logits and every gradient equal peft's own, in training (dropout 0) and in eval, each layer
    through its fused path."""
    model = feature_model(arch, feature).train(train)
    ids = torch.randint(0, 101, (2, 9))
    logits_peft, grads_peft = run(model, ids)

    report = fuse(model)
    assert not report.skipped and len(report.fused) == layer_calls(model, ids)
    before = call_counts(model)
    logits_fused, grads_fused = run(model, ids)
    check_fused_path(model, FEATURES[feature][2], before)
    assert_close(logits_fused, logits_peft.double(), torch.float32, "logits")
    assert set(grads_fused) == set(grads_peft)
    if feature == "DoRA":
        assert any("lora_magnitude" in n for n in grads_peft)
    if feature == "lora_B bias":
        assert any("lora_B" in n and n.endswith("bias") for n in grads_peft)
    for name in grads_peft:
        assert_close(grads_fused[name], grads_peft[name].double(), torch.float32, f"grad {name}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_feature_merge_disable_and_save_load(arch, feature, tmp_path):
    """merge / unmerge / disable_adapter round trips and peft's save_pretrained / from_pretrained
    with the fused forward in place."""
    model = feature_model(arch, feature).eval()
    ids = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert not torch.allclose(base, expected)

    fuse(model)
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, expected.double(), torch.float32, "fused")
        with model.disable_adapter():
            assert_close(model(input_ids=ids).logits, base.double(), torch.float32, "disabled")
            assert all(why == "adapters disabled: base layer only" for why in coverage(model).values()), (
                coverage(model)
            )
        mergeable = feature != "lora_B bias" or arch != "llama"  # llama: no base bias for lora_B's
        if mergeable:
            model.merge_adapter()
            assert all("merged" in why for why in coverage(model).values())
            assert_close(model(input_ids=ids).logits, expected.double(), torch.float32, "merged")
            model.unmerge_adapter()
        assert all(why is None for why in coverage(model).values())
        before = call_counts(model)
        assert_close(model(input_ids=ids).logits, expected.double(), torch.float32, "unmerged")
        check_fused_path(model, FEATURES[feature][2], before)

    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(BASES[arch]("cpu"), tmp_path)
    if FEATURES[feature][1]:  # the second adapter lives in its own folder
        loaded.load_adapter(tmp_path / "second", adapter_name="second")
        loaded.base_model.set_adapter(["default", "second"])
    assert not fuse(loaded).skipped
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, expected.double(), torch.float32, "reloaded")
    if not mergeable:  # peft refuses (after changing the weight: so last)
        with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
            model.merge_adapter()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mixed_batch_matches_peft(arch):
    """adapter_names: each sample its adapter (ranks 8, 4 and 2; "__base__"; an adapter some layers
    lack), through lora_linear_multi: logits and gradients equal peft's per-adapter loop."""
    torch.manual_seed(0)
    model = lora_model("cpu", arch=arch)
    add_adapter(model, "b", arch=arch)  # only the first two target modules
    add_adapter(model, "c", arch=arch, r=2, lora_alpha=5)
    model.eval()
    ids = torch.randint(0, 101, (5, 6))
    names = ["b", "__base__", "default", "c", "b"]
    logits_peft, grads_peft = run_mixed(model, ids, names)

    assert not fuse(model).skipped
    before = call_counts(model)
    logits_fused, grads_fused = run_mixed(model, ids, names)
    check_fused_path(model, "fused: mixed batch", before)
    assert_close(logits_fused, logits_peft.double(), torch.float32, "logits")
    assert set(grads_fused) == set(grads_peft) and grads_peft
    for name in grads_peft:
        assert_close(grads_fused[name], grads_peft[name].double(), torch.float32, f"grad {name}")

    # nothing is cached: a parameter written through .data (peft's hotswap does) counts at once
    with torch.no_grad():
        first = model(input_ids=ids, adapter_names=names).logits
        layer = next(m for m in model.modules() if isinstance(m, peft.tuners.lora.Linear))
        layer.lora_B["b"].weight.data.mul_(3)
        changed = model(input_ids=ids, adapter_names=names).logits
        unfuse(model)
        assert_close(
            changed, model(input_ids=ids, adapter_names=names).logits.double(), torch.float32, "changed"
        )
    assert not torch.allclose(first, changed)


@pytest.mark.parametrize("feature", ["two adapters", "DoRA"])
def test_writes_through_data_and_tensor_scalings(feature):
    """peft's hotswap copies new weights in through .data and, once prepared for compiled hotswap,
    keeps each scaling as a tensor it fills in place: the fused path follows both (no stale cache)."""
    model = feature_model("llama", feature).eval()
    ids = torch.randint(0, 101, (2, 7))
    fuse(model)
    with torch.no_grad():
        model(input_ids=ids)  # a first call, as a cache would have kept
        for layer in model.modules():
            if isinstance(layer, peft.tuners.lora.Linear):
                for name in layer.lora_A:
                    layer.lora_B[name].weight.data.add_(0.1)
                    layer.scaling[name] = torch.tensor(float(layer.scaling[name]))
                    layer.scaling[name].fill_(0.7)
                layer.get_base_layer().weight.data.mul_(1.5)
        before = call_counts(model)
        fused = model(input_ids=ids).logits
        check_fused_path(model, FEATURES[feature][2], before)
        unfuse(model)
        assert_close(fused, model(input_ids=ids).logits.double(), torch.float32, "after the writes")


def test_dora_float64_model():
    model = lora_model("cpu", torch.float64, use_dora=True)
    ids = torch.randint(0, 101, (2, 6))
    logits_peft, grads_peft = run(model, ids)
    fuse(model)
    logits_fused, grads_fused = run(model, ids)
    assert_close(logits_fused, logits_peft, torch.float64, "logits", tol=1e-10)
    for name in grads_peft:
        assert_close(grads_fused[name], grads_peft[name], torch.float64, f"grad {name}", tol=1e-10)


def run_mixed(model, ids, names):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, adapter_names=names).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_mixed_batch_keeps_peft_errors():
    model = lora_model("cpu")
    fuse(model)
    model.eval()
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        model(input_ids=torch.randint(0, 101, (2, 4)), adapter_names=["default"])
    with pytest.raises(ValueError, match="non-existing adapter"):
        model(input_ids=torch.randint(0, 101, (1, 4)), adapter_names=["nope"])


def test_dora_with_dropout_in_training_matches_peft():
    """peft's DoRA form with dropout (the base product on x and on dropout(x)); the mask drawn by
    torch's generator as peft's nn.Dropout draws it, so a seeded step equals peft's exactly."""
    model = lora_model("cpu", use_dora=True, lora_dropout=0.3).train()
    ids = torch.randint(0, 101, (2, 8))
    torch.manual_seed(5)
    logits_peft, grads_peft = run(model, ids)
    fuse(model)
    torch.manual_seed(5)
    logits_fused, grads_fused = run(model, ids)
    assert_close(logits_fused, logits_peft.double(), torch.float32, "logits")
    for name in grads_peft:
        assert_close(grads_fused[name], grads_peft[name].double(), torch.float32, f"grad {name}")
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, logits_fused)  # dropout was active


def test_several_adapters_with_dropout_in_training_go_to_peft():
    """Independent masks per adapter: one fused call cannot draw them; peft's path, said so."""
    model = lora_model("cpu", lora_dropout=0.1)
    add_adapter(model, "second", lora_dropout=0.1)
    model.base_model.set_adapter(["default", "second"])
    model.train()
    report = fuse(model)
    both = [n for n in report.skipped if n.endswith(("q_proj", "v_proj"))]
    assert len(both) == 4 and all("independent masks" in report.skipped[n] for n in both)
    assert all(n.endswith("down_proj") for n in report.fused) and len(report.fused) == 2
    model.eval()
    assert all(why is None for why in coverage(model).values())


def test_coverage_names_every_other_layer_and_why():
    class NotLinear(torch.nn.Linear):  # a subclass: peft wraps it, peftkern cannot vouch for it
        pass

    base = tiny_llama("cpu")
    attn = base.model.layers[0].self_attn
    old = attn.q_proj
    attn.q_proj = NotLinear(old.in_features, old.out_features, bias=False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert set(coverage(model).values()) == {
        "not fused (call peftkern.integrations.peft.fuse)",
        next(why for why in coverage(model).values() if why.startswith("base layer NotLinear")),
    }
    report = fuse(model)
    assert list(report.skipped) == ["base_model.model.model.layers.0.self_attn.q_proj"]
    assert (
        "base layer NotLinear is not a floating-point nn.Linear"
        in report.skipped["base_model.model.model.layers.0.self_attn.q_proj"]
    )
    assert len(report.fused) == 3


def test_share_of_fused_forwards_in_models_using_each_feature():
    """The figure the closing note quotes: the share of peft lora.Linear forwards that compute fused
    over a train step and an eval step of a model using each feature (mixed batches: eval)."""
    total = collections.Counter()
    for arch in ("llama", "gpt2"):
        for feature in FEATURES:
            model = feature_model(arch, feature)
            fuse(model)
            ids = torch.randint(0, 101, (2, 5))
            run(model.train(), ids)
            with torch.no_grad():
                model.eval()(input_ids=ids)
            total.update(call_counts(model))
        model = lora_model("cpu", arch=arch)
        add_adapter(model, "b", arch=arch)
        fuse(model)
        with torch.no_grad():
            model.eval()(input_ids=ids, adapter_names=["b", "__base__"])
        total.update(call_counts(model))
    # a layer whose adapters are off for the call (here: no sample's adapter in it) has nothing to fuse
    work = {k: v for k, v in total.items() if not k.endswith("base layer only")}
    fused = sum(v for k, v in work.items() if k.startswith("fused"))
    assert fused == sum(work.values()) and fused > 100, total


@pytest.mark.parametrize("case", ["dora", "two adapters", "mixed 8"])
def test_bench_cases_compute_what_they_name(case):
    """bench_lora's peft-interop cases, tiny and on the CPU: the fused layer (make() checks it fused)
    gives peft's output, in the mode the benchmark times."""
    from bench.bench_lora import _peft_interop_work

    mode = "inference" if case == "mixed 8" else "forward"
    outs = {
        provider: _peft_interop_work(case, provider, mode, 64, 32, 4, torch.float32, device="cpu")().step(0)
        for provider in ("peft", "peftkern")
    }
    assert_close(outs["peftkern"], outs["peft"].double(), torch.float32, case)


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("feature", [*FEATURES, "mixed batch"])
def test_features_in_bf16_on_cuda(arch, feature):
    """The fused paths on the GPU (cuBLAS base, fused kernels; lora_linear_multi's grouping), bf16
    model with peft's float32 adapters, against peft's own forward and gradients."""
    if feature == "mixed batch":
        torch.manual_seed(0)
        model = lora_model("cuda", torch.bfloat16, arch=arch)
        add_adapter(model, "b", arch=arch)
        model.eval()
        kwargs = {"adapter_names": ["b", "__base__", "default", "b"]}
    else:
        model = feature_model(arch, feature, "cuda", torch.bfloat16)
        kwargs = {}
    for name, p in model.named_parameters():  # peft's autocast_adapter_dtype keeps adapters in fp32
        if "lora_" in name:
            p.data = p.data.float()
    ids = torch.randint(0, 101, (4, 33), device="cuda")

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, **kwargs).logits
        logits.float().square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits_peft, grads_peft = step()
    fuse(model)
    before = call_counts(model)
    logits_fused, grads_fused = step()
    check_fused_path(model, None, before)
    assert_close(logits_fused, logits_peft.double(), torch.bfloat16, "logits")
    assert set(grads_fused) == set(grads_peft)
    for name in grads_peft:
        assert_close(grads_fused[name], grads_peft[name].double(), torch.bfloat16, f"grad {name}")


# ---------------------------------------------------------------- PeftMixedModel: tuners nested in one module


class TwoLayerMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(16, 24)
        self.lin1 = torch.nn.Linear(24, 8)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


MLP_TARGETS = ["lin0", "lin1"]
OTHER_TUNERS = {  # each with a non-zero update from the start (init_weights=False)
    "loha": (lambda: peft.LoHaConfig(target_modules=MLP_TARGETS, init_weights=False), "loha.Linear"),
    "lokr": (lambda: peft.LoKrConfig(target_modules=MLP_TARGETS, init_weights=False), "lokr.Linear"),
    "adalora": (
        lambda: peft.AdaLoraConfig(target_modules=MLP_TARGETS, init_lora_weights=False, total_step=10),
        "adalora.SVDLinear",
    ),
    "oft": (
        lambda: peft.OFTConfig(target_modules=MLP_TARGETS, r=0, oft_block_size=4, init_weights=False),
        "oft.Linear",
    ),
    "shira": (lambda: peft.ShiraConfig(target_modules=MLP_TARGETS, r=2, init_weights=False), "shira.Linear"),
}
# (tuner, LoRA's layer outside): every order peft builds (SHiRA refuses to wrap another tuner's layer)
NESTINGS = [
    (t, outside) for t in OTHER_TUNERS for outside in (True, False) if (t, outside) != ("shira", False)
]


def nested_model(other, lora_outside):
    """A PeftMixedModel with a LoRA adapter and `other` on both layers; the adapter added second
    wraps the first: lora_outside puts LoRA's layer around the other tuner's."""
    torch.manual_seed(0)
    lora = peft.LoraConfig(target_modules=MLP_TARGETS, r=4, lora_alpha=8, init_lora_weights=False)
    first, second = (OTHER_TUNERS[other][0](), lora) if lora_outside else (lora, OTHER_TUNERS[other][0]())
    model = peft.PeftMixedModel(TwoLayerMLP(), first, "first")
    model.add_adapter("second", second)
    model.set_adapter(["first", "second"])
    return model


def run_mlp(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "other,lora_outside", NESTINGS, ids=[f"lora-over-{t}" if o else f"{t}-over-lora" for t, o in NESTINGS]
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_nested_tuners_match_peft(other, lora_outside, train):
    """LoRA's layer around another tuner's layer (LoHa, LoKr, AdaLoRA, OFT, SHiRA): its base layer's
    forward adds that tuner's update, which a fused forward reading the innermost weight would drop,
    so peft computes it and coverage / call_counts say why. The other way round, LoRA's layer is the
    inner one, on the nn.Linear itself: fused. Output and every gradient equal those of the same
    model left to peft, and so do merge / unmerge and disable_adapter."""
    model, peft_model = (nested_model(other, lora_outside).train(train) for _ in range(2))
    other_name, lora_name = ("first", "second") if lora_outside else ("second", "first")
    x = torch.randn(5, 16)
    out_peft, grads_peft = run_mlp(peft_model, x)
    assert any(f".{other_name}" in n for n in grads_peft)  # the other tuner's parameters train too

    report = fuse(model)
    nested = f"base layer is another tuner's layer ({OTHER_TUNERS[other][1]}): nested tuners run through peft"
    layers = ["base_model.model.lin0", "base_model.model.lin1"]
    if lora_outside:
        assert report.fused == [] and report.skipped == dict.fromkeys(layers, nested)
        assert coverage(model) == dict.fromkeys(layers, nested)
    else:
        assert report.fused == [f"{name}.base_layer" for name in layers] and not report.skipped
    out_fused, grads_fused = run_mlp(model, x)
    assert call_counts(model) == {f"peft: {nested}" if lora_outside else "fused: LoRA": 2}
    assert_close(out_fused, out_peft.double(), torch.float32, "output")
    assert set(grads_fused) == set(grads_peft)
    for name in grads_peft:
        assert_close(grads_fused[name], grads_peft[name].double(), torch.float32, f"grad {name}")

    # merge / unmerge of both tuners, and disable_adapter, with the fused forward in place (peft's
    # merge is not always its forward, OFT's with LoRA's: the reference is peft's own merged model)
    with torch.no_grad():
        for m in (model, peft_model):
            m.base_model.merge_adapter()
        assert_close(model(x), peft_model(x).double(), torch.float32, "merged")
        for m in (model, peft_model):
            m.base_model.unmerge_adapter()
        assert_close(model(x), peft_model(x).double(), torch.float32, "unmerged")
        with model.disable_adapter():
            assert_close(
                model(x), TwoLayerMLP.forward(model.base_model.model, x).double(), torch.float32, "off"
            )

    # the other tuner's update is there to lose: LoRA alone gives another output
    peft_model.set_adapter(lora_name)
    with torch.no_grad():
        assert not torch.allclose(peft_model(x), out_peft, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------- DoRA: a fresh adapter is a no-op


def test_fresh_dora_adapter_leaves_the_output_unchanged():
    """peft's own check (tests/test_initialization.py): one 1000 × 1000 nn.Linear with a bias, fed
    torch.rand, DoRA at init (B = 0): the fused layer's output equals the base's under
    torch.allclose's defaults (its absolute tolerance 1e-8 meets outputs near 0), in eval and in
    training without dropout."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(collections.OrderedDict(linear=torch.nn.Linear(1000, 1000))).eval()
    data = torch.rand(10, 1000)
    with torch.no_grad():
        base = net(data)
    model = peft.get_peft_model(net, peft.LoraConfig(target_modules=["linear"], use_dora=True))
    assert fuse(model).fused == ["base_model.model.linear"]
    with torch.no_grad():
        for train in (False, True):
            out = model.train(train)(data)
            assert call_counts(model) == {"fused: DoRA": 1 + train}
            assert torch.allclose(base, out), (train, (out - base).abs().max())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fresh_dora_adapters_leave_a_model_unchanged(arch):
    """The same on a tiny Llama (no biases) and GPT-2 (Conv1D layers, biases): logits after fuse()
    equal the base model's under torch.allclose's defaults."""
    base = BASES[arch]("cpu").eval()
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    config = dict(r=8, lora_alpha=16, target_modules=TARGETS[arch], use_dora=True)
    model = peft.get_peft_model(base, peft.LoraConfig(**config, fan_in_fan_out=arch == "gpt2"))
    assert not fuse(model).skipped
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert set(call_counts(model)) == {"fused: DoRA"}
    assert torch.allclose(expected, logits), (logits - expected).abs().max()


def test_load_peft_weights_lora_gives_peft_logits(tmp_path):
    """A peft LoRA checkpoint (save_pretrained) read into peftkern's LoRAConfig on the same modules:
    the logits are peft's; a checkpoint of another method, a missing tensor and a tensor the adapter
    has no place for are refused by name before any value is copied."""
    import peftkern
    from peftkern.integrations.peft import load_peft_weights

    torch.manual_seed(0)
    base = tiny_models.bert()
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    for n, t in reference.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(t)  # not peft's zeros: the update must show
    reference.save_pretrained(tmp_path / "lora")
    model = peftkern.inject(copy.deepcopy(base), peftkern.LoRAConfig(r=4, lora_alpha=8))
    load_peft_weights(model, tmp_path / "lora")
    ids = torch.randint(0, 97, (2, 9))
    reference.eval(), model.eval()
    with torch.no_grad():
        assert_close(
            model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state, torch.float32
        )

    state = {k: v.clone() for k, v in reference.state_dict().items() if "lora_" in k}
    state = {k.replace(".default", ""): v for k, v in state.items()}
    first = sorted(state)[0]
    with pytest.raises(ValueError, match="lacks the tensor for"):
        load_peft_weights(model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match="has no place for"):
        load_peft_weights(model, {**state, "base_model.model.pooler.dense.lora_A.weight": state[first]})
    ia3 = peft.get_peft_model(
        copy.deepcopy(base), peft.IA3Config(target_modules=["key"], feedforward_modules=[])
    )
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="is a peft IA3 checkpoint"):
        load_peft_weights(model, tmp_path / "ia3")
    with pytest.raises(ValueError, match="holds no peftkern adapter"):
        load_peft_weights(copy.deepcopy(base), tmp_path / "lora")
