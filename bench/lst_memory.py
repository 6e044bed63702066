"""Training memory of ladder side-tuning (LSTConfig) against LoRA and full fine-tuning, on one model
and batch (Sung et al. 2022's claim: LST keeps none of the backbone's activations for backward, so
its training memory is well below LoRA's).

    python -m bench.lst_memory                 # CPU (and CUDA, when a GPU is visible); prints a table
    python -m bench.lst_memory --out           # also writes bench/results/<device>_<date>_lst_memory.md

Each provider runs in a fresh subprocess: build the model (a BERT-style classifier from a config, no
download), one warm-up forward under no_grad, then the measured first training step (forward +
backward, the gradients' first allocation included). Reported:

- saved-tensor bytes: what autograd saves for backward during the forward (every saved tensor's
  storage counted once, through ``torch.autograd.graph.saved_tensors_hooks``): exact and
  deterministic, the activation memory the method costs;
- CPU: the peak RSS growth of the measured step (``ru_maxrss`` after it minus before it, after
  the warm-up forward has grown the heap for the forward's temporaries; coarse: the allocator's
  reuse and page granularity blur it);
- CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before it
  (the weights).
The step time is one step on whatever the device is, reported for orientation, not a speed benchmark.
"""

import argparse
import datetime as _dt
import json
import os
import resource
import subprocess
import sys
import time

import torch

PROVIDERS = ("full", "lora", "lst")
MODEL = dict(
    vocab_size=1000,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    max_position_embeddings=512,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    num_labels=2,
)
BATCH, SEQ = 8, 256
LST_R = 8


def build(provider, device):
    import transformers

    import peftkern

    torch.manual_seed(0)
    config = transformers.BertConfig(**MODEL, attn_implementation="eager")
    model = transformers.BertForSequenceClassification(config).to(device).train()
    if provider == "lora":
        cfg = peftkern.LoRAConfig(r=8, target_modules=["query", "value"], modules_to_save=["classifier"])
        peftkern.inject(model, cfg, name="task")
    elif provider == "lst":
        peftkern.inject(model, peftkern.LSTConfig(reduction_factor=LST_R, modules_to_save=["classifier"]))
    return model


def step(model, ids, labels, count=None):
    if count is None:
        loss = model(input_ids=ids, labels=labels).loss
    else:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None


def child(provider, device):
    """One provider's figures, as one JSON line on stdout."""
    import peftkern

    model = build(provider, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=g).to(device)
    labels = torch.randint(0, 2, (BATCH,), generator=g).to(device)
    with torch.no_grad():  # warm-up: the forward's temporaries, lazy inits; nothing saved, no grads
        model(input_ids=ids, labels=labels)
    saved = {}

    def count(t):
        saved[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    step(model, ids, labels, count)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = dict(
        provider=provider,
        device=device,
        trainable=peftkern.trainable_parameters(model)[0],
        total=peftkern.trainable_parameters(model)[1],
        saved_bytes=sum(saved.values()),
        rss_growth_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before,
        step_s=seconds,
    )
    if device == "cuda":
        row["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    print(json.dumps(row))


def measure(device):
    rows = []
    for p in PROVIDERS:
        cmd = [sys.executable, "-m", "bench.lst_memory", "--child", p, "--device", device]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"lst_memory: {p} on {device} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def table(rows, label):
    mib = 1 / 2**20
    full = {r["device"]: r["saved_bytes"] for r in rows if r["provider"] == "full"}
    lines = [
        f"# LST training memory vs LoRA and full fine-tuning: {label} ({_dt.date.today().isoformat()})",
        "",
        f"BertForSequenceClassification from a config: hidden {MODEL['hidden_size']}, "
        f"{MODEL['num_hidden_layers']} layers, {MODEL['num_attention_heads']} heads, FFN "
        f"{MODEL['intermediate_size']}, eager attention; batch {BATCH} x seq {SEQ}, float32; one training "
        f"step (forward + backward). LoRA: r=8 on query/value; LST: reduction_factor={LST_R}, gated; "
        "both train a copy of the classifier.",
        "",
        "| device | provider | trainable params | saved for backward (MiB) | vs full | peak RSS growth "
        "(MiB) | CUDA peak over weights (MiB) | step (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cuda = f"{r['cuda_peak_bytes'] * mib:.1f}" if "cuda_peak_bytes" in r else "-"
        share = r["saved_bytes"] / full[r["device"]]
        lines.append(
            f"| {r['device']} | {r['provider']} | {r['trainable']:,} / {r['total']:,} | "
            f"{r['saved_bytes'] * mib:.1f} | {share:.0%} | {r['rss_growth_kib'] / 1024:.1f} | {cuda} | "
            f"{r['step_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=PROVIDERS, help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None)
    ap.add_argument("--out", action="store_true", help="write bench/results/<device>_<date>_lst_memory.md")
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.device or "cpu")
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = [r for d in devices for r in measure(d)]
    from bench.harness import RESULTS_DIR, run_meta

    meta = run_meta(0.0, device="cuda" if "cuda" in devices else "cpu")
    text = table(rows, meta["gpu"])
    print(text)
    if args.out:
        path = os.path.join(RESULTS_DIR, f"{meta['gpu_slug']}_{meta['date']}_lst_memory.md")
        os.makedirs(RESULTS_DIR, exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
