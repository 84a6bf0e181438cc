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


@pytest.fixture(scope="module")
def digits():
    """scikit-learn's digits, split as the demo model was trained (see :func:`normswap.demo.digits_data`)."""
    from normswap.demo import digits_data

    return digits_data()


@pytest.fixture(scope="module")
def demo_model():
    """The bundled demo model, trained on ``digits``."""
    from normswap.demo import load_demo_model

    return load_demo_model()


@pytest.fixture(autouse=True)
def exact_float32_on_gpus():
    """Tests compare GPU results with CPU ones at float32 tolerances: TensorFloat-32, on by default for convolutions
    on Ampere and newer, would round them to 10 bits. (A no-op without CUDA.)"""
    if not torch.cuda.is_available():
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
