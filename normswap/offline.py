"""Never the network: the switches that keep the libraries a model or a checkpoint imports offline, for one call.

Building an architecture, importing an import path's package or unpickling a whole saved model runs third-party
code, and some of it reaches for the network on its own: ultralytics checks whether it is online when imported and
pip-installs packages it misses; the Hugging Face libraries look up the hub. :func:`offline` sets the variables of
:data:`OFFLINE_ENVIRONMENT` and the same switches in modules already imported (:data:`OFFLINE_FLAGS`, which those
modules read once, when imported) for the duration of one call, and restores every one of them afterwards, whatever
the user had set. normswap's own builders are offline by their arguments too (``pretrained=False``,
``weights=None``; see :mod:`normswap.arch`).

A module first imported inside the block read the offline environment: the Hugging Face hub's switch is set back
from the restored environment afterwards; ultralytics' online check is left off (setting it back would mean
contacting a host).

>>> import os
>>> before = os.environ.get("HF_HUB_OFFLINE")
>>> with offline():
...     os.environ["HF_HUB_OFFLINE"]
'1'
>>> os.environ.get("HF_HUB_OFFLINE") == before
True
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

__all__ = ["OFFLINE_ENVIRONMENT", "OFFLINE_FLAGS", "offline"]

OFFLINE_ENVIRONMENT = {"YOLO_OFFLINE": "True", "YOLO_AUTOINSTALL": "False", "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1"}
"""Environment variables that keep ultralytics and the Hugging Face libraries off the network."""

OFFLINE_FLAGS = (("ultralytics.utils", "ONLINE", False), ("ultralytics.utils", "AUTOINSTALL", False),
                 ("ultralytics.utils.checks", "ONLINE", False), ("ultralytics.utils.checks", "AUTOINSTALL", False),
                 ("huggingface_hub.constants", "HF_HUB_OFFLINE", True))
"""The same switches in modules already imported: (module, attribute, offline value)."""

_FROM_ENVIRONMENT = {("huggingface_hub.constants", "HF_HUB_OFFLINE"): "HF_HUB_OFFLINE"}
"""Flags that a module first imported inside the block took from the environment, and the variable they read."""


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Within the block, libraries that would contact a host or install packages do not; everything set here is
    restored afterwards (module docstring). Nested blocks are fine."""
    saved_environment = {name: os.environ.get(name) for name in OFFLINE_ENVIRONMENT}
    imported_before = {module for module, _, _ in OFFLINE_FLAGS if module in sys.modules}
    saved_flags = []
    os.environ.update(OFFLINE_ENVIRONMENT)
    try:
        for module_name, attribute, value in OFFLINE_FLAGS:
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attribute):
                saved_flags.append((module, attribute, getattr(module, attribute)))
                setattr(module, attribute, value)
        yield
    finally:
        for module, attribute, value in reversed(saved_flags):
            setattr(module, attribute, value)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for (module_name, attribute), variable in _FROM_ENVIRONMENT.items():
            module = sys.modules.get(module_name)
            if module_name not in imported_before and module is not None and hasattr(module, attribute):
                setattr(module, attribute, _is_true(os.environ.get(variable)))
