"""Never downloading: the environment that keeps the libraries a model or a checkpoint imports offline.

Building an architecture from an import path or unpickling a whole saved model imports third-party code, and some of
it reaches for the network on its own: ultralytics checks whether it is online when imported and pip-installs
packages it misses. :func:`no_downloads` sets the variables that switch this off (:data:`NO_DOWNLOADS`) for the
duration of one call and removes them afterwards, so the process's environment is as it was; a variable the user
set is kept as it is. normswap's own builders are offline by their arguments (``pretrained=False``,
``weights=None``; see :mod:`normswap.arch`), not by the environment.

Such libraries read the variables when they are first imported, so one first imported inside the block keeps its
offline setting for the rest of the process. That is why the Hugging Face hub's switch (:data:`HUB_OFFLINE`) is set
only with ``hub=True``, which the command line does for its own process: from Python, turning the hub off for good
would break the caller's later downloads.

>>> import os
>>> before = os.environ.get("YOLO_AUTOINSTALL")
>>> with no_downloads():
...     os.environ["YOLO_AUTOINSTALL"] if before is None else "False"
'False'
>>> os.environ.get("YOLO_AUTOINSTALL") == before
True
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

__all__ = ["HUB_OFFLINE", "NO_DOWNLOADS", "no_downloads"]

NO_DOWNLOADS = {"YOLO_AUTOINSTALL": "False", "YOLO_OFFLINE": "True"}
"""ultralytics without auto-install and without its online check: set by every :func:`no_downloads` block."""

HUB_OFFLINE = {"HF_HUB_OFFLINE": "1"}
"""The Hugging Face hub offline: set by ``no_downloads(hub=True)`` only (the command line)."""


@contextlib.contextmanager
def no_downloads(*, hub: bool = False) -> Iterator[None]:
    """Within this block, the libraries a model imports stay offline (:data:`NO_DOWNLOADS`, and with ``hub`` also
    :data:`HUB_OFFLINE`); afterwards the variables set here are removed again. Nested blocks are fine: the block
    that set a variable removes it."""
    wanted = {**NO_DOWNLOADS, **(HUB_OFFLINE if hub else {})}
    added = [name for name in wanted if name not in os.environ]
    for name in added:
        os.environ[name] = wanted[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
