"""normswap: swap, freeze, recalibrate and fold the normalization layers of PyTorch models and checkpoints.

The Python API is the product; the ``normswap`` command is a thin shell over it.

>>> import timm, normswap
>>> model = timm.create_model("resnet18")
>>> p = normswap.plan(model, "gn", groups=32)   # what would change, as data
>>> model = p.apply(model)                      # or: normswap.convert(model, "gn", groups=32)

The names below are imported on first use, so that ``import normswap`` (and ``normswap --help``) does not wait for
torch: ``normswap.convert`` is ``normswap.api.convert`` once asked for. A public function and the module it lives
in may share a name (``fold``, ``compare``, ``plan``, ``refine``, ``recalibrate``): the package attribute is always
the function; the module is ``sys.modules["normswap.fold"]`` (``from normswap.fold import ...`` works as usual).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS: dict[str, str] = {
    "ArchSpec": "arch",
    "load": "checkpoint",
    "load_checkpoint": "checkpoint",
    "read_metadata": "checkpoint",
    "save": "checkpoint",
    "ComparisonReport": "compare",
    "compare": "compare",
    "ArchitectureError": "errors",
    "CalibrationError": "errors",
    "CheckpointError": "errors",
    "NormswapError": "errors",
    "OutputError": "errors",
    "PlanError": "errors",
    "RefineError": "errors",
    "identify": "checkpoint.identity",
    "FitReport": "fit",
    "fit_report": "fit",
    "FoldPlan": "fold",
    "fold": "fold",
    "fold_weights": "fold",
    "plan_fold": "fold",
    "BatchNorm": "layers",
    "FrozenBatchNorm": "layers",
    "FrozenBatchNormAct": "layers",
    "Plan": "plan",
    "PlanRow": "plan",
    "SkippedLayer": "plan",
    "choose_groups": "plan",
    "convert": "api",
    "freeze": "api",
    "plan": "plan",
    "CalibrationReport": "recalibrate",
    "calibration_report": "recalibrate",
    "recalibrate": "recalibrate",
    "Recipe": "recipe",
    "RefineReport": "refine",
    "refine": "refine",
    "refine_report": "refine",
    "register_layer": "registry",
}
"""Every public name and the module (under ``normswap.``) that defines it."""

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .api import convert, freeze
    from .arch import ArchSpec
    from .checkpoint import load, load_checkpoint, read_metadata, save
    from .checkpoint.identity import identify
    from .compare import ComparisonReport, compare
    from .errors import (ArchitectureError, CalibrationError, CheckpointError, NormswapError, OutputError, PlanError,
                         RefineError)
    from .fit import FitReport, fit_report
    from .fold import FoldPlan, fold, fold_weights, plan_fold
    from .layers import BatchNorm, FrozenBatchNorm, FrozenBatchNormAct
    from .plan import Plan, PlanRow, SkippedLayer, choose_groups, plan
    from .registry import register_layer
    from .recalibrate import CalibrationReport, calibration_report, recalibrate
    from .recipe import Recipe
    from .refine import RefineReport, refine, refine_report


def __getattr__(name: str) -> Any:
    """Import a public name on first use (see the module docstring)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'normswap' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module: importing a submodule named like a public function (``normswap.fold``) does not
    replace the function with the module, as the import system otherwise would."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
