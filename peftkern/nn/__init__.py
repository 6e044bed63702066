"""Drop-in torch.nn modules built on peftkern.ops."""

from . import routing
from .adamix import AdaMixAdapter, adamix_consistency_loss, adamix_pair
from .adapted_linear import AdaptedLinear
from .adapter import Adapter, AdapterFusion, Compacter, MultiAdapter, PHMLinear
from .ia3 import IA3Linear
from .krona import KronALinear
from .ladder import LadderSideEncoderDecoder, LadderSideNetwork
from .lora import LoRALinear
from .mask import MaskedLinear
from .prefix_attention import PrefixGate, PrefixKV, PrefixSelfAttention, SoftPrompt, VisualPrompt
from .side_tuning import SideTuning

__all__ = [
    "AdaptedLinear",
    "routing",
    "AdaMixAdapter",
    "adamix_consistency_loss",
    "adamix_pair",
    "Adapter",
    "AdapterFusion",
    "MultiAdapter",
    "LoRALinear",
    "MaskedLinear",
    "PrefixGate",
    "PrefixKV",
    "PrefixSelfAttention",
    "SoftPrompt",
    "VisualPrompt",
    "SideTuning",
    "LadderSideNetwork",
    "LadderSideEncoderDecoder",
    "IA3Linear",
    "KronALinear",
    "Compacter",
    "PHMLinear",
]
