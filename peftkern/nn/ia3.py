"""peftkern.nn.IA3Linear: an nn.Linear holding named (IA)^3 vectors (Liu et al. 2022).

Each vector ``l`` rescales the layer's output (``ia3_l[name]`` ``[out]``: keys, values)::

    out = l * (x @ W.T + b)

or, for a feed-forward vector (``[in]``: the FFN's down projection), its input::

    out = (l * x) @ W.T + b

Several active vectors multiply (as peft's ``ia3_scaling *= ia3_l``), output vectors into one
output scale and feed-forward ones into one input scale.
"""

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.ia3 import ia3_linear
from . import routing
from ._autocast import autocast_tensors


class IA3Linear(nn.Linear):
    """``nn.Linear`` with any number of named (IA)^3 vectors on its frozen weight (see the module
    docstring for the math): ``ia3_l[name]``, 1-D, ``[out]`` or, when ``feedforward[name]``, ``[in]``.

    ``IA3Linear.adapt(linear)`` turns an ``nn.Linear`` into one in place (the same object, the same
    ``weight`` and ``bias`` Parameters, hooks and children), ``restore()`` turns it back once it holds
    no vector.

    What a call computes (``routing.resolve``): every row through the same names (the ``active`` ones,
    or one task for the whole batch): ``ops.ia3_linear`` with the product of their vectors (both kinds
    active at once: the input-scale op, then the output scale multiplied eagerly); or, in a mixed batch
    (``peftkern.tasks``), each row its sample's vector, gathered per row (``L[ids]``, ones for a
    sample without one here) and applied eagerly: a composite, slower than the fused op.
    """

    @classmethod
    def adapt(cls, linear: nn.Linear) -> "IA3Linear":
        if type(linear) is cls:
            return linear
        if type(linear) is not nn.Linear:
            raise TypeError(f"IA3Linear.adapt: expects an nn.Linear; got {type(linear).__name__}")
        linear.__class__ = cls
        linear.ia3_l = nn.ParameterDict()
        linear.ia3_l._peftkern_container = True  # what model surgery must not target
        linear.ia3_l.train(linear.training)
        linear.feedforward = {}  # name -> whether its vector scales the input
        linear._peftkern_active = getattr(linear, "_peftkern_active", ())
        return linear

    def restore(self) -> None:
        """Back to a plain nn.Linear (no vector left)."""
        if self.names():
            raise ValueError(f"IA3Linear.restore: it still holds {self.names()}")
        del self.ia3_l
        for attr in ("feedforward", "_peftkern_last_route"):
            self.__dict__.pop(attr, None)
        self.__class__ = nn.Linear

    def names(self) -> List[str]:
        return list(self.ia3_l.keys())

    def add_ia3(self, name: str, *, feedforward: bool, init_ones: bool = True) -> None:
        """A vector of ones (the base layer's output; ``init_ones=False``: standard normal, as peft's
        ``init_ia3_weights=False``), on the weight's device and dtype: ``[in]`` when feedforward,
        else ``[out]``."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"IA3Linear: name must be a non-empty string without '.'; got {name!r:.40}")
        if name in self.ia3_l:
            raise ValueError(f"IA3Linear: it already holds a vector named {name!r}")
        if not isinstance(feedforward, bool):
            raise TypeError(f"IA3Linear: feedforward must be a bool; got {feedforward!r:.40}")
        n = self.in_features if feedforward else self.out_features
        w = self.weight
        make = torch.ones if init_ones else torch.randn
        self.ia3_l[name] = nn.Parameter(make(n, device=w.device, dtype=w.dtype))
        self.feedforward[name] = feedforward

    def remove(self, name: str) -> None:
        if name in self.ia3_l:
            del self.ia3_l[name]
        self.feedforward.pop(name, None)
        self._peftkern_active = tuple(n for n in self._peftkern_active if n != name)

    @torch.no_grad()
    def merged(self, names) -> Dict[str, Tensor]:
        """New tensors: ``{"weight": ..., "bias": ...}`` with `names` folded in (float32 math):
        an output vector into the weight's rows and the bias, a feed-forward one into the columns."""
        w = self.weight.float()
        b = None if self.bias is None else self.bias.float()
        for n in names:
            vec = self.ia3_l[n].float()
            if self.feedforward[n]:
                w = w * vec[None, :]
            else:
                w = w * vec[:, None]
                b = None if b is None else b * vec
        return {
            "weight": w.to(self.weight.dtype),
            "bias": None if b is None else b.to(self.bias.dtype),
        }

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        names, route = routing.resolve(self, self.names(), self._peftkern_active)
        if route is not None:
            return self._mixed(x, route)
        x, weight, bias = autocast_tensors(x, [x, self.weight, self.bias])
        outs = [self.ia3_l[n] for n in names if not self.feedforward[n]]
        ins = [self.ia3_l[n] for n in names if self.feedforward[n]]
        if not outs and not ins:
            return F.linear(x, weight, bias)
        l_out, l_in = self._product(outs, x), self._product(ins, x)
        if l_in is None:
            return ia3_linear(x, weight, bias, l_out, scale_input=False)
        out = ia3_linear(x, weight, bias, l_in, scale_input=True)
        return out if l_out is None else out * l_out  # both kinds at once: eager output scale

    @staticmethod
    def _product(vectors, like):
        if not vectors:
            return None
        product = vectors[0]
        for v in vectors[1:]:
            product = product * v
        return product.to(like.dtype)

    def _mixed(self, x: Tensor, route: routing.SampleRoute) -> Tensor:
        who = "IA3Linear"
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        x2, weight, bias = autocast_tensors(x2, [x2, self.weight, self.bias])
        used = [n for n in self.names() if any(n in s for s in route.samples)]
        if not used:
            return F.linear(x2, weight, bias).reshape(*lead, self.out_features)
        ids = route.ids(used, x2.shape[0], x.device, who)
        rows = torch.where(ids < 0, len(used), ids)  # -1: the table's last row, ones

        def table(feedforward, n):
            ones = x2.new_ones(n)
            return torch.stack(
                [self.ia3_l[u].to(x2.dtype) if self.feedforward[u] == feedforward else ones for u in used]
                + [ones]
            )

        if any(self.feedforward[u] for u in used):
            x2 = x2 * table(True, self.in_features).index_select(0, rows)
        out = F.linear(x2, weight, bias)
        if not all(self.feedforward[u] for u in used):
            out = out * table(False, self.out_features).index_select(0, rows)
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        for n in self.names():
            parts.append(f"ia3[{n}]: {'input (feedforward)' if self.feedforward[n] else 'output'} scale")
        return ", ".join(parts)
