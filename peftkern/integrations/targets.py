"""Where each method goes: name matching and the per-architecture presets.

A preset names modules by regexes over ``model.named_modules()`` names (full match), keyed by the
Hugging Face ``config.model_type``. Blocks are ``...layer.N`` (BERT family) or ``...layers.N``
(Llama family, ViT), so a head's ``classifier.dense`` or a pooler's ``dense`` never matches.
"""

import re
from dataclasses import dataclass
from typing import Optional

_BLOCK = r"(.*\.)?layers?\.\d+\."


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


_BERT = Preset(
    family="BERT-family encoder",
    attention_output=_BLOCK + r"attention\.output\.dense",
    ffn_output=_BLOCK + r"output\.dense",
    ffn=_BLOCK + r"output",
    ffn_residual_arg=("input_tensor", 1),  # BertOutput(hidden_states, input_tensor)
    lora=_BLOCK + r"attention\.self\.(query|value)",
    linears=_BLOCK
    + r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
)
_LLAMA = Preset(
    family="Llama-family decoder",
    attention_output=_BLOCK + r"self_attn\.o_proj",
    ffn_output=_BLOCK + r"mlp\.down_proj",
    ffn=_BLOCK + r"mlp",
    ffn_residual_arg=None,
    lora=_BLOCK + r"self_attn\.(q_proj|v_proj)",
    linears=_BLOCK + r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
)
_VIT = Preset(
    family="ViT",
    attention_output=_BLOCK + r"attention\.o_proj",
    ffn_output=_BLOCK + r"mlp\.fc2",
    ffn=_BLOCK + r"mlp",
    ffn_residual_arg=None,
    lora=_BLOCK + r"attention\.(q_proj|v_proj)",
    linears=_BLOCK + r"(attention\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(fc1|fc2))",
)
PRESETS = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "vit": _VIT,
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
