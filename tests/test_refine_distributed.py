"""Refinement across processes: two CPU processes (gloo, loopback) each train on their own shard with
DistributedDataParallel and end with the same weights; the holdout of both shards is measured once, together.

The processes are forked from the test process, so they start in a fraction of a second instead of importing torch
again; the results come back through files.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from normswap.errors import NormswapError
from normswap.refine import refine, refine_report

from .helpers import FORKED_RANKS, run_ranks
from .test_refine import converted_cnn, images, snapshot

pytestmark = FORKED_RANKS

WORLD = 2
SHARD = 40  # samples per process: 32 to train on, 8 held out


def shard(rank: int) -> list[torch.Tensor]:
    return list(images(SHARD, seed=10 + rank).split(8))


def _worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        original, converted = converted_cnn()
        results["before"] = snapshot(converted)
        if rank == 1:  # a process that starts from other weights is brought to rank 0's
            with torch.no_grad():
                converted[0].weight.mul_(1.5)
        refine(converted, original, shard(rank), steps=12, eval_every=4, patience=None, holdout=0.2, progress=False)
        report = refine_report(converted)
        results["after"], results["report"] = snapshot(converted), report.to_dict()
        for name, data in (("bad batch", shard(rank) + (["not a batch"] if rank == 1 else [])),
                           ("empty shard", shard(rank) if rank == 0 else [])):
            original, converted = converted_cnn()
            try:
                refine(converted, original, data, steps=4, progress=False)
            except NormswapError as exc:
                results[name] = f"{type(exc).__name__}: {exc}"
            results[f"{name} state"] = snapshot(converted)
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    return run_ranks(_worker, out, WORLD)


def test_both_ranks_end_with_identical_weights_that_training_changed(ranks):
    for key, value in ranks[0]["after"].items():
        assert torch.equal(value, ranks[1]["after"][key]), key
    assert not all(torch.equal(value, ranks[0]["before"][key]) for key, value in ranks[0]["after"].items())


def test_the_holdout_of_every_shard_is_measured_once_and_every_rank_sees_the_same_figures(ranks):
    reports = [rank["report"] for rank in ranks]
    for report in reports:
        assert (report["world_size"], report["train_samples"], report["holdout_samples"]) == (WORLD, 64, 16)
        assert report["kept"] == "best" and report["loss_after"] < report["loss_before"]
    assert reports[0]["evaluations"] == reports[1]["evaluations"]
    assert reports[0]["shift"] == reports[1]["shift"]  # measured on both shards together: one choice
    assert [e["step"] for e in reports[0]["evaluations"]] == [0, 4, 8, 12]


def test_a_failure_on_one_rank_is_an_error_on_every_rank_instead_of_a_hang(ranks):
    assert "batch 5 is a str" in ranks[1]["bad batch"]
    assert "failed on rank 1" in ranks[0]["bad batch"]
    assert all("no calibration data left to train on" in rank["empty shard"] for rank in ranks)
    for rank in ranks:
        for name in ("bad batch", "empty shard"):
            state = rank[f"{name} state"]
            assert all(torch.equal(value, rank["before"][key]) for key, value in state.items()), name
