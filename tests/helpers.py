"""Helpers shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def randomize_norm_layers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial running statistics and affine values, so conversion mistakes show.

    Freshly initialised BatchNorm has mean 0, var 1, weight 1, bias 0: a conversion that forgot the statistics or
    the affine values would still produce the right output on it.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, low, high in (("running_mean", -0.5, 0.5), ("running_var", 0.5, 2.0),
                                    ("weight", 0.5, 1.5), ("bias", -0.3, 0.3)):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1 and tensor.is_floating_point() \
                        and _is_norm(module):
                    tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=gen))
    return model


def _is_norm(module: nn.Module) -> bool:
    from normswap.targets import is_norm_layer

    return is_norm_layer(module)
