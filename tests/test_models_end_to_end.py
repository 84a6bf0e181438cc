"""Models users build, from the real libraries (randomly initialised, small inputs), end to end: converted to
GroupNorm, frozen and folded, each saved and loaded back.

For every model: the plan converts every BatchNorm-like layer (the count is the model's own); the frozen model
computes the unfused eval model's output; at least the expected number of layers fold and the folded model is within
its own float rounding of the unfused eval model (its float32-vs-float64 difference, or that dtype's for a
half-precision model, which stays in half precision); each of the three loads back from its file bit for bit. The
default run covers one model per library; ``-m slow`` the rest.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
from torch import nn

import normswap
from normswap import registry
from normswap.arch import ArchSpec
from normswap.data import call_model, move_input, output_tensors
from normswap.targets import classify

from .helpers import randomize_norm_layers


def norm_layers(model: nn.Module) -> int:
    """BatchNorm-like layers, whatever their class: what a conversion converts and a fold may fold."""
    return sum(1 for m in model.modules() if (kind := classify(m)) is not None and kind.foldable)


def relative_difference(got: Any, expected: Any) -> float:
    pairs = list(zip(output_tensors(got), output_tensors(expected)))
    assert pairs
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
               for a, b in pairs if a.is_floating_point())


def own_rounding(model: nn.Module, x: Any, expected: Any) -> float:
    """How far the model's own output is from its output in a wider dtype (float64; float32 for a half-precision
    model): the rounding any exact rewrite may add. RAFT builds float32 coordinate grids whatever its dtype, so it
    cannot run in float64: its float32 rounding is taken as 1e-6 of the output."""
    wider = torch.float32 if next(model.parameters()).dtype == torch.float16 else torch.float64
    if type(model).__name__ == "RAFT":
        return 1e-6
    with torch.no_grad():
        in_wider = call_model(copy.deepcopy(model).to(wider), move_input(x, None, dtype=wider))
    return relative_difference(expected, in_wider)


def assert_loads_back(model: nn.Module, spec: ArchSpec, x: Any, path) -> None:
    normswap.save(model, path)
    loaded = normswap.load(path) if spec.is_registered else normswap.load(path, arch=spec.name)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    theirs, mine = model.state_dict(), loaded.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        for a, b in zip(output_tensors(call_model(loaded.eval(), x)), output_tensors(call_model(model.eval(), x))):
            assert torch.equal(a, b)


def check_end_to_end(tmp_path, name: str, kwargs: dict, x: Any, *, folds: int, layers: int,
                     half: bool = False, prepare: Callable[[nn.Module], nn.Module] = lambda m: m) -> nn.Module:
    """Build ``name(**kwargs)`` with random statistics, check conversion, freezing, folding and reloading; return
    the folded model."""
    spec = ArchSpec.parse(name, kwargs)
    torch.manual_seed(0)
    model = prepare(randomize_norm_layers(spec.build()).eval())
    if half:
        model = model.half()
        x = move_input(x, None, dtype=torch.float16)
    assert norm_layers(model) == layers
    with torch.no_grad():
        expected = call_model(copy.deepcopy(model), x)
    rounding = own_rounding(model, x, expected)
    tolerance = max(1e-5, 2 * rounding) if not half else 2 * rounding

    converted = normswap.convert(copy.deepcopy(model), "gn", groups=2)
    assert norm_layers(converted) == 0 and sum(isinstance(m, nn.GroupNorm) for m in converted.modules()) >= layers

    frozen = normswap.freeze(copy.deepcopy(model))
    with torch.no_grad():
        assert relative_difference(call_model(frozen, x), expected) <= tolerance

    p = normswap.plan_fold(model := copy.deepcopy(model), example_input=x)
    assert len(p) >= folds, str(p)
    folded = p.apply(model)
    with torch.no_grad():
        difference = relative_difference(call_model(folded, x), expected)
    assert difference <= tolerance, (difference, rounding)
    if half:
        assert {t.dtype for t in folded.state_dict().values() if t.is_floating_point()} == {torch.float16}

    for label, result in (("gn", converted), ("frozen", frozen), ("folded", folded)):
        assert_loads_back(result, spec, x, tmp_path / f"{label}.safetensors")
    return folded


def images(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


# --- torchvision -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torchvision_lraspp_end_to_end(tmp_path):
    check_end_to_end(tmp_path, "torchvision.models.segmentation:lraspp_mobilenet_v3_large", {"num_classes": 2},
                     images(1, 3, 64, 64), folds=47, layers=47)


def test_quantizable_resnet18_folds_at_least_what_fuse_modules_fuses(tmp_path):
    import torchvision

    fused = torchvision.models.quantization.resnet18(weights=None, quantize=False).eval()
    before = norm_layers(fused)
    fused.fuse_model()
    pairs = before - norm_layers(fused)
    assert pairs == 20
    check_end_to_end(tmp_path, "torchvision.models.quantization:resnet18", {"quantize": False},
                     images(1, 3, 64, 64), folds=pairs, layers=20)


@pytest.mark.slow
@pytest.mark.parametrize("name, folds, layers", [
    ("deeplabv3_resnet50", 60, 60), ("fcn_resnet50", 54, 54),
])
def test_torchvision_segmentation_end_to_end(tmp_path, name, folds, layers):
    check_end_to_end(tmp_path, f"torchvision.models.segmentation:{name}", {"num_classes": 2},
                     images(1, 3, 64, 64), folds=folds, layers=layers)


@pytest.mark.slow
@pytest.mark.parametrize("name, x, folds, layers", [
    ("optical_flow:raft_large", (images(1, 3, 128, 128), images(1, 3, 128, 128)), 15, 15),
    ("video:r2plus1d_18", images(1, 3, 4, 32, 32), 37, 37),
    ("video:s3d", images(1, 3, 16, 224, 224), 77, 77),
])
def test_torchvision_flow_and_video_end_to_end(tmp_path, name, x, folds, layers):
    module, _, builder = name.partition(":")
    check_end_to_end(tmp_path, f"torchvision.models.{module}:{builder}", {}, x, folds=folds, layers=layers)


# --- segmentation_models_pytorch ---------------------------------------------------------------------------------

SMP = {  # (architecture, encoder): layers folded, BatchNorm layers. PSPNet's encoder runs 3 stages of 5 (its
    # default depth); efficientnet's last BatchNorm belongs to the head smp does not call
    ("UnetPlusPlus", "resnet18"): (42, 42), ("UnetPlusPlus", "efficientnet-b0"): (70, 71),
    ("UnetPlusPlus", "mobilenet_v2"): (74, 74), ("Linknet", "efficientnet-b0"): (63, 64),
    ("Linknet", "mobilenet_v2"): (67, 67), ("PSPNet", "resnet18"): (14, 24), ("PSPNet", "efficientnet-b0"): (31, 53),
    ("PSPNet", "mobilenet_v2"): (43, 56), ("PAN", "resnet18"): (34, 34), ("PAN", "efficientnet-b0"): (62, 63),
    ("PAN", "mobilenet_v2"): (66, 66), ("MAnet", "resnet18"): (38, 38), ("MAnet", "efficientnet-b0"): (66, 67),
    ("MAnet", "mobilenet_v2"): (70, 70), ("UPerNet", "resnet18"): (32, 32), ("UPerNet", "efficientnet-b0"): (60, 61),
    ("UPerNet", "mobilenet_v2"): (64, 64),
}


def test_smp_linknet_end_to_end(tmp_path):
    check_end_to_end(tmp_path, "segmentation_models_pytorch:Linknet", {"encoder_name": "resnet18", "classes": 2},
                     images(1, 3, 64, 64), folds=35, layers=35)


@pytest.mark.slow
@pytest.mark.parametrize("architecture, encoder", list(SMP))
def test_smp_architectures_with_three_encoders_end_to_end(tmp_path, architecture, encoder):
    import segmentation_models_pytorch as smp

    if not hasattr(smp, architecture):
        pytest.skip(f"segmentation_models_pytorch {smp.__version__} has no {architecture}")
    folds, layers = SMP[architecture, encoder]
    # PAN pools its deepest features 8x, to 1x1 at 128x128: torch's group_norm refuses a 1x1 batch of one
    x = images(2, 3, 128, 128) if architecture == "PAN" else images(1, 3, 64, 64)
    check_end_to_end(tmp_path, f"segmentation_models_pytorch:{architecture}",
                     {"encoder_name": encoder, "classes": 2}, x, folds=folds, layers=layers)


# --- MONAI -------------------------------------------------------------------------------------------------------


def test_monai_basic_unet_end_to_end(tmp_path):
    check_end_to_end(tmp_path, "monai.networks.nets:BasicUNet",
                     {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": [4, 4, 8, 8, 16, 4],
                      "norm": "batch"}, images(1, 1, 32, 32), folds=18, layers=18)


MONAI = {  # kwargs, input, layers folded, BatchNorm layers (HighResNet's pre-activation blocks normalize sums)
    "AttentionUnet": ({"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
                       "strides": [2, 2]}, images(1, 1, 32, 32), 14, 14),
    "VNet": ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2}, images(1, 1, 32, 32, 32), 24, 24),
    "HighResNet": ({"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "norm_type": "batch"},
                   images(1, 1, 32, 32), 12, 21),
    "UNETR": ({"in_channels": 1, "out_channels": 2, "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 48,
               "mlp_dim": 96, "num_heads": 4, "norm_name": "batch"}, images(1, 1, 32, 32, 32), 1, None),
    "SwinUNETR": ({"in_channels": 1, "out_channels": 2, "feature_size": 12, "spatial_dims": 2,
                   "norm_name": "batch"}, images(1, 1, 64, 64), 1, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MONAI))
def test_monai_networks_with_batch_norm_end_to_end(tmp_path, name):
    from monai.networks import nets

    kwargs, x, folds, layers = MONAI[name]
    if name in ("UNETR", "SwinUNETR"):
        pytest.importorskip("einops", reason=f"MONAI's {name} needs einops")
        layers = norm_layers(getattr(nets, name)(**kwargs))
    check_end_to_end(tmp_path, f"monai.networks.nets:{name}", kwargs, x, folds=folds, layers=layers)


# --- transformers ------------------------------------------------------------------------------------------------

TINY_RESNET = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64],
               "embedding_size": 8, "out_features": ["stage4"]}
TINY_DETR = {"use_timm_backbone": False, "use_pretrained_backbone": False, "backbone_config": TINY_RESNET,
             "d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
             "decoder_attention_heads": 2, "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "num_queries": 5}


def test_transformers_detr_frozen_batchnorm_end_to_end(tmp_path):
    folded = check_end_to_end(tmp_path, "transformers:DetrForObjectDetection", TINY_DETR,
                              {"pixel_values": images(1, 3, 64, 64)}, folds=16, layers=16)
    assert not any(type(m).__name__ == "DetrFrozenBatchNorm2d" for m in folded.modules())
    assert registry.by_key("transformers.DetrFrozenBatchNorm2d").family == "frozen"


LEVIT = {"image_size": 64, "hidden_sizes": [32, 48, 64], "num_attention_heads": [1, 2, 2], "depths": [1, 1, 1],
         "key_dim": [8, 8, 8], "patch_size": 16}


def test_transformers_levit_folds_batchnorm1d_after_flatten(tmp_path):
    check_end_to_end(tmp_path, "transformers:LevitForImageClassification", LEVIT,
                     {"pixel_values": images(2, 3, 64, 64)}, folds=26, layers=27)


TRANSFORMERS = {  # kwargs, layers folded, BatchNorm layers
    "ConditionalDetrForObjectDetection": (TINY_DETR, 16, 16),
    "TableTransformerForObjectDetection": (TINY_DETR, 16, 16),
    "MobileViTForImageClassification": ({"image_size": 64, "hidden_sizes": [32, 48, 64],
                                         "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]}, 32, 32),
    "EfficientNetForImageClassification": ({"image_size": 64, "width_coefficient": 0.25, "depth_coefficient": 0.25,
                                            "hidden_dim": 320}, 22, 22),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformers_models_end_to_end(tmp_path, name):
    kwargs, folds, layers = TRANSFORMERS[name]
    check_end_to_end(tmp_path, f"transformers:{name}", kwargs, {"pixel_values": images(2, 3, 64, 64)},
                     folds=folds, layers=layers)


# --- ultralytics, in half precision --------------------------------------------------------------------------------

YOLO = {"detect": ("DetectionModel", "yolov8n.yaml", 57), "segment": ("SegmentationModel", "yolov8n-seg.yaml", 66),
        "pose": ("PoseModel", "yolov8n-pose.yaml", 63), "classify": ("ClassificationModel", "yolov8n-cls.yaml", 26),
        "obb": ("OBBModel", "yolov8n-obb.yaml", 63)}


def check_yolo_half(tmp_path, task: str) -> None:
    cls, config, layers = YOLO[task]
    check_end_to_end(tmp_path, f"ultralytics.nn.tasks:{cls}", {"cfg": config, "verbose": False},
                     images(1, 3, 64, 64), folds=layers, layers=layers, half=True)


def test_ultralytics_detect_in_half_precision_end_to_end(tmp_path):
    check_yolo_half(tmp_path, "detect")


@pytest.mark.slow
@pytest.mark.parametrize("task", ["segment", "pose", "classify", "obb"])
def test_ultralytics_heads_in_half_precision_end_to_end(tmp_path, task):
    check_yolo_half(tmp_path, task)
