"""The one registry of what normswap can convert: source layer kinds, targets, and the builder for each target.

Sources are classified by exact class (a subclass may override ``forward``; converting it silently would lose that
behaviour, so unknown subclasses are reported separately). Every source is read through one view,
:class:`SourceLayer`, so each target needs one builder, whatever the source:

========  ==========================================  ==============================================
target    plain layer becomes                         layer with fused activation becomes
========  ==========================================  ==============================================
gn/ln/in  ``nn.GroupNorm`` (G groups, 1, or C)        timm ``GroupNormAct``
frozen    :class:`normswap.layers.FrozenBatchNorm`    :class:`normswap.layers.FrozenBatchNormAct`
sync      ``nn.SyncBatchNorm``                        timm ``SyncBatchNormAct``
bn        ``nn.BatchNorm{1,2,3}d`` by original rank   timm ``BatchNormAct2d``
========  ==========================================  ==============================================

A source built with ``bias=False`` gives a target without bias, frozen layers included (``affine="fit"`` fits a
shift, so it keeps a bias).

timm's and torchvision's classes join the registry once their modules are imported: a model can only hold them then,
so ``import normswap`` does not import timm or torchvision (and the ``torch._dynamo`` that torchvision imports).

Affine parameters and statistics tensors are moved, not copied, where the target keeps them unchanged: an optimizer
built before a ``sync``/``bn``/``gn`` conversion still points at the live parameters, and a 1 GB model is not
duplicated in memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch import nn

from .layers import BatchNorm, FrozenBatchNorm, FrozenBatchNormAct

if TYPE_CHECKING:
    from .plan import PlanRow

__all__ = ["TARGETS", "SourceLayer", "build", "class_path", "classify", "is_norm_layer"]

TARGETS = ("gn", "ln", "in", "frozen", "sync", "bn")
"""Every value ``to=`` accepts."""

RANK_ATTR = "normswap_rank"
"""Attribute that a SyncBatchNorm made by normswap carries: the rank (1, 2, 3) of the BatchNorm it replaced."""

# Exact class -> source kind. "bn", "sync" and "frozen" convert; "gn" is already a target; kinds ending in "_act"
# carry a fused activation and drop path that every conversion keeps.
_KINDS: dict[type, str] = {
    nn.BatchNorm1d: "bn",
    nn.BatchNorm2d: "bn",
    nn.BatchNorm3d: "bn",
    BatchNorm: "bn",
    nn.SyncBatchNorm: "sync",
    FrozenBatchNorm: "frozen",
    FrozenBatchNormAct: "frozen_act",
    nn.GroupNorm: "gn",
}

_RANKS: dict[type, int] = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}

_BATCH_NORM_BASES: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)
"""Every class whose unrecognised subclasses are reported as ``"unknown"`` rather than ignored."""

# Module -> class name -> (kind, rank); registered by _register_imported() once the module is imported.
_PENDING: dict[str, dict[str, tuple[str, Optional[int]]]] = {
    "timm.layers.norm_act": {
        "BatchNormAct2d": ("bn_act", 2),
        "SyncBatchNormAct": ("sync_act", None),
        "FrozenBatchNormAct2d": ("frozen_act", 2),
        "GroupNormAct": ("gn_act", None),
    },
    "torchvision.ops.misc": {"FrozenBatchNorm2d": ("frozen", 2)},
}


def _register_imported() -> None:
    """Add the classes of every pending module that has been imported since the last call."""
    global _BATCH_NORM_BASES
    for module_name in [name for name in _PENDING if name in sys.modules]:
        module = sys.modules[module_name]
        classes = {name: getattr(module, name, None) for name in _PENDING[module_name]}
        if any(cls is None for cls in classes.values()):
            continue  # still being imported
        for name, cls in classes.items():
            kind, rank = _PENDING[module_name][name]
            _KINDS[cls] = kind
            if rank is not None:
                _RANKS[cls] = rank
            if kind.startswith("frozen"):
                _BATCH_NORM_BASES = (*_BATCH_NORM_BASES, cls)
        del _PENDING[module_name]


_BN_BY_RANK: dict[Optional[int], type] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d, None: BatchNorm}


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, as recorded in plans: ``class_path(nn.BatchNorm2d)``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def classify(module: nn.Module) -> Optional[str]:
    """The source kind of a module: one of the kinds above, ``"lazy"``, ``"unknown"`` (an unrecognised subclass of a
    BatchNorm or frozen BatchNorm class), or ``None`` for a module that is not a BatchNorm-like layer.

    >>> classify(nn.BatchNorm2d(4)), classify(nn.InstanceNorm2d(4)), classify(nn.LazyBatchNorm2d())
    ('bn', None, 'lazy')
    """
    _register_imported()
    kind = _KINDS.get(type(module))
    if kind is not None:
        return kind
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "lazy"
    if isinstance(module, _BATCH_NORM_BASES):
        return "unknown"
    return None


def is_norm_layer(module: nn.Module) -> bool:
    """True for every layer normswap recognises or reports (including lazy and unknown BatchNorm classes)."""
    return classify(module) is not None


def fallback_kind(module: nn.Module) -> str:
    """The kind an unknown subclass is converted as, when the user opts in: that of its nearest known base class."""
    _register_imported()
    for base in type(module).__mro__:
        if base in _KINDS:
            return _KINDS[base]
    return "bn"


@dataclass
class SourceLayer:
    """Everything a builder needs from a source layer, whatever its class."""

    num_features: int
    eps: float
    momentum: Optional[float]
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]
    rank: Optional[int]
    act: Optional[nn.Module]
    drop: Optional[nn.Module]
    training: bool

    @classmethod
    def read(cls, module: nn.Module) -> "SourceLayer":
        """Read a recognised norm layer (any source kind)."""
        fused = isinstance(getattr(module, "act", None), nn.Module)
        if isinstance(module, nn.GroupNorm):
            num_features = module.num_channels
        elif isinstance(module, nn.modules.batchnorm._NormBase):
            num_features = module.num_features
        else:
            num_features = module.weight.shape[0]
        return cls(
            num_features=num_features,
            eps=float(module.eps),
            momentum=getattr(module, "momentum", 0.1),
            weight=getattr(module, "weight", None),
            bias=getattr(module, "bias", None),
            running_mean=getattr(module, "running_mean", None),
            running_var=getattr(module, "running_var", None),
            num_batches_tracked=getattr(module, "num_batches_tracked", None),
            rank=source_rank(module),
            act=getattr(module, "act", None) if fused else None,
            drop=getattr(module, "drop", None) if fused else None,
            training=module.training,
        )

    @property
    def has_stats(self) -> bool:
        return self.running_mean is not None and self.running_var is not None

    def factory(self) -> dict:
        """``device`` and ``dtype`` for the new layer: those of the source's tensors."""
        for tensor in (self.weight, self.running_mean, self.running_var):
            if tensor is not None:
                return {"device": tensor.device, "dtype": tensor.dtype}
        return {}


def source_rank(module: nn.Module) -> Optional[int]:
    """The input rank (1, 2, 3) a norm layer was made for (also for subclasses), or ``None`` if nothing says."""
    if isinstance(module, FrozenBatchNorm):
        return module.rank
    _register_imported()
    for cls, rank in _RANKS.items():
        if isinstance(module, cls):
            return rank
    return getattr(module, RANK_ATTR, None)


def _as_parameter(tensor: Optional[torch.Tensor], fill: float, like: SourceLayer) -> nn.Parameter:
    """The source's affine tensor as a parameter (the same object if it already is one), or a filled one."""
    if isinstance(tensor, nn.Parameter):
        return tensor
    if tensor is None:
        return nn.Parameter(torch.full((like.num_features,), fill, **like.factory()))
    return nn.Parameter(tensor.detach())


def _fused(new: nn.Module, src: SourceLayer) -> nn.Module:
    if src.act is not None:
        new.act = src.act
        new.drop = src.drop if src.drop is not None else nn.Identity()
    return new


def _build_group_norm(src: SourceLayer, row: "PlanRow") -> nn.Module:
    affine = row.affine != "none"
    factory = src.factory()
    if src.act is not None:
        new = target_class("gn", src.rank, fused=True)(
            src.num_features, row.groups, eps=row.eps, affine=affine, apply_act=False, **factory
        )
        _fused(new, src)
    else:
        new = nn.GroupNorm(row.groups, src.num_features, eps=row.eps, affine=affine, **factory)
    if affine and row.affine in ("copy", "fit"):
        new.weight = _as_parameter(src.weight, 1.0, src)
        new.bias = _as_parameter(src.bias, 0.0, src)
    if affine and src.bias is None and row.affine != "fit":
        new.bias = None
    return new


def _build_frozen(src: SourceLayer, row: "PlanRow") -> nn.Module:
    cls = target_class("frozen", src.rank, src.act is not None)
    trainable = bool(row.trainable_affine)
    bias = src.weight is None or src.bias is not None
    new = cls(src.num_features, row.eps, rank=src.rank, trainable_affine=trainable, bias=bias, **src.factory())
    _fused(new, src)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            value = getattr(src, name)
            if value is not None:
                getattr(new, name).copy_(value.detach())
    if trainable and isinstance(src.weight, nn.Parameter):
        new.weight.requires_grad_(src.weight.requires_grad)
        if new.bias is not None:
            new.bias.requires_grad_(src.bias is not None and src.bias.requires_grad)
    return new


def _build_batch_norm(src: SourceLayer, row: "PlanRow", cls: type) -> nn.Module:
    affine = row.affine != "none"
    kwargs = dict(eps=row.eps, momentum=src.momentum, affine=affine, track_running_stats=src.has_stats)
    new = cls(src.num_features, **kwargs, **src.factory())
    _fused(new, src)
    if affine:
        new.weight = _as_parameter(src.weight, 1.0, src)
        new.bias = None if src.bias is None and src.weight is not None else _as_parameter(src.bias, 0.0, src)
    if src.has_stats:
        new.running_mean = src.running_mean
        new.running_var = src.running_var
        if src.num_batches_tracked is not None:
            new.num_batches_tracked = src.num_batches_tracked
    return new


def _build_sync(src: SourceLayer, row: "PlanRow") -> nn.Module:
    new = _build_batch_norm(src, row, target_class("sync", src.rank, src.act is not None))
    setattr(new, RANK_ATTR, src.rank)
    return new


def _build_bn(src: SourceLayer, row: "PlanRow") -> nn.Module:
    return _build_batch_norm(src, row, target_class("bn", src.rank, src.act is not None))


_BUILDERS: dict[str, Callable[[SourceLayer, "PlanRow"], nn.Module]] = {
    "gn": _build_group_norm,
    "ln": _build_group_norm,
    "in": _build_group_norm,
    "frozen": _build_frozen,
    "sync": _build_sync,
    "bn": _build_bn,
}


_TARGET_CLASSES: dict[tuple[str, bool], Union[type, str]] = {
    ("gn", False): nn.GroupNorm,
    ("gn", True): "GroupNormAct",
    ("frozen", False): FrozenBatchNorm,
    ("frozen", True): FrozenBatchNormAct,
    ("sync", False): nn.SyncBatchNorm,
    ("sync", True): "SyncBatchNormAct",
    ("bn", True): "BatchNormAct2d",
}
"""Target family and whether the layer has a fused activation -> its class, or the name of a class of timm's
``norm_act`` module (imported only then: a layer with a fused activation needs it)."""


def target_class(target: str, rank: Optional[int], fused: bool) -> type:
    """The class a layer becomes under ``target`` (``ln``/``in`` are GroupNorm with 1 or C groups); the builders
    and the plan both take it from here."""
    family = "gn" if target in ("gn", "ln", "in") else target
    if family == "bn" and not fused:
        return _BN_BY_RANK.get(rank, BatchNorm)
    cls = _TARGET_CLASSES[(family, fused)]
    if isinstance(cls, str):
        from timm.layers import norm_act

        cls = getattr(norm_act, cls)
    return cls


def build(module: nn.Module, row: "PlanRow", *, process_group: Any = None) -> nn.Module:
    """The replacement for ``module`` described by ``row``; ``module`` itself is not changed. ``process_group`` is
    the group a new SyncBatchNorm reduces over."""
    src = SourceLayer.read(module)
    new = _BUILDERS[row.target](src, row)
    if isinstance(new, nn.SyncBatchNorm):
        new.process_group = process_group
    new.train(src.training)
    return new
