"""Label-free refinement: distilling the original model into its converted copy on unlabeled data.

A BatchNorm model converted to GroupNorm (LayerNorm-, InstanceNorm-style) keeps most of its function with fitted
affine weights (:mod:`normswap.fit`), but not all of it. :func:`refine` closes most of the rest of the gap with the
same unlabeled calibration data: it trains the converted model (the student) to reproduce the original's outputs
(the teacher) with Adam and a cosine learning-rate schedule over ``steps``, and needs no labels. Unless ``steps`` is
given, the run makes :data:`AUTO_EPOCHS` passes over the training samples (at least and at most
:data:`AUTO_STEPS`).

- ``loss="kl"`` (default): the KL divergence between the two models' class distributions (``softmax`` over dim 1 of
  the main output: a tensor, the first tensor of a tuple, or a dict's ``logits``), per sample or per pixel;
  ``"mse"``: the mean squared error of every floating-point output tensor, relative to that output's mean square;
  ``"features"``: the output loss (KL where the output has classes, else MSE) plus the relative mean squared error
  of every norm layer's output, averaged over the layers that both models have under the same name, weighted by
  ``feature_weight``. With 256 unlabeled images (``benchmarks/bench_fit.py``), matching the norm layers' outputs
  helped a timm resnet18 at 32 groups (top-1 agreement 98.9% against 98.2% for the logits alone) and not the small
  demo model (97.8% against 98.4% at 8 groups, 96.9% for both at 32), so ``"kl"`` stays the default.
- A held-out slice of the calibration data (``holdout=``, drawn at random with ``seed``; by default a fifth where
  the rest still holds every sample the run draws, else none, and the run follows its fixed schedule) measures the
  top-1 agreement of the two models (where the output has classes along dim 1), the output loss (the KL
  divergence, or the relative MSE) and the relative output error ``‖y - y_original‖² / ‖y_original‖²``, before
  training and every ``eval_every`` steps. The student ends as the best state measured (lowest output loss, then
  highest agreement), which may be its starting state: refinement never leaves the model worse on the holdout than
  it found it. Training stops early once ``patience`` evaluations in a row bring no lower loss. The loss decides,
  not the agreement: on the 51 held-out images of 256, one image is two points of agreement, and choosing on
  agreement kept early states while the holdout loss still fell.
- Where the run draws more samples than the training data holds (it sees each image more than once), the training
  batches are shifted by the largest offset the original's answers survive (``augment="auto"``): a shifted image
  shows the converted model more of the original's function only where the original answers it as it answers the
  image itself. The original's output on each image at each offset is computed the first time the run meets that
  pair and kept (where it takes no more memory than the training inputs), so a long run mostly trains on outputs
  already computed.
- Both models run in eval mode: dropout is off, and the BatchNorm layers the conversion kept use (and keep) their
  running statistics. Only the trainable parameters (``trainable=``) change; every other parameter and buffer,
  every training flag and ``requires_grad`` flag, and the student's device are as before afterwards. What an eval
  forward caches (LeViT's attention biases, from the weights as they were) is emptied by the student's own
  ``train()`` before the run and put back so before each of the student's forwards and at the end
  (:func:`normswap.model_state.caches`).
- The original model is never changed: not its weights, not its flags, not its device (when it is not on the device
  the student runs on, a copy of it is moved there). A student that shares parameters with it is refused.
- Failures restore the student exactly as it was. Ctrl-C stops the training: the student is then the best state
  measured so far (or unchanged, if none was better), and the report says so.
- Under ``torch.distributed`` (``torchrun``), every process passes its own shard of the data and the student trains
  data-parallel with ``DistributedDataParallel`` (gradients averaged over the processes; the processes start from
  rank 0's weights). Each process holds out part of its shard; the holdout figures are summed over the processes,
  so every held-out sample is measured once and every process makes the same choices and ends with the same weights.
  A failure on one process is an error on all of them; Ctrl-C there (which reaches every process) restores the
  student and is raised, since the processes cannot agree on a step to stop at.

The calibration inputs are read once and held in memory (bound them with ``batches``). Where the inputs of all
batches can be joined along their first dimension (tensors, tuples and dicts of tensors of one shape per sample),
they are pooled sample by sample and re-batched at random (``batch_size``); otherwise each batch is used as it came.
The original's outputs on the pooled training samples are computed once, before the first step, and kept where they
take no more memory than the inputs (class scores do; per-pixel outputs of a segmentation model may not): a step is
then the student's forward and backward alone, as in a labeled fine-tune. Otherwise each step runs the original
on its batch first (on shifted images: on the images of the batch it has not yet seen at the batch's offset), without
gradients. After the first steps refine logs (and its progress bar shows) how long the
whole run will take on this device.

The run is recorded in the student's history (a value-only step: ``normswap.load`` needs nothing to rebuild a
refined model), and :func:`refine_report` reads it back.

Example::

    >>> import copy, torch, normswap
    >>> _ = torch.manual_seed(0)
    >>> original = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
    ...                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    >>> images = [torch.randn(16, 3, 12, 12) for _ in range(4)]
    >>> converted = normswap.convert(copy.deepcopy(original), "gn", groups=4, affine="fit", data=images)
    >>> converted = normswap.refine(converted, original, images, steps=20, progress=False)
    >>> report = normswap.refine_report(converted)
    >>> report.steps, report.holdout_samples, report.kept  # 64 samples: no holdout, the fixed schedule
    (20, 0, 'last')
    >>> converted = normswap.refine(converted, original, images, steps=20, holdout=0.2, progress=False)
    >>> report = normswap.refine_report(converted)
    >>> report.steps <= 20, report.holdout_samples, report.kept in ("best", "unchanged")
    (True, 13, True)
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data import batch_size_of, call_model, iter_inputs, main_output, output_tensors
from .distributed import PeerFailure, Ranks
from .placement import Device, Placement
from .progress import progress_bar
from .deprecation import renamed_keywords, warn_deprecated
from .errors import CalibrationError, RefineError
from .history import record_step, required_step
from .model_state import Containers, caches, training_flags
from .targets import is_norm_layer
from .unwrap import unwrapped
from .walk import find_modules, model_device

__all__ = ["LOSSES", "RefineReport", "refine", "refine_report"]

log = logging.getLogger("normswap")

LOSSES = ("kl", "mse", "features")
"""Every value ``loss=`` accepts."""

AUGMENTS = ("auto", "shift", None)
"""Every value ``augment=`` accepts."""

AUTO_EPOCHS = 75
"""``steps=None`` runs this many passes over the training samples (batches, where the data is not pooled), within
:data:`AUTO_STEPS`: 1,575 steps of 64 for the demo's 1,348 training digits, 300 for 256, the fewest (200) below 192."""

AUTO_STEPS = (200, 2000)
"""The fewest and the most steps ``steps=None`` runs."""

AUTO_HOLDOUT = 0.2
"""The share ``holdout="auto"`` holds out, where the rest still holds every sample the run draws."""


Trainable = Union[str, Sequence[str]]



@dataclass
class RefineReport:
    """What one :func:`refine` run did.

    ``agreement_*`` is the top-1 agreement with the original on the holdout (``None`` where the output has no classes
    along dim 1 or there is no holdout), ``loss_*`` the output loss there (the KL divergence, or the relative MSE for
    ``loss="mse"`` and outputs without classes) and ``error_*`` the relative output error; ``*_before`` is measured
    before training, ``*_after`` on the state kept. ``kept`` is ``"best"`` (the best state measured, reached at
    ``best_step``), ``"unchanged"`` (no state measured better than the starting one, or interrupted before one was)
    or ``"last"`` (no holdout to measure on: the state after the last step). ``stopped`` is ``"steps"`` (all
    ``max_steps`` run), ``"early"`` (``patience`` evaluations without improvement) or ``"interrupted"`` (Ctrl-C).
    ``evaluations`` lists every measurement: ``{"step", "agreement", "loss", "error"}``. ``augment`` is what the
    run did to the training images (``"shift"`` or ``None``; ``"auto"`` is settled before the first step), ``shift``
    the most it translated them by, ``[height, width]`` in pixels.
    """

    loss: str
    trainable: str
    parameters: int
    steps: int
    max_steps: int
    lr: float
    batch_size: Optional[int]
    seed: int
    train_samples: int
    holdout_samples: int
    world_size: int = 1
    augment: Optional[str] = None
    shift: Optional[list[int]] = None
    agreement_before: Optional[float] = None
    agreement_after: Optional[float] = None
    loss_before: Optional[float] = None
    loss_after: Optional[float] = None
    error_before: Optional[float] = None
    error_after: Optional[float] = None
    best_step: int = 0
    kept: str = "unchanged"
    stopped: str = "steps"
    seconds: float = 0.0
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        processes = f" over {self.world_size} processes" if self.world_size > 1 else ""
        batch = f" of {self.batch_size}" if self.batch_size else ""
        if self.augment == "shift" and self.shift:
            batch += f" (images shifted by up to {self.shift[0]}x{self.shift[1]} pixels)"
        lines = [f"refine ({self.loss}, {self.trainable}: {self.parameters:,} parameters): {self.steps} of "
                 f"{self.max_steps} step(s){batch} on {self.train_samples} sample(s){processes}, "
                 f"holdout {self.holdout_samples} sample(s), {self.seconds:.1f} s"]
        measured = []
        if self.agreement_before is not None:
            measured.append(f"top-1 agreement {self.agreement_before:.2%} -> {self.agreement_after:.2%}")
        if self.loss_before is not None:
            measured.append(f"loss {self.loss_before:.4g} -> {self.loss_after:.4g}")
        if self.error_before is not None:
            measured.append(f"relative output error {self.error_before:.4g} -> {self.error_after:.4g}")
        if measured:
            lines.append("holdout: " + ", ".join(measured))
        stop = {"steps": "ran every step", "early": "stopped early (no improvement on the holdout)",
                "interrupted": f"interrupted at step {self.steps}"}[self.stopped]
        kept = {"best": f"kept the best state (step {self.best_step})",
                "unchanged": "kept the model unchanged (no state measured better)",
                "last": "kept the last state (no holdout to measure on)"}[self.kept]
        lines.append(f"{stop}; {kept}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (what the model's history stores); :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RefineReport":
        """The report ``to_dict`` wrote."""
        return cls(**{key: value for key, value in data.items() if key != "op"})


def refine_report(model: nn.Module) -> RefineReport:
    """The report of the last :func:`refine` run on ``model``, read from its history.

    >>> import torch
    >>> refine_report(torch.nn.Linear(2, 2))
    Traceback (most recent call last):
        ...
    normswap.errors.NormswapError: this model has not been refined: run normswap.refine(model, original, data)
    """
    return RefineReport.from_dict(required_step(
        model, "refine", "this model has not been refined: run normswap.refine(model, original, data)"))


@renamed_keywords(converted="model")
def refine(
    model: nn.Module,
    original: nn.Module,
    data: Iterable[Any],
    *,
    steps: Optional[int] = None,
    lr: float = 1e-3,
    trainable: Trainable = "all",
    loss: str = "kl",
    device: Device = None,
    amp: Union[bool, torch.dtype] = False,
    holdout: Union[float, int, str] = "auto",
    batch_size: int = 64,
    batches: Optional[int] = None,
    eval_every: Optional[int] = None,
    patience: Optional[int] = 4,
    temperature: float = 1.0,
    feature_weight: float = 1.0,
    augment: Optional[str] = "auto",
    seed: int = 0,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
    progress: Optional[bool] = None,
    distributed: Optional[bool] = None,
    process_group: Any = None,
    return_report: bool = False,
) -> Union[nn.Module, RefineReport]:
    """Train ``model`` to reproduce ``original``'s outputs on the unlabeled ``data``, in place; returns ``model``.

    Args:
        model: the model to refine (the student; the old keyword name ``converted=`` still works, with a
            ``DeprecationWarning``), e.g. ``normswap.convert(copy.deepcopy(model), "gn", affine="fit", data=...)``;
            wrappers (``torch.compile``, DDP, DataParallel, EMA: :mod:`normswap.unwrap`) are looked through, here
            and in ``original``.
        original: the model to reproduce (the teacher); never changed.
        data: calibration batches, see :mod:`normswap.data`: tensors, ``(input, ...)`` tuples (labels are ignored),
            dicts, or anything with ``input_fn``. Read once and held in memory. Under ``torch.distributed``, each
            process passes its own shard.
        steps: the most optimizer steps to run. ``None`` (default): :data:`AUTO_EPOCHS` passes over the training
            samples (``75 * samples // batch_size``; the batches, where the data is not pooled; over all
            processes), at least 200 and at most 2,000 (:data:`AUTO_STEPS`). A distillation that ends while the
            student still learns the original's function off the training images stops short: on the demo model
            with all 1,348 training digits at 32 groups, top-1 agreement on the test digits was 98.4% after 200
            steps (images as they are), 98.96% after 800 and 99.03% after 1,575 (shifted; means of three seeds;
            ``benchmarks/bench_fit.py``). 200 steps take about 2 s for the demo model (8×8 digits) and 30 s for a
            timm resnet18 at 32×32, batches of 64 on 2 CPU cores; the time grows in proportion to ``steps`` and
            ``batch_size``, and refine logs its own estimate after the first steps.
        lr: Adam's learning rate.
        trainable: ``"all"`` parameters of ``model``, only those of its ``"norm"`` layers (GroupNorm, LayerNorm,
            InstanceNorm and BatchNorm weights and biases), or glob patterns over parameter names
            (``["layer4.*", "fc.*"]``).
        loss: ``"kl"``, ``"mse"`` or ``"features"`` (see the module documentation).
        device: where to train (``"cuda"``): the student is moved there and back. Default: where it is.
        amp: run the forward passes under autocast (``True``: bfloat16 where supported, else float16 with gradient
            scaling; or a dtype); losses are computed in float32.
        holdout: the share of the calibration samples held out to measure agreement (a fraction below 1), or their
            number (an int; batches, where the data cannot be pooled sample by sample). ``0``: no holdout, no
            early stopping, the last state is kept. ``"auto"`` (default): 0.2 where the other four fifths still
            hold every sample the run draws (``steps * batch_size``, over all processes; ``steps`` batches where
            the data is not pooled), so the holdout takes nothing the training would have used; else 0, and a
            fixed schedule: with 256 images a holdout of 51 measures too coarsely to choose by, and with 1,348
            the demo model reached 99.3% / 98.4% agreement at 8 / 32 groups without one, 99.0% / 97.9% with
            a fifth held out (means of three seeds, ``benchmarks/bench_fit.py``).
        batch_size: samples per training batch, when the data is pooled sample by sample.
        batches: read at most this many batches of ``data``.
        eval_every: measure on the holdout every this many steps (default: an eighth of ``steps``).
        patience: stop after this many evaluations in a row without improvement (``None``: never stop early).
        temperature: softmax temperature of the KL loss.
        feature_weight: weight of the norm layers' feature loss in ``loss="features"``.
        augment: ``"shift"``: every training batch of images (a 4-D input) is translated by a random offset of up to
            an eighth of its height and width (edges repeated), the original's output computed for it (once per
            image and offset); ``None``: the images as they are; ``"auto"`` (default): where the run draws more
            samples than the training data holds (``steps * batch_size`` over all processes) and the output holds
            class scores per image, shifted by the largest offset (an eighth of each side, a sixteenth, ... one
            pixel) under which the original keeps its top-1 class on :data:`SHIFT_AGREEMENT` of the training
            images (measured before the first step), else ``None``. With all 1,348 demo training digits
            (1,575 steps), shifting gave 99.03% / 99.11% agreement at 32 / 8 groups.
            The demo model keeps 93% at one pixel (an eighth of 8×8) and gains from it with 256 images
            (98.9% / 98.5% agreement at 8 / 32 groups against 98.4% / 97.7%, means of three seeds); a timm
            resnet18 trained on centred digits at 32×32 keeps 68% at four pixels (shifted by them: 97.3%,
            unshifted 98.0%) and 92% at two (98.1%).
        seed: seeds the holdout split and the order of the training batches.
        input_fn, input_key: how to find the model input in a batch, as in :func:`normswap.data.iter_inputs`.
        progress: ``True`` shows a progress bar, ``False`` never; ``None`` shows one on a terminal for runs longer
            than two seconds.
        distributed: ``True``: refine across the processes of ``torch.distributed`` (data-parallel, each on its
            own shard); ``False``: this process alone, without any collective, even when ``torch.distributed`` is
            initialized (refining on rank 0 only); ``None`` (default): across the processes when there are more
            than one. Across processes, **every** rank of the group must call ``refine``; a failure or an
            interruption on one makes the others raise, naming it (see :mod:`normswap.distributed`).
        process_group: the ``torch.distributed`` group to refine across (default: the whole world).

        return_report: deprecated: return the :class:`RefineReport` instead of the model, as normswap 0.2 did;
            read it with ``refine_report(model)`` instead.

    Returns:
        ``model``, refined; :func:`refine_report` reads the :class:`RefineReport` recorded in its history.

    Raises:
        RefineError: an option is invalid, the two models are the same or share parameters, their outputs do not
            match in shape, ``loss="kl"`` on an output without classes, no parameter is trainable, or the loss
            becomes non-finite. ``model`` is then exactly as it was.
        CalibrationError: the data is empty or malformed.

    >>> import copy, torch, normswap
    >>> original = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).eval()
    >>> converted = normswap.convert(copy.deepcopy(original), "gn", groups=2)
    >>> converted = refine(converted, original, [torch.randn(32, 4) for _ in range(4)], steps=30, holdout=0.25,
    ...                    progress=False)
    >>> report = refine_report(converted)
    >>> report.loss_after <= report.loss_before
    True
    """
    options = _Options.check(steps, lr, loss, holdout, batch_size, eval_every, patience, temperature, feature_weight,
                             augment)
    student, teacher = unwrapped(model), unwrapped(original)
    _check_separate(student, teacher)
    selected, label = _trainable_parameters(student, trainable)
    start = time.perf_counter()
    run = Placement.resolve(student, device, amp, error=RefineError)
    ranks = _Ranks(distributed, process_group, run.device)
    with ranks.failing_together("reading the calibration data"):
        inputs = _read_inputs(data, batches, input_fn, input_key)
    units, per_step = ranks.sum([len(inputs), batch_size if inputs.pooled else 1])  # per_step: units a step draws
    if options.holdout == "auto":
        options.resolve_steps(units, per_step)  # from all the data, the holdout not yet known
        options.holdout = AUTO_HOLDOUT if (1 - AUTO_HOLDOUT) * units >= options.steps * per_step else 0
    with ranks.failing_together("holding out part of the calibration data"):
        train, held = _split(inputs, options.holdout, seed + ranks.rank)
    counts = ranks.sum([train.samples, held.samples])
    if not ranks.active and not len(train) and not len(held):
        raise CalibrationError("the calibration data is empty: refinement needs at least one batch")
    trained = ranks.gather(len(train))  # each process's training units
    if any(count == 0 for count in trained):
        raise RefineError("a process has no calibration data left to train on after the holdout: give every "
                          "process more data, or a smaller holdout=")
    training_units = sum(trained)
    options.resolve_steps(training_units, per_step)
    # "auto" shifts only where the run meets some training sample more than once
    options.augment = _resolve_augment(options.augment, train, options.steps * per_step > training_units)
    state = _State(student, teacher, selected, run)
    report = RefineReport(
        loss=loss, trainable=label, parameters=sum(p.numel() for p in selected), steps=0, max_steps=options.steps,
        lr=lr, batch_size=batch_size if train.pooled else None, seed=seed, train_samples=int(counts[0]),
        holdout_samples=int(counts[1]), world_size=ranks.size, augment=options.augment,
    )
    try:
        state.enter()
        with ranks.failing_together("training"):  # also a failure between the blocks inside (an optimizer step)
            _train(state, train, held, options, ranks, report, seed + ranks.rank, progress)
    except BaseException:
        state.restore_initial()
        raise
    finally:
        state.exit()
    report.seconds = round(time.perf_counter() - start, 3)
    record_step(student, {"op": "refine", **report.to_dict()})
    log.info("%s", report)
    if return_report:
        warn_deprecated("refine(return_report=True) is deprecated: refine returns the model, and "
                        "normswap.refine_report(model) its report", stacklevel=2)
        return report
    return model


@dataclass
class _Options:
    """The numeric options of :func:`refine`, checked."""

    steps: Optional[int]  # None until resolve_steps
    lr: float
    loss: str
    holdout: Union[float, int, str]
    batch_size: int
    eval_every: Optional[int]  # None until resolve_steps, where not given
    patience: Optional[int]
    temperature: float
    feature_weight: float
    augment: Optional[str] = None

    @classmethod
    def check(cls, steps: Optional[int], lr: float, loss: str, holdout: Union[float, int], batch_size: int,
              eval_every: Optional[int], patience: Optional[int], temperature: float,
              feature_weight: float, augment: Optional[str] = None) -> "_Options":
        if loss not in LOSSES:
            raise RefineError(f"unknown refinement loss '{loss}': choose kl, mse or features")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise RefineError(f"steps must be a positive integer (or None: chosen from the data), got {steps!r}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise RefineError(f"lr must be a positive number, got {lr!r}")
        valid_fraction = holdout == "auto" or isinstance(holdout, float) and 0 <= holdout < 1
        valid_count = isinstance(holdout, int) and not isinstance(holdout, bool) and holdout >= 0
        if not (valid_fraction or valid_count):
            raise RefineError(f"holdout must be a fraction in [0, 1), a number of samples or 'auto', got {holdout!r}")
        if batch_size < 1:
            raise RefineError(f"batch_size must be at least 1, got {batch_size}")
        if eval_every is not None and eval_every < 1:
            raise RefineError(f"eval_every must be at least 1, got {eval_every}")
        if patience is not None and patience < 1:
            raise RefineError(f"patience must be at least 1 (or None), got {patience}")
        if not temperature > 0:
            raise RefineError(f"temperature must be positive, got {temperature}")
        if not feature_weight >= 0:
            raise RefineError(f"feature_weight must be zero or positive, got {feature_weight}")
        if augment not in AUGMENTS:
            raise RefineError(f"unknown augment={augment!r}: choose 'auto', 'shift' or None")
        options = cls(steps, float(lr), loss, holdout, batch_size, eval_every, patience, float(temperature),
                      float(feature_weight), augment)
        if steps is not None:
            options.resolve_steps(0, 1)
        return options

    def resolve_steps(self, units: float, per_step: float) -> None:
        """Settle ``steps=None`` from the data: :data:`AUTO_EPOCHS` passes over ``units`` training units (samples,
        or batches where the data is not pooled; over all processes), ``per_step`` of them drawn by a step, within
        :data:`AUTO_STEPS`; and ``eval_every``, where not given, from the steps. Nothing changes once settled."""
        if self.steps is None:
            fewest, most = AUTO_STEPS
            self.steps = min(most, max(fewest, AUTO_EPOCHS * int(units // max(per_step, 1))))
        if self.eval_every is None:
            self.eval_every = max(1, self.steps // 8)


def _check_separate(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse a student that is the teacher or shares parameter memory with it: training would change both."""
    if student is teacher:
        raise RefineError("the converted model is the original model itself (convert works in place): convert a "
                          "copy, e.g. normswap.convert(copy.deepcopy(model), ...)")
    teacher_memory = {_storage(p) for p in teacher.parameters()}
    shared = [name for name, p in student.named_parameters() if _storage(p) in teacher_memory]
    if shared:
        raise RefineError(f"the converted model shares parameter '{shared[0]}' with the original, so refining it "
                          "would change the original too: convert a copy, e.g. copy.deepcopy(model)")


def _storage(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _is_norm(module: nn.Module) -> bool:
    """Norm layers whose weights ``trainable="norm"`` trains and whose outputs ``loss="features"`` matches."""
    return is_norm_layer(module) or isinstance(module, (nn.GroupNorm, nn.LayerNorm,
                                                        nn.modules.instancenorm._InstanceNorm))


def _trainable_parameters(model: nn.Module, trainable: Trainable) -> tuple[list[nn.Parameter], str]:
    """The parameters to train (each once) and how the report names the choice."""
    named = list(model.named_parameters())
    if trainable == "all":
        chosen, label = [p for _, p in named], "all"
    elif trainable == "norm":
        norm = {id(p) for found in find_modules(model, _is_norm) for p in found.module.parameters()}
        chosen, label = [p for _, p in named if id(p) in norm], "norm"
    else:
        patterns = [trainable] if isinstance(trainable, str) else list(trainable) if isinstance(
            trainable, (list, tuple)) else []
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise RefineError(f"trainable must be 'all', 'norm' or glob patterns over parameter names, got "
                              f"{trainable!r}")
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in named):
                raise RefineError(f"the trainable pattern '{pattern}' matches no parameter of the converted model "
                                  f"(names look like '{named[0][0] if named else 'weight'}')")
        chosen = [p for name, p in named if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
        label = ", ".join(patterns)
    chosen = [p for p in chosen if p.is_floating_point()]
    if not chosen:
        raise RefineError(f"trainable={trainable!r} selects no floating-point parameter of the converted model")
    return chosen, label


class _NotPoolable(Exception):
    """The batches' inputs cannot be joined along their first dimension."""


class _Inputs:
    """Model inputs held in memory: pooled (one structure whose tensors hold every sample along dim 0, indexed by
    sample) or, where that is impossible, the batches as they came (indexed by batch)."""

    def __init__(self, pool: Any, batches: Optional[list[Any]], samples: int, units: int) -> None:
        self.pool, self.batches, self.samples, self.units = pool, batches, samples, units

    @property
    def pooled(self) -> bool:
        return self.batches is None

    @classmethod
    def read(cls, inputs: list[Any]) -> "_Inputs":
        try:
            pool = _join(inputs)
            samples = _leading(pool)
            return cls(pool, None, samples, samples)
        except _NotPoolable:
            return cls(None, inputs, sum((batch_size_of(x) or 1) for x in inputs), len(inputs))

    def __len__(self) -> int:
        return self.units

    def subset(self, indices: torch.Tensor) -> "_Inputs":
        if self.pooled:
            return _Inputs(_take(self.pool, indices), None, len(indices), len(indices))
        chosen = [self.batches[i] for i in indices.tolist()]
        return _Inputs(None, chosen, sum((batch_size_of(x) or 1) for x in chosen), len(chosen))

    def chunks(self, size: int) -> Iterable[Any]:
        """Every input once, in order: batches of ``size`` samples, or the batches as they came."""
        if not self.pooled:
            yield from self.batches
            return
        for start in range(0, self.units, size):
            yield _take(self.pool, torch.arange(start, min(start + size, self.units)))

    def batch(self, indices: torch.Tensor) -> Any:
        """The training input made of these units (samples, or one batch)."""
        return _take(self.pool, indices) if self.pooled else self.batches[int(indices[0])]


def _read_inputs(data: Iterable[Any], batches: Optional[int], input_fn: Optional[Callable[[Any], Any]],
                 input_key: Optional[str]) -> _Inputs:
    inputs = [x for _, x in iter_inputs(data, batches=batches, input_fn=input_fn, input_key=input_key)]
    return _Inputs.read(inputs)


def _join(inputs: list[Any]) -> Any:
    """The inputs joined along dim 0 (tensors of one shape per sample; tuples, lists, dicts of them; equal others)."""
    if not inputs:
        return []
    first = inputs[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[1:] == first.shape[1:] for x in inputs):
            raise _NotPoolable
        return torch.cat(inputs)
    if isinstance(first, (tuple, list)):
        if not all(type(x) is type(first) and len(x) == len(first) for x in inputs):
            raise _NotPoolable
        return type(first)(_join([x[i] for x in inputs]) for i in range(len(first)))
    if isinstance(first, Mapping):
        if not all(isinstance(x, Mapping) and x.keys() == first.keys() for x in inputs):
            raise _NotPoolable
        return {key: _join([x[key] for x in inputs]) for key in first}
    if all(x is first or x == first for x in inputs):
        return first
    raise _NotPoolable


def _leading(pool: Any) -> int:
    """The number of samples in a pooled input: the common first dimension of its tensors."""
    sizes = {t.shape[0] for t in output_tensors(pool)}
    if len(sizes) != 1:
        raise _NotPoolable
    return sizes.pop()


def _take(pool: Any, indices: torch.Tensor) -> Any:
    if isinstance(pool, torch.Tensor):
        return pool[indices]
    if isinstance(pool, (tuple, list)):
        return type(pool)(_take(item, indices) for item in pool)
    if isinstance(pool, Mapping):
        return {key: _take(item, indices) for key, item in pool.items()}
    return pool


def _split(inputs: _Inputs, holdout: Union[float, int], seed: int) -> tuple[_Inputs, _Inputs]:
    """Training data and holdout, the holdout drawn at random (``seed``). An empty shard stays empty."""
    units = len(inputs)
    if isinstance(holdout, float):
        held = round(units * holdout)
        if holdout > 0 and units > 1:
            held = max(held, 1)
    else:
        held = holdout
    if units and held >= units:
        raise RefineError(f"holdout={holdout!r} leaves no calibration data to train on ({units} "
                          f"{'samples' if inputs.pooled else 'batches'}): give a smaller holdout or more data")
    order = torch.randperm(units, generator=torch.Generator().manual_seed(seed))
    return inputs.subset(order[held:].sort().values), inputs.subset(order[:held].sort().values)


# ----------------------------------------------------------------------------------------------------------------
# The models while the refinement runs.


class _State:
    """The student and teacher while refinement runs: placement, flags and the parameter values to come back to.

    ``enter`` puts both models in eval mode on the run device and makes exactly the selected parameters trainable;
    ``exit`` puts back every flag, the student's device and the caches of both (:func:`normswap.model_state.caches`).
    ``initial`` holds the selected parameters' values as they were, ``best`` those of the best state measured. The
    student's caches are put back before each of its forwards (:meth:`student_output`) to how they were after its
    own ``train()`` in ``enter``: a cache an eval forward fills (LeViT's attention biases) would otherwise keep an
    earlier step's weights, and the autograd graph of a step that has already run backward."""

    def __init__(self, student: nn.Module, teacher: nn.Module, selected: list[nn.Parameter], run: Placement) -> None:
        self.student, self.teacher, self.selected, self.run = student, teacher, selected, run
        self.student_flags, self.teacher_flags = training_flags(student), training_flags(teacher)
        self.requires_grad = [(p, p.requires_grad) for p in student.parameters()]
        self.home = model_device(student)
        self.initial = [p.detach().clone() for p in selected]
        self.best = [t.clone() for t in self.initial]
        self.teacher_on_device = teacher
        self.student_caches: Optional[Containers] = None
        self.teacher_caches: Optional[Containers] = None

    def enter(self) -> None:
        self.student.train()  # (where models empty what their eval forwards cache, from weights this run changes)
        self.student.eval()
        for p, _ in self.requires_grad:
            p.requires_grad_(False)
        for p in self.selected:
            p.requires_grad_(True)
        if self.home is not None and self.home != self.run.device:
            self.student.to(self.run.device)
        teacher_devices = {t.device for t in (*self.teacher.parameters(), *self.teacher.buffers())}
        if teacher_devices and teacher_devices != {self.run.device}:
            self.teacher_on_device = copy.deepcopy(self.teacher).to(self.run.device)
        for module in self.teacher_flags.modules:
            module.training = False
        self.teacher_on_device.eval()
        self.student_caches, self.teacher_caches = caches(self.student), caches(self.teacher)

    def student_output(self, model: nn.Module, model_input: Any) -> Any:
        """The output of ``model`` (the student, or the wrapper it trains in) on ``model_input``, its caches first
        put back to how they were when the run started."""
        if self.student_caches is not None:
            self.student_caches.put_back()
        return call_model(model, model_input)

    def keep_best(self) -> None:
        self.best = [p.detach().clone() for p in self.selected]  # one assignment: an interrupt cannot split it

    @torch.no_grad()
    def load(self, values: list[torch.Tensor]) -> None:
        for p, value in zip(self.selected, values):
            p.copy_(value.to(p.device))

    def restore_initial(self) -> None:
        self.load(self.initial)

    def exit(self) -> None:
        for kept in (self.student_caches, self.teacher_caches):
            if kept is not None:
                kept.put_back()
        self.student_flags.put_back()
        self.teacher_flags.put_back()
        for p, flag in self.requires_grad:
            p.requires_grad_(flag)
            p.grad = None
        if self.home is not None and self.home != self.run.device:
            self.student.to(self.home)
        self.teacher_on_device = self.teacher


# ----------------------------------------------------------------------------------------------------------------
# Training.


def _train(state: _State, train: _Inputs, held: _Inputs, options: _Options, ranks: "_Ranks", report: RefineReport,
           seed: int, progress: Optional[bool]) -> None:
    """Run the optimizer steps, measuring on the holdout, and leave the student in the state to keep."""
    model = ranks.wrap(state.student, state.run.device)
    optimizer = torch.optim.Adam(state.selected, lr=options.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.steps)
    scaler = torch.amp.GradScaler(state.run.device.type, enabled=state.run.amp_dtype == torch.float16)
    pairs = _feature_pairs(state.teacher_on_device, state.student) if options.loss == "features" else []
    batches = _TrainingBatches(train, options.batch_size, seed)
    most = None
    if options.augment == "auto":
        with ranks.failing_together("shifting the training images through the original model"):
            most = _choose_shift(state, train, ranks, seed, options.batch_size)
        options.augment = report.augment = "shift" if most else None
    elif options.augment == "shift":
        most = _eighth(train.pool)
    report.shift = list(most) if most else None
    shift = _Shift(seed, most) if most else None
    shifted = _ShiftedOutputs(len(train), shift.offsets, _cache_limit(train)) if shift and not pairs else None
    with ranks.failing_together("running the original model on the training data"):
        expected = None if pairs or shift else _teacher_outputs(state, train, options.batch_size)
    measure = report.holdout_samples > 0
    best = _evaluate(state, held, options, ranks) if measure else None
    if best is not None:
        report.evaluations.append(best.to_dict(0))
        report.agreement_before, report.loss_before, report.error_before = best.agreement, best.loss, best.error
        report.agreement_after, report.loss_after, report.error_after = best.agreement, best.loss, best.error
        state.keep_best()  # under several processes, rank 0's starting state, which every rank now has
    stale = 0
    bar = progress_bar(options.steps, "refine", "step", progress=progress, rank=ranks.rank)
    clock = _StepClock(options, measure)
    try:
        for step in range(1, options.steps + 1):
            with ranks.failing_together(f"step {step}"):
                units = batches.next()
                model_input = state.run.move(train.batch(units))
                known = None if expected is None else _take(expected, units)
                if shift is not None:
                    offset = shift.draw()
                    model_input = shift.apply(model_input, offset)
                    if shifted is not None:
                        known = shifted.get(state, units, offset, model_input)
                value = _loss(state, model, model_input, options, pairs, known)
                if not torch.isfinite(value):
                    raise RefineError(f"the refinement loss became non-finite at step {step}: lower lr= "
                                      "(or turn amp off)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            report.steps = step
            bar.update(1)
            clock.stepped(step, bar)
            if not measure or (step % options.eval_every and step != options.steps):
                continue
            with clock.evaluating():
                score = _evaluate(state, held, options, ranks)
            report.evaluations.append(score.to_dict(step))
            bar.set_postfix({**clock.postfix, **score.postfix()})
            if score.better_than(best):
                best, stale = score, 0
                state.keep_best()
                report.best_step, report.kept = step, "best"
                report.agreement_after, report.loss_after, report.error_after = score.agreement, score.loss, score.error
            else:
                stale += 1
                if options.patience is not None and stale >= options.patience:
                    report.stopped = "early"
                    break
    except KeyboardInterrupt:
        if ranks.active:
            raise  # the other processes cannot be told to stop at the same step: nothing is kept
        report.stopped = "interrupted"
        log.warning("refinement interrupted at step %d", report.steps)
    finally:
        bar.close()
    if not measure:
        report.kept = "last" if report.stopped != "interrupted" else "unchanged"
        if report.kept == "unchanged":
            state.restore_initial()
    elif report.kept == "best":
        state.load(state.best)
    else:
        state.restore_initial()


class _TrainingBatches:
    """Training inputs in a seeded random order: batches of ``batch_size`` pooled samples, epoch after epoch (every
    sample once per epoch), or the given batches in a new order every epoch. :meth:`next` gives the units (sample
    or batch indices) of the next training batch; ``train.batch(units)`` is its input."""

    def __init__(self, train: _Inputs, batch_size: int, seed: int) -> None:
        self.train, self.size = train, batch_size if train.pooled else 1
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[torch.Tensor] = []

    def next(self) -> Any:
        if not self.queue:
            order = torch.randperm(len(self.train), generator=self.generator)
            self.queue = list(order.split(self.size))
            if len(self.queue) > 1 and len(self.queue[-1]) < self.size:
                self.queue.pop()  # a short last batch would weigh its few samples more
        return self.queue.pop(0)


def _loss(state: _State, model: nn.Module, model_input: Any, options: _Options,
          pairs: list[tuple[str, nn.Module, nn.Module]], expected: Any = None) -> torch.Tensor:
    """The distillation loss of one batch (float32); ``expected``: the original's outputs on it, when known."""
    if not pairs:
        if expected is None:
            with torch.no_grad(), state.run.autocast():
                expected = call_model(state.teacher_on_device, model_input)
        with state.run.autocast():
            output = state.student_output(model, model_input)
        return _output_loss(output, expected, options)
    with _FeatureCapture(pairs) as capture:
        with torch.no_grad(), state.run.autocast():
            capture.side = 0
            expected = call_model(state.teacher_on_device, model_input)
        with state.run.autocast():
            capture.side = 1
            output = state.student_output(model, model_input)
    return _output_loss(output, expected, options) + options.feature_weight * capture.loss()


def _resolve_augment(augment: Optional[str], train: "_Inputs", repeats: bool) -> Optional[str]:
    """What ``augment`` can mean for this data: ``"auto"`` stays a candidate (settled by :func:`_choose_shift` once
    the models are in place) for pooled images (4-D floating tensors) where the run draws more samples than the
    training data holds (``repeats``, over all processes), else ``None``; ``"shift"`` on other inputs is an error."""
    images = _are_images(train)
    if augment == "auto":
        return "auto" if images and repeats else None
    if augment == "shift" and not images and len(train):
        raise RefineError("augment='shift' needs the model input to be a batch of images (one 4-D tensor of one "
                          "size): pass augment=None")
    return augment


def _are_images(train: "_Inputs") -> bool:
    return train.pooled and isinstance(train.pool, torch.Tensor) and train.pool.dim() == 4 and \
        train.pool.is_floating_point()


SHIFT_AGREEMENT = 0.9
"""``augment="auto"`` shifts by the largest offset under which the original keeps its top-1 class on at least this
share of the training images."""

SHIFT_PROBE_SAMPLES = 256
"""How many training images (per process) ``augment="auto"`` shifts to measure the original's agreement, each
:data:`SHIFT_PROBE_ROUNDS` times with offsets drawn as training draws them."""

SHIFT_PROBE_ROUNDS = 4


@torch.no_grad()
def _choose_shift(state: "_State", train: "_Inputs", ranks: "_Ranks", seed: int,
                  batch_size: int) -> Optional[tuple[int, int]]:
    """The largest shift (up to an eighth of each side, then a sixteenth, ... down to one pixel) under which the
    original keeps its top-1 class on :data:`SHIFT_AGREEMENT` of the training images, as ``(most_y, most_x)``;
    ``None`` where no shift keeps it or the original's output has no classes per image.

    A shifted image teaches the converted model only what the original does on it: where the original answers it
    as it answers the unshifted image (the demo model, trained on 8x8 digits: 93% at one pixel), shifting shows
    the converted model more of the original's function; where it does not (a resnet18 trained on centred
    digits at 32x32: 68% at four pixels, 92% at two), the shifted images lie off the data the original knows.
    Figures are summed over the processes, so every process chooses the same."""
    probe = _take(train.pool, torch.arange(min(SHIFT_PROBE_SAMPLES, len(train))))
    height, width = (int(min(ranks.gather(side))) for side in probe.shape[-2:])
    generator = torch.Generator().manual_seed(seed + 2)

    def classes(images: torch.Tensor) -> torch.Tensor:
        """The original's scores on ``images``, in batches of ``batch_size``."""
        scores = []
        for chunk in images.split(batch_size):
            with state.run.autocast():
                scores.append(main_output(call_model(state.teacher_on_device, state.run.move(chunk))).float())
        return torch.cat(scores)

    answers = classes(probe)
    per_image = answers.dim() == 2 and _has_classes(answers)
    if ranks.sum([0 if per_image else 1])[0]:
        return None
    answers, fraction, most = answers.argmax(1), 8, None
    while most != (1, 1):
        most, fraction = _fraction_of(height, width, fraction), fraction * 2
        kept = 0
        for _ in range(SHIFT_PROBE_ROUNDS):
            offsets = [torch.randint(-m, m + 1, (len(probe),), generator=generator) for m in most]
            kept += int((classes(_shift_each(probe, *offsets, *most)).argmax(1) == answers).sum())
        kept, total = ranks.sum([kept, SHIFT_PROBE_ROUNDS * len(probe)])
        log.debug("refine: the original keeps its class on %.1f%% of the images shifted by up to %dx%d pixels",
                  100 * kept / total, *most)
        if kept >= SHIFT_AGREEMENT * total:
            return most
    return None


def _fraction_of(height: int, width: int, fraction: int) -> tuple[int, int]:
    return max(1, round(height / fraction)), max(1, round(width / fraction))


def _eighth(images: torch.Tensor) -> tuple[int, int]:
    """The most ``augment="shift"`` translates images by: an eighth of each side."""
    return _fraction_of(*images.shape[-2:], 8)


def _shift_each(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, most_y: int, most_x: int) -> torch.Tensor:
    """Each image translated by its own offset ``(dy[i], dx[i])`` (at most ``most_y``, ``most_x``), edges repeated."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (most_x, most_x, most_y, most_y), mode="replicate")
    rows = (dy + most_y)[:, None] + torch.arange(height)
    columns = (dx + most_x)[:, None] + torch.arange(width)
    index = torch.arange(len(images))[:, None, None]
    return padded[index, :, rows[:, :, None], columns[:, None, :]].permute(0, 3, 1, 2)


class _Shift:
    """Translates a batch of images by one random offset of up to ``most`` pixels (height, width), repeating the
    edges: :meth:`draw` picks the offset (one of :attr:`offsets`, numbered), :meth:`apply` shifts by it."""

    def __init__(self, seed: int, most: tuple[int, int]) -> None:
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.most = most
        self.offsets = (2 * most[0] + 1) * (2 * most[1] + 1)

    def draw(self) -> int:
        most_y, most_x = self.most
        dy = int(torch.randint(0, 2 * most_y + 1, (1,), generator=self.generator))
        dx = int(torch.randint(0, 2 * most_x + 1, (1,), generator=self.generator))
        return dy * (2 * most_x + 1) + dx

    def apply(self, images: torch.Tensor, offset: int) -> torch.Tensor:
        height, width = images.shape[-2:]
        most_y, most_x = self.most
        dy, dx = divmod(offset, 2 * most_x + 1)
        padded = F.pad(images, (most_x, most_x, most_y, most_y), mode="replicate")
        return padded[..., dy:dy + height, dx:dx + width]


class _ShiftedOutputs:
    """The original's outputs on the shifted training images, each image at each offset computed the first time a
    batch brings that pair and then kept: a run of many passes meets the same pairs again (the demo's 1,348 digits
    at 9 offsets are 12,132 pairs; 1,575 steps of 64 draw 100,800), and in eval mode the original is a fixed
    function of each image. Kept only for an output that is one tensor of one shape per image, where all of them
    take no more memory than ``limit``; otherwise :meth:`get` answers ``None`` and the step runs the original on
    its whole batch."""

    def __init__(self, samples: int, offsets: int, limit: int) -> None:
        self.samples, self.offsets, self.limit = samples, offsets, limit
        self.values: Optional[torch.Tensor] = None
        self.known = torch.zeros(offsets, samples, dtype=torch.bool)
        self.disabled = False

    @torch.no_grad()
    def get(self, state: "_State", units: torch.Tensor, offset: int, model_input: torch.Tensor
            ) -> Optional[torch.Tensor]:
        """The original's outputs on ``model_input`` (the samples ``units``, shifted by ``offset``)."""
        if self.disabled:
            return None
        missing = (~self.known[offset, units]).nonzero().flatten()
        if len(missing):
            with state.run.autocast():
                output = call_model(state.teacher_on_device, model_input[missing.to(model_input.device)])
            if self.values is None and not self._allocate(output, len(missing)):
                self.disabled = True
                return None
            if not isinstance(output, torch.Tensor) or tuple(output.shape) != (len(missing), *self.values.shape[2:]):
                self.disabled, self.values = True, None
                return None
            self.values[offset, units[missing].to(self.values.device)] = output.to(self.values.dtype)
            self.known[offset, units[missing]] = True
        return self.values[offset, units.to(self.values.device)]

    def _allocate(self, output: Any, count: int) -> bool:
        if not (isinstance(output, torch.Tensor) and output.dim() >= 1 and output.shape[0] == count
                and output.is_floating_point()):
            return False
        per_sample = output[0].numel() * output.element_size()
        if self.offsets * self.samples * per_sample > self.limit:
            return False
        self.values = output.new_zeros((self.offsets, self.samples, *output.shape[1:]))
        return True


TEACHER_CACHE_BYTES = 1 << 30
"""The most memory the original's outputs on the training samples may take to be computed once and kept."""


@torch.no_grad()
def _teacher_outputs(state: _State, train: _Inputs, batch_size: int) -> Any:
    """The original's outputs on every pooled training sample, computed once (in eval mode the original is a fixed
    function of each sample, so a training step needs no forward of it); ``None`` where the data is not pooled,
    the outputs cannot be joined sample by sample, or they would take more memory than the training inputs do
    (or :data:`TEACHER_CACHE_BYTES`): then every step runs the original on its batch."""
    if not train.pooled or not len(train):
        return None
    limit = _cache_limit(train)
    outputs, taken = [], 0
    with state.run.autocast():
        for chunk in train.chunks(batch_size):
            outputs.append(call_model(state.teacher_on_device, state.run.move(chunk)))
            taken += _bytes(outputs[-1])
            if taken > limit:
                return None
    try:
        joined = _join(outputs)
        if _leading(joined) != len(train):
            return None
    except _NotPoolable:
        return None
    return joined


def _cache_limit(train: _Inputs) -> int:
    """The most memory the original's outputs on the training samples may take to be kept: what the inputs take
    (at least 1 MiB), at most :data:`TEACHER_CACHE_BYTES`."""
    return min(TEACHER_CACHE_BYTES, max(_bytes(train.pool), 1 << 20))


def _bytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in output_tensors(value))


class _StepClock:
    """Times the training steps (holdout measurements apart) and, after the first :data:`ESTIMATE_AFTER_STEPS`
    steps, logs how long the whole run will take on this device and how to shorten it; the progress bar shows it."""

    ESTIMATE_AFTER_STEPS = 5

    def __init__(self, options: _Options, measure: bool) -> None:
        self.options, self.measure = options, measure
        self.start = time.perf_counter()
        self.evaluation_seconds = 0.0
        self.evaluations = 0
        self.postfix: dict[str, str] = {}

    @contextlib.contextmanager
    def evaluating(self) -> Any:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.evaluation_seconds += time.perf_counter() - began
            self.evaluations += 1

    def stepped(self, step: int, bar: Any) -> None:
        if step != min(self.ESTIMATE_AFTER_STEPS, self.options.steps):
            return
        per_step = (time.perf_counter() - self.start - self.evaluation_seconds) / step
        checks = self.options.steps // self.options.eval_every if self.measure else 0
        per_check = self.evaluation_seconds / self.evaluations if self.evaluations else per_step * 2
        total = per_step * self.options.steps + per_check * checks
        self.postfix = {"total": f"~{total:.0f}s"}
        bar.set_postfix(self.postfix)
        log.info("refine: %d steps will take about %.0f s on this device (%.0f ms a step%s); fewer steps= (or a "
                 "smaller batch_size=) shorten it in proportion", self.options.steps, total, per_step * 1e3,
                 f", plus {checks} holdout measurement(s)" if checks else "")


def _output_loss(output: Any, expected: Any, options: _Options) -> torch.Tensor:
    """The loss on the outputs: KL for ``loss="kl"`` (and for ``"features"`` on class outputs), else relative MSE."""
    kind = options.loss
    if kind == "features":
        kind = "kl" if _has_classes(main_output(expected)) else "mse"
    return _kl(output, expected, options.temperature) if kind == "kl" else _relative_mse(output, expected)


def _kl(output: Any, expected: Any, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) of the class distributions along dim 1, averaged over samples (and positions)."""
    student, teacher = main_output(output), main_output(expected)
    _check_shapes([student], [teacher])
    if not _has_classes(teacher):
        raise RefineError(f"loss='kl' needs class scores along dim 1 of the model output, which has shape "
                          f"{tuple(teacher.shape)}: use loss='mse'")
    student = student.float().movedim(1, -1).reshape(-1, student.shape[1]) / temperature
    teacher = teacher.float().movedim(1, -1).reshape(-1, teacher.shape[1]) / temperature
    divergence = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                          reduction="batchmean")
    return divergence * temperature ** 2


def _relative_mse(output: Any, expected: Any) -> torch.Tensor:
    """The mean squared error of every floating-point output tensor over its teacher's mean square, summed."""
    students, teachers = output_tensors(output, floating=True), output_tensors(expected, floating=True)
    _check_shapes(students, teachers)
    if not teachers:
        raise RefineError("the model output holds no floating-point tensor to match")
    terms = [F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-12)
             for s, t in zip(students, teachers)]
    return torch.stack(terms).sum()


def _check_shapes(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> None:
    if len(students) != len(teachers) or any(s.shape != t.shape for s, t in zip(students, teachers)):
        shapes = [tuple(t.shape) for t in teachers], [tuple(s.shape) for s in students]
        raise RefineError(f"the converted model's outputs {shapes[1]} do not match the original's {shapes[0]}: "
                          "refine a conversion of the same model")


def _has_classes(output: torch.Tensor) -> bool:
    return output.dim() >= 2 and output.shape[1] >= 2 and output.is_floating_point()


def _feature_pairs(teacher: nn.Module, student: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, teacher layer, student layer)`` for every norm layer that both models have under the same name."""
    student_layers = {name: found.module for found in find_modules(student, _is_norm) for name in found.names}
    pairs = []
    for found in find_modules(teacher, _is_norm):
        name = next((name for name in found.names if name in student_layers), None)
        if name is not None:
            pairs.append((name, found.module, student_layers[name]))
    if not pairs:
        raise RefineError("loss='features' found no norm layer under the same name in both models: use loss='kl' "
                          "or 'mse'")
    return pairs


class _FeatureCapture:
    """Forward hooks recording the outputs of paired norm layers: the teacher's (``side = 0``), then the
    student's (``side = 1``), one entry per call. ``loss`` is their mean relative squared error."""

    def __init__(self, pairs: list[tuple[str, nn.Module, nn.Module]]) -> None:
        self.pairs = pairs
        self.side = 0
        self.outputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> "_FeatureCapture":
        for index, (_, teacher_layer, student_layer) in enumerate(self.pairs):
            for side, layer in ((0, teacher_layer), (1, student_layer)):
                self.handles.append(layer.register_forward_hook(self._recorder(index, side)))
        return self

    def _recorder(self, index: int, side: int) -> Callable:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if side == self.side and isinstance(output, torch.Tensor):
                # a copy: an in-place activation after the layer would change the tensor it returned
                self.outputs.setdefault((index, side), []).append(output.clone())
        return record

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def loss(self) -> torch.Tensor:
        terms = []
        for index in range(len(self.pairs)):
            for t, s in zip(self.outputs.get((index, 0), []), self.outputs.get((index, 1), [])):
                t, s = t.float(), s.float()
                terms.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12))
        if not terms:
            raise RefineError("loss='features': no paired norm layer ran on the calibration data")
        return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------------------------------
# Measuring on the holdout.


@dataclass
class _Score:
    """Agreement, output loss and relative output error on the holdout (summed over processes)."""

    agreement: Optional[float]
    loss: Optional[float]
    error: Optional[float]

    def better_than(self, other: "_Score") -> bool:
        """Lower output loss, then (at an equal loss) higher agreement; ``None`` counts as neither better nor worse.

        The loss, not the agreement, decides: on a holdout of a few dozen samples one sample is two points of
        agreement, so agreement moves in jumps and picks an early state while the loss still falls."""
        if self.loss is not None and other.loss is not None and self.loss != other.loss:
            return self.loss < other.loss
        if self.agreement is None or other.agreement is None:
            return False
        return self.agreement > other.agreement

    def to_dict(self, step: int) -> dict[str, Any]:
        return {"step": step, "agreement": self.agreement, "loss": self.loss, "error": self.error}

    def postfix(self) -> dict[str, str]:
        shown = {"loss": f"{self.loss:.3g}"} if self.loss is not None else {}
        if self.agreement is not None:
            shown["agreement"] = f"{self.agreement:.1%}"
        return shown


@torch.no_grad()
def _evaluate(state: _State, held: _Inputs, options: _Options, ranks: "_Ranks") -> _Score:
    """Measure the student against the teacher on this process's holdout; figures summed over processes."""
    agree = predictions = 0
    squared_error = squared_reference = loss_sum = loss_weight = 0.0
    with ranks.failing_together("measuring on the holdout"):
        for chunk in held.chunks(options.batch_size):
            model_input = state.run.move(chunk)
            with state.run.autocast():
                expected = call_model(state.teacher_on_device, model_input)
                output = state.student_output(state.student, model_input)
            students, teachers = output_tensors(output, floating=True), output_tensors(expected, floating=True)
            _check_shapes(students, teachers)
            for s, t in zip(students, teachers):
                s, t = s.double(), t.double()
                squared_error += (s - t).pow(2).sum().item()
                squared_reference += t.pow(2).sum().item()
            main_s, main_t = main_output(output), main_output(expected)
            weight = main_t.shape[0] if main_t.dim() else 1
            loss_sum += weight * _output_loss(output, expected, options).item()
            loss_weight += weight
            if _has_classes(main_t):
                predictions += main_t.argmax(1).numel()
                agree += int((main_t.argmax(1) == main_s.argmax(1)).sum())
    agree, predictions, squared_error, squared_reference, loss_sum, loss_weight = ranks.sum(
        [agree, predictions, squared_error, squared_reference, loss_sum, loss_weight])
    return _Score(
        agreement=agree / predictions if predictions else None,
        loss=loss_sum / loss_weight if loss_weight else None,
        error=squared_error / squared_reference if squared_reference > 0 else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Several processes.


class _PeerFailure(RefineError, PeerFailure):
    """Another process failed while refining; it raises its own error."""


class _Ranks(Ranks):
    """The processes refining together (``torch.distributed``, a ``process_group`` of it), or just this one."""

    peer_failure = _PeerFailure

    def __init__(self, distributed: Optional[bool], process_group: Any, device: torch.device) -> None:
        super().__init__(distributed, process_group, device, operation="refinement", error=RefineError)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model as it trains: under several processes, in ``DistributedDataParallel`` over the group (which
        starts every process from rank 0's weights)."""
        if not self.active:
            return model
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False,
                                                   find_unused_parameters=True, process_group=self.group)
