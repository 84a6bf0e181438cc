"""A saved model loads back exactly, whatever library built it: the file describes its own structure.

Models from timm, torchvision (detection too), MONAI (3-D), segmentation_models_pytorch, ultralytics and
transformers, randomly initialised, are converted to GroupNorm, frozen or folded, saved (also through
``torch.compile`` and an EMA wrapper) and loaded with ``normswap.load``: the loaded model has the same classes, the
same tensors bit for bit, and computes the same outputs bit for bit. Architectures outside timm, torchvision and
transformers are confirmed by name only; their keyword arguments come from the file.
"""

import copy

import pytest
import torch
from click.testing import CliRunner

import normswap
from normswap.arch import ArchSpec
from normswap.checkpoint import load, read_metadata
from normswap.cli import main
from normswap.history import get_arch

from .helpers import randomize_norm_layers

HF_RESNET = {"depths": [1, 1], "hidden_sizes": [16, 32], "embedding_size": 16, "num_labels": 5,
             "out_features": ["stage2"], "out_indices": [2], "stage_names": ["stem", "stage1", "stage2"]}

MODELS = {
    "timm resnet": (("test_resnet", {"num_classes": 5}), (2, 3, 32, 32)),
    "timm efficientnet": (("test_efficientnet", {"num_classes": 5}), (2, 3, 32, 32)),
    "torchvision faster r-cnn": (("torchvision.models:fasterrcnn_resnet50_fpn",
                                  {"num_classes": 3, "min_size": 96, "max_size": 96}), [(3, 96, 96)]),
    "monai 3-d unet": (("monai.networks.nets:UNet",
                        {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
                         "strides": [2, 2], "norm": "batch"}), (1, 1, 16, 16, 16)),
    "monai segresnet": (("monai.networks.nets:SegResNet",
                         {"spatial_dims": 3, "init_filters": 8, "in_channels": 1, "out_channels": 2,
                          "norm": "batch", "blocks_down": [1, 2], "blocks_up": [1]}), (1, 1, 16, 16, 16)),
    "smp unet": (("segmentation_models_pytorch:Unet",
                  {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8],
                   "classes": 2}), (1, 3, 64, 64)),
    "smp fpn": (("segmentation_models_pytorch:FPN", {"encoder_name": "resnet18", "classes": 2}), (1, 3, 64, 64)),
    "ultralytics yolov8n": (("ultralytics.nn.tasks:DetectionModel", {"cfg": "yolov8n.yaml", "verbose": False}),
                            (1, 3, 64, 64)),
    "transformers resnet": (("transformers:ResNetForImageClassification", HF_RESNET), (2, 3, 32, 32)),
}

CONVERSIONS = {
    "gn": lambda m: normswap.convert(m, "gn", groups=4),
    "frozen": lambda m: normswap.freeze(m),
    "folded": lambda m: normswap.fold(m),
}


def build(case):
    (name, kwargs), _ = MODELS[case]
    torch.manual_seed(0)
    return randomize_norm_layers(ArchSpec.parse(name, kwargs).build()).eval()


def example(case):
    shape = MODELS[case][1]
    gen = torch.Generator().manual_seed(1)
    if isinstance(shape, list):
        return [torch.rand(*s, generator=gen) for s in shape]
    return torch.randn(*shape, generator=gen)


def outputs(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    if isinstance(out, (list, tuple)):
        return [outputs_flat(o) for o in out]
    return outputs_flat(out)


def outputs_flat(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return {k: outputs_flat(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [outputs_flat(o) for o in out]
    if hasattr(out, "logits"):
        return out.logits
    return out


def assert_same(loaded, saved, x):
    assert [type(m) for m in loaded.modules()] == [type(m) for m in saved.modules()]
    theirs = saved.state_dict()
    mine = loaded.state_dict()
    assert list(mine) == list(theirs)
    for name in theirs:
        assert torch.equal(mine[name], theirs[name]), name
    torch.testing.assert_close(outputs(loaded, x), outputs(saved, x), rtol=0, atol=0)


def load_back(case, path):
    spec = ArchSpec.parse(*MODELS[case][0])
    return load(path) if spec.is_registered else load(path, arch=spec.name)


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
@pytest.mark.parametrize("case", list(MODELS))
def test_a_converted_model_of_any_library_loads_back_exactly(tmp_path, case, conversion):
    model = CONVERSIONS[conversion](build(case))
    path = normswap.save(model, tmp_path / "model.safetensors")
    assert_same(load_back(case, path), model, example(case))


WRAPPERS = {
    "torch.compile": lambda m: torch.compile(m),
    "timm ModelEmaV3": lambda m: __import__("timm").utils.ModelEmaV3(m),
    "AveragedModel": lambda m: torch.optim.swa_utils.AveragedModel(m),
    "DataParallel": lambda m: torch.nn.DataParallel(m),
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("case", ["timm efficientnet", "monai 3-d unet"])
def test_a_wrapped_model_saves_as_the_model_it_wraps(tmp_path, case, wrapper):
    """Saving a frozen model through a training wrapper keeps its structure: it never comes back as trainable
    BatchNorm."""
    model = normswap.freeze(build(case))
    wrapped = WRAPPERS[wrapper](model)
    path = normswap.save(wrapped, tmp_path / "model.safetensors")
    assert get_arch(model) == read_metadata(path)["arch"]
    inner = wrapped.module if hasattr(wrapped, "module") and not isinstance(wrapped, torch.nn.DataParallel) \
        else model
    assert_same(load_back(case, path), inner, example(case))


def test_a_frozen_file_never_loads_into_plain_batchnorm(tmp_path):
    """The file's manifest decides the classes, also when the user names the architecture."""
    model = normswap.freeze(build("timm resnet"))
    path = normswap.save(model, tmp_path / "frozen.safetensors")
    loaded = normswap.load_checkpoint(path, "test_resnet", arch_kwargs={"num_classes": 5})
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in loaded.modules())
    assert type(loaded.bn1).__name__ == "FrozenBatchNorm"


def test_a_plain_batchnorm_state_dict_still_loads_into_frozen_layers():
    """How detection backbones take ImageNet weights: a BatchNorm state dict into a model whose BN is frozen."""
    plain = build("timm resnet")
    frozen = normswap.freeze(build("timm resnet").train())
    with torch.no_grad():
        for p in frozen.parameters():
            p.zero_()
    frozen.load_state_dict(plain.state_dict(), strict=True)
    x = example("timm resnet")
    torch.testing.assert_close(frozen.eval()(x), plain(x))


def test_module_versions_survive_a_normswap_file(tmp_path):
    """torchvision's MNASNet reads each module's state-dict _version when it loads."""
    spec = ArchSpec.parse("torchvision.models:mnasnet0_5", {"num_classes": 4})
    model = randomize_norm_layers(spec.build()).eval()
    path = normswap.save(normswap.convert(model, "gn", groups=4), tmp_path / "mnasnet-gn.safetensors")
    loaded = load(path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("case", ["monai 3-d unet", "ultralytics yolov8n", "transformers resnet"])
def test_the_command_line_needs_the_keyword_arguments_once(tmp_path, case):
    (name, kwargs), _ = MODELS[case]
    model = build(case)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    import json

    result = run("freeze", tmp_path / "model.pt", "--arch", name, "--arch-kwargs", json.dumps(kwargs))
    assert result.exit_code == 0, result.output
    frozen = tmp_path / "model-frozen.safetensors"
    confirm = [] if ArchSpec.parse(name).is_registered else ["--arch", name]
    result = run("convert", frozen, "--to", "bn", *confirm)
    assert result.exit_code == 0, result.output
    back = load_back(case, tmp_path / "model-frozen-bn.safetensors")
    assert_same(back, copy.deepcopy(model), example(case))


def test_the_input_shape_given_to_fold_is_recorded_and_used_again(tmp_path):
    """A MONAI network says nothing of its input: the shape given once is kept in the file, and folding the
    loaded model again needs none."""
    model = build("monai segresnet")
    folded = normswap.fold(model, input_shape=(1, 1, 16, 16, 16))
    path = normswap.save(folded, tmp_path / "folded.safetensors")
    assert read_metadata(path)["input_shape"] == [1, 1, 16, 16, 16]
    loaded = load(path, arch="monai.networks.nets:SegResNet")
    assert normswap.history.get_input_shape(loaded) == [1, 1, 16, 16, 16]
    assert "the input shape the checkpoint records" in str(normswap.plan_fold(loaded))
