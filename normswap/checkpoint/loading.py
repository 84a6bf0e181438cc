"""Opening a checkpoint file: read its content as data, build the architecture, match the manifest, load strictly.

:func:`read_checkpoint` reads a file without building anything: its tensors (or, only with ``trust_pickle``, a
pickled model) and its header metadata, decoded and checked (the architecture spec, the manifest, the history, the
module versions). :meth:`CheckpointContents.to_model` then

1. resolves the architecture: the one the user gives (``arch=``, ``--arch``), with the file's recorded keyword
   arguments when it names the same architecture (``arch_kwargs`` override them key by key; a file's arguments
   reach only a model class or a registered builder); else the file's own spec, built only if it is a registered
   builder (see :mod:`normswap.arch`); or the model the user built (``model=``);
2. builds it on the meta device (no memory, no random initialisation), makes its tree match the file's manifest
   and checks it (:mod:`normswap.checkpoint.manifest`);
3. finds the weights in the file (:mod:`normswap.checkpoint.containers`) and checks them against the meta model:
   every name, shape and kind of dtype, before anything is allocated (a file that says ``num_classes=10**6`` fails
   here); only then is the architecture built on the CPU if it holds tensors that are not in its state dict;
4. loads the weights strictly, module versions included, the file's tensors becoming the model's (no copy).

Example::

    >>> import normswap
    >>> model = normswap.load_checkpoint("resnet50.pt", "resnet50")             # doctest: +SKIP
    >>> model = normswap.load("resnet50-gn.safetensors")          # GroupNorm model, no arch needed  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..arch import ArchSpec
from ..errors import ArchitectureError, CheckpointError, shown, spelled
from ..history import STRUCTURAL_OPS, get_arch, set_arch, set_history, set_input_shape, set_source, validate_history
from . import containers, formats
from .allocation import allocation_limit
from .folders import is_model_folder, keys_for_model, read_folder
from .formats import file_sha256
from .identity import identify
from .manifest import apply_manifest, check_manifest

__all__ = ["CheckpointContents", "check_input", "file_sha256", "load", "load_checkpoint", "read_checkpoint",
           "read_metadata"]

log = logging.getLogger("normswap")

PathLike = Union[str, "os.PathLike[str]"]

_JSON_FIELDS = ("arch", "history", "source", "aliases", "manifest", "module_versions", "input_shape")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_ALIGNMENT = 64


def decode_metadata(raw: dict[str, str], path: Path) -> dict[str, Any]:
    """The header metadata with its structured fields decoded. A file normswap wrote (``"normswap"`` in its header)
    has every field of :data:`_JSON_FIELDS` read as JSON; another file only ``arch`` (a JSON spec or a bare name),
    since its other fields may mean something else."""
    metadata: dict[str, Any] = dict(raw)
    for name in _JSON_FIELDS if "normswap" in raw else ("arch",):
        text = metadata.get(name)
        if text is None:
            continue
        if name == "arch" and not text.lstrip().startswith("{"):
            metadata[name] = {"name": text.strip(), "kwargs": {}}
            continue
        metadata[name] = formats.loads_json(text, f"{path}: the header field '{name}'")
    if "history" in metadata:
        metadata["history"] = validate_history(metadata["history"], where=str(path))
    for name, valid in _FIELD_CHECKS.items():
        if name in metadata and not valid(metadata[name]):
            raise CheckpointError(f"{path}: the header field '{name}' is malformed")
    return metadata


def _table_of(keys: type, values: type, valid: Any = lambda value: True) -> Any:
    return lambda value: isinstance(value, dict) and all(
        isinstance(k, keys) and isinstance(v, values) and not isinstance(v, bool) and valid(v)
        for k, v in value.items())


_MAX_MODULE_VERSION = 1 << 20

_FIELD_CHECKS = {
    "aliases": _table_of(str, str),
    "module_versions": _table_of(str, int, lambda version: 0 <= version <= _MAX_MODULE_VERSION),
    "source": _table_of(str, str),
    "manifest": lambda value: isinstance(value, dict),
    "input_shape": lambda value: isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value),
}
"""What each structured header field must be, checked when the file is read (the manifest is checked in full when it
is applied)."""


def _check_file(path: PathLike) -> tuple[Path, str]:
    path = Path(path)
    if is_model_folder(path):
        return path, "folder"
    path = formats.check_readable(path)
    kind = formats.file_kind(path)
    suffix = path.suffix.lower()
    if kind is None and suffix == ".safetensors":
        kind = "safetensors"  # damaged: the reader says how
    elif kind is None and suffix in TORCH_SUFFIXES:
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: it is neither a zip archive nor a pickle")
    elif kind is None:
        raise CheckpointError(f"{path} is not a checkpoint: it is neither a safetensors file nor a PyTorch file "
                              "(zip archive or pickle)")
    expected = "safetensors" if path.suffix.lower() == ".safetensors" else None
    if expected is not None and kind != expected or expected is None and kind == "safetensors":
        log.info("%s is a %s file whatever its extension says: reading it as one", path.name,
                 "safetensors" if kind == "safetensors" else "PyTorch")
    return path, kind


def check_input(path: PathLike) -> Path:
    """``path`` if it names a non-empty regular file of a kind normswap reads, else :class:`CheckpointError`.

    >>> check_input("/nonexistent/model.pt")
    Traceback (most recent call last):
    ...
    normswap.errors.CheckpointError: /nonexistent/model.pt does not exist
    """
    return _check_file(path)[0]


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The header metadata of a safetensors file, structured fields decoded.

    Keys written by :func:`~normswap.checkpoint.save`: ``normswap`` and ``torch`` (versions), ``arch``
    (``{"name", "kwargs"}``), ``manifest`` (the structure, see :mod:`normswap.checkpoint.manifest`), ``history``
    (what was done to the model), ``source`` (``{"file", "sha256"}``), ``module_versions``, ``aliases`` (names
    saved once for tensors that share memory). Files from elsewhere give what their header has.

    >>> read_metadata("resnet50-gn.safetensors")["arch"]                        # doctest: +SKIP
    {'name': 'resnet50', 'kwargs': {}}
    """
    path, kind = _check_file(path)
    if kind != "safetensors":
        raise CheckpointError(f"{path} is not a safetensors file: only safetensors files carry metadata")
    return decode_metadata(formats.read_safetensors_metadata(path), path)


@dataclass
class CheckpointContents:
    """What a checkpoint file holds, before a model is built from it.

    ``content`` is the file's content as data: the tensor dict of a safetensors file, or what ``torch.load`` returned
    (a state dict, a training checkpoint's dict, or, only with ``trust_pickle``, a model). ``metadata`` is the
    decoded safetensors header (empty for PyTorch files); ``source`` is ``{"file", "sha256"}``, plus ``"entry"``
    and ``"prefix"`` once the weights have been found. ``key``, ``prefix`` and ``ema`` say where the weights are,
    as :func:`normswap.checkpoint.containers.choose_weights` takes them.
    """

    path: Path
    kind: str
    content: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)
    key: Optional[str] = None
    prefix: Optional[str] = None
    ema: bool = False

    @property
    def arch(self) -> Optional[ArchSpec]:
        """The architecture spec the file records, as data (see :attr:`normswap.arch.ArchSpec.from_file`)."""
        arch = self.metadata.get("arch")
        return ArchSpec.from_dict(arch) if arch else None

    @property
    def history(self) -> list[dict[str, Any]]:
        """What the file says was done to the model (provenance: loading does not depend on it)."""
        return list(self.metadata.get("history") or [])

    @property
    def manifest(self) -> Optional[dict[str, Any]]:
        """The structure the file records, if any."""
        return self.metadata.get("manifest")

    @property
    def model(self) -> Optional[nn.Module]:
        """The pickled model the file holds (``trust_pickle`` only), the EMA copy only with ``ema``."""
        modules = containers.find_modules_in(self.content)
        if self.key is not None:
            modules = [(entry, module) for entry, module in modules if entry == self.key]
        modules.sort(key=lambda item: ("ema" in item[0].lower()) != self.ema)
        return modules[0][1] if modules else None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights as well as they can be found without a model (see :func:`containers.guess_weights`)."""
        return self.guess().tensors

    def guess(self) -> containers.WeightsChoice:
        """The weights found without a model to match against."""
        return containers.guess_weights(self.content, key=self.key, prefix=self.prefix, ema=self.ema,
                                        where=str(self.path))

    def resolve_arch(self, arch: Union[str, ArchSpec, None] = None,
                     arch_kwargs: Optional[dict[str, Any]] = None) -> ArchSpec:
        """The architecture to build: the user's (with the file's keyword arguments when it records the same
        name), else the file's own; ``arch_kwargs`` override either key by key."""
        recorded = self.arch
        if arch is None:
            if recorded is None:
                raise CheckpointError(
                    f"{self.path} holds weights only, not the architecture: pass {spelled('arch=', '--arch')}, a timm "
                    "model name such as resnet50 or an import path such as torchvision.models:resnet50"
                )
            return recorded.with_kwargs(arch_kwargs)
        given = arch if isinstance(arch, ArchSpec) else ArchSpec.parse(arch)
        if recorded is not None and recorded.name == given.name and not given.from_file:
            return recorded.confirmed(given.kwargs).with_kwargs(arch_kwargs)
        return given.with_kwargs(arch_kwargs)

    def to_model(self, arch: Union[str, ArchSpec, None] = None, *,
                 arch_kwargs: Optional[dict[str, Any]] = None, model: Optional[nn.Module] = None) -> nn.Module:
        """Build the model and load the file's weights into it strictly (see the module documentation); with
        ``model`` (one the user built, of the original structure), convert that one to what the file's manifest
        describes and load into it instead."""
        if model is not None:
            if arch is not None or arch_kwargs is not None:
                raise ArchitectureError("give model= or arch= (with arch_kwargs=), not both: with model=, the model "
                                        "you built is the architecture")
            return self._into(model)
        pickled = self.model
        if pickled is not None:
            if arch is not None:
                log.info("%s holds a whole model: the architecture given is recorded, not built", self.path.name)
                set_arch(pickled, self.resolve_arch(arch, arch_kwargs).to_dict())
            elif get_arch(pickled) is None and (described := identify(pickled)) is not None:
                log.info("%s holds a whole model; its architecture is recorded as %s", self.path.name, described.name)
                set_arch(pickled, described.to_dict())
            set_source(pickled, self.source)
            return pickled
        spec = self.resolve_arch(arch, arch_kwargs)
        spec.check_buildable()
        model, on_meta = _build(spec, self)
        choice, tensors = self._tensors_for(model, spec)
        if on_meta and _holds_unloadable_tensors(model):
            model, _ = _build(spec, self, device=None)  # the file fits: now the real allocation is the file's size
        return self._load(model, spec, choice, tensors)

    def _into(self, model: nn.Module) -> nn.Module:
        """The user's model, of the original structure, made to match the file's manifest and loaded strictly."""
        from .saving import unwrap_model

        model = unwrap_model(model)[-1]
        own = get_arch(model)
        recorded = self.arch
        spec = recorded if recorded is not None else ArchSpec(f"{type(model).__module__}:{type(model).__name__}")
        manifest = self.manifest
        if manifest is None:
            self._check_no_steps()
        shadow = _on_meta(model)  # checked on a copy without memory first: a misfit leaves the user's model as it was
        if manifest is not None:
            shadow = apply_manifest(shadow, manifest)
            check_manifest(shadow, manifest)
        choice, tensors = self._tensors_for(shadow, spec)
        if manifest is not None:
            model = apply_manifest(model, manifest)
            check_manifest(model, manifest)
        model = self._load(model, spec, choice, tensors)
        if recorded is None:
            set_arch(model, own)  # the file says nothing: the model keeps what it knew of itself, if anything
        return model

    def _tensors_for(self, model: nn.Module, spec: ArchSpec) -> tuple[containers.WeightsChoice,
                                                                       dict[str, torch.Tensor]]:
        """The file's weights for ``model`` (on the meta device or not), keyed exactly as its state dict and checked
        against it (names, shapes, kinds of dtype), or :class:`CheckpointError` saying what differs."""
        state = model.state_dict(keep_vars=True)
        expected = {name: tensor.shape for name, tensor in state.items()}
        content = keys_for_model(self.content, model) if self.kind == "folder" else self.content
        choice = containers.choose_weights(content, set(expected), key=self.key, prefix=self.prefix,
                                           ema=self.ema, where=str(self.path))
        if choice.entry or choice.prefix:
            log.info("%s: using %s", self.path.name, choice.describe())
        if choice.others:
            log.info("%s: also matching: %s (choose with key= / prefix= / ema=)", self.path.name,
                     ", ".join(choice.others))
        tensors = dict(choice.tensors)
        for alias, name in (self.metadata.get("aliases") or {}).items():
            if name in tensors:
                tensors[alias] = tensors[name]
        for names in _shared_tensor_names(model):  # tied weights saved under one of their names
            present = [name for name in names if name in tensors]
            for name in names:
                if present and name not in tensors:
                    tensors[name] = tensors[present[0]]
        tensors = _fit_tensors(self.path, spec, model, tensors, expected, f"{choice.describe()} of the file")
        _check_dtypes(self.path, state, tensors)
        return choice, tensors

    def _load(self, model: nn.Module, spec: ArchSpec, choice: containers.WeightsChoice,
              tensors: dict[str, torch.Tensor]) -> nn.Module:
        _load_strictly(model, _aligned(tensors), self._versions(choice, model))
        built = get_arch(model)  # what the builder recorded (an ultralytics yaml itself, not its file name)
        set_arch(model, built if built is not None and built["name"] == spec.name else spec.to_dict())
        set_history(model, self.history)
        source = dict(self.source)
        if choice.entry:
            source["entry"] = choice.entry
        if choice.prefix:
            source["prefix"] = choice.prefix
        set_source(model, source)
        if isinstance(self.metadata.get("input_shape"), list):
            set_input_shape(model, self.metadata["input_shape"])
        return model

    def _versions(self, choice: containers.WeightsChoice, model: nn.Module) -> dict[str, int]:
        recorded = self.metadata.get("module_versions")
        if recorded is None:
            return choice.versions
        return {name: int(recorded.get(name, 1)) for name, _ in model.named_modules()}

    def _check_no_steps(self) -> None:
        structural = [step["op"] for step in self.history if step["op"] in STRUCTURAL_OPS]
        if structural:
            raise CheckpointError(
                f"{self.path} was written by normswap {shown(self.metadata.get('normswap', '0.1'))}, which recorded "
                f"its structure as steps ({', '.join(structural)}) rather than a manifest: load it with that "
                "version and save it again"
            )


def _on_meta(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are on the meta device (tied ones still tied): its structure,
    for free."""
    memo: dict[int, Any] = {}
    for tensor in chain(model.parameters(), model.buffers()):
        if id(tensor) not in memo:
            empty = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _check_dtypes(path: Path, state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """:class:`CheckpointError` for a file tensor of another kind of dtype than the model's (a float where the model
    has integers, ...): precision may differ (a half-precision file), the kind may not."""
    def kind(dtype: torch.dtype) -> str:
        return "complex" if dtype.is_complex else "floating" if dtype.is_floating_point else \
            "bool" if dtype == torch.bool else "integer"

    for name, tensor in state.items():
        mine, theirs = kind(tensor.dtype), kind(tensors[name].dtype)
        if mine != theirs:
            raise CheckpointError(f"{path} does not fit the architecture: '{shown(name)}' is {theirs} "
                                  f"({tensors[name].dtype}) in the file, {mine} in the model")


def read_checkpoint(path: PathLike, *, key: Optional[str] = None, prefix: Optional[str] = None, ema: bool = False,
                    trust_pickle: bool = False) -> CheckpointContents:
    """Read a checkpoint file's content (tensors, or with ``trust_pickle`` a pickled model) and metadata, without
    building a model.

    Raises:
        CheckpointError: the file is missing, empty, not a regular file, of no known kind, unreadable, a
            TorchScript archive, pickled objects without ``trust_pickle``, or has a malformed header.

    >>> contents = read_checkpoint("resnet50.pt")                               # doctest: +SKIP
    >>> contents.source["file"]                                                 # doctest: +SKIP
    'resnet50.pt'
    """
    path, kind = _check_file(path)
    if kind == "folder":
        if key is not None:
            raise CheckpointError(f"{path} is a model folder, which has no entries: {spelled('key=', '--key')} picks "
                                  "an entry of a PyTorch file")
        folder = read_folder(path)
        contents = CheckpointContents(path, kind, folder.tensors, {"arch": folder.arch.to_dict()}, prefix=prefix)
        contents.source = folder.source(path)
        return contents
    if kind == "safetensors":
        if key is not None:
            raise CheckpointError(f"{path} is a safetensors file, which has no entries: {spelled('key=', '--key')} "
                                  "picks an entry of a PyTorch file")
        tensors, raw = formats.read_safetensors(path)
        content: Any = tensors
        metadata = decode_metadata(raw, path)
    else:
        content = formats.read_torch(path, kind, trust_pickle=trust_pickle)
        metadata = {}
        if not isinstance(content, (dict, nn.Module)) and not containers.find_modules_in(content):
            raise CheckpointError(f"{path} holds a {type(content).__name__}, not a state dict or a model")
    contents = CheckpointContents(path, kind, content, metadata, key=key, prefix=prefix, ema=ema)
    if contents.model is None:
        contents.guess()  # a file without tensors is refused here, before any architecture is built
    contents.source = {"file": path.name, "sha256": file_sha256(path)}
    return contents


def _holds_unloadable_tensors(model: nn.Module) -> bool:
    """True if some tensor of the model is not in its state dict (non-persistent buffers, plain tensor attributes):
    those get their values from ``__init__``, so the model cannot be built on the meta device."""
    persistent = set(model.state_dict(keep_vars=True))
    if any(name not in persistent for name, _ in model.named_buffers(remove_duplicate=False)):
        return True
    return any(isinstance(value, torch.Tensor) for module in model.modules() for value in vars(module).values())


_CPU_BUILD_ROOM = 3
_CPU_BUILD_SLACK = 256 * 2**20
"""What building a file's architecture on the CPU may allocate: three times the file's size (weights saved in half
precision, buffers it does not store) plus 256 MiB."""


def _file_bytes(path: Path) -> int:
    """The size of a checkpoint file, or of every file in a model folder."""
    if path.is_dir():
        return sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
    return path.stat().st_size


def _build(spec: ArchSpec, contents: CheckpointContents, device: Optional[str] = "meta") -> tuple[nn.Module, bool]:
    """The architecture with the file's manifest applied, and whether it is on the meta device: there when possible
    (no memory, no init), else on the CPU, where a spec the file records may allocate only what its size allows
    (:mod:`normswap.checkpoint.allocation`)."""
    model = None
    if device == "meta":
        try:
            model = spec.build(device="meta")
        except ArchitectureError as exc:
            log.debug("building %s on the meta device failed (%s); building it on the CPU", spec, exc)
    on_meta = model is not None
    if model is None:
        with allocation_limit(_CPU_BUILD_ROOM * _file_bytes(contents.path) + _CPU_BUILD_SLACK,
                              f"{spec.short()} on the CPU") if spec.from_file or spec.file_keys \
                else contextlib.nullcontext():
            model = spec.build()
    manifest = contents.manifest
    if manifest is None:
        contents._check_no_steps()
        return model, on_meta
    model = apply_manifest(model, manifest)
    check_manifest(model, manifest)
    return model, on_meta


def _classifier_prefix(model: nn.Module) -> Optional[str]:
    """Qualified name of the module holding the model's last parameter (the classifier for most networks)."""
    names = [name for name, _ in model.named_parameters()]
    return names[-1].rpartition(".")[0] if names else None


def _fit_message(path: Path, spec: ArchSpec, model: nn.Module, expected: dict[str, torch.Size],
                 tensors: dict[str, torch.Tensor], missing: list[str], unexpected: list[str],
                 reshaped: list[str], where: str) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (first: {shown(missing[0])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (first: {shown(unexpected[0])})")
    if reshaped:
        listed = ", ".join(f"{shown(name)}: file {tuple(tensors[name].shape)}, model {tuple(expected[name])}"
                           for name in reshaped[:1])
        parts.append(f"{len(reshaped)} shape mismatch(es) ({listed})")
    head = _classifier_prefix(model)
    matched = len(set(expected) & set(tensors))
    if not missing and not unexpected and head is not None \
            and all(name.rpartition(".")[0] == head for name in reshaped):
        classes = tensors[reshaped[0]].shape[0]
        python = f"arch_kwargs={{'num_classes': {classes}}}"
        command_line = f"--arch-kwargs '{{\"num_classes\": {classes}}}'"
        cause = f"wrong num_classes? the file's classifier has {classes} outputs: pass {spelled(python, command_line)}"
    elif matched < len(expected) / 2:
        cause = (f"wrong architecture? only {matched} of the model's {len(expected)} keys are in {where}; "
                 f"pass {spelled('key= / prefix=', '--key / --prefix')} if the weights are elsewhere in the file")
    else:
        cause = f"wrong architecture or architecture keyword arguments? the keys were matched under {where}"
    return f"{path} does not fit {shown(spec.name)}: {'; '.join(parts)} ({cause})"


def _fit_tensors(path: Path, spec: ArchSpec, model: nn.Module, tensors: dict[str, torch.Tensor],
                 expected: dict[str, torch.Size], where: str) -> dict[str, torch.Tensor]:
    """The file's tensors keyed exactly as the model's state dict, or :class:`CheckpointError` saying what differs."""
    tensors = dict(tensors)
    for name in expected:
        if name not in tensors and name.endswith("num_batches_tracked"):
            tensors[name] = torch.zeros((), dtype=torch.long)
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    reshaped = [name for name in expected if name in tensors and tensors[name].shape != expected[name]]
    if missing or unexpected or reshaped:
        raise CheckpointError(_fit_message(path, spec, model, expected, tensors, missing, unexpected, reshaped,
                                           where))
    return tensors


def _aligned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors, those whose memory is not 64-byte aligned (views into a memory-mapped file) copied into aligned
    memory, one at a time: CPU kernels choose code paths by alignment, so only aligned tensors compute bit for bit
    what the saved model computed. Tensors that share memory stay shared."""
    copies: dict[int, torch.Tensor] = {}
    result = {}
    for name, tensor in tensors.items():
        if tensor.device.type == "cpu" and tensor.numel() and tensor.data_ptr() % _ALIGNMENT:
            tensor = copies.setdefault(id(tensor), tensor.clone())
        result[name] = tensor
    return result


def _shared_tensor_names(model: nn.Module) -> list[list[str]]:
    """Groups of qualified names that refer to one parameter or buffer object (tied weights, shared modules)."""
    groups: dict[int, list[str]] = {}
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _is_parameter(model: nn.Module, name: str) -> bool:
    owner_name, _, attr = name.rpartition(".")
    return attr in model.get_submodule(owner_name)._parameters


def _load_strictly(model: nn.Module, tensors: dict[str, torch.Tensor], versions: dict[str, int]) -> None:
    """``load_state_dict(strict=True, assign=True)`` with the module versions, keeping tied tensors tied
    (assignment is per name)."""
    ties = _shared_tensor_names(model)
    state = OrderedDict(tensors)
    state._metadata = OrderedDict((prefix, {"version": version}) for prefix, version in versions.items())
    model.load_state_dict(state, strict=True, assign=True)
    for names in ties:
        first = model.get_parameter(names[0]) if _is_parameter(model, names[0]) else model.get_buffer(names[0])
        for name in names[1:]:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            table = owner._parameters if attr in owner._parameters else owner._buffers
            table[attr] = first


def load_checkpoint(
    path: PathLike,
    arch: Union[str, ArchSpec, None] = None,
    *,
    arch_kwargs: Optional[dict[str, Any]] = None,
    trust_pickle: bool = False,
    key: Optional[str] = None,
    prefix: Optional[str] = None,
    ema: bool = False,
) -> nn.Module:
    """Build the model a checkpoint file holds, with the file's weights, strictly.

    Unlike timm's ``load_checkpoint(model, path)``, which loads a file into a model you built, this builds the model
    (as ``arch``, or the file, says) and returns it; to load a file into a model you built, use
    ``normswap.load(path, model=...)``.

    Args:
        path: a safetensors or PyTorch file (the kind is read from its bytes).
        arch: a timm model name (``"resnet50"``), an import path (``"torchvision.models:resnet50"``,
            ``"monai.networks.nets:UNet"``) or an :class:`~normswap.arch.ArchSpec`. Not needed for a file written
            by :func:`~normswap.checkpoint.save` of a timm, torchvision or normswap architecture; for another
            architecture the error says what to pass.
        arch_kwargs: keyword arguments for the architecture (``{"num_classes": 10}``), overriding those the file
            records.
        trust_pickle: allow unpickling Python objects (a whole model saved with ``torch.save(model)``). Unpickling
            can run arbitrary code: only for files you trust.
        key, prefix: the entry of a training checkpoint that holds the weights (dotted, ``"state_dict"``) and the
            key prefix to remove (``"model."``); by default the entry and prefix that match the model's keys best.
        ema: prefer the exponential-moving-average weights when the file holds both.

    The model is returned as built (``train()`` mode), remembering its architecture, history and source file
    (:mod:`normswap.history`). Its tensors are the file's (same dtype).

    Raises:
        CheckpointError: the file cannot be read safely, or does not fit the architecture (the message lists the
            first missing / unexpected keys and the likely cause).
        ArchitectureError: the architecture cannot be built, or the file names one that must be typed to be built.

    >>> model = load_checkpoint("resnet50.pt", "resnet50")                      # doctest: +SKIP
    >>> model = load_checkpoint("run.pt", "resnet50", arch_kwargs={"num_classes": 10}, ema=True)  # doctest: +SKIP
    """
    contents = read_checkpoint(path, key=key, prefix=prefix, ema=ema, trust_pickle=trust_pickle)
    return contents.to_model(arch, arch_kwargs=arch_kwargs)


def load(path: PathLike, arch: Union[str, ArchSpec, None] = None, *, arch_kwargs: Optional[dict[str, Any]] = None,
         device: Union[str, torch.device, None] = None, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a safetensors file written by :func:`~normswap.checkpoint.save`: build its architecture, match its
    manifest, load its weights strictly; on ``device`` if given.

    ``arch`` is needed only for an architecture outside timm, torchvision, transformers, ultralytics,
    segmentation_models_pytorch and normswap, which normswap does not import on a file's word (the error names the value
    to pass); the file's keyword arguments are used with it if it is a model class. ``model`` is a model you built in
    your code, with the structure the saved model had before normswap changed it (``monai.networks.nets.UNet(...)`` as
    you built it): it is converted to what the file's manifest describes, checked, and loaded strictly (in place; the
    model is returned).

    Raises:
        CheckpointError: the file does not record an architecture and no ``arch`` or ``model`` is given, or it does
            not fit.

    >>> model = load("resnet50-gn.safetensors")                                 # doctest: +SKIP
    >>> model = load("unet3d-gn.safetensors", arch="monai.networks.nets:UNet")  # doctest: +SKIP
    >>> unet = load("unet3d-gn.safetensors", model=monai.networks.nets.UNet(3, 1, 2, (16, 32), (2,)))  # doctest: +SKIP
    """
    contents = read_checkpoint(path)
    if contents.arch is None and arch is None and model is None:
        raise CheckpointError(
            f"{path} does not record its architecture (normswap could not tell how the saved model was built): "
            "build it in your code as it was before conversion and pass it, load(path, model=my_model), or name it "
            "with arch= (and arch_kwargs=)"
        )
    loaded = contents.to_model(arch, arch_kwargs=arch_kwargs, model=model)
    return loaded.to(device) if device is not None else loaded
