"""Calibration data: turning whatever the user iterates over into model inputs.

Every operation that runs a model over data (recalibrate, fit, compare) takes ``data`` as any iterable of batches,
where a batch is a tensor, a tuple/list whose first element is the input (``(images, labels)``), a dict (the input
under ``input_key``), or anything ``input_fn(batch)`` turns into the model input.

Example::

    >>> import torch
    >>> batches = [(torch.zeros(2, 3), torch.tensor([0, 1])), (torch.ones(1, 3), torch.tensor([1]))]
    >>> [(i, x.shape[0]) for i, x in iter_inputs(batches)]
    [(0, 2), (1, 1)]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from .errors import CalibrationError

__all__ = ["DEFAULT_INPUT_KEYS", "batch_input", "iter_inputs"]

DEFAULT_INPUT_KEYS = ("input", "inputs", "image", "images", "img", "x", "pixel_values")
"""Keys tried, in order, for a dict batch when no ``input_key`` is given."""


def batch_input(
    batch: Any,
    index: int,
    *,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
) -> Any:
    """The model input in one batch; :class:`CalibrationError` naming the batch ``index`` if there is none."""
    if input_fn is not None:
        return input_fn(batch)
    if isinstance(batch, torch.Tensor):
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
    """``(index, model_input)`` for each batch of ``data``, stopping after ``batches`` batches if given."""
    if batches is not None and batches < 1:
        raise CalibrationError(f"batches must be at least 1, got {batches}")
    for index, batch in enumerate(data):
        if batches is not None and index >= batches:
            break
        yield index, batch_input(batch, index, input_fn=input_fn, input_key=input_key)
