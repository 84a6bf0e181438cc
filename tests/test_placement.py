"""Placement (normswap.placement, normswap.walk.model_device): where and how every operation runs a model over data,
decided once: the device (where the model is by default), autocast, the input dtype and layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.errors import CalibrationError, NormswapError
from normswap.placement import Placement, for_float64
from normswap.walk import model_device


def test_where_a_model_is_is_its_first_tensor_s_device_and_a_layer_without_tensors_asks_the_model():
    model = nn.Sequential(nn.ReLU(), nn.Linear(2, 2).to(torch.device("meta")))
    assert model_device(model) == torch.device("meta")
    assert model_device(model[0]) is None
    assert model_device(model[0], model) == torch.device("meta")
    buffers_only = nn.BatchNorm1d(2, affine=False)
    assert model_device(buffers_only) == torch.device("cpu")


def test_by_default_a_run_is_where_the_model_is_and_batches_get_the_model_s_dtype():
    run = Placement.resolve(nn.Linear(2, 2).double(), None, False)
    assert (run.device, run.amp_dtype, run.input_dtype) == (torch.device("cpu"), None, torch.float64)
    moved = run.move({"x": torch.zeros(1, 2), "ids": torch.tensor([3])})
    assert moved["x"].dtype == torch.float64 and moved["ids"].dtype == torch.int64
    assert Placement.resolve(nn.ReLU(), None, False).device == torch.device("cpu")


def test_channels_last_applies_to_four_dimensional_inputs_only():
    run = Placement.resolve(nn.Conv2d(3, 4, 1), None, False, channels_last=True)
    image, vector = run.move((torch.zeros(2, 3, 4, 4), torch.zeros(2, 3)))
    assert image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous()
    assert vector.is_contiguous()


def test_amp_true_is_bfloat16_on_the_cpu_and_the_forward_runs_under_it():
    model = nn.Linear(4, 3)
    run = Placement.resolve(model, "cpu", True)
    assert run.amp_dtype == torch.bfloat16
    with run.context():
        out = model(torch.randn(2, 4))
        assert not torch.is_grad_enabled()
    assert out.dtype == torch.bfloat16
    with run.context(grad=True):
        assert torch.is_grad_enabled()


@pytest.mark.parametrize("device, amp, message", [
    ("gpu0", False, "unknown device 'gpu0': use cpu, cuda, cuda:N or mps"),
    ("cpu", "yes", "amp must be True, False, torch.float16 or torch.bfloat16"),
])
def test_a_wrong_device_or_amp_is_one_sentence_in_the_operation_s_own_error(device, amp, message):
    with pytest.raises(CalibrationError, match=message):
        Placement.resolve(nn.Linear(2, 2), device, amp, error=CalibrationError)


def test_autocast_is_refused_for_a_model_already_in_half_precision():
    with pytest.raises(NormswapError, match="already float16: autocast .* is for float32 models"):
        Placement.resolve(nn.Linear(2, 2).half(), None, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error():
    with pytest.raises(NormswapError, match="device 'cuda' was asked for but CUDA is not available"):
        Placement.resolve(nn.Linear(2, 2), "cuda", False)


@pytest.mark.cuda
def test_cuda_without_an_index_is_pinned_to_the_current_device():
    run = Placement.resolve(nn.Linear(2, 2), "cuda", False)
    assert run.device == torch.device("cuda", torch.cuda.current_device())


def test_float64_work_stays_where_it_is_except_on_mps():
    tensor = torch.ones(2, dtype=torch.float64)
    assert for_float64(tensor) is tensor
