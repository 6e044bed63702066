"""peftkern.integrations.peft against Hugging Face peft itself, on small models built from configs
with random weights (nothing is downloaded)."""

import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peftkern.integrations.peft import fuse, unfuse  # noqa: E402

from . import tiny_models  # noqa: E402
from .conftest import DEVICES, assert_close  # noqa: E402


def tiny_llama(device, dtype=torch.float32):
    return tiny_models.llama(hidden_size=64, intermediate_size=96, vocab_size=101).to(
        device=device, dtype=dtype
    )


def lora_model(device, dtype=torch.float32, **config):
    cfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    cfg.update(config)
    model = peft.get_peft_model(tiny_llama(device, dtype), peft.LoraConfig(**cfg))
    with torch.no_grad():  # peft starts lora_B at zero; make the update visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def run(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_matches_peft(device):
    model = lora_model(device)
    ids = torch.randint(0, 101, (2, 9), device=device)
    logits_peft, grads_peft = run(model, ids)

    report = fuse(model)
    assert len(report.fused) == 2 * 3 and not report.skipped
    assert all(name.endswith(("q_proj", "v_proj", "down_proj")) for name in report.fused)
    logits_fused, grads_fused = run(model, ids)
    assert_close(logits_fused, logits_peft.double(), torch.float32, "logits")
    assert set(grads_fused) == set(grads_peft) and all("lora_" in n for n in grads_fused)
    for name in grads_peft:
        assert_close(grads_fused[name], grads_peft[name].double(), torch.float32, f"grad {name}")

    assert len(unfuse(model)) == 6
    logits_back, _ = run(model, ids)
    assert torch.equal(logits_back, logits_peft)


def test_fused_forward_really_calls_peftkern(monkeypatch):
    import peftkern.integrations.peft as integ

    calls = []
    real = integ.lora_linear
    monkeypatch.setattr(integ, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = lora_model("cpu")
    fuse(model)
    model(input_ids=torch.randint(0, 101, (1, 5)))
    assert len(calls) == 6


def test_dropout_in_training_and_eval():
    model = lora_model("cpu", lora_dropout=0.2)
    ids = torch.randint(0, 101, (2, 7))
    model.eval()
    ref_eval = model(input_ids=ids).logits.detach()
    fuse(model)
    assert_close(model(input_ids=ids).logits, ref_eval.double(), torch.float32, "eval logits")
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    torch.manual_seed(2)
    c = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.equal(a, c)  # dropout active, following torch.manual_seed
    a.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)


def test_merge_disable_and_save_pretrained(tmp_path):
    model = lora_model("cpu")
    ids = torch.randint(0, 101, (1, 6))
    expected = model(input_ids=ids).logits.detach()
    fuse(model)
    model.save_pretrained(tmp_path)
    with model.disable_adapter():  # peft's own path: the base model alone
        base = model(input_ids=ids).logits.detach()
    assert not torch.allclose(base, expected)
    model.merge_adapter()  # merged: fused forward defers to peft's base-layer path
    assert_close(model(input_ids=ids).logits, expected.double(), torch.float32, "merged")
    model.unmerge_adapter()

    loaded = peft.PeftModel.from_pretrained(tiny_llama("cpu"), tmp_path)
    fuse(loaded)
    assert_close(loaded(input_ids=ids).logits, expected.double(), torch.float32, "reloaded")


def test_unsupported_layers_are_reported_and_left_alone():
    model = lora_model("cpu", use_dora=True)
    report = fuse(model)
    assert not report.fused and len(report.skipped) == 6
    assert all("variant" in why and "Dora" in why for why in report.skipped.values())

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    )
    model = peft.get_peft_model(gpt2, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    report = fuse(model)
    assert not report.fused and len(report.skipped) == 1
    assert all("fan_in_fan_out" in why for why in report.skipped.values())

    model = lora_model("cpu")
    model.add_adapter("second", peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    report = fuse(model)
    q_layers = [n for n in report.skipped if n.endswith("q_proj")]
    assert len(q_layers) == 2 and all("2 active adapters" in report.skipped[n] for n in q_layers)


@pytest.mark.cuda
def test_bf16_model_with_fp32_adapters_on_cuda():
    model = lora_model("cuda", dtype=torch.bfloat16)
    for name, p in model.named_parameters():  # peft's autocast_adapter_dtype keeps adapters in fp32
        if "lora_" in name:
            p.data = p.data.float()
    ids = torch.randint(0, 101, (2, 33), device="cuda")
    expected = model(input_ids=ids).logits.detach()
    fuse(model)
    assert_close(model(input_ids=ids).logits, expected.double(), torch.bfloat16, "bf16 logits")


def test_readme_example_from_a_fresh_interpreter():
    """`import peftkern; peftkern.integrations.peft.fuse(model)` (the README's line) in a new process:
    the integrations are reachable from the package, and importing peftkern pulls in neither peft nor
    transformers."""
    code = """
import sys
import peftkern
assert "peft" not in sys.modules and "transformers" not in sys.modules, "import peftkern imported HF"
import peft, transformers
cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=2, vocab_size=50)
lora = peft.LoraConfig(r=4, target_modules=["q_proj"])
model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lora)
report = peftkern.integrations.peft.fuse(model)
assert len(report.fused) == 1, report
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
