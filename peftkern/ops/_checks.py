"""The argument checks the C++ glue cannot make, shared by the public ops.

Shapes, dtypes, devices and values of tensors are checked in C++ (csrc/ops/common.h). Two things
must happen in Python: a non-tensor where a tensor is due, or a scalar of the wrong type, would
otherwise fail inside the dispatcher's argument parsing with a RuntimeError, or on an attribute;
and a tensor on the meta device among real ones routes the call to the fake implementation, so
the fakes check devices (a real kernel never runs there).
"""

import numbers
import operator

from torch import Tensor

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def tensors(op, optional=(), **named):
    """Each named value is a Tensor (None allowed for the names in `optional`)."""
    for name, value in named.items():
        if isinstance(value, Tensor) or (value is None and name in optional):
            continue
        want = "a tensor or None" if name in optional else "a tensor"
        raise TypeError(f"{op}: {name} must be {want}; got {type(value).__name__} {value!r:.60}")


def string(op, name, value):
    if not isinstance(value, str):
        raise TypeError(f"{op}: {name} must be a str; got {type(value).__name__} {value!r:.60}")
    return value


def real(op, name, value):
    """value as a Python float: a real number, or a one-element real tensor (read on the host)."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number; got {type(value).__name__} {value!r:.60}")
    return float(value)


def reals(op, name, values):
    """values as a list of Python floats (a sequence of real numbers)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(
            f"{op}: {name} must be a tensor or a sequence of real numbers; got {type(values).__name__}"
        )
    values = list(values)
    for v in values:
        if not isinstance(v, numbers.Real):
            what = f"{type(v).__name__} {v!r:.40}"
            raise TypeError(f"{op}: {name} must be a tensor or a sequence of real numbers; holds {what}")
    return [float(v) for v in values]


def int64s(op, name, values):
    """values as a list of Python ints that fit in int64 (a sequence of integers: 8.0 is refused, as
    is a value C++ would wrap)."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(
            f"{op}: {name} must be a sequence of ints; got {type(values).__name__} {values!r:.60}"
        )
    out = []
    for v in values:
        try:
            i = operator.index(v)
        except TypeError:
            raise TypeError(
                f"{op}: {name} must be a sequence of ints; holds {type(v).__name__} {v!r:.40}"
            ) from None
        if not INT64_MIN <= i <= INT64_MAX:
            raise ValueError(f"{op}: {name} holds {i}, which does not fit in int64")
        out.append(i)
    return out


def same_device(op, first, **named):
    """For the fake (meta) implementations: every named tensor (None skipped) is on the device of
    `first` = (name, tensor). A real kernel checks this itself; a meta tensor among real ones sends
    the call here instead, where the result would be uninitialised memory."""
    first_name, ref = first
    for name, t in named.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {ref.device}")
