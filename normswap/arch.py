"""Architecture specs: how to build a model's module tree before its weights are loaded, and who may say so.

A spec is a name and keyword arguments. normswap builds these names on its own, the *registered builders*:

- a timm model name (``resnet50``), built with ``timm.create_model(name, pretrained=False, **kwargs)``;
- a torchvision model builder written ``torchvision.models:NAME`` (any name ``torchvision.models.list_models()``
  lists) or ``torchvision.models.SUB:NAME`` (``detection``, ``quantization``...: a builder of that very module, so
  ``torchvision.models.quantization:resnet18`` is the quantizable one), called with ``weights=None,
  weights_backbone=None`` (quantizable models unquantized);
- a Hugging Face transformers model class written ``transformers:CLASS``
  (``transformers:ResNetForImageClassification``), whose keyword arguments are its configuration, built with
  ``CLASS(config)``: no hub (offline for the call, ``use_pretrained_backbone=False``), no remote code;
- an ultralytics model class written ``ultralytics.nn.tasks:CLASS`` (``DetectionModel``...), whose ``cfg`` is the
  model's yaml as a dict: every layer it names must be a module class, its activation a plain ``nn.Class()``;
- a segmentation_models_pytorch model class written ``segmentation_models_pytorch:CLASS`` (``Unet``, ``FPN``...:
  a ``SegmentationModel``), whose keyword arguments are its constructor's, built with ``encoder_weights=None``;
- normswap's own demo model, ``normswap.demo:DigitsResNet``.

Any other name is an import path ``package.module:callable`` (``monai.networks.nets:UNet``). Importing it runs its
code, so it is built only when the user typed it: a spec the user gives (``ArchSpec.parse``, ``--arch``) may be
built; a spec read from a file (``ArchSpec.from_dict``, ``from_file=True``) is data, and building it raises an
:class:`~normswap.errors.ArchitectureError` showing the recorded call in full. A typed name receives keyword
arguments that came from a file (``file_keys``) only if it is a ``torch.nn.Module`` class (checked before anything is
called) or a registered builder; a function or anything else gets only what the user typed. The callable must be
defined in the package it is imported from (see :mod:`normswap.imports`).

:func:`identify` tells, from a model built in Python, which spec rebuilds it (timm's ``pretrained_cfg``, the
torchvision builder, the transformers class and config, the ultralytics yaml, the arguments a
segmentation_models_pytorch model keeps, normswap's demo), and confirms it by
building the spec on the meta device and comparing every parameter and buffer name and shape, and every module's
description: a model it cannot confirm is not named at all.

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
    normswap.errors.ArchitectureError: this file names os:system(command='true') as its architecture, which is not ...
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from . import imports
from .errors import ArchitectureError, NormswapError, shown
from .history import set_arch
from .offline import offline

__all__ = ["ArchSpec", "NORMSWAP_BUILDERS", "TIMM_NAME", "TRANSFORMERS_SKIPPED", "WEIGHT_KWARGS", "torchvision_builder"]

WEIGHT_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "weights",
                 "weights_backbone", "encoder_weights", "pretrained_backbone")
"""Keyword arguments that would make a builder fetch or read weights: accepted only as ``None`` or ``False``."""

_NO_WEIGHTS = {"pretrained": False, "pretrained_backbone": False, "weights": None, "weights_backbone": None,
               "encoder_weights": None}
"""What an import-path builder gets for a weight parameter whose default would fetch weights."""

NORMSWAP_BUILDERS = ("normswap.demo:DigitsResNet",)
"""normswap's own architectures, built on a file's word like timm and torchvision names."""

TIMM_NAME = re.compile(r"[\w][\w.\-]*")
_TRANSFORMERS_CLASS = re.compile(r"transformers:[A-Z][A-Za-z0-9]*")
_ULTRALYTICS_CLASS = re.compile(r"ultralytics\.nn\.tasks:[A-Z][A-Za-z0-9]*")
_SMP_CLASS = re.compile(r"segmentation_models_pytorch:[A-Z][A-Za-z0-9]*")
_MODEL_CLASS = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Z]\w*")
"""What a model class's import path looks like (``package.module:Class``): only such a name is suggested to type."""
_ULTRALYTICS_KWARGS = ("cfg", "ch", "nc", "verbose")
_ULTRALYTICS_ACTIVATION = re.compile(r"(torch\.)?nn\.([A-Z]\w*)\(\)")
TRANSFORMERS_SKIPPED = ("transformers_version", "_name_or_path", "_commit_hash")
_SHOWN_VALUE = 40


def _argument(key: str, value: Any) -> str:
    """One keyword argument as text, escaped: ``key=repr(value)``, or ``**{'odd key': value}``."""
    return f"{key}={value!r}" if key.isidentifier() and key.isascii() else f"**{{{key!r}: {value!r}}}"


@dataclass
class ArchSpec:
    """A model architecture: ``name`` and its ``kwargs``; ``from_file`` marks a spec read from a file (data), and
    ``file_keys`` the keyword arguments whose values came from a file (also once the user confirmed the name)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    from_file: bool = field(default=False, compare=False, repr=False)
    file_keys: frozenset = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def parse(cls, text: str, kwargs: Optional[dict[str, Any]] = None, *, from_file: bool = False,
              file_keys: Optional[Iterable[str]] = None) -> "ArchSpec":
        """Check and build a spec from its name and keyword arguments (by default, as the user typed them; with
        ``from_file``, all of them from a file; ``file_keys`` names those that came from a file otherwise).

        >>> ArchSpec.parse("torchvision.models:resnet50").is_import_path
        True
        """
        text = text.strip() if isinstance(text, str) else text
        if not isinstance(text, str) or not text:
            raise ArchitectureError("the architecture name is empty: give a timm model name or package.module:callable")
        if ":" in text and not imports.is_import_path(text):
            raise ArchitectureError(
                f"'{shown(text)}' is not a valid import path: write it as package.module:callable "
                "(for example torchvision.models:resnet50)"
            )
        if ":" not in text and not TIMM_NAME.fullmatch(text):
            raise ArchitectureError(
                f"'{shown(text)}' is not a valid architecture name: give a timm model name (resnet50) or "
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
        except (TypeError, ValueError, RecursionError):
            raise ArchitectureError(
                f"architecture keyword arguments must be JSON values (numbers, strings, lists, dicts): {kwargs!r}"
            ) from None
        kwargs = {key: value for key, value in kwargs.items() if key not in WEIGHT_KWARGS}
        keys = set(kwargs) if from_file else set(file_keys or ()) & set(kwargs)
        return cls(text, kwargs, from_file, frozenset(keys))

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
            raise ArchitectureError("not an architecture spec (expected {'name': ..., 'kwargs': {...}}): "
                                    f"{shown(repr(data)[:200])}")
        return cls.parse(data["name"], data.get("kwargs") or {}, from_file=True)

    def confirmed(self, overrides: Optional[dict[str, Any]] = None) -> "ArchSpec":
        """This file's spec as the user confirmed it by typing its name: buildable, its keyword arguments still
        marked as the file's, ``overrides`` (typed) replacing them key by key.

        >>> spec = ArchSpec.from_dict({"name": "m.nets:Net", "kwargs": {"a": 1, "b": 2}}).confirmed({"b": 3})
        >>> spec.kwargs, sorted(spec.file_keys), spec.from_file
        ({'a': 1, 'b': 3}, ['a'], False)
        """
        overrides = overrides or {}
        return ArchSpec.parse(self.name, {**self.kwargs, **overrides},
                              file_keys=set(self.file_keys) - set(overrides))

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., "kwargs": {...}}``, JSON-serialisable."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    def with_kwargs(self, overrides: Optional[dict[str, Any]]) -> "ArchSpec":
        """This spec with ``overrides`` replacing its keyword arguments key by key (checked like :meth:`parse`).

        >>> ArchSpec.parse("resnet18", {"num_classes": 10, "in_chans": 1}).with_kwargs({"num_classes": 3}).kwargs
        {'num_classes': 3, 'in_chans': 1}
        """
        overrides = overrides or {}
        spec = ArchSpec.parse(self.name, {**self.kwargs, **overrides},
                              file_keys=set(self.file_keys) - set(overrides))
        spec.from_file = self.from_file
        return spec

    def call(self) -> str:
        """The spec as the call it makes, in full and escaped (``repr`` of every value, odd keys quoted): one line,
        control characters visible.

        >>> ArchSpec.parse("m.nets:Net", {"cmd": "true\\n; rm -rf ~"}).call()
        "m.nets:Net(cmd='true\\\\n; rm -rf ~')"
        """
        args = ", ".join(_argument(key, value) for key, value in self.kwargs.items())
        return f"{self.name}({args})" if args else self.name

    def __str__(self) -> str:
        return self.call()

    def short(self) -> str:
        """The spec as text, every keyword argument shown, long values cut (for messages about a spec the user
        chose; a refusal shows :meth:`call`).

        >>> ArchSpec.parse("monai.networks.nets:UNet", {"spatial_dims": 3, "channels": list(range(20))}).short()
        'monai.networks.nets:UNet(spatial_dims=3, channels=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1...)'
        """
        shown_args = []
        for key, value in self.kwargs.items():
            text = _argument(key, value)
            shown_args.append(text if len(text) <= _SHOWN_VALUE + len(key) + 1
                              else text[:_SHOWN_VALUE + len(key) - 2] + "...")
        return f"{self.name}({', '.join(shown_args)})" if shown_args else self.name

    @property
    def is_import_path(self) -> bool:
        """True for ``package.module:callable``, False for a timm model name."""
        return ":" in self.name

    @property
    def looks_like_model_class(self) -> bool:
        """True for a name written ``package.module:Class``: the only kind of name a refusal suggests typing."""
        return bool(_MODEL_CLASS.fullmatch(self.name))

    @property
    def builder(self) -> str:
        """Who builds this spec: ``"timm"``, ``"torchvision"``, ``"transformers"``, ``"ultralytics"``, ``"smp"``,
        ``"normswap"`` (the registered builders) or ``"import"`` (an import path, built only when the user typed
        it).

        >>> [ArchSpec(name).builder for name in ("resnet50", "torchvision.models.detection:fasterrcnn_resnet50_fpn",
        ...                                      "transformers:ResNetModel", "normswap.demo:DigitsResNet",
        ...                                      "ultralytics.nn.tasks:DetectionModel",
        ...                                      "segmentation_models_pytorch:Unet", "monai.networks.nets:UNet")]
        ['timm', 'torchvision', 'transformers', 'normswap', 'ultralytics', 'smp', 'import']
        """
        if not self.is_import_path:
            return "timm"
        if self.name in NORMSWAP_BUILDERS:
            return "normswap"
        if _TRANSFORMERS_CLASS.fullmatch(self.name):
            return "transformers"
        if _ULTRALYTICS_CLASS.fullmatch(self.name):
            return "ultralytics"
        if _SMP_CLASS.fullmatch(self.name):
            return "smp"
        if torchvision_builder(self.name) is not None:
            return "torchvision"
        return "import"

    @property
    def is_registered(self) -> bool:
        """True if normswap builds this spec on a file's word (timm, torchvision, transformers, ultralytics,
        segmentation_models_pytorch, normswap's demo)."""
        return self.builder != "import"

    def check_buildable(self) -> None:
        """:class:`ArchitectureError` for an import path read from a file: the recorded call in full, and the option
        to type when the name looks like a model class."""
        if not self.from_file or self.is_registered:
            return
        if self.looks_like_model_class:
            module = self.name.partition(":")[0]
            raise ArchitectureError(
                f"this file was built with {self.call()}, which normswap does not build on a file's word: typing "
                f"its name imports {module} and runs that code with these arguments; if you trust them, pass "
                f"--arch {self.name} (arch='{self.name}') to build it"
            )
        raise ArchitectureError(
            f"this file names {self.call()} as its architecture, which is not a model class "
            "(package.module:Class): normswap does not run it; build the model in your code and load the file into "
            "it with normswap.load(path, model=...)"
        )

    def build(self, device: Union[str, torch.device, None] = None) -> nn.Module:
        """Build the model; ``device="meta"`` builds the module tree without allocating or initialising weights.
        Nothing contacts the network (see :func:`normswap.offline.offline`).

        The spec is recorded on the model (:func:`normswap.history.get_arch`).

        Raises:
            ArchitectureError: the spec came from a file and is not a registered builder, a typed name that is not
                a model class would get a file's keyword arguments, the name is unknown, the import fails, or
                building fails (the message says why).
        """
        self.check_buildable()
        with offline():  # the import of an import path's package too
            factory = self._factory()
        try:
            with offline(), torch.device(device) if device is not None else contextlib.nullcontext():
                model = factory(**self.kwargs)
        except NormswapError:
            raise
        except Exception as exc:
            raise ArchitectureError(f"building {self.short()} failed: {type(exc).__name__}: "
                                    f"{shown(_first_line(exc))}") from exc
        if not isinstance(model, nn.Module):
            raise ArchitectureError(f"{self.name} returned a {type(model).__name__}, not a torch.nn.Module")
        recorded = self.to_dict()
        if self.builder == "ultralytics" and isinstance(getattr(model, "yaml", None), dict):
            recorded["kwargs"]["cfg"] = json.loads(json.dumps(model.yaml))  # the yaml itself, not its file name
        set_arch(model, recorded)
        return model

    def _factory(self) -> Callable[..., Any]:
        builder = self.builder
        if builder == "timm":
            return _timm_factory(self.name)
        if builder == "torchvision":
            return _torchvision_factory(*torchvision_builder(self.name))
        if builder == "transformers":
            return _transformers_factory(self.name.partition(":")[2])
        if builder == "ultralytics":
            return _ultralytics_factory(self.name.partition(":")[2], self.kwargs,
                                        from_file=self.from_file or "cfg" in self.file_keys)
        if builder == "smp":
            return _smp_factory(self.name.partition(":")[2])
        factory = imports.resolve(self.name, what="architecture", error=ArchitectureError)
        if self.file_keys and not _is_module_class(factory):
            keys = ", ".join(shown(key) for key in sorted(self.file_keys))
            raise ArchitectureError(
                f"{self.name} is {imports.describe_callable(factory)}, not a model class: normswap passes a file's "
                f"keyword arguments ({keys}) only to a torch.nn.Module class or a registered builder; type the "
                "arguments yourself with --arch-kwargs (arch_kwargs=) if you mean to call it"
            )
        return _without_weights(factory)


def _timm_factory(name: str) -> Callable[..., nn.Module]:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.75)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ArchitectureError(
            f"unknown architecture '{shown(name)}': not a timm model name{hint}; "
            "an import path looks like torchvision.models:resnet50"
        )

    def create(**kwargs: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)

    return create


def torchvision_builder(name: str) -> Optional[tuple[str, Callable[..., nn.Module]]]:
    """``(registered name, builder)`` for ``torchvision.models[.sub]:NAME`` when ``NAME`` is a model builder of that
    very module (``torchvision.models.quantization:resnet18`` is the quantizable one), else ``None``."""
    module_name, _, attribute = name.partition(":")
    if not (module_name == "torchvision.models" or module_name.startswith("torchvision.models.")) \
            or "." in attribute or attribute.startswith("_"):
        return None
    try:
        from torchvision.models import get_model_builder, list_models

        module = importlib.import_module(module_name)
    except ImportError:
        return None
    function = getattr(module, attribute, None)
    if function is not None:
        for registered in list_models(module=module):
            if get_model_builder(registered) is function:
                return registered, function
    if module_name == "torchvision.models" and attribute in list_models():  # any model by its registered name
        return attribute, get_model_builder(attribute)
    return None


def _torchvision_factory(registered: str, function: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    parameters = inspect.signature(function).parameters
    no_weights = {key: None for key in ("weights", "weights_backbone") if key in parameters}

    def create(**kwargs: Any) -> nn.Module:
        if kwargs.get("quantize"):
            raise ArchitectureError(f"normswap builds torchvision's {registered} unquantized (quantize=False): a "
                                    "quantized model has no norm layers to convert")
        # googlenet and inception_v3 take init_weights: the weights come from a file, so skip their slow (and,
        # left unset, warning) initialization
        skipped_init = {"init_weights": False} if registered in ("googlenet", "inception_v3") else {}
        return function(**{**skipped_init, **kwargs, **no_weights})

    return create


def _without_pretrained_backbone(config: Any) -> Any:
    """A transformers configuration (a dict) with every ``use_pretrained_backbone`` set to ``False``, nested
    backbone configurations included."""
    if isinstance(config, dict):
        return {key: False if key == "use_pretrained_backbone" else _without_pretrained_backbone(value)
                for key, value in config.items()}
    if isinstance(config, list):
        return [_without_pretrained_backbone(value) for value in config]
    return config


def _transformers_factory(name: str) -> Callable[..., nn.Module]:
    try:
        with offline():
            import transformers
    except ImportError:
        raise ArchitectureError(f"building transformers:{name} needs the transformers package: pip install "
                                "transformers") from None
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ArchitectureError(f"transformers has no model class '{name}'")

    def create(**config: Any) -> nn.Module:
        settings = cls.config_class.from_dict(_without_pretrained_backbone(config))
        if hasattr(settings, "use_pretrained_backbone"):
            settings.use_pretrained_backbone = False
        return cls(settings)

    return create


def _ultralytics_factory(name: str, kwargs: dict[str, Any], from_file: bool) -> Callable[..., nn.Module]:
    """An ultralytics model class; a yaml (``cfg``) from a file must be a mapping that names only module classes."""
    try:
        with offline():
            from ultralytics.nn import tasks
    except ImportError:
        raise ArchitectureError(f"building ultralytics.nn.tasks:{name} needs the ultralytics package: pip install "
                                "ultralytics") from None
    cls = getattr(tasks, name, None)
    if not (isinstance(cls, type) and issubclass(cls, tasks.BaseModel) and cls.__module__ == tasks.__name__):
        raise ArchitectureError(f"ultralytics.nn.tasks has no model class '{shown(name)}'")
    unknown = sorted(set(kwargs) - set(_ULTRALYTICS_KWARGS))
    if unknown:
        raise ArchitectureError(f"ultralytics.nn.tasks:{name} is built from its yaml: '{shown(unknown[0])}' is not "
                                f"one of its arguments ({', '.join(_ULTRALYTICS_KWARGS)})")
    if from_file and not isinstance(kwargs.get("cfg"), dict):
        raise ArchitectureError(f"ultralytics.nn.tasks:{name} is built on a file's word only from its yaml as a "
                                "mapping (cfg={...}), not from a file name")
    if from_file:
        _check_ultralytics_yaml(kwargs["cfg"], tasks)

    def create(**arguments: Any) -> nn.Module:
        return cls(**{"verbose": False, **arguments})

    return create


def _smp_factory(name: str) -> Callable[..., nn.Module]:
    """A segmentation_models_pytorch model class (a ``SegmentationModel``), built without encoder weights."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise ArchitectureError(f"building segmentation_models_pytorch:{name} needs the segmentation_models_pytorch "
                                "package: pip install segmentation-models-pytorch") from None
    cls = getattr(smp, name, None)
    if not (isinstance(cls, type) and issubclass(cls, smp.base.SegmentationModel)):
        raise ArchitectureError(f"segmentation_models_pytorch has no model class '{shown(name)}'")

    def create(**kwargs: Any) -> nn.Module:
        return cls(**{**kwargs, "encoder_weights": None})

    return create


def _check_ultralytics_yaml(config: dict[str, Any], tasks: Any) -> None:
    """:class:`ArchitectureError` unless every layer of an ultralytics yaml names a module class (ultralytics looks
    the name up among its module's globals and calls it) and its activation is a plain ``nn.Class()`` (ultralytics
    evaluates it as Python)."""
    where = "the ultralytics yaml"
    for key in ("activation", "act"):
        text = config.get(key)
        if text is None:
            continue
        found = _ULTRALYTICS_ACTIVATION.fullmatch(text) if isinstance(text, str) else None
        if found is None or not _is_module_class(getattr(nn, found.group(2), None)):
            raise ArchitectureError(f"{where} sets {key} to {text!r}, which ultralytics evaluates as Python: "
                                    "normswap builds only a plain activation class such as nn.SiLU()")
    for part in ("backbone", "head"):
        layers = config.get(part)
        if not isinstance(layers, list):
            raise ArchitectureError(f"{where} has no '{part}' list of layers")
        for index, layer in enumerate(layers):
            if not (isinstance(layer, list) and len(layer) == 4 and isinstance(layer[2], str)):
                raise ArchitectureError(f"{where}: {part} layer {index} is not [from, repeats, module, args]")
            module = layer[2]
            if module.startswith("nn."):
                target = getattr(nn, module[3:], None)
            elif module.startswith("torchvision.ops."):
                target = getattr(importlib.import_module("torchvision.ops"), module[16:], None)
            else:
                target = vars(tasks).get(module)
            if not _is_module_class(target):
                raise ArchitectureError(f"{where}: {part} layer {index} names {module!r}, which is not a module "
                                        "class: normswap builds only yaml whose layers are module classes")


def _is_module_class(target: Any) -> bool:
    return isinstance(target, type) and issubclass(target, nn.Module)


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
