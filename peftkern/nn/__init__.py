"""Drop-in torch.nn modules built on peftkern.ops."""

from .adapter import Adapter

__all__ = ["Adapter"]
