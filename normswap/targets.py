"""Conversions of one layer: recognising a source layer, reading it through one view, and one builder per target.

What each class is lives in :mod:`normswap.registry`; this module classifies modules with it, and holds one
:class:`Target` record per value of ``to=``: the family layers become, the classes they become, how many groups
they get and how the new layer is built from the source. Sources are classified by exact class (a subclass may
override ``forward``; converting it silently would lose that behaviour, so unknown subclasses are reported
separately); a module of no registered class that holds BatchNorm's state is proven to compute BatchNorm or reported
(:func:`normswap.registry.probe_batch_norm`). Every source is read through one view, :class:`SourceLayer`, so each
target needs one builder, whatever the source:

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

timm's and torchvision's classes are recognised once their modules are imported: a model can only hold them then, so
``import normswap`` does not import timm or torchvision (and the ``torch._dynamo`` that torchvision imports).

Affine parameters and statistics tensors are moved, not copied, where the target keeps them unchanged: an optimizer
built before a ``sync``/``bn``/``gn`` conversion still points at the live parameters, and a 1 GB model is not
duplicated in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import registry
from .errors import PlanError
from .layers import FrozenBatchNorm
from .plan_rows import PlanRow

__all__ = ["TARGETS", "TARGET_NAMES", "TARGET_RECORDS", "SourceLayer", "Target", "build", "choose_groups",
           "class_path", "classify", "fallback_class", "is_norm_layer", "target", "target_class"]

RANK_ATTR = registry.RANK_ATTR
"""Attribute that a SyncBatchNorm made by normswap carries: the rank (1, 2, 3) of the BatchNorm it replaced."""

_FROZEN_FAMILY = [record for record in registry.LAYER_CLASSES if record.family == "frozen"]


def class_path(cls: type) -> str:
    """``module.QualName`` of a class, as recorded in plans: ``class_path(nn.BatchNorm2d)``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _batch_norm_bases() -> tuple[type, ...]:
    """Every class whose unrecognised subclasses are reported as unknown rather than ignored: BatchNorm's base and
    every frozen BatchNorm class loaded."""
    loaded = [record.loaded() for record in _FROZEN_FAMILY]
    return (nn.modules.batchnorm._BatchNorm, *[cls for cls in loaded if cls is not None])


def classify(module: nn.Module) -> Optional[registry.LayerClass]:
    """The registry record of a norm layer (:class:`normswap.registry.LayerClass`), :data:`~normswap.registry.LAZY`
    for an uninitialized lazy BatchNorm, :data:`~normswap.registry.UNKNOWN` for an unrecognised subclass of a
    BatchNorm or frozen BatchNorm class, or ``None`` for a module that is not a BatchNorm-like layer.

    >>> classify(nn.BatchNorm2d(4)).family, classify(nn.InstanceNorm2d(4)), classify(nn.LazyBatchNorm2d()).family
    ('bn', None, 'lazy')
    """
    record = registry.record_of(module)
    if record is not None:
        return record if record.family != "folded" else None
    if not registry.may_hold_statistics(module):  # most modules of a model
        return None
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and isinstance(module, nn.modules.batchnorm._BatchNorm):
        return registry.LAZY
    if isinstance(module, _batch_norm_bases()):
        return registry.UNKNOWN
    return registry.proven_record(module)


def is_norm_layer(module: nn.Module) -> bool:
    """True for every layer normswap recognises or reports (including lazy and unknown BatchNorm classes)."""
    return classify(module) is not None


def fallback_class(module: nn.Module) -> registry.LayerClass:
    """The record an unknown subclass is converted as, when the user opts in: its nearest known base class's."""
    for base in type(module).__mro__:
        record = registry.class_record(base)
        if record is not None and record.family != "folded":
            return record
    return registry.by_key("normswap.BatchNorm")


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
        # (a fused activation is a child module: looked up there, not through a failing getattr on most layers)
        act = module._modules.get("act")
        fused = isinstance(act, nn.Module)
        return cls(
            num_features=registry.channels_of(module),
            eps=registry.eps_of(module),
            momentum=getattr(module, "momentum", 0.1),
            weight=_tensor_attribute(module, "weight"),
            bias=_tensor_attribute(module, "bias"),
            running_mean=_tensor_attribute(module, "running_mean"),
            running_var=_tensor_attribute(module, "running_var"),
            num_batches_tracked=_tensor_attribute(module, "num_batches_tracked"),
            rank=source_rank(module),
            act=act if fused else None,
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


def _tensor_attribute(module: nn.Module, name: str) -> Any:
    """``getattr(module, name, None)``, read from the module's parameters or buffers directly where its class does
    not define ``name`` (``nn.Module.__getattr__`` is reached only after a failed lookup, several times slower)."""
    kind = type(module)
    defines = _DEFINES.get((kind, name))
    if defines is None:
        defines = _DEFINES[(kind, name)] = any(name in vars(base) for base in kind.__mro__)
    if not defines and name not in module.__dict__:
        for entries in (module._parameters, module._buffers):
            if name in entries:
                return entries[name]
    return getattr(module, name, None)


_DEFINES: dict[tuple[type, str], bool] = {}
"""Whether a class (or a base) defines an attribute: one entry per norm layer class and tensor name."""


def source_rank(module: nn.Module) -> Optional[int]:
    """The input rank (1, 2, 3) a norm layer was made for (also for subclasses), or ``None`` if nothing says."""
    if isinstance(module, FrozenBatchNorm):
        return module.rank
    for base in type(module).__mro__:
        record = registry.class_record(base)
        if record is not None and record.rank is not None:
            return record.rank
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
        new = target_class(row.target, src.rank, fused=True)(
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


def _one_group(channels: int, options: dict[str, Any], layer: str) -> int:
    return 1


def _group_per_channel(channels: int, options: dict[str, Any], layer: str) -> int:
    return channels


def _chosen_groups(channels: int, options: dict[str, Any], layer: str) -> int:
    return choose_groups(channels, options.get("groups") or DEFAULT_GROUPS,
                         channels_per_group=options.get("channels_per_group"),
                         group_policy=options.get("group_policy", "divisor"), layer=layer)


Target = registry.Target
"""One value of ``to=`` (see :class:`normswap.registry.Target`): its records name the builders and group counts
above."""

TARGET_RECORDS = registry.TARGETS
"""Every conversion target, in the order the documentation lists them."""

TARGET_NAMES = registry.TARGET_NAMES
"""Every value ``to=`` accepts (and ``--to``, and a recipe rule's ``to``)."""

TARGETS = TARGET_NAMES
"""Every value ``to=`` accepts."""

target = registry.target
target_class = registry.target_class

DEFAULT_GROUPS = 32


def choose_groups(
    channels: int,
    groups: int = 32,
    *,
    channels_per_group: Optional[int] = None,
    group_policy: str = "divisor",
    layer: str = "",
) -> int:
    """The GroupNorm group count for a layer of ``channels`` channels.

    ``group_policy="divisor"``: the largest divisor of ``channels`` not above ``groups``; with
    ``channels_per_group=K``, the divisor of ``channels`` nearest to ``channels / K`` (ties go to more groups).
    ``group_policy="exact"``: ``groups`` (or ``channels / K``) must divide evenly, else :class:`PlanError` naming
    the layer.

    >>> choose_groups(96, 32), choose_groups(100, 32), choose_groups(64, channels_per_group=16)
    (32, 25, 4)
    """
    where = f"layer '{layer}' has" if layer else "got"
    if channels_per_group is not None:
        if channels % channels_per_group == 0:
            return channels // channels_per_group
        if group_policy == "exact":
            raise PlanError(
                f"{where} {channels} channels, not divisible by channels_per_group={channels_per_group} "
                "(use group_policy='divisor' to take the nearest divisor)"
            )
        wanted = channels / channels_per_group
        divisors = [d for d in range(1, channels + 1) if channels % d == 0]
        return min(divisors, key=lambda d: (abs(d - wanted), -d))
    if channels % groups == 0:
        return groups
    if group_policy == "exact":
        raise PlanError(
            f"{where} {channels} channels, not divisible by {groups} groups "
            "(use group_policy='divisor' to take the largest divisor below it)"
        )
    return max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)


_BUILDERS = {function.__name__: function for function in (_build_group_norm, _build_frozen, _build_sync, _build_bn)}
"""The builders a :class:`normswap.registry.Target` names (``builder``)."""

_GROUP_COUNTS = {function.__name__: function for function in (_one_group, _group_per_channel, _chosen_groups)}
"""The group counts a GroupNorm :class:`normswap.registry.Target` names (``groups``)."""


def group_count(chosen: registry.Target, channels: int, options: dict[str, Any], layer: str) -> int:
    """The group count a layer of ``channels`` channels gets under target ``chosen`` and the plan's ``options``."""
    return _GROUP_COUNTS[chosen.groups](channels, options, layer)


def build(module: nn.Module, row: "PlanRow", *, process_group: Any = None) -> nn.Module:
    """The replacement for ``module`` described by ``row``; ``module`` itself is not changed. ``process_group`` is
    the group a new SyncBatchNorm reduces over."""
    src = SourceLayer.read(module)
    new = _BUILDERS[target(row.target).builder](src, row)
    if isinstance(new, nn.SyncBatchNorm):
        new.process_group = process_group
    new.train(src.training)
    return new
