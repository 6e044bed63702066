"""peftkern's autograd ops: one public function per op (see each docstring for the exact math)."""

from .adapter import ADAPTER_ACTIVATIONS, adapter, adapter_multi, adapter_stack
from .ia3 import ia3_linear
from .kron import krona_linear
from .lora import dora_linear, dora_weight_norm, dropout_mask, lora_linear, lora_linear_multi
from .mask import masked_linear, masked_linear_multi, masked_linear_packed, pack_mask, unpack_mask
from .prefix_attention import prefix_attention

__all__ = [
    "adapter",
    "adapter_multi",
    "adapter_stack",
    "ADAPTER_ACTIVATIONS",
    "lora_linear",
    "lora_linear_multi",
    "dora_linear",
    "dora_weight_norm",
    "dropout_mask",
    "masked_linear",
    "masked_linear_packed",
    "masked_linear_multi",
    "pack_mask",
    "unpack_mask",
    "prefix_attention",
    "ia3_linear",
    "krona_linear",
]
