"""What a model remembers of normswap: the architecture it was built from, the file it came from, what was done.

Each operation appends a step to the model's history (``{"op": "plan", ...}``, ``"fold"``, ``"fit"``,
``"recalibrate"``, ``"refine"``). ``save`` writes the history into the checkpoint as provenance: ``load`` does not
replay it (the checkpoint's manifest describes the structure), and a history read from a file is data, checked
against :data:`SCHEMA` by :func:`validate_history` (an unknown op or a malformed field is a clear error).

Example::

    >>> from torch import nn
    >>> model = nn.Sequential()
    >>> record_step(model, {"op": "fold", "pairs": []})
    >>> get_history(model)
    [{'op': 'fold', 'pairs': []}]
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

from torch import nn

from .errors import CheckpointError, NormswapError
from .unwrap import unwrapped

__all__ = [
    "SCHEMA",
    "STRUCTURAL_OPS",
    "MAX_EXAMPLE_DIMS",
    "MAX_EXAMPLE_ELEMENTS",
    "carry_memory",
    "checked_example_shape",
    "get_arch",
    "get_history",
    "get_input_shape",
    "get_source",
    "last_step",
    "record_step",
    "set_arch",
    "set_history",
    "set_input_shape",
    "set_source",
    "validate_history",
]

_OPTIONAL_NUMBER = (int, float, type(None))

MAX_EXAMPLE_ELEMENTS = 1 << 26
"""The most elements of an example input normswap allocates because a file records its shape (a larger one must be
given: ``input_shape=``, ``--input-shape``)."""
MAX_EXAMPLE_DIMS = 8
"""The most dimensions of an example input shape taken from a file."""

_COUNTS = {"batches": 0, "samples": 0, "passes": 0, "world_size": 1, "steps": 0, "train_samples": 0}
"""Whole-number history fields and the least value each may have."""

SCHEMA: dict[str, dict[str, Any]] = {
    "plan": {"plan": dict},
    "fold": {"pairs": list, "freeze_rest": bool},
    "recalibrate": {"method": str, "batches": int, "samples": int, "passes": int, "calibrated": list,
                    "no_data": list, "skipped": dict, "world_size": int, "forward_cost": _OPTIONAL_NUMBER},
    "fit": {"target": str, "chosen": str, "batches": int, "output_error": dict, "layers": list},
    "refine": {"steps": int, "loss": str, "train_samples": int, "kept": str},
}
"""Every op a history step can have, with the type of each field it must have."""

STRUCTURAL_OPS = ("plan", "fold")
"""Ops that changed the module tree (recorded in a checkpoint's manifest); the others changed values only."""

_HISTORY = "_normswap_history"
_ARCH = "_normswap_arch"
_SOURCE = "_normswap_source"
_INPUT_SHAPE = "_normswap_input_shape"


def get_history(model: nn.Module) -> list[dict[str, Any]]:
    """The steps recorded on ``model``, oldest first (a copy)."""
    return copy.deepcopy(model.__dict__.get(_HISTORY, []))


def set_history(model: nn.Module, steps: list[dict[str, Any]]) -> None:
    """Replace the recorded steps (used when a step returns a new root module)."""
    model.__dict__[_HISTORY] = copy.deepcopy(steps)


def record_step(model: nn.Module, step: dict[str, Any]) -> None:
    """Append one step (a JSON-serialisable dict with an ``"op"`` key) to the model's history."""
    model.__dict__.setdefault(_HISTORY, []).append(copy.deepcopy(step))


def last_step(model: nn.Module, op: str) -> Optional[dict[str, Any]]:
    """The most recent step ``op`` recorded on ``model`` (looking through the wrappers
    :func:`normswap.unwrap.unwrapped` knows: ``torch.compile``, DDP, DataParallel, EMA), or ``None``.

    >>> model = nn.Sequential()
    >>> record_step(model, {"op": "fit", "chosen": "global"})
    >>> last_step(model, "fit")["chosen"], last_step(model, "refine")
    ('global', None)
    """
    for step in reversed(get_history(unwrapped(model))):
        if step.get("op") == op:
            return step
    return None


def required_step(model: nn.Module, op: str, missing: str) -> dict[str, Any]:
    """:func:`last_step`, for a report read from the history: :class:`NormswapError` saying ``missing`` (what to run
    first) when ``model`` has no step ``op``.

    >>> required_step(nn.Sequential(), "fit", "this model has no fitted affine weights")
    Traceback (most recent call last):
        ...
    normswap.errors.NormswapError: this model has no fitted affine weights
    """
    step = last_step(model, op)
    if step is None:
        raise NormswapError(missing)
    return step


def get_arch(model: nn.Module) -> Optional[dict[str, Any]]:
    """The architecture spec the model was built from (``ArchSpec.to_dict()``), if known."""
    arch = model.__dict__.get(_ARCH)
    return copy.deepcopy(arch) if arch is not None else None


def set_arch(model: nn.Module, arch: Optional[dict[str, Any]]) -> None:
    """Remember the architecture spec the model was built from."""
    model.__dict__[_ARCH] = copy.deepcopy(arch)


def get_source(model: nn.Module) -> Optional[dict[str, Any]]:
    """The checkpoint file the model was loaded from (``{"file": name, "sha256": hex}``), if known."""
    source = model.__dict__.get(_SOURCE)
    return copy.deepcopy(source) if source is not None else None


def set_source(model: nn.Module, source: Optional[dict[str, Any]]) -> None:
    """Remember the checkpoint file the model was loaded from."""
    model.__dict__[_SOURCE] = copy.deepcopy(source)


def get_input_shape(model: nn.Module) -> Optional[list[int]]:
    """The shape of the model's main input, if a checkpoint recorded it or it was given to an operation."""
    shape = model.__dict__.get(_INPUT_SHAPE)
    return list(shape) if shape is not None else None


def set_input_shape(model: nn.Module, shape: Optional[list[int]]) -> None:
    """Remember the shape of the model's main input (``save`` records it, ``fold`` uses it as its example)."""
    model.__dict__[_INPUT_SHAPE] = [int(size) for size in shape] if shape is not None else None


def checked_example_shape(shape: list[int], where: str = "the checkpoint") -> list[int]:
    """``shape`` (an example input shape a file records) if it is within :data:`MAX_EXAMPLE_DIMS` dimensions and
    :data:`MAX_EXAMPLE_ELEMENTS` elements, else :class:`CheckpointError` asking for the shape to be given.

    >>> checked_example_shape([1, 3, 224, 224])
    [1, 3, 224, 224]
    >>> checked_example_shape([1, 1, 100000, 100000])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normswap.errors.CheckpointError: the checkpoint records an example input of more than 2^26 elements, ...
    """
    ask = "pass the shape to use (input_shape=, --input-shape on the command line)"
    if len(shape) > MAX_EXAMPLE_DIMS:
        raise CheckpointError(f"{where} records an example input shape of {len(shape)} dimensions, more than the "
                              f"{MAX_EXAMPLE_DIMS} normswap takes from a file: {ask}")
    elements = 1
    for size in shape:
        elements *= size
        if elements > MAX_EXAMPLE_ELEMENTS:
            raise CheckpointError(f"{where} records an example input of more than 2^26 elements, more than normswap "
                                  f"allocates on a file's word: {ask}")
    return list(shape)


def carry_memory(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` everything ``old`` remembers (arch, source, history, input shape): for steps that replace the
    root module."""
    if new is not old:
        for attr in (_HISTORY, _ARCH, _SOURCE, _INPUT_SHAPE):
            if attr in old.__dict__:
                new.__dict__[attr] = copy.deepcopy(old.__dict__[attr])


def validate_history(steps: Any, where: str = "the file") -> list[dict[str, Any]]:
    """``steps`` if it is a list of well-formed history steps (see :data:`SCHEMA`), else :class:`CheckpointError`.

    >>> validate_history([{"op": "fold", "pairs": [["0", "1"]], "freeze_rest": False}])[0]["op"]
    'fold'
    >>> validate_history([{"op": "run", "command": "rm -rf /"}])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normswap.errors.CheckpointError: the history of the file has a step with unknown op 'run' (known: plan, ...)
    """
    if not isinstance(steps, list):
        raise CheckpointError(f"the history of {where} is not a list of steps")
    for index, step in enumerate(steps):
        op = step.get("op") if isinstance(step, dict) else None
        if op not in SCHEMA:
            raise CheckpointError(f"the history of {where} has a step with unknown op {op!r} "
                                  f"(known: {', '.join(SCHEMA)})")
        for name, kind in SCHEMA[op].items():
            value = step.get(name)
            if name not in step or not isinstance(value, kind) or (kind is int and isinstance(value, bool)) \
                    or not _valid_number(name, value):
                raise CheckpointError(f"the history of {where}: step {index + 1} ({op}) has a missing or malformed "
                                      f"field '{name}'")
        if op == "fold" and not all(isinstance(pair, list) and len(pair) == 2 and all(isinstance(n, str) for n in pair)
                                    for pair in step["pairs"]):
            raise CheckpointError(f"the history of {where}: step {index + 1} (fold) has malformed pairs")
    return steps


def _valid_number(name: str, value: Any) -> bool:
    """False for a number no real step records: a count below its least value, a cost that is negative or not
    finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    if name in _COUNTS:
        return value >= _COUNTS[name]
    return math.isfinite(value) and value >= 0
