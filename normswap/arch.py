"""Architecture specs: the recipe for building a model's module tree before its weights are loaded.

A spec is a name and keyword arguments. The name is a timm model name (``resnet50``, built with
``pretrained=False``) or an import path ``package.module:callable`` (``torchvision.models:resnet50``,
``normswap.demo:DigitsResNet``) called with the keyword arguments. A spec round-trips through JSON, so a
checkpoint written by normswap carries the spec it needs to be rebuilt.

Example::

    >>> spec = ArchSpec.parse("resnet18", {"num_classes": 10})
    >>> str(spec), spec.to_dict()
    ('resnet18(num_classes=10)', {'name': 'resnet18', 'kwargs': {'num_classes': 10}})
    >>> model = spec.build(device="meta")     # module tree only: no memory for weights, no random init
    >>> model.fc.weight.shape, model.fc.weight.device.type
    (torch.Size([10, 512]), 'meta')
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .errors import ArchitectureError, NormswapError
from .history import set_arch

__all__ = ["ArchSpec", "WEIGHT_KWARGS", "WELL_KNOWN_MODULES"]

WEIGHT_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "weights",
                 "weights_backbone")
"""Keyword arguments that would make a builder fetch or read weights; the checkpoint supplies them instead."""

WELL_KNOWN_MODULES = ("torchvision.models", "normswap")
"""Packages whose callables normswap builds on a checkpoint file's word alone (timm names are always built)."""

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_TIMM_NAME = re.compile(r"^[\w][\w.\-]*$")


@dataclass
class ArchSpec:
    """A model architecture: ``name`` (timm model name or ``package.module:callable``) and its ``kwargs``."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, kwargs: Optional[dict[str, Any]] = None) -> "ArchSpec":
        """Check and build a spec from its name and keyword arguments.

        >>> ArchSpec.parse("torchvision.models:resnet50").is_import_path
        True
        """
        text = text.strip() if isinstance(text, str) else text
        if not isinstance(text, str) or not text:
            raise ArchitectureError("the architecture name is empty: give a timm model name or package.module:callable")
        if ":" in text and not _IMPORT_PATH.match(text):
            raise ArchitectureError(
                f"'{text}' is not a valid import path: write it as package.module:callable "
                "(for example torchvision.models:resnet50)"
            )
        if ":" not in text and not _TIMM_NAME.match(text):
            raise ArchitectureError(
                f"'{text}' is not a valid architecture name: give a timm model name (resnet50) or "
                "package.module:callable"
            )
        kwargs = {} if kwargs is None else kwargs
        if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
            raise ArchitectureError(
                f"architecture keyword arguments must be a mapping of names to values, got {kwargs!r}"
            )
        weights = [key for key in kwargs if key in WEIGHT_KWARGS]
        if weights:
            raise ArchitectureError(
                f"normswap builds the architecture without weights (the checkpoint supplies them): drop '{weights[0]}'"
            )
        try:
            json.dumps(kwargs)
        except (TypeError, ValueError):
            raise ArchitectureError(
                f"architecture keyword arguments must be JSON values (numbers, strings, lists, dicts): {kwargs!r}"
            ) from None
        return cls(text, dict(kwargs))

    @classmethod
    def from_dict(cls, data: Union[dict[str, Any], str]) -> "ArchSpec":
        """The spec :meth:`to_dict` wrote (a bare name string is accepted too)."""
        if isinstance(data, str):
            return cls.parse(data)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ArchitectureError(f"not an architecture spec: {data!r}")
        return cls.parse(data["name"], data.get("kwargs") or {})

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "kwargs": {...}}``, JSON-serialisable."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    def __str__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name

    @property
    def is_import_path(self) -> bool:
        """True for ``package.module:callable``, False for a timm model name."""
        return ":" in self.name

    @property
    def is_well_known(self) -> bool:
        """True if building this spec imports only timm, torchvision's model zoo or normswap itself.

        A checkpoint file's metadata may name any import path; normswap builds only well-known ones unless the user
        names the architecture, since importing a module runs its code.

        >>> ArchSpec("resnet50").is_well_known, ArchSpec("mypackage.nets:Net").is_well_known
        (True, False)
        """
        if not self.is_import_path:
            return True
        module = self.name.partition(":")[0]
        return any(module == root or module.startswith(root + ".") for root in WELL_KNOWN_MODULES)

    def build(self, device: Union[str, torch.device, None] = None) -> nn.Module:
        """Build the model; ``device="meta"`` builds the module tree without allocating or initialising weights.

        The spec is recorded on the model (:func:`normswap.history.get_arch`).

        Raises:
            ArchitectureError: the name is unknown, the import fails, or building fails (the message says why).
        """
        factory = self._factory()
        try:
            if device is None:
                model = factory(**self.kwargs)
            else:
                with torch.device(device):
                    model = factory(**self.kwargs)
        except NormswapError:
            raise
        except Exception as exc:
            raise ArchitectureError(f"building {self} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise ArchitectureError(f"{self.name} returned a {type(model).__name__}, not a torch.nn.Module")
        set_arch(model, self.to_dict())
        return model

    def _factory(self) -> Callable[..., Any]:
        if self.is_import_path:
            return _import_callable(self.name)
        import timm

        if not timm.is_model(self.name):
            close = difflib.get_close_matches(self.name, timm.list_models(), n=3, cutoff=0.75)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ArchitectureError(
                f"unknown architecture '{self.name}': not a timm model name{hint}; "
                "an import path looks like torchvision.models:resnet50"
            )

        def create(**kwargs: Any) -> nn.Module:
            return timm.create_model(self.name, pretrained=False, **kwargs)

        return create


def _import_callable(path: str) -> Callable[..., Any]:
    module_name, _, attr_path = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"cannot import '{module_name}' for architecture '{path}': {exc}") from None
    except Exception as exc:
        raise ArchitectureError(
            f"importing '{module_name}' for architecture '{path}' failed: {type(exc).__name__}: {_first_line(exc)}"
        ) from exc
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise ArchitectureError(f"'{module_name}' has no '{attr_path}' (architecture '{path}')")
        target = getattr(target, part)
    if not callable(target):
        raise ArchitectureError(f"'{path}' is a {type(target).__name__}, not a callable that builds a model")
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
