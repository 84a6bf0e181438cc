"""The Python API keeps the command line's promises: the checks it makes, what operations return, the names they
take, offline builds and saves that leave the process as they found it. Real libraries' models, randomly
initialised."""

from __future__ import annotations

import copy
import logging
import os
import signal
import sys
import threading

import monai
import pytest
import torch
import torchvision
from torch import nn

import normswap
from normswap.api import check_plan, check_statistics
from normswap.arch import ArchSpec
from normswap.checkpoint import formats
from normswap.errors import PlanError
from normswap.fit import fit_converted
from normswap.offline import OFFLINE_ENVIRONMENT
from normswap.refine import RefineReport

from .helpers import randomize_norm_layers


@pytest.fixture
def warnings_logged(caplog):
    """The messages normswap logs at warning level during the test."""
    caplog.set_level(logging.WARNING, logger="normswap")
    return lambda: [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norm_layers(torchvision.models.resnet18(weights=None, num_classes=10)).eval()


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- nothing to convert: a warning from Python, as the command line refuses ------------------------------------

def test_converting_a_groupnorm_model_to_groupnorm_warns_why_and_changes_nothing(warnings_logged):
    model = torchvision.models.resnet18(weights=None, norm_layer=lambda channels: nn.GroupNorm(8, channels))
    before = copy.deepcopy(model.state_dict())
    assert normswap.convert(model, "gn") is model
    assert warnings_logged() == ["nothing to convert: every norm layer is left as it is (already GroupNorm: bn1, "
                                 "layer1.0.bn1, layer1.0.bn2, ...)"]
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_freezing_monais_instance_norm_unet_warns_that_it_has_no_batchnorm(warnings_logged):
    unet = monai.networks.nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    kinds = [type(m) for m in unet.modules()]
    assert nn.InstanceNorm2d in kinds
    assert normswap.freeze(unet) is unet
    assert warnings_logged() == ["nothing to convert: the model has no BatchNorm-like layer"]
    assert [type(m) for m in unet.modules()] == kinds


def test_a_conversion_that_changes_something_does_not_warn_and_unmatched_patterns_are_named(warnings_logged):
    normswap.freeze(resnet18(), include=["layer1.*"])
    assert warnings_logged() == []
    normswap.freeze(resnet18(), include=["layer1.*", "backbone.*"])
    assert warnings_logged() == ["the pattern 'backbone.*' matches no norm layer"]


def test_check_plan_refuses_an_empty_plan_when_asked(warnings_logged):
    p = normswap.plan(resnet18(), "frozen", include=["head.*"])
    with pytest.raises(PlanError, match=r"^nothing to convert: no norm layer matches the include pattern\(s\) "
                                        r"'head\.\*'$"):
        check_plan(p, empty="error")
    with pytest.raises(PlanError, match="choose warn or error"):
        check_plan(p, empty="ignore")


# --- statistics: warned about, refused with strict -------------------------------------------------------------

def sick_resnet() -> nn.Module:
    model = resnet18()
    with torch.no_grad():
        model.layer1[0].bn1.running_mean[3] = float("nan")
        model.layer2[0].bn2.running_var[:2] = -1.0
    return model


def test_nan_or_negative_statistics_are_warned_about_per_layer_and_the_conversion_goes_on(warnings_logged):
    model = normswap.freeze(sick_resnet())
    assert warnings_logged() == ["layer 'layer1.0.bn1': running statistics have 1 NaN or infinite value(s)",
                                 "layer 'layer2.0.bn2': running_var has 2 negative value(s)"]
    assert type(model.layer1[0].bn1).__name__ == "FrozenBatchNorm"


def test_strict_refuses_bad_statistics_before_anything_changes():
    model = sick_resnet()
    with pytest.raises(PlanError, match=r"^refusing to convert with strict statistics checks: layer 'layer1\.0\.bn1'"
                                        r": running statistics have 1 NaN or infinite value\(s\) \(and 1 more\); "):
        normswap.convert(model, "gn", groups=8, strict=True)
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d
    assert check_statistics(resnet18(), strict=True) == []


# --- one convention: operations return the model; (model, original) everywhere -------------------------------

def test_refine_returns_the_model_and_its_report_is_read_from_it():
    original = resnet18()
    model = normswap.convert(copy.deepcopy(original), "gn", groups=8)
    data = list(images(16).split(8))
    assert normswap.refine(model, original, data, steps=2, holdout=0, progress=False) is model
    report = normswap.refine_report(model)
    assert isinstance(report, RefineReport) and report.steps == 2


def test_the_old_refine_return_value_and_keyword_names_still_work_with_a_deprecation_warning():
    original = resnet18()
    model = normswap.convert(copy.deepcopy(original), "gn", groups=8)
    data = list(images(16).split(8))
    with pytest.warns(DeprecationWarning, match=r"refine\(return_report=True\) is deprecated"):
        report = normswap.refine(model, original, data, steps=1, holdout=0, progress=False, return_report=True)
    assert isinstance(report, RefineReport)
    with pytest.warns(DeprecationWarning, match=r"refine\(converted=\.\.\.\) is deprecated: pass model=\.\.\."):
        assert normswap.refine(converted=model, original=original, data=data, steps=1, holdout=0,
                               progress=False) is model
    with pytest.raises(TypeError, match="the same argument twice"):
        normswap.refine(converted=model, model=model, original=original, data=data)


def test_compare_and_fit_take_the_pair_as_original_and_model_and_accept_the_old_names():
    original = resnet18()
    frozen = normswap.freeze(copy.deepcopy(original))
    data = [images(2)]
    new = normswap.compare(original=original, model=frozen, data=data, layers=False)
    with pytest.warns(DeprecationWarning) as caught:
        old = normswap.compare(model_a=original, model_b=frozen, data=data, layers=False)
    assert [str(warning.message) for warning in caught] == [
        "compare(model_a=...) is deprecated: pass original=... instead",
        "compare(model_b=...) is deprecated: pass model=... instead"]
    assert old.relative == new.relative < 1e-6
    rows = normswap.plan(original, "gn", groups=8, affine="fit").rows
    converted = normswap.convert(copy.deepcopy(original), "gn", groups=8, affine="reset")
    with pytest.warns(DeprecationWarning) as caught:
        fit_converted(converted=converted, reference=original, rows=rows, data=data, progress=False)
    assert {str(warning.message) for warning in caught} == {
        "fit_converted(converted=...) is deprecated: pass model=... instead",
        "fit_converted(reference=...) is deprecated: pass original=... instead"}
    assert normswap.fit_report(converted).layers


@pytest.mark.parametrize("how", [{"input_key": "image"}, {"input_fn": lambda batch: batch["image"]}])
def test_fold_takes_its_example_from_dict_batches_with_input_key_or_input_fn(how):
    original = resnet18()
    x = images(2)
    folded = normswap.fold(copy.deepcopy(original), data=[{"image": x, "label": torch.tensor([0, 1])}], **how)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        expected, got = original(x), folded(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    plan = normswap.plan_fold(original, data=[{"image": x}], **how)
    assert len(plan) == 20 and plan.example.startswith("2x3x32x32")


# --- no lasting process-wide state: the environment, signal handlers ---------------------------------------------

RECORDER = '''
import os
import torch

SEEN_AT_IMPORT = {name: os.environ.get(name) for name in ("YOLO_AUTOINSTALL", "YOLO_OFFLINE", "HF_HUB_OFFLINE",
                                                         "TRANSFORMERS_OFFLINE")}


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = {name: os.environ.get(name) for name in SEEN_AT_IMPORT}
        self.bn = torch.nn.BatchNorm1d(2)
'''


def test_building_an_architecture_is_offline_for_the_call_only(tmp_path, monkeypatch):
    for name in OFFLINE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "offline_probe.py").write_text(RECORDER)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(os.environ)
    model = ArchSpec.parse("offline_probe:Recorder").build()
    assert model.seen == OFFLINE_ENVIRONMENT
    assert sys.modules["offline_probe"].SEEN_AT_IMPORT == OFFLINE_ENVIRONMENT, "the import of the package is offline too"
    assert dict(os.environ) == before


def test_the_command_line_leaves_the_environment_of_its_caller_as_it_was(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from normswap.cli import main

    for name in OFFLINE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    torch.save(resnet18().state_dict(), tmp_path / "r18.pt")
    before = dict(os.environ)
    result = CliRunner().invoke(main, ["freeze", str(tmp_path / "r18.pt"), "--arch", "torchvision.models:resnet18",
                                       "--arch-kwargs", '{"num_classes": 10}', "--dry-run"])
    assert result.exit_code == 0, result.output
    assert dict(os.environ) == before


def test_save_installs_no_signal_handler_and_works_from_any_thread(tmp_path, monkeypatch):
    handlers = []
    write = formats.write_safetensors

    def recording(*args, **kwargs):
        handlers.append(signal.getsignal(signal.SIGTERM))
        return write(*args, **kwargs)

    monkeypatch.setattr(formats, "write_safetensors", recording)
    model = resnet18()
    before = signal.getsignal(signal.SIGTERM)
    normswap.save(model, tmp_path / "main.safetensors")
    errors = []

    def save_in_a_thread():
        try:
            normswap.save(model, tmp_path / "thread.safetensors")
        except BaseException as exc:  # reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=save_in_a_thread)
    thread.start()
    thread.join(timeout=120)
    assert errors == [] and handlers == [before, before]
    assert signal.getsignal(signal.SIGTERM) is before
    for name in ("main", "thread"):
        loaded = normswap.load_checkpoint(tmp_path / f"{name}.safetensors", "torchvision.models:resnet18",
                                          arch_kwargs={"num_classes": 10})
        assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_a_failing_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def failing(path, *args, **kwargs):
        path.write_bytes(b"half")
        raise RuntimeError("disk gone")

    monkeypatch.setattr(formats, "write_safetensors", failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        normswap.save(resnet18(), tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []
