"""Safe under torch.distributed: a failure or an interruption on one rank releases the others within seconds, every
rank keeps its old statistics, and collectives run only when asked for.

Two CPU processes (gloo, loopback) are forked from the test process; each writes what it saw to a file.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from normswap.errors import CalibrationError
from normswap.recalibrate import recalibrate
from normswap.distributed import collective_device

from .helpers import FORKED_RANKS, run_ranks
from .test_recalibrate_distributed import make_model, running_statistics, shard

pytestmark = FORKED_RANKS

WORLD = 2
LIMIT_S = 30


class Loader:
    """A rank's shard that fails (``error``) or is interrupted (``KeyboardInterrupt``, as Ctrl-C raises it) when it
    reaches batch ``at``."""

    def __init__(self, batches, at=None, error=None):
        self.batches, self.at, self.error = batches, at, error

    def __iter__(self):
        for index, batch in enumerate(self.batches * 3):
            if index == self.at:
                raise self.error
            yield batch


def _worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    results = {}
    try:
        cases = {
            "loader fails": {0: Loader(shard(0), at=3, error=OSError("shard 0 is corrupt"))},
            "interrupted": {1: Loader(shard(1), at=2, error=KeyboardInterrupt())},
        }
        for case, loaders in cases.items():
            for method in ("exact", "sequential"):
                model = make_model()
                before = running_statistics(model)
                started = time.monotonic()
                try:
                    recalibrate(model, loaders.get(rank, Loader(shard(rank))), method=method, progress=False)
                    outcome = "finished"
                except CalibrationError as exc:
                    outcome = str(exc)
                except KeyboardInterrupt:
                    outcome = "KeyboardInterrupt"
                unchanged = all(torch.equal(v, before[k]) for k, v in running_statistics(model).items())
                results[(case, method)] = (outcome, unchanged, time.monotonic() - started)
        group = dist.new_group([0, 1])
        model = recalibrate(make_model(), shard(rank), process_group=group, progress=False)
        results["group"] = running_statistics(model)
        if rank == 0:  # the common pattern: calibrate on one rank only, the others wait at a barrier
            alone = recalibrate(make_model(), shard(0), distributed=False, progress=False)
            results["alone"] = running_statistics(alone)
        dist.barrier()
    finally:
        torch.save(results, out / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("safety")
    return run_ranks(_worker, out, WORLD, timeout=8 * LIMIT_S)


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_a_failing_loader_on_one_rank_fails_every_rank_quickly_and_changes_nothing(ranks, method):
    failing, other = ranks[0][("loader fails", method)], ranks[1][("loader fails", method)]
    assert failing[0] == "reading batch 3 failed in the data loader: OSError: shard 0 is corrupt"
    assert other[0] == "recalibration failed on rank 0 (see its error)"
    for outcome, unchanged, seconds in (failing, other):
        assert unchanged and seconds < LIMIT_S


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_an_interrupted_rank_releases_the_others(ranks, method):
    interrupted, other = ranks[1][("interrupted", method)], ranks[0][("interrupted", method)]
    assert interrupted[0] == "KeyboardInterrupt"
    assert other[0] == "recalibration failed on rank 1 (see its error)"
    for outcome, unchanged, seconds in (interrupted, other):
        assert unchanged and seconds < LIMIT_S


def test_a_process_group_and_a_single_rank_both_work(ranks):
    for key, value in ranks[0]["group"].items():
        assert torch.equal(value, ranks[1]["group"][key]), key
    single = running_statistics(recalibrate(make_model(), shard(0), progress=False))
    for key, value in single.items():
        assert torch.allclose(ranks[0]["alone"][key], value, rtol=1e-6, atol=1e-7), key


def test_nccl_collectives_use_the_rank_s_own_gpu():
    assert collective_device("nccl", torch.device("cuda", 2)) == torch.device("cuda", 2)
    assert collective_device("nccl", torch.device("cpu"), {"LOCAL_RANK": "1"}) == torch.device("cuda", 1)
    assert collective_device("gloo", torch.device("cpu"), {"LOCAL_RANK": "1"}) == torch.device("cpu")


def test_asking_for_distributed_without_it_is_a_clear_error():
    with pytest.raises(CalibrationError, match="distributed=True needs torch.distributed initialized"):
        recalibrate(make_model(), shard(0), distributed=True)


def _nccl_worker(rank: int, port: int, out: Path) -> None:
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:  # no torch.cuda.set_device: the collectives must still run on each rank's own GPU
        model = recalibrate(make_model(), shard(rank), device=f"cuda:{rank}", progress=False)
        torch.save(running_statistics(model), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_ranks_end_with_the_statistics_of_all_the_data(tmp_path):
    first, second = run_ranks(_nccl_worker, tmp_path, WORLD, start_method="spawn")
    single = running_statistics(recalibrate(make_model(), shard(0) + shard(1), progress=False, channels_last=False))
    for key, value in single.items():
        assert torch.equal(first[key], second[key]), key
        torch.testing.assert_close(first[key].cpu(), value, rtol=1e-5, atol=1e-6)
