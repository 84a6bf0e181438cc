"""How long ``normswap --help`` and ``normswap CMD --help`` take, against the floor of ``python -c "import click"``.

Each is a fresh process (what a user waits for); the rounds are interleaved and the fastest of each is reported,
with its ratio to the floor measured in the same run. Help imports no torch (``tests/test_first_hour.py`` checks
``sys.modules``), so it should cost little more than click itself. Single-threaded work: ``OMP_NUM_THREADS=1``.

Example::

    python benchmarks/bench_help.py --rounds 7
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent


def seconds(command: list[str]) -> float:
    """Wall time of one run of ``command``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run(command, capture_output=True, check=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    args = parser.parse_args()
    cases = {
        'python -c "import click"': [sys.executable, "-c", "import click"],
        "normswap --help": [sys.executable, "-m", "normswap", "--help"],
        "normswap convert --help": [sys.executable, "-m", "normswap", "convert", "--help"],
        "normswap verify --help": [sys.executable, "-m", "normswap", "verify", "--help"],
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, command in cases.items():
            times[name].append(seconds(command))
    floor = min(times['python -c "import click"'])
    print(f"{args.rounds} interleaved rounds, fastest of each, one thread per process")
    print(f"{'case':28s} {'seconds':>8s} {'vs import click':>16s}")
    for name, found in times.items():
        print(f"{name:28s} {min(found):8.3f} {min(found) / floor:15.2f}x")


if __name__ == "__main__":
    main()
