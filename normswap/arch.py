"""Architecture specs: how to build a model's module tree before its weights are loaded, and who may say so.

A spec is a name and keyword arguments. normswap builds three kinds of names on its own, the *registered builders*:

- a timm model name (``resnet50``), built with ``timm.create_model(name, pretrained=False, **kwargs)``;
- a torchvision model name written ``torchvision.models:NAME`` (or ``torchvision.models.detection:NAME``...) where
  ``NAME`` is in ``torchvision.models.list_models()``, built with ``torchvision.models.get_model(NAME,
  weights=None, weights_backbone=None, **kwargs)``;
- a Hugging Face transformers model class written ``transformers:CLASS``
  (``transformers:ResNetForImageClassification``), whose keyword arguments are its configuration
  (``config.to_diff_dict()``), built with ``CLASS(config)``: no hub, no remote code (transformers is optional);
- normswap's own demo model, ``normswap.demo:DigitsResNet``.

Any other name is an import path ``package.module:callable`` (``monai.networks.nets:UNet``). Importing it runs its
code, so it is built only when the user typed it: a spec the user gives (``ArchSpec.parse``, ``--arch``) may be
built; a spec read from a file (``ArchSpec.from_dict``, ``from_file=True``) is data, and building it raises an
:class:`~normswap.errors.ArchitectureError` with the exact option that would build it. The callable must be
defined in the package it is imported from (see :mod:`normswap.imports`).

No builder downloads weights: the checkpoint supplies them. Keyword arguments that would fetch weights
(:data:`WEIGHT_KWARGS`) are refused unless ``null``/``false``, and a builder whose signature has such a parameter
with a default that fetches (segmentation_models_pytorch's ``encoder_weights="imagenet"``) gets ``None``.

Example::

    >>> spec = ArchSpec.parse("resnet18", {"num_classes": 10})
    >>> str(spec), spec.to_dict()
    ('resnet18(num_classes=10)', {'name': 'resnet18', 'kwargs': {'num_classes': 10}})
    >>> model = spec.build(device="meta")     # module tree only: no memory for weights, no random init
    >>> model.fc.weight.shape, model.fc.weight.device.type
    (torch.Size([10, 512]), 'meta')
    >>> ArchSpec.from_dict({"name": "os:system", "kwargs": {"command": "true"}}).build()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normswap.errors.ArchitectureError: this file was built with os:system(command='true'), ...: pass --arch os:system...
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from . import imports
from .errors import ArchitectureError, NormswapError
from .history import set_arch
from .offline import no_downloads

__all__ = ["ArchSpec", "NORMSWAP_BUILDERS", "WEIGHT_KWARGS"]

WEIGHT_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "weights",
                 "weights_backbone", "encoder_weights", "pretrained_backbone")
"""Keyword arguments that would make a builder fetch or read weights: accepted only as ``None`` or ``False``."""

_NO_WEIGHTS = {"pretrained": False, "pretrained_backbone": False, "weights": None, "weights_backbone": None,
               "encoder_weights": None}
"""What an import-path builder gets for a weight parameter whose default would fetch weights."""

NORMSWAP_BUILDERS = ("normswap.demo:DigitsResNet",)
"""normswap's own architectures, built on a file's word like timm and torchvision names."""

_TIMM_NAME = re.compile(r"^[\w][\w.\-]*$")
_TRANSFORMERS_CLASS = re.compile(r"^transformers:[A-Z][A-Za-z0-9]*$")
_SHOWN_VALUE = 40


@dataclass
class ArchSpec:
    """A model architecture: ``name`` and its ``kwargs``; ``from_file`` marks a spec read from a file (data)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    from_file: bool = field(default=False, compare=False, repr=False)

    @classmethod
    def parse(cls, text: str, kwargs: Optional[dict[str, Any]] = None, *, from_file: bool = False) -> "ArchSpec":
        """Check and build a spec from its name and keyword arguments (by default, as the user typed them).

        >>> ArchSpec.parse("torchvision.models:resnet50").is_import_path
        True
        """
        text = text.strip() if isinstance(text, str) else text
        if not isinstance(text, str) or not text:
            raise ArchitectureError("the architecture name is empty: give a timm model name or package.module:callable")
        if ":" in text and not imports.is_import_path(text):
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
        weights = [key for key, value in kwargs.items() if key in WEIGHT_KWARGS and value not in (None, False)]
        if weights:
            raise ArchitectureError(
                f"normswap builds the architecture without weights (the checkpoint supplies them): drop "
                f"'{weights[0]}' or set it to null"
            )
        try:
            json.dumps(kwargs, allow_nan=False)
        except (TypeError, ValueError):
            raise ArchitectureError(
                f"architecture keyword arguments must be JSON values (numbers, strings, lists, dicts): {kwargs!r}"
            ) from None
        kwargs = {key: value for key, value in kwargs.items() if key not in WEIGHT_KWARGS}
        return cls(text, kwargs, from_file)

    @classmethod
    def from_dict(cls, data: Union[dict[str, Any], str]) -> "ArchSpec":
        """The spec :meth:`to_dict` wrote, read from a file: data, built only if it names a registered builder.

        >>> ArchSpec.from_dict({"name": "monai.networks.nets:UNet", "kwargs": {"spatial_dims": 3}}).from_file
        True
        """
        if isinstance(data, str):
            return cls.parse(data, from_file=True)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) \
                or not isinstance(data.get("kwargs", {}), (dict, type(None))) or set(data) - {"name", "kwargs"}:
            raise ArchitectureError(f"not an architecture spec (expected {{'name': ..., 'kwargs': {{...}}}}): {data!r}")
        return cls.parse(data["name"], data.get("kwargs") or {}, from_file=True)

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "kwargs": {...}}``, JSON-serialisable."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    def with_kwargs(self, overrides: Optional[dict[str, Any]]) -> "ArchSpec":
        """This spec with ``overrides`` replacing its keyword arguments key by key (checked like :meth:`parse`).

        >>> ArchSpec.parse("resnet18", {"num_classes": 10, "in_chans": 1}).with_kwargs({"num_classes": 3}).kwargs
        {'num_classes': 3, 'in_chans': 1}
        """
        return ArchSpec.parse(self.name, {**self.kwargs, **(overrides or {})}, from_file=self.from_file)

    def __str__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name

    def short(self) -> str:
        """The spec as text, every keyword argument shown, long values cut.

        >>> ArchSpec.parse("monai.networks.nets:UNet", {"spatial_dims": 3, "channels": list(range(20))}).short()
        'monai.networks.nets:UNet(spatial_dims=3, channels=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1...)'
        """
        shown = []
        for key, value in self.kwargs.items():
            text = repr(value)
            shown.append(f"{key}={text if len(text) <= _SHOWN_VALUE else text[:_SHOWN_VALUE - 3] + '...'}")
        return f"{self.name}({', '.join(shown)})" if shown else self.name

    @property
    def is_import_path(self) -> bool:
        """True for ``package.module:callable``, False for a timm model name."""
        return ":" in self.name

    @property
    def builder(self) -> str:
        """Who builds this spec: ``"timm"``, ``"torchvision"``, ``"transformers"``, ``"normswap"`` (the registered
        builders) or ``"import"`` (an import path, built only when the user typed it).

        >>> [ArchSpec(name).builder for name in ("resnet50", "torchvision.models.detection:fasterrcnn_resnet50_fpn",
        ...                                      "transformers:ResNetModel", "normswap.demo:DigitsResNet",
        ...                                      "monai.networks.nets:UNet")]
        ['timm', 'torchvision', 'transformers', 'normswap', 'import']
        """
        if not self.is_import_path:
            return "timm"
        if self.name in NORMSWAP_BUILDERS:
            return "normswap"
        if _TRANSFORMERS_CLASS.match(self.name):
            return "transformers"
        if _torchvision_name(self.name) is not None:
            return "torchvision"
        return "import"

    @property
    def is_registered(self) -> bool:
        """True if normswap builds this spec on a file's word (timm, torchvision, normswap's demo)."""
        return self.builder != "import"

    def check_buildable(self) -> None:
        """:class:`ArchitectureError` with the option to type, for an import path read from a file."""
        if self.from_file and not self.is_registered:
            raise ArchitectureError(
                f"this file was built with {self.short()}, which normswap does not import on a file's word "
                f"(importing runs code): pass --arch {self.name} (arch='{self.name}') to build it"
            )

    def build(self, device: Union[str, torch.device, None] = None) -> nn.Module:
        """Build the model; ``device="meta"`` builds the module tree without allocating or initialising weights.

        The spec is recorded on the model (:func:`normswap.history.get_arch`).

        Raises:
            ArchitectureError: the spec came from a file and is not a registered builder, the name is unknown, the
                import fails, or building fails (the message says why).
        """
        self.check_buildable()
        with no_downloads():  # the import of an import path's package too
            factory = self._factory()
        try:
            with no_downloads(), torch.device(device) if device is not None else contextlib.nullcontext():
                model = factory(**self.kwargs)
        except NormswapError:
            raise
        except Exception as exc:
            raise ArchitectureError(f"building {self.short()} failed: {type(exc).__name__}: {_first_line(exc)}") \
                from exc
        if not isinstance(model, nn.Module):
            raise ArchitectureError(f"{self.name} returned a {type(model).__name__}, not a torch.nn.Module")
        set_arch(model, self.to_dict())
        return model

    def _factory(self) -> Callable[..., Any]:
        builder = self.builder
        if builder == "timm":
            return _timm_factory(self.name)
        if builder == "torchvision":
            return _torchvision_factory(_torchvision_name(self.name))
        if builder == "transformers":
            return _transformers_factory(self.name.partition(":")[2])
        factory = imports.resolve(self.name, what="architecture", error=ArchitectureError)
        return _without_weights(factory)


def _timm_factory(name: str) -> Callable[..., nn.Module]:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ArchitectureError(
            f"unknown architecture '{name}': not a timm model name{hint}; "
            "an import path looks like torchvision.models:resnet50"
        )

    def create(**kwargs: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)

    return create


def _torchvision_name(name: str) -> Optional[str]:
    """``NAME`` for ``torchvision.models[.sub]:NAME`` when torchvision registers a model of that name."""
    module, _, attribute = name.partition(":")
    if not (module == "torchvision.models" or module.startswith("torchvision.models.")) or "." in attribute:
        return None
    try:
        from torchvision.models import list_models
    except ImportError:
        return None
    return attribute if attribute in list_models() else None


def _torchvision_factory(name: str) -> Callable[..., nn.Module]:
    from torchvision.models import get_model, get_model_builder

    parameters = inspect.signature(get_model_builder(name)).parameters
    no_weights = {key: None for key in ("weights", "weights_backbone") if key in parameters}

    def create(**kwargs: Any) -> nn.Module:
        return get_model(name, **{**kwargs, **no_weights})

    return create


def _transformers_factory(name: str) -> Callable[..., nn.Module]:
    try:
        import transformers
    except ImportError:
        raise ArchitectureError(f"building transformers:{name} needs the transformers package: pip install "
                                "transformers") from None
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ArchitectureError(f"transformers has no model class '{name}'")

    def create(**config: Any) -> nn.Module:
        return cls(cls.config_class.from_dict(config))

    return create


def _without_weights(factory: Callable[..., Any]) -> Callable[..., Any]:
    """``factory`` with every weight parameter whose default would fetch weights set to its no-weights value."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory
    fixed = {name: value for name, value in _NO_WEIGHTS.items()
             if name in parameters and parameters[name].default not in (None, False, "")}
    if not fixed:
        return factory

    def create(**kwargs: Any) -> Any:
        return factory(**{**kwargs, **fixed})

    return create


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
