"""Running one forward per batch in step: every forward pauses at chosen layers until all of them got there.

Sequential recalibration and fitted affine weights both need, for each layer in forward order, something computed
from *all* calibration batches (statistics, a least-squares fit) before any batch goes past that layer. Running one
forward per layer, or re-running the model from the start for each layer, costs as many forwards as there are
layers; replaying a traced graph does not see the model's real control flow. :class:`Lockstep` instead runs each
batch's forward (a *lane*) exactly once, in its own thread, and pauses every lane at each *stop* (a forward
pre-hook on a chosen module): when every lane is paused or finished, the stop reached first is *settled* (the
caller computes what it needs from the inputs that arrived there) and the lanes waiting at it go on. Each batch's
forward runs once, on any model that runs, whatever its control flow.

Only one lane runs at a time, handed over explicitly, so the calls into the model are as sequential and
deterministic as a loop over the batches (the threads exist only to keep each forward's Python stack while it
waits). Each lane runs under the thread-local torch state of the thread that calls :meth:`Lockstep.run` (grad and
inference mode, autocast, torch function and dispatch modes, the current CUDA device and stream), then under the
context its caller gives (no_grad, autocast, device), so a forward in a lane computes what it would in a loop.
A hand-over between threads costs tens of microseconds of CPU (a semaphore and the interpreter lock), so the run
makes as few as it can: the lane that pauses last at a stop settles it itself, in its own thread, and hands over to
the next lane directly; with ``alternate=True`` the lanes waiting at a stop go on in the reverse order of their
arrival, so the lane that settled runs on without a hand-over (and with its activations still in the cache): a
stop costs ``lanes - 1`` hand-overs instead of ``lanes + 1``, none with one lane.

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
import threading
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence, TypeVar

import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

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


_AUTOCAST_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu")


class _CallerState:
    """The thread-local torch state of the thread that runs the lockstep, captured there, to be entered in each lane
    thread: grad and inference mode, autocast (per device type, with the cast cache setting), the torch function
    and dispatch modes (outermost first), the current CUDA device and stream (where CUDA is in use)."""

    def __init__(self) -> None:
        self.grad = torch.is_grad_enabled()
        self.inference = torch.is_inference_mode_enabled()
        self.autocast = [(device, torch.get_autocast_dtype(device)) for device in _AUTOCAST_DEVICES
                         if torch.is_autocast_enabled(device)]
        self.autocast_cache = torch.is_autocast_cache_enabled()
        self.function_modes = _get_current_function_mode_stack()
        self.dispatch_modes = _get_current_dispatch_mode_stack()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.stream = torch.cuda.current_stream() if cuda else None

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if self.stream is not None:
                stack.enter_context(torch.cuda.device(self.stream.device))
                stack.enter_context(torch.cuda.stream(self.stream))
            if self.inference:
                stack.enter_context(torch.inference_mode())
            stack.enter_context(torch.set_grad_enabled(self.grad))
            for device, dtype in self.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, cache_enabled=self.autocast_cache))
            for mode in (*self.function_modes, *self.dispatch_modes):
                stack.enter_context(mode)
            yield


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
        self.thread: Optional[threading.Thread] = None
        # A plain lock as a one-slot semaphore, held while no wake-up is pending (released by the lane that hands
        # over, acquired by this lane to wait): half the cost of threading.Semaphore, whose wait is Python code.
        self.wake = threading.Lock()
        self.wake.acquire()

    def wake_up(self) -> None:
        """Let this lane go on from where it waits (now, or when it next waits)."""
        try:
            self.wake.release()
        except RuntimeError:  # a wake-up is pending already (an abort racing a hand-over)
            pass


class Lockstep:
    """Run ``forwards`` (one callable per lane) in step at the ``stops`` (module -> stop number).

    Args:
        forwards: each lane's forward, called once in its own thread.
        stops: the modules to pause at, each with its stop number (several modules may share one: a layer of two
            models run side by side).
        calls: how many times per forward each stop's modules are called (default 1).
        context: a context manager factory entered by each lane around its forward (``torch.no_grad``...).
        on_arrive: called in the lane, under its context, when it reaches a stop: ``on_arrive(stop, arrival,
            round)`` (measure the input there, then let it go).
        choose: picks the stop to settle from the paused ones (``{stop: first step it was seen paused}``), or
            ``None`` when nothing is left anywhere; by default the one seen first (ties: the lower number). Under
            ``torch.distributed`` the caller makes all processes agree here.
        alternate: let the lanes waiting at a stop go on in the reverse order of their arrival (fewer hand-overs;
            see the module documentation) instead of in lane order. For callers whose ``on_arrive`` does not rely
            on the order in which the lanes arrive.
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
        self.queue: list[_Lane] = []
        self.main = threading.Semaphore(0)
        self.aborting = False
        self.local = threading.local()
        self.caller_state: Optional[_CallerState] = None
        self.settle: Callable[[int, list[Arrival], bool], None] = lambda stop, arrivals, final: None
        self.first_seen: dict[int, int] = {}
        self.step = 0
        self.arrivals = 0
        self.failure: Optional[BaseException] = None

    def run(self, settle: Callable[[int, list[Arrival], bool], None]) -> list[Any]:
        """Run every lane to its end, settling stops as they fill: ``settle(stop, arrivals, final)`` is called with
        the lanes paused there, in lane order (``final`` on the stop's last round), before they go on; it runs in
        the thread of the lane that paused last, under that lane's state and context. Returns each lane's output.
        The first error of a lane or of ``settle`` stops every lane and is raised here."""
        self.caller_state = _CallerState()
        handles = [module.register_forward_pre_hook(self._hook(stop)) for module, stop in self.stops.items()]
        self.settle = settle
        try:
            if self.lanes:
                self.queue = list(self.lanes[1:])
                self._resume(self.lanes[0])
                self.main.acquire()
            else:  # no lane here: this thread takes part in every settle until the run is over everywhere
                self._settle_next()
            if self.failure is not None:
                raise self.failure
            for lane in self.lanes:
                lane.thread.join()  # each has finished: its last act was to wake this thread
            return [lane.output for lane in self.lanes]
        except BaseException:
            self._abort()
            raise
        finally:
            for handle in handles:
                handle.remove()

    def current_lane(self) -> Optional[int]:
        """The index of the lane running in the calling thread; ``None`` outside the lanes."""
        lane = getattr(self.local, "lane", None)
        return lane.index if lane is not None else None

    def _hook(self, stop: int) -> Callable[[nn.Module, tuple], None]:
        def pause(module: nn.Module, args: tuple) -> None:
            lane = getattr(self.local, "lane", None)
            if lane is None:
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
            self._pause(lane, stop, arrival)

        return pause

    def _resume(self, lane: _Lane) -> None:
        lane.state = "running"
        if lane.thread is None:
            lane.thread = threading.Thread(target=self._body, args=(lane,), daemon=True,
                                           name=f"normswap-lane-{lane.index}")
            lane.thread.start()
        else:
            lane.wake_up()

    def _hand_over(self, current: _Lane) -> bool:
        """Called by the running lane when it pauses or finishes: the next queued lane runs or, when every lane is
        paused or finished, the next stop is settled here and its first lane runs; the main thread is woken when
        nothing is left (or something failed). True when that next lane is ``current`` itself: it runs on."""
        if self.aborting:
            self.main.release()
            return False
        following = self.queue.pop(0) if self.queue else self._settle_next()
        if following is None:
            self.main.release()
            return False
        if following is current:
            current.state = "running"
            return True
        self._resume(following)
        return False

    def _settle_next(self) -> Optional[_Lane]:
        """Every lane is paused or finished: settle the stop ``choose`` picks and queue the lanes waiting there;
        returns the first of them, or ``None`` when the run is over or has failed (``failure``). A stop at which
        no lane of this process waits (under ``torch.distributed``, another process's lanes may) is settled too,
        and the next one chosen, so that every process takes part in every settle."""
        while True:
            try:
                failed = next((lane.error for lane in self.lanes if lane.error is not None), None)
                if failed is not None:
                    raise failed
                paused = {lane.stop for lane in self.lanes if lane.state == "paused"}
                for stop in sorted(paused - set(self.first_seen)):
                    self.first_seen[stop] = self.step
                stop = self.choose({stop: self.first_seen[stop] for stop in paused})
                if stop is None:
                    return None
                waiting = [lane for lane in self.lanes if lane.state == "paused" and lane.stop == stop]
                rounds = self.settled.get(stop, 0) + 1
                self.settle(stop, [lane.arrival for lane in waiting], rounds >= self.calls.get(stop, 1))
                self.settled[stop] = rounds
                self.step += 1
            except BaseException as exc:  # raised by the main thread, which ends every lane
                self.failure = exc
                return None
            if waiting:
                break
        if self.alternate:
            waiting.sort(key=lambda lane: -lane.arrived)
        self.queue = waiting[1:]
        return waiting[0]

    def _body(self, lane: _Lane) -> None:
        self.local.lane = lane
        try:
            with self.caller_state.entered(), self.context():
                lane.output = lane.forward()
        except _Abort:
            pass
        except _Passing as passing:
            lane.error = passing.error
        except BaseException as exc:  # handed to the main thread, which raises it
            lane.error = exc
        finally:
            lane.state = "finished"
            lane.arrival = None
            self._hand_over(lane)

    def _pause(self, lane: _Lane, stop: int, arrival: Arrival) -> None:
        self.arrivals += 1
        lane.state, lane.stop, lane.arrival, lane.arrived = "paused", stop, arrival, self.arrivals
        if not self.aborting and not self._hand_over(lane):
            lane.wake.acquire()
        lane.arrival = None
        if self.aborting:
            raise _Abort

    def _abort(self) -> None:
        """End every lane: a paused one raises where it waits, a running one at its next stop."""
        self.aborting = True
        self.queue = []
        for lane in self.lanes:
            lane.wake_up()
        for lane in self.lanes:
            if lane.thread is not None and lane.thread is not threading.current_thread():
                lane.thread.join()


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
