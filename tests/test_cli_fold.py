"""The ``fold`` and ``verify`` commands: what they write, print and report, checked against the models themselves."""

import copy
import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

import normswap
from normswap.arch import ArchSpec
from normswap.checkpoint import load, save
from normswap.cli import main
from normswap.history import set_arch
from tests.helpers import save_resnet18_with_data

ARCH = ["--arch", "resnet18", "--arch-kwargs", '{"num_classes": 10}']


@pytest.fixture
def files(tmp_path):
    """A trained-looking resnet18 state dict, its model (eval mode), and a labelled tensor data file."""
    return save_resnet18_with_data(tmp_path)


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fold_writes_a_checkpoint_that_loads_and_matches_the_eval_output(files):
    model, checkpoint, _ = files
    before = sha256(checkpoint)
    result = run("fold", checkpoint, *ARCH)
    assert result.exit_code == 0, result.output
    out = checkpoint.with_name("resnet18-folded.safetensors")
    assert "fold: folded 20 of 20 BatchNorm layer(s), example input 2x3x224x224 (timm's data config)" \
        in result.output and f"wrote {out}" in result.output
    assert sha256(checkpoint) == before, "the input checkpoint is not touched"
    folded = load(out).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())


def test_fold_dry_run_prints_json_and_writes_nothing(files):
    _, checkpoint, _ = files
    result = run("fold", checkpoint, *ARCH, "--dry-run", "--json", "--freeze-rest")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert len(plan["pairs"]) == 20 and plan["pairs"][0] == {
        "conv": "conv1", "bn": "bn1", "conv_class": "torch.nn.modules.conv.Conv2d",
        "bn_class": "torch.nn.modules.batchnorm.BatchNorm2d", "channels": 64, "new_bias": True, "keeps": None}
    assert plan["options"]["freeze_rest"] is True
    assert not checkpoint.with_name("resnet18-folded.safetensors").exists()


def test_fold_runs_the_model_on_the_input_shape_or_the_data_given(files):
    _, checkpoint, data = files
    result = run("fold", checkpoint, *ARCH, "--dry-run", "--input-shape", "1,3,64,64")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("fold: folded 20 of 20 BatchNorm layer(s), example input 1x3x64x64 (input_shape)")
    result = run("fold", checkpoint, *ARCH, "--dry-run", "--json", "--data", data)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["example"] == "2x3x32x32 (the first batch of the data)"


def test_fold_that_folds_nothing_writes_nothing_and_exits_1_with_the_reason(files):
    _, checkpoint, _ = files
    out = checkpoint.with_name("resnet18-folded.safetensors")
    result = CliRunner().invoke(main, ["fold", str(checkpoint), *ARCH, "--within", "fc"])
    assert result.exit_code == 1
    assert "fold: folded 0 of 20 BatchNorm layer(s)" in result.output and "left (outside fc): bn1" in result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: folded 0 of 20 BatchNorm layer(s), nothing written (first reason: outside fc)")
    assert not out.exists()

    result = CliRunner().invoke(main, ["fold", str(checkpoint), *ARCH, "--input-shape", "1,5,32,32"])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().splitlines()[-1].startswith(
        "error: folded 0 of 20 BatchNorm layer(s), nothing written (first reason: the model fails on the example "
        "input 1x5x32x32: RuntimeError: Given groups=1")
    assert "Traceback" not in result.output


def test_fold_input_shape_and_data_are_checked(files):
    _, checkpoint, data = files
    for shape in ("1,3,x", "0,3,8,8", ""):
        result = CliRunner().invoke(main, ["fold", str(checkpoint), *ARCH, "--input-shape", shape])
        assert result.exit_code == 2 and "is not a shape" in result.output, result.output
    result = CliRunner().invoke(main, ["fold", str(checkpoint), *ARCH, "--input-shape", "1,3,8,8", "--data",
                                       str(data)])
    assert result.exit_code == 2 and "not both" in result.output


def test_fold_refuses_to_overwrite_without_force(files):
    _, checkpoint, _ = files
    out = checkpoint.with_name("taken.safetensors")
    out.write_bytes(b"keep me")
    result = CliRunner().invoke(main, ["fold", str(checkpoint), *ARCH, "-o", str(out)])
    assert result.exit_code == 1 and "error:" in result.output
    assert out.read_bytes() == b"keep me"


def test_verify_reports_exact_agreement_for_a_folded_checkpoint(files):
    model, checkpoint, data = files
    assert run("fold", checkpoint, *ARCH).exit_code == 0
    folded = checkpoint.with_name("resnet18-folded.safetensors")
    result = run("verify", checkpoint, folded, *ARCH, "--data", data, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    assert "compared 6 sample(s) in 2 batch(es)" in result.output
    assert "top-1 agreement 100.00%" in result.output
    assert "no layer differs by more than 0.0001" in result.output


def test_verify_json_finds_where_a_groupnorm_conversion_parts_ways(files, tmp_path):
    model, checkpoint, data = files
    images, labels = torch.load(data)
    converted = normswap.convert(copy.deepcopy(model), "gn", groups=8)
    set_arch(converted, ArchSpec.parse("resnet18", {"num_classes": 10}).to_dict())
    save(converted, tmp_path / "gn.safetensors")
    result = run("verify", checkpoint, tmp_path / "gn.safetensors", *ARCH, "--data", data, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["first_divergence"] == "bn1" and report["samples"] == 6
    with torch.no_grad():
        expected = (model(images).argmax(1) == labels).double().mean().item()
    assert report["accuracy_a"] == pytest.approx(expected)


def test_verify_passes_its_gates_when_the_models_agree(files):
    _, checkpoint, data = files
    assert run("fold", checkpoint, *ARCH).exit_code == 0
    folded = checkpoint.with_name("resnet18-folded.safetensors")
    result = run("verify", checkpoint, folded, *ARCH, "--data", data, "--max-relative", 1e-5,
                 "--min-agreement", 1.0)
    assert result.exit_code == 0, result.output


def test_verify_fails_with_exit_1_when_a_gate_is_missed(files, tmp_path):
    model, checkpoint, data = files
    converted = normswap.convert(copy.deepcopy(model), "gn", groups=8)
    set_arch(converted, ArchSpec.parse("resnet18", {"num_classes": 10}).to_dict())
    save(converted, tmp_path / "gn.safetensors")
    for gate in (["--max-relative", "1e-5"], ["--min-agreement", "1.0"]):
        result = CliRunner().invoke(main, ["verify", str(checkpoint), str(tmp_path / "gn.safetensors"), *ARCH,
                                           "--data", str(data), "--no-layers", *gate])
        assert result.exit_code == 1, result.output
        assert "compared 6 sample(s)" in result.output, "the report is printed before the verdict"
        assert result.output.strip().splitlines()[-1].startswith("error: verify failed:")
        assert "Traceback" not in result.output


def test_verify_without_data_is_a_one_line_error(files):
    _, checkpoint, _ = files
    result = CliRunner().invoke(main, ["verify", str(checkpoint), str(checkpoint), *ARCH, "--data",
                                       str(checkpoint.with_name("missing.pt"))])
    assert result.exit_code == 1
    assert result.output.startswith("error: calibration data") and len(result.output.strip().splitlines()) == 1
