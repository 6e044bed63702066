"""Where each method goes: name matching and the per-architecture presets.

A preset names modules by regexes over ``model.named_modules()`` names (full match), keyed by the
Hugging Face ``config.model_type``. Blocks are ``...layer.N`` (BERT family), ``...layers.N``
(Llama family, ViT, BART / mBART's ``encoder.layers.N`` and ``decoder.layers.N``) or T5's
``encoder.block.N.layer.M`` / ``decoder.block.N.layer.M`` (block N, sub-layer M: self-attention,
the decoder's cross-attention, the FFN), so a head's ``classifier.dense``, a pooler's ``dense``, an
``lm_head`` or the shared embeddings never match.

Encoder-decoders (T5 / mT5, BART / mBART), what each method gets:

========  =====================================================================================
LoRA      peft's defaults: the query and value projections of every attention, encoder
          self-attention, decoder self-attention and decoder cross-attention (T5 ``q``, ``v`` of
          ``SelfAttention`` and ``EncDecAttention``; BART ``q_proj``, ``v_proj`` of ``self_attn``
          and ``encoder_attn``).
houlsby   after each self-attention's output projection (T5 ``SelfAttention.o``, BART
          ``self_attn.out_proj``) and after the FFN's (T5 ``DenseReluDense.wo``, BART ``fc2``), in
          the encoder and the decoder. The decoder's cross-attention gets none, as AdapterHub's
          default (its ``cross_adapter`` is off); name ``EncDecAttention.o`` / ``encoder_attn.out_proj``
          in ``target_modules`` for one there.
pfeiffer  after the FFN's output projection only.
parallel  T5: on the FFN module (``DenseReluDense``, reads its input, adds to its output). BART has
          no FFN module (fc1 -> activation -> fc2 inline in the layer): the adapter sits on ``fc2``
          and reads ``fc1``'s input (``Preset.ffn_input``), its output added to fc2's.
masks     every linear layer of the blocks (T5 ``q``, ``k``, ``v``, ``o`` of both attentions and
          ``wi`` / ``wi_0`` / ``wi_1`` / ``wo``; BART the q, k, v, out projections of ``self_attn``
          and ``encoder_attn``, ``fc1``, ``fc2``); never ``lm_head`` or the embeddings.
BitFit    matches parameters, not presets: BART's every bias; T5 has no bias terms (bias-free
          linears, T5LayerNorm without a bias), so BitFit refuses it with a message that says so.
========  =====================================================================================
"""

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

_BLOCK = r"(.*\.)?layers?\.\d+\."
_T5_BLOCK = r"(.*\.)?block\.\d+\.layer\.\d+\."  # T5's block N, sub-layer M


@dataclass(frozen=True)
class Preset:
    family: str
    attention_output: str  # the attention's output projection (houlsby)
    ffn_output: str  # the FFN's output projection (houlsby, pfeiffer)
    ffn: str  # parallel adapters: the FFN, or the module that adds the FFN input back (see below)
    # (name, position) of ffn's argument carrying the FFN input as its residual (BertOutput's
    # input_tensor: the adapter turns it into x + adapter(x)); None: ffn is the FFN itself
    ffn_residual_arg: Optional[tuple]
    lora: str  # LoRA (peft's defaults: the query and value projections)
    linears: str  # mask tuning: every linear layer of the blocks
    # parallel adapters where the FFN is no module of its own (BART's inline fc1 -> act -> fc2): the
    # name, relative to ffn's parent, of the module whose input is the FFN input (``"fc1"``); ffn is
    # then the FFN's output projection, whose output the adapter's adds to. None: ffn's own input.
    ffn_input: Optional[str] = None
    # (IA)^3, peft's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING / _FEEDFORWARD_MODULES_MAPPING
    # as block-anchored regexes over the same modules; None: peft has no default for the model type
    ia3: Optional[str] = None
    ia3_feedforward: Optional[str] = None  # the ia3 sites whose input is scaled


_BERT = Preset(
    family="BERT-family encoder",
    attention_output=_BLOCK + r"attention\.output\.dense",
    ffn_output=_BLOCK + r"output\.dense",
    ffn=_BLOCK + r"output",
    ffn_residual_arg=("input_tensor", 1),  # BertOutput(hidden_states, input_tensor)
    lora=_BLOCK + r"attention\.self\.(query|value)",
    linears=_BLOCK
    + r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    # peft's ["key", "value", "output.dense"]: the suffix "output.dense" also matches the attention's
    # output projection, which peft's feed-forward list (["output.dense"]) so scales on its input too
    ia3=_BLOCK + r"(attention\.self\.(key|value)|attention\.output\.dense|output\.dense)",
    ia3_feedforward=_BLOCK + r"(attention\.output\.dense|output\.dense)",
)
_BERT_NO_IA3 = dataclasses.replace(_BERT, ia3=None, ia3_feedforward=None)  # xlm-roberta: none in peft
_LLAMA = Preset(
    family="Llama-family decoder",
    attention_output=_BLOCK + r"self_attn\.o_proj",
    ffn_output=_BLOCK + r"mlp\.down_proj",
    ffn=_BLOCK + r"mlp",
    ffn_residual_arg=None,
    lora=_BLOCK + r"self_attn\.(q_proj|v_proj)",
    linears=_BLOCK + r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
    ia3=_BLOCK + r"(self_attn\.(k_proj|v_proj)|mlp\.down_proj)",  # llama, mistral
    ia3_feedforward=_BLOCK + r"mlp\.down_proj",
)
_QWEN = dataclasses.replace(_LLAMA, ia3=_BLOCK + r"(self_attn\.(q_proj|v_proj)|mlp\.down_proj)")  # peft: q, v
_VIT = Preset(
    family="ViT",
    attention_output=_BLOCK + r"attention\.o_proj",
    ffn_output=_BLOCK + r"mlp\.fc2",
    ffn=_BLOCK + r"mlp",
    ffn_residual_arg=None,
    lora=_BLOCK + r"attention\.(q_proj|v_proj)",
    linears=_BLOCK + r"(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))",
)
_T5 = Preset(
    family="T5 encoder-decoder",
    # the self-attention only: the decoder's cross-attention (EncDecAttention) gets no houlsby adapter
    attention_output=_T5_BLOCK + r"SelfAttention\.o",
    ffn_output=_T5_BLOCK + r"DenseReluDense\.wo",
    ffn=_T5_BLOCK + r"DenseReluDense",  # T5DenseActDense / T5DenseGatedActDense
    ffn_residual_arg=None,
    lora=_T5_BLOCK + r"(SelfAttention|EncDecAttention)\.(q|v)",
    linears=_T5_BLOCK + r"((SelfAttention|EncDecAttention)\.(q|k|v|o)|DenseReluDense\.(wi|wi_0|wi_1|wo))",
    ia3=_T5_BLOCK + r"((SelfAttention|EncDecAttention)\.(k|v)|DenseReluDense\.wo)",
    ia3_feedforward=_T5_BLOCK + r"DenseReluDense\.wo",
)
# peft's mt5 entry: k, v and wi_1 (the gated FFN's linear branch, its OUTPUT scaled), no feed-forward
_MT5 = dataclasses.replace(
    _T5, ia3=_T5_BLOCK + r"((SelfAttention|EncDecAttention)\.(k|v)|DenseReluDense\.wi_1)", ia3_feedforward=""
)
_BART = Preset(
    family="BART-family encoder-decoder",
    attention_output=_BLOCK + r"self_attn\.out_proj",  # not the decoder's encoder_attn (cross)
    ffn_output=_BLOCK + r"fc2",
    ffn=_BLOCK + r"fc2",  # no FFN module: the parallel adapter adds to fc2's output ...
    ffn_input="fc1",  # ... and reads fc1's input
    ffn_residual_arg=None,
    lora=_BLOCK + r"(self_attn|encoder_attn)\.(q_proj|v_proj)",
    linears=_BLOCK + r"((self_attn|encoder_attn)\.(q_proj|k_proj|v_proj|out_proj)|fc1|fc2)",
    ia3=_BLOCK + r"((self_attn|encoder_attn)\.(q_proj|v_proj)|fc2)",
    ia3_feedforward=_BLOCK + r"fc2",
)
_BART_NO_IA3 = dataclasses.replace(_BART, ia3=None, ia3_feedforward=None)  # mbart: none in peft
PRESETS = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT_NO_IA3,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _QWEN,
    "qwen3": _QWEN,
    "vit": _VIT,
    "t5": _T5,
    "mt5": _MT5,  # T5 v1.1's gated FFN (wi_0, wi_1), the same module names
    "bart": _BART,
    "mbart": _BART_NO_IA3,  # pre-LayerNorm, the same module names
}


def model_type(model) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def preset_for(model, config_name: str) -> Preset:
    kind = model_type(model)
    if kind not in PRESETS:
        raise ValueError(
            f"{config_name}: no preset for model_type {kind!r} (presets: {sorted(PRESETS)}); "
            "pass target_modules to say where the method goes"
        )
    return PRESETS[kind]


def matches(name: str, targets) -> bool:
    """As Hugging Face peft: a string is a regex that must match the whole name; a list holds
    suffixes that match whole dot-separated parts (``"dense"`` matches ``a.dense``, not ``a.xdense``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
