"""peftkern's autograd ops: one public function per op (see each docstring for the exact math)."""

from .adapter import ADAPTER_ACTIVATIONS, adapter

__all__ = ["adapter", "ADAPTER_ACTIVATIONS"]
