"""A plan takes effect one way, ``Plan.apply``: whether it comes from ``normswap.plan``, ``convert``, a recipe or the
command line, a plan made with ``affine="fit"`` fits (and needs data), and nothing is half done when it fails."""

import copy

import pytest
import torch
from torch import nn

import normswap
from normswap.errors import CalibrationError, PlanError
from normswap.history import get_history
from normswap.recipe import Recipe, Rule

from .helpers import randomize_norm_layers, small_cnn


def images(n=16, seed=0):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_a_fit_plan_fits_when_applied_and_refuses_to_apply_without_data():
    model = small_cnn()
    p = normswap.plan(model, "gn", groups=4, affine="fit")
    with pytest.raises(PlanError, match="fits the GroupNorm affine weights.*pass the calibration data"):
        p.apply(model)
    assert type(model[1]) is nn.BatchNorm2d and not get_history(model)
    fitted = p.apply(copy.deepcopy(model), data=images().split(8))
    assert [step["op"] for step in get_history(fitted)] == ["plan", "fit"]
    same = normswap.convert(copy.deepcopy(model), "gn", groups=4, affine="fit", data=images().split(8))
    torch.testing.assert_close(same[1].weight, fitted[1].weight, rtol=0, atol=0)


def test_a_recipe_rule_with_a_fitted_affine_fits():
    model = small_cnn()
    recipe = Recipe([Rule(["*"], "gn", {"groups": 4, "affine": "fit"})])
    with pytest.raises(PlanError, match="pass the calibration data"):
        recipe.apply(copy.deepcopy(model))
    fitted = recipe.apply(copy.deepcopy(model), data=images().split(8))
    assert "fit" in [step["op"] for step in get_history(fitted)]


class FailingLoader:
    def __iter__(self):
        yield images(8)
        raise OSError("disk went away")


def test_a_fit_that_fails_leaves_the_model_as_it_was():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = list(model)
    with pytest.raises(CalibrationError, match="reading batch 1 failed in the data loader: OSError: disk went away"):
        normswap.convert(model, "gn", groups=4, affine="fit", data=FailingLoader())
    assert list(model) == layers and not get_history(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_batchnorm_without_bias_is_fitted():
    torch.manual_seed(0)
    model = randomize_norm_layers(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, bias=False))).eval()
    fitted = normswap.convert(copy.deepcopy(model), "gn", groups=2, affine="fit", data=images().split(8))
    assert fitted[1].bias is not None  # the fit is affine: it gives the GroupNorm a shift
    x = images(4, seed=3)
    error = (fitted(x) - model(x)).norm() / model(x).norm()
    copied = normswap.convert(copy.deepcopy(model), "gn", groups=2)
    assert error < (copied(x) - model(x)).norm() / model(x).norm()


def test_sync_layers_take_the_process_group_they_are_given():
    group = object()  # any value torch.distributed would hand out
    model = normswap.convert(small_cnn(), "sync", process_group=group)
    assert all(m.process_group is group for m in model.modules() if isinstance(m, nn.SyncBatchNorm))
    with pytest.raises(PlanError, match="process_group= applies to the 'sync' target"):
        normswap.convert(small_cnn(), "frozen", process_group=group)
