"""The save/load round trip over a sweep of timm and torchvision architectures (``-m slow``).

Every torchvision model of a reasonable size (classification, detection, segmentation, video, MNASNet and the
quantizable variants included) and a set of timm models covering every kind of norm layer are converted (GroupNorm,
frozen) or folded, saved and loaded back with ``normswap.load``: same classes, the same tensors bit for bit, and
the same outputs bit for bit on a small input.
"""

import pytest
import timm
import torch
import torchvision

import normswap
from normswap.arch import ArchSpec

from .helpers import randomize_norm_layers

pytestmark = pytest.mark.slow

TOO_BIG = ("vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf",
           "swin_b", "swin_v2_b", "swin3d_b", "mvit_v1_b", "mvit_v2_s", "convnext_large", "efficientnet_v2_l",
           "vit_b_16", "vit_b_32", "maxvit_t", "swin_s", "swin_v2_s", "swin3d_s", "efficientnet_b7",
           "efficientnet_b6", "resnext101_64x4d", "wide_resnet101_2", "quantized_resnext101_64x4d", "vgg19_bn",
           "vgg16_bn", "vgg13_bn", "vgg11_bn", "vgg19", "vgg16", "vgg13", "vgg11", "raft_large", "raft_small")
"""Left out for memory or time: each is a bigger sibling of a model the sweep covers, or has no BatchNorm."""

TIMM = ("resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_large_100", "regnety_016", "densenet121",
        "rexnet_100", "ghostnet_100", "mixnet_s", "levit_128s", "dla34", "dpn68", "selecsls42b", "repvgg_a0",
        "mobileone_s0", "fastvit_t8", "efficientvit_m0", "bat_resnext26ts", "inception_v3", "cspresnet50",
        "hrnet_w18_small", "tf_efficientnet_lite0", "convnext_atto", "nf_resnet26", "resnest14d", "res2net50_14w_8s")


def _torchvision_names() -> list[str]:
    return [name for name in torchvision.models.list_models() if name not in TOO_BIG]


def _input(name: str, model: torch.nn.Module):
    gen = torch.Generator().manual_seed(0)
    if name.startswith(("fasterrcnn", "maskrcnn", "keypointrcnn", "retinanet", "fcos", "ssd")):
        return [torch.rand(3, 128, 128, generator=gen)]
    if name in ("r3d_18", "mc3_18", "r2plus1d_18", "swin3d_t"):
        return torch.randn(1, 3, 4, 64, 64, generator=gen)
    if name == "s3d":
        return torch.randn(1, 3, 16, 224, 224, generator=gen)
    if name.startswith(("vit", "swin")) or name in ("inception_v3", "googlenet", "quantized_googlenet",
                                                    "quantized_inception_v3", "levit_128s"):
        size = 299 if "inception" in name else 224
        return torch.randn(1, 3, size, size, generator=gen)
    if name in ("efficientvit_m0", "bat_resnext26ts"):
        size = 224 if name == "efficientvit_m0" else 256
        return torch.randn(1, 3, size, size, generator=gen)
    return torch.randn(1, 3, 96, 96, generator=gen)


def _outputs(model, x):
    with torch.no_grad():
        out = model.eval()(x)
    return out


def _spec(name: str) -> ArchSpec:
    if name in TIMM:
        return ArchSpec.parse(name, {"num_classes": 7})
    return ArchSpec.parse(f"torchvision.models:{name}")


CONVERSIONS = {
    "gn": lambda m: normswap.convert(m, "gn", groups=8, unknown="skip"),
    "frozen": lambda m: normswap.freeze(m, unknown="skip"),
    "folded": lambda m: normswap.fold(m),
}


@pytest.mark.parametrize("conversion", list(CONVERSIONS))
@pytest.mark.parametrize("name", list(TIMM) + _torchvision_names())
def test_every_architecture_of_the_sweep_loads_back_exactly(tmp_path, name, conversion):
    torch.manual_seed(0)
    model = randomize_norm_layers(_spec(name).build()).eval()
    try:
        model = CONVERSIONS[conversion](model)
    except normswap.PlanError as exc:
        pytest.skip(f"nothing to convert: {exc}")
    path = normswap.save(model, tmp_path / "model.safetensors")
    loaded = normswap.load(path)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    theirs = model.state_dict()
    assert list(loaded.state_dict()) == list(theirs)
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key
    x = _input(name, model)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(model, x), rtol=0, atol=0)


def test_the_sweep_covers_detection_segmentation_video_and_mnasnet():
    names = _torchvision_names()
    for required in ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
                     "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
                     "fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large", "mnasnet0_5", "r3d_18"):
        assert required in names
    assert len(names) + len(TIMM) > 100
    assert timm.is_model("rexnet_100")
