"""Lanes run under the caller's thread-local torch state (normswap.lockstep): a forward in a lane computes what it would
in a loop, under grad and inference mode, autocast, torch function and dispatch modes and the current CUDA stream, as
they are where Lockstep.run is called; what a forward changes of that state before it pauses stays its own."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from normswap.lockstep import Lockstep


class Probe(nn.Module):
    """Records the thread-local state its forward runs under."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append({
            "grad": torch.is_grad_enabled(),
            "inference": torch.is_inference_mode_enabled(),
            "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
            "stream": torch.cuda.current_stream() if torch.cuda.is_available() else None,
        })
        return x


def model_and_batches(device: str = "cpu") -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Probe(), nn.Linear(4, 2)).to(device)
    return model, [torch.randn(3, 4, device=device) for _ in range(3)]


def in_step(model: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each batch's forward in a lane of its own, pausing at the last layer."""
    lockstep = Lockstep([lambda x=x: model(x) for x in batches], {model[2]: 0})
    return lockstep.run(lambda stop, arrivals, final: None)


@pytest.mark.parametrize("state", ["grad", "no_grad", "inference_mode", "autocast"])
def test_a_lane_sees_the_caller_s_grad_inference_and_autocast_state_and_computes_what_a_loop_does(state):
    model, batches = model_and_batches()
    contexts = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
                "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    with contexts[state]():
        expected = [model(x) for x in batches]
        in_the_loop = model[1].seen[-1]
        outputs = in_step(model, batches)
    assert model[1].seen[-1] == in_the_loop and len(model[1].seen) == 2 * len(batches)
    assert in_the_loop["grad"] == (state in ("grad", "autocast"))
    assert in_the_loop["inference"] == (state == "inference_mode")
    assert in_the_loop["autocast"] == (torch.bfloat16 if state == "autocast" else False)
    for output, reference in zip(outputs, expected):
        assert output.dtype == reference.dtype and torch.equal(output, reference)
        assert output.requires_grad == reference.requires_grad
        assert output.is_inference() == reference.is_inference()


class CountingFunctionMode(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.linear = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.linear += func is torch.nn.functional.linear
        return func(*args, **(kwargs or {}))


class CountingDispatchMode(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.addmm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.addmm += func is torch.ops.aten.addmm.default
        return func(*args, **(kwargs or {}))


def test_a_lane_runs_under_the_caller_s_torch_function_and_dispatch_modes():
    model, batches = model_and_batches()
    with torch.no_grad(), CountingFunctionMode() as functions, CountingDispatchMode() as dispatches:
        in_step(model, batches)
    assert functions.linear == 2 * len(batches)
    assert dispatches.addmm == 2 * len(batches)


@pytest.mark.cuda
def test_a_lane_runs_on_the_caller_s_current_cuda_stream():
    model, batches = model_and_batches("cuda")
    stream = torch.cuda.Stream()
    with torch.no_grad(), torch.cuda.stream(stream):
        expected = [model(x) for x in batches]
        outputs = in_step(model, batches)
    stream.synchronize()
    assert all(seen["stream"] == stream for seen in model[1].seen)
    for output, reference in zip(outputs, expected):
        assert torch.equal(output, reference)


class Counting(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


class ChangesStateAroundItsLastLayer(nn.Module):
    """Enters a context in its forward, and calls its last layer (the stop) and a probe inside it."""

    def __init__(self, change) -> None:
        super().__init__()
        self.change = change
        self.first, self.probe, self.last = nn.Linear(4, 4), Probe(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        with self.change():
            return self.last(self.probe(x))


CHANGES = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "function mode": Counting,
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_state_a_forward_enters_before_it_pauses_stays_its_own_and_the_settle_sees_the_caller_s(change):
    torch.manual_seed(0)
    model = ChangesStateAroundItsLastLayer(CHANGES[change])
    batches = [torch.randn(3, 4) for _ in range(3)]
    expected = [model(x) for x in batches]
    in_the_loop = model.probe.seen[-1]
    caller = {"grad": True, "inference": False, "autocast": False, "stream": in_the_loop["stream"]}
    settled = []

    def settle(stop, arrivals, final):
        settled.append({"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
                        "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                        "stream": in_the_loop["stream"], "mode": torch._C._len_torch_function_stack()})
        torch.ones(1).add(1)  # a torch call no forward's function mode may see

    outputs = Lockstep([lambda x=x: model(x) for x in batches], {model.last: 0}).run(settle)
    assert settled == [{**caller, "mode": 0}]
    assert all(seen == in_the_loop for seen in model.probe.seen[-3:])
    assert {"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
            "autocast": torch.is_autocast_enabled("cpu")} == {"grad": True, "inference": False, "autocast": False}
    assert torch._C._len_torch_function_stack() == 0
    for output, reference in zip(outputs, expected):
        assert output.dtype == reference.dtype and torch.equal(output.detach(), reference.detach())
        assert output.requires_grad == reference.requires_grad
        assert output.is_inference() == reference.is_inference()
