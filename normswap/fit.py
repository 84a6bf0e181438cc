"""Fitted GroupNorm affine weights: converting BatchNorm to GroupNorm without ruining a trained model.

Copying a BatchNorm's weight and bias into a GroupNorm keeps the parameters but not the function: BatchNorm normalizes
with fixed dataset statistics, GroupNorm with each sample's own, so the copied model usually drops to chance accuracy.
:func:`fit_converted` instead chooses, for every converted layer in forward order and for every channel, the ``a`` and
``b`` for which ``a * x̂ + b`` (``x̂`` the GroupNorm-normalized input of the converted model) matches the original
BatchNorm's eval output ``t`` on calibration data, in closed form from float64 sums of ``x̂``, ``x̂²``, ``t``, ``x̂·t``
and ``t²`` per channel: ``a * x̂ + b`` gets the mean and the variance of ``t``, and the sign of their correlation (``a =
sign(cov) · σ_t / σ_x̂``, ``b = μ_t - a · μ_x̂``).

That is the least-squares line with its slope divided by the correlation. Least squares alone shrinks each layer's
output variance by the squared correlation, and where GroupNorm's input explains the target poorly (few channels per
group, deep layers) the shrinkage compounds from layer to layer: at 32 groups on the demo model, whose layers then
hold one or two channels per group, it ends further from the original than copying the BatchNorm affine does (43.7%
against 55.2% top-1 agreement), while matching the variance gives 61.7% and a lower output error on every model and
group count measured (``benchmarks/bench_fit.py``). Each layer then keeps whichever of the fit and the copied
BatchNorm affine has the lower mean squared error against its target; :class:`LayerFit` reports which (``kept``) and
the R² of both.

``x̂`` comes from the converted model itself, with every earlier layer already fitted, so later layers compensate
what earlier ones could not match. The target ``t`` of each layer is either

- ``"global"`` (the default): the original model's BatchNorm output at that layer, which pulls the converted model
  back to the original's activations, or
- ``"local"``: the original BatchNorm applied to the converted model's own input at that layer, which makes each
  layer mimic its BatchNorm;

``"auto"`` fits the whole model both ways and keeps the fit whose final output is closer to the original's on the
calibration data. (Choosing per layer by each fit's own R² is not a good rule: the local target is always the easier
one to fit, yet on the models measured the global fit gives far higher accuracy.)

The result of a fit, with the R² of every layer and the relative output error of each target tried, is recorded in
the model's history; :func:`fit_report` returns it as a :class:`FitReport`.

Example::

    >>> import torch, normswap
    >>> from normswap.fit import fit_report
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    >>> images = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    >>> model = normswap.convert(model, "gn", groups=4, affine="fit", data=images)
    >>> report = fit_report(model)
    >>> len(report.layers), report.chosen
    (1, 'global')
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data import call_model, iter_inputs, output_tensors
from .deprecation import renamed_keywords
from .errors import CalibrationError, PlanError
from .history import record_step, required_step
from .lockstep import Arrival, Lockstep, Revisited, count_calls, run_counting_calls
from .model_state import caches, training_flags
from .placement import Device, Placement, for_float64
from .plan_rows import PlanRow
from .progress import progress_bar
from .tables import text_table
from .targets import SourceLayer
from .unwrap import unwrapped
from .walk import get_module, model_device

__all__ = ["FIT_TARGETS", "FitReport", "LayerFit", "fit_converted", "fit_report"]

log = logging.getLogger("normswap")

FIT_TARGETS = ("global", "local", "auto")
"""Every value ``fit_target=`` accepts."""


@dataclass
class LayerFit:
    """How well one converted layer's fitted affine reproduces its target.

    ``r2`` is the coefficient of determination of the affine weights kept, pooled over channels (1: a perfect
    match, 0: no better than each channel's mean), ``kept`` says which they are (``"fit"``, or ``"copy"`` where the
    copied BatchNorm affine matched the target better) and ``copy_r2`` is the R² the copied affine has. ``r2`` is
    ``None`` and ``note`` says why when the layer was not fitted.
    """

    names: list[str]
    channels: int
    groups: int
    r2: Optional[float]
    note: str = ""
    kept: Optional[str] = None
    copy_r2: Optional[float] = None

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass
class FitReport:
    """The result of one :func:`fit_converted` run.

    ``target`` is what was asked for, ``chosen`` the target whose fit the model kept, ``output_error`` the
    relative output error ``‖y - y_original‖² / ‖y_original‖²`` on the calibration data of each target fitted,
    ``batches`` how many calibration batches were used, and ``layers`` one :class:`LayerFit` per converted layer.
    """

    target: str
    chosen: str
    batches: int
    output_error: dict[str, Optional[float]] = field(default_factory=dict)
    layers: list[LayerFit] = field(default_factory=list)

    def __str__(self) -> str:
        errors = ", ".join(f"{name} {_number(error)}" for name, error in self.output_error.items())
        out = [f"fit: {len(self.layers)} layer(s), {self.batches} batch(es), target {self.target} -> {self.chosen}; "
               f"relative output error: {errors}"]
        header = ("layer", "C", "G", "R2", "kept", "R2 copy", "note")
        lines = [(layer.name, str(layer.channels), str(layer.groups), _number(layer.r2), layer.kept or "-",
                  _number(layer.copy_r2), layer.note) for layer in self.layers]
        out.append(text_table(header, lines))
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what the model's history stores); :meth:`from_dict` reads it back."""
        return {
            "target": self.target,
            "chosen": self.chosen,
            "batches": self.batches,
            "output_error": dict(self.output_error),
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FitReport":
        """The report ``to_dict`` wrote."""
        layers = [LayerFit(**layer) for layer in data["layers"]]
        return cls(data["target"], data["chosen"], data["batches"], dict(data["output_error"]), layers)


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4g}"


def fit_report(model: nn.Module) -> FitReport:
    """The report of the last :func:`fit_converted` run on ``model``, read from its history.

    >>> import torch, normswap
    >>> model = normswap.convert(torch.nn.BatchNorm2d(4), "ln", affine="fit", data=[torch.randn(2, 4, 3, 3)])
    >>> fit_report(model).layers[0].channels
    4
    """
    return FitReport.from_dict(required_step(
        model, "fit", "this model has no fitted affine weights: convert it with affine='fit' first"))


@renamed_keywords(converted="model", reference="original")
def fit_converted(
    model: nn.Module,
    original: nn.Module,
    rows: list[PlanRow],
    *,
    data: Iterable[Any],
    batches: Optional[int] = None,
    fit_target: str = "global",
    device: Device = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
    progress: Optional[bool] = None,
) -> FitReport:
    """Fit the GroupNorm affine weights of the layers ``rows`` converted (with ``affine="fit"``) so that
    ``model`` reproduces ``original``, the model before the conversion (the old keyword names ``converted=`` and
    ``reference=`` still work, with a ``DeprecationWarning``).

    :meth:`normswap.plan.Plan.apply` calls this for a plan made with ``affine="fit"``, and takes its keyword
    arguments (``normswap.convert(model, "gn", affine="fit", data=...)`` passes them on):

    Args:
        data: calibration batches (see :mod:`normswap.data`), read once and held in memory: bound them with
            ``batches``. A few dozen images usually suffice. They are cast to the model's floating dtype.
        batches: use at most this many batches of ``data``.
        fit_target: ``"global"``, ``"local"`` or ``"auto"`` (see the module documentation); named so as not to be
            confused with the conversion target ``to=``.
        device: where to run the calibration (the models are moved there and back); default: where the model is.
        input_fn, input_key: how to find the model input in a batch, as in :func:`normswap.data.iter_inputs`.
        progress: ``True`` shows a progress bar over the layers.

    The fit is recorded in ``model``'s history; :func:`fit_report` returns the per-layer fit quality. Wrappers
    around either model (``torch.compile``, DataParallel, EMA: :mod:`normswap.unwrap`) are looked through.

    Raises:
        PlanError: an unknown ``fit_target``.
        CalibrationError: the data is empty or malformed, or gives non-finite activations. The affine weights are
            then as they were.

    >>> import torch, normswap
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    >>> model = normswap.plan(model, "in", affine="fit").apply(model, data=[torch.randn(2, 1, 8, 8)],
    ...                                                         fit_target="local")
    >>> fit_report(model).chosen
    'local'
    """
    if fit_target not in FIT_TARGETS:
        raise PlanError(f"unknown fit target '{fit_target}': choose global, local or auto")
    converted, reference = unwrapped(model), unwrapped(original)
    inputs = [x for _, x in iter_inputs(data, batches=batches, input_fn=input_fn, input_key=input_key)]
    if not inputs:
        raise CalibrationError("the calibration data is empty: fitting the affine weights needs at least one batch")
    fitted = [row for row in rows if row.affine == "fit"]
    initial = _affine_values(converted, fitted)
    flags = training_flags(converted, reference)
    kept = [caches(model) for model in (converted, reference)]  # (what their eval forwards fill, put back)
    homes = [(model, model_device(model)) for model in (converted, reference)]
    run = Placement.resolve(converted, device, False, error=CalibrationError)
    try:
        converted.to(run.device).eval()
        reference.to(run.device).eval()
        on_device = [run.move(x) for x in inputs]
        report = _fit(converted, reference, rows, on_device, fit_target, progress)
    except BaseException:
        _set_affine_values(converted, initial)
        raise
    finally:
        flags.put_back()
        for model_caches in kept:
            model_caches.put_back()
        for model, home in homes:
            model.to(home)
    record_step(converted, {"op": "fit", **report.to_dict()})
    log.info("fitted the affine weights of %d layer(s) on %d batch(es) (target %s)", len(fitted), len(inputs),
             report.chosen)
    return report


def _fit(converted: nn.Module, reference: nn.Module, rows: list[PlanRow], inputs: list[Any], target: str,
         progress: Optional[bool]) -> FitReport:
    """Fit every layer for each target tried and keep the fit with the smallest output error. The reference model
    runs once per batch, the converted model once per batch and target."""
    fitted = [row for row in rows if row.affine == "fit"]
    initial = _affine_values(converted, fitted)
    candidates = ("global", "local") if target == "auto" else (target,)
    results = {}
    expected: Optional[list[Any]] = None
    for name in candidates:
        _set_affine_values(converted, initial)
        layer_fits, outputs, reference_outputs = _fit_layers(converted, reference, rows, inputs, name, progress,
                                                             run_reference=name == "global" or expected is None)
        expected = reference_outputs if reference_outputs is not None else expected
        error = _output_error(outputs, expected)
        results[name] = (layer_fits, error, _affine_values(converted, fitted))
    chosen = min(candidates, key=lambda name: (results[name][1] is None, results[name][1] or 0.0))
    _set_affine_values(converted, results[chosen][2])
    return FitReport(
        target=target,
        chosen=chosen,
        batches=len(inputs),
        output_error={name: results[name][1] for name in candidates},
        layers=results[chosen][0],
    )


def _fit_layers(converted: nn.Module, reference: nn.Module, rows: list[PlanRow], inputs: list[Any], target: str,
                progress: Optional[bool], *,
                run_reference: bool) -> tuple[list[LayerFit], list[Any], Optional[list[Any]]]:
    """Fit the layers the data runs through, in the order they run, and report every row of the plan; returns the
    report rows, the converted model's outputs (with every layer fitted) and, with ``run_reference``, the reference
    model's outputs.

    The batches' forwards run in step (:class:`normswap.lockstep.Lockstep`), each pausing before every layer to fit:
    once all have paused there, the layer is fitted on what they bring and they go on, through the fitted layer.
    With the global target the reference model's forward of each batch runs in step too, pausing at the same layers,
    so that its BatchNorm input is at hand when the converted model's arrives. A layer called several times per
    forward is found when a forward reaches it again: the calls are then counted and the fit starts again
    (:func:`normswap.lockstep.run_counting_calls`)."""
    fit_rows = [row for row in rows if row.affine == "fit"]
    initial = _affine_values(converted, fit_rows)

    def count() -> dict[int, int]:
        with torch.no_grad():
            return count_calls(converted, inputs[0], [get_module(converted, row.name) for row in fit_rows])

    def refuse(revisit: Revisited) -> CalibrationError:
        return CalibrationError(
            f"layer '{fit_rows[revisit.stop].name}' is called a different number of times in different batches "
            "(or by the original and the converted model): fit it with fit_target='local' or convert with "
            "affine='copy'"
        )

    result, _ = run_counting_calls(
        lambda calls: _fit_in_step(converted, reference, rows, inputs, target, progress, calls, run_reference),
        count, restore=lambda: _set_affine_values(converted, initial), refuse=refuse)
    return result


def _fit_in_step(converted: nn.Module, reference: nn.Module, rows: list[PlanRow], inputs: list[Any], target: str,
                 progress: Optional[bool], calls: dict[int, int],
                 run_reference: bool) -> tuple[list[LayerFit], list[Any], Optional[list[Any]]]:
    """One fit with every batch's forwards run in step; see :func:`_fit_layers`."""
    fit_rows = [row for row in rows if row.affine == "fit"]
    layers = [get_module(converted, row.name) for row in fit_rows]
    sources = [SourceLayer.read(get_module(reference, row.name)) for row in fit_rows]
    stops = {layer: stop for stop, layer in enumerate(layers)}
    lanes: list[tuple[str, int]] = []
    forwards = []
    for batch, model_input in enumerate(inputs):
        if run_reference:
            lanes.append(("reference", batch))
            forwards.append(lambda x=model_input: call_model(reference, x))
        lanes.append(("converted", batch))
        forwards.append(lambda x=model_input: call_model(converted, x))
    if target == "global":
        stops.update({get_module(reference, row.name): stop for stop, row in enumerate(fit_rows)})
    moments = [_Moments(row.channels, for_float64(layer.weight).device) for row, layer in zip(fit_rows, layers)]
    waiting: dict[tuple[int, int, int], torch.Tensor] = {}
    fits: dict[str, float] = {}

    def arrive(stop: int, arrival: Arrival, call: int) -> None:
        kind, batch = lanes[arrival.lane]
        x = for_float64(arrival.args[0].detach())
        if kind == "reference":
            waiting[(batch, stop, call)] = x
        elif target == "local":
            moments[stop].add(_group_normalized(layers[stop], x), _batch_norm_eval(sources[stop], x))
        else:
            seen = waiting.pop((batch, stop, call), None)
            if seen is not None:
                moments[stop].add(_group_normalized(layers[stop], x), _batch_norm_eval(sources[stop], seen))

    with progress_bar(len(fit_rows), f"fit ({target})", "layer", progress=progress) as bar:
        def settle(stop: int, arrivals: list[Arrival], final: bool) -> None:
            if final:
                fits[fit_rows[stop].name] = _fit_layer(fit_rows[stop], layers[stop], moments[stop])
                bar.update()

        outputs = Lockstep(forwards, stops, calls=calls, context=torch.no_grad, on_arrive=arrive).run(settle)
    report = []
    for row in rows:
        if row.name in fits:
            report.append(LayerFit(list(row.names), row.channels, row.groups, **fits[row.name]))
        elif row.affine != "fit":
            report.append(LayerFit(list(row.names), row.channels, row.groups, None,
                                   "the BatchNorm has no affine weights: nothing to fit"))
        else:
            report.append(LayerFit(list(row.names), row.channels, row.groups, None,
                                   "not run by the calibration data: affine copied"))
            log.warning("layer '%s' did not run on the calibration data: its affine weights were copied", row.name)
    converted_outputs = [out for (kind, _), out in zip(lanes, outputs) if kind == "converted"]
    reference_outputs = [out for (kind, _), out in zip(lanes, outputs) if kind == "reference"]
    return report, converted_outputs, reference_outputs if run_reference else None


class _Moments:
    """Per-channel float64 sums for the least-squares fit of ``t ≈ a * x̂ + b``."""

    def __init__(self, channels: int, device: torch.device) -> None:
        self.count = 0
        self.sum_x, self.sum_xx, self.sum_t, self.sum_xt, self.sum_tt = (
            torch.zeros(channels, dtype=torch.float64, device=device) for _ in range(5)
        )

    def add(self, normalized: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch; both tensors are ``(N, C, ...)`` float64."""
        x = normalized.transpose(0, 1).reshape(normalized.shape[1], -1)
        t = target.transpose(0, 1).reshape(target.shape[1], -1)
        self.count += x.shape[1]
        self.sum_x += x.sum(1)
        self.sum_xx += (x * x).sum(1)
        self.sum_t += t.sum(1)
        self.sum_xt += (x * t).sum(1)
        self.sum_tt += (t * t).sum(1)

    def solve(self, copied_scale: torch.Tensor,
              copied_shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Per-channel ``(a, b)`` to keep and what :class:`LayerFit` reports of them (``r2``, ``kept``, ``copy_r2``).

        The fit gives ``a * x̂ + b`` the mean and variance of the target and the sign of their covariance (where
        ``x̂`` is constant, ``a`` keeps ``copied_scale``). The copied ``(copied_scale, copied_shift)`` is kept
        instead when its mean squared error against the target, pooled over channels, is lower.
        """
        n = self.count
        mean_x, mean_t = self.sum_x / n, self.sum_t / n
        var_x = (self.sum_xx / n - mean_x * mean_x).clamp_min(0)
        cov = self.sum_xt / n - mean_x * mean_t
        var_t = (self.sum_tt / n - mean_t * mean_t).clamp_min(0)
        varies = var_x > 1e-12
        matched = torch.sign(cov) * torch.sqrt(var_t / torch.where(varies, var_x, 1.0))
        scale = torch.where(varies, matched, copied_scale.to(torch.float64))
        shift = mean_t - scale * mean_x
        copied = copied_scale.to(torch.float64), copied_shift.to(torch.float64)

        def mean_squared_error(a: torch.Tensor, b: torch.Tensor) -> float:
            """Mean of ``(t - a x̂ - b)²`` over all values, summed over channels."""
            spread = (var_t - 2 * a * cov + a * a * var_x).clamp_min(0)
            return (spread + (mean_t - a * mean_x - b) ** 2).sum().item()

        fit_error, copy_error = mean_squared_error(scale, shift), mean_squared_error(*copied)
        total = var_t.sum().item()
        r2 = {"fit": _r2(fit_error, total), "copy": _r2(copy_error, total)}
        kept = "copy" if copy_error < fit_error else "fit"
        if kept == "copy":
            scale, shift = copied
        return scale, shift, {"r2": r2[kept], "kept": kept, "copy_r2": r2["copy"]}


def _r2(error: float, variance: float) -> float:
    """The coefficient of determination of a fit with mean squared ``error`` of a target of ``variance`` (both
    summed over channels). A constant target counts as matched (1) when the error is zero, else as not (0)."""
    if variance > 0:
        return 1.0 - error / variance
    return 1.0 if error <= 0 else 0.0


@torch.no_grad()
def _fit_layer(row: PlanRow, layer: nn.Module, moments: _Moments) -> dict[str, Any]:
    """Fit one layer from the sums gathered over all inputs, write the affine weights it keeps, and return what
    :class:`LayerFit` reports of them."""
    if moments.count == 0:
        raise CalibrationError(f"layer '{row.name}' saw no calibration values to fit")
    scale, shift, quality = moments.solve(layer.weight.detach(), layer.bias.detach())
    if not (torch.isfinite(scale).all() and torch.isfinite(shift).all()):
        raise CalibrationError(
            f"layer '{row.name}' got non-finite fitted weights: the calibration data gives non-finite activations"
        )
    layer.weight.copy_(scale.to(layer.weight.dtype))
    layer.bias.copy_(shift.to(layer.bias.dtype))
    return quality


def _group_normalized(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x̂``: the layer's GroupNorm normalization of ``x`` without its affine, in float64."""
    return F.group_norm(x.to(torch.float64), layer.num_groups, eps=layer.eps)


def _batch_norm_eval(source: SourceLayer, x: torch.Tensor) -> torch.Tensor:
    """The original BatchNorm's eval-mode output before any fused activation, in float64."""
    x = x.to(torch.float64)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if source.has_stats:
        mean = source.running_mean.to(torch.float64).view(shape)
        var = source.running_var.to(torch.float64).view(shape)
    else:
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
    out = (x - mean) / torch.sqrt(var + source.eps)
    if source.weight is not None:
        out = out * source.weight.to(torch.float64).view(shape)
    if source.bias is not None:  # a BatchNorm built with bias=False has no shift
        out = out + source.bias.to(torch.float64).view(shape)
    return out


def _output_error(outputs: list[Any], expected: list[Any]) -> Optional[float]:
    """``‖y - y_ref‖² / ‖y_ref‖²`` over the calibration inputs and every float tensor in the outputs.

    ``None`` if the outputs hold no floating-point tensor.
    """
    squared_error = squared_reference = 0.0
    for output, reference in zip(outputs, expected):
        for y, y_ref in zip(output_tensors(output, floating=True), output_tensors(reference, floating=True)):
            y, y_ref = y.to(torch.float64), y_ref.to(torch.float64)
            squared_error += (y - y_ref).pow(2).sum().item()
            squared_reference += y_ref.pow(2).sum().item()
    return squared_error / squared_reference if squared_reference > 0 else None


def _affine_values(model: nn.Module, rows: list[PlanRow]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A copy of the weight and bias of each row's layer."""
    layers = {row.name: get_module(model, row.name) for row in rows}
    return {name: (layer.weight.detach().clone(), layer.bias.detach().clone()) for name, layer in layers.items()}


@torch.no_grad()
def _set_affine_values(model: nn.Module, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Write weights and biases saved by :func:`_affine_values` back into the same parameter objects."""
    for name, (weight, bias) in values.items():
        layer = get_module(model, name)
        layer.weight.copy_(weight.to(layer.weight.device))
        layer.bias.copy_(bias.to(layer.bias.device))
