"""Reports as pages to look at: one self-contained HTML file each, with inline CSS and SVG charts.

A page needs nothing but a browser: no scripts, no fonts or styles from elsewhere, no network. Every text that came
from a model or a file (layer names, class names, warnings) is escaped. Two pages:

- :func:`comparison_page`, from :meth:`normswap.compare.ComparisonReport.to_dict` (``normswap verify --report``):
  output agreement, and the relative difference of every compared layer along model A's forward order (log scale),
  the tolerance as a dashed line and the first divergence marked;
- :func:`inspection_page`, from :meth:`normswap.inspection.LayerReport.to_dict` of every layer (``normswap inspect
  --report``): the range of each layer's running mean and running variance along the depth, layers with warnings in
  red, then the warnings and a table of every layer.

Each chart draws one ``<circle class="point">`` per layer, with the layer's name and figures in its ``<title>`` (the
browser's tooltip). :func:`write_page` writes a page through :func:`normswap.checkpoint.atomic.atomic_write`.

Example::

    >>> page = comparison_page({"samples": 4, "batches": 1, "max_abs": 0.0, "relative": 0.0, "cosine_mean": 1.0,
    ...                         "cosine_min": 1.0, "tolerance": 1e-4, "first_divergence": None,
    ...                         "layers": [{"name": "conv<1>", "class_a": "Conv2d", "class_b": "Conv2d",
    ...                                     "relative": 0.0, "max_abs": 0.0}]})
    >>> page.count('class="point"'), "conv&lt;1&gt;" in page, "<script" in page
    (1, True, False)
"""

from __future__ import annotations

import html
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

__all__ = ["comparison_page", "inspection_page", "write_page"]

_WIDTH, _HEIGHT = 960, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 20, 20, 40
_FLOOR = 1e-12
"""Relative differences below this (exact zeros among them) are drawn at this height on the log scale."""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1000px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { padding: 2px 10px; text-align: left; border-bottom: 1px solid #ddd; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.passed { color: #1a7f37; } .failed, .warn { color: #c62828; }
svg { background: #fafafa; border: 1px solid #ddd; }
svg text { font-size: 11px; fill: #444; }
.axis { stroke: #888; } .grid { stroke: #e4e4e4; } .line { fill: none; stroke: #1f6feb; stroke-width: 1.5; }
.point { fill: #1f6feb; } .point.diverged { fill: #c62828; } .point.bad { fill: #c62828; }
.range { stroke: #1f6feb; stroke-width: 2; } .range.bad { stroke: #c62828; }
.tolerance { stroke: #c62828; stroke-dasharray: 5 4; } .first { stroke: #c62828; stroke-width: 1.5; }
"""


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}"


def _page(title: str, body: list[str]) -> str:
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_text(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>{_text(title)}</h1>",
        *body,
        "</body></html>",
        "",
    ])


def _table(header: Sequence[str], rows: list[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; ``rows`` hold already escaped cells, the columns in ``numeric`` are right-aligned."""
    head = "".join(f"<th>{_text(cell)}</th>" for cell in header)
    lines = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for row in rows:
        cells = "".join(f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                        for i, cell in enumerate(row))
        lines.append(f"<tr>{cells}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


class _Chart:
    """An SVG chart with layers along x (forward order) and a linear or log10 y axis."""

    def __init__(self, count: int, low: float, high: float, *, log: bool, label: str) -> None:
        self.count, self.log = count, log
        if log:  # whole decades, so that every tick is a power of ten inside the chart
            self.low, self.high = math.floor(math.log10(low)), math.ceil(math.log10(high))
        else:
            self.low, self.high = low, high
        if self.high <= self.low:
            self.low, self.high = self.low - 1, self.high + 1
        self.parts = [f'<svg width="{_WIDTH}" height="{_HEIGHT}" '
                      f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="{_text(label)}">']
        self._axes(label)

    def x(self, index: int) -> float:
        span = _WIDTH - _LEFT - _RIGHT
        return _LEFT + (span * (index + 0.5) / self.count if self.count else span / 2)

    def y(self, value: float) -> float:
        value = math.log10(max(value, _FLOOR)) if self.log else value
        fraction = (value - self.low) / (self.high - self.low)
        return _TOP + (1 - min(max(fraction, 0.0), 1.0)) * (_HEIGHT - _TOP - _BOTTOM)

    def _axes(self, label: str) -> None:
        bottom, right = _HEIGHT - _BOTTOM, _WIDTH - _RIGHT
        if self.log:
            ticks = [10.0 ** e for e in range(math.floor(self.low), math.ceil(self.high) + 1)]
        else:
            raw = (self.high - self.low) / 4
            magnitude = 10.0 ** math.floor(math.log10(raw))
            step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
            first = math.ceil(self.low / step - 1e-9)
            ticks = [i * step for i in range(first, math.floor(self.high / step + 1e-9) + 1)]
        for tick in ticks:
            y = self.y(tick)
            self.parts.append(f'<line class="grid" x1="{_LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
            self.parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:.3g}</text>')
        self.parts.append(f'<line class="axis" x1="{_LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}"/>')
        self.parts.append(f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{bottom}"/>')
        self.parts.append(f'<text x="{(_LEFT + right) / 2:.0f}" y="{_HEIGHT - 10}" text-anchor="middle">'
                          f'{_text(label)}</text>')

    def add(self, svg: str) -> None:
        self.parts.append(svg)

    def svg(self) -> str:
        return "\n".join(self.parts + ["</svg>"])


def comparison_page(report: dict[str, Any], *, title: str = "normswap: comparison") -> str:
    """The page of a comparison: ``report`` is :meth:`ComparisonReport.to_dict` (``verdicts``, a list of the
    lines :meth:`ComparisonReport.verdicts` gives, may be added to it)."""
    layers = report.get("layers", [])
    first = report.get("first_divergence")
    tolerance = float(report.get("tolerance", 1e-4))
    figures = [
        ("samples compared", f"{report['samples']} in {report['batches']} batch(es)"),
        ("relative difference of the outputs", _number(report["relative"])),
        ("largest absolute difference", _number(report["max_abs"])),
        ("cosine similarity per sample", f"mean {report['cosine_mean']:.6f}, min {report['cosine_min']:.6f}"),
    ]
    if report.get("top1_agreement") is not None:
        figures.append(("top-1 agreement", f"{report['top1_agreement']:.2%}"))
    if report.get("accuracy_a") is not None:
        figures.append(("accuracy (original, converted)", f"{report['accuracy_a']:.2%}, {report['accuracy_b']:.2%}"))
    body = ["<h2>Output agreement</h2>", _table(("figure", "value"), [(_text(k), _text(v)) for k, v in figures])]
    for verdict in report.get("verdicts", []):
        outcome = "passed" if str(verdict).endswith(": passed") else "failed"
        body.append(f'<p class="{outcome}">{_text(verdict)}</p>')
    body.append("<h2>Per-layer divergence</h2>")
    if not layers:
        body.append("<p>No layer was compared (outputs only).</p>")
        return _page(title, body)
    where = (f"The models part ways at <b>{_text(first)}</b> (the first layer whose relative difference is above "
             f"{tolerance:g})." if first else f"No layer differs by more than {tolerance:g} (relative).")
    body.append(f"<p>{len(layers)} layers with the same name in both models, in the original's forward order. "
                f"{where}</p>")
    body.append(_divergence_chart(layers, tolerance, first))
    body.append("<p>One point per layer (hover for its name); red: above the tolerance (dashed line); the vertical "
                "line marks the first divergence. Exact agreement is drawn at the bottom.</p>")
    rows = [(str(i), _text(layer["name"]), _text(layer["class_a"]),
             _text(layer["class_b"] if layer["class_b"] != layer["class_a"] else "same"),
             _number(layer["relative"]), _number(layer["max_abs"]))
            for i, layer in enumerate(layers)]
    body.append("<details><summary>every layer</summary>")
    body.append(_table(("#", "layer", "original", "converted", "relative", "max abs"), rows, numeric=(0, 4, 5)))
    body.append("</details>")
    return _page(title, body)


def _divergence_chart(layers: list[dict[str, Any]], tolerance: float, first: Optional[str]) -> str:
    values = [float(layer["relative"]) for layer in layers]
    finite = [v for v in values if math.isfinite(v) and v > 0]
    low = min([*finite, tolerance, 1e-8])
    high = max([*finite, tolerance * 10, 1e-3])
    chart = _Chart(len(layers), low, high, log=True, label="layers in forward order: relative difference (log)")
    y_tolerance = chart.y(tolerance)
    chart.add(f'<line class="tolerance" x1="{_LEFT}" y1="{y_tolerance:.1f}" x2="{_WIDTH - _RIGHT}" '
              f'y2="{y_tolerance:.1f}"><title>tolerance {tolerance:g}</title></line>')
    points = " ".join(f"{chart.x(i):.1f},{chart.y(v if math.isfinite(v) else high):.1f}"
                      for i, v in enumerate(values))
    chart.add(f'<polyline class="line" points="{points}"/>')
    for i, (layer, value) in enumerate(zip(layers, values)):
        diverged = not value <= tolerance
        if layer["name"] == first:
            x = chart.x(i)
            chart.add(f'<line class="first" x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_HEIGHT - _BOTTOM}"/>')
            anchor = "end" if x > _WIDTH / 2 else "start"
            shift = -4 if anchor == "end" else 4
            chart.add(f'<text class="first-label" x="{x + shift:.1f}" y="{_HEIGHT - _BOTTOM - 6}" '
                      f'text-anchor="{anchor}">first divergence: {_text(layer["name"])}</text>')
        classes = "point diverged" if diverged else "point"
        y = chart.y(value if math.isfinite(value) else high)
        chart.add(f'<circle class="{classes}" cx="{chart.x(i):.1f}" cy="{y:.1f}" r="3"><title>'
                  f'{_text(layer["name"])} ({_text(layer["class_a"])}): relative {_number(value)}</title></circle>')
    return chart.svg()


def inspection_page(layers: list[dict[str, Any]], *, title: str = "normswap: inspection",
                    notes: Sequence[str] = ()) -> str:
    """The page of an inspection: ``layers`` are :meth:`LayerReport.to_dict` of every norm layer, in module order;
    ``notes`` are lines shown first (the file, its architecture)."""
    body = [f"<p>{_text(note)}</p>" for note in notes]
    warnings = [(layer["names"][0], text) for layer in layers for text in layer.get("warnings", {}).values()]
    body.append(f"<p>{len(layers)} norm layer(s), "
                + (f'<span class="warn">{len(warnings)} warning(s)</span>' if warnings else "no warnings") + "</p>")
    with_stats = [(i, layer) for i, layer in enumerate(layers) if layer.get("mean") and layer.get("var")]
    if with_stats:
        body.append("<h2>Running mean (range over channels)</h2>")
        body.append(_range_chart(layers, "mean", log=False, label="layers in module order: running_mean min..max"))
        body.append("<h2>Running variance (range over channels)</h2>")
        body.append(_range_chart(layers, "var", log=True, label="layers in module order: running_var min..max (log)"))
        body.append("<p>One line per layer from the smallest to the largest value over its channels, a point at the "
                    "largest (hover for the layer); red: a layer with warnings. Zero or negative variances are drawn "
                    "at the bottom.</p>")
    else:
        body.append("<p>No layer has running statistics.</p>")
    if warnings:
        body.append("<h2>Warnings</h2><ul>")
        body.extend(f'<li class="warn">{_text(name)}: {_text(text)}</li>' for name, text in warnings)
        body.append("</ul>")
    rows = []
    for layer in layers:
        names = layer["names"]
        label = names[0] if len(names) == 1 else f"{names[0]} (+{len(names) - 1} more)"
        rows.append((_text(label), _text(layer["kind"]), str(layer["channels"]), _number(layer.get("eps")),
                     _text(_span(layer.get("mean"))), _text(_span(layer.get("var"))),
                     _text("; ".join(layer.get("warnings", {}).values()) or "-")))
    body.append("<h2>Layers</h2>")
    body.append(_table(("layer", "class", "C", "eps", "running_mean", "running_var", "warnings"), rows,
                       numeric=(2, 3)))
    return _page(title, body)


def _span(pair: Optional[Sequence[float]]) -> str:
    return "-" if not pair else f"[{pair[0]:.3g}, {pair[1]:.3g}]"


def _range_chart(layers: list[dict[str, Any]], key: str, *, log: bool, label: str) -> str:
    """One vertical segment (min to max over channels) and one point (the max) per layer that has the statistic."""
    spans = [layer.get(key) for layer in layers]
    values = [v for span in spans if span for v in span if math.isfinite(v) and (v > 0 or not log)]
    low = min(values, default=_FLOOR if log else -1.0)
    high = max(values, default=1.0)
    chart = _Chart(len(layers), low, high, log=log, label=label)
    for i, (layer, span) in enumerate(zip(layers, spans)):
        if not span:
            continue
        bad = " bad" if layer.get("warnings") else ""
        x = chart.x(i)
        low_value, high_value = (v if math.isfinite(v) else high for v in span)
        chart.add(f'<line class="range{bad}" x1="{x:.1f}" y1="{chart.y(low_value):.1f}" x2="{x:.1f}" '
                  f'y2="{chart.y(high_value):.1f}"/>')
        warning = "; ".join(layer.get("warnings", {}).values())
        chart.add(f'<circle class="point{bad}" cx="{x:.1f}" cy="{chart.y(high_value):.1f}" r="2.5"><title>'
                  f'{_text(layer["names"][0])} ({_text(layer["kind"])}): {key} {_text(_span(span))}'
                  f'{_text("; " + warning) if warning else ""}</title></circle>')
    return chart.svg()


def write_page(path: Union[str, "os.PathLike[str]"], page: str, *, overwrite: bool = False) -> Path:
    """Write ``page`` to ``path`` atomically (:func:`normswap.checkpoint.atomic.atomic_write`); returns the path.

    Raises:
        OutputError: the file exists (and not ``overwrite``) or cannot be written.
    """
    from .checkpoint.atomic import atomic_write

    return atomic_write(path, lambda temporary: temporary.write_text(page, encoding="utf-8"), overwrite=overwrite)
