"""CPU forward time of a frozen-BatchNorm model against the BatchNorm model it came from.

Times a randomly initialised timm ``resnet50`` (batch 8, 224x224, eval mode, no_grad) in four versions: the original
BatchNorm model, normswap's ``freeze``, timm's ``freeze_batch_norm_2d``, and normswap's GroupNorm conversion. The
versions run interleaved (one forward of each per round, in rotating order) so that load on the machine hits them
alike; each figure is the median over the rounds, reported as a ratio to the BatchNorm model's median from the same
run.

Uses 2 intra-op threads (``torch.set_num_threads(2)``), printed with the results.

Usage::

    python benchmarks/bench_frozen_forward.py [--rounds 15] [--batch 8] [--size 224] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import nn

import normswap


def build_versions(model: nn.Module) -> dict[str, nn.Module]:
    """The four versions of ``model`` to time, each its own copy, in eval mode."""
    return {
        "BatchNorm (eval)": model,
        "normswap freeze": normswap.freeze(copy.deepcopy(model)),
        "timm freeze_batch_norm_2d": freeze_batch_norm_2d(copy.deepcopy(model)),
        "normswap GroupNorm (32 groups)": normswap.convert(copy.deepcopy(model), "gn", groups=32),
    }


def time_interleaved(versions: dict[str, nn.Module], x: torch.Tensor, rounds: int, warmup: int) -> dict[str, list]:
    """Seconds per forward of each version: one forward of each per round, the order rotating from round to round
    (so no version always runs first), after ``warmup`` untimed rounds."""
    names = list(versions)
    times: dict[str, list] = {name: [] for name in names}
    with torch.no_grad():
        for index in range(warmup + rounds):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                versions[name](x)
                if index >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (one forward of each version)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    versions = {name: m.eval() for name, m in build_versions(model).items()}
    x = torch.randn(args.batch, 3, args.size, args.size)

    with torch.no_grad():
        reference = model(x)
        for name, version in versions.items():
            if "freeze" in name:
                error = ((version(x) - reference).abs().max() / reference.abs().max()).item()
                print(f"check: {name} output vs BatchNorm eval: max relative difference {error:.1e}")

    times = time_interleaved(versions, x, args.rounds, args.warmup)
    medians = {name: statistics.median(values) for name, values in times.items()}
    baseline = medians["BatchNorm (eval)"]

    print(f"\ntimm resnet50, batch {args.batch}, {args.size}x{args.size}, eval, no_grad, CPU, "
          f"torch.set_num_threads({torch.get_num_threads()}), torch {torch.__version__}, timm {timm.__version__}, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| model | median ms / forward | ratio to BatchNorm eval |")
    print("|---|---:|---:|")
    for name, median in medians.items():
        print(f"| {name} | {median * 1e3:.1f} | {median / baseline:.3f}x |")


if __name__ == "__main__":
    main()
