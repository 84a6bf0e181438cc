"""The README runs as written: every Python block and every line of the command-line block, top to bottom, in a
temporary folder holding the files they name, and each does what its comment says.

The files are made here: ``resnet50.pt`` (a timm state dict), image folders ``calib/`` and ``new-domain/``,
``detector.pth`` (a torchvision resnet50 state dict), ``best.pt`` (an ultralytics YOLOv8n checkpoint as ultralytics
saves it) and the shipped ``recipes/``; the loaders the examples use (``calibration_loader``, ``unlabeled_loader``,
``test_loader``, ``my_shard_loader``) are bound before a block runs. "The API in short" runs on timm's real
resnet50. The other examples distil, fit and recalibrate, which on a real resnet50 would take many minutes on two
CPU cores, so there the name ``resnet50`` builds a stand-in: a timm ``ResNet`` with resnet50's bottleneck blocks, one
per stage, narrow, at 32x32 pixels (its data config says so, and image folders are read at that size). The README's
text is run unchanged.

The quickstart is what CI runs: its two commands must stay in step with ``.ci/run``.
"""

import contextlib
import copy
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

import normswap
from normswap.checkpoint import read_metadata
from normswap.cli import main
from normswap.layers import FrozenBatchNorm

from .helpers import randomize_norm_layers

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    return README.split(title, 1)[1].split("\n## ", 1)[0]


def blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def quickstart_commands() -> list[str]:
    return [block.strip() for block in blocks("bash", section("## Quickstart"))]


def test_the_quickstart_has_exactly_two_commands():
    commands = quickstart_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)


def test_ci_runs_the_quickstart_commands_verbatim():
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in quickstart_commands():
        assert command in ci_lines


def test_every_python_block_of_the_readme_is_run_here():
    """A new Python block needs a test here, like the four below."""
    starts = [block.split("\n", 1)[0] for block in blocks("python")]
    assert starts == ["import copy, timm, normswap", "import copy, monai, normswap", "# calib.py",
                      "import torch, torch.nn.functional as F, normswap"]


# --- the files the examples name ----------------------------------------------------------------------------------

STAND_IN_SIZE = 32


def stand_in_resnet50(**kwargs) -> nn.Module:
    """timm's ResNet with resnet50's block (bottleneck, expansion 4), one block per stage, 16-128 channels, and a data
    config at 32x32 pixels."""
    from timm.models.resnet import Bottleneck, ResNet

    model = ResNet(block=Bottleneck, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16, **kwargs)
    config = dict(timm.create_model("resnet18").pretrained_cfg)
    model.pretrained_cfg = model.default_cfg = {**config, "architecture": "resnet50", "crop_pct": 1.0,
                                                "input_size": (3, STAND_IN_SIZE, STAND_IN_SIZE), "pool_size": (1, 1)}
    return model


@pytest.fixture
def resnet50_is_the_stand_in(monkeypatch):
    """``resnet50`` names the stand-in wherever timm builds it (normswap's builder calls ``timm.create_model``)."""
    create_model = timm.create_model

    def create(name, pretrained=False, **kwargs):
        if name == "resnet50":
            return stand_in_resnet50(**kwargs)
        return create_model(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)


def image_folder(folder: Path, count: int, seed: int, classes: int = 2) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        (folder / f"class{i % classes}").mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (40, 40, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"class{i % classes}" / f"{i}.png")
    return folder


@pytest.fixture
def files(tmp_path, monkeypatch, resnet50_is_the_stand_in):
    """The folder the examples run in (the current folder), with ``resnet50.pt`` and the data folders."""
    torch.manual_seed(0)
    original = randomize_norm_layers(timm.create_model("resnet50"), seed=5).eval()
    torch.save(original.state_dict(), tmp_path / "resnet50.pt")
    image_folder(tmp_path / "calib", 8, seed=1)
    image_folder(tmp_path / "new-domain", 12, seed=2)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, STAND_IN_SIZE, STAND_IN_SIZE, generator=torch.Generator().manual_seed(seed))


def loader(tensors: tuple, batch_size: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=batch_size)


def run_block(code: str, namespace: dict) -> str:
    """Run one README block in ``namespace``; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), namespace)
    return printed.getvalue()


def count(model: nn.Module, kind: type) -> int:
    return sum(type(module) is kind for module in model.modules())


# --- Python -------------------------------------------------------------------------------------------------------

def test_the_api_in_short(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    printed = run_block(blocks("python")[0], namespace)
    p, model, frozen = namespace["p"], namespace["model"], namespace["frozen"]
    assert len(p) == 53 and "layer1.0.bn1" in printed  # the plan's table
    assert count(model, nn.GroupNorm) == 53 and count(model, nn.BatchNorm2d) == 0
    assert count(frozen, FrozenBatchNorm) == 53 and count(frozen, nn.GroupNorm) == 0
    # the frozen copy computes what the original BatchNorm model computed in eval mode (state-dict compatible)
    reference = timm.create_model("resnet50").eval()
    missing, unexpected = reference.load_state_dict(frozen.state_dict(), strict=False)
    assert not unexpected and all(key.endswith("num_batches_tracked") for key in missing)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(frozen.eval()(x), reference(x), rtol=1e-5, atol=1e-6)


def test_everything_else_from_python(files, caplog):
    unlabeled = images(12, seed=3) * 2 + 0.5
    test_images, test_labels = images(8, seed=4), torch.arange(8) % 10
    namespace = {"calibration_loader": loader((images(8, seed=2),)), "unlabeled_loader": loader((unlabeled,)),
                 "test_loader": loader((test_images, test_labels))}
    printed = run_block(blocks("python")[1], namespace)
    original, model, folded, same = (namespace[name] for name in ("original", "model", "folded", "same"))

    # the converted model: GroupNorm with fitted weights, then refined; the original keeps its BatchNorm
    assert count(model, nn.GroupNorm) == count(original, nn.BatchNorm2d) == 16
    assert normswap.fit_report(model).layers and normswap.refine_report(model).steps > 0
    assert "R²" in printed or "r2" in printed.lower()

    # recalibrated on the unlabeled images: the first layer's running mean is their conv1 output's mean (float64)
    with torch.no_grad():
        features = original.conv1.double()(unlabeled.double())
        original.conv1.float()
    torch.testing.assert_close(original.bn1.running_mean.double(), features.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert normswap.calibration_report(original).method == "exact"

    # folded is a copy: the original keeps its BatchNorm, the copy has none, and they compute the same
    assert folded is not original and count(original, nn.BatchNorm2d) == 16 and count(folded, nn.BatchNorm2d) == 0
    assert normswap.compare(original, folded, [test_images]).relative < 1e-5
    assert namespace["report"].relative < 1e-5 and "compared 8 sample(s)" in printed
    assert Path("resnet50-folded.html").read_text().count('class="point') == len(namespace["report"].layers)

    # saved and loaded back: the same GroupNorm model, bit for bit
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(test_images), model.eval()(test_images), rtol=0, atol=0)

    # the MONAI UNet has BatchNorm, every one of them is frozen, and the file loads into a freshly built UNet: frozen
    # too, computing bit for bit what the saved model did
    batch_norms = count(namespace["build_unet"](), nn.BatchNorm3d)
    assert batch_norms > 0
    unet, frozen_unet = namespace["unet"], namespace["frozen_unet"]
    assert normswap.read_metadata("unet-frozen.safetensors").get("arch") is None
    assert any("unet-frozen.safetensors" in r.getMessage() and "arch=" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")
    assert count(unet, FrozenBatchNorm) == batch_norms and count(unet, nn.BatchNorm3d) == 0
    volume = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(unet.eval()(volume), frozen_unet.eval()(volume), rtol=0, atol=0)


def test_the_distributed_recalibration_script_on_one_cpu_process(files, monkeypatch):
    import torch.distributed as dist

    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    shard = images(8, seed=6)
    try:
        run_block(blocks("python")[2], {"my_shard_loader": loader((shard,))})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    recalibrated = normswap.load("resnet50-recalibrated.safetensors")
    expected = normswap.recalibrate(normswap.load_checkpoint("resnet50.pt", arch="resnet50"), [shard],
                                    distributed=False, progress=False)
    torch.testing.assert_close(recalibrated.bn1.running_var, expected.bn1.running_var)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the command line ---------------------------------------------------------------------------------------------

def command_lines() -> list[str]:
    block = blocks("bash", section("## The command line"))[0]
    return [line for line in block.splitlines() if line.strip()]


def _detector(folder: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = randomize_norm_layers(torchvision.models.resnet50(weights=None), seed=6)
    torch.save(model.state_dict(), folder / "detector.pth")


def _yolo(folder: Path) -> None:
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = randomize_norm_layers(DetectionModel("yolov8n.yaml", verbose=False)).eval()
    torch.save({"model": copy.deepcopy(model).half(), "ema": None, "optimizer": None, "epoch": -1,
                "train_args": {"model": "yolov8n.yaml", "imgsz": 640}}, folder / "best.pt")


def _history(path: str) -> list[str]:
    return [step.get("op") for step in read_metadata(path).get("history", [])]


def test_the_command_line_block_runs_line_by_line(files, monkeypatch):
    _detector(files)
    _yolo(files)
    shutil.copytree(ROOT / "recipes", files / "recipes")
    demo_calls = []
    monkeypatch.setattr("normswap.demo.run_demo", lambda **options: demo_calls.append(options))

    def new_files(before: set) -> set:
        return {p.name for p in files.iterdir()} - before

    expectations = [
        ("inspect resnet50.pt", lambda out, new: "layer1.0.bn1" in out and not new),
        ("inspect resnet50.pt --arch resnet50 --report", lambda out, new: new == {"resnet50.html"}),
        ("convert resnet50.pt --arch resnet50 --to gn --groups 32 --dry-run", lambda out, new: "plan:" in out
         and not new),
        ("convert resnet50.pt --arch resnet50 --to gn --groups 32",
         lambda out, new: new == {"resnet50-gn.safetensors"}),
        ("convert resnet50.pt --arch resnet50 --to gn --affine fit", lambda out, new: new == {"gn-fit.safetensors"}
         and "fit" in _history("gn-fit.safetensors")),
        ("convert resnet50.pt --arch resnet50 --to gn --affine fit --data calib/ --refine 200",
         lambda out, new: new == {"gn-refined.safetensors"} and "refine" in _history("gn-refined.safetensors")),
        ("freeze detector.pth", lambda out, new: new == {"detector-frozen.safetensors"} and _frozen_but_layer4()),
        ("recalibrate resnet50.pt", lambda out, new: new == {"resnet50-recalibrated.safetensors"}),
        ("fold resnet50.pt", lambda out, new: new == {"resnet50-folded.safetensors"} and "folded 16 of 16" in out),
        ("fold best.pt --trust-pickle", lambda out, new: new == {"best-folded.safetensors"}
         and "folded 57 of 57" in out),
        ("verify resnet50.pt gn-refined.safetensors", lambda out, new: new == {"verify.html"}),
        ("verify resnet50.pt resnet50-folded.safetensors", lambda out, new: not new
         and re.search(r"\nrelative difference \S+ <= 1e-05: passed\n", out)),
        ("apply recipes/frozen-backbone.toml", lambda out, new: new == {"resnet50-frozen-backbone.safetensors"}),
        ("demo", lambda out, new: [{k: v for k, v in call.items() if k != "echo"} for call in demo_calls]
         == [{"groups": 8, "calibration_images": 64}]),  # what tests/test_demo.py runs: run_demo's defaults
    ]
    lines = command_lines()
    assert len(lines) == len(expectations)
    for line, (start, check) in zip(lines, expectations):
        words = shlex.split(line, comments=True)
        assert words[0] == "normswap" and " ".join(words[1:]).startswith(start), line
        before = {p.name for p in files.iterdir()}
        result = CliRunner().invoke(main, words[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"
        assert check(result.stdout, new_files(before)), f"{line}\n{result.output}"


def _frozen_but_layer4() -> bool:
    model = normswap.load("detector-frozen.safetensors")
    kinds = {name: type(module) for name, module in model.named_modules() if "bn" in name or "downsample.1" in name}
    return all((kind is nn.BatchNorm2d) == name.startswith("layer4.") for name, kind in kinds.items()) \
        and sum(kind is FrozenBatchNorm for kind in kinds.values()) == 53 - 10


def test_a_norm_layer_of_your_own_registered_and_folded():
    namespace = {"__name__": "readme_example"}
    run_block(blocks("python")[3], namespace)
    folded = namespace["folded"]
    assert not any(type(module).__name__ == "MyFrozenBN" for module in folded.modules())
    assert normswap.registry.by_key("mylab.MyFrozenBN").family == "frozen"
    # the folded model computes what a conv followed by that frozen BatchNorm computes
    conv, layer = nn.Conv2d(3, 8, 3), namespace["MyFrozenBN"](8)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(layer, name).copy_(torch.rand(8) + 0.5)
    model = nn.Sequential(conv, layer, nn.ReLU()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(normswap.fold(model, example_input=x)(x), expected, rtol=1e-5, atol=1e-6)
