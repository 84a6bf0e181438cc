"""normswap: swap, freeze, recalibrate and fold the normalization layers of PyTorch models and checkpoints.

The Python API is the product; the ``normswap`` command is a thin shell over it.

>>> import timm, normswap
>>> model = timm.create_model("resnet18")
>>> p = normswap.plan(model, "gn", groups=32)   # what would change, as data
>>> model = p.apply(model)                      # or: normswap.convert(model, "gn", groups=32)
"""

from ._version import __version__
from .api import convert, freeze
from .arch import ArchSpec
from .checkpoint import load, load_checkpoint, read_metadata, save
from .compare import ComparisonReport, compare
from .errors import (
    ArchitectureError,
    CalibrationError,
    CheckpointError,
    NormswapError,
    OutputError,
    PlanError,
    RefineError,
)
from .fit import FitReport, fit_report
from .fold import FoldPlan, fold, fold_weights, plan_fold
from .layers import BatchNorm, FrozenBatchNorm, FrozenBatchNormAct
from .plan import Plan, PlanRow, SkippedLayer, choose_groups, plan
from .recalibrate import CalibrationReport, calibration_report, recalibrate
from .recipe import Recipe
from .refine import RefineReport, refine, refine_report

__all__ = [
    "ArchSpec",
    "ArchitectureError",
    "BatchNorm",
    "CalibrationError",
    "CalibrationReport",
    "CheckpointError",
    "ComparisonReport",
    "FitReport",
    "FoldPlan",
    "FrozenBatchNorm",
    "FrozenBatchNormAct",
    "NormswapError",
    "OutputError",
    "Plan",
    "PlanError",
    "PlanRow",
    "Recipe",
    "RefineError",
    "RefineReport",
    "SkippedLayer",
    "calibration_report",
    "choose_groups",
    "compare",
    "convert",
    "fit_report",
    "fold",
    "fold_weights",
    "freeze",
    "load",
    "load_checkpoint",
    "plan",
    "plan_fold",
    "read_metadata",
    "recalibrate",
    "refine",
    "refine_report",
    "save",
]
