"""Operations that only look at a model (fold planning, compare) leave it as it was: attributes, the contents of its
dicts and sets, buffers, training flags and random generators, even when its forward fails; and no cache a look
fills outlives the training that would make it stale (LeViT's attention biases, on the real libraries)."""

import copy
from typing import Any, Callable

import pytest
import timm
import torch
from torch import nn
from transformers import LevitConfig, LevitForImageClassification

import normswap
from normswap.compare import compare
from normswap.data import call_model, main_output
from normswap.fold import plan_fold
from normswap.model_state import restored, training_flags
from tests.helpers import randomize_norm_layers


class Stateful(nn.Module):
    """A forward that changes everything a forward can change on its model."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("seen", torch.zeros(()))
        self.cache, self.tags = {}, {"a"}
        self.fail = fail

    def forward(self, x):
        self.cache["cpu"] = x.sum()
        self.tags.add("b")
        self.shape = x.shape
        self.seen += 1
        self.conv.extra = nn.Identity()
        self.conv._parameters["bias"] = None
        if self.fail:
            raise ValueError("the forward fails")
        return self.conv(x) + torch.rand(1)


@pytest.mark.parametrize("fail", [False, True])
def test_everything_a_forward_changes_is_put_back_however_it_ends(fail):
    model = Stateful(fail).train()
    containers = (model.cache, model.tags, model.conv._parameters, model.conv._modules)
    attributes = {module: dict(module.__dict__) for module in model.modules()}
    bias, rng = model.conv.bias, torch.get_rng_state()
    with pytest.raises(ValueError) if fail else torch.no_grad():
        with restored(model):
            model.eval()
            model(torch.randn(1, 3, 2, 2))
    for module, before in attributes.items():
        assert module.__dict__.keys() == before.keys() and all(module.__dict__[k] is v for k, v in before.items())
    assert (model.cache, model.tags) == ({}, {"a"})
    assert all(a is b for a, b in zip(containers, (model.cache, model.tags, model.conv._parameters,
                                                   model.conv._modules)))
    assert model.conv.bias is bias and "extra" not in model.conv._modules
    assert model.training and model.conv.training and model.seen.item() == 0
    assert torch.equal(torch.get_rng_state(), rng)


def transformers_levit() -> nn.Module:
    config = LevitConfig(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
                         key_dim=[8, 8, 8], patch_size=16)
    return LevitForImageClassification(config)


LEVITS = {
    "timm levit_128s": (lambda: timm.create_model("levit_128s", img_size=64), lambda x: x),
    "transformers LeViT": (transformers_levit, lambda x: {"pixel_values": x}),
}
LOOKS = {
    "plan_fold": lambda model, x: plan_fold(model, example_input=x),
    "compare": lambda model, x: compare(model, model, [x], layers=False),
}


def random_levit(name: str, *, training: bool) -> tuple[nn.Module, Callable[[torch.Tensor], Any]]:
    """LeViT ``name`` with random BatchNorm statistics in training or eval mode, and how it takes its images."""
    build, as_input = LEVITS[name]
    torch.manual_seed(0)
    return randomize_norm_layers(build()).train(training), as_input


def attention_caches(model: nn.Module) -> list[dict]:
    return [module.attention_bias_cache for module in model.modules() if hasattr(module, "attention_bias_cache")]


@pytest.mark.parametrize("look", LOOKS)
@pytest.mark.parametrize("levit", LEVITS)
def test_a_look_at_a_training_levit_leaves_no_attention_cache_to_go_stale(levit, look):
    model, as_input = random_levit(levit, training=True)
    untouched = copy.deepcopy(model)
    x = as_input(torch.randn(2, 3, 64, 64))
    LOOKS[look](model, x)
    assert attention_caches(model) and not any(attention_caches(model))
    outputs = []
    for trained in (model, untouched):  # a training step on the attention biases, then an evaluation
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in trained.named_parameters():
                if name.endswith("attention_biases"):
                    parameter.add_(torch.randn(parameter.shape, generator=generator))
            outputs.append(main_output(call_model(trained.eval(), x)))
    assert torch.equal(outputs[0], outputs[1]), "the evaluation sees the trained attention biases"


@pytest.mark.parametrize("levit", LEVITS)
def test_refining_a_levit_trains_its_attention_biases_through_a_cache_filled_afresh_each_step(levit):
    original, as_input = random_levit(levit, training=False)
    batches = [as_input(x) for x in torch.randn(16, 3, 64, 64).split(4)]
    with torch.no_grad():  # an evaluation before: the caches hold the attention biases as they are
        call_model(original, batches[0])
    converted = normswap.convert(copy.deepcopy(original), "gn", groups=1)
    before = {name: p.detach().clone() for name, p in converted.named_parameters()
              if name.endswith("attention_biases")}
    normswap.refine(converted, original, batches, steps=4, holdout=0, progress=False)  # (keeps the last state)
    trained = {name: p for name, p in converted.named_parameters() if name in before}
    assert any(not torch.equal(trained[name], value) for name, value in before.items()), \
        "the attention biases learn (a cache from the weights before would give them no gradient)"
    assert not any(attention_caches(converted)), "no cache of weights refinement went past is left"


CHANGES = {
    "recalibrate": lambda model, x: normswap.recalibrate(model, [x]),
    "convert, fitting the affine weights": lambda model, x: normswap.convert(model, "gn", groups=1, affine="fit",
                                                                           data=[x]),
}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("levit", LEVITS)
def test_operations_that_change_a_training_levit_leave_no_attention_cache_behind(levit, change):
    model, as_input = random_levit(levit, training=True)
    changed = CHANGES[change](model, as_input(torch.randn(2, 3, 64, 64)))
    assert changed.training and attention_caches(changed) and not any(attention_caches(changed))


def test_training_flags_are_put_back_directly_not_through_a_modules_own_train():
    model, as_input = random_levit("transformers LeViT", training=True)
    flags = training_flags(model)
    model.eval()
    with torch.no_grad():
        call_model(model, as_input(torch.randn(1, 3, 64, 64)))  # (fills the attention caches)
    flags.put_back()
    assert all(module.training for module in model.modules())
    assert all(attention_caches(model))  # LeViT's own train(True) would have emptied them
