"""Wrappers are looked through by every operation, as save does: torch.compile, DataParallel, timm's ModelEma*,
AveragedModel (DDP: tests/test_refine_distributed.py and tests/test_recalibrate_distributed.py run under it).

Each operation given a wrapped model works on the model inside, with the names that model has: a plan made through
``torch.compile`` names ``0`` and ``1``, not ``_orig_mod.1``, and the reports of fit, recalibrate and refine are read
through the wrapper they were run on.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.swa_utils import AveragedModel

import normswap
from normswap.fit import fit_converted
from normswap.inspection import inspect_model
from normswap.unwrap import unwrap_model, unwrapped

from .helpers import small_cnn

WRAPPERS = {
    "torch.compile": torch.compile,
    "DataParallel": nn.DataParallel,
    "ModelEmaV3": ModelEmaV3,
    "AveragedModel": AveragedModel,
}


def images(n: int = 16, seed: int = 0) -> list[torch.Tensor]:
    return list(torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).split(8))


def wrap(name: str, model: nn.Module) -> nn.Module:
    """``model`` in the wrapper ``name``; EMA and averaged models hold a copy, which is put back as ``model``."""
    wrapper = WRAPPERS[name](model)
    if unwrapped(wrapper) is not model:
        wrapper.module = model
    return wrapper


@pytest.mark.parametrize("name", WRAPPERS)
def test_the_chain_ends_at_the_model_inside_any_number_of_wrappers(name):
    model = small_cnn()
    outer = nn.DataParallel(wrap(name, model))
    chain = unwrap_model(outer)
    assert chain[0] is outer and chain[-1] is model and len(chain) == 3
    assert unwrapped(model) is model


@pytest.mark.parametrize("name", WRAPPERS)
def test_plan_convert_and_inspect_see_the_model_s_own_names(name):
    model = small_cnn()
    expected = [row.name for row in normswap.plan(model, "gn", groups=4).rows]
    assert expected == ["1", "4"]
    assert [row.name for row in normswap.plan(wrap(name, model), "gn", groups=4).rows] == expected
    assert [report.names for report in inspect_model(wrap(name, model))] == [["1"], ["4"]]
    converted = normswap.convert(wrap(name, model), "gn", groups=4)
    assert converted is model and isinstance(model[1], nn.GroupNorm)


def test_fit_report_through_torch_compile():
    model = normswap.convert(small_cnn(), "gn", groups=4, affine="fit", data=images())
    report = normswap.fit_report(torch.compile(model))
    assert [layer.name for layer in report.layers] == ["1", "4"]
    assert report == normswap.fit_report(model)


@pytest.mark.parametrize("name", WRAPPERS)
def test_fit_through_a_wrapper_fits_the_model_inside(name):
    original = small_cnn()
    model = copy.deepcopy(original)
    normswap.convert(wrap(name, model), "gn", groups=4, affine="fit", data=images())
    expected = normswap.convert(copy.deepcopy(original), "gn", groups=4, affine="fit", data=images())
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_fit_converted_looks_through_wrappers_around_both_models():
    original = small_cnn()
    plan = normswap.plan(original, "gn", groups=4, affine="fit")
    expected = plan.apply(copy.deepcopy(original), data=images())
    converted = copy.deepcopy(expected)
    with torch.no_grad():  # back to the copied BatchNorm affine, as the conversion left it before fitting
        for name in ("1", "4"):
            converted.get_submodule(name).weight.copy_(original.get_submodule(name).weight)
            converted.get_submodule(name).bias.copy_(original.get_submodule(name).bias)
    report = fit_converted(torch.compile(converted), nn.DataParallel(original), plan.rows, data=images())
    assert report == normswap.fit_report(expected)
    for key, value in expected.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


@pytest.mark.parametrize("name", WRAPPERS)
def test_recalibrate_and_its_report_through_a_wrapper(name):
    model, alone = small_cnn(), small_cnn()
    wrapper = wrap(name, model)
    assert normswap.recalibrate(wrapper, images(), progress=False) is wrapper
    normswap.recalibrate(alone, images(), progress=False)
    assert torch.equal(model[1].running_var, alone[1].running_var)
    assert normswap.calibration_report(wrapper).calibrated == ["1", "4"]


@pytest.mark.parametrize("name", WRAPPERS)
def test_refine_and_its_report_through_wrappers_around_both_models(name):
    original = small_cnn()
    converted = normswap.convert(copy.deepcopy(original), "gn", groups=4)
    alone = copy.deepcopy(converted)
    wrapper = wrap(name, converted)
    assert normswap.refine(wrapper, nn.DataParallel(original), images(), steps=3, progress=False) is wrapper
    normswap.refine(alone, original, images(), steps=3, progress=False)
    assert normswap.refine_report(wrapper).evaluations == normswap.refine_report(alone).evaluations
    assert normswap.refine_report(wrap(name, converted)).steps == 3
    for key, value in alone.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key


@pytest.mark.parametrize("name", WRAPPERS)
def test_fold_and_plan_fold_through_a_wrapper(name):
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    assert [pair.bn for pair in normswap.plan_fold(wrap(name, model)).pairs] == ["1", "4"]
    folded = normswap.fold(wrap(name, model))
    assert folded is model and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_compare_looks_through_both_models_wrappers():
    model = small_cnn()
    report = normswap.compare(torch.compile(model), nn.DataParallel(copy.deepcopy(model)), images())
    assert report.max_abs == 0.0 and report.first_divergence is None
