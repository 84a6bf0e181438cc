"""The exact method: one pass with every calibrated layer normalizing by batch statistics; each layer's statistics
are those of everything it saw, merged in float64 from the batch statistics BatchNorm's own kernel computes."""

from __future__ import annotations

import functools
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..errors import CalibrationError
from ..targets import classify
from .distributed import Ranks
from ..data import batch_size_of
from ..placement import Placement
from ..progress import progress_bar
from .running import forward
from .statistics import Layer, check_finite, use_scratch_statistics, values_per_channel


def calibrate_exact(model: nn.Module, layers: list[Layer], inputs: Iterator[tuple[int, Any]], run: Placement,
                    ranks: Ranks, progress: Optional[bool],
                    batches: Optional[int]) -> tuple[list[int], list[Layer]]:
    """Batch-statistics calibration in one pass; returns the totals (batches, samples) and the layers in the order
    they first ran."""
    order: list[Layer] = []
    current = {"index": 0}
    handles = []
    for layer in layers:
        module = layer.module
        use_scratch_statistics(layer, keep_values=False)
        module.training = True
        module.momentum = 1.0
        module.track_running_stats = True
        if classify(module).family == "sync":
            module.forward = functools.partial(_batch_norm_without_sync, module)
        layer.reset(run.statistics_device)
        handles += _hooks(layer, order, current)
    totals = [0, 0]
    try:
        with progress_bar(batches, "recalibrate", "batch", progress=progress, rank=ranks.rank) as bar:
            for index, model_input in inputs:
                current["index"] = index
                forward(model, model_input, index, run)
                totals[0] += 1
                totals[1] += batch_size_of(model_input)
                bar.update()
    except BaseException:  # Ctrl-C and SIGTERM too: the other ranks must not wait for this one
        ranks.merge(layers, totals, failed=True, quiet=True)
        raise
    finally:
        for handle in handles:
            handle.remove()
    totals = ranks.merge(layers, totals)
    if totals[0] == 0:
        raise CalibrationError("the calibration data is empty: recalibration needs at least one batch")
    order = order if ranks.size == 1 else order + [layer for layer in layers if layer not in order]
    check_finite(order)
    return totals, order


def _hooks(layer: Layer, order: list[Layer], current: dict[str, int]) -> list[Any]:
    """A pre-hook that records the element count per channel (shape arithmetic only) and a post-hook that merges the
    batch mean and unbiased variance BatchNorm left in its momentum-1 buffers."""
    pending = {"count": 0, "seen": False}

    def before(module: nn.Module, args: tuple) -> None:
        count = values_per_channel(args[0])
        if count == 1:
            raise CalibrationError(
                f"layer '{layer.name}' sees one value per channel in batch {current['index']} (input shape "
                f"{list(args[0].shape)}), so it has no batch statistics: use method='sequential' or larger batches"
            )
        if not pending["seen"]:
            pending["seen"] = True
            order.append(layer)
        pending["count"] = count

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        count = pending["count"]
        if count == 0:
            module.running_mean.zero_()
            module.running_var.fill_(1.0)
            return
        layer.moments.add(count, module.running_mean, module.running_var, m2_scale=count - 1)

    return [layer.module.register_forward_pre_hook(before), layer.module.register_forward_hook(after)]


def _batch_norm_without_sync(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A SyncBatchNorm layer's forward as plain BatchNorm on this process's batch, then its fused drop and act."""
    out = nn.modules.batchnorm._BatchNorm.forward(module, x)
    for name in ("drop", "act"):
        child = getattr(module, name, None)
        if child is not None:
            out = child(out)
    return out
