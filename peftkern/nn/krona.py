"""peftkern.nn.KronALinear: an nn.Linear holding named KronA updates (Edalati et al. 2022),
``out = x Wᵀ + b + Σ_n s_n · x (A_n ⊗ B_n)ᵀ`` over the names that apply."""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.kron import kron_delta, krona_linear
from . import _checks, routing
from ._autocast import autocast_tensors


def factorization(dimension: int, factor: int = -1) -> Tuple[int, int]:
    """(m, n) with m · n = dimension, as Hugging Face peft's LoKr ``factorization`` chooses them: with
    factor > 0 dividing dimension, (factor, dimension // factor); else the divisor pair nearest the
    square root whose smaller part is at most factor (-1: no bound), smaller part first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    for d in range(2, dimension + 1):
        if m >= dimension // m:
            break
        if dimension % d:
            continue
        if d + dimension // d > m + dimension // m or d > bound:
            break
        m = d
    return tuple(sorted((m, dimension // m)))


class KronALinear(nn.Linear):
    """``nn.Linear`` with named KronA updates on its frozen weight: ``kron_A[name] [out_a, in_a]``,
    ``kron_B[name] [out_b, in_b]`` (``out_features = out_a·out_b``, ``in_features = in_a·in_b``) and a
    scaling, ``out = x Wᵀ + b + s · x (A ⊗ B)ᵀ`` (``ops.krona_linear``: ``A X Bᵀ``, never ``[out, in]``).

    ``KronALinear.adapt(linear)`` turns an ``nn.Linear`` into one in place (same object, same ``weight``
    and ``bias`` Parameters); ``restore()`` turns it back once it holds no update.

    Init (``add``): as peft's LoKr, A zero and B Kaiming-uniform (a = sqrt(5)), so the layer starts
    as its base. What a call computes (``routing.resolve``): one name: ``ops.krona_linear``; several
    together: the op for the first and each other's update added (``ops.kron.kron_delta``, a
    composite); a mixed batch: the base product, then each task's rows plus its own update
    (``index_add``, a composite: slower than one task per batch).
    """

    @classmethod
    def adapt(cls, linear: nn.Linear) -> "KronALinear":
        if type(linear) is cls:
            return linear
        if type(linear) is not nn.Linear:
            raise TypeError(f"KronALinear.adapt: expects an nn.Linear; got {type(linear).__name__}")
        linear.__class__ = cls
        linear.kron_A, linear.kron_B = nn.ParameterDict(), nn.ParameterDict()
        for held in (linear.kron_A, linear.kron_B):
            held._peftkern_container = True  # what model surgery must not target
            held.train(linear.training)
        linear.krona_scaling = {}
        linear._peftkern_active = getattr(linear, "_peftkern_active", ())
        return linear

    def restore(self) -> None:
        """Back to a plain nn.Linear (no update left)."""
        if self.names():
            raise ValueError(f"KronALinear.restore: it still holds {self.names()}")
        for attr in ("kron_A", "kron_B"):
            delattr(self, attr)
        for attr in ("krona_scaling", "_peftkern_last_route"):
            self.__dict__.pop(attr, None)
        self.__class__ = nn.Linear

    def names(self) -> List[str]:
        return list(self.kron_A.keys())

    def add(self, name: str, out_a: int, in_a: int, *, scaling: float = 1.0) -> None:
        """A KronA update `name` with A ``[out_a, in_a]`` and B ``[out // out_a, in // in_a]`` (peft's
        LoKr init), on the weight's device and dtype."""
        who = "KronALinear"
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{who}: name must be a non-empty string without '.'; got {name!r:.40}")
        if name in self.names():
            raise ValueError(f"{who}: it already holds an update named {name!r}")
        out_a, in_a = _checks.dim(who, "out_a", out_a), _checks.dim(who, "in_a", in_a)
        if self.out_features % out_a or self.in_features % in_a:
            raise ValueError(
                f"{who}: out_a ({out_a}) must divide out_features ({self.out_features}) and in_a ({in_a}) "
                f"in_features ({self.in_features})"
            )
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise TypeError(f"{who}: scaling must be a finite float; got {scaling!r:.40}")
        w = self.weight
        self.kron_A[name] = nn.Parameter(torch.zeros(out_a, in_a, device=w.device, dtype=w.dtype))
        B = torch.empty(self.out_features // out_a, self.in_features // in_a, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.kron_B[name] = nn.Parameter(B)
        self.krona_scaling[name] = float(scaling)

    def remove(self, name: str) -> None:
        for d in (self.kron_A, self.kron_B):
            if name in d:
                del d[name]
        self.krona_scaling.pop(name, None)
        self._peftkern_active = tuple(n for n in self._peftkern_active if n != name)

    @torch.no_grad()
    def delta(self, name: str) -> Tensor:
        """``scaling · kron(A, B)`` ``[out, in]`` in float32 at least (formed: for merging)."""
        dt = torch.promote_types(self.kron_A[name].dtype, torch.float32)
        return torch.kron(self.kron_A[name].to(dt), self.kron_B[name].to(dt)) * self.krona_scaling[name]

    @torch.no_grad()
    def merged_weight(self, names) -> Tensor:
        """A new tensor: the weight with the updates `names` added (in float32 at least)."""
        w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        for n in names:
            w = w + self.delta(n)
        return w.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        names, route = routing.resolve(self, self.names(), self._peftkern_active)
        if route is not None:
            return self._mixed(x, route)
        x, weight, bias = autocast_tensors(x, [x, self.weight, self.bias])
        if not names:
            return F.linear(x, weight, bias)
        A, B = autocast_tensors(x, [self.kron_A[names[0]], self.kron_B[names[0]]])
        out = krona_linear(x, weight, bias, A, B, scaling=self.krona_scaling[names[0]])
        for n in names[1:]:
            A, B = autocast_tensors(x, [self.kron_A[n], self.kron_B[n]])
            out = out + kron_delta(x, A, B, self.krona_scaling[n])
        return out

    def _mixed(self, x: Tensor, route: routing.SampleRoute) -> Tensor:
        who = "KronALinear"
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        x2, weight, bias = autocast_tensors(x2, [x2, self.weight, self.bias])
        out = F.linear(x2, weight, bias)
        for n in self.names():
            if not any(n in s for s in route.samples):
                continue
            idx = route.rows(n, rows, x.device, who)
            A, B = autocast_tensors(x2, [self.kron_A[n], self.kron_B[n]])
            out = out.index_add(0, idx, kron_delta(x2.index_select(0, idx), A, B, self.krona_scaling[n]))
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        for n in self.names():
            A, B = self.kron_A[n], self.kron_B[n]
            parts.append(
                f"krona[{n}]: A={tuple(A.shape)}, B={tuple(B.shape)}, scaling={self.krona_scaling[n]:g}"
            )
        return ", ".join(parts)
