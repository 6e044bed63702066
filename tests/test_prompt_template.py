"""P-tuning's template (Liu et al. 2021, §3: ``[P_0:i], x, [P_i+1:m], y``) through
``PromptConfig(placeholder_token_id=...)`` on tiny random Hugging Face models (BERT, Llama, RoBERTa,
T5, BART).

The reference, written out per sample: the base model's input embeddings of the ids, the k-th
placeholder of each sample replaced by hand with row k of its prompt, the base model called with
those inputs_embeds (and the call's own mask and positions); for generate(), a greedy loop that
recomputes every step from such embeddings."""

import pytest
import torch

import peftkern
from peftkern.nn import SoftPrompt
from tests import tiny_models
from tests.test_virtual_tokens import module_of, randomize, rel_err

transformers = pytest.importorskip("transformers")

N = 4  # prompt rows
PH = 200  # a placeholder outside the tiny models' vocabulary (97)


def the_prompt(model):
    return module_of(model, SoftPrompt)


def templated(base_fn, ph=PH, encoder=None, **config):
    cfg = peftkern.PromptConfig(
        num_virtual_tokens=N,
        encoder=encoder,
        encoder_hidden_size=16 if encoder else None,
        placeholder_token_id=ph,
        **config,
    )
    model = peftkern.inject(base_fn(), cfg)
    randomize(the_prompt(model), std=0.5)
    return model


# Each sample's template: where its N placeholders stand (sample 2 has none: it gets nothing).
SLOTS = ([0, 1, 2, 7], [3, 5, 6, 8], [], [8, 9, 10, 11])


def batch(ph=PH, B=4, L=12, seed=1, pad=None, pad_id=0):
    """input_ids [B, L] with the placeholders of SLOTS, and a mask; `pad` ("left" / "right") pads
    sample 1 by 2 and sample 2 by 3 (their ids there are pad_id)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (B, L), generator=g)
    ids[ids == ph] = 3
    for b, slots in enumerate(SLOTS[:B]):
        ids[b, slots] = ph
    mask = torch.ones(B, L, dtype=torch.long)
    if pad is not None:
        for b, n in ((1, 2), (2, 3)):
            cols = slice(0, n) if pad == "left" else slice(L - n, L)
            mask[b, cols], ids[b, cols] = 0, pad_id
    return ids, mask


def filled(base, ids, rows, ph=PH):
    """The reference inputs_embeds: the base's embeddings of ids (placeholders looked up as 0), then
    sample b's k-th placeholder replaced by rows[b, k], one by one."""
    table = base.get_input_embeddings()
    embeds = table(torch.where(ids == ph, torch.zeros_like(ids), ids)).clone()
    for b in range(ids.shape[0]):
        for k, pos in enumerate((ids[b] == ph).nonzero().flatten().tolist()):
            embeds[b, pos] = rows[b, k].to(embeds.dtype)
    return embeds


def output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


MODELS = {"bert": tiny_models.bert, "llama": tiny_models.llama}


@pytest.mark.parametrize(
    "kind, encoder, pad", [("bert", None, "right"), ("llama", "mlp", "left"), ("llama", "lstm", None)]
)
def test_template_equals_the_written_out_reference(kind, encoder, pad):
    model = templated(MODELS[kind], encoder=encoder)
    ids, mask = batch(pad=pad)
    out = output(model(input_ids=ids, attention_mask=mask))
    base = MODELS[kind]()
    rows = the_prompt(model).prompts().detach()[0].expand(ids.shape[0], -1, -1)
    ref = output(base(inputs_embeds=filled(base, ids, rows), attention_mask=mask))
    assert out.shape == ref.shape and out.shape[:2] == ids.shape  # nothing prepended, nothing trimmed
    assert rel_err(out, ref) < 1e-5
    # the sample without placeholders computes as the base model on its ids
    alone = output(base(input_ids=ids[2:3], attention_mask=mask[2:3]))
    assert rel_err(out[2:3], alone) < 1e-5


def test_a_placeholder_inside_the_vocabulary():
    model = templated(tiny_models.llama, ph=96)
    ids, mask = batch(ph=96)
    base = tiny_models.llama()
    rows = the_prompt(model).prompt.detach()[0].expand(ids.shape[0], -1, -1)
    ref = base(inputs_embeds=filled(base, ids, rows, ph=96)).logits
    assert rel_err(model(input_ids=ids, attention_mask=mask).logits, ref) < 1e-5


def test_gradients_reach_the_prompt_encoder_and_labels_are_the_inputs():
    model = templated(tiny_models.llama, encoder="mlp")
    prompt = the_prompt(model)
    ids, mask = batch(pad="left")
    labels = ids.masked_fill((ids == PH) | (mask == 0), -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()

    ref_prompt = SoftPrompt(N, 32, encoder="mlp", encoder_hidden_size=16)
    ref_prompt.load_state_dict(prompt.state_dict())
    base = tiny_models.llama().requires_grad_(False)
    rows = ref_prompt.prompts()[0].expand(ids.shape[0], -1, -1)
    logits = base(inputs_embeds=filled(base, ids, rows), attention_mask=mask).logits
    # next-token cross-entropy written out, the ignored labels left out
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), labels[:, 1:].reshape(-1))
    loss.backward()
    assert abs(out.loss.item() - loss.item()) < 1e-5 * loss.item()
    grads = dict(ref_prompt.named_parameters())
    for name, t in prompt.named_parameters():
        assert t.grad is not None and t.grad.abs().sum() > 0, name
        assert rel_err(t.grad, grads[name].grad) < 1e-5, name


def test_per_sample_task_prompts_on_bert():
    model = templated(tiny_models.bert, num_tasks=3)
    ids, mask = batch(pad="right")
    types = torch.randint(0, 2, ids.shape)
    task_ids = torch.tensor([2, 0, 1, 1])
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, task_ids=task_ids)
    base = tiny_models.bert()
    rows = the_prompt(model).prompt.detach()[task_ids]
    ref = base(inputs_embeds=filled(base, ids, rows), attention_mask=mask, token_type_ids=types)
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-5


def test_roberta_keeps_its_padding_aware_positions():
    model = templated(tiny_models.roberta)
    ids, mask = batch(pad="right", pad_id=1)
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    base = tiny_models.roberta()
    real = (ids != 1).long()  # RoBERTa's positions written out: count the non-pad tokens from 2
    positions = real.cumsum(1) * real + 1
    rows = the_prompt(model).prompt.detach()[0].expand(ids.shape[0], -1, -1)
    ref = base(inputs_embeds=filled(base, ids, rows), attention_mask=mask, position_ids=positions)
    assert rel_err(out, ref.last_hidden_state) < 1e-5


def greedy_reference(base, rows, ids, mask, steps):
    """Greedy decoding, every step recomputed from the filled embeddings of all tokens so far; the
    positions from the mask. Returns the tokens and each step's last logits [steps, B, V]."""
    tokens, scores = ids, []
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        logits = base(
            inputs_embeds=filled(base, tokens, rows), attention_mask=mask, position_ids=positions
        ).logits
        scores.append(logits[:, -1])
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    return tokens, torch.stack(scores)


@pytest.mark.parametrize("cache", [None, "static"])  # the length does not change: a static cache works
def test_generate_equals_the_hand_rolled_greedy_loop(cache):
    model = templated(tiny_models.llama, encoder="mlp")
    model.generation_config.eos_token_id = None  # every sample runs all steps, as the loop does
    ids, mask = batch(pad="left")
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
        cache_implementation=cache,
    )
    rows = the_prompt(model).prompts().detach()[0].expand(ids.shape[0], -1, -1)
    ref, ref_logits = greedy_reference(tiny_models.llama(), rows, ids, mask, 5)
    assert torch.equal(out.sequences, ref)
    assert rel_err(torch.stack(out.logits), ref_logits) < 1e-5


def test_t5_fills_the_encoder_input_only():
    """The placeholder (inside the vocabulary here) in the decoder's inputs stays a token: the shared
    embedding table looks it up as usual there."""
    model = templated(tiny_models.t5, ph=96)
    model.generation_config.eos_token_id = None  # every sample runs all steps, as the loop does
    ids, mask = batch(ph=96, pad="right")
    decoder_ids = torch.tensor([[0, 96, 5], [0, 7, 96], [0, 5, 5], [0, 96, 96]])
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    base = tiny_models.t5()
    rows = the_prompt(model).prompt.detach()[0].expand(ids.shape[0], -1, -1)
    embeds = filled(base, ids, rows, ph=96)
    ref = base(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert rel_err(out, ref) < 1e-5
    # generate(): the encoder once on the template, then the decoder's steps
    tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    dec = torch.zeros(ids.shape[0], 1, dtype=torch.long)  # decoder_start_token_id
    for _ in range(4):
        logits = base(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
        dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(tokens, dec)


def test_bart_encoder_template():
    model = templated(tiny_models.bart, encoder="mlp")
    ids, mask = batch(pad="right", pad_id=1)
    decoder_ids = torch.tensor([[2, 5, 6]]).expand(ids.shape[0], -1)
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    base = tiny_models.bart()
    rows = the_prompt(model).prompts().detach()[0].expand(ids.shape[0], -1, -1)
    embeds = filled(base, ids, rows)
    ref = base(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert rel_err(out, ref) < 1e-5


def test_save_load_and_merge(tmp_path):
    model = templated(tiny_models.llama, encoder="lstm")
    ids, mask = batch(pad="left")
    out = model(input_ids=ids, attention_mask=mask).logits
    peftkern.save_pretrained(model, tmp_path)
    loaded = peftkern.from_pretrained(tiny_models.llama(), tmp_path)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, out)
    peftkern.merge(loaded, verbose=False)
    prompt = the_prompt(loaded)
    assert prompt.encoder is None and not prompt.prompt.requires_grad
    assert rel_err(loaded(input_ids=ids, attention_mask=mask).logits, out) < 1e-5
    with pytest.raises(ValueError, match="num_virtual_tokens=4 times"):  # still a template after merge
        loaded(input_ids=ids[:, 1:])


def test_init_from_tokens_fills_the_template():
    model = peftkern.inject(
        tiny_models.llama(), peftkern.PromptConfig(N, init_token_ids=[5, 7], placeholder_token_id=PH)
    )
    ids = torch.tensor([[9, PH, PH, 8, PH, PH]])
    base = tiny_models.llama()
    ref = base(input_ids=torch.tensor([[9, 5, 7, 8, 5, 7]])).logits  # the words stand in the template
    assert rel_err(model(input_ids=ids).logits, ref) < 1e-5


def test_config_checks_and_round_trip():
    from peftkern.integrations.config import config_from_dict

    cfg = peftkern.PromptConfig(placeholder_token_id=0)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert peftkern.PromptConfig().placeholder_token_id is None
    with pytest.raises(
        ValueError, match=r"PromptConfig: placeholder_token_id must be in \[0, 2\^63\); got -1"
    ):
        peftkern.PromptConfig(placeholder_token_id=-1)
    with pytest.raises(TypeError, match="PromptConfig: placeholder_token_id must be an int; got bool"):
        peftkern.PromptConfig(placeholder_token_id=True)
    for bad in (1.5, "7", [7]):
        with pytest.raises(TypeError, match="PromptConfig: placeholder_token_id must be an int"):
            peftkern.PromptConfig(placeholder_token_id=bad)


def test_refusals():
    with pytest.raises(ValueError, match="placeholder_token_id 1 is the model's pad_token_id"):
        peftkern.inject(tiny_models.bart(), peftkern.PromptConfig(N, placeholder_token_id=1))
    model = templated(tiny_models.llama)
    ids, mask = batch()
    short, long = ids.clone(), ids.clone()
    short[1, 8] = 5  # sample 1 lost one
    long[0, 4] = PH  # sample 0 has one too many
    with pytest.raises(ValueError, match=r"num_virtual_tokens=4 times .* \[4, 3, 0, 4\] times"):
        model(input_ids=short)
    with pytest.raises(ValueError, match=r"num_virtual_tokens=4 times .* \[5, 4, 0, 4\] times"):
        model(input_ids=long)
    embeds = tiny_models.llama().get_input_embeddings()(ids.clamp(max=96))
    with pytest.raises(
        ValueError, match="placeholder_token_id=200.*read from input_ids; this call gave inputs_embeds"
    ):
        model(inputs_embeds=embeds)
    # a mixed batch of named template prompts is refused before anything runs
    peftkern.inject(model, peftkern.PromptConfig(N, placeholder_token_id=PH), name="other")
    with pytest.raises(
        ValueError, match="fills a template .placeholder_token_id., which is not routed per sample"
    ):
        with peftkern.tasks(["default", "other", None, "default"]):
            model(input_ids=ids)
