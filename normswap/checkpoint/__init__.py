"""Checkpoint files: reading the files users have safely, and writing safetensors that rebuild their model exactly.

- :mod:`~normswap.checkpoint.formats`: file kinds by content, reading without running code, the safetensors writer;
- :mod:`~normswap.checkpoint.containers`: finding the weights inside training checkpoints (entries, key prefixes);
- :mod:`~normswap.checkpoint.manifest`: the structure a file records, derived from the module tree;
- :mod:`~normswap.checkpoint.loading`: :func:`read_checkpoint`, :func:`load_checkpoint`, :func:`load`;
- :mod:`~normswap.checkpoint.saving`: :func:`save`, looking through training wrappers;
- :mod:`~normswap.checkpoint.atomic`: :func:`atomic_write`, the one way normswap writes a file.

Files are data: nothing read from a file is imported or called, except an architecture that is a registered model
builder (timm, torchvision, normswap's demo; see :mod:`normswap.arch`).

Example::

    >>> import normswap
    >>> model = normswap.load_checkpoint("resnet50.pt", "resnet50")             # doctest: +SKIP
    >>> model = normswap.convert(model, "gn", groups=32)                        # doctest: +SKIP
    >>> normswap.save(model, "resnet50-gn.safetensors")                         # doctest: +SKIP
    >>> normswap.load("resnet50-gn.safetensors")          # GroupNorm model, no arch needed  # doctest: +SKIP
"""

from .atomic import TEMPORARY_SUFFIX, Terminated, atomic_write, check_output, interruptible
from .loading import CheckpointContents, check_input, file_sha256, load, load_checkpoint, read_checkpoint, read_metadata
from .manifest import apply_manifest, check_manifest, derive_manifest
from .saving import save, unwrap_model

__all__ = [
    "TEMPORARY_SUFFIX",
    "CheckpointContents",
    "Terminated",
    "apply_manifest",
    "atomic_write",
    "check_input",
    "check_manifest",
    "check_output",
    "derive_manifest",
    "file_sha256",
    "interruptible",
    "load",
    "load_checkpoint",
    "read_checkpoint",
    "read_metadata",
    "save",
    "unwrap_model",
]
