"""peftkern.nn.AdaptedLinear: an nn.Linear holding named LoRA updates and masks (many tasks, one weight).

AdaLoRA (Zhang et al. 2023, ``add_adalora``) is a LoRA variant here: its update is Hugging Face peft's
SVDLinear's, ``(dropout(x) @ (lora_A * lora_E).T @ lora_B.T) * lora_alpha / (ranknum + 1e-5)``, computed
by folding the singular values into A's rows (``A' = lora_A * lora_E``, an ``[r, in]`` product per call)
and running ``(A', lora_B)`` through the same fused LoRA paths as any LoRA.
"""

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.lora import lora_linear, lora_linear_multi
from ..ops.mask import masked_linear, masked_linear_multi, pack_mask
from . import _checks, routing
from ._autocast import autocast_tensors


class AdaptedLinear(nn.Linear):
    """``nn.Linear`` with any number of named adapters on its frozen weight: LoRA updates
    (``lora_A[name] [r, in]``, ``lora_B[name] [out, r]``; a gated LoRA, UniPELT's, also
    ``lora_gate_weight[name] [1, in]`` and ``lora_gate_bias[name] [1]``) and masks
    (``scores[name] [out, in]``).

    ``AdaptedLinear.adapt(linear)`` turns an ``nn.Linear`` into one in place: the same object, the same
    ``weight`` and ``bias`` Parameters, hooks and children, so the model's parameter names and
    the hooks others put there stay. ``restore()`` turns it back once it holds no adapter.

    What a call computes (``routing.resolve``): every row through the same names (the ``active`` ones,
    or one task for the whole batch) or, in a mixed batch, each row through its sample's:

    - one LoRA: ``ops.lora_linear`` (dropout fused); several together: one ``lora_linear`` over the
      ranks concatenated (each scaling folded into its B; one dropout mask when they share p,
      else an eager sum, slower);
    - a gated LoRA (``add_lora(..., gate=True)``): ``lora_linear(..., gate=sigmoid(x @ w_g.T + b_g))``
      when it applies alone; with other LoRAs, the base product plus each update eagerly (slower);
      never in a mixed batch (not routed per sample yet) and never merged (the gate reads the input);
    - one mask: ``ops.masked_linear``; a mask with LoRAs: the masked product plus the eager updates;
    - mixed LoRAs: ``ops.lora_linear_multi`` (ranks zero-padded to the largest; rows of no LoRA
      get the base), except in training with dropout, where each LoRA adds its rows' update eagerly;
    - mixed masks: ``ops.masked_linear_multi`` on the rows of a masked task (packed bits, cached
      until the scores change) when nothing needs a gradient; else one ``masked_linear`` per mask
      task on its rows (each mask's gradient is an [out, in] product of its own rows anyway).

    AdaLoRA (``add_adalora``: also ``lora_E[name] [r, 1]`` and the constant ``ranknum[name] [1]``) is a
    LoRA whose A is ``lora_A * lora_E``, in every path above. Pruned ranks cost nothing where leaving
    them out changes no value and no gradient: the kept rows of A' and columns of B are gathered
    (``index_select`` with an index tensor kept on the device, no host sync per call)

    - once the rank pattern is final (``set_rank_pattern(name, keep, final=True)``, which
      ``peftkern.update_ranks`` calls from step ``total_step - tfinal`` on, when peft masks every step
      with the fixed pattern): a pruned E is zero at every forward then, so its rank adds nothing and
      A and B get the same (zero) gradients there; only the pruned E rows get a zero gradient instead
      of peft's, which peft's next masking discards (it matters to gradient-norm clipping alone);
    - when no gradient is needed (no_grad / inference / eval of a loaded checkpoint): the ranks whose
      E is exactly zero are left out, found with one host read each time E changes (cached on its
      version), never under torch.compile (it computes every rank there).

    Before the final pattern every rank computes in training, since peft's pruned E train again
    between two maskings.
    """

    @classmethod
    def adapt(cls, linear: nn.Linear) -> "AdaptedLinear":
        if type(linear) is cls:
            return linear
        if type(linear) is not nn.Linear:
            raise TypeError(f"AdaptedLinear.adapt: expects an nn.Linear; got {type(linear).__name__}")
        linear.__class__ = cls
        linear.lora_A, linear.lora_B, linear.scores = (
            nn.ParameterDict(),
            nn.ParameterDict(),
            nn.ParameterDict(),
        )
        linear.lora_gate_weight, linear.lora_gate_bias = nn.ParameterDict(), nn.ParameterDict()
        for held in (
            linear.lora_A,
            linear.lora_B,
            linear.scores,
            linear.lora_gate_weight,
            linear.lora_gate_bias,
        ):
            held._peftkern_container = True  # what model surgery must not target
            held.train(linear.training)
        linear.lora_settings = {}  # name -> (scaling, dropout_p)
        linear.mask_thresholds = {}  # name -> threshold
        linear._peftkern_active = getattr(linear, "_peftkern_active", ())
        linear._packed = {}
        return linear

    def restore(self) -> None:
        """Back to a plain nn.Linear (no adapter left)."""
        if self.names():
            raise ValueError(f"AdaptedLinear.restore: it still holds {self.names()}")
        for attr in ("lora_A", "lora_B", "scores", "lora_gate_weight", "lora_gate_bias"):
            delattr(self, attr)
        for attr in ("lora_E", "ranknum"):  # AdaLoRA's, created by add_adalora
            if hasattr(self, attr):
                delattr(self, attr)
        # _peftkern_active stays: other methods on this module (BitFit, copies) read it
        for attr in (
            "lora_settings",
            "mask_thresholds",
            "_packed",
            "_scalings_cache",
            "_peftkern_last_route",
            "_adalora_kept",
            "_adalora_nonzero",
        ):
            self.__dict__.pop(attr, None)
        self.__class__ = nn.Linear

    def names(self) -> List[str]:
        return [*self.lora_A.keys(), *self.scores.keys()]

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"AdaptedLinear: name must be a non-empty string without '.'; got {name!r:.40}")
        if name in self.names():
            raise ValueError(f"AdaptedLinear: it already holds an adapter named {name!r}")

    def add_lora(self, name, r, *, lora_alpha=None, lora_dropout=0.0, use_rslora=False, gate=False) -> None:
        """LoRA as peft initialises it: A Kaiming-uniform (a = sqrt(5)), B zero; on the weight's
        device and dtype. scaling = lora_alpha / r (or / sqrt(r)), lora_alpha defaulting to r.
        ``gate``: UniPELT's gated LoRA, the update scaled per row by ``sigmoid(x @ w_g.T + b_g)``
        (w_g ``[1, in]`` and b_g ``[1]`` initialised as ``nn.Linear(in, 1)``'s)."""
        self._check_new(name)
        if not isinstance(gate, bool):
            raise TypeError(f"AdaptedLinear: gate must be a bool; got {gate!r:.40}")
        r = _checks.dim("AdaptedLinear", "r", r)
        p = _checks.probability("AdaptedLinear", "lora_dropout", lora_dropout)
        alpha = float(r if lora_alpha is None else lora_alpha)
        w = self.weight
        A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        with torch.no_grad():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = A
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        self.lora_settings[name] = (alpha / (math.sqrt(r) if use_rslora else r), float(p))
        if gate:
            g = nn.Linear(self.in_features, 1, device=w.device, dtype=w.dtype)  # its init, then its tensors
            self.lora_gate_weight[name] = nn.Parameter(g.weight.detach())
            self.lora_gate_bias[name] = nn.Parameter(g.bias.detach())

    def add_adalora(self, name, r, *, lora_alpha=8.0, lora_dropout=0.0) -> None:
        """AdaLoRA's SVD-form LoRA, as peft's SVDLinear initialises it: ``lora_A`` (Q ``[r, in]``) and
        ``lora_B`` (P ``[out, r]``) normal(0, 0.02), ``lora_E`` (Λ ``[r, 1]``) zero, ``ranknum[name]`` a
        frozen ``[1]`` tensor holding r; on the weight's device and dtype. The update is
        ``(dropout(x) @ (A * E).T @ B.T) * alpha / (ranknum + 1e-5)``, alpha = lora_alpha when > 0,
        else r (peft's rule); ranknum stays r (peft keeps it through its resizes), so the scaling is
        fixed at creation."""
        self._check_new(name)
        r = _checks.dim("AdaptedLinear", "r", r)
        p = _checks.probability("AdaptedLinear", "lora_dropout", lora_dropout)
        if (
            isinstance(lora_alpha, bool)
            or not isinstance(lora_alpha, (int, float))
            or not math.isfinite(lora_alpha)
        ):
            raise TypeError(f"AdaptedLinear: lora_alpha must be a finite float; got {lora_alpha!r:.40}")
        for attr in ("lora_E", "ranknum"):
            if not hasattr(self, attr):
                held = nn.ParameterDict()
                held._peftkern_container = True
                self.add_module(attr, held.train(self.training))
        w = self.weight
        A = torch.empty(r, self.in_features, device=w.device, dtype=w.dtype)
        B = torch.empty(self.out_features, r, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            nn.init.normal_(A, mean=0.0, std=0.02)
            nn.init.normal_(B, mean=0.0, std=0.02)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, device=w.device, dtype=w.dtype))
        self.lora_B[name] = nn.Parameter(B)
        self.ranknum[name] = nn.Parameter(torch.full((1,), float(r), device=w.device), requires_grad=False)
        alpha = float(lora_alpha) if lora_alpha > 0 else float(r)
        self.lora_settings[name] = (alpha / (float(r) + 1e-5), float(p))

    def is_adalora(self, name: str) -> bool:
        """Whether LoRA `name` is an AdaLoRA (``add_adalora``)."""
        held = self.__dict__.get("_modules", {}).get("lora_E")
        return held is not None and name in held

    def set_rank_pattern(self, name: str, keep, final: bool) -> None:
        """AdaLoRA `name`'s kept ranks: `keep` a bool tensor ``[r]`` (or None: all). With ``final``, the
        forward computes only those ranks from now on, in training too (the caller zeroes the pruned E
        before every forward, as peft's fixed pattern does); without it (or with None) a final pattern
        set before is dropped and every rank computes again wherever a gradient is needed."""
        if not self.is_adalora(name):
            raise ValueError(f"AdaptedLinear.set_rank_pattern: no AdaLoRA named {name!r} here")
        kept = self.__dict__.setdefault("_adalora_kept", {})
        if keep is None or not final:
            kept.pop(name, None)
            return
        r = self.lora_E[name].shape[0]
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_E[name].device).reshape(-1)
        if keep.numel() != r:
            raise ValueError(f"AdaptedLinear.set_rank_pattern: keep has {keep.numel()} entries for r = {r}")
        kept[name] = self._kept_index(keep)

    @staticmethod
    def _kept_index(keep: Tensor):
        idx = torch.nonzero(keep).reshape(-1)  # one host read, when the pattern changes
        if idx.numel() == keep.numel():
            return None
        # a layer pruned to rank 0 keeps one rank whose E is zero: it adds exactly 0
        return idx if idx.numel() else torch.zeros(1, dtype=torch.int64, device=keep.device)

    def _kept_ranks(self, name: str, like: Tensor):
        """The rank indices AdaLoRA `name` computes in this call (None: all), see the class docstring."""
        final = self.__dict__.get("_adalora_kept", {})
        if name in final:
            return final[name]
        if torch.compiler.is_compiling():  # the zero-E search reads the host: every rank
            return None
        A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (like, A, E, B)):
            return None
        cache = self.__dict__.setdefault("_adalora_nonzero", {})
        key = (E._version, E.data_ptr(), E.device, E.shape)
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            hit = (key, self._kept_index(E.detach().reshape(-1) != 0))
            cache[name] = hit
        return hit[1]

    def add_mask(self, name, *, threshold, score_init) -> None:
        """Real-valued float32 scores, all at score_init; the mask is scores > threshold."""
        self._check_new(name)
        self.scores[name] = nn.Parameter(
            torch.full(self.weight.shape, float(score_init), device=self.weight.device)
        )
        self.mask_thresholds[name] = float(threshold)

    def remove(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B, self.scores, self.lora_gate_weight, self.lora_gate_bias):
            if name in d:
                del d[name]
        for attr in ("lora_E", "ranknum"):
            held = getattr(self, attr, None)
            if held is not None and name in held:
                del held[name]
            if held is not None and not len(held):
                delattr(self, attr)
        for cache in ("_adalora_kept", "_adalora_nonzero"):
            self.__dict__.get(cache, {}).pop(name, None)
        self.lora_settings.pop(name, None)
        self.mask_thresholds.pop(name, None)
        self._packed.pop(name, None)
        self._peftkern_active = tuple(n for n in self._peftkern_active if n != name)

    # -- what the weights become -------------------------------------------------------------

    def lora_delta(self, name: str) -> Tensor:
        """scaling * B @ A in float32 (detached); AdaLoRA: scaling * B @ (A * E)."""
        s = self.lora_settings[name][0]
        A = self.lora_A[name].detach().float()
        if self.is_adalora(name):
            A = A * self.lora_E[name].detach().float()
        return (self.lora_B[name].detach().float() @ A) * s

    @torch.no_grad()
    def mask(self, name: str) -> Tensor:
        return self.scores[name].float() > self.mask_thresholds[name]

    def gated(self, name: str) -> bool:
        """Whether LoRA `name` is gated (UniPELT)."""
        return name in self.lora_gate_weight

    def _gate(self, name: str, x: Tensor) -> Tensor:
        """``sigmoid(x @ w_g.T + b_g)``, shape ``x.shape[:-1]``, x's dtype."""
        w, b = autocast_tensors(x, [self.lora_gate_weight[name], self.lora_gate_bias[name]])
        return torch.sigmoid(F.linear(x, w, b)).squeeze(-1)

    @torch.no_grad()
    def merged_weight(self, names) -> Tensor:
        """A new tensor: the weight with `names` applied (masks first, then LoRA updates, in float32).
        A gated LoRA cannot fold into a weight (its gate reads the input): a ValueError."""
        gated = [n for n in names if n in self.lora_A and self.gated(n)]
        if gated:
            raise ValueError(
                f"AdaptedLinear: the gated LoRA {gated} cannot merge into the weight: its gate depends on "
                "the input"
            )
        w = self.weight.float()
        for n in names:
            if n in self.scores:
                w = w * self.mask(n)
        for n in names:
            if n in self.lora_A:
                w = w + self.lora_delta(n)
        return w.to(self.weight.dtype)

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        names, route = routing.resolve(self, self.names(), self._peftkern_active)
        if route is not None:
            return self._mixed(x, route)
        loras = [n for n in names if n in self.lora_A]
        masks = [n for n in names if n in self.scores]
        if len(masks) > 1:
            raise ValueError(f"AdaptedLinear: masks {masks} cannot apply together on one weight")
        x, weight, bias = autocast_tensors(x, [x, self.weight, self.bias])
        if masks:
            scores = self.scores[masks[0]]
            scores = scores if scores.dtype in (torch.float32, weight.dtype) else scores.float()
            out = masked_linear(x, weight, bias, scores, threshold=self.mask_thresholds[masks[0]])
            return out + self._eager_updates(x, loras) if loras else out
        if not loras:
            return F.linear(x, weight, bias)
        if len(loras) == 1 and self.gated(loras[0]):  # UniPELT: one gated op
            n = loras[0]
            A, B = self._factors(n, x)
            s, p = self.lora_settings[n]
            gate = self._gate(n, x)
            return lora_linear(
                x, weight, bias, A, B, scaling=s, dropout_p=p, training=self.training, gate=gate
            )
        ps = {self.lora_settings[n][1] for n in loras}
        if len(ps) > 1 or any(self.gated(n) for n in loras):  # each its own mask or gate, eagerly
            return F.linear(x, weight, bias) + self._eager_updates(x, loras)
        A, B, scaling = self._together(loras, x)
        return lora_linear(x, weight, bias, A, B, scaling=scaling, dropout_p=ps.pop(), training=self.training)

    def _factors(self, name, like):
        if self.is_adalora(name):  # Λ folded into A's rows; only the ranks that can contribute
            A, B = self.lora_A[name] * self.lora_E[name], self.lora_B[name]
            kept = self._kept_ranks(name, like)
            if kept is not None:
                kept = kept.to(A.device)  # no copy unless the layer moved since the pattern was set
                A, B = A.index_select(0, kept), B.index_select(1, kept)
            A, B = autocast_tensors(like, [A, B])
            return A, B
        A, B = autocast_tensors(like, [self.lora_A[name], self.lora_B[name]])
        return A, B

    def _together(self, loras, x):
        if len(loras) == 1:
            A, B = self._factors(loras[0], x)
            return A, B, self.lora_settings[loras[0]][0]
        pairs = [self._factors(n, x) for n in loras]
        A = torch.cat([a for a, _ in pairs])
        B = torch.cat([b * self.lora_settings[n][0] for n, (_, b) in zip(loras, pairs)], dim=1)
        return A, B, 1.0

    def _eager_updates(self, x, loras):
        out = 0
        for n in loras:
            A, B = self._factors(n, x)
            s, p = self.lora_settings[n]
            h = F.dropout(x, p, self.training) if p > 0 else x
            update = s * F.linear(F.linear(h, A), B)
            out = out + (self._gate(n, x).unsqueeze(-1) * update if self.gated(n) else update)
        return out

    def _mixed(self, x: Tensor, route: routing.SampleRoute) -> Tensor:
        who = "AdaptedLinear"
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        x2, weight, bias = autocast_tensors(x2, [x2, self.weight, self.bias])
        loras = [n for n in self.lora_A.keys() if any(n in s for s in route.samples)]
        masks = [n for n in self.scores.keys() if any(n in s for s in route.samples)]
        gated = [n for n in loras if self.gated(n)]
        if gated:  # the model refuses such a batch before it runs (inject's sample check)
            raise ValueError(
                f"{who}: gated (UniPELT) LoRA {gated} is not routed per sample yet; give every sample the "
                "same adapters"
            )
        if not loras:
            out = F.linear(x2, weight, bias)
        elif self.training and torch.is_grad_enabled() and any(self.lora_settings[n][1] > 0 for n in loras):
            out = F.linear(x2, weight, bias)  # dropout in training: each LoRA's rows, eagerly
            for n in loras:
                idx = route.rows(n, rows, x.device, who)
                out = out.index_add(0, idx, self._eager_updates(x2.index_select(0, idx), [n]))
        else:
            ids = route.ids(loras, rows, x.device, who)
            pairs = [self._factors(n, x2) for n in loras]
            r = max(a.shape[0] for a, _ in pairs)
            A = torch.stack([F.pad(a, (0, 0, 0, r - a.shape[0])) for a, _ in pairs])
            B = torch.stack([F.pad(b, (0, r - b.shape[1])) for _, b in pairs])
            scalings = self._scalings(tuple(loras), x.device)
            out = lora_linear_multi(x2, weight, bias, A, B, ids, scalings=scalings)
        if masks:
            out = self._mixed_masks(x2, weight, bias, out, masks, route)
        return out.reshape(*lead, self.out_features)

    def _scalings(self, loras, device) -> Tensor:
        """float32 [len(loras)] on `device`, kept: no host-to-device copy per call."""
        key = (loras, device, tuple(self.lora_settings[n][0] for n in loras))
        cache = self.__dict__.setdefault("_scalings_cache", {})
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[key] = torch.tensor([s for s in key[2]], dtype=torch.float32, device=device)
        return cache[key]

    def _mixed_masks(self, x2, weight, bias, out, masks, route):
        who, rows, device = "AdaptedLinear", x2.shape[0], x2.device
        needs_grad = any(t is not None and t.requires_grad for t in (x2, weight, bias)) or any(
            self.scores[n].requires_grad for n in masks
        )
        if torch.is_grad_enabled() and needs_grad:  # masked_linear_multi has no backward
            for n in masks:  # training: the fused STE op per mask task, on its rows
                idx = route.rows(n, rows, device, who)
                scores = self.scores[n]
                scores = scores if scores.dtype in (torch.float32, weight.dtype) else scores.float()
                y = masked_linear(
                    x2.index_select(0, idx), weight, bias, scores, threshold=self.mask_thresholds[n]
                )
                out = out.index_copy(0, idx, y)
            return out
        idx = torch.cat([route.rows(n, rows, device, who) for n in masks])
        ids = route.ids(masks, rows, device, who).index_select(0, idx)
        bits = torch.stack([self._packed_bits(n) for n in masks])
        y = masked_linear_multi(x2.index_select(0, idx), weight, bias, bits, ids)
        return out.index_copy(0, idx, y)

    def _packed_bits(self, name: str) -> Tensor:
        scores = self.scores[name]
        key = (id(scores), scores._version, scores.data_ptr(), scores.device)
        cached = self._packed.get(name)
        if cached is None or cached[0] != key:
            cached = (key, pack_mask(scores.detach(), self.mask_thresholds[name]))
            self._packed[name] = cached
        return cached[1]

    def extra_repr(self) -> str:
        parts = [super().extra_repr()]
        for n in self.lora_A.keys():
            gate = ", gated" if self.gated(n) else ""
            kind = "adalora" if self.is_adalora(n) else "lora"
            parts.append(
                f"{kind}[{n}]: r={self.lora_A[n].shape[0]}, scaling={self.lora_settings[n][0]:g}{gate}"
            )
        for n in self.scores.keys():
            parts.append(f"mask[{n}]: threshold={self.mask_thresholds[n]:g}")
        return ", ".join(parts)
