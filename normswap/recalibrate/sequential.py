"""The sequential method: eval-consistent statistics, each layer measured in eval mode with the layers before it
already calibrated, for the cost of one forward per batch.

Every batch's eval forward runs once, in step with the others (:class:`normswap.lockstep.Lockstep`): each forward
pauses before every calibrated layer; when all have paused (or finished), the layer reached first gets the
statistics of the inputs that arrived there, merged over all batches (and ranks), and only then do those forwards
go on, now normalizing with the new statistics. A layer called several times per forward is measured at every
call, each run with its old statistics, and gets its new ones after the last call; that is found when a forward
reaches a layer a second time: a forward of the first batch counts the calls and the calibration starts again
(:func:`normswap.lockstep.run_counting_calls`).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from torch import nn

from ..data import batch_size_of, call_model, model_failures
from ..errors import CalibrationError
from ..lockstep import Arrival, Lockstep, Revisited, count_calls, run_counting_calls
from ..placement import Placement
from ..progress import progress_bar
from .distributed import FAILED, REVISITED, PeerFailure, PeerRevisited, Ranks
from .statistics import Layer, add_input_statistics, check_finite, final_statistics, use_scratch_statistics


def calibrate_sequential(model: nn.Module, layers: list[Layer], inputs: Iterator[tuple[int, Any]], run: Placement,
                         ranks: Ranks, progress: Optional[bool]) -> tuple[list[int], list[Layer], int, float]:
    """Eval-consistent calibration; returns the totals (batches, samples), the layers in the order they were
    calibrated, the passes (one per layer and call) and their cost in forwards over the data."""
    try:
        held = [(index, run.move(model_input)) for index, model_input in inputs]
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

    def measure(stop: int, arrival: Arrival, call: int) -> None:
        add_input_statistics(layers[stop], arrival.args[0])

    with progress_bar(len(layers), "recalibrate", "layer", progress=progress, rank=ranks.rank) as bar:
        def settle(stop: int, arrivals: list[Arrival], final: bool) -> None:
            passes[0] += 1
            if not final:
                return
            layer = layers[stop]
            ranks.merge([layer], [0])
            check_finite([layer])
            for calibrated, (mean, var) in final_statistics([layer]).items():
                calibrated.module.running_mean.copy_(mean)
                calibrated.module.running_var.copy_(var)
            order.append(layer)
            bar.update()

        lockstep = Lockstep([lambda index=index, x=x: lane(index, x) for index, x in held],
                            {layer.module: stop for stop, layer in enumerate(layers)}, calls=calls,
                            context=run.context, on_arrive=measure,
                            choose=lambda paused: ranks.choose(paused, len(layers)))
        try:
            lockstep.run(settle)
        except (PeerFailure, PeerRevisited):
            raise
        except Revisited:
            ranks.choose({}, len(layers), status=REVISITED)
            raise
        except BaseException:
            ranks.choose({}, len(layers), status=FAILED)
            raise
    return order, passes[0]


def _count_calls(model: nn.Module, layers: list[Layer], held: list[tuple[int, Any]], run: Placement) -> dict[int, int]:
    """How many times each layer is called in a forward of the first batch."""
    if not held:
        return {}
    index, model_input = held[0]
    with run.context(), model_failures(index, model_input):
        return count_calls(model, model_input, [layer.module for layer in layers])
