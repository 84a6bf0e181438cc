"""Benchmark: GroupNorm conversion with copied, reset and fitted affine weights, before and after a short fine-tune.

On the bundled demo model (normswap.demo, a small ResNet trained on scikit-learn's digits) and, with ``--resnet18``,
on a timm resnet18 trained here for a few epochs on the same digits upsampled to 32x32. For each way of setting the
GroupNorm affine weights it prints the top-1 agreement with the original BatchNorm model and the test accuracy, then
the same after fine-tuning each converted model for a few steps (same seed, same batches). Runs on one CPU thread
(set below), so figures are comparable between machines; the demo part takes a few seconds.

Usage::

    python benchmarks/bench_fit.py                 # demo model, G=8
    python benchmarks/bench_fit.py --resnet18      # also timm resnet18 on digits (G=8 and G=32, about 1 minute more)
    python benchmarks/bench_fit.py --sweep         # also: fit agreement against the number of calibration images
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.demo import DigitsData, accuracy, agreement, digits_data, load_demo_model
from normswap.fit import fit_report

THREADS = 1
CALIBRATION_IMAGES = 64
FINE_TUNE_STEPS = 10
FINE_TUNE_BATCH = 64
FINE_TUNE_LR = 3e-4
VARIANTS = ("copy", "reset", "fit global", "fit local", "fit auto")


def convert(model: nn.Module, variant: str, groups: int, calibration: torch.Tensor) -> nn.Module:
    """``model`` converted to GroupNorm with the affine weights set the way ``variant`` names."""
    if variant in ("copy", "reset"):
        return normswap.convert(copy.deepcopy(model), "gn", groups=groups, affine=variant)
    target = variant.split()[1]
    return normswap.convert(copy.deepcopy(model), "gn", groups=groups, affine="fit", target=target,
                            data=calibration.split(16))


def fine_tune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> nn.Module:
    """A few AdamW steps on shuffled training batches, the same batches for every model (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=FINE_TUNE_LR)
    model.train()
    for _ in range(steps):
        batch = torch.randperm(len(labels), generator=generator)[:FINE_TUNE_BATCH]
        loss = F.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def compare_variants(title: str, model: nn.Module, data: DigitsData, groups: int) -> None:
    """Print one table: each variant's agreement and accuracy before and after the fine-tune, and its time."""
    calibration = data.train_images[:CALIBRATION_IMAGES]
    test, labels = data.test_images, data.test_labels
    print(f"\n{title}: original test accuracy {accuracy(model, test, labels):.1%}; GroupNorm G={groups}, "
          f"fit on {CALIBRATION_IMAGES} training images; fine-tune: {FINE_TUNE_STEPS} AdamW steps of "
          f"{FINE_TUNE_BATCH} images, lr {FINE_TUNE_LR:g}")
    forward = _seconds(lambda: model(calibration))
    print(f"{'affine':<11} {'agreement':>9} {'accuracy':>8} | {'tuned agr.':>10} {'tuned acc.':>10} | "
          f"{'convert s':>9} {'x forward':>9} {'output err':>10}")
    for variant in VARIANTS:
        start = time.perf_counter()
        converted = convert(model, variant, groups, calibration)
        seconds = time.perf_counter() - start
        before = agreement(converted, model, test), accuracy(converted, test, labels)
        error = ""
        if variant.startswith("fit"):
            report = fit_report(converted)
            error = f"{report.output_error[report.chosen]:.3f}" + (f" ({report.chosen})" if "auto" in variant else "")
        tuned = fine_tune(converted, data.train_images, data.train_labels, FINE_TUNE_STEPS)
        after = agreement(tuned, model, test), accuracy(tuned, test, labels)
        print(f"{variant:<11} {before[0]:>9.1%} {before[1]:>8.1%} | {after[0]:>10.1%} {after[1]:>10.1%} | "
              f"{seconds:>9.2f} {seconds / forward:>9.0f} {error:>10}")
    print(f"('x forward': conversion time / one forward pass over the {CALIBRATION_IMAGES} calibration images, "
          f"{forward * 1e3:.1f} ms, measured in the same run)")


def sweep_calibration(model: nn.Module, data: DigitsData, groups: int) -> None:
    """Print fit agreement for growing calibration sets (three disjoint sets each where the data allows)."""
    print(f"\ncalibration images vs fitted agreement (demo model, G={groups}, global target)")
    for count in (8, 16, 32, 64, 128, 256):
        scores = []
        for start in range(0, min(3 * count, len(data.train_labels) - count + 1), count):
            calibration = data.train_images[start:start + count]
            converted = convert(model, "fit global", groups, calibration)
            scores.append(agreement(converted, model, data.test_images))
        print(f"{count:>4} images: agreement {' / '.join(f'{s:.1%}' for s in scores)}")


def train_resnet18(data: DigitsData, epochs: int = 6) -> tuple[nn.Module, DigitsData]:
    """A timm resnet18 (random init, 1 input channel) trained on the digits upsampled to 32x32."""
    import timm

    def upsample(images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images, size=32, mode="bilinear", align_corners=False)

    large = DigitsData(upsample(data.train_images), data.train_labels, upsample(data.test_images), data.test_labels)
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=1)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * -(-len(large.train_labels) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(large.train_labels), generator=generator).split(64):
            loss = F.cross_entropy(model(large.train_images[batch]), large.train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval(), large


def _seconds(run: Callable[[], object], repeats: int = 5) -> float:
    with torch.no_grad():
        run()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resnet18", action="store_true", help="also train and convert a timm resnet18 on digits")
    parser.add_argument("--sweep", action="store_true", help="also sweep the number of calibration images")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, {THREADS} CPU thread")
    data = digits_data()
    demo = load_demo_model()
    compare_variants("demo model (normswap.demo.DigitsResNet)", demo, data, groups=8)
    if args.sweep:
        sweep_calibration(demo, data, groups=8)
    if args.resnet18:
        start = time.perf_counter()
        resnet, large = train_resnet18(data)
        print(f"\n(resnet18 trained in {time.perf_counter() - start:.0f} s)")
        for groups in (8, 32):
            compare_variants("timm resnet18 on digits at 32x32", resnet, large, groups=groups)


if __name__ == "__main__":
    main()
