"""Folding the models users bring from ultralytics, transformers, segmentation_models_pytorch, torchvision detection
and video, and MONAI, randomly initialised: every BatchNorm that follows a Conv/Linear is folded without ``within=``
or an example input, and the folded model computes the unfused eval model's output. ultralytics' own ``fuse()`` is
run side by side. The default run covers one model of each library; ``-m slow`` the rest."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torchvision
from torch import nn

from normswap.data import call_model, move_input, output_tensors
from normswap.fold import plan_fold

from .helpers import randomize_norm_layers


def norm_layers(model: nn.Module) -> int:
    frozen = torchvision.ops.misc.FrozenBatchNorm2d
    return sum(isinstance(m, (nn.modules.batchnorm._BatchNorm, frozen)) for m in model.modules())


def relative_difference(got: Any, expected: Any) -> float:
    pairs = list(zip(output_tensors(got), output_tensors(expected)))
    assert pairs
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item() for a, b in pairs)


def fold_and_compare(model: nn.Module, x: Any, *, run: Callable[[nn.Module, Any], Any] = call_model,
                     **options) -> tuple[nn.Module, Any, float]:
    """Plan and fold a randomized ``model`` (planning on the example its architecture gives, unless ``options``
    say), and return the folded model, the plan, and the largest relative difference of its output on ``x`` from the
    unfused eval model's: at most 1e-5 where the model's own float32-vs-float64 difference is below that."""
    torch.manual_seed(0)
    model = randomize_norm_layers(model).eval()
    original = copy.deepcopy(model)
    p = plan_fold(model, **options)
    folded = p.apply(model)
    with torch.no_grad():
        expected = run(original, x)
        difference = relative_difference(run(folded, x), expected)
        in_float64 = run(copy.deepcopy(original).double(), move_input(x, None, dtype=torch.float64))
        rounding = relative_difference(expected, in_float64)
    assert difference <= 1e-5 or rounding >= 1e-5, (difference, rounding)
    return folded, p, difference


def assert_everything_folded(model: nn.Module, p) -> None:
    assert p.captured and not p.left, str(p)
    assert norm_layers(model) == 0


# --- ultralytics -------------------------------------------------------------------------------------------------


def check_yolo(config: str, layers: int) -> None:
    from ultralytics import YOLO

    model = YOLO(config).model
    assert norm_layers(model) == layers
    x = torch.rand(1, 3, 320, 320)
    folded, p, _ = fold_and_compare(copy.deepcopy(model), x)
    assert_everything_folded(folded, p)
    assert "1x3x640x640 (ultralytics' documented input size)" in p.example
    torch.manual_seed(0)
    theirs = randomize_norm_layers(model).eval()
    with torch.no_grad():
        expected = copy.deepcopy(theirs)(x)
        theirs.fuse(verbose=False)
        assert norm_layers(theirs) == 0, "ultralytics fuses every BatchNorm too"
        assert relative_difference(theirs(x), expected) < 1e-5
    assert len(p) == layers


def test_yolov8n_folds_all_57_batchnorms_as_ultralytics_fuse_does():
    check_yolo("yolov8n.yaml", 57)


@pytest.mark.slow
def test_yolo11n_folds_all_81_batchnorms_as_ultralytics_fuse_does():
    check_yolo("yolo11n.yaml", 81)


# --- transformers ------------------------------------------------------------------------------------------------


def transformers_model(name: str) -> nn.Module:
    import transformers

    configs = {
        "ResNet": transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1]),
        "MobileNetV2": transformers.MobileNetV2Config(depth_multiplier=0.35),
        "RegNet": transformers.RegNetConfig(embedding_size=16, hidden_sizes=[16, 24, 32, 48], depths=[1, 1, 2, 1],
                                            groups_width=8),
    }
    return getattr(transformers, f"{name}Model")(configs[name])


@pytest.mark.parametrize("name", ["ResNet", pytest.param("MobileNetV2", marks=pytest.mark.slow),
                                  pytest.param("RegNet", marks=pytest.mark.slow)])
def test_transformers_vision_models_fold_every_batchnorm(name):
    model = transformers_model(name)
    folded, p, _ = fold_and_compare(model, {"pixel_values": torch.randn(2, 3, 64, 64)})
    assert_everything_folded(folded, p)
    assert "(the transformers config)" in p.example


# --- segmentation_models_pytorch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["FPN", pytest.param("DeepLabV3Plus", marks=pytest.mark.slow)])
def test_smp_models_fold_every_batchnorm_without_within(name):
    import segmentation_models_pytorch as smp

    model = getattr(smp, name)(encoder_name="resnet18", encoder_weights=None, classes=2)
    folded, p, _ = fold_and_compare(model, torch.randn(2, 3, 64, 64))
    assert_everything_folded(folded, p)
    assert any(pair.bn.startswith("decoder") for pair in p.pairs) == (name == "DeepLabV3Plus")  # FPN: GroupNorm


# --- torchvision detection and video ---------------------------------------------------------------------------


def detection_model(name: str, **kwargs) -> nn.Module:
    return getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None, **kwargs)


def backbone_features(model: nn.Module, images: list[torch.Tensor]) -> Any:
    """The features the detection head works on: every BatchNorm of these models is in the backbone, and comparing
    the boxes after non-maximum suppression would compare float rounding near its thresholds."""
    batch, _ = model.transform(images)
    return model.backbone(batch.tensors)


DETECTION = {
    "fasterrcnn_resnet50_fpn": 53,
    "retinanet_resnet50_fpn": 53,
    "fcos_resnet50_fpn": 53,
    "maskrcnn_resnet50_fpn": 53,
    "keypointrcnn_resnet50_fpn": 53,
    "fasterrcnn_mobilenet_v3_large_fpn": 46,
    "ssdlite320_mobilenet_v3_large": 70,
}


@pytest.mark.parametrize("name", [name if name == "fasterrcnn_resnet50_fpn" else
                                  pytest.param(name, marks=pytest.mark.slow) for name in DETECTION])
def test_torchvision_detection_models_fold_their_backbone_without_within(name):
    small = {"min_size": 320, "max_size": 320} if "ssdlite" not in name else {}
    model = detection_model(name, **small)
    assert norm_layers(model) == DETECTION[name]
    folded, p, _ = fold_and_compare(model, [torch.rand(3, 200, 240)], run=backbone_features)
    assert_everything_folded(folded, p)
    assert len(p) == DETECTION[name] and "[3x224x224]" in p.example
    with torch.no_grad():
        detections = folded([torch.rand(3, 200, 240)])
    assert set(detections[0]) >= {"boxes", "scores", "labels"}


@pytest.mark.parametrize("name", ["r3d_18", pytest.param("mc3_18", marks=pytest.mark.slow)])
def test_torchvision_video_models_fold_their_conv3d_subclasses(name):
    model = getattr(torchvision.models.video, name)(num_classes=10)
    folded, p, _ = fold_and_compare(model, torch.randn(1, 3, 4, 32, 32), input_shape=(1, 3, 4, 32, 32))
    assert_everything_folded(folded, p)
    assert len(p) == 20 and any(pair.conv_class.endswith(".Conv3DSimple") for pair in p.pairs)


# --- MONAI -------------------------------------------------------------------------------------------------------


def test_monai_dynunet_folds_all_10_batchnorms_though_each_block_has_two_names():
    from monai.networks.nets import DynUNet

    model = DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                    upsample_kernel_size=[2, 2], norm_name="batch")
    names = [name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.BatchNorm3d)]
    assert norm_layers(model) == 10 and len(names) > 10
    folded, p, _ = fold_and_compare(model, torch.randn(2, 1, 16, 16, 16))
    assert_everything_folded(folded, p)
    assert not any(isinstance(m, nn.BatchNorm3d) for _, m in folded.named_modules(remove_duplicate=False))
