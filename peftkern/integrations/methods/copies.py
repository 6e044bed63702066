"""``modules_to_save`` of any method: each named adapter trains its own copy of the listed modules (a
task head, say) as ``<module>.peftkern_copies.<name>``; the module itself stays as the base had it. A
forward hook replaces the module's output by the copy's; in a mixed batch each task's copy runs on
its samples' rows (the batch dimension: dim 0 of every tensor argument), so a head runs once per
task present. Saved: ``<module>.<param>``, under the base's names.
"""

import copy

from torch import Tensor, nn

from ...nn import routing
from . import active_of, add_to_dict_child, matched, module_names, remove_from_dict_child

ATTR = "peftkern_copies"


def plan(model, config):
    if config.modules_to_save is None:
        return []
    return [n for n, _ in matched(model, config, config.modules_to_save, "modules_to_save")]


def expected_shapes(model, names):
    modules = module_names(model)
    return {f"{n}.{p}": t.shape for n in names for p, t in _own_params(modules[n])}


def _own_params(module):
    return [(p, t) for p, t in module.named_parameters() if not p.startswith("peftkern_")]


def _strip(module: nn.Module) -> None:
    """Removes what peftkern added to `module` (a deep copy): its ``peftkern_*`` children, peftkern's
    hooks and state attributes; an AdaptedLinear becomes the plain nn.Linear it was."""
    from ...nn import AdaptedLinear

    for m in list(module.modules()):
        for child in [c for c in m._modules if c.startswith("peftkern_")]:
            del m._modules[child]
        for hooks in (m._forward_hooks, m._forward_pre_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__module__", "").startswith("peftkern.")]:
                del hooks[key]
                for flags in (
                    m._forward_hooks_with_kwargs,
                    m._forward_hooks_always_called,
                    m._forward_pre_hooks_with_kwargs,
                ):
                    flags.pop(key, None)
        if isinstance(m, AdaptedLinear):
            for held in m.names():
                m.remove(held)
            m.restore()
        for attr in [a for a in m.__dict__ if a.startswith("_peftkern")]:
            del m.__dict__[attr]


def apply(model, names, name):
    modules, saved = module_names(model), {}
    for n in names:
        module = modules[n]
        held = module._modules.pop(ATTR, None)  # not deep-copied: the copies are dropped below anyway
        new = copy.deepcopy(module)
        if held is not None:
            module._modules[ATTR] = held
        _strip(new)  # a copy of the base module: no other adapter's state (BitFit's biases, LoRA)
        new.requires_grad_(True)
        if held is None:
            module._peftkern_active = getattr(module, "_peftkern_active", ())
            module._peftkern_copies_hook = module.register_forward_hook(_copies_hook, with_kwargs=True)
        add_to_dict_child(module, ATTR, name, new)
        saved.update({f"{n}.{p}": f"{n}.{ATTR}.{name}.{p}" for p, _ in _own_params(new)})
    return saved


def remove(model, names, name):
    modules = module_names(model)
    for n in names:
        if remove_from_dict_child(modules[n], ATTR, name):
            modules[n]._peftkern_copies_hook.remove()
            del modules[n]._peftkern_copies_hook


def _rows_of(x, rows, batch):
    return x.index_select(0, rows) if isinstance(x, Tensor) and x.dim() and x.shape[0] == batch else x


def _copies_hook(module, args, kwargs, output):
    held = getattr(module, ATTR)
    names, route = routing.resolve(module, list(held.keys()), active_of(module))
    if route is None:
        return output if not names else held[names[0]](*args, **kwargs)
    if not isinstance(output, Tensor):
        raise ValueError(f"modules_to_save: a mixed batch needs {type(module).__name__} to return a tensor")
    batch = output.shape[0]
    for n in held.keys():
        if not any(n in s for s in route.samples):
            continue
        rows = route.rows(n, batch, output.device, f"modules_to_save {type(module).__name__}")
        y = held[n](
            *(_rows_of(a, rows, batch) for a in args),
            **{k: _rows_of(v, rows, batch) for k, v in kwargs.items()},
        )
        output = output.index_copy(0, rows, y)
    return output
