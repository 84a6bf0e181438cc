"""Folding BatchNorm into the Conv, ConvTranspose or Linear layer that feeds it.

In eval mode a BatchNorm layer is a per-channel affine map, ``y = x * scale + shift`` with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``. When its input is the
output of a Conv/ConvTranspose/Linear layer and nothing else reads that output, the map can be multiplied into the
layer's weight and bias and the BatchNorm removed: the folded model computes the original model's **eval** output
(in train mode the original would use batch statistics, the folded model cannot).

Pairs are found in the dataflow graph of the model's eval-mode forward (``torch.fx`` symbolic trace, with timm's
not-traced modules and functions kept whole). A BatchNorm is folded only when all of these are proven:

- its only input is the output of an ``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d``, ``nn.Linear`` or timm
  ``Conv2dSame`` (exact class: a subclass may override ``forward``, as weight-standardized convs do), with as many
  output channels as the BatchNorm has features;
- nothing but the BatchNorm reads that output (no fan-out), the layer is called once and is reachable under one
  name, its weight is not shared with another module and not read directly by ``forward``;
- the BatchNorm is called once, is reachable under one name, has running statistics, and is a class normswap knows
  (:func:`normswap.targets.classify`);
- for a Linear layer: its output is ``(N, C)`` (BatchNorm normalizes dim 1, which on ``(N, L, C)`` would be ``L``),
  proven from the graph (a ``flatten``/``view`` to two dims feeds it) or from ``example_input``.

Conv layers are taken to receive batched ``(N, C, ...)`` input, the layout BatchNorm is made for; pass
``example_input`` to have that checked too. A model that cannot be traced is not folded at all (the plan says why);
its traceable part can be folded with ``within="backbone"``, which asserts that the rest of the model only calls that
part and does not reach into it.

The BatchNorm is replaced by ``nn.Identity``, or, for a layer with a fused activation (timm ``BatchNormAct2d``, frozen
and sync variants), by :class:`FoldedAct` holding its ``drop`` and ``act`` modules. A conv without bias gets one,
trainable like the weight. BatchNorm layers that are not folded stay, and :class:`FoldPlan` says why; with
``freeze_rest=True`` they become :class:`~normswap.layers.FrozenBatchNorm`.

The plan is the report: :func:`plan_fold` computes it without changing the model, ``str(plan)`` is a table and
``plan.to_dict()`` its JSON form; :meth:`FoldPlan.apply` (or :func:`fold`, which plans and applies) changes the model
and records a ``{"op": "fold", "pairs": [[conv, bn], ...]}`` step in its history, which :func:`replay_fold` repeats
on a freshly built model so that a folded checkpoint loads strictly.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> expected = model(x)
    >>> p = plan_fold(model)
    >>> [(pair.conv, pair.bn) for pair in p.pairs]
    [('0', '1')]
    >>> model = p.apply(model)
    >>> type(model[1]).__name__, torch.allclose(model(x), expected, atol=1e-6)
    ('Identity', True)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import fx, nn

from . import targets
from .data import call_model
from .errors import CheckpointError, PlanError
from .history import record_step
from .layers import FoldedAct
from .plan import Plan, plan as plan_conversion
from .walk import find_modules, get_module, replace_module, timm_untraceable

__all__ = ["FoldPair", "FoldPlan", "FoldedAct", "LeftLayer", "fold", "plan_fold", "replay_fold"]

log = logging.getLogger("normswap")

FOLDABLE_KINDS = ("bn", "bn_act", "sync", "sync_act", "frozen", "frozen_act")
"""Source kinds (see :func:`normswap.targets.classify`) whose eval output is a per-channel affine map."""

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SPATIAL_RANK: dict[type, int] = {
    cls: rank for rank, group in enumerate(zip(_CONVS, _CONV_TRANSPOSES), 1) for cls in group
}
"""Every conv class a BatchNorm folds into, with its spatial rank; timm's ``Conv2dSame`` once timm is imported."""


def _is_producer(module: nn.Module) -> bool:
    """True for the exact classes a BatchNorm can fold into: Conv1d/2d/3d, ConvTranspose, Linear, timm Conv2dSame."""
    timm_convs = sys.modules.get("timm.layers.conv2d_same")
    if timm_convs is not None and hasattr(timm_convs, "Conv2dSame"):
        _SPATIAL_RANK.setdefault(timm_convs.Conv2dSame, 2)
    return type(module) in _SPATIAL_RANK or type(module) is nn.Linear


_SHAPE_KEEPING = (nn.Identity, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU,
                  nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish, nn.BatchNorm1d)


@dataclass
class FoldPair:
    """One BatchNorm folded into the layer that feeds it."""

    conv: str
    bn: str
    conv_class: str
    bn_class: str
    channels: int
    new_bias: bool
    keeps: Optional[str] = None


@dataclass
class LeftLayer:
    """One BatchNorm-like layer that stays, why, and whether ``freeze_rest`` freezes it."""

    names: list[str]
    source: str
    reason: str
    frozen: bool = False


@dataclass
class FoldPlan:
    """What folding changes: the pairs folded and the layers left, each with its reason.

    ``len(plan)`` counts the folded pairs; ``str(plan)`` is a table; :meth:`apply` performs it.
    """

    pairs: list[FoldPair] = field(default_factory=list)
    left: list[LeftLayer] = field(default_factory=list)
    traced: bool = True
    trace_error: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    def __str__(self) -> str:
        return format_fold_plan(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the whole plan."""
        return {
            "pairs": [asdict(pair) for pair in self.pairs],
            "left": [asdict(layer) for layer in self.left],
            "traced": self.traced,
            "trace_error": self.trace_error,
            "options": dict(self.options),
        }

    def step(self) -> dict[str, Any]:
        """The history step :meth:`apply` records and :func:`replay_fold` repeats."""
        return {"op": "fold", "pairs": [[pair.conv, pair.bn] for pair in self.pairs],
                "freeze_rest": bool(self.options.get("freeze_rest", False))}

    def apply(self, model: nn.Module) -> nn.Module:
        """Fold the planned pairs of ``model`` in place (and freeze the rest if planned); returns the model.

        Everything is checked and computed before the first change: a plan that does not fit the model raises
        :class:`PlanError` and leaves the model as it was.
        """
        folded = [_fold_values(model, pair) for pair in self.pairs]
        freeze_plan = _freeze_plan(model, self.left)
        for pair, (conv, weight, bias, replacement) in zip(self.pairs, folded):
            with torch.no_grad():
                conv.weight.copy_(weight)
                if conv.bias is None:
                    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
                else:
                    conv.bias.copy_(bias)
            replace_module(model, [pair.bn], replacement)
        record_step(model, self.step())
        if freeze_plan is not None:
            model = freeze_plan.apply(model)
        log.info("folded %d BatchNorm layer(s), left %d", len(self.pairs), len(self.left))
        return model


def _freeze_plan(model: nn.Module, left: list[LeftLayer]) -> Optional[Plan]:
    """The conversion plan that freezes the layers marked ``frozen``, or ``None`` if there are none."""
    names = [name for layer in left if layer.frozen for name in layer.names]
    if not names:
        return None
    exact = ["".join(f"[{c}]" if c in "*?[" else c for c in name) for name in names]
    return plan_conversion(model, "frozen", include=exact, unknown="skip")


def format_fold_plan(p: FoldPlan) -> str:
    """The plan as a table of folded pairs, followed by the layers left and why."""
    out = [f"fold: {len(p.pairs)} BatchNorm layer(s) folded, {len(p.left)} left"
           + (f" ({sum(layer.frozen for layer in p.left)} frozen)" if p.options.get("freeze_rest") else "")]
    if not p.traced:
        out.append(f"the model could not be traced, nothing folded: {p.trace_error}")
    if p.pairs:
        header = ("layer", "into", "C", "bias", "keeps")
        rows = [(pair.bn, f"{pair.conv} ({pair.conv_class.rsplit('.', 1)[-1]})", str(pair.channels),
                 "new" if pair.new_bias else "updated", pair.keeps or "") for pair in p.pairs]
        widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        out.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
    groups: dict[tuple[str, str], list[str]] = {}
    for layer in p.left:
        groups.setdefault(("frozen" if layer.frozen else "left", layer.reason), []).append(layer.names[0])
    for (state, reason), names in groups.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        out.append(f"{state} ({reason}): {shown}")
    return "\n".join(out)


class _Tracer(fx.Tracer):
    """Symbolic tracer that keeps norm layers, foldable layers and timm's not-traced modules whole."""

    def __init__(self) -> None:
        functions, self._notrace = timm_untraceable()
        super().__init__(autowrap_functions=functions)
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if targets.is_norm_layer(m) or _is_producer(m) or type(m) in self._notrace:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module) -> fx.Graph:
    """The eval-mode graph of ``module``, which is left as it was (training flags, and no tensor constants that
    the tracer stores on the module it traces)."""
    modes = [(m, m.training) for m in module.modules()]
    attributes = set(module.__dict__)
    module.eval()
    try:
        return _Tracer().trace(module)
    finally:
        for m, training in modes:
            m.training = training
        for added in set(module.__dict__) - attributes:
            del module.__dict__[added]


def _output_ranks(model: nn.Module, example_input: Any) -> dict[int, int]:
    """Output rank of every Conv/ConvTranspose/Linear layer on one eval forward of ``example_input`` (by ``id``)."""
    ranks: dict[int, int] = {}

    def remember(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            ranks.setdefault(id(module), output.dim())

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(remember) for m in model.modules() if _is_producer(m)]
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
    return ranks


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _proves_two_dims(node: Any, modules: dict[str, nn.Module], depth: int = 0) -> bool:
    """True when the graph shows that ``node`` is a 2-D ``(N, C)`` tensor."""
    if not isinstance(node, fx.Node) or depth > 64:
        return False
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Flatten):
            return module.start_dim == 1 and module.end_dim == -1
        if type(module) in _SHAPE_KEEPING or type(module) is nn.Linear:
            return bool(node.args) and _proves_two_dims(node.args[0], modules, depth + 1)
        return False
    if node.op in ("call_function", "call_method"):
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return start == 1 and end == -1
        if node.op == "call_method" and name in ("view", "reshape"):
            shape = node.args[1:]
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = shape[0]
            return len(shape) == 2
    return False


@dataclass
class _Candidate:
    bn_name: str
    bn: nn.Module
    source: str
    reason: Optional[str] = None
    conv_name: str = ""
    conv: Optional[nn.Module] = None


def plan_fold(
    model: nn.Module,
    *,
    freeze_rest: bool = False,
    within: Optional[str] = None,
    example_input: Any = None,
) -> FoldPlan:
    """Plan folding the BatchNorm layers of ``model`` into the layers that feed them; the model is not changed.

    Args:
        freeze_rest: plan to convert the BatchNorm layers that are not folded to FrozenBatchNorm (those without
            running statistics and unknown subclasses stay as they are).
        within: qualified name of the submodule to analyse instead of the whole model, for a model whose own
            forward cannot be traced. You assert that the rest of the model only calls this submodule.
        example_input: one model input (as :func:`normswap.data.call_model` takes it) to run once, in eval mode,
            to check the rank of each Conv/Linear output; needed to fold a Linear whose ``(N, C)`` output the
            graph does not prove.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4, affine=False))
    >>> print(plan_fold(model))
    fold: 1 BatchNorm layer(s) folded, 0 left
    layer  into        C  bias     keeps
    2      1 (Linear)  4  updated
    """
    options = {"freeze_rest": freeze_rest, "within": within, "example_input": example_input is not None}
    scope = model
    prefix = ""
    if within:
        try:
            scope = get_module(model, within)
        except KeyError:
            raise PlanError(f"the model has no submodule '{within}' to fold within") from None
        prefix = within + "."
    names_of: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    candidates = [
        _Candidate(found.names[0], found.module, targets.class_path(type(found.module)))
        for found in find_modules(model, lambda m: targets.classify(m) in (*FOLDABLE_KINDS, "unknown", "lazy"))
    ]
    result = FoldPlan(options=options)
    for cand in candidates:
        cand.reason = _layer_reason(cand.bn, names_of[id(cand.bn)])
    try:
        graph = _trace(scope)
    except Exception as exc:
        message = str(exc).strip().splitlines()
        result.traced = False
        result.trace_error = f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")
        graph = None
    ranks = _output_ranks(model, example_input) if example_input is not None else {}
    if graph is not None:
        _match_pairs(model, scope, prefix, graph, candidates, names_of, ranks)
    for cand in candidates:
        if cand.reason is None and cand.conv is None:
            if graph is None:
                cand.reason = "the model could not be traced"
            elif not cand.bn_name.startswith(prefix):
                cand.reason = f"outside {within}"
            else:
                cand.reason = "not called by the traced forward"
        if cand.reason is None:
            result.pairs.append(_pair(cand))
        else:
            kind = targets.classify(cand.bn)
            freezable = freeze_rest and kind in FOLDABLE_KINDS and not kind.startswith("frozen") \
                and targets.SourceLayer.read(cand.bn).has_stats
            result.left.append(LeftLayer(list(names_of[id(cand.bn)]), cand.source, cand.reason, freezable))
    _freeze_plan(model, result.left)  # a layer that cannot be frozen raises here, before anything changes
    return result


def _layer_reason(bn: nn.Module, names: list[str]) -> Optional[str]:
    """Why this norm layer cannot be folded whatever feeds it, or ``None``."""
    kind = targets.classify(bn)
    if kind == "lazy":
        return "uninitialized lazy layer"
    if kind == "unknown":
        return "a BatchNorm subclass normswap does not know (its forward may differ)"
    if not targets.SourceLayer.read(bn).has_stats:
        return "no running statistics (track_running_stats=False)"
    if len(names) > 1:
        return f"shared: reachable as {', '.join(names)}"
    if _has_hooks(bn):
        return "has hooks"
    return None


def _match_pairs(
    model: nn.Module,
    scope: nn.Module,
    prefix: str,
    graph: fx.Graph,
    candidates: list[_Candidate],
    names_of: dict[int, list[str]],
    ranks: dict[int, int],
) -> None:
    """Give each candidate its producer layer, or the reason it has none."""
    modules = dict(scope.named_modules())
    calls: dict[int, int] = {}
    called_names = set()
    attr_reads = set()
    for node in graph.nodes:
        if node.op == "call_module":
            calls[id(modules[node.target])] = calls.get(id(modules[node.target]), 0) + 1
            called_names.add(node.target)
        elif node.op == "get_attr":
            attr_reads.add(node.target)
    shared_params = _shared_parameters(model)
    by_module = {id(cand.bn): cand for cand in candidates}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        cand = by_module.get(id(modules[node.target]))
        if cand is None or cand.reason is not None:
            continue
        cand.reason = _pair_reason(node, cand, prefix, modules, calls, called_names, attr_reads, shared_params,
                                   names_of, ranks)
    for cand in candidates:
        if cand.reason is None and cand.conv is None and calls.get(id(cand.bn), 0) == 0:
            outer = _untraced_ancestor(cand.bn_name, prefix, called_names)
            if outer is not None:
                cand.reason = f"inside {outer}, which is not traced through"


def _untraced_ancestor(name: str, prefix: str, called_names: set) -> Optional[str]:
    """The module called as a whole by the graph that contains ``name``, if any."""
    if not name.startswith(prefix):
        return None
    parts = name[len(prefix):].split(".")
    for end in range(1, len(parts)):
        if ".".join(parts[:end]) in called_names:
            return prefix + ".".join(parts[:end])
    return None


def _shared_parameters(model: nn.Module) -> set:
    """``id`` of every parameter reachable under more than one module."""
    owners: dict[int, set] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners.setdefault(id(param), set()).add(id(module))
    return {key for key, found in owners.items() if len(found) > 1}


def _pair_reason(
    node: fx.Node,
    cand: _Candidate,
    prefix: str,
    modules: dict[str, nn.Module],
    calls: dict[int, int],
    called_names: set,
    attr_reads: set,
    shared_params: set,
    names_of: dict[int, list[str]],
    ranks: dict[int, int],
) -> Optional[str]:
    """Why this BatchNorm call cannot be folded into its input's producer, or ``None`` (then ``cand.conv`` is set)."""
    bn_local = cand.bn_name[len(prefix):]
    outer = _untraced_ancestor(cand.bn_name, prefix, called_names)
    if outer is not None:
        return f"inside {outer}, which is not traced through"
    if calls[id(cand.bn)] > 1:
        return f"called {calls[id(cand.bn)]} times"
    if any(read == bn_local or read.startswith(bn_local + ".") for read in attr_reads):
        return "its tensors are read directly by the forward"
    if len(node.args) != 1 or node.kwargs:
        return "called with more than one argument"
    source = node.args[0]
    if not isinstance(source, fx.Node) or source.op != "call_module":
        what = source.target if isinstance(source, fx.Node) else type(source)
        what = getattr(what, "__name__", what)
        return f"its input is not the output of a layer it can fold into (it comes from {what})"
    conv = modules[source.target]
    conv_name = prefix + source.target
    label = f"{conv_name} ({type(conv).__name__})"
    if not _is_producer(conv):
        return f"its input comes from {label}, not a Conv, ConvTranspose or Linear layer"
    if _untraced_ancestor(conv_name, prefix, called_names) is not None:
        return f"{label} is inside a module that is not traced through"
    if len(source.users) > 1:
        return f"the output of {label} also feeds other operations"
    if calls[id(conv)] > 1:
        return f"{label} is called {calls[id(conv)]} times"
    if len(names_of[id(conv)]) > 1:
        return f"{label} is shared: reachable as {', '.join(names_of[id(conv)])}"
    if any(id(p) in shared_params for p in conv.parameters(recurse=False)):
        return f"{label} shares its weight with another module"
    if any(read == source.target or read.startswith(source.target + ".") for read in attr_reads):
        return f"the weights of {label} are read directly by the forward"
    if _has_hooks(conv):
        return f"{label} has hooks"
    channels = conv.weight.shape[1] * conv.groups if type(conv) in _CONV_TRANSPOSES else conv.weight.shape[0]
    features = targets.SourceLayer.read(cand.bn).num_features
    if channels != features:
        return f"{label} has {channels} output channels, the layer has {features}"
    rank = ranks.get(id(conv))
    if type(conv) is nn.Linear:
        if rank is None and not _proves_two_dims(source.args[0] if source.args else None, modules):
            return f"cannot prove that {label} outputs (N, C): pass example_input"
        if rank is not None and rank != 2:
            return f"{label} outputs {rank}-D tensors, and BatchNorm normalizes their dim 1, not the features"
    elif rank is not None and rank != _SPATIAL_RANK[type(conv)] + 2:
        return f"{label} runs on unbatched input"
    cand.conv_name, cand.conv = conv_name, conv
    return None


def _pair(cand: _Candidate) -> FoldPair:
    src = targets.SourceLayer.read(cand.bn)
    keeps = None
    if src.act is not None:
        kept = [type(m).__name__ for m in (src.drop, src.act) if m is not None and not isinstance(m, nn.Identity)]
        keeps = " + ".join(kept) or None
    return FoldPair(
        conv=cand.conv_name,
        bn=cand.bn_name,
        conv_class=targets.class_path(type(cand.conv)),
        bn_class=cand.source,
        channels=src.num_features,
        new_bias=cand.conv.bias is None,
        keeps=keeps,
    )


def _replacement(bn: nn.Module) -> nn.Module:
    """The module that takes a folded norm layer's place: its drop and activation, or ``nn.Identity``."""
    src = targets.SourceLayer.read(bn)
    if src.act is None:
        return nn.Identity()
    drop = src.drop if src.drop is not None else nn.Identity()
    if isinstance(drop, nn.Identity) and isinstance(src.act, nn.Identity):
        return nn.Identity()
    return FoldedAct(drop, src.act)


def _fold_values(model: nn.Module, pair: FoldPair) -> tuple[nn.Module, torch.Tensor, torch.Tensor, nn.Module]:
    """The conv layer, its folded weight and bias, and the BatchNorm's replacement; nothing is changed yet."""
    try:
        conv, bn = get_module(model, pair.conv), get_module(model, pair.bn)
    except KeyError as exc:
        raise PlanError(f"the fold plan does not fit this model: it has no layer '{exc.args[0]}'") from None
    for name, module, expected in ((pair.conv, conv, pair.conv_class), (pair.bn, bn, pair.bn_class)):
        if targets.class_path(type(module)) != expected:
            raise PlanError(f"the fold plan does not fit this model: layer '{name}' is not a {expected}")
    src = targets.SourceLayer.read(bn)
    compute = torch.float64
    scale = torch.rsqrt(src.running_var.detach().to(compute) + src.eps)
    if src.weight is not None:
        scale = scale * src.weight.detach().to(compute)
    shift = -src.running_mean.detach().to(compute) * scale
    if src.bias is not None:
        shift = shift + src.bias.detach().to(compute)
    weight = conv.weight.detach()
    scale = scale.to(weight.device)
    shift = shift.to(weight.device)
    if type(conv) in _CONV_TRANSPOSES:
        grouped = weight.to(compute).reshape(conv.groups, weight.shape[0] // conv.groups, *weight.shape[1:])
        shape = [conv.groups, 1, weight.shape[1]] + [1] * (weight.dim() - 2)
        folded = (grouped * scale.reshape(shape)).reshape(weight.shape)
    else:
        folded = weight.to(compute) * scale.reshape([-1] + [1] * (weight.dim() - 1))
    old_bias = conv.bias.detach().to(compute) if conv.bias is not None else torch.zeros_like(shift)
    bias = old_bias * scale + shift
    return conv, folded.to(weight.dtype), bias.to(weight.dtype), _replacement(bn)


def fold(
    model: nn.Module,
    *,
    freeze_rest: bool = False,
    within: Optional[str] = None,
    example_input: Any = None,
) -> nn.Module:
    """Fold every BatchNorm of ``model`` that provably can be into the layer feeding it (in place); returns it.

    The folded model computes the original's eval-mode output. To see what was folded and why the rest was not,
    plan first: ``p = plan_fold(model); print(p); model = p.apply(model)``. Options are those of :func:`plan_fold`.

    >>> import timm, torch
    >>> model = timm.create_model("efficientnet_b0").eval()
    >>> x = torch.randn(1, 3, 32, 32)
    >>> expected = model(x)
    >>> model = fold(model)
    >>> model.bn1, torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)
    (FoldedAct(
      (drop): Identity()
      (act): SiLU(inplace=True)
    ), True)
    """
    return plan_fold(model, freeze_rest=freeze_rest, within=within, example_input=example_input).apply(model)


def replay_fold(model: nn.Module, step: dict[str, Any]) -> nn.Module:
    """Make the structural change of a recorded fold step on a freshly built model, so its checkpoint loads strictly.

    Each folded conv gets a bias parameter if it has none (zeros, trainable like the weight) and each folded norm
    layer is replaced as :func:`fold` replaced it. Weights are not computed: they come from the checkpoint. The step
    is recorded in the model's history. ``freeze_rest`` is not replayed here: freezing is its own recorded step.

    >>> from torch import nn
    >>> model = replay_fold(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)),
    ...                     {"op": "fold", "pairs": [["0", "1"]]})
    >>> sorted(model.state_dict())
    ['0.bias', '0.weight']
    """
    changes = []
    for pair in step.get("pairs", []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise CheckpointError(f"the checkpoint's fold step has a malformed pair {pair!r}")
        conv_name, bn_name = pair
        try:
            conv, bn = get_module(model, conv_name), get_module(model, bn_name)
        except KeyError as exc:
            raise CheckpointError(
                f"the checkpoint's fold step does not fit this architecture: it has no layer '{exc.args[0]}'"
            ) from None
        if not _is_producer(conv) or targets.classify(bn) not in FOLDABLE_KINDS:
            raise CheckpointError(
                f"the checkpoint's fold step does not fit this architecture: '{conv_name}' is a "
                f"{type(conv).__name__} and '{bn_name}' a {type(bn).__name__}"
            )
        changes.append((conv, bn_name, _replacement(bn)))
    for conv, bn_name, replacement in changes:
        if conv.bias is None:
            out = conv.weight.shape[1] * conv.groups if type(conv) in _CONV_TRANSPOSES else conv.weight.shape[0]
            bias = torch.zeros(out, dtype=conv.weight.dtype, device=conv.weight.device)
            conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
        replace_module(model, [bn_name], replacement)
    record_step(model, dict(step))
    return model
