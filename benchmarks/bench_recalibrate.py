"""Benchmark of BatchNorm recalibration: speed, exactness and the accuracy it recovers, against the usual tools.

Three tables, printed as markdown:

1. Throughput: ``normswap.recalibrate`` against a plain no-grad eval forward over the same batches (timm resnet50,
   random weights), with ``torch.optim.swa_utils.update_bn``, a precise-BN re-implementation and naive float64 hooks
   on every BatchNorm input as the other rows, and a forward with BatchNorm in train mode: the floor of every method
   that normalizes with batch statistics. Methods are timed in interleaved rounds; each row gives the best time (the
   least disturbed by other work on the machine) and the throughput ratios to the plain forward and to that floor.
   On CPU, normswap's default runs channels-last; the rows "normswap exact, channels_last=False" and "plain no-grad
   eval forward, channels-last copy" show the same calibration in the model's own layout and a plain forward given
   the channels-last layout too. On CUDA when there is one.
2. Exactness: the largest relative error of ``running_var`` against the float64 statistics of everything each layer
   saw with batch statistics (timm resnet18), at calibration batch sizes 1-32, with a stem input mean near 1000 and
   under bfloat16 autocast.
3. Accuracy: a small BatchNorm CNN trained here on scikit-learn's digits, tested on shifted domains (low contrast and
   bright, noise, blur) before and after recalibrating on unlabeled shifted training images with each method, at
   calibration batch sizes 2, 8 and 64.
4. Sequential cost: on the models users bring (ultralytics, transformers, smp, MONAI, torchvision video) and the
   timm/torchvision models where it used to cost the most, the sequential method's passes and ``forward_cost``
   (what its passes compute, in forwards over the data) and its time against a plain no-grad eval forward over
   the same batches, best of ``--rounds`` interleaved rounds.
5. Sequential cost on small, fast models (``fast``): the ten models where the sequential method cost most against a
   plain eval forward (3.2-5.0x before) and resnet50, in one run: wall-time and CPU-time ratios (medians of
   ``--rounds`` interleaved rounds; CPU time counts every thread of this process and is less disturbed by other
   processes), and the memory estimate the run logs before it starts against the peak resident memory it added.
6. Sequential cost over a sweep (``--sweep``, not in the default run: about half an hour): every torchvision
   classification, segmentation and video model with BatchNorm that the save/load sweep covers, and the timm models
   of that sweep, randomly initialised: the CPU-time ratio of the sequential method to a plain eval forward over 4
   batches (medians of ``--rounds`` interleaved rounds), with the median, the 90th percentile and the maximum.

The baselines are here for comparison only. ``precise_bn`` follows the population-variance estimator of fvcore's
precise BN (batch-size-weighted running averages of the batch means and mean squares, in the buffers' dtype,
variance as ``E[x²] - E[x]²``); it is a re-implementation, not fvcore's code.

Run: ``python benchmarks/bench_recalibrate.py [--threads 1] [--rounds 3] [--skip throughput exactness accuracy
sequential fast] [--sweep]``. The thread count is set explicitly (one
intra-op thread by default: the figures are meant to be compared within one run, on a shared machine).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from typing import Any, Callable, Optional

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from normswap.data import call_model
from normswap.recalibrate import calibration_report, recalibrate

BatchNorm = nn.modules.batchnorm._BatchNorm


# --- baselines ---------------------------------------------------------------------------------------------------


def precise_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Precise BN as fvcore computes it, for comparison: the model in train mode, every BatchNorm with momentum 1 so
    its buffers hold each batch's mean and unbiased variance, and a hook counting the values per channel; the
    population mean and mean of squares (the batch variance with its Bessel correction undone, plus the squared
    mean) are running averages weighted by that count, in the buffers' dtype; the variance is ``E[x²] - E[x]²``."""
    layers = [m for m in model.modules() if isinstance(m, BatchNorm) and m.track_running_stats]
    momenta = [layer.momentum for layer in layers]
    means = [torch.zeros_like(layer.running_mean) for layer in layers]
    squares = [torch.zeros_like(layer.running_var) for layer in layers]
    counts = {layer: 0 for layer in layers}
    totals = {layer: 0 for layer in layers}

    def count(module: nn.Module, args: tuple) -> None:
        counts[module] = args[0].numel() // args[0].shape[1]

    handles = [layer.register_forward_pre_hook(count) for layer in layers]
    for layer in layers:
        layer.momentum = 1.0
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
            for layer, mean, square in zip(layers, means, squares):
                n = counts[layer]
                totals[layer] += n
                weight = n / totals[layer]
                batch_square = layer.running_mean ** 2 + layer.running_var * ((n - 1) / n)
                mean += (layer.running_mean - mean) * weight
                square += (batch_square - square) * weight
    for handle in handles:
        handle.remove()
    for layer, mean, square, momentum in zip(layers, means, squares, momenta):
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(square - mean ** 2)
        layer.momentum = momentum
    model.eval()


def float64_hooks(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """The naive exact method: a hook copies every BatchNorm input to float64 and sums it per channel."""
    sums: dict[nn.Module, list[Any]] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].double()
        dims = [0] + list(range(2, x.dim()))
        entry = sums.setdefault(module, [0, 0.0, 0.0])
        entry[0] += x.numel() // x.shape[1]
        entry[1] = entry[1] + x.sum(dims)
        entry[2] = entry[2] + (x * x).sum(dims)

    layers = [m for m in model.modules() if isinstance(m, BatchNorm)]
    handles = [layer.register_forward_pre_hook(hook) for layer in layers]
    model.eval()
    for layer in layers:
        layer.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for handle in handles:
        handle.remove()
    model.eval()


def run_update_bn(model: nn.Module, batches: list[torch.Tensor]) -> None:
    update_bn(batches, model)
    model.eval()


# --- helpers -----------------------------------------------------------------------------------------------------


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def reference_statistics(model: nn.Module, batches: list[torch.Tensor], *, amp: bool = False,
                         batch_statistics: bool = True) -> dict[str, tuple]:
    """float64 mean and unbiased variance of everything each BatchNorm layer sees, normalizing with batch statistics
    (or, with ``batch_statistics=False``, in eval mode)."""
    reference = copy.deepcopy(model).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    for name, module in reference.named_modules():
        if isinstance(module, BatchNorm):
            module.training = batch_statistics
            module.register_forward_pre_hook(
                lambda m, a, name=name: seen.setdefault(name, []).append(
                    a[0].detach().double().transpose(0, 1).reshape(a[0].shape[1], -1).clone()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for x in batches:
            reference(x)
    return {name: (torch.cat(xs, 1).mean(1), torch.cat(xs, 1).var(1)) for name, xs in seen.items()}


def max_var_error(model: nn.Module, expected: dict[str, tuple], only: Optional[str] = None) -> float:
    """The largest relative error of ``running_var`` over all channels of all layers (or of layer ``only``)."""
    return max(((model.get_submodule(name).running_var.double() - var).abs() / var).max().item()
               for name, (_, var) in expected.items() if only in (None, name))


# --- 1. throughput -----------------------------------------------------------------------------------------------


def bench_throughput(device: torch.device, rounds: int, *, batch: int, size: int, count: int, amp: bool = False,
                     channels_last: bool = False) -> str:
    torch.manual_seed(0)
    model = timm.create_model("resnet50", pretrained=False).to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    batches = [torch.randn(batch, 3, size, size, device=device) for _ in range(count)]
    if channels_last:
        batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else None

    def under_amp(fn: Callable[[], None]) -> Callable[[], None]:
        if autocast is None:
            return fn

        def wrapped() -> None:
            with autocast():
                fn()

        return wrapped

    def plain() -> None:
        with torch.no_grad():
            for x in batches:
                model(x)

    def batch_statistics_forward() -> None:
        for module in model.modules():
            module.training = isinstance(module, BatchNorm)
        plain()
        model.eval()

    methods: dict[str, Callable[[], None]] = {
        "plain no-grad eval forward": under_amp(plain),
        "forward with BatchNorm in train mode, nothing accumulated": under_amp(batch_statistics_forward),
        "normswap exact": lambda: recalibrate(model, batches, amp=amp, channels_last=channels_last or None,
                                              progress=False),
        "update_bn": under_amp(lambda: run_update_bn(model, batches)),
        "precise BN (fvcore-style)": under_amp(lambda: precise_bn(model, batches)),
        "float64 hooks on every BN input": under_amp(lambda: float64_hooks(model, batches)),
    }
    if device.type == "cpu" and not channels_last:
        # normswap's default on CPU runs in channels-last layout; show it beside the same run in the model's own
        # layout, and beside a plain forward that is also given channels-last weights and inputs
        methods["normswap exact, channels_last=False"] = lambda: recalibrate(model, batches, amp=amp,
                                                                             channels_last=False, progress=False)
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        batches_cl = [x.contiguous(memory_format=torch.channels_last) for x in batches]

        def plain_channels_last() -> None:
            with torch.no_grad():
                for x in batches_cl:
                    model_cl(x)

        methods["plain no-grad eval forward, channels-last copy"] = under_amp(plain_channels_last)
    methods["normswap sequential"] = lambda: recalibrate(model, batches, method="sequential", amp=amp,
                                                         channels_last=channels_last, progress=False)
    methods["plain no-grad eval forward"]()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            times[name].append(timed(fn, device))
    report = calibration_report(model)
    times[f"normswap sequential ({report.passes} passes costing {report.forward_cost:.2f} forwards)"] = times.pop(
        "normswap sequential")
    base = min(times["plain no-grad eval forward"])
    floor = min(times["forward with BatchNorm in train mode, nothing accumulated"])
    samples = batch * count
    rows = []
    for name, measured in times.items():
        best = min(measured)
        rows.append([name, f"{best:.3f}", f"{samples / best:.1f}", f"{base / best:.3f}", f"{floor / best:.3f}"])
    what = (f"resnet50, {count} batches of {batch}x3x{size}x{size}, {device.type}"
            + (", bf16 autocast" if amp else "") + (", channels_last" if channels_last else "")
            + f", best of {rounds} interleaved rounds")
    header = ["method", "seconds", "images/s", "throughput vs plain forward", "vs train-mode BN forward"]
    return f"{what}\n\n" + table(header, rows)


# --- 2. exactness ------------------------------------------------------------------------------------------------


def bench_exactness() -> str:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(64, 3, 64, 64, generator=gen) * 2 + 0.5

    def errors(batches: list[torch.Tensor], *, amp: bool = False, only: Optional[str] = None,
               model: nn.Module = model) -> list[str]:
        cells = []
        for method in (run_update_bn, precise_bn, None):
            candidate = copy.deepcopy(model)
            try:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp and method is not None):
                    if method is None:  # in the layout every other method and the reference run in
                        recalibrate(candidate, batches, amp=amp, channels_last=False, progress=False)
                    else:
                        method(candidate, batches)
            except Exception as exc:  # the point of the row: which tools fail, and how
                cells.append(f"fails ({type(exc).__name__})")
                continue
            expected = reference_statistics(model, batches, amp=amp)
            cells.append(f"{max_var_error(candidate, expected, only):.2e}")
        sequential = recalibrate(copy.deepcopy(model), batches, method="sequential", amp=amp, progress=False)
        consistent = reference_statistics(sequential, batches, amp=amp, batch_statistics=False)
        return cells + [f"{max_var_error(sequential, consistent, only):.2e}"]

    rows = []
    for size in (1, 2, 4, 8, 32):
        rows.append([f"batch size {size}"] + errors(list(images.split(size))))
    offset = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    rows.append(["batch size 8, conv net whose first BatchNorm input has mean 1000, std 1 (that layer)"]
                + errors(list((images / 2 + 1000.0).split(8)), only="0", model=offset))
    rows.append(["batch size 8, bf16 autocast"] + errors(list(images.split(8)), amp=True))
    rows.append(["batch size 1, 32x32 images (1x1 last stage)"] + errors(list(images[:8, :, :32, :32].split(1))))
    exact = recalibrate(copy.deepcopy(model), list(images.split(8)), channels_last=False, progress=False)
    sequential = recalibrate(copy.deepcopy(model), list(images.split(8)), method="sequential", progress=False)
    gap = max(((s.running_var - e.running_var).abs() / s.running_var).max().item()
              for s, e in zip(sequential.modules(), exact.modules()) if isinstance(s, BatchNorm))
    header = ["calibration (64 images, 64x64, resnet18)", "update_bn", "precise BN (fvcore-style)", "normswap exact",
              "normswap sequential"]
    return (table(header, rows) + "\n\nLargest relative error of running_var, over all layers and channels, "
            "against the float64 variance of everything each layer saw with batch statistics (for sequential: in "
            "eval mode over the same data, after recalibration).\nExact (train-mode) and sequential "
            f"(eval-consistent) running_var differ by up to {gap:.0%} on this model.")


# --- 3. accuracy -------------------------------------------------------------------------------------------------


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=16, mode="bilinear", align_corners=False)
    labels = torch.tensor(bunch.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:1347], order[1347:]
    return images[train], labels[train], images[test], labels[test]


def digits_cnn() -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*block(1, 16, 1), *block(16, 32, 2), *block(32, 32, 1), *block(32, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, 10))


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, epochs: int = 12) -> nn.Module:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(labels), generator=gen).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model.eval()(images).argmax(1) == labels).float().mean().item()


SHIFTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "low contrast, bright": lambda x: 0.25 * x + 0.7,
    "noise (std 0.35)": lambda x: x + 0.35 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)),
    "blur (gaussian, std 1.2 px)": lambda x: gaussian_blur(x, 1.2),
}


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    taps = torch.arange(-3, 4, dtype=torch.float32)
    kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum())
    kernel2d = (kernel[:, None] * kernel[None, :])[None, None]
    return F.conv2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), kernel2d)


def bench_accuracy() -> str:
    torch.manual_seed(0)
    train_x, train_y, test_x, test_y = digits()
    model = train(digits_cnn(), train_x, train_y)
    rows = [["clean (no shift)", "-", f"{accuracy(model, test_x, test_y):.1%}", "", "", ""]]
    methods: dict[str, Callable[[nn.Module, list[torch.Tensor]], None]] = {
        "normswap exact": lambda m, b: recalibrate(m, b, progress=False),
        "normswap sequential": lambda m, b: recalibrate(m, b, method="sequential", progress=False),
        "update_bn": run_update_bn,
    }
    for shift_name, shift in SHIFTS.items():
        calibration, shifted_test = shift(train_x), shift(test_x)
        before = accuracy(model, shifted_test, test_y)
        for method_name, method in methods.items():
            row = [shift_name, method_name, f"{before:.1%}"]
            for size in (2, 8, 64):
                candidate = copy.deepcopy(model)
                method(candidate, list(calibration.split(size)))
                row.append(f"{accuracy(candidate, shifted_test, test_y):.1%}")
            rows.append(row)
    header = ["domain", "recalibration", "before", "after, batch 2", "after, batch 8", "after, batch 64"]
    return (f"digits CNN (4 BatchNorm layers, 16x16 inputs), trained on {len(train_y)} images, tested on "
            f"{len(test_y)}; calibration: the {len(train_y)} training images, shifted, unlabeled\n\n"
            + table(header, rows))


# --- 4. sequential cost -------------------------------------------------------------------------------------------


def _yolo() -> nn.Module:
    from ultralytics import YOLO

    return YOLO("yolov8n.yaml").model


def _transformers(name: str) -> nn.Module:
    import transformers

    return getattr(transformers, f"{name}Model")(getattr(transformers, f"{name}Config")())


def _smp(name: str) -> nn.Module:
    import segmentation_models_pytorch as smp

    return getattr(smp, name)(encoder_weights=None)


def _dynunet() -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                   upsample_kernel_size=[2, 2], norm_name="batch")


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    import torchvision

    return lambda: getattr(torchvision.models.video if "3d" in name else torchvision.models, name)(**kwargs)


SEQUENTIAL_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], Optional[str]]] = {
    "ultralytics YOLOv8n": (_yolo, (4, 3, 320, 320), None),
    "transformers ResNet-50": (lambda: _transformers("ResNet"), (4, 3, 128, 128), "pixel_values"),
    "transformers MobileNetV2": (lambda: _transformers("MobileNetV2"), (4, 3, 128, 128), "pixel_values"),
    "transformers RegNet": (lambda: _transformers("RegNet"), (4, 3, 128, 128), "pixel_values"),
    "smp FPN (resnet34)": (lambda: _smp("FPN"), (4, 3, 128, 128), None),
    "smp DeepLabV3Plus (resnet34)": (lambda: _smp("DeepLabV3Plus"), (4, 3, 128, 128), None),
    "MONAI DynUNet (3-D)": (_dynunet, (2, 1, 32, 32, 32), None),
    "torchvision r3d_18": (_torchvision("r3d_18"), (2, 3, 8, 64, 64), None),
    "torchvision shufflenet_v2_x1_0": (_torchvision("shufflenet_v2_x1_0"), (4, 3, 128, 128), None),
    "timm efficientvit_m0": (lambda: timm.create_model("efficientvit_m0"), (4, 3, 224, 224), None),
    "timm bat_resnext26ts": (lambda: timm.create_model("bat_resnext26ts"), (4, 3, 256, 256), None),
    "timm resnet50": (lambda: timm.create_model("resnet50"), (4, 3, 128, 128), None),
}


def bench_sequential(rounds: int, batches: int = 4) -> str:
    rows = []
    for name, (build, shape, key) in SEQUENTIAL_MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        data = [torch.randn(shape) for _ in range(batches)]
        inputs = [{key: x} if key else x for x in data]

        def plain() -> None:
            with torch.no_grad():
                for x in inputs:
                    call_model(model, x)

        def sequential() -> None:
            recalibrate(model, inputs, method="sequential", progress=False)

        plain()
        times: dict[str, list[float]] = {"plain": [], "sequential": []}
        for _ in range(rounds):
            times["plain"].append(timed(plain, torch.device("cpu")))
            times["sequential"].append(timed(sequential, torch.device("cpu")))
        report = calibration_report(model)
        ratio = min(times["sequential"]) / min(times["plain"])
        rows.append([name, "x".join(map(str, shape)), len(report.calibrated), report.passes,
                     f"{report.forward_cost:.2f}", f"{min(times['plain']):.2f}", f"{min(times['sequential']):.2f}",
                     f"{ratio:.2f}"])
        print(f"  sequential {name}: {ratio:.2f}x", file=sys.stderr, flush=True)
    header = ["model", "batch", "layers", "passes", "forward_cost", "plain eval s", "sequential s",
              "time vs plain eval"]
    return (f"{batches} batches per model, CPU, best of {rounds} interleaved rounds\n\n" + table(header, rows))


# --- 5. sequential cost on small, fast models ----------------------------------------------------------------------


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name)


def _torchvision_segmentation(name: str) -> Callable[[], nn.Module]:
    import torchvision

    return lambda: getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None)


FAST_MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "timm lcnet_035": _timm("lcnet_035"),
    "timm starnet_s050": _timm("starnet_s050"),
    "timm tinynet_e": _timm("tinynet_e"),
    "torchvision mnasnet1_3": _torchvision("mnasnet1_3", weights=None),
    "torchvision shufflenet_v2_x0_5": _torchvision("shufflenet_v2_x0_5", weights=None),
    "torchvision lraspp_mobilenet_v3_large": _torchvision_segmentation("lraspp_mobilenet_v3_large"),
    "timm mobilenetv4_conv_small_035": _timm("mobilenetv4_conv_small_035"),
    "timm mobilenetv1_100": _timm("mobilenetv1_100"),
    "timm tf_efficientnet_lite0": _timm("tf_efficientnet_lite0"),
    "timm resnet50": _timm("resnet50"),
}


class _Estimates(logging.Handler):
    """Collects the memory estimates sequential recalibration logs: before it starts (at the first layer) and, at
    its end, the largest over the layers the first batch paused at."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.values: list[int] = []
        self.held: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "normswap_memory_estimate"):
            self.values.append(record.normswap_memory_estimate)
        if hasattr(record, "normswap_memory_held"):
            self.held.append(record.normswap_memory_held)


def _resident(field: str) -> int:
    """A figure of /proc/self/status in bytes (VmRSS, VmHWM); 0 where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _peak_added(fn: Callable[[], None]) -> int:
    """How far resident memory rose above its level before ``fn`` (the peak counter reset first, where Linux
    allows: ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        return 0
    before = _resident("VmRSS")
    fn()
    return max(0, _resident("VmHWM") - before)


def _plain_and_sequential(model: nn.Module, data: list[torch.Tensor],
                          rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of a plain no-grad eval forward over ``data`` and of sequential recalibration on it, in
    ``rounds`` interleaved rounds after one of each to warm up: ``{"plain": [...], "sequential": [...]}`` each."""
    def plain() -> None:
        with torch.no_grad():
            for x in data:
                model(x)

    def sequential() -> None:
        recalibrate(model, data, method="sequential", progress=False)

    plain()
    sequential()
    wall: dict[str, list[float]] = {"plain": [], "sequential": []}
    cpu: dict[str, list[float]] = {"plain": [], "sequential": []}
    for _ in range(rounds):
        for key, fn in (("plain", plain), ("sequential", sequential)):
            began, began_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - began)
            cpu[key].append(time.process_time() - began_cpu)
    return wall, cpu


def bench_fast(rounds: int, batches: int = 4, shape: tuple[int, ...] = (4, 3, 224, 224)) -> str:
    estimates = _Estimates()
    logger = logging.getLogger("normswap")
    logger.addHandler(estimates)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    rows, wall_ratios, cpu_ratios = [], [], []
    try:
        for name, build in FAST_MODELS.items():
            torch.manual_seed(0)
            model = build().eval()
            data = [torch.randn(shape) for _ in range(batches)]
            wall, cpu = _plain_and_sequential(model, data, rounds)
            estimates.values.clear()
            estimates.held.clear()
            peak = _peak_added(lambda: recalibrate(model, data, method="sequential", progress=False))
            estimate = estimates.values[-1] if estimates.values else 0
            most = estimates.held[-1] if estimates.held else 0
            held = sum(x.numel() * x.element_size() for x in data)
            wall_ratio = statistics.median(wall["sequential"]) / statistics.median(wall["plain"])
            cpu_ratio = statistics.median(cpu["sequential"]) / statistics.median(cpu["plain"])
            wall_ratios.append(wall_ratio)
            cpu_ratios.append(cpu_ratio)
            rows.append([name, len(calibration_report(model).calibrated),
                         f"{statistics.median(wall['plain']) * 1e3:.0f}", f"{wall_ratio:.2f}", f"{cpu_ratio:.2f}",
                         f"{estimate / 1e6:.0f}", f"{(estimate - held) / 1e6:.0f}", f"{(most - held) / 1e6:.0f}",
                         f"{peak / 1e6:.0f}"])
            print(f"  fast {name}: wall {wall_ratio:.2f}x, cpu {cpu_ratio:.2f}x", file=sys.stderr, flush=True)
    finally:
        logger.removeHandler(estimates)
        logger.setLevel(level)
    header = ["model", "layers", "plain eval ms", "sequential / plain (wall)", "(CPU time)",
              "estimate MB (batches + activations)", "of it activations MB", "activations at the fullest layer MB",
              "peak RSS added MB"]
    summary = (f"\n\nwall: median {statistics.median(wall_ratios):.2f}x, max {max(wall_ratios):.2f}x; CPU time: median "
               f"{statistics.median(cpu_ratios):.2f}x, max {max(cpu_ratios):.2f}x")
    return (f"{batches} batches of {'x'.join(map(str, shape))} per model, CPU, medians of {rounds} interleaved "
            "rounds\n\n" + table(header, rows) + summary)


# --- 6. sequential cost over a sweep -------------------------------------------------------------------------------

SWEEP_TIMM = ("resnet18", "resnet50d", "efficientnet_b0", "mobilenetv3_large_100", "regnety_016", "densenet121",
              "rexnet_100", "ghostnet_100", "mixnet_s", "dla34", "dpn68", "selecsls42b", "repvgg_a0", "mobileone_s0",
              "fastvit_t8", "bat_resnext26ts", "inception_v3", "cspresnet50", "hrnet_w18_small",
              "tf_efficientnet_lite0", "nf_resnet26", "resnest14d", "res2net50_14w_8s", "mobilenetv3_small_050",
              "lcnet_035", "starnet_s050", "tinynet_e", "mobilenetv4_conv_small_035", "mobilenetv1_100")
"""The timm models of the save/load sweep (``tests/test_roundtrip_sweep.py``) that take a 128x128 input and have
BatchNorm layers, and those of the fast table."""

SWEEP_TORCHVISION_LEFT_OUT = ("regnet_y_128gf", "regnet_y_32gf", "regnet_y_16gf", "regnet_x_32gf", "resnext101_64x4d",
                              "wide_resnet101_2", "efficientnet_b7", "efficientnet_b6", "efficientnet_v2_l",
                              "convnext_large", "vgg19_bn", "vgg16_bn", "vgg13_bn", "raft_large", "raft_small")
"""Left out of the sweep as in the save/load sweep: bigger siblings of models it covers (and RAFT, which takes an
image pair)."""


def _sweep_models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    import torchvision

    models: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {}
    for package, shape in ((torchvision.models, (4, 3, 128, 128)), (torchvision.models.segmentation, (4, 3, 128, 128)),
                           (torchvision.models.video, (2, 3, 8, 64, 64))):
        for name in torchvision.models.list_models(module=package):
            if name in SWEEP_TORCHVISION_LEFT_OUT or name.startswith(("vit_", "swin", "maxvit", "mvit")):
                continue  # (the transformers among them have no BatchNorm)
            extra = {"weights_backbone": None} if package is torchvision.models.segmentation else {}
            models[f"torchvision {name}"] = (lambda name=name, extra=extra: torchvision.models.get_model(
                name, weights=None, **extra), (1, 3, 16, 224, 224) if name == "s3d" else shape)
    for name in SWEEP_TIMM:
        size = 256 if name == "bat_resnext26ts" else 128  # (its attention blocks divide a 256 input evenly)
        models[f"timm {name}"] = (lambda name=name: timm.create_model(name), (4, 3, size, size))
    return models


def bench_sweep(rounds: int, batches: int = 4) -> str:
    rows, ratios = [], []
    for name, (build, shape) in _sweep_models().items():
        torch.manual_seed(0)
        model = build().eval()
        if not any(isinstance(module, BatchNorm) for module in model.modules()):
            continue
        data = [torch.randn(shape) for _ in range(batches)]
        try:
            with torch.no_grad():
                model(data[0])
        except Exception as exc:  # an input size the architecture does not take: reported, not timed
            print(f"  sweep {name}: left out, fails at {'x'.join(map(str, shape))}: {str(exc)[:80]}", file=sys.stderr)
            continue
        _, cpu = _plain_and_sequential(model, data, rounds)
        ratio = statistics.median(cpu["sequential"]) / statistics.median(cpu["plain"])
        ratios.append(ratio)
        rows.append([name, "x".join(map(str, shape)), len(calibration_report(model).calibrated),
                     f"{statistics.median(cpu['plain']) * 1e3:.0f}", f"{ratio:.2f}"])
        print(f"  sweep {name}: {ratio:.2f}x", file=sys.stderr, flush=True)
    ordered = sorted(ratios)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    above = [row[0] for row, ratio in zip(rows, ratios) if ratio > 2]
    summary = (f"\n\n{len(ratios)} models: median {statistics.median(ratios):.2f}x, 90th percentile {p90:.2f}x, "
               f"max {max(ratios):.2f}x ({rows[ratios.index(max(ratios))][0]}); above 2x: {', '.join(above) or 'none'}")
    header = ["model", "batch", "layers", "plain eval ms (CPU)", "sequential / plain (CPU time)"]
    return (f"{batches} batches per model, CPU, medians of {rounds} interleaved rounds\n\n" + table(header, rows)
            + summary)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (set explicitly; default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["throughput", "exactness", "accuracy", "sequential", "fast"])
    parser.add_argument("--sweep", action="store_true", help="also the sequential cost over a sweep of architectures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# normswap recalibrate benchmark\n\ntorch {torch.__version__}, timm {timm.__version__}, "
          f"{args.threads} CPU thread(s)" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    if "throughput" not in args.skip:
        print("\n## Throughput (CPU)\n")
        print(bench_throughput(torch.device("cpu"), args.rounds, batch=16, size=128, count=4), flush=True)
        if torch.cuda.is_available():
            cuda = torch.device("cuda")
            print("\n## Throughput (CUDA)\n")
            print(bench_throughput(cuda, args.rounds, batch=64, size=224, count=20), flush=True)
            print()
            print(bench_throughput(cuda, args.rounds, batch=64, size=224, count=20, amp=True, channels_last=True),
                  flush=True)
    if "exactness" not in args.skip:
        print("\n## Exactness\n")
        print(bench_exactness(), flush=True)
    if "accuracy" not in args.skip:
        print("\n## Accuracy recovered after a domain shift\n")
        print(bench_accuracy(), flush=True)
    if "sequential" not in args.skip:
        print("\n## Sequential recalibration: cost on the models users bring\n")
        print(bench_sequential(args.rounds), flush=True)
    if "fast" not in args.skip:
        print("\n## Sequential recalibration: small, fast models and resnet50, in one run\n")
        print(bench_fast(args.rounds), flush=True)
    if args.sweep:
        print("\n## Sequential recalibration over a sweep of architectures\n")
        print(bench_sweep(args.rounds), flush=True)


if __name__ == "__main__":
    main()
