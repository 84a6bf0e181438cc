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

Example::

    >>> folder = read_folder("hf-resnet/")                                      # doctest: +SKIP
    >>> folder.arch.name, len(folder.tensors)                                   # doctest: +SKIP
    ('transformers:ResNetForImageClassification', 320)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import ArchSpec
from ..errors import CheckpointError
from . import formats

__all__ = ["ModelFolder", "is_model_folder", "read_folder"]

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
