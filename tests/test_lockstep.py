"""Forwards run in step: each batch's forward runs once, pausing at every stop until all forwards got there."""

import threading

import pytest
import torch
from torch import nn

from normswap.lockstep import Lockstep, Revisited


def model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    return model, [torch.randn(2, 3) for _ in range(3)]


class Unwinding(nn.Module):
    """Counts the forwards that started and those that ended (their ``finally`` ran)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.started = self.ended = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.started += 1
        try:
            return self.model(x)
        finally:
            self.ended += 1


def test_every_stop_is_settled_once_all_forwards_reached_it_and_each_forward_runs_once():
    model, batches = model_and_batches()
    events = []
    model[0].register_forward_pre_hook(lambda m, a: events.append("first layer runs"))
    lockstep = Lockstep([lambda x=x: model(x) for x in batches], {model[2]: 0, model[4]: 1},
                        on_arrive=lambda stop, arrival, call: events.append(f"lane {arrival.lane} at {stop}"))
    outputs = lockstep.run(lambda stop, arrivals, final: events.append(f"settle {stop}"))
    assert events == ["first layer runs", "lane 0 at 0", "first layer runs", "lane 1 at 0", "first layer runs",
                      "lane 2 at 0", "settle 0", "lane 0 at 1", "lane 1 at 1", "lane 2 at 1", "settle 1"]
    with torch.no_grad():
        assert all(torch.equal(out, model(x)) for out, x in zip(outputs, batches))


def test_every_forward_runs_on_the_calling_thread_and_no_thread_is_started():
    model, batches = model_and_batches()
    running_on, threads, before = [], [], threading.active_count()
    model[0].register_forward_pre_hook(lambda m, a: running_on.append(threading.get_ident()))
    Lockstep([lambda x=x: model(x) for x in batches], {model[2]: 0, model[4]: 1},
             on_arrive=lambda stop, arrival, call: threads.append(threading.active_count())).run(lambda *a: None)
    assert running_on == [threading.get_ident()] * 3 and threads == [before] * 6


def test_what_is_settled_is_in_place_before_any_forward_goes_on():
    model, batches = model_and_batches()

    def settle(stop, arrivals, final):
        with torch.no_grad():
            model[2].weight.zero_()
            model[2].bias.fill_(float(len(arrivals)))

    outputs = Lockstep([lambda x=x: model[:3](x) for x in batches], {model[2]: 0}).run(settle)
    assert all(torch.equal(out, torch.full((2, 3), 3.0)) for out in outputs)


def test_lanes_and_settles_run_under_the_context_given_and_the_caller_s_state_is_left_as_it_was():
    model, batches = model_and_batches()
    seen = []
    Lockstep([lambda x=x: model(x) for x in batches], {model[2]: 0}, context=torch.no_grad,
             on_arrive=lambda stop, arrival, call: seen.append(torch.is_grad_enabled())).run(
        lambda *a: seen.append(("settle", torch.is_grad_enabled())))
    assert seen == [False, False, False, ("settle", False)] and torch.is_grad_enabled()


class SkipsForSmallInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        x = self.a(x)
        if x.abs().sum() > 1e-3:
            x = self.b(x)
        return self.c(x)


def test_a_forward_that_skips_a_stop_does_not_hold_the_others():
    model = SkipsForSmallInputs()
    batches = [torch.randn(2, 3), torch.zeros(2, 3)]
    with torch.no_grad():
        model.a.bias.zero_()
    settled = []
    Lockstep([lambda x=x: model(x) for x in batches], {model.b: 0, model.c: 1}).run(
        lambda stop, arrivals, final: settled.append((stop, [arrival.lane for arrival in arrivals])))
    assert settled == [(0, [0]), (1, [0, 1])]


def test_a_stop_reached_more_often_than_expected_stops_every_forward():
    layer = nn.Linear(3, 3)
    model = Unwinding(nn.Sequential(layer, nn.ReLU(), layer))
    forwards = [lambda x=x: model(x) for x in (torch.randn(1, 3), torch.randn(1, 3))]
    with pytest.raises(Revisited) as raised:
        Lockstep(forwards, {layer: 0}).run(lambda *a: None)
    assert raised.value.stop == 0 and model.started == model.ended == 2
    rounds = []
    Lockstep(forwards, {layer: 0}, calls={0: 2}).run(lambda stop, arrivals, final: rounds.append(final))
    assert rounds == [False, True]


class SwallowsErrors(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 3)

    def forward(self, x):
        try:
            return self.layer(x)
        except Exception:
            return x


def test_an_error_at_a_stop_passes_through_the_models_own_except_and_ends_every_lane():
    inner = SwallowsErrors()
    model = Unwinding(inner)

    def arrive(stop, arrival, call):
        if arrival.lane == 1:
            raise ValueError("bad batch")

    forwards = [lambda: model(torch.randn(1, 3)) for _ in range(3)]
    with pytest.raises(ValueError, match="bad batch"):
        Lockstep(forwards, {inner.layer: 0}, on_arrive=arrive).run(lambda *a: None)
    assert model.started == model.ended == 2  # the third never started


def test_an_interrupt_while_settling_ends_every_lane():
    inner, batches = model_and_batches()
    model = Unwinding(inner)

    def settle(stop, arrivals, final):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Lockstep([lambda x=x: model(x) for x in batches], {inner[2]: 0}).run(settle)
    assert model.started == model.ended == 3


def test_an_interrupt_inside_a_forward_ends_every_lane_and_is_raised():
    inner, batches = model_and_batches()
    model = Unwinding(inner)

    def arrive(stop, arrival, call):
        if stop == 1 and arrival.lane == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Lockstep([lambda x=x: model(x) for x in batches], {inner[2]: 0, inner[4]: 1}, on_arrive=arrive).run(
            lambda *a: None)
    assert model.started == model.ended == 3


def test_with_alternate_the_lane_that_arrived_last_goes_on_first_and_the_others_follow_in_reverse_arrival_order():
    model, batches = model_and_batches()
    events = []
    lockstep = Lockstep([lambda x=x: model(x) for x in batches], {model[2]: 0, model[4]: 1}, alternate=True,
                        on_arrive=lambda stop, arrival, call: events.append(f"lane {arrival.lane} at {stop}"))
    outputs = lockstep.run(lambda stop, arrivals, final: events.append(
        f"settle {stop} with {[arrival.lane for arrival in arrivals]} (lane {lockstep.current_lane()})"))
    assert events == ["lane 0 at 0", "lane 1 at 0", "lane 2 at 0", "settle 0 with [0, 1, 2] (lane None)",
                      "lane 2 at 1", "lane 1 at 1", "lane 0 at 1", "settle 1 with [0, 1, 2] (lane None)"]
    with torch.no_grad():
        assert all(torch.equal(out, model(x)) for out, x in zip(outputs, batches))


@pytest.mark.parametrize("alternate", [False, True])
def test_a_process_settles_every_stop_the_processes_agree_on_also_where_none_of_its_lanes_waits(alternate):
    """Under torch.distributed, ``choose`` returns what all processes agreed on: a stop where only another process's
    lanes wait is settled here too (with no arrivals), and a process without lanes takes part until the end."""
    model, batches = model_and_batches()
    agreed = [5, 0, 5, 1, None]  # stop 5 is another process's (a layer this model's lanes never reach)

    def choose(paused):
        return agreed.pop(0)

    settled = []
    outputs = Lockstep([lambda x=x: model(x) for x in batches], {model[2]: 0, model[4]: 1}, choose=choose,
                       alternate=alternate).run(lambda stop, arrivals, final: settled.append((stop, len(arrivals))))
    assert settled == [(5, 0), (0, 3), (5, 0), (1, 3)] and not agreed
    with torch.no_grad():
        assert all(torch.equal(out, model(x)) for out, x in zip(outputs, batches))

    agreed = [0, 1, None]
    settled.clear()
    assert Lockstep([], {model[2]: 0, model[4]: 1}, choose=choose).run(
        lambda stop, arrivals, final: settled.append((stop, len(arrivals)))) == []
    assert settled == [(0, 0), (1, 0)] and not agreed
