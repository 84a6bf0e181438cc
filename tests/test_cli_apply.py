"""The normswap command: recipes (`apply`), fitted GroupNorm (`convert --affine fit`) and the demo."""

from pathlib import Path

import torch
from click.testing import CliRunner

from normswap.checkpoint import load, save
from normswap.cli import main
from normswap.demo import digits_data, load_demo_model
from normswap.fit import fit_report
from normswap.targets import classify

RECIPES = Path(__file__).parent.parent / "recipes"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def demo_checkpoint(tmp_path):
    path = tmp_path / "digits.safetensors"
    save(load_demo_model(), path)
    return path


def test_apply_runs_a_recipe_on_a_checkpoint_and_the_output_loads_with_its_history(tmp_path):
    ckpt = demo_checkpoint(tmp_path)
    result = run("apply", RECIPES / "syncbn-ddp.toml", ckpt)
    assert result.exit_code == 0, result.output
    out = tmp_path / "digits-syncbn-ddp.safetensors"
    assert f"wrote {out}" in result.stdout
    model = load(out)
    assert {classify(m).family for m in model.modules() if classify(m) is not None} == {"sync"}
    images = digits_data().test_images[:8]
    torch.testing.assert_close(model.eval()(images), load_demo_model().eval()(images))


def test_apply_dry_run_prints_one_plan_per_rule_and_writes_nothing(tmp_path):
    ckpt = demo_checkpoint(tmp_path)
    result = run("apply", RECIPES / "frozen-backbone.toml", ckpt, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("plan:") == 2
    assert files(tmp_path) == ["digits.safetensors"]


def test_apply_without_a_checkpoint_builds_the_architecture_fresh(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("apply", RECIPES / "groupnorm-dp.toml", "--arch", "test_resnet")
    assert result.exit_code == 0, result.output
    model = load(tmp_path / "test_resnet-groupnorm-dp.safetensors")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_apply_with_a_bad_recipe_is_one_line_and_leaves_nothing(tmp_path):
    ckpt = demo_checkpoint(tmp_path)
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[[rules]]\nmatch = '*'\nto = 'groupnorm'\n")
    result = run("apply", recipe, ckpt)
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: recipe {recipe} rule 1: 'to' must be one of gn, ln, in, frozen, sync, "
                                     "bn, got 'groupnorm'")
    assert files(tmp_path) == ["bad.toml", "digits.safetensors"]


def test_convert_with_fitted_affine_agrees_with_the_original_far_better_than_copy(tmp_path):
    ckpt = demo_checkpoint(tmp_path)
    data = digits_data()
    calibration = tmp_path / "calib.pt"
    torch.save(data.train_images[:64], calibration)
    fitted = run("convert", ckpt, "--to", "gn", "--groups", "8", "--affine", "fit", "--data", calibration,
                 "--batch-size", "16", "-o", tmp_path / "fit.safetensors")
    assert fitted.exit_code == 0, fitted.output
    assert "R" in fitted.stdout
    copied = run("convert", ckpt, "--to", "gn", "--groups", "8", "-o", tmp_path / "copy.safetensors")
    assert copied.exit_code == 0, copied.output

    original = load_demo_model().eval()
    images = data.test_images
    expected = original(images).argmax(1)

    def agreement(path):
        return (load(path).eval()(images).argmax(1) == expected).float().mean().item()

    assert agreement(tmp_path / "fit.safetensors") > 0.85
    assert agreement(tmp_path / "copy.safetensors") < 0.5
    assert fit_report(load(tmp_path / "fit.safetensors")).layers


def test_affine_fit_needs_data_and_frozen_takes_no_affine_mode(tmp_path):
    ckpt = demo_checkpoint(tmp_path)
    no_data = run("convert", ckpt, "--to", "gn", "--affine", "fit")
    assert no_data.exit_code == 2 and "--affine fit needs --data" in no_data.stderr
    frozen = run("convert", ckpt, "--to", "frozen", "--affine", "reset")
    assert frozen.exit_code == 1
    assert "affine='reset' applies to gn, ln and in" in frozen.stderr
    assert files(tmp_path) == ["digits.safetensors"]


def test_demo_tells_the_story_in_one_table():
    result = run("demo")
    assert result.exit_code == 0, result.output
    for row in ("GroupNorm, fitted affine", "FrozenBatchNorm", "folded", "recalibrated"):
        assert row in result.stdout
