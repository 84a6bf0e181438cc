"""The layer classes normswap knows by name: one record per class, the names that files record them by.

A checkpoint's manifest (:mod:`normswap.checkpoint.manifest`) says which class each normalization layer is. Files
are data, so a file never names a class to import: it names a *key* of this registry (``"BatchNorm2d"``,
``"timm.BatchNormAct2d"``), and only the classes listed here can be built from a file. timm's and torchvision's
classes are looked up only once their modules are imported (a model can only hold them then) and imported only to
build a layer a file records.

Example::

    >>> import torch
    >>> record_of(torch.nn.BatchNorm2d(4)).key, by_key("GroupNorm").family
    ('BatchNorm2d', 'gn')
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Optional

from torch import nn

from .errors import NormswapError

__all__ = ["LAYER_CLASSES", "LayerClass", "by_key", "record_of"]


@dataclass(frozen=True)
class LayerClass:
    """One class normswap can describe and rebuild.

    ``family`` is what the layer computes: ``"bn"`` (BatchNorm, batch statistics in training), ``"sync"``
    (SyncBatchNorm), ``"frozen"`` (fixed statistics), ``"gn"`` (GroupNorm), ``"folded"`` (what stays where a
    BatchNorm was folded away: its activation, or nothing). ``fused`` layers carry a ``drop`` and an ``act`` module;
    ``rank`` is the input rank the class is made for (1, 2, 3), ``None`` for any.
    """

    key: str
    module: str
    name: str
    family: str
    fused: bool = False
    rank: Optional[int] = None

    def loaded(self) -> Optional[type]:
        """The class, if its module has been imported (never imports)."""
        module = sys.modules.get(self.module)
        return getattr(module, self.name, None) if module is not None else None

    def load(self) -> type:
        """The class, importing its module (timm and torchvision are dependencies of normswap)."""
        return getattr(importlib.import_module(self.module), self.name)


LAYER_CLASSES: tuple[LayerClass, ...] = (
    LayerClass("BatchNorm1d", "torch.nn", "BatchNorm1d", "bn", rank=1),
    LayerClass("BatchNorm2d", "torch.nn", "BatchNorm2d", "bn", rank=2),
    LayerClass("BatchNorm3d", "torch.nn", "BatchNorm3d", "bn", rank=3),
    LayerClass("normswap.BatchNorm", "normswap.layers", "BatchNorm", "bn"),
    LayerClass("SyncBatchNorm", "torch.nn", "SyncBatchNorm", "sync"),
    LayerClass("GroupNorm", "torch.nn", "GroupNorm", "gn"),
    LayerClass("normswap.FrozenBatchNorm", "normswap.layers", "FrozenBatchNorm", "frozen"),
    LayerClass("normswap.FrozenBatchNormAct", "normswap.layers", "FrozenBatchNormAct", "frozen", fused=True),
    LayerClass("timm.BatchNormAct2d", "timm.layers.norm_act", "BatchNormAct2d", "bn", fused=True, rank=2),
    LayerClass("timm.SyncBatchNormAct", "timm.layers.norm_act", "SyncBatchNormAct", "sync", fused=True),
    LayerClass("timm.FrozenBatchNormAct2d", "timm.layers.norm_act", "FrozenBatchNormAct2d", "frozen", fused=True,
               rank=2),
    LayerClass("timm.GroupNormAct", "timm.layers.norm_act", "GroupNormAct", "gn", fused=True),
    LayerClass("torchvision.FrozenBatchNorm2d", "torchvision.ops.misc", "FrozenBatchNorm2d", "frozen", rank=2),
    LayerClass("Identity", "torch.nn", "Identity", "folded"),
    LayerClass("normswap.FoldedAct", "normswap.layers", "FoldedAct", "folded", fused=True),
)
"""Every class a file can name, by key."""

_BY_KEY = {record.key: record for record in LAYER_CLASSES}


def by_key(key: str) -> LayerClass:
    """The record a file's key names; :class:`NormswapError` for a key normswap does not know."""
    record = _BY_KEY.get(key) if isinstance(key, str) else None
    if record is None:
        raise NormswapError(f"unknown layer class {key!r}: normswap builds only {', '.join(_BY_KEY)}")
    return record


def record_of(module: nn.Module) -> Optional[LayerClass]:
    """The record of ``module``'s exact class (a subclass may compute something else), or ``None``."""
    cls = type(module)
    for record in LAYER_CLASSES:
        if record.name == cls.__name__ and record.loaded() is cls:
            return record
    return None
