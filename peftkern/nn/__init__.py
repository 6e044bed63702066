"""Drop-in torch.nn modules built on peftkern.ops."""

from .adapter import Adapter
from .lora import LoRALinear
from .mask import MaskedLinear
from .prefix_attention import PrefixKV, PrefixSelfAttention, SoftPrompt

__all__ = ["Adapter", "LoRALinear", "MaskedLinear", "PrefixKV", "PrefixSelfAttention", "SoftPrompt"]
