"""Conversion plans: what will change, computed before anything changes.

:func:`plan` walks a model and returns a :class:`Plan`: one :class:`PlanRow` per norm layer that changes (all its
names, source and target class, channels, groups, what happens to its affine weights and statistics) and one
:class:`SkippedLayer` per norm layer left alone, with the reason. A plan is plain data: it prints as a table
(``--dry-run``), round-trips through JSON (checkpoints store it), and is exactly what :meth:`Plan.apply` performs.

Example::

    >>> import timm, normswap
    >>> model = timm.create_model("resnet18")
    >>> p = normswap.plan(model, "gn", groups=32)
    >>> len(p)
    20
    >>> model = p.apply(model)
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from torch import nn

from . import registry, targets
from .deprecation import forwarding
from .errors import PlanError
from .targets import DEFAULT_GROUPS, choose_groups
from .history import carry_memory, get_history, record_step, set_history
from .plan_rows import PlanRow, SkippedLayer
from .tables import text_table
from .unwrap import unwrapped, unwrapped_to_change
from .walk import find_modules, get_module, replace_module

__all__ = ["Plan", "PlanRow", "SkippedLayer", "choose_groups", "plan"]

log = logging.getLogger("normswap")

GROUP_POLICIES = ("divisor", "exact")
AFFINE_MODES = ("copy", "reset", "fit")
UNKNOWN_MODES = ("error", "skip", "convert")
DEFAULT_EPS = 1e-5

Patterns = Union[str, Sequence[str], None]


@dataclass
class Plan:
    """What a conversion changes. ``len(plan)`` counts the layers that change; ``str(plan)`` is a table."""

    target: str
    rows: list[PlanRow] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[PlanRow]:
        return iter(self.rows)

    def __str__(self) -> str:
        return format_plan(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` reads it back."""
        return {
            "target": self.target,
            "options": dict(self.options),
            "rows": [asdict(row) for row in self.rows],
            "skipped": [asdict(skip) for skip in self.skipped],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """The plan ``to_dict`` wrote."""
        try:
            result = cls(
                target=data["target"],
                rows=[PlanRow(**row) for row in data["rows"]],
                skipped=[SkippedLayer(**skip) for skip in data.get("skipped", [])],
                options=dict(data.get("options", {})),
            )
        except (KeyError, TypeError) as exc:
            raise PlanError(f"not a normswap plan: {exc}") from None
        for row in result.rows:
            if row.target not in targets.TARGET_NAMES or not row.eps > 0 or not row.names:
                raise PlanError(
                    f"not a normswap plan: row {row.names} needs a known target, a positive eps and at least one name"
                )
            grouped = targets.target(row.target).grouped
            if grouped and not (isinstance(row.groups, int) and row.groups > 0 and row.channels % row.groups == 0):
                raise PlanError(f"not a normswap plan: row {row.names} has {row.groups} groups for {row.channels} "
                                "channels; a GroupNorm row needs a group count that divides its channels")
        return result

    def layer_names(self) -> list[str]:
        """Every qualified name of every norm layer the plan looked at, converted or skipped."""
        return [name for entry in [*self.rows, *self.skipped] for name in entry.names]

    def unmatched_patterns(self) -> list[str]:
        """The ``include`` and ``exclude`` patterns that match no norm layer (a typo, or another model's names).

        >>> import torch
        >>> plan(torch.nn.Sequential(torch.nn.BatchNorm2d(4)), "gn", include=["0", "layer9.*"]).unmatched_patterns()
        ['layer9.*']
        """
        names = self.layer_names()
        patterns = [*self.options.get("include", []), *self.options.get("exclude", [])]
        return [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]

    def why_empty(self) -> str:
        """Why the plan converts nothing, in one sentence (for a plan with rows: an empty string).

        >>> import torch
        >>> plan(torch.nn.Sequential(torch.nn.GroupNorm(2, 4)), "gn").why_empty()
        'every norm layer is left as it is (already GroupNorm: 0)'
        """
        if self.rows:
            return ""
        if not self.skipped:
            return "the model has no BatchNorm-like layer"
        include = self.options.get("include") or []
        if include and all(skip.reason == "not matched by include" for skip in self.skipped):
            return f"no norm layer matches the include pattern(s) {', '.join(repr(p) for p in include)}"
        reasons: dict[str, list[str]] = {}
        for skip in self.skipped:
            reasons.setdefault(skip.reason, []).append(skip.names[0])
        shown = "; ".join(f"{reason}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
                          for reason, names in reasons.items())
        return f"every norm layer is left as it is ({shown})"

    def apply(self, model: nn.Module, *, data: Optional[Iterable[Any]] = None, process_group: Any = None,
              **fit_options: Any) -> nn.Module:
        """Carry out the plan on ``model`` (in place) and return the model: the only way a plan takes effect.

        Every planned layer is replaced. A plan made with ``affine="fit"`` then fits the new GroupNorm weights on
        ``data`` so that the model keeps the function it had (:func:`normswap.fit.fit_converted`, which takes the
        other keyword arguments: ``batches``, ``target``, ``device``, ``input_fn``, ``input_key``, ``progress``);
        such a plan needs ``data``. ``process_group`` is the group new SyncBatchNorm layers reduce over (default:
        the whole world).

        All replacements are built before the first one is put in, so a plan that does not fit the model raises
        :class:`PlanError` and leaves the model as it was; a fit that fails or is interrupted puts the original
        layers back. If the model itself is a norm layer, the new layer is returned. The plan (and the fit) are
        recorded in the model's history (see :mod:`normswap.history`). A model in a wrapper (``torch.compile``,
        DataParallel, EMA: :mod:`normswap.unwrap`) is looked through: the model inside is converted and returned.
        """
        model = unwrapped_to_change(model, "convert")
        fitting = any(row.affine == "fit" for row in self.rows)
        given = sorted([*fit_options, *(["data"] if data is not None else [])])
        if not fitting and given:
            raise PlanError(f"{', '.join(given)} only apply to a plan made with affine='fit'")
        if fitting and data is None:
            raise PlanError("this plan fits the GroupNorm affine weights (affine='fit'): pass the calibration data "
                            "(data=, --data)")
        if process_group is not None and self.target != "sync":
            raise PlanError(f"process_group= applies to the 'sync' target, not to '{self.target}'")
        if not fitting:
            return self._replace(model, process_group)
        from .fit import fit_converted

        reference = copy.deepcopy(model)
        originals = [(row.names, _planned_layer(model, row)) for row in self.rows]
        steps = get_history(model)
        converted = self._replace(model, process_group)
        try:
            fit_converted(converted, reference, self.rows, data=data, **fit_options)
        except BaseException:
            for names, layer in originals:
                model = replace_module(converted, names, layer)
            set_history(model, steps)
            raise
        return converted

    def _replace(self, model: nn.Module, process_group: Any = None) -> nn.Module:
        """The structural change: every planned layer replaced, the plan recorded."""
        built = [(row.names, targets.build(_planned_layer(model, row), row, process_group=process_group))
                 for row in self.rows]
        root = model
        for names, new in built:
            model = replace_module(model, names, new)
        carry_memory(root, model)
        record_step(model, {"op": "plan", "plan": self.to_dict()})
        log.info("converted %d layer(s) to %s", len(self.rows), self.target)
        return model


def _planned_layer(model: nn.Module, row: PlanRow) -> nn.Module:
    """The layer of ``model`` that ``row`` converts; :class:`PlanError` if the model does not match the row."""
    misfit = "the plan does not fit this model:"
    layers = []
    for name in row.names:
        try:
            layers.append(get_module(model, name))
        except KeyError:
            raise PlanError(f"{misfit} it has no layer '{name}'") from None
    layer = layers[0]
    for name, other in zip(row.names[1:], layers[1:]):
        if other is not layer:
            raise PlanError(f"{misfit} '{row.name}' and '{name}' are different layers, the plan expects one shared one")
    found = targets.class_path(type(layer))
    if found != row.source:
        raise PlanError(f"{misfit} layer '{row.name}' is a {found}, the plan expects {row.source}")
    channels = targets.SourceLayer.read(layer).num_features
    if channels != row.channels:
        raise PlanError(f"{misfit} layer '{row.name}' has {channels} channels, the plan expects {row.channels}")
    return layer


def _as_list(patterns: Patterns) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def _filter_reason(names: list[str], include: list[str], exclude: list[str]) -> Optional[str]:
    """Why include/exclude leave this layer out, or ``None``. A shared layer matches if any of its names does."""
    for pattern in exclude:
        if any(fnmatch.fnmatchcase(name, pattern) for name in names):
            return f"excluded by '{pattern}'"
    if include and not any(fnmatch.fnmatchcase(name, p) for name in names for p in include):
        return "not matched by include"
    return None


def _validate(to: str, groups: Optional[int], channels_per_group: Optional[int], group_policy: str, affine: str,
              unknown: str, trainable_affine: bool) -> None:
    if to not in targets.TARGET_NAMES:
        raise PlanError(f"unknown target '{to}': choose one of {', '.join(targets.TARGET_NAMES)}")
    if group_policy not in GROUP_POLICIES:
        raise PlanError(f"unknown group policy '{group_policy}': choose divisor or exact")
    if affine not in AFFINE_MODES:
        raise PlanError(f"unknown affine mode '{affine}': choose copy, reset or fit")
    if affine != "copy" and not targets.target(to).grouped:
        raise PlanError(f"affine='{affine}' applies to gn, ln and in; '{to}' always keeps the affine values")
    if unknown not in UNKNOWN_MODES:
        raise PlanError(f"unknown value '{unknown}' for unknown=: choose error, skip or convert")
    chosen = targets.target(to)
    given = [name for name, value in (("groups", groups), ("channels_per_group", channels_per_group),
                                      ("trainable_affine", trainable_affine or None)) if value is not None]
    for name in given:
        if name not in chosen.options:
            owner = next(t.name for t in targets.TARGET_RECORDS if name in t.options)
            detail = " (to='ln' uses one group, to='in' one per channel)" if owner == "gn" else ""
            raise PlanError(f"{name}= applies to to='{owner}' only{detail}, not to '{to}'")
    if groups is not None and groups < 1:
        raise PlanError(f"groups must be at least 1, got {groups}")
    if channels_per_group is not None and channels_per_group < 1:
        raise PlanError(f"channels_per_group must be at least 1, got {channels_per_group}")


def plan(
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
) -> Plan:
    """Plan converting the norm layers of ``model`` to ``to``; the model is not changed.

    Args:
        to: ``"gn"`` (GroupNorm), ``"ln"`` (GroupNorm, 1 group), ``"in"`` (GroupNorm, one group per channel),
            ``"frozen"`` (:class:`~normswap.layers.FrozenBatchNorm`), ``"sync"`` (``nn.SyncBatchNorm``) or
            ``"bn"`` (plain BatchNorm of the original rank, from SyncBatchNorm or any frozen BatchNorm).
        groups, channels_per_group, group_policy: for ``"gn"``: the group count (32 unless given), see
            :func:`choose_groups`; an error for other targets.
        affine: for gn/ln/in: ``"copy"`` the BatchNorm weight and bias, ``"reset"`` them to 1 and 0, or ``"fit"``
            them to data (``convert(..., data=...)``). Other targets always keep the affine values.
        include, exclude: glob patterns over qualified module names; exclude wins.
        trainable_affine: for ``"frozen"``: keep weight and bias as trainable parameters (of layers that have
            them); an error for other targets.
        unknown: what to do with a BatchNorm subclass normswap does not know: ``"error"``, ``"skip"``, or
            ``"convert"`` it as its nearest known base class (its own forward is then lost).

    Raises:
        PlanError: a layer cannot be converted (the message names it), or an option is invalid.

    >>> import torch
    >>> p = plan(torch.nn.Sequential(torch.nn.Conv2d(3, 48, 3), torch.nn.BatchNorm2d(48)), "gn", groups=32)
    >>> p.rows[0].groups
    24
    """
    _validate(to, groups, channels_per_group, group_policy, affine, unknown, trainable_affine)
    model = unwrapped(model)
    include_list, exclude_list = _as_list(include), _as_list(exclude)
    if "groups" in targets.target(to).options and groups is None:
        groups = DEFAULT_GROUPS
    options = {
        "groups": groups,
        "channels_per_group": channels_per_group,
        "group_policy": group_policy,
        "affine": affine,
        "include": include_list,
        "exclude": exclude_list,
        "trainable_affine": trainable_affine,
        "unknown": unknown,
    }
    result = Plan(target=to, options=options)
    for found in find_modules(model, targets.is_norm_layer):
        module, names = found.module, found.names
        path = targets.class_path(type(module))
        kind = targets.classify(module)
        reason = _filter_reason(names, include_list, exclude_list)
        if reason is None and kind is registry.LAZY:
            reason = "uninitialized lazy layer: run one forward pass first"
        if reason is None and kind is registry.UNPROVEN:
            reason = registry.probed(module)[1]
        if reason is None and kind is registry.UNKNOWN:
            if unknown == "error":
                raise PlanError(
                    f"layer '{names[0]}' is a {path}, a BatchNorm subclass normswap does not know (its forward may "
                    "differ from BatchNorm's): exclude it, or pass unknown='skip' or unknown='convert'"
                )
            if unknown == "skip":
                reason = "unknown BatchNorm subclass"
            kind = targets.fallback_class(module)
        if reason is None:
            reason = _skip_reason(kind, to)
        if reason is not None:
            result.skipped.append(SkippedLayer(names, path, reason))
            continue
        result.rows.append(_plan_row(module, names, path, to, options))
    return result


def _skip_reason(kind: registry.LayerClass, to: str) -> Optional[str]:
    if kind.family == targets.target(to).family:
        return f"already {kind.label}"
    if not kind.converts:
        return f"{kind.label} has no running statistics to convert"
    return None


def _plan_row(module: nn.Module, names: list[str], path: str, to: str, options: dict[str, Any]) -> PlanRow:
    src = targets.SourceLayer.read(module)
    name, channels = names[0], src.num_features
    note = []
    eps = src.eps
    if eps <= 0:
        eps = DEFAULT_EPS
        note.append(f"eps {src.eps:g} -> {DEFAULT_EPS:g}")
    has_affine = src.weight is not None
    groups = None
    chosen = targets.target(to)
    if chosen.grouped:
        groups = targets.group_count(chosen, channels, options, name)
        if options["groups"] is not None and options["channels_per_group"] is None and groups != options["groups"]:
            note.append(f"{options['groups']} groups do not divide {channels}")
        if channels // groups == 1 and src.rank == 1:
            raise PlanError(
                f"layer '{name}' ({type(module).__name__}, {channels} channels) would get one channel per group: "
                "on (N, C) input GroupNorm normalizes single values and outputs only its bias; "
                "exclude it or use fewer groups"
            )
        affine = options["affine"] if has_affine else "none"
        stats = "drop" if src.has_stats else "none"
    else:
        if to == "frozen" and not src.has_stats:
            raise PlanError(
                f"layer '{name}' ({type(module).__name__}) has no running statistics (track_running_stats=False), "
                "so it cannot be frozen: exclude it, or recalibrate it first"
            )
        affine = "copy" if has_affine else "none"
        stats = "copy" if src.has_stats else "none"
    act = type(src.act).__name__ if src.act is not None and not isinstance(src.act, nn.Identity) else None
    cls = targets.target_class(to, src.rank, src.act is not None)
    return PlanRow(
        names=list(names),
        source=path,
        target=to,
        target_class=targets.class_path(cls),
        channels=channels,
        groups=groups,
        rank=src.rank,
        eps=eps,
        affine=affine,
        stats=stats,
        act=act,
        trainable_affine=bool(options["trainable_affine"]) and to == "frozen" and has_affine,
        note="; ".join(note),
    )


def format_plan(p: Plan, max_rows: Optional[int] = None) -> str:
    """The plan as a text table followed by the skipped layers and their reasons."""
    header = ("layer", "from", "to", "C", "G", "affine", "stats", "note")
    lines = []
    rows = p.rows if max_rows is None else p.rows[:max_rows]
    for row in rows:
        label = row.name if len(row.names) == 1 else f"{row.name} (+{len(row.names) - 1} more)"
        note = "; ".join(filter(None, [f"keeps {row.act}" if row.act else "", row.note]))
        lines.append((
            label,
            row.source.rsplit(".", 1)[-1],
            row.target_class.rsplit(".", 1)[-1],
            str(row.channels),
            "-" if row.groups is None else str(row.groups),
            row.affine + (" (trainable)" if row.trainable_affine else ""),
            row.stats,
            note,
        ))
    out = [f"plan: {len(p)} layer(s) to {p.target}, {len(p.skipped)} skipped"]
    if lines:
        out.append(text_table(header, lines))
        if max_rows is not None and len(p.rows) > max_rows:
            out.append(f"... {len(p.rows) - max_rows} more")
    reasons: dict[str, list[str]] = {}
    for skip in p.skipped:
        reasons.setdefault(skip.reason, []).append(skip.names[0])
    for reason, names in reasons.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        out.append(f"skipped ({reason}): {shown}")
    return "\n".join(out)


__getattr__ = forwarding(__name__, {"convert": ("normswap.api", "normswap.convert"),
                                    "freeze": ("normswap.api", "normswap.freeze"),
                                    "apply_conversion": ("normswap.api", "normswap.api.apply_conversion")})
"""The façade's old home: ``normswap.plan.convert``, ``.freeze`` and ``.apply_conversion`` still work, with a
``DeprecationWarning`` (they are in :mod:`normswap.api`)."""
