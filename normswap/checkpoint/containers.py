"""Finding the weights inside the files training tools write: which entry, under which key prefix.

A file rarely holds just a state dict. timm's ``train.py`` saves ``{"state_dict", "state_dict_ema", "optimizer",
"args", ...}``; Lightning saves ``{"state_dict": {"model.…", "criterion.…", "ema_model.…"}, ...}``; DDP adds
``module.``, ``torch.compile`` adds ``_orig_mod.``; distillation scripts nest ``student.``. So normswap does not
guess from names alone: every mapping in the file that holds tensors is an *entry* (``state_dict``,
``state_dict_ema``, the file itself...), every dotted prefix of its keys is a *prefix* (``model.``,
``model._orig_mod.``), and :func:`choose_weights` takes the entry and prefix under which the most of the model's own
keys are found. Ties go to the weights that are not an exponential moving average (an entry or prefix with ``ema``
in its name) unless ``ema=True`` (timm's own loader prefers the EMA weights; normswap prefers the weights that were
trained, and says which it used), then to the shorter prefix. ``key="a.b"`` and ``prefix="model."`` choose
explicitly. When nothing matches, the error lists the candidates with their match counts.

Example::

    >>> import torch
    >>> file = {"state_dict": {"model.w": torch.ones(1), "criterion.weight": torch.ones(1)}, "epoch": 3}
    >>> choice = choose_weights(file, expected={"w"})
    >>> choice.entry, choice.prefix, sorted(choice.tensors)
    ('state_dict', 'model.', ['w'])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..errors import CheckpointError, spelled

__all__ = ["WRAPPER_PREFIXES", "Candidate", "WeightsChoice", "candidates", "choose_weights", "find_modules_in",
           "guess_weights"]

PREFERRED_ENTRIES = ("state_dict", "model", "module", "net", "network", "weights", "params", "student",
                     "state_dict_ema", "model_ema", "ema")
"""Entry names tried first when several entries match equally well, and the order :func:`guess_weights` uses."""

_MAX_DEPTH = 4
_MAX_PREFIX_DEPTH = 4
_SHOWN = 4


@dataclass
class Candidate:
    """One mapping in the file that holds tensors: its dotted entry path (``""`` for the file itself), the
    tensors, and the module versions (``_metadata``) stored with them."""

    entry: str
    tensors: dict[str, torch.Tensor]
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def is_ema(self) -> bool:
        return "ema" in self.entry.lower()


@dataclass
class WeightsChoice:
    """The weights chosen: entry, prefix, the tensors with the prefix removed, their module versions, the number of
    the model's keys they match, and what else the file offered."""

    entry: str
    prefix: str
    tensors: dict[str, torch.Tensor]
    versions: dict[str, int]
    matched: int = 0
    others: list[str] = field(default_factory=list)

    def describe(self) -> str:
        where = f"entry '{self.entry}'" if self.entry else "the top level"
        return where + (f", prefix '{self.prefix}'" if self.prefix else "")


def _versions_of(mapping: Mapping) -> dict[str, int]:
    metadata = getattr(mapping, "_metadata", None)
    if not isinstance(metadata, Mapping):
        return {}
    return {str(prefix): value["version"] for prefix, value in metadata.items()
            if isinstance(value, Mapping) and isinstance(value.get("version"), int)}


def candidates(obj: Any) -> list[Candidate]:
    """Every mapping in ``obj`` (the file's content) that holds tensors, depth first, the file itself first."""
    found: list[Candidate] = []

    def visit(value: Any, entry: str, depth: int) -> None:
        if not isinstance(value, Mapping) or depth > _MAX_DEPTH:
            return
        tensors = {str(k): v for k, v in value.items() if isinstance(v, torch.Tensor)}
        if tensors:
            found.append(Candidate(entry, tensors, _versions_of(value)))
        for key, child in value.items():
            if isinstance(child, Mapping):
                visit(child, f"{entry}.{key}" if entry else str(key), depth + 1)

    visit(obj, "", 0)
    return found


def find_modules_in(obj: Any) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Module`` in a file's content (a pickled model), with its entry path."""
    if isinstance(obj, nn.Module):
        return [("", obj)]
    if isinstance(obj, Mapping):
        return [(str(key), value) for key, value in obj.items() if isinstance(value, nn.Module)]
    return []


def _prefix_matches(names: list[str], expected: set[str]) -> dict[str, int]:
    """For every prefix under which some of ``names`` are expected keys, how many are."""
    counts: dict[str, int] = {}
    for name in names:
        if name in expected:
            counts[""] = counts.get("", 0) + 1
        start = 0
        for _ in range(_MAX_PREFIX_DEPTH):
            dot = name.find(".", start)
            if dot < 0:
                break
            if name[dot + 1:] in expected:
                counts[name[:dot + 1]] = counts.get(name[:dot + 1], 0) + 1
            start = dot + 1
    return counts


def _strip(candidate: Candidate, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    tensors = {name[len(prefix):]: t for name, t in candidate.tensors.items() if name.startswith(prefix)}
    bare = prefix[:-1]
    versions = {}
    for module, version in candidate.versions.items():
        if module == bare:
            versions[""] = version
        elif module.startswith(prefix):
            versions[module[len(prefix):]] = version
        elif not prefix:
            versions[module] = version
    return tensors, versions


def _rank(candidate: Candidate, prefix: str, ema: bool) -> tuple:
    is_ema = candidate.is_ema or "ema" in prefix.lower()
    entry_root = candidate.entry.split(".")[0]
    preferred = PREFERRED_ENTRIES.index(entry_root) if entry_root in PREFERRED_ENTRIES else len(PREFERRED_ENTRIES)
    return (is_ema != ema, prefix.count("."), preferred if candidate.entry else -1, len(prefix))


def _entries(obj: Any, key: Optional[str], where: str) -> list[Candidate]:
    """The entries of ``obj`` that hold tensors (only the one ``key`` names, if given); an error if there are none."""
    found = candidates(obj)
    if not found:
        raise _no_tensors(obj, where)
    if key is None:
        return found
    chosen = [c for c in found if c.entry == key]
    if not chosen:
        raise _no_entry(key, found, where)
    return chosen


def _no_tensors(obj: Any, where: str) -> CheckpointError:
    keys = [str(k) for k in obj] if isinstance(obj, Mapping) else []
    shown = ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")
    held = f" (keys: {shown})" if keys else f" (it holds a {type(obj).__name__})"
    return CheckpointError(f"{where} holds no tensors{held}: pass {spelled('key=', '--key')} to name the entry "
                           "that holds the weights")


def _no_entry(key: str, found: list[Candidate], where: str) -> CheckpointError:
    entries = ", ".join(c.entry for c in found if c.entry) or "none"
    return CheckpointError(f"{where} has no entry '{key}' holding tensors (entries holding tensors: {entries})")


def _contents(found: list[Candidate]) -> str:
    """What the entries hold, by the first part of their keys: ``state_dict: 120 keys under 'model.', 1 under
    'criterion.'``."""
    parts = []
    for candidate in found[:_SHOWN]:
        heads: dict[str, int] = {}
        for name in candidate.tensors:
            head = name.split(".", 1)[0] + "." if "." in name else name
            heads[head] = heads.get(head, 0) + 1
        top = sorted(heads.items(), key=lambda item: -item[1])[:3]
        shown = ", ".join(f"{n} under {head!r}" if head.endswith(".") else f"{head!r}" for head, n in top)
        parts.append(f"{candidate.entry or 'top level'}: {len(candidate.tensors)} keys, {shown}")
    return "; ".join(parts)


def choose_weights(obj: Any, expected: set[str], *, key: Optional[str] = None, prefix: Optional[str] = None,
                   ema: bool = False, where: str = "the file") -> WeightsChoice:
    """The entry and prefix of ``obj`` under which the most of the ``expected`` state-dict keys are found.

    Raises:
        CheckpointError: ``key`` names no entry holding tensors, or no entry matches any expected key (the message
            lists the entries and prefixes tried, with their match counts).
    """
    found = _entries(obj, key, where)
    scored = []
    for candidate in found:
        if prefix is not None:
            names = {name[len(prefix):] for name in candidate.tensors if name.startswith(prefix)}
            scored.append((len(names & expected), candidate, prefix))
            continue
        counts = _prefix_matches(list(candidate.tensors), expected)
        scored.extend((n, candidate, option) for option, n in counts.items())
        if not counts:
            scored.append((0, candidate, ""))
    best = max(n for n, _, _ in scored)
    scored.sort(key=lambda item: (-item[0], _rank(item[1], item[2], ema)))
    if best == 0:
        raise CheckpointError(
            f"none of the model's {len(expected)} keys are in {where} ({_contents(found)}): wrong architecture, or "
            f"pass {spelled('key= / prefix=', '--key / --prefix')} to say where the weights are"
        )
    matched, candidate, chosen_prefix = scored[0]
    tensors, versions = _strip(candidate, chosen_prefix)
    others = [f"{c.entry or 'top level'}{f' under {p!r}' if p else ''} ({n} keys)" for n, c, p in scored[1:]
              if n == matched and (c is not candidate or p != chosen_prefix)]
    return WeightsChoice(candidate.entry, chosen_prefix, tensors, versions, matched, others)


WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes of wrappers around a model (DDP and DataParallel, ``torch.compile``): without a model to match
against, only these are taken for a wrapper's and removed."""


def guess_weights(obj: Any, *, key: Optional[str] = None, prefix: Optional[str] = None,
                  ema: bool = False, where: str = "the file") -> WeightsChoice:
    """The weights when there is no model to match against (``inspect`` without an architecture): the preferred
    entry that holds tensors, with the wrapper prefixes (:data:`WRAPPER_PREFIXES`, also nested:
    ``module._orig_mod.``) that all its keys share removed; :meth:`WeightsChoice.describe` says which entry and
    prefix were taken. A prefix of the model's own (``layer.`` of ``layer.weight``) is kept.

    >>> choice = guess_weights({"state_dict": {"module.layer.weight": torch.ones(1)}})
    >>> choice.describe(), list(choice.tensors)
    ("entry 'state_dict', prefix 'module.'", ['layer.weight'])
    """
    found = _entries(obj, key, where)
    found.sort(key=lambda c: (c.is_ema != ema, -len(c.tensors), _rank(c, "", ema)))
    candidate = found[0]
    if prefix is None:
        prefix = ""
        while True:
            option = next((p for p in WRAPPER_PREFIXES
                           if all(name.startswith(prefix + p) and name != prefix + p for name in candidate.tensors)),
                          None)
            if option is None:
                break
            prefix += option
    tensors, versions = _strip(candidate, prefix)
    return WeightsChoice(candidate.entry, prefix, tensors, versions, len(tensors))
