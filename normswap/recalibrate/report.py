"""The report of one recalibration run, as the model's history stores it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from torch import nn

from ..history import required_step

__all__ = ["CalibrationReport", "calibration_report"]


@dataclass
class CalibrationReport:
    """What one :func:`~normswap.recalibrate.recalibrate` run did.

    ``calibrated`` names the layers that got new statistics and ``no_data`` those the data never reached (they keep
    their old statistics), each by its first qualified name, in forward order where known. ``skipped`` maps the
    BatchNorm-like layers that recalibration leaves alone to the reason. ``batches`` and ``samples`` count the
    calibration data over all processes, ``passes`` the passes of the model over it, ``world_size`` the processes.
    ``forward_cost`` is what those passes cost, in full forward passes over the data: the exact method runs one;
    the sequential method runs each batch's forward once, in step with the others (1.0), plus one forward of the
    first batch and a second run when a layer turns out to be called several times per forward.
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
    """The report of the last :func:`~normswap.recalibrate.recalibrate` run on ``model``, read from its history.

    >>> import torch
    >>> from normswap.recalibrate import recalibrate
    >>> model = recalibrate(torch.nn.BatchNorm1d(3), [torch.randn(5, 3)])
    >>> calibration_report(model).samples
    5
    """
    return CalibrationReport.from_dict(required_step(
        model, "recalibrate", "this model has not been recalibrated: run normswap.recalibrate(model, data)"))
