"""The bundled example: the shipped digits model, its data split, and the demo that tells normswap's story on it."""

import copy

import pytest
import torch

from normswap.arch import ArchSpec
from normswap.demo import CHECKPOINT, accuracy, agreement, digits_data, load_demo_model, run_demo, shift_domain
from normswap.history import get_arch


@pytest.fixture(scope="module")
def data():
    return digits_data()


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def demo():
    lines = []
    result = run_demo(echo=lines.append)
    return result, "\n".join(lines)


def test_the_shipped_checkpoint_is_small_and_classifies_the_held_out_digits(model, data):
    assert CHECKPOINT.stat().st_size < 300 * 1024
    assert accuracy(model, data.test_images, data.test_labels) >= 0.98
    assert not model.training


def test_the_digits_split_is_fixed_and_covers_every_class(data):
    assert data.train_images.shape == (1348, 1, 8, 8) and data.test_images.shape == (449, 1, 8, 8)
    assert 0.0 <= data.train_images.min() and data.train_images.max() <= 1.0
    assert torch.bincount(data.test_labels, minlength=10).min() >= 30
    again = digits_data()
    assert torch.equal(again.test_labels, data.test_labels) and torch.equal(again.train_images, data.train_images)


def test_the_demo_architecture_is_rebuilt_from_its_import_path(model, data):
    rebuilt = ArchSpec.from_dict(get_arch(model)).build()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(data.test_images[:8]), model(data.test_images[:8]))


def test_the_domain_shift_breaks_the_original_model(model, data):
    assert accuracy(model, shift_domain(data.test_images), data.test_labels) < 0.5


def test_the_demo_prints_one_table_with_every_step(demo):
    result, printed = demo
    assert printed == str(result)
    steps = [row.step for row in result.rows]
    assert steps == [
        "BatchNorm (original)",
        "GroupNorm, copied affine",
        "GroupNorm, reset affine",
        "GroupNorm, fitted affine",
        "GroupNorm, fitted + refined",
        "FrozenBatchNorm",
        "BatchNorm folded into convs",
        "BatchNorm, shifted domain",
        "BatchNorm, recalibrated",
    ]
    assert result.seconds < 60


def test_the_demo_shows_fit_keeping_the_model_working_where_copy_and_reset_do_not(demo):
    result, _ = demo
    fitted = result.row("GroupNorm, fitted")
    assert fitted.agreement >= 0.88 and fitted.accuracy >= 0.88
    for other in ("GroupNorm, copied", "GroupNorm, reset"):
        assert result.row(other).agreement < fitted.agreement - 0.5


def test_the_demo_shows_refinement_without_labels_bringing_the_fitted_model_close_to_the_original(demo):
    result, _ = demo
    refined, fitted = result.row("GroupNorm, fitted + refined"), result.row("GroupNorm, fitted affine")
    assert refined.agreement >= 0.98 and refined.agreement > fitted.agreement
    assert refined.accuracy >= result.row("BatchNorm (original)").accuracy - 0.01
    assert "unlabeled" in refined.detail


def test_the_demo_shows_freezing_and_folding_are_exact(demo):
    result, printed = demo
    original = result.row("BatchNorm (original)").accuracy
    for step in ("FrozenBatchNorm", "BatchNorm folded"):
        assert result.row(step).agreement == 1.0 and result.row(step).accuracy == original
    assert "max abs diff 0.0e+00" in result.row("FrozenBatchNorm").detail
    assert "forward time" in result.row("BatchNorm folded").detail


def test_the_demo_shows_recalibration_recovering_from_the_domain_shift(demo):
    result, _ = demo
    assert result.row("BatchNorm, shifted").accuracy < 0.5
    assert result.row("BatchNorm, recalibrated").accuracy > result.row("BatchNorm, shifted").accuracy + 0.4


@pytest.mark.slow
def test_the_training_script_reproduces_the_shipped_model(model, data):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "train_demo_model.py"
    spec = importlib.util.spec_from_file_location("train_demo_model", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    trained = script.train()
    assert accuracy(trained, data.test_images, data.test_labels) >= 0.98
    assert agreement(trained, copy.deepcopy(model), data.test_images) >= 0.98
