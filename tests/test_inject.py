"""peftkern.inject on tiny random Hugging Face models: where the presets put each method, what the
injected blocks compute, save/load and merge, the bad-input errors, and the model features users
rely on (generate, torch.compile, autocast, gradient checkpointing, the base's save_pretrained)."""

import copy
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkern
from peftkern.nn import Adapter, LoRALinear, MaskedLinear
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


def names_of(model, cls):
    return sorted(n for n, m in model.named_modules() if isinstance(m, cls))


def adapter_sites(model):
    return sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "adapter", None), Adapter))


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
    assert trainable == len(adapter_sites(model)) * (2 * 32 * 5 + 5 + 32)


def test_llama_presets():
    model = peftkern.inject(tiny_llama(), peftkern.AdapterConfig(bottleneck=4))
    assert adapter_sites(model) == sorted(
        f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.o_proj", "mlp.down_proj")
    )
    model = peftkern.inject(tiny_llama(), peftkern.AdapterConfig(bottleneck=4, placement="parallel"))
    assert adapter_sites(model) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    model = peftkern.inject(tiny_llama(), peftkern.LoRAConfig(r=4))
    assert names_of(model, LoRALinear) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    # GQA: k/v project to 2 heads of 8 = 16 features
    assert peftkern.trainable_parameters(model)[0] == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    model = peftkern.inject(tiny_llama(), peftkern.MaskConfig())
    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert len(names_of(model, MaskedLinear)) == 2 * len(linears)
    assert type(model.lm_head) is nn.Linear  # the head is no block's linear


def test_vit_presets():
    model = peftkern.inject(tiny_vit(), peftkern.AdapterConfig(bottleneck=4))
    assert adapter_sites(model) == sorted(
        f"layers.{i}.{s}" for i in range(2) for s in ("attention.o_proj", "mlp.fc2")
    )
    model = peftkern.inject(tiny_vit(), peftkern.LoRAConfig(r=2))
    assert names_of(model, LoRALinear) == sorted(
        f"layers.{i}.attention.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    model = peftkern.inject(tiny_vit(), peftkern.MaskConfig())
    assert len(names_of(model, MaskedLinear)) == 2 * 6
    assert type(model.pooler.dense) is nn.Linear


def test_target_modules_suffixes_and_regex():
    model = peftkern.inject(
        tiny_bert(), peftkern.LoRAConfig(r=2, target_modules=["key", "intermediate.dense"])
    )
    assert names_of(model, LoRALinear) == sorted(
        f"encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.self.key", "intermediate.dense")
    )
    model = peftkern.inject(
        tiny_bert(), peftkern.LoRAConfig(r=2, target_modules=r"encoder\.layer\.1\..*query")
    )
    assert names_of(model, LoRALinear) == ["encoder.layer.1.attention.self.query"]


# --- what the injected blocks compute -------------------------------------------------------------


def _bert_attention_output(so, h, x):  # BertSelfOutput written out
    return so.LayerNorm(F.linear(h, so.dense.weight, so.dense.bias) + x)


def test_houlsby_adapters_sit_before_each_residual_add():
    model = randomize_peft_params(peftkern.inject(tiny_bert(), peftkern.AdapterConfig(bottleneck=5)))
    layer = model.encoder.layer[0]
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        so, a = layer.attention.output, layer.attention.output.dense.adapter
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
        a = out.adapter
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
        a = mlp.adapter
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
    assert trainable and all(n.endswith(".bias") for n in trainable)
    # per layer q, k, v, o, intermediate, output, two LayerNorms; the embeddings' LayerNorm; the pooler
    assert peftkern.trainable_parameters(model)[0] == 2 * (4 * 32 + 48 + 32 + 2 * 32) + 32 + 32
    model = peftkern.inject(tiny_bert(), peftkern.BitFitConfig(bias_names=["query.bias", "value.bias"]))
    assert peftkern.trainable_parameters(model)[0] == 2 * 2 * 32


def test_modules_to_save_train_and_round_trip(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(tiny_bert().config).eval()

    model = peftkern.inject(fresh(), peftkern.LoRAConfig(r=2, modules_to_save=["classifier"]))
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
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
}


@pytest.mark.parametrize("method", CONFIGS)
def test_save_load_round_trip(tmp_path, method):
    model = randomize_peft_params(peftkern.inject(tiny_bert(), copy.deepcopy(CONFIGS[method])))
    peftkern.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["peftkern_config.json", "peftkern_weights.safetensors"]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "peftkern_weights.safetensors")
    assert sorted(saved) == sorted(n for n, t in model.named_parameters() if t.requires_grad)
    loaded = peftkern.from_pretrained(tiny_bert(), tmp_path)
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).last_hidden_state, model(x).last_hidden_state)
    assert peftkern.trainable_parameters(loaded) == peftkern.trainable_parameters(model)


@pytest.mark.parametrize("method", ["lora", "adapter", "mask"])
def test_merge(method, capsys):
    model = randomize_peft_params(peftkern.inject(tiny_bert(), copy.deepcopy(CONFIGS[method])))
    if method == "mask":  # drop about half the weights
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, MaskedLinear):
                    m.scores.uniform_(0, 2 * m.threshold)
    x = ids()
    with torch.no_grad():
        before = model(x).last_hidden_state
        assert peftkern.merge(model) is model
        after = model(x).last_hidden_state
    said = capsys.readouterr().out
    assert rel_err(after, before) < 1e-5
    assert not names_of(model, LoRALinear) and not names_of(model, MaskedLinear)
    if method == "lora":
        assert "LoRA merged into 4 linear layers" in said
    elif method == "mask":
        assert "12 masks baked" in said
    else:
        assert "4 adapters kept" in said and len(adapter_sites(model)) == 4
    with pytest.raises(ValueError, match="merged"):
        peftkern.save_pretrained(model, "unused")


# --- bad input --------------------------------------------------------------------------------------


def test_inject_twice_raises():
    model = peftkern.inject(tiny_bert(), peftkern.LoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"already injected .*LoRAConfig\(r=2"):
        peftkern.inject(model, peftkern.AdapterConfig())
    with pytest.raises(
        ValueError,
        match=r"already injected \(its submodule layer.0.attention.self.query holds a peftkern LoRALinear",
    ):
        peftkern.inject(model.encoder, peftkern.BitFitConfig())
    with pytest.raises(ValueError, match="its submodule encoder"):
        outer = nn.Sequential()
        outer.add_module("encoder", model)
        peftkern.inject(outer, peftkern.BitFitConfig())


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
    assert not hasattr(model, "_peftkern") and not names_of(model, LoRALinear)


def test_unknown_architecture_asks_for_target_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    for config in (peftkern.LoRAConfig(), peftkern.MaskConfig(), peftkern.AdapterConfig()):
        with pytest.raises(
            ValueError, match=f"{type(config).__name__}: no preset for model_type None.*pass target_modules"
        ):
            peftkern.inject(model, config)
    model = peftkern.inject(model, peftkern.LoRAConfig(r=2, target_modules=["0", "2"]))
    assert names_of(model, LoRALinear) == ["0", "2"]


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
        config_from_dict({"method": "ia3"})
    with pytest.raises(ValueError, match=r"LoRAConfig: unknown fields \['rank'\]"):
        config_from_dict({"method": "lora", "rank": 4})


def _unchanged(model, reference_model):
    assert not hasattr(model, "_peftkern")
    assert not names_of(model, LoRALinear) and not adapter_sites(model)
    assert all(t.requires_grad for t in model.parameters())
    for (n, a), (_, b) in zip(model.state_dict().items(), reference_model.state_dict().items()):
        assert torch.equal(a, b), n


def test_from_pretrained_refuses_a_mismatched_base(tmp_path):
    model = randomize_peft_params(peftkern.inject(tiny_bert(), peftkern.AdapterConfig(bottleneck=5)))
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


@pytest.mark.parametrize("method", ["lora", "parallel", "mask"])
def test_gradient_checkpointing_gives_the_same_gradients(method):
    def grads(checkpointing):
        model = randomize_peft_params(peftkern.inject(tiny_bert(), copy.deepcopy(CONFIGS[method]))).train()
        if checkpointing:  # transformers 5 renamed gradient_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
            enable()
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
