"""What the virtual-token methods (methods/prefix.py, prompt.py, vpt.py) share: reading a Hugging
Face model's call (its arguments by name, the batch, the cache) and the per-sample task ids of a
multi-task prefix or prompt (``PrefixConfig(num_tasks=...)``, ``peftkern.task_ids``).

Task ids set by ``peftkern.task_ids`` live in a context variable, which the worker threads of
nn.DataParallel do not see: pass them to the forward there (or use DistributedDataParallel).
"""

import contextlib
import contextvars
import functools
import inspect
from typing import Optional

from torch import Tensor

from ..nn.prefix_attention import _check_task_ids

_TASK_IDS = contextvars.ContextVar("peftkern_task_ids", default=None)


def hf_config(model, cname):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ValueError(
            f"{cname} needs a Hugging Face transformers model (with .config.num_hidden_layers); got "
            f"{type(model).__name__}"
        )
    return config


def check_vocabulary(model, ids, cname, field="init_token_ids") -> None:
    """Each of a config's token ids ``ids`` is a row of the model's input embedding."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    if size is None:
        raise ValueError(
            f"{cname}: {field} needs the model's input embedding; {type(model).__name__} has none"
        )
    for i, t in enumerate(ids):
        if t >= size:
            raise ValueError(
                f"{cname}: {field}[{i}] = {t} is not in {type(model).__name__}'s vocabulary of {size} tokens"
            )


def repeated_to(ids, n: int) -> list:
    """Token ids repeated, then cut, to n (as peft starts prompts from words)."""
    return (list(ids) * -(-n // len(ids)))[:n]


def base_name(model) -> str:
    """The name of model.base_model among model's modules ("" when the model is its own base)."""
    base = getattr(model, "base_model", model)
    for n, m in model.named_modules():
        if m is base:
            return n
    return ""


@contextlib.contextmanager
def task_ids(ids: Tensor):
    """Chooses each sample's task prefix or prompt of a multi-task ``PrefixConfig`` /
    ``PromptConfig(num_tasks=...)`` for every peftkern-injected model called inside the block (for a
    forward or ``generate()`` that cannot take ``task_ids`` itself)::

        with peftkern.task_ids(torch.tensor([0, 2, 1])):
            out = model.generate(input_ids, ...)
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"peftkern.task_ids: ids must be an int tensor [B]; got {type(ids).__name__}")
    token = _TASK_IDS.set(ids)
    try:
        yield
    finally:
        _TASK_IDS.reset(token)


def task_ids_of(kwargs, num_tasks: int, batch: int, device, cname: str) -> Optional[Tensor]:
    """The call's task ids (its ``task_ids`` argument, else peftkern.task_ids's, which a single-task
    module ignores), checked; None with one task. Ids for B samples serve a batch of k * B rows
    (generate()'s beams and return sequences: each sample's rows are adjacent), repeated per row;
    on the inputs' device."""
    ids = kwargs.pop("task_ids", None)
    if ids is None and num_tasks > 1:
        ids = _TASK_IDS.get()
    if ids is None:
        if num_tasks > 1:
            raise ValueError(
                f"{cname}(num_tasks={num_tasks}): pass task_ids [B] to the model's forward, or call it "
                "inside peftkern.task_ids(ids)"
            )
        return None
    if not isinstance(ids, Tensor) or ids.dim() != 1 or not ids.numel() or batch % ids.numel():
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{cname}: task_ids must be an int tensor [{batch}] (one per sample); got {shape}")
    _check_task_ids(ids, num_tasks, cname)
    if num_tasks == 1:
        return None
    ids = ids.to(device)
    return ids if ids.numel() == batch else ids.repeat_interleave(batch // ids.numel())


@functools.lru_cache(maxsize=None)
def _method_signature(func) -> inspect.Signature:
    signature = inspect.signature(func)
    return signature.replace(parameters=list(signature.parameters.values())[1:])  # without self


def forward_signature(module) -> inspect.Signature:
    """``inspect.signature(module.forward)``, cached per class: hooks read it on every block call (LST),
    where building it anew costs about as much as a small block's own host time. A forward set on the
    instance (accelerate's hooks, say) is read anew each time."""
    forward = module.forward
    if getattr(forward, "__self__", None) is module and type(module).forward is forward.__func__:
        return _method_signature(forward.__func__)
    return inspect.signature(forward)


def bound(module, args, kwargs) -> dict:
    """The call's arguments, all by name (models call their base positionally: BERT's heads)."""
    if not args:
        return dict(kwargs)
    signature = forward_signature(module)
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL and arguments.get(name):
            raise TypeError(f"peftkern: {type(module).__name__} was called with extra positional arguments")
    return arguments


def batch_and_length(kwargs):
    x = kwargs.get("input_ids")
    x = kwargs.get("inputs_embeds") if x is None else x
    if x is None:
        raise ValueError("peftkern: the model was called without input_ids or inputs_embeds")
    return x.shape[0], x.shape[1], x.device


def seq2seq_rows(kwargs):
    """An encoder-decoder call's rows (its decoder's inputs, else its encoder's; generate()'s later
    steps give only encoder_outputs, expanded to the beams) and their device."""
    for key in ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds", "labels"):
        x = kwargs.get(key)
        if isinstance(x, Tensor):
            return x.shape[0], x.device
    encoder_outputs = kwargs.get("encoder_outputs")
    if encoder_outputs is not None:
        return encoder_outputs[0].shape[0], encoder_outputs[0].device
    raise ValueError("peftkern: the model was called without input_ids, inputs_embeds or decoder inputs")


def cache_of(kwargs):
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def past_length(kwargs) -> int:
    cache = cache_of(kwargs)
    return 0 if cache is None else int(cache.get_seq_length())


class CallStack:
    """A value per model call, pushed by a pre-hook and popped by the matching forward hook (registered
    with always_call), per thread and context (a context variable holds the stack)."""

    def __init__(self, name):
        self._var = contextvars.ContextVar(name, default=())

    def push(self, value) -> None:
        self._var.set((*self._var.get(), value))

    def top(self):
        stack = self._var.get()
        return stack[-1] if stack else None

    def set_top(self, value) -> None:
        stack = self._var.get()
        self._var.set((*stack[:-1], value))

    def pop(self):
        stack = self._var.get()
        if not stack:
            return None
        self._var.set(stack[:-1])
        return stack[-1]
