"""normswap's layers: FrozenBatchNorm computes BatchNorm's eval output for every input rank and precision, never
changes its statistics, loads BatchNorm state dicts, and survives torch.jit.script, torch.export and torch.compile."""

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from normswap.errors import NormswapError
from normswap.layers import BatchNorm, FrozenBatchNorm, FrozenBatchNormAct

from .helpers import randomize_norm_layers

# (BatchNorm class, input shape) for every rank FrozenBatchNorm accepts.
RANKS = {
    "N,C": (nn.BatchNorm1d, (4, 6), 1),
    "N,C,L": (nn.BatchNorm1d, (4, 6, 7), 1),
    "N,C,H,W": (nn.BatchNorm2d, (2, 6, 5, 4), 2),
    "N,C,D,H,W": (nn.BatchNorm3d, (2, 6, 3, 4, 5), 3),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def frozen_copy_of(bn: nn.modules.batchnorm._BatchNorm, rank=None, **kwargs) -> FrozenBatchNorm:
    frozen = FrozenBatchNorm(bn.num_features, bn.eps, rank=rank, **kwargs)
    frozen.load_state_dict(bn.state_dict())
    return frozen


def random_bn(cls=nn.BatchNorm2d, channels=6, seed=0, eps=1e-5) -> nn.Module:
    return randomize_norm_layers(cls(channels, eps=eps), seed).eval()


@pytest.mark.parametrize("rank_name", RANKS)
def test_eval_output_equals_batchnorm_eval_for_every_rank(rank_name):
    cls, shape, rank = RANKS[rank_name]
    bn = random_bn(cls)
    frozen = frozen_copy_of(bn, rank=rank)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3 + 1
    assert relative_error(frozen(x), bn(x)) <= 1e-6


@given(
    channels=st.integers(1, 24),
    batch=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    eps=st.floats(1e-8, 1e-1),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None)
def test_property_frozen_equals_batchnorm_eval(channels, batch, spatial, eps, seed):
    bn = BatchNorm(channels, eps=eps)
    randomize_norm_layers(bn, seed).eval()
    frozen = frozen_copy_of(bn)
    x = torch.randn(batch, channels, *spatial, generator=torch.Generator().manual_seed(seed)) * 2
    expected = F.batch_norm(x.double(), bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                            bn.bias.double(), False, 0.0, eps)
    torch.testing.assert_close(frozen(x).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trainable_affine", [False, True])
def test_train_mode_equals_eval_mode_and_never_changes_statistics(trainable_affine):
    frozen = frozen_copy_of(random_bn(), trainable_affine=trainable_affine)
    before = copy.deepcopy(frozen.state_dict())
    x = torch.randn(3, 6, 4, 4) * 5 + 2
    expected = frozen.eval()(x)
    frozen.train()
    for _ in range(3):
        torch.testing.assert_close(frozen(x), expected, rtol=0, atol=0)
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_batchnorm_state_dict_loads_strictly_and_ignores_num_batches_tracked():
    bn = random_bn()
    bn.num_batches_tracked.fill_(123)
    assert "num_batches_tracked" in bn.state_dict()
    for trainable_affine in (False, True):
        frozen = FrozenBatchNorm(6, trainable_affine=trainable_affine)
        result = frozen.load_state_dict(bn.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
        for name in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(frozen, name), getattr(bn, name))


def test_a_missing_statistic_is_still_reported_by_strict_loading():
    state = random_bn().state_dict()
    del state["running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        FrozenBatchNorm(6).load_state_dict(state)


def test_trainable_affine_gets_gradients_while_statistics_stay_fixed():
    bn = random_bn()
    frozen = frozen_copy_of(bn, trainable_affine=True).train()
    stats = frozen.running_mean.clone(), frozen.running_var.clone()
    assert {name for name, _ in frozen.named_parameters()} == {"weight", "bias"}
    x = torch.randn(2, 6, 3, 3)
    frozen(x).square().sum().backward()
    # d/dweight of sum(y^2) with y = xhat * w + b, written out in float64
    mean, var = bn.running_mean.double()[:, None, None], bn.running_var.double()[:, None, None]
    xhat = (x.double() - mean) / (var + bn.eps).sqrt()
    y = xhat * bn.weight.double()[:, None, None] + bn.bias.double()[:, None, None]
    torch.testing.assert_close(frozen.weight.grad.double(), (2 * y * xhat).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(frozen.bias.grad.double(), (2 * y).sum((0, 2, 3)), rtol=1e-5, atol=1e-5)
    assert torch.equal(frozen.running_mean, stats[0]) and torch.equal(frozen.running_var, stats[1])
    assert not frozen.running_mean.requires_grad


def test_default_frozen_layer_has_no_parameters_and_passes_gradients_to_its_input():
    frozen = frozen_copy_of(random_bn())
    assert list(frozen.parameters()) == []
    x = torch.randn(2, 6, 3, 3, requires_grad=True)
    frozen(x).sum().backward()
    expected = (frozen.weight / (frozen.running_var + frozen.eps).sqrt())[None, :, None, None].expand_as(x)
    torch.testing.assert_close(x.grad, expected)


def _half_reference(frozen: FrozenBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """The exact result in float64, rounded once to the input's dtype."""
    exact = F.batch_norm(x.double(), frozen.running_mean.double(), frozen.running_var.double(),
                         frozen.weight.double(), frozen.bias.double(), False, 0.0, frozen.eps)
    return exact.to(x.dtype)


def _naive_half(frozen: FrozenBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """What a layer computing its scale in the input's precision gives."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    var, mean = frozen.running_var.to(x.dtype), frozen.running_mean.to(x.dtype)
    scale = frozen.weight.to(x.dtype) * torch.rsqrt(var + frozen.eps)
    return (x - mean.reshape(shape)) * scale.reshape(shape) + frozen.bias.to(x.dtype).reshape(shape)


def test_fp16_model_with_zero_variance_and_tiny_eps_stays_finite():
    # In fp16, 0 + 1e-8 underflows to 0 and rsqrt gives inf; in fp32 the scale is 1e4 * weight.
    frozen = FrozenBatchNorm(4, eps=1e-8)
    with torch.no_grad():
        frozen.running_var.copy_(torch.tensor([0.0, 1e-8, 1.0, 4.0]))
        frozen.running_mean.copy_(torch.tensor([0.0, 0.0, 0.5, -1.0]))
        frozen.weight.copy_(torch.tensor([1e-3, 1e-3, 1.0, 2.0]))
    frozen = frozen.half()
    x = (torch.randn(2, 4, 3, 3) * 1e-2).half()
    assert not torch.isfinite(_naive_half(frozen, x)).all()
    out = frozen(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out, _half_reference(frozen, x), rtol=1e-3, atol=1e-3)


def test_fp16_input_into_fp32_layer_with_variance_beyond_fp16_range():
    # running_var 1e5 overflows fp16 (max 65504): a half-precision scale would be rsqrt(inf) = 0.
    frozen = FrozenBatchNorm(3)
    with torch.no_grad():
        frozen.running_var.copy_(torch.tensor([1e5, 2e5, 1.0]))
    x = (torch.randn(2, 3, 4, 4) * 300).half()
    assert (_naive_half(frozen, x)[:, :2] == 0).all()
    out = frozen(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, _half_reference(frozen, x), rtol=1e-3, atol=1e-3)


def _folded_half(frozen: FrozenBatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` with scale and shift computed in fp32, then rounded to the input's dtype."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale = frozen.weight.float() * torch.rsqrt(frozen.running_var.float() + frozen.eps)
    shift = frozen.bias.float() - frozen.running_mean.float() * scale
    return x * scale.to(x.dtype).reshape(shape) + shift.to(x.dtype).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer_dtype", [torch.float32, "same"])
def test_half_precision_result_is_rounded_once_from_an_fp32_computation(dtype, layer_dtype):
    # Statistics far from zero: x * scale + shift cancels in half precision; the layer's result does not.
    gen = torch.Generator().manual_seed(3)
    frozen = FrozenBatchNorm(16)
    with torch.no_grad():
        frozen.running_mean.copy_(torch.randn(16, generator=gen) * 50)
        frozen.running_var.copy_(torch.rand(16, generator=gen) * 4 + 0.1)
        frozen.weight.copy_(torch.rand(16, generator=gen) + 0.5)
        frozen.bias.copy_(torch.randn(16, generator=gen))
    frozen = frozen.to(dtype if layer_dtype == "same" else layer_dtype)
    x = (torch.randn(4, 16, 8, 8, generator=gen) * frozen.running_var.float().sqrt()[:, None, None]
         + frozen.running_mean.float()[:, None, None]).to(dtype)
    out = frozen(x)
    assert out.dtype == dtype
    reference = _half_reference(frozen, x)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, reference, rtol=eps, atol=eps)
    folded_error = (_folded_half(frozen, x).double() - reference.double()).abs().max().item()
    assert folded_error > 8 * eps * reference.double().abs().max().item()


def test_float64_layer_computes_in_float64():
    bn = random_bn().double()
    frozen = frozen_copy_of(bn).double()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    assert frozen(x).dtype == torch.float64
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-12, atol=1e-12)


def test_channels_last_input_gives_the_same_values():
    bn = random_bn()
    frozen = frozen_copy_of(bn)
    x = torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)


def test_input_without_channel_dimension_is_refused():
    with pytest.raises(ValueError, match="N, C"):
        FrozenBatchNorm(3)(torch.randn(3))


def test_non_positive_eps_is_refused():
    with pytest.raises(NormswapError, match="eps"):
        FrozenBatchNorm(3, eps=0.0)


def test_frozen_act_applies_the_normalization_then_drop_then_activation():
    bn = random_bn()
    layer = FrozenBatchNormAct(6, bn.eps, act=nn.Hardswish(), drop=nn.Dropout(0.5))
    layer.load_state_dict(bn.state_dict())
    x = torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(layer.eval()(x), F.hardswish(bn(x)))
    layer.train()
    zeros = (layer(x) == 0).float().mean().item()
    assert 0.3 < zeros < 0.7  # dropout is active in train mode


def test_rank_agnostic_batchnorm_trains_like_batchnorm_of_each_rank():
    for name, (cls, shape, _) in RANKS.items():
        reference, anyrank = cls(6), BatchNorm(6)
        x = torch.randn(shape) * 2 + 1
        torch.testing.assert_close(anyrank(x), reference(x), msg=name)
        torch.testing.assert_close(anyrank.running_mean, reference.running_mean, msg=name)
        torch.testing.assert_close(anyrank.running_var, reference.running_var, msg=name)


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm2d).parameters, reason="BatchNorm has no bias=")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("trainable_affine", [False, True])
def test_a_bias_free_frozen_layer_loads_a_bias_free_batchnorm_and_computes_its_eval_output(trainable_affine):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6, bias=False)
    bn.load_state_dict({key: value for key, value in random_bn(seed=7).state_dict().items() if key != "bias"})
    bn.eval()
    frozen = FrozenBatchNorm(6, rank=2, trainable_affine=trainable_affine, bias=False)
    frozen.load_state_dict(bn.state_dict())
    assert frozen.bias is None and "bias=False" in repr(frozen)
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.jit.script(frozen)(x), frozen(x), rtol=0, atol=0)
    torch.testing.assert_close(torch.export.export(frozen, (x,)).module()(x), frozen(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torch_jit_script_gives_the_same_output():
    for layer in (frozen_copy_of(random_bn(), rank=2), FrozenBatchNormAct(6, act=nn.ReLU(), rank=2)):
        layer.load_state_dict(random_bn(seed=4).state_dict())
        scripted = torch.jit.script(layer)
        for x in (torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3).half()):
            torch.testing.assert_close(scripted(x), layer(x), rtol=0, atol=0)


def test_torch_export_gives_the_same_output_for_fp32_and_fp16():
    layer = FrozenBatchNormAct(6, act=nn.ReLU(), rank=2)
    layer.load_state_dict(random_bn(seed=5).state_dict())
    for x in (torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3).half()):
        exported = torch.export.export(layer, (x,))
        torch.testing.assert_close(exported.module()(x), layer(x), rtol=0, atol=0)


def test_torch_compile_captures_one_graph():
    layer = frozen_copy_of(random_bn(), trainable_affine=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.slow
def test_torch_compile_with_inductor_gives_the_same_output():
    layer = FrozenBatchNormAct(6, act=nn.ReLU(), rank=2)
    layer.load_state_dict(random_bn(seed=6).state_dict())
    compiled = torch.compile(layer, fullgraph=True)
    for x in (torch.randn(2, 6, 3, 3), torch.randn(2, 6, 3, 3).half()):
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-3)
