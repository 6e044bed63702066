"""AdapterConfig(train_layer_norms=...): each adapter's own copy of the affine parameters of the layer
norms in its blocks (Houlsby et al. 2019 train them with the adapters), against a written-out twin: a
fresh base whose norms carry the adapter's values and whose sites add the eager adapter formula."""

import pytest
import torch
import torch.nn.functional as F

import peftkern
from peftkern.integrations.config import config_from_dict
from peftkern.integrations.methods.adapter import _norm_kind
from tests.tiny_models import bert, llama, t5

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

MODELS = {"bert": bert, "llama": llama}
NORM = "adapter_norm"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ids(seed=1, n=3, length=7):
    return torch.randint(0, 97, (n, length), generator=torch.Generator().manual_seed(seed))


def out_of(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def randomize(model, name, seed):
    """Random values in adapter `name`'s parameters: its adapters and its norm copies (about 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in model.named_parameters():
            if f".{name}." in n and t.requires_grad:
                base = 1.0 if n.endswith(f"{NORM}.{name}.weight") else 0.0
                t.copy_(base + 0.2 * torch.randn(t.shape, generator=g))
    return model


def twin_of(kind, model, name):
    """A fresh base (eager, no peftkern): its block norms set to adapter `name`'s copies, and a hook at
    each site adding the adapter written out: h + scale * up(gelu(down(h)))."""
    twin = MODELS[kind]()
    modules, twin_modules = dict(model.named_modules()), dict(twin.named_modules())
    with torch.no_grad():
        for n, m in modules.items():
            if hasattr(m, NORM) and name in getattr(m, NORM):
                for p, t in getattr(m, NORM)[name].named_parameters():
                    getattr(twin_modules[n], p).copy_(t)
    for n, m in modules.items():
        holder = getattr(m, "adapter", None)
        if isinstance(holder, torch.nn.ModuleDict) and name in holder:
            a = holder[name]
            wd, bd, wu, bu = (
                t.detach().clone() for t in (a.down.weight, a.down.bias, a.up.weight, a.up.bias)
            )

            def hook(mod, args, out, wd=wd, bd=bd, wu=wu, bu=bu, s=a.scale):
                return out + s * F.linear(F.gelu(F.linear(out, wd, bd)), wu, bu)

            twin_modules[n].register_forward_hook(hook)
    return twin


def norm_names(model, name="default"):
    return sorted(n for n, m in model.named_modules() if hasattr(m, NORM) and name in getattr(m, NORM))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_output_and_gradients_match_the_written_out_block(kind):
    model = randomize(
        peftkern.inject(MODELS[kind](), peftkern.AdapterConfig(bottleneck=5, train_layer_norms=True)),
        "default",
        3,
    )
    norms = norm_names(model)
    expected = {
        "bert": [
            f"encoder.layer.{i}.{p}.LayerNorm" for i in range(2) for p in ("attention.output", "output")
        ],
        "llama": [
            f"model.layers.{i}.{p}" for i in range(2) for p in ("input_layernorm", "post_attention_layernorm")
        ],
    }[kind]
    assert norms == sorted(expected)  # the blocks' norms; not Llama's final model.norm nor BERT's embeddings'
    twin = twin_of(kind, model, "default")
    for p in twin.parameters():
        p.requires_grad_(False)  # frozen, then the norms' affine trains
    twin_norms = dict(twin.named_modules())
    for n in norms:
        for p in twin_norms[n].parameters():
            p.requires_grad_(True)
    x = ids()
    got, want = out_of(model, x), out_of(twin, x)
    assert rel_err(got, want) < 1e-5
    probe = torch.randn(got.shape, generator=torch.Generator().manual_seed(4))
    (got * probe).sum().backward()
    (want * probe).sum().backward()
    modules = dict(model.named_modules())
    for n in norms:
        base, copy = modules[n], getattr(modules[n], NORM)["default"]
        for p, t in copy.named_parameters():
            assert t.grad is not None and t.grad.abs().sum() > 0, (n, p)
            assert rel_err(t.grad, getattr(twin_norms[n], p).grad) < 1e-5, (n, p)
            assert getattr(base, p).grad is None and not getattr(base, p).requires_grad  # the base's: frozen


def test_save_load_round_trip(tmp_path):
    model = randomize(
        peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5, train_layer_norms=True)), "default", 5
    )
    x = ids()
    with torch.no_grad():
        want = out_of(model, x)
    peftkern.save_pretrained(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "peftkern_weights.safetensors")
    assert "encoder.layer.0.attention.output.LayerNorm.adapter_norm.weight" in saved
    assert "encoder.layer.1.output.LayerNorm.adapter_norm.bias" in saved
    assert not any("embeddings" in k for k in saved)
    loaded = peftkern.from_pretrained(bert(), tmp_path)
    with torch.no_grad():
        assert torch.equal(out_of(loaded, x), want)


def test_two_adapters_each_their_own_norms_and_a_mixed_batch():
    model = peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5, train_layer_norms=True), name="a")
    peftkern.inject(model, peftkern.AdapterConfig(bottleneck=4, train_layer_norms=True), name="b")
    randomize(model, "a", 6), randomize(model, "b", 7)
    twins = {n: twin_of("bert", model, n) for n in ("a", "b")}
    base = bert()
    x = ids(n=4)
    with torch.no_grad():
        outs = {n: out_of(twins[n], x) for n in twins}
        base_out = out_of(base, x)
        for n in ("a", "b"):
            peftkern.set_active(model, n)
            assert rel_err(out_of(model, x), outs[n]) < 1e-5, n
        assert rel_err(outs["a"], outs["b"]) > 1e-2
        with peftkern.tasks(["b", None, "a", "b"]):  # each sample its own norms' affine
            mixed = out_of(model, x)
        for i, want in enumerate([outs["b"][0], base_out[1], outs["a"][2], outs["b"][3]]):
            assert rel_err(mixed[i], want) < 1e-5, i
        peftkern.set_active(model, None)
        assert rel_err(out_of(model, x), base_out) < 1e-6
    with pytest.raises(ValueError, match=r"adapters \['a', 'b'\] cannot apply together .*\(layer norm\)"):
        peftkern.set_active(model, ["a", "b"])


def test_mixed_batch_gradients_reach_each_adapters_copies_from_its_samples():
    model = peftkern.inject(llama(), peftkern.AdapterConfig(bottleneck=4, train_layer_norms=True), name="a")
    peftkern.inject(model, peftkern.AdapterConfig(bottleneck=4, train_layer_norms=True), name="b")
    randomize(model, "a", 8), randomize(model, "b", 9)
    x = ids(n=2)
    with peftkern.tasks(["a", None]):
        out_of(model, x).square().mean().backward()
    copies = dict(model.named_modules())["model.layers.0.input_layernorm"].adapter_norm
    assert copies["a"].weight.grad.abs().sum() > 0 and copies["b"].weight.grad is None
    # sample 0 alone through "a": the same gradient as its row of the mixed batch
    grad = copies["a"].weight.grad.clone()
    copies["a"].weight.grad = None
    model.zero_grad()
    peftkern.set_active(model, "a")
    (out_of(model, x[:1]).square().sum() / out_of(model, x).numel()).backward()
    assert rel_err(copies["a"].weight.grad, grad) < 1e-5


def test_delete_restores_the_base_and_merge_folds_the_norms():
    base = bert()
    state = {n: t.clone() for n, t in base.state_dict().items()}
    model = randomize(
        peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5, train_layer_norms=True)), "default", 10
    )
    x = ids()
    peftkern.delete_adapter(model, "default")
    assert not norm_names(model) and not any(hasattr(m, "_peftkern_norm_hook") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(out_of(model, x), out_of(base, x))
    for n, t in model.state_dict().items():
        assert torch.equal(t, state[n]), n
    model = randomize(
        peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5, train_layer_norms=True)), "default", 11
    )
    twin = twin_of("bert", model, "default")
    peftkern.merge(model, verbose=False)
    modules = dict(model.named_modules())
    ln = "encoder.layer.1.output.LayerNorm"
    assert torch.equal(modules[ln].weight, dict(twin.named_modules())[ln].weight)  # folded into the base's
    assert not hasattr(modules[ln], NORM)
    with torch.no_grad():
        assert rel_err(out_of(model, x), out_of(twin, x)) < 1e-5


def test_t5_norms_in_encoder_and_decoder_blocks():
    model = peftkern.inject(t5(), peftkern.AdapterConfig(bottleneck=4, train_layer_norms=True))
    norms = norm_names(model)
    assert norms and all(".block." in n and n.endswith("layer_norm") for n in norms)
    assert "encoder.final_layer_norm" not in norms and "decoder.final_layer_norm" not in norms
    # at their init (the base's values) the copies give the base model's output
    x = ids(n=2, length=5)
    fresh = t5()
    with torch.no_grad():
        got = model(input_ids=x, decoder_input_ids=x).logits
        want = fresh(input_ids=x, decoder_input_ids=x).logits
    assert rel_err(got, want) < 1e-6


def test_defaults_follow_the_placements_paper():
    # None: houlsby trains the norms (Houlsby et al. 2019); pfeiffer, parallel and a fusion do not
    assert peftkern.AdapterConfig().trains_layer_norms()
    assert peftkern.AdapterConfig(phm_dim=4).trains_layer_norms()  # Compacter's houlsby placement
    assert not peftkern.AdapterConfig(train_layer_norms=False).trains_layer_norms()
    assert not peftkern.AdapterConfig(placement="pfeiffer").trains_layer_norms()
    assert not peftkern.AdapterConfig(placement="parallel").trains_layer_norms()
    assert not peftkern.AdapterConfig(fusion={"a": "x"}).trains_layer_norms()
    assert peftkern.AdapterConfig(placement="pfeiffer", train_layer_norms=True).trains_layer_norms()
    every_block_norm = [
        f"encoder.layer.{i}.{p}.LayerNorm" for i in range(2) for p in ("attention.output", "output")
    ]
    assert norm_names(peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5))) == every_block_norm
    model = peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5, train_layer_norms=False))
    assert not norm_names(model)
    model = peftkern.inject(bert(), peftkern.AdapterConfig(bottleneck=5, placement="pfeiffer"))
    assert not norm_names(model)
    model = peftkern.inject(
        bert(), peftkern.AdapterConfig(bottleneck=5, placement="pfeiffer", train_layer_norms=True)
    )
    assert norm_names(model) == every_block_norm


def test_a_checkpoint_saved_before_the_field_trained_no_norm():
    saved = peftkern.AdapterConfig(bottleneck=5).to_dict()
    del saved["train_layer_norms"]
    assert config_from_dict(saved).train_layer_norms is False
    assert config_from_dict(peftkern.AdapterConfig(bottleneck=5).to_dict()).trains_layer_norms()


def test_the_default_leaves_an_unknown_norm_to_the_base_with_a_warning():
    class GemmaRMSNorm(torch.nn.Module):  # (1 + weight): a formula peftkern does not compute
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(4))

    with pytest.raises(ValueError, match="does not know the formula of GemmaRMSNorm"):
        _norm_kind(GemmaRMSNorm())
    with pytest.warns(UserWarning, match="GemmaRMSNorm: it stays the base's"):
        assert _norm_kind(GemmaRMSNorm(), strict=False) is None


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (dict(train_layer_norms=1), TypeError, "AdapterConfig: train_layer_norms must be a bool"),
        (dict(train_layer_norms="yes"), TypeError, "AdapterConfig: train_layer_norms must be a bool"),
        (
            dict(train_layer_norms=True, fusion={"a": "x"}),
            ValueError,
            "fusion .* cannot take train_layer_norms",
        ),
    ],
)
def test_bad_values(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        peftkern.AdapterConfig(**kwargs)


def test_a_site_in_no_block_is_refused():
    with pytest.raises(ValueError, match="train_layer_norms .* pooler.dense lies in none"):
        peftkern.inject(
            bert(),
            peftkern.AdapterConfig(bottleneck=3, target_modules=["pooler.dense"], train_layer_norms=True),
        )
    for choice in (False, None):  # the default trains the norms where there are blocks, none here
        model = peftkern.inject(
            bert(),
            peftkern.AdapterConfig(bottleneck=3, target_modules=["pooler.dense"], train_layer_norms=choice),
        )
        assert not norm_names(model)
