"""Recalibration across processes: two CPU processes (gloo, loopback) each calibrate on their own shard and end with
the same statistics, those of one process over all the data.

The processes are forked from the test process, so they start in a fraction of a second instead of importing torch
again; the results come back through files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from timm.layers.norm_act import BatchNormAct2d
from torch import nn

from normswap.errors import CalibrationError
from normswap.recalibrate import calibration_report, recalibrate

from .helpers import FORKED_RANKS, randomize_norm_layers, run_ranks
from .test_recalibrate import assert_statistics, images, population_statistics

pytestmark = FORKED_RANKS

WORLD = 2


def make_model() -> nn.Module:
    """BatchNorm, SyncBatchNorm (whose own all-reduce needs a GPU) and timm's fused BatchNormAct2d."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.SyncBatchNorm(6), nn.ReLU(),
        nn.Conv2d(6, 4, 1), BatchNormAct2d(4),
    )
    return randomize_norm_layers(model, seed=5).eval()


class FailsOnABatchOfOne(nn.Module):
    """Raises on a batch of one sample, after the first BatchNorm: a failure in the middle of a calibration."""

    def forward(self, x):
        if x.shape[0] == 1:
            raise ValueError("a batch of one")
        return x


class CallsALayerTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn_a, self.conv, self.bn_b = nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn_a(self.bn_b(self.conv(self.bn_a(x))))


def twice_model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norm_layers(CallsALayerTwice(), seed=6).eval()


def all_batches() -> list[torch.Tensor]:
    return images([3, 5, 2, 4, 1], shape=(3, 6, 6), seed=7)


def shard(rank: int) -> list[torch.Tensor]:
    return all_batches()[rank::WORLD]


def running_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def _worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for method in ("exact", "sequential"):
            model = recalibrate(make_model(), shard(rank), method=method, progress=False)
            results[method] = running_statistics(model)
            results[f"{method} report"] = calibration_report(model).to_dict()
        for method in ("exact", "sequential"):
            model = recalibrate(make_model(), shard(0) if rank == 0 else [], method=method, progress=False)
            results[f"{method} empty shard"] = running_statistics(model)
        bad = shard(rank) + (["not a batch"] if rank == 1 else [])
        try:
            recalibrate(make_model(), bad, progress=False)
        except CalibrationError as exc:
            results["failure"] = str(exc)
        failing = make_model()
        failing.insert(2, FailsOnABatchOfOne())  # rank 0's shard ends with a batch of one
        try:
            recalibrate(failing, shard(rank), method="sequential", progress=False)
        except CalibrationError as exc:
            results["sequential failure"] = str(exc)
        model = recalibrate(twice_model(), shard(rank), method="sequential", progress=False)
        results["called twice"] = running_statistics(model)
        results["called twice report"] = calibration_report(model).to_dict()
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    return run_ranks(_worker, out, WORLD)


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_every_rank_ends_with_the_same_statistics(ranks, method):
    for key, value in ranks[0][method].items():
        assert torch.equal(value, ranks[1][method][key]), key


def test_exact_across_ranks_equals_the_float64_statistics_of_all_the_data(ranks):
    model = make_model()
    # several processes calibrate in the model's own layout (channels-last is a single-process CPU choice)
    expected = population_statistics(model, all_batches(), batch_statistics=True, channels_last=False)
    model.load_state_dict(ranks[0]["exact"], strict=False)
    assert_statistics(model, expected)


def test_sequential_across_ranks_is_eval_consistent_over_all_the_data(ranks):
    model = make_model()
    model.load_state_dict(ranks[0]["sequential"], strict=False)
    assert_statistics(model, population_statistics(model, all_batches(), batch_statistics=False))
    single = recalibrate(make_model(), all_batches(), method="sequential")
    for key, value in running_statistics(single).items():
        assert torch.allclose(value, ranks[0]["sequential"][key], rtol=1e-6, atol=1e-7), key


def test_the_report_counts_the_data_of_all_ranks(ranks):
    for rank in ranks:
        report = rank["exact report"]
        assert (report["batches"], report["samples"], report["world_size"]) == (5, 15, WORLD)
        assert len(report["calibrated"]) == 3


@pytest.mark.parametrize("method", ["exact", "sequential"])
def test_a_rank_without_data_contributes_nothing(ranks, method):
    expected = running_statistics(recalibrate(make_model(), shard(0), method=method, channels_last=False))
    for rank in ranks:
        for key, value in expected.items():
            assert torch.allclose(rank[f"{method} empty shard"][key], value, rtol=1e-6, atol=1e-7), key


def test_a_failure_on_one_rank_is_an_error_on_every_rank_instead_of_a_hang(ranks):
    assert "batch 2 is a str" in ranks[1]["failure"]
    assert "failed on rank 1" in ranks[0]["failure"]
    assert "ValueError: a batch of one" in ranks[0]["sequential failure"]
    assert "failed on rank 0" in ranks[1]["sequential failure"]


def test_ranks_agree_on_a_layer_called_twice_and_end_as_one_process_over_all_the_data(ranks):
    single = running_statistics(recalibrate(twice_model(), all_batches(), method="sequential"))
    for rank in ranks:
        for key, value in single.items():
            assert torch.allclose(rank["called twice"][key], value, rtol=1e-6, atol=1e-7), key
        report = rank["called twice report"]
        assert report["calibrated"] == ["bn_b", "bn_a"] and report["forward_cost"] == pytest.approx(2 + 2 / 5)
