"""Walking a model's module tree: finding modules under *all* their names, and replacing them everywhere.

A module object can be reachable under several qualified names (a shared norm layer, or the same object assigned to
two attributes of one parent). ``nn.Module.named_modules()`` reports it once; converting only that name would leave
the old object in the other places. Here every module comes with every name it has, and replacement puts one new
object at each of them.

Example::

    >>> from torch import nn
    >>> bn = nn.BatchNorm2d(4)
    >>> model = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    >>> [(type(f.module).__name__, f.names) for f in find_modules(model, lambda m: isinstance(m, nn.BatchNorm2d))]
    [('BatchNorm2d', ['1', '3'])]
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["FoundModule", "every_name", "find_modules", "get_module", "model_device", "parameters_and_buffers",
           "replace_module"]


@dataclass
class FoundModule:
    """One module object and every qualified name it is reachable under, in first-seen order."""

    module: nn.Module
    names: list[str]


def every_name(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every (qualified name, module) pair of ``model``: a module once under each of its names, in the order
    ``model.named_modules(remove_duplicate=False)`` gives them, as a list. One recursive walk over the children
    dicts, without torch's generators: under half their time (0.07 against 0.16 ms for LeViT's 287 modules), which
    counts where it runs before every recorded forward.

    >>> layer = nn.Linear(2, 2)
    >>> [(name, type(module).__name__) for name, module in every_name(nn.Sequential(layer, nn.ReLU(), layer))]
    [('', 'Sequential'), ('0', 'Linear'), ('1', 'ReLU'), ('2', 'Linear')]
    """
    found: list[tuple[str, nn.Module]] = []
    _walk(model, "", found)
    return found


def _walk(module: nn.Module, prefix: str, found: list[tuple[str, nn.Module]]) -> None:
    found.append((prefix, module))
    for name, child in module._modules.items():
        if child is not None:
            _walk(child, f"{prefix}.{name}" if prefix else name, found)


def find_modules(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> list[FoundModule]:
    """Every module for which ``predicate`` is true, once per object, in forward-definition order, with all names.

    Children of a matching module are not searched (the fused activation of a norm layer is part of that layer).
    """
    found: dict[int, FoundModule] = {}
    # The walk is depth-first, so the names under a match follow it until the next name outside: one prefix to skip.
    skip: Optional[str] = None
    for name, module in every_name(model):
        if skip is not None and name.startswith(skip):
            continue
        if not predicate(module):
            continue
        entry = found.get(id(module))
        if entry is None:
            found[id(module)] = FoundModule(module, [name])
        elif name not in entry.names:
            entry.names.append(name)
        skip = name + "." if name else ""
    return list(found.values())


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The module at qualified ``name`` (``""`` is the model itself); ``KeyError`` if there is none."""
    module = model
    for part in name.split(".") if name else []:
        children = module._modules
        if part not in children or children[part] is None:
            raise KeyError(name)
        module = children[part]
    return module


def replace_module(model: nn.Module, names: list[str], new: nn.Module) -> nn.Module:
    """Put ``new`` at every qualified name in ``names``; returns the model (``new`` itself if a name is ``""``)."""
    root = model
    for name in names:
        if not name:
            root = new
            continue
        parent_name, _, child = name.rpartition(".")
        get_module(model, parent_name)._modules[child] = new
    return root


def parameters_and_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model``, each tensor once, from one walk over its modules: the tensors of
    ``chain(model.parameters(), model.buffers())`` (in module order) without the qualified names those build.

    >>> [tuple(t.shape) for t in parameters_and_buffers(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))]
    [(3, 2), (3,), (3,), (3,), (3,), (3,), ()]
    """
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is not None:
                    found.setdefault(id(tensor), tensor)
    return list(found.values())


def model_device(*modules: nn.Module) -> Optional[torch.device]:
    """Where a model is: the device of the first parameter or buffer of the first of ``modules`` that has one (a
    layer, then the model around it), or ``None`` if none has any.

    >>> model_device(nn.Identity(), nn.Linear(2, 2)), model_device(nn.Identity())
    (device(type='cpu'), None)
    """
    for module in modules:
        for tensor in itertools.chain(module.parameters(), module.buffers()):  # (lazily: only the first is needed)
            return tensor.device
    return None
