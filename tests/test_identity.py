"""What a model is, known from the model itself: ``save`` without ``arch`` records it, ``load`` without ``arch``
rebuilds it.

Each model is built in Python the way its library's documentation shows, randomly initialised, saved and loaded
back: the loaded model has the same classes, a bit-identical state dict and bit-identical eval outputs. What normswap
records is confirmed by building it on the meta device, so a model it cannot confirm is saved without an
architecture (with a warning naming ``arch=``), never with a wrong one; such a file loads into a model the user
builds (``load(path, model=...)``).
"""

import logging

import pytest
import torch
from torch import nn

import normswap
from normswap.arch import ArchSpec
from normswap.checkpoint.identity import identify
from normswap.checkpoint import load, read_metadata
from normswap.errors import CheckpointError

from .helpers import randomize_norm_layers


def timm_resnet18():
    import timm

    return timm.create_model("resnet18")  # the README's first line


def torchvision_resnet18():
    import torchvision

    return torchvision.models.resnet18(num_classes=5)


def torchvision_quantizable():
    import torchvision

    return torchvision.models.quantization.resnet18(quantize=False)


def transformers_resnet():
    import transformers

    config = transformers.ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=16, num_labels=5)
    return transformers.ResNetForImageClassification(config)


def ultralytics_detection():
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel("yolov8n.yaml", verbose=False)


def ultralytics_yolo():
    from ultralytics import YOLO

    return YOLO("yolov8n.yaml").model


def normswap_demo():
    from normswap.demo import DigitsResNet

    return DigitsResNet()


def smp_unet():
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet18", encoder_weights=None, classes=3, decoder_channels=(64, 32, 16, 8, 4))


def smp_deeplab():
    import segmentation_models_pytorch as smp

    return smp.DeepLabV3Plus("mobilenet_v2", encoder_weights=None, in_channels=1, classes=2,
                             aux_params={"classes": 2, "dropout": 0.2})


ROWS = {
    "timm resnet18": (timm_resnet18, "resnet18", (1, 3, 64, 64)),
    "torchvision resnet18(num_classes=5)": (torchvision_resnet18, "torchvision.models:resnet18", (1, 3, 64, 64)),
    "torchvision quantizable resnet18": (torchvision_quantizable, "torchvision.models.quantization:resnet18",
                                         (1, 3, 64, 64)),
    "transformers ResNetForImageClassification": (transformers_resnet, "transformers:ResNetForImageClassification",
                                                  (2, 3, 32, 32)),
    "ultralytics DetectionModel": (ultralytics_detection, "ultralytics.nn.tasks:DetectionModel", (1, 3, 64, 64)),
    "ultralytics YOLO(...).model": (ultralytics_yolo, "ultralytics.nn.tasks:DetectionModel", (1, 3, 64, 64)),
    "normswap demo": (normswap_demo, "normswap.demo:DigitsResNet", (2, 1, 8, 8)),
    "smp Unet (its constructor's arguments)": (smp_unet, "segmentation_models_pytorch:Unet", (1, 3, 64, 64)),
    "smp DeepLabV3Plus with an auxiliary head": (smp_deeplab, "segmentation_models_pytorch:DeepLabV3Plus",
                                                 (2, 1, 64, 64)),
}


def flat(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in flat(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in flat(item)]
    return flat(output.logits) if hasattr(output, "logits") else []


def assert_same(loaded, saved, shape):
    assert [type(m) for m in loaded.modules()] == [type(m) for m in saved.modules()]
    mine, theirs = loaded.state_dict(), saved.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[name], theirs[name]) for name in theirs)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, found = flat(saved.eval()(x)), flat(loaded.eval()(x))
    assert expected and len(found) == len(expected)
    for a, b in zip(found, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("row", list(ROWS))
def test_a_model_built_in_python_saves_and_loads_without_arch(tmp_path, row, caplog):
    build, name, shape = ROWS[row]
    torch.manual_seed(0)
    model = randomize_norm_layers(build()).eval()
    with caplog.at_level(logging.WARNING, logger="normswap"):
        path = normswap.save(model, tmp_path / "model.safetensors")
    assert not caplog.records
    assert read_metadata(path)["arch"]["name"] == name
    assert_same(load(path), model, shape)


@pytest.mark.parametrize("row", ["timm resnet18", "torchvision resnet18(num_classes=5)", "normswap demo"])
def test_a_converted_model_is_identified_as_the_architecture_it_came_from(tmp_path, row):
    build, name, shape = ROWS[row]
    torch.manual_seed(0)
    model = normswap.convert(randomize_norm_layers(build()).eval(), "gn", groups=4)
    path = normswap.save(model, tmp_path / "model.safetensors")
    assert read_metadata(path)["arch"]["name"] == name
    assert_same(load(path), model, shape)


def test_structure_changing_timm_arguments_are_found():
    import timm

    spec = identify(timm.create_model("resnet18", num_classes=7, in_chans=1))
    assert spec.to_dict() == {"name": "resnet18", "kwargs": {"num_classes": 7, "in_chans": 1}}


def test_the_quantizable_torchvision_model_is_built_when_typed():
    model = ArchSpec.parse("torchvision.models.quantization:resnet18").build(device="meta")
    assert type(model).__name__ == "QuantizableResNet"
    assert type(ArchSpec.parse("torchvision.models:resnet18").build(device="meta")).__name__ == "ResNet"


@pytest.mark.parametrize("edit", ["stride", "layer removed"])
def test_a_model_changed_by_hand_is_never_given_a_wrong_architecture(tmp_path, edit, caplog):
    """A stride changes no shape and a removed stage changes the names: either way no builder rebuilds the model,
    so nothing is recorded, and the warning names arch=."""
    import torchvision

    model = torchvision.models.squeezenet1_1(num_classes=5)
    assert identify(model) == ArchSpec("torchvision.models:squeezenet1_1", {"num_classes": 5})
    if edit == "stride":
        model.features[0].stride = (1, 1)
    else:
        model.features[12] = nn.Identity()
    assert identify(model) is None
    with caplog.at_level(logging.WARNING, logger="normswap"):
        path = normswap.save(model, tmp_path / "model.safetensors")
    assert "arch" not in read_metadata(path)
    assert len(caplog.records) == 1 and "pass arch= and arch_kwargs=" in caplog.records[0].getMessage()


def monai_unet():
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16), strides=(2, 2), norm="batch")


def test_a_model_normswap_cannot_identify_loads_into_the_model_you_build(tmp_path, caplog):
    """MONAI's UNet cannot say how it was built: the file records no architecture, load(path) says to pass the
    model, and a freshly built original-structure UNet becomes the frozen model, bit for bit."""
    torch.manual_seed(0)
    model = normswap.freeze(randomize_norm_layers(monai_unet()).eval())
    with caplog.at_level(logging.WARNING, logger="normswap"):
        path = normswap.save(model, tmp_path / "unet-frozen.safetensors")
    assert "arch" not in read_metadata(path)
    assert "normswap.load(path, model=...)" in caplog.records[0].getMessage()
    with pytest.raises(CheckpointError, match=r"does not record its architecture .*load\(path, model=my_model\)") \
            as refused:
        load(path)
    assert "not written by normswap.save" not in str(refused.value)
    fresh = monai_unet()
    loaded = load(path, model=fresh)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.modules())
    assert_same(loaded, model, (1, 1, 16, 16, 16))


def test_a_model_that_does_not_fit_the_file_is_refused(tmp_path):
    from monai.networks.nets import UNet

    path = normswap.save(normswap.freeze(monai_unet()), tmp_path / "unet-frozen.safetensors")
    other = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), norm="batch")
    with pytest.raises(CheckpointError, match="does not fit"):
        load(path, model=other)
    with pytest.raises(normswap.NormswapError, match="give model= or arch="):
        load(path, model=monai_unet(), arch="monai.networks.nets:UNet")


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet"])
def test_timm_dropout_rates_are_found_too(name):
    """Dropout and drop-path rates change no shape but every module's description: they are read off the model and
    confirmed like the rest, so a model built for fine-tuning is recorded as it was built."""
    import timm

    model = timm.create_model(name, num_classes=3, drop_rate=0.2, drop_path_rate=0.1)
    assert identify(model).kwargs == {"num_classes": 3, "drop_rate": 0.2, "drop_path_rate": 0.1}


def test_a_dropout_rate_no_description_shows_is_found_too():
    """A timm ResNet applies ``drop_rate`` in its forward, not in a module: the description is the same without
    it, so the rate the model keeps is compared too."""
    import timm

    assert identify(timm.create_model("test_resnet", drop_rate=0.3)).kwargs == {"num_classes": 1000,
                                                                                "drop_rate": 0.3}


def test_a_detection_models_image_size_is_found(tmp_path):
    """Fine-tuning a detector on a small card often starts with a smaller ``min_size``: it is read off the model's
    transform and confirmed, so the file rebuilds the model that resizes as it did."""
    import torchvision

    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=256, max_size=512)
    assert identify(model).kwargs == {"num_classes": 3, "min_size": 256, "max_size": 512}
    normswap.save(model, tmp_path / "detector.safetensors")
    loaded = normswap.load(tmp_path / "detector.safetensors")
    assert loaded.transform.min_size == (256,) and loaded.transform.max_size == 512
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_googlenet_without_its_auxiliary_classifiers_is_found(tmp_path):
    import torchvision

    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False, num_classes=5)
    assert identify(model).kwargs == {"aux_logits": False, "num_classes": 5}
    normswap.save(model, tmp_path / "googlenet.safetensors")
    loaded = normswap.load(tmp_path / "googlenet.safetensors")
    assert not hasattr(loaded, "aux1") or loaded.aux1 is None
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())


@pytest.mark.parametrize("name, kwargs", [
    ("test_resnet", {"features_only": True, "out_indices": [2, 3]}),  # a backbone for detection or segmentation
    ("test_efficientnet", {"features_only": True, "out_indices": [1, 2, 3]}),
    ("test_resnet", {"num_classes": 0, "global_pool": ""}),  # features without pooling
    ("test_resnet", {"num_classes": 1000, "global_pool": "max"}),
    ("test_vit", {"num_classes": 1000, "global_pool": "avg"}),  # moves the last LayerNorm after the pooling
    ("test_vit", {"num_classes": 1000, "img_size": 96}),  # another input size: another position embedding
    ("test_resnet", {"num_classes": 1000, "output_stride": 16}),  # dilated last stage, for segmentation
    ("test_resnet", {"features_only": True, "out_indices": [1, 2, 3], "output_stride": 8}),
])
def test_timm_backbone_arguments_are_found(tmp_path, name, kwargs):
    """What users build backbones with (``features_only``, ``out_indices``, ``global_pool``, ``img_size``) is read
    off the model and confirmed, so the file rebuilds the backbone, not the classifier it came from."""
    import timm

    model = timm.create_model(name, **kwargs)
    assert identify(model).kwargs == kwargs
    normswap.save(model, tmp_path / "backbone.safetensors")
    loaded = normswap.load(tmp_path / "backbone.safetensors")
    assert repr(loaded) == repr(model)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())


TORCHVISION_ARGUMENTS = [
    ("segmentation", "deeplabv3_mobilenet_v3_large", {"aux_loss": True, "num_classes": 3}),
    ("detection", "ssdlite320_mobilenet_v3_large", {"num_classes": 3}),  # an SSD built in ssdlite's module
    ("detection", "retinanet_resnet50_fpn", {"num_classes": 3}),  # head widths are anchors x classes
    ("detection", "fcos_resnet50_fpn", {"num_classes": 3}),
    ("detection", "keypointrcnn_resnet50_fpn", {"num_keypoints": 5}),
    ("", "mobilenet_v3_small", {"num_classes": 5, "dropout": 0.5}),
    ("", "efficientnet_b0", {"dropout": 0.2, "stochastic_depth_prob": 0.3}),
    ("", "convnext_tiny", {"stochastic_depth_prob": 0.3}),
    ("", "vit_b_32", {"image_size": 256}),
]


@pytest.mark.parametrize("module, name, kwargs", TORCHVISION_ARGUMENTS, ids=[row[1] for row in TORCHVISION_ARGUMENTS])
def test_torchvision_builder_arguments_are_found(module, name, kwargs):
    """Classes of a detector's head, keypoints, an auxiliary classifier, dropout, stochastic depth, a ViT's image
    size: read off the model and confirmed, so a fine-tuned torchvision model is recorded as it was built."""
    import torchvision

    builder = getattr(getattr(torchvision.models, module) if module else torchvision.models, name)
    extra = {"weights_backbone": None} if module else {}
    with torch.device("meta"):
        model = builder(weights=None, **extra, **kwargs)
    spec = identify(model)
    assert spec.name.endswith(f":{name}") and spec.kwargs == kwargs
    assert repr(spec.build(device="meta")) == repr(model)


@pytest.mark.parametrize("name, kwargs", [("mobilenet_v3_small", {"num_classes": 5, "dropout": 0.5}),
                                          ("ssdlite320_mobilenet_v3_large", {"num_classes": 3,
                                                                             "weights_backbone": None})])
def test_a_fine_tuned_torchvision_model_loads_without_arch(tmp_path, name, kwargs):
    import torchvision

    model = torchvision.models.get_model(name, weights=None, **kwargs)
    normswap.save(model, tmp_path / "model.safetensors")
    loaded = normswap.load(tmp_path / "model.safetensors")
    assert repr(loaded) == repr(model)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_a_vision_transformers_dropout_rates_are_found(tmp_path):
    """Head, position, patch, attention and projection dropout of a timm ViT, read off the layers named after them
    and confirmed: the file rebuilds the model as it was built for fine-tuning."""
    import timm

    rates = {"drop_rate": 0.1, "pos_drop_rate": 0.2, "patch_drop_rate": 0.25, "attn_drop_rate": 0.3,
             "proj_drop_rate": 0.4, "drop_path_rate": 0.05}
    model = timm.create_model("test_vit", num_classes=4, **rates)
    spec = identify(model)
    assert spec.kwargs == {"num_classes": 4, **rates}
    normswap.save(model, tmp_path / "vit.safetensors")
    loaded = normswap.load(tmp_path / "vit.safetensors")
    assert repr(loaded) == repr(model)
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_a_misfit_leaves_your_model_as_it_was(tmp_path):
    from monai.networks.nets import UNet

    path = normswap.save(normswap.freeze(monai_unet()), tmp_path / "unet-frozen.safetensors")
    other = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2), norm="batch")
    before = {name: tensor.clone() for name, tensor in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit"):
        load(path, model=other)
    assert any(isinstance(m, nn.BatchNorm3d) for m in other.modules())
    assert all(torch.equal(other.state_dict()[name], tensor) for name, tensor in before.items())


SWEEP_TORCHVISION = ("mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "regnet_x_800mf", "densenet121",
                     "shufflenet_v2_x0_5", "squeezenet1_0", "mnasnet0_5", "r3d_18", "quantized_mobilenet_v2",
                     "quantized_shufflenet_v2_x0_5", "convnext_tiny")
SWEEP_TIMM = ("mobilenetv3_small_050", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto", "regnety_002",
              "densenet121", "rexnet_100", "levit_128s", "fastvit_t8", "repvgg_a0")


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEP_TORCHVISION)
def test_torchvision_models_built_by_their_functions_are_identified(name):
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    spec = identify(builder(num_classes=7))
    module = builder.__module__.rpartition(".")[0]
    assert spec == ArchSpec(f"{module}:{builder.__name__}", {"num_classes": 7})
    assert identify(normswap.freeze(builder(num_classes=7))) == spec


@pytest.mark.slow
@pytest.mark.parametrize("name", SWEEP_TIMM)
def test_timm_models_are_identified(name):
    import timm

    assert identify(timm.create_model(name, num_classes=7)) == ArchSpec(name, {"num_classes": 7})


def test_a_file_naming_anything_but_an_smp_model_class_is_refused(tmp_path):
    """segmentation_models_pytorch builds on a file's word only its model classes, and never with encoder weights."""
    spec = ArchSpec.from_dict({"name": "segmentation_models_pytorch:Activation", "kwargs": {"name": "sigmoid"}})
    with pytest.raises(normswap.errors.ArchitectureError, match="segmentation_models_pytorch has no model class"):
        spec.build(device="meta")
    built = ArchSpec.from_dict({"name": "segmentation_models_pytorch:Linknet",
                                "kwargs": {"encoder_name": "resnet18", "classes": 2}}).build(device="meta")
    assert built.segmentation_head[0].out_channels == 2
