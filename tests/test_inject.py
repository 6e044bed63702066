"""peftkern.inject on tiny random Hugging Face models: where the presets put each method, what the
injected blocks compute, save/load and merge, the bad-input errors, and the model features users
rely on (generate, torch.compile, autocast, gradient checkpointing, the base's save_pretrained)."""

import copy
import functools
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkern
from peftkern.nn import AdaMixAdapter, AdaptedLinear, Adapter, AdapterFusion
from tests import reference
from tests.tiny_models import bert as tiny_bert
from tests.tiny_models import llama as tiny_llama
from tests.tiny_models import vit as tiny_vit

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def ids(n=3, length=9, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def randomize_peft_params(model, seed=2):
    """Non-zero values in every trainable parameter (at init LoRA B and adapter up are zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.parameters():
            if t.requires_grad:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (0.005 if t.dim() == 2 else 0))
    return model


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


LORA, MASK = "lora", "mask"


def names_of(model, what):
    """The linear layers holding a LoRA update (what="lora") or a mask (what="mask")."""
    attr = {LORA: "lora_A", MASK: "scores"}[what]
    return sorted(
        n for n, m in model.named_modules() if isinstance(m, AdaptedLinear) and len(getattr(m, attr))
    )


ADAPTER_MODULES = (Adapter, AdaMixAdapter, AdapterFusion)


def adapter_of(module, name="default"):
    return module.adapter[name]


def adapter_sites(model, kind=ADAPTER_MODULES):
    """The modules holding an adapter (a plain one, an AdaMix mixture or a fusion) named "default"."""
    return sorted(
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "adapter", None), nn.ModuleDict) and isinstance(m.adapter["default"], kind)
    )


# --- where the presets put each method ----------------------------------------------------------


@pytest.mark.parametrize(
    "placement, expected",
    [
        ("houlsby", ["encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"]),
        ("pfeiffer", ["encoder.layer.{i}.output.dense"]),
        ("parallel", ["encoder.layer.{i}.output"]),  # BertOutput: it adds the FFN input back
    ],
)
def test_bert_adapter_placements(placement, expected):
    model = peftkern.inject(tiny_bert(), peftkern.AdapterConfig(placement=placement, bottleneck=5))
    assert adapter_sites(model) == sorted(e.format(i=i) for i in range(2) for e in expected)
    trainable, _ = peftkern.trainable_parameters(model)
    # houlsby's default also trains each block's two LayerNorms (weight and bias of 32), as the paper
    norms = 2 * 2 * (2 * 32) if placement == "houlsby" else 0
    assert trainable == len(adapter_sites(model)) * (2 * 32 * 5 + 5 + 32) + norms


def test_llama_presets():
    model = peftkern.inject(tiny_llama(), peftkern.AdapterConfig(bottleneck=4))
    assert adapter_sites(model) == sorted(
        f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.o_proj", "mlp.down_proj")
    )
    model = peftkern.inject(tiny_llama(), peftkern.AdapterConfig(bottleneck=4, placement="parallel"))
    assert adapter_sites(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    model = peftkern.inject(tiny_llama(), peftkern.LoRAConfig(r=4))
    assert names_of(model, LORA) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    # GQA: k/v project to 2 heads of 8 = 16 features
    assert peftkern.trainable_parameters(model)[0] == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    model = peftkern.inject(tiny_llama(), peftkern.MaskConfig())
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(names_of(model, MASK)) == 2 * len(linears)
    assert type(model.lm_head) is nn.Linear  # the head is no block's linear


def test_vit_presets():
    model = peftkern.inject(tiny_vit(), peftkern.AdapterConfig(bottleneck=4))
    assert adapter_sites(model) == sorted(
        f"layers.{i}.{s}" for i in range(2) for s in ("attention.o_proj", "mlp.fc2")
    )
    model = peftkern.inject(tiny_vit(), peftkern.LoRAConfig(r=2))
    assert names_of(model, LORA) == sorted(
        f"layers.{i}.attention.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    model = peftkern.inject(tiny_vit(), peftkern.MaskConfig())
    assert len(names_of(model, MASK)) == 2 * 6
    assert type(model.pooler.dense) is nn.Linear


def test_target_modules_suffixes_and_regex():
    model = peftkern.inject(
        tiny_bert(), peftkern.LoRAConfig(r=2, target_modules=["key", "intermediate.dense"])
    )
    assert names_of(model, LORA) == sorted(
        f"encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.self.key", "intermediate.dense")
    )
    model = peftkern.inject(
        tiny_bert(), peftkern.LoRAConfig(r=2, target_modules=r"encoder\.layer\.1\..*query")
    )
    assert names_of(model, LORA) == ["encoder.layer.1.attention.self.query"]


# --- what the injected blocks compute -------------------------------------------------------------


def _bert_attention_output(so, h, x):  # BertSelfOutput written out
    return so.LayerNorm(F.linear(h, so.dense.weight, so.dense.bias) + x)


def test_houlsby_adapters_sit_before_each_residual_add():
    model = randomize_peft_params(peftkern.inject(tiny_bert(), peftkern.AdapterConfig(bottleneck=5)))
    layer = model.encoder.layer[0]
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        so, a = layer.attention.output, adapter_of(layer.attention.output.dense)
        h = torch.randn(2, 7, 32)
        proj = F.linear(h, so.dense.weight, so.dense.bias)
        expected = so.LayerNorm(
            reference.adapter(proj, a.down.weight, a.down.bias, a.up.weight, a.up.bias, "gelu", 1.0) + x
        )
        assert rel_err(so(h, x), expected) < 1e-6
        assert rel_err(so(h, x), _bert_attention_output(so, h, x)) > 1e-3  # the adapter does act


def test_parallel_adapter_reads_the_ffn_input_and_adds_to_its_output():
    cfg = peftkern.AdapterConfig(bottleneck=5, placement="parallel", scale=0.5)
    model = randomize_peft_params(peftkern.inject(tiny_bert(), cfg))
    layer = model.encoder.layer[1]
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        attn = layer.attention(x)[0]
        inter, out = layer.intermediate, layer.output
        h = inter.intermediate_act_fn(F.linear(attn, inter.dense.weight, inter.dense.bias))
        ffn = F.linear(h, out.dense.weight, out.dense.bias)
        a = adapter_of(out)
        ffn = reference.adapter(
            attn, a.down.weight, a.down.bias, a.up.weight, a.up.bias, "gelu", 0.5, residual=ffn
        )
        expected = out.LayerNorm(ffn + attn)
        got = layer(x)
        got = got[0] if isinstance(got, tuple) else got
        assert rel_err(got, expected) < 1e-6


def test_llama_parallel_adapter_wraps_the_mlp():
    model = randomize_peft_params(
        peftkern.inject(tiny_llama(), peftkern.AdapterConfig(bottleneck=4, placement="parallel"))
    )
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        base = mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        a = adapter_of(mlp)
        expected = reference.adapter(x, a.down.weight, a.down.bias, a.up.weight, a.up.bias, "gelu", 1.0, base)
        assert rel_err(mlp(x), expected) < 1e-6


@pytest.mark.parametrize(
    "config",
    [
        peftkern.LoRAConfig(r=4),
        peftkern.AdapterConfig(bottleneck=4, init="lora"),
        peftkern.AdapterConfig(bottleneck=4, placement="parallel"),
        peftkern.MaskConfig(),
    ],
    ids=["lora", "adapter", "parallel", "mask"],
)
def test_llama_generate_after_injection(config):
    base = tiny_llama()
    prompt = ids(2, 6)
    want = base.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    model = peftkern.inject(copy.deepcopy(base), config)
    got = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)  # each method starts as the identity
    randomize_peft_params(model)
    assert model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0).shape == want.shape


# --- BitFit and modules_to_save -------------------------------------------------------------------


def test_bitfit_trains_only_biases():
    model = peftkern.inject(tiny_bert(), peftkern.BitFitConfig())
    trainable = [n for n, t in model.named_parameters() if t.requires_grad]
    # each bias's task copy trains; the base's biases stay frozen for the model's other tasks
    assert trainable and all(n.endswith(".peftkern_bias.default") for n in trainable)
    # per layer q, k, v, o, intermediate, output, two LayerNorms; the embeddings' LayerNorm; the pooler
    assert peftkern.trainable_parameters(model)[0] == 2 * (4 * 32 + 48 + 32 + 2 * 32) + 32 + 32
    model = peftkern.inject(tiny_bert(), peftkern.BitFitConfig(bias_names=["query.bias", "value.bias"]))
    assert peftkern.trainable_parameters(model)[0] == 2 * 2 * 32


def test_modules_to_save_train_and_round_trip(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(tiny_bert().config).eval()

    model = peftkern.inject(fresh(), peftkern.LoRAConfig(r=2, modules_to_save=["classifier"]))
    head = model.classifier.peftkern_copies["default"]  # the task's copy trains, the base's stays
    assert head.weight.requires_grad and head.bias.requires_grad and not model.classifier.weight.requires_grad
    randomize_peft_params(model)
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(fresh(), tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


# --- save / load / merge ----------------------------------------------------------------------------

CONFIGS = {
    "lora": peftkern.LoRAConfig(r=3, lora_alpha=6),
    "adapter": peftkern.AdapterConfig(bottleneck=5),
    "parallel": peftkern.AdapterConfig(bottleneck=5, placement="parallel"),
    "mask": peftkern.MaskConfig(),
    "bitfit": peftkern.BitFitConfig(),
    "adapterdrop": peftkern.AdapterConfig(bottleneck=5, drop_layers=1, drop_prob=0.25),
    "adamix": peftkern.AdapterConfig(bottleneck=5, num_experts=3),
}


@pytest.mark.parametrize("method", CONFIGS)
def test_save_load_round_trip(tmp_path, method):
    model = randomize_peft_params(peftkern.inject(tiny_bert(), copy.deepcopy(CONFIGS[method])))
    peftkern.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["peftkern_config.json", "peftkern_weights.safetensors"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "peftkern_weights.safetensors")
    from peftkern.integrations.inject import injection_state

    names = injection_state(model).adapters["default"].params  # saved name -> the model's
    assert sorted(names.values()) == sorted(n for n, t in model.named_parameters() if t.requires_grad)
    assert sorted(saved) == sorted(names) and all(".default" not in n for n in saved)
    loaded = peftkern.from_pretrained(tiny_bert(), tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)
    assert peftkern.trainable_parameters(loaded) == peftkern.trainable_parameters(model)
    assert adapter_sites(loaded) == adapter_sites(model)


@pytest.mark.parametrize("method", ["lora", "adapter", "mask", "adapterdrop", "adamix"])
def test_merge(method, capsys):
    model = randomize_peft_params(peftkern.inject(tiny_bert(), copy.deepcopy(CONFIGS[method])))
    if method == "mask":  # drop about half the weights
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, AdaptedLinear):
                    m.scores["default"].uniform_(0, 2 * m.mask_thresholds["default"])
    x = ids()
    with torch.no_grad():
        before = model(x).last_hidden_state
        assert peftkern.merge(model) is model
        after = model(x).last_hidden_state
    said = capsys.readouterr().out
    assert rel_err(after, before) < 1e-5
    assert not names_of(model, LORA) and not names_of(model, MASK)
    if method == "lora":
        assert "LoRA merged into 4 linear layers" in said
    elif method == "mask":
        assert "12 masks baked" in said
    elif method == "adamix":  # each mixture replaced by one Adapter, its experts' mean
        assert "4 AdaMix adapters merged into one adapter each" in said
        assert adapter_sites(model, Adapter) == adapter_sites(model) and len(adapter_sites(model)) == 4
    else:  # AdapterDrop's drop_layers=1 leaves the adapters of one of the two layers
        kept = 4 if method == "adapter" else 2
        assert f"{kept} adapters kept" in said and len(adapter_sites(model)) == kept
    with pytest.raises(ValueError, match="merged"):
        peftkern.save_pretrained(model, "unused")


# --- bad input --------------------------------------------------------------------------------------


def test_inject_twice_under_one_name_raises():
    model = peftkern.inject(tiny_bert(), peftkern.LoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"inject: the model already holds an adapter named 'default'"):
        peftkern.inject(model, peftkern.AdapterConfig())
    with pytest.raises(ValueError, match="name must be a non-empty string without '.'"):
        peftkern.inject(model, peftkern.AdapterConfig(), name="a.b")
    with pytest.raises(ValueError, match="its submodule encoder holds peftkern adapters already"):
        outer = nn.Sequential()
        outer.add_module("encoder", model)
        peftkern.inject(outer, peftkern.BitFitConfig())
    peftkern.inject(model, peftkern.AdapterConfig(bottleneck=3), name="second")  # another name: fine
    assert list(peftkern.adapters(model)) == ["default", "second"]


def test_a_config_matching_nothing_raises_and_changes_nothing():
    model = tiny_bert()
    before = {n: t.requires_grad for n, t in model.named_parameters()}
    with pytest.raises(
        ValueError, match=r"LoRAConfig\(r=8.*target_modules=\['nonexistent'\].*matched no module"
    ):
        peftkern.inject(model, peftkern.LoRAConfig(target_modules=["nonexistent"]))
    with pytest.raises(ValueError, match="BitFitConfig.*matched no parameter"):
        peftkern.inject(model, peftkern.BitFitConfig(bias_names=["nope.bias"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        peftkern.inject(model, peftkern.LoRAConfig(modules_to_save=["head"]))
    assert before == {n: t.requires_grad for n, t in model.named_parameters()}
    assert not hasattr(model, "_peftkern") and not names_of(model, LORA)


def test_unknown_architecture_asks_for_target_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    for config in (peftkern.LoRAConfig(), peftkern.MaskConfig(), peftkern.AdapterConfig()):
        with pytest.raises(
            ValueError, match=f"{type(config).__name__}: no preset for model_type None.*pass target_modules"
        ):
            peftkern.inject(model, config)
    model = peftkern.inject(model, peftkern.LoRAConfig(r=2, target_modules=["0", "2"]))
    assert names_of(model, LORA) == ["0", "2"]


def test_non_linear_targets_are_refused():
    with pytest.raises(
        ValueError,
        match=r"LoRAConfig: target_modules matched embeddings.LayerNorm \(LayerNorm\), which is not an nn",
    ):
        peftkern.inject(tiny_bert(), peftkern.LoRAConfig(target_modules=["LayerNorm"]))
    with pytest.raises(ValueError, match="MaskConfig.*not an nn.Linear"):
        peftkern.inject(tiny_bert(), peftkern.MaskConfig(target_modules=["intermediate"]))


def test_inject_argument_types():
    with pytest.raises(TypeError, match="config must be an AdapterConfig"):
        peftkern.inject(tiny_bert(), {"method": "lora"})
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        peftkern.inject("bert", peftkern.LoRAConfig())


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: peftkern.LoRAConfig(r=0), ValueError, "LoRAConfig: r must be in"),
        (lambda: peftkern.LoRAConfig(r=2.5), TypeError, "LoRAConfig: r must be an int"),
        (lambda: peftkern.LoRAConfig(lora_dropout=1.0), ValueError, "LoRAConfig: lora_dropout"),
        (lambda: peftkern.LoRAConfig(lora_alpha="16"), TypeError, "LoRAConfig: lora_alpha"),
        (lambda: peftkern.LoRAConfig(use_rslora=1), TypeError, "LoRAConfig: use_rslora"),
        (lambda: peftkern.LoRAConfig(target_modules=[]), TypeError, "LoRAConfig: target_modules"),
        (lambda: peftkern.LoRAConfig(target_modules=[3]), TypeError, "LoRAConfig: target_modules"),
        (lambda: peftkern.AdapterConfig(placement="after"), ValueError, "AdapterConfig: placement"),
        (lambda: peftkern.AdapterConfig(activation="tanh"), ValueError, "AdapterConfig: activation"),
        (lambda: peftkern.AdapterConfig(init="zeros"), ValueError, "AdapterConfig: init"),
        (lambda: peftkern.AdapterConfig(bottleneck=0), ValueError, "AdapterConfig: bottleneck"),
        (lambda: peftkern.AdapterConfig(reduction_factor=0), ValueError, "AdapterConfig: reduction_factor"),
        (lambda: peftkern.AdapterConfig(scale=float("nan")), ValueError, "AdapterConfig: scale"),
        (lambda: peftkern.AdapterConfig(drop_layers=-1), ValueError, "AdapterConfig: drop_layers"),
        (lambda: peftkern.AdapterConfig(drop_layers=1.0), TypeError, "AdapterConfig: drop_layers"),
        (lambda: peftkern.AdapterConfig(drop_layers=True), TypeError, "AdapterConfig: drop_layers"),
        (lambda: peftkern.AdapterConfig(drop_layers="2"), TypeError, "AdapterConfig: drop_layers"),
        (lambda: peftkern.AdapterConfig(drop_prob=1.0), ValueError, "AdapterConfig: drop_prob"),
        (lambda: peftkern.AdapterConfig(drop_prob=-0.1), ValueError, "AdapterConfig: drop_prob"),
        (lambda: peftkern.AdapterConfig(drop_prob=float("nan")), ValueError, "AdapterConfig: drop_prob"),
        (lambda: peftkern.AdapterConfig(drop_prob=False), TypeError, "AdapterConfig: drop_prob"),
        (lambda: peftkern.AdapterConfig(drop_prob="0.1"), TypeError, "AdapterConfig: drop_prob"),
        (lambda: peftkern.AdapterConfig(num_experts=0), ValueError, "AdapterConfig: num_experts"),
        (lambda: peftkern.AdapterConfig(num_experts=2.0), TypeError, "AdapterConfig: num_experts"),
        (lambda: peftkern.AdapterConfig(fusion={}), TypeError, "AdapterConfig: fusion must be"),
        (lambda: peftkern.AdapterConfig(fusion=["a/b"]), TypeError, "AdapterConfig: fusion must be"),
        (lambda: peftkern.AdapterConfig(fusion={"": "a"}), TypeError, "AdapterConfig: fusion's names"),
        (lambda: peftkern.AdapterConfig(fusion={1: "a"}), TypeError, "AdapterConfig: fusion's names"),
        (lambda: peftkern.AdapterConfig(fusion={"a": 3}), TypeError, "AdapterConfig: fusion['a'] must be"),
        (
            lambda: peftkern.AdapterConfig(fusion={"a": ""}),
            ValueError,
            "AdapterConfig: fusion['a'] is an empty",
        ),
        (
            lambda: peftkern.AdapterConfig(fusion={"a": "x"}, num_experts=2),
            ValueError,
            "AdapterConfig: fusion fuses trained single adapters",
        ),
        (lambda: peftkern.MaskConfig(threshold="high"), TypeError, "MaskConfig: threshold"),
        (
            lambda: peftkern.MaskConfig(threshold=0.5),
            ValueError,
            "MaskConfig: score_init (0.01) must be above",
        ),
        (
            lambda: peftkern.LoRAConfig(target_modules="query("),
            ValueError,
            "LoRAConfig: target_modules 'query('",
        ),
        (lambda: peftkern.BitFitConfig(bias_names=5), TypeError, "BitFitConfig: bias_names"),
        (lambda: peftkern.BitFitConfig(modules_to_save=[""]), TypeError, "BitFitConfig: modules_to_save"),
    ],
)
def test_bad_config_fields_name_the_field(make, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make()


def test_config_dict_round_trip():
    from peftkern.integrations.config import config_from_dict

    for config in CONFIGS.values():
        assert config_from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="not a peftkern config"):
        config_from_dict({"method": "loha"})
    with pytest.raises(ValueError, match=r"LoRAConfig: unknown fields \['rank'\]"):
        config_from_dict({"method": "lora", "rank": 4})


def _unchanged(model, reference_model):
    assert not hasattr(model, "_peftkern")
    assert not names_of(model, LORA) and not adapter_sites(model)
    assert all(t.requires_grad for t in model.parameters())
    for (n, a), (_, b) in zip(model.state_dict().items(), reference_model.state_dict().items()):
        assert torch.equal(a, b), n


def test_from_pretrained_refuses_a_mismatched_base(tmp_path):
    config = peftkern.AdapterConfig(bottleneck=5, train_layer_norms=False)  # the adapters' keys alone
    model = randomize_peft_params(peftkern.inject(tiny_bert(), config))
    peftkern.save_pretrained(model, tmp_path)
    wider = tiny_bert(hidden_size=48, num_attention_heads=4)
    with pytest.raises(
        ValueError,
        match=r"encoder.layer.0.attention.output.dense.adapter.down.weight is \(5, 32\) in .* but \(5, 48\)",
    ):
        peftkern.from_pretrained(wider, tmp_path)
    _unchanged(wider, tiny_bert(hidden_size=48, num_attention_heads=4))
    deeper = tiny_bert(num_hidden_layers=3)
    with pytest.raises(
        ValueError, match=r"the base model has encoder.layer.2.attention.output.dense.adapter.down.weight"
    ):
        peftkern.from_pretrained(deeper, tmp_path)
    shallower = tiny_bert(num_hidden_layers=1)
    with pytest.raises(
        ValueError, match=r"holds encoder.layer.1.attention.output.dense.adapter.down.bias, which the base"
    ):
        peftkern.from_pretrained(shallower, tmp_path)
    with pytest.raises(
        ValueError, match=r"the base model has model.layers.0.self_attn.o_proj.adapter.down.weight"
    ):
        peftkern.from_pretrained(tiny_llama(), tmp_path)  # another architecture: its own preset's names


@pytest.mark.parametrize("damage", ["truncate", "garble", "bitflip", "config", "missing", "integers"])
def test_from_pretrained_refuses_a_damaged_checkpoint(tmp_path, damage):
    model = randomize_peft_params(peftkern.inject(tiny_bert(), peftkern.LoRAConfig(r=2)))
    peftkern.save_pretrained(model, tmp_path)
    weights = tmp_path / "peftkern_weights.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) - 100])
    elif damage == "garble":
        weights.write_bytes(b"\xff" * 16 + data[16:])
    elif damage == "bitflip":  # in the data: the header still parses
        weights.write_bytes(data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:])
    elif damage == "config":
        (tmp_path / "peftkern_config.json").write_text('{"method": "lora", "r": ')
    elif damage == "integers":  # a well-formed file of the wrong kind, its checksum recorded
        import hashlib
        import json

        from safetensors.torch import load_file, save

        data = save({n: t.to(torch.int32) for n, t in load_file(weights).items()})
        weights.write_bytes(data)
        config = json.loads((tmp_path / "peftkern_config.json").read_text())
        config["weights_sha256"] = hashlib.sha256(data).hexdigest()
        (tmp_path / "peftkern_config.json").write_text(json.dumps(config))
    else:
        weights.unlink()
    base = tiny_bert()
    error = FileNotFoundError if damage == "missing" else ValueError
    with pytest.raises(
        error, match="int32, not a floating" if damage == "integers" else "peftkern_(weights|config)"
    ):
        peftkern.from_pretrained(base, tmp_path)
    _unchanged(base, tiny_bert())


# --- the model features users rely on ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "adapter", "parallel", "mask"])
def test_torch_compile(method):
    model = randomize_peft_params(peftkern.inject(tiny_bert(), copy.deepcopy(CONFIGS[method])))
    x = ids()
    want = model(x).last_hidden_state
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(x).last_hidden_state
    assert rel_err(got, want) < 1e-6
    got.square().mean().backward()
    grads = [t.grad for t in model.parameters() if t.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("method", ["lora", "adapter", "mask"])
def test_autocast_bfloat16(method):
    model = randomize_peft_params(peftkern.inject(tiny_bert(), copy.deepcopy(CONFIGS[method])))
    x = ids()
    with torch.no_grad():
        want = model(x).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x).last_hidden_state
    assert rel_err(got, want) < 3e-2


@pytest.mark.parametrize("method", ["lora", "parallel", "mask", "adamix"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    def grads(checkpointing):
        model = randomize_peft_params(peftkern.inject(tiny_bert(), copy.deepcopy(CONFIGS[method]))).train()
        if checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
        torch.manual_seed(0)  # AdaMix's routes: the recompute restores the CPU generator, so draws them again
        model(ids()).last_hidden_state.square().mean().backward()
        return {n: t.grad for n, t in model.named_parameters() if t.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        assert ckpt[n] is not None and rel_err(ckpt[n], plain[n]) < 1e-6, n


def test_base_save_pretrained_still_loads_as_the_base(tmp_path):
    base = tiny_bert()
    model = peftkern.inject(copy.deepcopy(base), peftkern.LoRAConfig(r=2))
    model.save_pretrained(tmp_path)
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    for n, t in base.state_dict().items():
        assert torch.equal(reloaded.state_dict()[n], t), n


def test_new_modules_follow_the_model_training_mode():
    model = peftkern.inject(tiny_bert().eval(), peftkern.LoRAConfig(r=2, lora_dropout=0.5))
    assert not any(m.training for m in model.modules())
    randomize_peft_params(model)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)  # no dropout in eval
    model = peftkern.inject(tiny_bert().train(), peftkern.AdapterConfig(bottleneck=3))
    assert all(m.training for m in model.modules())


def test_the_saved_config_is_the_injected_one(tmp_path):
    config = peftkern.AdapterConfig(bottleneck=5, scale=0.5)
    model = randomize_peft_params(peftkern.inject(tiny_bert(), config))
    config.scale = 3.0  # the caller edits or reuses its object afterwards
    edited = peftkern.LoRAConfig(r=2)
    edited.r = 0
    with pytest.raises(ValueError, match="LoRAConfig: r must be in"):
        peftkern.inject(tiny_bert(), edited)  # what inject takes is checked again
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(tiny_bert(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids()).last_hidden_state, model(ids()).last_hidden_state)


def test_tied_lm_head(tmp_path):
    def tied_llama():
        model = tiny_llama()
        model.config.tie_word_embeddings = True
        model.tie_weights()
        assert model.lm_head.weight is model.model.embed_tokens.weight
        return model

    model = randomize_peft_params(
        peftkern.inject(tied_llama(), peftkern.LoRAConfig(r=2, target_modules=["lm_head"]))
    )
    embeddings = model.model.embed_tokens.weight.detach().clone()
    x = ids()
    with torch.no_grad():
        before = model(x).logits
        peftkern.merge(model, verbose=False)
        assert rel_err(model(x).logits, before) < 1e-5
    assert torch.equal(model.model.embed_tokens.weight, embeddings)  # the merge did not leak into them
    model = peftkern.inject(tied_llama(), peftkern.LoRAConfig(r=2, modules_to_save=["lm_head"]))
    randomize_peft_params(model)
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(tied_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_parallel_adapter_needs_a_square_target():
    with pytest.raises(ValueError, match=r"reads encoder.layer.0.intermediate.dense's input \(32 features\)"):
        peftkern.inject(
            tiny_bert(), peftkern.AdapterConfig(placement="parallel", target_modules=["intermediate.dense"])
        )
    model = peftkern.inject(
        tiny_llama(), peftkern.AdapterConfig(placement="parallel", target_modules=["mlp"])
    )
    assert adapter_sites(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]


# --- AdapterDrop ----------------------------------------------------------------------------------------

# (tiny model, placement) -> the adapter sites of block i by the preset
DROP_SITES = {
    ("bert", "houlsby"): ["encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"],
    ("bert", "parallel"): ["encoder.layer.{i}.output"],
    ("llama", "houlsby"): ["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
    ("llama", "parallel"): ["model.layers.{i}.mlp"],
    ("vit", "houlsby"): ["layers.{i}.attention.o_proj", "layers.{i}.mlp.fc2"],  # blocks at the root
}
TINY = {"bert": tiny_bert, "llama": tiny_llama, "vit": tiny_vit}


def output_of(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def run_logged(model, x):
    """The model's output on x and the sites whose adapter ran in that call, in call order."""
    with reference.adapter_calls(model) as ran:
        return output_of(model, x), ran


def drop_model(kind="bert", placement="houlsby", drop_prob=0.5, **config):
    config.setdefault("train_layer_norms", False)  # a dropped adapter alone leaves the base
    return randomize_peft_params(
        peftkern.inject(
            TINY[kind](),
            peftkern.AdapterConfig(bottleneck=5, placement=placement, drop_prob=drop_prob, **config),
        )
    )


def mixed_seed(model, x):
    """The first seed under which a training forward of `model` both runs and skips adapters."""
    sites = adapter_sites(model)
    for seed in range(50):
        torch.manual_seed(seed)
        _, ran = run_logged(model, x)
        if 0 < len(ran) < len(sites):
            return seed, ran
    raise AssertionError("no seed in 50 both ran and skipped an adapter")


@pytest.mark.parametrize("kind, placement", DROP_SITES)
def test_drop_layers_removes_the_lowest_blocks_adapters(kind, placement):
    layers, bottleneck = 4, 3
    per_adapter = 2 * 32 * bottleneck + bottleneck + 32  # down and up weights, their biases
    for n in range(layers):
        config = peftkern.AdapterConfig(
            bottleneck=bottleneck, placement=placement, drop_layers=n, train_layer_norms=False
        )
        model = peftkern.inject(TINY[kind](num_hidden_layers=layers), config)
        want = sorted(s.format(i=i) for i in range(n, layers) for s in DROP_SITES[kind, placement])
        assert adapter_sites(model) == want, n
        trainable = sorted(name for name, t in model.named_parameters() if t.requires_grad)
        assert trainable == sorted(
            f"{s}.adapter.default.{p}"
            for s in want
            for p in ("down.weight", "down.bias", "up.weight", "up.bias")
        )
        assert (
            peftkern.trainable_parameters(model)[0]
            == (layers - n) * len(DROP_SITES[kind, placement]) * per_adapter
        )


def test_drop_layers_with_explicit_targets():
    # a regex naming the block modules themselves ("encoder.layer.N"): the block index is N
    config = peftkern.AdapterConfig(
        bottleneck=3, drop_layers=2, target_modules=r"encoder\.layer\.\d+(\.output\.dense)?"
    )
    model = peftkern.inject(tiny_bert(num_hidden_layers=3), config)
    assert adapter_sites(model) == ["encoder.layer.2", "encoder.layer.2.output.dense"]
    # sites outside the blocks are fine while nothing is dropped
    model = peftkern.inject(
        tiny_bert(), peftkern.AdapterConfig(bottleneck=3, target_modules=["pooler.dense"])
    )
    assert adapter_sites(model) == ["pooler.dense"]


def test_drop_layers_counts_blocks_not_sub_layers():
    """T5 nests its sub-layers in a list of its own (``block.N.layer.M``): the block is N."""
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=4, num_heads=4)
    )
    config = peftkern.AdapterConfig(
        bottleneck=4, drop_layers=1, target_modules=["SelfAttention.o", "DenseReluDense.wo"]
    )
    model = peftkern.inject(t5, config)
    assert adapter_sites(model) == sorted(
        f"encoder.block.{i}.layer.{j}.{s}"
        for i in (1, 2, 3)
        for j, s in ((0, "SelfAttention.o"), (1, "DenseReluDense.wo"))
    )


def test_drop_layers_errors_leave_the_model_unchanged():
    model = tiny_bert(num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"drop_layers=3 removed every adapter"):
        peftkern.inject(model, peftkern.AdapterConfig(drop_layers=3))
    with pytest.raises(ValueError, match=r"drop_layers=7 removed every adapter"):
        peftkern.inject(model, peftkern.AdapterConfig(drop_layers=7, placement="parallel"))
    with pytest.raises(ValueError, match=r"AdapterConfig: drop_layers=1 .* pooler\.dense lies in no"):
        peftkern.inject(
            model, peftkern.AdapterConfig(drop_layers=1, target_modules=["pooler.dense", "output.dense"])
        )
    _unchanged(model, tiny_bert(num_hidden_layers=3))


def test_drop_prob_is_deterministic_under_a_seed():
    x = ids(2, 5)

    def logs(model, seed, calls=8):
        torch.manual_seed(seed)
        runs = [run_logged(model, x) for _ in range(calls)]
        return torch.stack([out for out, _ in runs]), [ran for _, ran in runs]

    a, b = drop_model().train(), drop_model().train()
    out_a, ran_a = logs(a, 0)
    out_b, ran_b = logs(b, 0)
    assert torch.equal(out_a, out_b) and ran_a == ran_b
    sites = adapter_sites(a)
    assert len({tuple(r) for r in ran_a}) > 1  # a fresh draw per call, not one per model
    assert 0 < sum(map(len, ran_a)) < len(sites) * len(ran_a)
    out_c, ran_c = logs(a, 1)
    assert ran_c != ran_a and not torch.equal(out_c, out_a)  # the seed decides


@pytest.mark.parametrize(
    "kind, placement", [("bert", "houlsby"), ("bert", "parallel"), ("llama", "parallel")]
)
def test_a_skipped_adapter_computes_as_if_absent(kind, placement):
    """A training forward equals that of the model without drops whose skipped adapters add nothing
    (zero up-projection), and only the adapters that ran get gradients."""
    x = ids(2, 5)
    model = drop_model(kind, placement).train()
    seed, ran = mixed_seed(model, x)
    torch.manual_seed(seed)
    out, ran_again = run_logged(model, x)
    assert ran_again == ran
    out.square().mean().backward()
    want = drop_model(kind, placement, drop_prob=0.0).train()
    for name, m in want.named_modules():
        if name in adapter_sites(want) and name not in ran:
            with torch.no_grad():
                adapter_of(m).up.weight.zero_()
                adapter_of(m).up.bias.zero_()
    assert rel_err(out, output_of(want, x)) < 1e-6
    for name, m in model.named_modules():
        if name in adapter_sites(model):
            grads = [t.grad for t in adapter_of(m).parameters()]
            if name in ran:
                assert all(g is not None and g.abs().sum() > 0 for g in grads), name
            else:
                assert all(g is None for g in grads), name


def test_drop_rate_is_drop_prob():
    p, calls = 0.3, 400
    model = drop_model(drop_prob=p).train()
    sites = adapter_sites(model)
    x = ids(1, 3)
    torch.manual_seed(0)
    with torch.no_grad():
        skipped = torch.tensor([[s not in run_logged(model, x)[1] for s in sites] for _ in range(calls)])
    skipped = skipped.double()
    # each adapter's rate, over `calls` Bernoulli(p) draws, within 4 binomial standard deviations
    tol = 4 * (p * (1 - p) / calls) ** 0.5
    assert ((skipped.mean(0) - p).abs() <= tol).all(), skipped.mean(0)
    # all the draws together
    n = skipped.numel()
    assert abs(skipped.mean().item() - p) <= 4 * (p * (1 - p) / n) ** 0.5
    # independent per adapter: two adapters skip together at rate p^2 (one shared draw would give p)
    both = (skipped[:, 0] * skipped[:, -1]).mean().item()
    assert abs(both - p * p) <= 4 * (p * p * (1 - p * p) / calls) ** 0.5, both
    # and per call: an adapter skips in two calls running at rate p^2
    again = (skipped[1:] * skipped[:-1]).mean().item()
    assert abs(again - p * p) <= 4 * (p * p * (1 - p * p) / ((calls - 1) * len(sites))) ** 0.5, again


def test_drop_draws_on_the_cpu_whatever_the_default_device():
    x = ids(2, 5)
    model = drop_model(drop_prob=0.5).train()
    torch.manual_seed(4)
    want, ran = run_logged(model, x)
    torch.manual_seed(4)
    with torch.device("meta"):  # a draw on the default device would be a meta tensor here
        got, ran_meta = run_logged(model, x)
    assert ran_meta == ran and torch.equal(got, want)


def test_eval_never_drops_and_draws_nothing():
    model = drop_model(drop_prob=0.9).eval()
    x = ids(2, 5)
    state = torch.get_rng_state()
    with torch.no_grad():
        runs = [run_logged(model, x) for _ in range(30)]
    assert all(sorted(ran) == adapter_sites(model) for _, ran in runs)
    assert all(torch.equal(out, runs[0][0]) for out, _ in runs)
    assert torch.equal(torch.get_rng_state(), state)  # no draw in eval mode
    # drop_prob = 0 (the default) draws nothing in training either: the RNG streams stay as they were
    model = drop_model(drop_prob=0.0).train()
    state = torch.get_rng_state()
    _, ran = run_logged(model, x)
    assert sorted(ran) == adapter_sites(model) and torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kind, placement", [k for k in DROP_SITES if k[0] != "vit"])
def test_drop_prob_near_one_gives_the_base_model(kind, placement):
    x = ids(2, 5)
    base = TINY[kind]().train()
    model = drop_model(kind, placement, drop_prob=0.999).train()
    with torch.no_grad():
        want = output_of(base, x)
        assert rel_err(output_of(model.eval(), x), want) > 1e-3  # the adapters do act when they run
    model.train()
    torch.manual_seed(0)
    out, ran = run_logged(model, x)
    assert ran == [] and torch.equal(out, want)
    # no adapter joined the graph, so none can get a gradient (the base is frozen); with drop_prob = 0
    # the same forward does reach them
    assert not out.requires_grad
    assert output_of(drop_model(kind, placement, drop_prob=0.0).train(), x).requires_grad


@pytest.mark.parametrize("placement", ["houlsby", "parallel"])
def test_drop_prob_under_gradient_checkpointing(placement):
    x = ids()
    seed, ran = mixed_seed(drop_model(placement=placement).train(), x)

    def grads(checkpointing):
        model = drop_model(placement=placement).train()
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
        torch.manual_seed(seed)
        out, ran_now = run_logged(model, x)
        out.square().mean().backward()
        return ran_now, {n: t.grad for n, t in model.named_parameters() if t.requires_grad}

    (ran_plain, plain), (ran_ckpt, ckpt) = grads(False), grads(True)
    assert ran_plain == ran and ran_ckpt[: len(ran)] == ran  # the recompute runs them again
    assert plain.keys() == ckpt.keys()
    for n in plain:
        if plain[n] is None:  # a skipped adapter
            assert ckpt[n] is None, n
        else:
            assert ckpt[n] is not None and rel_err(ckpt[n], plain[n]) < 1e-6, n
    assert any(g is None for g in plain.values()) and any(g is not None for g in plain.values())


def test_adapterdrop_round_trips(tmp_path):
    import json

    from peftkern.integrations.config import config_from_dict
    from peftkern.integrations.inject import injection_state

    config = peftkern.AdapterConfig(bottleneck=5, placement="parallel", drop_layers=1, drop_prob=0.4)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = randomize_peft_params(peftkern.inject(tiny_bert(num_hidden_layers=3), config))
    peftkern.save_pretrained(model, tmp_path)
    saved = json.loads((tmp_path / "peftkern_config.json").read_text())
    assert saved["drop_layers"] == 1 and saved["drop_prob"] == 0.4
    loaded = peftkern.from_pretrained(tiny_bert(num_hidden_layers=3), tmp_path)
    assert (
        adapter_sites(loaded) == adapter_sites(model) == ["encoder.layer.1.output", "encoder.layer.2.output"]
    )
    assert injection_state(loaded).config == config
    # the loaded model drops as the saved one did: same draws, same skipped adapters, same outputs
    x = ids(2, 5)
    model.train(), loaded.train()
    calls = 0
    for seed in range(6):
        torch.manual_seed(seed)
        out, ran = run_logged(model, x)
        torch.manual_seed(seed)
        out_loaded, ran_loaded = run_logged(loaded, x)
        assert ran_loaded == ran and torch.equal(out_loaded, out), seed
        calls += len(ran)
    assert 0 < calls < 6 * 2  # some adapters ran and some were skipped


# --- AdaMix and AdapterFusion through inject -------------------------------------------------------------


def test_adamix_sites_train_as_the_eager_twin():
    config = peftkern.AdapterConfig(bottleneck=5, num_experts=3, train_layer_norms=False)
    model = peftkern.inject(tiny_bert(), config)
    assert adapter_sites(model, AdaMixAdapter) == adapter_sites(model) and len(adapter_sites(model)) == 4
    assert peftkern.trainable_parameters(model)[0] == 4 * 3 * (2 * 32 * 5 + 5 + 32)
    model = randomize_peft_params(model).train()
    twin = reference.eager_twin(model)
    x = ids()
    for seed in range(3):  # each forward draws each site's route from the CPU generator
        torch.manual_seed(seed)
        got = model(x).last_hidden_state
        torch.manual_seed(seed)
        want = twin(x).last_hidden_state
        assert rel_err(got, want) < 1e-6, seed
    routes = {m.last_route for m in model.modules() if isinstance(m, AdaMixAdapter)}
    assert all(r is not None for r in routes) and len(routes) > 1  # independent per site
    got.square().mean().backward()
    want.square().mean().backward()
    twin_params = dict(twin.named_parameters())
    for n, t in model.named_parameters():
        if t.requires_grad:
            assert rel_err(t.grad, twin_params[n].grad) < 1e-5, n
    model.eval(), twin.eval()  # eval: the experts' means, no draw
    with torch.no_grad():
        assert rel_err(model(x).last_hidden_state, twin(x).last_hidden_state) < 1e-6


def save_sources(tmp_path, n=2, kind="bert", **config):
    """n adapters (random weights, seeds 10, 11, ...) saved as fusion sources; {name: dir}, [models]."""
    config = {"bottleneck": 5, **config}
    dirs, models = {}, []
    for k in range(n):
        model = randomize_peft_params(peftkern.inject(TINY[kind](), peftkern.AdapterConfig(**config)), 10 + k)
        path = tmp_path / f"task{k}"
        peftkern.save_pretrained(model, path)
        dirs[f"task{k}"] = str(path)
        models.append(model)
    return dirs, models


def test_fusion_over_saved_adapters(tmp_path):
    dirs, sources = save_sources(tmp_path, 3)
    # named out of order: the adapters stack in the order of their names
    config = peftkern.AdapterConfig(bottleneck=5, fusion={"task2": dirs["task2"], "task0": dirs["task0"]})
    assert list(config.fusion) == ["task0", "task2"]
    model = peftkern.inject(tiny_bert(), config)
    sites = adapter_sites(model, AdapterFusion)
    assert sites == adapter_sites(sources[0]) and len(sites) == 4
    # only the fusion's query, key and value train (AdapterFusion's second stage)
    trainable = sorted(n for n, t in model.named_parameters() if t.requires_grad)
    assert trainable == sorted(
        f"{s}.adapter.default.{p}"
        for s in sites
        for p in ("query.weight", "query.bias", "key.weight", "key.bias", "value.weight")
    )
    assert peftkern.trainable_parameters(model)[0] == 4 * (3 * 32 * 32 + 2 * 32)
    # the fusion's own init (random query and key, identity value): larger random projections saturate
    # the softmax over the adapters, and the query's and key's gradients vanish
    modules = dict(model.named_modules())
    h = torch.randn(3, 7, 32)
    for site in sites:
        fusion = adapter_of(modules[site])
        chosen = [
            adapter_of(dict(sources[0].named_modules())[site]),
            adapter_of(dict(sources[2].named_modules())[site]),
        ]
        with torch.no_grad():
            stack = torch.stack([a(h) - h for a in chosen], dim=-2)  # each adapter's branch
            want = reference.adapter_fusion(
                h,
                stack,
                fusion.query.weight,
                fusion.query.bias,
                fusion.key.weight,
                fusion.key.bias,
                fusion.value.weight,
            )
            assert rel_err(fusion(h), want) < 1e-5, site
    # the whole model: the eager twin (AdapterHub's computation) in training, forward and gradients
    model.train()
    twin = reference.eager_twin(model)
    x = ids()
    out, twin_out = model(x).last_hidden_state, twin(x).last_hidden_state
    assert rel_err(out, twin_out) < 1e-5
    # a random projection of the output (its squares' mean is about 1 after the last LayerNorm, with
    # vanishing gradients)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * probe).sum().backward()
    (twin_out * probe).sum().backward()
    twin_params, params = dict(twin.named_parameters()), dict(model.named_parameters())
    for n, t in model.named_parameters():
        if n.endswith(
            ".adapter.default.key.bias"
        ):  # no gradient in exact arithmetic (it adds q . b to every score): rounding
            scale = params[n.replace("bias", "weight")].grad.norm()
            assert t.grad.norm() < 1e-4 * scale and twin_params[n].grad.norm() < 1e-4 * scale, n
        elif n in trainable:
            assert t.grad is not None and rel_err(t.grad, twin_params[n].grad) < 1e-4, n
        else:
            assert t.grad is None, n


def test_fusion_checkpoint_holds_its_adapters(tmp_path, capsys):
    import shutil

    dirs, _ = save_sources(tmp_path / "sources", placement="parallel")
    model = peftkern.inject(
        tiny_bert(), peftkern.AdapterConfig(bottleneck=5, placement="parallel", fusion=dirs)
    )
    randomize_peft_params(model)
    peftkern.save_pretrained(model, tmp_path / "fusion")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "fusion" / "peftkern_weights.safetensors")
    assert sorted(saved) == sorted(  # under the names a model of that adapter alone had before names
        n.replace(".adapter.default.", ".adapter.")
        for n, _ in model.named_parameters()
        if n.startswith("encoder.layer.") and ".adapter." in n
    )
    assert any(".adapter.adapters.down_weight" in n for n in saved)  # the frozen adapters too
    shutil.rmtree(tmp_path / "sources")  # from_pretrained does not read the sources
    loaded = peftkern.from_pretrained(tiny_bert(), tmp_path / "fusion")
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)
    assert peftkern.trainable_parameters(loaded) == peftkern.trainable_parameters(model)
    assert [n for n, t in loaded.named_parameters() if t.requires_grad] == [
        n for n, t in model.named_parameters() if t.requires_grad
    ]
    # but inject does: the same config on a fresh base finds them gone, and changes nothing
    fresh = tiny_bert()
    with pytest.raises(ValueError, match=r"fusion\['task0'\] .* is missing"):
        peftkern.inject(fresh, peftkern.AdapterConfig(bottleneck=5, placement="parallel", fusion=dirs))
    _unchanged(fresh, tiny_bert())
    # merge keeps the fusions
    with torch.no_grad():
        before = loaded(x).last_hidden_state
        peftkern.merge(loaded)
        assert torch.equal(loaded(x).last_hidden_state, before)
    assert "2 adapter fusions kept" in capsys.readouterr().out


@pytest.mark.parametrize(
    "source, fusion, message",
    [
        (dict(activation="relu"), {}, r"has activation='relu', the fusion 'gelu'"),
        (dict(scale=2.0), {}, r"has scale=2.0, the fusion 1.0"),
        (
            dict(placement="pfeiffer"),
            {},
            r"places adapters at \['encoder.layer.0.output.dense', .*the fusion at",
        ),
        (dict(drop_layers=1), {}, r"places adapters at"),
        (dict(bottleneck=4), {}, r"has bottleneck 4 at encoder.layer.0.attention.output.dense, the fusion 5"),
        (dict(num_experts=2), {}, r"must be a checkpoint of single adapters"),
        ({}, dict(bottleneck=None, reduction_factor=8), r"has bottleneck 5 at .*, the fusion 4"),
    ],
)
def test_fusion_refuses_sources_that_do_not_match(tmp_path, source, fusion, message):
    dirs, _ = save_sources(tmp_path, **source)
    model = tiny_bert()
    config = peftkern.AdapterConfig(**{"bottleneck": 5, **fusion, "fusion": dirs})
    with pytest.raises(ValueError, match=r"AdapterConfig: fusion\['task0'\] \(.*task0\) " + message):
        peftkern.inject(model, config)
    _unchanged(model, tiny_bert())


def test_fusion_takes_a_source_by_its_sites(tmp_path):
    """A source whose target_modules name the preset's sites fits; its modules_to_save (a task head)
    are not read: the fusion trains and saves its own."""
    source = peftkern.AdapterConfig(bottleneck=5, target_modules=["output.dense"], modules_to_save=["pooler"])
    peftkern.save_pretrained(randomize_peft_params(peftkern.inject(tiny_bert(), source)), tmp_path / "a")
    config = peftkern.AdapterConfig(bottleneck=5, fusion={"a": tmp_path / "a"}, modules_to_save=["pooler"])
    model = peftkern.inject(tiny_bert(), config)
    assert len(adapter_sites(model, AdapterFusion)) == 4
    head = model.pooler.peftkern_copies["default"]  # the fusion's own copy of the head
    assert torch.equal(head.dense.weight, tiny_bert().pooler.dense.weight)
    assert head.dense.weight.requires_grad


def test_fusion_refuses_a_source_reading_another_tensor(tmp_path):
    """On BERT the parallel preset reads BertOutput's residual argument (the FFN input); a source
    placed by target_modules on the same modules read their first argument (the FFN's hidden
    activation): the same names and shapes, another computation."""
    source = peftkern.AdapterConfig(
        bottleneck=5, placement="parallel", target_modules=r"encoder\.layer\.\d+\.output"
    )
    bert = functools.partial(tiny_bert, intermediate_size=32)  # the FFN as wide as the model
    peftkern.save_pretrained(peftkern.inject(bert(), source), tmp_path / "a")
    model = bert()
    with pytest.raises(
        ValueError,
        match=r"fusion\['a'\] .*'s adapter at encoder.layer.0.output reads the module's input, the fusion's "
        r"the module's argument input_tensor",
    ):
        peftkern.inject(
            model, peftkern.AdapterConfig(bottleneck=5, placement="parallel", fusion={"a": tmp_path / "a"})
        )
    _unchanged(model, bert())


def test_fusion_refuses_other_checkpoints(tmp_path):
    model = tiny_bert()
    lora = peftkern.inject(tiny_bert(), peftkern.LoRAConfig(r=2))
    peftkern.save_pretrained(lora, tmp_path / "lora")
    with pytest.raises(
        ValueError, match=r"fusion\['a'\] .* must be a checkpoint of single adapters.*LoRAConfig"
    ):
        peftkern.inject(model, peftkern.AdapterConfig(bottleneck=5, fusion={"a": tmp_path / "lora"}))
    dirs, _ = save_sources(tmp_path / "src")
    fused = peftkern.inject(tiny_bert(), peftkern.AdapterConfig(bottleneck=5, fusion=dirs))
    peftkern.save_pretrained(fused, tmp_path / "fusion")
    with pytest.raises(ValueError, match=r"fusion\['a'\] .* must be a checkpoint of single adapters"):
        peftkern.inject(model, peftkern.AdapterConfig(bottleneck=5, fusion={"a": tmp_path / "fusion"}))
    # another architecture's adapters
    llama_dirs, _ = save_sources(tmp_path / "llama", kind="llama")
    with pytest.raises(
        ValueError, match=r"fusion\['task0'\] .* has encoder.layer.0.attention.* which .* lacks"
    ):
        peftkern.inject(model, peftkern.AdapterConfig(bottleneck=5, fusion=llama_dirs))
    # a damaged source (one flipped byte in its weights)
    weights = tmp_path / "src" / "task1" / "peftkern_weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"fusion\['task1'\] .* does not match the SHA-256"):
        peftkern.inject(model, peftkern.AdapterConfig(bottleneck=5, fusion=dirs))
    # a damaged source config: a ValueError naming the source and the field
    config_file = tmp_path / "src" / "task0" / "peftkern_config.json"
    config_file.write_text(config_file.read_text().replace('"drop_prob": 0.0', '"drop_prob": true'))
    with pytest.raises(ValueError, match=r"fusion\['task0'\] .*AdapterConfig: drop_prob"):
        peftkern.inject(model, peftkern.AdapterConfig(bottleneck=5, fusion=dirs))
    _unchanged(model, tiny_bert())
