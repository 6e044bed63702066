"""UniPELT (Mao et al. 2022) as three gated named adapters (LoRA, bottleneck adapter, prefix) active
together: forward and every gradient against an eager model written here in plain torch, save/load,
the refusals (mixed batches, merge, bad configs) and a short training run."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import peftkern
from peftkern.integrations.config import config_from_dict
from peftkern.integrations.inject import injection_state
from tests.tiny_models import bert as tiny_bert
from tests.tiny_models import bert_head
from tests.tiny_models import llama as tiny_llama

transformers = pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors.torch")

NAMES = ("u_lora", "u_adapter", "u_prefix")
R, ALPHA, BOTTLENECK, P, SCALE = 4, 12.0, 5, 3, 0.7


def configs(gate=True):
    return (
        peftkern.LoRAConfig(r=R, lora_alpha=ALPHA, gate=gate),
        # houlsby: 2 sites a layer; UniPELT trains its submodules and gates, not the norms
        peftkern.AdapterConfig(bottleneck=BOTTLENECK, scale=SCALE, gate=gate, train_layer_norms=False),
        peftkern.PrefixConfig(num_virtual_tokens=P, gate=gate),
    )


def inject_unipelt(model, gate=True):
    for c, n in zip(configs(gate), NAMES):
        peftkern.inject(model, c, name=n)
    peftkern.set_active(model, list(NAMES))
    return model


# the sites as the papers and the presets place them, written out (not read from peftkern)
SITES = {
    "bert": dict(
        lora=["encoder.layer.{i}.attention.self.query", "encoder.layer.{i}.attention.self.value"],
        adapter=["encoder.layer.{i}.attention.output.dense", "encoder.layer.{i}.output.dense"],
        attention="encoder.layer.{i}.attention.self",
        prefix="peftkern_prefix",
    ),
    "llama": dict(
        lora=["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.v_proj"],
        adapter=["model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"],
        attention="model.layers.{i}.self_attn",
        prefix="model.peftkern_prefix",
    ),
}
MAKERS = {"bert": tiny_bert, "llama": tiny_llama}


def expected_params(arch, layers=2):
    """peftkern parameter name -> kind, for every parameter UniPELT trains."""
    s, out = SITES[arch], {}
    for i in range(layers):
        for site in s["lora"]:
            site = site.format(i=i)
            for attr in ("lora_A", "lora_B", "lora_gate_weight", "lora_gate_bias"):
                out[f"{site}.{attr}.u_lora"] = attr
        for site in s["adapter"]:
            site = site.format(i=i)
            for p in ("down.weight", "down.bias", "up.weight", "up.bias", "gate.weight", "gate.bias"):
                out[f"{site}.adapter.u_adapter.{p}"] = p
    for p in ("prefix", "gate.weight", "gate.bias"):
        out[f"{s['prefix']}.u_prefix.{p}"] = p
    return out


def is_gate(n):
    return ".lora_gate_" in n or ".gate." in n


def is_gate_bias(n):
    return ".lora_gate_bias." in n or n.endswith(".gate.bias")


def randomize(model, seed=3):
    """Every trainable parameter, random; gate biases spread over (-2, 2) so the gates differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, t in sorted(model.named_parameters()):
            if t.requires_grad:
                noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
                t.add_(noise * (1.0 if is_gate_bias(n) else 0.3))


# -- the eager reference: plain torch on a fresh base ---------------------------------------------


class RefGatedLoRA(torch.nn.Module):
    """base(x) + sigmoid(x w_g^T + b_g) * s * (x A^T) B^T."""

    def __init__(self, base, A, B, wg, bg, scaling):
        super().__init__()
        self.base, self.A, self.B, self.wg, self.bg, self.s = base, A, B, wg, bg, scaling

    def forward(self, x):
        g = torch.sigmoid(x @ self.wg.T + self.bg)  # [..., 1]
        return self.base(x) + g * self.s * ((x @ self.A.T) @ self.B.T)


def ref_adapter_hook(p):
    """After the site module: h + scale * sigmoid(h w_g^T + b_g) * (gelu(h Wd^T + bd) Wu^T + bu)."""

    def hook(module, args, out):
        g = torch.sigmoid(out @ p["gate.weight"].T + p["gate.bias"])
        branch = F.gelu(out @ p["down.weight"].T + p["down.bias"]) @ p["up.weight"].T + p["up.bias"]
        return out + SCALE * g * branch

    return hook


_REF_ATTENTION = "unipelt_eager_reference"


def ref_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Explicit concatenation [prefix; sequence], one joint softmax, the prefix probabilities scaled by
    the layer's gate sigmoid(h w_g[l] + b_g[l]) of the attention's input h."""
    ref = module._ref
    layer = module.layer_idx
    B, H, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    prefix = ref["prefix"][0, layer]  # [2, Hkv, P, D]
    keys = torch.cat([prefix[0].expand(B, -1, -1, -1), key], dim=2).repeat_interleave(H // Hkv, dim=1)
    values = torch.cat([prefix[1].expand(B, -1, -1, -1), value], dim=2).repeat_interleave(H // Hkv, dim=1)
    scores = query @ keys.transpose(-1, -2) * (D**-0.5 if scaling is None else scaling)
    if attention_mask is not None:
        seq = attention_mask[..., :S]
        if seq.dtype != torch.bool:
            seq = seq == 0
    else:
        seq = torch.ones(L, S, dtype=torch.bool)
        if getattr(module, "is_causal", False):
            seq = seq.tril(S - L)
    visible = torch.cat([torch.ones(*seq.shape[:-1], P, dtype=torch.bool), seq], dim=-1)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    h = module._ref_hidden
    gate = torch.sigmoid(h @ ref["gate.weight"][layer] + ref["gate.bias"][layer])  # [B, L]
    probs = torch.cat([probs[..., :P] * gate[:, None, :, None], probs[..., P:]], dim=-1)
    return (probs @ values).transpose(1, 2), None


def _capture_hidden(module, args, kwargs):
    module._ref_hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def reference(arch, params, prefix_on=True):
    """A fresh base (float64) computing UniPELT eagerly from `params` (peftkern name -> leaf tensor)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_REF_ATTENTION, ref_attention)
    AttentionMaskInterface.register(_REF_ATTENTION, sdpa_mask)
    model = MAKERS[arch]().double()
    model.requires_grad_(False)
    s = SITES[arch]
    for i in range(2):
        for site in s["lora"]:
            site = site.format(i=i)
            parent, _, child = site.rpartition(".")
            holder = model.get_submodule(parent)
            A, B, wg, bg = (
                params[f"{site}.{a}.u_lora"]
                for a in ("lora_A", "lora_B", "lora_gate_weight", "lora_gate_bias")
            )
            setattr(holder, child, RefGatedLoRA(getattr(holder, child), A, B, wg, bg, ALPHA / R))
        for site in s["adapter"]:
            site = site.format(i=i)
            p = {
                k: params[f"{site}.adapter.u_adapter.{k}"] for k in ("down.weight", "down.bias", "up.weight")
            }
            p.update(
                {k: params[f"{site}.adapter.u_adapter.{k}"] for k in ("up.bias", "gate.weight", "gate.bias")}
            )
            model.get_submodule(site).register_forward_hook(ref_adapter_hook(p))
        if prefix_on:
            attn = model.get_submodule(s["attention"].format(i=i))
            attn._ref = {
                k: params[f"{s['prefix']}.u_prefix.{k}"] for k in ("prefix", "gate.weight", "gate.bias")
            }
            attn.register_forward_pre_hook(_capture_hidden, with_kwargs=True)
    if prefix_on:
        model.set_attn_implementation(_REF_ATTENTION)
        assert model.config._attn_implementation == _REF_ATTENTION
    return model


def output(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def batch(B=3, L=7, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :2] = 0  # one left-padded sample
    return ids, mask


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_unipelt_forward_and_every_gradient_equal_the_eager_reference_float64(arch):
    model = inject_unipelt(MAKERS[arch]().double())
    randomize(model)
    model.train()
    trainable = {n: t for n, t in model.named_parameters() if t.requires_grad}
    assert sorted(trainable) == sorted(expected_params(arch))  # every one is checked below
    params = {n: t.detach().clone().requires_grad_(True) for n, t in trainable.items()}
    ref_model = reference(arch, params).train()

    ids, mask = batch()
    L = ids.shape[1]
    out = output(model(input_ids=ids, attention_mask=mask))
    positions = (P + torch.arange(L)).expand(ids.shape[0], L)  # the prefix as P past tokens
    want = output(ref_model(input_ids=ids, attention_mask=mask, position_ids=positions))
    err = rel(out, want)
    assert err <= 1e-10, f"output relative error {err:.3g}"
    # the gates matter here: the same model with every gate at 1 computes something else
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    (out * weights).sum().backward()
    (want * weights).sum().backward()
    for n, t in trainable.items():
        assert t.grad is not None and params[n].grad is not None, n
        assert params[n].grad.norm() > 0, n
        gerr = rel(t.grad, params[n].grad)
        assert gerr <= 1e-10, f"gradient of {n}: relative error {gerr:.3g}"


def test_the_gates_change_the_output():
    """The reference with its gates moved computes another output (the comparison above can fail)."""
    model = inject_unipelt(tiny_bert().double())
    randomize(model)
    params = {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}
    ids, mask = batch()
    positions = (P + torch.arange(ids.shape[1])).expand(ids.shape[0], -1)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for kind in ("lora_gate_bias", "adapter.u_adapter.gate.bias", "u_prefix.gate.bias"):
            moved = {n: (t + 1.0 if kind in n else t) for n, t in params.items()}
            other = reference("bert", moved)(input_ids=ids, attention_mask=mask, position_ids=positions)
            assert rel(out, other.last_hidden_state) > 1e-4, kind


def test_saturated_gates_equal_the_ungated_adapters():
    """A sanity check: W_g = 0, b_g = +30 (sigmoid ~ 1 - 1e-13) is the ungated LoRA, adapter, prefix."""
    gated = inject_unipelt(tiny_llama().double())
    randomize(gated)
    plain = inject_unipelt(tiny_llama().double(), gate=False)
    plain_params = dict(plain.named_parameters())
    with torch.no_grad():
        for n, t in gated.named_parameters():
            if not t.requires_grad:
                continue
            if is_gate(n):
                t.fill_(30.0 if is_gate_bias(n) else 0.0)
            else:
                plain_params[n].copy_(t)
    assert not any(is_gate(n) for n in plain_params)
    ids, mask = batch()
    with torch.no_grad():
        a = gated(input_ids=ids, attention_mask=mask).logits
        b = plain(input_ids=ids, attention_mask=mask).logits
    assert rel(a, b) <= 1e-10


def test_unipelt_under_gradient_checkpointing_gives_the_same_gradients():
    """The prefix gates are recomputed inside each checkpointed layer from its own input."""
    results = []
    for checkpointed in (False, True):
        model = inject_unipelt(tiny_llama().double())
        randomize(model)
        model.train()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids, mask = batch()
        model(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
        results.append({n: t.grad.clone() for n, t in model.named_parameters() if t.grad is not None})
    plain, ckpt = results
    assert plain.keys() == ckpt.keys() == set(expected_params("llama"))
    for n in plain:
        assert torch.allclose(ckpt[n], plain[n], rtol=1e-10, atol=1e-14), n


def test_gated_prefix_in_the_attention_dropout_path():
    """The slow composite path (attention dropout in training) scales the prefix probabilities by the
    gate: against the explicit formula with the same dropout draw."""
    from peftkern.integrations.methods.prefix import _prefix_attention_composite

    g = torch.Generator().manual_seed(2)
    B, H, Hkv, L, S, D, p = 2, 4, 2, 5, 5, 8, 0.25
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(Hkv, P, D, generator=g, dtype=torch.float64) for _ in range(2))
    gate = torch.rand(B, 1, L, generator=g, dtype=torch.float64)
    mask = torch.ones(B, 1, L, S, dtype=torch.bool)
    mask[1, ..., :2] = False
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _prefix_attention_composite(q, k, v, pk, pv, None, mask, False, None, p, gate)
    keys = torch.cat([pk.expand(B, -1, -1, -1), k], 2).repeat_interleave(2, 1)
    values = torch.cat([pv.expand(B, -1, -1, -1), v], 2).repeat_interleave(2, 1)
    visible = torch.cat([torch.ones(B, 1, L, P, dtype=torch.bool), mask], -1)
    probs = torch.softmax((q @ keys.transpose(-1, -2) / math.sqrt(D)).masked_fill(~visible, -math.inf), -1)
    torch.manual_seed(11)
    probs = F.dropout(probs, p, training=True)
    probs = torch.cat([probs[..., :P] * gate[..., None], probs[..., P:]], -1)
    want = (probs @ values).transpose(1, 2)
    assert rel(got, want) <= 1e-12
    with warnings.catch_warnings():  # and the gate is not ignored
        warnings.simplefilter("ignore")
        ungated = _prefix_attention_composite(q, k, v, pk, pv, None, mask, False, None, 0.0, None)
    assert rel(ungated, want) > 1e-3


# -- save / load ---------------------------------------------------------------------------------


def test_save_and_load_the_three_gated_adapters(tmp_path):
    model = inject_unipelt(tiny_llama().double())
    randomize(model)
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    peftkern.save_pretrained(model, tmp_path, names=list(NAMES))
    saved = {}
    for n in NAMES:
        with open(tmp_path / n / "peftkern_config.json") as f:
            assert json.load(f)["gate"] is True
        saved[n] = set(safetensors.load_file(tmp_path / n / "peftkern_weights.safetensors"))
    # saved as a model holding each alone names them
    assert "model.layers.0.self_attn.q_proj.lora_gate_weight" in saved["u_lora"]
    assert "model.layers.1.self_attn.v_proj.lora_gate_bias" in saved["u_lora"]
    assert "model.layers.0.mlp.down_proj.adapter.gate.weight" in saved["u_adapter"]
    assert saved["u_prefix"] == {"model.peftkern_prefix.prefix", "model.peftkern_prefix.gate.weight",
                                 "model.peftkern_prefix.gate.bias"}  # fmt: skip
    loaded = peftkern.from_pretrained(tiny_llama().double(), tmp_path)
    assert sorted(peftkern.adapters(loaded)) == sorted(NAMES)
    assert all(c.gate for c in peftkern.adapters(loaded).values())
    peftkern.set_active(loaded, list(NAMES))
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    # the gates were loaded, not left at their initialisation
    with torch.no_grad():
        loaded.model.peftkern_prefix.u_prefix.gate.bias.add_(1.0)
        assert rel(loaded(input_ids=ids, attention_mask=mask).logits, want) > 1e-6


def test_configs_round_trip_gate_and_old_checkpoints_load():
    for c in configs():
        assert config_from_dict(c.to_dict()) == c and config_from_dict(c.to_dict()).gate is True
        old = {k: v for k, v in c.to_dict().items() if k != "gate"}  # written before the field existed
        assert config_from_dict(old).gate is False


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_mixed_batch_naming_a_gated_adapter_raises_before_anything_runs(name):
    model = inject_unipelt(tiny_bert())
    ids, _ = batch(B=2)
    calls = []
    handle = model.embeddings.register_forward_hook(lambda *a: calls.append(1))
    message = (
        rf"adapter '{name}' cannot serve a mixed batch .*gated \(UniPELT\) adapters are not routed per sample"
    )
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, tasks=[name, None])
    with pytest.raises(ValueError, match=r"gated \(UniPELT\)"):
        model(input_ids=ids, tasks=[list(NAMES), None])
    assert not calls
    handle.remove()


def test_a_uniform_batch_of_gated_adapters_takes_the_together_path():
    model = inject_unipelt(tiny_bert().double())
    randomize(model)
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask, tasks=[list(NAMES)] * 3).last_hidden_state
    assert torch.equal(got, want)


def test_merge_refuses_a_gated_lora_and_changes_nothing():
    model = inject_unipelt(tiny_bert().double())
    randomize(model)
    peftkern.set_active(model, "u_lora")
    ids, _ = batch()
    weight = model.encoder.layer[0].attention.self.query.weight.detach().clone()
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    with pytest.raises(ValueError, match=r"merge: 'u_lora' is a gated \(UniPELT\) LoRA.*cannot"):
        peftkern.merge(model, "u_lora", verbose=False)
    assert not injection_state(model).adapters["u_lora"].merged
    assert torch.equal(model.encoder.layer[0].attention.self.query.weight, weight)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, before)
    with pytest.raises(ValueError, match="gated LoRA .* cannot merge"):
        model.encoder.layer[0].attention.self.query.merged_weight(["u_lora"])


@pytest.mark.parametrize("cls", [peftkern.LoRAConfig, peftkern.AdapterConfig, peftkern.PrefixConfig])
def test_a_gate_that_is_not_a_bool_raises(cls):
    with pytest.raises(TypeError, match=rf"{cls.__name__}: gate must be a bool; got str 'yes'"):
        cls(gate="yes")
    with pytest.raises(TypeError, match="gate must be a bool"):
        config_from_dict({"method": cls.method, "gate": 1})
    with pytest.raises(TypeError, match="Adapter: gate must be a bool"):
        peftkern.nn.Adapter(8, 2, gate="yes")


def test_deleting_the_gated_adapters_leaves_the_base():
    model = inject_unipelt(tiny_llama().double())
    randomize(model)
    ids, mask = batch()
    for n in NAMES:
        peftkern.delete_adapter(model, n)
    assert not any(t.requires_grad for t in model.parameters())
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = tiny_llama().double()(input_ids=ids, attention_mask=mask).logits
    assert rel(got, want) <= 1e-12


def test_a_fusion_of_a_gated_adapter_is_refused(tmp_path):
    model = tiny_bert()
    peftkern.inject(model, peftkern.AdapterConfig(bottleneck=4, gate=True), name="a")
    peftkern.save_pretrained(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"fusion\['a'\] .* must be a checkpoint of single adapters .*gate"):
        peftkern.inject(tiny_bert(), peftkern.AdapterConfig(bottleneck=4, fusion={"a": tmp_path / "a"}))


def test_gates_the_methods_do_not_have():
    with pytest.raises(ValueError, match="AdapterConfig: gate .* num_experts"):
        peftkern.AdapterConfig(gate=True, num_experts=2)
    with pytest.raises(ValueError, match="PrefixConfig: gate .* num_tasks"):
        peftkern.PrefixConfig(gate=True, num_tasks=2)
    a = peftkern.nn.Adapter(8, 2, gate=True)
    with pytest.raises(ValueError, match="gated"):
        peftkern.nn.MultiAdapter.from_adapters([a, a])


# -- the convenience function and training ------------------------------------------------------


def test_unipelt_injects_three_named_gated_adapters_active_together():
    model = peftkern.unipelt(tiny_bert(), "t", r=2, bottleneck=3, num_virtual_tokens=4)
    assert peftkern.active(model) == ("t_lora", "t_adapter", "t_prefix")
    cfg = peftkern.adapters(model)
    assert cfg["t_lora"] == peftkern.LoRAConfig(r=2, gate=True)
    assert cfg["t_adapter"] == peftkern.AdapterConfig(bottleneck=3, placement="pfeiffer", gate=True)
    assert cfg["t_prefix"] == peftkern.PrefixConfig(num_virtual_tokens=4, gate=True)
    adapter_sites = {
        n.split(".adapter.")[0] for n, _ in model.named_parameters() if ".adapter.t_adapter." in n
    }
    assert adapter_sites == {"encoder.layer.0.output.dense", "encoder.layer.1.output.dense"}  # after the FFN
    with pytest.raises(ValueError, match="already holds an adapter named 't_lora'"):
        peftkern.unipelt(model, "t")
    before = sorted(n for n, _ in model.named_parameters())
    with pytest.raises(ValueError, match="matched no module"):  # planned before anything changes
        peftkern.unipelt(model, "u", target_modules=["nope"])
    assert sorted(n for n, _ in model.named_parameters()) == before
    assert "u_adapter" not in peftkern.adapters(model)


def test_a_few_training_steps_lower_the_loss_and_train_every_gate():
    model = bert_head("BertForSequenceClassification", num_labels=3)
    peftkern.unipelt(model, r=4, bottleneck=8, num_virtual_tokens=4, modules_to_save=["classifier"])
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (8, 10), generator=g)
    labels = torch.randint(0, 3, (8,), generator=g)
    gates = {n: t for n, t in model.named_parameters() if is_gate(n)}
    assert len(gates) == 2 * 2 * 2 + 2 * 2 + 2  # LoRA 2 sites x 2 layers, adapters 2 layers, prefix (w, b)
    assert all(t.requires_grad for t in gates.values())
    start = {n: t.detach().clone() for n, t in gates.items()}
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=5e-2)
    losses = []
    for step in range(20):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if step > 0:  # (at step 0 LoRA's B and the adapters' up are zero: their gates get none yet)
            for n, t in gates.items():
                assert t.grad is not None and t.grad.abs().sum() > 0, f"{n} has no gradient at step {step}"
        opt.step()
        losses.append(loss.item())
    losses.append(model(input_ids=ids, labels=labels).loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for n, t in gates.items():
        assert not torch.equal(t, start[n]), f"{n} did not train"


def test_generate_with_the_cache_equals_without():
    """Each step's gates read only the new tokens' hidden states; the cached and uncached runs agree."""
    model = inject_unipelt(tiny_llama().double())
    randomize(model)
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        cached = model.generate(input_ids=ids, use_cache=True, **kw)
        uncached = model.generate(input_ids=ids, use_cache=False, **kw)
        plain = inject_unipelt(tiny_llama().double(), gate=False).generate(input_ids=ids, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] > ids.shape[1] and not torch.equal(cached, plain)
