"""Every norm layer users have is seen: third-party frozen BatchNorm classes, a user's own, layers that only look
like BatchNorm, and the files and models where normswap used to see nothing.

- transformers' DETR family and every ``*FrozenBatchNorm2d`` transformers defines, detectron2's and mmcv's classes
  (stand-ins registered under their module names: neither library is installed) are registry records, looked up only
  once their module is imported; ``register_layer`` adds a class; an unregistered module with BatchNorm's state is
  proven by a probe to compute BatchNorm and treated as frozen BatchNorm, or is a skipped row with its reason;
- a transformers ``save_pretrained`` DETR folder opens (transformers' key renaming), and without a model only
  wrapper prefixes are removed from a state dict's keys;
- ``inspect`` lists GroupNorm layers of a file without BatchNorm, and a lazy BatchNorm as a row;
- a Python ``fold`` that changes nothing warns, and the automatic example follows a leading BatchNorm's rank.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import normswap
from normswap import registry
from normswap.checkpoint import read_checkpoint, read_metadata
from normswap.cli import main
from normswap.errors import NormswapError
from normswap.inspection import format_reports, inspect_model
from normswap.targets import classify

from .helpers import randomize_norm_layers
from .test_models_end_to_end import TINY_DETR


class HomemadeFrozenBN(nn.Module):
    """A user's frozen BatchNorm, as detection code bases write it: BatchNorm's buffers, no ``eps`` attribute."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class LooksLikeBN(nn.Module):
    """BatchNorm's buffers, another computation (no square root): never to be taken for BatchNorm."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean[:, None, None]) / (self.running_var[:, None, None] + 1e-5)


class RegisteredFrozenBN(HomemadeFrozenBN):
    """A class of the user's, registered with ``register_layer``."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__(n)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def homemade_model(layer: str = "homemade") -> nn.Module:
    """Two conv + norm blocks; the norm layers of the class ``layer`` names."""
    cls = {"homemade": HomemadeFrozenBN, "looks-like": LooksLikeBN, "registered": RegisteredFrozenBN}[layer]
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), cls(8), nn.ReLU(), nn.Conv2d(8, 4, 1), cls(4))


def randomized(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for module in model.modules():
            if isinstance(getattr(module, "running_var", None), torch.Tensor):
                n = module.running_var.shape[0]
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return model.eval()


def tiny_detr(name: str = "DetrForObjectDetection") -> nn.Module:
    import transformers

    config_class = getattr(transformers, name.split("For")[0] + "Config")
    torch.manual_seed(0)
    return randomize_norm_layers(getattr(transformers, name)(config_class(**TINY_DETR))).eval()


# --- third-party classes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DetrForObjectDetection",
                                  pytest.param("ConditionalDetrForObjectDetection", marks=pytest.mark.slow),
                                  pytest.param("TableTransformerForObjectDetection", marks=pytest.mark.slow)])
def test_the_detr_family_frozen_batchnorm_is_converted_frozen_and_folded(name):
    model = tiny_detr(name)
    prefix = name.split("For")[0]
    assert {registry.record_of(m).key for m in model.modules() if type(m).__name__.endswith("FrozenBatchNorm2d")} \
        == {f"transformers.{prefix}FrozenBatchNorm2d"}
    frozen_plan = normswap.plan(model, "frozen")
    assert len(frozen_plan) == 0 and len(frozen_plan.skipped) == 16
    assert {s.reason for s in frozen_plan.skipped} == {"already frozen"}
    assert len(normswap.plan(model, "gn", groups=2)) == 16 and len(normswap.plan(model, "bn")) == 16
    assert len(normswap.plan_fold(model)) == 16


def every_transformers_frozen_batchnorm() -> list[tuple[str, str]]:
    import transformers

    root = Path(transformers.__file__).parent / "models"
    found = []
    for path in sorted(root.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            if line.startswith("class ") and "FrozenBatchNorm2d(" in line:
                found.append((f"transformers.models.{path.parent.name}.{path.stem}", line[6:].split("(")[0]))
    return found


def test_every_frozen_batchnorm_transformers_defines_is_a_record_once_imported():
    import importlib

    classes = every_transformers_frozen_batchnorm()
    assert len(classes) >= 10
    for module_name, class_name in classes:
        cls = getattr(importlib.import_module(module_name), class_name)
        layer = randomized(nn.Sequential(cls(6)))[0]
        record = registry.record_of(layer)
        assert record is not None and record.key == f"transformers.{class_name}" and record.family == "frozen", \
            module_name
        frozen = normswap.freeze(nn.Sequential(copy.deepcopy(layer)), unknown="skip")
        x = torch.randn(2, 6, 3, 3)
        with torch.no_grad():
            assert torch.allclose(normswap.convert(nn.Sequential(copy.deepcopy(layer)), "bn")(x), layer(x),
                                  atol=1e-6), class_name
        assert len(frozen) == 1


def stand_in(monkeypatch, module_name: str, class_name: str, base: type = nn.Module) -> type:
    """A class named and placed as a library's (which is not installed), its module put in ``sys.modules``."""
    module = types.ModuleType(module_name)

    def init(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        nn.Module.__init__(self)
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    cls = type(class_name, (base,), {"__init__": init, "forward": forward, "__module__": module_name})
    setattr(module, class_name, cls)
    monkeypatch.setitem(sys.modules, module_name, module)
    return cls


@pytest.mark.parametrize("module_name, class_name, key, family", [
    ("detectron2.layers.batch_norm", "FrozenBatchNorm2d", "detectron2.FrozenBatchNorm2d", "frozen"),
    ("mmcv.ops.sync_bn", "SyncBatchNorm", "mmcv.SyncBatchNorm", "sync"),
])
def test_detectron2_and_mmcv_classes_are_records_once_their_module_is_imported(monkeypatch, module_name,
                                                                                class_name, key, family):
    with pytest.raises(NormswapError, match=f"comes from {module_name}, which is not imported"):
        registry.by_key(key).load()
    assert module_name.split(".")[0] not in sys.modules
    cls = stand_in(monkeypatch, module_name, class_name)
    model = randomized(nn.Sequential(nn.Conv2d(3, 4, 3), cls(4)))
    assert registry.record_of(model[1]).key == key and classify(model[1]).family == family
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        target, becomes = ("bn", "BatchNorm2d") if family == "frozen" else ("frozen", "FrozenBatchNorm")
        converted = normswap.convert(copy.deepcopy(model), target)
        assert type(converted[1]).__name__ == becomes and torch.allclose(converted(x), expected, atol=1e-6)
        folded = normswap.fold(copy.deepcopy(model))
        assert isinstance(folded[1], nn.Identity) and torch.allclose(folded(x), expected, atol=1e-5)


# --- classes normswap has no record of ---------------------------------------------------------------------------


def test_an_unregistered_frozen_batchnorm_is_proven_by_its_output_and_treated_as_one(tmp_path):
    model = randomized(homemade_model())
    assert classify(model[1]) is registry.PROVEN_FROZEN and registry.eps_of(model[1]) == 1e-5
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    assert {s.reason for s in normswap.plan(model, "frozen").skipped} == {"already frozen"}
    bn = normswap.convert(copy.deepcopy(model), "bn")
    assert type(bn[1]) is normswap.BatchNorm
    folded = normswap.fold(copy.deepcopy(model))
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(bn(x), expected, atol=1e-5) and torch.allclose(folded(x), expected, atol=1e-5)
    arch = "tests.test_norm_layers_seen:homemade_model"
    for label, result in (("frozen", model), ("gn", normswap.convert(copy.deepcopy(model), "gn", groups=2)),
                          ("folded", folded)):
        path = normswap.save(result, tmp_path / f"{label}.safetensors", arch=arch)
        manifest = read_metadata(path)["manifest"]
        assert "HomemadeFrozenBN" not in json.dumps(manifest) and "tests." not in json.dumps(manifest["modules"])
        loaded = normswap.load(path, arch=arch)
        with torch.no_grad():
            assert torch.equal(loaded(x), result(x)), label
    assert read_metadata(tmp_path / "frozen.safetensors")["manifest"]["modules"]["1"]["class"] == "frozen-batch-norm"


def test_a_layer_with_batchnorm_state_that_computes_something_else_is_a_skipped_row_with_its_reason():
    model = randomized(homemade_model("looks-like"))
    reason = "has BatchNorm's state but does not compute BatchNorm's eval output on a probe input"
    for p in (normswap.plan(model, "gn"), normswap.plan(model, "frozen", unknown="convert")):
        assert len(p) == 0 and [(s.names, s.reason) for s in p.skipped] == [(["1"], reason), (["4"], reason)]
    folding = normswap.plan_fold(model)
    assert len(folding) == 0 and [layer.reason for layer in folding.left] == [reason, reason]
    reports = inspect_model(model)
    assert [r.warnings for r in reports] == [{"unproven": reason}] * 2
    with pytest.warns(UserWarning, match="fold changed nothing: folded 0 of 2 BatchNorm layer"):
        normswap.fold(model)


def test_register_layer_names_the_class_by_its_key_in_files(tmp_path):
    record = normswap.register_layer(RegisteredFrozenBN, rank=2, key="mylab.FrozenBN")
    assert normswap.register_layer(RegisteredFrozenBN, rank=2, key="mylab.FrozenBN") == record
    with pytest.raises(NormswapError, match="already registered"):
        normswap.register_layer(HomemadeFrozenBN, key="mylab.FrozenBN")
    with pytest.raises(NormswapError, match="taken by normswap"):
        normswap.register_layer(HomemadeFrozenBN, key="BatchNorm2d")
    model = randomized(homemade_model("registered"))
    model[1].eps = 1e-3
    assert registry.record_of(model[1]) is record and len(normswap.plan(model, "gn", groups=2)) == 2
    path = normswap.save(model, tmp_path / "registered.safetensors", arch="tests.test_norm_layers_seen:homemade_model",
                         arch_kwargs={"layer": "registered"})
    entry = read_metadata(path)["manifest"]["modules"]["1"]
    assert entry == {"class": "mylab.FrozenBN", "num_features": 8, "eps": 1e-3}
    rebuilt = registry.by_key("mylab.FrozenBN").construct(entry)
    assert type(rebuilt) is RegisteredFrozenBN and rebuilt.eps == 1e-3
    x = torch.randn(2, 3, 8, 8)
    folded = normswap.fold(copy.deepcopy(model))
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


# --- files -------------------------------------------------------------------------------------------------------


def test_a_detr_save_pretrained_folder_opens_with_transformers_key_renaming(tmp_path):
    model = tiny_detr()
    model.save_pretrained(tmp_path / "detr")
    loaded = read_checkpoint(tmp_path / "detr").to_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, model(pixel_values=x).logits)
    frozen = normswap.convert(loaded, "gn", groups=2)
    assert len([m for m in frozen.modules() if isinstance(m, nn.GroupNorm)]) == 16


def test_without_a_model_only_wrapper_prefixes_are_removed(tmp_path):
    own = {"layer.weight": torch.ones(2), "layer.bias": torch.zeros(2)}
    torch.save(own, tmp_path / "own.pt")
    assert sorted(read_checkpoint(tmp_path / "own.pt").tensors) == ["layer.bias", "layer.weight"]
    torch.save({"state_dict": {f"module._orig_mod.{k}": v for k, v in own.items()}}, tmp_path / "wrapped.pt")
    choice = read_checkpoint(tmp_path / "wrapped.pt").guess()
    assert sorted(choice.tensors) == ["layer.bias", "layer.weight"]
    assert choice.describe() == "entry 'state_dict', prefix 'module._orig_mod.'"


def group_norm_unet() -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 16, 4),
                     norm=("group", {"num_groups": 2}))


def test_inspect_lists_the_group_norm_layers_of_a_file_without_batchnorm(tmp_path):
    path = normswap.save(group_norm_unet(), tmp_path / "unet.safetensors",
                         arch="tests.test_norm_layers_seen:group_norm_unet")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "18 norm layer(s)" in result.output and result.output.count("GroupNorm") == 18
    assert "2 (now)" in result.output


def test_inspect_shows_a_lazy_batchnorm_as_a_row():
    text = format_reports(inspect_model(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(), nn.GroupNorm(2, 4))))
    assert "LazyBatchNorm2d" in text and "uninitialized: run one forward pass first" in text
    assert "2 (now)" in text


# --- folding -----------------------------------------------------------------------------------------------------


def test_a_fold_that_changes_nothing_warns_naming_why():
    with pytest.warns(UserWarning, match="fold changed nothing: the model has no BatchNorm layer to fold"):
        normswap.fold(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)))
    from monai.networks.nets import UNet

    unet = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), norm="instance")
    with pytest.warns(UserWarning, match="fold changed nothing"):
        normswap.fold(unet, input_shape=(1, 1, 16, 16))


def test_a_leading_batchnorm2d_gets_a_four_dimensional_example():
    model = randomized(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()))
    p = normswap.plan_fold(model)
    assert p.example == "2x3x64x64 (guessed from the input of layer 0)"
    assert [(pair.conv, pair.bn) for pair in p.pairs] == [("1", "2")]
    assert p.left[0].reason == "its input is an input of the model"


def test_smp_efficientnet_static_same_padding_convolutions_fold():
    import segmentation_models_pytorch as smp

    model = randomize_norm_layers(smp.FPN("efficientnet-b0", encoder_weights=None, classes=2)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    p = normswap.plan_fold(model, example_input=x)
    assert len(p) == 48 and p.layers == 49 and p.left[0].reason == "not called by the example forward"
    assert sum(pair.conv_class.endswith("Conv2dStaticSamePadding") for pair in p.pairs) == 48
    with torch.no_grad():
        difference = (p.apply(model)(x) - expected).abs().max() / expected.abs().max()
    assert difference < 1e-5


@pytest.mark.slow
def test_raft_folds_on_its_documented_image_pair():
    import torchvision

    model = randomize_norm_layers(torchvision.models.optical_flow.raft_large(weights=None)).eval()
    p = normswap.plan_fold(model)
    assert len(p) == 15 == p.layers
    assert p.example == "(1x3x128x128, 1x3x128x128) (torchvision's documented input: a pair of images)"


def test_a_half_precision_yolo_checkpoint_folds_into_a_half_precision_file(tmp_path):
    from safetensors import safe_open
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = randomize_norm_layers(DetectionModel("yolov8n.yaml", verbose=False)).eval().half()
    torch.save({"model": model, "epoch": 1}, tmp_path / "best.pt")
    result = CliRunner().invoke(main, ["fold", str(tmp_path / "best.pt"), "--trust-pickle",
                                       "--input-shape", "1,3,64,64"])
    assert result.exit_code == 0, result.output
    assert "folded 57 of 57" in result.output
    with safe_open(tmp_path / "best-folded.safetensors", "pt") as written:
        dtypes = {written.get_tensor(name).dtype for name in written.keys()}
    assert torch.float16 in dtypes and torch.float32 not in dtypes
