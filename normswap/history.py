"""What a model remembers of normswap: the architecture it was built from and the structural steps applied to it.

``save`` writes both into the checkpoint; ``load`` rebuilds the architecture and replays the steps before loading
the weights. Steps that only change values (recalibrate, fit) are recorded for the reader but need no replay.

Example::

    >>> from torch import nn
    >>> model = nn.Sequential()
    >>> record_step(model, {"op": "fold", "pairs": []})
    >>> get_history(model)
    [{'op': 'fold', 'pairs': []}]
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from torch import nn

__all__ = [
    "carry_memory",
    "get_arch",
    "get_history",
    "get_source",
    "record_step",
    "set_arch",
    "set_history",
    "set_source",
]

_HISTORY = "_normswap_history"
_ARCH = "_normswap_arch"
_SOURCE = "_normswap_source"


def get_history(model: nn.Module) -> list[dict[str, Any]]:
    """The steps recorded on ``model``, oldest first (a copy)."""
    return copy.deepcopy(model.__dict__.get(_HISTORY, []))


def set_history(model: nn.Module, steps: list[dict[str, Any]]) -> None:
    """Replace the recorded steps (used when a step returns a new root module)."""
    model.__dict__[_HISTORY] = copy.deepcopy(steps)


def record_step(model: nn.Module, step: dict[str, Any]) -> None:
    """Append one step (a JSON-serialisable dict with an ``"op"`` key) to the model's history."""
    model.__dict__.setdefault(_HISTORY, []).append(copy.deepcopy(step))


def get_arch(model: nn.Module) -> Optional[dict[str, Any]]:
    """The architecture spec the model was built from (``ArchSpec.to_dict()``), if known."""
    arch = model.__dict__.get(_ARCH)
    return copy.deepcopy(arch) if arch is not None else None


def set_arch(model: nn.Module, arch: Optional[dict[str, Any]]) -> None:
    """Remember the architecture spec the model was built from."""
    model.__dict__[_ARCH] = copy.deepcopy(arch)


def get_source(model: nn.Module) -> Optional[dict[str, Any]]:
    """The checkpoint file the model was loaded from (``{"file": name, "sha256": hex}``), if known."""
    source = model.__dict__.get(_SOURCE)
    return copy.deepcopy(source) if source is not None else None


def set_source(model: nn.Module, source: Optional[dict[str, Any]]) -> None:
    """Remember the checkpoint file the model was loaded from."""
    model.__dict__[_SOURCE] = copy.deepcopy(source)


def carry_memory(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` everything ``old`` remembers (arch, source, history): for steps that replace the root module."""
    if new is not old:
        for attr in (_HISTORY, _ARCH, _SOURCE):
            if attr in old.__dict__:
                new.__dict__[attr] = copy.deepcopy(old.__dict__[attr])
