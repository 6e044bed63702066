"""Interop with Hugging Face peft: its LoRA layers through peftkern.ops.lora_linear, and its
prompt-learning checkpoints (prefix tuning, P-tuning v2, prompt tuning, P-tuning) into a model
injected with peftkern's PrefixConfig / PromptConfig (``load_prompt_embeddings``).

    report = peftkern.integrations.peft.fuse(model)     # every supported peft lora.Linear
    ...train, peft's save_pretrained / loading keep working (same parameters)...
    peftkern.integrations.peft.unfuse(model)

``fuse`` replaces the ``forward`` of each peft ``lora.Linear`` with one that computes
``base(x) + scaling * lora_B(lora_A(dropout(x)))`` in one fused op; the module, its parameters and
its state dict are untouched. Layers it cannot handle keep peft's own forward and are listed in the
report with the reason: LoRA variants (DoRA, ...), several active adapters, ``fan_in_fan_out``
(Conv1D bases), quantized or non-Linear bases, a bias on lora_B. At call time the fused forward
defers to peft's whenever peft would not take its plain-LoRA path (adapters disabled, weights
merged, ``adapter_names`` mixed batches, extra arguments).

Precision: the LoRA factors are cast to the computation dtype (x's, or autocast's) for the fused
op; peft keeps them in their own dtype (often float32) for its separate matmuls. Results agree to
the computation dtype's rounding.
"""

import os
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from ..ops.lora import lora_linear

_FUSED_ATTR = "_peftkern_fused"


@dataclass
class FuseReport:
    fused: List[str] = field(default_factory=list)  # module names now computing through peftkern
    skipped: Dict[str, str] = field(default_factory=dict)  # module name -> why it was left as is


def _lora_linear_class():
    try:
        from peft.tuners.lora import Linear
    except ImportError as e:  # pragma: no cover - exercised only without peft
        raise ImportError("peftkern.integrations.peft needs Hugging Face peft (pip install peft)") from e
    return Linear


def unsupported_reason(layer) -> Optional[str]:
    """Why a peft lora.Linear cannot compute through lora_linear now, or None."""
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out (Conv1D-style base weight)"
    base = layer.get_base_layer()
    if type(base) is not nn.Linear or not base.weight.is_floating_point():
        return f"base layer {type(base).__name__} is not a floating-point nn.Linear (quantized?)"
    active = list(layer.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters (needs exactly one)"
    name = active[0]
    if name not in layer.lora_A:
        return f"active adapter {name!r} has no LoRA weights in this layer"
    if name in getattr(layer, "lora_variant", {}):
        return (
            f"LoRA variant {type(layer.lora_variant[name]).__name__} (DoRA and other variants are not fused)"
        )
    if layer.lora_B[name].bias is not None:
        return "lora_B has a bias"
    if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


def _fused_forward(self, x, *args, **kwargs):
    if args or kwargs or self.disable_adapters or self.merged or unsupported_reason(self) is not None:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    name = self.active_adapters[0]
    base = self.get_base_layer()
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    tensors = [x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight]
    dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    x, weight, bias, lora_A, lora_B = (
        None if t is None else t.to(dt) for t in tensors
    )  # no copy if same dtype
    return lora_linear(
        x, weight, bias, lora_A, lora_B, scaling=self.scaling[name], dropout_p=p, training=dropout.training
    )


def fuse(model: nn.Module) -> FuseReport:
    """Make every supported peft LoRA Linear of `model` compute through peftkern (idempotent)."""
    lora_linear_cls = _lora_linear_class()
    report = FuseReport()
    for name, module in model.named_modules():
        if not isinstance(module, lora_linear_cls):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            report.skipped[name] = reason
            continue
        if not getattr(module, _FUSED_ATTR, False):
            module.forward = types.MethodType(_fused_forward, module)
            setattr(module, _FUSED_ATTR, True)
        report.fused.append(name)
    return report


def unfuse(model: nn.Module) -> List[str]:
    """Give every fused layer its peft forward back; returns their names."""
    restored = []
    for name, module in model.named_modules():
        if getattr(module, _FUSED_ATTR, False):
            del module.forward
            delattr(module, _FUSED_ATTR)
            restored.append(name)
    return restored


def load_prompt_embeddings(model: nn.Module, source) -> None:
    """Loads the virtual tokens of a peft prompt-learning checkpoint into `model`, injected with the
    matching peftkern config: ``PrefixConfig(projection_dim=None)`` for peft's PREFIX_TUNING (with or
    without ``prefix_projection``: peft saves the projected prefixes), ``PromptConfig(encoder=None)``
    for PROMPT_TUNING and P_TUNING (peft saves the encoder's output). The values are copied into the
    prefix / prompt parameter, which keeps training if it did. Same logits as peft's model then
    (tests/test_virtual_tokens.py).

    `source`: the checkpoint's directory (``adapter_model.safetensors`` or ``adapter_model.bin``) or
    its ``prompt_embeddings`` tensor: ``[P, num_layers * 2 * Hkv * D]`` for a prefix (layer l's
    keys are block 2l, its values block 2l + 1, each ``[Hkv, D]`` per token), ``[N, E]`` for a prompt."""
    from ..nn import PrefixKV, SoftPrompt

    if isinstance(source, (str, os.PathLike)):
        source = _read_prompt_embeddings(os.fspath(source))
    if not isinstance(source, torch.Tensor) or source.dim() != 2:
        raise ValueError(
            f"load_prompt_embeddings: expected peft's prompt_embeddings, a 2-D tensor; got {source!r:.80}"
        )
    found = [m for m in model.modules() if isinstance(m, (PrefixKV, SoftPrompt))]
    plain = [
        m for m in found if getattr(m, "prefix", None) is not None or getattr(m, "prompt", None) is not None
    ]
    if len(found) != 1 or found[0].num_tasks != 1 or not plain:
        raise ValueError(
            "load_prompt_embeddings: the model must hold one single-task peftkern prefix or prompt without a "
            "projection or encoder (peftkern.inject with PrefixConfig(projection_dim=None) or "
            "PromptConfig(encoder=None)): peft's checkpoint holds the virtual tokens themselves"
        )
    target = found[0]
    if isinstance(target, PrefixKV):
        L, Hkv, P, D = target.num_layers, target.num_kv_heads, target.prefix_len, target.head_dim
        shape, param = (P, L * 2 * Hkv * D), target.prefix
        values = source.reshape(P, L, 2, Hkv, D).permute(1, 2, 3, 0, 4) if source.shape == shape else None
    else:
        shape, param = (target.num_tokens, target.d_model), target.prompt
        values = source if source.shape == shape else None
    if values is None:
        raise ValueError(
            f"load_prompt_embeddings: peft's prompt_embeddings are {tuple(source.shape)}; this model's "
            f"{type(target).__name__} needs {shape}"
        )
    with torch.no_grad():
        param.copy_(values[None])


def _read_prompt_embeddings(path):
    st, pt = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        state = load_file(st)
    elif os.path.isfile(pt):
        state = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"load_prompt_embeddings: {path} holds no adapter_model.safetensors or .bin")
    if "prompt_embeddings" not in state:
        raise ValueError(
            f"load_prompt_embeddings: {path} is not a peft prompt-learning checkpoint (no prompt_embeddings; "
            f"it holds {sorted(state)[:4]})"
        )
    return state["prompt_embeddings"]
