"""Recalibrating BatchNorm statistics: checked against float64 population statistics of what each layer saw."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from normswap.errors import CalibrationError, NormswapError
from normswap.history import get_history
from normswap.layers import FrozenBatchNorm
from normswap.recalibrate import CalibrationReport, calibration_report, recalibrate

from .helpers import randomize_norm_layers

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def population_statistics(model: nn.Module, data, *, batch_statistics: bool, amp: bool = False,
                          channels_last: bool = False) -> dict:
    """float64 mean and unbiased variance per channel of everything each BatchNorm layer sees, from a copy of the
    model run over ``data``: with BatchNorm layers in train mode (``batch_statistics``) or everything in eval mode.
    The inputs are copied when the hook runs, so later in-place operations cannot change them.

    What a layer sees depends, at float rounding, on the memory layout the model runs in (in batch mode at batch
    size 2 the rounding of deep layers is amplified to 1e-2: no float64 run can stand in for it), so the copy runs
    in the layout the caller states, the model's own unless ``channels_last``; the oracle never guesses the layout
    ``recalibrate`` would choose. Tests of the default exact method on a model with 2-D convolutions state
    ``channels_last=True``: the documented CPU default, which
    ``test_by_default_on_cpu_exact_runs_a_conv_model_channels_last_and_sequential_in_its_own_layout`` checks."""
    reference = copy.deepcopy(model).eval()
    if channels_last:
        reference = reference.to(memory_format=torch.channels_last)
        data = [x.contiguous(memory_format=torch.channels_last) for x in data]
    seen: dict[str, list[torch.Tensor]] = {}

    def capture(name):
        def hook(module, args):
            x = args[0].detach()
            seen.setdefault(name, []).append(x.double().transpose(0, 1).reshape(x.shape[1], -1).clone())

        return hook

    for name, module in reference.named_modules():
        if isinstance(module, BN_TYPES):
            module.training = batch_statistics  # the layer only: a fused dropout stays in eval mode
            module.register_forward_pre_hook(capture(name))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for x in data:
            reference(x)
    return {name: (torch.cat(xs, 1).mean(1), torch.cat(xs, 1).var(1)) for name, xs in seen.items()}


def assert_statistics(model: nn.Module, expected: dict, *, rtol: float = 1e-5) -> None:
    """Every layer's running statistics equal the expected ones, to ``rtol`` relative, plus what float32 rounding of
    a mean of size ``|mean|`` costs: ``eps·|mean|`` on the mean, ``eps·|mean|·std`` on the variance. (Precise BN's
    ``E[x²] - E[x]²`` in float32 is off by about ``eps·mean²``: a thousand times more at a mean of a thousand std.)"""
    assert expected
    eps = torch.finfo(torch.float32).eps
    for name, (mean, var) in expected.items():
        layer = model.get_submodule(name)
        got_mean, got_var = layer.running_mean.double(), layer.running_var.double()
        assert ((got_mean - mean).abs() <= rtol * var.sqrt() + 2 * eps * mean.abs()).all(), name
        assert ((got_var - var).abs() <= rtol * var + eps * mean.abs() * var.sqrt()).all(), name


def small_cnn(channels: int = 6) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4),
    )
    return randomize_norm_layers(model, seed=1).eval()


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norm_layers(timm.create_model("resnet18", num_classes=10), seed=2).eval()


def images(sizes, *, shape=(3, 32, 32), scale=2.0, shift=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=gen) * scale + shift for size in sizes]


def state(model: nn.Module) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


# --- exact -------------------------------------------------------------------------------------------------------


def test_exact_statistics_are_the_population_statistics_of_what_each_layer_saw_in_batch_mode():
    model, data = resnet18(), images([4, 3, 5, 2])
    expected = population_statistics(model, data, batch_statistics=True, channels_last=True)
    recalibrate(model, data)
    assert_statistics(model, expected)
    assert len(expected) == 20


def test_exact_handles_any_batch_sizes_including_one_and_an_uneven_last_batch():
    model, data = small_cnn(), images([1, 3, 1, 5, 2], shape=(3, 6, 6))
    expected = population_statistics(model, data, batch_statistics=True, channels_last=True)
    recalibrate(model, data)
    assert_statistics(model, expected)


def test_exact_is_stable_when_activations_have_a_mean_of_a_thousand():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(5)).eval()
    data = images([7, 9, 16, 3], shape=(5,), scale=1.0, shift=1000.0)
    expected = population_statistics(model, data, batch_statistics=True)
    recalibrate(model, data)
    assert_statistics(model, expected)
    naive_var = torch.cat(data).pow(2).mean(0) - torch.cat(data).mean(0).pow(2)  # E[x²] - E[x]² in float32
    assert ((naive_var.double() - expected["1"][1]).abs() > 1e-2 * expected["1"][1]).any()


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_under_bfloat16_autocast_the_statistics_are_those_of_the_bfloat16_activations(method):
    model, data = small_cnn(), images([4, 4, 3], shape=(3, 8, 8), shift=1000.0, scale=3.0)
    recalibrate(model, data, amp=True, method=method)
    reference = model if method == "sequential" else small_cnn()
    expected = population_statistics(reference, data, batch_statistics=method == "exact",
                                     channels_last=method == "exact", amp=True)
    assert_statistics(model, expected, rtol=1e-4)
    assert next(model.parameters()).dtype == torch.float32


def test_exact_runs_dropout_in_eval_mode_and_only_norm_layers_in_batch_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).eval()
    data = images([4, 4])
    expected = population_statistics(model, data, batch_statistics=True, channels_last=True)
    recalibrate(model, data)
    assert_statistics(model, expected)


@pytest.mark.parametrize("channels_last", [True, False])
def test_exact_in_either_layout_gives_the_statistics_of_what_the_layers_saw_in_it(channels_last):
    model, data = resnet18(), images([3, 2])
    expected = population_statistics(model, data, batch_statistics=True, channels_last=channels_last)
    recalibrate(model, data, channels_last=channels_last)
    assert_statistics(model, expected)
    assert model.conv1.weight.is_contiguous(), "the model comes back in its own layout"


def test_by_default_on_cpu_exact_runs_a_conv_model_channels_last_and_sequential_in_its_own_layout():
    """Bit for bit what the stated layout gives (the layouts round differently: see population_statistics)."""
    data = images([3, 2])
    for method in ("exact", "sequential"):
        chosen, stated = recalibrate(resnet18(), data, method=method), resnet18()
        recalibrate(stated, data, method=method, channels_last=method == "exact")
        assert torch.equal(chosen.layer4[1].bn2.running_var, stated.layer4[1].bn2.running_var), method


def test_on_cpu_exact_runs_a_conv_model_in_channels_last_layout_by_default():
    model, data = small_cnn(), images([4, 4])
    layouts = []
    model[1].register_forward_pre_hook(
        lambda module, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    recalibrate(model, data)
    assert layouts == [True, True]
    assert all(p.is_contiguous() for p in model.parameters())


class ViewsItsFeatures(nn.Module):
    """Flattens conv features with ``view``, which needs contiguous memory: it fails on channels-last tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.head(x.view(x.shape[0], -1))


def test_a_model_that_fails_in_channels_last_layout_is_calibrated_in_its_own():
    torch.manual_seed(0)
    model, data = randomize_norm_layers(ViewsItsFeatures()).eval(), images([4, 4, 3], shape=(3, 8, 8))
    with pytest.raises(RuntimeError, match="view"):
        copy.deepcopy(model).to(memory_format=torch.channels_last)(
            data[0].contiguous(memory_format=torch.channels_last))
    expected = population_statistics(model, data, batch_statistics=True, channels_last=False)
    recalibrate(model, data)
    assert_statistics(model, expected)
    assert calibration_report(model).batches == 3


def test_exact_pools_every_call_of_a_shared_layer():
    torch.manual_seed(0)
    shared = nn.BatchNorm2d(3)
    model = nn.Sequential(shared, nn.Conv2d(3, 3, 1), shared).eval()
    data = images([2, 3], shape=(3, 4, 4))
    expected = population_statistics(model, data, batch_statistics=True, channels_last=True)
    recalibrate(model, data)
    assert torch.allclose(shared.running_var.double(), expected["0"][1], rtol=1e-5)


def test_exact_refuses_a_batch_where_a_layer_sees_one_value_per_channel_and_names_it():
    model = resnet18()
    before = state(model)
    with pytest.raises(CalibrationError, match=r"layer 'layer4\.0\.bn1'.*batch 1.*method='sequential'"):
        recalibrate(model, images([2, 1]))
    assert_same_state(model, before)


def test_fused_batch_norm_act_and_sync_batch_norm_are_calibrated_like_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU, drop_layer=lambda: nn.Dropout(0.5)),
        nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4),
    )
    model = randomize_norm_layers(model, seed=3).eval()
    data = images([3, 4])
    expected = population_statistics(model, data, batch_statistics=True, channels_last=True)
    recalibrate(model, data)
    assert_statistics(model, expected)
    assert not model[1].drop.training


# --- sequential --------------------------------------------------------------------------------------------------


def eval_consistent_reference(model: nn.Module, data, dtype: torch.dtype = torch.float64) -> dict:
    """Statistics by the definition of the sequential method, computed the slow way on a float64 (or ``dtype``) copy
    of the model: layer after layer, in the order of their last call in a forward, one eval forward over all the
    data measures every input of that layer (with the layers measured before it already set) and sets its
    statistics (accumulated in float64)."""
    reference = copy.deepcopy(model).to(dtype).eval()
    data = [x.to(dtype) for x in data]
    calls = []
    handles = [module.register_forward_pre_hook(lambda m, a, name=name: calls.append(name))
               for name, module in reference.named_modules() if isinstance(module, BN_TYPES)]
    with torch.no_grad():
        reference(data[0])
    for handle in handles:
        handle.remove()
    order = sorted(set(calls), key=lambda name: max(i for i, called in enumerate(calls) if called == name))
    expected = {}
    for name in order:
        layer = reference.get_submodule(name)
        seen = []
        handle = layer.register_forward_pre_hook(
            lambda m, a: seen.append(a[0].double().transpose(0, 1).reshape(a[0].shape[1], -1).clone()))
        with torch.no_grad():
            for x in data:
                reference(x)
        handle.remove()
        values = torch.cat(seen, 1)
        expected[name] = (values.mean(1), values.var(1))
        layer.running_mean.copy_(expected[name][0])
        layer.running_var.copy_(expected[name][1])
    return expected


def test_sequential_statistics_equal_a_float64_eval_consistent_reference():
    model, data = resnet18(), images([4, 3, 5])
    expected = eval_consistent_reference(model, data)
    recalibrate(model, data, method="sequential")
    assert_statistics(model, expected, rtol=1e-4)
    assert_statistics(model, population_statistics(model, data, batch_statistics=False))
    report = calibration_report(model)
    assert len(report.calibrated) == 20 and report.passes == 20
    assert report.forward_cost == 1.0  # every batch's forward runs once


def test_sequential_differs_from_exact_and_from_the_old_eval_statistics():
    data = images([4, 4])
    exact = recalibrate(resnet18(), data)
    sequential = recalibrate(resnet18(), data, method="sequential")
    old = population_statistics(resnet18(), data, batch_statistics=False)
    name = "layer3.1.bn2"
    got = sequential.get_submodule(name).running_var.double()
    assert ((got - exact.get_submodule(name).running_var.double()).abs() > 1e-3 * got).any()
    assert ((got - old[name][1]).abs() > 1e-3 * got).any()


class Branches(nn.Module):
    """Three parallel conv-BN branches, concatenated, then one more conv-BN."""

    def __init__(self) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
                                      for _ in range(3))
        self.head = nn.Sequential(nn.Conv2d(12, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.head(torch.cat([branch(x) for branch in self.branches], 1))


class DataDependent(Branches):
    """The same layers, with Python control flow on tensor values: torch.fx cannot trace it."""

    def forward(self, x):
        if x.sum() > -1e9:
            return super().forward(x)
        return x


@pytest.mark.parametrize("cls", [Branches, DataDependent])
def test_sequential_costs_one_forward_per_batch_with_or_without_python_control_flow(cls):
    torch.manual_seed(0)
    model = randomize_norm_layers(cls(), seed=4).eval()
    data = images([3, 5], shape=(3, 5, 5))
    expected = eval_consistent_reference(model, data)
    recalibrate(model, data, method="sequential")
    assert_statistics(model, expected, rtol=1e-4)
    report = calibration_report(model)
    assert (report.passes, report.forward_cost) == (4, 1.0)


def test_sequential_runs_each_layer_once_per_batch():
    model, data = resnet18(), images([2, 3, 2])
    calls = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    recalibrate(model, data, method="sequential")
    assert calls and set(calls.values()) == {len(data)}


class ChangesASharedValueInPlace(nn.Module):
    """``y`` is read by conv2, then doubled in place, then read by conv3: only eager order gives conv3 the doubled
    value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        z = self.bn2(self.conv2(y))
        y.mul_(2.0)
        return z + self.bn3(self.conv3(y))


def test_sequential_sees_values_changed_in_place_as_the_eager_forward_does():
    torch.manual_seed(0)
    model, data = randomize_norm_layers(ChangesASharedValueInPlace(), seed=6).eval(), images([3, 2])
    expected = eval_consistent_reference(model, data)
    recalibrate(model, data, method="sequential")
    assert_statistics(model, expected, rtol=1e-4)
    report = calibration_report(model)
    assert (report.passes, report.forward_cost) == (3, 1.0)


class CallsALayerTwice(nn.Module):
    """``bn_a`` runs before and after ``bn_b``."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_a, self.conv1, self.bn_b, self.conv2 = (nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3),
                                                        nn.Conv2d(3, 3, 1))

    def forward(self, x):
        return self.bn_a(self.conv2(self.bn_b(self.conv1(self.bn_a(x)))))


def test_a_layer_called_twice_is_measured_at_both_calls_and_costs_a_second_run():
    torch.manual_seed(0)
    model, data = randomize_norm_layers(CallsALayerTwice(), seed=7).eval(), images([3, 4, 2], shape=(3, 5, 5))
    expected = eval_consistent_reference(model, data)
    recalibrate(model, data, method="sequential")
    assert_statistics(model, expected, rtol=1e-4)
    report = calibration_report(model)
    assert report.calibrated == ["bn_b", "bn_a"]
    assert report.passes == 3 and report.forward_cost == pytest.approx(2 + 1 / len(data), abs=1e-3)


def test_sequential_works_at_batch_size_one_where_exact_cannot():
    model, data = resnet18(), images([1, 1, 1])
    recalibrate(model, data, method="sequential")
    assert_statistics(model, population_statistics(model, data, batch_statistics=False))


class MutatesItsInput(nn.Module):
    """Changes a BatchNorm's input in place after the BatchNorm ran, as in-place activations and residual adds do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y)
        y.mul_(100.0).relu_()
        return out + y


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_in_place_changes_after_a_layer_ran_do_not_reach_its_statistics(method):
    torch.manual_seed(0)
    model, data = MutatesItsInput().eval(), images([3, 4])
    expected = population_statistics(model, data, batch_statistics=method == "exact",
                                     channels_last=method == "exact")
    recalibrate(model, data, method=method)
    assert_statistics(model, expected)


def test_sequential_is_stable_at_a_mean_of_a_thousand():
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(5), nn.Linear(5, 3), nn.BatchNorm1d(3)).eval()
    data = images([1, 6, 2], shape=(5,), scale=1.0, shift=1000.0)
    recalibrate(model, data, method="sequential")
    assert_statistics(model, population_statistics(model, data, batch_statistics=False))


def test_sequential_measures_large_images_per_sample_exactly_even_at_a_mean_of_a_thousand():
    # 16x16 inputs: each layer's input is measured per sample and channel by GroupNorm's moments kernel
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].bias.fill_(1000.0)
    data = images([3, 1, 4], shape=(3, 16, 16))
    recalibrate(model, data, method="sequential")
    assert_statistics(model, population_statistics(model, data, batch_statistics=False))
    assert model[1].running_mean.min() > 990


def test_sequential_logs_the_memory_it_will_hold_before_it_starts(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    data = images([2, 2, 2, 2], shape=(3, 10, 10))
    with caplog.at_level("INFO", logger="normswap"):
        recalibrate(model.eval(), data, method="sequential")
    estimates = [record.normswap_memory_estimate for record in caplog.records
                 if hasattr(record, "normswap_memory_estimate")]
    # the four batches (2x3x10x10 float32 each) and, per batch, the conv output paused at the first BatchNorm
    assert estimates == [4 * 2 * 3 * 10 * 10 * 4 + 4 * 2 * 8 * 8 * 8 * 4]
    assert "will hold about 26.0 kB" in caplog.text


def test_sequential_refuses_in_one_line_a_run_that_would_not_fit_and_changes_nothing(monkeypatch):
    from normswap.recalibrate import sequential

    model = resnet18()
    before = state(model)
    monkeypatch.setattr(sequential, "available_memory", lambda device: 3 * 2 * 64 * 16 * 16 * 4)
    with pytest.raises(CalibrationError, match=r"would hold about .* more than .* free on cpu: calibrate on fewer "
                                               r"batches \(batches=3 or so\) or use method='exact'") as raised:
        recalibrate(model, images([2] * 8), method="sequential")
    assert "\n" not in str(raised.value)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    recalibrate(model, images([2] * 8))  # the exact method holds one batch at a time: it runs


# --- what changes and what does not ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_only_running_statistics_change_and_flags_momentum_and_counters_are_restored(method):
    model = resnet18().train()
    model.layer1.eval()
    model.bn1.momentum = None
    model.layer2[0].bn1.num_batches_tracked.fill_(7)
    flags = {name: module.training for name, module in model.named_modules()}
    before = state(model)
    stats = {key for key in before if key.endswith(("running_mean", "running_var"))}
    recalibrate(model, images([4, 4]), method=method)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value) == (key not in stats), key
    assert {name: module.training for name, module in model.named_modules()} == flags
    assert model.bn1.momentum is None and model.layer1[0].bn1.momentum == 0.1
    assert model.layer2[0].bn1.num_batches_tracked.item() == 7
    assert "forward" not in model.bn1.__dict__


class MakesTensorConstants(nn.Module):
    """Makes tensors in its forward: a symbolic tracer would store them on the model as ``_tensor_constant0``..."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x) * torch.tensor([2.0]) + torch.arange(4.0).view(1, 4, 1, 1))


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_recalibration_leaves_nothing_on_the_model(method):
    model = MakesTensorConstants().eval()
    attributes = {module: set(module.__dict__) for module in model.modules()}
    keys = set(model.state_dict())
    recalibrate(model, images([2, 3], shape=(3, 4, 4)), method=method)
    attributes[model].add("_normswap_history")  # the run is recorded in the model's history, by design
    assert {module: set(module.__dict__) for module in model.modules()} == attributes
    assert set(model.state_dict()) == keys


def test_the_buffers_keep_their_identity_so_references_to_them_stay_valid():
    model = small_cnn()
    buffer = model[1].running_var
    recalibrate(model, images([4], shape=(3, 5, 5)))
    assert model[1].running_var is buffer


def test_a_failing_batch_leaves_the_model_untouched_and_names_the_batch():
    model = resnet18().train()
    before = state(model)
    data = images([2, 2]) + [torch.randn(2, 5, 32, 32)]
    with pytest.raises(CalibrationError, match=r"batch 2 \(float32 2x5x32x32\).*channels"):
        recalibrate(model, data)
    assert_same_state(model, before)
    assert all(module.training for module in model.modules())
    assert model.bn1.momentum == 0.1


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_an_interrupt_in_the_middle_leaves_the_model_untouched(method):
    model = resnet18()
    before = state(model)

    def interrupted():
        yield from images([2, 2])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recalibrate(model, interrupted(), method=method)
    assert_same_state(model, before)
    assert not any(module.training for module in model.modules())


class WithUnusedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = small_cnn()
        self.unused = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.body(x)


def test_a_layer_the_data_never_reaches_keeps_its_statistics_and_is_reported():
    model = WithUnusedHead().eval()
    old = model.unused.running_var.clone()
    recalibrate(model, images([3], shape=(3, 5, 5)))
    assert torch.equal(model.unused.running_var, old)
    report = calibration_report(model)
    assert report.calibrated == ["body.1", "body.4"] and report.no_data == ["unused"]


def test_layers_without_running_statistics_and_frozen_layers_are_left_alone():
    torch.manual_seed(0)
    tracking_off = nn.BatchNorm2d(4)
    tracking_off.track_running_stats = False  # still has buffers: eval mode uses them, so they are calibrated
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), tracking_off,
                          FrozenBatchNorm(4, rank=2)).eval()
    data = images([3, 3])
    expected = population_statistics(model, data, batch_statistics=True, channels_last=True)
    recalibrate(model, data)
    assert_statistics(model, {"2": expected["2"]})
    assert tracking_off.track_running_stats is False
    assert set(calibration_report(model).skipped) == {"1", "3"}
    assert torch.equal(model[3].running_var, torch.ones(4))


# --- data --------------------------------------------------------------------------------------------------------


def test_tuples_dicts_and_input_fn_all_give_the_same_statistics():
    xs = images([3, 4], shape=(3, 5, 5))
    reference = recalibrate(small_cnn(), xs)
    tuples = recalibrate(small_cnn(), [(x, torch.zeros(len(x))) for x in xs])
    dicts = recalibrate(small_cnn(), [{"pixels": x, "label": 0} for x in xs], input_key="pixels")
    wrapped = recalibrate(small_cnn(), [[x] for x in xs], input_fn=lambda batch: batch[0] * 1)
    for model in (tuples, dicts, wrapped):
        assert torch.equal(model[4].running_var, reference[4].running_var)


def test_batches_limits_the_data_read():
    data = images([2, 2, 2, 2])
    model = recalibrate(small_cnn(), iter(data), batches=2)
    expected = population_statistics(small_cnn(), data[:2], batch_statistics=True, channels_last=True)
    assert_statistics(model, expected)
    assert calibration_report(model).batches == 2


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_empty_data_is_a_clear_error(method):
    with pytest.raises(CalibrationError, match="empty"):
        recalibrate(small_cnn(), [], method=method)


def test_a_batch_of_the_wrong_type_names_its_index():
    model = small_cnn()
    before = state(model)
    with pytest.raises(CalibrationError, match="batch 1 is a str"):
        recalibrate(model, [torch.randn(2, 3, 5, 5), "oops"])
    assert_same_state(model, before)


def test_a_single_tensor_instead_of_batches_is_refused():
    with pytest.raises(CalibrationError, match="single tensor"):
        recalibrate(small_cnn(), torch.randn(4, 3, 5, 5))


class Explodes(nn.Module):
    def forward(self, x):
        return x * float("inf")


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_non_finite_activations_name_the_first_layer_they_reach(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), Explodes(), nn.Conv2d(4, 4, 1),
                          nn.BatchNorm2d(4)).eval()
    before = state(model)
    with pytest.raises(CalibrationError, match="non-finite activations reach layer '4' first"):
        recalibrate(model, images([3, 3], shape=(3, 4, 4)), method=method)
    assert_same_state(model, before)


def test_a_model_without_batch_norm_is_a_clear_error():
    with pytest.raises(CalibrationError, match="no BatchNorm layer"):
        recalibrate(nn.Sequential(nn.Conv2d(3, 3, 1), nn.GroupNorm(1, 3)), images([2]))
    with pytest.raises(CalibrationError, match="no BatchNorm layer.*frozen"):
        recalibrate(nn.Sequential(FrozenBatchNorm(3)), images([2]))


def test_unknown_method_and_unavailable_device_are_clear_errors():
    with pytest.raises(CalibrationError, match="unknown recalibration method 'precise'"):
        recalibrate(small_cnn(), images([2]), method="precise")
    with pytest.raises(CalibrationError, match="unknown device 'gpu0'"):
        recalibrate(small_cnn(), images([2]), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(CalibrationError, match="CUDA is not available"):
            recalibrate(small_cnn(), images([2]), device="cuda")


# --- report and history ------------------------------------------------------------------------------------------


def test_the_report_is_recorded_in_the_history_and_round_trips():
    model = recalibrate(small_cnn(), images([2, 3], shape=(3, 5, 5)), method="sequential")
    step = get_history(model)[-1]
    assert step["op"] == "recalibrate" and step["method"] == "sequential"
    report = calibration_report(model)
    assert report == CalibrationReport.from_dict(step)
    assert (report.batches, report.samples, report.passes, report.world_size) == (2, 5, 2, 1)
    assert f"2 layer(s) from 2 batch(es), 5 sample(s), 2 pass(es) costing {report.forward_cost:.3g} forward(s)" \
        in str(report)
    exact = calibration_report(recalibrate(small_cnn(), images([2, 3], shape=(3, 5, 5))))
    assert exact.forward_cost == 1.0 and str(exact).endswith("5 sample(s), 1 pass(es)")
    with pytest.raises(NormswapError, match="not been recalibrated"):
        calibration_report(small_cnn())


def test_a_progress_bar_is_shown_on_request_and_silenced_with_false(capsys):
    recalibrate(small_cnn(), images([2, 2], shape=(3, 5, 5)), progress=True)
    assert "recalibrate" in capsys.readouterr().err
    recalibrate(small_cnn(), images([2, 2], shape=(3, 5, 5)), progress=False)
    assert capsys.readouterr().err == ""


# --- GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_on_cuda_the_statistics_match_and_the_model_comes_back_to_the_cpu(method, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 convolutions, as on the CPU
    data = images([4, 3, 5])
    on_cpu = recalibrate(resnet18(), data, method=method)
    model = recalibrate(resnet18(), data, method=method, device="cuda")
    assert all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            reference = on_cpu.get_submodule(name)
            assert torch.allclose(module.running_var, reference.running_var, rtol=1e-4), name
            assert torch.allclose(module.running_mean, reference.running_mean, rtol=1e-4, atol=1e-4), name


@pytest.mark.cuda
def test_on_cuda_with_amp_and_channels_last_the_statistics_are_those_of_the_half_precision_activations():
    model, data = resnet18().cuda(), [x.cuda() for x in images([8, 8], shift=100.0)]
    reference = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    seen = {}
    for name, module in reference.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.train()
            module.register_forward_pre_hook(
                lambda m, a, name=name: seen.setdefault(name, []).append(
                    a[0].double().transpose(0, 1).reshape(a[0].shape[1], -1).clone()))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for x in data:
            reference(x.contiguous(memory_format=torch.channels_last))
    recalibrate(model, data, amp=True, channels_last=True)
    for name, xs in seen.items():
        var = torch.cat(xs, 1).var(1)
        assert torch.allclose(model.get_submodule(name).running_var.double(), var, rtol=1e-3), name
