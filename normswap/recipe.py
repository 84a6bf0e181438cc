"""TOML recipes: a conversion written down once and run reproducibly.

A recipe names the source architecture (optional when the checkpoint carries it), ordered rules that decide what
each norm layer becomes, later steps, and the output name. Each norm layer is converted by the **first** rule whose
``match`` pattern matches one of its names; a layer no rule matches is left alone. Example (``recipes/`` has more)::

    [recipe]
    description = "Frozen BN for small-batch fine-tuning"
    arch = "resnet50"                        # optional: a timm name or "package.module:callable"
    arch_kwargs = { num_classes = 1000 }     # optional

    [[rules]]
    match = ["bn1", "layer1.*"]              # glob(s) over qualified module names
    to = "frozen"                            # gn | ln | in | frozen | sync | bn

    [[rules]]
    match = "*"
    to = "frozen"
    trainable_affine = true                  # any option of normswap.plan: groups, channels_per_group,
                                             # group_policy, affine, exclude, trainable_affine, unknown
    [[steps]]                                # optional, run in order after the rules
    op = "recalibrate"                       # or "fold"
    data = "calibration-images/"             # recalibrate: data, batches, batch_size, method
    batches = 100

    [output]                                 # optional: the output is <checkpoint stem>-<suffix>.safetensors,
    suffix = "frozen"                        # by default <checkpoint stem>-<recipe file stem>.safetensors

A recipe is data: every field is checked for its type and value when the recipe is read, and nothing it names is
imported. Its ``arch`` is built on the recipe's word only if it is a registered builder (a timm, torchvision,
transformers or ultralytics model, normswap's demo); another must be confirmed by the user (``--arch``), and its
``arch_kwargs`` then reach it only if it is a model class (see :mod:`normswap.arch`). A step's ``data`` may be a
folder of images or a tensor file; an import path (``package.module:callable``) must be typed by the user
(``--data``). Rules are matched in one pass (each layer against the rules in order, until one matches), so a recipe
of thousands of rules is planned in about the time of one plan per layer it changes.

Python: ``Recipe.load("recipes/frozen-backbone.toml").apply(model)``.
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser, published as tomli (a dependency there)
    import tomli as tomllib

from . import targets
from .arch import ArchSpec
from .errors import NormswapError, spelled
from .plan import AFFINE_MODES, GROUP_POLICIES, UNKNOWN_MODES, Plan, plan
from .registry import TARGET_NAMES
from .walk import find_modules

__all__ = ["Recipe", "RecipeError", "Rule"]

_PATTERNS = "a glob pattern or a list of them"
_POSITIVE = "a whole number of at least 1"
_OPTION_FIELDS: dict[str, tuple[str, Any]] = {
    "groups": (_POSITIVE, lambda v: _positive(v)),
    "channels_per_group": (_POSITIVE, lambda v: _positive(v)),
    "group_policy": (f"one of {', '.join(GROUP_POLICIES)}", lambda v: v in GROUP_POLICIES),
    "affine": (f"one of {', '.join(AFFINE_MODES)}", lambda v: v in AFFINE_MODES),
    "exclude": (_PATTERNS, lambda v: _patterns(v)),
    "trainable_affine": ("true or false", lambda v: isinstance(v, bool)),
    "unknown": (f"one of {', '.join(UNKNOWN_MODES)}", lambda v: v in UNKNOWN_MODES),
}
"""What each option of :func:`normswap.plan.plan` may be in a recipe rule."""

_RULE_FIELDS: dict[str, tuple[str, Any]] = {
    "match": (_PATTERNS, lambda v: _patterns(v) and len(v) > 0),
    "to": (f"one of {', '.join(TARGET_NAMES)}", lambda v: v in TARGET_NAMES),
    **{name: _OPTION_FIELDS[name] for name in inspect.signature(plan).parameters
       if name not in ("model", "to", "include")},
}
"""A rule's keys: ``match`` (the plan's ``include``), ``to``, and every other option of :func:`normswap.plan.plan`
(a new option without an entry in ``_OPTION_FIELDS`` fails here, at import)."""
_STEP_FIELDS: dict[str, dict[str, tuple[str, Any]]] = {
    "recalibrate": {
        "op": ("recalibrate", lambda v: v == "recalibrate"),
        "data": ("a folder or a tensor file", lambda v: isinstance(v, str) and bool(v)),
        "batches": (_POSITIVE, lambda v: _positive(v)),
        "batch_size": (_POSITIVE, lambda v: _positive(v)),
        "method": ("exact or sequential", lambda v: v in ("exact", "sequential")),
        "input_key": ("a string", lambda v: isinstance(v, str)),
    },
    "fold": {"op": ("fold", lambda v: v == "fold")},
}
_TOP_KEYS = {"recipe", "rules", "steps", "output"}
_RECIPE_FIELDS: dict[str, tuple[str, Any]] = {
    "description": ("a string", lambda v: isinstance(v, str)),
    "arch": ("a timm name or package.module:callable", lambda v: isinstance(v, str) and bool(v)),
    "arch_kwargs": ("a table", lambda v: isinstance(v, dict)),
}
_SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_OUTPUT_FIELDS: dict[str, tuple[str, Any]] = {
    "suffix": ("a short file-name part (letters, digits, '.', '_', '-'; no '/' or '..')",
               lambda v: isinstance(v, str) and bool(_SUFFIX.match(v)) and ".." not in v),
}


def _default_suffix(path: Optional[Path]) -> str:
    """The recipe's name (its file stem, ``frozen-backbone``) where it can be part of a file name, else
    ``converted``: ``normswap apply recipes/frozen-backbone.toml resnet50.pt`` writes
    ``resnet50-frozen-backbone.safetensors``.

    >>> _default_suffix(Path("recipes/frozen-backbone.toml")), _default_suffix(None)
    ('frozen-backbone', 'converted')
    """
    stem = path.stem if path is not None else ""
    return stem if _SUFFIX.match(stem) and ".." not in stem else "converted"


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _patterns(value: Any) -> bool:
    return isinstance(value, str) or isinstance(value, list) and all(isinstance(v, str) for v in value)


class RecipeError(NormswapError):
    """A recipe file is missing, not TOML, or has a key or value normswap does not understand."""


@dataclass
class Rule:
    """Convert the layers matching ``match`` (and not an earlier rule) to ``to`` with ``options`` of :func:`plan`."""

    match: list[str]
    to: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A parsed recipe. ``apply`` converts a model by its rules; ``steps`` are run by :meth:`run_steps`."""

    rules: list[Rule]
    steps: list[dict[str, Any]] = field(default_factory=list)
    description: str = ""
    arch: Optional[str] = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    suffix: str = "converted"
    path: Optional[Path] = None

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Recipe":
        """Read and check a recipe file; :class:`RecipeError` names the file and the problem."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RecipeError(f"recipe {path} does not exist") from None
        except (IsADirectoryError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RecipeError(f"recipe {path} is not a TOML file: {exc}") from None
        except RecursionError:
            raise RecipeError(f"recipe {path} nests tables or arrays too deeply to be a recipe") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Optional[Path] = None) -> "Recipe":
        """Check and build a recipe from parsed TOML; :class:`RecipeError` names the table and the field."""
        where = f"recipe {path}" if path else "recipe"
        _check_keys(data, _TOP_KEYS, where)
        head = _check_fields(data.get("recipe", {}), _RECIPE_FIELDS, f"{where} [recipe]")
        output = _check_fields(data.get("output", {}), _OUTPUT_FIELDS, f"{where} [output]")
        raw_rules = data.get("rules", [])
        if not isinstance(raw_rules, list) or not raw_rules:
            raise RecipeError(f"{where} has no [[rules]]")
        rules = [_read_rule(raw, f"{where} rule {i + 1}") for i, raw in enumerate(raw_rules)]
        raw_steps = data.get("steps", [])
        if not isinstance(raw_steps, list):
            raise RecipeError(f"{where}: steps must be [[steps]] tables")
        steps = []
        for i, raw in enumerate(raw_steps):
            op = raw.get("op") if isinstance(raw, dict) else None
            if op not in _STEP_FIELDS:
                raise RecipeError(f"{where} step {i + 1}: op must be one of {', '.join(_STEP_FIELDS)}, got {op!r}")
            steps.append(_check_fields(raw, _STEP_FIELDS[op], f"{where} step {i + 1}"))
        if head.get("arch") is not None:
            ArchSpec.parse(head["arch"], head.get("arch_kwargs", {}), from_file=True)
        return cls(
            rules=rules,
            steps=steps,
            description=head.get("description", ""),
            arch=head.get("arch"),
            arch_kwargs=dict(head.get("arch_kwargs", {})),
            suffix=output.get("suffix", _default_suffix(path)),
            path=path,
        )

    def arch_spec(self, typed: Optional[str] = None, typed_kwargs: Optional[dict[str, Any]] = None
                  ) -> Optional[ArchSpec]:
        """The architecture to build: the one the user typed (with the recipe's keyword arguments if it is the
        recipe's), else the recipe's own, as data (built only if registered); ``typed_kwargs`` override.

        >>> recipe = Recipe([Rule(["*"], "gn")], arch="monai.networks.nets:UNet")
        >>> recipe.arch_spec().from_file, recipe.arch_spec("monai.networks.nets:UNet").from_file
        (True, False)
        """
        if self.arch is None:
            return ArchSpec.parse(typed, typed_kwargs) if typed is not None else None
        recorded = ArchSpec.parse(self.arch, self.arch_kwargs, from_file=True)
        if typed is None:
            return recorded.with_kwargs(typed_kwargs)
        if typed == recorded.name:
            return recorded.confirmed(typed_kwargs)
        return ArchSpec.parse(typed, typed_kwargs)

    def plans(self, model: nn.Module) -> list[Plan]:
        """One plan per rule, each of the layers that rule is the first to match; nothing is changed.

        Each norm layer is matched against the rules in order until one matches (one pass); a rule is then planned
        over exactly the layers it claimed, its own ``exclude`` applied, and a rule that claimed none gets an empty
        plan. A plan's ``options["include"]`` are the rule's patterns.
        """
        claimed: dict[int, list[str]] = {}
        for found in find_modules(model, targets.is_norm_layer):
            for index, rule in enumerate(self.rules):
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in rule.match for name in found.names):
                    claimed.setdefault(index, []).extend(found.names)
                    break
        result = []
        for index, rule in enumerate(self.rules):
            names = claimed.get(index)
            if names:
                planned = plan(model, rule.to, include=[_literal(name) for name in names], **rule.options)
            else:
                planned = plan(nn.Module(), rule.to, include=rule.match, **rule.options)  # checks the options
            planned.options["include"] = list(rule.match)
            result.append(planned)
        return result

    def apply(self, model: nn.Module, *, plans: Optional[list[Plan]] = None, data: Any = None,
              **fit_options: Any) -> nn.Module:
        """Convert ``model`` (in place) by the rules, first matching rule first; returns the model.

        Every rule is planned before any is applied (or ``plans``, what :meth:`plans` returned for this model, are
        used), so a rule that cannot be planned leaves the model unchanged. A rule with ``affine = "fit"`` fits its
        GroupNorm weights on ``data`` (calibration batches, with the options of :meth:`normswap.plan.Plan.apply`),
        which it then needs.

        >>> import timm
        >>> recipe = Recipe([Rule(["layer1.*"], "frozen"), Rule(["*"], "gn", {"groups": 8})])
        >>> model = recipe.apply(timm.create_model("resnet18"))
        >>> type(model.layer1[0].bn1).__name__, type(model.layer2[0].bn1).__name__
        ('FrozenBatchNorm', 'GroupNorm')
        """
        for p in plans if plans is not None else self.plans(model):
            fits = any(row.affine == "fit" for row in p.rows)
            model = p.apply(model, data=data, **fit_options) if fits else p.apply(model)
        return model

    def run_steps(self, model: nn.Module, *, progress: Optional[bool] = None,
                  data: Optional[str] = None) -> nn.Module:
        """Run the recipe's later steps (recalibrate, fold) in order on an already converted model.

        ``data`` (typed by the user: a folder, a tensor file or ``package.module:callable``) replaces the data the
        recipe's recalibrate steps name; the recipe's own may only be a folder or a tensor file.
        """
        for step in self.steps:
            if step["op"] == "recalibrate":
                from .data import open_data
                from .recalibrate import recalibrate

                if data is None and "data" not in step:
                    raise RecipeError(f"the recipe's recalibrate step names no data: pass {spelled('data=', '--data')}")
                source, typed = (data, True) if data is not None else (step["data"], False)
                calibration = open_data(source, model=model, batch_size=step.get("batch_size", 32),
                                        allow_import=typed)
                model = recalibrate(
                    model,
                    calibration,
                    batches=step.get("batches"),
                    method=step.get("method", "exact"),
                    input_key=step.get("input_key"),
                    progress=progress,
                )
            else:
                from .fold import fold

                model = fold(model)
        return model


def _literal(name: str) -> str:
    """A glob pattern that matches exactly ``name``.

    >>> _literal("blocks[0].bn*")
    'blocks[[]0].bn[*]'
    """
    return re.sub(r"([*?\[])", r"[\1]", name)


def _check_keys(table: Any, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise RecipeError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def _check_fields(table: Any, fields: dict[str, tuple[str, Any]], where: str) -> dict[str, Any]:
    """``table`` if every key is known and every value is of the form its field wants, else :class:`RecipeError`."""
    _check_keys(table, set(fields), where)
    for key, value in table.items():
        wanted, valid = fields[key]
        if not valid(value):
            raise RecipeError(f"{where}: '{key}' must be {wanted}, got {value!r}")
    return dict(table)


def _read_rule(raw: Any, where: str) -> Rule:
    _check_fields(raw, _RULE_FIELDS, where)
    if "to" not in raw or "match" not in raw:
        raise RecipeError(f"{where} needs 'match' and 'to' (one of {', '.join(TARGET_NAMES)})")
    match = raw["match"]
    match = [match] if isinstance(match, str) else list(match)
    options = {key: value for key, value in raw.items() if key not in ("match", "to")}
    return Rule(match=match, to=raw["to"], options=options)
