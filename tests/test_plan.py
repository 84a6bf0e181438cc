"""Conversion plans: what ``normswap.plan`` decides for each norm layer, and what ``Plan.apply`` then does to it.

Every conversion is checked on numbers: a frozen, sync or back-to-BatchNorm layer must give the original layer's
eval output; a GroupNorm-family layer must give ``F.group_norm`` with the chosen groups and affine values.
"""

import copy
import inspect
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, GroupNormAct, SyncBatchNormAct
from timm.layers.norm_act import convert_sync_batchnorm as timm_convert_sync_batchnorm
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBatchNorm2d

import normswap
from normswap.errors import NormswapError, PlanError
from normswap.history import get_history, get_source, set_source
from normswap.layers import BatchNorm, FrozenBatchNorm, FrozenBatchNormAct
from normswap.plan import Plan, choose_groups
from normswap.targets import TARGETS, classify

from .helpers import gn_groups, randomize_norm_layers

STATS_TARGETS = ("frozen", "sync", "bn")
"""Targets that keep the running statistics: their eval output equals the original's."""
GROUP_TARGETS = ("gn", "ln", "in")


def net(norm: nn.Module, channels: int = 8) -> nn.Sequential:
    """A conv followed by ``norm``, with non-trivial statistics and affine values."""
    torch.manual_seed(0)
    return randomize_norm_layers(nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), norm)).eval()


def images(batch: int = 2, size: int = 6) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def norm_classes(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules() if classify(m) is not None]


def group_norm_reference(x: torch.Tensor, source: nn.Module, groups: int, affine: str = "copy") -> torch.Tensor:
    """GroupNorm with the source layer's eps and (copied or reset) affine values, in float64."""
    weight = source.weight.double() if affine == "copy" else None
    bias = source.bias.double() if affine == "copy" else None
    return F.group_norm(x.double(), groups, weight, bias, source.eps).float()


# --- what each target becomes, on numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("to", STATS_TARGETS)
def test_statistics_targets_give_the_original_eval_output(to):
    model = net(nn.BatchNorm2d(8))
    x = images()
    expected = model(x)
    converted = normswap.convert(copy.deepcopy(model), to)
    torch.testing.assert_close(converted.eval()(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("to", "groups"), [("gn", 4), ("ln", 1), ("in", 8)])
@pytest.mark.parametrize("affine", ["copy", "reset"])
def test_group_targets_normalize_with_their_groups_and_copied_or_reset_affine(to, groups, affine):
    model = net(nn.BatchNorm2d(8))
    bn = model[1]
    x = images()
    features = model[0](x)
    converted = normswap.convert(copy.deepcopy(model), to, **gn_groups(to, 4), affine=affine)
    layer = converted[1]
    assert type(layer) is nn.GroupNorm and layer.num_groups == groups
    assert set(layer.state_dict()) == {"weight", "bias"}
    if affine == "reset":
        assert torch.equal(layer.weight, torch.ones(8)) and torch.equal(layer.bias, torch.zeros(8))
    torch.testing.assert_close(converted(x), group_norm_reference(features, bn, groups, affine), rtol=1e-5, atol=1e-5)


def test_group_norm_from_a_layer_without_affine_has_no_affine():
    model = net(nn.BatchNorm2d(8, affine=False))
    converted = normswap.convert(model, "gn", groups=2)
    assert converted[1].weight is None and not converted[1].affine
    assert normswap.plan(net(nn.BatchNorm2d(8, affine=False)), "gn").rows[0].affine == "none"


# --- fused activation and drop path -------------------------------------------------------------------------------


FUSED = {
    "BatchNormAct2d": lambda: BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout),
    "SyncBatchNormAct": lambda: timm_convert_sync_batchnorm(BatchNormAct2d(8, act_layer=nn.SiLU,
                                                                           drop_layer=nn.Dropout)),
    "FrozenBatchNormAct2d": lambda: FrozenBatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout),
    "FrozenBatchNormAct": lambda: FrozenBatchNormAct(8, act=nn.SiLU(), drop=nn.Dropout(), rank=2),
}
"""Each fused-activation class normswap reads (timm's and its own), with a SiLU activation and a dropout."""

FUSED_TARGET_CLASSES = {
    "gn": (GroupNormAct,),
    "ln": (GroupNormAct,),
    "in": (GroupNormAct,),
    "frozen": (FrozenBatchNormAct, FrozenBatchNormAct2d),
    "sync": (SyncBatchNormAct,),
    "bn": (BatchNormAct2d,),
}


@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize("source", FUSED)
def test_fused_activation_and_drop_path_are_kept_for_every_target(source, to):
    model = net(FUSED[source]())
    layer = model[1]
    assert type(layer).__name__ == source
    act, drop = layer.act, layer.drop
    x = images()
    features = model[0](x)
    expected = model(x)
    p = normswap.plan(model, to, **gn_groups(to, 4))
    converted = p.apply(model)
    new = converted[1]
    assert type(new) in FUSED_TARGET_CLASSES[to]
    assert new.act is act and new.drop is drop
    if len(p) == 1:
        assert p.rows[0].act == "SiLU"
        assert "keeps SiLU" in str(p)
    if to in GROUP_TARGETS:
        groups = {"gn": 4, "ln": 1, "in": 8}[to]
        expected = F.silu(group_norm_reference(features, layer, groups))
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(converted(x), expected, rtol=1e-6, atol=1e-6)
    converted.train()
    assert new.drop.training  # the drop path is live again in train mode


# --- shared modules -----------------------------------------------------------------------------------------------


def shared_model():
    """One BatchNorm object used under two parents and twice under one parent."""
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential()
    model.stem = nn.Sequential(nn.Conv2d(4, 4, 1), shared)
    model.block = nn.Sequential(nn.Conv2d(4, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    return randomize_norm_layers(model).eval()


@pytest.mark.parametrize("to", TARGETS)
def test_a_shared_layer_becomes_one_new_object_at_every_place(to):
    model = shared_model()
    x = torch.randn(2, 4, 3, 3)
    expected = model(x)
    p = normswap.plan(model, to, **gn_groups(to, 2))
    if to == "bn":
        assert len(p) == 0
        return
    assert [row.names for row in p] == [["stem.1", "block.1", "block.3"]]
    converted = p.apply(model)
    new = converted.stem[1]
    assert converted.block[1] is new and converted.block[3] is new
    assert sum(1 for m in converted.modules() if classify(m) is not None) == 1
    if to in STATS_TARGETS:
        torch.testing.assert_close(converted(x), expected, rtol=1e-6, atol=1e-6)


# --- include / exclude --------------------------------------------------------------------------------------------


def resnet_like():
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=4).eval()


def test_include_and_exclude_select_layers_by_glob_and_exclude_wins():
    model = resnet_like()
    p = normswap.plan(model, "frozen", include=["layer1.*", "layer2.*"], exclude="*.downsample.*")
    names = [row.name for row in p]
    assert names and all(n.startswith(("layer1.", "layer2.")) and "downsample" not in n for n in names)
    assert len(names) == 8  # layer1 and layer2: two blocks of two norms each; layer2's downsample norm is excluded
    reasons = {skip.names[0]: skip.reason for skip in p.skipped}
    assert reasons["layer2.0.downsample.1"] == "excluded by '*.downsample.*'"
    assert reasons["bn1"] == "not matched by include"
    converted = p.apply(model)
    assert type(converted.layer1[0].bn1) is FrozenBatchNorm
    assert type(converted.layer2[0].downsample[1]) is nn.BatchNorm2d
    assert type(converted.layer3[0].bn1) is nn.BatchNorm2d


def test_a_shared_layer_matches_include_or_exclude_if_any_of_its_names_does():
    assert len(normswap.plan(shared_model(), "frozen", include="block.3")) == 1
    p = normswap.plan(shared_model(), "frozen", exclude="block.3")
    assert len(p) == 0 and p.skipped[0].names == ["stem.1", "block.1", "block.3"]


# --- flags carried over -------------------------------------------------------------------------------------------


def flagged_layers() -> nn.Sequential:
    """Norm layers with unusual settings: eps, momentum, frozen affine weight, train/eval, affine=False."""
    a = nn.BatchNorm2d(8, eps=1e-3, momentum=None)
    a.weight.requires_grad_(False)
    b = nn.BatchNorm2d(8, eps=2e-4, momentum=0.3, affine=False)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), a, b)
    randomize_norm_layers(model)
    model.eval()
    a.train()
    return model


@pytest.mark.parametrize("to", ["frozen", "sync", "gn"])
def test_eps_momentum_requires_grad_train_flag_and_affine_are_carried_over(to):
    model = flagged_layers()
    converted = normswap.convert(model, to, **gn_groups(to, 4), trainable_affine=to == "frozen")
    a, b = converted[1], converted[2]
    assert (a.eps, b.eps) == (1e-3, 2e-4)
    assert (a.training, b.training, converted.training) == (True, False, False)
    assert not a.weight.requires_grad and a.bias.requires_grad
    if to == "sync":
        assert (a.momentum, b.momentum) == (None, 0.3)
        assert not b.affine and b.weight is None
    if to == "gn":
        assert b.weight is None
    if to == "frozen":
        assert [n for n, _ in converted.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]


def test_back_to_batchnorm_keeps_momentum_affine_and_statistics_tensors():
    model = flagged_layers()
    weight, stats = model[1].weight, model[2].running_var
    converted = normswap.convert(normswap.convert(model, "sync"), "bn")
    a, b = converted[1], converted[2]
    assert (a.momentum, b.momentum, a.eps, b.eps) == (None, 0.3, 1e-3, 2e-4)
    assert a.weight is weight and b.running_var is stats and not b.affine
    assert (a.training, b.training) == (True, False)


@pytest.mark.parametrize("to", STATS_TARGETS)
def test_layers_without_running_stats_keep_batch_statistics_or_cannot_be_frozen(to):
    model = net(nn.BatchNorm2d(8, track_running_stats=False))
    if to == "frozen":
        with pytest.raises(PlanError, match="layer '1'.*running statistics"):
            normswap.plan(model, to)
        return
    x = images(batch=4)
    expected = model(x)  # batch statistics, even in eval mode
    converted = normswap.convert(normswap.convert(model, "sync"), to)
    assert not converted[1].track_running_stats and converted[1].running_mean is None
    torch.testing.assert_close(converted(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm2d).parameters, reason="BatchNorm has no bias=")
@pytest.mark.parametrize("to", TARGETS)
def test_a_layer_built_without_bias_stays_without_bias(to):
    model = net(nn.BatchNorm2d(8, bias=False))
    x = images()
    expected, features = model(x), model[0](x)
    source = copy.deepcopy(model) if to != "bn" else normswap.convert(copy.deepcopy(model), "sync")
    converted = normswap.convert(source, to, **gn_groups(to, 4), trainable_affine=to == "frozen")
    layer = converted[1]
    assert layer.bias is None and "1.bias" not in converted.state_dict()
    if to == "frozen":
        assert layer.weight.requires_grad
        back = normswap.convert(copy.deepcopy(converted), "bn")
        assert back[1].bias is None and back[1].weight.requires_grad, "frozen and back keeps the layer bias-free"
        assert back.state_dict().keys() == model.state_dict().keys()
    if to in GROUP_TARGETS:
        groups = {"gn": 4, "ln": 1, "in": 8}[to]
        reference = F.group_norm(features.double(), groups, model[1].weight.double(), None, model[1].eps).float()
        torch.testing.assert_close(converted(x), reference, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(converted(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("to", TARGETS)
def test_dtype_of_the_model_is_kept(to, dtype):
    model = net(nn.BatchNorm2d(8)).to(dtype)
    x = images().to(dtype)
    expected = model(x)
    converted = normswap.convert(copy.deepcopy(model), to, **gn_groups(to, 4))
    layer = converted[1]
    assert {t.dtype for t in layer.state_dict().values() if t.is_floating_point()} == {dtype}
    out = converted(x)
    assert out.dtype == dtype
    if to in STATS_TARGETS:
        tolerance = 1e-12 if dtype == torch.float64 else 1e-2
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


@pytest.mark.cuda
@pytest.mark.parametrize("to", TARGETS)
def test_device_of_the_model_is_kept(to):
    model = net(nn.BatchNorm2d(8)).cuda()
    x = images().cuda()
    expected = model(x)
    converted = normswap.convert(copy.deepcopy(model), to, **gn_groups(to, 4))
    assert {t.device.type for t in converted.state_dict().values()} == {"cuda"}
    out = converted(x)
    if to in STATS_TARGETS:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.float16):
        assert torch.isfinite(converted(x)).all()


# --- eps ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["gn", "frozen", "sync"])
def test_eps_of_zero_is_never_written(to):
    model = net(nn.BatchNorm2d(8, eps=0.0))
    p = normswap.plan(model, to, **gn_groups(to, 4))
    assert p.rows[0].eps == 1e-5 and "eps 0 -> 1e-05" in p.rows[0].note
    converted = p.apply(model)
    assert converted[1].eps == 1e-5


# --- rank ---------------------------------------------------------------------------------------------------------

RANKED = {1: (nn.BatchNorm1d, (4, 6, 5)), 2: (nn.BatchNorm2d, (2, 6, 3, 3)), 3: (nn.BatchNorm3d, (2, 6, 2, 3, 3))}


@pytest.mark.parametrize("rank", RANKED)
@pytest.mark.parametrize("middle", ["sync", "frozen"])
def test_rank_is_remembered_through_a_round_trip(rank, middle):
    cls, shape = RANKED[rank]
    model = randomize_norm_layers(nn.Sequential(cls(6))).eval()
    x = torch.randn(shape)
    expected = model(x)
    normswap.convert(model, middle)
    assert normswap.plan(model, "bn").rows[0].rank == rank
    normswap.convert(model, "bn")
    assert type(model[0]) is cls
    torch.testing.assert_close(model(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        model(torch.randn(2, 6, *([2] * (rank + 1))))  # the class checks the input rank again


def test_back_to_batchnorm_from_a_syncbatchnorm_of_unknown_rank_is_rank_agnostic():
    sync = nn.SyncBatchNorm(6)
    model = randomize_norm_layers(nn.Sequential(sync)).eval()
    p = normswap.plan(model, "bn")
    assert p.rows[0].rank is None and p.rows[0].target_class == "normswap.layers.BatchNorm"
    converted = normswap.convert(model, "bn")
    assert type(converted[0]) is BatchNorm
    for shape in ((4, 6), (2, 6, 3, 3)):
        x = torch.randn(shape)
        expected = F.batch_norm(x, sync.running_mean, sync.running_var, sync.weight, sync.bias, False, 0.0, sync.eps)
        torch.testing.assert_close(converted(x), expected)


def test_torchvision_frozen_batchnorm_goes_back_to_batchnorm2d():
    torch.manual_seed(0)
    frozen = TorchvisionFrozenBatchNorm2d(8)
    model = randomize_norm_layers(nn.Sequential(nn.Conv2d(3, 8, 1), frozen))
    x = images()
    expected = model(x)
    assert len(normswap.plan(model, "frozen")) == 0
    converted = normswap.convert(model, "bn").eval()
    assert type(converted[1]) is nn.BatchNorm2d and converted[1].weight.requires_grad
    torch.testing.assert_close(converted(x), expected, rtol=1e-6, atol=1e-6)


# --- refusals and opt-ins -----------------------------------------------------------------------------------------


def test_uninitialized_lazy_batchnorm_is_a_skipped_row_and_initialized_one_converts():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.LazyBatchNorm2d())
    p = normswap.plan(model, "gn")
    assert len(p) == 0 and [(s.names, s.reason) for s in p.skipped] == [
        (["1"], "uninitialized lazy layer: run one forward pass first")]
    assert "uninitialized lazy layer" in p.why_empty()
    model(images())
    assert type(normswap.convert(model, "frozen")[1]) is FrozenBatchNorm


class CustomBatchNorm(nn.BatchNorm2d):
    def forward(self, x):
        return super().forward(x) * 2


class CustomFrozen(TorchvisionFrozenBatchNorm2d):
    pass


def test_unknown_batchnorm_subclass_is_refused_with_its_class_name():
    with pytest.raises(PlanError, match="layer '1' is a .*CustomBatchNorm, a BatchNorm subclass"):
        normswap.plan(net(CustomBatchNorm(8)), "frozen")
    with pytest.raises(PlanError, match="CustomFrozen"):
        normswap.plan(net(CustomFrozen(8)), "bn")


def test_unknown_subclass_can_be_skipped_or_converted_as_its_base_class():
    model = net(CustomBatchNorm(8))
    skipped = normswap.plan(model, "frozen", unknown="skip")
    assert len(skipped) == 0 and skipped.skipped[0].reason == "unknown BatchNorm subclass"
    x = images()
    expected = nn.BatchNorm2d.forward(model[1], model[0](x))  # the base class's forward, which the opt-in keeps
    p = normswap.plan(model, "frozen", unknown="convert")
    assert p.rows[0].rank == 2
    converted = normswap.convert(p.apply(model), "bn")
    assert type(converted[1]) is nn.BatchNorm2d
    torch.testing.assert_close(converted(x), expected, rtol=1e-6, atol=1e-6)


def test_excluding_an_unknown_subclass_is_enough():
    assert len(normswap.plan(net(CustomBatchNorm(8)), "frozen", exclude="1")) == 0


def test_instance_norm_and_layer_norm_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.InstanceNorm2d(8, affine=True), nn.BatchNorm2d(8), nn.LayerNorm(4))
    p = normswap.plan(model, "frozen")
    assert [row.name for row in p] == ["2"] and p.skipped == []


def test_batchnorm1d_is_never_given_one_channel_per_group():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    with pytest.raises(PlanError, match="layer '1' .* one channel per group"):
        normswap.plan(model, "in")
    with pytest.raises(PlanError, match="one channel per group"):
        normswap.plan(model, "gn", groups=8)
    assert normswap.plan(model, "ln").rows[0].groups == 1
    assert normswap.plan(model, "gn", groups=4).rows[0].groups == 4


def test_invalid_options_are_refused():
    model = net(nn.BatchNorm2d(8))
    for options in ({"to": "groupnorm"}, {"to": "gn", "group_policy": "nearest"}, {"to": "gn", "affine": "zero"},
                    {"to": "gn", "groups": 0}, {"to": "gn", "channels_per_group": 0},
                    {"to": "frozen", "unknown": "maybe"}):
        with pytest.raises(PlanError):
            normswap.plan(model, **options)


# --- groups -------------------------------------------------------------------------------------------------------


def test_group_policy_divisor_reports_the_groups_it_picked_and_exact_names_the_layer():
    model = net(nn.BatchNorm2d(24), channels=24)
    row = normswap.plan(model, "gn", groups=16).rows[0]
    assert row.groups == 12 and "16 groups do not divide 24" in row.note
    with pytest.raises(PlanError, match="layer '1' has 24 channels, not divisible by 16 groups"):
        normswap.plan(model, "gn", groups=16, group_policy="exact")
    assert normswap.plan(model, "gn", channels_per_group=6).rows[0].groups == 4
    assert normswap.plan(model, "gn", channels_per_group=5).rows[0].groups == 4  # 24/5 = 4.8: nearest divisor is 4
    with pytest.raises(PlanError, match="layer '1' has 24 channels, not divisible by channels_per_group=5"):
        normswap.plan(model, "gn", channels_per_group=5, group_policy="exact")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@given(channels=st.integers(1, 2048), groups=st.integers(1, 128))
@settings(max_examples=200, deadline=None)
def test_property_divisor_policy_picks_the_largest_divisor_not_above_groups(channels, groups):
    chosen = choose_groups(channels, groups)
    assert channels % chosen == 0 and chosen <= groups
    assert chosen == max(d for d in divisors(channels) if d <= groups)


@given(channels=st.integers(1, 2048), groups=st.integers(1, 128))
@settings(max_examples=200, deadline=None)
def test_property_exact_policy_returns_groups_or_raises(channels, groups):
    if channels % groups == 0:
        assert choose_groups(channels, groups, group_policy="exact") == groups
    else:
        with pytest.raises(PlanError, match=f"{channels} channels"):
            choose_groups(channels, groups, group_policy="exact", layer="x")


@given(channels=st.integers(1, 2048), per_group=st.integers(1, 256))
@settings(max_examples=200, deadline=None)
def test_property_channels_per_group_picks_the_divisor_nearest_to_channels_over_k(channels, per_group):
    chosen = choose_groups(channels, channels_per_group=per_group)
    assert channels % chosen == 0
    wanted = channels / per_group
    assert all(abs(chosen - wanted) <= abs(d - wanted) for d in divisors(channels))
    if channels % per_group == 0:
        exact = choose_groups(channels, channels_per_group=per_group, group_policy="exact")
        assert chosen == channels // per_group == exact
    else:
        with pytest.raises(PlanError):
            choose_groups(channels, channels_per_group=per_group, group_policy="exact")


# --- idempotence, data round trip, misfits ------------------------------------------------------------------------


@pytest.mark.parametrize("to", TARGETS)
def test_converting_to_the_target_a_model_already_has_plans_nothing(to):
    model = normswap.convert(resnet_like(), to)
    p = normswap.plan(model, to)
    assert len(p) == 0 and len(p.skipped) > 0
    assert "plan: 0 layer(s)" in str(p)


def test_plan_changes_nothing_and_prints_a_table():
    model = resnet_like()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p = normswap.plan(model, "gn", groups=32)
    assert type(model.bn1) is nn.BatchNorm2d
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    text = str(p)
    assert text.splitlines()[0] == "plan: 20 layer(s) to gn, 0 skipped"
    assert text.splitlines()[2].split() == ["bn1", "BatchNorm2d", "GroupNorm", "64", "32", "copy", "drop"]


@pytest.mark.parametrize("to", TARGETS)
def test_plan_round_trips_through_json_and_applies_identically_to_a_fresh_model(to):
    model = randomize_norm_layers(resnet_like())
    p = normswap.plan(model, to, **gn_groups(to, 16), exclude="layer4.*")
    text = json.dumps(p.to_dict())
    restored = Plan.from_dict(json.loads(text))
    assert restored == p
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    a, b = p.apply(model).eval(), restored.apply(fresh).eval()
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(a(x), b(x), rtol=1e-6, atol=1e-6)
    assert get_history(b)[-1] == {"op": "plan", "plan": p.to_dict()}


@pytest.mark.parametrize("bad", [{"rows": []}, {"target": "gn", "rows": [{"names": ["a"]}]}, []])
def test_a_dict_that_is_not_a_plan_is_refused(bad):
    with pytest.raises(PlanError, match="not a normswap plan"):
        Plan.from_dict(bad)


def test_a_plan_row_with_zero_eps_an_unknown_target_or_indivisible_groups_is_refused():
    data = normswap.plan(net(nn.BatchNorm2d(8)), "gn", groups=4).to_dict()
    for key, value in (("eps", 0.0), ("target", "xx"), ("groups", 3), ("groups", 0), ("groups", None)):
        bad = copy.deepcopy(data)
        bad["rows"][0][key] = value
        with pytest.raises(PlanError, match="not a normswap plan"):
            Plan.from_dict(bad)


def misfits():
    """(plan, model it does not fit, message) triples."""
    shared = shared_model()
    two_names = normswap.plan(shared, "frozen")
    unshared = nn.Sequential()
    unshared.stem = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    unshared.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    eight = normswap.plan(net(nn.BatchNorm2d(8)), "gn", groups=4)
    return {
        "missing third name": (two_names, unshared, "no layer 'block.3'"),
        "not shared": (two_names, _with_block_names(unshared), "different layers"),
        "other class": (eight, net(nn.SyncBatchNorm(8)), "is a torch.nn.modules.batchnorm.SyncBatchNorm"),
        "other channels": (eight, net(nn.BatchNorm2d(6), channels=6), "has 6 channels, the plan expects 8"),
        "other model": (eight, nn.Sequential(nn.Linear(2, 2)), "no layer '1'"),
    }


def _with_block_names(model: nn.Sequential) -> nn.Sequential:
    model = copy.deepcopy(model)
    model.block.append(nn.Conv2d(4, 4, 1))
    model.block.append(nn.BatchNorm2d(4))
    return model


MISFITS = misfits()


@pytest.mark.parametrize("case", MISFITS)
def test_a_plan_that_does_not_fit_raises_and_leaves_the_model_unchanged(case):
    p, model, message = MISFITS[case]
    model = copy.deepcopy(model)
    before_types = [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    before_state = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError, match=message):
        p.apply(model)
    assert [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)] == before_types
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())
    assert get_history(model) == []


def test_applying_the_same_plan_twice_is_refused():
    model = net(nn.BatchNorm2d(8))
    p = normswap.plan(model, "frozen")
    p.apply(model)
    with pytest.raises(PlanError, match="does not fit"):
        p.apply(model)


@pytest.mark.parametrize("to", TARGETS)
def test_a_model_that_is_itself_a_norm_layer_is_replaced_and_returned(to):
    bn = randomize_norm_layers(nn.BatchNorm2d(8)).eval()
    set_source(bn, {"file": "bn.pt", "sha256": "0" * 64})
    x = torch.randn(2, 8, 3, 3)
    expected = bn(x)
    p = normswap.plan(bn, to, **gn_groups(to, 4))
    if to == "bn":
        assert len(p) == 0
        return
    assert p.rows[0].names == [""]
    new = p.apply(bn)
    assert new is not bn and classify(new) is not None
    assert get_history(new)[-1]["op"] == "plan"
    assert get_source(new) == {"file": "bn.pt", "sha256": "0" * 64}
    if to in STATS_TARGETS:
        torch.testing.assert_close(new(x), expected, rtol=1e-6, atol=1e-6)


# --- freeze -------------------------------------------------------------------------------------------------------


def test_freeze_freezes_statistics_and_affine_by_default():
    model = randomize_norm_layers(resnet_like())
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    frozen = normswap.freeze(model).train()
    assert all(cls in (FrozenBatchNorm, FrozenBatchNormAct) for cls in norm_classes(frozen))
    assert not any(name.startswith("bn1.") for name, _ in frozen.named_parameters())
    torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)


def test_freeze_with_trainable_affine_fine_tunes_gamma_and_beta_but_not_statistics():
    model = randomize_norm_layers(resnet_like())
    frozen = normswap.freeze(model, trainable_affine=True).train()
    stats = {k: v.clone() for k, v in frozen.state_dict().items() if "running" in k}
    optimizer = torch.optim.SGD(frozen.parameters(), lr=0.1)
    weight_before = frozen.bn1.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        frozen(torch.randn(2, 3, 32, 32)).square().mean().backward()
        optimizer.step()
    assert frozen.bn1.weight.grad is not None and not torch.equal(frozen.bn1.weight, weight_before)
    assert all(torch.equal(v, stats[k]) for k, v in frozen.state_dict().items() if "running" in k)


def test_freeze_takes_the_plan_options_that_apply_to_frozen_layers_and_errors_are_normswap_errors():
    model = resnet_like()
    normswap.freeze(model, exclude="layer4.*")
    assert type(model.layer4[0].bn1) is nn.BatchNorm2d and type(model.bn1) is FrozenBatchNorm
    with pytest.raises(NormswapError, match="unknown value 'nearest' for unknown="):
        normswap.freeze(resnet_like(), include="layer1.*", unknown="nearest")
    with pytest.raises(TypeError, match="group_policy"):  # a GroupNorm option: not in freeze's signature
        normswap.freeze(resnet_like(), group_policy="divisor")


def test_convert_changes_the_model_in_place():
    model = net(nn.BatchNorm2d(8))
    assert normswap.convert(model, "frozen") is model and type(model[1]) is FrozenBatchNorm


def test_sync_batchnorm_source_converts_to_frozen_with_its_statistics():
    model = timm_convert_sync_batchnorm(net(nn.BatchNorm2d(8)))
    assert type(model[1]) is nn.SyncBatchNorm
    model = randomize_norm_layers(model).eval()
    x = images()
    expected = model(x)
    converted = normswap.convert(model, "frozen")
    assert type(converted[1]) is FrozenBatchNorm
    torch.testing.assert_close(converted(x), expected, rtol=1e-6, atol=1e-6)


def test_an_option_of_one_target_is_refused_for_another_naming_its_target():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8))
    with pytest.raises(PlanError, match=r"groups= applies to to='gn' only \(to='ln' uses one group"):
        normswap.plan(model, "ln", groups=2)
    with pytest.raises(PlanError, match="trainable_affine= applies to to='frozen' only, not to 'gn'"):
        normswap.plan(model, "gn", trainable_affine=True)
    assert normswap.plan(model, "gn").rows[0].groups == 8
