"""Whole models: one training step (forward, backward, AdamW step) of a transformer fine-tuned with
each method, peftkern (peftkern.inject) against what users run without it:

  lora      Hugging Face peft (get_peft_model, LoraConfig on the same query/value projections; peft
            keeps the LoRA factors in float32 by default, autocast_adapter_dtype)
  adapter   the same injected model with each adapter computed eagerly, as AdapterHub does
            (two nn.Linear, the activation, the scaled residual add: tests/reference.EagerAdapter)
  mask      the same model with each masked linear computed eagerly: F.linear(x, W * STE(S > t))
  prefix    Hugging Face peft's prefix tuning (PrefixTuningConfig, 32 virtual tokens, no projection:
            P-tuning v2), which hands the prefix to the model as past_key_values (a DynamicCache,
            the mask extended; each layer concatenates it into its keys and values), against
            peftkern's PrefixConfig (prefix attention through transformers' AttentionInterface). Both
            without attention dropout (peftkern's fused prefix attention has none).
  ia3       Hugging Face peft's IA3Config with its presets (keys, values, FFN down-projections), the
            vectors scaling each GEMM's output (or the down-projection's input) in a separate pass
            and keeping the unscaled [T, out] for the backward; peftkern folds them into the GEMM
  adalora   peft's AdaLoraConfig (init_r 12, target_r 8) on the query/value projections, its update
            ``x (A * E)^T B^T`` as two matmuls; peftkern folds E into A and runs the fused LoRA op.
            The rank allocation after each step is left out on both sides.
  krona     peft's LoKrConfig with full-rank factors (r 16, alpha 16), which forms kron(w1, w2)
            [out, in] and runs a second full GEMM (and its weight gradient) every step; peftkern's
            KronA computes A X B^T on the reshaped input, never forming [out, in]
  compacter the same injected model with each Compacter computed eagerly (its PHM weights built, then
            two F.linear, the activation, the scaled add: tests/reference.EagerAdapter)

Models (random weights, bf16, sdpa attention): a BERT-base encoder with a classification head, and
a Llama-style ~1.1B decoder (TinyLlama's shape: d 2048, 22 layers, 32 heads, 4 kv heads) with its
LM loss. Batches of `seq` tokens fill 16k tokens. Prefix tuning also on a BART-base-sized
encoder-decoder (d 768, 6 + 6 layers, 12 heads; Li & Liang's summarization setting), sources of
`seq` tokens filling 16k and targets of seq / 4, its LM loss: peft's SEQ_2_SEQ_LM prefix tuning (the
prefix in the decoder's self-attention cache only) against peftkern's PrefixConfig(sites=["decoder"]),
the same computation.

Floors. The base is frozen, so an ideal step computes the forward (2 P T flops over the P
parameters of its linear layers, T tokens), the input gradients only (2 P T), and attention
(4 T S d per layer forward, twice that backward; half of it when causal): it is compute-bound, and
the `tflops` column is that count over the step time. `ideal_bytes` is the frozen weights read
twice (forward and backward), a loose lower bound. Targets (H100, bf16, sequence 512, 16k tokens):
peftkern's step >= 1.15x the eager step for each method, with less peak memory; prefix (Llama
~1.1B, and BART-base): >= 1.2x peft's prefix tuning, with less peak memory.

What the count predicts (Llama ~1.1B, 16k tokens, before any GPU run): the frozen-base step is
about 9e13 flops, ~150 ms at 600 TFLOPS. What a method's fused ops can save is its elementwise
passes: eager LoRA on q and v scales and adds [T, d] tensors, ~5 passes of 2 bytes over T d
forward and as many backward, ~1 GB per layer pair and ~44 GB a step, ~13 ms at 3.3 TB/s: about
1.09x at best. Adapters save a similar share. Masks: both sides need the weight-gradient product for
the scores (2 P T more flops); eager adds ~8 bytes per weight of elementwise passes (~3 ms) and keeps
W * m (2 bytes per weight) for the backward where peftkern keeps bits: ~1.0x in time, ~2 GB less
peak memory. So the 1.15x time target is expected to be out of reach at this size on Amdahl's law;
the memory target is not. Prefix: both sides run the same frozen base; peft adds per layer the
concatenation of the expanded prefix into K and V (B x Hkv x (P + S) x D, 2 bytes, written and read,
forward and backward) and SDPA over P + S keys with an explicit mask (peft's extended mask is a
[B, 1, S, P + S] tensor, which also keeps SDPA off the flash kernel); peftkern runs flash SDPA on the
sequence and its prefix kernel on the P keys. At 16k tokens, P 32, 22 layers the copies are ~0.1 GB
a step, so the difference must come from the attention kernel choice: flash against
memory-efficient attention with a mask, about 1.3-1.5x on the attention share (~25% of this step at
seq 512): ~1.1x on the step predicted, short of the 1.2x target. BART-base: the prefix sits in the
decoder's self-attention over the 128-token targets only; the encoder (16k source tokens, no
gradient needed: nothing trains in it) and the cross-attention are the same on both sides, so the
difference is a smaller share still: the decoder self-attention is ~5% of that step, ~1.0x predicted.
peft's EncoderDecoderCache prefix also costs it a [B, 1, T, P + T] mask; neither keeps more than
the other beyond the concatenated keys.
"""

import itertools

import torch

import peftkern
from tests import reference

from .harness import Case, ProviderFailed, Skip, Work

FAMILY = "model"
TOKENS = 16384
MODELS = {
    "bert-base": (
        "bert",
        dict(
            vocab_size=30522,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
        ),
    ),
    "bart-base": (
        "bart",
        dict(
            vocab_size=50265,
            d_model=768,
            encoder_layers=6,
            decoder_layers=6,
            encoder_attention_heads=12,
            decoder_attention_heads=12,
            encoder_ffn_dim=3072,
            decoder_ffn_dim=3072,
            max_position_embeddings=1024,
        ),
    ),
    "llama-1b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
    ),
}
METHODS = {
    "lora": lambda: peftkern.LoRAConfig(r=16, lora_alpha=32),
    "adapter": lambda: peftkern.AdapterConfig(bottleneck=64),
    "mask": lambda: peftkern.MaskConfig(),
    "prefix": lambda: peftkern.PrefixConfig(num_virtual_tokens=32),
    # peft's presets for both sides: (IA)³ on the keys, values and FFN down-projections
    "ia3": lambda: peftkern.IA3Config(),
    # AdaLoRA's training step at full rank (the rank allocation after it is left out on both sides)
    "adalora": lambda: peftkern.AdaLoRAConfig(init_r=12, target_r=8, lora_alpha=32, total_step=1000),
    # KronA = peft's LoKr with full-rank factors (r 16 >= half of every factor's size: peft's w2 full)
    "krona": lambda: peftkern.KronAConfig(scaling=1.0),
    # Compacter (PHM adapters, phm_dim 4, rank 1, the rule shared), the adapter row's bottleneck
    "compacter": lambda: peftkern.AdapterConfig(phm_dim=4, bottleneck=64),
}
BASELINE = {
    "lora": "peft",
    "adapter": "eager",
    "mask": "eager",
    "prefix": "peft",
    "ia3": "peft",
    "adalora": "peft",
    "krona": "peft",
    "compacter": "eager",
}
NO_ATTENTION_DROPOUT = {"prefix"}  # methods whose models are built without attention dropout
# prefix on decoders and BART only: peft's prefix tuning for sequence classification looks for a
# past_key_values argument, which transformers 5's BERT no longer has (it is "cache"); BART takes
# prefix tuning only
KINDS = {"prefix": ("llama", "bart")}
ONLY = {"bart": ("prefix",)}
TARGET_FRACTION = 4  # BART: target tokens per source token (summarization-like)
PEFT_TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"]}  # = peftkern's LoRA presets


def _transformers():
    try:
        import transformers
    except ImportError:
        raise Skip("transformers not installed")
    return transformers


def build_model(kind, config, device, dtype, method=None):
    """The base model, random weights (seeded), in `dtype` on `device`, in training mode."""
    tf = _transformers()
    torch.manual_seed(0)
    if kind == "bert":
        dropout = dict(attention_probs_dropout_prob=0.0) if method in NO_ATTENTION_DROPOUT else {}
        model = tf.BertForSequenceClassification(
            tf.BertConfig(**config, num_labels=2, attn_implementation="sdpa", **dropout)
        )
    elif kind == "bart":
        dropout = dict(attention_dropout=0.0) if method in NO_ATTENTION_DROPOUT else {}
        model = tf.BartForConditionalGeneration(
            tf.BartConfig(**{**config, **dropout}, attn_implementation="sdpa")
        )
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**config, attn_implementation="sdpa"))
    return model.to(device, dtype).train()


def with_method(model, kind, method, provider):
    """The model with `method` put in by `provider` (peftkern | eager | peft)."""
    if provider == "peft":
        try:
            import peft
        except ImportError:
            raise Skip("peft not installed")
        cfg = METHODS[method]()
        if method == "prefix":
            task = {"bert": "SEQ_CLS", "bart": "SEQ_2_SEQ_LM"}.get(kind, "CAUSAL_LM")
            prefix = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.num_virtual_tokens)
            return peft.get_peft_model(model, prefix)
        if method == "ia3":
            return peft.get_peft_model(model, peft.IA3Config())
        if method == "adalora":  # a task type: peft adds the orthogonality penalty in AdaLoraModel.forward
            ada = peft.AdaLoraConfig(
                task_type={"bert": "SEQ_CLS"}.get(kind, "CAUSAL_LM"),
                init_r=cfg.init_r,
                target_r=cfg.target_r,
                lora_alpha=cfg.lora_alpha,
                total_step=cfg.total_step,
                target_modules=PEFT_TARGETS[kind],
            )
            return peft.get_peft_model(model, ada)
        if method == "krona":  # LoKr's scaling alpha / r = 1, full-rank factors
            lokr = peft.LoKrConfig(r=16, alpha=16, target_modules=PEFT_TARGETS[kind])
            return peft.get_peft_model(model, lokr)
        lora = peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=PEFT_TARGETS[kind]
        )
        return peft.get_peft_model(model, lora)
    cfg = METHODS[method]()
    if method == "adalora" and kind == "bert":  # peft's SEQ_CLS trains a copy of the head too
        cfg.modules_to_save = ["classifier"]
    if kind == "bart":  # peft's layout: the decoder's self-attention
        cfg = peftkern.PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens, sites=["decoder"])
    peftkern.inject(model, cfg)
    return reference.to_eager(model) if provider == "eager" else model


def batches(kind, config, batch, seq, device, n_sets=2):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_sets):
        ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g) if kind == "bert" else ids
        if kind == "bart":
            labels = torch.randint(0, config["vocab_size"], (batch, seq // TARGET_FRACTION), generator=g)
        out.append((ids.to(device), labels.to(device)))
    return out


def training_step(model, data, lr=1e-4):
    """step(i): forward on batch i, backward, AdamW step, gradients cleared; returns the loss."""
    params = [t for t in model.parameters() if t.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, fused=params[0].is_cuda)

    def step(i):
        ids, labels = data[i]
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def _work(kind, config, method, provider, batch, seq, dtype, device="cuda"):
    def make():
        model = with_method(build_model(kind, config, device, dtype, method), kind, method, provider)
        data = batches(kind, config, batch, seq, device)
        step = training_step(model, data)
        return Work(_peer_failures(step) if provider == "peft" else step, None, len(data))

    return make if provider != "peft" else _peer_failures(make)


def _peer_failures(fn):
    """fn with peft's own exceptions turned into ProviderFailed: its row reports peft failing."""

    def wrapped(*args):
        try:
            return fn(*args)
        except (Skip, torch.cuda.OutOfMemoryError):
            raise
        except Exception as e:  # peft's, as the peft provider's result
            raise ProviderFailed(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    return wrapped


def step_cost(kind, config, seq, dtype):
    """(ideal bytes, flops) of one frozen-base training step over TOKENS tokens (module docstring)."""
    if kind == "bart":
        return _seq2seq_step_cost(config, seq, dtype)
    d, L, ffn = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = (
        config["num_attention_heads"],
        config.get("num_key_value_heads", config["num_attention_heads"]),
    )
    d_kv = d * kv // heads
    if kind == "bert":
        linear, causal = L * (2 * d * d + 2 * d * d_kv + 2 * d * ffn), 1.0
    else:  # gate, up and down projections; the LM head
        linear, causal = L * (2 * d * d + 2 * d * d_kv + 3 * d * ffn) + config["vocab_size"] * d, 0.5
    es = torch.finfo(dtype).bits // 8
    flops = 4 * linear * TOKENS + 12 * TOKENS * seq * d * L * causal
    return 2 * linear * es, flops


def _seq2seq_step_cost(config, seq, dtype):
    """BART: the encoder's forward only (nothing trains in it), the decoder's forward and input
    gradients over T / 4 target tokens, the LM head (tied) over the targets."""
    d, ffn, V = config["d_model"], config["encoder_ffn_dim"], config["vocab_size"]
    Le, Ld = config["encoder_layers"], config["decoder_layers"]
    source, target = TOKENS, TOKENS // TARGET_FRACTION
    t_len = seq // TARGET_FRACTION
    enc, dec = Le * (4 * d * d + 2 * d * ffn), Ld * (8 * d * d + 2 * d * ffn) + V * d
    flops = 2 * enc * source + 4 * dec * target
    flops += Le * 4 * source * seq * d  # encoder attention, forward
    flops += Ld * 12 * target * d * (t_len / 2 + seq)  # decoder self (causal) and cross, forward and backward
    es = torch.finfo(dtype).bits // 8
    return (enc + 2 * dec) * es, flops


def cases(quick=False):
    seqs = (512,) if quick else (512, 2048)
    for (name, (kind, config)), method, seq in itertools.product(MODELS.items(), METHODS, seqs):
        if kind not in KINDS.get(method, (kind,)) or method not in ONLY.get(kind, (method,)):
            continue
        if kind == "bart" and seq != 512:
            continue
        dtype, batch = torch.bfloat16, TOKENS // seq
        ideal, flops = step_cost(kind, config, seq, dtype)
        for provider in (BASELINE[method], "peftkern"):
            yield Case(
                FAMILY,
                dict(model=name, method=method, seq=seq, batch=batch),
                dtype,
                "train",
                provider,
                _work(kind, config, method, provider, batch, seq, dtype),
                ideal,
                flops,
                tags=dict(tokens=TOKENS, **({"baseline": True} if provider != "peftkern" else {})),
            )
    yield from mixed_cases(MODELS["bert-base"][1], "bert-base", 64, 128, torch.bfloat16, "cuda", short=quick)


MINILM = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)


def cpu_cases():
    """The CPU table (bench.run without a GPU): one training step of a MiniLM-sized BERT
    (all-MiniLM-L6-v2's shape, random weights), float32, 8 x 128 tokens, each method against its
    baseline (LoRA and prefix tuning: peft; adapters and masks: eager). peft's prefix tuning on
    BERT fails in transformers 5 (no past key values): that row reports its error."""
    batch, seq, dtype = 8, 128, torch.float32
    ideal, flops = step_cost("bert", MINILM, seq, dtype)
    for method in METHODS:
        for provider in (BASELINE[method], "peftkern"):
            yield Case(
                FAMILY,
                dict(model="minilm", method=method, seq=seq, batch=batch),
                dtype,
                "train",
                provider,
                _work("bert", MINILM, method, provider, batch, seq, dtype, "cpu"),
                ideal,
                flops * batch * seq / TOKENS,
                tags=dict(tokens=batch * seq, **({"baseline": True} if provider != "peftkern" else {})),
            )
    yield from mixed_cases(MINILM, "minilm", 64, 32, torch.float32, "cpu", short=True)
    # BART-base prefix tuning against peft's: 4 sources of 128 tokens, targets of 32
    kind, config = MODELS["bart-base"]
    batch, seq = 4, 128
    ideal, flops = step_cost(kind, config, seq, dtype)
    for provider in ("peft", "peftkern"):
        yield Case(
            FAMILY,
            dict(model="bart-base", method="prefix", seq=seq, batch=batch),
            dtype,
            "train",
            provider,
            _work(kind, config, "prefix", provider, batch, seq, dtype, "cpu"),
            ideal,
            flops * batch * seq / TOKENS,
            tags=dict(tokens=batch * seq, **({"baseline": True} if provider != "peftkern" else {})),
        )


# -- many tasks in one batch -----------------------------------------------------------------------
# Serving (inference forward) a batch whose samples each use their own named adapter, over T tasks:
#   peftkern  one pass, model(..., tasks=[...]): the _multi ops route each row (one call per site)
#   loop      what a user writes without per-sample routing: per task, set_active and run its rows
#   peft      LoRA only: peft's mixed batch, model(..., adapter_names=[...]) (its per-adapter loop)
# The floor is the frozen base's forward (2 P flops per token); what routing adds is each site's
# adapter weights read once per 64-token block. Targets (GPU): >= 5x the loop at 64 tasks; LoRA at 64
# tasks <= 1.3x the same batch with one task.
MIXED_TASKS = (1, 8, 64)
MIXED_METHODS = {
    "lora": lambda i: peftkern.LoRAConfig(r=8, lora_alpha=16),
    "adapter": lambda i: peftkern.AdapterConfig(bottleneck=16),
    # masks on the query and value projections only: a mask's scores are a float32 copy of its weights
    "mask": lambda i: peftkern.MaskConfig(target_modules=["query", "value"]),
    "prefix": lambda i: peftkern.PrefixConfig(num_virtual_tokens=16),
    "mixed": lambda i: [MIXED_METHODS[m] for m in ("lora", "adapter", "prefix")][i % 3](i),
}


def _mixed_model(config, device, dtype, method, n_tasks, provider):
    model = build_model("bert", config, device, dtype, method="prefix").eval()  # no attention dropout
    names = [f"task{i}" for i in range(n_tasks)]
    if provider == "peft":
        try:
            import peft
        except ImportError:
            raise Skip("peft not installed")
        lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS["bert"])
        model = peft.get_peft_model(model, lora, adapter_name=names[0])
        for n in names[1:]:
            model.add_adapter(n, lora)
        return model.eval(), names
    g = torch.Generator().manual_seed(2)
    for i, n in enumerate(names):
        peftkern.inject(model, MIXED_METHODS[method](i), name=n)
    with torch.no_grad():  # trained-looking adapters (LoRA B and adapter up start at zero)
        for t in model.parameters():
            if t.requires_grad:
                t.add_(torch.randn(t.shape, generator=g).to(t) * 0.01)
    return model, names


def _mixed_work(config, method, n_tasks, provider, batch, seq, dtype, device):
    def make():
        model, names = _mixed_model(config, device, dtype, method, n_tasks, provider)
        ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
        ids = ids.to(device)
        tasks = [names[i % n_tasks] for i in range(batch)]

        @torch.no_grad()
        def step(i):
            if provider == "peftkern":
                return model(input_ids=ids, tasks=tasks).logits
            if provider == "peft":
                return model(input_ids=ids, adapter_names=tasks).logits
            out = []  # loop: one forward per task over its rows
            for n in names:
                peftkern.set_active(model, n)
                out.append(model(input_ids=ids[[j for j, t in enumerate(tasks) if t == n]]).logits)
            return out

        return Work(_peer_failures(step) if provider == "peft" else step, None, 1)

    return make if provider != "peft" else _peer_failures(make)


def mixed_cases(config, model_name, batch, seq, dtype, device, tasks=MIXED_TASKS, short=False):
    """short (the CPU table, to stay within minutes): 1, 8 and 64 tasks for LoRA and the mixed
    methods, 8 for the other families."""
    ideal, flops = step_cost("bert", config, seq, dtype)
    for method, n_tasks in itertools.product(MIXED_METHODS, tasks):
        if short and method not in ("lora", "mixed") and n_tasks != 8:
            continue
        providers = ["loop", "peftkern"] + (["peft"] if method == "lora" else [])
        for provider in providers:
            yield Case(
                FAMILY,
                dict(model=model_name, method=f"{method}-mixed", tasks=n_tasks, seq=seq, batch=batch),
                dtype,
                "inference",
                provider,
                _mixed_work(config, method, n_tasks, provider, batch, seq, dtype, device),
                ideal / 2,  # the frozen weights read once
                flops / 2 * batch * seq / TOKENS,  # the forward's share
                tags=dict(tokens=batch * seq, **({"baseline": True} if provider == "loop" else {})),
            )
