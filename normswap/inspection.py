"""A health report of a model's normalization layers, as data: what ``normswap inspect`` prints.

One :class:`LayerReport` per norm layer: its names, class, channels, eps, the range of its running statistics, the
GroupNorm group counts near 32 that divide its channels, and the warnings worth acting on before a conversion:

- ``nonfinite``: NaN or infinite running statistics (a diverged run; frozen or recalibrated layers would emit NaN);
- ``negative_var``: negative running variance (corrupt statistics; ``sqrt(var + eps)`` is NaN);
- ``dead``: channels whose output is constant (``|weight| ~ 0`` or ``running_var ~ 0``);
- ``eps``: eps <= 0 (division by zero on a constant channel).

The first two make a converted model wrong; ``normswap convert`` warns about them and refuses them under ``--strict``.

Example::

    >>> import torch
    >>> bn = torch.nn.BatchNorm2d(4)
    >>> bn.running_var[0] = -1.0
    >>> report = inspect_model(torch.nn.Sequential(bn))[0]
    >>> report.name, report.channels, report.warnings["negative_var"]
    ('0', 4, 'running_var has 1 negative value(s)')
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from . import registry
from .errors import NormswapError
from .tables import text_table
from .unwrap import unwrapped

__all__ = ["BAD_STATS", "LayerReport", "format_reports", "group_counts_near", "inspect_model", "inspect_state_dict",
           "save_html"]

BAD_STATS = ("nonfinite", "negative_var")
"""Warning codes for statistics that make a converted model compute wrong values."""

DEAD_THRESHOLD = 1e-8
"""A channel is dead when ``|weight|`` or ``running_var`` is at most this."""


@dataclass
class LayerReport:
    """One norm layer. ``mean``/``var`` are the (min, max) of the running statistics; ``groups`` a GroupNorm's own
    group count; ``gn_groups`` the group counts near 32 that divide ``channels``; ``warnings`` code -> sentence."""

    names: list[str]
    kind: str
    channels: int
    eps: Optional[float] = None
    groups: Optional[int] = None
    mean: Optional[tuple[float, float]] = None
    var: Optional[tuple[float, float]] = None
    gn_groups: list[int] = field(default_factory=list)
    warnings: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def has_bad_stats(self) -> bool:
        """True if the running statistics are NaN/infinite or the variance negative."""
        return any(code in self.warnings for code in BAD_STATS)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


def group_counts_near(channels: int, around: int = 32, count: int = 3) -> list[int]:
    """The ``count`` divisors of ``channels`` nearest to ``around`` (by ratio), ascending.

    >>> group_counts_near(64), group_counts_near(100), group_counts_near(3)
    ([16, 32, 64], [20, 25, 50], [1, 3])
    """
    divisors = [d for d in range(1, channels + 1) if channels % d == 0]
    nearest = sorted(divisors, key=lambda d: (abs(math.log(d / around)), -d))[:count]
    return sorted(nearest)


def _range(tensor: Optional[torch.Tensor]) -> Optional[tuple[float, float]]:
    if tensor is None or tensor.numel() == 0:
        return None
    finite = tensor[torch.isfinite(tensor)]
    if finite.numel() == 0:
        return (math.nan, math.nan)
    return (float(finite.min()), float(finite.max()))


def _warnings(weight: Optional[torch.Tensor], mean: Optional[torch.Tensor], var: Optional[torch.Tensor],
              eps: Optional[float]) -> dict[str, str]:
    found: dict[str, str] = {}
    stats = [t for t in (mean, var) if t is not None]
    nonfinite = sum(int((~torch.isfinite(t)).sum()) for t in stats)
    if nonfinite:
        found["nonfinite"] = f"running statistics have {nonfinite} NaN or infinite value(s)"
    if var is not None:
        negative = int((var < 0).sum())
        if negative:
            found["negative_var"] = f"running_var has {negative} negative value(s)"
    dead: Optional[torch.Tensor] = None
    if weight is not None:
        dead = weight.abs() <= DEAD_THRESHOLD
    if var is not None:
        small = (var >= 0) & (var <= DEAD_THRESHOLD)
        dead = small if dead is None else dead | small
    n_dead = 0 if dead is None else int(dead.sum())
    if n_dead:
        found["dead"] = f"{n_dead} dead channel(s) (|weight| or running_var ~ 0: constant output)"
    if eps is not None and eps <= 0:
        found["eps"] = f"eps is {eps:g} (<= 0: a constant channel divides by zero)"
    return found


def _as_float64(tensor: Any) -> Optional[torch.Tensor]:
    if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
        return None
    return tensor.detach().to(device="cpu", dtype=torch.float64).reshape(-1)


def _report(names: list[str], kind: str, channels: int, eps: Optional[float], weight: Any, mean: Any, var: Any,
            groups: Optional[int] = None) -> LayerReport:
    weight, mean, var = _as_float64(weight), _as_float64(mean), _as_float64(var)
    return LayerReport(
        names=list(names),
        kind=kind,
        channels=channels,
        eps=eps,
        groups=groups,
        mean=_range(mean),
        var=_range(var),
        gn_groups=group_counts_near(channels) if groups is None and channels else [],
        warnings=_warnings(weight, mean, var, eps),
    )


def _is_reported(module: nn.Module) -> bool:
    from .targets import is_norm_layer

    return is_norm_layer(module) or isinstance(module, nn.LayerNorm)


def inspect_model(model: nn.Module) -> list[LayerReport]:
    """A report for every norm layer of ``model`` (all names of shared layers), in module order: BatchNorm-like
    layers, GroupNorm and LayerNorm (with their group counts: a LayerNorm normalizes its features as one group).

    >>> [(r.kind, r.groups) for r in inspect_model(nn.Sequential(nn.GroupNorm(2, 4), nn.LayerNorm(4)))]
    [('GroupNorm', 2), ('LayerNorm', 1)]
    """
    from .targets import SourceLayer, classify
    from .walk import find_modules

    reports = []
    for found in find_modules(unwrapped(model), _is_reported):
        module, kind = found.module, classify(found.module)
        name = type(module).__name__
        if kind is registry.LAZY:
            reports.append(LayerReport(found.names, name, 0,
                                       warnings={"lazy": "uninitialized: run one forward pass first"}))
            continue
        if kind is registry.UNPROVEN:
            reports.append(LayerReport(found.names, name, registry.channels_of(module),
                                       warnings={"unproven": registry.probed(module)[1]}))
            continue
        if kind is None:  # a LayerNorm
            reports.append(_report(found.names, name, math.prod(module.normalized_shape), float(module.eps),
                                   module.weight, None, None, 1))
            continue
        src = SourceLayer.read(module)
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else None
        reports.append(_report(found.names, name, src.num_features, src.eps, src.weight,
                               src.running_mean, src.running_var, groups))
    return reports


def inspect_state_dict(tensors: dict[str, torch.Tensor],
                       manifest: Optional[dict[str, Any]] = None) -> list[LayerReport]:
    """A report for every layer of a bare state dict that has running statistics (class and eps unknown), and,
    with the ``manifest`` of a file normswap wrote, for every layer it records (class, eps and GroupNorm groups
    from there), in the file's order.

    >>> manifest = {"modules": {"gn": {"class": "GroupNorm", "num_groups": 2, "num_channels": 4, "eps": 1e-5}}}
    >>> [(r.name, r.kind, r.groups) for r in inspect_state_dict({"gn.weight": torch.ones(4)}, manifest)]
    [('gn', 'GroupNorm', 2)]
    """
    recorded = manifest.get("modules") if isinstance(manifest, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}
    found: dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        if name.endswith("running_mean") and (name == "running_mean" or name.endswith(".running_mean")):
            prefix = name[: -len("running_mean")]
            if tensors.get(prefix + "running_var") is not None:
                found[prefix.rstrip(".")] = (tensor, tensors[prefix + "running_var"])
    for name, entry in recorded.items():
        if isinstance(entry, dict) and _recorded_family(entry) in ("gn", "frozen", "bn", "sync"):
            found.setdefault(name, (None, None))
    reports = []
    for layer, (mean, var) in found.items():
        prefix = layer + "." if layer else ""
        entry = recorded.get(layer) if isinstance(recorded.get(layer), dict) else {}
        kind = str(entry.get("class", "?"))
        groups = entry.get("num_groups") if isinstance(entry.get("num_groups"), int) else None
        eps = entry.get("eps") if isinstance(entry.get("eps"), float) else None
        weight = tensors.get(prefix + "weight")
        channels = next((t.numel() for t in (mean, weight) if isinstance(t, torch.Tensor)), None)
        channels = channels if channels is not None else entry.get("num_channels", entry.get("num_features"))
        reports.append(_report([layer], kind, int(channels) if isinstance(channels, int) else 0, eps, weight,
                               mean, var, groups))
    return reports


def _recorded_family(entry: dict[str, Any]) -> Optional[str]:
    try:
        return registry.by_key(entry.get("class")).family
    except NormswapError:
        return None


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def _span(pair: Optional[tuple[float, float]]) -> str:
    return "-" if pair is None else f"[{pair[0]:.3g}, {pair[1]:.3g}]"


def format_reports(reports: list[LayerReport]) -> str:
    """The reports as a text table, then one line per warning.

    >>> print(format_reports(inspect_model(torch.nn.Sequential(torch.nn.BatchNorm2d(48)))))
    layer  class        C   eps    running_mean  running_var  GN groups
    0      BatchNorm2d  48  1e-05  [0, 0]        [1, 1]       16,24,48
    1 norm layer(s), no warnings
    """
    header = ("layer", "class", "C", "eps", "running_mean", "running_var", "GN groups")
    lines = []
    for report in reports:
        label = report.name if len(report.names) == 1 else f"{report.name} (+{len(report.names) - 1} more)"
        groups = f"{report.groups} (now)" if report.groups is not None else ",".join(map(str, report.gn_groups))
        lines.append((label, report.kind, str(report.channels), _number(report.eps), _span(report.mean),
                      _span(report.var), groups or "-"))
    out = [text_table(header, lines)]
    warnings = [f"warning: {report.name}: {text}" for report in reports for text in report.warnings.values()]
    out.append(f"{len(reports)} norm layer(s), " + (f"{len(warnings)} warning(s)" if warnings else "no warnings"))
    out.extend(warnings)
    return "\n".join(out)


def save_html(reports: list[LayerReport], path: Union[str, "os.PathLike[str]"], *, notes: Sequence[str] = (),
              overwrite: bool = False) -> Path:
    """Write the reports as one self-contained HTML page (:func:`normswap.report_page.inspection_page`): the range
    of every layer's running mean and variance along the depth, layers with warnings marked; returns the path.

    >>> import tempfile, pathlib
    >>> page = save_html(inspect_model(torch.nn.Sequential(torch.nn.BatchNorm2d(8))),
    ...                  pathlib.Path(tempfile.mkdtemp()) / "inspect.html")
    >>> page.read_text().count('class="point"')
    2
    """
    from .report_page import inspection_page, write_page

    page = inspection_page([report.to_dict() for report in reports], notes=notes)
    return write_page(path, page, overwrite=overwrite)
