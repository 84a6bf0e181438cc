"""Where and how an operation runs a model over data: the device, autocast, the memory layout, the input dtype.

Recalibration, fitting and refinement all take ``device=`` and ``amp=`` and run the model's forward over the
user's batches; :meth:`Placement.resolve` turns those arguments into one checked record, the same way for each:

- ``device``: a device name (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``) or ``None`` for where the model is; a
  device that is not there is a clear error, and ``"cuda"`` is pinned to the current CUDA device;
- ``amp``: ``True`` (bfloat16 where the device supports it, else float16), a half dtype, or ``False``. A model whose
  weights are already in half precision is refused: autocast is for float32 models (on the CPU it would fail with
  PyTorch's "mixed dtype" error);
- the input dtype: batches are cast to the model's floating dtype (a half-precision model gets half-precision
  batches, float64 data feeds a float32 model), so data and model always agree;
- ``channels_last``: 4-D inputs in channels-last layout.

Float64 statistics are accumulated on :attr:`Placement.statistics_device`: the run device, except on Apple's MPS
backend, which has no float64 (there they are kept on the CPU).

Example::

    >>> import torch
    >>> run = Placement.resolve(torch.nn.Linear(2, 2).half(), None, False)
    >>> run.device.type, run.input_dtype, run.move(torch.zeros(1, 2)).dtype
    ('cpu', torch.float16, torch.float16)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from .data import floating_dtype, move_input
from .errors import NormswapError
from .walk import model_device

__all__ = ["Device", "Placement", "for_float64"]

Device = Union[str, torch.device, None]

_HALF = (torch.float16, torch.bfloat16)


@dataclass
class Placement:
    """Where and how forwards run: ``device``, autocast ``amp_dtype`` (or ``None``), ``channels_last`` inputs, and
    the ``input_dtype`` batches are cast to (the model's floating dtype)."""

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    input_dtype: Optional[torch.dtype] = None

    @classmethod
    def resolve(cls, model: nn.Module, device: Device, amp: Union[bool, torch.dtype, None], *,
                channels_last: bool = False, error: type[NormswapError] = NormswapError) -> "Placement":
        """Check ``device`` and ``amp`` for ``model``; ``error`` is the :class:`NormswapError` subclass raised."""
        home = model_device(model) or torch.device("cpu")
        try:
            target = torch.device(device) if device is not None else home
        except (RuntimeError, TypeError):
            raise error(f"unknown device '{device}': use cpu, cuda, cuda:N or mps") from None
        if target.type == "cuda":
            if not torch.cuda.is_available():
                raise error(f"device '{device or target}' was asked for but CUDA is not available")
            if target.index is None:
                target = torch.device("cuda", torch.cuda.current_device())
        if target.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise error(f"device '{device}' was asked for but MPS is not available")
        dtype = floating_dtype(model)
        if amp is True:
            bf16 = target.type != "cuda" or torch.cuda.is_bf16_supported()
            amp_dtype: Optional[torch.dtype] = torch.bfloat16 if bf16 else torch.float16
        elif amp is False or amp is None:
            amp_dtype = None
        elif amp in _HALF:
            amp_dtype = amp
        else:
            raise error(f"amp must be True, False, torch.float16 or torch.bfloat16, got {amp!r}")
        if amp_dtype is not None and dtype in _HALF:
            raise error(f"the model's weights are already {str(dtype).replace('torch.', '')}: autocast (amp) is for "
                        "float32 models, run without it")
        return cls(target, amp_dtype, channels_last, dtype)

    @property
    def statistics_device(self) -> torch.device:
        """Where float64 accumulators live: the run device, or the CPU on MPS (which has no float64)."""
        return torch.device("cpu") if self.device.type == "mps" else self.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of the forwards (a no-op without ``amp``)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def context(self, *, grad: bool = False) -> Iterator[None]:
        """What a forward runs under, in whichever thread: the CUDA device, gradients only if ``grad``, autocast."""
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with device, torch.set_grad_enabled(grad), self.autocast():
            yield

    def move(self, model_input: Any) -> Any:
        """A model input on the device, in the model's floating dtype and the chosen layout."""
        return move_input(model_input, self.device, dtype=self.input_dtype, channels_last=self.channels_last,
                          non_blocking=True)


def for_float64(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where float64 arithmetic can run on it: moved to the CPU from MPS (which has no float64), else as
    it is.

    >>> for_float64(torch.ones(2)).device.type
    'cpu'
    """
    return tensor.cpu() if tensor.device.type == "mps" else tensor
