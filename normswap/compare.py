"""Verification: how closely two models agree on the same data, and where along the network they part ways.

:func:`compare` runs both models in eval mode over the same batches and reports

- output agreement: largest absolute difference, relative difference (``||b - a|| / ||a||`` over all outputs),
  cosine similarity per sample (mean and minimum), top-1 agreement for outputs with classes along dim 1, and the
  accuracy of each model where labels are known (``labels=``, or the second element of ``(input, label)`` batches);
- per-layer divergence: for every module with the same qualified name in both models, the relative difference of
  its outputs, in the order model A produces them (a block comes after the layers inside it). The first layer
  above ``tolerance`` is where the models part ways. The conv layers into which a model's history says a BatchNorm
  was folded are left out (their outputs differ by design; the BatchNorm's place, now holding its activation or
  ``nn.Identity``, is compared instead).

``str(report)`` is a readable table, ``report.to_dict()`` its JSON form, ``report.save_html(path)`` a page with a
chart of the per-layer divergence (:mod:`normswap.report_page`), and ``report.verdicts(max_relative=...)`` the
threshold checks ``normswap verify`` prints. On a terminal, a progress bar counts the batches
(:mod:`normswap.progress`).

Example::

    >>> import copy, torch
    >>> from torch import nn
    >>> original = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> changed = copy.deepcopy(original)
    >>> with torch.no_grad():
    ...     _ = changed[2].weight.mul_(-1)
    >>> data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(2)]
    >>> report = compare(original, changed, data)
    >>> report.samples, [layer.name for layer in report.layers], report.first_divergence
    (32, ['0', '1', '2'], '2')
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data import call_model, floating_dtype, iter_inputs, main_output, model_failures, move_input
from .deprecation import renamed_keywords
from .errors import CalibrationError, NormswapError, spelled
from .history import get_history
from .model_state import restored
from .placement import for_float64
from .progress import progress_bar
from .tables import text_table
from .unwrap import unwrapped
from .walk import model_device

__all__ = ["ComparisonReport", "LayerDivergence", "Verdict", "compare"]

LABEL_KEYS = ("label", "labels", "target", "targets", "y")
"""Keys tried, in order, for the labels of a dict batch."""


@dataclass
class LayerDivergence:
    """How far apart the outputs of one module (same qualified name in both models) are, over all batches."""

    name: str
    class_a: str
    class_b: str
    relative: float
    max_abs: float


@dataclass
class Verdict:
    """One threshold checked against a report: ``str()`` is the line ``normswap verify`` prints.

    >>> print(Verdict("relative difference", 2.2e-07, "<=", 1e-05, True))
    relative difference 2.2e-07 <= 1e-05: passed
    """

    figure: str
    value: float
    relation: str
    limit: float
    passed: bool

    def __str__(self) -> str:
        relation = self.relation if self.passed else {"<=": ">", ">=": "<"}[self.relation]
        return f"{self.figure} {self.value:.3g} {relation} {self.limit:g}: {'passed' if self.passed else 'failed'}"


@dataclass
class ComparisonReport:
    """What :func:`compare` measured. ``None`` marks a figure that does not apply (no classes, no labels)."""

    samples: int
    batches: int
    max_abs: float
    relative: float
    cosine_mean: float
    cosine_min: float
    top1_agreement: Optional[float] = None
    accuracy_a: Optional[float] = None
    accuracy_b: Optional[float] = None
    tolerance: float = 1e-4
    layers: list[LayerDivergence] = field(default_factory=list)

    @property
    def first_divergence(self) -> Optional[str]:
        """The first layer, in forward order, whose relative difference exceeds ``tolerance``."""
        for layer in self.layers:
            if not layer.relative <= self.tolerance:
                return layer.name
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every figure, with all layers."""
        data = asdict(self)
        data["first_divergence"] = self.first_divergence
        return data

    def verdicts(self, *, max_relative: Optional[float] = None,
                 min_agreement: Optional[float] = None) -> list[Verdict]:
        """The thresholds given, each checked: the outputs' relative difference at most ``max_relative``, top-1
        agreement at least ``min_agreement`` (a fraction).

        Raises:
            NormswapError: ``min_agreement`` for outputs without classes.

        >>> report = ComparisonReport(samples=8, batches=1, max_abs=1e-6, relative=2.2e-07, cosine_mean=1.0,
        ...                           cosine_min=1.0, top1_agreement=0.875)
        >>> for verdict in report.verdicts(max_relative=1e-5, min_agreement=0.9):
        ...     print(verdict)
        relative difference 2.2e-07 <= 1e-05: passed
        top-1 agreement 0.875 < 0.9: failed
        """
        found = []
        if max_relative is not None:
            found.append(Verdict("relative difference", self.relative, "<=", max_relative,
                                 self.relative <= max_relative))
        if min_agreement is not None:
            if self.top1_agreement is None:
                raise NormswapError(f"{spelled('min_agreement', '--min-agreement')} needs class outputs (N, classes), "
                                    "and the model outputs are not")
            found.append(Verdict("top-1 agreement", self.top1_agreement, ">=", min_agreement,
                                 self.top1_agreement >= min_agreement))
        return found

    def save_html(self, path: Union[str, "os.PathLike[str]"], *, title: str = "normswap: comparison",
                  overwrite: bool = False) -> Path:
        """Write the report as one self-contained HTML page (no network, no scripts): output agreement and a chart
        of per-layer divergence along model A's forward order with the first divergence marked; returns the path.

        >>> import tempfile, pathlib
        >>> report = ComparisonReport(samples=4, batches=1, max_abs=0.0, relative=0.0, cosine_mean=1.0,
        ...                           cosine_min=1.0, layers=[LayerDivergence("0", "Linear", "Linear", 0.0, 0.0)])
        >>> report.save_html(pathlib.Path(tempfile.mkdtemp()) / "report.html").read_text()[:15]
        '<!DOCTYPE html>'
        """
        from .report_page import comparison_page, write_page

        return write_page(path, comparison_page(self.to_dict(), title=title), overwrite=overwrite)

    def __str__(self) -> str:
        return format_report(self)


def format_report(report: ComparisonReport, max_rows: int = 30) -> str:
    """The report as text: output agreement, then the layer table at the deepest nesting level that fits in
    ``max_rows`` rows (the first diverging layer is always shown)."""
    out = [
        f"compared {report.samples} sample(s) in {report.batches} batch(es)",
        f"output: max abs diff {report.max_abs:.3g}, relative diff {report.relative:.3g}, "
        f"cosine {report.cosine_mean:.6f} (min {report.cosine_min:.6f})",
    ]
    if report.top1_agreement is not None:
        line = f"top-1 agreement {report.top1_agreement:.2%}"
        if report.accuracy_a is not None:
            line += f", accuracy a {report.accuracy_a:.2%}, b {report.accuracy_b:.2%}"
        out.append(line)
    if not report.layers:
        return "\n".join(out)
    first = report.first_divergence
    depth = 1
    while depth < 64 and sum(_depth(layer.name) <= depth + 1 for layer in report.layers) <= max_rows:
        if not any(_depth(layer.name) > depth for layer in report.layers):
            break
        depth += 1
    shown = [layer for layer in report.layers if _depth(layer.name) <= depth or layer.name == first]
    out.append(f"layers (forward order; {len(shown)} of {len(report.layers)} shown):")
    rows = []
    for layer in shown:
        mark = "  <- first divergence" if layer.name == first else ""
        class_b = layer.class_b if layer.class_b != layer.class_a else "same"
        rows.append((layer.name, layer.class_a, class_b, f"{layer.relative:.3g}", f"{layer.max_abs:.3g}{mark}"))
    out.append(text_table(("layer", "a", "b", "relative", "max abs"), rows))
    if first is None:
        out.append(f"no layer differs by more than {report.tolerance:g} (relative)")
    else:
        out.append(f"the models part ways at {first} (relative difference above {report.tolerance:g})")
    return "\n".join(out)


def _depth(name: str) -> int:
    return name.count(".") + 1


class _LayerStats:
    """Sums of one layer's squared differences and squared reference values, in float64."""

    def __init__(self, class_a: str, class_b: str) -> None:
        self.class_a, self.class_b = class_a, class_b
        self.sum_sq_diff = 0.0
        self.sum_sq_ref = 0.0
        self.max_abs = 0.0
        self.compared = 0

    def add(self, reference: torch.Tensor, other: torch.Tensor) -> None:
        self.compared += 1
        reference = for_float64(reference).double()
        diff = for_float64(other.detach()).double().to(reference.device) - reference
        self.sum_sq_diff += float(diff.pow(2).sum())
        self.sum_sq_ref += float(reference.pow(2).sum())
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))

    def relative(self) -> float:
        if self.sum_sq_ref > 0:
            return math.sqrt(self.sum_sq_diff / self.sum_sq_ref)
        return 0.0 if self.sum_sq_diff == 0 else math.inf


class _LayerProbe:
    """Forward hooks that record each same-named module's outputs in model A and compare model B's against them."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module) -> None:
        skipped = _folded_convs(model_a) | _folded_convs(model_b)
        modules_b = dict(model_b.named_modules())
        self.captured: dict[str, list[torch.Tensor]] = {}
        self.calls_b: dict[str, int] = {}
        self.stats: dict[str, _LayerStats] = {}
        self.order: dict[str, None] = {}
        self.handles = []
        for name, module_a in model_a.named_modules():
            module_b = modules_b.get(name)
            if not name or module_b is None or name in skipped:
                continue
            self.stats[name] = _LayerStats(type(module_a).__name__, type(module_b).__name__)
            self.handles.append(module_a.register_forward_hook(self._recorder(name)))
            self.handles.append(module_b.register_forward_hook(self._comparer(name)))

    def _recorder(self, name: str) -> Callable:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                self.order.setdefault(name)
                self.captured.setdefault(name, []).append(output.detach().clone())

        return record

    def _comparer(self, name: str) -> Callable:
        def compare_output(module: nn.Module, args: Any, output: Any) -> None:
            call = self.calls_b.get(name, 0)
            self.calls_b[name] = call + 1
            recorded = self.captured.get(name, [])
            if isinstance(output, torch.Tensor) and call < len(recorded) and recorded[call].shape == output.shape:
                self.stats[name].add(recorded[call], output.to(recorded[call].device))

        return compare_output

    def next_batch(self) -> None:
        self.captured.clear()
        self.calls_b.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def results(self) -> list[LayerDivergence]:
        """Every layer compared at least once, in model A's forward order."""
        compared = [(name, self.stats[name]) for name in self.order if self.stats[name].compared]
        return [LayerDivergence(name, s.class_a, s.class_b, s.relative(), s.max_abs) for name, s in compared]


def _folded_convs(model: nn.Module) -> set[str]:
    """Names of the layers into which the model's recorded fold steps folded a BatchNorm."""
    return {pair[0] for step in get_history(model) if step.get("op") == "fold" for pair in step.get("pairs", [])}


def _batch_labels(batch: Any) -> Optional[torch.Tensor]:
    """The integer labels carried by a batch (``(input, labels)`` or a dict with a label key), if any."""
    if isinstance(batch, (tuple, list)) and len(batch) > 1:
        candidate = batch[1]
    elif isinstance(batch, Mapping):
        candidate = next((batch[key] for key in LABEL_KEYS if key in batch), None)
    else:
        candidate = None
    if isinstance(candidate, torch.Tensor) and not candidate.is_floating_point() and not candidate.is_complex():
        return candidate
    return None


def _batch_count(data: Iterable[Any], batches: Optional[int]) -> Optional[int]:
    """How many batches a comparison will run, where it can be told without iterating (for the progress bar)."""
    try:
        count = len(data)  # type: ignore[arg-type]
    except TypeError:
        return batches
    return count if batches is None else min(count, batches)


def _remember_batches(data: Iterable[Any], last: list) -> Iterator[Any]:
    for batch in data:
        last[:] = [batch]
        yield batch


class _OutputStats:
    """Running figures of output agreement, accumulated in float64."""

    def __init__(self) -> None:
        self.samples = 0
        self.batches = 0
        self.sum_sq_diff = 0.0
        self.sum_sq_ref = 0.0
        self.max_abs = 0.0
        self.cosines: list[torch.Tensor] = []
        self.predictions = 0
        self.agree = 0
        self.labelled = 0
        self.correct_a = 0
        self.correct_b = 0

    def add(self, out_a: torch.Tensor, out_b: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        a = for_float64(out_a.detach()).double()
        b = for_float64(out_b.detach()).double().to(a.device)
        rows = a.shape[0] if a.dim() else 1
        diff = b - a
        self.batches += 1
        self.samples += rows
        self.sum_sq_diff += float(diff.pow(2).sum())
        self.sum_sq_ref += float(a.pow(2).sum())
        if diff.numel():
            self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.cosines.append(F.cosine_similarity(a.reshape(rows, -1), b.reshape(rows, -1), dim=1, eps=1e-30).cpu())
        if a.dim() < 2 or a.shape[1] < 2:
            return
        pred_a, pred_b = a.argmax(1), b.argmax(1)
        self.predictions += pred_a.numel()
        self.agree += int((pred_a == pred_b).sum())
        if labels is not None and labels.numel() == pred_a.numel():
            labels = labels.to(pred_a.device).reshape(pred_a.shape)
            self.labelled += labels.numel()
            self.correct_a += int((pred_a == labels).sum())
            self.correct_b += int((pred_b == labels).sum())

    def report(self, tolerance: float, layers: list[LayerDivergence]) -> ComparisonReport:
        cosines = torch.cat(self.cosines)
        if self.sum_sq_ref > 0:
            relative = math.sqrt(self.sum_sq_diff / self.sum_sq_ref)
        else:
            relative = 0.0 if self.sum_sq_diff == 0 else math.inf
        return ComparisonReport(
            samples=self.samples,
            batches=self.batches,
            max_abs=self.max_abs,
            relative=relative,
            cosine_mean=float(cosines.mean()),
            cosine_min=float(cosines.min()),
            top1_agreement=self.agree / self.predictions if self.predictions else None,
            accuracy_a=self.correct_a / self.labelled if self.labelled else None,
            accuracy_b=self.correct_b / self.labelled if self.labelled else None,
            tolerance=tolerance,
            layers=layers,
        )


@renamed_keywords(model_a="original", model_b="model")
def compare(
    original: nn.Module,
    model: nn.Module,
    data: Iterable[Any],
    *,
    labels: Union[torch.Tensor, Sequence[int], None] = None,
    batches: Optional[int] = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
    device: Union[str, torch.device, None] = None,
    layers: bool = True,
    tolerance: float = 1e-4,
    progress: Optional[bool] = None,
) -> ComparisonReport:
    """Compare ``model``'s eval-mode outputs with ``original``'s on the same data, output by output and layer by
    layer.

    ``original`` is the reference (relative differences are taken against it; the report's ``a`` figures are its
    own, ``b`` those of ``model``). Both models are run in eval mode and left as they were: in their mode, on their
    device, with what their forwards change put back (caches, attributes, buffers: :mod:`normswap.model_state`).
    The old keyword names ``model_a=`` and ``model_b=`` still work, with a ``DeprecationWarning``.

    Args:
        data: batches as :func:`normswap.data.iter_inputs` reads them; each model input is passed as
            :func:`normswap.data.call_model` does.
        labels: every sample's class, in data order; by default the labels the batches carry (the second element
            of ``(input, labels)``, or a dict's ``label``/``labels``/``target``/``targets``/``y``), if any.
        batches: compare on the first ``batches`` batches only.
        device: run both models there (they are moved, and moved back afterwards) with the inputs; by default each
            model runs where it is, its input moved to the device of its first parameter.
        layers: also measure per-layer divergence; this keeps one batch of ``model_a``'s module outputs in memory.
        tolerance: relative difference above which a layer counts as diverged.
        progress: ``True`` shows a progress bar over the batches, ``False`` never; ``None`` shows one on a terminal
            once the comparison has run for two seconds (:mod:`normswap.progress`).

    Raises:
        CalibrationError: no batches, a malformed batch, or ``labels`` that do not match the number of samples.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 5))
    >>> report = compare(model, model, [torch.randn(4, 3, 6, 6)], labels=[0, 1, 2, 3])
    >>> report.max_abs, report.top1_agreement, report.first_divergence
    (0.0, 1.0, None)
    """
    model_a, model_b = unwrapped(original), unwrapped(model)
    all_labels = torch.as_tensor(labels).reshape(-1) if labels is not None else None
    with restored(model_a), restored(model_b):  # (eval mode, and what their forwards change, put back)
        stats, probe = _compared(model_a, model_b, data, all_labels, batches, input_fn, input_key, device, layers,
                                 progress)
    if not stats.batches:
        raise CalibrationError("there are no batches to compare the models on")
    if all_labels is not None and all_labels.numel() != stats.samples:
        raise CalibrationError(f"labels has {all_labels.numel()} entries but the data has {stats.samples} samples")
    return stats.report(tolerance, probe.results() if probe is not None else [])


def _compared(model_a: nn.Module, model_b: nn.Module, data: Iterable[Any], all_labels: Optional[torch.Tensor],
              batches: Optional[int], input_fn: Optional[Callable[[Any], Any]], input_key: Optional[str],
              device: Union[str, torch.device, None], layers: bool,
              progress: Optional[bool]) -> tuple["_OutputStats", Optional["_LayerProbe"]]:
    """Run both models in eval mode over the data (on ``device``, if given, and back), gathering the statistics."""
    homes = [(model, model_device(model)) for model in (model_a, model_b)]
    if device is not None:
        model_a.to(device)
        model_b.to(device)
    device_a, device_b = model_device(model_a), model_device(model_b)
    dtype_a, dtype_b = floating_dtype(model_a), floating_dtype(model_b)
    probe = _LayerProbe(model_a, model_b) if layers else None
    stats = _OutputStats()
    last: list = []
    bar = progress_bar(_batch_count(data, batches), "compare", "batch", progress=progress)
    try:
        model_a.eval()
        model_b.eval()
        with bar, torch.no_grad():
            for index, model_input in iter_inputs(_remember_batches(data, last), batches=batches,
                                                  input_fn=input_fn, input_key=input_key):
                with model_failures(index, model_input, "the original model"):
                    out_a = main_output(call_model(model_a, move_input(model_input, device_a, dtype=dtype_a)))
                with model_failures(index, model_input, "the converted model"):
                    out_b = main_output(call_model(model_b, move_input(model_input, device_b, dtype=dtype_b)))
                if out_a.shape != out_b.shape:
                    raise NormswapError(
                        f"the models' outputs have different shapes: {tuple(out_a.shape)} and {tuple(out_b.shape)}"
                    )
                rows = out_a.shape[0] if out_a.dim() else 1
                if all_labels is not None:
                    batch_labels = all_labels[stats.samples:stats.samples + rows]
                else:
                    batch_labels = _batch_labels(last[0])
                stats.add(out_a, out_b, batch_labels)
                if probe is not None:
                    probe.next_batch()
                bar.update()
    finally:
        if probe is not None:
            probe.remove()
        if device is not None:
            for model, home in homes:
                model.to(home)
    return stats, probe
