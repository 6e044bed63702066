"""Which named adapters each sample of a batch goes through (one model serving many tasks).

A ``SampleRoute`` lists, per sample, the names of the adapters it uses (an empty tuple: the base
model). ``peftkern.tasks`` (integrations) sets one for the calls inside its block; the modules that
hold named adapters (``AdaptedLinear``, the adapter and prefix hooks) read it through ``current()``
and turn it into per-row indices into their own adapters. Without a route a module applies its
``active`` names to every row.
"""

import contextlib
import contextvars
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_ROUTE = contextvars.ContextVar("peftkern_route", default=None)


class SampleRoute:
    """Per sample, the tuple of adapter names it goes through (``()`` = the base model).

    Rows: a module sees ``rows`` rows for B samples (tokens, beams): rows must be a multiple of B,
    and each sample's rows are adjacent (``[B, L, d]`` flattened; generate()'s beams and returned
    sequences of one sample follow each other), so sample i owns rows ``[i * k, (i + 1) * k)``.
    Index tensors are cached on the route, which lives for one call (or one ``tasks`` block)."""

    def __init__(self, samples: Sequence[Tuple[str, ...]], beams: bool = False):
        self.samples = tuple(tuple(s) for s in samples)
        self.beams = beams  # a call may hold k rows per sample (generate()'s beams); else one
        self._cache: Dict[tuple, Tensor] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"SampleRoute({[list(s) for s in self.samples]})"

    def project(self, own: Iterable[str]) -> List[Tuple[str, ...]]:
        """Each sample's names among `own` (in the sample's order)."""
        own = set(own)
        return [tuple(n for n in s if n in own) for s in self.samples]

    def uniform(self, own: Iterable[str]) -> Optional[Tuple[str, ...]]:
        """The names of `own` every sample uses, when all samples use the same ones; else None."""
        projected = self.project(own)
        first = projected[0] if projected else ()
        return first if all(p == first for p in projected) else None

    def _per_row(self, rows: int, who: str) -> int:
        B = len(self.samples)
        if B == 0 or rows % B:
            raise ValueError(
                f"{who}: the batch has {rows} rows, which do not split over the {B} samples that "
                "peftkern.tasks names (one task per sample; each sample's rows adjacent)"
            )
        return rows // B

    def ids(self, names: Sequence[str], rows: int, device, who: str) -> Tensor:
        """int64 ``[rows]``: each row's index into `names` (the one of them its sample uses), -1 for none."""
        names = tuple(names)
        key = ("ids", names, rows, str(device))
        if key not in self._cache:
            per = self._per_row(rows, who)
            index = {n: i for i, n in enumerate(names)}
            sample_ids = []
            for s in self.project(names):
                if len(s) > 1:
                    raise ValueError(f"{who}: a sample goes through {list(s)} here; one per sample can")
                sample_ids.append(index[s[0]] if s else -1)
            t = torch.tensor(sample_ids, dtype=torch.int64)
            self._cache[key] = t.repeat_interleave(per).to(device)
        return self._cache[key]

    def rows(self, name: str, rows: int, device, who: str) -> Tensor:
        """int64 indices of the rows whose sample goes through `name` (maybe empty)."""
        key = ("rows", name, rows, str(device))
        if key not in self._cache:
            per = self._per_row(rows, who)
            samples = [i for i, s in enumerate(self.samples) if name in s]
            t = torch.tensor(samples, dtype=torch.int64)
            t = (t[:, None] * per + torch.arange(per)).reshape(-1)
            self._cache[key] = t.to(device)
        return self._cache[key]


def current() -> Optional[SampleRoute]:
    return _ROUTE.get()


@contextlib.contextmanager
def routed(route: Optional[SampleRoute]):
    """Sets the route for the calls inside the block (None: no route, each module's active names)."""
    token = _ROUTE.set(route)
    try:
        yield
    finally:
        _ROUTE.reset(token)


class _RouteRecord:
    """The route a module's last forward with gradients saw, for a recompute with no route of its own.
    ``conflict``: a different route ran a forward before a backward used the one before it."""

    __slots__ = ("samples", "route", "conflict", "used")

    def __init__(self, route, conflict):
        self.route, self.conflict, self.used = route, conflict, False
        self.samples = None if route is None else route.samples


_REPLAY = contextvars.ContextVar("peftkern_route_replay", default=False)


def replaying(fn, route: Optional["SampleRoute"]):
    """`fn` run under `route`, also when activation checkpointing calls it again in the backward (its
    recompute): what injection wraps a model's checkpointed layers in (``_gradient_checkpointing_func``)."""

    def run(*args, **kwargs):
        token, replay = _ROUTE.set(route), _REPLAY.set(True)
        try:
            return fn(*args, **kwargs)
        finally:
            _REPLAY.reset(replay)
            _ROUTE.reset(token)

    return run


def for_module(module) -> Optional[SampleRoute]:
    """The route of this call of `module`. A checkpointed layer of an injected Hugging Face model
    recomputes under the route of its forward (``replaying``). Any other recompute (a hand-written
    ``torch.utils.checkpoint``) runs in the backward outside the routed call: it gets the route
    this module saw in its last forward with gradients, and raises when another route ran a forward
    since then (which of the two the backward recomputes is not known)."""
    route = current()
    if torch.compiler.is_compiling():  # traced: no attribute writes (a compiled graph holds its route)
        return route
    if torch._C._current_graph_task_id() != -1:  # inside a backward: a recompute
        if route is not None or _REPLAY.get():
            return route
        record = module.__dict__.get("_peftkern_last_route")
        if record is None:
            return None
        if record.conflict:
            raise RuntimeError(
                f"peftkern: a {type(module).__name__} is recomputed in the backward (activation "
                "checkpointing) after forwards under different peftkern.tasks, and which one this "
                "backward needs is not known; run one backward per routed forward, or checkpoint through "
                "the model's gradient_checkpointing_enable(), which keeps each forward's route"
            )
        record.used = True
        return record.route
    if torch.is_grad_enabled() and not _REPLAY.get():
        previous = module.__dict__.get("_peftkern_last_route")
        samples = None if route is None else route.samples
        if previous is None or previous.route is not route:
            conflict = (
                previous is not None
                and not previous.used
                and (previous.conflict or previous.samples != samples)
            )
            module._peftkern_last_route = _RouteRecord(route, conflict)
    return route


def resolve(module, own: Sequence[str], active: Sequence[str]):
    """What `module`, holding adapters `own`, applies now: ``(names, None)`` when every row goes
    through the same names (the active ones without a route), ``(None, route)`` for a mixed batch."""
    route = for_module(module)
    if route is None:
        return tuple(n for n in active if n in own), None
    same = route.uniform(own)
    if same is not None:
        return same, None
    return None, route
