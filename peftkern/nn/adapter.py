"""peftkern.nn.Adapter: a bottleneck adapter module on the fused op."""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.adapter import ADAPTER_ACTIVATIONS, adapter, adapter_multi, adapter_stack
from . import _checks
from ._autocast import autocast_tensors

ADAPTER_INITS = ("houlsby", "lora")


class Adapter(nn.Module):
    """Bottleneck adapter ``out = residual + scale * up(act(down(x)))``, one fused op.

    ``forward(x, residual=None)``: the residual defaults to x (Houlsby / Pfeiffer); pass another
    tensor for a parallel adapter (AdaptFormer: the adapter reads the block input and its output is
    added to another branch).

    Parameters live in two ``nn.Linear`` holders, ``down`` (weight ``[bottleneck, d_model]``) and
    ``up`` (weight ``[d_model, bottleneck]``), so the state dict of an eager down/up adapter loads
    as is. Their ``forward`` is never called.

    init:
      ``"houlsby"``  near-identity (Houlsby et al. 2019): down weight ~ N(0, 0.01^2) truncated at
                     two standard deviations, up weight and both biases zero, so out == residual.
      ``"lora"``     down weight Kaiming-uniform (a = sqrt(5), as nn.Linear), up and biases zero.

    ``gate=True`` (UniPELT, Mao et al. 2022): a third holder ``gate`` (``nn.Linear(d_model, 1)``,
    its default init) scales the adapter's output per row by ``sigmoid(gate(x))`` of the adapter's
    input x: ``out = residual + scale * sigmoid(x @ w_g.T + b_g) * up(act(down(x)))``, one fused op.

    Under autocast the adapter computes in the autocast dtype, as nn.Linear would.
    """

    def __init__(
        self,
        d_model: int,
        bottleneck: int,
        *,
        activation: str = "gelu",
        scale: float = 1.0,
        init: str = "houlsby",
        gate: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        d_model, bottleneck = (
            _checks.dim("Adapter", "d_model", d_model),
            _checks.dim("Adapter", "bottleneck", bottleneck),
        )
        factory = _checks.factory("Adapter", device, dtype)
        if activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(f"Adapter: activation must be one of {ADAPTER_ACTIVATIONS}; got {activation!r}")
        if init not in ADAPTER_INITS:
            raise ValueError(f"Adapter: init must be one of {ADAPTER_INITS}; got {init!r}")
        if not isinstance(gate, bool):
            raise TypeError(f"Adapter: gate must be a bool; got {type(gate).__name__} {gate!r:.40}")
        self.d_model, self.bottleneck = d_model, bottleneck
        self.activation, self.scale, self.init = activation, float(scale), init
        self.down = nn.Linear(d_model, bottleneck, **factory)
        self.up = nn.Linear(bottleneck, d_model, **factory)
        self.gate = nn.Linear(d_model, 1, **factory) if gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "houlsby":
                nn.init.trunc_normal_(self.down.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
            else:
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        if self.gate is not None:
            self.gate.reset_parameters()

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        tensors = [x, self.down.weight, self.down.bias, self.up.weight, self.up.bias, residual]
        if self.gate is not None:
            tensors += [self.gate.weight, self.gate.bias]
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            tensors = [None if t is None else t.to(dt) for t in tensors]
        x, w_down, b_down, w_up, b_up, residual = tensors[:6]
        kw = {}
        if self.gate is not None:  # UniPELT: sigmoid(x @ w_g.T + b_g) per row
            kw["gate"] = torch.sigmoid(F.linear(x, tensors[6], tensors[7])).squeeze(-1)
        return adapter(
            x,
            w_down,
            b_down,
            w_up,
            b_up,
            activation=self.activation,
            scale=self.scale,
            residual=residual,
            **kw,
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, bottleneck={self.bottleneck}, activation={self.activation!r}, "
            f"scale={self.scale}, init={self.init!r}" + (", gate=True" if self.gate is not None else "")
        )


class PHMLinear(nn.Module):
    """A PHM layer's weight and bias (Zhang et al. 2021; Compacter's, Mahabadi et al. 2021)::

        weight = Σ_{i<n} kron(phm_rule[i], phm_left[i] @ phm_right[i]ᵀ)      [out, in]

    with ``phm_rule [n, n, n]`` (A_i; may be one Parameter tied across layers), ``phm_left
    [n, out/n, rank]`` (s_i), ``phm_right [n, in/n, rank]`` (t_i), ``bias [out]``. ``weight`` is built
    on each access (autograd flows to the factors); the holder's forward is never called: the
    adapter hands ``weight`` and ``bias`` to ``ops.adapter``.

    AdapterHub's PHMLayer computes ``x @ H``, ``H = Σ kron(rule_i, W_left_i W_right_i)`` ``[in, out]``;
    this is its transpose: ``phm_rule[i] = rule_iᵀ``, ``phm_left[i] = W_right_iᵀ``,
    ``phm_right[i] = W_left_i``. Init as AdapterHub's CompacterConfig: rule ~ N(0, phm_init_range²)
    (1e-4), each ``phm_left[i]`` / ``phm_right[i]`` Glorot-uniform, bias zero.
    """

    def __init__(self, in_features, out_features, phm_dim, phm_rank, *, rule=None, device=None, dtype=None):
        super().__init__()
        n = phm_dim
        if in_features % n or out_features % n:
            raise ValueError(
                f"PHMLinear: phm_dim ({n}) must divide in_features ({in_features}) and out_features "
                f"({out_features})"
            )
        factory = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.phm_dim, self.phm_rank = (
            in_features,
            out_features,
            n,
            phm_rank,
        )
        if rule is None:
            rule = nn.Parameter(torch.empty(n, n, n, **factory))
            with torch.no_grad():
                rule.normal_(0.0, PHM_INIT_RANGE)
        elif not isinstance(rule, nn.Parameter) or rule.shape != (n, n, n):
            raise ValueError(
                f"PHMLinear: rule must be a Parameter of shape [{n}, {n}, {n}]; got {rule!r:.60}"
            )
        self.phm_rule = rule
        self.phm_left = nn.Parameter(torch.empty(n, out_features // n, phm_rank, **factory))
        self.phm_right = nn.Parameter(torch.empty(n, in_features // n, phm_rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The factors and bias (the rule, maybe shared, keeps its values)."""
        with torch.no_grad():
            for f in (self.phm_left, self.phm_right):
                for i in range(self.phm_dim):
                    nn.init.xavier_uniform_(f[i])
            nn.init.zeros_(self.bias)

    @property
    def weight(self) -> Tensor:
        n, p, q = self.phm_dim, self.out_features // self.phm_dim, self.in_features // self.phm_dim
        blocks = torch.bmm(self.phm_left, self.phm_right.transpose(1, 2))  # s_i t_iᵀ [n, p, q]
        return torch.einsum("kab,kij->aibj", self.phm_rule, blocks).reshape(n * p, n * q)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, phm_dim={self.phm_dim}, "
            f"phm_rank={self.phm_rank}"
        )


PHM_INIT_RANGE = 1e-4  # AdapterHub's CompacterConfig phm_init_range (the rule's std)


class Compacter(Adapter):
    """Compacter (Mahabadi et al. 2021): an ``Adapter`` whose down ``[bottleneck, d_model]`` and up
    ``[d_model, bottleneck]`` weights are PHM layers (``PHMLinear``: ``Σ_i kron(A_i, s_i t_iᵀ)``, rank
    ``phm_rank``), each with its own bias. ``rule``: a ``[phm_dim, phm_dim, phm_dim]`` Parameter shared
    by the down and up layers and, passed to several Compacters, across layers (AdapterHub's
    ``shared_phm_rule``); None: each PHM layer its own rule (AdapterHub's unshared one).

    Weights built per step, then the fused ``ops.adapter`` as any adapter (T rows, d = d_model,
    m = bottleneck, n = phm_dim): building costs ~2·n·m·d flops and writes 2·m·d elements per layer
    (for d = 4096, m = 128, n = 4: 4 MFLOP, 2 MiB in bf16), against the adapter's 4·T·d·m flops
    and ≥ 2·T·d elements read and written (T = 16384: 34 GFLOP, 256 MiB) — under 0.1 %, and the
    built weights are what the fused kernel reads anyway. Computing without building them
    (``x`` through ``Σ_i A_i ⊗ s_i t_iᵀ`` as reshaped GEMMs, as KronA does) would trade that tiny
    cost for n unfused small GEMMs per projection, their intermediates ``[T, ...]`` in memory, and no
    fused adapter kernel: building wins. ``to_adapter()`` gives the plain ``Adapter`` of the built
    weights (merge). ``init`` is Compacter's (``PHMLinear``); the up projection starts near zero,
    not at zero (the rule's 1e-4), so the adapter starts near, not at, the identity.
    """

    def __init__(
        self,
        d_model: int,
        bottleneck: int,
        *,
        phm_dim: int = 4,
        phm_rank: int = 1,
        rule: Optional[nn.Parameter] = None,
        activation: str = "gelu",
        scale: float = 1.0,
        gate: bool = False,
        device=None,
        dtype=None,
    ):
        nn.Module.__init__(self)
        d_model = _checks.dim("Compacter", "d_model", d_model)
        bottleneck = _checks.dim("Compacter", "bottleneck", bottleneck)
        phm_dim = _checks.dim("Compacter", "phm_dim", phm_dim)
        phm_rank = _checks.dim("Compacter", "phm_rank", phm_rank)
        factory = _checks.factory("Compacter", device, dtype)
        if activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(
                f"Compacter: activation must be one of {ADAPTER_ACTIVATIONS}; got {activation!r}"
            )
        if not isinstance(gate, bool):
            raise TypeError(f"Compacter: gate must be a bool; got {type(gate).__name__} {gate!r:.40}")
        if d_model % phm_dim or bottleneck % phm_dim:
            raise ValueError(
                f"Compacter: phm_dim ({phm_dim}) must divide d_model ({d_model}) and the bottleneck "
                f"({bottleneck})"
            )
        self.d_model, self.bottleneck, self.phm_dim, self.phm_rank = d_model, bottleneck, phm_dim, phm_rank
        self.activation, self.scale, self.init = activation, float(scale), "compacter"
        self.down = PHMLinear(d_model, bottleneck, phm_dim, phm_rank, rule=rule, **factory)
        self.up = PHMLinear(bottleneck, d_model, phm_dim, phm_rank, rule=rule, **factory)
        self.gate = nn.Linear(d_model, 1, **factory) if gate else None

    def reset_parameters(self) -> None:
        self.down.reset_parameters()
        self.up.reset_parameters()
        if self.gate is not None:
            self.gate.reset_parameters()

    @torch.no_grad()
    def to_adapter(self) -> Adapter:
        """A plain ``Adapter`` holding the built weights (copied), the same biases, scale and gate."""
        w = self.down.phm_left
        a = Adapter(
            self.d_model,
            self.bottleneck,
            activation=self.activation,
            scale=self.scale,
            gate=self.gate is not None,
            device=w.device,
            dtype=w.dtype,
        )
        a.down.weight.copy_(self.down.weight)
        a.down.bias.copy_(self.down.bias)
        a.up.weight.copy_(self.up.weight)
        a.up.bias.copy_(self.up.bias)
        if self.gate is not None:
            a.gate.load_state_dict(self.gate.state_dict())
        return a.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, bottleneck={self.bottleneck}, phm_dim={self.phm_dim}, "
            f"phm_rank={self.phm_rank}, activation={self.activation!r}, scale={self.scale}"
            + (", gate=True" if self.gate is not None else "")
        )


def _check_init(module: str, activation: str, init: str) -> None:
    if activation not in ADAPTER_ACTIVATIONS:
        raise ValueError(f"{module}: activation must be one of {ADAPTER_ACTIVATIONS}; got {activation!r}")
    if init not in ADAPTER_INITS:
        raise ValueError(f"{module}: init must be one of {ADAPTER_INITS}; got {init!r}")


def _check_indices(module: str, indices, n: int) -> list:
    """A non-empty list of distinct ints in [0, n)."""
    if isinstance(indices, Tensor):
        indices = indices.tolist()
    if not isinstance(indices, (list, tuple)) or not indices:
        raise TypeError(f"{module}.keep: indices must be a non-empty sequence of ints; got {indices!r:.60}")
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{module}.keep: indices must be ints; got {type(i).__name__} {i!r:.40}")
        if not 0 <= i < n:
            raise ValueError(f"{module}.keep: index {i} is out of range for {n} adapters")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{module}.keep: indices must be distinct; got {list(indices)}")
    return list(indices)


# a MultiAdapter's stacked parameter -> the Adapter parameter it stacks
STACKED_PARAMS = {
    "down_weight": "down.weight",
    "down_bias": "down.bias",
    "up_weight": "up.weight",
    "up_bias": "up.bias",
}


class MultiAdapter(nn.Module):
    """``num_adapters`` bottleneck adapters over one batch, each token its own (one model serving many
    tasks): ``forward(x, adapter_ids, residual=None)`` with ``ops.adapter_multi``.

    ``adapter_ids``: one id per token (shape ``x.shape[:-1]``, or flattened), or one per sample
    (shape ``x.shape[:1]`` for x of 3 or more dimensions, broadcast over the sequence); -1 = no
    adapter (the token's output is its residual). Parameters are stacked over the adapters:
    ``down_weight [L, r, d]``, ``down_bias [L, r]``, ``up_weight [L, d, r]``, ``up_bias [L, d]``; each
    adapter starts as ``Adapter``'s ``init``. ``from_adapters`` stacks trained ``Adapter`` modules,
    ``adapter(i)`` gives one back as an ``Adapter``.
    """

    def __init__(
        self,
        d_model: int,
        bottleneck: int,
        num_adapters: int,
        *,
        activation: str = "gelu",
        scale: float = 1.0,
        init: str = "houlsby",
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        d_model = _checks.dim(name, "d_model", d_model)
        bottleneck = _checks.dim(name, "bottleneck", bottleneck)
        num_adapters = _checks.dim(name, "num_adapters", num_adapters)
        factory = _checks.factory(name, device, dtype)
        _check_init(name, activation, init)
        self.d_model, self.bottleneck, self.num_adapters = d_model, bottleneck, num_adapters
        self.activation, self.scale, self.init = activation, float(scale), init
        L, r, d = num_adapters, bottleneck, d_model
        self.down_weight = nn.Parameter(torch.empty(L, r, d, **factory))
        self.down_bias = nn.Parameter(torch.empty(L, r, **factory))
        self.up_weight = nn.Parameter(torch.empty(L, d, r, **factory))
        self.up_bias = nn.Parameter(torch.empty(L, d, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for w in self.down_weight:
                if self.init == "houlsby":
                    nn.init.trunc_normal_(w, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                else:
                    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            for t in (self.down_bias, self.up_weight, self.up_bias):
                nn.init.zeros_(t)

    @classmethod
    def from_adapters(cls, adapters) -> "MultiAdapter":
        """The adapters' weights stacked (copied) into one module; they must share d_model,
        bottleneck, activation, scale, dtype and device."""
        adapters = list(adapters)
        if not adapters or not all(isinstance(a, Adapter) for a in adapters):
            raise TypeError(f"{cls.__name__}.from_adapters: adapters must be a non-empty sequence of Adapter")
        gated = [i for i, a in enumerate(adapters) if a.gate is not None]
        if gated:
            raise ValueError(
                f"{cls.__name__}.from_adapters: adapters {gated} are gated (UniPELT); a stack holds no gates"
            )
        first = adapters[0]
        key = (first.d_model, first.bottleneck, first.activation, first.scale)
        for i, a in enumerate(adapters):
            if (a.d_model, a.bottleneck, a.activation, a.scale) != key:
                raise ValueError(
                    f"{cls.__name__}.from_adapters: adapter {i} has (d_model, bottleneck, activation, "
                    f"scale) = {(a.d_model, a.bottleneck, a.activation, a.scale)}, adapter 0 has {key}"
                )
        w = first.down.weight
        new = cls(
            first.d_model,
            first.bottleneck,
            len(adapters),
            activation=first.activation,
            scale=first.scale,
            init=first.init,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            for stacked, name in STACKED_PARAMS.items():
                new.get_parameter(stacked).copy_(torch.stack([a.get_parameter(name) for a in adapters]))
        return new

    def adapter(self, i: int) -> Adapter:
        """Adapter i as a plain ``Adapter`` (copied weights)."""
        i = _checks.dim(type(self).__name__, "i", i, minimum=0)
        if i >= self.num_adapters:
            raise ValueError(
                f"{type(self).__name__}.adapter: i must be < num_adapters = {self.num_adapters}; got {i}"
            )
        w = self.down_weight
        a = Adapter(
            self.d_model,
            self.bottleneck,
            activation=self.activation,
            scale=self.scale,
            init=self.init,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            for stacked, name in STACKED_PARAMS.items():
                a.get_parameter(name).copy_(self.get_parameter(stacked)[i])
        return a

    @torch.no_grad()
    def keep(self, indices) -> None:
        """Keeps adapters ``indices`` (distinct, in that order) and drops the rest, in place: each
        stacked parameter becomes a new Parameter of those rows (its requires_grad kept), so an
        optimizer built before holds the old ones. ``num_adapters`` becomes ``len(indices)``."""
        indices = _check_indices(type(self).__name__, indices, self.num_adapters)
        index = torch.tensor(indices, dtype=torch.int64, device=self.down_weight.device)
        for stacked in STACKED_PARAMS:
            old = self.get_parameter(stacked)
            setattr(self, stacked, nn.Parameter(old.index_select(0, index), requires_grad=old.requires_grad))
        self.num_adapters = len(indices)

    def forward(self, x: Tensor, adapter_ids: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if not isinstance(adapter_ids, Tensor):
            raise TypeError(
                f"{type(self).__name__}: adapter_ids must be a tensor; got {type(adapter_ids).__name__}"
            )
        if isinstance(x, Tensor) and x.dim() >= 3 and adapter_ids.shape == x.shape[:1]:
            adapter_ids = adapter_ids[:, None].expand(x.shape[:-1])  # one id per sample
        if isinstance(x, Tensor) and x.dim() >= 1 and adapter_ids.shape == x.shape[:-1]:
            adapter_ids = adapter_ids.reshape(-1)
        x, w_down, b_down, w_up, b_up, residual = autocast_tensors(
            x, [x, self.down_weight, self.down_bias, self.up_weight, self.up_bias, residual]
        )
        return adapter_multi(
            x,
            w_down,
            b_down,
            w_up,
            b_up,
            adapter_ids,
            activation=self.activation,
            scale=self.scale,
            residual=residual,
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, bottleneck={self.bottleneck}, num_adapters={self.num_adapters}, "
            f"activation={self.activation!r}, scale={self.scale}, init={self.init!r}"
        )


FUSION_VALUE_INITS = ("identity", "normal")


class AdapterFusion(nn.Module):
    """AdapterFusion (Pfeiffer et al. 2021): attention over the outputs of N task adapters::

        a[..., n, :] = scale * up_n(act(down_n(x)))                    # ops.adapter_stack, x read once
        q = query(x);  k_n = key(a_n)                                  # nn.Linear (cuBLAS)
        p = softmax_n(q . k_n / temperature)                           # over the adapters, in float32
        out = residual + value(sum_n p_n a_n)                          # residual defaults to x

    as AdapterHub computes it (``value`` applied to the mix: the same as to each adapter's output,
    since it is linear and has no bias). ``query`` / ``key`` / ``value`` False drop that projection
    (identity). Initialisation: query and key ~ N(0, 0.02^2) with zero bias (BERT's); value the
    identity (``value_init="identity"``: the fusion starts as the attention-weighted mix of the
    adapters' outputs) or N(0, 0.02^2) (``"normal"``). The key's bias gets no gradient in exact
    arithmetic (it adds q . b_key to every adapter's score alike), as in AdapterHub.

    The adapters live in ``self.adapters`` (a ``MultiAdapter``: stacked ``down_weight`` etc.). The
    two-stage recipe: train the adapters (one task each), build the fusion with ``from_adapters``,
    then train only the fusion: ``fusion.adapters.requires_grad_(False)`` (``from_adapters`` does
    this by default).

    Pruning (AdapterDrop, Rücklé et al. 2021): with ``record_weights = True`` each forward keeps
    its attention weights p ``[..., N]`` (detached) in ``last_weights``; off by default, so the
    normal forward stores nothing. ``keep(indices)`` then drops the other adapters in place: the
    kept adapters' weights and query / key / value are unchanged, and the softmax runs over the
    kept adapters only (``adapter_stack`` over N = len(indices)).
    """

    def __init__(
        self,
        d_model: int,
        num_adapters: int,
        bottleneck: int,
        *,
        activation: str = "gelu",
        scale: float = 1.0,
        init: str = "houlsby",
        query: bool = True,
        key: bool = True,
        value: bool = True,
        value_init: str = "identity",
        temperature: float = 1.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        name = type(self).__name__
        for flag, v in (("query", query), ("key", key), ("value", value)):
            if not isinstance(v, bool):
                raise TypeError(f"{name}: {flag} must be a bool; got {type(v).__name__} {v!r:.40}")
        if value_init not in FUSION_VALUE_INITS:
            raise ValueError(
                f"{name}: value_init must be one of {FUSION_VALUE_INITS}; got {value_init!r:.40}"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"{name}: temperature must be a float; got {type(temperature).__name__}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"{name}: temperature must be a finite positive float; got {temperature}")
        self.adapters = MultiAdapter(
            d_model,
            bottleneck,
            num_adapters,
            activation=activation,
            scale=scale,
            init=init,
            device=device,
            dtype=dtype,
        )
        factory = _checks.factory(name, device, dtype)
        self.d_model, self.num_adapters = self.adapters.d_model, self.adapters.num_adapters
        self.value_init, self.temperature = value_init, float(temperature)
        self.query = nn.Linear(d_model, d_model, **factory) if query else None
        self.key = nn.Linear(d_model, d_model, **factory) if key else None
        self.value = nn.Linear(d_model, d_model, bias=False, **factory) if value else None
        self.record_weights, self.last_weights = False, None  # pruning's statistics, on request
        self.reset_fusion_parameters()

    def reset_fusion_parameters(self) -> None:
        with torch.no_grad():
            for lin in (self.query, self.key):
                if lin is not None:
                    nn.init.normal_(lin.weight, std=0.02)
                    nn.init.zeros_(lin.bias)
            if self.value is not None:
                if self.value_init == "identity":
                    self.value.weight.copy_(torch.eye(self.d_model))
                else:
                    nn.init.normal_(self.value.weight, std=0.02)

    @classmethod
    def from_adapters(cls, adapters, *, freeze_adapters: bool = True, **kwargs) -> "AdapterFusion":
        """A fusion over trained ``Adapter`` modules (their weights copied); with
        ``freeze_adapters`` only the fusion's projections train (AdapterFusion's second stage)."""
        stacked = MultiAdapter.from_adapters(adapters)
        w = stacked.down_weight
        fusion = cls(
            stacked.d_model,
            stacked.num_adapters,
            stacked.bottleneck,
            activation=stacked.activation,
            scale=stacked.scale,
            init=stacked.init,
            device=w.device,
            dtype=w.dtype,
            **kwargs,
        )
        fusion.adapters.load_state_dict(stacked.state_dict())
        fusion.adapters.requires_grad_(not freeze_adapters)
        return fusion

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        m = self.adapters
        x, w_down, b_down, w_up, b_up, res = autocast_tensors(
            x, [x, m.down_weight, m.down_bias, m.up_weight, m.up_bias, residual]
        )
        a = adapter_stack(
            x, w_down, b_down, w_up, b_up, activation=m.activation, scale=m.scale
        )  # [..., N, d]
        q = x if self.query is None else self.query(x)
        k = a if self.key is None else self.key(a)
        scores = torch.matmul(k, q.unsqueeze(-1)).squeeze(-1)  # [..., N]
        math_dtype = torch.promote_types(scores.dtype, torch.float32)  # float32, float64 for float64
        p = torch.softmax(scores.to(math_dtype) / self.temperature, dim=-1)
        if self.record_weights:
            self.last_weights = p.detach()
        p = p.to(a.dtype)
        mixed = torch.matmul(p.unsqueeze(-2), a).squeeze(-2)  # [..., d]
        if self.value is not None:
            mixed = self.value(mixed)
        return (x if res is None else res) + mixed

    def keep(self, indices) -> None:
        """Keeps adapters ``indices`` (distinct; the stack's new order) and drops the rest, in place
        (``MultiAdapter.keep``); the query, key and value stay as they are. Clears
        ``last_weights``."""
        self.adapters.keep(_check_indices(type(self).__name__, indices, self.num_adapters))
        self.num_adapters, self.last_weights = self.adapters.num_adapters, None

    def extra_repr(self) -> str:
        flags = [n for n in ("query", "key", "value") if getattr(self, n) is not None]
        return f"d_model={self.d_model}, num_adapters={self.num_adapters}, projections={flags}, " + (
            f"value_init={self.value_init!r}, temperature={self.temperature}"
        )
