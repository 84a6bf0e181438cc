"""File formats: telling them apart by their bytes, reading them without running code, writing safetensors.

Three kinds of checkpoint files exist, and a file's kind is read from its first bytes, not its name (a safetensors
file named ``.pt`` is read as safetensors, and the reverse):

- ``"safetensors"``: an 8-byte little-endian header length, then a JSON header. Tensors and text metadata only.
- ``"zip"``: PyTorch's ``torch.save`` format (a zip archive holding a pickle and the tensor data), also TorchScript.
- ``"pickle"``: PyTorch's legacy format, or a plain pickle.

PyTorch files are read with ``torch.load(weights_only=True)``: its unpickler builds only tensors, plain containers and
the classes :data:`SAFE_GLOBALS` lists, so reading cannot run code. A file that needs anything else is refused in one
line naming the first such object; ``trust_pickle=True`` unpickles it fully (which can run arbitrary code).

:func:`write_safetensors` writes the safetensors format itself, tensor by tensor, so that memory stays bounded and the
only file it creates is the one it is given (see :mod:`normswap.checkpoint.atomic`).

Example::

    >>> import tempfile, pathlib, torch
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "weights.pt"
    >>> write_safetensors(path, {"w": torch.ones(2)}, {"note": "a safetensors file named .pt"})
    >>> file_kind(path), read_safetensors(path)[1]
    ('safetensors', {'note': 'a safetensors file named .pt'})
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import pickle
import re
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Optional, Union

import torch

from ..errors import CheckpointError, spelled
from ..offline import offline

__all__ = ["MAX_JSON_DEPTH", "SAFE_GLOBALS", "UnsafePickle", "check_readable", "file_kind", "file_sha256",
           "loads_json", "read_safetensors",
           "read_safetensors_metadata", "read_torch", "safetensors_size", "write_safetensors"]

SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath,
                                 pathlib.PureWindowsPath)
"""Classes that training scripts pickle beside the weights and that ``torch.load(weights_only=True)`` may build:
``argparse.Namespace`` (timm's ``train.py`` saves its arguments) and ``pathlib`` paths (output folders). None of them
runs code when unpickled. Tensors, numbers, strings, lists, tuples, dicts, ``OrderedDict`` and ``torch.Size`` are
allowed by torch itself."""

PathLike = Union[str, "os.PathLike[str]"]

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPE_NAMES[getattr(torch, _name)] = _code

_MAX_HEADER = 100 << 20
_CHUNK = 64 << 20

MAX_JSON_DEPTH = 64
"""The deepest nesting of lists and objects normswap reads from a file's JSON (real headers and configs nest a few
levels; a parser would recurse once per level)."""

_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def loads_json(text: Union[str, bytes], what: str) -> Any:
    """``json.loads(text)``, or :class:`CheckpointError` naming ``what`` when it is not JSON or nests lists and
    objects deeper than :data:`MAX_JSON_DEPTH` (checked first, in one pass over the text).

    >>> loads_json('{"a": [1, 2]}', "the header")
    {'a': [1, 2]}
    >>> loads_json("[" * 10000 + "]" * 10000, "the header")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normswap.errors.CheckpointError: the header nests lists and objects more than 64 deep, ...
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{what} is not JSON (not UTF-8 text)") from None
    depth = 0
    for token in _JSON_TOKENS.finditer(text):
        bracket = token.group()
        if bracket in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise CheckpointError(f"{what} nests lists and objects more than {MAX_JSON_DEPTH} deep, which no "
                                      "checkpoint does: the file is damaged or crafted")
        elif bracket in "]}":
            depth -= 1
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{what} is not valid JSON") from None


class UnsafePickle(CheckpointError):
    """A PyTorch file holds pickled objects that ``weights_only`` loading refuses; ``found`` names the first."""

    def __init__(self, message: str, found: str) -> None:
        super().__init__(message)
        self.found = found


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes, as hex.

    >>> import tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "empty"; p.write_bytes(b"")
    0
    >>> file_sha256(p)[:12]
    'e3b0c44298fc'
    """
    digest = hashlib.sha256()
    buffer = bytearray(4 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def check_readable(path: Path, what: str = "checkpoint") -> Path:
    """``path`` if it is a non-empty regular file; :class:`CheckpointError` otherwise (a FIFO or device would block
    or never end, so they are refused before they are opened)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path} is a directory, not a {what} file")
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a pipe or a device?): give the {what} file itself")
    if info.st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"cannot read {path}: permission denied")
    return path


def file_kind(path: Path) -> Optional[str]:
    """``"safetensors"``, ``"zip"`` or ``"pickle"`` from the file's first bytes; ``None`` for anything else."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":  # before the pickle test: a header length can start with 0x80 0x04
        (length,) = struct.unpack("<Q", head[:8])
        if 2 <= length <= min(size - 8, _MAX_HEADER):
            return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None


def _read_header(f: BinaryIO, path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """The tensor entries, the text metadata and the offset of the data of an open safetensors file, checked: known
    dtypes, sizes that match the shapes, offsets that tile the data exactly."""
    size = os.fstat(f.fileno()).st_size
    corrupt = f"{path} is not a valid safetensors file (truncated or corrupt?)"
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{corrupt}: it is shorter than its header length")
    (length,) = struct.unpack("<Q", head)
    if length > min(size - 8, _MAX_HEADER):
        raise CheckpointError(f"{corrupt}: its header length {length} does not fit the file")
    header = loads_json(f.read(length), f"{corrupt}: its header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{corrupt}: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise CheckpointError(f"{corrupt}: its metadata is not a table of strings")
    dtypes = {code: dtype for dtype, code in _DTYPE_NAMES.items()}
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: _offsets(item[1])[0]):
        offsets = _offsets(entry)
        dtype = dtypes.get(entry.get("dtype")) if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{corrupt}: tensor {name!r} has an unknown dtype or a malformed shape")
        numel = 1
        for dim in shape:
            numel *= dim
        if offsets[0] != end or offsets[1] - offsets[0] != numel * dtype.itemsize:
            raise CheckpointError(f"{corrupt}: the data of tensor {name!r} does not match its shape and place")
        entry["torch_dtype"] = dtype
        end = offsets[1]
    if 8 + length + end != size:
        raise CheckpointError(f"{corrupt}: the tensors' data does not fill the file exactly")
    return header, metadata, 8 + length


def _offsets(entry: Any) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets):
        return offsets[0], offsets[1]
    return -1, -1


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the raw text metadata of a safetensors file.

    Each tensor is read into its own newly allocated (aligned) memory: computations on it round exactly as on the
    tensor that was saved (CPU kernels pick code paths by alignment, and a memory-mapped tensor is rarely aligned),
    and memory holds each tensor once.
    """
    with open(path, "rb") as f:
        header, metadata, start = _read_header(f, path)
        tensors = {}
        for name, entry in header.items():
            tensor = torch.empty(entry["shape"], dtype=entry["torch_dtype"])
            buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            f.seek(start + entry["data_offsets"][0])
            filled = 0
            while filled < len(buffer):
                n = f.readinto(buffer[filled:])
                if not n:
                    raise CheckpointError(f"{path} is not a valid safetensors file (truncated?)")
                filled += n
            tensors[name] = tensor
    return tensors, dict(metadata)


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The raw text metadata of a safetensors file (its header is checked; the tensors are not read)."""
    with open(path, "rb") as f:
        return dict(_read_header(f, path)[1])


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def read_torch(path: Path, kind: str, *, trust_pickle: bool = False) -> Any:
    """What a PyTorch file holds, read without running code (unless ``trust_pickle``); tensors memory-mapped where
    the format allows.

    Raises:
        CheckpointError: a TorchScript archive, pickled objects beyond :data:`SAFE_GLOBALS` without
            ``trust_pickle`` (naming the first), or a file that cannot be read (truncated or corrupt).
    """
    if kind == "zip" and _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (torch.jit.save), not a state dict: load it with torch.jit.load and "
            "save its state_dict() with torch.save"
        )
    try:
        if path.suffix.lower() == ".safetensors":  # torch.load would hand a path of that name to safetensors
            with open(path, "rb") as f:
                return _torch_load(f, trust_pickle, mmap=False)
        return _torch_load(path, trust_pickle, mmap=kind == "zip")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if trust_pickle or found is None:
            raise CheckpointError(f"{path} cannot be unpickled (truncated, or not a checkpoint?): "
                                  f"{_first_line(exc)}") from None
        raise UnsafePickle(
            f"{path} holds pickled Python objects ({found.group(1)}; a whole model saved with torch.save(model)?) "
            f"and unpickling them can run arbitrary code: pass {spelled('trust_pickle=True', '--trust-pickle')} "
            "only if you trust the file", found.group(1)
        ) from None
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read as a PyTorch checkpoint (truncated, or not a checkpoint?): "
                              f"{_first_line(exc)}") from None


def _torch_load(file: Any, trust_pickle: bool, mmap: bool) -> Any:
    if trust_pickle:  # unpickling imports the model's library (ultralytics, ...): keep it off the network
        with offline():
            return torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
        return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)


def _header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The padded JSON header and the order in which the tensors' bytes follow it (largest elements first, then by
    name, as safetensors orders them)."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"cannot save '{name}': safetensors has no type for {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 64)  # the first tensor starts 64-byte aligned
    return struct.pack("<Q", len(text)) + text, order


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """The size in bytes of the file :func:`write_safetensors` writes for these tensors and metadata."""
    header, _ = _header(tensors, metadata)
    return len(header) + sum(t.numel() * t.element_size() for t in tensors.values())


def _write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), max(1, _CHUNK // max(1, flat.element_size()))):
        piece = flat[start:start + _CHUNK // max(1, flat.element_size())].to("cpu").contiguous()
        f.write(memoryview(piece.view(torch.uint8).numpy()))


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` (contiguous, sharing no memory) and text ``metadata`` to ``path`` in the safetensors format,
    a piece at a time (GPU tensors are copied to the CPU 64 MB at a time)."""
    header, order = _header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(header)
        for name in order:
            _write_tensor(f, tensors[name])


def _first_line(exc: BaseException) -> str:
    """The first sentence of an exception's message, without advice that does not apply here."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
