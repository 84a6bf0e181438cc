"""normswap: swap, freeze, recalibrate and fold the normalization layers of PyTorch models and checkpoints.

The Python API is the product; the ``normswap`` command is a thin shell over it.

>>> import timm, normswap
>>> model = timm.create_model("resnet18")
>>> p = normswap.plan(model, "gn", groups=32)   # what would change, as data
>>> model = p.apply(model)                      # or: normswap.convert(model, "gn", groups=32)
"""

from .errors import (
    ArchitectureError,
    CalibrationError,
    CheckpointError,
    NormswapError,
    OutputError,
    PlanError,
)
from .layers import BatchNorm, FrozenBatchNorm, FrozenBatchNormAct
from .plan import Plan, PlanRow, SkippedLayer, choose_groups, convert, freeze, plan

__version__ = "0.1.0"

__all__ = [
    "ArchitectureError",
    "BatchNorm",
    "CalibrationError",
    "CheckpointError",
    "FrozenBatchNorm",
    "FrozenBatchNormAct",
    "NormswapError",
    "OutputError",
    "Plan",
    "PlanError",
    "PlanRow",
    "SkippedLayer",
    "choose_groups",
    "convert",
    "freeze",
    "plan",
]
