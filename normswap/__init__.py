"""normswap: swap, freeze, recalibrate and fold the normalization layers of PyTorch models and checkpoints.

The Python API is the product; the ``normswap`` command is a thin shell over it.

>>> import timm, normswap
>>> model = timm.create_model("resnet18")
>>> p = normswap.plan(model, "gn", groups=32)   # what would change, as data
>>> model = p.apply(model)                      # or: normswap.convert(model, "gn", groups=32)
"""

import sys

from ._version import __version__
from .api import convert, freeze
from .arch import ArchSpec
from .checkpoint import load, load_checkpoint, read_metadata, save
from .compare import ComparisonReport, compare
from .deprecation import moved
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

# the façade used to live in normswap.plan: its old names keep working, with a DeprecationWarning
_api, _plan = sys.modules[f"{__name__}.api"], sys.modules[f"{__name__}.plan"]
for _old, _new in (("convert", "normswap.convert"), ("freeze", "normswap.freeze"),
                   ("apply_conversion", "normswap.api.apply_conversion")):
    setattr(_plan, _old, moved(getattr(_api, _old), f"normswap.plan.{_old}", _new))
del _api, _plan, _old, _new, sys, moved

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
