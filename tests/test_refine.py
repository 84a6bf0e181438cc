"""Label-free refinement: a converted model learns to reproduce the original's outputs from unlabeled data, keeps
the best state measured on a holdout, and changes nothing else (least of all the original)."""

import copy
import json
import sys

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

import normswap
from normswap.checkpoint import load, save
from normswap.cli import main
from normswap.demo import accuracy, agreement
from normswap.errors import CalibrationError, NormswapError, PlanError, RefineError
from normswap.history import get_history
from normswap.refine import refine, refine_report

from .helpers import randomize_norm_layers, small_cnn


@pytest.fixture(scope="module")
def fitted_demo(demo_model, digits):
    return normswap.convert(copy.deepcopy(demo_model), "gn", groups=8, affine="fit",
                            data=digits.train_images[:64].split(16))


def images(n: int, seed: int = 0, size: int = 12) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def converted_cnn(seed: int = 1) -> tuple[nn.Module, nn.Module]:
    """A small BatchNorm CNN and its GroupNorm conversion with copied affine weights (far from the original)."""
    original = small_cnn(seed=seed)
    return original, normswap.convert(copy.deepcopy(original), "gn", groups=4)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(state[key], value), key


def relative_error(model: nn.Module, reference: nn.Module, x) -> float:
    with torch.no_grad():
        expected = reference.eval()(x)
        return ((model.eval()(x) - expected).pow(2).sum() / expected.pow(2).sum()).item()


class CallCounter:
    """A forward hook that raises ``error`` on the ``at``-th call of the module it is on."""

    def __init__(self, module: nn.Module, at: int, error: BaseException) -> None:
        self.calls, self.at, self.error = 0, at, error
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.calls += 1
        if self.calls == self.at:
            raise self.error


def test_refinement_brings_the_fitted_demo_model_close_to_the_original_without_labels(
        demo_model, fitted_demo, digits):
    refined = copy.deepcopy(fitted_demo)
    refine(refined, demo_model, digits.train_images.split(64), steps=100, holdout=0.2, progress=False)
    report = refine_report(refined)
    test = digits.test_images
    assert agreement(refined, demo_model, test) >= 0.97
    assert agreement(refined, demo_model, test) > agreement(fitted_demo, demo_model, test) + 0.04
    original_accuracy = accuracy(demo_model, test, digits.test_labels)
    assert accuracy(refined, test, digits.test_labels) >= original_accuracy - 0.01
    assert (report.train_samples, report.holdout_samples, report.batch_size) == (1078, 270, 64)
    assert report.agreement_after > report.agreement_before and report.loss_after < report.loss_before
    assert report.error_after < report.error_before
    assert report.kept == "best" and 0 < report.best_step <= report.steps <= 100
    assert report.parameters == sum(p.numel() for p in refined.parameters())
    assert "top-1 agreement" in str(report) and "kept the best state" in str(report)


def test_the_original_model_is_never_changed():
    original, converted = converted_cnn()
    original[3].train()  # mixed training flags and a frozen parameter, to see that each comes back as it was
    original[0].weight.requires_grad_(False)
    before = snapshot(original)
    flags = [m.training for m in original.modules()]
    requires_grad = [p.requires_grad for p in original.parameters()]
    refine(converted, original, images(48).split(16), steps=5, holdout=0.2, progress=False)
    assert_same_state(original, before)
    assert [m.training for m in original.modules()] == flags
    assert [p.requires_grad for p in original.parameters()] == requires_grad
    assert all(p.grad is None for p in original.parameters())


def test_only_the_converted_models_trainable_values_change_and_its_flags_come_back():
    original, converted = converted_cnn()
    converted.train()
    converted[6].eval()
    converted[8].bias.requires_grad_(False)
    parameters = list(converted.parameters())
    before = snapshot(converted)
    refine(converted, original, images(48).split(16), steps=10, trainable=["1.*", "4.*"], holdout=0, progress=False)
    assert list(converted.parameters()) == parameters and all(p.grad is None for p in parameters)
    assert converted.training and not converted[6].training
    assert [p.requires_grad for p in converted.parameters()] == [True] * 9 + [False]
    changed = {key for key, value in converted.state_dict().items() if not torch.equal(value, before[key])}
    assert changed == {"1.weight", "1.bias", "4.weight", "4.bias"}


def test_the_state_kept_is_the_best_measured_on_the_holdout():
    # Every sample is the same image, so the holdout error is that image's error, which the test can measure.
    original, converted = converted_cnn()
    data = images(1).expand(40, -1, -1, -1).contiguous()
    refine(converted, original, data.split(8), steps=40, lr=0.003, eval_every=2, patience=None,
           loss="mse", holdout=0.2, progress=False)
    report = refine_report(converted)
    errors = [evaluation["error"] for evaluation in report.evaluations]
    assert [evaluation["step"] for evaluation in report.evaluations] == list(range(0, 41, 2))
    assert report.kept == "best" and report.error_after == min(errors) < errors[0]
    assert report.best_step == report.evaluations[errors.index(min(errors))]["step"] < 40  # not simply the last
    assert relative_error(converted, original, data[:1]) == pytest.approx(report.error_after, rel=1e-4)


def test_a_model_that_no_step_improves_is_left_unchanged():
    original = small_cnn()
    nearly = normswap.freeze(copy.deepcopy(original))  # computes the original's output exactly...
    with torch.no_grad():
        nearly[8].bias.add_(1e-3)  # ...but for a tiny offset, which steps far too large only make worse
    before = snapshot(nearly)
    refine(nearly, original, images(32).split(16), steps=6, lr=0.5, eval_every=2, holdout=0.2, progress=False)
    report = refine_report(nearly)
    losses = [evaluation["loss"] for evaluation in report.evaluations]
    assert len(losses) == 4 and min(losses[1:]) > losses[0]
    assert report.kept == "unchanged" and report.best_step == 0 and report.loss_after == losses[0]
    assert "kept the model unchanged" in str(report)
    assert_same_state(nearly, before)


def test_ctrl_c_stops_the_refinement_and_keeps_the_best_state_so_far():
    original, converted = converted_cnn()
    data = images(1).expand(40, -1, -1, -1).contiguous()
    # student calls: the holdout before training (1), then per two steps: step, step, holdout (2, 3, 4, 5, 6, 7, ...)
    CallCounter(converted, at=12, error=KeyboardInterrupt())
    refine(converted, original, data.split(8), steps=40, lr=0.003, eval_every=2, patience=None,
           loss="mse", holdout=0.2, progress=False)
    report = refine_report(converted)
    assert report.stopped == "interrupted" and report.steps == 7
    assert report.kept == "best" and report.best_step in (2, 4, 6)
    assert relative_error(converted, original, data[:1]) == pytest.approx(report.error_after, rel=1e-4)
    assert "interrupted at step 7" in str(report)
    assert refine_report(converted).stopped == "interrupted"


def test_ctrl_c_before_any_improvement_leaves_the_model_unchanged():
    original, converted = converted_cnn()
    before = snapshot(converted)
    CallCounter(converted, at=4, error=KeyboardInterrupt())  # while measuring after two steps
    refine(converted, original, images(32).split(16), steps=10, eval_every=2, holdout=0.2, progress=False)
    report = refine_report(converted)
    assert (report.stopped, report.kept, report.steps) == ("interrupted", "unchanged", 2)
    assert_same_state(converted, before)


def test_an_error_during_refinement_restores_the_converted_model_exactly():
    original, converted = converted_cnn()
    converted.train()
    before = snapshot(converted)
    CallCounter(converted, at=6, error=RuntimeError("the model broke"))
    with pytest.raises(RuntimeError, match="the model broke"):
        refine(converted, original, images(32).split(16), steps=10, eval_every=2, holdout=0.2, progress=False)
    assert_same_state(converted, before)
    assert converted.training and all(p.requires_grad and p.grad is None for p in converted.parameters())
    assert [step["op"] for step in get_history(converted)] == ["plan"]


def test_the_same_seed_gives_the_same_weights_and_another_seed_other_weights():
    results = []
    for seed in (0, 0, 1):
        original, converted = converted_cnn()
        refine(converted, original, images(64).split(16), steps=8, seed=seed, holdout=0.2, progress=False)
        results.append(snapshot(converted))
    assert all(torch.equal(results[0][key], results[1][key]) for key in results[0])
    assert not all(torch.equal(results[0][key], results[2][key]) for key in results[0])


def test_batches_come_in_the_forms_recalibrate_takes_and_labels_are_ignored():
    data = images(48)
    labels = torch.arange(48) % 5
    forms = {
        "tensors": (data.split(16), {}),
        "tuples": (list(zip(data.split(16), labels.split(16))), {}),
        "dicts": ([{"pixels": x, "label": y} for x, y in zip(data.split(16), labels.split(16))],
                  {"input_key": "pixels"}),
        "input_fn": ([[("meta", x)] for x in data.split(16)], {"input_fn": lambda batch: batch[0][1]}),
    }
    results = {}
    for name, (batches, options) in forms.items():
        original, converted = converted_cnn()
        refine(converted, original, batches, steps=6, holdout=0.2, progress=False, **options)
        report = refine_report(converted)
        assert report.train_samples + report.holdout_samples == 48, name
        results[name] = snapshot(converted)
    for name, state in results.items():
        assert all(torch.equal(state[key], results["tensors"][key]) for key in state), name


class TwoInputs(nn.Module):
    """A model called as ``model(image, scale=...)``: a dict batch input becomes keyword arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_cnn()

    def forward(self, image, scale):
        return self.body(image) * scale


def test_inputs_that_are_dicts_of_keyword_arguments_are_pooled_and_passed_as_keywords():
    original = TwoInputs().eval()
    converted = normswap.convert(copy.deepcopy(original), "gn", groups=4)
    batches = [{"image": x, "scale": torch.full((len(x), 1), 2.0)} for x in images(48).split(16)]
    refine(converted, original, [(batch,) for batch in batches], steps=10, holdout=0.2, progress=False,
           input_fn=lambda batch: batch[0])
    report = refine_report(converted)
    assert report.batch_size == 64 and report.train_samples + report.holdout_samples == 48
    assert report.loss_after < report.loss_before


def test_batches_that_cannot_be_pooled_are_used_as_they_came():
    original, converted = converted_cnn()
    batches = [images(8, seed=i, size=10 + 2 * i) for i in range(6)]  # a different image size in every batch
    refine(converted, original, batches, steps=12, holdout=2, progress=False)
    report = refine_report(converted)
    assert report.batch_size is None and report.holdout_samples == 16 and report.train_samples == 32
    assert report.loss_after < report.loss_before


def test_timm_fused_group_norm_act_layers_are_refined_with_their_activation():
    torch.manual_seed(0)
    original = randomize_norm_layers(timm.create_model("mobilenetv3_small_050", num_classes=4), seed=0).eval()
    data = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1)).split(16)
    converted = normswap.convert(copy.deepcopy(original), "gn", groups=8)
    assert type(converted.bn1).__name__ == "GroupNormAct"
    refine(converted, original, data, steps=16, trainable="norm", lr=1e-2, loss="mse", holdout=0.2, progress=False)
    report = refine_report(converted)
    norm_parameters = sum(p.numel() for m in converted.modules() if type(m).__name__ == "GroupNormAct"
                          for p in m.parameters())
    assert report.trainable == "norm" and report.parameters == norm_parameters
    assert report.loss_after < report.loss_before
    assert type(converted.bn1).__name__ == "GroupNormAct" and converted.bn1.act.inplace


def test_a_monai_3d_network_converted_to_group_norm_is_refined_voxel_by_voxel():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    original = randomize_norm_layers(
        UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), norm="batch"), seed=2
    ).eval()
    volumes = torch.randn(24, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3)).split(6)
    converted = normswap.convert(copy.deepcopy(original), "gn", groups=2)
    assert not any(isinstance(m, nn.BatchNorm3d) for m in converted.modules())
    refine(converted, original, volumes, steps=12, batch_size=6, holdout=0.2, progress=False)
    report = refine_report(converted)
    assert report.agreement_before is not None  # per-voxel agreement over the 3 output channels
    assert report.loss_after < report.loss_before and report.agreement_after >= report.agreement_before


def test_a_transformers_model_with_dict_batches_and_a_model_output_is_refined_on_its_logits():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4)
    original = randomize_norm_layers(ResNetForImageClassification(config), seed=3).eval()
    batches = [{"pixel_values": x} for x in images(64, size=32).split(16)]
    converted = normswap.convert(copy.deepcopy(original), "gn", groups=4)
    refine(converted, original, batches, steps=16, lr=3e-3, holdout=0.2, progress=False)
    report = refine_report(converted)
    assert report.loss_after < report.loss_before and report.agreement_before is not None


def test_the_features_loss_matches_the_norm_layers_outputs_too():
    original, converted = converted_cnn()
    refine(converted, original, images(64).split(16), steps=10, loss="features", holdout=0.2, progress=False)
    report = refine_report(converted)
    assert report.loss == "features" and report.loss_after < report.loss_before


def test_autocast_on_the_cpu_trains_float32_weights():
    original, converted = converted_cnn()
    refine(converted, original, images(64).split(16), steps=10, amp=True, holdout=0.2, progress=False)
    report = refine_report(converted)
    assert report.loss_after < report.loss_before
    assert all(p.dtype == torch.float32 for p in converted.parameters())


def test_the_progress_bar_shows_the_steps(capsys):
    original, converted = converted_cnn()
    refine(converted, original, images(32).split(16), steps=3, holdout=0.2, progress=True)
    assert "refine" in capsys.readouterr().err


class Regression(nn.Module):
    def __init__(self, outputs: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Linear(8, outputs)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "cosine"}, "unknown refinement loss"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"lr": 0}, "lr must be a positive number"),
        ({"holdout": 1.0}, "holdout must be a fraction"),
        ({"holdout": 48}, "leaves no calibration data to train on"),
        ({"trainable": "layer9.*"}, "matches no parameter"),
        ({"trainable": 3}, "trainable must be"),
        ({"amp": "yes"}, "amp must be"),
        ({"eval_every": 0}, "eval_every must be at least 1"),
        ({"device": "tpu:x"}, "unknown device"),
    ],
)
def test_invalid_options_are_one_clear_error_and_change_nothing(options, message):
    original, converted = converted_cnn()
    before = snapshot(converted)
    with pytest.raises(RefineError, match=message):
        refine(converted, original, images(48).split(16), progress=False, **options)
    assert_same_state(converted, before)
    assert [step["op"] for step in get_history(converted)] == ["plan"]


def test_models_that_do_not_fit_together_are_refused_with_the_fix():
    original, converted = converted_cnn()
    data = images(32).split(16)
    with pytest.raises(RefineError, match="is the original model itself"):
        refine(original, original, data)
    shares = normswap.convert(original, "gn", groups=4)  # in place: the result is the original
    with pytest.raises(RefineError, match="itself"):
        refine(shares, original, data)
    partial = copy.deepcopy(original)
    partial[0].weight = original[0].weight
    with pytest.raises(RefineError, match="shares parameter '0.weight'"):
        refine(partial, original, data)
    with pytest.raises(RefineError, match="do not match the original's"):
        refine(Regression(outputs=3).eval(), original, data)
    with pytest.raises(RefineError, match="use loss='mse'"):
        refine(Regression(), Regression().eval(), data)
    with pytest.raises(RefineError, match="selects no floating-point parameter"):
        refine(nn.Sequential(nn.ReLU()), original, data, trainable="norm")


def test_regression_outputs_are_refined_with_the_mse_loss():
    torch.manual_seed(0)
    original = randomize_norm_layers(Regression(), seed=1).eval()
    converted = normswap.convert(copy.deepcopy(original), "gn", groups=4)
    refine(converted, original, images(64).split(16), steps=20, loss="mse", lr=1e-2, holdout=0.2, progress=False)
    report = refine_report(converted)
    assert report.agreement_before is None and report.loss_after < report.loss_before


@pytest.mark.parametrize(
    "data, error, message",
    [([], CalibrationError, "empty"), (["text"], CalibrationError, "batch 0"),
     ([torch.full((16, 3, 12, 12), float("nan"))], RefineError, "non-finite")],
    ids=["empty", "malformed", "non-finite"],
)
def test_bad_data_is_a_clear_error_and_changes_nothing(data, error, message):
    original, converted = converted_cnn()
    before = snapshot(converted)
    with pytest.raises(error, match=message):
        refine(converted, original, data, holdout=0, progress=False)
    assert_same_state(converted, before)


def test_convert_fits_and_refines_in_one_call_and_the_saved_model_loads_as_refined(demo_model, digits, tmp_path):
    data = digits.train_images[:512].split(64)
    model = normswap.convert(copy.deepcopy(demo_model), "gn", groups=8, affine="fit", data=data, refine=40,
                             progress=False)
    assert [step["op"] for step in get_history(model)] == ["plan", "fit", "refine"]
    report = refine_report(model)
    assert report.max_steps == 40 and report.train_samples + report.holdout_samples == 512
    assert agreement(model, demo_model, digits.test_images) > 0.95
    path = save(model, tmp_path / "refined.safetensors")
    loaded = load(path).eval()
    assert_same_state(loaded, snapshot(model))
    with torch.no_grad():
        assert torch.equal(loaded(digits.test_images), model.eval()(digits.test_images))
    assert refine_report(loaded).to_dict() == report.to_dict()


def test_convert_with_refine_changes_the_model_only_when_everything_succeeded():
    model = small_cnn()
    before = snapshot(model)
    layers = list(model)
    with pytest.raises(RefineError, match="unknown refinement loss"):
        normswap.convert(model, "gn", groups=4, affine="fit", data=images(32).split(16), refine=5,
                         refine_options={"loss": "cosine"})
    assert list(model) == layers and type(model[1]) is nn.BatchNorm2d and get_history(model) == []
    assert_same_state(model, before)


def test_convert_with_refine_reads_an_iterator_once_for_both_steps_and_checks_its_options():
    generator = iter(images(48).split(16))
    model = normswap.convert(small_cnn(), "gn", groups=4, affine="fit", data=generator, refine=5, progress=False)
    assert refine_report(model).train_samples + refine_report(model).holdout_samples == 48
    copied = normswap.convert(small_cnn(), "gn", groups=4, data=images(32).split(16), refine=3, progress=False)
    assert [step["op"] for step in get_history(copied)] == ["plan", "refine"]
    with pytest.raises(PlanError, match="refine= needs calibration data"):
        normswap.convert(small_cnn(), "gn", groups=4, refine=3)
    with pytest.raises(PlanError, match="refine_options only apply with refine"):
        normswap.convert(small_cnn(), "gn", groups=4, refine_options={"lr": 1.0})
    with pytest.raises(PlanError, match="target only apply to a plan made with affine='fit'"):
        normswap.convert(small_cnn(), "gn", groups=4, data=images(32).split(16), refine=3, fit_target="local")
    with pytest.raises(PlanError, match="pass progress to convert itself"):
        normswap.convert(small_cnn(), "gn", groups=4, data=images(32).split(16), refine=3,
                         refine_options={"progress": False})


def test_refine_report_of_a_model_that_was_not_refined_is_an_error():
    with pytest.raises(NormswapError, match="has not been refined"):
        refine_report(small_cnn())


def test_the_convert_command_fits_and_refines_on_a_tensor_file(demo_model, digits, tmp_path):
    checkpoint = save(demo_model, tmp_path / "digits.safetensors")
    torch.save(digits.train_images[:256], tmp_path / "calib.pt")
    out = tmp_path / "digits-gn.safetensors"
    result = CliRunner().invoke(main, ["convert", str(checkpoint), "--to", "gn", "--groups", "8", "--affine", "fit",
                                       "--data", str(tmp_path / "calib.pt"), "--refine", "30", "--no-progress",
                                       "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["refine"]["max_steps"] == 30 and summary["fit"]["chosen"] == "global"
    refined = load(out)
    assert [step["op"] for step in get_history(refined)] == ["plan", "fit", "refine"]
    assert agreement(refined, demo_model, digits.test_images) > 0.9
    text = CliRunner().invoke(main, ["convert", str(checkpoint), "--to", "gn", "--groups", "8", "--data",
                                     str(tmp_path / "calib.pt"), "--refine", "5", "--refine-trainable", "norm",
                                     "--no-progress", "-o", str(tmp_path / "copy-refined.safetensors")])
    assert text.exit_code == 0, text.output
    assert "refine (kl, norm:" in text.stdout and "wrote" in text.stdout


@pytest.mark.parametrize(
    "args, message",
    [(["--refine", "5"], "--refine needs --data"), (["--data", "x.pt"], "--data is only used by"),
     (["--affine", "fit"], "--affine fit needs --data")],
)
def test_the_convert_command_refuses_refine_options_that_cannot_work(tmp_path, args, message):
    checkpoint = save(small_cnn(), tmp_path / "cnn.safetensors")
    result = CliRunner().invoke(main, ["convert", str(checkpoint), "--to", "gn", "--groups", "4", *args])
    assert result.exit_code == 2 and message in result.output


def test_the_convert_command_reports_a_bad_refine_pattern_in_one_line(demo_model, tmp_path):
    checkpoint = save(demo_model, tmp_path / "digits.safetensors")
    torch.save(torch.rand(64, 1, 8, 8), tmp_path / "calib.pt")
    result = CliRunner().invoke(main, ["convert", str(checkpoint), "--to", "gn", "--groups", "8", "--data",
                                       str(tmp_path / "calib.pt"), "--refine", "5", "--refine-trainable", "head.*"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: the trainable pattern 'head.*' matches no")
    assert not (tmp_path / "digits-gn.safetensors").exists()


@pytest.mark.cuda
def test_refinement_on_the_gpu_gives_back_a_cpu_model_and_leaves_the_original_on_the_cpu():
    original, converted = converted_cnn()
    before = snapshot(original)
    refine(converted, original, images(64).split(16), steps=10, device="cuda", holdout=0.2, progress=False)
    report = refine_report(converted)
    assert report.loss_after < report.loss_before
    assert all(p.device.type == "cpu" for p in (*converted.parameters(), *original.parameters()))
    assert_same_state(original, before)


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [True, torch.float16])
def test_refinement_of_a_gpu_model_under_autocast(amp):
    original, converted = converted_cnn()
    original, converted = original.cuda(), converted.cuda()
    refine(converted, original, images(64).split(16), steps=10, amp=amp, holdout=0.2, progress=False)
    report = refine_report(converted)
    assert report.loss_after < report.loss_before
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in converted.parameters())


def test_a_run_that_draws_more_than_the_data_holds_keeps_no_holdout_and_shifts_digits_as_far_as_the_original_allows(
        demo_model, fitted_demo, digits):
    converted = copy.deepcopy(fitted_demo)
    refine(converted, demo_model, digits.train_images[:256].split(64), steps=12, progress=False)
    report = refine_report(converted)
    assert (report.holdout_samples, report.train_samples, report.evaluations) == (0, 256, [])
    assert (report.kept, report.stopped, report.steps) == ("last", "steps", 12)
    # the trained demo model answers 8x8 digits shifted by a pixel as it answers them: shifting shows more of it
    assert (report.augment, report.shift) == ("shift", [1, 1])
    assert "(images shifted by up to 1x1 pixels)" in str(report)


@pytest.mark.parametrize("steps, shifted", [(21, False), (22, True)])
def test_all_1348_digits_are_shifted_too_once_the_run_meets_one_of_them_twice(demo_model, fitted_demo, digits, steps,
                                                                               shifted):
    converted = copy.deepcopy(fitted_demo)
    refine(converted, demo_model, digits.train_images.split(64), steps=steps, progress=False)
    report = refine_report(converted)
    # 21 steps of 64 draw 1,344 of the 1,348 digits, each once; 22 steps draw some twice
    assert (report.augment, report.shift) == (("shift", [1, 1]) if shifted else (None, None))
    assert (report.holdout_samples, report.steps) == (0, steps)


@pytest.mark.parametrize("samples, batch_size, steps", [(32, 16, 200), (64, 8, 600)])
def test_without_steps_the_run_makes_75_passes_over_the_training_data_and_at_least_200_steps(samples, batch_size,
                                                                                                steps):
    original, converted = converted_cnn()
    refine(converted, original, images(samples).split(16), batch_size=batch_size, progress=False)
    report = refine_report(converted)
    # 32 samples in batches of 16: 2 steps a pass, 150 for 75 passes, raised to the least; 64 of 8: 8 a pass
    assert (report.max_steps, report.steps, report.holdout_samples, report.kept) == (steps, steps, 0, "last")


def test_without_steps_the_most_steps_bound_a_run_on_much_data_which_may_then_hold_out_a_fifth(monkeypatch):
    # the package's attribute normswap.refine is the function: the module is in sys.modules
    monkeypatch.setattr(sys.modules["normswap.refine"], "AUTO_STEPS", (10, 40))
    original, converted = converted_cnn()
    refine(converted, original, images(200).split(20), batch_size=4, progress=False)
    report = refine_report(converted)
    # 75 passes of 50 steps each capped at 40 steps, which draw 160 samples: what four fifths of the 200 hold
    assert (report.max_steps, report.holdout_samples, report.train_samples) == (40, 40, 160)
    assert report.evaluations and report.evaluations[0]["step"] == 0 and report.augment is None


def test_the_original_runs_once_per_training_image_and_offset_of_a_shift():
    original, converted = converted_cnn()
    calls = []
    original.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    refine(converted, original, images(16).split(16), steps=40, batch_size=16, holdout=0, augment="shift",
           progress=False)
    # 12x12 images shift by up to 2 pixels each way, 25 offsets; each of the 40 batches holds all 16 images, so
    # the original runs on them once for every offset drawn and never again for it
    assert refine_report(converted).shift == [2, 2]
    assert calls == [16] * len(calls) and 0 < len(calls) <= 25 < 40


def test_kept_outputs_of_the_original_on_shifted_images_train_the_same_model_as_running_it_every_step():
    results = []
    for kept in (True, False):
        original, converted = converted_cnn()
        if not kept:  # an output that is not one tensor is never kept
            original.register_forward_hook(lambda module, args, output: (output, len(args[0])))
            converted.register_forward_hook(lambda module, args, output: (output, len(args[0])))
        refine(converted, original, images(16).split(16), steps=30, batch_size=16, holdout=0, augment="shift",
               progress=False)
        results.append(snapshot(converted))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-6)


def test_images_are_not_shifted_where_shifting_changes_the_originals_answers():
    torch.manual_seed(0)
    position_sensitive = randomize_norm_layers(nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 5)), seed=1).eval()
    converted = normswap.convert(copy.deepcopy(position_sensitive), "gn", groups=4)
    calls = []
    position_sensitive.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    refine(converted, position_sensitive, images(64).split(16), steps=6, progress=False)
    report = refine_report(converted)
    assert (report.augment, report.shift) == (None, None)
    # the original's answers on the 64 images, four shifted rounds at 2 pixels and four at 1 (each kept fewer than
    # 90% of its answers), then its outputs computed once before the first step: no step runs it
    assert calls == [64] * 10 and report.steps == 6


def test_augment_shift_asks_for_an_eighth_of_each_side():
    original, converted = converted_cnn()
    refine(converted, original, images(64, size=16).split(16), steps=3, augment="shift", progress=False)
    assert refine_report(converted).shift == [2, 2]


@pytest.mark.parametrize("steps, held", [(4, 16), (5, 0)])
def test_a_fifth_is_held_out_only_where_the_rest_holds_every_sample_the_run_draws(steps, held):
    original, converted = converted_cnn()
    refine(converted, original, images(80).split(16), steps=steps, batch_size=16, progress=False)
    report = refine_report(converted)
    # 4 steps of 16 draw 64 samples, what the 64 left after a holdout of 16 hold; 5 steps draw more
    assert (report.holdout_samples, report.train_samples) == (held, 80 - held)
    assert bool(report.evaluations) == bool(held) and (report.kept == "last") == (not held)


@pytest.mark.parametrize("augment, expected", [(None, [32, 32, 16]), ("shift", [32] * 10)])
def test_without_augmentation_the_original_runs_once_over_the_training_data_not_at_every_step(augment, expected):
    original, converted = converted_cnn()
    calls = []
    original.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    refine(converted, original, images(80).split(16), steps=10, batch_size=32, holdout=0, augment=augment,
           progress=False)
    report = refine_report(converted)
    # without: one pass in batches of 32 before the first step; shifted images (12x12 by up to 2 pixels, 25
    # offsets): the original on every batch, each of its 32 images met at the batch's offset for the first time
    assert report.steps == 10 and calls == expected


def test_cached_outputs_of_the_original_train_the_same_model_as_running_it_every_step():
    results = []
    for cached in (True, False):
        original, converted = converted_cnn()
        if not cached:  # an output that cannot be joined sample by sample is never kept
            original.register_forward_hook(lambda module, args, output: (output, len(args[0])))
            converted.register_forward_hook(lambda module, args, output: (output, len(args[0])))
        refine(converted, original, images(48).split(16), steps=6, holdout=0, augment=None, progress=False)
        results.append(snapshot(converted))
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-4, atol=1e-6)


def test_shifting_needs_image_inputs():
    original = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).eval()
    converted = normswap.convert(copy.deepcopy(original), "gn", groups=2)
    with pytest.raises(RefineError, match="augment='shift' needs the model input to be a batch of images"):
        refine(converted, original, [torch.randn(16, 4)], augment="shift", progress=False)
    refine(converted, original, [torch.randn(16, 4)], steps=3, progress=False)
    report = refine_report(converted)
    assert report.augment is None  # "auto" shifts only images


def test_refine_logs_how_long_the_run_will_take_after_its_first_steps(caplog):
    original, converted = converted_cnn()
    with caplog.at_level("INFO", logger="normswap"):
        refine(converted, original, images(48).split(16), steps=20, progress=False)
    line = next(record.getMessage() for record in caplog.records if "will take about" in record.getMessage())
    assert line.startswith("refine: 20 steps will take about ") and "fewer steps=" in line


def test_the_state_kept_has_the_lowest_holdout_loss():
    original, converted = converted_cnn()
    refine(converted, original, images(64).split(16), steps=24, eval_every=2, patience=None, lr=3e-2,
           holdout=0.25, progress=False)
    report = refine_report(converted)
    losses = [evaluation["loss"] for evaluation in report.evaluations]
    assert report.loss_after == min(losses) and report.best_step == report.evaluations[losses.index(min(losses))][
        "step"]
