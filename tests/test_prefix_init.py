"""PrefixConfig(init_token_ids=...): prefixes that start as the frozen model's own keys and values of
real words (Li & Liang 2021), against a hand computation (the layers' projections called on the base
model's hidden states, the rotary embedding written out) and against the base model reading the
words before the sequence."""

import copy

import pytest
import torch

import peftkern
from tests import tiny_models

pytest.importorskip("transformers")

WORDS = [5, 17, 3, 42, 8]


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def close(a, b, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = rel_err(a, b)
    assert err <= 1e-5, f"{what}: relative error {err:.3g}"


def gpt2():
    import transformers

    config = transformers.GPT2Config(
        vocab_size=97,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def randomize(model, seed=3):
    """Weights of O(1) effect (HF's init leaves tiny attention scores, which would hide a wrong key)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def prefix_of(model, name="default"):
    return model.base_model.peftkern_prefix[name].prefix


def spread(ids, P):
    return (ids * -(-P // len(ids)))[:P]


def hidden_states(base_model, ids, **kw):
    """Each layer's input hidden states of the base model run on ids (sdpa, before any injection)."""
    with torch.no_grad():
        return base_model(input_ids=torch.tensor([ids]), output_hidden_states=True, **kw)


def llama_rotary(k, theta):
    """k [1, H, P, D] rotated to positions 0..P-1: k cos + rotate_half(k) sin, frequencies theta^(-2i/D)."""
    D, P = k.shape[-1], k.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(P, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    half = torch.cat([-k[..., D // 2 :], k[..., : D // 2]], -1)
    return (k.double() * cos + half.double() * sin).to(k.dtype)


def heads(t, H):
    """[1, P, H * D] -> [1, H, P, D]."""
    return t.view(1, t.shape[1], H, -1).transpose(1, 2)


@pytest.mark.parametrize("P", [5, 3, 8])  # as many words, cut, repeated
def test_llama_prefix_is_the_layers_rotary_keys_and_values(P):
    base = randomize(tiny_models.llama())
    model = peftkern.inject(copy.deepcopy(base), peftkern.PrefixConfig(P, init_token_ids=WORDS))
    words = spread(WORDS, P)
    hs = hidden_states(base.model, words).hidden_states
    cfg = base.config
    prefix = prefix_of(model)
    assert prefix.shape == (1, cfg.num_hidden_layers, 2, cfg.num_key_value_heads, P, cfg.head_dim)
    for layer, block in enumerate(base.model.layers):
        with torch.no_grad():
            h = block.input_layernorm(hs[layer])
            k = heads(block.self_attn.k_proj(h), cfg.num_key_value_heads)
            v = heads(block.self_attn.v_proj(h), cfg.num_key_value_heads)
        k = llama_rotary(k, cfg.rope_parameters["rope_theta"])
        close(prefix[0, layer, 0], k[0], f"layer {layer} keys")
        close(prefix[0, layer, 1], v[0], f"layer {layer} values")
    assert prefix.requires_grad  # it trains from there


def test_bert_prefix_is_the_layers_keys_and_values():
    base = randomize(tiny_models.bert())
    model = peftkern.inject(copy.deepcopy(base), peftkern.PrefixConfig(4, init_token_ids=WORDS))
    hs = hidden_states(base, WORDS[:4]).hidden_states
    prefix = prefix_of(model)
    H = base.config.num_attention_heads
    for layer, block in enumerate(base.encoder.layer):
        with torch.no_grad():
            k = heads(block.attention.self.key(hs[layer]), H)
            v = heads(block.attention.self.value(hs[layer]), H)
        close(prefix[0, layer, 0], k[0], f"layer {layer} keys")
        close(prefix[0, layer, 1], v[0], f"layer {layer} values")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("P", [5, 3, 7])
def test_a_decoder_with_the_prefix_reads_as_the_base_after_the_words(kind, P):
    """The strong check: with the initialised prefix, the logits of x are the base model's logits of
    words + x at x's positions (the prefix is the words' past; x's positions start at P)."""
    base = randomize(tiny_models.llama() if kind == "llama" else gpt2())
    model = peftkern.inject(copy.deepcopy(base), peftkern.PrefixConfig(P, init_token_ids=WORDS))
    x = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(1))
    words = torch.tensor([spread(WORDS, P)]).expand(2, P)
    with torch.no_grad():
        ours = model(input_ids=x).logits
        theirs = base(input_ids=torch.cat([words, x], 1)).logits[:, P:]
    close(ours, theirs, "logits")
    # and not the base model without the words
    with torch.no_grad():
        assert rel_err(ours, base(input_ids=x).logits) > 1e-2


def test_every_task_starts_from_the_same_words():
    base = randomize(tiny_models.llama())
    model = peftkern.inject(copy.deepcopy(base), peftkern.PrefixConfig(4, num_tasks=3, init_token_ids=WORDS))
    prefix = prefix_of(model)
    assert prefix.shape[0] == 3
    assert torch.equal(prefix[0], prefix[1]) and torch.equal(prefix[0], prefix[2])
    single = peftkern.inject(copy.deepcopy(base), peftkern.PrefixConfig(4, init_token_ids=WORDS))
    assert torch.equal(prefix[0], prefix_of(single)[0])
    x = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(input_ids=x, task_ids=torch.tensor([2, 0, 1])).logits
        theirs = base(input_ids=torch.cat([torch.tensor([WORDS[:4]] * 3), x], 1)).logits[:, 4:]
    close(ours, theirs, "logits")


def test_the_init_sees_the_base_model_not_other_adapters_or_prefixes():
    """A LoRA (of nonzero update) and a random prefix already active: the new prefix's keys are the
    base model's own; the active adapters and every module's mode come back."""
    base = randomize(tiny_models.llama())
    expected = prefix_of(peftkern.inject(copy.deepcopy(base), peftkern.PrefixConfig(4, init_token_ids=WORDS)))
    model = copy.deepcopy(base).train()
    peftkern.inject(model, peftkern.LoRAConfig(r=2, target_modules=["k_proj", "v_proj"]), name="lora")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora" in n.lower():
                p.normal_()
    peftkern.inject(model, peftkern.PrefixConfig(4), name="random")
    peftkern.set_active(model, ["lora", "random"])
    modes = {n: m.training for n, m in model.named_modules()}
    peftkern.inject(model, peftkern.PrefixConfig(4, init_token_ids=WORDS), name="words")
    close(prefix_of(model, "words"), expected, "prefix beside other adapters")
    assert {n: m.training for n, m in model.named_modules() if n in modes} == modes
    assert peftkern.active(model) == ("words",)
    peftkern.set_active(model, ["lora", "random"])  # the others still apply
    with torch.no_grad():
        x = torch.randint(0, 97, (1, 4))
        assert rel_err(model(input_ids=x).logits, base(input_ids=x).logits) > 1e-2


def seq2seq_keys(kind, base, words):
    """Per site, per block: (key, value) [1, H, P, D] written out from the base's hidden states, the
    encoder and the decoder both reading the words."""
    ids = torch.tensor([words])
    with torch.no_grad():
        out = base(input_ids=ids, decoder_input_ids=ids, output_hidden_states=True)
    enc_h, dec_h, memory = out.encoder_hidden_states, out.decoder_hidden_states, out.encoder_last_hidden_state
    H = base.config.num_attention_heads if kind == "bart" else base.config.num_heads
    sites = {"encoder": [], "decoder": [], "cross": []}
    with torch.no_grad():
        if kind == "t5":
            for b, block in enumerate(base.encoder.block):
                h = block.layer[0].layer_norm(enc_h[b])
                a = block.layer[0].SelfAttention
                sites["encoder"].append((heads(a.k(h), H), heads(a.v(h), H)))
            for b, block in enumerate(base.decoder.block):
                h = block.layer[0].layer_norm(dec_h[b])
                a = block.layer[0].SelfAttention
                sites["decoder"].append((heads(a.k(h), H), heads(a.v(h), H)))
                c = block.layer[1].EncDecAttention
                sites["cross"].append((heads(c.k(memory), H), heads(c.v(memory), H)))
        else:  # BART: post-norm, each attention projects its layer's input
            for b, layer in enumerate(base.model.encoder.layers):
                a = layer.self_attn
                sites["encoder"].append((heads(a.k_proj(enc_h[b]), H), heads(a.v_proj(enc_h[b]), H)))
            for b, layer in enumerate(base.model.decoder.layers):
                a, c = layer.self_attn, layer.encoder_attn
                sites["decoder"].append((heads(a.k_proj(dec_h[b]), H), heads(a.v_proj(dec_h[b]), H)))
                sites["cross"].append((heads(c.k_proj(memory), H), heads(c.v_proj(memory), H)))
    return sites


@pytest.mark.parametrize("kind", ["t5", "bart"])
@pytest.mark.parametrize("sites", [None, ["decoder", "cross"]])
def test_seq2seq_prefix_is_each_sites_keys_and_values(kind, sites):
    base = randomize(getattr(tiny_models, kind)())
    model = peftkern.inject(copy.deepcopy(base), peftkern.PrefixConfig(4, sites=sites, init_token_ids=WORDS))
    expected = seq2seq_keys(kind, base, WORDS[:4])
    prefix = prefix_of(model)
    layer = 0
    for site in sites or ["encoder", "decoder", "cross"]:  # the prefix's layers: site by site
        for b, (k, v) in enumerate(expected[site]):
            close(prefix[0, layer, 0], k[0], f"{site} block {b} keys")
            close(prefix[0, layer, 1], v[0], f"{site} block {b} values")
            layer += 1
    assert layer == prefix.shape[1]


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_decoder_prefix_reads_as_the_base_after_the_words(kind):
    """sites=["decoder"] on the words' source: the logits of y are the base's of words + y at y's
    positions (T5's relative bias and BART's decoder positions both see the prefix as P past tokens)."""
    base = randomize(getattr(tiny_models, kind)())
    P = 4
    model = peftkern.inject(
        copy.deepcopy(base), peftkern.PrefixConfig(P, sites=["decoder"], init_token_ids=WORDS)
    )
    source = torch.tensor([WORDS[:P]] * 2)
    y = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model(input_ids=source, decoder_input_ids=y).logits
        theirs = base(input_ids=source, decoder_input_ids=torch.cat([source, y], 1)).logits[:, P:]
    close(ours, theirs, "logits")


def test_save_load_round_trip(tmp_path):
    base = randomize(tiny_models.llama())
    model = peftkern.inject(copy.deepcopy(base), peftkern.PrefixConfig(4, init_token_ids=WORDS))
    with torch.no_grad():
        prefix_of(model).add_(0.1)  # as after training: not the init any more
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(copy.deepcopy(base), tmp_path)
    assert peftkern.adapters(loaded)["default"].init_token_ids == WORDS
    assert torch.equal(prefix_of(loaded), prefix_of(model))
    x = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


@pytest.mark.parametrize(
    "kwargs,exc,message",
    [
        (
            dict(init_token_ids="hello"),
            TypeError,
            r"PrefixConfig: init_token_ids must be None or a non-empty list",
        ),
        (
            dict(init_token_ids=[]),
            TypeError,
            r"PrefixConfig: init_token_ids must be None or a non-empty list",
        ),
        (
            dict(init_token_ids=[1, -2]),
            ValueError,
            r"PrefixConfig: init_token_ids\[1\] must be in \[0, 2\^63\)",
        ),
        (
            dict(init_token_ids=[1.0]),
            TypeError,
            r"PrefixConfig: init_token_ids\[0\] must be an int; got float",
        ),
        (
            dict(init_token_ids=[True]),
            TypeError,
            r"PrefixConfig: init_token_ids\[0\] must be an int; got bool",
        ),
        (
            dict(init_token_ids=[1], projection_dim=16),
            ValueError,
            r"PrefixConfig: init_token_ids sets the prefixes themselves; with projection_dim \(16\)",
        ),
    ],
)
def test_bad_config(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        peftkern.PrefixConfig(4, **kwargs)


def test_ids_beyond_the_vocabulary_refused_at_inject_and_the_model_unchanged():
    model = tiny_models.llama()
    before = {n for n, _ in model.named_modules()}
    with pytest.raises(
        ValueError,
        match=r"PrefixConfig: init_token_ids\[1\] = 97 is not in LlamaForCausalLM's vocabulary of 97",
    ):
        peftkern.inject(model, peftkern.PrefixConfig(4, init_token_ids=[3, 97]))
    assert {n for n, _ in model.named_modules()} == before and not peftkern.adapters(model)
    with pytest.raises(
        ValueError, match=r"init_token_ids runs the model once; inject outside peftkern.tasks"
    ):
        peftkern.inject(model, peftkern.LoRAConfig(r=2, target_modules=["q_proj"]), name="a")
        with peftkern.tasks(["a"]):
            peftkern.inject(model, peftkern.PrefixConfig(4, init_token_ids=[3]), name="p")
