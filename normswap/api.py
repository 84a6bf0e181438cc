"""The façade: converting a model in one call, with the checks the command line makes, from Python.

:func:`convert` and :func:`freeze` plan a conversion (:func:`normswap.plan.plan`) and carry it out
(:func:`apply_conversion`: the fit on data with ``affine="fit"``, then ``refine=N`` steps of refinement); every
option is in their signatures. The policies ``normswap convert`` applies are here too, so a Python caller gets the
same guarantees:

- running statistics that are NaN, infinite or negative are a warning naming each layer, and refused with
  ``strict=True`` (``--strict``): :func:`check_statistics`;
- a conversion that changes nothing (a GroupNorm-only model, MONAI's InstanceNorm UNet, an ``include`` that matches
  no layer) is a warning saying why, and ``include``/``exclude`` patterns that match no layer are named:
  :func:`check_plan` (the command line refuses such a conversion with exit status 1);
- nothing is downloaded while a model is built or a file unpickled (:mod:`normswap.offline`).

Warnings go through ``logging.getLogger("normswap")``.

Example::

    >>> import timm, normswap
    >>> model = normswap.convert(timm.create_model("resnet18"), "gn", groups=32)
    >>> type(model.bn1).__name__
    'GroupNorm'
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Optional

from torch import nn

from .errors import PlanError, spelled
from .history import get_history, set_history
from .inspection import BAD_STATS, inspect_model
from .placement import Device
from .plan import Patterns, Plan, plan
from .refine import refine as refine_model

__all__ = ["apply_conversion", "check_plan", "check_statistics", "convert", "freeze"]

log = logging.getLogger("normswap")

EMPTY_POLICIES = ("warn", "error")

_SHARED_WITH_REFINE = ("data", "batches", "device", "input_fn", "input_key", "progress")
"""The options of :func:`apply_conversion` that apply to the fit and the refinement alike."""


def check_statistics(model: nn.Module, *, strict: bool = False) -> list[str]:
    """Warn about NaN/infinite or negative running statistics, one warning per layer; refuse them with ``strict``.

    Such statistics make a frozen, folded or converted model compute NaN or wrong values. Returns the problems
    found, one sentence each (``[]`` for a healthy model).

    Raises:
        PlanError: with ``strict=True``, a layer has such statistics (the message names the first).

    >>> import torch
    >>> bn = torch.nn.BatchNorm2d(3)
    >>> bn.running_var[1] = -2.0
    >>> check_statistics(torch.nn.Sequential(bn))
    ["layer '0': running_var has 1 negative value(s)"]
    """
    problems = [f"layer '{report.name}': {report.warnings[code]}"
                for report in inspect_model(model) for code in BAD_STATS if code in report.warnings]
    if problems and strict:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise PlanError(f"refusing to convert with strict statistics checks: {problems[0]}{more}; recalibrate the "
                        f"model first, or convert without {spelled('strict=True', '--strict')} to keep them")
    for problem in problems:
        log.warning(problem)
    return problems


def check_plan(p: Plan, *, empty: str = "warn") -> Plan:
    """Warn about ``include``/``exclude`` patterns of ``p`` that match no norm layer, and about a plan that converts
    nothing: ``empty="warn"`` logs why, ``empty="error"`` raises it. Returns ``p``.

    Raises:
        PlanError: ``empty="error"`` and the plan converts nothing, or an unknown ``empty`` policy.

    >>> import torch
    >>> check_plan(plan(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)), "gn"), empty="error")
    Traceback (most recent call last):
    ...
    normswap.errors.PlanError: nothing to convert: every norm layer is left as it is (already GroupNorm: 0)
    """
    if empty not in EMPTY_POLICIES:
        raise PlanError(f"unknown value '{empty}' for empty=: choose warn or error")
    for pattern in p.unmatched_patterns():
        log.warning(f"the pattern '{pattern}' matches no norm layer")
    if not p.rows:
        message = f"nothing to convert: {p.why_empty()}"
        if empty == "error":
            raise PlanError(message)
        log.warning(message)
    return p


def convert(
    model: nn.Module,
    to: str,
    *,
    groups: Optional[int] = None,
    channels_per_group: Optional[int] = None,
    group_policy: str = "divisor",
    affine: str = "copy",
    include: Patterns = None,
    exclude: Patterns = None,
    trainable_affine: bool = False,
    unknown: str = "error",
    strict: bool = False,
    data: Optional[Iterable[Any]] = None,
    batches: Optional[int] = None,
    fit_target: Optional[str] = None,
    device: Device = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
    progress: Optional[bool] = None,
    process_group: Any = None,
    refine: Optional[int] = None,
    refine_options: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Plan and apply a conversion of ``model``'s norm layers; returns the converted model.

    The model is converted **in place** (like ``nn.SyncBatchNorm.convert_sync_batchnorm``): pass a
    ``copy.deepcopy`` to keep the original.

    Args:
        to, groups, channels_per_group, group_policy, affine, include, exclude, trainable_affine, unknown: the
            conversion, as :func:`normswap.plan.plan` takes them.
        strict: refuse a model whose running statistics are NaN, infinite or negative (by default: a warning per
            layer), see :func:`check_statistics`.
        data, batches, fit_target, device, input_fn, input_key, progress, process_group, refine, refine_options:
            how the plan is carried out, as :func:`apply_conversion` takes them (``data=`` with
            ``affine="fit"``; ``refine=N`` then refines on the same data). ``None`` means not given.

    A conversion that changes nothing logs a warning saying why (see :func:`check_plan`) and returns the model
    unchanged.

    Raises:
        PlanError: an option is invalid, a layer cannot be converted (the message names it), or ``strict`` and
            the statistics are bad. The model is then unchanged.

    >>> import torch
    >>> model = convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)), "gn", groups=4)
    >>> type(model[1]).__name__, model[1].num_groups
    ('GroupNorm', 4)
    """
    p = plan(model, to, groups=groups, channels_per_group=channels_per_group, group_policy=group_policy,
             affine=affine, include=include, exclude=exclude, trainable_affine=trainable_affine, unknown=unknown)
    check_statistics(model, strict=strict)
    check_plan(p)
    return apply_conversion(model, p, data=data, batches=batches, fit_target=fit_target, device=device,
                            input_fn=input_fn, input_key=input_key, progress=progress, process_group=process_group,
                            refine=refine, refine_options=refine_options)


def freeze(
    model: nn.Module,
    *,
    trainable_affine: bool = False,
    include: Patterns = None,
    exclude: Patterns = None,
    unknown: str = "error",
    strict: bool = False,
) -> nn.Module:
    """Convert every BatchNorm of ``model`` to :class:`~normswap.layers.FrozenBatchNorm` (in place).

    ``trainable_affine=True`` keeps weight and bias trainable while the statistics stay fixed. ``include``,
    ``exclude``, ``unknown`` and ``strict`` are as for :func:`convert`; a model with nothing to freeze (already
    frozen, GroupNorm only) is returned unchanged with a warning saying why.

    >>> import timm, normswap
    >>> model = normswap.freeze(timm.create_model("resnet18"), exclude="layer4.*")
    >>> type(model.layer4[0].bn1).__name__, type(model.bn1).__name__
    ('BatchNorm2d', 'FrozenBatchNorm')
    """
    return convert(model, "frozen", trainable_affine=trainable_affine, include=include, exclude=exclude,
                   unknown=unknown, strict=strict)


def apply_conversion(
    model: nn.Module,
    p: Plan,
    *,
    data: Optional[Iterable[Any]] = None,
    batches: Optional[int] = None,
    fit_target: Optional[str] = None,
    device: Device = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
    progress: Optional[bool] = None,
    process_group: Any = None,
    refine: Optional[int] = None,
    refine_options: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Apply the plan ``p`` to ``model`` (in place) and, with ``refine=N``, refine the result; returns the model.

    Args:
        data, batches, fit_target, device, input_fn, input_key, progress: for a plan made with ``affine="fit"``,
            the fit of the new GroupNorm weights (:func:`normswap.fit.fit_converted`); such a plan needs ``data``.
        process_group: the group new SyncBatchNorm layers reduce over (the ``sync`` target; default: the world).
        refine: then refine the converted model for up to this many steps on the same data, with the original
            model as the one to reproduce (:func:`normswap.refine.refine`: ``data``, ``batches``, ``device``,
            ``input_fn``, ``input_key`` and ``progress`` apply to it too).
        refine_options: the refinement's other options (``{"lr": 3e-3, "loss": "mse"}``).

    An option given as ``None`` counts as not given. With ``refine``, the work is done on a copy and put into
    ``model`` only when all of it succeeded: if the fit or the refinement fails or is stopped with an error,
    ``model`` is as it was.

    Raises:
        PlanError: an option that does not apply to this plan (fit options without ``affine="fit"``,
            ``refine_options`` without ``refine``, ``refine`` without ``data``), or a plan that does not fit
            ``model``.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten()).eval()
    >>> images = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    >>> model = apply_conversion(model, plan(model, "gn", groups=2, affine="fit"), data=images, refine=5,
    ...                          refine_options={"holdout": 0, "loss": "mse"}, progress=False)
    >>> from normswap.history import get_history
    >>> [step["op"] for step in get_history(model)]
    ['plan', 'fit', 'refine']
    """
    given = {name: value for name, value in {
        "data": data, "batches": batches, "fit_target": fit_target, "device": device, "input_fn": input_fn,
        "input_key": input_key, "progress": progress}.items() if value is not None}
    refine_options = dict(refine_options or {})
    if refine is None:
        if refine_options:
            raise PlanError("refine_options only apply with refine=N")
        return p.apply(model, process_group=process_group, **given)
    if data is None:
        raise PlanError("refine= needs calibration data: pass data=")
    return _convert_and_refine(model, p, refine, refine_options, given, process_group)


def _convert_and_refine(model: nn.Module, p: Plan, steps: int, refine_options: dict[str, Any],
                        given: dict[str, Any], process_group: Any) -> nn.Module:
    """Convert (and fit) a copy of ``model``, refine it against ``model`` itself, then convert ``model`` and give
    it the copy's weights and history: ``model`` changes only once everything has succeeded."""
    shared = [key for key in _SHARED_WITH_REFINE if key in refine_options]
    if shared:
        raise PlanError(f"pass {', '.join(shared)} to convert itself, not in refine_options: it applies to the fit "
                        "and the refinement alike")
    try:
        read_once = iter(given["data"]) is given["data"]
    except TypeError:
        read_once = False
    if read_once:  # an iterator: both the fit and the refinement read the data
        given = {**given, "data": list(given["data"])}
    fitting = any(row.affine == "fit" for row in p.rows)
    fit_only = sorted(set(given) - set(_SHARED_WITH_REFINE))
    if fit_only and not fitting:
        raise PlanError(f"{', '.join(fit_only)} only apply to a plan made with affine='fit'")
    shared_options = {key: given[key] for key in _SHARED_WITH_REFINE if key in given}
    converted = p.apply(copy.deepcopy(model), process_group=process_group, **(given if fitting else {}))
    refine_model(converted, model, steps=steps, **shared_options, **refine_options)
    result = p._replace(model, process_group)
    result.load_state_dict(converted.state_dict())
    set_history(result, get_history(converted))
    return result
