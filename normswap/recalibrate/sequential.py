"""The sequential method: eval-consistent statistics, each layer measured in eval mode with the layers before it
already calibrated, for the cost of one forward per batch.

Every batch's eval forward runs once, in step with the others (:class:`normswap.lockstep.Lockstep`): each forward
pauses before every calibrated layer; when all have paused (or finished), the layer reached first gets the
statistics of the inputs that arrived there, merged over all batches (and ranks), and only then do those forwards
go on, now normalizing with the new statistics. A layer called several times per forward is measured at every
call, each run with its old statistics, and gets its new ones after the last call; that is found when a forward
reaches a layer a second time: a forward of the first batch counts the calls and the calibration starts again
(:func:`normswap.lockstep.run_counting_calls`).

Every batch and the activations its paused forward holds stay in memory until the end. When the first batch's forward
pauses at its first layer, the activations it holds there (every tensor the local variables of its paused call stack
hold, measured by their storage) times the number of batches, plus the batches themselves, are the estimate of what the
run will hold; it is logged, and a run whose other batches would need more than the calibration device has free (CPU:
MemAvailable of ``/proc/meminfo``, or psutil; CUDA: ``mem_get_info``) is refused before any of them runs, naming
``batches=`` and ``method="exact"``. The first batch is watched at every later layer too: where its paused forward holds
more there (an expansion, a skip connection), the run is refused before the other batches get there.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..data import batch_size_of, call_model, model_failures, output_tensors
from ..errors import CalibrationError, byte_size
from ..lockstep import Arrival, Lockstep, Revisited, count_calls, run_counting_calls
from ..placement import Placement
from ..progress import progress_bar
from ..walk import parameters_and_buffers
from .distributed import FAILED, REVISITED, PeerFailure, PeerRevisited, Ranks
from .statistics import (Layer, add_input_statistics, check_finite, final_statistics, merge_pending,
                         use_scratch_statistics)

log = logging.getLogger("normswap")


def calibrate_sequential(model: nn.Module, layers: list[Layer], inputs: Iterator[tuple[int, Any]], run: Placement,
                         ranks: Ranks, progress: Optional[bool]) -> tuple[list[int], list[Layer], int, float]:
    """Eval-consistent calibration; returns the totals (batches, samples), the layers in the order they were
    calibrated, the passes (one per layer and call) and their cost in forwards over the data."""
    try:
        read = list(inputs)
        held_bytes = sum(_nbytes(model_input, elsewhere=run.device) for _, model_input in read)
        free = available_memory(run.device) if held_bytes else None  # batches read already are in memory
        if free is not None and held_bytes > free:
            raise CalibrationError(
                f"the {len(read)} calibration batches take {byte_size(held_bytes)}, more than the {byte_size(free)} "
                f"free on {run.device}, where sequential recalibration holds them all: pass fewer batches (batches=) "
                "or use method='exact', which holds one batch at a time")
        held = [(index, run.move(model_input)) for index, model_input in read]
        del read
    except BaseException:  # Ctrl-C and SIGTERM too: the other ranks must not wait for this one
        ranks.merge([], [0, 0], failed=True, quiet=True)
        raise
    totals = ranks.merge([], [len(held), sum(batch_size_of(x) for _, x in held)])
    if totals[0] == 0:
        raise CalibrationError("the calibration data is empty: recalibration needs at least one batch")
    for layer in layers:
        use_scratch_statistics(layer, keep_values=True)
    old = [(layer, layer.module.running_mean.clone(), layer.module.running_var.clone()) for layer in layers]
    probes = [0]

    def restore() -> None:
        for layer, mean, var in old:
            layer.module.running_mean.copy_(mean)
            layer.module.running_var.copy_(var)

    def count() -> dict[int, int]:
        calls = ranks.most_calls(_count_calls(model, layers, held, run), len(layers))
        probes[0] = ranks.merge([], [1 if held else 0])[0]
        ranks.start_over()
        return calls

    def refuse(revisit: Revisited) -> CalibrationError:
        name = layers[revisit.stop].name if revisit.stop >= 0 else "a layer"
        return CalibrationError(
            f"layer '{name}' is called a different number of times in different batches, so it has no "
            "eval-consistent statistics: use method='exact'"
        )

    (order, passes), counted = run_counting_calls(
        lambda calls: _in_step(model, layers, held, run, ranks, progress, calls), count, restore=restore,
        refuse=refuse)
    # counted: the first run (at most one forward), a forward of each process's first batch, the second run
    return totals, order, passes, (2.0 + probes[0] / totals[0]) if counted else 1.0


def _in_step(model: nn.Module, layers: list[Layer], held: list[tuple[int, Any]], run: Placement, ranks: Ranks,
             progress: Optional[bool], calls: dict[int, int]) -> tuple[list[Layer], int]:
    """One calibration with every batch's forward run in step; returns the layers in the order they got their
    statistics and the number of passes (settled stops)."""
    for layer in layers:
        layer.reset(run.statistics_device)
    order: list[Layer] = []
    passes = [0]

    def lane(index: int, model_input: Any) -> Any:
        with model_failures(index, model_input):
            return call_model(model, model_input)

    watch = _MemoryWatch(model, held, run)

    def measure(stop: int, arrival: Arrival, call: int) -> None:
        if watch.watching and arrival.lane == 0:
            watch.check(arrival.args[0])  # at every stop of the first batch
        add_input_statistics(layers[stop], arrival.args[0])

    with progress_bar(len(layers), "recalibrate", "layer", progress=progress, rank=ranks.rank) as bar:
        def settle(stop: int, arrivals: list[Arrival], final: bool) -> None:
            passes[0] += 1
            layer = layers[stop]
            merge_pending(layer)
            if not final:
                return
            ranks.merge([layer], [0])
            for calibrated, (mean, var) in final_statistics([layer]).items():
                calibrated.module.running_mean.copy_(mean)
                calibrated.module.running_var.copy_(var)
            order.append(layer)
            bar.update()

        lockstep = Lockstep([lambda index=index, x=x: lane(index, x) for index, x in held],
                            {layer.module: stop for stop, layer in enumerate(layers)}, calls=calls,
                            context=run.context, on_arrive=measure,
                            choose=lambda paused: ranks.choose(paused, len(layers)), alternate=True)
        try:
            watch.start()
            lockstep.run(settle)
        except (PeerFailure, PeerRevisited):
            raise
        except Revisited:
            ranks.choose({}, len(layers), status=REVISITED)
            raise
        except BaseException as error:
            ranks.choose({}, len(layers), status=FAILED)
            if isinstance(error, Exception):
                check_finite(order)  # non-finite statistics on the way are the cause to name
            raise
        finally:
            watch.stop()
    check_finite(order)  # once, at the end: the first layer (in forward order) non-finite values reached is named
    return order, passes[0]


def _count_calls(model: nn.Module, layers: list[Layer], held: list[tuple[int, Any]], run: Placement) -> dict[int, int]:
    """How many times each layer is called in a forward of the first batch."""
    if not held:
        return {}
    index, model_input = held[0]
    with run.context(), model_failures(index, model_input):
        return count_calls(model, model_input, [layer.module for layer in layers])


class _MemoryWatch:
    """The memory a sequential run holds. At each stop of the first batch's forward, the tensors its Python frames
    hold (every local variable of the model's code on the paused call stack that is a tensor, or a tuple, list or
    dict holding tensors; not the batch itself, the model's parameters and buffers, or normswap's own frames),
    counted by storage, are what one paused forward holds there. At the first stop, that times the batches, plus
    the batches, is the estimate logged before any other batch runs; a run whose other batches would need more than
    the device has free (there, or at a later stop where the paused forwards hold more) is refused with
    :class:`CalibrationError`. ``held_most`` is the largest estimate over the stops seen. Nothing is hooked: the
    forwards run as they would without the watch."""

    def __init__(self, model: nn.Module, held: list[tuple[int, Any]], run: Placement) -> None:
        self.model, self.held, self.run = model, held, run
        self.watching = False
        self.skipped: set[int] = set()
        self.batches = 0
        self.activations: Optional[int] = None
        self.most = 0
        self.free: Optional[int] = None

    def start(self) -> None:
        """Watch the first batch's forward."""
        if not self.held:
            return
        self.watching = True
        model_tensors = itertools.chain(parameters_and_buffers(self.model), output_tensors(self.held[0][1]))
        self.skipped = {tensor.untyped_storage().data_ptr() for tensor in model_tensors}
        self.batches = sum(_nbytes(model_input) for _, model_input in self.held)

    def check(self, arriving: torch.Tensor) -> None:
        """At a stop of the first batch, in its lane: measure what it holds; at the first, log the estimate;
        refuse a run whose other batches cannot get there."""
        storages = {}
        for tensor in [arriving, *_held_by_frames()]:
            storage = tensor.untyped_storage()
            storages.setdefault(storage.data_ptr(), storage.nbytes())
        activations = sum(size for pointer, size in storages.items() if pointer not in self.skipped)
        earlier, self.activations = self.activations, activations
        self.most = max(self.most, activations)
        lanes = len(self.held)
        if earlier is None:
            self.free = available_memory(self.run.device)  # read once: it changes slowly, and reading takes time
        free = self.free
        if earlier is None:
            log.info("sequential recalibration will hold about %s on %s: %d batch(es) (%s) and their paused "
                     "forwards (%s each at the first layer)%s", byte_size(self.batches + activations * lanes),
                     self.run.device, lanes, byte_size(self.batches), byte_size(activations),
                     f"; {byte_size(free)} free" if free is not None else "",
                     extra={"normswap_memory_estimate": self.batches + activations * lanes})
        more = (activations - (earlier or 0)) * (lanes - 1)  # what the other batches add to get here
        if free is not None and more > free:
            fits = max(1, int(free // max(activations, 1)))
            raise CalibrationError(
                f"sequential recalibration would hold about {byte_size(self.batches + activations * lanes)} ({lanes} "
                f"batches and {byte_size(activations)} of activations each, paused at a layer), more than the "
                f"{byte_size(free)} free on {self.run.device}: calibrate on fewer batches (batches="
                f"{min(fits, lanes - 1)} or so) or use method='exact', which holds one batch at a time")

    @property
    def held_most(self) -> int:
        """The largest estimate over the stops the first batch reached: the batches and every paused forward."""
        return self.batches + self.most * len(self.held)

    def stop(self) -> None:
        if self.activations is not None and self.watching:
            log.debug("sequential recalibration held about %s at most", byte_size(self.held_most),
                      extra={"normswap_memory_held": self.held_most})
        self.watching = False


_OWN_CODE = str(Path(__file__).resolve().parents[1])
"""Where normswap's own code lives: its frames on a lane's stack hold the batch and bookkeeping, no activations."""
_MODULE_CALL = nn.Module.__call__.__code__.co_filename
"""The file of ``nn.Module.__call__``: its two frames around every module call hold that call's arguments, which
the caller's frame holds too."""


def _held_by_frames() -> list[torch.Tensor]:
    """The tensors the local variables of the caller's function frames hold, except in normswap's own frames and those
    of ``nn.Module.__call__``: in a lane (whose frames end where its forward began), what its paused forward keeps
    alive. (Before Python 3.13 reading a frame's variables leaves a copy of them on the frame until the next read or the
    frame's end, so a tensor the model drops between two stops of the first batch lives until the next one.)"""
    found: list[torch.Tensor] = []
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_flags & inspect.CO_OPTIMIZED and code.co_filename != _MODULE_CALL \
                and not code.co_filename.startswith(_OWN_CODE):
            for value in frame.f_locals.values():
                if isinstance(value, torch.Tensor):
                    found.append(value)
                elif isinstance(value, (tuple, list, dict)):  # (modules and other objects are not looked into)
                    found += output_tensors(value)
        frame = frame.f_back
    return found


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes free for new tensors on ``device``: CUDA's ``mem_get_info``; on the CPU MemAvailable from
    ``/proc/meminfo`` (or psutil's figure where there is no such file); ``None`` where neither says.

    >>> available_memory(torch.device("cpu")) is None or available_memory(torch.device("cpu")) > 0
    True
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _nbytes(value: Any, *, elsewhere: Optional[torch.device] = None) -> int:
    """The bytes of the tensors of a model input, each storage counted once (only those not yet on ``elsewhere``,
    if given)."""
    storages = {}
    for tensor in output_tensors(value):
        if elsewhere is not None and tensor.device == elsewhere:
            continue
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage.nbytes())
    return sum(storages.values())
