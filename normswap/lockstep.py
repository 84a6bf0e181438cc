"""Running one forward per batch in step: every forward pauses at chosen layers until all of them got there.

Sequential recalibration and fitted affine weights both need, for each layer in forward order, something computed
from *all* calibration batches (statistics, a least-squares fit) before any batch goes past that layer. Running one
forward per layer, or re-running the model from the start for each layer, costs as many forwards as there are
layers; replaying a traced graph does not see the model's real control flow. :class:`Lockstep` instead runs each
batch's forward (a *lane*) exactly once, and pauses every lane at each *stop* (a forward pre-hook on a chosen
module): when every lane is paused or finished, the stop reached first is *settled* (the caller computes what it
needs from the inputs that arrived there) and the lanes waiting at it go on. Each batch's forward runs once, on any
model that runs, whatever its control flow.

A lane is a greenlet (a coroutine with its own Python and C stack) on the thread that calls :meth:`Lockstep.run`:
pausing is a switch back to that thread's own code, which costs about a microsecond, and every forward runs on the
caller's thread, with its warm per-thread caches (the first forward on a new thread ran 1.4-1.8x as long on small
CPU models, with oneDNN on or off). Only one lane runs at a time, so the calls into the model are as sequential and
deterministic as a loop over the batches. The whole run is under the context its caller gives (no_grad, autocast,
device), entered once, so each lane starts under the caller's thread-local torch state (grad and inference mode,
autocast, torch function and dispatch modes, the current CUDA stream) with that context on top; what a forward
changes of that state before it pauses (a ``with torch.autocast(..., enabled=False)`` around a stop) stays that
lane's: it is put back for the other lanes and the settle, and restored when the lane goes on
(:class:`_TorchState`). With ``alternate=True`` the lanes waiting at a stop go on in the reverse order of their
arrival, so the lane that arrived last runs on with its activations still in the cache.

A stop can be settled several times per forward when its layer is called several times (``calls=``): round ``r``
is settled once every lane that will call it an ``r``-th time has paused there. A lane that reaches a stop after its
last round was settled (a layer called more often than ``calls`` says, or in a different order in another batch)
makes :meth:`Lockstep.run` raise :class:`Revisited`, after stopping every lane.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> batches = [torch.ones(1, 2), torch.zeros(1, 2)]
    >>> seen = []
    >>> run = Lockstep([lambda x=x: model(x) for x in batches], {model[0]: 0, model[2]: 1})
    >>> outputs = run.run(lambda stop, arrivals, final: seen.append((stop, [a.lane for a in arrivals])))
    >>> seen
    [(0, [0, 1]), (1, [0, 1])]
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, NamedTuple, Optional, Sequence, TypeVar

import greenlet
import torch
from torch import nn

from .graph import capture

__all__ = ["Arrival", "Lockstep", "Revisited", "count_calls", "run_counting_calls"]

T = TypeVar("T")


class Revisited(Exception):
    """A lane reached a stop whose last round had been settled; ``stop`` names it."""

    def __init__(self, stop: int, lane: int) -> None:
        super().__init__(f"lane {lane} reached stop {stop} after it was settled")
        self.stop = stop
        self.lane = lane


class _Abort(BaseException):
    """Raised inside a paused lane to end it when the run stops early. A BaseException, so that a model's own
    ``except Exception`` does not swallow it."""


class _Passing(BaseException):
    """Carries an error raised at a stop (by ``on_arrive``, or :class:`Revisited`) out of the model's forward,
    through any ``except Exception`` of the model's own."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class Arrival:
    """One lane paused at a stop: its index, the module and the positional arguments it is about to be called with."""

    lane: int
    module: nn.Module
    args: tuple


_AUTOCAST_DEVICES = tuple(device for device in ("cpu", "cuda", "mps", "xpu", "hpu")
                          if torch.amp.is_autocast_available(device))


class _TorchState(NamedTuple):
    """The thread-local torch state a forward can change before it pauses, as one comparable value: grad and
    inference mode, autocast (enabled devices and their dtypes, the cast cache), the torch function and dispatch
    mode stacks, and the current CUDA stream (where CUDA is in use). Lanes share their thread, so each lane's state
    is captured when it pauses and put back when it goes on; a forward that changes none of it costs one
    :meth:`capture` per pause."""

    grad: bool
    inference: bool
    autocast: tuple
    autocast_cache: bool
    function_modes: tuple
    dispatch_modes: tuple
    stream: Any

    @classmethod
    def capture(cls) -> "_TorchState":
        autocast = tuple((device, torch.get_autocast_dtype(device)) for device in _AUTOCAST_DEVICES
                         if torch.is_autocast_enabled(device)) if torch._C._is_any_autocast_enabled() else ()
        functions = torch._C._len_torch_function_stack()
        dispatches = torch._C._len_torch_dispatch_stack()
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast,
                   torch.is_autocast_cache_enabled(),
                   tuple(torch._C._get_function_stack_at(i) for i in range(functions)) if functions else (),
                   tuple(torch._C._get_dispatch_stack_at(i) for i in range(dispatches)) if dispatches else (),
                   torch.cuda.current_stream() if torch.cuda.is_initialized() else None)

    def enter(self, current: "_TorchState") -> None:
        """Make this the thread's state where it is ``current``, but for the inference mode, which only a guard
        object can change (``torch._C._InferenceMode``: it puts back the state it found when it is dropped)."""
        torch._C._set_grad_enabled(self.grad)
        if self.autocast != current.autocast:
            wanted = dict(self.autocast)
            for device in _AUTOCAST_DEVICES:
                torch.set_autocast_enabled(device, device in wanted)
                if device in wanted:
                    torch.set_autocast_dtype(device, wanted[device])
        torch.set_autocast_cache_enabled(self.autocast_cache)
        if self.function_modes != current.function_modes:
            for _ in current.function_modes:
                torch._C._pop_torch_function_stack()
            for mode in self.function_modes:
                torch._C._push_on_torch_function_stack(mode)
        if self.dispatch_modes != current.dispatch_modes:
            for _ in current.dispatch_modes:
                torch._C._pop_torch_dispatch_stack(None)
            for mode in self.dispatch_modes:
                torch._C._push_on_torch_dispatch_stack(mode)
        if self.stream is not None and self.stream != current.stream:
            torch.cuda.set_stream(self.stream)


class _Lane:
    def __init__(self, index: int, forward: Callable[[], Any]) -> None:
        self.index = index
        self.forward = forward
        self.state = "new"  # new, running, paused, finished
        self.arrival: Optional[Arrival] = None
        self.stop: Optional[int] = None
        self.arrived = 0  # when it last paused (a running count), to order the lanes that go on
        self.visits: dict[int, int] = {}
        self.output: Any = None
        self.error: Optional[BaseException] = None
        self.coroutine: Optional[greenlet.greenlet] = None
        self.torch_state: Optional[_TorchState] = None  # as it was when the lane last paused
        self.inference_guard: Optional[torch._C._InferenceMode] = None


class Lockstep:
    """Run ``forwards`` (one callable per lane) in step at the ``stops`` (module -> stop number).

    Args:
        forwards: each lane's forward, called once, in a greenlet of its own on the calling thread.
        stops: the modules to pause at, each with its stop number (several modules may share one: a layer of two
            models run side by side).
        calls: how many times per forward each stop's modules are called (default 1).
        context: a context manager factory entered once around the run: every lane's forward and every settle run
            under it (``torch.no_grad``...).
        on_arrive: called in the lane, under its context, when it reaches a stop: ``on_arrive(stop, arrival,
            round)`` (measure the input there, then let it go).
        choose: picks the stop to settle from the paused ones (``{stop: first step it was seen paused}``), or
            ``None`` when nothing is left anywhere; by default the one seen first (ties: the lower number). Under
            ``torch.distributed`` the caller makes all processes agree here.
        alternate: let the lanes waiting at a stop go on in the reverse order of their arrival (the last one still
            has its activations in the cache) instead of in lane order. For callers whose ``on_arrive`` does not
            rely on the order in which the lanes arrive.
    """

    def __init__(self, forwards: list[Callable[[], Any]], stops: dict[nn.Module, int], *,
                 calls: Optional[dict[int, int]] = None,
                 context: Callable[[], ContextManager] = contextlib.nullcontext,
                 on_arrive: Optional[Callable[[int, Arrival, int], None]] = None,
                 choose: Optional[Callable[[dict[int, int]], Optional[int]]] = None,
                 alternate: bool = False) -> None:
        self.lanes = [_Lane(index, forward) for index, forward in enumerate(forwards)]
        self.stops = stops
        self.calls = dict(calls or {})
        self.context = context
        self.on_arrive = on_arrive
        self.choose = choose or _first_seen
        self.alternate = alternate
        self.settled: dict[int, int] = {}
        self.first_seen: dict[int, int] = {}
        self.step = 0
        self.arrivals = 0
        self.running: Optional[_Lane] = None
        self.home: Optional[_TorchState] = None  # the state the run is under, where no lane is running
        self.aborting = False

    def run(self, settle: Callable[[int, list[Arrival], bool], None]) -> list[Any]:
        """Run every lane to its end, settling stops as they fill: ``settle(stop, arrivals, final)`` is called with
        the lanes paused there, in lane order (``final`` on the stop's last round), before they go on; it runs on
        the calling thread, under ``context`` as the lanes do. Returns each lane's output. The first error of a lane
        or of ``settle`` stops every lane and is raised here."""
        scheduler = greenlet.getcurrent()
        for lane in self.lanes:
            lane.coroutine = greenlet.greenlet(lambda lane=lane: self._body(lane), parent=scheduler)
        handles = [module.register_forward_pre_hook(self._hook(stop)) for module, stop in self.stops.items()]
        try:
            with self.context():
                try:
                    return self._schedule(settle)
                except BaseException:
                    self._abort()
                    raise
        finally:
            for handle in handles:
                handle.remove()

    def _schedule(self, settle: Callable[[int, list[Arrival], bool], None]) -> list[Any]:
        """Let the lanes go on and settle stops until every lane has finished (and, under ``torch.distributed``,
        ``choose`` says the run is over everywhere)."""
        self.home = _TorchState.capture()
        going_on = list(self.lanes)
        while True:
            for lane in going_on:
                self._go_on(lane)
            going_on = self._settle_next(settle)
            if going_on is None:
                return [lane.output for lane in self.lanes]

    def current_lane(self) -> Optional[int]:
        """The index of the lane running where this is called; ``None`` outside the lanes."""
        lane = self.running
        return lane.index if lane is not None and lane.coroutine is greenlet.getcurrent() else None

    def _hook(self, stop: int) -> Callable[[nn.Module, tuple], None]:
        def pause(module: nn.Module, args: tuple) -> None:
            lane = self.running
            if lane is None or lane.coroutine is not greenlet.getcurrent():
                return  # a call from outside the lanes
            visit = lane.visits.get(stop, 0) + 1
            lane.visits[stop] = visit
            arrival = Arrival(lane.index, module, args)
            try:
                if visit <= self.settled.get(stop, 0) or visit > self.calls.get(stop, 1):
                    raise Revisited(stop, lane.index)
                if self.on_arrive is not None:
                    self.on_arrive(stop, arrival, visit)
            except Exception as exc:
                raise _Passing(exc) from exc
            self.arrivals += 1
            lane.state, lane.stop, lane.arrival, lane.arrived = "paused", stop, arrival, self.arrivals
            lane.coroutine.parent.switch()
            lane.arrival = None
            if self.aborting:
                raise _Abort

        return pause

    def _body(self, lane: _Lane) -> None:
        try:
            lane.output = lane.forward()
        except _Abort:
            pass
        except _Passing as passing:
            lane.error = passing.error
        except BaseException as exc:  # handed to run(), which raises it in the caller's code
            lane.error = exc
        finally:
            lane.state = "finished"
            lane.arrival = None

    def _go_on(self, lane: _Lane) -> None:
        """Run ``lane`` until it pauses or finishes, under its own torch state; raise what it raised."""
        here = self.home  # (every switch puts it back)
        lane.inference_guard = None  # puts back the lane's inference mode, grad mode and dispatch keys
        own = lane.torch_state
        if own is not None and own != here:
            own.enter(here)
        lane.state = "running"
        self.running = lane
        try:
            lane.coroutine.switch()
        finally:
            self.running = None
            own = lane.torch_state = _TorchState.capture()
            if own.inference != here.inference:  # (made first: it keeps the lane's state as it is now)
                lane.inference_guard = torch._C._InferenceMode(here.inference)
            if own != here:
                here.enter(own)
        if lane.error is not None:
            raise lane.error

    def _settle_next(self, settle: Callable[[int, list[Arrival], bool], None]) -> Optional[list[_Lane]]:
        """Every lane is paused or finished: settle the stop ``choose`` picks; returns the lanes waiting there, in
        the order they go on, or ``None`` when the run is over. A stop at which no lane of this process waits (under
        ``torch.distributed``, another process's lanes may) is settled too, and the next one chosen, so that every
        process takes part in every settle."""
        while True:
            paused = {lane.stop for lane in self.lanes if lane.state == "paused"}
            for stop in sorted(paused - set(self.first_seen)):
                self.first_seen[stop] = self.step
            stop = self.choose({stop: self.first_seen[stop] for stop in paused})
            if stop is None:
                return None
            waiting = [lane for lane in self.lanes if lane.state == "paused" and lane.stop == stop]
            rounds = self.settled.get(stop, 0) + 1
            settle(stop, [lane.arrival for lane in waiting], rounds >= self.calls.get(stop, 1))
            self.settled[stop] = rounds
            self.step += 1
            if waiting:
                return sorted(waiting, key=lambda lane: -lane.arrived) if self.alternate else waiting

    def _abort(self) -> None:
        """End every lane that has not finished: a paused one raises where it waits, and unwinds."""
        self.aborting = True
        for lane in self.lanes:
            if lane.state == "paused":
                try:
                    self._go_on(lane)
                except BaseException:  # the error that stopped the run is the one raised
                    pass


def _first_seen(paused: dict[int, int]) -> Optional[int]:
    """The paused stop seen first, the lowest-numbered among those seen at the same step."""
    return min(paused, key=lambda stop: (paused[stop], stop)) if paused else None
def count_calls(model: nn.Module, model_input: Any, modules: Sequence[nn.Module]) -> dict[int, int]:
    """How many times each of ``modules`` (by position: its stop number) is called in one forward of ``model`` on
    ``model_input``, for those called at all (:func:`normswap.graph.capture`, which leaves nothing on the model).

    >>> layer = nn.Linear(2, 2)
    >>> count_calls(nn.Sequential(layer, nn.ReLU(), layer), torch.zeros(1, 2), [layer])
    {0: 2}
    """
    graph = capture(model, model_input)
    return {stop: graph.call_count(module) for stop, module in enumerate(modules) if graph.call_count(module)}


def run_counting_calls(attempt: Callable[[dict[int, int]], T], count: Callable[[], dict[int, int]], *,
                       restore: Callable[[], None],
                       refuse: Callable[[Revisited], BaseException]) -> tuple[T, bool]:
    """Run ``attempt(calls)`` as if every stop were called once per forward; if a lane reaches a stop again
    (:class:`Revisited`), ``restore`` what the attempt changed, ``count`` the calls (:func:`count_calls`) and run
    ``attempt`` once more with them. A second :class:`Revisited` (a layer called a different number of times in
    another batch) is raised as ``refuse(revisit)``. Returns the result and whether the calls had to be counted.

    >>> run_counting_calls(lambda calls: calls.get(0, 1), lambda: {0: 2}, restore=lambda: None,
    ...                    refuse=lambda revisit: ValueError(revisit))
    (1, False)
    """
    try:
        return attempt({}), False
    except Revisited:
        restore()
    calls = count()
    try:
        return attempt(calls), True
    except Revisited as revisit:
        raise refuse(revisit) from None
