"""What running a model can change on it, put back afterwards: for the operations that only look at a model (fold
planning's capture, compare), and the caches of one that trains it (refinement).

An eval forward computes, but models keep state outside their parameters, and some of it changes when they run:

- caches an eval forward fills and ``train()`` empties: the attention biases of LeViT (timm and transformers),
  EfficientFormer, EfficientViT (MSRA) and TinyViT, kept in a dict attribute. Filled while normswap looked and
  then left, such a cache outlives the training that makes it stale (transformers' LeViT empties it only on
  ``train(True)``: a model trained on without that call evaluates with the old biases); filled during a training
  step, it holds that step's autograd graph;
- attributes the forward assigns (YOLO's anchor grid and strides, the input shape they were made for);
- buffers written in place, the training flags an operation sets, the random number generators.

:func:`restored` takes a snapshot of all of it and puts it back, so the model is left as it was: every module's
attributes (its ``__dict__``), the contents of the plain dicts and sets among them (the parameter, buffer and child
entries, the caches above), the values of its buffers, and the CPU and CUDA random number generators. Not put back:
lists changed in place (copying them would cost more than the rest: LeViT keeps 175,000 attention indices in
lists), containers nested inside those above, tensors other than buffers written in place, and state kept outside
the model (a library's module-level caches). :func:`caches` keeps the dicts and sets alone, to put back before each
forward of a model whose weights change in between; :func:`training_flags` the training flags alone, for the
operations that switch them.

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
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = ["Containers", "TrainingFlags", "caches", "restored", "training_flags"]

_CONTAINERS = (dict, set)
"""The container types whose contents are put back (exact types: a module's hook dicts, ``OrderedDict``, are not)."""

_REGISTRIES = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})
"""The dicts and sets every module keeps for torch: its parameters, buffers and children."""


@contextlib.contextmanager
def restored(model: nn.Module, modules: Optional[Sequence[nn.Module]] = None,
             buffers: Optional[Sequence[torch.Tensor]] = None) -> Iterator[None]:
    """Put back, afterwards, everything running ``model`` may change on it (see the module documentation), however
    the block ends. ``modules`` (each once) and ``buffers`` (each once) save a walk where the caller has them."""
    if modules is None:
        modules = list(model.modules())
    if buffers is None:
        buffers = list({id(b): b for module in modules for b in module._buffers.values() if b is not None}.values())
    attributes = Containers(modules)
    with torch.no_grad():
        copies = [buffer.clone() for buffer in buffers]
    versions = [_version(buffer) for buffer in buffers]
    devices = [t.device.index for t in [next(model.parameters(), None)] if t is not None and t.device.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            attributes.put_back()
            with torch.no_grad():
                for buffer, copy, version in zip(buffers, copies, versions):
                    if _version(buffer) != version:
                        buffer.copy_(copy)


def caches(model: nn.Module) -> "Containers":
    """The plain dicts and sets ``model``'s modules keep among their attributes (not torch's registries of their
    parameters, buffers and children): the caches a forward fills, such as LeViT's attention biases. For an
    operation that runs a model whose weights change between forwards (refinement), so that each forward starts
    from the caches as they were.

    >>> layer = nn.Linear(2, 2)
    >>> layer.cache = {}
    >>> kept = caches(layer)
    >>> layer.cache["cpu"] = layer.weight.sum()
    >>> kept.put_back()
    >>> layer.cache
    {}
    """
    return Containers(list(model.modules()), attributes=False)


class Containers:
    """Dicts and sets of a model's modules and what each holds now: :meth:`put_back` refills each to that, in place
    (whoever holds one sees it back). With ``attributes``, every module's attribute dict and all the plain dicts and
    sets in it; without, those dicts and sets other than torch's registries (see :func:`caches`)."""

    def __init__(self, modules: Sequence[nn.Module], *, attributes: bool = True) -> None:
        # Two lists, not a list of pairs: a pair per container would be thousands of objects more for the garbage
        # collector while the model runs. An empty container's contents are ``None``: most of a model's are empty.
        containers: list[Any] = []
        contents: list[Any] = []
        for module in modules:
            own = module.__dict__
            if attributes:
                containers.append(own)
                contents.append(own.copy())  # (copy(): a quarter of dict()'s time)
                for value in own.values():
                    if type(value) in _CONTAINERS:
                        containers.append(value)
                        contents.append(value.copy() if value else None)
            else:
                for key, value in own.items():
                    if type(value) in _CONTAINERS and key not in _REGISTRIES:
                        containers.append(value)
                        contents.append(value.copy() if value else None)
        self.containers, self.contents = containers, contents

    def put_back(self) -> None:
        for container, before in zip(self.containers, self.contents):
            if container or before is not None:
                container.clear()
                container.update(before or ())


def training_flags(*models: nn.Module) -> "TrainingFlags":
    """The training flag of every module of ``models``, for an operation that switches them (eval mode for its
    forwards, ``train()`` to empty a cache) to put back afterwards.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    >>> flags = training_flags(model)
    >>> model[1].eval()
    Dropout(p=0.5, inplace=False)
    >>> flags.put_back()
    >>> model[1].training
    True
    """
    return TrainingFlags([module for model in models for module in model.modules()])


class TrainingFlags:
    """The training flag of each of some modules now: :meth:`put_back` sets each back to it, directly (a module's own
    ``train()``, which may empty a cache or reach its children, is not called)."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = list(modules)
        self.flags = [module.training for module in self.modules]

    def put_back(self) -> None:
        for module, training in zip(self.modules, self.flags):
            if module.training != training:
                module.training = training


def _version(tensor: torch.Tensor) -> Optional[int]:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return None
