"""What normswap knows about normalization layers: one record per layer class, one per family of classes.

Every question about a layer class — what it computes, whether it carries a fused activation, the input rank it is
made for, how a checkpoint's manifest describes it and how a layer is built back from that description, whether a
plan converts it, folding folds it, recalibration recalibrates it — is answered by its :class:`LayerClass` record
and the :class:`Family` record of what it computes (``"bn"``, ``"sync"``, ``"frozen"``, ``"gn"``, ``"folded"``).
A new class is one record; each conversion target (``to="gn"``...) is a :class:`Target` record (its builder and
group count are functions of :mod:`normswap.targets`, named by the record). The registry imports no torch, so the
command line's help lists the targets without waiting for it.

A checkpoint's manifest (:mod:`normswap.checkpoint.manifest`) says which class each normalization layer is. Files
are data, so a file never names a class to import: it names a *key* of this registry (``"BatchNorm2d"``,
``"timm.BatchNormAct2d"``, ``"transformers.DetrFrozenBatchNorm2d"``), and only the classes listed here can be built
from a file. Classes of other libraries (timm, torchvision, transformers' DETR family and every
``*FrozenBatchNorm2d`` it defines, detectron2, mmcv) are looked up only once their modules are imported (a model can
only hold them then); normswap never imports a library to look for them. :func:`register_layer` adds a class of your
own. A module of no registered class that holds BatchNorm's per-channel state (``weight``, ``bias``,
``running_mean``, ``running_var``) is run on a probe input: if it computes BatchNorm's eval output it is treated as
frozen BatchNorm (:data:`PROVEN_FROZEN`), otherwise it is reported (:data:`UNPROVEN`), never silently ignored.

Example::

    >>> import torch
    >>> record = record_of(torch.nn.BatchNorm2d(4))
    >>> record.key, record.rank, record.foldable, record.calibratable, by_key("GroupNorm").family
    ('BatchNorm2d', 2, True, True, 'gn')
    >>> record.arguments(torch.nn.BatchNorm2d(4, momentum=None))["momentum"] is None
    True
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import NormswapError

Module = Any
"""A ``torch.nn.Module`` in this module's annotations: the registry imports no torch, so that the command line's help
lists the targets without waiting for it (and ``typing.get_type_hints`` resolves without torch)."""

__all__ = ["FAMILIES", "LAYER_CLASSES", "LAZY", "PROVEN_FROZEN", "TARGETS", "TARGET_NAMES", "UNKNOWN", "UNPROVEN",
           "Family", "LayerClass", "Target", "by_key", "channels_of", "class_record", "eps_of", "probe_batch_norm",
           "probed", "proven_record", "record_of", "register_layer", "target", "target_class"]

RANK_ATTR = "normswap_rank"
"""Attribute of a SyncBatchNorm made by normswap: the rank (1, 2, 3) of the BatchNorm it replaced."""


def _has_bias(module: Module) -> bool:
    return getattr(module, "bias", None) is not None


def channels_of(module: Module) -> int:
    """The channel count of a norm layer (``num_features``, ``num_channels``, or its tensors' length)."""
    from torch import nn

    if isinstance(module, nn.GroupNorm):
        return int(module.num_channels)
    if isinstance(getattr(module, "num_features", None), int):
        return int(module.num_features)
    return int(module.running_mean.shape[0] if getattr(module, "weight", None) is None else module.weight.shape[0])


@dataclass(frozen=True)
class Family:
    """What a kind of layer computes and which operations apply to it.

    ``arguments(record, module)`` gives the constructor arguments a manifest records for a layer of the family,
    ``construct(record, cls, entry)`` builds a layer back from them (raising ``KeyError``, ``TypeError`` or
    ``ValueError`` for a malformed entry).
    """

    name: str
    label: str
    converts: bool
    foldable: bool
    calibratable: bool
    arguments: Callable[["LayerClass", Module], dict[str, Any]]
    construct: Callable[["LayerClass", type, dict[str, Any]], Module]


def _no_activation(cls: type) -> dict[str, Any]:
    """``apply_act=False`` for a timm class that takes it: a fused layer's activation is set afterwards."""
    return {"apply_act": False} if "apply_act" in inspect.signature(cls).parameters else {}


def _batch_norm_arguments(record: "LayerClass", module: Module) -> dict[str, Any]:
    entry = dict(num_features=channels_of(module), eps=float(module.eps), momentum=module.momentum,
                 affine=bool(module.affine), track_running_stats=bool(module.track_running_stats),
                 bias=_has_bias(module))
    if record.family == "sync":
        entry["rank"] = getattr(module, RANK_ATTR, None)
    return entry


def _construct_batch_norm(record: "LayerClass", cls: type, entry: dict[str, Any]) -> Module:
    new = cls(entry["num_features"], eps=entry["eps"], momentum=entry["momentum"], affine=entry["affine"],
              track_running_stats=entry["track_running_stats"], **_no_activation(cls))
    if record.family == "sync" and entry.get("rank") is not None:
        setattr(new, RANK_ATTR, entry["rank"])
    return new


def _group_norm_arguments(record: "LayerClass", module: Module) -> dict[str, Any]:
    return dict(num_groups=int(module.num_groups), num_channels=int(module.num_channels), eps=float(module.eps),
                affine=bool(module.affine), bias=_has_bias(module))


def _construct_group_norm(record: "LayerClass", cls: type, entry: dict[str, Any]) -> Module:
    if record.fused:
        return cls(entry["num_channels"], entry["num_groups"], eps=entry["eps"], affine=entry["affine"],
                   **_no_activation(cls))
    return cls(entry["num_groups"], entry["num_channels"], eps=entry["eps"], affine=entry["affine"])


def _frozen_arguments(record: "LayerClass", module: Module) -> dict[str, Any]:
    entry: dict[str, Any] = dict(num_features=channels_of(module), eps=eps_of(module))
    if record.key.startswith("normswap."):
        entry.update(rank=module.rank, trainable_affine=bool(module.trainable_affine), bias=_has_bias(module))
    return entry


def _construct_frozen(record: "LayerClass", cls: type, entry: dict[str, Any]) -> Module:
    if record.key.startswith("normswap."):
        return cls(entry["num_features"], entry["eps"], rank=entry["rank"],
                   trainable_affine=entry["trainable_affine"], bias=entry["bias"])
    if record is PROVEN_FROZEN:
        raise TypeError("a layer recognised by what it computes is built by the architecture itself, not from a file")
    parameters = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = _no_activation(cls)
    if "eps" in parameters:
        kwargs["eps"] = entry["eps"]
    new = cls(entry["num_features"], **kwargs)
    if eps_of(new) != entry["eps"]:
        raise ValueError(f"a {cls.__name__} computes with eps {eps_of(new)}, the record says {entry['eps']}")
    return new


def _no_arguments(record: "LayerClass", module: Module) -> dict[str, Any]:
    return {}


def _construct_folded(record: "LayerClass", cls: type, entry: dict[str, Any]) -> Module:
    from torch import nn

    return cls(nn.Identity(), nn.Identity()) if record.fused else cls()


FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("bn", "BatchNorm", True, True, True, _batch_norm_arguments, _construct_batch_norm),
    Family("sync", "SyncBatchNorm", True, True, True, _batch_norm_arguments, _construct_batch_norm),
    Family("frozen", "frozen", True, True, False, _frozen_arguments, _construct_frozen),
    Family("gn", "GroupNorm", False, False, False, _group_norm_arguments, _construct_group_norm),
    Family("folded", "folded", False, False, False, _no_arguments, _construct_folded),
)}
"""Every family, by name: what its layers compute and which operations apply to them."""


@dataclass(frozen=True)
class LayerClass:
    """One class normswap can describe and rebuild.

    ``family`` names its :class:`Family` (``"bn"``, ``"sync"``, ``"frozen"``, ``"gn"``, ``"folded"``; ``"lazy"``,
    ``"unknown"`` and ``"unproven"`` for the layers that are reported but not handled). ``fused`` layers carry a
    ``drop`` and an ``act`` module; ``rank`` is the input rank the class is made for (1, 2, 3), ``None`` for any;
    ``eps`` the eps a class without an ``eps`` attribute computes with.
    """

    key: str
    module: str
    name: str
    family: str
    fused: bool = False
    rank: Optional[int] = None
    eps: Optional[float] = None

    @property
    def kind(self) -> Optional[Family]:
        return FAMILIES.get(self.family)

    @property
    def converts(self) -> bool:
        """A plan converts layers of this class (BatchNorm, SyncBatchNorm, frozen BatchNorm)."""
        return self.kind is not None and self.kind.converts

    @property
    def foldable(self) -> bool:
        """Its eval output is a per-channel affine map that folding can multiply into the layer before it."""
        return self.kind is not None and self.kind.foldable

    @property
    def calibratable(self) -> bool:
        """Recalibration gives it new running statistics (frozen layers keep theirs by design)."""
        return self.kind is not None and self.kind.calibratable

    @property
    def label(self) -> str:
        """What its layers are, in words: ``"BatchNorm"``, ``"GroupNorm"``, ``"frozen"``..."""
        return self.kind.label if self.kind is not None else self.family

    def arguments(self, module: Module) -> dict[str, Any]:
        """The constructor arguments of ``module`` (a layer of this class) that a manifest records."""
        return self.kind.arguments(self, module)

    def construct(self, entry: dict[str, Any]) -> Module:
        """A new layer of this class with the arguments ``entry`` records (its values are left to be loaded)."""
        return self.kind.construct(self, self.load(), entry)

    def loaded(self) -> Optional[type]:
        """The class, if its module has been imported (never imports)."""
        module = sys.modules.get(self.module)
        return getattr(module, self.name, None) if module is not None else None

    def load(self) -> type:
        """The class, importing its module only for normswap's own dependencies (torch, timm, torchvision); another
        library's class must already be loaded (a model holding it has imported it)."""
        found = self.loaded()
        if found is not None:
            return found
        if self.module.split(".")[0] not in ("torch", "normswap", "timm", "torchvision"):
            raise NormswapError(f"the layer class {self.key} comes from {self.module}, which is not imported: build "
                                "the architecture that uses it first")
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
    LayerClass("detectron2.FrozenBatchNorm2d", "detectron2.layers.batch_norm", "FrozenBatchNorm2d", "frozen",
               rank=2),
    LayerClass("mmcv.SyncBatchNorm", "mmcv.ops.sync_bn", "SyncBatchNorm", "sync"),
    LayerClass("Identity", "torch.nn", "Identity", "folded"),
    LayerClass("normswap.FoldedAct", "normswap.layers", "FoldedAct", "folded", fused=True),
)
"""The classes normswap ships records for, by key (transformers' frozen BatchNorm classes and those of
:func:`register_layer` are added to them when seen)."""

UNKNOWN = LayerClass("unknown", "", "", "unknown")
"""A subclass of a BatchNorm class normswap does not know (its forward may differ): reported, never converted
unless asked."""

LAZY = LayerClass("lazy", "", "", "lazy")
"""An uninitialized lazy BatchNorm: it has no channel count until its first forward."""

PROVEN_FROZEN = LayerClass("frozen-batch-norm", "", "", "frozen")
"""A module of no registered class with BatchNorm's state that computes BatchNorm's eval output on a probe input
(:func:`probe_batch_norm`): converted, folded and saved as a frozen BatchNorm."""

UNPROVEN = LayerClass("unproven", "", "", "unproven")
"""A module with BatchNorm's state that does not compute BatchNorm's eval output on the probe input (or cannot be
run on one): reported with the reason, never converted."""

_REGISTERED: dict[str, LayerClass] = {}
_BY_KEY = {record.key: record for record in LAYER_CLASSES}
_BY_CLASS: dict[type, Optional[LayerClass]] = {}
_PROBED: "weakref.WeakKeyDictionary[Module, tuple[Optional[float], str]]" = weakref.WeakKeyDictionary()
_TRANSFORMERS_FROZEN = "FrozenBatchNorm2d"


def _transformers_records() -> list[LayerClass]:
    """A record for every ``*FrozenBatchNorm2d`` class of every transformers model module already imported."""
    from torch import nn

    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("transformers.models.") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if attr.endswith(_TRANSFORMERS_FROZEN) and isinstance(value, type) and value.__module__ == name \
                    and issubclass(value, nn.Module):
                found.append(LayerClass(f"transformers.{attr}", name, attr, "frozen", rank=2, eps=1e-5))
    return found


def _records_named(name: str) -> list[LayerClass]:
    """Every record of a class called ``name`` (transformers' modules are searched only for its frozen names)."""
    found = _transformers_records() if name.endswith(_TRANSFORMERS_FROZEN) else []
    return [r for r in (*LAYER_CLASSES, *_REGISTERED.values(), *found) if r.name == name]


def by_key(key: str) -> LayerClass:
    """The record a file's key names; :class:`NormswapError` for a key normswap does not know."""
    record = (_BY_KEY.get(key) or _REGISTERED.get(key)) if isinstance(key, str) else None
    if record is None and isinstance(key, str) and key.startswith("transformers."):
        record = next((r for r in _transformers_records() if r.key == key), None)
    if record is None:
        known = ", ".join([*_BY_KEY, *_REGISTERED])
        raise NormswapError(f"unknown layer class {key!r}: normswap builds only {known} (and the frozen BatchNorm "
                            "classes of transformers models once they are built)")
    return record


def record_of(module: Module) -> Optional[LayerClass]:
    """The record of ``module``'s exact class (a subclass may compute something else), or ``None``."""
    return class_record(type(module))


def class_record(cls: type) -> Optional[LayerClass]:
    """The record of the class ``cls`` itself, or ``None``."""
    if cls not in _BY_CLASS:
        records = _records_named(cls.__name__)
        found = next((r for r in records if r.loaded() is cls), None)
        if found is None and cls.__module__ in {r.module for r in records if r.loaded() is None}:
            return None  # its module is still being imported: look again next time
        if found is not None and found.key.startswith("transformers.") and probe_batch_norm(cls, found) is None:
            found = None  # a transformers class by that name that does not compute BatchNorm's eval output
        _BY_CLASS[cls] = found
    return _BY_CLASS[cls]


def register_layer(cls: type, family: str = "frozen", *, key: Optional[str] = None, rank: Optional[int] = None,
                   fused: bool = False) -> LayerClass:
    """Tell normswap about a norm layer class of your own; returns its record.

    Layers of ``cls`` are then converted, frozen, folded, recalibrated (``"bn"``, ``"sync"``), saved and loaded like
    the built-in ones; a file names the class by ``key`` (default ``"<package>.<ClassName>"``), never by its import
    path, and loads only where ``register_layer`` ran before. ``family``: ``"frozen"`` for a layer computing
    ``(x - running_mean) / sqrt(running_var + eps) * weight + bias`` with fixed statistics (its constructor takes
    the channel count, and ``eps`` if it has one), ``"bn"`` or ``"sync"`` for one with ``nn.BatchNorm2d``'s
    constructor and attributes. ``rank`` is the input rank it is made for (2 for ``(N, C, H, W)``), ``fused`` says it
    carries ``drop`` and ``act`` modules. Registering the same class again with the same record is a no-op.
    The class is never imported by normswap: a file of such a layer loads once your code has registered it.

    >>> import torch
    >>> import torch.nn.functional as F
    >>> class MyFrozenBN(torch.nn.Module):
    ...     def __init__(self, n, eps=1e-5):
    ...         super().__init__()
    ...         self.eps = eps
    ...         for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
    ...             self.register_buffer(name, torch.full((n,), value))
    ...     def forward(self, x):
    ...         return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0, self.eps)
    >>> register_layer(MyFrozenBN, rank=2, key="mylib.MyFrozenBN").key
    'mylib.MyFrozenBN'
    """
    from torch import nn

    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise NormswapError(f"register_layer takes an nn.Module class, got {cls!r}")
    if family not in ("frozen", "bn", "sync"):
        raise NormswapError(f"register_layer: family must be 'frozen', 'bn' or 'sync', got {family!r}")
    if rank not in (None, 1, 2, 3):
        raise NormswapError(f"register_layer: rank must be 1, 2, 3 or None, got {rank!r}")
    if cls.__qualname__ != cls.__name__:
        raise NormswapError(f"register_layer: {cls.__qualname__} is nested in another class or function; define it "
                            "at the top level of a module")
    package = cls.__module__.split(".")[0]
    if key is None:
        key = f"{'user' if package == '__main__' else package}.{cls.__name__}"
    if not isinstance(key, str) or not key or key in _BY_KEY or key.startswith("transformers."):
        raise NormswapError(f"register_layer: key {key!r} is taken by normswap's own records; choose another")
    record = LayerClass(key, cls.__module__, cls.__name__, family, fused=fused, rank=rank)
    existing = _REGISTERED.get(key)
    if existing is not None and existing != record:
        raise NormswapError(f"register_layer: key {key!r} is already registered for {existing.module}."
                            f"{existing.name}")
    known = class_record(cls)
    if known is not None and known != record:
        raise NormswapError(f"register_layer: {cls.__name__} is already known as {known.key!r}")
    if existing is not None:
        return existing
    _REGISTERED[key] = record
    _BY_CLASS[cls] = record
    return record


def _may_have(module: Module, name: str) -> bool:
    """False only if ``module`` certainly has no attribute ``name``: not in its buffers, parameters, instance
    dictionary or class (cheaper than the AttributeError a missing module attribute costs)."""
    entries = vars(module)
    return name in (entries.get("_buffers") or ()) or name in (entries.get("_parameters") or ()) \
        or name in (entries.get("_modules") or ()) or name in entries or hasattr(type(module), name)


def may_hold_statistics(module: Module) -> bool:
    """False only if ``module`` certainly has no ``running_mean``: no BatchNorm-like layer, registered or not (every
    one has that buffer, ``None`` where it keeps no statistics). Answers most modules of a model in well under a
    microsecond."""
    return _may_have(module, "running_mean")


def _has_batch_norm_state(module: Module) -> bool:
    """True if ``module`` holds one-dimensional ``running_mean`` and ``running_var`` tensors of one length, and
    ``weight`` and ``bias`` of that length (or ``None``)."""
    if not may_hold_statistics(module):  # most modules of a model: answered without an attribute error
        return False
    import torch

    mean, var = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if not (isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor) and mean.dim() == 1
            and mean.shape == var.shape and mean.numel() > 0):
        return False
    for name in ("weight", "bias"):
        value = getattr(module, name, None)
        if value is not None and not (isinstance(value, torch.Tensor) and value.shape == mean.shape):
            return False
    return True


_PROBE_SHAPES = ((3, 3), (), (3,), (2, 2, 2))
_EPS_CANDIDATES = (1e-5, 1e-3, 1e-4, 1e-6, 1e-12, 0.0)


def probe_batch_norm(module: Any, record: Optional[LayerClass] = None) -> Optional[float]:
    """The eps with which ``module`` (a module, or a class whose one-argument constructor takes the channel count)
    computes BatchNorm's eval output, ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``, on a probe
    input; ``None`` if it does not (or cannot be run on one).

    A copy of the module gets random statistics and affine values in float64 (small variances, so that the eps
    shows) and is run on ``(2, C, 3, 3)``, ``(2, C)``, ``(2, C, 3)`` and ``(2, C, 2, 2, 2)`` inputs until one runs;
    the module itself is not called or changed.

    >>> import torch
    >>> probe_batch_norm(torch.nn.BatchNorm2d(3, eps=1e-3).eval()), probe_batch_norm(torch.nn.GroupNorm(1, 3))
    (0.001, None)
    """
    import torch
    import torch.nn.functional as F

    try:
        probe = module(4) if isinstance(module, type) else copy.deepcopy(module)
        if not _has_batch_norm_state(probe):
            return None
        if any(t.device.type == "meta" for t in (*probe.parameters(), *probe.buffers())):
            probe = probe.to_empty(device="cpu")
        probe = probe.to(torch.float64).eval()
        channels = probe.running_mean.shape[0]
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            probe.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
            probe.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) * 1e-3 + 1e-4)
            for name in ("weight", "bias"):
                value = getattr(probe, name, None)
                if value is not None:
                    value.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        stated = getattr(probe, "eps", None)
        candidates = [float(stated)] if isinstance(stated, (int, float)) and not isinstance(stated, bool) else []
        candidates += [eps for eps in ((record.eps,) if record and record.eps is not None else ()) + _EPS_CANDIDATES
                       if eps not in candidates]
        for shape in _PROBE_SHAPES:
            x = torch.randn(2, channels, *shape, generator=generator, dtype=torch.float64)
            try:
                with torch.no_grad():
                    got = type(probe).forward(probe, x)
            except Exception:
                continue
            if not isinstance(got, torch.Tensor) or got.shape != x.shape or got.dtype != torch.float64:
                return None
            weight, bias = getattr(probe, "weight", None), getattr(probe, "bias", None)
            for eps in candidates:
                expected = F.batch_norm(x, probe.running_mean, probe.running_var, weight, bias, False, 0.0, eps)
                if torch.allclose(got, expected, rtol=1e-7, atol=1e-9):
                    return eps
            return None
    except Exception:
        return None
    return None


def probed(module: Module) -> tuple[Optional[float], str]:
    """The eps with which a module of no registered class that holds BatchNorm's state computes BatchNorm's eval
    output, and ``""``; or ``None`` and why it is not taken for BatchNorm. Cached per module."""
    found = _PROBED.get(module)
    if found is None:
        if any(True for _ in module.children()):
            found = (None, "has BatchNorm's state but also submodules, so it may compute more than BatchNorm")
        else:
            eps = probe_batch_norm(module)
            found = (eps, "") if eps is not None else (
                None, "has BatchNorm's state but does not compute BatchNorm's eval output on a probe input")
        _PROBED[module] = found
    return found


def proven_record(module: Module) -> Optional[LayerClass]:
    """:data:`PROVEN_FROZEN`, :data:`UNPROVEN` or ``None`` for a module of no registered class: what the probe
    makes of a module holding BatchNorm's state (``None`` for one that holds none)."""
    if not _has_batch_norm_state(module):
        return None
    return PROVEN_FROZEN if probed(module)[0] is not None else UNPROVEN


def eps_of(module: Module) -> float:
    """The eps a norm layer computes with: its ``eps`` attribute, its class record's, or what the probe found."""
    stated = getattr(module, "eps", None)
    if isinstance(stated, (int, float)) and not isinstance(stated, bool):
        return float(stated)
    record = record_of(module)
    if record is not None and record.eps is not None:
        return float(record.eps)
    eps = probed(module)[0]
    if eps is None:
        raise NormswapError(f"{type(module).__name__} does not say which eps it computes with")
    return float(eps)


@dataclass(frozen=True)
class Target:
    """One value of ``to=``: the family layers become, the registry keys of the classes they become (``plain``
    for a layer without a fused activation, ``fused`` for one with; BatchNorm's plain class depends on the rank),
    the plan options only this target takes, and, by name, the functions of :mod:`normswap.targets` that build a
    new layer from a source (``builder``) and give a GroupNorm target's group count (``groups``): see
    :func:`normswap.targets.build` and :func:`normswap.targets.group_count`."""

    name: str
    family: str
    plain: str
    fused: str
    help: str
    builder: str
    groups: Optional[str] = None
    options: tuple[str, ...] = ()

    @property
    def grouped(self) -> bool:
        """Layers become GroupNorm: the plan gives them a group count, ``affine=`` modes apply."""
        return self.groups is not None

    def layer_class(self, rank: Optional[int], fused: bool) -> type:
        """The class a layer of input rank ``rank`` (with a fused activation or not) becomes."""
        if fused:
            return by_key(self.fused).load()
        if self.family == "bn":
            return by_key(_BATCH_NORM_BY_RANK.get(rank, "normswap.BatchNorm")).load()
        return by_key(self.plain).load()


_BATCH_NORM_BY_RANK = {1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d", None: "normswap.BatchNorm"}

TARGETS: tuple[Target, ...] = (
    Target("gn", "gn", "GroupNorm", "timm.GroupNormAct", "GroupNorm (32 groups, or groups=)", "_build_group_norm",
           "_chosen_groups", ("groups", "channels_per_group")),
    Target("ln", "gn", "GroupNorm", "timm.GroupNormAct", "GroupNorm with one group (LayerNorm-style)",
           "_build_group_norm", "_one_group"),
    Target("in", "gn", "GroupNorm", "timm.GroupNormAct", "GroupNorm with one group per channel (InstanceNorm-style)",
           "_build_group_norm", "_group_per_channel"),
    Target("frozen", "frozen", "normswap.FrozenBatchNorm", "normswap.FrozenBatchNormAct", "FrozenBatchNorm",
           "_build_frozen", options=("trainable_affine",)),
    Target("sync", "sync", "SyncBatchNorm", "timm.SyncBatchNormAct", "SyncBatchNorm", "_build_sync"),
    Target("bn", "bn", "BatchNorm2d", "timm.BatchNormAct2d", "plain BatchNorm of the original rank", "_build_bn"),
)
"""Every conversion target, in the order the documentation lists them."""

TARGET_NAMES = tuple(t.name for t in TARGETS)
"""Every value ``to=`` accepts (and ``--to``, and a recipe rule's ``to``)."""


def target(name: str) -> Target:
    """The target called ``name``; :class:`NormswapError` listing the targets for any other name.

    >>> target("ln").family, target("ln").grouped, target_class("frozen", rank=2, fused=True).__name__
    ('gn', True, 'FrozenBatchNormAct')
    """
    for record in TARGETS:
        if record.name == name:
            return record
    raise NormswapError(f"unknown target {name!r}: choose one of {', '.join(TARGET_NAMES)}")


def target_class(name: str, rank: Optional[int], fused: bool) -> type:
    """The class a layer of input rank ``rank`` (with a fused activation or not) becomes under the target ``name``."""
    return target(name).layer_class(rank, fused)
