"""The layers being calibrated and their float64 statistics: count, mean and M2 per channel, merged exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..errors import CalibrationError
from ..targets import classify, is_norm_layer
from ..walk import find_modules

_SKIP_REASONS = {
    "frozen": "frozen BatchNorm: its statistics are fixed by design (convert it to 'bn' to recalibrate it)",
    "unknown": "a BatchNorm subclass normswap does not know: its forward may not use the running statistics",
    "lazy": "a lazy BatchNorm that has not been initialized yet",
}
"""Why a BatchNorm-like layer of each family is left alone."""
_NO_STATISTICS = "no running statistics: it always normalizes with batch statistics"


class Moments:
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
        if self.count == 0:  # the first group: taken as it is
            self.count = count
            self.mean.copy_(mean)
            self.m2.copy_(m2)
            if m2_scale != 1.0:
                self.m2.mul_(m2_scale)
            return
        total = self.count + count
        mean, m2 = mean.to(self.mean.device), m2.to(self.mean.device)
        delta = mean - self.mean
        self.mean.add_(delta, alpha=count / total)
        self.m2.add_(m2, alpha=m2_scale)
        self.m2.addcmul_(delta, delta, value=self.count * count / total)
        self.count = total

    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.mean).all() & torch.isfinite(self.m2).all()


@dataclass(eq=False)
class Layer:
    """One BatchNorm layer being calibrated, with all its names and its accumulated statistics."""

    module: nn.Module
    names: list[str]
    moments: Optional[Moments] = None
    pending: list[tuple[int, torch.Tensor, torch.Tensor, bool]] = field(default_factory=list)
    """Inputs measured but not yet merged (:func:`add_input_statistics`): ``(values per row, row means, row M2,
    False)``, or ``(values per row, row means, row reciprocal standard deviations, True)`` from GroupNorm's kernel.
    A row is one sample's channels (``[N, C]``) or the whole input's (``[C]``)."""

    @property
    def name(self) -> str:
        return self.names[0]

    def reset(self, device: torch.device) -> None:
        self.moments = Moments(self.module.num_features, device)
        self.pending = []


def find_layers(model: nn.Module) -> tuple[list[Layer], dict[str, str]]:
    """The layers to calibrate, in definition order, and the BatchNorm-like layers left alone with the reason."""
    layers, skipped = [], {}
    for found in find_modules(model, is_norm_layer):
        kind = classify(found.module)
        if kind.family == "gn":
            continue
        if not kind.calibratable:
            skipped[found.names[0]] = _SKIP_REASONS[kind.family]
        elif found.module.running_mean is None or found.module.running_var is None:
            skipped[found.names[0]] = _NO_STATISTICS
        else:
            layers.append(Layer(found.module, found.names))
    return layers, skipped


def use_scratch_statistics(layer: Layer, *, keep_values: bool) -> None:
    """Give a layer temporary ``running_mean`` / ``running_var`` / ``num_batches_tracked`` tensors (copies of the
    current values, or placeholders) so that nothing the run does reaches the originals."""
    buffers = layer.module._buffers
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        if buffers.get(name) is not None:
            buffers[name] = buffers[name].clone() if keep_values else torch.zeros_like(buffers[name])


def values_per_channel(x: torch.Tensor) -> int:
    return x.numel() // x.shape[1] if x.dim() >= 2 and x.shape[1] else 0


ROWWISE_MIN_VALUES = 128
"""From this many values per sample and channel on, a contiguous CPU input is measured sample by sample with
GroupNorm's one-pass moments kernel (one group per channel); below, or elsewhere, in two passes over the channels."""


def add_input_statistics(layer: Layer, x: torch.Tensor) -> None:
    """Measure one input of ``layer``: per-channel means and sums of squared deviations (never ``E[x²] - E[x]²``),
    kept in ``layer.pending`` until :func:`merge_pending` merges them in float64. Nothing of the activation is kept.

    A contiguous float32/float64 CPU input with at least :data:`ROWWISE_MIN_VALUES` values per sample and channel is
    measured per sample and channel by GroupNorm's kernel (one read for the moments, with C groups; on CPU about
    1.3-1.7x a BatchNorm eval pass, where two passes cost 1.8-2.4x), and only the kernel runs here: its means and
    reciprocal deviations become float64 moments when :func:`merge_pending` merges every arrival at once; otherwise
    the mean is taken first and the squares of the centered values second, accumulated in float32 (float64 for
    float64 inputs)."""
    count = values_per_channel(x)
    if count == 0:
        return
    channels = x.shape[1]
    if count == 1:
        value = x.reshape(1, channels).clone()  # a copy: the model may change its input in place later
        layer.pending.append((1, value, torch.zeros_like(value), False))
        return
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    per_sample = count // x.shape[0]
    if x.device.type == "cpu" and per_sample >= ROWWISE_MIN_VALUES and x.is_contiguous():
        _, mean, rstd = torch.native_group_norm(x, None, None, x.shape[0], channels, per_sample, channels, 0.0)
        layer.pending.append((per_sample, mean, rstd, True))
        return
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims)
    centered = x - mean.view([1, -1] + [1] * (x.dim() - 2))
    layer.pending.append((count, mean, centered.mul_(centered).sum(dims), False))


def merge_pending(layer: Layer) -> None:
    """Merge the inputs :func:`add_input_statistics` measured into ``layer.moments``: every row's count, mean and
    M2 in float64, the rows' means combined in two passes (their mean first, then their squared deviations)."""
    if not layer.pending:
        return
    pending, layer.pending = layer.pending, []
    moments = layer.moments
    device, channels = moments.mean.device, moments.mean.shape[0]
    means = torch.cat([mean.reshape(-1) for _, mean, _, _ in pending]).to(device, torch.float64).view(-1, channels)
    spreads = torch.cat([spread.reshape(-1) for _, _, spread, _ in pending]).to(device, torch.float64)
    spreads = spreads.view(-1, channels)
    if len({(count, rstd) for count, _, _, rstd in pending}) == 1:  # the common case: every row measured alike
        count, rstd = pending[0][0], pending[0][3]
        if rstd:  # M2 = n / rstd² where GroupNorm's kernel measured the rows
            spreads = count / spreads.square()
        between, mean = torch.var_mean(means, 0, correction=0)  # (of the rows' means, in float64)
        rows = means.shape[0]
        moments.add(count * rows, mean, spreads.sum(0).add_(between, alpha=count * rows))
        return
    rows = [(count, rstd) for count, mean, _, rstd in pending for _ in range(mean.numel() // channels)]
    counts = [count for count, _ in rows]
    measured = [rstd for _, rstd in rows]
    if any(measured):
        per_row = torch.tensor(counts, dtype=torch.float64, device=device).view(-1, 1)
        spreads = torch.where(torch.tensor(measured, device=device).view(-1, 1), per_row / spreads.square(), spreads)
    weights = torch.tensor(counts, dtype=torch.float64, device=device)
    total = sum(counts)
    mean = weights @ means / total
    deviation = means - mean
    moments.add(total, mean, spreads.sum(0) + weights @ (deviation * deviation))


def check_finite(layers: list[Layer]) -> None:
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


def final_statistics(layers: list[Layer]) -> dict[Layer, tuple[torch.Tensor, torch.Tensor]]:
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
