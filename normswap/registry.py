"""What normswap knows about normalization layers: one typed record per layer class and one per target.

Every question about a layer class — what it computes, whether it carries a fused activation, the input rank it is
made for, whether a plan converts it, folding folds it, recalibration recalibrates it — is answered by its
:class:`LayerClass` record here, and every conversion target (``to="gn"``...) is a :class:`Target` record naming the
classes layers become. The command line's ``--to`` choices and the recipes' ``to`` values are :data:`TARGET_NAMES`.

A checkpoint's manifest (:mod:`normswap.checkpoint.manifest`) says which class each normalization layer is. Files
are data, so a file never names a class to import: it names a *key* of this registry (``"BatchNorm2d"``,
``"timm.BatchNormAct2d"``), and only the classes listed here can be built from a file. timm's and torchvision's
classes are looked up only once their modules are imported (a model can only hold them then) and imported only to
build a layer a file records or a conversion makes.

Example::

    >>> import torch
    >>> record = record_of(torch.nn.BatchNorm2d(4))
    >>> record.key, record.rank, record.foldable, record.calibratable, by_key("GroupNorm").family
    ('BatchNorm2d', 2, True, True, 'gn')
    >>> target("ln").family, target_class("frozen", rank=2, fused=True).__name__
    ('gn', 'FrozenBatchNormAct')
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Optional

from .errors import NormswapError

__all__ = ["LAYER_CLASSES", "LAZY", "TARGETS", "TARGET_NAMES", "UNKNOWN", "LayerClass", "Target", "by_key", "record_of",
           "target", "target_class"]


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

    @property
    def converts(self) -> bool:
        """A plan converts layers of this class (BatchNorm, SyncBatchNorm, frozen BatchNorm)."""
        return self.family in ("bn", "sync", "frozen")

    @property
    def foldable(self) -> bool:
        """Its eval output is a per-channel affine map that folding can multiply into the layer before it."""
        return self.family in ("bn", "sync", "frozen")

    @property
    def calibratable(self) -> bool:
        """Recalibration gives it new running statistics (frozen layers keep theirs by design)."""
        return self.family in ("bn", "sync")

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

UNKNOWN = LayerClass("unknown", "", "", "unknown")
"""A subclass of a BatchNorm class normswap does not know (its forward may differ): reported, never converted
unless asked."""

LAZY = LayerClass("lazy", "", "", "lazy")
"""An uninitialized lazy BatchNorm: it has no channel count until its first forward."""

_BY_CLASS: dict[type, Optional[LayerClass]] = {}


@dataclass(frozen=True)
class Target:
    """One value of ``to=``: the family layers become and the registry keys of the classes they become (``plain``
    for a layer without a fused activation, ``fused`` for one with; BatchNorm's plain class depends on the rank)."""

    name: str
    family: str
    plain: str
    fused: str
    help: str


TARGETS: tuple[Target, ...] = (
    Target("gn", "gn", "GroupNorm", "timm.GroupNormAct", "GroupNorm (32 groups, or groups=)"),
    Target("ln", "gn", "GroupNorm", "timm.GroupNormAct", "GroupNorm with one group (LayerNorm-style)"),
    Target("in", "gn", "GroupNorm", "timm.GroupNormAct", "GroupNorm with one group per channel (InstanceNorm-style)"),
    Target("frozen", "frozen", "normswap.FrozenBatchNorm", "normswap.FrozenBatchNormAct", "FrozenBatchNorm"),
    Target("sync", "sync", "SyncBatchNorm", "timm.SyncBatchNormAct", "SyncBatchNorm"),
    Target("bn", "bn", "BatchNorm2d", "timm.BatchNormAct2d", "plain BatchNorm of the original rank"),
)
"""Every conversion target, in the order the documentation lists them."""

TARGET_NAMES = tuple(t.name for t in TARGETS)
"""Every value ``to=`` accepts (and ``--to``, and a recipe rule's ``to``)."""

_BATCH_NORM_BY_RANK = {1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d", None: "normswap.BatchNorm"}


def by_key(key: str) -> LayerClass:
    """The record a file's key names; :class:`NormswapError` for a key normswap does not know."""
    record = _BY_KEY.get(key) if isinstance(key, str) else None
    if record is None:
        raise NormswapError(f"unknown layer class {key!r}: normswap builds only {', '.join(_BY_KEY)}")
    return record


def record_of(module: object) -> Optional[LayerClass]:
    """The record of ``module``'s exact class (a subclass may compute something else), or ``None``. (Any object:
    the registry imports no torch, so that the command line's help, which lists the targets, does not wait for it.)"""
    return class_record(type(module))


def class_record(cls: type) -> Optional[LayerClass]:
    """The record of the class ``cls`` itself, or ``None``."""
    if cls not in _BY_CLASS:
        found = next((r for r in LAYER_CLASSES if r.name == cls.__name__ and r.loaded() is cls), None)
        if found is None and cls.__module__ in {r.module for r in LAYER_CLASSES if r.loaded() is None}:
            return None  # its module is still being imported: look again next time
        _BY_CLASS[cls] = found
    return _BY_CLASS[cls]


def target(name: str) -> Target:
    """The target called ``name``; :class:`NormswapError` listing the targets for any other name."""
    for record in TARGETS:
        if record.name == name:
            return record
    raise NormswapError(f"unknown target {name!r}: choose one of {', '.join(TARGET_NAMES)}")


def target_class(name: str, rank: Optional[int], fused: bool) -> type:
    """The class a layer of input rank ``rank`` (with a fused activation or not) becomes under the target ``name``."""
    chosen = target(name)
    if fused:
        return by_key(chosen.fused).load()
    if chosen.family == "bn":
        return by_key(_BATCH_NORM_BY_RANK.get(rank, "normswap.BatchNorm")).load()
    return by_key(chosen.plain).load()
