"""Running an operation across the processes of ``torch.distributed``: whether to, where the collectives' tensors
live, and failing together.

Every operation that can run across processes (:func:`~normswap.recalibrate.recalibrate`,
:func:`~normswap.refine.refine`) takes ``distributed=`` and ``process_group=`` and decides the same way
(:class:`Ranks`):

- ``distributed=True``: across the group (``torch.distributed`` must be initialized); ``False``: this process alone,
  with no collective at all, even when ``torch.distributed`` is initialized (an operation run on rank 0 only);
  ``None`` (the default): across the group when it has more than one process. ``process_group``: the group (default:
  the whole world); every process of it must then call the operation.
- The collectives' tensors live on the CPU for gloo; for NCCL on the operation's own GPU, else the GPU
  ``LOCAL_RANK`` names (set by ``torchrun``), never blindly on the current device (:func:`collective_device`).
- A block run under :meth:`Ranks.failing_together` tells the other processes whether it failed: a process that
  fails — an error, a failing data loader, Ctrl-C or SIGTERM alike (any ``BaseException``) — reports so at the
  block's end instead of leaving the others waiting in their next collective until its timeout, and the others
  raise :class:`PeerFailure` naming it. A process that is gone altogether (killed, or ended) is a
  :class:`PeerFailure` too, at the next collective, instead of the backend's own error.

Example::

    >>> ranks = Ranks(distributed=None)          # torch.distributed not initialized: this process alone
    >>> ranks.active, ranks.size, ranks.rank, ranks.sum([1.0, 2.0])
    (False, 1, 0, [1.0, 2.0])
    >>> with ranks.failing_together("reading the data"):
    ...     pass
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from .errors import NormswapError

__all__ = ["FAILED", "OK", "PeerFailure", "Ranks", "collective_device"]

log = logging.getLogger("normswap")

OK, FAILED = 0, 1
"""The status a process reports at the end of a :meth:`Ranks.failing_together` block."""


class PeerFailure(NormswapError):
    """Another process failed; it raises its own error."""


def collective_device(backend: str, run_device: torch.device,
                      environ: Mapping[str, str] = os.environ) -> torch.device:
    """Where a collective's tensors live: the CPU for gloo; for NCCL the operation's device if it is a GPU, else the
    GPU ``LOCAL_RANK`` names (set by ``torchrun``), else the current CUDA device.

    >>> collective_device("nccl", torch.device("cpu"), {"LOCAL_RANK": "3"})
    device(type='cuda', index=3)
    >>> collective_device("gloo", torch.device("cuda", 1))
    device(type='cpu')
    """
    if "nccl" not in backend:
        return torch.device("cpu")
    if run_device.type == "cuda":
        return run_device
    if "LOCAL_RANK" in environ:
        return torch.device("cuda", int(environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device())


class Ranks:
    """The processes running one operation together (a ``torch.distributed`` group), or just this one.

    ``active`` says whether collectives run; ``size`` and ``rank`` are the group's (1 and 0 when inactive);
    ``device`` is where the collectives' tensors live. ``operation`` names the operation in messages
    (``"recalibration failed on rank 1 (see its error)"``), ``error`` is the :class:`NormswapError` subclass raised
    for a wrong ``distributed=`` or ``process_group=``, and subclasses set :attr:`peer_failure` to their own
    :class:`PeerFailure`.
    """

    peer_failure: type[PeerFailure] = PeerFailure

    def __init__(self, distributed: Optional[bool] = None, process_group: Any = None,
                 device: torch.device = torch.device("cpu"), *, operation: str = "the operation",
                 error: type[NormswapError] = NormswapError) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        if distributed not in (None, True, False):
            raise error(f"distributed must be True, False or None, got {distributed!r}")
        if distributed and not initialized:
            raise error("distributed=True needs torch.distributed initialized (dist.init_process_group)")
        if process_group is not None and not initialized:
            raise error("process_group= needs torch.distributed initialized (dist.init_process_group)")
        self.operation = operation
        self.group = process_group
        self.active = initialized and distributed is not False and (
            bool(distributed) or dist.get_world_size(process_group) > 1)
        if self.active and dist.get_rank(process_group) < 0:
            raise error("this process is not a member of process_group: call the operation on the group's "
                        "processes only, or pass distributed=False")
        self.size = dist.get_world_size(process_group) if self.active else 1
        self.rank = dist.get_rank(process_group) if self.active else 0
        self.device = collective_device(str(dist.get_backend(process_group)), device) if self.active else device
        self.failed = False

    def all_gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every process's ``values`` (one row per rank, float64, on the CPU); ``values`` itself when inactive."""
        flat = values.to(self.device, torch.float64).flatten()
        if not self.active:
            return flat.unsqueeze(0).cpu()
        gathered = [torch.empty_like(flat) for _ in range(self.size)]
        try:
            dist.all_gather(gathered, flat, group=self.group)
        except RuntimeError as exc:  # the backend's errors (DistBackendError...): a process has gone
            reason = _first_sentence(exc)
            raise self.peer_failure(f"{self.operation} lost the other processes ({reason}): one of them has "
                                    "stopped (see its error)") from exc
        return torch.stack(gathered).cpu()

    def gather(self, value: float) -> list[float]:
        """One number from every process, in rank order.

        >>> Ranks().gather(3)
        [3.0]
        """
        return self.all_gather(torch.tensor([float(value)]))[:, 0].tolist()

    def sum(self, values: list[float]) -> list[float]:
        """``values`` summed over the processes (in float64)."""
        if not self.active:
            return values
        return self.all_gather(torch.tensor([float(v) for v in values], dtype=torch.float64)).sum(0).tolist()

    def failure(self, rank: int, what: str = "") -> PeerFailure:
        """The error that process ``rank`` failed (while doing ``what``)."""
        doing = f" while {what}" if what else ""
        return self.peer_failure(f"{self.operation} failed on rank {rank}{doing} (see its error)")

    @contextlib.contextmanager
    def failing_together(self, what: str = "") -> Iterator[None]:
        """Run the block; across processes, tell the others at its end whether it failed (any ``BaseException``:
        Ctrl-C and SIGTERM too), so that a failure on one process is an error on each of them instead of a wait
        for it. The failing process raises its own error; the others raise :meth:`failure` naming it.

        Blocks nest: an outer block around a whole run catches a failure between its inner blocks (an interrupt
        in an optimizer step), which the others then hear of at their next inner block's end. A failure is told
        once (:attr:`failed`): after it, no process waits for another."""
        try:
            yield
        except BaseException:
            if self.active and not self.failed:
                self.failed = True
                try:
                    self.gather(FAILED)
                except Exception as exc:  # the others may be gone already: this process's own error matters
                    log.debug("could not tell the other processes of the failure: %s", exc)
            raise
        if self.active:
            statuses = self.gather(OK)
            failing = [rank for rank, status in enumerate(statuses) if status != OK]
            if failing:
                self.failed = True
                raise self.failure(failing[0], what)


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of a backend's error, without the source location gloo and NCCL put first.

    >>> _first_sentence(RuntimeError("[gloo/pair.cc:561] Connection closed by peer [::1]:80. This is typically..."))
    'Connection closed by peer [::1]:80'
    """
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())
    return re.split(r"\.(\s|$)", text.splitlines()[0] if text else "", maxsplit=1)[0] or type(exc).__name__
