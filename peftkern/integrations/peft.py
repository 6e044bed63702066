"""Interop with Hugging Face peft: its LoRA layers through peftkern's LoRA ops, and its
prompt-learning checkpoints (prefix tuning, P-tuning v2, prompt tuning, P-tuning) into a model
injected with peftkern's PrefixConfig / PromptConfig (``load_prompt_embeddings``).

    report = peftkern.integrations.peft.fuse(model)     # every peft lora.Linear on a supported base
    ...train, peft's save_pretrained / loading keep working (same parameters)...
    peftkern.integrations.peft.coverage(model)          # which layers compute fused now, and why not
    peftkern.integrations.peft.unfuse(model)

``fuse`` replaces the ``forward`` of each peft ``lora.Linear`` whose base is an ``nn.Linear`` or a
transformers ``Conv1D`` (``fan_in_fan_out``: its ``[in, out]`` weight goes in as a transposed view,
no copy); the module, its parameters and its state dict are untouched. Each call takes one of
these paths, or peft's own forward, and counts it (``call_counts``):

- one active adapter: ``lora_linear`` (base GEMM and fused update, dropout in-kernel). A bias on
  lora_B is folded into the base bias (``b + s·b_B``, an ``[out]`` vector per call);
- several active adapters (peft sums their updates): one ``lora_linear`` of rank Σr, the adapters'
  A concatenated and their B scaled by their scaling and concatenated. With dropout active in
  training their masks must be independent: peft's path then;
- DoRA (one active adapter): ``dora_linear``, the row norms from ``dora_weight_norm``;
- ``adapter_names`` mixed batches (inference): ``lora_linear_multi``, per-token adapter ids from the
  per-sample names (``"__base__"`` and adapters absent from the layer are -1), the adapters used
  stacked, zero-padded to the largest rank.

peft's (IA)³ ``ia3.Linear`` layers (on the same bases) compute through ``ia3_linear`` (``"fused: IA3"``):
its active vectors multiplied (as peft's ``ia3_scaling``), an input scale for ``is_feedforward``
layers, else an output scale of ``base_layer(x)`` with its bias; the vector is cast to the
computation dtype (peft multiplies in the vector's own dtype, often float32). Disabled or merged
adapters and extra forward arguments go to peft's forward, with their reason.

The concatenated / stacked adapters (an ``r × (in + out)`` copy per adapter) and ``‖W_i‖²`` (one
read of W) are rebuilt on every call, not cached: peft writes parameters through ``.data`` (hotswap,
unsafe merge), which no version counter sees, so a cache could serve stale weights.

peft's own forward computes the rest, each with the reason ``coverage`` gives: adapters disabled or
merged (base layer only: nothing to fuse), other LoRA variants, custom dropout modules, extra
forward arguments, a bias on lora_B in a mixed batch or with DoRA, and a LoRA layer whose base layer
is another tuner's layer (a ``PeftMixedModel`` given LoHa, LoKr, AdaLoRA, ... before LoRA): that
layer's forward adds its own update, which a fused forward on the innermost weight would drop. The
other nesting (LoRA's layer inside the other tuner's) computes fused.

Precision: the LoRA factors are cast to the computation dtype (x's, or autocast's) for the fused
op; peft keeps them in their own dtype (often float32) for its separate matmuls. Results agree to
the computation dtype's rounding.
"""

import collections
import os
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ..ops.ia3 import ia3_linear
from ..ops.lora import dora_linear, lora_linear, lora_linear_multi

_FUSED_ATTR = "_peftkern_fused"
_CALLS_ATTR = "_peftkern_calls"
NOT_FUSED = "not fused (call peftkern.integrations.peft.fuse)"


@dataclass
class FuseReport:
    fused: List[str] = field(default_factory=list)  # module names that compute through peftkern now
    skipped: Dict[str, str] = field(default_factory=dict)  # module name -> why peft's forward runs


def _lora_linear_class():
    try:
        from peft.tuners.lora import Linear
    except ImportError as e:  # pragma: no cover - exercised only without peft
        raise ImportError("peftkern.integrations.peft needs Hugging Face peft (pip install peft)") from e
    return Linear


def _is_conv1d(module) -> bool:
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _base_weight(layer):
    """The base weight as ``[out, in]``: a Conv1D's ``[in, out]`` weight as its transposed view."""
    weight = layer.get_base_layer().weight
    return weight.t() if layer.fan_in_fan_out else weight


def _nested_reason(layer) -> Optional[str]:
    """Why `layer` computes through peft while another tuner's layer (a PeftMixedModel's LoHa, LoKr,
    AdaLoRA, ...) sits between it and the base nn.Linear, or None. peft's forward then calls that
    layer's own forward, which adds its update; peftkern's fused forward would read the innermost
    weight only and lose it."""
    inner = layer.base_layer
    if inner is layer.get_base_layer():
        return None
    cls = type(inner)
    tuner = cls.__module__.split(".")[2] if cls.__module__.startswith("peft.tuners.") else cls.__module__
    return f"base layer is another tuner's layer ({tuner}.{cls.__name__}): nested tuners run through peft"


def unsupported_reason(layer) -> Optional[str]:
    """Why `layer` (a peft lora.Linear) can never compute through peftkern, or None: its base."""
    base = layer.get_base_layer()
    conv1d = _is_conv1d(base)
    if not (type(base) is nn.Linear or conv1d) or not base.weight.is_floating_point():
        return (
            f"base layer {type(base).__name__} is not a floating-point nn.Linear or transformers Conv1D "
            f"(quantized?)"
        )
    if bool(layer.fan_in_fan_out) != conv1d:
        return f"fan_in_fan_out={layer.fan_in_fan_out} does not match the {type(base).__name__} base"
    if base.weight.dim() != 2 or _base_weight(layer).shape != (layer.out_features, layer.in_features):
        return f"base weight {tuple(base.weight.shape)} does not match in/out features"
    return None


def _is_dora(layer, name) -> bool:
    variant = getattr(layer, "lora_variant", {}).get(name)
    return variant is not None and type(variant).__name__ == "DoraLinearVariant"


def _dropout_p(layer, name) -> float:
    """The dropout probability peft applies to adapter `name` now (0 when inactive)."""
    dropout = layer.lora_dropout[name]
    return float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0


def _adapter_reason(layer, name, alone) -> Optional[str]:
    variant = getattr(layer, "lora_variant", {}).get(name)
    if variant is not None:
        if not _is_dora(layer, name):
            return f"LoRA variant {type(variant).__name__} (only DoRA is fused)"
        if not alone:
            return "DoRA among several active adapters"
        if layer.lora_B[name].bias is not None:
            return "DoRA with a bias on lora_B"
    return _dropout_module_reason(layer, name)


def _dropout_module_reason(layer, name) -> Optional[str]:
    if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(layer.lora_dropout[name]).__name__}"
    return None


def _mixed_adapters(layer, adapter_names):
    """The adapters of a mixed batch that this layer holds, in a fixed order."""
    return sorted({n for n in adapter_names if n != "__base__"} & set(layer.lora_A.keys()))


def _active(layer):
    return [n for n in layer.active_adapters if n in layer.lora_A]  # peft skips the others too


def _layer_call_reason(layer, args, kwargs) -> Optional[str]:
    """What sends any peft layer's call (LoRA's, IA3's) to peft's own path whatever its adapters are."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments"
    static = unsupported_reason(layer) or _nested_reason(layer)
    if static is not None:
        return static
    if layer.disable_adapters:
        return "adapters disabled: base layer only"
    return None


def _call_reason(layer, x, args, kwargs, adapter_names) -> Optional[str]:
    """Why this forward call of `layer` goes to peft's own path, or None (it computes fused)."""
    reason = _layer_call_reason(layer, args, kwargs)
    if reason is not None:
        return reason
    if adapter_names is not None:
        if x is None or x.dim() < 2:
            return "adapter_names with an input of fewer than 2 dimensions"
        used = _mixed_adapters(layer, adapter_names)
        if not used:
            return "no adapter of the mixed batch in this layer: base layer only"
        for name in used:
            if getattr(layer, "lora_variant", {}).get(name) is not None:
                return f"LoRA variant {type(layer.lora_variant[name]).__name__} in a mixed batch"
            if layer.lora_B[name].bias is not None:
                return "a bias on lora_B in a mixed batch"
            reason = _dropout_module_reason(layer, name)
            if reason is not None:
                return reason
            if _dropout_p(layer, name) > 0:
                return "dropout in training with adapter_names"
        return None
    if layer.merged:
        return "adapters merged into the weight: base layer only"
    active = _active(layer)
    if not active:
        return "no active adapter in this layer: base layer only"
    for name in active:
        reason = _adapter_reason(layer, name, alone=len(active) == 1)
        if reason is not None:
            return reason
    if len(active) > 1 and any(_dropout_p(layer, n) > 0 for n in active):
        return "several active adapters with dropout in training (independent masks)"
    return None


def _compute_dtype(x):
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def _base_args(layer, names, dt):
    """weight ``[out, in]`` and bias in dtype dt, a bias on lora_B folded in (``b + s·b_B``)."""
    base = layer.get_base_layer()
    weight = _base_weight(layer).to(dt)
    lora_biases = [
        (layer.scaling[n], layer.lora_B[n].bias) for n in names if layer.lora_B[n].bias is not None
    ]
    if not lora_biases:
        return weight, None if base.bias is None else base.bias.to(dt)
    bias = torch.zeros(weight.shape[0], device=weight.device) if base.bias is None else base.bias.float()
    for s, b in lora_biases:
        bias = bias + s * b.float()
    return weight, bias.to(dt)


def _fused_forward(self, x, *args, **kwargs):
    self._check_forward_args(x, *args, **kwargs)  # peft's own argument errors, unchanged
    rest = dict(kwargs)
    adapter_names = rest.pop("adapter_names", None)
    reason = _call_reason(self, x, args, rest, adapter_names)
    calls = self.__dict__.setdefault(_CALLS_ATTR, collections.Counter())
    if reason is not None:
        calls[f"peft: {reason}"] += 1
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    dt = _compute_dtype(x)
    if adapter_names is not None:
        calls["fused: mixed batch"] += 1
        return _mixed_batch_forward(self, x.to(dt), adapter_names, dt)
    active = _active(self)
    if len(active) == 1 and _is_dora(self, active[0]):
        calls["fused: DoRA"] += 1
        return _dora_forward(self, x.to(dt), active[0], dt)
    calls["fused: LoRA" if len(active) == 1 else "fused: several adapters"] += 1
    return _lora_forward(self, x.to(dt), active, dt)


def _lora_forward(layer, x, active, dt):
    weight, bias = _base_args(layer, active, dt)
    if len(active) == 1:
        name = active[0]
        lora_A, lora_B = layer.lora_A[name].weight.to(dt), layer.lora_B[name].weight.to(dt)
        p = _dropout_p(layer, name)  # 0 when the dropout module is in eval
        return lora_linear(x, weight, bias, lora_A, lora_B, scaling=layer.scaling[name], dropout_p=p)

    # rank Σr: [A_1; A_2; ...] and [s_1·B_1, s_2·B_2, ...], an r × (in + out) copy per adapter
    lora_A = torch.cat([layer.lora_A[n].weight.to(dt) for n in active])
    lora_B = torch.cat([layer.lora_B[n].weight.to(dt) * layer.scaling[n] for n in active], dim=1)
    return lora_linear(x, weight, bias, lora_A, lora_B, scaling=1.0)


def _dora_forward(layer, x, name, dt):
    weight, bias = _base_args(layer, [name], dt)
    # peft's form with dropout runs only when the layer trains and its dropout is a Dropout
    p = _dropout_p(layer, name) if layer.training else 0.0
    return dora_linear(
        x,
        weight,
        bias,
        layer.lora_A[name].weight.to(dt),
        layer.lora_B[name].weight.to(dt),
        layer.lora_magnitude_vector[name].weight,
        scaling=layer.scaling[name],
        dropout_p=p,
        training=True,
    )


def _mixed_batch_forward(layer, x, adapter_names, dt):
    used = _mixed_adapters(layer, adapter_names)
    weight, bias = _base_args(layer, [], dt)
    slot = {name: i for i, name in enumerate(used)}
    per_sample = torch.tensor([slot.get(n, -1) for n in adapter_names], dtype=torch.int32)
    adapter_ids = per_sample.repeat_interleave(x[0].numel() // x.shape[-1])  # each sample's tokens
    # [L, r_max, in] and [L, out, r_max]: zero rows / columns pad the smaller ranks
    As, Bs = [layer.lora_A[n].weight.to(dt) for n in used], [layer.lora_B[n].weight.to(dt) for n in used]
    r_max = max(a.shape[0] for a in As)
    lora_A = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in As])
    lora_B = torch.stack([F.pad(b, (0, r_max - b.shape[1])) for b in Bs])
    return lora_linear_multi(
        x,
        weight,
        bias,
        lora_A,
        lora_B,
        adapter_ids.to(x.device, non_blocking=True),
        scalings=[float(layer.scaling[n]) for n in used],
    )


def _ia3_linear_class():
    try:
        from peft.tuners.ia3 import Linear
    except ImportError:  # pragma: no cover - exercised only without peft
        return None
    return Linear


def _ia3_active(layer):
    return [n for n in layer.active_adapters if n in layer.ia3_l]  # peft skips the others too


def _ia3_call_reason(layer, x, args, kwargs) -> Optional[str]:
    """Why this forward call of peft IA3 `layer` goes to peft's own path, or None (it computes fused)."""
    reason = _layer_call_reason(layer, args, kwargs)
    if reason is not None:
        return reason
    if layer.merged:
        return "adapters merged into the weight: base layer only"
    if not _ia3_active(layer):
        return "no active adapter in this layer: base layer only"
    return None


def _ia3_fused_forward(self, x, *args, **kwargs):
    reason = _ia3_call_reason(self, x, args, kwargs)
    calls = self.__dict__.setdefault(_CALLS_ATTR, collections.Counter())
    if reason is not None:
        calls[f"peft: {reason}"] += 1
        return type(self).forward(self, x, *args, **kwargs)  # peft's own path
    calls["fused: IA3"] += 1
    dt = _compute_dtype(x)
    base = self.get_base_layer()
    weight = _base_weight(self).to(dt)
    bias = None if base.bias is None else base.bias.to(dt)
    scale = 1
    for n in _ia3_active(self):  # several active vectors multiply, as peft's ia3_scaling
        scale = scale * self.ia3_l[n].flatten()
    return ia3_linear(x.to(dt), weight, bias, scale.to(dt), scale_input=bool(self.is_feedforward))


def _peft_ia3_layers(model):
    cls = _ia3_linear_class()
    return [] if cls is None else [(name, m) for name, m in model.named_modules() if type(m) is cls]


def _peft_layers(model):
    """(name, layer, is_ia3) of every peft LoRA and IA3 Linear of `model`."""
    ia3 = {id(m) for _, m in _peft_ia3_layers(model)}
    lora = {id(m) for _, m in _peft_lora_layers(model)}
    return [(n, m, id(m) in ia3) for n, m in model.named_modules() if id(m) in ia3 or id(m) in lora]


def _peft_lora_layers(model):
    cls = _lora_linear_class()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def coverage(model: nn.Module) -> Dict[str, Optional[str]]:
    """For each peft lora.Linear and ia3.Linear of `model`, as the model is now: None if a plain forward call
    computes through peftkern, else why peft's own forward runs."""
    out = {}
    for name, layer, is_ia3 in _peft_layers(model):
        if not getattr(layer, _FUSED_ATTR, False):
            out[name] = unsupported_reason(layer) or NOT_FUSED
        elif is_ia3:
            out[name] = _ia3_call_reason(layer, None, (), {})
        else:
            out[name] = _call_reason(layer, None, (), {}, None)
    return out


def call_counts(model: nn.Module) -> Dict[str, int]:
    """Forward calls of the fused layers since `fuse`, by path: ``"fused: ..."`` or ``"peft: <reason>"``."""
    total = collections.Counter()
    for _, layer, _ in _peft_layers(model):
        total.update(layer.__dict__.get(_CALLS_ATTR, {}))
    return dict(total)


def fuse(model: nn.Module) -> FuseReport:
    """Make every peft LoRA and IA3 Linear of `model` on a supported base compute through peftkern where it
    can (idempotent). The report is ``coverage`` at this moment: the layers that compute fused now,
    and every other layer with its reason."""
    for _, layer, is_ia3 in _peft_layers(model):
        if unsupported_reason(layer) is None and not getattr(layer, _FUSED_ATTR, False):
            layer.forward = types.MethodType(_ia3_fused_forward if is_ia3 else _fused_forward, layer)
            setattr(layer, _FUSED_ATTR, True)
            layer.__dict__[_CALLS_ATTR] = collections.Counter()
    report = FuseReport()
    for name, reason in coverage(model).items():
        if reason is None:
            report.fused.append(name)
        else:
            report.skipped[name] = reason
    return report


def unfuse(model: nn.Module) -> List[str]:
    """Give every fused layer its peft forward back; returns their names."""
    restored = []
    for name, module in model.named_modules():
        if getattr(module, _FUSED_ATTR, False):
            del module.forward
            delattr(module, _FUSED_ATTR)
            module.__dict__.pop(_CALLS_ATTR, None)
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
    keys are block 2l, its values block 2l + 1, each ``[Hkv, D]`` per token), ``[N, E]`` for a prompt.

    An encoder-decoder (T5, BART): peft's SEQ_2_SEQ_LM prefix sits in the decoder's self-attention
    only, so the model takes ``PrefixConfig(sites=["decoder"], projection_dim=None)``; each decoder
    layer gets the block peft's layout hands it (decoder layer i: peft's layer ``2i mod num_layers``,
    see ``_peft_seq2seq_layers``), which gives peft's logits. The layers peft shares start equal here
    and train apart. peft's SEQ_2_SEQ_LM prompt tuning saves ``[2N, E]`` and reads the first N (in
    front of the encoder's input): those are loaded."""
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
    if isinstance(target, PrefixKV) and getattr(target, "sites", None) not in (None, ["decoder"]):
        raise ValueError(
            "load_prompt_embeddings: peft's prefix tuning of an encoder-decoder holds the decoder's "
            f"self-attention prefixes only; this model's prefix takes the sites {target.sites}: inject "
            "PrefixConfig(sites=['decoder']) to load it"
        )
    if isinstance(target, PrefixKV):
        L, Hkv, P, D = target.num_layers, target.num_kv_heads, target.prefix_len, target.head_dim
        shape, param = (P, L * 2 * Hkv * D), target.prefix
        values = source.reshape(P, L, 2, Hkv, D).permute(1, 2, 3, 0, 4) if source.shape == shape else None
        if values is not None and target.sites is not None:
            values = values[_peft_seq2seq_layers(L)]
    else:
        shape, param = (target.num_tokens, target.d_model), target.prompt
        if (
            getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            and source.shape[0] == 2 * shape[0]
        ):
            source = source[: shape[0]]  # peft's SEQ_2_SEQ_LM prompts: [2N, E], its forward reads the first N
        values = source if source.shape == shape else None
    if values is None:
        raise ValueError(
            f"load_prompt_embeddings: peft's prompt_embeddings are {tuple(source.shape)}; this model's "
            f"{type(target).__name__} needs {shape}"
        )
    with torch.no_grad():
        param.copy_(values[None])


def _peft_seq2seq_layers(num_layers: int) -> torch.Tensor:
    """Which of peft's prefix layers each decoder layer reads in peft's seq2seq prefix tuning (0.21):
    peft views its prompt embeddings as ``num_layers * 2`` key / value blocks, doubles them along
    that axis and splits the result into groups of four per decoder layer (self keys, self values,
    cross keys, cross values), then empties the cross-attention cache. Decoder layer i so reads
    blocks 4i, 4i + 1 of the doubled list: layer ``2i mod num_layers`` (each layer of the first
    half shared by two decoder layers when num_layers is even, the other blocks unused)."""
    return (2 * torch.arange(num_layers)) % num_layers


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


_PEFT_PREFIX = "base_model.model."


def load_peft_weights(model: nn.Module, source, name: Optional[str] = None) -> nn.Module:
    """Loads a Hugging Face peft checkpoint of LoRA, AdaLoRA, (IA)³ or LoKr into `model` injected
    with the matching peftkern config (``LoRAConfig``, ``AdaLoRAConfig``, ``IA3Config``,
    ``KronAConfig``) on the same modules; each method's file says how peft's tensors map
    (``Method.from_peft``). The values are copied into adapter `name` (default: the model's one
    adapter), which keeps training if it did; the logits are peft's then.

    `source`: the checkpoint's directory (``adapter_model.safetensors`` or ``.bin``, and
    ``adapter_config.json``, whose ``peft_type`` must be the method's) or its state dict. Every check
    runs before a value is copied: a missing tensor, a shape that differs, or a tensor of the
    checkpoint the adapter has no place for is a ValueError naming it."""
    from .inject import copy_into, injection_state

    state = injection_state(model)
    if state is None or not state.adapters:
        raise ValueError("load_peft_weights: the model holds no peftkern adapter; peftkern.inject one first")
    if name is None:
        if len(state.adapters) != 1:
            raise ValueError(
                f"load_peft_weights: the model holds adapters {sorted(state.adapters)}; name the one to load"
            )
        name = next(iter(state.adapters))
    if name not in state.adapters:
        raise ValueError(
            f"load_peft_weights: the model holds no adapter named {name!r} ({sorted(state.adapters)})"
        )
    adapter = state.adapters[name]
    method, config = adapter.plan.method, adapter.config
    if not method.peft_type:
        raise ValueError(
            f"load_peft_weights: adapter {name!r} is a {type(config).__name__}; peftkern reads peft "
            "checkpoints of LoRA, AdaLoRA, (IA)³ and LoKr (KronA) only"
        )
    where = "the state dict"
    if isinstance(source, (str, os.PathLike)):
        where = os.fspath(source)
        source = _read_peft_checkpoint(where, method.peft_type)
    if not isinstance(source, dict):
        raise TypeError(
            f"load_peft_weights: source must be a directory or a state dict; got {type(source).__name__}"
        )
    tensors = {k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k: v for k, v in source.items()}
    values = method.from_peft(model, adapter.plan.sites, config, tensors)
    if tensors:
        raise ValueError(
            f"load_peft_weights: {where} holds {sorted(tensors)[0]} (and {len(tensors) - 1} more), which "
            f"adapter {name!r} has no place for (its config must name the same modules as peft's)"
        )
    expected = adapter.plan.method.expected_shapes(model, adapter.plan.sites, config)
    for k, shape in expected.items():
        if k not in values:
            raise ValueError(f"load_peft_weights: {where} lacks the tensor for {k} {tuple(shape)}")
        if values[k].shape != shape:
            raise ValueError(
                f"load_peft_weights: {k} is {tuple(values[k].shape)} in {where} but {tuple(shape)} in "
                "the model"
            )
    copy_into(model, {adapter.params[k]: values[k] for k in expected})
    return model


def _read_peft_checkpoint(path, peft_type):
    import json

    cfg = os.path.join(path, "adapter_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            found = json.load(f).get("peft_type")
        if found != peft_type:
            raise ValueError(
                f"load_peft_weights: {path} is a peft {found} checkpoint; the adapter is peftkern's "
                f"{peft_type} method"
            )
    st, pt = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"load_peft_weights: {path} holds no adapter_model.safetensors or .bin")
