"""GPU benchmark: recalibration throughput, frozen / GroupNorm / folded forward time, each against a baseline timed
in the same run, on one CUDA device.

- recalibration (exact) of a resnet50 at batch 64, 224², in float32, under bfloat16 autocast and in channels-last
  layout, against a plain no-grad eval forward over the same batches in the same setting;
- the forward of a frozen, a GroupNorm (32 groups) and a folded resnet50 against the BatchNorm eval forward.

Timings are medians of interleaved rounds, each synchronised. TF32 is left as PyTorch sets it (the benchmark states
it). Run: ``python benchmarks/bench_gpu.py`` (``--rounds``, ``--batch``, ``--batches``); without CUDA it says so
and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Callable

import torch


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _interleaved(cases: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> dict[str, float]:
    for fn in cases.values():  # warm-up: cuDNN autotuning, allocator
        _timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _table(title: str, results: dict[str, float], baseline: str, unit: str = "ms") -> str:
    base = results[baseline]
    lines = [title, f"| case | median {unit} | ratio to {baseline} |", "|---|---:|---:|"]
    for name, seconds in results.items():
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.3f}x |")
    return "\n".join(lines)


def bench_recalibration(device: torch.device, rounds: int, batch: int, batches: int) -> str:
    import timm

    import normswap

    model = timm.create_model("resnet50").to(device).eval()
    data = [torch.randn(batch, 3, 224, 224, device=device) for _ in range(batches)]
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    data_last = [x.contiguous(memory_format=torch.channels_last) for x in data]

    def forward(net: torch.nn.Module, xs: list[torch.Tensor], amp: bool = False) -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            for x in xs:
                net(x)

    cases = {
        "eval forward, fp32": lambda: forward(model, data),
        "recalibrate exact, fp32": lambda: normswap.recalibrate(model, data, progress=False),
        "eval forward, bf16 autocast": lambda: forward(model, data, amp=True),
        "recalibrate exact, bf16 autocast": lambda: normswap.recalibrate(model, data, amp=True, progress=False),
        "eval forward, channels-last": lambda: forward(last, data_last),
        "recalibrate exact, channels-last": lambda: normswap.recalibrate(
            model, data, channels_last=True, progress=False),
    }
    results = _interleaved(cases, device, rounds)
    lines = [f"recalibration: resnet50, {batches} batches of {batch}x3x224x224"]
    for setting in ("fp32", "bf16 autocast", "channels-last"):
        plain, recal = results[f"eval forward, {setting}"], results[f"recalibrate exact, {setting}"]
        lines.append(f"| {setting} | eval forward {plain * 1e3:.1f} ms | recalibrate {recal * 1e3:.1f} ms | "
                     f"throughput vs forward {plain / recal:.3f}x |")
    return "\n".join(lines)


def bench_forward(device: torch.device, rounds: int, batch: int) -> str:
    import timm

    import normswap

    torch.manual_seed(0)
    bn = timm.create_model("resnet50").to(device).eval()
    frozen = normswap.freeze(copy.deepcopy(bn)).eval()
    gn = normswap.convert(copy.deepcopy(bn), "gn", groups=32).eval()
    folded = normswap.fold(copy.deepcopy(bn)).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.no_grad():
        reference = bn(x)
        error = ((folded(x) - reference).norm() / reference.norm()).item()

    def run(net: torch.nn.Module) -> Callable[[], object]:
        def forward() -> None:
            with torch.no_grad():
                net(x)

        return forward

    results = _interleaved({"BatchNorm eval": run(bn), "normswap freeze": run(frozen),
                            "GroupNorm (32)": run(gn), "folded": run(folded)}, device, rounds)
    return _table(f"forward: resnet50, batch {batch}x3x224x224 (folded output within {error:.1e} relative)",
                  results, "BatchNorm eval")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device, nothing measured")
        return 0
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, TF32 matmul "
          f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}", flush=True)
    print(bench_recalibration(device, args.rounds, args.batch, args.batches), flush=True)
    print(bench_forward(device, args.rounds, args.batch), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
