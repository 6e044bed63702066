"""bench/bench_model.py on the CPU with tiny configs, so the GPU run does not fail on its first
call: every method and provider builds, its training step runs, and peftkern's model follows the
baseline's losses; the cost count matches the model; the result table carries tokens/s."""

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("peft")

import peftkern  # noqa: E402
from bench import bench_model, harness  # noqa: E402
from tests import tiny_models  # noqa: E402

TINY = {"bert": tiny_models.BERT, "llama": tiny_models.LLAMA}


@pytest.mark.parametrize("kind", TINY)
@pytest.mark.parametrize("method", bench_model.METHODS)
def test_training_step_follows_the_baseline(kind, method):
    if kind not in bench_model.KINDS.get(method, (kind,)):
        pytest.skip(f"the benchmark runs {method} on {bench_model.KINDS[method]} only")
    config = TINY[kind]
    if method == "krona" and kind == "bert":  # peft's LoKr forward draws torch.rand(1) per layer (its
        config = {**config, "hidden_dropout_prob": 0.0}  # module dropout), shifting BERT's dropout draws
    models = {
        p: bench_model.with_method(
            bench_model.build_model(kind, config, "cpu", torch.float32, method), kind, method, p
        )
        for p in (bench_model.BASELINE[method], "peftkern")
    }
    if method == "prefix":  # peft's prefix (its embedding [P, layers * 2 * Hkv * D]) into peftkern's
        prefix = models["peft"].prompt_encoder["default"].embedding.weight.detach()
        peftkern.integrations.peft.load_prompt_embeddings(models["peftkern"], prefix)
    if method == "lora":  # peft draws its own lora_A: start it from peftkern's
        with torch.no_grad():
            for n, m in models["peftkern"].named_modules():
                if isinstance(m, peftkern.nn.AdaptedLinear):
                    models["peft"].get_submodule("base_model.model." + n).lora_A["default"].weight.copy_(
                        m.lora_A["default"]
                    )
    if method in ("adalora", "krona"):  # peft's initial factors into peftkern's (its checkpoint's tensors)
        import peft

        state = peft.get_peft_model_state_dict(models["peft"])
        state = {k: v for k, v in state.items() if "classifier" not in k}  # the head: a copy of the base's
        peftkern.integrations.peft.load_peft_weights(models["peftkern"], state)
    losses = {}
    for provider, model in models.items():
        step = bench_model.training_step(model, bench_model.batches(kind, config, 3, 8, "cpu"), lr=1e-2)
        torch.manual_seed(0)  # the same dropout draws
        losses[provider] = [step(i % 2).item() for i in range(4)]
    base, ours = losses[bench_model.BASELINE[method]], losses["peftkern"]
    assert len(set(ours)) > 1  # the steps train
    for a, b in zip(ours, base):
        assert abs(a - b) <= 1e-4 * abs(b), (ours, base)


def test_bart_prefix_step_follows_peft():
    """BART-base's row on a tiny BART: peft's SEQ_2_SEQ_LM prefix (loaded into peftkern's
    sites=["decoder"] prefix) and peftkern's train to the same losses; its cost counts BART-base."""
    kind, config = "bart", tiny_models.BART
    models = {}
    for p in ("peft", "peftkern"):
        model = bench_model.build_model(kind, config, "cpu", torch.float32, "prefix")
        models[p] = bench_model.with_method(model, kind, "prefix", p)
    prefix = models["peft"].prompt_encoder["default"].embedding.weight.detach()
    peftkern.integrations.peft.load_prompt_embeddings(models["peftkern"], prefix)
    losses = {}
    for provider, model in models.items():
        step = bench_model.training_step(model, bench_model.batches(kind, config, 3, 8, "cpu"), lr=1e-2)
        losses[provider] = [step(i % 2).item() for i in range(4)]
    assert len(set(losses["peftkern"])) > 1
    for a, b in zip(losses["peftkern"], losses["peft"]):
        assert abs(a - b) <= 1e-4 * abs(b), losses
    base = bench_model.MODELS["bart-base"][1]
    ideal, flops = bench_model.step_cost(kind, base, 512, torch.bfloat16)
    model = bench_model.build_model(kind, base, "meta", torch.bfloat16)

    def linear(stack):
        return sum(
            m.weight.numel() for n, m in model.named_modules() if isinstance(m, nn.Linear) and stack in n
        )

    head = model.config.vocab_size * model.config.d_model
    assert ideal == (linear(".encoder.") + 2 * (linear(".decoder.") + head)) * 2
    assert flops > 2 * linear(".encoder.") * bench_model.TOKENS


@pytest.mark.parametrize("kind", TINY)
def test_step_cost_counts_the_model_linear_layers(kind):
    model = bench_model.build_model(kind, TINY[kind], "cpu", torch.float32)
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and (".layer." in n or ".layers." in n or n == "lm_head")
    )
    ideal, flops = bench_model.step_cost(kind, TINY[kind], 8, torch.bfloat16)
    assert ideal == 2 * linear * 2
    assert flops > 4 * linear * bench_model.TOKENS


def test_cases_and_table():
    every = list(bench_model.cases(quick=True))
    cases = [c for c in every if c.mode == "train"]
    assert {c.provider for c in cases} == {"peft", "eager", "peftkern"}
    assert all(c.flops > 0 and c.tags["tokens"] == bench_model.TOKENS for c in cases)
    mixed = [c for c in every if c.mode != "train"]  # the many-tasks rows: served batches
    assert {c.provider for c in mixed} == {"loop", "peft", "peftkern"} and all(
        c.mode == "inference" for c in mixed
    )
    assert {c.shape["tasks"] for c in mixed} == set(bench_model.MIXED_TASKS)
    rows = [
        dict(family="model", shape="m", dtype="bfloat16", mode="train", provider=p, baseline=p == "peft")
        for p in ("peft", "peftkern")
    ]
    for r, ms in zip(rows, (30.0, 20.0)):
        r.update(median_ms=ms, p20_ms=ms, p80_ms=ms, peak_mem_mb=1.0, gbps=1.0, frac_copy_bw=0.1, tflops=5.0)
        r["tokens_per_s"] = bench_model.TOKENS / (ms / 1e3)
    harness.add_speedups(rows)
    assert rows[1]["speedup_vs_eager"] == pytest.approx(1.5)
    meta = dict(gpu="GPU", date="today", torch="t", cuda="c", build={}, copy_bw_gbps=1.0)
    table = harness.markdown_table(rows, meta)
    assert "| 1.50x | 819,200 | 5 |" in table
    assert "819,200 tokens/s" in harness.format_row(rows[1])


@pytest.mark.parametrize("method", bench_model.MIXED_METHODS)
def test_mixed_batch_cases_agree_with_the_task_loop(method):
    """The many-tasks cases: peftkern's one pass gives the loop's logits (rows regrouped per task);
    peft's adapter_names row runs for LoRA."""
    config, tasks, batch = TINY["bert"], 3, 6
    out = {
        p: bench_model._mixed_work(config, method, tasks, p, batch, 8, torch.float32, "cpu")().step(0)
        for p in ("peftkern", "loop") + (("peft",) if method == "lora" else ())
    }
    order = [j for t in range(tasks) for j in range(batch) if j % tasks == t]  # the loop's row order
    loop = torch.cat(out["loop"])
    assert ((out["peftkern"][order] - loop).norm() / loop.norm()).item() < 1e-5
    if method == "lora":
        assert out["peft"].shape == out["peftkern"].shape
