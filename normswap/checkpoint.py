"""Checkpoint files: reading weights safely, and writing safetensors that know how to rebuild their model.

Reading (:func:`load_checkpoint`) accepts ``.safetensors`` and ``.pt``/``.pth``/``.bin``/``.ckpt`` files. PyTorch files
are read with ``torch.load(weights_only=True, mmap=True)``, which cannot run code; a whole pickled model is read only
with ``trust_pickle=True``. Training checkpoints are unwrapped (the ``state_dict``, ``model``, ``module``, ``ema`` or
``state_dict_ema`` entry, or the one ``key=`` names) and ``module.`` (DistributedDataParallel) and ``_orig_mod.``
(``torch.compile``) prefixes are stripped. The model is built on the meta device and the file's tensors are assigned
to it, so no time goes into random initialisation and the weights are not copied: a memory-mapped file stays mapped.

Writing (:func:`save`) produces safetensors whose header records the architecture spec, the model's history (the
plans and folds applied to it), the source file's name and sha256, and the normswap and torch versions, so that
:func:`load` rebuilds the same model without being told anything. Every file normswap writes goes through
:func:`atomic_write`: a failure or Ctrl-C leaves no partial file behind, and an existing file is replaced only when
asked.

Example::

    >>> import normswap
    >>> model = normswap.load_checkpoint("resnet50.pt", "resnet50")             # doctest: +SKIP
    >>> model = normswap.convert(model, "gn", groups=32)                        # doctest: +SKIP
    >>> normswap.save(model, "resnet50-gn.safetensors")                         # doctest: +SKIP
    >>> normswap.load("resnet50-gn.safetensors")          # GroupNorm model, no arch needed  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .arch import ArchSpec
from .errors import ArchitectureError, CheckpointError, OutputError
from .history import get_arch, get_history, get_source, set_arch, set_history, set_source

__all__ = [
    "CONTAINER_KEYS",
    "CheckpointContents",
    "atomic_write",
    "check_input",
    "check_output",
    "file_sha256",
    "load",
    "load_checkpoint",
    "read_checkpoint",
    "read_metadata",
    "replay_history",
    "save",
]

log = logging.getLogger("normswap")

PathLike = Union[str, "os.PathLike[str]"]

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CONTAINER_KEYS = ("state_dict", "model", "module", "ema", "state_dict_ema")
"""Entries of a training checkpoint that hold the weights, tried in this order unless ``key=`` names one."""
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_JSON_FIELDS = ("arch", "history", "source", "aliases")
_SHOWN_KEYS = 4


@dataclass
class CheckpointContents:
    """What a checkpoint file holds, before a model is built from it.

    ``tensors`` is the state dict (prefixes stripped); ``model`` is set instead for a whole pickled model
    (``trust_pickle=True`` only). ``metadata`` is :func:`read_metadata`'s dict for a safetensors file, else empty;
    ``source`` is ``{"file": name, "sha256": hex}`` plus ``"entry"`` when the weights came from a container entry.
    """

    path: Path
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    model: Optional[nn.Module] = None

    @property
    def arch(self) -> Optional[ArchSpec]:
        """The architecture spec the file carries, if any."""
        arch = self.metadata.get("arch")
        return ArchSpec.from_dict(arch) if arch else None

    def to_model(self, arch: Union[str, ArchSpec, None] = None, *,
                 arch_kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
        """Build the model and load these tensors into it strictly (see :func:`load_checkpoint`)."""
        if self.model is not None:
            if arch is not None:
                log.info("%s holds a whole model: the architecture given is recorded, not built", self.path.name)
                set_arch(self.model, _resolve_arch(self, arch, arch_kwargs).to_dict())
            set_source(self.model, self.source)
            return self.model
        spec = _resolve_arch(self, arch, arch_kwargs)
        steps = self.metadata.get("history") or []
        if not isinstance(steps, list):
            raise CheckpointError(f"{self.path}: the header field 'history' is not a list of steps")
        model = _build_empty(spec, steps)
        tensors = dict(self.tensors)
        for alias, name in (self.metadata.get("aliases") or {}).items():
            if name in tensors:
                tensors[alias] = tensors[name]
        tensors = _fit_tensors(self.path, spec, model, tensors)
        ties = _shared_tensor_names(model)
        model.load_state_dict(tensors, strict=True, assign=True)
        _retie(model, ties)
        set_arch(model, spec.to_dict())
        set_history(model, steps)
        set_source(model, self.source)
        return model


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes, as hex.

    >>> import tempfile, pathlib
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


def check_input(path: PathLike) -> Path:
    """``path`` if it names a non-empty file of a supported kind, else :class:`CheckpointError` saying why.

    >>> check_input("/nonexistent/model.pt")
    Traceback (most recent call last):
    ...
    normswap.errors.CheckpointError: /nonexistent/model.pt does not exist
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    suffix = path.suffix.lower()
    if suffix != SAFETENSORS_SUFFIX and suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"{path} has the unsupported extension '{path.suffix}': expected {SAFETENSORS_SUFFIX} or "
            f"{', '.join(TORCH_SUFFIXES)}"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes)")
    return path


def _decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """Decode the JSON fields of a normswap-written header; other files get only ``arch`` read (a JSON spec or a
    bare name), since their other fields may mean something else."""
    metadata: dict[str, Any] = dict(raw)
    for name in _JSON_FIELDS if "normswap" in raw else ("arch",):
        text = metadata.get(name)
        if text is None:
            continue
        if name == "arch" and not text.lstrip().startswith("{"):
            metadata[name] = {"name": text.strip(), "kwargs": {}}
            continue
        try:
            metadata[name] = json.loads(text)
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: the header field '{name}' is not valid JSON") from None
    return metadata


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The header metadata of a safetensors file, structured fields decoded.

    Keys written by :func:`save`: ``normswap`` and ``torch`` (versions), ``arch`` (``{"name", "kwargs"}``),
    ``history`` (list of steps), ``source`` (``{"file", "sha256"}``), ``aliases`` (names saved once for tensors
    that share memory). Files from elsewhere give what their header has (often just ``{"format": "pt"}``).

    >>> read_metadata("resnet50-gn.safetensors")["arch"]                        # doctest: +SKIP
    {'name': 'resnet50', 'kwargs': {}}
    """
    path = check_input(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise CheckpointError(f"{path} is not a safetensors file: only safetensors files carry metadata")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {exc}") from None
    return _decode_metadata(raw, path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {exc}") from None
    return tensors, _decode_metadata(raw, path)


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _first_sentence(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(exc).__name__


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK", b"\x80")):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle")
    is_zip = zipfile.is_zipfile(path)
    if is_zip and _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive (torch.jit.save), not a state dict: load it with torch.jit.load and "
            "save its state_dict() with torch.save"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if trust_pickle or found is None:
            raise CheckpointError(
                f"{path} cannot be unpickled (truncated, or not a checkpoint?): {_first_sentence(exc)}"
            ) from None
        raise CheckpointError(
            f"{path} holds pickled Python objects ({found.group(1)}; a whole model saved with torch.save(model)?) "
            "and unpickling them can run arbitrary code: pass trust_pickle=True (--trust-pickle) only if you "
            "trust the file"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} cannot be read as a PyTorch checkpoint (truncated, or not a checkpoint?): {_first_sentence(exc)}"
        ) from None


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN_KEYS])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN_KEYS else "")


def _unwrap(obj: Any, path: Path, key: Optional[str]) -> tuple[Any, list[str]]:
    """The object holding the weights (a mapping or a module) and the entries followed to reach it."""
    entries: list[str] = []
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            present = _few([str(k) for k in obj]) if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
            raise CheckpointError(f"{path} has no entry '{key}' (it holds: {present})")
        obj = obj[key]
        entries.append(key)
    while isinstance(obj, Mapping):
        found = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), (Mapping, nn.Module))]
        if not found:
            break
        if len(found) > 1:
            log.info("%s: using entry '%s' (also there: %s; pick another with key=/--key)", path.name, found[0],
                     ", ".join(found[1:]))
        else:
            log.info("%s: using entry '%s'", path.name, found[0])
        obj = obj[found[0]]
        entries.append(found[0])
    return obj, entries


def _strip_wrapper_prefixes(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    stripped = True
    while stripped and tensors:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(name.startswith(prefix) for name in tensors):
                log.info("%s: stripping the '%s' prefix from every key", path.name, prefix)
                tensors = {name[len(prefix):]: tensor for name, tensor in tensors.items()}
                stripped = True
    return tensors


def read_checkpoint(path: PathLike, *, key: Optional[str] = None, trust_pickle: bool = False) -> CheckpointContents:
    """Read a checkpoint file's tensors (or, with ``trust_pickle``, its pickled model) without building a model.

    Raises:
        CheckpointError: the file is missing, empty, of an unsupported kind, unreadable, a TorchScript archive,
            pickled objects without ``trust_pickle``, or holds no tensors (the message says which).

    >>> contents = read_checkpoint("resnet50.pt")                               # doctest: +SKIP
    >>> len(contents.tensors), contents.source["file"]                          # doctest: +SKIP
    (320, 'resnet50.pt')
    """
    path = check_input(path)
    contents = CheckpointContents(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        if key is not None:
            raise CheckpointError(f"{path} is a safetensors file: key= picks an entry of a .pt/.pth/.bin/.ckpt file")
        contents.tensors, contents.metadata = _read_safetensors(path)
        entries: list[str] = []
    else:
        obj, entries = _unwrap(_torch_load(path, trust_pickle), path, key)
        if isinstance(obj, nn.Module):
            contents.model = obj
        elif isinstance(obj, Mapping):
            contents.tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if not contents.tensors:
                where = f"entry '{'.'.join(entries)}' of {path}" if entries else str(path)
                raise CheckpointError(
                    f"{where} holds no tensors (keys: {_few([str(k) for k in obj])}): pass key= (--key) to name "
                    "the entry that holds the weights"
                )
        else:
            raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a model")
    if contents.model is None:
        if not contents.tensors:
            raise CheckpointError(f"{path} holds no tensors")
        contents.tensors = _strip_wrapper_prefixes(contents.tensors, path)
    contents.source = {"file": path.name, "sha256": file_sha256(path)}
    if entries:
        contents.source["entry"] = ".".join(entries)
    return contents


def _resolve_arch(contents: CheckpointContents, arch: Union[str, ArchSpec, None],
                  arch_kwargs: Optional[dict[str, Any]]) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return ArchSpec.parse(arch.name, {**arch.kwargs, **(arch_kwargs or {})})
    if arch is not None:
        return ArchSpec.parse(arch, arch_kwargs)
    spec = contents.arch
    if spec is None:
        raise CheckpointError(
            f"{contents.path} holds weights only, not the architecture: pass arch= (--arch), a timm model name such "
            "as resnet50 or an import path such as torchvision.models:resnet50"
        )
    if not spec.is_well_known:
        raise CheckpointError(
            f"{contents.path} names the architecture '{spec.name}', and normswap imports modules outside timm, "
            f"torchvision and normswap only when asked (importing runs their code): pass arch='{spec.name}' "
            "(--arch) to confirm"
        )
    return ArchSpec.parse(spec.name, {**spec.kwargs, **(arch_kwargs or {})})


def replay_history(model: nn.Module, steps: list[dict[str, Any]]) -> nn.Module:
    """Repeat the structural steps of a recorded history (plans, folds) on a freshly built model; returns it.

    Steps that only changed values (recalibrate, fit) need no replay: their results are in the weights. The model's
    history is set to ``steps`` afterwards.

    >>> from torch import nn
    >>> from normswap import plan
    >>> steps = [{"op": "plan", "plan": plan(nn.BatchNorm2d(4), "frozen").to_dict()}]
    >>> type(replay_history(nn.BatchNorm2d(4), steps)).__name__
    'FrozenBatchNorm'
    """
    for step in steps:
        op = step.get("op") if isinstance(step, dict) else None
        if op == "plan":
            from .plan import Plan

            model = Plan.from_dict(step.get("plan", {})).apply(model)
        elif op == "fold":
            from .fold import replay_fold

            model = replay_fold(model, step)
        elif op is None:
            raise CheckpointError(f"a recorded history step has no 'op': {step!r}")
    set_history(model, steps)
    return model


def _holds_unloadable_tensors(model: nn.Module) -> bool:
    """True if some tensor of the model is not in its state dict (non-persistent buffers, plain tensor attributes):
    those get their values from ``__init__``, so the model cannot be built on the meta device."""
    persistent = set(model.state_dict(keep_vars=True))
    if any(name not in persistent for name, _ in model.named_buffers(remove_duplicate=False)):
        return True
    return any(isinstance(value, torch.Tensor) for module in model.modules() for value in vars(module).values())


def _build_empty(spec: ArchSpec, steps: list[dict[str, Any]]) -> nn.Module:
    """The architecture with its history replayed, on the meta device when possible (no memory, no init)."""
    try:
        model = spec.build(device="meta")
    except ArchitectureError as exc:
        log.debug("building %s on the meta device failed (%s); building it on the CPU", spec, exc)
        model = None
    if model is None or _holds_unloadable_tensors(model):
        model = spec.build()
    return replay_history(model, steps)


def _classifier_prefix(model: nn.Module) -> Optional[str]:
    """Qualified name of the module holding the model's last parameter (the classifier for most networks)."""
    names = [name for name, _ in model.named_parameters()]
    return names[-1].rpartition(".")[0] if names else None


def _fit_message(path: Path, spec: ArchSpec, model: nn.Module, expected: dict[str, torch.Size],
                 tensors: dict[str, torch.Tensor], missing: list[str], unexpected: list[str],
                 reshaped: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
    if reshaped:
        shown = ", ".join(f"{name}: file {tuple(tensors[name].shape)}, model {tuple(expected[name])}"
                          for name in reshaped[:2])
        parts.append(f"{len(reshaped)} shape mismatch(es) ({shown})")
    head = _classifier_prefix(model)
    matched = len(set(expected) & set(tensors))
    if not missing and not unexpected and head is not None \
            and all(name.rpartition(".")[0] == head for name in reshaped):
        classes = tensors[reshaped[0]].shape[0]
        cause = (f"wrong num_classes? the file's classifier has {classes} outputs: pass "
                 f"arch_kwargs={{'num_classes': {classes}}} (--arch-kwargs '{{\"num_classes\": {classes}}}')")
    elif matched < len(expected) / 2:
        cause = "wrong architecture? fewer than half of the model's keys are in the file"
    else:
        cause = "wrong architecture or architecture keyword arguments?"
    return f"{path} does not fit {spec}: {'; '.join(parts)} ({cause})"


def _fit_tensors(path: Path, spec: ArchSpec, model: nn.Module,
                 tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors keyed exactly as the model's state dict, or :class:`CheckpointError` saying what differs."""
    expected = {name: tensor.shape for name, tensor in model.state_dict(keep_vars=True).items()}
    tensors = dict(tensors)
    heads = {name.split(".", 1)[0] for name in tensors}
    if not set(tensors) & set(expected) and len(heads) == 1 and all("." in name for name in tensors):
        head = heads.pop() + "."
        renamed = {name[len(head):]: tensor for name, tensor in tensors.items()}
        if set(renamed) <= set(expected):
            log.info("%s: stripping the '%s' prefix from every key", path.name, head)
            tensors = renamed
    for name in expected:
        if name not in tensors and name.endswith("num_batches_tracked"):
            tensors[name] = torch.zeros((), dtype=torch.long)
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    reshaped = [name for name in expected if name in tensors and tensors[name].shape != expected[name]]
    if missing or unexpected or reshaped:
        raise CheckpointError(_fit_message(path, spec, model, expected, tensors, missing, unexpected, reshaped))
    return tensors


def _shared_tensor_names(model: nn.Module) -> list[list[str]]:
    """Groups of qualified names that refer to one parameter or buffer object (tied weights, shared modules)."""
    groups: dict[int, list[str]] = {}
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, groups: list[list[str]]) -> None:
    """Make each group of names refer to one object again (``load_state_dict(assign=True)`` assigns per name)."""
    for names in groups:
        first = model.get_parameter(names[0]) if _is_parameter(model, names[0]) else model.get_buffer(names[0])
        for name in names[1:]:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            table = owner._parameters if attr in owner._parameters else owner._buffers
            table[attr] = first


def _is_parameter(model: nn.Module, name: str) -> bool:
    owner_name, _, attr = name.rpartition(".")
    return attr in model.get_submodule(owner_name)._parameters


def load_checkpoint(
    path: PathLike,
    arch: Union[str, ArchSpec, None] = None,
    *,
    arch_kwargs: Optional[dict[str, Any]] = None,
    trust_pickle: bool = False,
    key: Optional[str] = None,
) -> nn.Module:
    """Build the model a checkpoint file holds, with the file's weights, strictly.

    Args:
        path: a ``.safetensors``, ``.pt``, ``.pth``, ``.bin`` or ``.ckpt`` file.
        arch: a timm model name (``"resnet50"``), an import path (``"torchvision.models:resnet50"``) or an
            :class:`~normswap.arch.ArchSpec`. Not needed for a file written by :func:`save`.
        arch_kwargs: keyword arguments for the architecture (``{"num_classes": 10}``), added to those the file
            records.
        trust_pickle: allow unpickling Python objects (a whole model saved with ``torch.save(model)``). Unpickling
            can run arbitrary code: only for files you trust.
        key: the entry of a training checkpoint that holds the weights (default: the first of
            :data:`CONTAINER_KEYS` present).

    The model is returned as built (``train()`` mode), remembering its architecture, history and source file
    (:mod:`normswap.history`). Its tensors are the file's (same dtype; memory-mapped where the format allows).

    Raises:
        CheckpointError: the file cannot be read safely, or does not fit the architecture (the message lists the
            first missing / unexpected keys and the likely cause).
        ArchitectureError: the architecture cannot be built.

    >>> model = load_checkpoint("resnet50.pt", "resnet50")                      # doctest: +SKIP
    >>> model = load_checkpoint("run.pt", "resnet50", arch_kwargs={"num_classes": 10}, key="ema")  # doctest: +SKIP
    """
    return read_checkpoint(path, key=key, trust_pickle=trust_pickle).to_model(arch, arch_kwargs=arch_kwargs)


def load(path: PathLike) -> nn.Module:
    """Load a safetensors file written by :func:`save`: rebuild its architecture, replay its history, load weights.

    Raises:
        CheckpointError: the file does not record an architecture (use :func:`load_checkpoint` with ``arch=``),
            names an import path outside timm/torchvision/normswap, or does not fit.

    >>> model = load("resnet50-gn.safetensors")                                 # doctest: +SKIP
    """
    metadata = read_metadata(path)
    if not metadata.get("arch"):
        raise CheckpointError(
            f"{path} does not record its architecture (not written by normswap.save?): use "
            "load_checkpoint(path, arch=...)"
        )
    return load_checkpoint(path)


def check_output(path: PathLike, *, overwrite: bool = False) -> Path:
    """``path`` if a file can be written there, else :class:`OutputError` saying why (checked before long work).

    >>> check_output("/nonexistent/model.safetensors")
    Traceback (most recent call last):
    ...
    normswap.errors.OutputError: cannot write /nonexistent/model.safetensors: the folder /nonexistent does not exist
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        reason = "is not a folder" if folder.exists() else "does not exist"
        raise OutputError(f"cannot write {path}: the folder {folder} {reason}")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a folder")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists: pass overwrite=True (--force) to replace it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no write permission in the folder {folder}")
    return path


def _create_temporary(path: Path) -> Path:
    """A new empty file beside ``path`` (same folder, so the final rename is atomic), mode as for a new file."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except PermissionError:
            raise OutputError(f"cannot write {path}: no write permission in the folder {path.parent}") from None
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}") from None
        os.close(fd)
        return temporary


def _publish(temporary: Path, path: Path, overwrite: bool) -> None:
    """Give the finished temporary file its final name; never replaces an existing file unless ``overwrite``."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise OutputError(f"{path} already exists: pass overwrite=True (--force) to replace it") from None
    except OSError:
        if path.exists():
            raise OutputError(f"{path} already exists: pass overwrite=True (--force) to replace it") from None
        os.replace(temporary, path)
        return
    temporary.unlink()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Write a file all at once or not at all; returns its path.

    ``write(temporary_path)`` writes the content to a temporary file in the target folder; the file is then flushed
    to disk (fsync) and renamed to ``path``. On any exception, Ctrl-C included, the temporary file is removed and
    ``path`` is untouched. An existing ``path`` is refused with :class:`OutputError` unless ``overwrite``.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
    >>> atomic_write(target, lambda tmp: tmp.write_text("hello")).read_text()
    'hello'
    """
    path = check_output(path, overwrite=overwrite)
    temporary = _create_temporary(path)
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        _publish(temporary, path, overwrite)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


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


def save(
    model: nn.Module,
    path: PathLike,
    *,
    overwrite: bool = False,
    source: Union[PathLike, dict[str, Any], None] = None,
) -> Path:
    """Write ``model``'s weights to a safetensors file that records how to rebuild it; returns the path.

    The header records the architecture spec and history the model carries (see :mod:`normswap.history`), the
    source file (``source``: a path, or ``{"file", "sha256"}``; default: the file the model was loaded from), and
    the normswap and torch versions. Tensors that share memory are saved once (tied weights) or as copies
    (overlapping views); non-contiguous tensors are made contiguous. The write is atomic (:func:`atomic_write`).

    Raises:
        OutputError: ``path`` exists (and not ``overwrite``), its folder is missing or not writable, or it does not
            end in ``.safetensors``.

    >>> import timm, normswap
    >>> model = normswap.convert(timm.create_model("resnet18"), "gn")           # doctest: +SKIP
    >>> normswap.save(model, "resnet18-gn.safetensors")                         # doctest: +SKIP
    PosixPath('resnet18-gn.safetensors')
    """
    from safetensors.torch import save_file

    from . import __version__

    path = Path(path)
    if path.suffix != SAFETENSORS_SUFFIX:
        raise OutputError(f"cannot write {path}: normswap writes safetensors files, name it *{SAFETENSORS_SUFFIX}")
    check_output(path, overwrite=overwrite)
    if source is not None and not isinstance(source, dict):
        source = {"file": Path(source).name, "sha256": file_sha256(source)}
    source = source if source is not None else get_source(model)
    tensors, aliases = _tensors_to_save(model)
    metadata = {"format": "pt", "normswap": __version__, "torch": torch.__version__,
                "history": json.dumps(get_history(model))}
    arch = get_arch(model)
    if arch is not None:
        metadata["arch"] = json.dumps(arch)
    if source is not None:
        metadata["source"] = json.dumps(source)
    if aliases:
        metadata["aliases"] = json.dumps(aliases)
    return atomic_write(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata),
                        overwrite=overwrite)
