"""The T5 and BART (encoder-decoder) presets of LoRA, bottleneck adapters (houlsby, pfeiffer,
parallel), mask tuning and BitFit, on tiny random ForConditionalGeneration models: where each
method goes, what the model then computes (logits, the loss on labels, the method's gradients,
greedy and beam generate()), against Hugging Face peft for LoRA and against an eager twin for the
rest: the base model with the same method written out in this file by hooks or module
replacement at hard-coded module names, sharing nothing with peftkern but the parameter values.
Then save / load, merge, AdapterDrop and mixed batches (peftkern.tasks)."""

import functools

import pytest
import torch
from torch import nn

import peftkern
from peftkern.integrations.inject import injection_state
from tests import reference
from tests.tiny_models import T5 as T5_FIELDS
from tests.tiny_models import bart as tiny_bart
from tests.tiny_models import mbart as tiny_mbart
from tests.tiny_models import t5 as tiny_t5

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

# BART: larger initial weights than its default, so greedy search does not stop at once (T5's default
# keeps its attention unsaturated: larger ones make the query gradients ill-conditioned)
MAKE = {
    "t5": lambda: tiny_t5("T5ForConditionalGeneration"),
    "bart": lambda: tiny_bart("BartForConditionalGeneration", init_std=0.2),
}
KINDS = list(MAKE)
HF_CONFIGS = {k: make().config for k, make in MAKE.items()}
TOL = 1e-5  # float32 models: ||got - want|| / ||want||


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread computes them faster than a team that waits on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def grads_close(got, want):
    """||got - want|| <= TOL ||want|| + 1e-5: relative, with a floor for gradients that are zero but
    for rounding (a key projection's bias: the softmax does not see it)."""
    return (got.double() - want.double()).norm().item() <= TOL * want.double().norm().item() + 1e-5


def batch(kind, B=3, L=7, T=5, seed=1):
    """Encoder ids with one right-padded sample, decoder ids that start with the start token, labels."""
    g = torch.Generator().manual_seed(seed)
    config = HF_CONFIGS[kind]
    ids = torch.randint(3, 97, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -2:] = 0
    ids[1, -2:] = config.pad_token_id
    dec = torch.randint(3, 97, (B, T), generator=g)
    dec[:, 0] = config.decoder_start_token_id
    labels = torch.randint(3, 97, (B, T), generator=g)
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)


# -- the presets' sites, written out from transformers' modeling_t5.py / modeling_bart.py -------------

STACKS = ("encoder", "decoder")


def t5_sites(*parts):
    """T5 module names: block i, sub-layer j (encoder: 0 self-attention, 1 FFN; decoder: 0 self-attention,
    1 cross-attention, 2 FFN). parts: "self.q", "cross.o", "ffn.wo", "ffn" ..."""
    out = []
    for stack in STACKS:
        for i in range(2):
            for p in parts:
                where, _, lin = p.partition(".")
                if where == "cross" and stack == "encoder":
                    continue
                j = {"self": 0, "cross": 1, "ffn": 1 if stack == "encoder" else 2}[where]
                module = {"self": "SelfAttention", "cross": "EncDecAttention", "ffn": "DenseReluDense"}[where]
                out.append(f"{stack}.block.{i}.layer.{j}.{module}" + (f".{lin}" if lin else ""))
    return sorted(out)


def bart_sites(*parts):
    """BART module names: model.<stack>.layers.i.<part>; encoder_attn (cross) in the decoder only."""
    return sorted(
        f"model.{stack}.layers.{i}.{p}"
        for stack in STACKS
        for i in range(2)
        for p in parts
        if not (p.startswith("encoder_attn") and stack == "encoder")
    )


EXPECTED = {
    ("t5", "lora"): t5_sites("self.q", "self.v", "cross.q", "cross.v"),
    ("bart", "lora"): bart_sites(
        *(f"{a}.{p}" for a in ("self_attn", "encoder_attn") for p in ("q_proj", "v_proj"))
    ),
    ("t5", "houlsby"): t5_sites("self.o", "ffn.wo"),  # no cross-attention adapter (AdapterHub's default)
    ("bart", "houlsby"): bart_sites("self_attn.out_proj", "fc2"),
    ("t5", "pfeiffer"): t5_sites("ffn.wo"),
    ("bart", "pfeiffer"): bart_sites("fc2"),
    ("t5", "parallel"): t5_sites("ffn"),
    ("bart", "parallel"): bart_sites("fc2"),  # reads fc1's input
    ("t5", "mask"): t5_sites(*(f"{a}.{p}" for a in ("self", "cross") for p in "qkvo"), "ffn.wi", "ffn.wo"),
    ("bart", "mask"): bart_sites(
        *(
            f"{a}.{p}"
            for a in ("self_attn", "encoder_attn")
            for p in ("q_proj", "k_proj", "v_proj", "out_proj")
        ),
        "fc1",
        "fc2",
    ),
}

CONFIGS = {
    "lora": lambda: peftkern.LoRAConfig(r=4, lora_alpha=8),
    # the norms houlsby trains by default are test_adapter_layernorm's (T5's included)
    "houlsby": lambda: peftkern.AdapterConfig(bottleneck=5, scale=0.5, train_layer_norms=False),
    "pfeiffer": lambda: peftkern.AdapterConfig(bottleneck=3, placement="pfeiffer"),
    "parallel": lambda: peftkern.AdapterConfig(bottleneck=4, placement="parallel", scale=2.0),
    "mask": lambda: peftkern.MaskConfig(),
    "bitfit": lambda: peftkern.BitFitConfig(),
}
ADAPTERS = ("houlsby", "pfeiffer", "parallel")


def sites_of(model, name="default"):
    """The modules the adapter `name` changed, from the names it saves (not from the placement code)."""
    saved = injection_state(model).adapters[name].params
    cut = (".adapter.", ".lora_", ".scores", ".bias")
    return sorted({min((s.split(c)[0] for c in cut if c in s), key=len) for s in saved})


def saved_params(model, name="default"):
    """saved name -> the model's Parameter."""
    params = dict(model.named_parameters())
    return {s: params[p] for s, p in injection_state(model).adapters[name].params.items()}


def randomize(model, name="default", seed=2):
    """Every parameter of adapter `name` random (LoRA's B and an adapter's up start at zero); mask scores
    around their threshold, so each mask drops about half its weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s, t in sorted(saved_params(model, name).items()):
            if s.endswith(".scores"):
                t.copy_(torch.rand(t.shape, generator=g) * 2 * peftkern.MaskConfig().threshold)
            else:
                t.add_(torch.randn(t.shape, generator=g) * 0.3)
    return model


def injected(kind, method, name="default"):
    return randomize(peftkern.inject(MAKE[kind](), CONFIGS[method](), name=name), name)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["lora", *ADAPTERS, "mask"])
def test_preset_sites(kind, method):
    model = peftkern.inject(MAKE[kind](), CONFIGS[method]())
    assert sites_of(model) == EXPECTED[kind, method]
    assert type(model.lm_head) is nn.Linear  # never the head (tied to the shared embeddings)
    trainable = {n for n, t in model.named_parameters() if t.requires_grad}
    assert trainable == set(injection_state(model).adapters["default"].params.values())
    assert not any("shared" in n or "embed" in n or "lm_head" in n for n in trainable)


def test_mt5_and_mbart_take_the_t5_and_bart_presets():
    torch.manual_seed(0)
    mt5 = transformers.MT5ForConditionalGeneration(transformers.MT5Config(**T5_FIELDS))  # gated-gelu FFN
    model = peftkern.inject(mt5, peftkern.MaskConfig())
    assert sites_of(model) == t5_sites(
        *(f"{a}.{p}" for a in ("self", "cross") for p in "qkvo"), "ffn.wi_0", "ffn.wi_1", "ffn.wo"
    )
    model = randomize(peftkern.inject(tiny_mbart(), CONFIGS["parallel"]()))
    assert sites_of(model) == bart_sites("fc2")
    # mBART is pre-LN: the FFN's input is final_layer_norm's output, fc1's input
    twin = tiny_mbart()
    for site in bart_sites("fc2"):
        a, kept = model.get_submodule(site).adapter["default"], {}
        w = (a.down.weight, a.down.bias, a.up.weight, a.up.bias)
        layer = twin.get_submodule(site.rpartition(".")[0])
        layer.final_layer_norm.register_forward_hook(lambda m, i, out, kept=kept: kept.update(x=out))
        layer.fc2.register_forward_hook(
            lambda m, i, out, kept=kept, w=w, s=a.scale: reference.adapter(kept["x"], *w, "gelu", s, out)
        )
    b = batch("bart")
    with torch.no_grad():
        assert rel_err(model(**b).logits, twin(**b).logits) < TOL


# -- the eager twins: the base model with the method written out ---------------------------------------


def run(model, b):
    """(logits, loss, {param name: grad}) of a training step on batch b."""
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**b)
    out.loss.backward()
    grads = {n: t.grad.detach().clone() for n, t in model.named_parameters() if t.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def frozen_base(kind):
    return MAKE[kind]().requires_grad_(False)


ADAPTER_PARAMS = ("down.weight", "down.bias", "up.weight", "up.bias")


def adapter_twin(kind, placement, model, name="default", twin=None):
    """The base (or `twin`) with adapter `name` of `model` hooked in by hand at EXPECTED's names, its
    parameters copies that train; returns (twin, {saved name: copy})."""
    twin = frozen_base(kind) if twin is None else twin
    saved, leaves = saved_params(model, name), {}
    for site in EXPECTED[kind, placement]:
        w = tuple(leaf(saved[f"{site}.adapter.{p}"]) for p in ADAPTER_PARAMS)
        leaves.update({f"{site}.adapter.{p}": t for p, t in zip(ADAPTER_PARAMS, w)})
        a = model.get_submodule(site).adapter[name]
        act, scale = a.activation, a.scale
        module = twin.get_submodule(site)
        if placement != "parallel":  # after the projection: out + s * up(act(down(out)))
            module.register_forward_hook(
                lambda m, a, out, w=w, act=act, s=scale: reference.adapter(out, *w, act, s)
            )
        elif kind == "t5":  # on the FFN module: ffn(x) + s * up(act(down(x)))
            module.register_forward_hook(
                lambda m, a, out, w=w, act=act, s=scale: reference.adapter(a[0], *w, act, s, residual=out)
            )
        else:  # BART's layer, post-LN: h = LN(r + fc2(act(fc1(r)))), r the previous LayerNorm's output
            layer = twin.get_submodule(site.rpartition(".")[0])
            before = layer.self_attn_layer_norm if ".encoder." in site else layer.encoder_attn_layer_norm
            kept = {}
            before.register_forward_hook(lambda m, a, out, kept=kept: kept.update(r=out))
            layer.final_layer_norm.register_forward_pre_hook(
                lambda m, a, kept=kept, w=w, act=act, s=scale: (
                    reference.adapter(kept["r"], *w, act, s, residual=a[0]),
                )
            )
    return twin, leaves


def mask_twin(kind, model):
    """The base with each EXPECTED linear replaced by reference.EagerMaskedLinear over copies of the
    scores."""
    twin, leaves, saved = frozen_base(kind), {}, saved_params(model)
    threshold = peftkern.MaskConfig().threshold
    for site in EXPECTED[kind, "mask"]:
        lin = twin.get_submodule(site)
        leaves[f"{site}.scores"] = leaf(saved[f"{site}.scores"])
        parent, _, child = site.rpartition(".")
        setattr(
            twin.get_submodule(parent),
            child,
            reference.EagerMaskedLinear(lin.weight, lin.bias, leaves[f"{site}.scores"], threshold),
        )
    return twin, leaves


def bitfit_twin(kind, model):
    """The base with every bias set to the task's (the saved values), those biases training."""
    twin, leaves = frozen_base(kind), {}
    params = dict(twin.named_parameters())
    for s, t in saved_params(model).items():
        with torch.no_grad():
            params[s].copy_(t)
        leaves[s] = params[s].requires_grad_(True)
    return twin, leaves


TWINS = {
    "houlsby": lambda kind, m: adapter_twin(kind, "houlsby", m),
    "pfeiffer": lambda kind, m: adapter_twin(kind, "pfeiffer", m),
    "parallel": lambda kind, m: adapter_twin(kind, "parallel", m),
    "mask": mask_twin,
    "bitfit": bitfit_twin,
}


def generate(model, b, beams):
    with torch.no_grad():
        return model.eval().generate(
            input_ids=b["input_ids"],
            attention_mask=b["attention_mask"],
            max_new_tokens=6,
            do_sample=False,
            num_beams=beams,
        )


def check_against(kind, model, reference_model, leaves):
    """model (peftkern) against reference_model: logits, loss, each saved parameter's gradient (leaves:
    saved name -> the reference's tensor), greedy and beam generate()."""
    b = batch(kind)
    logits, loss, grads = run(model, b)
    want_logits, want_loss, _ = run(reference_model, b)
    assert rel_err(logits, want_logits) < TOL and abs(loss - want_loss) < TOL * want_loss
    names = injection_state(model).adapters["default"].params
    assert sorted(leaves) == sorted(names)
    for s, t in leaves.items():
        assert t.grad is not None and t.grad.any(), s
        assert grads_close(grads[names[s]], t.grad), s
    with torch.no_grad():
        assert rel_err(logits, MAKE[kind]()(**b).logits) > 1e-2  # the method does change the model
    changed = False
    for beams in (1, 3):
        got = generate(model, b, beams)
        assert torch.equal(got, generate(reference_model, b, beams)), beams
        changed |= not torch.equal(got, base_tokens(kind, beams))
    return changed


@functools.cache
def base_tokens(kind, beams):
    return generate(MAKE[kind](), batch(kind), beams)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_equals_peft(kind):
    """peft's LoRA with its default targets for the architecture (peft's
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: T5 q, v; BART q_proj, v_proj)."""
    theirs = peft.get_peft_model(MAKE[kind](), peft.LoraConfig(r=4, lora_alpha=8, task_type="SEQ_2_SEQ_LM"))
    ours = peftkern.inject(MAKE[kind](), CONFIGS["lora"]())
    peft_params = {
        n.removeprefix("base_model.model."): t for n, t in theirs.named_parameters() if t.requires_grad
    }
    leaves = {}
    with torch.no_grad():
        for s, t in saved_params(ours).items():  # <linear>.lora_A -> peft's <linear>.lora_A.default.weight
            p = peft_params.pop(f"{s}.default.weight")
            p.normal_(0, 0.3)
            t.copy_(p)
            leaves[s] = p
    assert not peft_params  # the same sites
    assert check_against(kind, ours, theirs, leaves)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", [*ADAPTERS, "mask"])
def test_equals_the_eager_twin(kind, method):
    model = injected(kind, method)
    twin, leaves = TWINS[method](kind, model)
    assert check_against(kind, model, twin, leaves)  # and generate() gives other tokens than the base


def test_bart_houlsby_and_parallel_together_in_either_injection_order():
    """Both on fc2: the houlsby adapter reads fc2's output and the parallel branch adds after it,
    whichever was injected first (as T5's, where houlsby sits on wo, inside the FFN module); deleting
    the parallel adapter takes its hooks off fc1 and fc2."""
    b, outs = batch("bart"), []
    for order in (("houlsby", "parallel"), ("parallel", "houlsby")):
        model = MAKE["bart"]()
        for n in order:
            torch.manual_seed(len(n))  # the same initial values in both orders
            peftkern.inject(model, CONFIGS[n](), name=n)
            randomize(model, n, seed=len(n))
        peftkern.set_active(model, ["houlsby", "parallel"])
        with torch.no_grad():
            outs.append(model(**b).logits)
    twin, _ = adapter_twin("bart", "houlsby", model, "houlsby")
    twin, _ = adapter_twin("bart", "parallel", model, "parallel", twin)
    with torch.no_grad():
        want = twin(**b).logits
        assert rel_err(outs[0], want) < TOL and rel_err(outs[1], want) < TOL
        peftkern.delete_adapter(model, "parallel")
        peftkern.set_active(model, "houlsby")
        assert (
            rel_err(model(**b).logits, adapter_twin("bart", "houlsby", model, "houlsby")[0](**b).logits) < TOL
        )
    assert not [n for n, m in model.named_modules() if hasattr(m, "_peftkern_ffn_input")]
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m._forward_pre_hooks]


def test_bart_bitfit_equals_the_eager_twin():
    model = injected("bart", "bitfit")
    biases = [n for n, _ in MAKE["bart"]().named_parameters() if n.endswith(".bias")]
    # every bias: the linears' and the LayerNorms'
    assert sites_of(model) == sorted(n.removesuffix(".bias") for n in biases)
    twin, leaves = bitfit_twin("bart", model)
    assert check_against("bart", model, twin, leaves)


def test_t5_bitfit_says_t5_has_no_bias_terms():
    model = MAKE["t5"]()
    with pytest.raises(
        ValueError, match=r"has no bias terms \(T5's linear layers are bias=False and T5LayerNorm"
    ):
        peftkern.inject(model, peftkern.BitFitConfig())
    assert injection_state(model) is None and all(t.requires_grad for t in model.parameters())  # unchanged


# -- save / load, merge ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, method", [(k, m) for k in KINDS for m in CONFIGS if (k, m) != ("t5", "bitfit")]
)
def test_save_load_and_merge(kind, method, tmp_path, capsys):
    model = injected(kind, method)
    b = batch(kind)
    with torch.no_grad():
        want = model.eval()(**b).logits
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(MAKE[kind](), tmp_path)
    assert sites_of(loaded) == sites_of(model)
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, want)
        peftkern.merge(loaded)
        assert rel_err(loaded(**b).logits, want) < TOL
    said = capsys.readouterr().out
    if method in ("lora", "mask"):  # folded in: plain nn.Linear layers again
        assert not any(isinstance(m, peftkern.nn.AdaptedLinear) for m in loaded.modules())
        assert f"{len(sites_of(model))} " in said
    assert torch.equal(generate(loaded, b, 3), generate(model, b, 3))


# -- AdapterDrop and mixed batches ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", ADAPTERS)
def test_drop_layers_drops_the_lowest_encoder_and_decoder_blocks(kind, placement):
    config = peftkern.AdapterConfig(bottleneck=4, placement=placement, drop_layers=1, train_layer_norms=False)
    model = peftkern.inject(MAKE[kind](), config)
    kept = [s for s in EXPECTED[kind, placement] if ".block.1." in s or ".layers.1." in s]
    assert sites_of(model) == kept and len(kept) == len(EXPECTED[kind, placement]) // 2
    with pytest.raises(ValueError, match="drop_layers=2 removed every adapter"):
        peftkern.inject(MAKE[kind](), peftkern.AdapterConfig(placement=placement, drop_layers=2))


def test_bart_parallel_adapter_drop_prob_skips_the_branch():
    """drop_prob near 1: in training every parallel branch is skipped (fc1's input is still taken, so no
    later call reads a stale one), and the model computes as its base."""
    config = peftkern.AdapterConfig(bottleneck=4, placement="parallel", drop_prob=1 - 1e-9)
    model = randomize(peftkern.inject(MAKE["bart"](), config))
    b = batch("bart")
    with torch.no_grad():
        got = model.train()(**b).logits
        assert rel_err(got, MAKE["bart"]().train()(**b).logits) < 1e-6
        for m in model.modules():
            if hasattr(m, "_peftkern_ffn_input"):
                assert m._peftkern_ffn_input.x is None


MIXED = {
    "t5": ["lora", "houlsby", "parallel", "mask"],
    "bart": ["lora", "houlsby", "pfeiffer", "parallel", "mask", "bitfit"],
}


def mixed_model(kind):
    model = MAKE[kind]()
    for i, n in enumerate(MIXED[kind]):
        peftkern.inject(model, CONFIGS[n](), name=n)
        randomize(model, n, seed=10 + i)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_gives_each_sample_its_adapter(kind):
    """One batch, each sample through its own adapter (or none): logits and each adapter's gradients as
    the samples alone through that adapter."""
    model = mixed_model(kind)
    tasks = [*MIXED[kind], None]
    b = batch(kind, B=len(tasks), seed=4)
    model.train()
    out = model(**b, tasks=tasks).logits
    g = torch.Generator().manual_seed(6)
    w = torch.randn(out.shape, generator=g)
    (out * w).sum().backward()
    grads = {n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None}
    for i, n in enumerate(tasks):
        model.zero_grad(set_to_none=True)
        peftkern.set_active(model, n)
        alone = model(**{k: v[i : i + 1] for k, v in b.items()}).logits
        assert rel_err(out[i : i + 1], alone) < TOL, n
        if n is None:
            continue
        (alone * w[i : i + 1]).sum().backward()
        for s, p in injection_state(model).adapters[n].params.items():
            t = dict(model.named_parameters())[p]
            assert grads_close(grads[p], t.grad), (n, s)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_batch_beam_search(kind):
    model = mixed_model(kind).eval()
    tasks = [*MIXED[kind], None]
    b = batch(kind, B=len(tasks), seed=4)
    with peftkern.tasks(tasks):  # generate() expands each sample to its 3 beams, adjacent
        mixed = generate(model, b, 3)
    for i, n in enumerate(tasks):
        peftkern.set_active(model, n)
        alone = generate(model, {k: v[i : i + 1] for k, v in b.items()}, 3)[0]
        k = alone.shape[0]  # alone may stop early at the end-of-sequence token; the batch pads after it
        assert torch.equal(mixed[i, :k], alone), (n, mixed[i], alone)
        assert (mixed[i, k:] == model.config.pad_token_id).all()
    assert len({tuple(t.tolist()) for t in mixed}) > 2  # the adapters change the tokens
