"""Hugging Face model folders: what a timm hub folder or a transformers ``save_pretrained`` folder holds.

Both kinds are a ``config.json`` beside the weights (``model.safetensors``, ``pytorch_model.bin``, or shards listed
in ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``). The config is data: normswap reads from it
only the architecture to build, as a registered builder (see :mod:`normswap.arch`):

- timm (``save_for_hf``, ``push_to_hf_hub``): ``{"architecture": "resnet50", "num_classes": ..., "model_args":
  {...}}`` becomes the timm spec ``resnet50(num_classes=..., **model_args)``;
- transformers (``save_pretrained``): ``{"architectures": ["ResNetForImageClassification"], "model_type": ...}``
  becomes ``transformers:ResNetForImageClassification`` with the config as its keyword arguments. A config that asks
  for code of its own (``auto_map``) is refused: normswap never runs a repository's code.

The spec is recorded in what normswap writes, so its output rebuilds without the folder. Nothing is downloaded, and
the weights are read once.

transformers saves some models under older key names than their modules have (``save_pretrained`` of a DETR writes
``backbone.conv_encoder.…``, the model has ``backbone.…``) and renames them when it loads.
:func:`keys_for_model` applies the same renaming, the one the installed transformers applies for that model class
(its checkpoint conversion mapping in transformers 5, the class's ``_checkpoint_conversion_mapping`` before), so the
folder's tensors match the model's state dict.

Example::

    >>> folder = read_folder("hf-resnet/")                                      # doctest: +SKIP
    >>> folder.arch.name, len(folder.tensors)                                   # doctest: +SKIP
    ('transformers:ResNetForImageClassification', 320)
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import ArchSpec
from ..errors import CheckpointError
from . import formats

__all__ = ["ModelFolder", "is_model_folder", "keys_for_model", "read_folder"]

log = logging.getLogger("normswap")

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""Weight files tried in a folder, in order; each may instead be sharded (``<name>.index.json``)."""

_TRANSFORMERS_SKIPPED = ("transformers_version", "_name_or_path", "_commit_hash")


@dataclass
class ModelFolder:
    """A folder's weights, the architecture its config names, and the weight files read."""

    tensors: dict[str, torch.Tensor]
    arch: ArchSpec
    files: list[Path]

    def source(self, folder: Path) -> dict[str, str]:
        """``{"file": folder name, "sha256": ...}``: the digest of the weight files' digests, in order."""
        digest = hashlib.sha256()
        for path in self.files:
            digest.update(formats.file_sha256(path).encode())
        return {"file": folder.name, "sha256": digest.hexdigest()}


def is_model_folder(path: Path) -> bool:
    """True for a folder with a ``config.json``."""
    return path.is_dir() and (path / "config.json").is_file()


def _arch_from_config(config: dict[str, Any], where: Path) -> ArchSpec:
    if isinstance(config.get("architecture"), str):
        kwargs = dict(config.get("model_args") or {})
        for key in ("num_classes", "global_pool"):
            if key in config:
                kwargs.setdefault(key, config[key])
        return ArchSpec.parse(config["architecture"], kwargs, from_file=True)
    names = config.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        if config.get("auto_map"):
            raise CheckpointError(f"{where} asks for the model code of its own repository (auto_map), which normswap "
                                  "does not run: load it with transformers (trust_remote_code) and save its "
                                  "state_dict() with torch.save")
        kwargs = {key: value for key, value in config.items() if key not in _TRANSFORMERS_SKIPPED}
        return ArchSpec.parse(f"transformers:{names[0]}", kwargs, from_file=True)
    raise CheckpointError(f"{where} is neither a timm config (no 'architecture') nor a transformers config (no "
                          "'architectures')")


def _weight_files(folder: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                weight_map = formats.loads_json(index.read_text(), str(index))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index} is not a shard index (no 'weight_map')") from None
            paths = [folder / shard for shard in shards]
            if any(Path(shard).name != shard for shard in shards):
                raise CheckpointError(f"{index} names shards outside its folder")
            missing = [p.name for p in paths if not p.is_file()]
            if missing:
                raise CheckpointError(f"{folder} misses the shard(s) {', '.join(missing)} that {index.name} lists")
            return paths
    raise CheckpointError(f"{folder} has a config.json but no weights ({', '.join(WEIGHT_FILES)}, or their "
                          ".index.json)")


def read_folder(folder: Path) -> ModelFolder:
    """The weights and architecture of a Hugging Face model folder, read as data.

    Raises:
        CheckpointError: no ``config.json``, a config that names no architecture or asks for its own code, or no
            weights.
    """
    config_path = folder / "config.json"
    try:
        config = formats.loads_json(config_path.read_text(encoding="utf-8"), str(config_path))  # depth-limited
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not a JSON config: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} is not a JSON object")
    arch = _arch_from_config(config, config_path)
    files = _weight_files(folder)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        formats.check_readable(path)
        kind = formats.file_kind(path)
        if kind == "safetensors":
            tensors.update(formats.read_safetensors(path)[0])
        elif kind in ("zip", "pickle"):
            content = formats.read_torch(path, kind)
            if not isinstance(content, dict):
                raise CheckpointError(f"{path} holds a {type(content).__name__}, not a state dict")
            tensors.update({str(k): v for k, v in content.items() if isinstance(v, torch.Tensor)})
        else:
            raise CheckpointError(f"{path} is neither a safetensors nor a PyTorch file")
    return ModelFolder(tensors, arch, files)


def keys_for_model(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``tensors`` keyed as ``model``'s state dict, by the key renaming transformers applies when it loads a folder
    into a model of that class (nothing changes for other models, or keys no renaming matches). Only renamings are
    applied: a mapping that would change a tensor's values (fusing or splitting weights) is left to transformers.

    >>> keys_for_model({"weight": torch.ones(1)}, torch.nn.Linear(1, 1)).keys()
    dict_keys(['weight'])
    """
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        return tensors
    expected = {name: True for name in model.state_dict(keep_vars=True)}
    if all(name in expected for name in tensors):
        return tensors
    rename = _transformers_renaming(model, expected)
    if rename is None:
        return tensors
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        new = rename(name) if name not in expected else name
        renamed[new if new not in renamed else name] = tensor
    changed = sum(1 for name in tensors if name not in renamed)
    if changed:
        log.info("renamed %d key(s) as transformers does when it loads a %s", changed, type(model).__name__)
    return renamed


def _transformers_renaming(model: nn.Module, expected: dict[str, bool]) -> Any:
    """The installed transformers' key renaming for ``model``, as a function of one key, or ``None``."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:
        legacy = getattr(model, "_checkpoint_conversion_mapping", None) or {}
        if not legacy:
            return None

        def rename_legacy(name: str) -> str:
            for pattern, replacement in legacy.items():
                name, hits = re.subn(pattern, replacement, name)
                if hits:
                    break
            return name

        return rename_legacy
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception as exc:  # a transformers internal that changed shape: load without renaming, say why
        log.debug("transformers' key mapping for %s is unavailable: %s", type(model).__name__, exc)
        return None
    renamings = [transform for transform in transforms if type(transform) is WeightRenaming]
    if not renamings:
        return None
    prefix = getattr(model, "base_model_prefix", None) or None

    def rename(name: str) -> str:
        return rename_source_key(name, renamings, [], prefix, expected)[0]

    return rename
