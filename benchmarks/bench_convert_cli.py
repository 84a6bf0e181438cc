"""Benchmark: ``normswap convert`` as a whole process against the floor, in wall time and peak memory.

The floor is the least any tool must do: a process that imports torch, loads the same state dict
(``torch.load(weights_only=True, mmap=True)``) and writes it with safetensors. A second reference adds what normswap
cannot avoid for a timm architecture and a durable write: importing timm (which imports torchvision) and an fsync of
the output. Every process runs with one intra-op thread (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``); the variants
are run interleaved, several times each, and the medians are compared. Peak RSS is each child's own (``wait4``); the
parent imports no torch and builds the checkpoints in child processes, so a forked child starts small.

Cases: a ResNet-50 state dict (``torch.save``, ~100 MB) converted to GroupNorm; and a ~1.1 GB RegNetY-640 state dict
(random values) converted to GroupNorm, whose peak memory shows that the weights are not copied a second time.

    python benchmarks/bench_convert_cli.py [--repeats 5] [--big-repeats 3] [--no-big] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = "1"

FLOOR = """
import sys, torch
from safetensors.torch import save_file
if sys.argv[3] == "timm":
    import timm
state = torch.load(sys.argv[1], weights_only=True, mmap=True)
save_file({k: v.contiguous() for k, v in state.items()}, sys.argv[2])
if sys.argv[3] == "timm":
    import os
    with open(sys.argv[2], "rb+") as f:
        os.fsync(f.fileno())
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS, PYTHONWARNINGS="ignore")
    return env


def measure(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process, which must succeed."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        process = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise SystemExit(f"command failed ({process.returncode}): {' '.join(command)}\n{errors.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def make_resnet50(path: Path) -> None:
    import timm
    import torch

    torch.save(timm.create_model("resnet50").state_dict(), path)


def make_big(path: Path) -> None:
    """A RegNetY-640 state dict with random values (the model is built on the meta device to skip its slow init)."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model("regnety_640")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            state[name] = torch.zeros(tensor.shape, dtype=tensor.dtype)
        elif name.endswith("running_var"):
            state[name] = torch.rand(tensor.shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.02
    torch.save(state, path)


def run_case(title: str, checkpoint: Path, arch: str, workdir: Path, repeats: int) -> None:
    floor_script = workdir / "floor.py"
    floor_script.write_text(FLOOR)
    outputs = {name: workdir / f"out-{name}.safetensors" for name in ("floor", "floor+", "normswap")}
    commands = {
        "floor": [sys.executable, str(floor_script), str(checkpoint), str(outputs["floor"]), "plain"],
        "floor+": [sys.executable, str(floor_script), str(checkpoint), str(outputs["floor+"]), "timm"],
        "normswap": [sys.executable, "-m", "normswap", "convert", str(checkpoint), "--arch", arch, "--to", "gn",
                     "-o", str(outputs["normswap"])],
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    measure(commands["floor"])  # warm the page cache and the bytecode caches; not counted
    for repeat in range(repeats):
        order = list(commands) if repeat % 2 == 0 else list(reversed(commands))
        for name in order:
            for path in outputs.values():
                path.unlink(missing_ok=True)
            results[name].append(measure(commands[name]))
    size = checkpoint.stat().st_size / 1e6
    print(f"\n{title}: {checkpoint.name} ({size:.0f} MB), {repeats} interleaved runs each, medians")
    base_wall = statistics.median(w for w, _ in results["floor"])
    base_rss = statistics.median(r for _, r in results["floor"])
    plus_wall = statistics.median(w for w, _ in results["floor+"])
    plus_rss = statistics.median(r for _, r in results["floor+"])
    print(f"  {'process':<44} {'wall s':>7} {'peak RSS MB':>12} {'vs floor':>16} {'vs floor+':>16}")
    labels = {"floor": "floor: import torch, load, save_file",
              "floor+": "floor+: the same + import timm + fsync",
              "normswap": f"normswap convert --arch {arch} --to gn"}
    for name in commands:
        wall = statistics.median(w for w, _ in results[name])
        rss = statistics.median(r for _, r in results[name])
        print(f"  {labels[name]:<44} {wall:7.2f} {rss:12.0f} "
              f"{wall / base_wall:7.2f}x {rss / base_rss:6.2f}x  {wall / plus_wall:7.2f}x {rss / plus_rss:6.2f}x")
    print("  all runs (wall s, RSS MB): " + "; ".join(
        f"{name} " + ", ".join(f"{w:.2f}/{r:.0f}" for w, r in runs) for name, runs in results.items()))


def import_times(repeats: int) -> None:
    """What the processes pay before any work: interpreter + imports, one thread, medians."""
    print(f"\nimport cost ({repeats} runs each, medians)")
    for label, code in (("python + import torch", "import torch"),
                        ("python + import torch, timm", "import torch, timm"),
                        ("python + import normswap.cli", "import normswap.cli")):
        runs = [measure([sys.executable, "-c", code]) for _ in range(repeats)]
        print(f"  {label:<32} {statistics.median(w for w, _ in runs):6.2f} s "
              f"{statistics.median(r for _, r in runs):8.0f} MB")


def make_checkpoint(kind: str, path: Path) -> None:
    """Write a checkpoint in a child process (the parent stays small: a forked child inherits its memory)."""
    subprocess.run([sys.executable, __file__, "--make", kind, str(path)], env=child_env(), check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--big-repeats", type=int, default=3)
    parser.add_argument("--no-big", action="store_true", help="skip the ~1.1 GB checkpoint")
    parser.add_argument("--workdir", type=Path, help="where checkpoints are written (default: a temporary folder)")
    parser.add_argument("--make", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        kind, path = args.make
        (make_resnet50 if kind == "resnet50" else make_big)(Path(path))
        return
    versions = subprocess.run([sys.executable, "-c", "import torch, timm; print(torch.__version__, timm.__version__)"],
                              env=child_env(), capture_output=True, text=True, check=True).stdout.split()
    print(f"threads: {THREADS} per process (OMP_NUM_THREADS, MKL_NUM_THREADS); torch {versions[0]}, "
          f"timm {versions[1]}; {os.cpu_count()} CPUs")
    workdir = Path(tempfile.mkdtemp(dir=args.workdir))
    try:
        resnet50 = workdir / "resnet50.pt"
        make_checkpoint("resnet50", resnet50)
        import_times(args.repeats)
        run_case("ResNet-50 to GroupNorm", resnet50, "resnet50", workdir, args.repeats)
        if not args.no_big:
            big = workdir / "regnety_640.pt"
            make_checkpoint("big", big)
            run_case("RegNetY-640 to GroupNorm", big, "regnety_640", workdir, args.big_repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
