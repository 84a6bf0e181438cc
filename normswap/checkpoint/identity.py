"""What a model built in Python is: the architecture spec that rebuilds it, confirmed on the meta device.

``save`` records an architecture whenever the model can say what it is — timm's ``pretrained_cfg`` (with the
structure-changing arguments read off the model: ``num_classes``, ``in_chans``, dropout rates), the torchvision
builder whose model matches (quantizable ones too), a transformers class and its configuration, an ultralytics
model's own yaml, the arguments a segmentation_models_pytorch model keeps, normswap's demo model — and only once a
candidate, built on the meta device with the model's manifest applied, has every parameter and buffer name and
shape and every module's description the model has. Nothing is guessed: a model that says nothing of how it was
built (MONAI, your own class) gets ``None``.
"""

from __future__ import annotations

import inspect
import json
import sys
from typing import Any, Optional

from torch import nn

from ..arch import NORMSWAP_BUILDERS, TIMM_NAME, TRANSFORMERS_SKIPPED, ArchSpec, torchvision_builder
from .manifest import apply_manifest, derive_manifest

__all__ = ["identify"]


def _candidates(model: nn.Module) -> list[ArchSpec]:
    """Specs that may rebuild ``model``, from what the model says of itself (none for a model it says nothing of)."""
    cls = type(model)
    found: list[ArchSpec] = []
    name = f"{cls.__module__}:{cls.__name__}"
    if name in NORMSWAP_BUILDERS:
        found.append(ArchSpec(name))
    config = getattr(model, "pretrained_cfg", None)
    timm = sys.modules.get("timm")
    if timm is not None and isinstance(config, dict) and isinstance(config.get("architecture"), str) \
            and TIMM_NAME.fullmatch(config["architecture"]) and timm.is_model(config["architecture"]):
        kwargs = {"num_classes": model.num_classes} if isinstance(getattr(model, "num_classes", None), int) else {}
        kwargs.update(_timm_shape_arguments(model, config))
        found.append(ArchSpec(config["architecture"], kwargs))
        pooling = _timm_pooling(model)
        if pooling is not None:  # next, with the model's pooling (which can move or remove norm layers: a ViT's)
            found.append(ArchSpec(config["architecture"], {**kwargs, "global_pool": pooling}))
    if cls.__module__.startswith("torchvision.models.") and "torchvision.models" in sys.modules:
        found += _torchvision_candidates(model)
    transformers = sys.modules.get("transformers")
    if transformers is not None and isinstance(model, transformers.PreTrainedModel) \
            and getattr(transformers, cls.__name__, None) is cls:
        settings = json.loads(model.config.to_json_string(use_diff=True))
        found.append(ArchSpec(f"transformers:{cls.__name__}",
                              {k: v for k, v in settings.items() if k not in TRANSFORMERS_SKIPPED}))
    if cls.__module__ == "ultralytics.nn.tasks" and isinstance(getattr(model, "yaml", None), dict):
        found.append(ArchSpec(name, {"cfg": json.loads(json.dumps(model.yaml)), "verbose": False}))
    smp = sys.modules.get("segmentation_models_pytorch")
    arguments = getattr(model, "_hub_mixin_config", None)  # what an smp model was constructed with
    if smp is not None and getattr(smp, cls.__name__, None) is cls and isinstance(arguments, dict):
        try:
            kwargs = json.loads(json.dumps({**arguments, "encoder_weights": None}))
        except (TypeError, ValueError):  # an argument that is not data (an activation given as a callable)
            kwargs = None
        if kwargs is not None:
            found.append(ArchSpec(f"segmentation_models_pytorch:{cls.__name__}", kwargs))
    return found


def _timm_shape_arguments(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    """The ``create_model`` arguments that change a timm model's tensors and that it keeps: ``features_only`` and
    ``out_indices`` of a feature extractor (a backbone for detection or segmentation), and the ``img_size`` of a
    vision transformer built for another input size than its configuration's."""
    found: dict[str, Any] = {}
    out_indices = getattr(getattr(model, "feature_info", None), "out_indices", None)
    if isinstance(out_indices, tuple) and all(isinstance(index, int) for index in out_indices):
        found.update(features_only=True, out_indices=list(out_indices))
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    default = config.get("input_size")
    if isinstance(size, tuple) and len(size) == 2 and all(isinstance(side, int) for side in size) \
            and isinstance(default, (tuple, list)) and tuple(default[1:]) != size:
        found["img_size"] = size[0] if size[0] == size[1] else list(size)
    return found


def _output_stride(model: nn.Module) -> Optional[int]:
    """The ``output_stride`` a timm model was built with (its last stages kept at a finer stride, for
    segmentation), as its feature information's largest reduction says, where that is below the usual 32 and the
    stages do not all reduce alike (a vision transformer's blocks all reduce by its patch size); ``None``
    otherwise."""
    info = getattr(model, "feature_info", None)
    if callable(getattr(info, "reduction", None)):
        reductions = info.reduction()
    elif isinstance(info, list):
        reductions = [entry.get("reduction") for entry in info if isinstance(entry, dict)]
    else:
        return None
    reductions = [reduction for reduction in reductions if isinstance(reduction, int)]
    if len(set(reductions)) < 2 or max(reductions) >= 32:
        return None
    return max(reductions)


def _timm_pooling(model: nn.Module) -> Optional[str]:
    """The global pooling a timm model was built with (``global_pool``: ``""`` for none, ``"avg"``, ``"max"``...),
    read off the model or its head."""
    for owner in (model, getattr(model, "head", None)):
        pool = getattr(owner, "global_pool", None)
        pool = pool if isinstance(pool, str) else getattr(pool, "pool_type", None)
        if isinstance(pool, str):
            return pool
    return None


def _torchvision_candidates(model: nn.Module) -> list[ArchSpec]:
    """The builders of the module that defines the model's class, or that say they return it (ssdlite's SSD), those
    whose pretrained weights have about as many parameters as the model first (so that the right one is usually
    built first)."""
    from torchvision.models import get_model_builder, get_model_weights, list_models

    size = sum(parameter.numel() for parameter in model.parameters())
    ranked = []
    for registered in list_models():
        function = get_model_builder(registered)
        public = function.__module__.rpartition(".")[0]
        if function.__module__ != type(model).__module__ \
                and inspect.signature(function).return_annotation is not type(model):
            continue
        if not torchvision_builder(f"{public}:{function.__name__}"):
            continue
        try:
            parameters = next(iter(get_model_weights(registered))).meta.get("num_params", 0)
        except (ValueError, StopIteration, AttributeError):
            parameters = 0
        ranked.append((abs(parameters - size), f"{public}:{function.__name__}"))
    kwargs = _torchvision_shape_arguments(model)
    return [ArchSpec(name, kwargs) for _, name in sorted(ranked)]


def _torchvision_shape_arguments(model: nn.Module) -> dict[str, Any]:
    """The builder arguments that change a torchvision model's tensors, where the model keeps them: the classes of
    a RetinaNet's, FCOS's or SSD's head (whose output widths multiply them by the anchors), a Keypoint R-CNN's
    keypoints, a segmentation model's auxiliary classifier, a vision transformer's image size."""
    found: dict[str, Any] = {}
    head = getattr(getattr(model, "head", None), "classification_head", None)
    classes = getattr(head, "num_classes", getattr(head, "num_columns", None))
    if isinstance(classes, int):
        found["num_classes"] = classes
    keypoints = getattr(getattr(getattr(getattr(model, "roi_heads", None), "keypoint_predictor", None),
                                "kps_score_lowres", None), "out_channels", None)
    if isinstance(keypoints, int):
        found["num_keypoints"] = keypoints
    if isinstance(getattr(model, "aux_classifier", None), nn.Module):
        found["aux_loss"] = True
    if type(model).__name__ == "VisionTransformer" and isinstance(getattr(model, "image_size", None), int):
        found["image_size"] = model.image_size
    return found


def _structure(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict(keep_vars=True).items()}


def _rebuilt(spec: ArchSpec, model: nn.Module, manifest: dict[str, Any], cpu: bool) -> Optional[nn.Module]:
    """``spec`` built on the meta device with ``manifest`` applied, or ``None`` if that fails; with ``cpu``, on the
    CPU when the meta device cannot build it (an ultralytics model runs a forward when it is built, a RegNet computes
    its widths with tensors): the model being saved is of that size already."""
    for device in ("meta", None) if cpu else ("meta",):
        try:
            return apply_manifest(spec.build(device=device), manifest)
        except Exception:  # noqa: BLE001 - a candidate that cannot be built is not the model's architecture
            continue
    return None


def _adjusted(spec: ArchSpec, built: nn.Module, model: nn.Module) -> Optional[ArchSpec]:
    """``spec`` with the structure-changing arguments (``num_classes``, ``in_chans`` for timm) that make ``built``
    have ``model``'s shapes, read off the first tensor whose shape differs; ``aux_logits=False`` for a torchvision
    googlenet or inception_v3 built without its auxiliary classifiers; ``None`` when names differ otherwise."""
    mine, theirs = _structure(built), _structure(model)
    if list(mine) != list(theirs):
        if spec.builder == "torchvision" and getattr(model, "aux_logits", None) is False \
                and spec.kwargs.get("aux_logits") is not False \
                and [key for key in mine if not key.startswith(("aux1.", "aux2.", "AuxLogits."))] == list(theirs):
            return ArchSpec(spec.name, {**spec.kwargs, "aux_logits": False})  # googlenet, inception_v3
        return None
    differ = [key for key in mine if mine[key] != theirs[key]]
    if not differ:
        return None
    kwargs = dict(spec.kwargs)
    first_conv = next((key for key in mine if len(mine[key]) == 4), None)
    if spec.builder == "timm" and first_conv in differ and mine[first_conv][1] != theirs[first_conv][1]:
        kwargs["in_chans"] = theirs[first_conv][1]
    else:
        kwargs["num_classes"] = theirs[differ[0]][0]
    return ArchSpec(spec.name, kwargs) if kwargs != spec.kwargs else None


def identify(model: nn.Module) -> Optional[ArchSpec]:
    """The spec that rebuilds ``model`` (a model built in Python, converted or not), confirmed on the meta device:
    every parameter and buffer name and shape, and every module's description (``repr``), as the model has them,
    once the model's manifest is applied. The first candidate confirmed is returned (two specs that pass build the
    same module tree). ``None`` when the model says nothing of how it was built (MONAI, your own class) or
    nothing confirms it.

    >>> import torchvision
    >>> str(identify(torchvision.models.resnet18(num_classes=5)))
    'torchvision.models:resnet18(num_classes=5)'
    >>> identify(nn.Sequential(nn.Linear(2, 2))) is None
    True
    """
    manifest = derive_manifest(model)
    structure, description = _structure(model), repr(model)
    for index, spec in enumerate(_candidates(model)):
        cpu = index < 3 or spec.builder == "ultralytics"  # the likeliest candidates are worth a real build
        for _ in range(3):  # the spec, then with num_classes, then with in_chans as the model's shapes say
            built = _rebuilt(spec, model, manifest, cpu)
            if built is None:
                break
            if _structure(built) == structure:
                if _described_alike(built, model, description):
                    return spec
                for variant in [*_with_drop_rates(spec, model), *_with_input_sizes(spec, model),
                                *_with_torchvision_rates(spec, model)]:
                    built = _rebuilt(variant, model, manifest, cpu)
                    if built is not None and _described_alike(built, model, description):
                        return variant
                break
            spec = _adjusted(spec, built, model)
            if spec is None:
                break
    return None


def _described_alike(built: nn.Module, model: nn.Module, description: str) -> bool:
    """True if ``built`` has ``model``'s description (``repr``) and its ``drop_rate``, which timm keeps as a plain
    attribute (a ResNet applies it in its forward, where no ``repr`` shows it)."""
    return repr(built) == description and getattr(built, "drop_rate", None) == getattr(model, "drop_rate", None)


_DROPOUT_ARGUMENTS = {"head_drop": "drop_rate", "head.drop": "drop_rate", "pos_drop": "pos_drop_rate",
                      "patch_drop": "patch_drop_rate", "attn_drop": "attn_drop_rate", "proj_drop": "proj_drop_rate",
                      "drop1": "proj_drop_rate", "drop2": "proj_drop_rate"}
"""timm's dropout layers by the name they end with, and the ``create_model`` argument that sets their rate
(vision transformers: ``drop_rate`` for the head, ``pos_drop_rate``, ``patch_drop_rate``, ``attn_drop_rate``,
``proj_drop_rate``)."""


def _dropout_rates(model: nn.Module) -> dict[str, float]:
    """The rates of the model's nonzero dropout layers that timm names after a ``create_model`` argument (the
    first layer found decides; the spec they make is confirmed like any other)."""
    rates: dict[str, float] = {}
    for name, module in model.named_modules():
        rate = getattr(module, "p", None) if isinstance(module, nn.Dropout) else getattr(module, "prob", None)
        if not isinstance(rate, float) or not rate:
            continue
        argument = _DROPOUT_ARGUMENTS.get(name) or _DROPOUT_ARGUMENTS.get(name.rsplit(".", 1)[-1])
        if argument is not None:
            rates.setdefault(argument, rate)
    return rates


def _with_torchvision_rates(spec: ArchSpec, model: nn.Module) -> list[ArchSpec]:
    """``spec`` with the dropout of a torchvision classifier's head (``dropout``: its first dropout layer) and the
    stochastic depth it was built with (``stochastic_depth_prob``: the largest probability, or that times ``n / (n -
    1)`` where the ``n`` blocks stop one step short of it, as EfficientNet's do); confirmed like any other spec."""
    if spec.builder != "torchvision":
        return []
    kwargs = dict(spec.kwargs)
    dropout = next((module.p for module in getattr(model, "classifier", nn.Identity()).modules()
                    if isinstance(module, nn.Dropout)), None)
    if isinstance(dropout, float):
        kwargs["dropout"] = dropout
    depths = [module.p for module in model.modules() if type(module).__name__ == "StochasticDepth"
              and isinstance(getattr(module, "p", None), float)]
    if not depths or max(depths) == 0:
        return [ArchSpec(spec.name, kwargs)] if kwargs != spec.kwargs else []
    top, blocks = max(depths), len(depths)
    return [ArchSpec(spec.name, {**kwargs, "stochastic_depth_prob": float(f"{rate:.6g}")})
            for rate in (top, top * blocks / max(blocks - 1, 1))]


def _with_input_sizes(spec: ArchSpec, model: nn.Module) -> list[ArchSpec]:
    """``spec`` with the image size a torchvision detection model resizes its inputs to (``min_size`` and
    ``max_size``, read off its ``transform``; one ``min_size``, not the multi-scale training tuple); confirmed like
    any other spec."""
    transform = getattr(model, "transform", None)
    min_size, max_size = getattr(transform, "min_size", None), getattr(transform, "max_size", None)
    if spec.builder != "torchvision" or not isinstance(min_size, tuple) or len(min_size) != 1:
        return []
    if not isinstance(min_size[0], int) or not isinstance(max_size, int):
        return []
    return [ArchSpec(spec.name, {**spec.kwargs, "min_size": min_size[0], "max_size": max_size})]


def _with_drop_rates(spec: ArchSpec, model: nn.Module) -> list[ArchSpec]:
    """``spec`` with the dropout and drop-path rates a timm model was built with, as far as the model tells them:
    ``drop_rate`` is kept on the model (or read off its head's dropout), the other dropout rates off the layers
    :data:`_DROPOUT_ARGUMENTS` names; ``drop_path_rate`` is the largest drop-path probability, or that times
    ``(n + 1) / n`` for models whose first block has none and whose ``n`` others stop one step short of the rate
    (EfficientNet); the ``output_stride`` of dilated last stages; each also with the model's global pooling. Each is
    confirmed like any other spec."""
    if spec.builder != "timm":
        return []
    kwargs = dict(spec.kwargs)
    if isinstance(getattr(model, "drop_rate", None), float) and model.drop_rate:
        kwargs["drop_rate"] = model.drop_rate
    kwargs.update(_dropout_rates(model))
    stride = _output_stride(model)
    if stride is not None:
        kwargs["output_stride"] = stride
    probabilities = [module.drop_prob for module in model.modules()
                     if isinstance(getattr(module, "drop_prob", None), float)]
    rates = [None]
    if probabilities and max(probabilities) > 0:
        top, blocks = max(probabilities), len(probabilities)
        rates = [float(f"{top:.6g}"), float(f"{top * (blocks + 1) / blocks:.6g}")]
    variants = [ArchSpec(spec.name, {**kwargs, **({"drop_path_rate": rate} if rate else {})}) for rate in rates]
    pooling = _timm_pooling(model)
    if pooling is None:
        return variants
    return variants + [ArchSpec(variant.name, {**variant.kwargs, "global_pool": pooling}) for variant in variants]
