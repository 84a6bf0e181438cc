"""Folding BatchNorm into the layer before it: the folded model computes the original's eval output, and every
pair that cannot be folded safely is left alone with a reason."""

import copy
import json

import pytest
import timm
import torch
import torchvision
from timm.layers import Conv2dSame, StdConv2d
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, convert_sync_batchnorm
from torch import nn
from torch.nn import functional as F
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

from normswap.errors import PlanError
from normswap.checkpoint import apply_manifest, derive_manifest
from normswap.fold import FoldedAct, fold, plan_fold
from normswap.history import get_history
from normswap.layers import FrozenBatchNorm, FrozenBatchNormAct
from tests.helpers import randomize_norm_layers


def eval_output(model, x):
    """The model's eval-mode output, leaving its training flags as they were."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    with torch.no_grad():
        out = model(x)
    for m, training in modes:
        m.training = training
    return out


def assert_same_output(model, x, expected, rtol=1e-5):
    out = eval_output(model, x)
    scale = expected.abs().max().item()
    assert (out - expected).abs().max().item() <= rtol * scale, "folded model's output differs"


def fold_and_check(model, x, **options):
    """Fold ``model`` (randomized, in place) and check its output against the original eval output on ``x``. The
    plan runs the model on the example ``options`` give, or on one made from the architecture."""
    randomize_norm_layers(model, seed=1)
    expected = eval_output(model, x)
    p = plan_fold(model, **options)
    model = p.apply(model)
    assert_same_output(model, x, expected)
    return model, p


class Residual(nn.Module):
    """conv -> bn, plus the conv output added again: a fan-out that must block folding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ReusedConv(nn.Module):
    """One conv called twice, followed by two different BatchNorms."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


class LoopedBatchNorm(nn.Module):
    """One BatchNorm applied after two different convs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv2(self.bn(self.conv1(x))))


class BranchesOnValues(nn.Module):
    """A forward that branches on tensor values after its backbone (torch.fx cannot trace it), then runs a head."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        y = self.backbone(x)
        if y.sum() > 0:
            y = y * 2
        return self.head(y)


class ResidualOnlyForLargeInputs(nn.Module):
    """conv -> bn, plus the conv output itself for inputs with a large mean: a branch an example does not take."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if x.mean() > 100:
            return self.bn(y) + y
        return self.bn(y)


class SequenceModel(nn.Module):
    """Linear + BatchNorm1d over (N, L, C) sequences, transposed so that BatchNorm normalizes the features."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.proj(x).transpose(1, 2))


class Conv3dSubclass(nn.Conv3d):
    """A conv subclass that keeps its base class's forward, as torchvision's video models define them."""


class OwnForwardWithoutBias(nn.Conv2d):
    """A conv subclass with a forward of its own and no bias: whether it would use a bias it is given is unknown."""

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight, None, self.stride, self.padding)


class CachesAndMutates(nn.Module):
    """A forward that leaves traces on its module: a cached attribute, a tensor constant, a buffer changed in
    place. Running it to find the graph must leave none of them behind."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.last_shape = x.shape
        self.calls += 1
        return self.bn(self.conv(x)) * torch.tensor([2.0])


class ReadsRunningVar(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.bn.running_var.mean()


class WeightStandardized(nn.Module):
    """timm's weight-standardized conv rescales its weight on every call: folding into it would be undone."""

    def __init__(self):
        super().__init__()
        self.conv = StdConv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class BatchNormSubclass(nn.BatchNorm2d):
    pass


def frozen_act_timm(channels):
    return FrozenBatchNormAct2d(channels, act_layer=nn.ReLU)


def sync_act(channels):
    return convert_sync_batchnorm(BatchNormAct2d(channels, act_layer=nn.ReLU))


# (conv layer, norm layer factory, input shape)
FOLDABLE = {
    "conv2d without bias": (lambda: nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d, (2, 3, 9, 9)),
    "conv2d with bias": (lambda: nn.Conv2d(3, 8, 3), nn.BatchNorm2d, (2, 3, 9, 9)),
    "depthwise conv": (lambda: nn.Conv2d(8, 8, 3, groups=8, bias=False), nn.BatchNorm2d, (2, 8, 9, 9)),
    "grouped conv": (lambda: nn.Conv2d(8, 12, 3, groups=4), nn.BatchNorm2d, (2, 8, 9, 9)),
    "timm Conv2dSame": (lambda: Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d, (2, 3, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(3, 8, 3), nn.BatchNorm1d, (2, 3, 11)),
    "conv3d": (lambda: nn.Conv3d(3, 8, 3, bias=False), nn.BatchNorm3d, (2, 3, 5, 5, 5)),
    "transposed conv2d, grouped": (lambda: nn.ConvTranspose2d(6, 9, 3, stride=2, groups=3), nn.BatchNorm2d,
                                   (2, 6, 5, 5)),
    "transposed conv1d without bias": (lambda: nn.ConvTranspose1d(4, 6, 3, bias=False), nn.BatchNorm1d, (2, 4, 7)),
    "transposed conv3d": (lambda: nn.ConvTranspose3d(3, 4, 2, stride=2), nn.BatchNorm3d, (2, 3, 3, 3, 3)),
    "BatchNorm without affine": (lambda: nn.Conv2d(3, 8, 3), lambda c: nn.BatchNorm2d(c, affine=False),
                                 (2, 3, 9, 9)),
    "timm BatchNormAct2d": (lambda: nn.Conv2d(3, 8, 3), lambda c: BatchNormAct2d(c, act_layer=nn.SiLU),
                            (2, 3, 9, 9)),
    "timm SyncBatchNormAct": (lambda: nn.Conv2d(3, 8, 3), sync_act, (2, 3, 9, 9)),
    "SyncBatchNorm": (lambda: nn.Conv2d(3, 8, 3), nn.SyncBatchNorm, (2, 3, 9, 9)),
    "normswap FrozenBatchNorm": (lambda: nn.Conv2d(3, 8, 3), lambda c: FrozenBatchNorm(c, rank=2), (2, 3, 9, 9)),
    "normswap FrozenBatchNormAct": (lambda: nn.Conv2d(3, 8, 3), lambda c: FrozenBatchNormAct(c, act=nn.ReLU()),
                                    (2, 3, 9, 9)),
    "torchvision FrozenBatchNorm2d": (lambda: nn.Conv2d(3, 8, 3), TorchvisionFrozenBatchNorm2d, (2, 3, 9, 9)),
    "timm FrozenBatchNormAct2d": (lambda: nn.Conv2d(3, 8, 3), frozen_act_timm, (2, 3, 9, 9)),
}


@pytest.mark.parametrize("case", list(FOLDABLE))
def test_each_layer_kind_folds_to_the_same_eval_output_without_an_example_input(case):
    make_conv, make_norm, shape = FOLDABLE[case]
    conv = make_conv()
    channels = conv.out_channels
    model = nn.Sequential(conv, make_norm(channels), nn.Tanh())
    model, p = fold_and_check(model, torch.randn(*shape))
    assert [(pair.conv, pair.bn) for pair in p.pairs] == [("0", "1")]
    assert not p.left
    assert isinstance(model[1], (nn.Identity, FoldedAct))


def test_a_fused_activation_stays_in_the_norm_layers_place():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.PReLU))
    model, p = fold_and_check(model, torch.randn(2, 3, 9, 9))
    assert isinstance(model[1], FoldedAct) and isinstance(model[1].act, nn.PReLU)
    assert p.pairs[0].keeps == "PReLU"
    assert "1.act.weight" in model.state_dict()


def test_linear_then_batchnorm1d_folds_without_an_example_input():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(),
                          nn.Linear(16, 8, bias=False), nn.BatchNorm1d(8))
    model, p = fold_and_check(model, torch.randn(4, 3, 4, 4))
    assert [(pair.conv, pair.bn) for pair in p.pairs] == [("1", "2"), ("5", "6")]
    assert "guessed from the input of layer 1" in p.example

    model, p = fold_and_check(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)), torch.randn(4, 6))
    assert [(pair.conv, pair.bn) for pair in p.pairs] == [("0", "1")] and isinstance(model[1], nn.Identity)


def test_linear_on_sequences_is_not_folded_even_when_lengths_match_features():
    # BatchNorm1d on (N, L, C) normalizes dim 1, the L positions: folding it into the features would be wrong.
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    model, p = fold_and_check(model, torch.randn(3, 5, 6), example_input=torch.randn(2, 5, 6))
    assert not p.pairs and "3-D" in p.left[0].reason
    assert isinstance(model[1], nn.BatchNorm1d)


def test_linear_features_transposed_for_batchnorm1d_are_not_folded():
    model, p = fold_and_check(SequenceModel(), torch.randn(2, 7, 6), input_shape=(2, 7, 6))
    assert not p.pairs and p.left[0].reason == "its input comes from transpose in <model>, not from a Conv, " \
        "ConvTranspose or Linear layer"


def test_the_example_input_can_be_given_as_data_or_as_a_shape():
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    assert plan_fold(model, input_shape=(3, 6)).example == "3x6 (input_shape)"
    assert plan_fold(model, data=[(torch.randn(4, 6), torch.zeros(4))]).example == "4x6 (the first batch of the data)"
    assert plan_fold(model, example_input=torch.randn(1, 6)).example == "1x6 (example_input)"


def test_a_model_that_fails_on_its_example_input_folds_nothing_and_says_why():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    p = plan_fold(model)
    assert not p.captured and not p.pairs and len(p.left) == 1
    assert p.capture_error.startswith("the model fails on the example input 2x3x256x256: RuntimeError: mat1")
    assert p.capture_error.endswith("give the input it takes (input_shape=, data= or example_input=; "
                                    "--input-shape or --data on the command line)")
    assert "nothing folded: the model fails" in str(p) and p.left[0].reason == "the model could not be run"
    assert len(plan_fold(model, input_shape=(1, 3, 8, 8))) == 1


def test_a_conv_subclass_that_keeps_its_base_forward_folds_like_its_base():
    model = nn.Sequential(Conv3dSubclass(3, 4, 3, bias=False), nn.BatchNorm3d(4))
    model, p = fold_and_check(model, torch.randn(2, 3, 5, 5, 5))
    assert len(p) == 1 and p.pairs[0].new_bias

    model, p = fold_and_check(nn.Sequential(OwnForwardWithoutBias(3, 4, 3, bias=False), nn.BatchNorm2d(4)),
                              torch.randn(2, 3, 6, 6))
    assert not p.pairs and "its forward does not pass the bias folding would give it" in p.left[0].reason


def test_a_torch_layer_whose_forward_was_replaced_is_checked_like_a_subclass():
    # torch's own forward passes its bias (None now, the folded one later); a forward put on the layer may not
    conv = nn.Conv2d(3, 4, 3, bias=False)
    conv.forward = lambda x: F.conv2d(x, conv.weight)
    model, p = fold_and_check(nn.Sequential(conv, nn.BatchNorm2d(4)), torch.randn(2, 3, 6, 6))
    assert not p.pairs and "its forward does not pass the bias folding would give it" in p.left[0].reason

    linear = nn.Linear(5, 4, bias=False)
    model, p = fold_and_check(nn.Sequential(linear, nn.BatchNorm1d(4)), torch.randn(3, 5))
    assert len(p) == 1 and p.pairs[0].new_bias and linear.bias is not None


def test_a_conv_without_bias_gets_one_trainable_like_its_weight():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
    model[2].weight.requires_grad_(False)
    weight = model[0].weight
    model, p = fold_and_check(model, torch.randn(2, 3, 5, 5))
    assert [pair.new_bias for pair in p.pairs] == [True, True]
    assert model[0].bias.requires_grad and not model[2].bias.requires_grad
    assert model[0].weight is weight, "the weight parameter an optimizer holds is kept"
    assert sorted(model.state_dict()) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_the_fold_matches_a_float64_reference():
    model = randomize_norm_layers(nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.BatchNorm2d(8)), seed=3).eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    expected = copy.deepcopy(model).double()(x)
    fold(model)
    out = model.double()(x)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_class, reason", [
    (Residual, "the output of conv (Conv2d) also feeds add in <model>"),
    (WeightStandardized, "conv (StdConv2d) does not compute with its own weight"),
    (ReusedConv, "called 2 times"),
    (LoopedBatchNorm, "called 2 times"),
    (ReadsRunningVar, "its tensors are read directly by the forward"),
    (ResidualOnlyForLargeInputs, "the forward branches on tensor values (__bool__ in <model>)"),
])
def test_unsafe_pairs_are_left_with_a_reason(model_class, reason):
    model, p = fold_and_check(model_class(), torch.randn(2, 3 if model_class is ReadsRunningVar else 4, 6, 6))
    assert not p.pairs
    assert all(reason in layer.reason for layer in p.left)
    assert all(isinstance(m, nn.BatchNorm2d) for name, m in model.named_children() if name.startswith("bn"))


def test_a_batchnorm_called_in_two_places_is_not_folded():
    bn = nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.Conv2d(4, 4, 1), bn)
    model, p = fold_and_check(model, torch.randn(2, 4, 5, 5))
    assert not p.pairs
    assert p.left[0].names == ["1", "3"] and p.left[0].reason == "called 2 times"


class RegisteredTwice(nn.Module):
    """A block registered under two names but called once, as MONAI's DynUNet registers its blocks."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))
        self.skip = nn.ModuleDict({"same_block": self.block})

    def forward(self, x):
        return self.block(x)


def test_a_layer_registered_under_two_names_but_called_once_folds_and_loads_again():
    model, p = fold_and_check(RegisteredTwice(), torch.randn(2, 3, 8, 8))
    assert [(pair.conv, pair.bn) for pair in p.pairs] == [("block.0", "block.1")]
    assert isinstance(model.block[1], nn.Identity) and isinstance(model.skip.same_block[1], nn.Identity)
    fresh = apply_manifest(RegisteredTwice(), derive_manifest(model))
    fresh.load_state_dict(model.state_dict(), strict=True)


def test_a_conv_shared_between_two_places_is_not_folded():
    conv = nn.Conv2d(4, 4, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(4), conv, nn.BatchNorm2d(4))
    _, p = fold_and_check(model, torch.randn(2, 4, 5, 5))
    assert not p.pairs


def test_tied_weights_hooks_and_unknown_subclasses_block_folding():
    tied = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    _, p = fold_and_check(tied, torch.randn(3, 4), example_input=torch.randn(2, 4))
    assert not p.pairs and "shares its weight" in p.left[0].reason

    hooked = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    hooked[0].register_forward_hook(lambda m, args, out: None)
    _, p = fold_and_check(hooked, torch.randn(2, 3, 4, 4))
    assert not p.pairs and "hooks" in p.left[0].reason

    subclass = nn.Sequential(nn.Conv2d(3, 4, 1), BatchNormSubclass(4))
    _, p = fold_and_check(subclass, torch.randn(2, 3, 4, 4))
    assert not p.pairs and "does not know" in p.left[0].reason


def test_batchnorm_without_running_statistics_stays_and_is_not_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False),
                          nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 4, 4)
    model, p = fold_and_check(model, x, freeze_rest=True)
    assert [(pair.conv, pair.bn) for pair in p.pairs] == [("3", "4")]
    reasons = {layer.names[0]: (layer.reason, layer.frozen) for layer in p.left}
    assert reasons["1"] == ("no running statistics (track_running_stats=False)", False)
    assert reasons["2"][1] is True
    assert type(model[1]) is nn.BatchNorm2d and type(model[2]) is FrozenBatchNorm
    assert [step["op"] for step in get_history(model)] == ["fold", "plan"]
    assert "folded 1 of 3 BatchNorm layer(s), 1 of the rest frozen" in str(p)


def test_a_model_that_branches_on_tensor_values_folds_what_the_branch_cannot_rewire():
    model, p = fold_and_check(BranchesOnValues(), torch.randn(2, 3, 6, 6))
    assert [(pair.conv, pair.bn) for pair in p.pairs] == [("backbone.0", "backbone.1")]
    (left,) = p.left
    assert left.names == ["head.1"] and left.reason.startswith("the forward branches on tensor values (__bool__")


def test_within_folds_only_inside_the_submodule_named():
    model, p = fold_and_check(nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)),
                                            nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)), torch.randn(2, 3, 5, 5),
                              within="0")
    assert [(pair.conv, pair.bn) for pair in p.pairs] == [("0.0", "0.1")]
    assert p.left[0].names == ["2"] and p.left[0].reason == "outside 0"
    with pytest.raises(PlanError, match="no submodule 'neck'"):
        plan_fold(model, within="neck")


def test_running_the_model_to_plan_leaves_it_as_it_was():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).train()
    model.layer1.eval()
    plan_fold(model)
    assert model.training and not model.layer1.training and model.layer2.training
    fold_and_check(model, torch.randn(2, 3, 32, 32))

    model = CachesAndMutates()
    attributes, state = dict(model.__dict__), copy.deepcopy(model.state_dict())
    assert len(plan_fold(model)) == 1
    assert model.__dict__.keys() == attributes.keys() and "_tensor_constant0" not in model.__dict__
    assert all(model.__dict__[key] is value for key, value in attributes.items())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_an_uninitialized_lazy_layer_is_left_with_its_reason_and_not_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4), nn.BatchNorm2d(4), nn.LazyBatchNorm2d())
    p = plan_fold(model, freeze_rest=True)
    assert [(layer.names, layer.frozen) for layer in p.left] == [(["1"], True), (["2"], True), (["3"], False)]
    assert "uninitialized" in p.capture_error and p.left[2].reason == "uninitialized lazy layer"
    model = p.apply(model)
    assert isinstance(model[1], FrozenBatchNorm) and isinstance(model[2], FrozenBatchNorm)
    assert isinstance(model[3], nn.LazyBatchNorm2d)


def test_a_plan_for_another_model_is_refused_before_any_change():
    p = plan_fold(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)))
    other = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.GroupNorm(2, 4))
    weight = other[0].weight.detach().clone()
    with pytest.raises(PlanError, match="does not fit"):
        p.apply(other)
    assert torch.equal(other[0].weight, weight) and isinstance(other[1], nn.BatchNorm2d)


def test_the_plan_reads_as_a_table_and_serialises_to_json():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), BatchNormAct2d(4), nn.BatchNorm2d(4))
    p = plan_fold(model, input_shape=(1, 3, 4, 4))
    text = str(p)
    assert text.splitlines()[0] == "fold: folded 1 of 2 BatchNorm layer(s), example input 1x3x4x4 (input_shape)"
    assert "0 (Conv2d)" in text and "new" in text and "ReLU" in text
    assert "left (its input comes from relu in 1.act, not from a Conv, ConvTranspose or Linear layer): 2" in text
    plan = json.loads(json.dumps(p.to_dict()))
    assert plan["pairs"][0]["bn"] == "1" and plan["captured"] and plan["example"] == "1x3x4x4 (input_shape)"


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "efficientnet_b0"])
def test_timm_models_fold_every_batchnorm(name):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    norms = sum(1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    _, p = fold_and_check(model, torch.randn(2, 3, 32, 32))
    assert len(p) == norms and not p.left


def test_densenet_folds_only_the_batchnorms_that_follow_a_conv():
    model = timm.create_model("densenet121", pretrained=False, num_classes=10)
    model, p = fold_and_check(model, torch.randn(2, 3, 32, 32), freeze_rest=True)
    assert len(p) > 0 and len(p.left) > 0
    assert all(layer.frozen for layer in p.left)
    assert not any(type(m) is BatchNormAct2d for m in model.modules())


def test_torchvision_vgg11_bn_features_fold_every_batchnorm():
    vgg = torchvision.models.vgg
    model = nn.Sequential(vgg.make_layers(vgg.cfgs["A"], batch_norm=True), nn.Flatten(), nn.Linear(512, 10))
    x = torch.randn(2, 3, 32, 32)
    _, p = fold_and_check(model, x, example_input=x)
    assert len(p) == 8 and not p.left


def test_convnext_has_nothing_to_fold():
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    _, p = fold_and_check(model, torch.randn(2, 3, 32, 32))
    assert not p.pairs and not p.left


def test_the_manifest_of_a_folded_model_lets_a_fresh_model_load_its_weights_strictly():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    model, _ = fold_and_check(model, x)
    fresh = apply_manifest(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10),
                           derive_manifest(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(eval_output(fresh, x), eval_output(model, x), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
def test_folding_a_model_on_cuda():
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).cuda()
    model, p = fold_and_check(model, torch.randn(2, 3, 32, 32, device="cuda"))
    assert "2x3x224x224" in p.example
    assert len(p) == 20 and model.conv1.bias.is_cuda


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnet26d", "regnetx_002", "regnety_002", "mobilenetv2_050",
                                  "mobilenetv3_large_100", "efficientnet_b1", "densenet121", "dla34", "dpn48b",
                                  "ghostnet_100", "hrnet_w18_small", "rexnet_100", "repvgg_a0", "cspresnet50",
                                  "tf_efficientnet_b0", "ese_vovnet19b_dw", "res2net50_14w_8s", "selecsls42b",
                                  "mobileone_s0", "fastvit_t8"])
def test_timm_sweep_folded_output_equals_eval_output(name):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    _, p = fold_and_check(model, torch.randn(2, 3, 64, 64))
    assert len(p) > 0 and p.captured
