"""A bound on what building a file's architecture may allocate, for the builds that cannot run on the meta device.

A file's architecture is built on the meta device and checked against the file's tensors before anything is
allocated. A few builders cannot run there (torchvision's RegNets compute their widths with tensors, ultralytics
runs a forward when it builds): they are built on the CPU, where a file's arguments (``num_classes=10**9``) would
allocate whatever they say. :func:`allocation_limit` watches such a build: every tensor a factory function makes
(``empty``, ``zeros``, ``randn``... — parameters and buffers come from these; the activations of a forward the
builder runs do not count) is added up from its size *before* it is made, and the build is stopped with a
:class:`~normswap.errors.CheckpointError` once the total passes the limit, which the caller sets from the file's
own size. Nothing else changes: the build runs as it would, on the thread that asked for it.

Example::

    >>> import torch
    >>> with allocation_limit(1_000_000, "a test"):
    ...     small = torch.zeros(1000)
    >>> with allocation_limit(1_000_000, "a test"):  # doctest: +ELLIPSIS
    ...     large = torch.empty(10_000_000)
    Traceback (most recent call last):
    ...
    normswap.errors.CheckpointError: building a test would allocate more than 1.0 MB, ...
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import CheckpointError, byte_size

__all__ = ["allocation_limit"]

_LARGEST_ELEMENT = 8
"""Bytes counted per element when a factory's dtype is not given (at most a float64 or int64)."""


class _FactoryBudget(TorchDispatchMode):
    """Adds up the tensors factory functions make, from their ``size`` argument, and refuses past ``limit``."""

    def __init__(self, limit: int, what: str) -> None:
        super().__init__()
        self.limit, self.what, self.total = limit, what, 0

    def __torch_dispatch__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        size = _size_argument(func, args, kwargs)
        if size is not None:
            dtype = kwargs.get("dtype")
            element = dtype.itemsize if isinstance(dtype, torch.dtype) else _LARGEST_ELEMENT
            self.total += math.prod(size) * element
            if self.total > self.limit:
                raise CheckpointError(
                    f"building {self.what} would allocate more than {byte_size(self.limit)}, far more than the file "
                    "holds: the arguments the file records do not describe its tensors"
                )
        return func(*args, **kwargs)


def _size_argument(func: Any, args: tuple, kwargs: dict) -> Any:
    """The ``size`` a factory op is called with (a list of ints), or ``None`` for an op without one."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return None
    for position, argument in enumerate(schema.arguments):
        if argument.name == "size":
            value = args[position] if position < len(args) else kwargs.get("size")
            if isinstance(value, (list, tuple)) and all(isinstance(side, int) for side in value):
                return value
            return None
    return None


@contextlib.contextmanager
def allocation_limit(limit: int, what: str) -> Iterator[None]:
    """Stop the build inside with :class:`CheckpointError` before its factory-made tensors pass ``limit`` bytes;
    ``what`` names the build in the message."""
    with _FactoryBudget(limit, what):
        yield
