"""Differential privacy with Opacus: a BatchNorm model converted to GroupNorm is accepted and gets exact per-sample
gradients.

Opacus' own ``ModuleValidator.fix`` replaces ``nn.BatchNorm*`` but not timm's fused ``BatchNormAct2d`` (EfficientNet,
MobileNetV3, ...), which its ``GradSampleModule`` then refuses; normswap converts those too, keeping the activation.
"""

import copy

import pytest
import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

import normswap
from tests.helpers import randomize_norm_layers

opacus = pytest.importorskip("opacus")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def not_in_place(model: nn.Module) -> nn.Module:
    """Opacus refuses in-place changes to a hooked layer's output (timm models default to in-place activations)."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
    return model


def per_sample_grads_by_loop(model: nn.Module, x: torch.Tensor, parameter: str) -> torch.Tensor:
    grads = []
    for i in range(len(x)):
        single = copy.deepcopy(model)
        single(x[i:i + 1]).sum().backward()
        grads.append(single.get_parameter(parameter).grad)
    return torch.stack(grads)


def test_a_converted_timm_model_passes_opacus_validation_and_trains_per_sample():
    model = normswap.convert(timm.create_model("efficientnet_b0", num_classes=10), "gn", groups=8)
    assert opacus.validators.ModuleValidator.validate(model, strict=False) == []
    wrapped = opacus.GradSampleModule(not_in_place(model), loss_reduction="sum")
    wrapped(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad_sample.shape[0] == 2 for p in model.parameters() if p.requires_grad)


def test_opacus_per_sample_gradients_of_a_converted_fused_layer_match_a_per_sample_loop():
    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.SiLU), nn.Flatten(),
                             nn.Linear(8 * 6 * 6, 3))
    model = not_in_place(normswap.convert(randomize_norm_layers(original), "gn", groups=4))
    x = torch.randn(4, 3, 8, 8)
    wrapped = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    wrapped(x).sum().backward()
    for name in ("1.weight", "1.bias"):
        expected = per_sample_grads_by_loop(model, x, name)
        torch.testing.assert_close(wrapped._module.get_parameter(name).grad_sample, expected, rtol=1e-5, atol=1e-6)
