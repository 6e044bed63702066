"""peftkern.nn.AdaMixAdapter: a mixture of bottleneck adapter experts (Wang et al. 2022, AdaMix)
on the fused adapter op, and AdaMix's consistency regulariser."""

import contextlib
import math
import numbers
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..ops.adapter import ADAPTER_ACTIVATIONS, adapter
from . import _checks
from ._autocast import autocast_tensors
from .adapter import ADAPTER_INITS, Adapter


def _scale(module, value):
    """value as a finite Python float (a bool or a non-number is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{module}: scale must be a real number; got {type(value).__name__} {value!r:.40}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{module}: scale must be finite; got {value}")
    return value


@torch.compiler.disable
def _draw_route(num_experts: int) -> Tuple[int, int]:
    """(i, j): two independent uniform draws in [0, num_experts) from torch's default CPU generator.
    Always eager (a graph break under torch.compile), so a compiled module draws the same routes as
    an eager one under the same seed."""
    i, j = torch.randint(num_experts, (2,), device="cpu").tolist()
    return i, j


@torch.compiler.disable
def _draw_other_route(num_experts: int, first: Tuple[int, int]) -> Tuple[int, int]:
    """(i2, j2) with i2 != i and j2 != j for first = (i, j): each uniform over the other
    num_experts - 1 experts, as (i + 1 + a) % E and (j + 1 + b) % E for two independent uniform
    draws a, b in [0, E - 1) from the default CPU generator (two numbers, as _draw_route takes)."""
    a, b = torch.randint(num_experts - 1, (2,), device="cpu").tolist()
    return (first[0] + 1 + a) % num_experts, (first[1] + 1 + b) % num_experts


def _in_backward() -> bool:
    """Whether autograd's engine is running us: a forward called then is activation checkpointing's
    recompute (reentrant or not)."""
    return torch._C._current_graph_task_id() != -1


class AdaMixAdapter(nn.Module):
    """A mixture of ``num_experts`` bottleneck adapters (AdaMix, Wang et al. 2022), one fused op per call.

    Parameters are stacked over the experts E: ``down_weight [E, bottleneck, d_model]``,
    ``down_bias [E, bottleneck]``, ``up_weight [E, d_model, bottleneck]``, ``up_bias [E, d_model]``.
    Each expert is initialised as ``peftkern.nn.Adapter`` with the same ``init`` (``"houlsby"``: down
    ~ N(0, 0.01^2) truncated at two standard deviations, up and biases zero; ``"lora"``: down
    Kaiming-uniform with a = sqrt(5), up and biases zero), so the module starts as the identity.

    ``forward(x, residual=None)`` computes ``residual + scale * (act(x @ Wd.T + bd) @ Wu.T + bu)``
    (residual defaults to x) with

    * training mode: stochastic routing. Each call draws one down-projection expert ``i`` and one
      up-projection expert ``j``, independently and uniformly, from torch's default CPU generator (so
      ``torch.manual_seed`` fixes the routes, and no GPU synchronisation happens), and uses
      ``Wd, bd = down_weight[i], down_bias[i]`` and ``Wu, bu = up_weight[j], up_bias[j]``. Only those
      two experts receive gradients. The route is kept in ``last_route = (i, j)``.
    * eval mode: the averaged experts, ``Wd = down_weight.mean(0)`` and so on for the four stacked
      parameters (``last_route`` is then None): the same output as ``merge_experts()``'s Adapter.
      The means are recomputed at every call (gradients reach every expert); to deploy, merge once.

    The draw runs eagerly on the host, so under ``torch.compile`` a training-mode forward has a graph
    break there (and draws the same routes as eager code); eval mode has none. Activation
    checkpointing restores the CPU generator for its recompute, which so takes the same routes,
    except where threads share the generator (nn.DataParallel's replicas: use DistributedDataParallel).

    Train with ``adamix_consistency_loss`` between two forward passes of the same batch (two routes)
    to keep the experts close, as the paper does, so that their average stays a good model. Inside
    ``with adamix_pair(model):`` a training-mode forward draws a route of other experts than the one
    its module drew on the pass before the block (the paired second pass; see ``adamix_pair``).
    Under autocast the module computes in the autocast dtype, as nn.Linear would.
    """

    def __init__(
        self,
        d_model: int,
        bottleneck: int,
        num_experts: int,
        *,
        activation: str = "gelu",
        scale: float = 1.0,
        init: str = "houlsby",
        device=None,
        dtype=None,
    ):
        super().__init__()
        d_model = _checks.dim("AdaMixAdapter", "d_model", d_model)
        bottleneck = _checks.dim("AdaMixAdapter", "bottleneck", bottleneck)
        num_experts = _checks.dim("AdaMixAdapter", "num_experts", num_experts)
        factory = _checks.factory("AdaMixAdapter", device, dtype)
        if activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(
                f"AdaMixAdapter: activation must be one of {ADAPTER_ACTIVATIONS}; got {activation!r:.40}"
            )
        if init not in ADAPTER_INITS:
            raise ValueError(f"AdaMixAdapter: init must be one of {ADAPTER_INITS}; got {init!r:.40}")
        scale = _scale("AdaMixAdapter", scale)
        self.d_model, self.bottleneck, self.num_experts = d_model, bottleneck, num_experts
        self.activation, self.scale, self.init = activation, scale, init
        E, r, d = num_experts, bottleneck, d_model
        self.down_weight = nn.Parameter(torch.empty(E, r, d, **factory))
        self.down_bias = nn.Parameter(torch.empty(E, r, **factory))
        self.up_weight = nn.Parameter(torch.empty(E, d, r, **factory))
        self.up_bias = nn.Parameter(torch.empty(E, d, **factory))
        self.last_route: Optional[Tuple[int, int]] = None
        # adamix_pair: the first pass's route while the block runs (None outside it), and the CPU
        # generator's state before the latest paired draw with the route it gave, so a checkpointed
        # recompute (which restores that state) takes the same paired route after the block ended
        self._pair_first: Optional[Tuple[int, int]] = None
        self._paired_draw: Optional[Tuple[Tensor, Tuple[int, int]]] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert as nn.Adapter initialises itself (the fan-in is d_model, per expert)."""
        with torch.no_grad():
            for e in range(self.num_experts):
                if self.init == "houlsby":
                    nn.init.trunc_normal_(self.down_weight[e], mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                else:
                    nn.init.kaiming_uniform_(self.down_weight[e], a=math.sqrt(5))
            nn.init.zeros_(self.down_bias)
            nn.init.zeros_(self.up_weight)
            nn.init.zeros_(self.up_bias)

    @torch.compiler.disable  # eager, as the draws themselves: one graph break per training call
    def _route(self) -> Tuple[int, int]:
        """This training forward's route: independent draws, or inside adamix_pair other experts than
        the first pass's; a recompute under backward repeats the paired draw whose generator state
        it restored (outside the block too)."""
        if self._pair_first is not None:
            state = torch.random.get_rng_state()
            route = _draw_other_route(self.num_experts, self._pair_first)
            self._paired_draw = (state, route)
            return route
        if self._paired_draw is not None and _in_backward():
            state, route = self._paired_draw
            if torch.equal(torch.random.get_rng_state(), state):
                _draw_other_route(self.num_experts, route)  # the same two numbers as the forward took
                return route
        return _draw_route(self.num_experts)

    def _mean_experts(self):
        """(w_down, b_down, w_up, b_up) averaged over the experts (differentiable)."""
        return tuple(t.mean(0) for t in (self.down_weight, self.down_bias, self.up_weight, self.up_bias))

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if self.training:
            i, j = self._route()
            self.last_route = (i, j)
            weights = (self.down_weight[i], self.down_bias[i], self.up_weight[j], self.up_bias[j])
        else:
            self.last_route = None
            weights = self._mean_experts()
        x, w_down, b_down, w_up, b_up, residual = autocast_tensors(x, [x, *weights, residual])
        return adapter(
            x, w_down, b_down, w_up, b_up, activation=self.activation, scale=self.scale, residual=residual
        )

    @torch.no_grad()
    def merge_experts(self) -> Adapter:
        """AdaMix's adaptation merging: a new, independent ``peftkern.nn.Adapter`` (same device, dtype,
        activation, scale and init name) whose four tensors are the experts' means. Its output is
        this module's eval-mode output.

        Averaging the up-projections and biases is exact for the up side (the up-projection is
        linear), but averaging the down-projections is the paper's approximation: with a non-linear
        activation, act(x @ mean(Wd).T) is not the mean of act(x @ Wd.T) over the experts, so the
        merged adapter is not the average of the experts' outputs. Consistency training keeps the
        experts close enough for it to work. No random number is drawn.
        """
        w = self.down_weight
        merged = Adapter(
            self.d_model,
            self.bottleneck,
            activation=self.activation,
            scale=self.scale,
            init=self.init,
            device="meta",
            dtype=w.dtype,
        ).to_empty(device=w.device)
        w_down, b_down, w_up, b_up = self._mean_experts()
        merged.down.weight.copy_(w_down)
        merged.down.bias.copy_(b_down)
        merged.up.weight.copy_(w_up)
        merged.up.bias.copy_(b_up)
        return merged.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, bottleneck={self.bottleneck}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, scale={self.scale}, init={self.init!r}"
        )


def adamix_consistency_loss(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """AdaMix's consistency regulariser: the symmetric KL divergence between the softmax
    distributions (over the last dimension) of two forward passes,

        p_a = softmax(logits_a), p_b = softmax(logits_b)
        loss = mean over the leading dimensions of [ KL(p_a || p_b) + KL(p_b || p_a) ]
             = mean of sum_c (p_a - p_b) * (log p_a - log p_b)

    computed in float32 (float64 if either input is float64) and returned as a 0-d tensor of that
    dtype; gradients flow to both inputs. It is zero when the two distributions are equal and
    positive otherwise; an empty batch gives 0.

    Use: run the same batch twice in training mode, the second pass inside ``adamix_pair`` so that
    every AdaMixAdapter routes it through other experts than the first (AdaMix's two passes of
    different adaptation modules, Wang et al. 2022, section 3.2), then::

        logits_a = model(batch)
        with peftkern.adamix_pair(model):
            logits_b = model(batch)
        loss = task_loss(logits_a, labels) + lam * adamix_consistency_loss(logits_a, logits_b)

    (the paper takes the task loss of one pass or of both; ``lam`` weighs the regulariser). Without
    the block the second pass draws its routes independently, and may repeat the first's.
    """
    for name, t in (("logits_a", logits_a), ("logits_b", logits_b)):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"adamix_consistency_loss: {name} must be a tensor; got {type(t).__name__} {t!r:.40}"
            )
        if not t.is_floating_point():
            raise TypeError(f"adamix_consistency_loss: {name} must be a floating-point tensor; got {t.dtype}")
        if t.dim() == 0 or t.shape[-1] == 0:
            raise ValueError(
                f"adamix_consistency_loss: {name} must have shape [..., classes] with classes >= 1; "
                f"got {list(t.shape)}"
            )
    if logits_a.shape != logits_b.shape:
        raise ValueError(
            f"adamix_consistency_loss: logits_a and logits_b must have the same shape; got "
            f"{list(logits_a.shape)} and {list(logits_b.shape)}"
        )
    if logits_a.device != logits_b.device:
        raise ValueError(
            f"adamix_consistency_loss: logits_b is on {logits_b.device} but logits_a is on {logits_a.device}"
        )
    dt = torch.float64 if torch.float64 in (logits_a.dtype, logits_b.dtype) else torch.float32
    log_a = torch.log_softmax(logits_a.to(dt), dim=-1)
    log_b = torch.log_softmax(logits_b.to(dt), dim=-1)
    per_row = ((log_a.exp() - log_b.exp()) * (log_a - log_b)).sum(-1)
    return per_row.sum() / max(per_row.numel(), 1)


@contextlib.contextmanager
def adamix_pair(model: nn.Module):
    """AdaMix's paired second pass (Wang et al. 2022, section 3.2: the consistency loss compares two
    passes through different adaptation modules)::

        logits_a = model(batch)                  # the first pass: independent routes
        with peftkern.adamix_pair(model):
            logits_b = model(batch)              # every adapter: other experts than in logits_a

    Inside the block, each training-mode forward of every ``AdaMixAdapter`` in ``model`` (the model
    itself included) draws both a down-projection expert and an up-projection expert other than the
    ones of the route it drew last before the block, ``(i, j) = last_route``: ``i2`` uniform over the
    E - 1 experts other than i, ``j2`` uniform over those other than j, independently, from torch's
    default CPU generator (so the two passes share no expert, and ``torch.manual_seed`` fixes both).
    A module called twice in the block draws both times against the same first route. Eval mode
    draws nothing, as always. Activation checkpointing's recompute of a paired pass (during backward,
    after the block) takes the same paired route: it restores the CPU generator, and the module
    recognises the state its paired draw started from. Outside the block routes are drawn as ever.

    Raises ValueError when ``model`` holds no AdaMixAdapter, when one has a single expert (no other
    route exists), or when one has no first route (``last_route`` is None: no training-mode forward
    since it was built, or its last forward was in eval mode); RuntimeError when the block is entered
    again for a module already in one (nested use). The flag is per module, set and cleared here.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"adamix_pair: model must be a torch.nn.Module; got {type(model).__name__}")
    mixtures: List[Tuple[str, AdaMixAdapter]] = [
        (n, m) for n, m in model.named_modules() if isinstance(m, AdaMixAdapter)
    ]
    if not mixtures:
        raise ValueError(f"adamix_pair: {type(model).__name__} holds no peftkern.nn.AdaMixAdapter")
    for n, m in mixtures:
        where = repr(n) if n else "the model"
        if m._pair_first is not None:
            raise RuntimeError(f"adamix_pair: the AdaMixAdapter {where} is in an adamix_pair block already")
        if m.num_experts == 1:
            raise ValueError(
                f"adamix_pair: the AdaMixAdapter {where} has num_experts=1, so no route differs from "
                "its first"
            )
        if m.last_route is None:
            raise ValueError(
                f"adamix_pair: the AdaMixAdapter {where} has no first route (last_route is None): run the "
                "first pass in training mode before the block"
            )
    try:
        for _, m in mixtures:
            m._pair_first = m.last_route
        yield
    finally:
        for _, m in mixtures:
            m._pair_first = None
