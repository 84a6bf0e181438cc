"""Recipes: every shipped recipe runs on a small model and does what its comment promises."""

import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from normswap.errors import PlanError
from normswap.layers import FrozenBatchNorm
from normswap.recipe import Recipe, RecipeError, Rule
from normswap.targets import classify

from .helpers import randomize_norm_layers

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return randomize_norm_layers(timm.create_model("resnet18", num_classes=10)).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def kinds(model):
    return {classify(m).family for m in model.modules() if classify(m) is not None}


def test_recipes_folder_is_not_empty():
    assert len(RECIPES) >= 4


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_converts_a_model_that_still_runs(path, resnet, images):
    recipe = Recipe.load(path)
    assert recipe.description
    model = recipe.apply(copy.deepcopy(resnet))
    out = model(images)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_frozen_backbone_recipe_freezes_everything_and_keeps_the_eval_function(resnet, images):
    model = Recipe.load("recipes/frozen-backbone.toml").apply(copy.deepcopy(resnet))
    assert kinds(model) == {"frozen"}
    assert not model.layer1[0].bn1.trainable_affine
    assert model.layer3[0].bn1.trainable_affine and model.layer3[0].bn1.weight.requires_grad
    model.train()
    torch.testing.assert_close(model(images), resnet(images), rtol=1e-5, atol=1e-5)


def test_syncbn_then_export_restores_the_original_classes_and_function(resnet, images):
    synced = Recipe.load("recipes/syncbn-ddp.toml").apply(copy.deepcopy(resnet))
    assert kinds(synced) == {"sync"}
    exported = Recipe.load("recipes/export-bn.toml").apply(synced)
    assert [type(m) for m in exported.modules()] == [type(m) for m in resnet.modules()]
    torch.testing.assert_close(exported(images), resnet(images))


def test_groupnorm_recipe_leaves_no_batchnorm(resnet):
    model = Recipe.load("recipes/groupnorm-dp.toml").apply(copy.deepcopy(resnet))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(m.num_groups == 32 for m in model.modules() if isinstance(m, nn.GroupNorm))


def test_the_first_matching_rule_wins():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    recipe = Recipe([Rule(["1"], "frozen"), Rule(["*"], "gn", {"groups": 4})])
    model = recipe.apply(model)
    assert isinstance(model[1], FrozenBatchNorm)
    assert isinstance(model[3], nn.GroupNorm) and model[3].num_groups == 4


def test_a_rule_that_cannot_be_planned_leaves_the_model_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.Conv2d(6, 7, 1), nn.BatchNorm2d(7))
    recipe = Recipe([Rule(["1"], "frozen"), Rule(["*"], "gn", {"groups": 4, "group_policy": "exact"})])
    before = [type(m) for m in model.modules()]
    with pytest.raises(PlanError, match=r"^layer '3' has 7 channels, not divisible by 4 groups"):
        recipe.apply(model)
    assert [type(m) for m in model.modules()] == before


@pytest.mark.parametrize(
    "text, message",
    [
        ("[[rules]]\nmatch='*'\nto='gn'\ncolour='red'\n", "unknown key 'colour'"),
        ("[recipe]\ndescription='x'\n", "has no \\[\\[rules\\]\\]"),
        ("[[rules]]\nmatch='*'\n", "needs 'match' and 'to'"),
        ("[[rules]]\nmatch='*'\nto='gn'\n[[steps]]\nop='dance'\n", "op must be one of"),
        ("this is = not [toml", "is not a TOML file"),
    ],
)
def test_a_bad_recipe_names_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        Recipe.load(path)


def test_a_missing_recipe_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope.toml")
