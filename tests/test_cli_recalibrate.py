"""The ``recalibrate`` command: what it writes and prints, checked against the Python API on the same data."""

import hashlib
import json

import pytest
import torch
from click.testing import CliRunner

from normswap.checkpoint import load
from normswap.cli import main
from normswap.history import get_history
from normswap.recalibrate import recalibrate
from tests.helpers import save_resnet18

ARCH = ["--arch", "resnet18", "--arch-kwargs", '{"num_classes": 10}']


@pytest.fixture
def files(tmp_path):
    """A resnet18 state dict with stale statistics, its model, and a labelled tensor data file of shifted images."""
    model, checkpoint = save_resnet18(tmp_path)
    images = torch.randn(10, 3, 32, 32) * 3 + 1
    data = tmp_path / "data.pt"
    torch.save((images, torch.randint(0, 10, (10,))), data)
    return model, checkpoint, data, images


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def running_statistics(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_recalibrate_writes_the_statistics_the_api_computes_on_the_same_batches(files, method):
    model, checkpoint, data, images = files
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    result = run("recalibrate", checkpoint, *ARCH, "--data", data, "--batch-size", 4, "--method", method)
    assert result.exit_code == 0, result.output
    out = checkpoint.with_name("resnet18-recalibrated.safetensors")
    assert f"recalibrate ({method}): 20 layer(s) from 3 batch(es), 10 sample(s)" in result.output
    assert f"wrote {out}" in result.output
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before
    expected = running_statistics(recalibrate(model, images.split(4), method=method))
    written = load(out)
    for key, value in running_statistics(written).items():
        assert torch.allclose(value, expected[key], rtol=1e-5, atol=1e-6), key
    assert get_history(written)[-1]["op"] == "recalibrate"


def test_recalibrate_json_reports_batches_passes_and_layers(files, tmp_path):
    _, checkpoint, data, _ = files
    out = tmp_path / "out.safetensors"
    result = run("recalibrate", checkpoint, *ARCH, "--data", data, "--batch-size", 1, "--batches", 3,
                 "--method", "sequential", "-o", out, "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert (report["batches"], report["samples"], report["passes"], report["forward_cost"]) == (3, 3, 20, 1.0)
    assert report["output"] == str(out) and len(report["calibrated"]) == 20


def test_recalibrate_reads_a_folder_of_images_with_the_model_data_config(files, tmp_path):
    from PIL import Image

    _, checkpoint, _, _ = files
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), color=(40 * i, 100, 200)).save(folder / f"{i}.png")
    result = run("recalibrate", checkpoint, *ARCH, "--data", folder, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    assert "from 2 batch(es), 3 sample(s)" in result.output


def test_exact_at_batch_size_one_is_an_error_that_suggests_sequential_and_writes_nothing(files):
    _, checkpoint, data, _ = files
    result = run("recalibrate", checkpoint, *ARCH, "--data", data, "--batch-size", 1)
    assert result.exit_code == 1
    assert "error: layer 'layer4.0.bn1' sees one value per channel" in result.output
    assert "method='sequential'" in result.output
    assert not checkpoint.with_name("resnet18-recalibrated.safetensors").exists()


def test_missing_data_is_a_one_line_error(files, tmp_path):
    _, checkpoint, _, _ = files
    result = run("recalibrate", checkpoint, *ARCH, "--data", tmp_path / "nowhere")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: calibration data '{tmp_path / 'nowhere'}' does not exist (expected a folder of images, a tensor "
        "file or package.module:callable)"]
