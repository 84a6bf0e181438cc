"""The files users have, written the way their tools write them, open with normswap: timm's training checkpoints,
Lightning checkpoints, Hugging Face folders (timm hub and transformers), torchvision detection models and
ultralytics checkpoints. For each: ``inspect``, ``convert`` and ``normswap.load`` of the output, with the messages
that say which weights were used."""

import argparse
import copy
import json

import pytest
import timm
import torch
from click.testing import CliRunner

import normswap
from normswap.checkpoint import load, load_checkpoint
from normswap.cli import main
from normswap.errors import CheckpointError

from .helpers import randomize_norm_layers


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_weights(model, reference):
    theirs = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    return randomize_norm_layers(timm.create_model("test_resnet", num_classes=5)).eval()


@pytest.fixture
def ema_weights(resnet):
    ema = copy.deepcopy(resnet)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    return ema


# --- timm's train.py -----------------------------------------------------------------------------------------------

@pytest.fixture
def timm_training_checkpoint(tmp_path, resnet, ema_weights):
    """What timm's CheckpointSaver writes: state_dict, state_dict_ema, optimizer, args (an argparse.Namespace)."""
    optimizer = torch.optim.SGD(resnet.parameters(), lr=0.1, momentum=0.9)
    ema = timm.utils.ModelEmaV3(resnet)
    ema.module.load_state_dict(ema_weights.state_dict())
    args = argparse.Namespace(model="test_resnet", num_classes=5, lr=0.1, output=tmp_path)
    saver = timm.utils.CheckpointSaver(resnet, optimizer, args=args, model_ema=ema, checkpoint_dir=str(tmp_path),
                                       recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0, metric=0.5)
    return tmp_path / "last.pth.tar"


def test_a_timm_training_checkpoint_opens_without_trusting_pickles(timm_training_checkpoint, resnet, ema_weights):
    model = load_checkpoint(timm_training_checkpoint, "test_resnet", arch_kwargs={"num_classes": 5})
    assert_weights(model, resnet)
    assert normswap.history.get_source(model)["entry"] == "state_dict"
    assert_weights(load_checkpoint(timm_training_checkpoint, "test_resnet", arch_kwargs={"num_classes": 5},
                                   ema=True), ema_weights)


def test_the_command_line_says_which_entry_it_used(timm_training_checkpoint, tmp_path):
    result = run("-v", "convert", timm_training_checkpoint, "--arch", "test_resnet", "--arch-kwargs",
                 '{"num_classes": 5}', "--to", "gn", "-o", tmp_path / "gn.safetensors")
    assert result.exit_code == 0, result.output
    assert "last.pth.tar: using entry 'state_dict'" in result.stderr
    assert "state_dict_ema" in result.stderr  # the other candidate is named
    assert type(load(tmp_path / "gn.safetensors").bn1).__name__ == "GroupNorm"
    result = run("inspect", timm_training_checkpoint)
    assert result.exit_code == 0, result.output
    assert ", entry 'state_dict')" in result.stdout


# --- Lightning -----------------------------------------------------------------------------------------------------

@pytest.fixture
def lightning_checkpoint(tmp_path, resnet, ema_weights):
    """A LightningModule holding the network as ``model``, a loss with a weight buffer and an EMA copy."""
    state = {f"model.{k}": v for k, v in resnet.state_dict().items()}
    state["criterion.weight"] = torch.ones(5)
    state.update({f"ema_model.{k}": v for k, v in ema_weights.state_dict().items()})
    path = tmp_path / "epoch=3-step=400.ckpt"
    torch.save({"epoch": 3, "global_step": 400, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "loops": {}, "callbacks": {}, "optimizer_states": [{"state": {}, "param_groups": []}],
                "lr_schedulers": [], "hyper_parameters": {"lr": 0.1, "backbone": "test_resnet"}}, path)
    return path


def test_a_lightning_checkpoint_finds_the_model_under_its_prefix(lightning_checkpoint, resnet, ema_weights):
    kwargs = {"num_classes": 5}
    model = load_checkpoint(lightning_checkpoint, "test_resnet", arch_kwargs=kwargs)
    assert_weights(model, resnet)
    assert normswap.history.get_source(model)["prefix"] == "model."
    assert_weights(load_checkpoint(lightning_checkpoint, "test_resnet", arch_kwargs=kwargs, ema=True), ema_weights)
    assert_weights(load_checkpoint(lightning_checkpoint, "test_resnet", arch_kwargs=kwargs, prefix="ema_model."),
                   ema_weights)
    assert_weights(load_checkpoint(lightning_checkpoint, "test_resnet", arch_kwargs=kwargs, key="state_dict",
                                   prefix="model."), resnet)


def test_a_checkpoint_of_another_architecture_lists_what_it_found(lightning_checkpoint):
    with pytest.raises(CheckpointError, match=r"only \d+ of the model's \d+ keys are in entry 'state_dict', prefix "
                                              r"'model[\w.]*' of the file; pass key= / prefix="):
        load_checkpoint(lightning_checkpoint, "test_efficientnet")
    with pytest.raises(CheckpointError, match=r"none of the model's \d+ keys are in .*\(state_dict: 185 keys, 92 "
                                              r"under 'model.', 92 under 'ema_model.', 1 under 'criterion.'\)"):
        load_checkpoint(lightning_checkpoint, "torchvision.models:squeezenet1_0")


def test_a_key_that_names_nothing_lists_the_entries(lightning_checkpoint):
    with pytest.raises(CheckpointError, match=r"has no entry 'state' holding tensors \(entries holding tensors: "
                                              r"state_dict\)"):
        load_checkpoint(lightning_checkpoint, "test_resnet", key="state")


# --- Hugging Face folders ------------------------------------------------------------------------------------------

def test_a_timm_hub_folder_converts_and_its_output_rebuilds_without_it(tmp_path, resnet):
    folder = tmp_path / "hub-resnet"
    timm.models.save_for_hf(resnet, str(folder), safe_serialization=True)
    result = run("convert", folder, "--to", "gn", "--groups", "8")
    assert result.exit_code == 0, result.output
    out = tmp_path / "hub-resnet-gn.safetensors"
    folder_copy = folder.rename(tmp_path / "moved")
    converted = load(out)
    arch = normswap.history.get_arch(converted)
    assert arch["name"] == "test_resnet" and arch["kwargs"]["num_classes"] == 5
    x = torch.randn(2, 3, 32, 32)
    expected = normswap.convert(copy.deepcopy(resnet), "gn", groups=8)
    torch.testing.assert_close(converted.eval()(x), expected(x), rtol=0, atol=0)
    assert folder_copy.exists()


def test_a_pytorch_bin_in_a_hub_folder_opens_too(tmp_path, resnet):
    folder = tmp_path / "hub-bin"
    timm.models.save_for_hf(resnet, str(folder), safe_serialization=False)
    assert_weights(load_checkpoint(folder), resnet)


def test_a_transformers_folder_builds_from_its_config_without_the_hub(tmp_path, monkeypatch):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16, num_labels=4,
                          out_features=["stage2"], out_indices=[2], stage_names=["stem", "stage1", "stage2"])
    model = randomize_norm_layers(ResNetForImageClassification(config)).eval()
    folder = tmp_path / "hf-resnet"
    model.save_pretrained(folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = run("convert", folder, "--to", "frozen")
    assert result.exit_code == 0, result.output
    frozen = load(tmp_path / "hf-resnet-frozen.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(frozen.eval()(x).logits, model(x).logits)
    assert normswap.history.get_arch(frozen)["name"] == "transformers:ResNetForImageClassification"


def test_a_folder_that_asks_for_its_own_code_is_refused(tmp_path):
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MyNet"], "auto_map": {
        "AutoModel": "modeling_mynet.MyNet"}}))
    (folder / "modeling_mynet.py").write_text("raise SystemExit('ran')\n")
    result = run("inspect", folder)
    assert result.exit_code == 1 and "asks for the model code of its own repository" in result.stderr


# --- torchvision detection -----------------------------------------------------------------------------------------

def test_torchvision_detection_models_build_without_downloading(tmp_path, monkeypatch):
    import torch.hub

    def no_download(*args, **kwargs):
        raise AssertionError("normswap tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    name = "torchvision.models:fasterrcnn_mobilenet_v3_large_320_fpn"
    model = normswap.ArchSpec.parse(name, {"num_classes": 3}).build()
    torch.save(model.state_dict(), tmp_path / "det.pt")
    for kwargs in ('{"num_classes": 3}', '{"num_classes": 3, "weights": null, "weights_backbone": null}'):
        result = run("freeze", tmp_path / "det.pt", "--arch", name, "--arch-kwargs", kwargs, "--force")
        assert result.exit_code == 0, result.output
    frozen = load(tmp_path / "det-frozen.safetensors")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    result = run("freeze", tmp_path / "det.pt", "--arch", name, "--arch-kwargs", '{"weights": "DEFAULT"}', "--force")
    assert result.exit_code == 1 and "drop 'weights' or set it to null" in result.stderr


# --- ultralytics ---------------------------------------------------------------------------------------------------

@pytest.fixture
def yolo_checkpoint(tmp_path):
    """What ultralytics saves after training: the whole model, in half precision, pickled with its metadata."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = randomize_norm_layers(DetectionModel("yolov8n.yaml", verbose=False)).eval()
    path = tmp_path / "best.pt"
    torch.save({"model": copy.deepcopy(model).half(), "ema": None, "optimizer": None, "epoch": -1,
                "train_args": {"model": "yolov8n.yaml", "imgsz": 640}, "date": "2026-11-30", "version": "8.4"},
               path)
    return path, model


def test_an_ultralytics_checkpoint_needs_trust_and_then_converts(yolo_checkpoint, tmp_path):
    path, model = yolo_checkpoint
    result = run("inspect", path)
    assert result.exit_code == 1
    assert "holds pickled Python objects (ultralytics.nn.tasks.DetectionModel;" in result.stderr
    result = run("convert", path, "--to", "frozen", "--trust-pickle")
    assert result.exit_code == 0, result.output
    frozen = load(tmp_path / "best-frozen.safetensors", arch="ultralytics.nn.tasks:DetectionModel")
    assert next(frozen.parameters()).dtype == torch.float16
    x = torch.rand(1, 3, 64, 64)
    expected = model.half().float()(x)[0]
    torch.testing.assert_close(frozen.float().eval()(x)[0], expected, rtol=2e-2, atol=2e-2)


def test_a_half_precision_checkpoint_recalibrates_on_float32_batches(yolo_checkpoint, tmp_path):
    """The batches follow the model's dtype; autocast on a model that is already half is refused clearly."""
    path, _ = yolo_checkpoint
    torch.save(torch.rand(4, 3, 64, 64), tmp_path / "calib.pt")
    result = run("recalibrate", path, "--trust-pickle", "--data", tmp_path / "calib.pt", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    recalibrated = load(tmp_path / "best-recalibrated.safetensors", arch="ultralytics.nn.tasks:DetectionModel")
    assert next(recalibrated.parameters()).dtype == torch.float16
    result = run("recalibrate", path, "--trust-pickle", "--data", tmp_path / "calib.pt", "--amp", "--force")
    assert result.exit_code == 1
    assert result.stderr == ("error: the model's weights are already float16: autocast (amp) is for float32 models, "
                             "run without it\n")
