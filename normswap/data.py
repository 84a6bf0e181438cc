"""Calibration data: turning whatever the user iterates over, or names on the command line, into model inputs.

Every operation that runs a model over data (recalibrate, fit, compare) takes ``data`` as any iterable of batches,
where a batch is a tensor, a tuple/list whose first element is the input (``(images, labels)``), a dict (the input
under ``input_key``), or anything ``input_fn(batch)`` turns into the model input. A model input that is a tuple is
passed as positional arguments, a dict as keyword arguments (:func:`call_model`).

:func:`open_data` turns a path or an import path into such an iterable, for the command line and recipes:

- a folder of images (class subfolders or flat), transformed by the model's timm data config;
- a tensor file (``.pt``/``.pth``, ``.npy``, ``.safetensors``) holding the whole calibration set, cut into batches;
- ``"package.module:callable"``: the callable is called and must return an iterable of batches.

Example::

    >>> import torch
    >>> batches = [(torch.zeros(2, 3), torch.tensor([0, 1])), (torch.ones(1, 3), torch.tensor([1]))]
    >>> [(i, x.shape[0]) for i, x in iter_inputs(batches)]
    [(0, 2), (1, 1)]
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import inspect
import logging
import os
import stat
import sys
from collections.abc import Iterable as IterableABC
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from . import imports
from .errors import CalibrationError, NormswapError, spelled

__all__ = [
    "DEFAULT_INPUT_KEYS",
    "ModelFailure",
    "IMAGE_EXTENSIONS",
    "TENSOR_EXTENSIONS",
    "ImageFiles",
    "TensorBatches",
    "batch_input",
    "batch_size_of",
    "call_model",
    "describe_input",
    "floating_dtype",
    "iter_inputs",
    "main_output",
    "model_failures",
    "move_input",
    "open_data",
    "output_tensors",
]

log = logging.getLogger("normswap")

DEFAULT_INPUT_KEYS = ("input", "inputs", "image", "images", "img", "x", "pixel_values")
"""Keys tried, in order, for a dict batch when no ``input_key`` is given."""

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File suffixes :func:`open_data` reads as images in a folder (case-insensitive)."""

TENSOR_EXTENSIONS = (".npy", ".pt", ".pth", ".safetensors")
"""File suffixes :func:`open_data` reads as a tensor file."""


def batch_input(
    batch: Any,
    index: int,
    *,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
) -> Any:
    """The model input in one batch; :class:`CalibrationError` naming the batch ``index`` if there is none, or if
    ``input_key`` is given for a batch that has no keys (a tensor, or a tuple whose first element is one).

    >>> batch_input({"image": torch.zeros(2, 3)}, 0, input_key="image").shape
    torch.Size([2, 3])
    >>> batch_input(torch.zeros(2, 3), 0, input_key="image")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normswap.errors.CalibrationError: batch 0 is a tensor, which has no keys: input_key='image' ...
    """
    if input_fn is not None:
        return input_fn(batch)
    if isinstance(batch, torch.Tensor):
        if input_key is not None:
            given = spelled(f"input_key={input_key!r}", f"--input-key {input_key}")
            raise CalibrationError(f"batch {index} is a tensor, which has no keys: {given} applies to dict batches "
                                   "only; drop it")
        return batch
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise CalibrationError(f"batch {index} is an empty {type(batch).__name__}: expected (input, ...)")
        return batch_input(batch[0], index, input_key=input_key)
    if isinstance(batch, Mapping):
        keys = [input_key] if input_key is not None else [k for k in DEFAULT_INPUT_KEYS if k in batch]
        if not keys or keys[0] not in batch:
            wanted = f"key '{input_key}'" if input_key is not None else "one of " + ", ".join(DEFAULT_INPUT_KEYS)
            raise CalibrationError(
                f"batch {index} is a dict with keys {sorted(map(str, batch))}: expected {wanted} (pass input_key=)"
            )
        return batch[keys[0]]
    raise CalibrationError(
        f"batch {index} is a {type(batch).__name__}: expected a tensor, a tuple/list whose first element is the "
        "input, or a dict (pass input_key= or input_fn=)"
    )


def iter_inputs(
    data: Iterable[Any],
    *,
    batches: Optional[int] = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
) -> Iterator[tuple[int, Any]]:
    """``(index, model_input)`` for each batch of ``data``, stopping after ``batches`` batches if given.

    A data loader that raises is reported as a :class:`CalibrationError` naming the batch and the loader's message;
    asking for more ``batches`` than the data has is warned about, with the count used.
    """
    if batches is not None and batches < 1:
        raise CalibrationError(f"batches must be at least 1, got {batches}")
    if isinstance(data, torch.Tensor):
        raise CalibrationError("the calibration data is a single tensor: pass an iterable of batches, such as "
                               "[x], x.split(batch_size) or a DataLoader")
    if not isinstance(data, IterableABC) and not hasattr(data, "__getitem__"):
        raise CalibrationError(f"the calibration data is a {type(data).__name__}: expected an iterable of batches")
    with _loader_failures(0):
        iterator = iter(data)
    index = 0
    while batches is None or index < batches:
        with _loader_failures(index):
            try:
                batch = next(iterator)
            except StopIteration:
                break
        yield index, batch_input(batch, index, input_fn=input_fn, input_key=input_key)
        index += 1
    if batches is not None and index < batches:
        log.warning("asked for %d batches, the data has %d: used %d", batches, index, index)


@contextlib.contextmanager
def _loader_failures(index: int) -> Iterator[None]:
    """A data loader's own exception as a :class:`CalibrationError` naming the batch it was reading."""
    try:
        yield
    except (NormswapError, StopIteration):
        raise
    except Exception as exc:
        raise CalibrationError(f"reading batch {index} failed in the data loader: {type(exc).__name__}: "
                               f"{_first_line(exc)}") from exc


class ModelFailure(CalibrationError):
    """The model itself raised on batch ``index`` (not a problem normswap found in the data or the statistics)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


@contextlib.contextmanager
def model_failures(index: int, model_input: Any, what: str = "the model") -> Iterator[None]:
    """A model's exception on one batch as a :class:`ModelFailure` naming the batch and its input (a batch of the
    wrong channel count, dtype or size is the usual cause)."""
    try:
        yield
    except NormswapError:
        raise
    except Exception as exc:
        raise ModelFailure(f"batch {index} ({describe_input(model_input, dtypes=True)}) failed in {what}: "
                           f"{type(exc).__name__}: {_first_line(exc)}", index) from exc


def batch_size_of(model_input: Any) -> int:
    """The batch size of a model input: the first dimension of its first tensor (0 if it has none).

    >>> batch_size_of({"pixel_values": torch.zeros(4, 3, 8, 8)}), batch_size_of([torch.zeros(3, 9, 9)] * 2)
    (4, 3)
    """
    if isinstance(model_input, torch.Tensor):
        return int(model_input.shape[0]) if model_input.dim() else 1
    if isinstance(model_input, Mapping):
        values = list(model_input.values())
    elif isinstance(model_input, (tuple, list)):
        values = list(model_input)
    else:
        return 0
    return next((found for found in map(batch_size_of, values) if found), 0)


def describe_input(model_input: Any, *, dtypes: bool = False) -> str:
    """A short description of a model input, for messages and reports: ``2x3x224x224``, ``[3x800x800]`` (a list),
    ``(2x3, {mask: 2})`` (a tuple holding a dict); with ``dtypes``, each tensor's dtype too (``float32 2x3x8x8``).

    >>> describe_input((torch.zeros(2, 3), {"mask": torch.zeros(2)}))
    '(2x3, {mask: 2})'
    >>> describe_input([torch.zeros(1, 4, dtype=torch.float16), "scale"], dtypes=True)
    '[float16 1x4, str]'
    """
    if isinstance(model_input, torch.Tensor):
        shape = "x".join(map(str, model_input.shape)) or "scalar"
        return f"{str(model_input.dtype).replace('torch.', '')} {shape}" if dtypes else shape
    if isinstance(model_input, (tuple, list)):
        inner = ", ".join(describe_input(item, dtypes=dtypes) for item in model_input)
        return f"[{inner}]" if isinstance(model_input, list) else f"({inner})"
    if isinstance(model_input, Mapping):
        items = ", ".join(f"{key}: {describe_input(item, dtypes=dtypes)}" for key, item in model_input.items())
        return "{" + items + "}"
    return type(model_input).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def move_input(
    value: Any,
    device: Union[str, torch.device, None],
    *,
    dtype: Optional[torch.dtype] = None,
    channels_last: bool = False,
    non_blocking: bool = False,
) -> Any:
    """``value`` (a tensor, or tuples, lists and dicts of them) on ``device``, floating tensors cast to ``dtype`` if
    given (the model's: a half-precision model gets half-precision batches) and, if asked, 4-D tensors in
    channels-last layout. CPU tensors bound for a GPU go through pinned memory and, with ``non_blocking=True``, are
    copied asynchronously. Anything that is not a tensor is returned as it is.

    >>> move_input((torch.zeros(1, 3, 2, 2), "meta"), "cpu", channels_last=True)[0].is_contiguous(
    ...     memory_format=torch.channels_last)
    True
    >>> move_input({"x": torch.zeros(2), "n": torch.tensor([1])}, None, dtype=torch.float16)["x"].dtype
    torch.float16
    """
    if isinstance(value, torch.Tensor):
        target = torch.device(device) if device is not None else value.device
        if target != value.device:
            if value.device.type == "cpu" and target.type == "cuda" and non_blocking and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(target, non_blocking=non_blocking)
        if dtype is not None and value.is_floating_point() and value.dtype != dtype:
            value = value.to(dtype)
        if channels_last and value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        return value
    options = {"dtype": dtype, "channels_last": channels_last, "non_blocking": non_blocking}
    if isinstance(value, tuple):
        return tuple(move_input(item, device, **options) for item in value)
    if isinstance(value, list):
        return [move_input(item, device, **options) for item in value]
    if isinstance(value, Mapping):
        return {key: move_input(item, device, **options) for key, item in value.items()}
    return value


def floating_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter or buffer (what its inputs should be), if any.

    >>> floating_dtype(torch.nn.Linear(2, 2).half())
    torch.float16
    """
    for tensor in itertools.chain(model.parameters(), model.buffers()):  # (lazily: the first one usually answers)
        if tensor.is_floating_point():
            return tensor.dtype
    return None


OUTPUT_KEYS = ("logits", "out", "output")
"""Keys tried, in order, for the main output of a model that returns a dict."""


MAX_DEPTH = 8
"""How deep :func:`output_tensors` looks into nested containers."""


def output_tensors(output: Any, *, floating: bool = False) -> list[torch.Tensor]:
    """Every tensor in a model output or input (a tensor, or tuples, lists, dicts and dataclasses of them,
    transformers' outputs included, down to :data:`MAX_DEPTH` levels), in order; only the floating-point ones with
    ``floating``.

    >>> [t.shape[0] for t in output_tensors({"boxes": torch.zeros(3, 4), "labels": torch.zeros(3).long()})]
    [3, 3]
    """
    if isinstance(output, torch.Tensor) and not floating:  # most calls' output: no walk at all
        return [output]
    found: list[torch.Tensor] = []
    _collect_tensors(output, floating, 0, found)
    return found


SCALAR_TYPES = frozenset({int, float, bool, complex, str, bytes, type(None), type(Ellipsis), slice, torch.dtype,
                          torch.device, torch.layout, torch.memory_format, torch.Size})
"""Types of values that hold no tensor (a ``torch.Size`` holds sizes): not looked into for tensors."""


def _collect_tensors(value: Any, floating: bool, depth: int, found: list[torch.Tensor]) -> None:
    """:func:`output_tensors` into ``found``, with the depth reached. It runs on every call a graph records, so it
    appends to one list (no list per level) and handles the tensors and plain values directly inside a tuple or
    list without a call per item: the arguments of most torch calls cost one call per container."""
    if isinstance(value, torch.Tensor):
        if not floating or value.is_floating_point():
            found.append(value)
        return
    if type(value) in SCALAR_TYPES or depth >= MAX_DEPTH:
        return
    if isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, torch.Tensor):
                if not floating or item.is_floating_point():
                    found.append(item)
            elif type(item) not in SCALAR_TYPES:
                _collect_tensors(item, floating, depth + 1, found)
    elif isinstance(value, Mapping):
        for item in value.values():
            _collect_tensors(item, floating, depth + 1, found)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _collect_tensors(getattr(value, f.name, None), floating, depth + 1, found)


def main_output(output: Any) -> torch.Tensor:
    """The tensor that stands for a model's output: the output itself, a dict's ``logits`` (or ``out``, ``output``),
    else the first floating-point tensor in it; :class:`NormswapError` when it has none.

    >>> main_output((torch.ones(2, 5), torch.zeros(2))).shape
    torch.Size([2, 5])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in OUTPUT_KEYS:
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
    found = output_tensors(output, floating=True)
    if not found:
        raise NormswapError(f"the model returned a {type(output).__name__} without a floating-point tensor")
    return found[0]


def call_model(model: nn.Module, model_input: Any) -> Any:
    """Run ``model`` on one model input: a tuple is unpacked into positional arguments, a dict into keyword
    arguments, anything else is the single argument.

    >>> call_model(torch.nn.Identity(), torch.ones(1)).tolist()
    [1.0]
    """
    if isinstance(model_input, tuple):
        return model(*model_input)
    if isinstance(model_input, Mapping):
        return model(**model_input)
    return model(model_input)


class TensorBatches:
    """A calibration set held in memory, cut into batches along its first dimension; iterable any number of times.

    ``content`` is a tensor (batches are tensors), a dict of tensors (batches are dicts, pick the input with
    ``input_key``) or a tuple/list of tensors such as ``(images, labels)`` (batches are tuples), all of one length.

    >>> [b.shape[0] for b in TensorBatches(torch.zeros(5, 3), batch_size=2)]
    [2, 2, 1]
    """

    def __init__(self, content: Any, batch_size: int) -> None:
        if batch_size < 1:
            raise CalibrationError(f"batch_size must be at least 1, got {batch_size}")
        tensors = _tensors_of(content)
        lengths = {tensor.shape[0] if tensor.dim() else -1 for tensor in tensors}
        if not tensors or len(lengths) != 1 or -1 in lengths:
            raise CalibrationError(
                "a tensor file must hold one tensor, or tensors of one length along the first dimension, "
                f"got {_describe_content(content)}"
            )
        self.content = content
        self.batch_size = batch_size
        self.length = lengths.pop()

    def __len__(self) -> int:
        return -(-self.length // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, self.length, self.batch_size):
            yield _slice(self.content, slice(start, start + self.batch_size))


class ImageFiles(torch.utils.data.Dataset):
    """The image files in a folder (any depth, sorted by path), each read with PIL and transformed.

    ``mode`` is the PIL mode images are converted to (``"RGB"``, or ``"L"`` for one-channel models).
    """

    def __init__(self, files: list[Path], transform: Callable[[Any], torch.Tensor], mode: str = "RGB") -> None:
        self.files = files
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert(self.mode))
        except (OSError, UnidentifiedImageError) as exc:
            raise CalibrationError(f"cannot read image '{path}': {exc}") from None
        except Exception as exc:  # libraries that patch PIL (ultralytics) raise their own errors
            raise CalibrationError(f"cannot read image '{path}': {type(exc).__name__}: {exc}") from None


def open_data(
    source: Union[str, os.PathLike],
    *,
    model: Optional[nn.Module] = None,
    batch_size: int = 32,
    num_workers: int = 0,
    data_config: Optional[dict[str, Any]] = None,
    allow_import: bool = True,
) -> Iterable[Any]:
    """Calibration batches from a folder of images, a tensor file, or ``"package.module:callable"``.

    Args:
        source: a folder of images (class subfolders or flat; files with :data:`IMAGE_EXTENSIONS`), a tensor file
            (a safetensors, ``torch.save`` or ``.npy`` file, told apart by content), or the import path of a
            callable that returns an iterable of batches. The callable is given ``batch_size=`` and ``model=`` when
            its signature has parameters of those names.
        model: for image folders: images are resized, cropped and normalized as timm's
            ``resolve_data_config(model=model)`` says (the input size, mean and std of its pretrained config, or
            timm's defaults); also passed to a callable that wants it.
        batch_size: images or rows per batch (folders and tensor files).
        num_workers: worker processes reading images.
        data_config: overrides of the data config for image folders, e.g. ``{"input_size": (1, 8, 8),
            "mean": (0.5,), "std": (0.5,)}``.
        allow_import: whether ``source`` may be an import path: ``False`` when it was read from a file (a recipe),
            since importing runs code.

    Returns:
        A re-iterable of batches: image tensors ``(B, C, H, W)`` for folders, tensors/dicts/tuples for tensor
        files (see :class:`TensorBatches`), whatever the callable returns otherwise.

    Raises:
        CalibrationError: the source does not exist, is not a regular file or folder (a pipe would block), cannot be
            read without running code, or is an import path that was not typed.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "calib.pt")
    >>> torch.save(torch.randn(10, 3, 8, 8), path)
    >>> [batch.shape[0] for batch in open_data(path, batch_size=4)]
    [4, 4, 2]
    """
    if batch_size < 1:
        raise CalibrationError(f"batch_size must be at least 1, got {batch_size}")
    text = os.fspath(source)
    path = Path(text)
    if not path.exists() and imports.is_import_path(text):
        if not allow_import:
            raise CalibrationError(f"the data '{text}' is an import path, which normswap runs only when you type it: "
                                   f"pass --data {text} (data= in Python) to use it")
        return _call_data_callable(text, model=model, batch_size=batch_size)
    if path.is_dir():
        return _image_folder(path, model=model, batch_size=batch_size, num_workers=num_workers,
                             data_config=data_config)
    if not path.exists():
        raise CalibrationError(f"calibration data '{text}' does not exist (expected a folder of images, a tensor "
                               "file or package.module:callable)")
    if not stat.S_ISREG(path.stat().st_mode):
        raise CalibrationError(f"calibration data '{text}' is not a regular file or a folder (a pipe or a device?)")
    return TensorBatches(_load_tensor_file(path), batch_size)


def _load_tensor_file(path: Path) -> Any:
    """The content of a tensor file, by its bytes: safetensors, ``torch.save`` (read with ``weights_only``) or
    NumPy ``.npy`` (without pickles)."""
    from .checkpoint import formats

    with open(path, "rb") as f:
        head = f.read(6)
    try:
        kind = formats.file_kind(path)
        if head == b"\x93NUMPY":
            import numpy as np

            return torch.from_numpy(np.load(path, allow_pickle=False))
        if kind == "safetensors":
            content, _ = formats.read_safetensors(path)
            return next(iter(content.values())) if len(content) == 1 else content
        if kind in ("zip", "pickle"):
            return formats.read_torch(path, kind)
    except formats.UnsafePickle as exc:
        raise CalibrationError(f"cannot read tensor file '{path}': it holds pickled Python objects ({exc.found}), "
                               "which normswap does not unpickle; calibration data must be plain tensors "
                               "(torch.save of a tensor, or of a dict or tuple of tensors)") from None
    except NormswapError as exc:
        raise CalibrationError(f"cannot read calibration data: {exc}") from None
    except Exception as exc:  # NumPy's readers have their own error types for a damaged or foreign file
        raise CalibrationError(f"cannot read tensor file '{path.name}': {_first_line(exc)}") from None
    raise CalibrationError(f"cannot read tensor file '{path}': it is neither a safetensors, a PyTorch nor a NumPy "
                           "file (expected a folder of images or a tensor file)")


def _tensors_of(content: Any) -> list[torch.Tensor]:
    if isinstance(content, torch.Tensor):
        return [content]
    values = list(content.values()) if isinstance(content, Mapping) else content
    if isinstance(values, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in values):
        return list(values)
    return []


def _describe_content(content: Any) -> str:
    if isinstance(content, Mapping):
        return "{" + ", ".join(f"{k}: {_describe_content(v)}" for k, v in content.items()) + "}"
    if isinstance(content, (tuple, list)):
        return "(" + ", ".join(_describe_content(v) for v in content) + ")"
    if isinstance(content, torch.Tensor):
        return f"tensor{list(content.shape)}"
    return type(content).__name__


def _slice(content: Any, rows: slice) -> Any:
    if isinstance(content, torch.Tensor):
        return content[rows]
    if isinstance(content, Mapping):
        return {key: value[rows] for key, value in content.items()}
    return tuple(value[rows] for value in content)


def _image_folder(path: Path, *, model: Optional[nn.Module], batch_size: int, num_workers: int,
                  data_config: Optional[dict[str, Any]]) -> Iterable[Any]:
    from timm.data import create_transform, resolve_data_config

    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise CalibrationError(f"the folder '{path}' has no image files ({', '.join(IMAGE_EXTENSIONS)})")
    config = resolve_data_config(dict(data_config or {}), model=model, verbose=False)
    channels = config["input_size"][0]
    if channels not in (1, 3) or len(config["mean"]) != channels or len(config["std"]) != channels:
        raise CalibrationError(
            f"the data config asks for {channels}-channel images with mean {config['mean']} and std "
            f"{config['std']}: pass data_config with a 1- or 3-channel input_size and a mean and std per channel"
        )
    transform = create_transform(**config, is_training=False)
    dataset = ImageFiles(files, transform, mode="L" if channels == 1 else "RGB")
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def _call_data_callable(spec: str, *, model: Optional[nn.Module], batch_size: int) -> Iterable[Any]:
    target = imports.resolve(spec, what="calibration data", error=CalibrationError, importer=_import)
    offered = {"batch_size": batch_size, "model": model}
    parameters = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    with _loader_failures(0):
        result = target(**{k: v for k, v in offered.items() if takes_any or k in parameters})
    if not isinstance(result, IterableABC):
        raise CalibrationError(f"calibration data '{spec}' returned a {type(result).__name__}: expected an "
                               "iterable of batches")
    return result


def _import(module_name: str) -> Any:
    """Import a module, also from the current directory (console scripts do not put it on ``sys.path``)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if cwd in sys.path or not (exc.name or "").startswith(module_name.split(".")[0]):
            raise
        sys.path.insert(0, cwd)
        try:
            return importlib.import_module(module_name)
        finally:
            sys.path.remove(cwd)
