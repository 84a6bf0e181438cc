"""Benchmark: eval forward time of a folded timm resnet50 against the same model with its BatchNorm layers, on CPU.

Both models are timed in the same run, interleaved round by round (so load from other processes hits both alike),
with a fixed intra-op thread count (2 by default, printed). The figure is the ratio of medians; the target is a
folded model at most 0.85x the BatchNorm model's time. The folded model's output is checked against the original's.

Usage::

    python benchmarks/bench_fold.py [--threads 2] [--batch 4] [--size 224] [--rounds 15] [--channels-last]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from torch import nn

from normswap.fold import plan_fold


def time_forward(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds for one eval forward pass."""
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--channels-last", action="store_true", help="run both models and the input channels-last")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = timm.create_model(args.model, pretrained=False).eval()
    folded = copy.deepcopy(original)
    p = plan_fold(folded)
    folded = p.apply(folded)
    x = torch.randn(args.batch, 3, args.size, args.size)
    if args.channels_last:
        original, folded = (m.to(memory_format=torch.channels_last) for m in (original, folded))
        x = x.contiguous(memory_format=torch.channels_last)

    with torch.inference_mode():
        expected, out = original(x), folded(x)
    error = float((out - expected).abs().max() / expected.abs().max())

    for _ in range(2):
        time_forward(original, x)
        time_forward(folded, x)
    times_bn, times_folded = [], []
    for _ in range(args.rounds):
        times_bn.append(time_forward(original, x))
        times_folded.append(time_forward(folded, x))
    median_bn, median_folded = statistics.median(times_bn), statistics.median(times_folded)

    print(f"{args.model}, CPU, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"input {args.batch}x3x{args.size}x{args.size}" + (" channels-last" if args.channels_last else "")
          + f", {args.rounds} interleaved rounds after 2 warm-up")
    print(f"folded {len(p)} BatchNorm layer(s), left {len(p.left)}; max output difference {error:.2e} (relative)")
    print(f"BatchNorm model eval forward: median {median_bn * 1000:.1f} ms")
    print(f"folded model eval forward:    median {median_folded * 1000:.1f} ms")
    print(f"ratio folded / BatchNorm: {median_folded / median_bn:.3f}x (target <= 0.85x)")


if __name__ == "__main__":
    main()
