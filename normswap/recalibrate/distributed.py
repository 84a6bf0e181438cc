"""Calibrating across processes: every rank calibrates on its own shard; statistics are gathered and merged in rank
order, and the sequential method's ranks agree, step by step, on which layer to settle next.

The decision to run across processes, the collective device and failing together are :mod:`normswap.distributed`'s;
what is calibration-specific is here. Every collective carries a status, so that a rank that fails — an error, a
failing data loader, Ctrl-C or SIGTERM alike — (or finds that it must start again) tells the others at their next
collective instead of leaving them waiting: they raise too, naming the rank.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .. import distributed as runtime
from ..distributed import FAILED, OK, collective_device
from ..errors import CalibrationError
from ..lockstep import Revisited
from .statistics import Layer

__all__ = ["FAILED", "OK", "REVISITED", "PeerFailure", "PeerRevisited", "Ranks", "collective_device"]

REVISITED = 2
"""The status of a rank whose sequential run must start again (a layer called more often than expected)."""


class PeerFailure(CalibrationError, runtime.PeerFailure):
    """Another rank failed; it raises its own error."""


class PeerRevisited(Revisited):
    """Another rank found a layer called more often than expected: every rank starts again."""


class Ranks(runtime.Ranks):
    """The processes sharing the calibration (``torch.distributed``, a ``process_group`` of it), or just this one.

    ``distributed``: ``True`` to calibrate across the group (``torch.distributed`` must be initialized), ``False``
    to calibrate this process's data alone, ``None`` for across the group when it has more than one process.
    """

    peer_failure = PeerFailure

    def __init__(self, distributed: Optional[bool] = None, process_group: Any = None,
                 device: torch.device = torch.device("cpu")) -> None:
        super().__init__(distributed, process_group, device, operation="recalibration", error=CalibrationError)
        self._first_step: dict[int, int] = {}
        self._step = 0

    def merge(self, layers: list[Layer], totals: list[int], *, failed: bool = False, quiet: bool = False) -> list[int]:
        """All-gather every layer's float64 ``(count, mean, M2)`` and merge them in rank order, so that every rank
        ends with the same statistics, those of all ranks' data; returns ``totals`` summed over ranks. A rank that
        failed says so (``failed=True``), and the others raise too instead of waiting for it forever; ``quiet``
        suppresses that error on the failing rank, which raises its own."""
        if not self.active:
            return totals
        parts = [torch.tensor([float(failed)] + [float(t) for t in totals], dtype=torch.float64)]
        for layer in layers:
            moments = layer.moments
            parts += [torch.tensor([float(moments.count)], dtype=torch.float64), moments.mean.cpu(), moments.m2.cpu()]
        table = self.all_gather(torch.cat(parts))
        failing = [rank for rank in range(self.size) if table[rank, 0].item()]
        if failing:
            if quiet:
                return totals
            raise self.failure(failing[0])
        summed = [int(round(value)) for value in table[:, 1:1 + len(totals)].sum(0).tolist()]
        offset = 1 + len(totals)
        for layer in layers:
            channels = layer.moments.mean.numel()
            place = layer.moments.mean.device
            layer.reset(place)
            for rank in range(self.size):
                count = int(table[rank, offset].item())
                mean = table[rank, offset + 1:offset + 1 + channels].to(place)
                m2 = table[rank, offset + 1 + channels:offset + 1 + 2 * channels].to(place)
                layer.moments.add(count, mean, m2)
            offset += 1 + 2 * channels
        return summed

    def choose(self, paused: dict[int, int], stops: int, *, status: int = OK) -> Optional[int]:
        """The stop every rank settles next: of the stops where any rank has a lane paused, the one first seen
        paused (ties: the lowest number); ``None`` when no rank has a paused lane. Raises :class:`PeerFailure` or
        :class:`PeerRevisited` when a rank reports that ``status`` (the reporting rank gets ``None`` back)."""
        if not self.active:
            return min(paused, key=lambda stop: (paused[stop], stop)) if paused else None
        mask = torch.zeros(1 + stops, dtype=torch.float64)
        mask[0] = status
        for stop in paused:
            mask[1 + stop] = 1.0
        table = self.all_gather(mask)
        statuses = table[:, 0].tolist()
        if status != OK:
            return None
        if FAILED in statuses:
            raise self.failure(statuses.index(FAILED))
        if REVISITED in statuses:
            raise PeerRevisited(-1, -1)
        waiting = [stop for stop in range(stops) if table[:, 1 + stop].any()]
        for stop in waiting:
            self._first_step.setdefault(stop, self._step)
        self._step += 1
        return min(waiting, key=lambda stop: (self._first_step[stop], stop)) if waiting else None

    def start_over(self) -> None:
        """Forget the order of a sequential run that is started again."""
        self._first_step.clear()
        self._step = 0

    def most_calls(self, calls: dict[int, int], stops: int) -> dict[int, int]:
        """The largest call count of each stop over all ranks."""
        if not self.active:
            return calls
        counts = torch.tensor([float(calls.get(stop, 0)) for stop in range(stops)], dtype=torch.float64)
        table = self.all_gather(counts)
        return {stop: int(count) for stop, count in enumerate(table.max(0).values.tolist()) if count > 0}
