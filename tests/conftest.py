"""Test session settings and shared fixtures.

One intra-op thread: on a shared 2-core machine two threads made forward passes many times slower. ultralytics,
which some tests import, would otherwise try to pip-install packages it misses (it patches ``PIL.Image.open`` and
installs an image plugin when a file cannot be read) and to reach the network: both are switched off.
"""

import os

os.environ.setdefault("YOLO_AUTOINSTALL", "False")
os.environ.setdefault("YOLO_OFFLINE", "True")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
