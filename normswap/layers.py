"""normswap's own normalization layers.

- :class:`FrozenBatchNorm`: BatchNorm with fixed statistics, for inputs of any rank (``(N, C)``, ``(N, C, L)``,
  ``(N, C, H, W)``, ``(N, C, D, H, W)``). Its buffers have BatchNorm's names, so a BatchNorm state dict loads into it.
- :class:`FrozenBatchNormAct`: the same with a fused activation and drop path, the frozen twin of timm's
  ``BatchNormAct2d`` (``drop`` then ``act``, as timm orders them).
- :class:`BatchNorm`: a rank-agnostic trainable BatchNorm, used when the rank a layer was converted from is unknown.
- :class:`FoldedAct`: what stays of a norm layer with a fused activation once its normalization is folded into the
  convolution before it: the activation (and drop path).

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

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import NormswapError

__all__ = ["BatchNorm", "FoldedAct", "FrozenBatchNorm", "FrozenBatchNormAct"]


class FrozenBatchNorm(nn.Module):
    """BatchNorm with frozen statistics: ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias``.

    Train mode and eval mode compute the same thing and never change the statistics. With
    ``trainable_affine=True`` the affine ``weight`` and ``bias`` are parameters (the usual "freeze the statistics,
    fine-tune everything else" setup for small batches); otherwise they are buffers too.

    Every input runs BatchNorm's own eval kernel (as fast as ``nn.BatchNorm2d.eval()``). fp16/bf16 inputs get the
    statistics and affine values in fp32 (a half-precision model's are upcast), so the kernel computes the per-channel
    scale and the result in fp32 and rounds once: ``running_var + eps`` never rounds, underflows or overflows in half
    precision, and ``(x - mean)`` does not cancel in it.

    Args:
        num_features: channels ``C`` of the ``(N, C, ...)`` input.
        eps: added to the variance; must be positive.
        rank: spatial rank of the layer it was made from (1, 2, 3), or ``None`` if unknown. Used to convert back.
        trainable_affine: make ``weight`` and ``bias`` parameters instead of buffers.
        bias: ``False`` for a layer without a shift (``bias`` is ``None``, as in ``nn.BatchNorm2d(C, bias=False)``,
            whose state dict then loads as it is).
    """

    rank: Optional[int]

    _version = 2
    """State-dict layout. 2: ``weight``, ``bias`` (absent for a layer built with ``bias=False``), ``running_mean``,
    ``running_var``, with BatchNorm's names, so that a BatchNorm state dict (also version 2) loads as it is; a
    BatchNorm's ``num_batches_tracked`` is dropped. A later layout raises its number and upgrades the older ones in
    :meth:`_load_from_state_dict`."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        *,
        rank: Optional[int] = None,
        trainable_affine: bool = False,
        bias: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if eps <= 0:
            raise NormswapError(f"eps must be positive, got {eps}")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = float(eps)
        self.rank = rank
        self.trainable_affine = trainable_affine
        weight = torch.ones(num_features, **factory)
        shift = torch.zeros(num_features, **factory) if bias else None
        if trainable_affine:
            self.weight = nn.Parameter(weight)
            self.register_parameter("bias", None if shift is None else nn.Parameter(shift))
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", shift)
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
        version = local_metadata.get("version")
        if version is not None and version > self._version:
            error_msgs.append(f"{prefix or 'the layer'}: state-dict layout {version} is newer than this normswap's "
                              f"FrozenBatchNorm ({self._version}): upgrade normswap")
            return
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize(x)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input, got {x.dim()}D")
        half = x.dtype == torch.float16 or x.dtype == torch.bfloat16
        dtype = torch.float32 if half else x.dtype
        bias = self.bias
        return F.batch_norm(
            x,
            self.running_mean.to(dtype),
            self.running_var.to(dtype),
            self.weight.to(dtype),
            bias.to(dtype) if bias is not None else None,
            False,
            0.0,
            self.eps,
        )

    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}"
        if self.rank is not None:
            text += f", rank={self.rank}"
        if self.trainable_affine:
            text += ", trainable_affine=True"
        if self.bias is None:
            text += ", bias=False"
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
        bias: bool = True,
        device: Any = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__(
            num_features, eps, rank=rank, trainable_affine=trainable_affine, bias=bias, device=device, dtype=dtype
        )
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self._normalize(x)))


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


class FoldedAct(nn.Module):
    """What remains of a norm layer with a fused activation once its normalization is folded: ``act(drop(x))``.

    The submodules keep the names they had in the norm layer, so their parameters (a PReLU's weight) keep their keys.

    >>> FoldedAct(nn.Identity(), nn.ReLU())(torch.tensor([-1.0, 2.0]))
    tensor([0., 2.])
    """

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))
