"""Tiny random Hugging Face models (seeded, eval mode) of the architectures peftkern's presets cover."""

import torch

BERT = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=64,
)
LLAMA = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    max_position_embeddings=64,
)
VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    image_size=16,
    patch_size=8,
)


def _build(model_cls, config_cls, defaults, overrides):
    torch.manual_seed(0)
    return model_cls(config_cls(**{**defaults, **overrides})).eval()


def bert(**overrides):
    """BertModel without dropout (so training-mode checks compare exactly)."""
    import transformers

    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _build(transformers.BertModel, transformers.BertConfig, {**BERT, **no_dropout}, overrides)


def llama(**overrides):
    import transformers

    return _build(transformers.LlamaForCausalLM, transformers.LlamaConfig, LLAMA, overrides)


def vit(**overrides):
    import transformers

    return _build(transformers.ViTModel, transformers.ViTConfig, VIT, overrides)


def roberta(**overrides):
    """RobertaModel (positions from padding_idx + 1, pad id 1) without dropout."""
    import transformers

    config = dict(BERT, pad_token_id=1, max_position_embeddings=80)
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _build(transformers.RobertaModel, transformers.RobertaConfig, {**config, **no_dropout}, overrides)


def bert_head(cls_name, **overrides):
    """A BERT model with a task head (BertForSequenceClassification, ...), which calls its base
    positionally."""
    import transformers

    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model_cls = getattr(transformers, cls_name)
    return _build(model_cls, transformers.BertConfig, {**BERT, **no_dropout}, overrides)


# Encoder-decoders: T5 (relative position bias, no biases in its linears) and BART / mBART (learned
# absolute positions, offset 2). No dropout, so training-mode checks compare exactly.
T5 = dict(
    vocab_size=97,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
BART = dict(
    vocab_size=97,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=64,
    dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
    forced_eos_token_id=None,
)


def t5(cls_name="T5ForConditionalGeneration", **overrides):
    import transformers

    return _build(getattr(transformers, cls_name), transformers.T5Config, T5, overrides)


def bart(cls_name="BartForConditionalGeneration", **overrides):
    import transformers

    return _build(getattr(transformers, cls_name), transformers.BartConfig, BART, overrides)


def mbart(cls_name="MBartForConditionalGeneration", **overrides):
    import transformers

    return _build(getattr(transformers, cls_name), transformers.MBartConfig, BART, overrides)
