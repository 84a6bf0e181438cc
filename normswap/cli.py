"""The ``normswap`` command (also ``python -m normswap``): a thin shell over the Python API.

Each command is one small function: parse options, call the API, print. What commands share lives here once:
option groups (:func:`checkpoint_options`, :func:`output_options`, :func:`json_option`), opening a checkpoint
(:class:`CheckpointSource`), choosing and checking the output path (:func:`output_path`), writing a model
(:func:`write_model`) and error reporting: a :class:`~normswap.errors.NormswapError` becomes one line
``error: ...`` on stderr and exit status 1, a usage error exit status 2, Ctrl-C exit status 130, SIGTERM 143 (with
the same cleanup as Ctrl-C: no partial output file, no half-done change); ``--debug`` shows the traceback instead.
Every command checks its inputs (files, ``--trust-pickle``, data, options) before it looks at the output path, and
errors name options as typed here (``--force``, see :func:`normswap.errors.spelled`). torch and the operations are
imported inside the commands, after their options are parsed, so ``--help`` and usage errors wait for nothing but
click.

Example::

    $ normswap inspect resnet50.pt --arch resnet50
    $ normswap convert resnet50.pt --arch resnet50 --to gn --groups 32     # writes resnet50-gn.safetensors
    $ normswap freeze detector.pth --arch torchvision.models:resnet50 --exclude 'layer4.*' --dry-run
    $ normswap fold resnet50.pt --arch resnet50                            # writes resnet50-folded.safetensors
    $ normswap recalibrate resnet50.pt --arch resnet50 --data calib/       # writes resnet50-recalibrated.safetensors
    $ normswap verify resnet50.pt resnet50-gn.safetensors --arch resnet50 --data calib/
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import click

from .errors import NormswapError, byte_size, shown
from .registry import TARGET_NAMES, TARGETS

__all__ = [
    "TARGET_CHOICES",
    "CheckpointSource",
    "checkpoint_options",
    "json_option",
    "main",
    "output_options",
    "output_path",
    "write_model",
]

TARGET_CHOICES = TARGET_NAMES
"""Values of ``convert --to``: the registry's targets."""

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

log = logging.getLogger("normswap")


class _EchoHandler(logging.Handler):
    """Log records as lines on stderr: ``warning: ...`` for warnings, the bare message below that."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        click.echo(prefix + record.getMessage(), err=True)


class NormswapCommand(click.Command):
    """A normswap command: turns user errors into one line and an exit status, unless ``--debug``. The command's
    own options (``--help`` among them) are parsed before, so help needs nothing beyond click."""

    def invoke(self, ctx: click.Context) -> Any:
        from .checkpoint.atomic import Terminated, interruptible
        from .offline import offline

        try:  # this process: SIGTERM cleans up like Ctrl-C, and nothing a command imports goes online
            with interruptible(), offline():
                return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Terminated:
            click.echo("error: terminated", err=True)
            ctx.exit(EXIT_TERMINATED)
        except OSError as error:
            if error.errno == errno.EPIPE:
                raise  # the reader of our output went away (``| head``): click exits quietly
            if ctx.meta.get("normswap.debug"):
                raise
            click.echo(f"error: internal error ({type(error).__name__}: {error}); run with --debug for the traceback",
                       err=True)
            ctx.exit(EXIT_ERROR)
        except NormswapError as error:
            if ctx.meta.get("normswap.debug"):
                raise
            click.echo(f"error: {error.for_command_line()}", err=True)
            ctx.exit(EXIT_ERROR)
        except Exception as error:
            if ctx.meta.get("normswap.debug"):
                raise
            click.echo(f"error: internal error ({type(error).__name__}: {error}); run with --debug for the traceback",
                       err=True)
            ctx.exit(EXIT_ERROR)


class NormswapGroup(click.Group):
    """The command group: its commands are :class:`NormswapCommand`; exit statuses as the module docstring says."""

    command_class = NormswapCommand

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Run the command line; with ``standalone_mode`` (the default), exit with the command's status."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            status = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as error:
            where = f" (see '{error.ctx.command_path} --help')" if error.ctx is not None else ""
            click.echo(f"error: {error.format_message()}{where}", err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as error:
            click.echo(f"error: {error.format_message()}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(status if isinstance(status, int) else 0)


def _configure_logging(ctx: click.Context, level: int) -> None:
    """Show normswap's log records on stderr for this command; restore the logger afterwards."""
    handler = _EchoHandler()
    previous = log.level
    log.addHandler(handler)
    log.setLevel(level)

    def restore() -> None:
        log.removeHandler(handler)
        log.setLevel(previous)

    ctx.call_on_close(restore)


@click.group("normswap", cls=NormswapGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug messages.")
@click.option("-v", "--verbose", is_flag=True, help="Say more (which checkpoint entry was used, prefixes stripped).")
@click.option("-q", "--quiet", is_flag=True, help="Show errors only (no warnings).")
@click.version_option(package_name="normswap", prog_name="normswap")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool, quiet: bool) -> None:
    """Convert, freeze, recalibrate and fold the normalization layers of PyTorch checkpoints; verify the result
    against the original, inspect a checkpoint, apply a recipe, or run the demo."""
    ctx.meta["normswap.debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    _configure_logging(ctx, level)


class FiniteFloat(click.FloatRange):
    """A number within a range that must be finite: ``nan`` passes every comparison a range makes, and ``inf``
    would make a threshold mean nothing, so both are usage errors.

    >>> FiniteFloat(min=0).convert("1e-5", None, None)
    1e-05
    """

    name = "finite float"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _parse_arch_kwargs(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[dict]:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise click.BadParameter(f"not valid JSON ({error.msg}): write a JSON object like '{{\"num_classes\": 10}}'")
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object like '{\"num_classes\": 10}'")
    return parsed


@dataclass
class CheckpointSource:
    """How to read a checkpoint, as the checkpoint options said: ``--arch``, ``--arch-kwargs``, ``--key``,
    ``--prefix``, ``--ema``, ``--trust-pickle``."""

    arch: Optional[str] = None
    arch_kwargs: Optional[dict] = None
    key: Optional[str] = None
    prefix: Optional[str] = None
    ema: bool = False
    trust_pickle: bool = False

    def read(self, path: Path) -> Any:
        """The file's contents, not yet built into a model."""
        from .checkpoint import read_checkpoint

        return read_checkpoint(path, key=self.key, prefix=self.prefix, ema=self.ema, trust_pickle=self.trust_pickle)

    def open(self, path: Path) -> Any:
        """The checkpoint's model, built as ``--arch``/``--arch-kwargs`` or its own metadata say."""
        return self.read(path).to_model(self.arch, arch_kwargs=self.arch_kwargs)


def checkpoint_options(command: Callable) -> Callable:
    """The options that say how to read a checkpoint, passed to the command as one ``source``
    (:class:`CheckpointSource`)."""

    @functools.wraps(command)
    def with_source(*args: Any, arch: Optional[str], arch_kwargs: Optional[dict], key: Optional[str],
                    prefix: Optional[str], ema: bool, trust_pickle: bool, **kwargs: Any) -> Any:
        source = CheckpointSource(arch, arch_kwargs, key, prefix, ema, trust_pickle)
        return command(*args, source=source, **kwargs)

    options = [
        click.option("--arch", metavar="A",
                     help="Architecture: a timm name (resnet50), a torchvision model (torchvision.models:resnet50) "
                          "or package.module:callable (monai.networks.nets:UNet). Not needed for files of timm and "
                          "torchvision models that normswap wrote."),
        click.option("--arch-kwargs", metavar="JSON", callback=_parse_arch_kwargs,
                     help="Keyword arguments for the architecture, as a JSON object: '{\"num_classes\": 10}'; they "
                          "override those the file records."),
        click.option("--key", metavar="ENTRY",
                     help="Entry of a training checkpoint holding the weights, dotted for nested entries "
                          "(default: the entry whose keys match the model best)."),
        click.option("--prefix", metavar="P",
                     help="Key prefix to remove, e.g. 'model.' (default: the prefix under which the keys match)."),
        click.option("--ema", is_flag=True, help="Prefer the EMA weights when the file holds both."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow unpickling Python objects (a whole saved model). This can run code: trusted files "
                          "only."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), with_source)


def output_options(command: Callable) -> Callable:
    """The options that say where to write: ``-o/--output`` and ``--force``."""
    options = [
        click.option("-o", "--output", type=click.Path(path_type=Path), metavar="OUT",
                     help="Output file (default: beside the input, <stem>-<suffix>.safetensors)."),
        click.option("--force", is_flag=True, help="Replace the output file if it exists."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


def progress_option(what: str) -> Callable[[Callable], Callable]:
    """``--progress/--no-progress`` (the parameter is ``progress``: ``None`` unless given), showing ``what``."""
    return click.option("--progress/--no-progress", default=None,
                        help=f"Show {what} (default: on a terminal, once the work has lasted two seconds).")


def json_option(command: Callable) -> Callable:
    """``--json``: print machine-readable JSON on stdout instead of text (the parameter is ``as_json``)."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")(command)


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    click.echo(json.dumps(data, indent=2))


def output_path(checkpoint: Path, output: Optional[Path], suffix: str, force: bool) -> Path:
    """``-o OUT``, or ``<stem>-<suffix>.safetensors`` beside the input; checked for writability once the inputs
    are, before the long work.

    >>> output_path(Path("/tmp/resnet50.pt"), None, "gn", force=True)
    PosixPath('/tmp/resnet50-gn.safetensors')
    """
    from .checkpoint import check_output

    path = output if output is not None else checkpoint.with_name(f"{checkpoint.stem}-{suffix}.safetensors")
    return check_output(path, overwrite=force)


def write_model(model: Any, path: Path, force: bool) -> int:
    """Save ``model`` to ``path`` (safetensors with rebuild metadata); returns the file size in bytes. ``save`` warns
    when it cannot tell the model's architecture (a pickled model of no library it knows, read without ``--arch``)."""
    from .checkpoint import save

    return save(model, path, overwrite=force).stat().st_size


def _groups_summary(plan: Any) -> dict[str, int]:
    counts = Counter(row.groups for row in plan.rows if row.groups is not None)
    return {str(groups): n for groups, n in sorted(counts.items(), key=lambda item: -item[1])}


def _run_conversion(checkpoint: Path, to: str, plan_options: dict[str, Any], *, suffix: str,
                    source: CheckpointSource, output: Optional[Path], force: bool, dry_run: bool, strict: bool,
                    as_json: bool, fit_options: Optional[dict[str, Any]] = None) -> None:
    """What ``convert`` and ``freeze`` share: load, check statistics, plan, print or apply (and fit) and write,
    summarise. ``fit_options`` (``data``, ``batch_size``, and the data options of
    :func:`normswap.api.apply_conversion`) fit GroupNorm affine weights and refine the converted model."""
    from .api import apply_conversion, check_plan, check_statistics
    from .checkpoint import check_input
    from .plan import plan

    check_input(checkpoint)
    model = source.open(checkpoint)
    problems = check_statistics(model, strict=strict)
    conversion = plan(model, to, **plan_options)
    if dry_run:
        if as_json:
            emit_json(conversion.to_dict())
        else:
            click.echo(str(conversion))
        check_plan(conversion, empty="error")
        return
    check_plan(conversion, empty="error")
    fit_summary = refine_summary = None
    options = dict(fit_options or {})
    if options.get("data") is not None:
        from .data import open_data
        from .fit import fit_report
        from .refine import refine_report

        data = open_data(options.pop("data"), model=model, batch_size=options.pop("batch_size"))
        out = output_path(checkpoint, output, suffix, force)
        model = apply_conversion(model, conversion, data=data, **options)
        fit_summary = fit_report(model) if plan_options.get("affine") == "fit" else None
        refine_summary = refine_report(model) if options.get("refine") else None
    else:
        out = output_path(checkpoint, output, suffix, force)
        model = conversion.apply(model)
    n_bytes = write_model(model, out, force)
    groups = _groups_summary(conversion)
    if as_json:
        emit_json({"output": str(out), "bytes": n_bytes, "layers": len(conversion),
                   "skipped": len(conversion.skipped), "groups": groups, "warnings": problems,
                   "plan": conversion.to_dict(), "fit": fit_summary.to_dict() if fit_summary else None,
                   "refine": refine_summary.to_dict() if refine_summary else None})
        return
    if fit_summary is not None:
        click.echo(str(fit_summary))
    if refine_summary is not None:
        click.echo(str(refine_summary))
    chosen = ", ".join(f"{g} x{n}" for g, n in groups.items())
    click.echo(f"converted {len(conversion)} layer(s) to {to}" + (f" (groups: {chosen})" if chosen else "")
               + (f", {len(conversion.skipped)} skipped" if conversion.skipped else ""))
    click.echo(f"wrote {out} ({byte_size(n_bytes)})")


def _conversion_options(command: Callable) -> Callable:
    options = [
        click.option("--include", multiple=True, metavar="PAT", help="Only layers whose name matches (glob)."),
        click.option("--exclude", multiple=True, metavar="PAT", help="Leave layers whose name matches (glob)."),
        click.option("--unknown", type=click.Choice(["error", "skip", "convert"]), default="error",
                     show_default=True, help="What to do with BatchNorm subclasses normswap does not know."),
        click.option("--dry-run", is_flag=True, help="Print the plan; write nothing."),
        click.option("--strict", is_flag=True, help="Refuse checkpoints with NaN/infinite or negative statistics."),
    ]
    return functools.reduce(lambda f, option: option(f), reversed(options), command)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--to", "to", type=click.Choice(TARGET_CHOICES), required=True,
              help="; ".join(f"{t.name}: {t.help}" for t in TARGETS) + ".")
@click.option("--groups", type=click.IntRange(min=1), metavar="G", help="GroupNorm groups (default 32).")
@click.option("--channels-per-group", type=click.IntRange(min=1), metavar="K",
              help="GroupNorm channels per group, instead of --groups.")
@click.option("--group-policy", type=click.Choice(["divisor", "exact"]), default="divisor", show_default=True,
              help="divisor: largest divisor of C not above G; exact: refuse layers G does not divide.")
@click.option("--affine", type=click.Choice(["copy", "reset", "fit"]), default="copy", show_default=True,
              help="GroupNorm weight and bias: copied from BatchNorm, reset to 1 and 0, or fitted on --data so "
                   "the converted model behaves like the original.")
@click.option("--data", "data_source", metavar="PATH",
              help="With --affine fit or --refine: calibration data (a folder of images, a tensor file or "
                   "package.module:callable).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --data: samples per calibration batch.")
@click.option("--batches", type=click.IntRange(min=1), metavar="N", help="With --data: use the first N batches.")
@click.option("--fit-target", type=click.Choice(["global", "local", "auto"]), default="global", show_default=True,
              help="With --affine fit: match the original's output at each layer (global), the original layer "
                   "applied to the converted model's input (local), or try both and keep the closer model (auto).")
@click.option("--refine", "refine_steps", type=click.IntRange(min=1), metavar="N",
              help="Then train the converted model for up to N steps to reproduce the original's outputs on "
                   "--data (no labels needed); a held-out part of the data picks the best state.")
@click.option("--refine-lr", type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True,
              help="With --refine: Adam's learning rate.")
@click.option("--refine-loss", type=click.Choice(["kl", "mse", "features"]), default="kl", show_default=True,
              help="With --refine: KL divergence of the class scores, relative MSE of the outputs, or KL plus the "
                   "outputs of every norm layer.")
@click.option("--refine-trainable", multiple=True, metavar="PAT",
              help="With --refine: 'all' parameters (default), 'norm' layers only, or glob patterns over "
                   "parameter names (repeatable).")
@click.option("--device", metavar="DEV", help="With --data: fit and refine on this device (cpu, cuda, cuda:1).")
@click.option("--amp", is_flag=True, help="With --refine: train under bfloat16/float16 autocast.")
@progress_option("progress bars")
@_conversion_options
@checkpoint_options
@output_options
@json_option
def convert(checkpoint: Path, to: str, groups: Optional[int], channels_per_group: Optional[int], group_policy: str,
            affine: str, data_source: Optional[str], batch_size: int, batches: Optional[int], fit_target: str,
            refine_steps: Optional[int], refine_lr: float, refine_loss: str, refine_trainable: tuple[str, ...],
            device: Optional[str], amp: bool, progress: Optional[bool],
            include: tuple[str, ...], exclude: tuple[str, ...], unknown: str, dry_run: bool,
            strict: bool, source: CheckpointSource, output: Optional[Path], force: bool, as_json: bool) -> None:
    """Convert the norm layers of CHECKPOINT and write <stem>-<target>.safetensors.

    With --affine fit, GroupNorm weights are fitted on --data; with --refine N, the converted model is then trained
    to reproduce the original on the same (unlabeled) data.
    """
    if groups is not None and channels_per_group is not None:
        raise click.UsageError("give --groups or --channels-per-group, not both")
    if affine == "fit" and data_source is None:
        raise click.UsageError("--affine fit needs --data")
    if refine_steps is not None and data_source is None:
        raise click.UsageError("--refine needs --data")
    if data_source is not None and affine != "fit" and refine_steps is None:
        raise click.UsageError("--data is only used by --affine fit and --refine")
    options = {"groups": groups, "channels_per_group": channels_per_group,
               "group_policy": group_policy, "affine": affine, "include": list(include),
               "exclude": list(exclude), "unknown": unknown}
    fit_options: dict[str, Any] = {"data": data_source, "batch_size": batch_size, "batches": batches,
                                   "device": device, "progress": progress}
    if affine == "fit":
        fit_options["fit_target"] = fit_target
    if refine_steps is not None:
        trainable: Any = list(refine_trainable) if len(refine_trainable) > 1 else (refine_trainable or ("all",))[0]
        fit_options["refine"] = refine_steps
        fit_options["refine_options"] = {"lr": refine_lr, "loss": refine_loss, "trainable": trainable, "amp": amp}
    _run_conversion(checkpoint, to, options, suffix=to, source=source, output=output, force=force,
                    dry_run=dry_run, strict=strict, as_json=as_json, fit_options=fit_options)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--trainable-affine", is_flag=True, help="Keep weight and bias trainable (statistics stay fixed).")
@_conversion_options
@checkpoint_options
@output_options
@json_option
def freeze(checkpoint: Path, trainable_affine: bool, include: tuple[str, ...], exclude: tuple[str, ...],
           unknown: str, dry_run: bool, strict: bool, source: CheckpointSource, output: Optional[Path], force: bool,
           as_json: bool) -> None:
    """Freeze the BatchNorm layers of CHECKPOINT (convert --to frozen); writes <stem>-frozen.safetensors."""
    options = {"include": list(include), "exclude": list(exclude), "unknown": unknown,
               "trainable_affine": trainable_affine}
    _run_conversion(checkpoint, "frozen", options, suffix="frozen", source=source, output=output, force=force,
                    dry_run=dry_run, strict=strict, as_json=as_json)


def _parse_input_shape(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[tuple]:
    if value is None:
        return None
    try:
        shape = tuple(int(size) for size in value.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(size < 1 for size in shape):
        raise click.BadParameter(f"'{value}' is not a shape: write sizes separated by commas, like 1,3,640,640")
    return shape


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--freeze-rest", is_flag=True, help="Freeze the BatchNorm layers that cannot be folded.")
@click.option("--within", metavar="NAME", help="Fold only the layers inside this submodule.")
@click.option("--input-shape", callback=_parse_input_shape, metavar="N,C,H,W",
              help="Shape of the example input the model is run on to find what feeds each BatchNorm, e.g. "
                   "1,3,640,640 (default: from the architecture).")
@click.option("--data", "data_source", metavar="PATH",
              help="Run the model on the first two samples of this data instead (a folder of images, a tensor file "
                   "or package.module:callable).")
@click.option("--dry-run", is_flag=True, help="Print what would be folded and why the rest is not; write nothing.")
@click.option("--strict", is_flag=True, help="Refuse checkpoints with NaN/infinite or negative statistics.")
@progress_option("a progress bar while the model runs")
@checkpoint_options
@output_options
@json_option
def fold(checkpoint: Path, freeze_rest: bool, within: Optional[str], input_shape: Optional[tuple],
         data_source: Optional[str], dry_run: bool, strict: bool, progress: Optional[bool], source: CheckpointSource,
         output: Optional[Path], force: bool, as_json: bool) -> None:
    """Fold the BatchNorm layers of CHECKPOINT into the layers before them; writes <stem>-folded.safetensors.

    The model is run once on an example input to find which layer feeds each BatchNorm. The folded model computes
    the original's eval-mode output. Layers that cannot be folded safely stay, and the table says why; when none
    can be folded, nothing is written and the exit status is 1.
    """
    from .api import check_statistics
    from .errors import PlanError
    from .fold import plan_fold

    if input_shape is not None and data_source is not None:
        raise click.UsageError("give --input-shape or --data, not both")
    model = source.open(checkpoint)
    problems = check_statistics(model, strict=strict)
    data = None
    if data_source is not None:
        from .data import open_data

        data = open_data(data_source, model=model, batch_size=2)
    folding = plan_fold(model, freeze_rest=freeze_rest, within=within, data=data, input_shape=input_shape,
                        progress=progress)
    if dry_run or not folding.pairs:
        emit_json(folding.to_dict()) if as_json else click.echo(str(folding))
        if not folding.pairs:
            raise PlanError(_nothing_folded(folding))
        return
    out = output_path(checkpoint, output, "folded", force)
    model = folding.apply(model)
    n_bytes = write_model(model, out, force)
    if as_json:
        emit_json({"output": str(out), "bytes": n_bytes, "folded": len(folding), "layers": folding.layers,
                   "left": len(folding.left), "warnings": problems, "fold": folding.to_dict()})
        return
    click.echo(str(folding))
    click.echo(f"wrote {out} ({byte_size(n_bytes)})")


def _nothing_folded(folding: Any) -> str:
    """The one-sentence error of a fold that folds nothing."""
    if not folding.layers:
        return "the model has no BatchNorm layer to fold: nothing written"
    reason = folding.capture_error if not folding.captured else folding.left[0].reason
    return f"folded 0 of {folding.layers} BatchNorm layer(s), nothing written (first reason: {reason})"


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data", "data_source", required=True, metavar="PATH",
              help="Calibration data: a folder of images, a tensor file (.pt, .npy, .safetensors) or "
                   "package.module:callable.")
@click.option("--batches", type=click.IntRange(min=1), metavar="N", help="Use the first N batches only.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Samples per batch.")
@click.option("--method", type=click.Choice(["exact", "sequential"]), default="exact", show_default=True,
              help="exact: the statistics each layer sees normalizing with batch statistics, as in training; "
                   "sequential: eval-consistent, layer after layer, at any batch size.")
@click.option("--device", metavar="DEV", help="Run on this device (cpu, cuda, cuda:1).")
@click.option("--amp", is_flag=True, help="Run the forward under bfloat16/float16 autocast (statistics stay float64).")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Run with weights and images in channels-last layout. Default: for exact on CPU, if the model has "
                   "2-D convolutions (faster there).")
@click.option("--input-key", metavar="KEY", help="Key of the model input in dict batches.")
@progress_option("a progress bar")
@checkpoint_options
@output_options
@json_option
def recalibrate(checkpoint: Path, data_source: str, batches: Optional[int], batch_size: int, method: str,
                device: Optional[str], amp: bool, channels_last: Optional[bool], input_key: Optional[str],
                progress: Optional[bool], source: CheckpointSource, output: Optional[Path], force: bool,
                as_json: bool) -> None:
    """Recompute the BatchNorm running statistics of CHECKPOINT on unlabeled data; writes
    <stem>-recalibrated.safetensors."""
    from .data import open_data
    from .recalibrate import calibration_report
    from .recalibrate import recalibrate as recalibrate_model

    model = source.open(checkpoint)
    data = open_data(data_source, model=model, batch_size=batch_size)
    out = output_path(checkpoint, output, "recalibrated", force)
    model = recalibrate_model(model, data, batches=batches, method=method, device=device, amp=amp,
                              channels_last=channels_last, input_key=input_key, progress=progress)
    n_bytes = write_model(model, out, force)
    report = calibration_report(model)
    if as_json:
        emit_json({"output": str(out), "bytes": n_bytes, **report.to_dict()})
        return
    click.echo(str(report))
    click.echo(f"wrote {out} ({byte_size(n_bytes)})")


def _open_for_comparison(path: Path, source: CheckpointSource) -> Any:
    """A checkpoint's model for ``verify``: ``--arch`` (and ``--arch-kwargs``) apply to a file that records no
    architecture or records that same one; a file that records another is built as it records (a registered builder
    only: the error says what to type otherwise)."""
    contents = source.read(path)
    recorded = contents.arch
    if recorded is None or source.arch is None or source.arch == recorded.name:
        return contents.to_model(source.arch, arch_kwargs=source.arch_kwargs)
    return contents.to_model()


@main.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("converted", type=click.Path(path_type=Path))
@click.option("--data", "data_source", required=True, metavar="PATH",
              help="Data: a folder of images, a tensor file (.pt, .npy, .safetensors) or package.module:callable.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Samples per batch.")
@click.option("--batches", type=click.IntRange(min=1), metavar="N", help="Compare on the first N batches only.")
@click.option("--input-key", metavar="KEY", help="Key of the model input in dict batches.")
@click.option("--device", metavar="DEV", help="Run both models on this device (cpu, cuda, cuda:1).")
@click.option("--tolerance", type=FiniteFloat(min=0), default=1e-4, show_default=True,
              help="Relative difference above which a layer counts as diverged.")
@click.option("--no-layers", is_flag=True, help="Compare outputs only, without the per-layer table.")
@click.option("--max-relative", type=FiniteFloat(min=0), metavar="R",
              help="Fail (exit 1) when the outputs' relative difference exceeds R, e.g. 1e-5 for freeze or fold.")
@click.option("--min-agreement", type=FiniteFloat(min=0, max=1), metavar="P",
              help="Fail (exit 1) when top-1 agreement is below P (a fraction, e.g. 0.9).")
@click.option("--report", "report_path", type=click.Path(path_type=Path), metavar="PAGE.html",
              help="Also write the comparison as an HTML page: output agreement and a chart of per-layer divergence.")
@click.option("--force", is_flag=True, help="Replace the --report page if it exists.")
@progress_option("a progress bar over the batches")
@checkpoint_options
@json_option
def verify(original: Path, converted: Path, data_source: str, batch_size: int, batches: Optional[int],
           input_key: Optional[str], device: Optional[str], tolerance: float, no_layers: bool,
           max_relative: Optional[float], min_agreement: Optional[float], report_path: Optional[Path], force: bool,
           progress: Optional[bool], source: CheckpointSource, as_json: bool) -> None:
    """Compare CONVERTED with ORIGINAL on data: output agreement, accuracy where the data has labels, and the
    layer where the two models part ways. --arch and the other checkpoint options apply to a file that does not
    record its architecture. With --max-relative or --min-agreement the command is a check: it prints the
    report and one line per threshold (passed or failed), and fails if the models are further apart than
    allowed."""
    from .compare import compare
    from .data import open_data
    from .report_page import comparison_page, write_page

    model_a = _open_for_comparison(original, source)
    model_b = _open_for_comparison(converted, source)
    data = open_data(data_source, model=model_a, batch_size=batch_size)
    if report_path is not None:
        _check_page_path(report_path, force)
    report = compare(model_a, model_b, data, batches=batches, input_key=input_key, device=device,
                     layers=not no_layers, tolerance=tolerance, progress=progress)
    verdicts = report.verdicts(max_relative=max_relative, min_agreement=min_agreement)
    if as_json:
        emit_json({"original": str(original), "converted": str(converted), **report.to_dict(),
                   "verdicts": [{**vars(verdict), "line": str(verdict)} for verdict in verdicts]})
    else:
        click.echo(f"original: {original}\nconverted: {converted}")
        click.echo(str(report))
        for verdict in verdicts:
            click.echo(str(verdict))
    if report_path is not None:
        title = f"normswap verify: {converted.name} against {original.name}"
        page = comparison_page({**report.to_dict(), "verdicts": [str(verdict) for verdict in verdicts]}, title=title)
        write_page(report_path, page, overwrite=force)
        if not as_json:
            click.echo(f"wrote {report_path}")
    failed = [verdict for verdict in verdicts if not verdict.passed]
    if failed:
        raise NormswapError(f"verify failed: {failed[0]}" + (f" (and {len(failed) - 1} more)" if len(failed) > 1
                                                              else ""))


def _check_page_path(path: Path, force: bool) -> None:
    """Refuse a ``--report`` page path that is not ``.html`` or cannot be written, before the work starts."""
    from .checkpoint import check_output

    if path.suffix.lower() not in (".html", ".htm"):
        raise click.UsageError(f"--report writes an HTML page: name it *.html, not {path.name}")
    check_output(path, overwrite=force)


def _describe_history(steps: list[dict[str, Any]]) -> str:
    """The history as one line; the text came from a file, so it is escaped."""
    parts = []
    for step in steps:
        if step.get("op") == "plan":
            plan = step.get("plan", {})
            rows = plan.get("rows", [])
            parts.append(f"plan to {shown(str(plan.get('target')))} ({len(rows) if isinstance(rows, list) else '?'} "
                         "layers)")
        else:
            parts.append(shown(str(step.get("op"))))
    return ", then ".join(parts) if parts else "none"


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--report", "report_path", type=click.Path(path_type=Path), metavar="PAGE.html",
              help="Also write an HTML page: the running statistics of every layer along the depth, and warnings.")
@click.option("--force", is_flag=True, help="Replace the --report page if it exists.")
@checkpoint_options
@json_option
def inspect(checkpoint: Path, report_path: Optional[Path], force: bool, source: CheckpointSource,
            as_json: bool) -> None:
    """List the norm layers of CHECKPOINT with their statistics, and the warnings worth acting on.

    The architecture is built only when --arch names it or the file records a timm, torchvision or normswap one;
    otherwise the layers are found by their running statistics."""
    from .history import get_arch, get_history, get_source
    from .inspection import format_reports, inspect_model, inspect_state_dict, save_html

    contents = source.read(checkpoint)
    recorded = contents.arch
    note = ""
    if source.arch is not None or contents.model is not None or (recorded is not None and recorded.is_registered):
        model = contents.to_model(source.arch, arch_kwargs=source.arch_kwargs)
        reports, spec, steps, where = inspect_model(model), get_arch(model), get_history(model), get_source(model)
    else:
        guess = contents.guess()
        reports, spec, steps = inspect_state_dict(guess.tensors, contents.manifest), None, contents.history
        where = {**contents.source, **({"entry": guess.entry} if guess.entry else {}),
                 **({"prefix": guess.prefix} if guess.prefix else {})}
        if recorded is not None and recorded.looks_like_model_class:
            note = (f"arch: {recorded.call()} (not built: normswap imports it only when you pass --arch "
                    f"{recorded.name}; layers found by their running statistics)")
        elif recorded is not None:
            note = (f"arch: {recorded.call()} (not built: not a model class, normswap does not run it; layers found "
                    "by their running statistics)")
    if report_path is not None:
        _check_page_path(report_path, force)
        arch_line = f"arch: {spec['name']}" if spec is not None else note or "arch: unknown"
        save_html(reports, report_path, notes=[f"file: {checkpoint}", arch_line], overwrite=force)
    if as_json:
        emit_json({"file": str(checkpoint), "source": where, "arch": spec if spec else
                   (recorded.to_dict() if recorded else None), "built": spec is not None, "history": steps,
                   "layers": [report.to_dict() for report in reports],
                   "warnings": [f"{report.name}: {text}" for report in reports for text in report.warnings.values()]})
        return
    entry = "".join(f", {name} '{shown(where[name])}'" for name in ("entry", "prefix") if name in where)
    click.echo(f"file: {checkpoint} (sha256 {shown(where['sha256'][:16])}{entry})")
    if spec is not None:
        kwargs = ", ".join(f"{shown(k)}={v!r}" for k, v in spec["kwargs"].items())
        click.echo(f"arch: {spec['name']}" + (f" ({kwargs})" if kwargs else ""))
    else:
        click.echo(note or "arch: unknown (layers found by their running statistics; pass --arch for classes and "
                           "eps)")
    if steps or spec is not None:
        click.echo(f"history: {_describe_history(steps)}")
    click.echo(format_reports(reports))
    if report_path is not None:
        click.echo(f"wrote {report_path}")


@main.command("apply")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.argument("checkpoint", type=click.Path(path_type=Path), required=False)
@click.option("--data", "data_source", metavar="PATH",
              help="Calibration data for the recipe's rules with affine = 'fit' and its recalibrate steps, instead of "
                   "the data the recipe names (a recipe may name a folder or a tensor file; an import path only "
                   "here, where you type it).")
@click.option("--dry-run", is_flag=True, help="Print the plan of every rule; write nothing.")
@progress_option("progress bars for the recipe's calibration steps")
@checkpoint_options
@output_options
@json_option
def apply_recipe(recipe: Path, checkpoint: Optional[Path], data_source: Optional[str], dry_run: bool,
                 progress: Optional[bool], source: CheckpointSource, output: Optional[Path], force: bool,
                 as_json: bool) -> None:
    """Run the TOML RECIPE on CHECKPOINT; writes <stem>-<suffix>.safetensors, the suffix being the recipe's
    [output] suffix or else its file name (recipes/frozen-backbone.toml: <stem>-frozen-backbone.safetensors).

    Without CHECKPOINT, the recipe's architecture is built with fresh weights (a converted model to train from
    scratch) and written to <arch>-<suffix>.safetensors in the current folder. A recipe's architecture is built on
    the recipe's word only if it is a timm, torchvision or normswap model; another must be confirmed with --arch.
    """
    from .recipe import Recipe

    spec = Recipe.load(recipe)
    arch = spec.arch_spec(source.arch, source.arch_kwargs)
    if checkpoint is None:
        if arch is None:
            raise click.UsageError("give a CHECKPOINT, or an architecture (--arch, or 'arch' in the recipe)")
        start = Path(arch.name.replace(":", "-").rsplit(".", 1)[-1] + ".safetensors")
        model = arch.build()
    else:
        start = checkpoint
        model = source.read(checkpoint).to_model(arch)
    plans = spec.plans(model)
    if dry_run:
        if as_json:
            emit_json([p.to_dict() for p in plans])
        else:
            click.echo("\n\n".join(str(p) for p in plans))
        return
    if not any(len(p) for p in plans) and not spec.steps:
        raise NormswapError(f"nothing to convert, no file written: no rule of {recipe} matches a norm layer that "
                            "would change")
    calibration = None
    if any(row.affine == "fit" for p in plans for row in p.rows):
        from .data import open_data

        if data_source is None:
            raise click.UsageError("the recipe fits GroupNorm weights (affine = 'fit'): give --data")
        calibration = open_data(data_source, model=model)
    out = output_path(start, output, spec.suffix, force)
    model = spec.apply(model, plans=plans, data=calibration)
    model = spec.run_steps(model, progress=progress, data=data_source)
    n_bytes = write_model(model, out, force)
    if as_json:
        emit_json({"output": str(out), "bytes": n_bytes, "layers": sum(len(p) for p in plans),
                   "plans": [p.to_dict() for p in plans], "steps": [step["op"] for step in spec.steps]})
        return
    for p in plans:
        click.echo(f"rule {', '.join(p.options['include'])} -> {p.target}: {len(p)} layer(s)")
    for step in spec.steps:
        click.echo(f"step: {step['op']}")
    click.echo(f"wrote {out} ({byte_size(n_bytes)})")


@main.command()
@click.option("--groups", type=click.IntRange(min=1), default=8, show_default=True, help="GroupNorm groups.")
@click.option("--calibration-images", type=click.IntRange(min=1), default=64, show_default=True,
              help="Unlabeled images used to fit GroupNorm and to recalibrate.")
def demo(groups: int, calibration_images: int) -> None:
    """Tell the whole story on the bundled digits model: GroupNorm with copied, reset and fitted weights, frozen,
    folded, and recalibration after a domain shift. Writes nothing."""
    import torch

    from .demo import run_demo

    torch.set_num_threads(1)  # a small model: one thread is fastest, and immune to a busy second core
    run_demo(groups=groups, calibration_images=calibration_images, echo=click.echo)
