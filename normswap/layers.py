"""normswap's own normalization layers.

- :class:`FrozenBatchNorm`: BatchNorm with fixed statistics, for inputs of any rank (``(N, C)``, ``(N, C, L)``,
  ``(N, C, H, W)``, ``(N, C, D, H, W)``). Its buffers have BatchNorm's names, so a BatchNorm state dict loads into it.
- :class:`FrozenBatchNormAct`: the same with a fused activation and drop path, the frozen twin of timm's
  ``BatchNormAct2d`` (``drop`` then ``act``, as timm orders them).
- :class:`BatchNorm`: a rank-agnostic trainable BatchNorm, used when the rank a layer was converted from is unknown.

Example::

    >>> import torch
    >>> bn = torch.nn.BatchNorm2d(8).eval()
    >>> frozen = FrozenBatchNorm(8, eps=bn.eps, rank=2)
    >>> frozen.load_state_dict(bn.state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(2, 8, 4, 4)
    >>> torch.allclose(frozen(x), bn(x))
    True
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BatchNorm", "FrozenBatchNorm", "FrozenBatchNormAct"]


class FrozenBatchNorm(nn.Module):
    """BatchNorm with frozen statistics: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    Train mode and eval mode compute the same thing and never change the statistics. With
    ``trainable_affine=True`` the affine ``weight`` and ``bias`` are parameters (the usual "freeze the statistics,
    fine-tune everything else" setup for small batches); otherwise they are buffers too.

    fp32/fp64 inputs run BatchNorm's own eval kernel (as fast as ``nn.BatchNorm2d.eval()``); fp16/bf16 inputs are
    scaled by a per-channel scale and shift computed in fp32, so ``running_var + eps`` never rounds in half precision.

    Args:
        num_features: channels ``C`` of the ``(N, C, ...)`` input.
        eps: added to the variance; must be positive.
        rank: spatial rank of the layer it was made from (1, 2, 3), or ``None`` if unknown. Used to convert back.
        trainable_affine: make ``weight`` and ``bias`` parameters instead of buffers.
    """

    rank: Optional[int]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        rank: Optional[int] = None,
        trainable_affine: bool = False,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.rank = rank
        self.trainable_affine = trainable_affine
        weight = torch.ones(num_features, **factory)
        bias = torch.zeros(num_features, **factory)
        if trainable_affine:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input, got {x.dim()}D")
        dtype = self.running_var.dtype
        if x.dtype == dtype and (dtype == torch.float32 or dtype == torch.float64):
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        scale = self.weight.to(compute) * torch.rsqrt(self.running_var.to(compute) + self.eps)
        shift = self.bias.to(compute) - self.running_mean.to(compute) * scale
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * scale.to(x.dtype).reshape(shape) + shift.to(x.dtype).reshape(shape)

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        if self.rank is not None:
            text += f", rank={self.rank}"
        if self.trainable_affine:
            text += ", trainable_affine=True"
        return text


class FrozenBatchNormAct(FrozenBatchNorm):
    """:class:`FrozenBatchNorm` followed by ``drop`` and ``act`` modules, like timm's ``BatchNormAct2d``.

    ``act`` and ``drop`` default to ``nn.Identity``; conversions set them to the source layer's own modules.

    Example::

        >>> layer = FrozenBatchNormAct(4, act=torch.nn.ReLU())
        >>> bool((layer(torch.randn(2, 4, 3, 3)) >= 0).all())
        True
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        act: Optional[nn.Module] = None,
        drop: Optional[nn.Module] = None,
        rank: Optional[int] = None,
        trainable_affine: bool = False,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            num_features, eps, rank=rank, trainable_affine=trainable_affine, device=device, dtype=dtype
        )
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """Trainable BatchNorm that accepts any ``(N, C, ...)`` input, for layers whose original rank is unknown.

    Example::

        >>> bn = BatchNorm(3)
        >>> bn(torch.randn(4, 3)).shape, bn(torch.randn(4, 3, 5, 5)).shape
        (torch.Size([4, 3]), torch.Size([4, 3, 5, 5]))
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input, got {input.dim()}D")
