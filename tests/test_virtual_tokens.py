"""Prefix tuning, P-tuning v2, prompt tuning, P-tuning and VPT through peftkern.inject on tiny random
Hugging Face models (BERT; Llama with grouped-query attention; ViT).

The references: peft's prefix tuning written out (the prefix as P past tokens in a DynamicCache, the
mask extended; tests/reference.py), Hugging Face peft itself for prompt tuning and P-tuning, a
greedy decode that recomputes every step for generate(), and VPT written out on the ViT's blocks."""

import copy
import warnings

import pytest
import torch

import peftkern
from peftkern.nn import PrefixKV, SoftPrompt, VisualPrompt
from tests import reference, tiny_models

transformers = pytest.importorskip("transformers")

P, N = 5, 4  # prefix length, prompt length


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def greedy(model, ids, mask, steps):
    """generate()'s tokens and each step's logits [steps, B, V]."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits)


def batch(seed=1, B=3, L=9, pad=True, left=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if pad:  # sample 0 padded by 3, sample 1 by 1
        if left:
            mask[0, :3], mask[1, :1] = 0, 0
        else:
            mask[0, -3:], mask[1, -1:] = 0, 0
    return ids, mask


def module_of(model, cls):
    found = [m for m in model.modules() if isinstance(m, cls)]
    assert len(found) == 1, found
    return found[0]


def randomize(module, seed=3, std=1.0):
    """Trained-looking values (the init is near zero, which would hide a misplaced prefix)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for t in module.parameters():
            t.normal_(0, std)


MODELS = {"bert": tiny_models.bert, "llama": tiny_models.llama}


def hidden(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def prefixed(kind, **config):
    model = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P, **config))
    prefix = module_of(model, PrefixKV)
    randomize(prefix, std=0.5 if config.get("projection_dim") else 1.0)
    return model, prefix


# ------------------------------------------------------------------------------------------ prefix
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("projection_dim", [None, 8])
@pytest.mark.parametrize("left", [True, False])
def test_prefix_equals_peft_past_key_values(kind, projection_dim, left):
    """Logits and every prefix gradient equal the peft-style reference on a padded batch."""
    model, prefix = prefixed(kind, projection_dim=projection_dim)
    base, twin = MODELS[kind](), copy.deepcopy(prefix)
    ids, mask = batch(left=left)
    out = hidden(model(input_ids=ids, attention_mask=mask))
    ref = hidden(reference.prefix_model(base, twin, ids, mask))
    assert out.shape == ref.shape
    keep = mask.bool()  # padded query rows are not compared (they differ in the base model too)
    assert rel_err(out[keep], ref[keep]) < 1e-5
    grad = torch.randn_like(out) * keep[..., None]
    out.backward(grad)
    ref.backward(grad)
    for (name, t), t_ref in zip(prefix.named_parameters(), twin.parameters()):
        assert t.grad is not None and rel_err(t.grad, t_ref.grad) < 1e-5, name
    assert all(t.grad is None for n, t in model.named_parameters() if "peftkern_prefix" not in n)


def test_prefix_positions_start_at_p():
    """Rotary (Llama) and learned absolute (BERT) positions: the sequence sits at P.. as in the
    reference; given position ids are shifted by P too; positions from 0 would give other outputs."""
    for kind in MODELS:
        model, prefix = prefixed(kind)
        ids, mask = batch(pad=False)
        out = hidden(model(input_ids=ids, attention_mask=mask))
        positions = torch.arange(ids.shape[1])[None]
        given = hidden(model(input_ids=ids, attention_mask=mask, position_ids=positions))
        assert rel_err(given, out) < 1e-6
        ref = hidden(reference.prefix_model(MODELS[kind](), prefix, ids, mask))
        assert rel_err(out, ref) < 1e-5
        wrong = hidden(reference.prefix_model(MODELS[kind](), prefix, ids, mask, position_ids=positions))
        assert rel_err(out, wrong) > 1e-3


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_prefix_generate_equals_the_cache_reference(projection_dim):
    model, prefix = prefixed("llama", projection_dim=projection_dim)
    ids, mask = batch()
    tokens, logits = greedy(model, ids, mask, 8)
    ref, ref_logits = reference.prefix_greedy(tiny_models.llama(), prefix, ids, mask, 8)
    assert torch.equal(tokens, ref)
    assert rel_err(logits, ref_logits) < 1e-5
    # the prefix matters: without it the tokens differ
    assert not torch.equal(tokens, greedy(tiny_models.llama(), ids, mask, 8)[0])


@pytest.mark.parametrize("kind", MODELS)
def test_prefix_per_sample_tasks(kind):
    model, prefix = prefixed(kind, num_tasks=3)
    ids, mask = batch()
    task_ids = torch.tensor([2, 0, 2])
    out = hidden(model(input_ids=ids, attention_mask=mask, task_ids=task_ids))
    ref = hidden(reference.prefix_model(MODELS[kind](), prefix, ids, mask, task_ids=task_ids))
    keep = mask.bool()
    assert rel_err(out[keep], ref[keep]) < 1e-5
    with peftkern.task_ids(task_ids):
        again = hidden(model(input_ids=ids, attention_mask=mask))
    assert torch.equal(again, out)
    with pytest.raises(ValueError, match=r"PrefixConfig\(num_tasks=3\): pass task_ids"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\)"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"task_ids must be an int tensor \[3\]"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1]))


def test_prefix_generate_per_sample_tasks():
    model, prefix = prefixed("llama", num_tasks=2)
    ids, mask = batch()
    task_ids = torch.tensor([1, 0, 1])
    with peftkern.task_ids(task_ids):
        tokens, logits = greedy(model, ids, mask, 6)
    ref, ref_logits = reference.prefix_greedy(tiny_models.llama(), prefix, ids, mask, 6, task_ids=task_ids)
    assert torch.equal(tokens, ref)
    assert rel_err(logits, ref_logits) < 1e-5


@pytest.mark.parametrize("kind", MODELS)
def test_prefix_profile_shows_the_op_in_every_layer(kind):
    model, _ = prefixed(kind)
    ids, mask = batch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hidden(model.train()(input_ids=ids, attention_mask=mask)).sum().backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    layers = model.config.num_hidden_layers
    assert counts.get("peftkern::prefix_attention_forward") == layers, counts
    assert counts.get("peftkern::prefix_attention_backward") == layers, counts


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("projection_dim", [None, 8])
def test_prefix_gradient_checkpointing_gives_the_same_gradients(kind, projection_dim):
    def grads(checkpointing):
        model, prefix = prefixed(kind, projection_dim=projection_dim)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids, mask = batch()
        hidden(model(input_ids=ids, attention_mask=mask))[mask.bool()].pow(2).sum().backward()
        return [t.grad.clone() for t in prefix.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert rel_err(a, b) < 1e-6


def test_prefix_reentrant_gradient_checkpointing():
    def grads(checkpointing):
        model, prefix = prefixed("llama", projection_dim=8)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
        ids, mask = batch()
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()
        return [t.grad.clone() for t in prefix.parameters()]

    for a, b in zip(grads(False), grads(True)):
        assert rel_err(a, b) < 1e-6


def test_prefix_torch_compile():
    model, _ = prefixed("llama")
    ids, mask = batch()
    expected = model(input_ids=ids, attention_mask=mask).logits
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask).logits
    assert rel_err(out, expected) < 1e-6


@pytest.mark.parametrize(
    "config, formula",
    [
        (dict(), 2 * 2 * 2 * 8 * P),  # llama: layers x (k, v) x kv heads x head dim x P
        (dict(num_tasks=3), 3 * 2 * 2 * 2 * 8 * P),
        # embedding [P, Hkv*D], Linear(Hkv*D, 8), Linear(8, layers * 2 * Hkv*D)
        (dict(projection_dim=8), P * 16 + (16 * 8 + 8) + (8 * 64 + 64)),
    ],
)
def test_prefix_trainable_count_is_the_formula(config, formula):
    model, _ = prefixed("llama", **config)
    trainable, total = peftkern.trainable_parameters(model)
    assert trainable == formula
    assert total == sum(t.numel() for t in tiny_models.llama().parameters()) + formula


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_prefix_save_load_and_merge(tmp_path, projection_dim):
    model, _ = prefixed("bert", projection_dim=projection_dim)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(tiny_models.bert(), tmp_path)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).last_hidden_state, out)
    peftkern.merge(loaded, verbose=False)
    prefix = module_of(loaded, PrefixKV)
    assert prefix.embedding is None and prefix.prefix.requires_grad == (projection_dim is None)
    assert rel_err(loaded(input_ids=ids, attention_mask=mask).last_hidden_state, out) < 1e-6


def test_prefix_attention_dropout_runs_the_composite_path():
    """BERT with attention dropout in training: the concatenated-KV path (warned); with a dropout of
    1e-9 it must give the reference's numbers (masks, GQA and task prefixes right); in eval the
    fused op runs."""
    for kind, field in (("bert", "attention_probs_dropout_prob"), ("llama", "attention_dropout")):
        model = peftkern.inject(
            MODELS[kind](**{field: 1e-9}), peftkern.PrefixConfig(num_virtual_tokens=P, num_tasks=2)
        )
        prefix = module_of(model, PrefixKV)
        randomize(prefix)
        ids, mask = batch()
        task_ids = torch.tensor([1, 0, 1])
        import peftkern.integrations.methods.prefix as prefix_method

        prefix_method._warned_dropout = False
        with pytest.warns(UserWarning, match="slow composite path"):
            out = hidden(model.train()(input_ids=ids, attention_mask=mask, task_ids=task_ids))
        ref = hidden(reference.prefix_model(MODELS[kind](), prefix, ids, mask, task_ids=task_ids))
        keep = mask.bool()
        assert rel_err(out[keep], ref[keep]) < 1e-5


@pytest.mark.parametrize("left", [True, False])
def test_prefix_roberta_positions(left):
    """RoBERTa counts positions from padding_idx + 1 over non-padding tokens: after a prefix of P past
    tokens they start at padding_idx + 1 + P (what peft's cache gives)."""
    model = peftkern.inject(tiny_models.roberta(), peftkern.PrefixConfig(num_virtual_tokens=P))
    prefix = module_of(model, PrefixKV)
    randomize(prefix)
    ids, mask = batch(left=left)
    ids = ids.masked_fill(mask == 0, 1)  # RoBERTa finds padding by its id
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = reference.prefix_model(tiny_models.roberta(), prefix, ids, mask).last_hidden_state
    keep = mask.bool()
    assert rel_err(out[keep], ref[keep]) < 1e-5


def test_prefix_on_a_head_model_that_calls_its_base_positionally():
    """BertForSequenceClassification calls self.bert(input_ids, ...): task ids and output flags still
    reach the base."""
    model = peftkern.inject(
        tiny_models.bert_head("BertForSequenceClassification", num_labels=3),
        peftkern.PrefixConfig(num_virtual_tokens=P, num_tasks=2),
    )
    prefix = module_of(model, PrefixKV)
    randomize(prefix)
    ids, mask = batch()
    task_ids = torch.tensor([0, 1, 1])
    out = model(ids, attention_mask=mask, task_ids=task_ids, output_hidden_states=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    base = tiny_models.bert_head("BertForSequenceClassification", num_labels=3)
    ref = reference.prefix_model(base, prefix, ids, mask, task_ids=task_ids)
    assert rel_err(out.logits, ref.logits) < 1e-5


def test_prefix_beams_and_return_sequences_take_per_sample_tasks():
    """generate() repeats each sample num_beams times: task ids for the B samples follow."""
    model, _ = prefixed("llama", num_tasks=2)
    ids, mask = batch(pad=False)
    task_ids = torch.tensor([1, 0, 1])
    kw = dict(max_new_tokens=5, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with peftkern.task_ids(task_ids):
        together = model.generate(input_ids=ids, attention_mask=mask, **kw)
    for i in range(3):
        with peftkern.task_ids(task_ids[i : i + 1]):
            alone = model.generate(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], **kw)
        assert torch.equal(together[2 * i : 2 * i + 2], alone)


def test_a_single_task_model_ignores_peftkern_task_ids():
    model, _ = prefixed("llama")
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask).logits
    with peftkern.task_ids(torch.tensor([3, 3, 3])):
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, out)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 1\)"):
        model(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 0]))


def test_dropout_path_per_head_float_masks():
    """The composite path itself, with a per-head additive mask, GQA and per-task prefixes: against
    the reference formula (dropout 1e-9, so the draws do not matter)."""
    from peftkern.integrations.methods.prefix import _prefix_attention_composite

    torch.manual_seed(0)
    B, H, Hkv, L, S, D, T = 2, 4, 2, 3, 6, 8, 3
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    pk, pv = torch.randn(T, Hkv, P, D), torch.randn(T, Hkv, P, D)
    ids = torch.tensor([2, 0])
    mask = torch.randn(B, H, L, S).masked_fill(torch.rand(B, H, L, S) < 0.3, float("-inf"))
    for causal in (False, True):
        out = _prefix_attention_composite(q, k, v, pk, pv, ids, mask, causal, None, 1e-9)
        ref = reference.prefix_attention(q, k, v, pk, pv, prefix_ids=ids, attn_mask=mask, causal=causal)
        assert rel_err(out.transpose(1, 2), ref) < 1e-5


def test_prefix_refusals():
    with pytest.raises(ValueError, match="PrefixConfig needs a Hugging Face transformers model"):
        peftkern.inject(torch.nn.Linear(2, 2), peftkern.PrefixConfig())
    old_style = tiny_models.bert()
    type(old_style)._supports_attention_backend, saved = False, type(old_style)._supports_attention_backend
    try:
        with pytest.raises(ValueError, match="does not take its attention from transformers"):
            peftkern.inject(old_style, peftkern.PrefixConfig())
    finally:
        type(old_style)._supports_attention_backend = saved
    model = tiny_models.bert(is_decoder=True, add_cross_attention=True)
    with pytest.raises(ValueError, match="cross-attention"):
        peftkern.inject(model, peftkern.PrefixConfig())
    assert not any(isinstance(m, PrefixKV) for m in model.modules())
    for unknown in (  # positions from the mask (OPT); no layer index in its attention (DistilBERT)
        transformers.OPTForCausalLM(
            transformers.OPTConfig(**tiny_models.BERT, ffn_dim=48, word_embed_proj_dim=32)
        ),
        transformers.DistilBertModel(
            transformers.DistilBertConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4)
        ),
    ):
        with pytest.raises(ValueError, match="knows how the positions of these model types start"):
            peftkern.inject(unknown, peftkern.PrefixConfig())
    for bad, err, message in [
        (dict(num_virtual_tokens=0), ValueError, "num_virtual_tokens must be in"),
        (dict(projection_dim=1.5), TypeError, "projection_dim must be an int"),
        (dict(num_tasks=0), ValueError, "num_tasks must be in"),
    ]:
        with pytest.raises(err, match=f"PrefixConfig: {message}"):
            peftkern.PrefixConfig(**bad)


def test_prefix_attention_outside_the_injected_call_is_refused():
    model, _ = prefixed("llama")
    layer = model.model.layers[0].self_attn
    x = torch.randn(1, 3, 32)
    cos_sin = model.model.rotary_emb(x, torch.arange(3)[None])
    with pytest.raises(RuntimeError, match="without the prefix"):
        layer(x, position_embeddings=cos_sin, attention_mask=None)


# ------------------------------------------------------------------------------------------ prompts
def peft_prompt_model(encoder):
    peft = pytest.importorskip("peft")
    if encoder is None:
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    else:
        config = peft.PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=N,
            encoder_hidden_size=16,
            encoder_reparameterization_type=encoder.upper(),
        )
    torch.manual_seed(5)
    return peft.get_peft_model(tiny_models.llama(), config)


def prompted(encoder, kind="llama", **config):
    hidden_size = 16 if encoder else None
    cfg = peftkern.PromptConfig(
        num_virtual_tokens=N, encoder=encoder, encoder_hidden_size=hidden_size, **config
    )
    return peftkern.inject(MODELS[kind](), cfg)


@pytest.mark.parametrize("encoder", [None, "mlp", "lstm"])
def test_prompt_equals_peft(encoder):
    """Prompt tuning and P-tuning against Hugging Face peft with the same weights: logits (trimmed to
    the input), loss with labels, and every prompt gradient."""
    theirs = peft_prompt_model(encoder)
    ours = prompted(encoder)
    prompt = module_of(ours, SoftPrompt)
    state = {
        k.split("prompt_encoder.default.")[1]: v
        for k, v in theirs.state_dict().items()
        if "prompt_encoder.default." in k
    }
    if encoder is None:
        with torch.no_grad():
            prompt.prompt.copy_(state["embedding.weight"][None])
    else:
        prompt.load_state_dict(state, strict=True)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == ids.shape + (97,)
    assert rel_err(out.logits, ref.logits[:, N:]) < 1e-6
    assert abs(out.loss.item() - ref.loss.item()) < 1e-6 * ref.loss.item()
    out.loss.backward()
    ref.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, t in prompt.named_parameters():
        if encoder is None:
            t_ref = theirs_params["prompt_encoder.default.embedding.weight"]
            assert rel_err(t.grad[0], t_ref.grad) < 1e-5
        else:
            t_ref = theirs_params[f"prompt_encoder.default.{name}"]
            assert rel_err(t.grad, t_ref.grad) < 1e-5, name


@pytest.mark.parametrize("encoder", [None, "mlp"])
def test_prompt_generate_equals_recomputing_every_step(encoder):
    model = prompted(encoder)
    prompt = module_of(model, SoftPrompt)
    randomize(prompt)
    ids, mask = batch()
    tokens, logits = greedy(model, ids, mask, 8)
    prompts = prompt.prompts().detach()[0].expand(ids.shape[0], -1, -1)
    ref, ref_logits = reference.prompt_greedy(tiny_models.llama(), prompts, ids, mask, 8)
    assert torch.equal(tokens, ref)
    assert rel_err(logits, ref_logits) < 1e-5


def test_prompt_generate_per_sample_tasks_and_compile():
    model = prompted(None, num_tasks=2)
    prompt = module_of(model, SoftPrompt)
    randomize(prompt)
    ids, mask = batch()
    task_ids = torch.tensor([1, 0, 0])
    with peftkern.task_ids(task_ids):  # generate() refuses arguments the forward does not name
        tokens, logits = greedy(model, ids, mask, 6)
    ref, ref_logits = reference.prompt_greedy(
        tiny_models.llama(), prompt.prompt[task_ids].detach(), ids, mask, 6
    )
    assert torch.equal(tokens, ref)
    assert rel_err(logits, ref_logits) < 1e-5
    expected = model(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits
    compiled = torch.compile(model, backend="aot_eager")
    assert rel_err(compiled(input_ids=ids, attention_mask=mask, task_ids=task_ids).logits, expected) < 1e-6


def test_prompt_trims_only_token_level_outputs():
    """A sequence classifier's logits [B, C] stay whole even when C = N + L; a QA model's start and end
    scores are cut back to the input's tokens."""
    ids, mask = batch(pad=False, L=6)
    cls = peftkern.inject(
        tiny_models.bert_head("BertForSequenceClassification", num_labels=N + 6), peftkern.PromptConfig(N)
    )
    assert cls(ids, attention_mask=mask).logits.shape == (3, N + 6)
    qa = peftkern.inject(tiny_models.bert_head("BertForQuestionAnswering"), peftkern.PromptConfig(N))
    out = qa(ids, attention_mask=mask)
    assert out.start_logits.shape == out.end_logits.shape == (3, 6)
    base = tiny_models.bert_head("BertForQuestionAnswering")
    embeds = torch.cat(
        [module_of(qa, SoftPrompt).prompt[0].expand(3, -1, -1), base.get_input_embeddings()(ids)], 1
    )
    ref = base(inputs_embeds=embeds, attention_mask=torch.ones(3, N + 6, dtype=torch.long))
    assert rel_err(out.start_logits, ref.start_logits[:, N:]) < 1e-6


def test_prompt_refusals():
    t5 = transformers.T5ForConditionalGeneration(
        transformers.T5Config(vocab_size=97, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    )
    t5.config.model_type = "pegasus"  # an encoder-decoder peftkern does not know
    with pytest.raises(ValueError, match="prompts on encoder-decoders are supported for model types"):
        peftkern.inject(t5, peftkern.PromptConfig(N))
    model = prompted(None)
    ids, mask = batch()
    with pytest.raises(ValueError, match="static cache"):
        model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=2,
            cache_implementation="static",
            pad_token_id=0,
        )


def test_prompt_on_bert_with_token_types_and_tasks():
    model = prompted(None, kind="bert", num_tasks=2)
    prompt = module_of(model, SoftPrompt)
    randomize(prompt)
    ids, mask = batch(left=False)
    types = torch.randint(0, 2, ids.shape)
    task_ids = torch.tensor([1, 1, 0])
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, task_ids=task_ids).last_hidden_state
    base = tiny_models.bert()
    embeds = torch.cat([prompt.prompt[task_ids], base.get_input_embeddings()(ids)], 1)
    full_mask = torch.cat([torch.ones(3, N, dtype=torch.long), mask], 1)
    full_types = torch.cat([torch.zeros(3, N, dtype=torch.long), types], 1)
    ref = base(inputs_embeds=embeds, attention_mask=full_mask, token_type_ids=full_types).last_hidden_state
    assert out.shape == (3, ids.shape[1], 32)
    assert rel_err(out, ref[:, N:]) < 1e-6


def test_prompt_token_level_labels_and_positions():
    """Token-level labels [B, L] gain N -100s (the loss is the model's over the prompted sequence);
    given position ids put the prompts at 0..N-1 and the tokens after them."""
    model = prompted(None)
    randomize(module_of(model, SoftPrompt))
    ids, mask = batch(pad=False)
    positions = torch.arange(ids.shape[1])[None]
    a = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=ids)
    b = model(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.equal(a.logits, b.logits) and a.loss == b.loss
    # the loss by hand: next-token cross-entropy over [prompts; tokens], the prompts' labels ignored
    base = tiny_models.llama()
    prompts = module_of(model, SoftPrompt).prompt[0].expand(3, -1, -1)
    embeds = torch.cat([prompts, base.get_input_embeddings()(ids)], 1)
    logits = base(inputs_embeds=embeds).logits
    labels = torch.cat([torch.full((3, N), -100), ids], 1)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1))
    assert abs(b.loss.item() - loss.item()) < 1e-5


def test_prompt_init_from_tokens_and_counts():
    model = prompted(None, init_token_ids=[5, 7, 9])
    words = tiny_models.llama().get_input_embeddings().weight
    assert torch.equal(module_of(model, SoftPrompt).prompt[0], words[torch.tensor([5, 7, 9, 5])])
    assert peftkern.trainable_parameters(model)[0] == N * 32
    h = 16
    mlp = 32 * h + h + h * h + h + h * 32 + 32
    assert peftkern.trainable_parameters(prompted("mlp"))[0] == N * 32 + mlp
    lstm_layer = lambda i: 2 * (4 * h * (i + h) + 8 * h)  # noqa: E731  (both directions)
    lstm = lstm_layer(32) + lstm_layer(2 * h) + (2 * h * 2 * h + 2 * h) + (2 * h * 32 + 32)
    assert peftkern.trainable_parameters(prompted("lstm"))[0] == N * 32 + lstm
    with pytest.raises(
        ValueError, match=r"PromptConfig: init_token_ids\[0\] = 500 is not in \w+'s vocabulary of 97 tokens"
    ):
        prompted(None, init_token_ids=[500])
    with pytest.raises(ValueError, match="init_token_ids starts plain prompts"):
        peftkern.PromptConfig(encoder="mlp", init_token_ids=[1])


@pytest.mark.parametrize("encoder", [None, "lstm"])
def test_prompt_save_load_and_merge(tmp_path, encoder):
    model = prompted(encoder)
    randomize(module_of(model, SoftPrompt), std=0.3)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask).logits
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(tiny_models.llama(), tmp_path)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, out)
    peftkern.merge(loaded, verbose=False)
    prompt = module_of(loaded, SoftPrompt)
    assert prompt.encoder is None and prompt.prompt.requires_grad == (encoder is None)
    assert rel_err(loaded(input_ids=ids, attention_mask=mask).logits, out) < 1e-6


# ------------------------------------------------------------------------------------------ VPT
@pytest.mark.parametrize("deep", [False, True])
def test_vpt_equals_the_written_out_reference(deep):
    model = peftkern.inject(tiny_models.vit(), peftkern.VPTConfig(num_tokens=3, deep=deep))
    vpts = [m for m in model.modules() if isinstance(m, VisualPrompt)]
    assert len(vpts) == (2 if deep else 1)
    pixels = torch.randn(2, 3, 16, 16)
    out = model(pixel_values=pixels)
    prompts = torch.stack([v.prompt for v in vpts])
    ref_h, ref_pool = reference.vpt_vit(tiny_models.vit(), prompts, pixels)
    assert out.last_hidden_state.shape == (2, 5, 32)  # CLS + 4 patches: the prompts removed
    assert rel_err(out.last_hidden_state, ref_h) < 1e-6
    assert rel_err(out.pooler_output, ref_pool) < 1e-6
    out.pooler_output.sum().backward()
    ref_pool.sum().backward()
    for v in vpts:
        assert v.prompt.grad is not None and v.prompt.grad.abs().sum() > 0
    assert peftkern.trainable_parameters(model)[0] == (2 if deep else 1) * 3 * 32
    # the prompts change the output
    assert rel_err(out.pooler_output, tiny_models.vit()(pixel_values=pixels).pooler_output) > 1e-3


def test_vpt_gradients_equal_the_reference(tmp_path):
    model = peftkern.inject(tiny_models.vit(), peftkern.VPTConfig(num_tokens=3, deep=True))
    vpts = [m for m in model.modules() if isinstance(m, VisualPrompt)]
    prompts = torch.stack([v.prompt.detach() for v in vpts]).requires_grad_(True)
    pixels = torch.randn(2, 3, 16, 16)
    model(pixel_values=pixels).pooler_output.pow(2).sum().backward()
    reference.vpt_vit(tiny_models.vit(), prompts, pixels)[1].pow(2).sum().backward()
    for i, v in enumerate(vpts):
        assert rel_err(v.prompt.grad, prompts.grad[i]) < 1e-6
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(tiny_models.vit(), tmp_path)
    assert torch.equal(loaded(pixel_values=pixels).pooler_output, model(pixel_values=pixels).pooler_output)


def test_vpt_under_gradient_checkpointing_and_compile():
    def run(checkpointing):
        model = peftkern.inject(tiny_models.vit(), peftkern.VPTConfig(num_tokens=3, deep=True))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = model(pixel_values=torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
        out.pooler_output.pow(2).sum().backward()
        return (
            model,
            out.pooler_output,
            [v.prompt.grad for v in model.modules() if isinstance(v, VisualPrompt)],
        )

    model, out, grads = run(False)
    _, out_ckpt, grads_ckpt = run(True)
    assert rel_err(out_ckpt, out) < 1e-6
    for a, b in zip(grads, grads_ckpt):
        assert rel_err(b, a) < 1e-6
    compiled = torch.compile(model.eval(), backend="aot_eager")
    pixels = torch.randn(2, 3, 16, 16)
    assert (
        rel_err(compiled(pixel_values=pixels).pooler_output, model(pixel_values=pixels).pooler_output) < 1e-6
    )


def test_vpt_refuses_a_model_without_vit_blocks():
    with pytest.raises(ValueError, match="VPT needs a ViT-style model"):
        peftkern.inject(tiny_models.llama(), peftkern.VPTConfig())


def test_configs_round_trip():
    from peftkern.integrations.config import config_from_dict

    for c in (
        peftkern.PrefixConfig(num_virtual_tokens=3, projection_dim=4, num_tasks=2),
        peftkern.PromptConfig(encoder="lstm", encoder_hidden_size=8),
        peftkern.PromptConfig(init_token_ids=(1, 2)),
        peftkern.VPTConfig(num_tokens=2, deep=True),
    ):
        assert config_from_dict(c.to_dict()) == c


def test_inject_twice_under_one_name_is_refused():
    model, _ = prefixed("llama")
    with warnings.catch_warnings():
        with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
            peftkern.inject(model, peftkern.PromptConfig())


# ------------------------------------------------------------------------------------------ peft checkpoints
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("projection", [False, True])
def test_a_peft_prefix_checkpoint_gives_peft_logits(tmp_path, kind, projection):
    """peft's prefix tuning trained (here: randomized), saved with peft's save_pretrained, loaded into a
    peftkern PrefixConfig model: the same outputs as peft's own model on a padded batch."""
    peft = pytest.importorskip("peft")
    task = "CAUSAL_LM" if kind == "llama" else "FEATURE_EXTRACTION"
    config = peft.PrefixTuningConfig(
        task_type=task, num_virtual_tokens=P, prefix_projection=projection, encoder_hidden_size=8
    )
    torch.manual_seed(4)
    theirs = peft.get_peft_model(MODELS[kind](), config)
    randomize(theirs.prompt_encoder, std=0.5)
    theirs.save_pretrained(tmp_path)
    ours = peftkern.inject(MODELS[kind](), peftkern.PrefixConfig(num_virtual_tokens=P))
    peftkern.integrations.peft.load_prompt_embeddings(ours, tmp_path)
    ids, mask = batch(left=kind == "llama")
    with torch.no_grad():
        out = hidden(ours(input_ids=ids, attention_mask=mask))
        ref = hidden(theirs(input_ids=ids, attention_mask=mask))
    keep = mask.bool()
    assert rel_err(out[keep], ref[keep]) < 1e-5


@pytest.mark.parametrize("encoder", [None, "MLP"])
def test_a_peft_prompt_checkpoint_gives_peft_logits(tmp_path, encoder):
    pytest.importorskip("peft")
    theirs = peft_prompt_model(None if encoder is None else encoder.lower())
    randomize(theirs.prompt_encoder, std=0.3)
    theirs.save_pretrained(tmp_path)
    ours = prompted(None)
    peftkern.integrations.peft.load_prompt_embeddings(ours, tmp_path)
    ids, mask = batch()
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask).logits
        ref = theirs(input_ids=ids, attention_mask=mask).logits[:, N:]
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match=r"needs \(4, 32\)"):
        peftkern.integrations.peft.load_prompt_embeddings(ours, torch.zeros(3, 32))
    with pytest.raises(ValueError, match="without a projection or encoder"):
        peftkern.integrations.peft.load_prompt_embeddings(prompted("mlp"), tmp_path)


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", MODELS)
def test_prefix_on_cuda(kind, dtype):
    """The fused prefix kernel (fp16/bf16) and the ATen path (float32) inside real models: outputs and
    prefix gradients against the past_key_values reference on the same device and dtype (SDPA over
    the concatenation), within the dtype's rounding."""
    model, prefix = prefixed(kind, num_tasks=2)
    model.to("cuda", dtype)
    base, twin = MODELS[kind]().to("cuda", dtype), copy.deepcopy(prefix)
    ids, mask = (t.cuda() for t in batch())
    task_ids = torch.tensor([1, 0, 1], device="cuda")
    out = hidden(model(input_ids=ids, attention_mask=mask, task_ids=task_ids))
    ref = hidden(reference.prefix_model(base, twin, ids, mask, task_ids=task_ids))
    keep = mask.bool()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out[keep], ref[keep]) < tol
    grad = torch.randn_like(out) * keep[..., None]
    out.backward(grad)
    ref.backward(grad)
    for t, t_ref in zip(prefix.parameters(), twin.parameters()):
        assert rel_err(t.grad, t_ref.grad) < tol


@pytest.mark.cuda
def test_prefix_generate_on_cuda():
    model, prefix = prefixed("llama")
    model.cuda()
    ids, mask = (t.cuda() for t in batch())
    tokens, logits = greedy(model, ids, mask, 8)
    ref, ref_logits = reference.prefix_greedy(tiny_models.llama().cuda(), prefix, ids, mask, 8)
    assert torch.equal(tokens, ref)
    assert rel_err(logits, ref_logits) < 1e-5


def test_forward_signature_cached_per_class_and_read_anew_when_patched():
    """The cached signature is the bound forward's; a forward set on the instance is not the class's."""
    import inspect

    from peftkern.integrations.virtual_tokens import bound, forward_signature

    model = tiny_models.llama()
    block = model.model.layers[0]
    assert str(forward_signature(block)) == str(inspect.signature(block.forward))
    other = model.model.layers[1]
    other.forward = lambda y, scale=1.0: y * scale  # as accelerate's hooks replace it
    assert list(forward_signature(other).parameters) == ["y", "scale"]
    assert bound(other, (torch.ones(1),), {"scale": 2.0}).keys() == {"y", "scale"}
    assert list(forward_signature(block).parameters)[0] == "hidden_states"
