"""The records a conversion plan is made of: one :class:`PlanRow` per layer that changes, one :class:`SkippedLayer`
per norm layer left alone.

They are plain data, kept apart from :mod:`normswap.plan` (which computes them) so that the layers below the
operations (the target builders in :mod:`normswap.targets`) and the operations beside it (:mod:`normswap.fit`) can
name them without importing an operation. ``normswap.PlanRow`` and ``normswap.plan.PlanRow`` are these classes.

>>> row = PlanRow(names=["bn1"], source="torch.nn.modules.batchnorm.BatchNorm2d", target="gn",
...               target_class="torch.nn.modules.normalization.GroupNorm", channels=64, groups=32, rank=2, eps=1e-5,
...               affine="copy", stats="drop")
>>> row.name, SkippedLayer(["fc.bn"], row.source, "not matched by include").reason
('bn1', 'not matched by include')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["PlanRow", "SkippedLayer"]


@dataclass
class PlanRow:
    """One layer that changes. ``names`` lists every qualified name of the (possibly shared) module."""

    names: list[str]
    source: str
    target: str
    target_class: str
    channels: int
    groups: Optional[int]
    rank: Optional[int]
    eps: float
    affine: str
    stats: str
    act: Optional[str] = None
    trainable_affine: bool = False
    note: str = ""

    @property
    def name(self) -> str:
        """The layer's first qualified name."""
        return self.names[0]


@dataclass
class SkippedLayer:
    """One norm layer the plan leaves as it is, and why."""

    names: list[str]
    source: str
    reason: str
