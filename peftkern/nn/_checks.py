"""Constructor argument checks the modules share: each error is a TypeError (wrong type) or a
ValueError (bad value) that names the argument, raised before anything is allocated."""

import math
import numbers
import operator

import torch


def dim(module, name, value, minimum=1):
    """value as an int >= minimum that fits in int64 (a bool, a float or a string is refused)."""
    if isinstance(value, bool):
        raise TypeError(f"{module}: {name} must be an int; got bool {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{module}: {name} must be an int; got {type(value).__name__} {value!r:.40}"
        ) from None
    if not minimum <= value < 2**63:
        raise ValueError(f"{module}: {name} must be in [{minimum}, 2^63); got {value}")
    return value


def probability(module, name, value):
    """value as a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{module}: {name} must be a float in [0, 1); got {type(value).__name__} {value!r:.40}"
        )
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"{module}: {name} must be in [0, 1); got {value}")
    return value


def float_dtype(module, name, value, optional=True):
    """value is a floating-point torch.dtype (or None where optional: torch's default)."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise TypeError(f"{module}: {name} must be a floating-point torch.dtype; got {value!r:.40}")
    return value


def device(module, value):
    """value as a torch.device (None: torch's default); a string torch cannot parse is refused."""
    if value is None or isinstance(value, torch.device):
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise TypeError(
            f"{module}: device must be a torch.device, a string or an int; got {type(value).__name__}"
        )
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{module}: device {value!r} is not a device ({e})") from None


def factory(module, device_, dtype):
    """The checked (device, dtype) keyword arguments for the module's tensors."""
    return dict(device=device(module, device_), dtype=float_dtype(module, "dtype", dtype))
