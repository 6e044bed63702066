"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form with a rank budget allocated by importance, exactly as
Hugging Face peft's ``tuners/adalora`` (SVDLinear, RankAllocator, AdaLoraModel).

Each site's update (``AdaptedLinear.add_adalora``, run through the fused LoRA op with Λ folded into A)::

    out = W x + b + (dropout(x) @ (lora_A * lora_E).T @ lora_B.T) * lora_alpha / (ranknum + 1e-5)

lora_A Q ``[init_r, in]``, lora_E Λ ``[init_r, 1]``, lora_B P ``[out, init_r]``, ranknum = init_r.

Rank allocation (``update_ranks(model, step)``, peft's ``update_and_allocate``; call it after
``optimizer.step()`` and before ``zero_grad``). For every entry of A, E, B: ``I = |p * grad|``,
``Ī ← β1 Ī + (1 − β1) I``, ``U ← β2 U + (1 − β2) |I − Ī|``, score ``s = Ī U``; triplet i of a layer
scores ``s_E[i] + mean_j s_A[i, j] + mean_j s_B[j, i]``. The budget (ranks kept over all layers) is
``b(t) = n·init_r`` for ``t <= tinit``, ``n·target_r`` for ``t > total_step − tfinal``, else
``int((n·init_r − n·target_r)(1 − (t − tinit)/(total_step − tfinal − tinit))³ + n·target_r)``;
when ``t % deltaT == 0`` (and once more at ``t = total_step − tfinal``) the E of every triplet whose
score is at most the ``(n·init_r − b)``-th smallest are set to zero. From ``t = total_step − tfinal``
on the importance stops and the rank pattern is final: every later call zeroes the same E again, and
the layers compute only their kept ranks from then on (``AdaptedLinear.set_rank_pattern``).

Orthogonality penalty (``adalora_orth_loss``, peft's AdaLoraModel.forward)::

    orth_reg_weight * mean over every lora_A, lora_B of ‖P Pᵀ − I‖_F   (A Aᵀ for A, Bᵀ B for B)

``apply`` puts a forward hook on the model that adds it to ``outputs.loss`` whenever the output
carries a loss tensor (as peft does), for the active AdaLoRA adapters; ``remove`` takes it off.

Sites: ``target_modules``, or LoRA's preset (peft's AdaLoRA defaults are LoRA's). Saved:
``<linear>.lora_A``, ``<linear>.lora_E``, ``<linear>.lora_B`` (ranknum is fixed, not saved, as in
peft). Merge folds ``B (A * E) · scaling`` into the weight. Mixed batches route like LoRA.

peft checkpoints (``from_peft``): peft saves ``<module>.lora_A`` / ``.lora_E`` / ``.lora_B``; after a
training with a rank pattern it cuts each to the layer's kept ranks. A cut layer of k ranks loads into
the first k ranks of init_r, the others zero (A, E and B rows), so the logits are peft's and the zero
ranks are skipped when no gradient is needed. Those zero ranks never train again (their gradients are
zero), but they do count in the orthogonality penalty (``‖A Aᵀ − I‖`` over init_r rows, where peft's
resized layer has k), so continued training's loss differs from peft's by that constant.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from ...nn import AdaptedLinear
from ..config import AdaLoRAConfig
from . import Method, module_names, remove_linear_adapter, target_linears
from .lora import merge_into_weights

_STATE = "_peftkern_adalora"  # on the model: {adapter name: _Allocator}


@dataclass
class AdaLoRAPlan:
    sites: List[str]


class _Allocator:
    """One adapter's RankAllocator: peft's, on peftkern's layers."""

    def __init__(self, config: AdaLoRAConfig, sites: List[str], name: str):
        self.config, self.sites, self.name = config, list(sites), name
        self.init_bgt = config.init_r * len(sites)
        self.target_bgt = config.target_r * len(sites)
        self.rank_pattern: Optional[Dict[str, List[bool]]] = None
        self.hook = None
        self.reset_ipt()

    def reset_ipt(self):
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def budget_schedule(self, step: int):
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > c.total_step - c.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % c.deltaT == 0

    def params(self, model):
        """(site, module, {'lora_A': p, 'lora_E': p, 'lora_B': p}) of each site still holding the adapter."""
        modules = module_names(model)
        for s in self.sites:
            m = modules.get(s)
            if isinstance(m, AdaptedLinear) and m.is_adalora(self.name):
                yield s, m, {a: getattr(m, a)[self.name] for a in ("lora_A", "lora_E", "lora_B")}

    @torch.no_grad()
    def update_ipt(self, model):
        b1, b2 = self.config.beta1, self.config.beta2
        for s, _, ps in self.params(model):
            for a, p in ps.items():
                if p.grad is None:
                    raise ValueError(
                        f"update_ranks: {s}.{a}.{self.name} has no gradient; call update_ranks after "
                        "loss.backward() and optimizer.step(), before optimizer.zero_grad()"
                    )
                n = f"{s}.{a}"
                if n not in self.ipt:
                    self.exp_avg_ipt[n] = torch.zeros_like(p)
                    self.exp_avg_unc[n] = torch.zeros_like(p)
                self.ipt[n] = (p * p.grad).abs().detach()
                self.exp_avg_ipt[n] = b1 * self.exp_avg_ipt[n] + (1 - b1) * self.ipt[n]
                self.exp_avg_unc[n] = (
                    b2 * self.exp_avg_unc[n] + (1 - b2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs()
                )

    def _score(self, n):
        if n not in self.exp_avg_ipt:
            raise ValueError(
                f"update_ranks: no importance recorded for {n} yet; call update_ranks at every step from "
                "the first one"
            )
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    @torch.no_grad()
    def mask_to_budget(self, model, budget: int, final: bool):
        triplets, layers = [], list(self.params(model))
        for s, _, _ in layers:
            ipt_A = torch.mean(self._score(f"{s}.lora_A"), dim=1, keepdim=True)
            ipt_B = torch.mean(self._score(f"{s}.lora_B"), dim=0, keepdim=False).view(-1, 1)
            ipt_E = self._score(f"{s}.lora_E")
            triplets.append(ipt_E.view(-1) + torch.cat([ipt_A, ipt_B], dim=1).sum(dim=1).view(-1))
        k = self.init_bgt - budget
        # k = 0 (init_r == target_r) masks nothing (peft's kthvalue would raise)
        threshold = torch.kthvalue(torch.cat(triplets), k=k)[0].item() if k > 0 else -math.inf
        pattern = {}
        for (s, m, ps), score in zip(layers, triplets):
            pruned = (score <= threshold).view(-1, 1)
            ps["lora_E"].masked_fill_(pruned, 0.0)
            pattern[f"{s}.lora_E.{self.name}"] = (~pruned).view(-1).tolist()
            m.set_rank_pattern(self.name, ~pruned.view(-1), final=final)
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, model):
        if self.rank_pattern is None:
            raise ValueError(
                "update_ranks: the rank pattern is not set: call update_ranks at step total_step - tfinal "
                "(and every step before it)"
            )
        for s, m, ps in self.params(model):
            keep = torch.tensor(self.rank_pattern[f"{s}.lora_E.{self.name}"], device=ps["lora_E"].device)
            ps["lora_E"].masked_fill_(~keep.view(-1, 1), 0.0)
            if self.name not in m.__dict__.get("_adalora_kept", {}):
                m.set_rank_pattern(self.name, keep, final=True)

    def update_and_allocate(self, model, step: int):
        c = self.config
        last = c.total_step - c.tfinal
        if step < last:
            self.update_ipt(model)
            budget, mask_ind = self.budget_schedule(step)
            if mask_ind:
                self.rank_pattern = self.mask_to_budget(model, budget, final=False)
                return budget, self.rank_pattern
            return budget, None
        if step == last:
            budget, _ = self.budget_schedule(step)
            self.rank_pattern = self.mask_to_budget(model, budget, final=True)
            self.reset_ipt()
            return budget, self.rank_pattern
        self.mask_using_rank_pattern(model)
        return self.target_bgt, self.rank_pattern


def _allocators(model) -> Dict[str, _Allocator]:
    return model.__dict__.get(_STATE, {})


def _adalora_names(model, who) -> Dict[str, _Allocator]:
    found = _allocators(model)
    if not found:
        raise ValueError(
            f"{who}: the model holds no AdaLoRA adapter (peftkern.inject an AdaLoRAConfig first)"
        )
    return found


def update_ranks(model: nn.Module, step: int, name: Optional[str] = None):
    """AdaLoRA's rank allocation for training step `step` (peft's ``update_and_allocate(global_step)``):
    call it after ``optimizer.step()`` and before ``zero_grad`` (it reads the gradients still on the
    parameters). Updates the importance, and on a masking step zeroes the E of the pruned triplets
    (see the module docstring). Returns ``(budget, rank_pattern)`` as peft's RankAllocator does:
    the rank budget of this step, and ``{"<module>.lora_E.<name>": [bool] * init_r}`` (True = kept) on
    a step that masked (every step from ``total_step - tfinal`` on), else None. `name`: the AdaLoRA
    adapter (default: the model's one)."""
    found = _adalora_names(model, "update_ranks")
    if name is None:
        if len(found) != 1:
            raise ValueError(f"update_ranks: the model holds AdaLoRA adapters {sorted(found)}; name one")
        name = next(iter(found))
    if name not in found:
        raise ValueError(f"update_ranks: no AdaLoRA adapter named {name!r} ({sorted(found)})")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise TypeError(f"update_ranks: step must be an int >= 0 (the training step); got {step!r:.40}")
    return found[name].update_and_allocate(model, step)


def _orth_loss(model, allocator: _Allocator):
    total, count = 0, 0
    for _, _, ps in allocator.params(model):
        for a in ("lora_A", "lora_B"):
            p = ps[a]
            cov = p @ p.T if a == "lora_A" else p.T @ p
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return allocator.config.orth_reg_weight * (total / count if count else total)


def _active_adalora(model) -> List[str]:
    from ...nn import routing
    from ..inject import injection_state

    state = injection_state(model)
    names = list(state.active) if state is not None else []
    route = routing.current()
    if route is not None:
        names += [n for s in route.samples for n in s]
    found = _allocators(model)
    return [n for n in dict.fromkeys(names) if n in found]


def adalora_orth_loss(model: nn.Module, name: Optional[str] = None) -> torch.Tensor:
    """``orth_reg_weight * mean over every lora_A, lora_B of ‖P Pᵀ − I‖_F`` (peft's penalty; A Aᵀ for A,
    Bᵀ B for B) of AdaLoRA adapter `name`, or summed over the active AdaLoRA adapters (None). The
    model's forward already adds it to ``outputs.loss`` when its output carries one."""
    found = _adalora_names(model, "adalora_orth_loss")
    if name is not None and name not in found:
        raise ValueError(f"adalora_orth_loss: no AdaLoRA adapter named {name!r} ({sorted(found)})")
    names = [name] if name is not None else _active_adalora(model)
    total = torch.zeros(())
    for n in names:
        total = _orth_loss(model, found[n]) + total
    return total


def _add_orth_loss(model, args, output):
    loss = getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor):
        return output
    for n in _active_adalora(model):
        loss = loss + _orth_loss(model, _allocators(model)[n])
    output.loss = loss  # a ModelOutput keeps its fields and attributes in step
    return output


class AdaLoRA(Method):
    config_class = AdaLoRAConfig

    def plan(self, model, config):
        return AdaLoRAPlan(target_linears(model, config, "lora"))

    def expected_shapes(self, model, plan, config):
        modules, r, shapes = module_names(model), config.init_r, {}
        for s in plan.sites:
            m = modules[s]
            shapes[f"{s}.lora_A"] = torch.Size((r, m.in_features))
            shapes[f"{s}.lora_E"] = torch.Size((r, 1))
            shapes[f"{s}.lora_B"] = torch.Size((m.out_features, r))
        return shapes

    def apply(self, model, plan, config, name):
        modules, saved = module_names(model), {}
        for s in plan.sites:
            m = AdaptedLinear.adapt(modules[s])
            m.add_adalora(name, config.init_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout)
            saved.update({f"{s}.{a}": f"{s}.{a}.{name}" for a in ("lora_A", "lora_E", "lora_B")})
        allocators = model.__dict__.setdefault(_STATE, {})
        if not allocators:
            hook = model.register_forward_hook(_add_orth_loss)
            model.__dict__["_peftkern_adalora_hook"] = hook
        allocators[name] = _Allocator(config, plan.sites, name)
        return saved

    def remove(self, model, plan, name):
        remove_linear_adapter(model, plan.sites, name)
        self._forget(model, name)

    @staticmethod
    def _forget(model, name):
        allocators = _allocators(model)
        allocators.pop(name, None)
        if not allocators and _STATE in model.__dict__:
            del model.__dict__[_STATE]
            model.__dict__.pop("_peftkern_adalora_hook").remove()

    def merge(self, model, plan, name):
        merge_into_weights(model, plan.sites, name)
        self._forget(model, name)
        return [f"AdaLoRA merged into {len(plan.sites)} linear layers ({name!r})"]

    def site_keys(self, plan):
        return [(s, "linear") for s in plan.sites]

    peft_type = "ADALORA"

    def from_peft(self, model, plan, config, state):
        """peft's ``<module>.lora_A`` / ``.lora_E`` / ``.lora_B`` (a ``.ranknum`` of an old checkpoint is
        dropped: it is init_r); a layer cut to k < init_r ranks is padded with zero ranks (see the
        module docstring)."""
        out, r = {}, config.init_r
        for s in plan.sites:
            state.pop(f"{s}.ranknum", None)
            for a in ("lora_A", "lora_E", "lora_B"):
                t = state.pop(f"{s}.{a}", None)
                if t is None:
                    continue
                k = t.shape[1] if a == "lora_B" else t.shape[0]
                if t.dim() == 2 and k < r:
                    if a == "lora_B":
                        t = torch.cat([t, t.new_zeros(t.shape[0], r - k)], dim=1)
                    else:
                        t = torch.cat([t, t.new_zeros(r - k, t.shape[1])], dim=0)
                out[f"{s}.{a}"] = t
        return out
