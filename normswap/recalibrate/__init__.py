"""Recalibrating BatchNorm running statistics on unlabeled data: exact, eval-consistent, on GPU, across processes.

After a domain shift, pruning, quantization or weight averaging, a model's BatchNorm statistics are stale.
:func:`recalibrate` recomputes them from calibration data, with one of two meanings (``method=``):

- ``"exact"`` (one pass, the default): every BatchNorm layer normalizes each batch with that batch's own statistics,
  as in training, and gets as ``running_mean`` / ``running_var`` the mean and the unbiased variance of everything it
  saw over the whole calibration set, whatever the batch sizes. This is what ``torch.optim.swa_utils.update_bn`` and
  precise BN aim for. It is cheap: each layer runs in train mode with momentum 1, so after each call its (temporary)
  buffers hold that batch's mean and unbiased variance, computed by BatchNorm's own kernel; a forward hook merges
  them with the element count per channel into float64 accumulators (Chan's parallel formula: per-channel work only,
  never ``E[x²] - E[x]²``). A batch in which a layer sees one value per channel has no batch statistics: that is an
  error that names the layer and suggests ``"sequential"``. On CPU, a model with 2-D convolutions runs in
  channels-last layout unless told otherwise (``channels_last=None``): there, PyTorch's train-mode BatchNorm and
  convolutions are 1.1-1.3x faster than a plain eval forward in the default layout, where they are 0.6-0.97x. A
  model that fails on the first batch in that layout (a ``view`` that needs contiguous memory) is run again in its
  own.
- ``"sequential"`` (eval-consistent): afterwards, running the model in eval mode over the calibration set and
  measuring each layer's input gives exactly that layer's running statistics. Each layer is measured in eval mode
  with every layer that runs before it already using its new statistics. Every batch's forward runs once, all of
  them in step (:mod:`normswap.lockstep`): each pauses before every calibrated layer until all batches got there,
  that layer's statistics are merged over all of them and set, and the forwards go on. So the whole calibration
  costs one eval forward per batch (``forward_cost`` 1.0), on any model that runs, whatever its control flow. A
  layer called several times per forward is measured at every call (each with its old statistics) and set after the
  last; finding such a layer costs a forward of the first batch and a second run. It works at any batch size,
  including 1. Every batch, and the activations its paused forward holds, stay on the calibration device until the
  end: bound them with ``batches``. A model whose forward keeps intermediate results on its modules and reads them
  back later in the same forward would see another batch's: such a model needs ``"exact"``.

Only the statistics change: parameters, every other buffer, ``num_batches_tracked``, training flags, momentum values
and placement are as before. The new statistics are computed aside and written at the very end: if anything fails or
the run is interrupted, the model keeps its old ones. Dropout, drop-path and every other module run in eval mode.
Layers that the data never reaches keep their old statistics; frozen BatchNorm, layers without running statistics and
unknown BatchNorm subclasses are left alone. :func:`calibration_report` returns what a run did; the run is also
recorded in the model's history (a value-only step, nothing to replay on load).

When ``torch.distributed`` is initialized (for example under ``torchrun``), each process calibrates on its own shard
and the float64 ``(count, mean, M2)`` of every layer are all-gathered and merged in rank order, so every process ends
with the same statistics: those of the union of the shards (the sequential method's processes agree, layer by
layer, on which to settle next). SyncBatchNorm layers are calibrated like BatchNorm (their
own all-reduce is not used), also on CPU with gloo.

Example::

    >>> import torch, normswap
    >>> from normswap.recalibrate import recalibrate, calibration_report
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> batches = [torch.randn(4, 3, 16, 16) + 2 for _ in range(3)]
    >>> model = recalibrate(model, batches)
    >>> report = calibration_report(model)
    >>> report.calibrated, report.batches, report.samples, report.passes
    (['1'], 3, 12, 1)

The package's parts: :mod:`.report` (the report), :mod:`.statistics` (the layers and their float64 statistics),
:mod:`.running` (device, layout, autocast, the model's state put back), :mod:`.exact` and :mod:`.sequential` (the two
methods), :mod:`.distributed` (merging and agreeing across processes).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from ..data import ModelFailure, iter_inputs
from ..placement import Device, Placement
from ..errors import CalibrationError
from ..history import record_step
from ..unwrap import unwrapped
from .distributed import Ranks
from .exact import calibrate_exact
from .report import CalibrationReport, calibration_report
from .running import Snapshot, length, place, prefers_channels_last
from .sequential import calibrate_sequential
from .statistics import Layer, final_statistics, find_layers

__all__ = ["METHODS", "CalibrationReport", "calibration_report", "recalibrate"]

log = logging.getLogger("normswap")

METHODS = ("exact", "sequential")
"""Every value ``method=`` accepts."""


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    *,
    batches: Optional[int] = None,
    method: str = "exact",
    device: Device = None,
    amp: Union[bool, torch.dtype] = False,
    channels_last: Optional[bool] = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
    progress: Optional[bool] = None,
    distributed: Optional[bool] = None,
    process_group: Any = None,
) -> nn.Module:
    """Recompute the running statistics of ``model``'s BatchNorm layers from ``data``, in place.

    Args:
        model: any model with BatchNorm layers (torch, SyncBatchNorm, timm's fused BatchNormAct2d); wrappers
            (``torch.compile``, DDP, DataParallel, EMA: :mod:`normswap.unwrap`) are looked through.
        data: calibration batches, see :mod:`normswap.data`: tensors, ``(input, ...)`` tuples, dicts, or anything
            with ``input_fn``. Under ``torch.distributed``, each process passes its own shard.
        batches: use at most this many batches of ``data`` (per process).
        method: ``"exact"`` (batch-statistics mode, statistics of everything each layer saw) or ``"sequential"``
            (eval-consistent); see the module documentation.
        device: where to run (``"cuda"``): the model and batches are moved there (CPU batches through pinned memory,
            asynchronously) and the model is moved back afterwards. Default: where the model is.
        amp: run the forward under autocast (``True``: bfloat16 where supported, else float16; or a dtype); the
            statistics still accumulate in float64.
        channels_last: run with 4-D weights and inputs in channels-last layout (the model is given back in its
            own layout). ``None``: for ``"exact"`` on CPU in one process, if the model has 2-D convolutions (it is
            faster there); otherwise not.
        input_fn, input_key: how to find the model input in a batch, as in :func:`normswap.data.iter_inputs`.
        progress: ``True`` shows a progress bar, ``False`` never; ``None`` shows one on a terminal for runs longer
            than two seconds.
        distributed: ``True``: calibrate across the processes of ``torch.distributed`` (each on its own shard, all
            ending with the statistics of the union); ``False``: this process's data alone, even when
            ``torch.distributed`` is initialized (recalibrating on rank 0 only); ``None`` (default): across the
            processes when there are more than one. Across processes, **every** rank of the group must call
            ``recalibrate``; a failure or an interruption on one makes the others raise, naming it.
        process_group: the ``torch.distributed`` group to calibrate across (default: the whole world).

    Returns:
        ``model``, with new statistics; :func:`calibration_report` says what was calibrated.

    Raises:
        CalibrationError: unknown method, empty data, a malformed batch or one the model rejects (naming the batch),
            non-finite activations (naming the first layer they reach), a batch in which a layer sees one value per
            channel under ``"exact"`` (naming the layer), or a model without BatchNorm layers to calibrate. The
            model is then exactly as it was.

    >>> bn = torch.nn.BatchNorm1d(2)
    >>> x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    >>> recalibrate(bn, [x[:2], x[2:]], method="sequential").running_var.tolist()
    [1.0, 100.0]
    """
    if method not in METHODS:
        raise CalibrationError(f"unknown recalibration method '{method}': choose exact or sequential")
    root = unwrapped(model)
    layers, skipped = find_layers(root)
    if not layers:
        reasons = f" ({next(iter(skipped.values()))})" if skipped else ""
        raise CalibrationError(f"the model has no BatchNorm layer with running statistics to recalibrate{reasons}")
    run = Placement.resolve(root, device, amp, channels_last=bool(channels_last), error=CalibrationError)
    ranks = Ranks(distributed, process_group, run.device)
    layout_chosen = channels_last is None and method == "exact" and ranks.size == 1 and prefers_channels_last(
        root, run.device)
    if layout_chosen:
        run = replace(run, channels_last=True)
    inputs = iter_inputs(data, batches=batches, input_fn=input_fn, input_key=input_key)
    # the first batch is kept to run again in the model's own layout if the chosen one fails on it; nothing is read
    # ahead otherwise (a batch that cannot be read must fail inside the run, where other ranks hear of it)
    first = list(itertools.islice(inputs, 1)) if layout_chosen else []
    snapshot = Snapshot(root, layers)
    try:
        try:
            totals, order, passes, cost = _calibrate(root, layers, itertools.chain(first, inputs), method, run,
                                                     ranks, progress, length(data, batches), snapshot)
        except ModelFailure as failure:
            if not (layout_chosen and first and failure.index == first[0][0]):
                raise
            log.debug("the model fails in channels-last layout (%s); calibrating in its own layout", failure)
            snapshot.restore()
            run = replace(run, channels_last=False)
            totals, order, passes, cost = _calibrate(root, layers, itertools.chain(first, inputs), method, run,
                                                     ranks, progress, length(data, batches), snapshot)
        results = final_statistics(order)
    finally:
        snapshot.restore()
    with torch.no_grad():
        for layer, (mean, var) in results.items():
            layer.module.running_mean.copy_(mean)
            layer.module.running_var.copy_(var)
    ordered = order + [layer for layer in layers if layer not in order]
    report = CalibrationReport(
        method=method,
        batches=totals[0],
        samples=totals[1],
        passes=passes,
        forward_cost=round(cost, 3),
        calibrated=[layer.name for layer in ordered if layer in results],
        no_data=[layer.name for layer in ordered if layer not in results],
        skipped=skipped,
        world_size=ranks.size,
    )
    record_step(root, {"op": "recalibrate", **report.to_dict()})
    log.info("%s", report)
    return model


def _calibrate(model: nn.Module, layers: list[Layer], inputs: Iterator[tuple[int, Any]], method: str, run: Placement,
               ranks: Ranks, progress: Optional[bool], batches: Optional[int],
               snapshot: Snapshot) -> tuple[list[int], list[Layer], int, float]:
    """One calibration run on a model whose state ``snapshot`` holds; returns the totals, the layers in forward
    order, the passes and their cost in forward passes."""
    place(model, run, snapshot)
    if any([module.training for module in snapshot.modules]):
        model.eval()
    if method == "exact":
        totals, order = calibrate_exact(model, layers, inputs, run, ranks, progress, batches)
        return totals, order, 1, 1.0
    return calibrate_sequential(model, layers, inputs, run, ranks, progress)
