"""Sequential recalibration of models users bring (ultralytics, transformers, timm, torchvision), none of which
torch.fx can trace whole: the statistics equal a float64 eval-consistent reference computed layer by layer, and
every batch's forward runs once (``forward_cost`` 1.0). Deep in these models float32 rounding of the activations
shows in the statistics: normswap's float32 run is held to the float64 reference as closely as the same definition
computed in float32 is."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from normswap.recalibrate import calibration_report, recalibrate

from .helpers import randomize_norm_layers
from .test_recalibrate import assert_statistics, eval_consistent_reference, images, population_statistics


def yolov8n() -> nn.Module:
    from ultralytics import YOLO

    return YOLO("yolov8n.yaml").model


def transformers_resnet() -> nn.Module:
    import transformers

    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1])
    return transformers.ResNetForImageClassification(config)


class LogitsOnly(nn.Module):
    """A transformers classifier returning its logits tensor (the reference helper calls ``model(x)``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


MODELS = {
    "ultralytics yolov8n": (yolov8n, (3, 64, 64)),
    "transformers ResNet": (lambda: LogitsOnly(transformers_resnet()), (3, 32, 32)),
}

SLOW = {
    "timm efficientvit_m0": (lambda: timm.create_model("efficientvit_m0", num_classes=10), (3, 64, 64)),
    "timm bat_resnext26ts": (lambda: timm.create_model("bat_resnext26ts", num_classes=10), (3, 256, 256)),
    "torchvision shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), (3, 32, 32)),
}
"""The models on which sequential recalibration used to cost the most forwards (up to 69 on efficientvit_m0)."""


def largest_error(statistics: dict, expected: dict) -> float:
    """The largest difference of a running mean or variance from the expected one, relative to the variance."""
    errors = []
    for name, (mean, var) in expected.items():
        got_mean, got_var = statistics[name]
        scale = var + 1e-12
        errors += [((got_mean - mean).abs() / scale.sqrt()).max().item(), ((got_var - var).abs() / scale).max().item()]
    return max(errors)


def check(build, shape) -> None:
    torch.manual_seed(0)
    model = randomize_norm_layers(build()).eval()
    data = images([2, 3], shape=shape)
    expected = eval_consistent_reference(model, data)
    in_float32 = eval_consistent_reference(model, data, dtype=torch.float32)
    recalibrate(model, data, method="sequential")
    got = {name: (model.get_submodule(name).running_mean.double(), model.get_submodule(name).running_var.double())
           for name in expected}
    assert largest_error(got, expected) <= 3 * largest_error(in_float32, expected) + 1e-6
    report = calibration_report(model)
    assert report.forward_cost == 1.0 and len(report.calibrated) == len(expected)


@pytest.mark.parametrize("name", MODELS)
def test_sequential_recalibration_of_library_models_equals_the_float64_reference(name):
    check(*MODELS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_sequential_recalibration_of_the_sweeps_costliest_models_runs_one_forward_per_batch(name):
    build, shape = SLOW[name]
    torch.manual_seed(0)
    model = randomize_norm_layers(build()).eval()
    data = images([2, 3], shape=shape)
    recalibrate(model, data, method="sequential")
    assert_statistics(model, population_statistics(model, data, batch_statistics=False))
    report = calibration_report(model)
    assert report.forward_cost == 1.0 and report.passes == len(report.calibrated) > 20
