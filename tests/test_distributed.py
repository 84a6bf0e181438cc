"""The distributed service (normswap.distributed): one decision of whether to run collectives, one collective device,
and failing together on any BaseException, for every operation that runs across processes.

The decision and the device are checked in this process; refinement's guarantees (the same as recalibration's, see
tests/test_distributed_safety.py) with two CPU processes (gloo, loopback) forked from the test process, each writing
what it saw to a file.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

import normswap
from normswap.distributed import PeerFailure, Ranks, collective_device
from normswap.errors import CalibrationError, NormswapError, PlanError, RefineError
from normswap.recalibrate.distributed import Ranks as CalibrationRanks
from normswap.inspection import inspect_model
from normswap.refine import refine, refine_report

from .helpers import FORKED_RANKS, run_ranks, small_cnn
from .test_refine import converted_cnn, images, snapshot

pytestmark = FORKED_RANKS

WORLD = 2
LIMIT_S = 20  # the other rank's wait: the group's own timeout would be 60 s here (30 min by default)


def shard(rank: int) -> list[torch.Tensor]:
    return list(images(40, seed=10 + rank).split(8))


class Interrupting:
    """A shard whose loader is interrupted (``KeyboardInterrupt``, as Ctrl-C raises it) at batch ``at``."""

    def __init__(self, batches: list[torch.Tensor], at: int) -> None:
        self.batches, self.at = batches, at

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            if index == self.at:
                raise KeyboardInterrupt
            yield batch


def interrupt_at_forward(model: torch.nn.Module, call: int) -> None:
    """Make the model's forward raise ``KeyboardInterrupt`` at its ``call``-th call (in the middle of training)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt

    model[0].register_forward_pre_hook(hook)


def interrupt_at_optimizer_step(step: int):
    """Make every optimizer raise ``KeyboardInterrupt`` at its ``step``-th step (0: never), between the blocks
    whose failures the processes tell each other; returns the hook's handle."""
    steps = [0]

    def hook(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == step:
            raise KeyboardInterrupt

    return register_optimizer_step_pre_hook(hook)


def _outcome(run) -> tuple[str, float]:
    started = time.monotonic()
    try:
        run()
        outcome = "finished"
    except RefineError as exc:
        outcome = f"RefineError: {exc}"
    except PlanError as exc:
        outcome = f"PlanError: {exc}"
    except NormswapError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        outcome = "KeyboardInterrupt"
    return outcome, time.monotonic() - started


def _worker(rank: int, port: int, out: Path) -> None:
    import datetime

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for case in ("loader", "forward", "optimizer step"):
            original, converted = converted_cnn()
            before = snapshot(converted)
            data = shard(rank)
            if rank == 1 and case == "loader":
                data = Interrupting(data, at=2)
            if rank == 1 and case == "forward":
                interrupt_at_forward(converted, call=3)
            hook = interrupt_at_optimizer_step(3 if rank == 1 and case == "optimizer step" else 0)
            results[case] = _outcome(lambda: refine(converted, original, data, steps=6, eval_every=2, holdout=0.2,
                                                    progress=False))
            hook.remove()
            results[f"{case} unchanged"] = all(torch.equal(v, before[k]) for k, v in snapshot(converted).items())
        group = dist.new_group([0, 1])
        original, converted = converted_cnn()
        report = refine_report(refine(converted, original, shard(rank), steps=4, process_group=group, holdout=0.2,
                                      progress=False))
        results["group"] = (report.world_size, report.train_samples, snapshot(converted))
        ddp = torch.nn.parallel.DistributedDataParallel(small_cnn())
        results["ddp"] = {
            "plan": [row.name for row in normswap.plan(ddp, "gn", groups=4).rows],
            "inspect": [report.names for report in inspect_model(ddp)],
            "convert": _outcome(lambda: normswap.convert(ddp, "gn", groups=4))[0],
            "fold": _outcome(lambda: normswap.fold(ddp))[0],
            "recalibrated": normswap.calibration_report(normswap.recalibrate(ddp, shard(rank), progress=False)
                                                        ).calibrated,
        }
        if rank == 0:  # the common pattern: refine on one rank only while the others wait at a barrier
            original, converted = converted_cnn()
            report = refine_report(refine(converted, original, shard(0), steps=4, distributed=False, holdout=0.2,
                                          progress=False))
            results["alone"] = (report.world_size, report.train_samples, snapshot(converted))
        dist.barrier()
    finally:
        torch.save(results, out / f"rank{rank}.pt")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    return run_ranks(_worker, out, WORLD, timeout=8 * LIMIT_S)


@pytest.mark.parametrize("case, what", [("loader", "reading the calibration data"), ("forward", "step 2"),
                                        ("optimizer step", "step 4")])
def test_refine_interrupted_on_one_rank_releases_the_other_quickly_naming_it(ranks, case, what):
    interrupted, other = ranks[1][case], ranks[0][case]
    assert interrupted[0] == "KeyboardInterrupt"
    assert other[0].startswith(f"RefineError: refinement failed on rank 1 while {what}")
    for rank in ranks:
        assert rank[case][1] < LIMIT_S and rank[f"{case} unchanged"]


def test_refine_over_a_process_group_and_on_one_rank_alone(ranks):
    for rank in ranks:
        assert rank["group"][:2] == (WORLD, 2 * 32)
    for key, value in ranks[0]["group"][2].items():
        assert torch.equal(value, ranks[1]["group"][2][key]), key
    world_size, samples, alone = ranks[0]["alone"]
    assert (world_size, samples) == (1, 32)
    original, converted = converted_cnn()
    refine(converted, original, shard(0), steps=4, holdout=0.2, progress=False)  # the same run in a process of its own
    for key, value in snapshot(converted).items():
        torch.testing.assert_close(alone[key], value, rtol=1e-5, atol=1e-6)


def test_a_model_in_ddp_is_looked_through_but_not_changed_in_structure_under_it(ranks):
    for rank in ranks:
        ddp = rank["ddp"]
        assert ddp["plan"] == ["1", "4"] and ddp["inspect"] == [["1"], ["4"]] and ddp["recalibrated"] == ["1", "4"]
        for operation in ("convert", "fold"):
            assert ddp[operation] == (f"PlanError: cannot {operation} a model inside DistributedDataParallel, which "
                                      f"keeps the parameters it was built with: {operation} the model first, then "
                                      "wrap it (or pass ddp.module and wrap it again)")


def _leaving_worker(rank: int, port: int, out: Path) -> None:
    import datetime
    import os

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    if rank == 1:  # a process that is gone (killed, or ended without calling refine)
        torch.save({}, out / f"rank{rank}.pt")
        os._exit(0)
    original, converted = converted_cnn()
    results = {"refine": _outcome(lambda: refine(converted, original, shard(0), steps=2, progress=False))}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_a_rank_that_is_gone_is_the_operation_s_own_error_on_the_others(tmp_path):
    outcome, seconds = run_ranks(_leaving_worker, tmp_path, WORLD, timeout=8 * LIMIT_S)[0]["refine"]
    assert outcome.startswith("RefineError: refinement lost the other processes (")
    assert outcome.endswith("): one of them has stopped (see its error)") and seconds < LIMIT_S


def test_without_torch_distributed_an_operation_runs_alone_and_fails_alone():
    ranks = Ranks()
    assert (ranks.active, ranks.size, ranks.rank) == (False, 1, 0)
    assert ranks.sum([2.0, 3.5]) == [2.0, 3.5] and ranks.gather(7) == [7.0]
    with pytest.raises(KeyboardInterrupt), ranks.failing_together("a step"):
        raise KeyboardInterrupt


@pytest.mark.parametrize("options, message", [
    ({"distributed": True}, "distributed=True needs torch.distributed initialized"),
    ({"process_group": object()}, "process_group= needs torch.distributed initialized"),
    ({"distributed": "yes"}, "distributed must be True, False or None"),
])
def test_asking_for_collectives_without_torch_distributed_is_one_clear_error_in_each_operation(options, message):
    with pytest.raises(NormswapError, match=message):
        Ranks(**options)
    with pytest.raises(CalibrationError, match=message):
        CalibrationRanks(**options)
    original, converted = converted_cnn()
    with pytest.raises(RefineError, match=message):
        refine(converted, original, shard(0), steps=1, progress=False, **options)


def test_peer_failures_are_the_operation_s_own_error_and_name_the_rank():
    failure = CalibrationRanks().failure(3)
    assert isinstance(failure, CalibrationError) and isinstance(failure, PeerFailure)
    assert str(failure) == "recalibration failed on rank 3 (see its error)"
    assert str(Ranks(operation="refinement").failure(1, "step 4")) == \
        "refinement failed on rank 1 while step 4 (see its error)"


def test_nccl_collectives_run_on_the_operation_s_gpu_or_the_one_local_rank_names():
    assert collective_device("nccl", torch.device("cuda", 2), {"LOCAL_RANK": "0"}) == torch.device("cuda", 2)
    assert collective_device("nccl", torch.device("cpu"), {"LOCAL_RANK": "1"}) == torch.device("cuda", 1)
    assert collective_device("gloo", torch.device("cuda", 1), {"LOCAL_RANK": "1"}) == torch.device("cpu")


def _nccl_worker(rank: int, port: int, out: Path) -> None:
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:  # no torch.cuda.set_device: the collectives must still run on each rank's own GPU
        original, converted = converted_cnn()
        refine(converted, original, shard(rank), steps=4, device=f"cuda:{rank}", progress=False)
        torch.save(snapshot(converted), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_nccl_ranks_refine_on_their_own_gpus_to_the_same_weights(tmp_path):
    first, second = run_ranks(_nccl_worker, tmp_path, WORLD, start_method="spawn")
    for key, value in first.items():
        assert torch.equal(value.cpu(), second[key].cpu()), key
