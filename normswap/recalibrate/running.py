"""How the calibration forwards run: device, autocast and layout; the model's state put back afterwards; failures
of the model named by batch."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from ..data import call_model, move_input
from ..errors import CalibrationError, NormswapError
from .statistics import Layer

Device = Union[str, torch.device, None]

PROGRESS_DELAY_S = 2.0


@dataclass
class Run:
    """Where and how the calibration forward passes run."""

    device: torch.device
    amp_dtype: Optional[torch.dtype]
    channels_last: bool

    @classmethod
    def resolve(cls, model: nn.Module, device: Device, amp: Union[bool, torch.dtype], channels_last: bool) -> "Run":
        home = next(iter(list(model.parameters()) + list(model.buffers())), None)
        try:
            target = torch.device(device) if device is not None else (home.device if home is not None else None)
        except RuntimeError:
            raise CalibrationError(f"unknown device '{device}'") from None
        if target is None:
            target = torch.device("cpu")
        if target.type == "cuda":
            if not torch.cuda.is_available():
                raise CalibrationError(f"device '{device}' was asked for but CUDA is not available")
            if target.index is None:
                target = torch.device("cuda", torch.cuda.current_device())
        if amp is True:
            bf16 = target.type != "cuda" or torch.cuda.is_bf16_supported()
            amp_dtype: Optional[torch.dtype] = torch.bfloat16 if bf16 else torch.float16
        elif isinstance(amp, torch.dtype):
            if amp not in (torch.float16, torch.bfloat16):
                raise CalibrationError(f"amp must be True, False, torch.float16 or torch.bfloat16, got {amp}")
            amp_dtype = amp
        else:
            amp_dtype = None
        return cls(target, amp_dtype, channels_last)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """What a forward runs under, in whichever thread: no gradients, autocast, the CUDA device."""
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with device, torch.no_grad(), self.autocast():
            yield

    def move(self, model_input: Any) -> Any:
        return move_input(model_input, self.device, channels_last=self.channels_last, non_blocking=True)


def prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """True on CPU for a model with 2-D convolutions, where channels-last train-mode passes are faster."""
    return device.type == "cpu" and any(isinstance(module, nn.Conv2d) for module in model.modules())


class Snapshot:
    """Everything recalibration changes on a model while it runs, to put back exactly afterwards: the training flag
    of every module, the buffer objects of every module, the storage of every parameter, and the momentum,
    ``track_running_stats`` and ``forward`` of the layers being calibrated. The original buffer tensors themselves
    are never written while the run lasts."""

    def __init__(self, model: nn.Module, layers: list[Layer]) -> None:
        modules = list(model.modules())
        self.training = [(module, module.training) for module in modules]
        self.buffers = [(module, dict(module._buffers)) for module in modules]
        self.parameters = [(parameter, parameter.data) for parameter in model.parameters()]
        self.layers = [
            (layer.module, layer.module.momentum, layer.module.track_running_stats,
             layer.module.__dict__.get("forward"))
            for layer in layers
        ]

    def restore(self) -> None:
        for module, training in self.training:
            module.training = training
        for module, buffers in self.buffers:
            module._buffers.update(buffers)
        for parameter, data in self.parameters:
            parameter.data = data
        for module, momentum, track_running_stats, forward in self.layers:
            module.momentum = momentum
            module.track_running_stats = track_running_stats
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward


def place(model: nn.Module, run: Run) -> None:
    """Put every parameter and buffer on the run's device and layout (new tensors; the snapshot keeps the old)."""
    if not run.channels_last and all(t.device == run.device for t in list(model.parameters()) + list(model.buffers())):
        return

    def placed(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.to(run.device)
        if run.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = placed(buffer)
    for parameter in model.parameters():
        parameter.data = placed(parameter.data)


def forward(model: nn.Module, model_input: Any, index: int, run: Run) -> Any:
    """One calibration forward of batch ``index``, on the run's device and layout, its failures named."""
    with run.context(), failures_named(index, model_input):
        return call_model(model, run.move(model_input))


class ModelFailure(CalibrationError):
    """The model itself raised on batch ``index`` (not a problem normswap found in the data or statistics)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


@contextlib.contextmanager
def failures_named(index: int, model_input: Any) -> Iterator[None]:
    """Turn a failure of the model on batch ``index`` into a :class:`CalibrationError` naming the batch."""
    try:
        yield
    except NormswapError:
        raise
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelFailure(
            f"batch {index} ({describe(model_input)}) failed in the model: {type(exc).__name__}: {message}", index
        ) from exc


def describe(model_input: Any) -> str:
    if isinstance(model_input, torch.Tensor):
        return f"a {str(model_input.dtype).replace('torch.', '')} tensor of shape {list(model_input.shape)}"
    if isinstance(model_input, (tuple, list)):
        return f"a {type(model_input).__name__} of {len(model_input)}"
    if isinstance(model_input, Mapping):
        return f"a dict with keys {sorted(map(str, model_input))}"
    return f"a {type(model_input).__name__}"


def samples(model_input: Any) -> int:
    """The batch size of a model input: the first dimension of its first tensor (0 if it has none)."""
    if isinstance(model_input, torch.Tensor):
        return int(model_input.shape[0]) if model_input.dim() else 1
    if isinstance(model_input, Mapping):
        values = list(model_input.values())
    elif isinstance(model_input, (tuple, list)):
        values = list(model_input)
    else:
        return 0
    return next((found for found in map(samples, values) if found), 0)


def length(data: Any, batches: Optional[int]) -> Optional[int]:
    """How many batches ``data`` will give, if it says."""
    try:
        size = len(data)
    except TypeError:
        return batches
    return min(size, batches) if batches is not None else size


def progress_setting(progress: Optional[bool], rank: int) -> dict[str, Any]:
    """tqdm keyword arguments: always, never, or on a terminal for long runs (rank 0 only)."""
    if progress is None:
        return {"disable": None if rank == 0 else True, "delay": PROGRESS_DELAY_S}
    return {"disable": not progress}
