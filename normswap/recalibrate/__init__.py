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
  measuring each layer's input gives exactly that layer's running statistics. Layer ``k`` is measured in eval mode
  with the layers before it already using their new statistics. Layers that do not feed each other share a pass
  (their levels come from the model's ``torch.fx`` graph). On that graph, a pass computes only the part between the
  activations kept from the previous passes and the inputs it measures, so the whole calibration costs about one
  forward plus a probe batch and the trace, however many passes (1.4-1.7 eval forwards for a resnet50's 49 passes
  over 4 batches). When the model cannot be traced, or changes in place a value
  that other operations read, each pass is an eager forward that stops once its layer has run, one layer per pass.
  It works at any batch size, including 1. The calibration inputs, and on the graph the activations at the boundary
  of the part already calibrated, are held on the calibration device for every batch: bound them with ``batches``.

Only the statistics change: parameters, every other buffer, ``num_batches_tracked``, training flags, momentum values
and placement are as before. The new statistics are computed aside and written at the very end: if anything fails or
the run is interrupted, the model keeps its old ones. Dropout, drop-path and every other module run in eval mode.
Layers that the data never reaches keep their old statistics; frozen BatchNorm, layers without running statistics and
unknown BatchNorm subclasses are left alone. :func:`calibration_report` returns what a run did; the run is also
recorded in the model's history (a value-only step, nothing to replay on load).

When ``torch.distributed`` is initialized (for example under ``torchrun``), each process calibrates on its own shard
and the float64 ``(count, mean, M2)`` of every layer are all-gathered and merged in rank order, so every process ends
with the same statistics: those of the union of the shards. SyncBatchNorm layers are calibrated like BatchNorm (their
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
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist
import torch.fx
from torch import nn
from tqdm import tqdm

from .data import call_model, iter_inputs, move_input
from .errors import CalibrationError, NormswapError
from .history import get_history, record_step
from .targets import classify, is_norm_layer
from .walk import find_modules, timm_untraceable

__all__ = ["METHODS", "CalibrationReport", "calibration_report", "recalibrate"]

log = logging.getLogger("normswap")

METHODS = ("exact", "sequential")
"""Every value ``method=`` accepts."""

Device = Union[str, torch.device, None]

_CALIBRATED_KINDS = ("bn", "bn_act", "sync", "sync_act")
_SYNC_KINDS = ("sync", "sync_act")
_FROZEN = "frozen BatchNorm: its statistics are fixed by design (convert it to 'bn' to recalibrate it)"
_SKIP_REASONS = {
    "frozen": _FROZEN,
    "frozen_act": _FROZEN,
    "unknown": "a BatchNorm subclass normswap does not know: its forward may not use the running statistics",
    "lazy": "a lazy BatchNorm that has not been initialized yet",
}
_NO_STATISTICS = "no running statistics: it always normalizes with batch statistics"
_PROGRESS_DELAY_S = 2.0


@dataclass
class CalibrationReport:
    """What one :func:`recalibrate` run did.

    ``calibrated`` names the layers that got new statistics and ``no_data`` those the data never reached (they keep
    their old statistics), each by its first qualified name, in forward order where known. ``skipped`` maps the
    BatchNorm-like layers that recalibration leaves alone to the reason. ``batches`` and ``samples`` count the
    calibration data over all processes, ``passes`` the passes of the model over it, ``world_size`` the processes.
    ``forward_cost`` is what those passes cost, in full forward passes over the data: a sequential pass on the graph
    runs only the part of the model it needs, so its passes together cost about one forward plus the probe batch
    (without the graph, each pass is a forward stopped after its layer, counted here as a whole one).
    """

    method: str
    batches: int
    samples: int
    passes: int
    calibrated: list[str] = field(default_factory=list)
    no_data: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    world_size: int = 1
    forward_cost: Optional[float] = None

    def __str__(self) -> str:
        processes = f" over {self.world_size} processes" if self.world_size > 1 else ""
        cost = ""
        if self.forward_cost is not None and self.passes > 1:
            cost = f" costing {self.forward_cost:.3g} forward(s)"
        lines = [
            f"recalibrate ({self.method}): {len(self.calibrated)} layer(s) from {self.batches} batch(es), "
            f"{self.samples} sample(s), {self.passes} pass(es){cost}{processes}"
        ]
        if self.no_data:
            lines.append(f"no data reached (old statistics kept): {', '.join(self.no_data)}")
        lines.extend(f"skipped {name or '<model>'}: {reason}" for name, reason in self.skipped.items())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what the model's history stores); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CalibrationReport":
        """The report ``to_dict`` wrote."""
        return cls(**{key: value for key, value in data.items() if key != "op"})


def calibration_report(model: nn.Module) -> CalibrationReport:
    """The report of the last :func:`recalibrate` run on ``model``, read from its history.

    >>> model = recalibrate(torch.nn.BatchNorm1d(3), [torch.randn(5, 3)])
    >>> calibration_report(model).samples
    5
    """
    for step in reversed(get_history(model)):
        if step.get("op") == "recalibrate":
            return CalibrationReport.from_dict(step)
    raise NormswapError("this model has not been recalibrated")


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
) -> nn.Module:
    """Recompute the running statistics of ``model``'s BatchNorm layers from ``data``, in place.

    Args:
        model: any model with BatchNorm layers (torch, SyncBatchNorm, timm's fused BatchNormAct2d); a
            ``DistributedDataParallel`` wrapper is looked through.
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
    root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    layers, skipped = _find_layers(root)
    if not layers:
        reasons = f" ({next(iter(skipped.values()))})" if skipped else ""
        raise CalibrationError(f"the model has no BatchNorm layer with running statistics to recalibrate{reasons}")
    ranks = _Ranks()
    run = _Run.resolve(root, device, amp, bool(channels_last))
    layout_chosen = channels_last is None and method == "exact" and ranks.size == 1 and _prefers_channels_last(
        root, run.device)
    if layout_chosen:
        run = replace(run, channels_last=True)
    show = _progress_setting(progress, ranks.rank)
    inputs = iter_inputs(data, batches=batches, input_fn=input_fn, input_key=input_key)
    # the first batch is kept to run again in the model's own layout if the chosen one fails on it; nothing is read
    # ahead otherwise (a batch that cannot be read must fail inside the run, where other ranks hear of it)
    first = list(itertools.islice(inputs, 1)) if layout_chosen else []
    snapshot = _Snapshot(root, layers)
    try:
        try:
            totals, order, passes, cost = _calibrate(root, layers, itertools.chain(first, inputs), method, run,
                                                     ranks, show, _length(data, batches))
        except _ModelFailure as failure:
            if not (layout_chosen and first and failure.index == first[0][0]):
                raise
            log.debug("the model fails in channels-last layout (%s); calibrating in its own layout", failure)
            snapshot.restore()
            run = replace(run, channels_last=False)
            totals, order, passes, cost = _calibrate(root, layers, itertools.chain(first, inputs), method, run,
                                                     ranks, show, _length(data, batches))
        results = _final_statistics(order)
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


def _calibrate(model: nn.Module, layers: list[_Layer], inputs: Iterator[tuple[int, Any]], method: str, run: "_Run",
               ranks: "_Ranks", show: dict[str, Any],
               length: Optional[int]) -> tuple[list[int], list[_Layer], int, float]:
    """One calibration run on a model whose state the caller has snapshotted; returns the totals, the layers in
    forward order, the passes and their cost in forward passes."""
    _place(model, run)
    model.eval()
    if method == "exact":
        totals, order = _exact(model, layers, inputs, run, ranks, dict(show, total=length))
        return totals, order, 1, 1.0
    return _sequential(model, layers, inputs, run, ranks, show)


def _prefers_channels_last(model: nn.Module, device: torch.device) -> bool:
    """True on CPU for a model with 2-D convolutions, where channels-last train-mode passes are faster."""
    return device.type == "cpu" and any(isinstance(module, nn.Conv2d) for module in model.modules())


class _Moments:
    """Per-channel float64 count, mean and sum of squared deviations (M2), merged with Chan's parallel formula."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros_like(self.mean)

    def add(self, count: int, mean: torch.Tensor, m2: torch.Tensor, m2_scale: float = 1.0) -> None:
        """Merge a group of ``count`` values per channel with mean ``mean`` and squared deviations ``m2 * m2_scale``
        (any floating dtype; the arithmetic is float64)."""
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean.add_(delta, alpha=count / total)
        self.m2.add_(m2, alpha=m2_scale)
        if self.count:
            self.m2.addcmul_(delta, delta, value=self.count * count / total)
        self.count = total

    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.mean).all() & torch.isfinite(self.m2).all()


@dataclass(eq=False)
class _Layer:
    """One BatchNorm layer being calibrated, with all its names and its accumulated statistics."""

    module: nn.Module
    names: list[str]
    moments: Optional[_Moments] = None

    @property
    def name(self) -> str:
        return self.names[0]

    def reset(self, device: torch.device) -> None:
        self.moments = _Moments(self.module.num_features, device)


def _find_layers(model: nn.Module) -> tuple[list[_Layer], dict[str, str]]:
    """The layers to calibrate, in definition order, and the BatchNorm-like layers left alone with the reason."""
    layers, skipped = [], {}
    for found in find_modules(model, is_norm_layer):
        kind = classify(found.module)
        if kind in ("gn", "gn_act"):
            continue
        if kind not in _CALIBRATED_KINDS:
            skipped[found.names[0]] = _SKIP_REASONS[kind]
        elif found.module.running_mean is None or found.module.running_var is None:
            skipped[found.names[0]] = _NO_STATISTICS
        else:
            layers.append(_Layer(found.module, found.names))
    return layers, skipped


@dataclass
class _Run:
    """Where and how the calibration forward passes run."""

    device: torch.device
    amp_dtype: Optional[torch.dtype]
    channels_last: bool

    @classmethod
    def resolve(cls, model: nn.Module, device: Device, amp: Union[bool, torch.dtype], channels_last: bool) -> "_Run":
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

    def move(self, model_input: Any) -> Any:
        return move_input(model_input, self.device, channels_last=self.channels_last, non_blocking=True)


class _Snapshot:
    """Everything recalibration changes on a model while it runs, to put back exactly afterwards: the training flag
    of every module, the buffer objects of every module, the storage of every parameter, and the momentum,
    ``track_running_stats`` and ``forward`` of the layers being calibrated. The original buffer tensors themselves
    are never written while the run lasts."""

    def __init__(self, model: nn.Module, layers: list[_Layer]) -> None:
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


def _place(model: nn.Module, run: _Run) -> None:
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


def _use_scratch_statistics(layer: _Layer, *, keep_values: bool) -> None:
    """Give a layer temporary ``running_mean`` / ``running_var`` / ``num_batches_tracked`` tensors (copies of the
    current values, or placeholders) so that nothing the run does reaches the originals."""
    buffers = layer.module._buffers
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if buffers.get(name) is not None:
            buffers[name] = buffers[name].clone() if keep_values else torch.zeros_like(buffers[name])


class _StopForward(BaseException):
    """Raised by a hook once every layer measured in a pass has run: the rest of that forward is not needed.
    A BaseException, so that a model's own ``except Exception`` cannot swallow it."""


def _forward(model: nn.Module, model_input: Any, index: int, run: _Run) -> None:
    """One calibration forward (stopped early by a hook raising :class:`_StopForward`)."""
    with torch.no_grad(), run.autocast(), _failures_named(index, model_input):
        call_model(model, run.move(model_input))


class _ModelFailure(CalibrationError):
    """The model itself raised on batch ``index`` (not a problem normswap found in the data or statistics)."""

    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


@contextlib.contextmanager
def _failures_named(index: int, model_input: Any) -> Iterator[None]:
    """Turn a failure of the model on batch ``index`` into a :class:`CalibrationError` naming the batch."""
    try:
        yield
    except _StopForward:
        pass
    except (NormswapError, _GraphUnsafe):
        raise
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _ModelFailure(
            f"batch {index} ({_describe(model_input)}) failed in the model: {type(exc).__name__}: {message}", index
        ) from exc


def _describe(model_input: Any) -> str:
    if isinstance(model_input, torch.Tensor):
        return f"a {str(model_input.dtype).replace('torch.', '')} tensor of shape {list(model_input.shape)}"
    if isinstance(model_input, (tuple, list)):
        return f"a {type(model_input).__name__} of {len(model_input)}"
    if isinstance(model_input, Mapping):
        return f"a dict with keys {sorted(map(str, model_input))}"
    return f"a {type(model_input).__name__}"


def _samples(model_input: Any) -> int:
    """The batch size of a model input: the first dimension of its first tensor (0 if it has none)."""
    if isinstance(model_input, torch.Tensor):
        return int(model_input.shape[0]) if model_input.dim() else 1
    if isinstance(model_input, Mapping):
        values = list(model_input.values())
    elif isinstance(model_input, (tuple, list)):
        values = list(model_input)
    else:
        return 0
    return next((found for found in map(_samples, values) if found), 0)


def _values_per_channel(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.dim() >= 2 and x.shape[1] else 0


def _exact(model: nn.Module, layers: list[_Layer], inputs: Iterator[tuple[int, Any]], run: _Run, ranks: "_Ranks",
           bar_options: dict[str, Any]) -> tuple[list[int], list[_Layer]]:
    """Batch-statistics calibration in one pass; returns the totals (batches, samples) and the layers in the order
    they first ran."""
    order: list[_Layer] = []
    current = {"index": 0}
    handles = []
    for layer in layers:
        module = layer.module
        _use_scratch_statistics(layer, keep_values=False)
        module.training = True
        module.momentum = 1.0
        module.track_running_stats = True
        if classify(module) in _SYNC_KINDS:
            module.forward = functools.partial(_batch_norm_without_sync, module)
        layer.reset(run.device)
        handles += _exact_hooks(layer, order, current)
    totals = [0, 0]
    try:
        with tqdm(desc="recalibrate", unit="batch", **bar_options) as bar:
            for index, model_input in inputs:
                current["index"] = index
                _forward(model, model_input, index, run)
                totals[0] += 1
                totals[1] += _samples(model_input)
                bar.update()
    except Exception:
        ranks.merge(layers, totals, failed=True, quiet=True)
        raise
    finally:
        for handle in handles:
            handle.remove()
    totals = ranks.merge(layers, totals)
    if totals[0] == 0:
        raise CalibrationError("the calibration data is empty: recalibration needs at least one batch")
    order = order if ranks.size == 1 else order + [layer for layer in layers if layer not in order]
    _check_finite(order)
    return totals, order


def _exact_hooks(layer: _Layer, order: list[_Layer], current: dict[str, int]) -> list[Any]:
    """A pre-hook that records the element count per channel (shape arithmetic only) and a post-hook that merges the
    batch mean and unbiased variance BatchNorm left in its momentum-1 buffers."""
    pending = {"count": 0, "seen": False}

    def before(module: nn.Module, args: tuple) -> None:
        count = _values_per_channel(args[0])
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


Level = list[tuple[_Layer, int]]
"""The layers measured in one pass of the sequential method, each with the number of times it runs per forward."""


def _sequential(model: nn.Module, layers: list[_Layer], inputs: Iterator[tuple[int, Any]], run: _Run,
                ranks: "_Ranks", show: dict[str, Any]) -> tuple[list[int], list[_Layer], int, float]:
    """Eval-consistent calibration, level by level; returns the totals, the layers in forward order, the passes and
    their cost in forward passes (the probe batch included).

    Where the model's graph is known, each pass runs only the part of the graph it needs (:class:`_GraphPasses`);
    otherwise, or when that turns out unsafe, each pass is a forward that stops once its layer has run
    (:class:`_EagerPasses`), one layer per pass.
    """
    try:
        held = [(index, run.move(model_input)) for index, model_input in inputs]
    except Exception:
        ranks.merge([], [0, 0], failed=True, quiet=True)
        raise
    totals = ranks.merge([], [len(held), sum(_samples(x) for _, x in held)])
    if totals[0] == 0:
        raise CalibrationError("the calibration data is empty: recalibration needs at least one batch")
    for layer in layers:
        _use_scratch_statistics(layer, keep_values=True)
    old = [(layer, layer.module.running_mean.clone(), layer.module.running_var.clone()) for layer in layers]
    graph = _trace(model)
    levels, chain = ranks.agree(layers, lambda: _schedule(model, layers, held, run, graph))
    order = [layer for level in chain for layer, _ in level]
    probe = 1 / len(held) if held else 0.0
    if levels is not None and graph is not None:
        try:
            passes = _GraphPasses(model, graph, levels, held, run)
            _run_levels(levels, passes, ranks, show)
            return totals, order, len(levels), passes.cost + probe
        except _GraphUnsafe:
            log.debug("sequential recalibration: in-place operations in the graph, one layer per forward instead")
            for layer, mean, var in old:
                layer.module.running_mean.copy_(mean)
                layer.module.running_var.copy_(var)
    _run_levels(chain, _EagerPasses(model, held, run), ranks, show)
    return totals, order, len(chain), len(chain) + probe


class _GraphUnsafe(Exception):
    """The graph-based passes cannot guarantee eager semantics for this model (an in-place change of a value that
    is read elsewhere, or inputs it cannot bind); the sequential method then runs eagerly, one layer per pass."""


def _run_levels(levels: list[Level], passes: Union["_GraphPasses", "_EagerPasses"], ranks: "_Ranks",
                show: dict[str, Any]) -> None:
    """Measure the levels in order, merging across ranks and writing each level's statistics into its layers'
    scratch buffers before the next level is measured."""
    with tqdm(total=len(levels) * len(passes.held), desc="recalibrate", unit="batch", **show) as bar:
        for index, level in enumerate(levels):
            layers = [layer for layer, _ in level]
            for layer in layers:
                layer.reset(passes.run.device)
            try:
                unsafe = passes.measure(index, level, bar)
            except Exception:
                ranks.merge(layers, [0], failed=True, quiet=True)
                raise
            if ranks.merge(layers, [int(unsafe)])[0]:
                raise _GraphUnsafe
            _check_finite(layers)
            for layer, (mean, var) in _final_statistics(layers).items():
                layer.module.running_mean.copy_(mean)
                layer.module.running_var.copy_(var)


def _add_input_statistics(layer: _Layer, x: torch.Tensor) -> None:
    """Merge the per-channel mean and unbiased variance of one input of ``layer``, as BatchNorm's own batch-statistics
    kernel computes them (float32 or float64 accumulation, faster than ``torch.var_mean``) into momentum-1 buffers;
    the normalized output is discarded, and nothing of the activation is kept."""
    count = _values_per_channel(x)
    if count == 1:
        layer.moments.add(1, x.reshape(-1), torch.zeros_like(layer.moments.m2))
    elif count > 1:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean = torch.zeros(x.shape[1], dtype=dtype, device=x.device)
        var = torch.ones_like(mean)
        torch.nn.functional.batch_norm(x, mean, var, None, None, True, 1.0, 1.0)
        layer.moments.add(count, mean, var, m2_scale=count - 1)


class _EagerPasses:
    """Each pass is a forward of the model over every batch, with hooks measuring the inputs of the layers of the
    level; the forward stops as soon as all of them have run."""

    def __init__(self, model: nn.Module, held: list[tuple[int, Any]], run: _Run) -> None:
        self.model = model
        self.held = held
        self.run = run

    def measure(self, index: int, level: Level, bar: tqdm) -> bool:
        expected = sum(calls for _, calls in level)
        seen = {"calls": 0}

        def measuring(layer: _Layer) -> Callable[[nn.Module, tuple], None]:
            def hook(module: nn.Module, args: tuple) -> None:
                _add_input_statistics(layer, args[0])
                seen["calls"] += 1
                if seen["calls"] == expected:
                    raise _StopForward

            return hook

        handles = [layer.module.register_forward_pre_hook(measuring(layer)) for layer, _ in level]
        try:
            for batch, model_input in self.held:
                seen["calls"] = 0
                _forward(self.model, model_input, batch, self.run)
                bar.update()
        finally:
            for handle in handles:
                handle.remove()
        return False


class _GraphPasses:
    """The passes run on the model's ``torch.fx`` graph. A node's value is final once every calibrated layer upstream
    of it has its new statistics, so pass ``k`` computes, in program order, exactly the nodes that became final with
    level ``k - 1``, from the activations kept from earlier passes: over the whole calibration every node up to the
    last measured layer runs once per batch. Activations are kept, for every batch, while a later pass needs them.

    Tensor version counters guard the equivalence with eager execution: a value changed in place by one node while
    another node also reads it, or read after it was changed, makes :meth:`measure` report the graph unsafe.
    """

    def __init__(self, model: nn.Module, graph: torch.fx.Graph, levels: list[Level], held: list[tuple[int, Any]],
                 run: _Run) -> None:
        self.interpreter = torch.fx.Interpreter(model, garbage_collect_values=False, graph=graph)
        self.held = held
        self.run = run
        self.placeholders = [node for node in graph.nodes if node.op == "placeholder"]
        level_of = {layer.module: index + 1 for index, level in enumerate(levels) for layer, _ in level}
        calls = {node: model.get_submodule(node.target) for node in graph.nodes if node.op == "call_module"}
        node_of = {module: node for node, module in calls.items() if module in level_of}
        self.targets = [[node_of[layer.module].args[0] for layer, _ in level] for level in levels]
        position = {node: i for i, node in enumerate(graph.nodes)}
        last = max(position[node] for targets in self.targets for node in targets)
        reach: dict[torch.fx.Node, int] = {}
        for node in graph.nodes:
            upstream = max((reach[source] for source in node.all_input_nodes), default=0)
            reach[node] = level_of.get(calls.get(node), upstream)
        self.passes: list[list[torch.fx.Node]] = [[] for _ in levels]
        self.pass_of: dict[torch.fx.Node, int] = {}
        for node in graph.nodes:
            if node.op not in ("placeholder", "output") and position[node] <= last and reach[node] < len(levels):
                self.passes[reach[node]].append(node)
                self.pass_of[node] = reach[node]
        # the passes' work in full forwards: each node they compute runs once per batch
        computed = [node for node in graph.nodes if node.op not in ("placeholder", "output")]
        self.cost = sum(len(nodes) for nodes in self.passes) / max(1, len(computed))
        self.kept: set[torch.fx.Node] = set()
        self.values: list[dict[torch.fx.Node, tuple[Any, Optional[int]]]] = [{} for _ in held]
        self.input_versions: list[Optional[dict[torch.fx.Node, Optional[int]]]] = [None for _ in held]

    def measure(self, index: int, level: Level, bar: tqdm) -> bool:
        """Measure one level on every batch; ``True`` if the graph turned out unsafe."""
        order = self.passes[index]
        keep = {node for node in self.kept | set(order)
                if any(self.pass_of.get(user, -1) > index for user in node.users)}
        try:
            for position, (batch, model_input) in enumerate(self.held):
                with torch.no_grad(), self.run.autocast(), _failures_named(batch, model_input):
                    env, versions = self._evaluate(position, model_input, order)
                    for (layer, _), target in zip(level, self.targets[index]):
                        _add_input_statistics(layer, _read(env, versions, target))
                self.values[position] = {node: (env[node], versions[node]) for node in keep}
                bar.update()
        except _GraphUnsafe:
            return True
        self.kept = keep
        return False

    def _evaluate(self, position: int, model_input: Any,
                  order: list[torch.fx.Node]) -> tuple[dict[torch.fx.Node, Any], dict[torch.fx.Node, Optional[int]]]:
        env = self._bind(model_input)
        versions = {node: _version(value) for node, value in env.items()}
        if self.input_versions[position] is None:
            self.input_versions[position] = dict(versions)
        elif self.input_versions[position] != versions:
            raise _GraphUnsafe
        for node, (value, version) in self.values[position].items():
            env[node], versions[node] = value, version
        self.interpreter.env = env
        for node in order:
            sources = node.all_input_nodes
            for source in sources:
                _read(env, versions, source)
            env[node] = self.interpreter.run_node(node)
            for source in sources:
                if _version(env[source]) != versions[source]:
                    if len(source.users) > 1:
                        raise _GraphUnsafe
                    versions[source] = _version(env[source])
            versions[node] = _version(env[node])
        return env, versions

    def _bind(self, model_input: Any) -> dict[torch.fx.Node, Any]:
        """The graph's placeholders bound to one model input, as :func:`normswap.data.call_model` would pass it."""
        if isinstance(model_input, tuple):
            args, kwargs = model_input, {}
        elif isinstance(model_input, Mapping):
            args, kwargs = (), dict(model_input)
        else:
            args, kwargs = (model_input,), {}
        names = [node.target for node in self.placeholders]
        if len(args) > len(names) or set(kwargs) - set(names) or any(name.startswith("*") for name in names):
            raise _GraphUnsafe
        env = {}
        for i, node in enumerate(self.placeholders):
            if i < len(args):
                env[node] = args[i]
            elif node.target in kwargs:
                env[node] = kwargs[node.target]
            elif node.args:
                env[node] = node.args[0]
            else:
                raise _GraphUnsafe
        return env


def _version(value: Any) -> Optional[int]:
    return value._version if isinstance(value, torch.Tensor) else None


def _read(env: dict[torch.fx.Node, Any], versions: dict[torch.fx.Node, Optional[int]], node: torch.fx.Node) -> Any:
    """A node's value, provided nothing changed it in place since it was computed."""
    value = env[node]
    if _version(value) != versions[node]:
        raise _GraphUnsafe
    return value


def _schedule(model: nn.Module, layers: list[_Layer], held: list[tuple[int, Any]], run: _Run,
              graph: Optional[torch.fx.Graph]) -> tuple[Optional[list[Level]], list[Level]]:
    """The levels of the sequential method from the graph (``None`` if it cannot be trusted), and the safe
    fallback: one layer per level, in forward order.

    A probe forward on the first batch finds the layers the data reaches, in the order they first run, and how often
    each runs. The graph then puts each layer one level above the highest calibrated layer upstream of it; it is not
    trusted when it does not match the probe (a layer called more than once, a layer hidden inside a module the
    tracer does not enter).
    """
    if not held:
        raise CalibrationError("rank 0 has no calibration data: the sequential method needs a batch there to find "
                               "the order of the layers")
    calls: dict[_Layer, int] = {}

    def count(layer: _Layer) -> Callable[[nn.Module, tuple], None]:
        def hook(module: nn.Module, args: tuple) -> None:
            calls[layer] = calls.get(layer, 0) + 1

        return hook

    handles = [layer.module.register_forward_pre_hook(count(layer)) for layer in layers]
    try:
        _forward(model, held[0][1], held[0][0], run)
    finally:
        for handle in handles:
            handle.remove()
    reached = list(calls)
    chain = [[(layer, calls[layer])] for layer in reached]
    levels = _graph_levels(model, graph, [layer.module for layer in reached]) if graph is not None else None
    if levels is None or any(calls[layer] != 1 for layer in reached):
        return None, chain
    grouped: dict[int, Level] = {}
    for layer in reached:
        grouped.setdefault(levels[layer.module], []).append((layer, 1))
    return [grouped[level] for level in sorted(grouped)], chain


class _NormLeafTracer(torch.fx.Tracer):
    """A ``torch.fx`` tracer that keeps every norm layer, and every module or function timm marks untraceable, as
    one opaque call."""

    def __init__(self) -> None:
        functions, self.opaque = timm_untraceable()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_norm_layer(m) or isinstance(m, self.opaque) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> Optional[torch.fx.Graph]:
    """The model's dataflow graph with norm layers as opaque calls, or ``None`` if it cannot be traced."""
    try:
        return _NormLeafTracer().trace(model)
    except Exception as exc:  # tracing fails in many ways on dynamic code; the fallback is always correct
        log.debug("the model cannot be traced with torch.fx (%s: %s)", type(exc).__name__, exc)
        return None


def _graph_levels(model: nn.Module, graph: torch.fx.Graph, modules: list[nn.Module]) -> Optional[dict[nn.Module, int]]:
    """For each module, 1 + the highest level among the ``modules`` upstream of it in the dataflow graph; modules of
    one level do not feed each other. ``None`` when the graph does not call each of ``modules`` exactly once, with
    one input."""
    wanted = set(modules)
    reach: dict[torch.fx.Node, int] = {}
    levels: dict[nn.Module, int] = {}
    for node in graph.nodes:
        upstream = max((reach[source] for source in node.all_input_nodes), default=0)
        module = model.get_submodule(node.target) if node.op == "call_module" else None
        if module in wanted:
            single_input = len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], torch.fx.Node)
            if module in levels or not single_input:
                return None
            levels[module] = upstream + 1
            reach[node] = upstream + 1
        else:
            reach[node] = upstream
    return levels if len(levels) == len(wanted) else None


def _check_finite(layers: list[_Layer]) -> None:
    """:class:`CalibrationError` naming the first layer (in the given order) whose statistics are not finite."""
    measured = [layer for layer in layers if layer.moments.count]
    if not measured:
        return
    finite = torch.stack([layer.moments.finite() for layer in measured]).tolist()
    for layer, ok in zip(measured, finite):
        if not ok:
            raise CalibrationError(
                f"non-finite activations reach layer '{layer.name}' first: check the data for NaN or inf "
                "(and, with amp, for overflow in half precision)"
            )


def _final_statistics(layers: list[_Layer]) -> dict[_Layer, tuple[torch.Tensor, torch.Tensor]]:
    """The new running mean and unbiased running variance of every layer that saw data."""
    results = {}
    for layer in layers:
        moments = layer.moments
        if moments.count == 0:
            continue
        if moments.count == 1:
            raise CalibrationError(
                f"layer '{layer.name}' saw one value per channel over the whole calibration set, so its variance "
                "is undefined: calibrate on more data"
            )
        results[layer] = (moments.mean, moments.m2 / (moments.count - 1))
    return results


class _Ranks:
    """The processes sharing the calibration (``torch.distributed``), or just this one."""

    def __init__(self) -> None:
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.size = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0

    def _device(self) -> torch.device:
        if "nccl" in str(dist.get_backend()):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def merge(self, layers: list[_Layer], totals: list[int], *, failed: bool = False, quiet: bool = False) -> list[int]:
        """All-gather every layer's float64 ``(count, mean, M2)`` and merge them in rank order, so that every rank
        ends with the same statistics, those of all ranks' data; returns ``totals`` summed over ranks. A rank that
        failed says so (``failed=True``), and the others raise too instead of waiting for it forever; ``quiet``
        suppresses that error on the failing rank, which raises its own."""
        if not self.active:
            return totals
        device = self._device()
        parts = [torch.tensor([float(failed)] + [float(t) for t in totals], dtype=torch.float64)]
        for layer in layers:
            moments = layer.moments
            parts += [torch.tensor([float(moments.count)], dtype=torch.float64), moments.mean.cpu(), moments.m2.cpu()]
        flat = torch.cat(parts).to(device)
        gathered = [torch.empty_like(flat) for _ in range(self.size)]
        dist.all_gather(gathered, flat)
        table = torch.stack(gathered).to(torch.device("cpu"))
        failing = [rank for rank in range(self.size) if table[rank, 0].item()]
        if failing:
            if quiet:
                return totals
            raise CalibrationError(f"recalibration failed on rank {failing[0]} (see its error)")
        summed = [int(round(value)) for value in table[:, 1:1 + len(totals)].sum(0).tolist()]
        offset = 1 + len(totals)
        for layer in layers:
            channels = layer.moments.mean.numel()
            place = layer.moments.mean.device
            layer.reset(place)
            for rank in range(self.size):
                count = int(table[rank, offset].item())
                mean = table[rank, offset + 1:offset + 1 + channels].to(place)
                m2 = table[rank, offset + 1 + channels:offset + 1 + 2 * channels].to(place)
                layer.moments.add(count, mean, m2)
            offset += 1 + 2 * channels
        return summed

    def agree(self, layers: list[_Layer], compute: Callable[[], tuple[Optional[list[Level]], list[Level]]]
              ) -> tuple[Optional[list[Level]], list[Level]]:
        """Schedules computed on rank 0 and shared, so that every rank calibrates the layers in the same order."""
        if not self.active:
            return compute()
        index = {layer: i for i, layer in enumerate(layers)}

        def encode(levels: Optional[list[Level]]) -> Optional[list[list[tuple[int, int]]]]:
            return None if levels is None else [[(index[layer], calls) for layer, calls in level] for level in levels]

        def decode(levels: Optional[list[list[tuple[int, int]]]]) -> Optional[list[Level]]:
            return None if levels is None else [[(layers[i], calls) for i, calls in level] for level in levels]

        message: list[Any] = [None]
        if self.rank == 0:
            try:
                message = [tuple(encode(levels) for levels in compute())]
            except NormswapError as exc:
                message = [str(exc)]
                dist.broadcast_object_list(message, src=0)
                raise
        dist.broadcast_object_list(message, src=0)
        if isinstance(message[0], str):
            raise CalibrationError(f"recalibration failed on rank 0: {message[0]}")
        levels, chain = message[0]
        return decode(levels), decode(chain)


def _length(data: Any, batches: Optional[int]) -> Optional[int]:
    try:
        length = len(data)
    except TypeError:
        return batches
    return min(length, batches) if batches is not None else length


def _progress_setting(progress: Optional[bool], rank: int) -> dict[str, Any]:
    """tqdm keyword arguments: always, never, or on a terminal for long runs (rank 0 only)."""
    if progress is None:
        return {"disable": None if rank == 0 else True, "delay": _PROGRESS_DELAY_S}
    return {"disable": not progress}
