"""The manifest: what a checkpoint says about the structure of its model, derived from the module tree.

A model that normswap changed differs from the architecture it was built from in two ways only: some normalization
layers are of another class (GroupNorm, FrozenBatchNorm, SyncBatchNorm, ...) or are gone (folded: ``nn.Identity``,
or :class:`~normswap.layers.FoldedAct` keeping a fused activation), and some convolutions or linear layers gained a
bias (folding gave it one). The manifest records exactly that, read off the module tree when the model is saved:

- ``modules``: for every qualified name of every layer of a class in :mod:`normswap.registry`, its registry key and
  constructor arguments (channels, groups, eps, momentum, affine, bias, rank, statistics tracking, the class of a
  fused activation and drop path, which parameters are trainable);
- ``biased``: the qualified names of every Conv, ConvTranspose and Linear layer that has a bias.

:func:`apply_manifest` makes a freshly built architecture match a manifest: each recorded layer that differs is
rebuilt from its record (a fused layer keeps the activation module the architecture built), each recorded bias is
added. :func:`check_manifest` then derives the manifest again and refuses any difference, so a file never loads into
a model of other classes (a frozen model does not come back as trainable BatchNorm). Nothing is replayed: the
manifest does not depend on how the model was made, so wrappers, hand edits and new operations cannot desynchronise
it. Only registry keys are read from it; no file names a class to import.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8))
    >>> manifest = derive_manifest(model)
    >>> manifest["modules"]["1"]["class"], manifest["biased"]
    ('GroupNorm', ['0'])
    >>> rebuilt = apply_manifest(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), manifest)
    >>> type(rebuilt[1]).__name__
    'GroupNorm'
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from .. import registry
from ..errors import CheckpointError, NormswapError, shown
from ..walk import get_module, model_device, replace_module

__all__ = ["MANIFEST_VERSION", "apply_manifest", "check_manifest", "derive_manifest", "describe_layer"]

MANIFEST_VERSION = 1

_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)

MAX_CHANNELS = 1 << 24
"""The most channels a manifest record may give a layer (a real network has a few thousand)."""


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_CHANNELS


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_FIELDS: dict[str, tuple[str, Any]] = {
    "num_features": ("a whole number from 1 to 2^24", _count),
    "num_channels": ("a whole number from 1 to 2^24", _count),
    "num_groups": ("a whole number from 1 to 2^24", _count),
    "eps": ("a positive finite number", lambda v: _number(v) and v > 0),
    "momentum": ("null or a number from 0 to 1", lambda v: v is None or _number(v) and 0 <= v <= 1),
    "affine": ("true or false", lambda v: isinstance(v, bool)),
    "track_running_stats": ("true or false", lambda v: isinstance(v, bool)),
    "bias": ("true or false", lambda v: isinstance(v, bool)),
    "trainable_affine": ("true or false", lambda v: isinstance(v, bool)),
    "rank": ("null, 1, 2 or 3", lambda v: v in (None, 1, 2, 3) and not isinstance(v, bool)),
    "drop": ("a class name or null", lambda v: v is None or isinstance(v, str) and v.isidentifier()),
    "act": ("a class name or null", lambda v: v is None or isinstance(v, str) and v.isidentifier()),
    "trainable": ("a table of parameter names to true or false", lambda v: isinstance(v, dict) and all(
        isinstance(key, str) and isinstance(flag, bool) for key, flag in v.items())),
}
"""What each field of a manifest record must be, checked before any layer is built from it."""


def _check_record(entry: dict[str, Any], name: str) -> None:
    """:class:`CheckpointError` naming the first field of a record that is not what it must be."""
    for key, value in entry.items():
        if key == "class":
            continue
        wanted, valid = _FIELDS.get(key, ("absent (not a field normswap writes)", lambda v: False))
        if not valid(value):
            raise _misfit(name, f"its record's '{shown(key)}' must be {wanted}, got {shown(repr(value)[:60])}")
    if "num_groups" in entry and _count(entry.get("num_channels")) and entry["num_channels"] % entry["num_groups"]:
        raise _misfit(name, f"its record has {entry['num_groups']} groups, which do not divide its "
                            f"{entry['num_channels']} channels")


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


def describe_layer(module: nn.Module) -> Optional[dict[str, Any]]:
    """The manifest record of one layer (its registry key and :meth:`~normswap.registry.LayerClass.arguments`),
    or ``None`` if its exact class is not in the registry and it is not proven to compute frozen BatchNorm.

    >>> describe_layer(nn.BatchNorm1d(4, momentum=None))
    {'class': 'BatchNorm1d', 'num_features': 4, 'eps': 1e-05, 'momentum': None, 'affine': True, \
'track_running_stats': True, 'bias': True, 'trainable': {'weight': True, 'bias': True}}
    """
    record = registry.record_of(module) or registry.proven_record(module)
    if record is None or record is registry.UNPROVEN:
        return None
    entry: dict[str, Any] = {"class": record.key, **record.arguments(module)}
    if record.fused:
        names = [name for name in module._modules if name in ("drop", "act")]
        for name in names + [name for name in ("drop", "act") if name not in names]:
            child = getattr(module, name, None)
            entry[name] = type(child).__name__ if isinstance(child, nn.Module) else None
    trainable = {name: bool(p.requires_grad) for name, p in module._parameters.items() if p is not None}
    if trainable:
        entry["trainable"] = trainable
    return entry


def derive_manifest(model: nn.Module) -> dict[str, Any]:
    """The manifest of ``model``'s module tree (JSON-serialisable); every name of a shared module is listed."""
    modules: dict[str, dict[str, Any]] = {}
    biased: list[str] = []
    inside: Optional[str] = None  # the prefix of the described layer whose children are being walked (depth first)
    for name, module in model.named_modules(remove_duplicate=False):
        if inside is not None and name.startswith(inside):
            continue  # the drop and act of a fused layer are part of its record
        inside = None
        entry = describe_layer(module)
        if entry is not None:
            modules[name] = entry
            inside = name + "." if name else ""
        elif isinstance(module, _PRODUCERS) and _has_bias(module):
            biased.append(name)
    return {"version": MANIFEST_VERSION, "modules": modules, "biased": biased}


def _misfit(name: str, detail: str) -> CheckpointError:
    where = f"layer '{shown(name)}'" if name else "the model itself"
    return CheckpointError(f"the file's manifest does not fit the architecture at {where}: {detail}")


def _child_like(like: Optional[nn.Module], attr: str, wanted: Optional[str], name: str) -> nn.Module:
    """The ``drop`` or ``act`` module for a rebuilt fused layer: the architecture's own, of the recorded class."""
    child = getattr(like, attr, None) if like is not None else None
    if isinstance(child, nn.Module) and type(child).__name__ == wanted:
        return child
    if wanted in (None, "Identity"):
        return nn.Identity()
    found = type(child).__name__ if isinstance(child, nn.Module) else "none"
    raise _misfit(name, f"the file records a {wanted} as its {attr}, the architecture builds {found} there")


def _construct(entry: dict[str, Any], like: Optional[nn.Module], name: str) -> nn.Module:
    """A new layer as ``entry`` records it; a fused one takes ``like``'s drop and act modules."""
    try:
        record = registry.by_key(entry.get("class"))
    except NormswapError as exc:
        raise _misfit(name, str(exc)) from None
    _check_record(entry, name)
    try:
        new = record.construct(entry)
    except NormswapError as exc:
        raise _misfit(name, str(exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise _misfit(name, f"its record {shown(str(entry))} is malformed ({type(exc).__name__}: {shown(exc)})") \
            from None
    if entry.get("bias") is False and "bias" in new._parameters:
        new.bias = None
    if record.fused:
        children = [key for key in entry if key in ("drop", "act")]
        for attr in children:
            new._modules.pop(attr, None)
        for attr in children:  # in the recorded order
            setattr(new, attr, _child_like(like, attr, entry[attr], name))
    for param_name, trainable in (entry.get("trainable") or {}).items():
        param = new._parameters.get(param_name)
        if param is not None:
            param.requires_grad_(bool(trainable))
    return new


def apply_manifest(model: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """Make a freshly built ``model`` match ``manifest`` (in place); returns the model (a new one if the model
    itself is a recorded layer). Layers are rebuilt on the device the model is on (``meta`` included), their
    values are left for the checkpoint's tensors to fill.

    Raises:
        CheckpointError: the manifest is malformed, names a layer the architecture does not have, or records a
            class or activation that cannot be rebuilt there.
    """
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION \
            or not isinstance(manifest.get("modules"), dict) or not isinstance(manifest.get("biased"), list) \
            or not all(isinstance(name, str) for name in manifest["biased"]):
        raise CheckpointError(f"the file's manifest is not a version-{MANIFEST_VERSION} normswap manifest")
    by_object: dict[int, tuple[nn.Module, list[str]]] = {}
    for name, entry in manifest["modules"].items():
        if not isinstance(name, str) or not isinstance(entry, dict):
            raise CheckpointError(f"the file's manifest has a malformed record for {shown(repr(name))}")
        try:
            module = get_module(model, name)
        except KeyError:
            raise _misfit(name, "the architecture has no module there (wrong architecture or keyword arguments?)") \
                from None
        by_object.setdefault(id(module), (module, []))[1].append(name)
    changes = []
    for module, names in by_object.values():
        entries = [manifest["modules"][name] for name in names]
        if any(entry != entries[0] for entry in entries[1:]):
            raise _misfit(names[0], f"it is one module reachable as {', '.join(names)}, and the file records "
                                    "different layers for those names")
        if describe_layer(module) == entries[0]:
            continue
        if describe_layer(module) is None and not isinstance(module, nn.Identity):
            raise _misfit(names[0], f"the file records a {shown(entries[0].get('class'))}, the architecture builds a "
                                    f"{type(module).__name__} there")
        with torch.device(model_device(module, model) or "cpu"):
            changes.append((names, _construct(entries[0], module, names[0])))
    for names, new in changes:
        model = replace_module(model, names, new)
    for name in manifest["biased"]:
        try:
            module = get_module(model, name) if isinstance(name, str) else None
        except KeyError:
            module = None
        if not isinstance(module, _PRODUCERS):
            raise _misfit(str(name), "the file records a convolution or linear layer with a bias there, the "
                                     "architecture has none")
        if module.bias is None:
            channels = module.weight.shape[1] * module.groups if isinstance(
                module, nn.modules.conv._ConvTransposeNd) else module.weight.shape[0]
            bias = torch.zeros(channels, dtype=module.weight.dtype, device=module.weight.device)
            module.bias = nn.Parameter(bias, requires_grad=module.weight.requires_grad)
    return model


def check_manifest(model: nn.Module, manifest: dict[str, Any]) -> None:
    """:class:`CheckpointError` naming the first layer where ``model`` differs from ``manifest``."""
    found = derive_manifest(model)
    recorded = manifest["modules"]
    for name in list(recorded) + [name for name in found["modules"] if name not in recorded]:
        mine, theirs = found["modules"].get(name), recorded.get(name)
        if mine != theirs:
            detail = (f"the architecture builds a {mine['class']} the file does not record" if theirs is None
                      else f"the file records {shown(str(theirs))}, the model has {mine}")
            raise _misfit(name, detail)
    missing = sorted(set(manifest["biased"]) ^ set(found["biased"]))
    if missing:
        raise _misfit(missing[0], "the file and the architecture differ in whether this layer has a bias")
