"""How the calibration forwards run: the model placed on the run's device and layout (and its state put back
afterwards), one forward with its failures named by batch, progress bar settings."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..data import call_model, model_failures
from ..model_state import Containers, TrainingFlags
from ..placement import Placement
from ..walk import parameters_and_buffers
from .statistics import Layer



def prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """True on CPU for a model with 2-D convolutions, where channels-last train-mode passes are faster."""
    return device.type == "cpu" and any(isinstance(module, nn.Conv2d) for module in model.modules())


class Snapshot:
    """Everything recalibration changes on a model while it runs, to put back exactly afterwards: the training flag
    of every module, the buffer objects of every module, the storage of every parameter :func:`place` moved, the
    momentum, ``track_running_stats`` and ``forward`` of the layers being calibrated, and the caches its eval
    forwards fill (:func:`normswap.model_state.caches`). The original buffer tensors themselves are never written
    while the run lasts."""

    def __init__(self, model: nn.Module, layers: list[Layer]) -> None:
        modules = self.modules = list(model.modules())
        self.training = TrainingFlags(modules)
        self.buffers = [(module, dict(module._buffers)) for module in modules]
        self.caches = Containers(modules, attributes=False)
        self.parameters: list[tuple[nn.Parameter, torch.Tensor]] = []  # filled by place(), where it moves them
        self.layers = [
            (layer.module, layer.module.momentum, layer.module.track_running_stats,
             layer.module.__dict__.get("forward"))
            for layer in layers
        ]

    def restore(self) -> None:
        self.caches.put_back()
        self.training.put_back()
        for module, buffers in self.buffers:
            module._buffers.update(buffers)
        for parameter, data in self.parameters:
            parameter.data = data
        self.parameters = []
        for module, momentum, track_running_stats, forward in self.layers:
            module.momentum = momentum
            module.track_running_stats = track_running_stats
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = forward


def place(model: nn.Module, run: Placement, snapshot: Snapshot) -> None:
    """Put every parameter and buffer on the run's device and layout (new tensors; ``snapshot`` keeps the old)."""
    if not run.channels_last and all([t.device == run.device for t in parameters_and_buffers(model)]):
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
        snapshot.parameters.append((parameter, parameter.data))
        parameter.data = placed(parameter.data)


def forward(model: nn.Module, model_input: Any, index: int, run: Placement) -> Any:
    """One calibration forward of batch ``index``, on the run's device and layout, its failures named."""
    with run.context(), model_failures(index, model_input):
        return call_model(model, run.move(model_input))


def length(data: Any, batches: Optional[int]) -> Optional[int]:
    """How many batches ``data`` will give, if it says."""
    try:
        size = len(data)
    except TypeError:
        return batches
    return min(size, batches) if batches is not None else size
