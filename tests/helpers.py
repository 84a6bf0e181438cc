"""Helpers shared by the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def randomize_norm_layers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial running statistics and affine values, so conversion mistakes show.

    Freshly initialised BatchNorm has mean 0, var 1, weight 1, bias 0: a conversion that forgot the statistics or
    the affine values would still produce the right output on it.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, low, high in (("running_mean", -0.5, 0.5), ("running_var", 0.5, 2.0),
                                    ("weight", 0.5, 1.5), ("bias", -0.3, 0.3)):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1 and tensor.is_floating_point() \
                        and _is_norm(module):
                    tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=gen))
    return model


def _is_norm(module: nn.Module) -> bool:
    from normswap.targets import is_norm_layer

    return is_norm_layer(module)


def small_cnn(inplace: bool = True, seed: int = 1) -> nn.Module:
    """Two conv-BN-ReLU blocks (8 and 16 channels) and a 5-class head, on 3-channel images; eval mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=inplace),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=inplace),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    return randomize_norm_layers(model, seed=seed).eval()


def save_resnet18(folder: Path) -> tuple[nn.Module, Path]:
    """A 10-class timm resnet18 with non-trivial statistics (eval mode), and its state dict saved in ``folder``."""
    import timm

    torch.manual_seed(0)
    model = randomize_norm_layers(timm.create_model("resnet18", pretrained=False, num_classes=10), seed=4).eval()
    checkpoint = folder / "resnet18.pt"
    torch.save(model.state_dict(), checkpoint)
    return model, checkpoint


def save_resnet18_with_data(folder: Path) -> tuple[nn.Module, Path, Path]:
    """:func:`save_resnet18`, and a labelled tensor data file of six 32x32 images beside it."""
    model, checkpoint = save_resnet18(folder)
    data = folder / "data.pt"
    torch.save((torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))), data)
    return model, checkpoint, data


def gn_groups(to: str, groups: int) -> dict:
    """``{"groups": groups}`` for the GroupNorm target, which alone takes a group count."""
    return {"groups": groups} if to == "gn" else {}


def _forked_ranks() -> list:
    import pytest
    import torch.multiprocessing as mp

    return [pytest.mark.distributed,
            pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="forks the test process (fast start)")]


FORKED_RANKS = _forked_ranks()
"""The marks of a test module whose processes are forked from the test process (they start in a fraction of a second
instead of importing torch again)."""


def run_ranks(worker, out: Path, world: int = 2, *, start_method: str = "fork", timeout: float = 600.0) -> list:
    """Run ``worker(rank, port, out)`` in ``world`` processes that meet on a free loopback port; wait until all have
    ended, and fail the test (killing them) if that takes longer than ``timeout`` seconds: a hang is a failure.
    Returns what each rank saved as ``out / f"rank{rank}.pt"``."""
    import socket
    import time

    import pytest
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(worker, args=(port, out), nprocs=world, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {world} processes did not end within {timeout:.0f} s")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
