"""Files are data: nothing a checkpoint, a recipe or a history names is imported or called unless the user types it,
and a file's keyword arguments reach only a model class or a registered builder.

Each crafted file below would run code if normswap believed it: a shell command, a file deletion, an unpickling, an
import from the current folder, a file overwritten by normswap's own writer. Every command and API entry point
refuses it, shows the recorded call in full (escaped), suggests ``--arch`` only for a name that looks like a model
class, refuses even a typed name that is not one, and the marker file the attack would create never appears.
"""

import json
import os
import pathlib
import re
import tomllib

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import normswap
from normswap.arch import ArchSpec
from normswap.checkpoint import load, load_checkpoint, read_checkpoint
from normswap.cli import main
from normswap.demo import DigitsResNet
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
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("keep me too")
    return {"dir": tmp_path, "marker": marker, "victim": victim}


def attacks(place):
    marker, victim, folder = place["marker"], place["victim"], place["dir"]
    return {
        "shell command": {"name": "normswap.checkpoint:os.system", "kwargs": {"command": f"touch {marker}"}},
        "walk out of torchvision": {"name": "torchvision.models:resnet.torch.hub.os.system",
                                    "kwargs": {"command": f"touch {marker}"}},
        "delete a file": {"name": "normswap.checkpoint:os.remove", "kwargs": {"path": str(victim)}},
        "unpickle": {"name": "normswap.checkpoint:torch.load",
                     "kwargs": {"f": str(folder / "evil.pt"), "weights_only": False}},
        "import from the current folder": {"name": "normswap.data:_import", "kwargs": {"module_name": "evil_module"}},
        "subprocess:getoutput": {"name": "subprocess:getoutput", "kwargs": {"cmd": f"touch {marker}"}},
        "os:popen": {"name": "os:popen", "kwargs": {"cmd": f"touch {marker}"}},
        "shutil:rmtree": {"name": "shutil:rmtree", "kwargs": {"path": str(folder / "keep")}},
        "torch:load": {"name": "torch:load", "kwargs": {"f": str(folder / "evil.pt"), "weights_only": False}},
        "runpy:run_path": {"name": "runpy:run_path", "kwargs": {"path_name": str(folder / "evil_module.py")}},
        "write_safetensors": {"name": "normswap.checkpoint.formats:write_safetensors",
                              "kwargs": {"path": str(victim), "tensors": {}, "metadata": {}}},
    }


ATTACKS = ["shell command", "walk out of torchvision", "delete a file", "unpickle", "import from the current folder",
           "subprocess:getoutput", "os:popen", "shutil:rmtree", "torch:load", "runpy:run_path", "write_safetensors"]
TYPED_ATTACKS = ATTACKS[5:]
"""Names that resolve when typed: a function of a real module, each of which would act on the file's arguments."""


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
    return not place["marker"].exists() and place["victim"].read_text() == "keep me" \
        and (place["dir"] / "keep" / "notes.txt").read_text() == "keep me too"


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("header", [True, False], ids=["normswap header", "foreign header"])
def test_loading_a_crafted_file_runs_nothing_and_suggests_no_function_name(place, attack, header):
    path, name = crafted_file(place, attack, normswap_header=header)
    for opener in (load, load_checkpoint, lambda p: read_checkpoint(p).to_model()):
        with pytest.raises(ArchitectureError, match=f"this file names {re.escape(name)}\\(.*which is not a model "
                                                    "class") as refused:
            opener(path)
        assert "--arch" not in str(refused.value) and "\n" not in str(refused.value)
    assert untouched(place)


@pytest.mark.parametrize("attack", TYPED_ATTACKS)
def test_typing_a_function_name_does_not_give_it_the_files_arguments(place, attack):
    """The reproducers: typed as the old message told, each of these ran with the file's keyword arguments (a
    shell command, a deleted folder, a malicious pickle, a script, an overwritten file), twice per call."""
    path, name = crafted_file(place, attack)
    with pytest.raises(ArchitectureError, match=f"{re.escape(name)} is a (built-in )?function .*not a model class: "
                                                "normswap passes a file's keyword arguments .* only to a "
                                                "torch.nn.Module class"):
        load(path, arch=name)
    result = run("convert", path, "--to", "gn", "--arch", name)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {name} is a ") and "--arch-kwargs" in result.stderr
    assert untouched(place)


def test_a_typed_class_that_is_not_a_module_gets_no_file_arguments(place):
    path = place["dir"] / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_cnn().state_dict().items()}, path, metadata={
        "normswap": "0.2.0", "arch": json.dumps({"name": "subprocess:Popen",
                                                 "kwargs": {"args": ["touch", str(place["marker"])]}})})
    with pytest.raises(ArchitectureError, match="pass --arch subprocess:Popen"):
        load(path)
    with pytest.raises(ArchitectureError, match=r"a class that is not a torch.nn.Module \(subprocess.Popen\)"):
        load(path, arch="subprocess:Popen")
    assert untouched(place)


def test_the_refusal_shows_the_recorded_call_in_full_and_escaped(place):
    """A padded value hid '; touch ...' behind a cut at 40 characters, and a key holding a newline forged a line of
    the message: the call is shown whole, every value and odd key as repr writes it."""
    padded = "true" + " " * 40 + f"; touch {place['marker']}"
    forged = "x\nerror: nothing to worry about\r"
    path = place["dir"] / "model.safetensors"
    save_file({k: v.contiguous() for k, v in small_cnn().state_dict().items()}, path, metadata={
        "normswap": "0.2.0", "arch": json.dumps({"name": "evil_package.models:Net",
                                                 "kwargs": {"cmd": padded, forged: 1}})})
    with pytest.raises(ArchitectureError) as refused:
        load(path)
    message = str(refused.value)
    assert f"cmd={padded!r}" in message and "..." not in message
    assert repr(forged) in message and "\n" not in message and "\r" not in message
    assert "typing its name imports evil_package.models and runs that code" in message
    assert "pass --arch evil_package.models:Net" in message
    result = run("inspect", path)
    assert result.exit_code == 0 and "\nerror:" not in result.stdout and f"cmd={padded!r}" in result.stdout
    assert "only when you pass --arch evil_package.models:Net" in result.stdout
    result = run("convert", path, "--to", "gn")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and padded in result.stderr
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
    assert result.stderr.startswith(f"error: this file names {name}(")
    assert "--arch" not in result.stderr and result.stderr.count("\n") == 1
    assert untouched(place)
    assert sorted(p.name for p in place["dir"].iterdir()) == before


@pytest.mark.parametrize("attack", ATTACKS)
def test_inspect_shows_a_crafted_file_as_data_without_building_it(place, attack):
    path, name = crafted_file(place, attack)
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    assert "not built: not a model class, normswap does not run it" in result.stdout and "--arch" not in result.stdout
    assert "\x1b" not in result.stdout
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
    with pytest.raises(ArchitectureError, match="monai.networks.nets:UNet.spatial_dims=3.*runs that code.*pass --arch "
                                                "monai.networks.nets:UNet"):
        load(path)
    loaded = load(path, arch="monai.networks.nets:UNet")
    assert normswap.history.get_arch(loaded) == spec.to_dict()
    x = torch.randn(1, 1, 16, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="does not fit"):
        load(path, arch="monai.networks.nets:UNet", arch_kwargs={"out_channels": 3})


def test_verify_does_not_let_one_file_build_what_the_other_was_given(place):
    plain = place["dir"] / "plain.pt"
    torch.save(DigitsResNet().state_dict(), plain)
    path, name = crafted_file(place, "shell command")
    result = run("verify", plain, path, "--arch", "normswap.demo:DigitsResNet", "--data", "calib.pt")
    assert result.exit_code == 1 and f"this file names {name}(" in result.stderr
    assert untouched(place)


def test_a_recipe_arch_is_data(place):
    recipe = place["dir"] / "evil.toml"
    recipe.write_text(f'[recipe]\narch = "subprocess:getoutput"\narch_kwargs = {{ cmd = "touch {place["marker"]}" }}'
                      '\n\n[[rules]]\nmatch = "*"\nto = "gn"\n')
    result = run("apply", recipe)
    assert result.exit_code == 1 and "this file names subprocess:getoutput(cmd=" in result.stderr
    plain = place["dir"] / "plain.pt"
    torch.save(small_cnn().state_dict(), plain)
    result = run("apply", recipe, plain)
    assert result.exit_code == 1 and "this file names subprocess:getoutput(cmd=" in result.stderr
    result = run("apply", recipe, plain, "--arch", "subprocess:getoutput")  # typed: the recipe's arguments still
    assert result.exit_code == 1 and result.stderr.count("\n") == 1  # do not reach a function
    assert "subprocess:getoutput is a function (subprocess.getoutput), not a model class" in result.stderr
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
    path = normswap.save(DigitsResNet(), tmp_path / "digits.safetensors")
    metadata = normswap.read_metadata(path)
    metadata["manifest"]["modules"]["bn1"] = {"class": "os.system", "num_features": 16}
    tensors, _ = normswap.checkpoint.formats.read_safetensors(path)
    save_file(tensors, path, metadata={key: value if isinstance(value, str) else json.dumps(value)
                                       for key, value in metadata.items()})
    with pytest.raises(CheckpointError, match="layer 'bn1': unknown layer class 'os.system'"):
        load_checkpoint(path, "normswap.demo:DigitsResNet")


def header_file(path, tensors, **fields):
    """A safetensors file of ``tensors`` whose normswap header has ``fields`` (each JSON-encoded unless text)."""
    metadata = {"normswap": "0.2.0", **{k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def demo_tensors():
    torch.manual_seed(0)
    return DigitsResNet().state_dict()


_BOUNDED = '''
import json, resource, sys
from click.testing import CliRunner
from normswap.cli import main
results = []
for args in json.loads(sys.argv[1]):
    result = CliRunner().invoke(main, args)
    results.append([result.exit_code, result.stderr])
print(json.dumps({"results": results, "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
'''


def test_file_driven_sizes_are_refused_before_anything_is_allocated(tmp_path):
    """A file saying swin_tiny(num_classes=10**6) made normswap allocate 3.9 GB before it compared the file's
    tensors; a recorded example input of 1e5 x 1e5 tried 40 GB, and one of 10**6 dimensions was not checked. Now
    the architecture is built on the meta device and checked against the file first, and a recorded input shape
    is capped: each command ends with one error line, and the process's peak memory stays far below 2 GB."""
    import subprocess
    import sys

    huge_head = header_file(tmp_path / "swin.safetensors", small_cnn().state_dict(),
                            arch={"name": "swin_tiny_patch4_window7_224", "kwargs": {"num_classes": 10 ** 6}})
    wide = header_file(tmp_path / "wide.safetensors", demo_tensors(),
                       arch={"name": "normswap.demo:DigitsResNet", "kwargs": {}}, input_shape=[1, 1, 10 ** 5, 10 ** 5])
    deep = header_file(tmp_path / "deep.safetensors", demo_tensors(),
                       arch={"name": "normswap.demo:DigitsResNet", "kwargs": {}}, input_shape=[1] * 10 ** 6)
    # a RegNet cannot be built on the meta device: on the CPU, its build may allocate only what the file's size allows
    regnet = header_file(tmp_path / "regnet.safetensors", small_cnn().state_dict(),
                         arch={"name": "torchvision.models:regnet_y_400mf", "kwargs": {"num_classes": 10 ** 8}})
    commands = [["convert", str(huge_head), "--to", "gn"], ["fold", str(wide)], ["fold", str(deep)],
                ["fold", str(wide), "--input-shape", "2,1,8,8", "--dry-run"], ["convert", str(regnet), "--to", "gn"]]
    environment = {**os.environ, "PYTHONPATH": str(pathlib.Path(normswap.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", _BOUNDED, json.dumps(commands)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env=environment)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    (head_code, head_err), (wide_code, wide_err), (deep_code, deep_err), (given_code, _), (regnet_code, regnet_err) \
        = report["results"]
    assert head_code == 1 and head_err.count("\n") == 1
    assert "none of the model's 173 keys are in" in head_err  # the meta model's: nothing was allocated for it
    assert wide_code == 1 and wide_err.count("\n") == 1 and "more than 2^26 elements" in wide_err \
        and "--input-shape" in wide_err
    assert deep_code == 1 and deep_err.count("\n") == 1 and "1000000 dimensions" in deep_err
    assert given_code == 0  # the shape the user gives is used
    assert regnet_code == 1 and regnet_err.count("\n") == 1 and "would allocate more than" in regnet_err
    assert report["peak_bytes"] < 2 << 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.safetensors", "regnet.safetensors",
                                                          "swin.safetensors", "wide.safetensors"]


def test_a_transformers_config_never_reaches_the_network(tmp_path, monkeypatch):
    """A DETR configuration in a file made normswap.load() look up the hub. Built offline with
    use_pretrained_backbone=False, whatever the environment says: with every socket connection recorded, a timm
    backbone DETR round-trips and a hub-named backbone is one clear error, and neither tries to connect."""
    import socket

    import transformers

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    attempts = []

    def record(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", record)
    monkeypatch.setattr(socket, "create_connection", record)
    monkeypatch.setattr(socket, "getaddrinfo", record)
    config = transformers.DetrConfig(backbone="resnet18", use_pretrained_backbone=True, d_model=32,
                                     encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                     encoder_attention_heads=2, decoder_attention_heads=2, num_queries=4,
                                     num_labels=3)
    model = transformers.DetrForObjectDetection(config).eval()
    path = normswap.save(normswap.freeze(model), tmp_path / "detr.safetensors")
    assert normswap.read_metadata(path)["arch"]["name"] == "transformers:DetrForObjectDetection"
    loaded = load(path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    hub = header_file(tmp_path / "hub.safetensors", small_cnn().state_dict(), arch={
        "name": "transformers:DetrForObjectDetection",
        "kwargs": {"use_timm_backbone": False, "backbone": "facebook/resnet-50", "use_pretrained_backbone": True}})
    with pytest.raises(ArchitectureError, match="building transformers:DetrForObjectDetection.* failed"):
        load(hub)
    assert attempts == []
    assert "HF_HUB_OFFLINE" not in os.environ  # the call restored what it set


@pytest.mark.parametrize("field, value, message", [
    ("num_features", -1, "'num_features' must be a whole number from 1 to 2\\^24, got -1"),
    ("num_features", 10 ** 12, "'num_features' must be a whole number from 1 to 2\\^24"),
    ("eps", float("nan"), "'eps' must be a positive finite number"),
    ("momentum", 7, "'momentum' must be null or a number from 0 to 1"),
])
def test_a_bad_number_in_a_manifest_is_one_clear_error(tmp_path, field, value, message):
    path = normswap.save(normswap.convert(DigitsResNet(), "frozen"),
                         tmp_path / "digits.safetensors")
    metadata = normswap.read_metadata(path)
    metadata["manifest"]["modules"]["bn1"][field] = value
    tensors, _ = normswap.checkpoint.formats.read_safetensors(path)
    header_file(path, tensors, **{key: value for key, value in metadata.items() if key != "normswap"})
    with pytest.raises(CheckpointError, match=f"layer 'bn1': its record's {message}"):
        load(path)
    result = run("inspect", path)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "internal error" not in result.stderr


def test_a_group_count_of_zero_is_one_clear_error(tmp_path):
    path = normswap.save(normswap.convert(DigitsResNet(), "gn", groups=4),
                         tmp_path / "digits.safetensors")
    metadata = normswap.read_metadata(path)
    metadata["manifest"]["modules"]["bn1"]["num_groups"] = 0
    tensors, _ = normswap.checkpoint.formats.read_safetensors(path)
    header_file(path, tensors, **{key: value for key, value in metadata.items() if key != "normswap"})
    with pytest.raises(CheckpointError, match="layer 'bn1': its record's 'num_groups' must be a whole number"):
        load(path)
    metadata["manifest"]["modules"]["bn1"]["num_groups"] = 3  # 16 channels
    header_file(path, tensors, **{key: value for key, value in metadata.items() if key != "normswap"})
    with pytest.raises(CheckpointError, match="3 groups, which do not divide its 16 channels"):
        load(path)


def test_json_nested_ten_thousand_deep_is_one_clear_error(tmp_path):
    deep = "[" * 10_000 + "]" * 10_000
    path = header_file(tmp_path / "deep.safetensors", demo_tensors(), manifest=deep,
                       arch={"name": "normswap.demo:DigitsResNet", "kwargs": {}})
    with pytest.raises(CheckpointError, match="the header field 'manifest' nests lists and objects more than 64 deep"):
        read_checkpoint(path)
    result = run("convert", path, "--to", "gn")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "internal error" not in result.stderr


@pytest.mark.parametrize("field, value", [
    ("history", [{"op": "recalibrate", "method": "exact", "batches": -1, "samples": 4, "passes": 1,
                  "calibrated": [], "no_data": [], "skipped": {}, "world_size": 1, "forward_cost": None}]),
    ("history", [{"op": "recalibrate", "method": "exact", "batches": 1, "samples": 4, "passes": 1, "calibrated": [],
                  "no_data": [], "skipped": {}, "world_size": 0, "forward_cost": None}]),
    ("module_versions", {"layer1": -3}),
])
def test_a_bad_number_in_a_header_is_one_clear_error(tmp_path, field, value):
    path = header_file(tmp_path / "model.safetensors", demo_tensors(), **{field: value})
    with pytest.raises(CheckpointError, match="malformed"):
        read_checkpoint(path)


def _many_rules(count):
    rules = "".join(f'[[rules]]\nmatch = "nothing{index}.*"\nto = "gn"\n\n' for index in range(count - 1))
    return Recipe.from_dict(tomllib.loads(rules + '[[rules]]\nmatch = "*"\nto = "frozen"\n'))


def test_recipe_rules_are_matched_in_linear_time():
    """A 3,000-rule recipe took 71 s (every rule excluded every earlier rule's patterns). Each layer is now matched
    once against the rules in order: ten times the rules cost about ten times the time, not a hundred."""
    import time

    model = DigitsResNet()

    def planning_time(recipe):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            plans = recipe.plans(model)
            best = min(best, time.perf_counter() - start)
        return best, plans

    small, _ = planning_time(_many_rules(300))
    large, plans = planning_time(_many_rules(3000))
    assert len(plans) == 3000 and sum(len(p) for p in plans) == 9 and len(plans[-1]) == 9
    assert plans[-1].options["include"] == ["*"]
    assert large < 30 * small, (small, large)
    converted = _many_rules(3000).apply(model)
    assert sum(type(m).__name__ == "FrozenBatchNorm" for m in converted.modules()) == 9


@pytest.mark.parametrize("option, value", [("--max-relative", "nan"), ("--max-relative", "inf"),
                                           ("--tolerance", "nan"), ("--min-agreement", "nan")])
def test_a_threshold_that_is_not_finite_is_a_usage_error(place, option, value):
    plain = place["dir"] / "plain.pt"
    torch.save(small_cnn().state_dict(), plain)
    result = run("verify", plain, plain, "--data", "calib.pt", option, value)
    assert result.exit_code == 2 and "is not a finite number" in result.stderr


def test_an_input_key_for_tensor_batches_is_an_error(place):
    plain = place["dir"] / "plain.pt"
    torch.save(DigitsResNet().state_dict(), plain)
    torch.save(torch.randn(4, 1, 8, 8), place["dir"] / "digits.pt")
    result = run("recalibrate", plain, "--arch", "normswap.demo:DigitsResNet", "--data", "digits.pt",
                 "--input-key", "image")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "batch 0 is a tensor, which has no keys: --input-key image applies to dict batches only" in result.stderr
    assert not (place["dir"] / "plain-recalibrated.safetensors").exists()


def test_a_tensor_name_cannot_forge_a_line_of_a_message(tmp_path):
    tensors = {**demo_tensors(), "fc.weight\nerror: all is well": torch.zeros(1)}
    path = header_file(tmp_path / "model.safetensors", tensors, arch={"name": "normswap.demo:DigitsResNet",
                                                                        "kwargs": {}})
    result = run("convert", path, "--to", "gn")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "unexpected key(s) (first: fc.weight\\nerror: all is well)" in result.stderr
