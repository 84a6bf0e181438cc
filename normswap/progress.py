"""Progress bars: one policy for every operation that iterates over data.

A bar is shown on standard error when it is a terminal and the work lasts more than a moment (``progress=None``,
the default), always (``True``) or never (``False``); under several processes only rank 0 shows one. Piped
output gets none: tqdm disables itself when standard error is not a terminal and ``disable`` is ``None``.

>>> with progress_bar(3, "demo", "step", progress=False) as bar:
...     for _ in range(3):
...         bar.update()
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from tqdm.auto import tqdm

DELAY_S = 2.0
"""With ``progress=None``, a bar appears only once the work has lasted this long."""


def process_rank() -> int:
    """This process's rank: ``torch.distributed``'s once it is initialized, else ``RANK`` (set by torchrun), else 0.
    Read without importing torch."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def progress_bar(total: Optional[int], desc: str, unit: str, *, progress: Optional[bool],
                 rank: Optional[int] = None) -> tqdm:
    """A tqdm bar following normswap's policy (module docstring); use it as a context manager. ``rank``: the
    caller's rank among the processes of its work, by default :func:`process_rank`."""
    if rank is None:
        rank = process_rank()
    if progress is None:
        options = {"disable": None if rank == 0 else True, "delay": DELAY_S}
    else:
        options = {"disable": not progress or rank != 0}
    return tqdm(total=total, desc=desc, unit=unit, **options)
