"""Looking through the wrappers a training loop puts around a model, so that every operation sees the model itself.

``torch.compile`` (``OptimizedModule``), ``DistributedDataParallel`` and ``DataParallel``, timm's ``ModelEma``,
``ModelEmaV2`` and ``ModelEmaV3`` and ``torch.optim.swa_utils.AveragedModel`` hold the model they wrap; normswap's
operations (plan, convert, fold, fit, recalibrate, refine, compare, inspect, their reports, and save) work on that
model, through any number of wrappers. Wrapper classes are recognised by type; timm and ``swa_utils`` are never
imported for it (a wrapper of theirs exists only once they are).

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

__all__ = ["unwrap_model", "unwrapped"]

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
