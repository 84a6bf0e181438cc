"""Looking through the wrappers a training loop puts around a model, so that every operation sees the model itself.

``torch.compile`` (``OptimizedModule``), ``DistributedDataParallel`` and ``DataParallel``, timm's ``ModelEma``,
``ModelEmaV2`` and ``ModelEmaV3`` and ``torch.optim.swa_utils.AveragedModel`` hold the model they wrap; normswap's
operations (plan, convert, fold, fit, recalibrate, refine, compare, inspect, their reports, and save) work on that
model, through any number of wrappers. Wrapper classes are recognised by type; timm and ``swa_utils`` are never
imported for it (a wrapper of theirs exists only once they are). An operation that changes the module tree (convert,
fold) refuses a model inside ``DistributedDataParallel``, which keeps the parameters it was built with
(:func:`unwrapped_to_change`).

Example::

    >>> import torch
    >>> inner = torch.nn.Linear(2, 2)
    >>> unwrapped(torch.nn.DataParallel(inner)) is inner
    True
"""

from __future__ import annotations

import sys
from typing import Optional

from torch import nn

from .errors import PlanError

__all__ = ["unwrap_model", "unwrapped", "unwrapped_to_change"]

_EMA_WRAPPERS = ("ModelEma", "ModelEmaV2", "ModelEmaV3")


def _inner(module: nn.Module) -> Optional[nn.Module]:
    """The model a wrapper holds, or ``None`` if ``module`` is not a wrapper normswap knows."""
    cls = type(module)
    if cls.__name__ == "OptimizedModule" and isinstance(module._modules.get("_orig_mod"), nn.Module):
        return module._modules["_orig_mod"]
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    swa = sys.modules.get("torch.optim.swa_utils")
    if swa is not None and isinstance(module, swa.AveragedModel):
        return module.module
    ema = sys.modules.get("timm.utils.model_ema")
    if ema is not None and cls.__name__ in _EMA_WRAPPERS and isinstance(module, getattr(ema, cls.__name__, ())):
        return module.module
    return None


def unwrap_model(model: nn.Module) -> list[nn.Module]:
    """The chain from ``model`` through the wrappers it is in to the model they wrap (last).

    >>> inner = nn.Linear(2, 2)
    >>> chain = unwrap_model(nn.DataParallel(inner))
    >>> len(chain), chain[-1] is inner
    (2, True)
    """
    chain = [model]
    while (inner := _inner(chain[-1])) is not None:
        chain.append(inner)
    return chain


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside every wrapper around ``model`` (``model`` itself if it is not wrapped).

    >>> layer = nn.BatchNorm1d(2)
    >>> unwrapped(layer) is layer
    True
    """
    return unwrap_model(model)[-1]


def unwrapped_to_change(model: nn.Module, operation: str) -> nn.Module:
    """The model inside every wrapper around ``model``, for an ``operation`` that replaces its layers.
    ``DistributedDataParallel`` keeps the parameters (and their gradient buckets) it was built with, so a model in
    it is refused with :class:`~normswap.errors.PlanError`: change the model first, then wrap it.

    >>> unwrapped_to_change(nn.DataParallel(nn.Linear(2, 2)), "convert")
    Linear(in_features=2, out_features=2, bias=True)
    """
    chain = unwrap_model(model)
    if any(isinstance(wrapper, nn.parallel.DistributedDataParallel) for wrapper in chain):
        raise PlanError(f"cannot {operation} a model inside DistributedDataParallel, which keeps the parameters it "
                        f"was built with: {operation} the model first, then wrap it (or pass ddp.module and wrap "
                        "it again)")
    return chain[-1]
