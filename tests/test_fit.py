"""Fitted GroupNorm affine: a converted model that keeps working, checked against the original and float64 maths."""

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.demo import agreement
from normswap.errors import CalibrationError, NormswapError, PlanError
from normswap.fit import fit_report
from normswap.history import get_history
from normswap.plan import plan

from .helpers import gn_groups, randomize_norm_layers, small_cnn


def images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def relative_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(x)
        return ((model(x) - expected).pow(2).sum() / expected.pow(2).sum()).item()


def affine_state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fit_keeps_the_demo_model_working_where_copy_and_reset_ruin_it(demo_model, digits):
    test = digits.test_images
    results = {}
    for affine in ("copy", "reset", "fit"):
        options = {"data": digits.train_images[:64].split(16)} if affine == "fit" else {}
        converted = normswap.convert(copy.deepcopy(demo_model), "gn", groups=8, affine=affine, **options)
        results[affine] = agreement(converted, demo_model, test)
    assert results["fit"] >= 0.88
    assert results["fit"] > results["copy"] + 0.5 and results["fit"] > results["reset"] + 0.5


def test_layer_norm_fit_on_the_demo_model_beats_copy(demo_model, digits):
    copied = normswap.convert(copy.deepcopy(demo_model), "ln", affine="copy")
    fitted = normswap.convert(copy.deepcopy(demo_model), "ln", affine="fit", data=digits.train_images[:64].split(16))
    assert agreement(fitted, demo_model, digits.test_images) >= 0.9
    assert agreement(fitted, demo_model, digits.test_images) > agreement(copied, demo_model, digits.test_images) + 0.5


@pytest.mark.parametrize("to", ["gn", "ln", "in"])
def test_fit_brings_the_output_closer_to_the_original_than_copy(to):
    model = small_cnn()
    held_out = images(32, seed=5)
    copied = normswap.convert(copy.deepcopy(model), to, **gn_groups(to, 4), affine="copy")
    fitted = normswap.convert(copy.deepcopy(model), to, **gn_groups(to, 4), affine="fit", data=images(64).split(16))
    assert relative_error(fitted, model, held_out) < 0.5 * relative_error(copied, model, held_out)


def test_a_single_layer_fit_gives_each_channel_the_float64_mean_and_variance_of_its_target():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    randomize_norm_layers(model, seed=3).eval()
    data = images(10, seed=2)
    fitted = normswap.convert(copy.deepcopy(model), "gn", groups=3, affine="fit", data=[data])
    with torch.no_grad():
        x = model[0](data).double()
        normalized = F.group_norm(x, 3, eps=model[1].eps)
        expected = F.batch_norm(x, model[1].running_mean.double(), model[1].running_var.double(),
                                model[1].weight.double(), model[1].bias.double(), eps=model[1].eps)
    assert [layer.kept for layer in fit_report(fitted).layers] == ["fit"]
    for c in range(6):
        x_c, t_c = normalized[:, c].flatten(), expected[:, c].flatten()
        design = torch.stack([x_c, torch.ones_like(x_c)], 1)
        least_squares = torch.linalg.lstsq(design, t_c.unsqueeze(1)).solution.flatten()
        correlation = torch.corrcoef(torch.stack([x_c, t_c]))[0, 1]
        scale = least_squares[0] / correlation.abs()  # the least-squares slope, undone of its shrinkage
        torch.testing.assert_close(fitted[1].weight[c].double(), scale, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fitted[1].bias[c].double(), t_c.mean() - scale * x_c.mean(), rtol=1e-5, atol=1e-6)
        output = fitted[1].weight[c].double() * x_c + fitted[1].bias[c].double()
        torch.testing.assert_close(output.mean(), t_c.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(output.std(), t_c.std(), rtol=1e-5, atol=1e-6)


def test_when_group_norm_can_match_batch_norm_exactly_the_fit_finds_it():
    # Every sample has the same per-channel mean and variance, so per-sample (instance) statistics are fixed and
    # BatchNorm with any statistics is an exact per-channel affine map of InstanceNorm's output.
    bn = randomize_norm_layers(nn.BatchNorm2d(4), seed=4).eval()
    noise = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    standardized = (noise - noise.mean((2, 3), keepdim=True)) / noise.std((2, 3), unbiased=False, keepdim=True)
    data = standardized * torch.tensor([0.5, 1.0, 2.0, 3.0]).view(1, 4, 1, 1) + torch.tensor([1.0, -2, 0, 4]).view(
        1, 4, 1, 1)
    fitted = normswap.convert(copy.deepcopy(bn), "in", affine="fit", data=data.split(3))
    with torch.no_grad():
        torch.testing.assert_close(fitted(data), bn(data), rtol=1e-5, atol=1e-5)
    assert fit_report(fitted).layers[0].r2 == pytest.approx(1.0, abs=1e-9)


def test_the_fit_depends_on_the_images_not_on_how_they_are_batched():
    model = small_cnn()
    data = images(50)
    whole = normswap.convert(copy.deepcopy(model), "gn", groups=4, affine="fit", data=[data])
    uneven = normswap.convert(copy.deepcopy(model), "gn", groups=4, affine="fit", data=data.split(16))
    assert [len(b) for b in data.split(16)] == [16, 16, 16, 2]
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(uneven.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_batches_limits_the_calibration_data():
    model = small_cnn()
    data = images(48).split(16)
    first = normswap.convert(copy.deepcopy(model), "gn", groups=4, affine="fit", data=data[:1])
    limited = normswap.convert(copy.deepcopy(model), "gn", groups=4, affine="fit", data=data, batches=1)
    assert fit_report(limited).batches == 1
    torch.testing.assert_close(limited[1].weight, first[1].weight)


def test_in_place_activations_after_the_norm_layer_do_not_change_the_fit():
    data = images(32).split(8)
    inplace = normswap.convert(small_cnn(inplace=True), "gn", groups=4, affine="fit", data=data)
    out_of_place = normswap.convert(small_cnn(inplace=False), "gn", groups=4, affine="fit", data=data)
    for key, value in out_of_place.state_dict().items():
        torch.testing.assert_close(inplace.state_dict()[key], value, rtol=1e-5, atol=1e-6)


class OverwritesItsInput(nn.Module):
    """Uses one BatchNorm twice and changes the tensor it read in place in between."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.inplace = inplace

    def forward(self, x):
        x = self.conv(x)
        first = self.bn(x)
        x = x.mul_(-0.5) if self.inplace else x.mul(-0.5)
        return first + self.bn(x)


def test_a_shared_layer_whose_input_is_overwritten_in_place_is_fitted_on_what_it_saw():
    data = images(16).split(8)
    fitted = {}
    for inplace in (True, False):
        torch.manual_seed(0)
        model = randomize_norm_layers(OverwritesItsInput(inplace), seed=2).eval()
        fitted[inplace] = normswap.convert(model, "gn", groups=2, affine="fit", data=data)
    torch.testing.assert_close(fitted[True].bn.weight, fitted[False].bn.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fitted[True].bn.bias, fitted[False].bn.bias, rtol=1e-5, atol=1e-6)


def test_timm_fused_norm_act_layers_are_fitted_before_their_activation():
    torch.manual_seed(0)
    model = randomize_norm_layers(timm.create_model("mobilenetv3_small_050", num_classes=4), seed=0).eval()
    held_out = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    copied = normswap.convert(copy.deepcopy(model), "gn", groups=8, affine="copy")
    fitted = normswap.convert(copy.deepcopy(model), "gn", groups=8, affine="fit",
                              data=torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)).split(8))
    assert type(fitted.bn1).__name__ == "GroupNormAct" and fitted.bn1.act.inplace
    assert relative_error(fitted, model, held_out) < 0.5 * relative_error(copied, model, held_out)
    layers = fit_report(fitted).layers
    assert len(layers) == 34 and all(layer.r2 is not None for layer in layers) and layers[0].r2 > 0.95


def test_the_report_has_every_layer_and_auto_keeps_the_target_with_the_smaller_output_error():
    model = small_cnn()
    fitted = normswap.convert(copy.deepcopy(model), "gn", groups=4, affine="fit", data=images(32).split(16),
                              fit_target="auto")
    report = fit_report(fitted)
    assert [layer.name for layer in report.layers] == ["1", "4"]
    assert all(0 < layer.r2 <= 1 for layer in report.layers)
    assert set(report.output_error) == {"global", "local"}
    assert report.chosen == min(report.output_error, key=report.output_error.get)
    single = normswap.convert(copy.deepcopy(model), "gn", groups=4, affine="fit", data=images(32).split(16),
                              fit_target=report.chosen)
    torch.testing.assert_close(fitted[4].weight, single[4].weight)
    assert "R2" in str(report) and [step["op"] for step in get_history(fitted)] == ["plan", "fit"]


def test_fit_report_of_a_model_that_was_not_fitted_is_an_error():
    with pytest.raises(NormswapError, match="no fitted affine"):
        fit_report(normswap.convert(small_cnn(), "gn", groups=4))


def test_a_layer_the_data_never_reaches_keeps_its_copied_affine_and_is_reported():
    class WithUnusedHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = small_cnn()
            self.unused = nn.BatchNorm1d(5)

        def forward(self, x):
            return self.body(x)

    model = randomize_norm_layers(WithUnusedHead(), seed=1).eval()
    weight = model.unused.weight.detach().clone()
    fitted = normswap.convert(model, "gn", groups=4, affine="fit", data=[images(4)])
    unused = next(layer for layer in fit_report(fitted).layers if layer.name == "unused")
    assert unused.r2 is None and "not run" in unused.note
    torch.testing.assert_close(fitted.unused.weight, weight)


def test_training_flags_are_kept():
    model = small_cnn().train()
    model[3].eval()
    fitted = normswap.convert(model, "gn", groups=4, affine="fit", data=[images(4)])
    assert fitted.training and not fitted[3].training and fitted[1].training


def test_a_model_that_is_itself_a_norm_layer_becomes_a_fitted_group_norm():
    bn = randomize_norm_layers(nn.BatchNorm2d(4), seed=0).eval()
    fitted = normswap.convert(bn, "ln", affine="fit", data=[torch.randn(4, 4, 5, 5)])
    assert type(fitted) is nn.GroupNorm and fitted.num_groups == 1
    assert fit_report(fitted).layers[0].r2 > 0


@pytest.mark.parametrize(
    "data, error, message",
    [
        (None, PlanError, "pass the calibration data"),
        ([], CalibrationError, "empty"),
        (iter(()), CalibrationError, "empty"),
        (["not a tensor"], CalibrationError, "batch 0"),
        ([torch.full((2, 3, 16, 16), float("nan"))], CalibrationError, "non-finite"),
    ],
    ids=["no data", "empty list", "empty iterator", "malformed batch", "non-finite"],
)
def test_bad_calibration_data_is_a_clear_error_and_leaves_the_model_as_it_was(data, error, message):
    model = small_cnn()
    before = affine_state(model)
    layers = list(model)
    with pytest.raises(error, match=message):
        normswap.convert(model, "gn", groups=4, affine="fit", data=data)
    assert list(model) == layers and type(model[1]) is nn.BatchNorm2d
    assert get_history(model) == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


class FailsOnSecondCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("interrupted")
        return x


def test_an_error_after_some_layers_were_fitted_restores_the_model_and_its_parameters():
    model = small_cnn()
    model.insert(3, FailsOnSecondCall())  # after the first BatchNorm: the second batch reaches it once that is fitted
    before = affine_state(model)
    weight_object = model[1].weight
    with pytest.raises(RuntimeError, match="interrupted"):
        normswap.convert(model, "gn", groups=4, affine="fit", data=[images(4), images(4, seed=1)])
    assert type(model[1]) is nn.BatchNorm2d and model[1].weight is weight_object
    assert get_history(model) == []
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


class CountsForwards(nn.Module):
    """Counts the forwards of every copy of the model it is in (the reference the fit keeps is a deep copy)."""

    calls: dict = {}

    def forward(self, x):
        CountsForwards.calls[id(self)] = CountsForwards.calls.get(id(self), 0) + 1
        return x


@pytest.mark.parametrize("target, converted_runs", [("global", 1), ("local", 1), ("auto", 2)])
def test_each_model_runs_once_per_batch_and_target_not_once_per_layer(target, converted_runs):
    model = small_cnn()
    model.insert(0, CountsForwards())
    CountsForwards.calls = {}
    data = images(12).split(4)
    fitted = normswap.convert(model, "gn", groups=4, affine="fit", data=data, fit_target=target)
    converted = CountsForwards.calls.pop(id(fitted[0]))
    (reference,) = CountsForwards.calls.values()
    assert (converted, reference) == (converted_runs * len(data), len(data))


def test_a_layer_called_twice_is_fitted_on_both_calls():
    torch.manual_seed(0)
    model = randomize_norm_layers(OverwritesItsInput(inplace=False), seed=2).eval()
    fitted = normswap.convert(copy.deepcopy(model), "gn", groups=2, affine="fit", data=images(16).split(8))
    x = images(16)
    with torch.no_grad():
        y = model.conv(x)
        targets = torch.cat([model.bn(y), model.bn(y * -0.5)]).double()
        normalized = torch.cat([F.group_norm(y, 2, eps=model.bn.eps), F.group_norm(y * -0.5, 2, eps=model.bn.eps)])
    for c in range(8):  # both calls' values, pooled: the fitted output has the target's mean and spread
        x, t = normalized[:, c].flatten().double(), targets[:, c].flatten()
        scale = torch.sign(((x - x.mean()) * (t - t.mean())).mean()) * t.std(unbiased=False) / x.std(unbiased=False)
        torch.testing.assert_close(fitted.bn.weight[c].double(), scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fitted.bn.bias[c].double(), t.mean() - scale * x.mean(), rtol=1e-4, atol=1e-5)


def test_options_are_checked():
    model = small_cnn()
    with pytest.raises(PlanError, match="unknown fit target"):
        normswap.convert(model, "gn", groups=4, affine="fit", data=[images(2)], fit_target="nearest")
    with pytest.raises(PlanError, match="target only apply to a plan made with affine='fit'"):
        plan(model, "gn", groups=4).apply(model, data=[images(2)], fit_target="local")
    with pytest.raises(PlanError, match="data only apply to a plan made with affine='fit'"):
        normswap.convert(model, "gn", groups=4, data=[images(2)])
    assert type(model[1]) is nn.BatchNorm2d


@pytest.mark.cuda
def test_fit_runs_on_the_gpu_and_gives_the_cpu_result():
    data = images(32).split(16)
    on_cpu = normswap.convert(small_cnn(), "gn", groups=4, affine="fit", data=data)
    on_gpu = normswap.convert(small_cnn(), "gn", groups=4, affine="fit", data=data, device="cuda")
    assert on_gpu[1].weight.device.type == "cpu"
    torch.testing.assert_close(on_gpu[4].weight, on_cpu[4].weight, rtol=1e-4, atol=1e-5)
    gpu_model = normswap.convert(small_cnn().cuda(), "gn", groups=4, affine="fit", data=data)
    torch.testing.assert_close(gpu_model[4].weight.cpu(), on_cpu[4].weight, rtol=1e-4, atol=1e-5)


def test_a_layer_keeps_the_copied_affine_where_that_matches_its_target_better_than_the_fit():
    # Each sample is a large random offset plus one fixed spatial pattern, and the BatchNorm's running variance is
    # that of the pattern alone. Its output is then mostly the offset, which InstanceNorm removes: the normalized
    # input hardly correlates with the target, and a fit that gives it the target's large variance adds more error
    # than the copied BatchNorm affine, whose scale is the least-squares one here.
    generator = torch.Generator().manual_seed(0)
    pattern = torch.randn(1, 2, 5, 5, generator=generator)
    data = 5 * torch.randn(64, 2, 1, 1, generator=generator) + pattern
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.running_mean.copy_(data.mean((0, 2, 3)))
        bn.running_var.copy_(pattern.var((0, 2, 3)))
        bn.weight.copy_(torch.tensor([0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2]))
    fitted = normswap.convert(copy.deepcopy(bn), "in", affine="fit", data=data.split(16))
    layer = fit_report(fitted).layers[0]
    assert layer.kept == "copy" and layer.r2 == layer.copy_r2
    torch.testing.assert_close(fitted.weight, bn.weight)
    torch.testing.assert_close(fitted.bias, bn.bias)
    assert "kept" in str(fit_report(fitted))
