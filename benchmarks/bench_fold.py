"""Benchmark of folding: coverage on the models users bring, exactness, and the folded model's forward time.

Three tables, printed as markdown:

1. Coverage: for each model (randomly initialised, BatchNorm statistics randomized), its BatchNorm layers (also
   third-party frozen ones, such as DETR's), how many ``normswap.fold`` folds (planning on the example input its
   architecture gives), how many the library's own fuse folds (ultralytics' ``model.fuse()``) or, where the model
   traces, ``torch.fx.experimental.optimization.fuse``, and the largest relative difference of the folded model's
   output from the unfused eval model's (detection models: of the backbone features, which hold every BatchNorm),
   beside the model's own float32-vs-float64 difference (float16 for the half-precision model), and what planning
   costs: the fastest plan over the fastest eval forward of the same example, in 5 to 15 interleaved rounds (as many
   as fit in 10 s) after a warm-up of each, in CPU seconds of the process (other processes' load does not inflate
   them), measured in three new processes one after another: the median and the range.
2. Forward time: folded against BatchNorm eval forward of YOLOv8n at 640x640 and timm resnet50 at 224x224, timed
   in interleaved rounds in the same run (the ratio of medians is the figure).
3. With ``--capture``: how the graph is captured. For each model, seconds for normswap's capture (one recorded
   eager forward), ``torch.export.export(strict=False)`` and ``make_fx`` (real tensors), or how they fail; a
   plain eval forward for scale.

Usage::

    python benchmarks/bench_fold.py [--threads 2] [--rounds 15] [--skip coverage time] [--channels-last] [--capture]
                                    [--processes 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Optional

import timm
import torch
import torchvision
from torch import nn

from normswap.data import call_model, move_input, output_tensors
from normswap.fold import plan_fold
from normswap.graph import capture, find_example
from normswap.targets import classify


def is_batch_norm(module: nn.Module) -> bool:
    """A BatchNorm-like layer of any class normswap sees (third-party frozen ones included)."""
    kind = classify(module)
    return kind is not None and kind.foldable


def yolo(config: str) -> nn.Module:
    from ultralytics import YOLO

    return YOLO(config).model


def transformers_model(name: str) -> nn.Module:
    import transformers

    return getattr(transformers, f"{name}Model")(getattr(transformers, f"{name}Config")())


def smp_model(name: str) -> nn.Module:
    import segmentation_models_pytorch as smp

    return getattr(smp, name)(encoder_weights=None)


def transformers_configured(name: str, **config: Any) -> nn.Module:
    import transformers

    return getattr(transformers, name)(getattr(transformers, name.split("For")[0] + "Config")(**config))


def torchvision_model(module: str, name: str, **kwargs: Any) -> nn.Module:
    return getattr(getattr(torchvision.models, module) if module else torchvision.models, name)(weights=None,
                                                                                                 **kwargs)


def smp_encoder(name: str, encoder: str) -> nn.Module:
    import segmentation_models_pytorch as smp

    return getattr(smp, name)(encoder, encoder_weights=None)


def monai_net(name: str, **kwargs: Any) -> nn.Module:
    from monai.networks import nets

    return getattr(nets, name)(**kwargs)


def detection(name: str) -> nn.Module:
    return getattr(torchvision.models.detection, name)(weights=None, weights_backbone=None)


def dynunet() -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                   upsample_kernel_size=[2, 2], norm_name="batch")


MODELS: dict[str, Callable[[], nn.Module]] = {
    "ultralytics YOLOv8n": lambda: yolo("yolov8n.yaml"),
    "ultralytics YOLO11n": lambda: yolo("yolo11n.yaml"),
    "transformers ResNet-50": lambda: transformers_model("ResNet"),
    "transformers MobileNetV2": lambda: transformers_model("MobileNetV2"),
    "transformers RegNet": lambda: transformers_model("RegNet"),
    "smp FPN (resnet34)": lambda: smp_model("FPN"),
    "smp DeepLabV3Plus (resnet34)": lambda: smp_model("DeepLabV3Plus"),
    "torchvision Faster R-CNN R50-FPN": lambda: detection("fasterrcnn_resnet50_fpn"),
    "torchvision Mask R-CNN R50-FPN": lambda: detection("maskrcnn_resnet50_fpn"),
    "torchvision Keypoint R-CNN R50-FPN": lambda: detection("keypointrcnn_resnet50_fpn"),
    "torchvision RetinaNet R50-FPN": lambda: detection("retinanet_resnet50_fpn"),
    "torchvision FCOS R50-FPN": lambda: detection("fcos_resnet50_fpn"),
    "torchvision Faster R-CNN MobileNetV3-FPN": lambda: detection("fasterrcnn_mobilenet_v3_large_fpn"),
    "torchvision SSDlite MobileNetV3": lambda: detection("ssdlite320_mobilenet_v3_large"),
    "torchvision r3d_18": lambda: torchvision.models.video.r3d_18(),
    "torchvision mc3_18": lambda: torchvision.models.video.mc3_18(),
    "MONAI DynUNet (3-D, 3 levels)": dynunet,
    "timm resnet50": lambda: timm.create_model("resnet50"),
    "timm efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
    "timm densenet121": lambda: timm.create_model("densenet121"),
    "ultralytics YOLOv8n fp16": lambda: yolo("yolov8n.yaml").half(),
    "transformers DETR (ResNet-50, own frozen BN)": lambda: transformers_configured(
        "DetrForObjectDetection", use_timm_backbone=False, use_pretrained_backbone=False),
    "transformers LeViT-128S": lambda: transformers_configured("LevitForImageClassification"),
    "transformers MobileViT-S": lambda: transformers_configured("MobileViTForImageClassification"),
    "transformers EfficientNet-B0": lambda: transformers_configured(
        "EfficientNetForImageClassification", image_size=224, width_coefficient=1.0, depth_coefficient=1.0,
        hidden_dim=1280),
    "torchvision DeepLabV3 R50": lambda: torchvision_model("segmentation", "deeplabv3_resnet50",
                                                            weights_backbone=None),
    "torchvision FCN R50": lambda: torchvision_model("segmentation", "fcn_resnet50", weights_backbone=None),
    "torchvision LRASPP MobileNetV3": lambda: torchvision_model("segmentation", "lraspp_mobilenet_v3_large",
                                                                 weights_backbone=None),
    "torchvision quantizable resnet18": lambda: torchvision_model("quantization", "resnet18", quantize=False),
    "torchvision RAFT large": lambda: torchvision_model("optical_flow", "raft_large"),
    "torchvision r2plus1d_18": lambda: torchvision_model("video", "r2plus1d_18"),
    "torchvision S3D": lambda: torchvision_model("video", "s3d"),
    "smp FPN (efficientnet-b0)": lambda: smp_encoder("FPN", "efficientnet-b0"),
    "smp Unet++ (resnet34)": lambda: smp_model("UnetPlusPlus"),
    "smp Linknet (mobilenet_v2)": lambda: smp_encoder("Linknet", "mobilenet_v2"),
    "smp PSPNet (resnet34)": lambda: smp_model("PSPNet"),
    "smp PAN (resnet34)": lambda: smp_model("PAN"),
    "smp MAnet (resnet34)": lambda: smp_model("MAnet"),
    "smp UPerNet (resnet34)": lambda: smp_model("UPerNet"),
    "MONAI BasicUNet (2-D)": lambda: monai_net("BasicUNet", spatial_dims=2, in_channels=1, out_channels=2,
                                                norm="batch"),
    "MONAI AttentionUnet (2-D)": lambda: monai_net("AttentionUnet", spatial_dims=2, in_channels=1, out_channels=2,
                                                    channels=(16, 32, 64), strides=(2, 2)),
    "MONAI VNet (3-D)": lambda: monai_net("VNet", spatial_dims=3, in_channels=1, out_channels=2),
    "MONAI HighResNet (2-D)": lambda: monai_net("HighResNet", spatial_dims=2, in_channels=1, out_channels=2,
                                                 norm_type="batch"),
}


def randomized(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with non-trivial running statistics and affine values."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if is_batch_norm(module):
                for name, low, high in (("running_mean", -0.5, 0.5), ("running_var", 0.5, 2.0),
                                        ("weight", 0.5, 1.5), ("bias", -0.3, 0.3)):
                    tensor = getattr(module, name, None)
                    if isinstance(tensor, torch.Tensor):
                        tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=gen))
    return model.eval()


def count_norms(model: nn.Module) -> int:
    return sum(is_batch_norm(m) for m in model.modules())


def relative_difference(got: Any, expected: Any) -> float:
    return max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
               for a, b in zip(output_tensors(got), output_tensors(expected)) if a.is_floating_point())


def compared_output(model: nn.Module, example: Any) -> Any:
    """What the comparison runs: the model, or a detection model's backbone features (NMS thresholds would turn
    float rounding into different boxes)."""
    if hasattr(model, "backbone") and hasattr(model, "transform"):
        batch, _ = model.transform(example)
        return model.backbone(batch.tensors)
    return call_model(model, example)


def library_fuse(name: str, model: nn.Module, example: Any) -> str:
    """BatchNorm layers folded by ultralytics' own fuse, or by torch.fx's fuse, or how that fails."""
    model = copy.deepcopy(model)
    before = count_norms(model)
    if name.startswith(("transformers DETR", "torchvision RAFT")) or "fp16" in name:
        return "-"
    if name.startswith("ultralytics"):
        model.fuse(verbose=False)
        return f"{before - count_norms(model)} (ultralytics fuse)"
    from torch.fx.experimental.optimization import fuse

    try:
        fused = fuse(model)
    except Exception as exc:  # untraceable models: the point of the column
        return f"fails ({type(exc).__name__}, torch.fx fuse)"
    # what is left: BatchNorm modules the graph calls, and BatchNorm functions of the modules it traced through
    # (timm's BatchNormAct2d, torchvision's FrozenBatchNorm2d)
    left = sum(1 for node in fused.graph.nodes
               if (node.op == "call_module" and is_batch_norm(fused.get_submodule(node.target)))
               or (node.op == "call_function" and getattr(node.target, "__name__", "") == "batch_norm"))
    frozen = sum(1 for m in model.modules() if isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d))
    return f"{before - left - frozen} (torch.fx fuse)"


def bench_coverage(names: list[str], threads: int, processes: int) -> str:
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = randomized(MODELS[name]())
        example = find_example(model)
        with torch.no_grad():
            call_model(model, example.value)
            plan = plan_fold(copy.deepcopy(model))
        folded = plan.apply(copy.deepcopy(model))
        with torch.no_grad():
            expected = compared_output(model, example.value)
            error = relative_difference(compared_output(folded, example.value), expected)
            wider = torch.float32 if next(model.parameters()).dtype == torch.float16 else torch.float64
            try:
                in_wider = compared_output(copy.deepcopy(model).to(wider),
                                           move_input(example.value, None, dtype=wider))
                rounding = f"{relative_difference(expected, in_wider):.1e}"
            except RuntimeError:  # RAFT builds float32 coordinate grids whatever the model's dtype
                rounding = "n/a"
        reasons = sorted({layer.reason for layer in plan.left})
        timings = [planning_in_a_new_process(name, threads) for _ in range(processes)]
        ratios = sorted(ratio for ratio, _ in timings)
        spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
        rows.append([name, plan.layers, len(plan), library_fuse(name, model, example.value), f"{error:.1e}",
                     rounding, str(example), f"{statistics.median(seconds for _, seconds in timings):.2f}",
                     f"{statistics.median(ratios):.2f}{spread}", "; ".join(reasons)[:120]])
        print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    header = ["model", "BatchNorm layers", "folded by normswap", "folded by the library's / torch.fx fuse",
              "max relative error", "own rounding", "example input", "plan s",
              f"plan / eval forward (median{' and range' if processes > 1 else ''} of {processes} processes)",
              "left because"]
    return table(header, rows)


def planning_ratio(name: str) -> tuple[float, float]:
    """The planning figure of one model in this process: the fastest plan over the fastest eval forward of the same
    example, in interleaved rounds after a warm-up of each (the plan on a copy taken after the warm-up forward, so
    both run with the caches an eval forward fills); and the fastest plan's seconds."""
    torch.manual_seed(0)
    model = randomized(MODELS[name]())
    example = find_example(model)
    forward_seconds: list[float] = []
    plan_seconds: list[float] = []
    with torch.no_grad():  # warm-up of both (the first plan in a process also looks up torch's function names)
        call_model(model, example.value)
        planned = copy.deepcopy(model)
        plan_fold(planned)
    while len(plan_seconds) < PLAN_ROUNDS[0] or (
            len(plan_seconds) < PLAN_ROUNDS[1] and sum(forward_seconds) + sum(plan_seconds) < ROUNDS_SECONDS):
        forward_seconds.append(time_call(lambda: call_model(model, example.value)))
        plan_seconds.append(time_call(lambda: plan_fold(planned)))
    return min(plan_seconds) / min(forward_seconds), min(plan_seconds)


def settle_the_allocator() -> None:
    """Free one 31 MB block first, as a process that has loaded a checkpoint has. glibc's malloc sets its thresholds
    from the largest block freed so far (up to 32 MB) and hands memory back to the system whenever more than twice
    that lies free at the top of its heap. A process that builds its model at random may have freed no large block;
    then every forward and every plan gives back the pages of its activations and faults them in again (thousands of
    page faults a round: LeViT's planning figure 1.54-1.57 where it is 1.44-1.49 otherwise), and which processes do
    depends on what happened to be freed while the model was built. The forwards and the plans both run settled."""
    torch.empty(31 * 2**20 // 4).fill_(0)


def planning_in_a_new_process(name: str, threads: int) -> tuple[float, float]:
    """:func:`planning_ratio` in a new Python process (see :data:`PLAN_PROCESSES`)."""
    done = subprocess.run([sys.executable, __file__, "--threads", str(threads), "--planning-of", name],
                          capture_output=True, text=True, check=True)
    ratio, seconds = json.loads(done.stdout.strip().splitlines()[-1])
    return ratio, seconds


PLAN_PROCESSES = 3
"""New processes the planning figure is measured in, one after another; the table gives their median and range.
The figure is steady within a process and moves between processes (the allocator's state, see
:func:`settle_the_allocator`); a new process is also how it is met in use: one model planned in a process, not the
fortieth."""

PLAN_ROUNDS = (5, 15)
"""Interleaved rounds of one eval forward and one plan, at least and at most: the fastest of each make the planning
figure. As many as fit in :data:`ROUNDS_SECONDS`: a 30 ms forward gets 15, a detector's 1.5 s forward 5. A round now
and then pays for a garbage collection of the whole process (tens of ms with transformers, timm and ultralytics
imported), so five rounds of a fast model can miss its floor by 0.05."""

ROUNDS_SECONDS = 10.0


def time_call(fn: Callable[[], Any]) -> float:
    """CPU seconds of this process one call of ``fn`` takes, without gradients: unlike wall time, not inflated by
    other processes on a shared machine (with one thread the two agree on a quiet one)."""
    start = time.process_time()
    with torch.no_grad():
        fn()
    return time.process_time() - start


def time_forward(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return time.perf_counter() - start


def bench_time(rounds: int, channels_last: bool = False) -> str:
    rows = []
    for name, build, shape in (("ultralytics YOLOv8n", lambda: yolo("yolov8n.yaml"), (1, 3, 640, 640)),
                               ("timm resnet50", lambda: timm.create_model("resnet50"), (4, 3, 224, 224))):
        torch.manual_seed(0)
        original = randomized(build())
        plan = plan_fold(copy.deepcopy(original))
        folded = plan.apply(copy.deepcopy(original))
        x = torch.randn(shape)
        if channels_last:
            original, folded = (m.to(memory_format=torch.channels_last) for m in (original, folded))
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            error = relative_difference(folded(x), original(x))
        models = {"bn": original, "folded": folded}
        if name.startswith("ultralytics"):
            models["library"] = copy.deepcopy(original).fuse(verbose=False)
        for _ in range(2):
            for model in models.values():
                time_forward(model, x)
        times: dict[str, list[float]] = {key: [] for key in models}
        for _ in range(rounds):
            for key, model in models.items():
                times[key].append(time_forward(model, x))
        median = {key: statistics.median(measured) for key, measured in times.items()}
        library = f"{median['library'] / median['bn']:.3f}" if "library" in median else "-"
        rows.append([name, "x".join(map(str, shape)), f"{len(plan)}/{plan.layers}", f"{median['bn'] * 1000:.1f}",
                     f"{median['folded'] * 1000:.1f}", f"{median['folded'] / median['bn']:.3f}", library,
                     f"{error:.1e}"])
    header = ["model", "input", "folded", "BatchNorm eval ms (median)", "folded ms (median)", "folded / BatchNorm",
              "library fuse / BatchNorm", "max relative error"]
    layout = ", models and input channels-last" if channels_last else ""
    return f"{rounds} interleaved rounds after 2 warm-up, inference mode{layout}\n\n" + table(header, rows)


def seconds_or_failure(fn: Callable[[], Any]) -> str:
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except Exception as exc:  # the point of the table: which capture fails, and how
        return f"fails ({type(exc).__name__}) after {time.perf_counter() - start:.1f}"
    return f"{time.perf_counter() - start:.2f}"


def bench_capture(names: list[str]) -> str:
    from torch.fx.experimental.proxy_tensor import make_fx

    rows = []
    for name in names:
        torch.manual_seed(0)
        model = MODELS[name]().eval()
        example = find_example(model).value
        args, kwargs = ((), example) if isinstance(example, dict) else ((example,), {})
        with torch.no_grad():
            call_model(model, example)
            forward = seconds_or_failure(lambda: call_model(model, example))
            recorded = seconds_or_failure(lambda: capture(model, example))
            exported = seconds_or_failure(lambda: torch.export.export(model, args, kwargs, strict=False))
            traced = seconds_or_failure(lambda: make_fx(lambda *a: model(*a, **kwargs), tracing_mode="real",
                                                        record_module_stack=True)(*args))
        rows.append([name, forward, recorded, exported, traced])
        print(f"  capture {name}", file=sys.stderr, flush=True)
    header = ["model", "eval forward s", "normswap capture s", "torch.export (strict=False) s", "make_fx (real) s"]
    return table(header, rows)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (set explicitly; default 2)")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS), metavar="MODEL")
    parser.add_argument("--skip", nargs="*", default=[], choices=["coverage", "time"])
    parser.add_argument("--channels-last", action="store_true", help="time the models in channels-last layout")
    parser.add_argument("--capture", action="store_true", help="also compare ways of capturing the graph")
    parser.add_argument("--processes", type=int, default=PLAN_PROCESSES,
                        help=f"new processes to measure each planning figure in (default {PLAN_PROCESSES})")
    parser.add_argument("--planning-of", choices=list(MODELS), metavar="MODEL",
                        help="print one model's planning figure in this process, as JSON, and nothing else")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settle_the_allocator()
    if args.planning_of:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            print(json.dumps(planning_ratio(args.planning_of)))
        return
    print(f"# normswap fold benchmark\n\ntorch {torch.__version__}, timm {timm.__version__}, "
          f"torchvision {torchvision.__version__}, {torch.get_num_threads()} CPU thread(s)")
    if "coverage" not in args.skip:
        print("\n## Coverage and exactness\n")
        print(bench_coverage(args.models, args.threads, args.processes), flush=True)
    if "time" not in args.skip:
        print("\n## Folded against BatchNorm eval forward time (CPU)\n")
        print(bench_time(args.rounds, args.channels_last), flush=True)
    if args.capture:
        print("\n## Capturing the graph\n")
        print(bench_capture(args.models), flush=True)


if __name__ == "__main__":
    main()
