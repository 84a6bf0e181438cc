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

    [output]
    suffix = "frozen"                        # output: <checkpoint stem>-<suffix>.safetensors

Python: ``Recipe.load("recipes/frozen-backbone.toml").apply(model)``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from .errors import NormswapError
from .plan import Plan, plan
from .targets import TARGETS

__all__ = ["Recipe", "RecipeError", "Rule"]

_RULE_KEYS = {"match", "to", "groups", "channels_per_group", "group_policy", "affine", "exclude",
              "trainable_affine", "unknown"}
_STEP_KEYS = {"recalibrate": {"op", "data", "batches", "batch_size", "method", "input_key"}, "fold": {"op"}}
_TOP_KEYS = {"recipe", "rules", "steps", "output"}
_RECIPE_KEYS = {"description", "arch", "arch_kwargs"}
_OUTPUT_KEYS = {"suffix"}


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
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Optional[Path] = None) -> "Recipe":
        """Check and build a recipe from parsed TOML."""
        where = f"recipe {path}" if path else "recipe"
        _check_keys(data, _TOP_KEYS, where)
        head = data.get("recipe", {})
        _check_keys(head, _RECIPE_KEYS, f"{where} [recipe]")
        output = data.get("output", {})
        _check_keys(output, _OUTPUT_KEYS, f"{where} [output]")
        rules = [_read_rule(raw, f"{where} rule {i + 1}") for i, raw in enumerate(data.get("rules", []))]
        if not rules:
            raise RecipeError(f"{where} has no [[rules]]")
        steps = []
        for i, raw in enumerate(data.get("steps", [])):
            op = raw.get("op")
            if op not in _STEP_KEYS:
                raise RecipeError(f"{where} step {i + 1}: op must be one of {', '.join(_STEP_KEYS)}, got {op!r}")
            _check_keys(raw, _STEP_KEYS[op], f"{where} step {i + 1}")
            steps.append(dict(raw))
        return cls(
            rules=rules,
            steps=steps,
            description=head.get("description", ""),
            arch=head.get("arch"),
            arch_kwargs=dict(head.get("arch_kwargs", {})),
            suffix=output.get("suffix", "converted"),
            path=path,
        )

    def plans(self, model: nn.Module) -> list[Plan]:
        """One plan per rule, each excluding what earlier rules matched; nothing is changed."""
        result, claimed = [], []
        for rule in self.rules:
            options = dict(rule.options)
            exclude = options.pop("exclude", [])
            exclude = [exclude] if isinstance(exclude, str) else list(exclude)
            result.append(plan(model, rule.to, include=rule.match, exclude=claimed + exclude, **options))
            claimed += rule.match
        return result

    def apply(self, model: nn.Module) -> nn.Module:
        """Convert ``model`` (in place) by the rules, first matching rule first; returns the model.

        Every rule is planned before any is applied, so a rule that cannot be planned leaves the model unchanged.

        >>> import timm
        >>> recipe = Recipe([Rule(["layer1.*"], "frozen"), Rule(["*"], "gn", {"groups": 8})])
        >>> model = recipe.apply(timm.create_model("resnet18"))
        >>> type(model.layer1[0].bn1).__name__, type(model.layer2[0].bn1).__name__
        ('FrozenBatchNorm', 'GroupNorm')
        """
        plans = self.plans(model)
        for p in plans:
            model = p.apply(model)
        return model

    def run_steps(self, model: nn.Module, *, progress: Optional[bool] = None) -> nn.Module:
        """Run the recipe's later steps (recalibrate, fold) in order on an already converted model."""
        for step in self.steps:
            if step["op"] == "recalibrate":
                from .data import open_data
                from .recalibrate import recalibrate

                data = open_data(step["data"], model=model, batch_size=step.get("batch_size", 32))
                model = recalibrate(
                    model,
                    data,
                    batches=step.get("batches"),
                    method=step.get("method", "exact"),
                    input_key=step.get("input_key"),
                    progress=progress,
                )
            else:
                from .fold import fold

                model = fold(model)
        return model


def _check_keys(table: Any, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise RecipeError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise RecipeError(f"{where}: unknown key '{unknown[0]}' (allowed: {', '.join(sorted(allowed))})")


def _read_rule(raw: Any, where: str) -> Rule:
    _check_keys(raw, _RULE_KEYS, where)
    if "to" not in raw or "match" not in raw:
        raise RecipeError(f"{where} needs 'match' and 'to' (one of {', '.join(TARGETS)})")
    match = raw["match"]
    match = [match] if isinstance(match, str) else list(match)
    options = {key: value for key, value in raw.items() if key not in ("match", "to")}
    return Rule(match=match, to=raw["to"], options=options)
