"""A sweep over real timm and torchvision architectures, randomly initialised: every target converts every model.

For each model and target: the conversion leaves no layer of another norm family behind, the converted model runs
forward and backward, and the targets that keep the statistics (frozen, sync, and bn back from sync or from frozen)
give the original model's eval output. Each model is also folded (the folded model gives the eval output) and
recalibrated with the sequential method, at the cost of one forward per batch. The default run covers one model of
each kind of norm layer; the whole set (more than 20 architectures) runs with ``-m slow``.
"""

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import normswap
from normswap.errors import PlanError
from normswap.recalibrate import calibration_report
from normswap.targets import TARGETS, classify

from .helpers import randomize_norm_layers

IMAGE = (2, 3, 32, 32)


@dataclass
class Architecture:
    build: Callable[[], nn.Module]
    input_shape: tuple = IMAGE
    backward: tuple = TARGETS
    """Targets whose converted model also runs a backward pass in the default run (the slow run does all)."""


def timm_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


# One of each: plain BatchNorm2d, timm BatchNormAct2d (with SE blocks, dense connections), BatchNorm1d,
# BatchNorm3d, and a detection backbone with torchvision's FrozenBatchNorm2d.
FAST = {
    "resnet18": Architecture(timm_model("resnet18")),
    "efficientnet_b0": Architecture(timm_model("efficientnet_b0")),
    "mobilenetv3_small_050": Architecture(timm_model("mobilenetv3_small_050")),
    "regnetx_002": Architecture(timm_model("regnetx_002")),
    "densenet121": Architecture(timm_model("densenet121")),
    "levit_128s (BatchNorm1d)": Architecture(timm_model("levit_128s", img_size=64), (2, 3, 64, 64)),
    "torchvision r3d_18 (BatchNorm3d)": Architecture(lambda: torchvision.models.video.r3d_18(num_classes=10),
                                                     (2, 3, 2, 16, 16), backward=("gn", "frozen")),
    "torchvision resnet18 FPN backbone (FrozenBatchNorm2d)": Architecture(
        lambda: resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d)
    ),
}

SLOW = {
    "resnet26d": Architecture(timm_model("resnet26d")),
    "mobilenetv3_large_100": Architecture(timm_model("mobilenetv3_large_100")),
    "regnety_002": Architecture(timm_model("regnety_002")),
    "vgg11_bn": Architecture(timm_model("vgg11_bn")),
    "mnasnet_050": Architecture(timm_model("mnasnet_050")),
    "lcnet_050": Architecture(timm_model("lcnet_050")),
    "ghostnet_050": Architecture(timm_model("ghostnet_050")),
    "rexnet_100": Architecture(timm_model("rexnet_100")),
    "dla34": Architecture(timm_model("dla34")),
    "mixnet_s": Architecture(timm_model("mixnet_s")),
    "tf_efficientnet_lite0": Architecture(timm_model("tf_efficientnet_lite0")),
    "cspresnet50": Architecture(timm_model("cspresnet50")),
    "hrnet_w18_small": Architecture(timm_model("hrnet_w18_small"), (2, 3, 64, 64)),
    "dpn68": Architecture(timm_model("dpn68")),
    "repvgg_a0": Architecture(timm_model("repvgg_a0")),
    "torchvision mobilenet_v2": Architecture(lambda: torchvision.models.mobilenet_v2(num_classes=10)),
    "torchvision shufflenet_v2_x0_5": Architecture(lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10)),
    "torchvision efficientnet_b0": Architecture(lambda: torchvision.models.efficientnet_b0(num_classes=10)),
    "torchvision regnet_y_400mf": Architecture(lambda: torchvision.models.regnet_y_400mf(num_classes=10)),
    "torchvision densenet121": Architecture(lambda: torchvision.models.densenet121(num_classes=10)),
    "torchvision vgg11_bn": Architecture(lambda: torchvision.models.vgg11_bn(num_classes=10)),
    "torchvision googlenet": Architecture(
        lambda: torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True), (2, 3, 64, 64)
    ),
    "torchvision resnet18 (FrozenBatchNorm2d)": Architecture(
        lambda: torchvision.models.resnet18(num_classes=10, norm_layer=FrozenBatchNorm2d)
    ),
    "torchvision resnet50 FPN backbone (FrozenBatchNorm2d)": Architecture(
        lambda: resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d),
        (2, 3, 64, 64),
    ),
}

FAMILY = {"bn": "bn", "sync": "sync", "frozen": "frozen", "gn": "gn", "ln": "gn", "in": "gn"}


def family(module: nn.Module):
    kind = classify(module)
    return None if kind is None else kind.family


def flat_output(output) -> torch.Tensor:
    """A model's output (a tensor, or a dict of feature maps) as one flat tensor."""
    if isinstance(output, dict):
        return torch.cat([value.flatten() for value in output.values()])
    return output.flatten()


def copy_norm_layers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with new norm layers that shares every other tensor (copying only what changes)."""
    norm_tensors = {id(t) for m in model.modules() if classify(m) for t in [*m.parameters(), *m.buffers()]}
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in norm_tensors}
    return copy.deepcopy(model, memo)


def run_forward_and_backward(model: nn.Module, x: torch.Tensor, label: str) -> None:
    model.train()
    model.zero_grad(set_to_none=True)
    flat_output(model(x)).square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), label


def assert_same_output(model: nn.Module, x: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    with torch.no_grad():
        out = flat_output(model.eval()(x))
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{label}: {m}")


def check_architecture(arch: Architecture, backward: tuple) -> None:
    torch.manual_seed(0)
    original = randomize_norm_layers(arch.build()).eval()
    x = torch.randn(arch.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = flat_output(original(x))
    assert torch.isfinite(expected).all()
    rank1 = [name for name, m in original.named_modules() if isinstance(m, nn.BatchNorm1d)]
    converted = {}
    for to in TARGETS:
        model = copy_norm_layers(original)
        exclude = None
        if to == "in" and rank1:
            with pytest.raises(PlanError, match="one channel per group"):
                normswap.plan(model, to)
            exclude = rank1
        model = normswap.convert(model, to, exclude=exclude)
        left = {name for name, m in model.named_modules() if family(m) not in (None, FAMILY[to])}
        assert left == set(exclude or []), f"{to}: layers left unconverted: {sorted(left)[:5]}"
        converted[to] = model
    for to in ("frozen", "sync"):
        assert_same_output(converted[to], x, expected, to)
    for middle in ("sync", "frozen"):
        back = normswap.convert(copy_norm_layers(converted[middle]), "bn")
        assert {family(m) for m in back.modules()} - {None} == {"bn"}
        assert_same_output(back, x, expected, f"bn from {middle}")
    for to, model in converted.items():
        if to in backward:
            run_forward_and_backward(model, x, to)
        else:
            with torch.no_grad():
                assert torch.isfinite(flat_output(model.eval()(x))).all(), to
    folded = normswap.plan_fold(copy.deepcopy(original), input_shape=arch.input_shape)
    assert folded.captured and len(folded) > 0, str(folded)
    assert_same_output(folded.apply(copy.deepcopy(original)), x, expected, "fold")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in original.modules()):  # not only frozen ones
        calibrated = normswap.recalibrate(copy.deepcopy(original), [x, x.flip(0)], method="sequential")
        assert calibration_report(calibrated).forward_cost <= 1.5


@pytest.mark.parametrize("name", FAST)
def test_every_target_converts_a_representative_architecture(name):
    check_architecture(FAST[name], backward=FAST[name].backward)


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_every_target_converts_every_architecture_of_the_sweep(name):
    check_architecture(SLOW[name], backward=TARGETS)


def test_the_whole_sweep_covers_more_than_twenty_architectures():
    assert len(FAST) + len(SLOW) >= 20
