"""Saving a model as a safetensors file that describes its own structure, so that it rebuilds exactly.

:func:`save` looks through the wrappers a training loop puts around a model (``torch.compile``,
DistributedDataParallel and DataParallel, timm's ``ModelEma*``, ``torch.optim.swa_utils.AveragedModel``: see
:func:`normswap.unwrap.unwrap_model`) and writes, beside the weights:

- ``arch``: the architecture spec the model was built from, the one passed to ``save``, or the one the model itself
  says it is (:func:`normswap.checkpoint.identity.identify`: timm, torchvision, transformers, ultralytics,
  segmentation_models_pytorch, normswap's demo, confirmed on the meta device); a model that says nothing of how it
  was built (MONAI, your own class) is saved without one, with a warning naming ``arch=``;
- ``manifest``: the structure, derived from the module tree at this moment (:mod:`normswap.checkpoint.manifest`);
- ``module_versions``: each module's state-dict ``_version`` that is not 1 (modules such as torchvision's MNASNet read
  it when loading);
- ``history``: what normswap did to the model (plans, folds, fits, recalibrations), as provenance;
- ``source`` (the file the model was loaded from: name and sha256), ``aliases`` (tied tensors, saved once),
  ``input_shape`` (the shape of the main input, when the model knows it: ``fold`` uses it as its example), and the
  normswap and torch versions.

Example::

    >>> import timm, normswap
    >>> model = normswap.convert(timm.create_model("resnet18"), "gn")           # doctest: +SKIP
    >>> normswap.save(model, "resnet18-gn.safetensors")                         # doctest: +SKIP
    PosixPath('resnet18-gn.safetensors')
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..arch import ArchSpec
from ..errors import OutputError
from ..history import get_arch, get_history, get_input_shape, get_source
from ..unwrap import unwrap_model
from .._version import __version__
from . import formats
from .atomic import atomic_write, check_output
from .identity import identify
from .manifest import derive_manifest

__all__ = ["save", "unwrap_model"]

log = logging.getLogger("normswap")

PathLike = Union[str, "os.PathLike[str]"]

SAFETENSORS_SUFFIX = ".safetensors"

def _tensors_to_save(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as contiguous tensors that share no memory, and ``{alias: saved name}`` for tied tensors."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    spans: dict[tuple, list[tuple[int, int]]] = {}
    for name, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise OutputError(
                f"cannot save '{name}': it is a {type(value).__name__}, and safetensors holds tensors only"
            )
        tensor = value.detach()
        if tensor.device.type == "meta":
            raise OutputError(f"cannot save '{name}': it is on the meta device (no values); load weights first")
        view = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and view in views:
            aliases[name] = views[view]
            continue
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if any(start < other_end and other_start < end for other_start, other_end in spans.get(storage, [])):
            tensor = tensor.clone()
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            start = tensor.data_ptr()
            end = start + tensor.numel() * tensor.element_size()
        spans.setdefault(storage, []).append((start, end))
        views[view] = name
        tensors[name] = tensor
    return tensors, aliases


def _module_versions(model: nn.Module) -> dict[str, int]:
    """Each module's state-dict ``_version`` that differs from ``nn.Module``'s 1."""
    return {name: module._version for name, module in model.named_modules()
            if getattr(module, "_version", 1) not in (1, None)}


def _first(chain: list[nn.Module], read: Any) -> Any:
    """What the first model of the wrapper chain that remembers something remembers (outermost first)."""
    for module in chain:
        value = read(module)
        if value:
            return value
    return None


def save(
    model: nn.Module,
    path: PathLike,
    *,
    overwrite: bool = False,
    source: Union[PathLike, dict[str, Any], None] = None,
    arch: Union[str, ArchSpec, None] = None,
    arch_kwargs: Optional[dict[str, Any]] = None,
) -> Path:
    """Write ``model``'s weights to a safetensors file that describes how to rebuild it; returns the path.

    Args:
        model: the model, or a wrapper around it (``torch.compile``, DDP, DataParallel, timm ``ModelEma*``,
            ``AveragedModel``): the wrapped model is saved.
        overwrite: replace an existing file.
        source: the file the weights came from (a path, or ``{"file", "sha256"}``); default: the file the model was
            loaded from.
        arch, arch_kwargs: the architecture to record, for a model normswap did not build (``YOLO(...).model``, a
            MONAI network built in your code): ``save(model, p, arch="monai.networks.nets:UNet", arch_kwargs={...})``.
            Default: the architecture the model was built from, else the one the model says it is, confirmed
            by building it on the meta device (a timm, torchvision, transformers or ultralytics model built in
            Python); else none, with a warning (load such a file with ``normswap.load(path, model=...)``).

    Tensors that share memory are saved once (tied weights) or as copies (overlapping views); non-contiguous
    tensors are made contiguous. The write is atomic (:func:`~normswap.checkpoint.atomic_write`).

    Raises:
        OutputError: ``path`` exists (and not ``overwrite``), its folder is missing or not writable, it does not end
            in ``.safetensors``, or the disk is full.
    """
    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise OutputError(f"cannot write {path}: normswap writes safetensors files, name it *{SAFETENSORS_SUFFIX}")
    check_output(path, overwrite=overwrite)
    chain = unwrap_model(model)
    inner = chain[-1]
    if source is not None and not isinstance(source, dict):
        source = {"file": Path(source).name, "sha256": formats.file_sha256(source)}
    source = source if source is not None else _first(chain, get_source)
    if arch is not None:
        spec = arch if isinstance(arch, ArchSpec) else ArchSpec.parse(arch)
        recorded: Optional[dict[str, Any]] = spec.with_kwargs(arch_kwargs).to_dict()
    else:
        recorded = _first(chain, get_arch)
        if recorded is None:
            found = identify(inner)
            recorded = found.to_dict() if found is not None else None
        if recorded is None:
            log.warning(f"{path.name} records no architecture (normswap cannot tell how this {type(inner).__name__} "
                        "was built): pass arch= and arch_kwargs= to save to record it, or load the file into a model "
                        "you build with normswap.load(path, model=...)")
    tensors, aliases = _tensors_to_save(inner)
    metadata = {"format": "pt", "normswap": __version__, "torch": torch.__version__,
                "manifest": json.dumps(derive_manifest(inner)),
                "history": json.dumps(_first(chain, get_history) or [])}
    versions = _module_versions(inner)
    if versions:
        metadata["module_versions"] = json.dumps(versions)
    if recorded is not None:
        metadata["arch"] = json.dumps(recorded)
    if source is not None:
        metadata["source"] = json.dumps(source)
    if aliases:
        metadata["aliases"] = json.dumps(aliases)
    input_shape = _first(chain, get_input_shape)
    if input_shape:
        metadata["input_shape"] = json.dumps(input_shape)
    size = formats.safetensors_size(tensors, metadata)
    return atomic_write(path, lambda temporary: formats.write_safetensors(temporary, tensors, metadata),
                        overwrite=overwrite, size=size)
