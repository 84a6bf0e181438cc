"""The bundled example: a small BatchNorm ResNet trained on scikit-learn's digits, and the demo that runs on it.

:class:`DigitsResNet` is the architecture (rebuildable by import path ``normswap.demo:DigitsResNet``),
:func:`digits_data` the fixed train/test split of ``sklearn.datasets.load_digits`` it was trained on (by
``scripts/train_demo_model.py``), :func:`load_demo_model` the trained model shipped in ``normswap/assets``, and
:func:`run_demo` the whole story of normswap told on it as a table: GroupNorm with copied, reset and fitted affine
weights, the fitted model refined without labels, freezing, folding, a domain shift and recalibration.

Example::

    >>> from normswap.demo import digits_data, load_demo_model, accuracy
    >>> data = digits_data()
    >>> model = load_demo_model()
    >>> accuracy(model, data.test_images, data.test_labels) > 0.97
    True
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .api import convert, freeze
from .checkpoint import load
from .compare import ComparisonReport, compare
from .errors import NormswapError
from .fit import fit_report
from .fold import fold
from .recalibrate import recalibrate
from .refine import refine, refine_report
from .tables import text_table

__all__ = [
    "CHECKPOINT",
    "DemoResult",
    "DemoRow",
    "DigitsData",
    "DigitsResNet",
    "accuracy",
    "agreement",
    "digits_data",
    "load_demo_model",
    "run_demo",
    "shift_domain",
]

CHECKPOINT = Path(__file__).parent / "assets" / "digits_resnet.safetensors"
"""The trained demo model's weights, shipped with the package."""

ARCH = "normswap.demo:DigitsResNet"
"""Import path of the demo architecture."""

TEST_FRACTION = 0.25
SPLIT_SEED = 0


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1 projection) shortcut, as in torchvision."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class DigitsResNet(nn.Module):
    """A three-stage ResNet for 1x8x8 images (about 56k parameters, 9 BatchNorm layers).

    >>> DigitsResNet()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 48)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = BasicBlock(widths[0], widths[0])
        self.layer2 = BasicBlock(widths[0], widths[1], stride=2)
        self.layer3 = BasicBlock(widths[1], widths[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass
class DigitsData:
    """The fixed split of scikit-learn's digits: images ``(N, 1, 8, 8)`` in [0, 1], labels ``(N,)``."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def digits_data() -> DigitsData:
    """Scikit-learn's 1797 digits, split 75/25 by a fixed permutation (the split the demo model was trained on).

    >>> data = digits_data()
    >>> data.train_images.shape, data.test_images.shape
    (torch.Size([1348, 1, 8, 8]), torch.Size([449, 1, 8, 8]))
    """
    try:
        import numpy as np
        from sklearn.datasets import load_digits
    except ImportError:
        raise NormswapError("the demo needs scikit-learn: pip install 'normswap[demo]'") from None
    digits = load_digits()
    order = np.random.RandomState(SPLIT_SEED).permutation(len(digits.target))
    images = torch.tensor(digits.images[order] / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target[order], dtype=torch.int64)
    n_test = round(len(labels) * TEST_FRACTION)
    return DigitsData(images[n_test:], labels[n_test:], images[:n_test], labels[:n_test])


def load_demo_model() -> DigitsResNet:
    """The trained demo model, in eval mode, remembering its architecture (``normswap.demo:DigitsResNet``).

    >>> type(load_demo_model()).__name__
    'DigitsResNet'
    """
    return load(CHECKPOINT).eval()


def shift_domain(images: torch.Tensor, contrast: float = 0.4, brightness: float = 0.5) -> torch.Tensor:
    """The demo's domain shift: lower contrast and a brighter background (``images * contrast + brightness``)."""
    return images * contrast + brightness


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` that ``model`` (run in eval mode) classifies as ``labels``."""
    return compare(model, model, [(images, labels)], layers=False).accuracy_a


def agreement(model: nn.Module, reference: nn.Module, images: torch.Tensor) -> float:
    """Fraction of ``images`` on which ``model`` and ``reference`` (run in eval mode) predict the same class."""
    return compare(reference, model, [images], layers=False).top1_agreement


@dataclass
class DemoRow:
    """One line of the demo table: a model variant, its agreement with the original and accuracy, and a detail."""

    step: str
    agreement: Optional[float]
    accuracy: float
    detail: str = ""


@dataclass
class DemoResult:
    """The demo's table (``str(result)``) and its numbers, row by row, with the time the demo took."""

    rows: list[DemoRow] = field(default_factory=list)
    seconds: float = 0.0

    def row(self, step: str) -> DemoRow:
        """The row whose step starts with ``step``."""
        return next(row for row in self.rows if row.step.startswith(step))

    def __str__(self) -> str:
        header = ("model", "agreement", "accuracy", "")
        lines = [
            (row.step, "-" if row.agreement is None else f"{row.agreement:.1%}", f"{row.accuracy:.1%}", row.detail)
            for row in self.rows
        ]
        out = ["normswap demo: a small BatchNorm ResNet trained on scikit-learn's digits "
               "(agreement: top-1 agreement with the original model on the test images)"]
        out.append(text_table(header, lines))
        out.append(f"({self.seconds:.1f} s)")
        return "\n".join(out)


def run_demo(
    *,
    groups: int = 8,
    calibration_images: int = 64,
    refine_steps: int = 200,
    echo: Optional[Callable[[str], None]] = print,
) -> DemoResult:
    """Tell normswap's story on the bundled digits model, as a table; takes a few seconds on one CPU thread.

    Rows: the original BatchNorm model; GroupNorm with the BatchNorm affine copied, reset, and fitted on
    ``calibration_images`` training images; the fitted model refined for up to ``refine_steps`` steps to reproduce
    the original on all training images, unlabeled (:func:`normswap.refine.refine`); FrozenBatchNorm (exact: max
    abs difference of the logits); BatchNorm folded into the convolutions (exact and faster: max abs difference,
    and the ratio of batch-1 forward times measured in the same run); the original under a domain shift (low
    contrast, bright background), and after recalibrating its statistics on unlabeled shifted training images
    (accuracy only). ``echo`` receives the table (``None``: print nothing).

    >>> result = run_demo(echo=None)
    >>> result.row("GroupNorm, fitted").agreement > 0.85
    True
    """
    start = time.perf_counter()
    data = digits_data()
    original = load_demo_model()
    clean, labels = data.test_images, data.test_labels
    result = DemoResult()

    def add(step: str, model: nn.Module, detail: str = "", images: torch.Tensor = clean) -> ComparisonReport:
        report = compare(original, model, [(images, labels)], layers=False)
        shown = report.top1_agreement if images is clean and model is not original else None
        result.rows.append(DemoRow(step, shown, report.accuracy_b, detail))
        return report

    add("BatchNorm (original)", original, "trained model")
    for affine, how in (("copy", "copied"), ("reset", "reset")):
        add(f"GroupNorm, {how} affine", convert(copy.deepcopy(original), "gn", groups=groups, affine=affine),
            f"G={groups}, no data")
    calibration = data.train_images[:calibration_images].split(16)
    fitted = convert(copy.deepcopy(original), "gn", groups=groups, affine="fit", data=calibration)
    worst = min(layer.r2 for layer in fit_report(fitted).layers if layer.r2 is not None)
    add("GroupNorm, fitted affine", fitted,
        f"G={groups}, fit on {calibration_images} images, worst layer R2 {worst:.2f}")
    refined = refine(copy.deepcopy(fitted), original, data.train_images.split(64), steps=refine_steps, progress=False)
    report = refine_report(refined)
    add("GroupNorm, fitted + refined", refined,
        f"{report.steps} steps on {len(data.train_images)} unlabeled images, {report.seconds:.1f} s")
    frozen = freeze(copy.deepcopy(original))
    exact = compare(original, frozen, [clean], layers=False).max_abs
    add("FrozenBatchNorm", frozen, f"max abs diff {exact:.1e}")
    folded = fold(copy.deepcopy(original))
    exact = compare(original, folded, [clean], layers=False).max_abs
    timings = [(_latency(folded, clean[:32]), _latency(original, clean[:32])) for _ in range(3)]
    ratio = min(t for t, _ in timings) / min(t for _, t in timings)
    add("BatchNorm folded into convs", folded, f"max abs diff {exact:.1e}, batch-1 forward time {ratio:.2f}x")
    shifted = shift_domain(clean)
    add("BatchNorm, shifted domain", original, "test images at low contrast on a bright background", shifted)
    adapted = recalibrate(copy.deepcopy(original), shift_domain(data.train_images[:256]).split(64))
    add("BatchNorm, recalibrated", adapted, "statistics re-estimated on 256 unlabeled shifted images", shifted)
    result.seconds = time.perf_counter() - start
    if echo is not None:
        echo(str(result))
    return result


@torch.no_grad()
def _latency(model: nn.Module, images: torch.Tensor, repeats: int = 7) -> float:
    """Seconds to classify ``images`` one at a time (batch 1, eval mode): the fastest of ``repeats`` timed runs."""
    model.eval()
    singles = list(images.split(1))
    model(singles[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for image in singles:
            model(image)
        best = min(best, time.perf_counter() - start)
    return best
