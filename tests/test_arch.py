"""Architecture specs: timm names and import paths, built without weights, with clear errors."""

import pytest
import torch
from torch import nn

from normswap.arch import ArchSpec
from normswap.errors import ArchitectureError
from normswap.history import get_arch


def test_a_spec_round_trips_through_its_dict():
    spec = ArchSpec.parse("resnet18", {"num_classes": 10})
    assert ArchSpec.from_dict(spec.to_dict()) == spec
    assert spec.to_dict() == {"name": "resnet18", "kwargs": {"num_classes": 10}}
    assert str(spec) == "resnet18(num_classes=10)"


def test_a_bare_name_string_is_a_spec_without_kwargs():
    assert ArchSpec.from_dict("torchvision.models:resnet18") == ArchSpec("torchvision.models:resnet18", {})


def test_a_timm_model_builds_on_the_meta_device_without_memory():
    model = ArchSpec.parse("test_resnet", {"num_classes": 7}).build(device="meta")
    tensors = list(model.parameters()) + list(model.buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert model.get_classifier().out_features == 7


def test_a_build_records_the_spec_on_the_model():
    model = ArchSpec.parse("test_resnet").build()
    assert get_arch(model) == {"name": "test_resnet", "kwargs": {}}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_an_import_path_builds_with_its_kwargs():
    model = ArchSpec.parse("torchvision.models:resnet18", {"num_classes": 3}).build(device="meta")
    assert model.fc.out_features == 3


def test_an_unknown_timm_name_suggests_close_names():
    with pytest.raises(ArchitectureError, match=r"unknown architecture 'resnet_18'.*did you mean .*resnet18"):
        ArchSpec.parse("resnet_18").build()


@pytest.mark.parametrize(
    "name, message",
    [
        ("no_such_package_xyz.models:net", "cannot import 'no_such_package_xyz.models'"),
        ("torchvision.models:no_such_net", "'torchvision.models' has no 'no_such_net'"),
        ("math:pi", "'math:pi': it is a float, not a callable"),
        ("builtins:dict", "returned a dict, not a torch.nn.Module"),
    ],
)
def test_an_import_path_that_does_not_give_a_model_is_a_clear_error(name, message):
    with pytest.raises(ArchitectureError, match=message):
        ArchSpec.parse(name).build()


def test_a_failing_builder_names_the_spec_and_the_cause():
    with pytest.raises(ArchitectureError, match=r"building test_resnet\(num_clases=10\) failed: TypeError"):
        ArchSpec.parse("test_resnet", {"num_clases": 10}).build()


@pytest.mark.parametrize("text", ["", "   ", "a:b:c", "torchvision.models:", "resnet 18", ":resnet18"])
def test_malformed_names_are_refused(text):
    with pytest.raises(ArchitectureError):
        ArchSpec.parse(text)


@pytest.mark.parametrize("kwarg", ["pretrained", "checkpoint_path", "weights"])
def test_kwargs_that_would_fetch_weights_are_refused(kwarg):
    with pytest.raises(ArchitectureError, match=f"without weights.*drop '{kwarg}'"):
        ArchSpec.parse("resnet18", {kwarg: True})


def test_kwargs_must_be_json_values():
    with pytest.raises(ArchitectureError, match="JSON values"):
        ArchSpec.parse("resnet18", {"act_layer": nn.ReLU})


def test_only_timm_torchvision_transformers_ultralytics_and_normswap_builders_are_registered():
    assert ArchSpec("resnet50").is_registered
    assert ArchSpec("torchvision.models:resnet50").is_registered
    assert ArchSpec("torchvision.models.detection:fasterrcnn_resnet50_fpn").is_registered
    assert ArchSpec("torchvision.models.quantization:resnet18").is_registered
    assert ArchSpec("transformers:ResNetModel").is_registered
    assert ArchSpec("ultralytics.nn.tasks:DetectionModel").is_registered
    assert ArchSpec("normswap.demo:DigitsResNet").is_registered
    assert not ArchSpec("torchvision.models.quantization:torch").is_registered
    assert not ArchSpec("ultralytics.nn.tasks:torch_safe_load").is_registered
    assert not ArchSpec("torchvisionx.models:resnet50").is_registered
    assert not ArchSpec("torchvision.models:resnet.torch.hub.load").is_registered
    assert not ArchSpec("normswap.demo:torch.load").is_registered
    assert not ArchSpec("subprocess:run").is_registered


def test_meta_and_cpu_builds_have_the_same_structure():
    spec = ArchSpec.parse("test_efficientnet")
    meta, cpu = spec.build(device="meta"), spec.build()
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in cpu.state_dict().items()}
    assert cpu.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_a_confirmed_file_spec_keeps_track_of_the_files_arguments():
    recorded = ArchSpec.from_dict({"name": "monai.networks.nets:UNet", "kwargs": {"spatial_dims": 3, "channels": [4]}})
    confirmed = recorded.confirmed({"channels": [8]})
    assert confirmed.kwargs == {"spatial_dims": 3, "channels": [8]} and confirmed.file_keys == {"spatial_dims"}
    assert not confirmed.from_file and recorded.with_kwargs({"spatial_dims": 2}).from_file


YOLO_LAYERS = {"backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[-1, 1, "Classify", [10]]]}


@pytest.mark.parametrize("config, message", [
    ({**YOLO_LAYERS, "activation": "__import__('os').system('touch PWNED')"}, "ultralytics evaluates as Python"),
    ({**YOLO_LAYERS, "activation": "nn.ReLU(__import__('os').getcwd())"}, "ultralytics evaluates as Python"),
    ({"backbone": [[-1, 1, "torch_safe_load", ["evil.pt"]]], "head": []}, "'torch_safe_load', which is not a module"),
    ({"backbone": "Conv", "head": []}, "has no 'backbone' list of layers"),
])
def test_an_ultralytics_yaml_from_a_file_names_module_classes_only(tmp_path, monkeypatch, config, message):
    monkeypatch.chdir(tmp_path)
    spec = ArchSpec.from_dict({"name": "ultralytics.nn.tasks:ClassificationModel", "kwargs": {"cfg": config}})
    with pytest.raises(ArchitectureError, match=message):
        spec.build(device="meta")
    assert not (tmp_path / "PWNED").exists()


def test_an_ultralytics_yaml_from_a_file_builds_with_a_plain_activation():
    config = {**YOLO_LAYERS, "activation": "nn.ReLU()", "nc": 10}
    model = ArchSpec.from_dict({"name": "ultralytics.nn.tasks:ClassificationModel", "kwargs": {"cfg": config}}).build()
    assert isinstance(model.model[0].act, nn.ReLU)
    with pytest.raises(ArchitectureError, match="only from its yaml as a mapping"):
        ArchSpec.from_dict({"name": "ultralytics.nn.tasks:DetectionModel", "kwargs": {"cfg": "yolov8n.yaml"}}).build()
