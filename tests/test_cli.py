"""The normswap command: inspect, convert and freeze on checkpoint files; every bad input is one clear line."""

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from click.testing import CliRunner

import normswap
from normswap.checkpoint import atomic as atomic_module
from normswap.checkpoint import load, read_metadata
from normswap.cli import TARGET_CHOICES, main
from normswap.targets import TARGETS

from .helpers import randomize_norm_layers

ARCH_ARGS = ["--arch", "test_resnet", "--arch-kwargs", '{"num_classes": 10}']


@pytest.fixture(scope="module")
def reference():
    """timm's small test ResNet (BatchNorm2d with 16, 32, 48, 96 and 192 channels), non-trivial statistics."""
    torch.manual_seed(0)
    return randomize_norm_layers(timm.create_model("test_resnet", num_classes=10)).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def ckpt(tmp_path, reference):
    path = tmp_path / "net.pt"
    torch.save({"state_dict": reference.state_dict(), "epoch": 7}, path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_convert_writes_beside_the_input_and_summarises(ckpt, reference, images):
    result = run("convert", ckpt, "--to", "gn", *ARCH_ARGS)
    assert result.exit_code == 0, result.output
    out = ckpt.with_name("net-gn.safetensors")
    assert "converted 15 layer(s) to gn (groups: 32 x" in result.stdout
    assert "16 x" in result.stdout and "24 x" in result.stdout
    assert f"wrote {out} ({normswap.errors.byte_size(out.stat().st_size)})" in result.stdout
    expected = normswap.convert(copy.deepcopy(reference), "gn")
    torch.testing.assert_close(load(out).eval()(images), expected(images), rtol=1e-6, atol=1e-6)
    assert read_metadata(out)["source"]["entry"] == "state_dict"


def test_convert_of_a_converted_file_needs_no_arch(ckpt, images):
    first = ckpt.with_name("first.safetensors")
    assert run("convert", ckpt, "--to", "frozen", *ARCH_ARGS, "-o", first).exit_code == 0
    result = run("convert", first, "--to", "bn")
    assert result.exit_code == 0, result.output
    restored = load(ckpt.with_name("first-bn.safetensors")).eval()
    assert {type(m).__name__ for m in restored.modules()} >= {"BatchNorm2d"}
    assert [step["plan"]["target"] for step in normswap.history.get_history(restored)] == ["frozen", "bn"]


def test_dry_run_prints_the_plan_and_writes_nothing(ckpt, tmp_path):
    before = files(tmp_path)
    result = run("convert", ckpt, "--to", "gn", "--groups", "8", *ARCH_ARGS, "--dry-run")
    assert result.exit_code == 0
    assert result.stdout.startswith("plan: 15 layer(s) to gn, 0 skipped")
    assert "layer2.0.bn1" in result.stdout
    as_json = run("convert", ckpt, "--to", "gn", "--groups", "8", *ARCH_ARGS, "--dry-run", "--json")
    plan = normswap.Plan.from_dict(json.loads(as_json.stdout))
    assert len(plan) == 15 and {row.groups for row in plan} == {8}
    assert files(tmp_path) == before


def test_json_summary(ckpt, reference):
    result = run("convert", ckpt, "--to", "in", *ARCH_ARGS, "-o", ckpt.with_name("in.safetensors"), "--json")
    summary = json.loads(result.stdout)
    assert summary["layers"] == 15 and summary["output"].endswith("in.safetensors")
    assert summary["bytes"] == ckpt.with_name("in.safetensors").stat().st_size
    channels = [m.num_features for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert summary["groups"] == {str(c): channels.count(c) for c in set(channels)}  # "in": one group per channel


def test_freeze_is_convert_to_frozen(ckpt, reference, images):
    result = run("freeze", ckpt, *ARCH_ARGS, "--exclude", "layer4.*", "--trainable-affine")
    assert result.exit_code == 0, result.output
    model = load(ckpt.with_name("net-frozen.safetensors"))
    assert type(model.layer1[0].bn1).__name__ == "FrozenBatchNorm" and model.layer1[0].bn1.trainable_affine
    assert type(model.layer4[0].bn1).__name__ == "BatchNorm2d"
    torch.testing.assert_close(model.eval()(images), reference(images), rtol=1e-5, atol=1e-6)


def test_inspect_lists_layers_with_statistics_and_group_counts(ckpt, reference):
    result = run("inspect", ckpt, *ARCH_ARGS)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"file: {ckpt} (sha256 ") and "entry 'state_dict'" in lines[0]
    assert lines[1:3] == ["arch: test_resnet (num_classes=10)", "history: none"]
    bn = reference.layer1[0].bn1
    mean, var = bn.running_mean, bn.running_var
    row = next(line for line in lines if line.startswith("layer1.0.bn1 ")).split("  ")
    assert [cell.strip() for cell in row if cell.strip()] == [
        "layer1.0.bn1", "BatchNorm2d", "32", "1e-05", f"[{mean.min():.3g}, {mean.max():.3g}]",
        f"[{var.min():.3g}, {var.max():.3g}]", "8,16,32"]
    assert lines[-1] == "15 norm layer(s), no warnings"


def test_inspect_without_arch_reads_the_statistics_from_the_state_dict(ckpt, reference):
    result = run("inspect", ckpt, "--json")
    report = json.loads(result.stdout)
    assert report["arch"] is None and len(report["layers"]) == 15
    bn1 = next(layer for layer in report["layers"] if layer["names"] == ["bn1"])
    assert bn1["kind"] == "?" and bn1["channels"] == 32 and bn1["gn_groups"] == [8, 16, 32]
    assert bn1["var"] == [reference.bn1.running_var.min().item(), reference.bn1.running_var.max().item()]


@pytest.fixture
def sick_ckpt(tmp_path, reference):
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    state["layer1.0.bn1.running_var"][0] = float("nan")
    state["layer2.0.bn2.running_var"][:3] = -1.0
    state["layer3.0.bn1.weight"][:2] = 0.0
    path = tmp_path / "sick.pt"
    torch.save(state, path)
    return path


def test_inspect_warns_about_statistics_worth_acting_on(sick_ckpt):
    result = run("inspect", sick_ckpt, *ARCH_ARGS)
    assert "warning: layer1.0.bn1: running statistics have 1 NaN or infinite value(s)" in result.stdout
    assert "warning: layer2.0.bn2: running_var has 3 negative value(s)" in result.stdout
    assert "warning: layer3.0.bn1: 2 dead channel(s)" in result.stdout


def test_convert_warns_about_bad_statistics_and_strict_refuses(sick_ckpt, tmp_path):
    result = run("convert", sick_ckpt, "--to", "frozen", *ARCH_ARGS)
    assert result.exit_code == 0
    assert "warning: layer 'layer1.0.bn1': running statistics have 1 NaN" in result.stderr
    assert "warning: layer 'layer2.0.bn2': running_var has 3 negative" in result.stderr
    strict = run("convert", sick_ckpt, "--to", "frozen", *ARCH_ARGS, "-o", tmp_path / "strict.safetensors", "--strict")
    assert strict.exit_code == 1
    assert strict.stderr.strip() == (
        "error: refusing to convert with strict statistics checks: layer 'layer1.0.bn1': running statistics have 1 "
        "NaN or infinite value(s) (and 1 more); recalibrate the model first, or convert without --strict to keep "
        "them")
    assert not (tmp_path / "strict.safetensors").exists()


def _bad_file(name, content):
    def make(tmp_path):
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content == "dir":
            path.mkdir()
        elif content == "truncated":
            torch.save({"w": torch.ones(1000)}, path)
            path.write_bytes(path.read_bytes()[:1500])
        elif content == "no tensors":
            torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
        return [path]
    return make


BAD_INPUTS = {
    "empty file": (_bad_file("empty.pt", b""), 1, r"empty\.pt is empty \(0 bytes\)"),
    "truncated file": (_bad_file("cut.pt", "truncated"), 1,
                       r"cut\.pt cannot be read as a PyTorch checkpoint \(truncated.*central directory$"),
    "text file": (_bad_file("notes.pt", b"hello, these are notes\n"), 1, r"notes\.pt is not a PyTorch checkpoint"),
    "truncated safetensors": (_bad_file("cut.safetensors", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\""), 1,
                              r"cut\.safetensors is not a valid safetensors file"),
    "directory": (_bad_file("folder.pt", "dir"), 1, r"folder\.pt is a directory, not a checkpoint file"),
    "missing path": (_bad_file("missing.pt", None), 1, r"missing\.pt does not exist"),
    "unknown kind": (_bad_file("model.onnx", b"onnx"), 1,
                     r"model\.onnx is not a checkpoint: it is neither a safetensors file nor a PyTorch file"),
    "dict with no tensors": (_bad_file("opt.pt", "no tensors"), 1,
                             r"opt\.pt holds no tensors \(keys: epoch, optimizer\): pass --key to name"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_a_bad_input_file_is_one_clear_line_and_leaves_nothing(tmp_path, case):
    make, code, message = BAD_INPUTS[case]
    args = make(tmp_path)
    before = files(tmp_path)
    result = run("convert", *args, "--to", "gn", *ARCH_ARGS)
    assert result.exit_code == code
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.output
    assert files(tmp_path) == before


BAD_OPTIONS = {
    "wrong arch": (["--arch", "test_efficientnet"], 1, r"does not fit test_efficientnet: .*wrong architecture"),
    "wrong num_classes": (["--arch", "test_resnet"], 1, r"wrong num_classes\? .*10 outputs"),
    "unknown arch": (["--arch", "resnet_18"], 1, r"unknown architecture 'resnet_18'.*did you mean"),
    "bad import path": (["--arch", "no_such_pkg:net"], 1, r"cannot import 'no_such_pkg'"),
    "indivisible groups under exact": ([*ARCH_ARGS, "--groups", "32", "--group-policy", "exact"], 1,
                                       r"layer 'conv1.1' has 16 channels, not divisible by 32 groups"),
    "existing output": ([*ARCH_ARGS, "-o", "EXISTING"], 1, r"existing\.safetensors already exists.*--force"),
    "missing output folder": ([*ARCH_ARGS, "-o", "nowhere/out.safetensors"], 1, r"folder .*nowhere does not exist"),
    "non-safetensors output": ([*ARCH_ARGS, "-o", "out.pt"], 1, r"name it \*\.safetensors"),
    "groups and channels per group": ([*ARCH_ARGS, "--groups", "8", "--channels-per-group", "4"], 2,
                                      r"give --groups or --channels-per-group, not both"),
    "arch kwargs not JSON": (["--arch", "test_resnet", "--arch-kwargs", "num_classes=10"], 2,
                             r"Invalid value for '--arch-kwargs': not valid JSON"),
    "arch kwargs not an object": (["--arch", "test_resnet", "--arch-kwargs", "[10]"], 2, r"must be a JSON object"),
    "unknown target": ([*ARCH_ARGS, "--to", "xn"], 2, r"'xn' is not one of 'gn'"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS), ids=list(BAD_OPTIONS))
def test_a_bad_option_is_one_clear_line_and_leaves_nothing(ckpt, tmp_path, case):
    options, code, message = BAD_OPTIONS[case]
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"precious")
    options = [str(existing) if o == "EXISTING" else str(tmp_path / o) if o.startswith(("nowhere", "out.")) else o
               for o in options]
    before = files(tmp_path)
    result = run("convert", ckpt, "--to", "gn", *options)
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert re.search(message, result.stderr), result.stderr
    assert files(tmp_path) == before and existing.read_bytes() == b"precious"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_folder_without_write_permission(ckpt, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    before = files(tmp_path)
    result = run("convert", ckpt, "--to", "gn", *ARCH_ARGS, "-o", folder / "out.safetensors")
    assert result.exit_code == 1
    out = folder / "out.safetensors"
    assert result.stderr == f"error: cannot write {out}: no write permission in the folder {folder}\n"
    assert files(tmp_path) == before and files(folder) == []


def test_a_write_the_system_refuses_is_one_clear_line_and_leaves_nothing(ckpt, tmp_path, monkeypatch):
    """Root ignores folder permissions, so here the operating system's refusal is simulated: creating the
    temporary file fails with EACCES after the up-front permission check has passed."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic_module.os, "open", refusing_open)
    before = files(tmp_path)
    result = run("convert", ckpt, "--to", "gn", *ARCH_ARGS, "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 1
    out = tmp_path / "out.safetensors"
    assert result.stderr == f"error: cannot write {out}: no write permission in the folder {tmp_path}\n"
    assert files(tmp_path) == before


def test_force_replaces_an_existing_output(ckpt):
    out = ckpt.with_name("net-gn.safetensors")
    out.write_bytes(b"old")
    result = run("convert", ckpt, "--to", "gn", *ARCH_ARGS, "--force")
    assert result.exit_code == 0
    assert read_metadata(out)["arch"]["name"] == "test_resnet"


def test_a_pickled_model_needs_the_flag(tmp_path, reference):
    path = tmp_path / "whole.pt"
    torch.save(reference, path)
    refused = run("convert", path, "--to", "gn")
    assert refused.exit_code == 1 and "--trust-pickle" in refused.stderr
    assert files(tmp_path) == ["whole.pt"]
    assert run("convert", path, "--to", "gn", "--trust-pickle", "--dry-run").exit_code == 0


def test_a_pickled_model_converted_without_arch_records_what_it_is(tmp_path, reference, images):
    """A pickled timm model says what it is (its pretrained_cfg): the output records it, confirmed on the meta
    device, and loads without --arch."""
    path = tmp_path / "whole.pt"
    torch.save(reference, path)
    result = run("convert", path, "--to", "frozen", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "records no architecture" not in result.stderr
    assert read_metadata(tmp_path / "whole-frozen.safetensors")["arch"] == {"name": "test_resnet",
                                                                            "kwargs": {"num_classes": 10}}
    loaded = normswap.load(tmp_path / "whole-frozen.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), reference(images), rtol=1e-5, atol=1e-5)


def test_a_pickled_model_of_no_known_library_gets_a_warning_saying_how_to_load_it(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    result = run("convert", path, "--to", "frozen", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert "warning: whole-frozen.safetensors records no architecture" in result.stderr
    assert "arch=" in result.stderr and "model=" in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    result = run("--debug", "convert", tmp_path / "missing.pt", "--to", "gn")
    assert result.exit_code != 0
    assert isinstance(result.exception, normswap.CheckpointError)


def test_the_target_choices_are_the_registry_targets():
    assert TARGET_CHOICES == TARGETS


def test_python_dash_m_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "normswap", "convert", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage: normswap convert" in result.stdout


def test_ctrl_c_while_writing_exits_130_and_leaves_nothing(ckpt, tmp_path, monkeypatch):
    from normswap.checkpoint import formats

    def interrupted_save(filename, tensors, metadata):
        with open(filename, "wb") as f:
            f.write(b"the first bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(formats, "write_safetensors", interrupted_save)
    before = files(tmp_path)
    result = run("convert", ckpt, "--to", "gn", *ARCH_ARGS)
    assert result.exit_code == 130 and result.stderr.strip().endswith("error: interrupted")
    assert files(tmp_path) == before


def test_verbose_says_which_entry_was_used(ckpt):
    result = run("-v", "convert", ckpt, "--to", "gn", *ARCH_ARGS, "--dry-run")
    assert "net.pt: using entry 'state_dict'" in result.stderr
    assert "using entry" not in run("convert", ckpt, "--to", "gn", *ARCH_ARGS, "--dry-run").stderr
