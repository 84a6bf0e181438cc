"""What running a model can change on it, put back afterwards: for the operations that only look at a model (fold
planning's capture, compare).

An eval forward computes, but models keep state outside their parameters, and some of it changes when they run:

- caches the first eval forward fills and only ``train()`` empties: the attention biases of LeViT (timm and
  transformers), EfficientFormer, EfficientViT (MSRA) and TinyViT, kept in a dict attribute. Filled while normswap
  looked and then left, such a cache outlives the training that makes it stale: a training-mode model that is
  trained on without another ``train()`` call evaluates with the old biases;
- attributes the forward assigns (YOLO's anchor grid and strides, the input shape they were made for);
- buffers written in place, the training flags an operation sets, the random number generators.

:func:`restored` takes a snapshot of all of it and puts it back, so the model is left as it was: every module's
attributes (its ``__dict__``), the contents of the plain dicts and sets among them (the parameter, buffer and child
entries, the caches above), the values of its buffers, and the CPU and CUDA random number generators. Not put back:
lists changed in place (copying them would cost more than the rest: LeViT keeps 175,000 attention indices in
lists), containers nested inside those above, tensors other than buffers written in place, and state kept outside
the model (a library's module-level caches).

Example::

    >>> import torch
    >>> from torch import nn
    >>> layer = nn.Linear(2, 2)
    >>> layer.cache = {}
    >>> with restored(layer):
    ...     layer.cache["cpu"] = torch.ones(1)
    ...     layer.shape = (4, 2)
    ...     layer.eval()  # doctest: +ELLIPSIS
    Linear(...)
    >>> layer.cache, hasattr(layer, "shape"), layer.training
    ({}, False, True)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = ["restored"]

_CONTAINERS = (dict, set)
"""The container types whose contents are put back (exact types: a module's hook dicts, ``OrderedDict``, are not)."""


@contextlib.contextmanager
def restored(model: nn.Module, modules: Optional[Sequence[nn.Module]] = None,
             buffers: Optional[Sequence[torch.Tensor]] = None) -> Iterator[None]:
    """Put back, afterwards, everything running ``model`` may change on it (see the module documentation), however
    the block ends. ``modules`` (each once) and ``buffers`` (each once) save a walk where the caller has them."""
    if modules is None:
        modules = list(model.modules())
    if buffers is None:
        buffers = list({id(b): b for module in modules for b in module._buffers.values() if b is not None}.values())
    containers, contents = _containers(modules)
    with torch.no_grad():
        copies = [buffer.clone() for buffer in buffers]
    versions = [_version(buffer) for buffer in buffers]
    devices = [t.device.index for t in [next(model.parameters(), None)] if t is not None and t.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            for container, before in zip(containers, contents):
                if container or before is not None:  # (``None``: it was empty)
                    container.clear()
                    container.update(before or ())
            with torch.no_grad():
                for buffer, copy, version in zip(buffers, copies, versions):
                    if _version(buffer) != version:
                        buffer.copy_(copy)


def _containers(modules: Sequence[nn.Module]) -> tuple[list[Any], list[Any]]:
    """Each module's ``__dict__`` and the plain dicts and sets in it, and a copy of the contents of each (``None`` for
    an empty one: most of a model's are). Two lists, not a list of pairs: a pair per container would be thousands of
    objects more for the garbage collector while the model runs."""
    containers: list[Any] = []
    contents: list[Any] = []
    for module in modules:
        own = module.__dict__
        containers.append(own)
        contents.append(own.copy())  # (copy(): a quarter of dict()'s time)
        for value in own.values():
            if type(value) in _CONTAINERS:
                containers.append(value)
                contents.append(value.copy() if value else None)
    return containers, contents


def _version(tensor: torch.Tensor) -> Optional[int]:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return None
