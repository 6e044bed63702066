"""Prefix tuning, prompt tuning and P-tuning on encoder-decoders (tiny random T5 and BART; mBART
for the prefix) through peftkern.inject.

The references: Hugging Face peft itself (prefix tuning ``sites=["decoder"]``, its layout; prompt
tuning; P-tuning), and for Li & Liang's three sites a written-out twin: the decoder's prefix as P
past tokens in Hugging Face's own cache (so the model itself shifts BART's positions and T5's
relative bias), the encoder's and cross-attention's concatenated in front of the keys by a plain
attention function, with T5's bias of prefix key p computed over the concatenated keys."""

import contextlib
import copy

import pytest
import torch

import peftkern
from peftkern.nn import PrefixKV, SoftPrompt
from tests import tiny_models
from tests.test_virtual_tokens import module_of, randomize, rel_err

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

P, N = 3, 4  # prefix length, prompt length
MODELS = {"t5": tiny_models.t5, "bart": tiny_models.bart}


def batch(seed=1, B=3, S=7, T=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, -3:], mask[1, -1:] = 0, 0  # source padding
    labels = torch.randint(3, 97, (B, T), generator=g)
    return ids, mask, labels


def same_logits(ours, theirs):
    """The relative error of ours' logits against theirs' on the padded batch."""
    ids, mask, labels = batch()
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, labels=labels).logits
        return rel_err(out, theirs(input_ids=ids, attention_mask=mask, labels=labels).logits)


def generate(model, ids, mask, beams, task_ids=None, **kw):
    """generate()'s tokens (task ids through peftkern.task_ids: generate() refuses unknown arguments)."""
    steps = 6  # min_new_tokens: the tiny models would stop at once on their eos
    with torch.no_grad(), peftkern.task_ids(task_ids) if task_ids is not None else contextlib.nullcontext():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            num_beams=beams,
            do_sample=False,
            **kw,
        )


# ------------------------------------------------------------------------------------------ prefix: peft
def peft_prefix(kind, projection):
    config = peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=8
    )
    torch.manual_seed(4)
    theirs = peft.get_peft_model(MODELS[kind](), config)
    randomize(theirs.prompt_encoder, std=0.5 if projection else 1.0)
    return theirs


def ours_like_peft(kind, theirs, projection):
    """peftkern's decoder-site prefix holding peft's weights (peft's layer 2i mod L for decoder layer i)."""
    from peftkern.integrations.peft import _peft_seq2seq_layers

    cfg = peftkern.PrefixConfig(
        num_virtual_tokens=P, sites=["decoder"], projection_dim=8 if projection else None
    )
    ours = peftkern.inject(MODELS[kind](), cfg)
    prefix = module_of(ours, PrefixKV)
    encoder = theirs.prompt_encoder["default"]
    if not projection:
        peftkern.integrations.peft.load_prompt_embeddings(ours, encoder.embedding.weight.detach())
        return ours, prefix
    L, width = prefix.num_layers, prefix.num_kv_heads * prefix.head_dim
    layers = _peft_seq2seq_layers(L)
    with torch.no_grad():
        prefix.embedding.weight.copy_(encoder.embedding.weight)
        prefix.down.weight.copy_(encoder.transform[0].weight)
        prefix.down.bias.copy_(encoder.transform[0].bias)
        up = encoder.transform[2]
        prefix.up.weight.copy_(up.weight.view(L, 2 * width, -1)[layers].reshape_as(prefix.up.weight))
        prefix.up.bias.copy_(up.bias.view(L, 2 * width)[layers].reshape(-1))
    return ours, prefix


def peft_layout_grad(grad, L):
    """peftkern's per-decoder-layer gradient [L, ...] summed onto the peft layers they read."""
    from peftkern.integrations.peft import _peft_seq2seq_layers

    out = torch.zeros_like(grad)
    return out.index_add_(0, _peft_seq2seq_layers(L), grad)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_equals_peft(kind, projection):
    """sites=["decoder"] with peft's weights: logits, the loss, and every prefix gradient (peftkern's
    per-layer gradients summed onto the peft layers they share) equal peft's prefix tuning."""
    theirs = peft_prefix(kind, projection)
    ours, prefix = ours_like_peft(kind, theirs, projection)
    ids, mask, labels = batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(out.logits, ref.logits) < 1e-5
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5 * ref.loss.item()
    out.loss.backward()
    ref.loss.backward()
    encoder = theirs.prompt_encoder["default"]
    L, width = prefix.num_layers, prefix.num_kv_heads * prefix.head_dim
    if not projection:
        # ours [1, L, 2, H, P, D] -> peft's [P, L * 2 * H * D]
        grad = peft_layout_grad(prefix.prefix.grad[0], L).permute(3, 0, 1, 2, 4).reshape(P, -1)
        assert rel_err(grad, encoder.embedding.weight.grad) < 1e-5
    else:
        assert rel_err(prefix.embedding.weight.grad, encoder.embedding.weight.grad) < 1e-5
        assert rel_err(prefix.down.weight.grad, encoder.transform[0].weight.grad) < 1e-5
        up = peft_layout_grad(prefix.up.weight.grad.view(L, 2 * width, -1), L)
        assert rel_err(up.reshape_as(encoder.transform[2].weight), encoder.transform[2].weight.grad) < 1e-5


def greedy_by_forward(model, ids, mask, steps=6):
    """A greedy decode by full forwards (no cache), eos kept out as min_new_tokens does."""
    dec = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits[:, -1]
            logits[:, model.config.eos_token_id] = float("-inf")
            dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], 1)
    return dec


@pytest.mark.parametrize("kind", MODELS)
def test_prefix_generate_equals_peft(kind):
    """Greedy generate() gives the tokens of a greedy decode by peft's own forward (peft 0.21's
    generate() on transformers 5 drops its seq2seq prefix, so it is not the reference); with beams,
    the tokens of generate() recomputing every step."""
    theirs = peft_prefix(kind, False)
    ours, _ = ours_like_peft(kind, theirs, False)
    ids, mask, _ = batch()
    got = generate(ours, ids, mask, 1)
    assert torch.equal(got, greedy_by_forward(theirs, ids, mask))
    assert not torch.equal(got, generate(MODELS[kind](), ids, mask, 1))  # the prefix matters
    assert torch.equal(generate(ours, ids, mask, 3), generate(ours, ids, mask, 3, use_cache=False))


@pytest.mark.parametrize("kind", MODELS)
def test_a_peft_seq2seq_prefix_checkpoint_loads(tmp_path, kind):
    theirs = peft_prefix(kind, True)
    theirs.save_pretrained(tmp_path)
    ours = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P, sites=["decoder"]))
    peftkern.integrations.peft.load_prompt_embeddings(ours, tmp_path)
    assert same_logits(ours, theirs) < 1e-5
    every = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P))
    with pytest.raises(ValueError, match=r"sites=\['decoder'\]"):
        peftkern.integrations.peft.load_prompt_embeddings(every, tmp_path)


# ------------------------------------------------------------------------------------ prefix: three sites
_REF_PREFIX = {}  # id(attention module) -> (prefix_k, prefix_v [H, P, D], bias(L, S) -> [1, H, L, P] or None)


def _reference_attention(module, q, k, v, mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """Plain attention over [prefix; keys] (the prefix of the encoder's and cross-attention's modules
    from _REF_PREFIX; the decoder's comes through the cache)."""
    L, S = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = q @ k.transpose(-1, -2) * scale
    if position_bias is not None:
        scores = scores + position_bias[..., :S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    elif getattr(module, "is_causal", False):
        scores = scores.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(S - L), float("-inf"))
    values = v
    if id(module) in _REF_PREFIX:
        pk, pv, bias = _REF_PREFIX[id(module)]
        front = q @ pk.transpose(-1, -2) * scale
        if bias is not None:
            front = front + bias(L, S)
        scores, values = torch.cat([front, scores], -1), torch.cat([pv.expand(q.shape[0], -1, -1, -1), v], 2)
    out = torch.softmax(scores, -1) @ values
    return out.transpose(1, 2), None


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("peftkern_test_reference", _reference_attention)
    AttentionMaskInterface.register("peftkern_test_reference", sdpa_mask)


def reference_forward(kind, prefix, **inputs):
    """The twin of a three-site prefix: `prefix` [1, L_enc + 2 L_dec, 2, H, P, D] (encoder layers,
    decoder self-attention layers, cross-attention layers), on its device and in its dtype."""
    from transformers import DynamicCache, EncoderDecoderCache

    _register_reference()
    model = MODELS[kind]().to(prefix.device, prefix.dtype)
    model.set_attn_implementation("peftkern_test_reference")
    sites = peftkern.integrations.methods.prefix.SEQ2SEQ_SITES[kind]
    import re

    found = {s: {} for s in sites}
    for n, m in model.named_modules():
        for s, pattern in sites.items():
            hit = re.fullmatch(pattern, n)
            if hit:
                found[s][int(hit.group(2))] = m
    Le, Ld = len(found["encoder"]), len(found["decoder"])
    _REF_PREFIX.clear()
    for i, m in found["encoder"].items():
        bias = None
        if (
            kind == "t5"
        ):  # prefix key p at position p - P: the bias over [prefix; source], its first P columns
            holder = found["encoder"][0]
            bias = lambda L, S, h=holder: h.compute_bias(L, P + S, past_seen_tokens=P)[..., :P]  # noqa: E731
        _REF_PREFIX[id(m)] = (prefix[0, i, 0], prefix[0, i, 1], bias)
    for i, m in found["cross"].items():
        _REF_PREFIX[id(m)] = (prefix[0, Le + Ld + i, 0], prefix[0, Le + Ld + i, 1], None)
    B = inputs["input_ids"].shape[0]
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    for i in range(Ld):
        kv = prefix[0, Le + i]
        cache.self_attention_cache.update(kv[0].expand(B, -1, -1, -1), kv[1].expand(B, -1, -1, -1), i)
    try:
        return model(**inputs, past_key_values=cache, use_cache=True)
    finally:
        _REF_PREFIX.clear()


@pytest.mark.parametrize("kind", MODELS)
def test_prefix_three_sites_equal_the_written_out_twin(kind):
    ours = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P))
    prefix = module_of(ours, PrefixKV)
    randomize(prefix)
    hf = ours.config
    layers = (
        hf.num_layers + hf.num_decoder_layers * 2
        if kind == "t5"
        else hf.encoder_layers + 2 * hf.decoder_layers
    )
    assert prefix.num_layers == layers
    twin = prefix.prefix.detach().clone().requires_grad_()
    ids, mask, labels = batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = reference_forward(kind, twin, input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(out.logits, ref.logits) < 1e-5
    out.loss.backward()
    ref.loss.backward()
    assert rel_err(prefix.prefix.grad, twin.grad) < 1e-5
    for site in range(layers):  # every site's prefix gets a gradient
        assert prefix.prefix.grad[0, site].abs().sum() > 0, site


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", MODELS)
def test_prefix_three_sites_on_cuda(kind, dtype):
    """The fused prefix kernels (fp16/bf16; T5: the biased instances) and the ATen path (float32)
    inside T5 and BART: logits and prefix gradients against the twin on the same device and dtype."""
    ours = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P))
    prefix = module_of(ours, PrefixKV)
    randomize(prefix)
    ours.to("cuda", dtype)
    twin = prefix.prefix.detach().clone().requires_grad_()
    ids, mask, labels = (t.cuda() for t in batch())
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = reference_forward(kind, twin, input_ids=ids, attention_mask=mask, labels=labels)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert rel_err(out.logits, ref.logits) < tol
    grad = torch.randn_like(out.logits)
    out.logits.backward(grad)
    ref.logits.backward(grad)
    assert rel_err(prefix.prefix.grad, twin.grad) < tol


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("beams", [1, 3])
def test_prefix_three_sites_generate_equals_recomputing_without_a_cache(kind, beams):
    """generate() with its cache (the prefix never in it; cross-attention keys cached after step 1)
    gives the tokens of generate() recomputing every step."""
    ours = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P))
    randomize(module_of(ours, PrefixKV), std=2.0)
    ids, mask, _ = batch()
    cached = generate(ours, ids, mask, beams)
    assert torch.equal(cached, generate(ours, ids, mask, beams, use_cache=False))
    assert not torch.equal(cached, generate(MODELS[kind](), ids, mask, beams))  # the prefix matters


def test_prefix_on_mbart_and_bart_decoder_positions():
    """mBART takes the prefix too; BART's decoder positions start at P (peft's cache makes them so),
    its encoder's at 0."""
    ours = peftkern.inject(tiny_models.mbart(), peftkern.PrefixConfig(num_virtual_tokens=P))
    randomize(module_of(ours, PrefixKV))
    ids, mask, labels = batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == labels.shape + (97,) and torch.isfinite(out.logits).all()
    model = peftkern.inject(tiny_models.bart(), peftkern.PrefixConfig(num_virtual_tokens=P))
    seen = {}
    for n in ("model.encoder.embed_positions", "model.decoder.embed_positions"):
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o))
    model(input_ids=ids, attention_mask=mask, labels=labels)
    table = model.model.decoder.embed_positions.weight
    offset = model.model.decoder.embed_positions.offset
    assert torch.equal(
        seen["model.decoder.embed_positions"][0], table[offset + P : offset + P + labels.shape[1]]
    )
    enc = model.model.encoder.embed_positions
    assert torch.equal(seen["model.encoder.embed_positions"][0], enc.weight[offset : offset + ids.shape[1]])


def assert_mixed_equals_alone(model, names):
    """A mixed batch (peftkern.tasks(names)) equals each sample through its own adapter alone:
    logits, and generate()'s tokens with beams."""
    ids, mask, labels = batch()
    with torch.no_grad():
        with peftkern.tasks(names):
            mixed = model(input_ids=ids, attention_mask=mask, labels=labels).logits
            mixed_beams = generate(model, ids, mask, 3)
        for i, name in enumerate(names):
            peftkern.set_active(model, name)
            one = slice(i, i + 1)
            alone = model(input_ids=ids[one], attention_mask=mask[one], labels=labels[one]).logits
            assert rel_err(mixed[one], alone) < 1e-5, name
            assert torch.equal(mixed_beams[one], generate(model, ids[one], mask[one], 3)), name


@pytest.mark.parametrize("kind", MODELS)
def test_prefix_per_sample_tasks_and_mixed_batches(kind):
    """num_tasks: each sample equals its task's prefix alone; a mixed batch of named prefixes of
    different lengths (and a sample without) equals each sample through its own, in generate() with
    beams too."""
    ids, mask, labels = batch()
    multi = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P, num_tasks=3))
    prefix = module_of(multi, PrefixKV)
    randomize(prefix)
    tasks = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = multi(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tasks).logits
        for i, t in enumerate(tasks.tolist()):
            alone = multi(
                input_ids=ids[i : i + 1],
                attention_mask=mask[i : i + 1],
                labels=labels[i : i + 1],
                task_ids=torch.tensor([t]),
            ).logits
            assert rel_err(out[i : i + 1], alone) < 1e-5
        beams = generate(multi, ids, mask, 3, task_ids=tasks)
        for i, t in enumerate(tasks.tolist()):
            assert torch.equal(
                beams[i : i + 1],
                generate(multi, ids[i : i + 1], mask[i : i + 1], 3, task_ids=torch.tensor([t])),
            )

    model = MODELS[kind]()
    peftkern.inject(model, peftkern.PrefixConfig(num_virtual_tokens=P), "a")
    peftkern.inject(model, peftkern.PrefixConfig(num_virtual_tokens=P + 2), "b")
    for m in model.modules():
        if isinstance(m, PrefixKV):
            randomize(m, seed=m.prefix_len)
    assert_mixed_equals_alone(model, ["b", None, "a"])


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("reentrant", [False, True])
def test_prefix_gradient_checkpointing_gives_the_same_gradients(kind, reentrant):
    """Each checkpointed layer recomputes its prefix attention (the prefix from the call's keyword
    arguments) with the same result: the reparametrisation's gradients are unchanged."""
    grads = []
    for checkpointing in (False, True):
        model = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P, projection_dim=8))
        randomize(module_of(model, PrefixKV), std=0.5)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        ids, mask, labels = batch()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append([t.grad for t in module_of(model, PrefixKV).parameters()])
    for a, b in zip(*grads):
        assert rel_err(b, a) < 1e-6


@pytest.mark.parametrize("kind", MODELS)
def test_prefix_save_load_and_merge(tmp_path, kind):
    model = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P, projection_dim=8))
    randomize(module_of(model, PrefixKV), std=0.5)
    ids, mask, labels = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(MODELS[kind](), tmp_path)
    merged = copy.deepcopy(model)
    peftkern.merge(merged)
    assert module_of(merged, PrefixKV).prefix is not None
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids, attention_mask=mask, labels=labels).logits, before) < 1e-6
        assert rel_err(merged(input_ids=ids, attention_mask=mask, labels=labels).logits, before) < 1e-5


def test_prefix_sites_refusals():
    with pytest.raises(ValueError, match="sites must be one of"):
        peftkern.PrefixConfig(sites=["decoder", "ffn"])
    with pytest.raises(TypeError, match="sites must be None or a non-empty list"):
        peftkern.PrefixConfig(sites="decoder")
    with pytest.raises(ValueError, match="names a site twice"):
        peftkern.PrefixConfig(sites=["cross", "cross"])
    with pytest.raises(ValueError, match="is not one"):
        peftkern.inject(tiny_models.llama(), peftkern.PrefixConfig(sites=["decoder"]))
    model = peftkern.inject(
        tiny_models.bart(), peftkern.PrefixConfig(num_virtual_tokens=P, sites=["encoder"]), "a"
    )
    with pytest.raises(ValueError, match="cannot join them"):
        peftkern.inject(model, peftkern.PrefixConfig(num_virtual_tokens=P), "b")
    assert peftkern.PrefixConfig(sites=("cross", "encoder")).sites == ["encoder", "cross"]


@pytest.mark.parametrize("sites", [["encoder"], ["cross"], ["encoder", "cross"]])
def test_prefix_site_subsets_touch_only_their_attentions(sites):
    """A prefix of some sites: the encoder's outputs change only with an encoder prefix; every site
    not chosen computes as the base model."""
    base = tiny_models.t5()
    model = peftkern.inject(tiny_models.t5(), peftkern.PrefixConfig(num_virtual_tokens=P, sites=sites))
    randomize(module_of(model, PrefixKV))
    ids, mask, labels = batch()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        ref = base(input_ids=ids, attention_mask=mask, labels=labels)
    same_encoder = torch.allclose(out.encoder_last_hidden_state, ref.encoder_last_hidden_state, atol=1e-6)
    assert same_encoder == ("encoder" not in sites)
    assert not torch.allclose(out.logits, ref.logits, atol=1e-4)


# ------------------------------------------------------------------------------------------ prompts
def peft_prompt(kind, encoder):
    if encoder is None:
        config = peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=N)
    else:
        config = peft.PromptEncoderConfig(
            task_type="SEQ_2_SEQ_LM",
            num_virtual_tokens=N,
            encoder_hidden_size=16,
            encoder_reparameterization_type=encoder.upper(),
        )
    torch.manual_seed(5)
    theirs = peft.get_peft_model(MODELS[kind](), config)
    randomize(theirs.prompt_encoder, std=0.5)
    return theirs


def ours_prompt(kind, encoder, theirs=None, **config):
    cfg = peftkern.PromptConfig(
        num_virtual_tokens=N, encoder=encoder, encoder_hidden_size=16 if encoder else None, **config
    )
    ours = peftkern.inject(MODELS[kind](), cfg)
    prompt = module_of(ours, SoftPrompt)
    if theirs is not None:
        state = {
            k.split("prompt_encoder.default.")[1]: v
            for k, v in theirs.state_dict().items()
            if "prompt_encoder.default." in k
        }
        if encoder is None:  # peft's SEQ_2_SEQ_LM table holds 2N rows; its forward reads the first N
            with torch.no_grad():
                prompt.prompt.copy_(state["embedding.weight"][None, :N])
        else:
            state["embedding.weight"] = state["embedding.weight"][:N]
            prompt.load_state_dict(state, strict=True)
    return ours, prompt


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("encoder", [None, "mlp"])
def test_prompt_equals_peft(kind, encoder):
    """Prompt tuning and P-tuning (the MLP encoder) in front of the encoder: logits, loss and every
    prompt gradient equal peft's SEQ_2_SEQ_LM model with the same weights. (peft runs a P-tuning LSTM
    over 2N virtual tokens there and keeps the first N, so its LSTM weights give other prompts here;
    its saved prompts load: test_a_peft_seq2seq_prompt_checkpoint_loads.)"""
    theirs = peft_prompt(kind, encoder)
    ours, prompt = ours_prompt(kind, encoder, theirs)
    ids, mask, labels = batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == labels.shape + (97,)
    assert rel_err(out.logits, ref.logits) < 1e-6
    assert out.encoder_last_hidden_state.shape[1] == N + ids.shape[1]
    out.loss.backward()
    ref.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, t in prompt.named_parameters():
        t_ref = theirs_params[f"prompt_encoder.default.{'embedding.weight' if encoder is None else name}"]
        if encoder is None or name == "embedding.weight":
            assert rel_err(t.grad.reshape(N, -1), t_ref.grad[:N]) < 1e-5, name
            assert encoder is not None or t_ref.grad[N:].abs().sum() == 0  # peft's unread rows
        else:
            assert rel_err(t.grad, t_ref.grad) < 1e-5, name


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("beams", [1, 3])
def test_prompt_generate_equals_peft(kind, beams):
    theirs = peft_prompt(kind, None)
    ours, _ = ours_prompt(kind, None, theirs)
    ids, mask, _ = batch()
    got = generate(ours, ids, mask, beams)
    assert torch.equal(got, generate(theirs, ids, mask, beams))
    assert torch.equal(got, generate(ours, ids, mask, beams, use_cache=False))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("encoder", [None, "mlp", "lstm"])
def test_a_peft_seq2seq_prompt_checkpoint_loads(tmp_path, kind, encoder):
    theirs = peft_prompt(kind, encoder)
    theirs.save_pretrained(tmp_path)  # peft saves the encoder's output, [2N, E]
    ours, _ = ours_prompt(kind, None)
    peftkern.integrations.peft.load_prompt_embeddings(ours, tmp_path)
    assert same_logits(ours, theirs) < 1e-5


@pytest.mark.parametrize("kind", MODELS)
def test_prompt_per_sample_tasks_and_mixed_batches(kind):
    ids, mask, labels = batch()
    multi, prompt = ours_prompt(kind, None, num_tasks=3)
    randomize(prompt, std=0.5)
    tasks = torch.tensor([1, 2, 0])
    with torch.no_grad():
        out = multi(input_ids=ids, attention_mask=mask, labels=labels, task_ids=tasks).logits
        beams = generate(multi, ids, mask, 3, task_ids=tasks)
        for i, t in enumerate(tasks.tolist()):
            one = dict(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
            alone = multi(**one, labels=labels[i : i + 1], task_ids=torch.tensor([t])).logits
            assert rel_err(out[i : i + 1], alone) < 1e-5
            assert torch.equal(
                beams[i : i + 1], generate(multi, *one.values(), 3, task_ids=torch.tensor([t]))
            )

    model = MODELS[kind]()
    peftkern.inject(model, peftkern.PromptConfig(num_virtual_tokens=N), "a")
    peftkern.inject(model, peftkern.PromptConfig(num_virtual_tokens=N if kind == "bart" else N + 2), "b")
    for m in model.modules():
        if isinstance(m, SoftPrompt):
            randomize(m, seed=m.num_tokens, std=0.5)
    assert_mixed_equals_alone(model, ["b", "a", "a"] if kind == "bart" else ["b", None, "a"])
    if kind == "bart":  # learned positions: prompts of different lengths in one batch are refused
        peftkern.inject(model, peftkern.PromptConfig(num_virtual_tokens=N + 1), "c")
        with pytest.raises(ValueError, match="different lengths"), peftkern.tasks(["c", "a", "a"]):
            model(input_ids=ids, attention_mask=mask, labels=labels)


@pytest.mark.parametrize("kind", MODELS)
def test_prompt_save_load_and_merge(tmp_path, kind):
    model, prompt = ours_prompt(kind, "mlp")
    randomize(prompt, std=0.5)
    ids, mask, labels = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels).logits
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(MODELS[kind](), tmp_path)
    peftkern.merge(model)
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids, attention_mask=mask, labels=labels).logits, before) < 1e-6
        assert rel_err(model(input_ids=ids, attention_mask=mask, labels=labels).logits, before) < 1e-5


def test_prompt_tuning_on_t5_xxl_trains_20480_parameters():
    """Lester et al.: a 5-token prompt on T5-XXL (T5 1.1 LM-adapted: d_model 4096, gated-GeLU FFN,
    untied head) trains 5 * 4096 parameters, against the model's 11 B. Built on the meta device."""
    config = transformers.T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(config)
    peftkern.inject(model, peftkern.PromptConfig(num_virtual_tokens=5))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable == 20_480
    assert total > 11e9


@pytest.mark.parametrize("kind", MODELS)
def test_gated_prefix_unipelt(kind):
    """UniPELT's gated prefix on an encoder-decoder: one gate per site layer, read from that
    attention's input; gates at 1 give the ungated prefix's logits, and every gate gets a gradient."""
    gated = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P, gate=True))
    plain = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P))
    prefix, ungated = module_of(gated, PrefixKV), module_of(plain, PrefixKV)
    randomize(ungated)
    with torch.no_grad():
        prefix.prefix.copy_(ungated.prefix)
        prefix.gate.weight.zero_()
        prefix.gate.bias.fill_(30.0)  # sigmoid(30) = 1 in float32
    ids, mask, labels = batch()
    out = gated(input_ids=ids, attention_mask=mask, labels=labels)
    assert rel_err(out.logits, plain(input_ids=ids, attention_mask=mask, labels=labels).logits) < 1e-6
    with torch.no_grad():
        prefix.gate.bias.fill_(0.0)
    gated(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert prefix.gate.weight.shape[0] == prefix.num_layers
    assert (prefix.gate.weight.grad.abs().sum(-1) > 0).all()  # every site layer's gate
