"""Files are data: nothing a checkpoint, a recipe or a history names is imported or called unless the user types it.

Each crafted file below would run code if normswap believed it: a shell command, a file deletion, an unpickling, an
import from the current folder. Every command and API entry point refuses it, says what to type to build the
architecture, and the marker file the attack would create never appears.
"""

import json
import pathlib

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import normswap
from normswap.arch import ArchSpec
from normswap.checkpoint import load, load_checkpoint, read_checkpoint
from normswap.cli import main
from normswap.errors import ArchitectureError, CheckpointError, NormswapError
from normswap.recipe import Recipe, RecipeError

from .helpers import small_cnn


class _Touch:
    """Unpickling this touches a file: the payload of a malicious pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working folder holding a victim file, a malicious pickle, an importable module that touches the marker on
    import, and calibration data; the current folder is that folder."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    torch.save({"payload": _Touch(marker)}, tmp_path / "evil.pt")
    (tmp_path / "evil_module.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\ndef batches(**kwargs):\n    return []\n")
    torch.save(torch.randn(4, 3, 8, 8), tmp_path / "calib.pt")
    return {"dir": tmp_path, "marker": marker, "victim": victim}


def attacks(place):
    marker, victim = place["marker"], place["victim"]
    return {
        "shell command": {"name": "normswap.checkpoint:os.system", "kwargs": {"command": f"touch {marker}"}},
        "walk out of torchvision": {"name": "torchvision.models:resnet.torch.hub.os.system",
                                    "kwargs": {"command": f"touch {marker}"}},
        "delete a file": {"name": "normswap.checkpoint:os.remove", "kwargs": {"path": str(victim)}},
        "unpickle": {"name": "normswap.checkpoint:torch.load",
                     "kwargs": {"f": str(place["dir"] / "evil.pt"), "weights_only": False}},
        "import from the current folder": {"name": "normswap.data:_import", "kwargs": {"module_name": "evil_module"}},
    }


ATTACKS = ["shell command", "walk out of torchvision", "delete a file", "unpickle", "import from the current folder"]


def crafted_file(place, attack, *, normswap_header=True):
    """The weights of a small CNN, with an ``arch`` header field that names the attack."""
    spec = attacks(place)[attack]
    path = place["dir"] / "model.safetensors"
    metadata = {"arch": json.dumps(spec)}
    if normswap_header:
        metadata["normswap"] = "0.2.0"
    save_file({k: v.contiguous() for k, v in small_cnn().state_dict().items()}, path, metadata=metadata)
    return path, spec["name"]


def untouched(place):
    return not place["marker"].exists() and place["victim"].read_text() == "keep me"


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("header", [True, False], ids=["normswap header", "foreign header"])
def test_loading_a_crafted_file_runs_nothing_and_says_what_to_type(place, attack, header):
    path, name = crafted_file(place, attack, normswap_header=header)
    for opener in (load, load_checkpoint, lambda p: read_checkpoint(p).to_model()):
        with pytest.raises(ArchitectureError, match=f"this file was built with {name}.*pass --arch {name}"):
            opener(path)
    assert untouched(place)


COMMANDS = {
    "convert --dry-run": ["convert", "{ckpt}", "--to", "gn", "--dry-run"],
    "convert": ["convert", "{ckpt}", "--to", "gn"],
    "freeze": ["freeze", "{ckpt}"],
    "fold": ["fold", "{ckpt}"],
    "recalibrate": ["recalibrate", "{ckpt}", "--data", "calib.pt"],
    "verify": ["verify", "{ckpt}", "{ckpt}", "--data", "calib.pt"],
}


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_refuses_a_crafted_file_in_one_line_and_writes_nothing(place, attack, command):
    path, name = crafted_file(place, attack)
    before = sorted(p.name for p in place["dir"].iterdir())
    result = run(*[arg.format(ckpt=path) for arg in COMMANDS[command]])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: this file was built with {name}")
    assert f"pass --arch {name} " in result.stderr and result.stderr.count("\n") == 1
    assert untouched(place)
    assert sorted(p.name for p in place["dir"].iterdir()) == before


@pytest.mark.parametrize("attack", ATTACKS)
def test_inspect_shows_a_crafted_file_as_data_without_building_it(place, attack):
    path, name = crafted_file(place, attack)
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    assert f"not built: normswap imports it only when you pass --arch {name}" in result.stdout
    assert "6 norm layer(s)" not in result.stdout and "2 norm layer(s)" in result.stdout
    assert untouched(place)


@pytest.mark.parametrize("name, reason", [
    ("torchvision.models:resnet.torch.hub.os.system", "leaves the torchvision package"),
    ("normswap.checkpoint.atomic:os.remove", "leaves the normswap package"),
    ("normswap.checkpoint.loading:torch.load", "leaves the normswap package"),
    ("normswap.arch:dataclass", "not a callable of the normswap package"),
    ("normswap.data:_import", "private"),
])
def test_a_typed_import_path_never_reaches_outside_its_own_package(place, name, reason):
    with pytest.raises(ArchitectureError, match=reason):
        ArchSpec.parse(name).build()
    assert untouched(place)


def test_typing_the_name_builds_it_with_the_recorded_keyword_arguments(tmp_path):
    """MONAI's UNet needs five keyword arguments: the file records them, the user confirms the name only, and
    ``arch_kwargs`` override the recorded ones key by key."""
    spec = ArchSpec.parse("monai.networks.nets:UNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                                                       "channels": [4, 8, 16], "strides": [2, 2], "norm": "batch"})
    model = spec.build().eval()
    path = normswap.save(normswap.convert(model, "gn", groups=2), tmp_path / "unet-gn.safetensors")
    with pytest.raises(ArchitectureError, match="monai.networks.nets:UNet.spatial_dims=3.*pass --arch "
                                                "monai.networks.nets:UNet"):
        load(path)
    loaded = load(path, arch="monai.networks.nets:UNet")
    assert normswap.history.get_arch(loaded) == spec.to_dict()
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="does not fit"):
        load(path, arch="monai.networks.nets:UNet", arch_kwargs={"out_channels": 3})


def test_verify_does_not_let_one_file_build_what_the_other_was_given(place):
    from normswap.demo import DigitsResNet

    plain = place["dir"] / "plain.pt"
    torch.save(DigitsResNet().state_dict(), plain)
    path, name = crafted_file(place, "shell command")
    result = run("verify", plain, path, "--arch", "normswap.demo:DigitsResNet", "--data", "calib.pt")
    assert result.exit_code == 1 and f"pass --arch {name}" in result.stderr
    assert untouched(place)


def test_a_recipe_arch_is_data(place):
    recipe = place["dir"] / "evil.toml"
    recipe.write_text(f'[recipe]\narch = "os:system"\narch_kwargs = {{ command = "touch {place["marker"]}" }}\n\n'
                      '[[rules]]\nmatch = "*"\nto = "gn"\n')
    result = run("apply", recipe)
    assert result.exit_code == 1 and "pass --arch os:system" in result.stderr
    plain = place["dir"] / "plain.pt"
    torch.save(small_cnn().state_dict(), plain)
    result = run("apply", recipe, plain)
    assert result.exit_code == 1 and "pass --arch os:system" in result.stderr
    assert untouched(place)


def test_a_recipe_step_cannot_name_code_as_its_data(place):
    recipe = place["dir"] / "steps.toml"
    recipe.write_text('[[rules]]\nmatch = "*"\nto = "bn"\n\n[[steps]]\nop = "recalibrate"\n'
                      'data = "evil_module:batches"\n')
    model = normswap.convert(small_cnn(), "sync")
    with pytest.raises(NormswapError, match="pass --data evil_module:batches"):
        Recipe.load(recipe).run_steps(model)
    assert untouched(place)


@pytest.mark.parametrize("history, message", [
    ([{"op": "exec", "code": "import os"}], "unknown op 'exec'"),
    ([{"op": "fold", "pairs": "0,1", "freeze_rest": False}],
     r"step 1 \(fold\) has a missing or malformed field 'pairs'"),
    ([{"op": "recalibrate", "method": "exact"}], r"step 1 \(recalibrate\) has a missing or malformed field"),
    ({"op": "plan"}, "is not a list of steps"),
])
def test_a_malformed_history_is_a_clear_error(tmp_path, history, message):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_cnn().state_dict().items()}, path,
              metadata={"normswap": "0.2.0", "arch": json.dumps({"name": "resnet18", "kwargs": {}}),
                        "history": json.dumps(history)})
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)


def test_a_recipe_field_of_the_wrong_type_is_a_clear_error(tmp_path):
    for body, message in [
        ('[[rules]]\nmatch = 5\nto = "gn"\n', r"'match' must be a glob pattern or a list of them, got 5"),
        ('[[rules]]\nmatch = "*"\nto = "gn"\ngroups = "many"\n', r"'groups' must be a whole number"),
        ('[[rules]]\nmatch = "*"\nto = "gn"\n[output]\nsuffix = "../../etc/x"\n',
         r"'suffix' must be a short file-name"),
        ('[[rules]]\nmatch = "*"\nto = "gn"\n[[steps]]\nop = "recalibrate"\nbatches = 0\n', r"'batches' must be"),
    ]:
        path = tmp_path / "bad.toml"
        path.write_text(body)
        with pytest.raises(RecipeError, match=message):
            Recipe.load(path)


@pytest.mark.parametrize("field, value", [
    ("module_versions", {"layer": "two"}),
    ("aliases", {"a": 5}),
    ("input_shape", [1, "3"]),
    ("manifest", [1, 2]),
])
def test_a_malformed_header_field_is_a_clear_error(tmp_path, field, value):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_cnn().state_dict().items()}, path,
              metadata={"normswap": "0.2.0", field: json.dumps(value)})
    with pytest.raises(CheckpointError, match=f"the header field '{field}' is malformed"):
        read_checkpoint(path)


def test_a_malformed_manifest_is_a_clear_error(tmp_path):
    from normswap.demo import DigitsResNet

    path = normswap.save(DigitsResNet(), tmp_path / "digits.safetensors")
    metadata = normswap.read_metadata(path)
    metadata["manifest"]["modules"]["bn1"] = {"class": "os.system", "num_features": 16}
    tensors, _ = normswap.checkpoint.formats.read_safetensors(path)
    save_file(tensors, path, metadata={key: value if isinstance(value, str) else json.dumps(value)
                                       for key, value in metadata.items()})
    with pytest.raises(CheckpointError, match="layer 'bn1': unknown layer class 'os.system'"):
        load_checkpoint(path, "normswap.demo:DigitsResNet")
