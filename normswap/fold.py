"""Folding BatchNorm into the Conv, ConvTranspose or Linear layer that feeds it.

In eval mode a BatchNorm layer is a per-channel affine map, ``y = x * scale + shift`` with
``scale = weight / sqrt(running_var + eps)`` and ``shift = bias - running_mean * scale``. When its input is the
output of a Conv/ConvTranspose/Linear layer and nothing else reads that output, the map can be multiplied into the
layer's weight and bias and the BatchNorm removed: the folded model computes the original model's **eval** output
(in train mode the original would use batch statistics, the folded model cannot).

Pairs are found by running the model once on an example input (:mod:`normswap.graph`): ``example_input``, the
first batch of ``data``, a tensor of ``input_shape``, or an input made from the architecture. A BatchNorm is folded
only when the run shows all of these:

- it is called once, with one argument, is a class normswap knows (:func:`normswap.targets.classify`), has running
  statistics and no hooks, and nothing but its own forward reads its tensors;
- its input was produced, inside one call of a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear layer (or a subclass:
  timm's ``Conv2dSame``, smp's ``Conv2dStaticSamePadding``), by the convolution or linear function applied to that
  layer's own weight and bias, and that layer returned it unchanged, possibly followed by operations that only
  reshape it keeping every channel in place (``flatten(0, 1)`` of a Linear's ``(N, L, C)`` output, a ``view`` or
  ``reshape`` of the leading dimensions). A layer without bias is run with a provisional zero bias, so the forward
  shows that it passes the bias folding gives it to its convolution (not a layer of torch's own class running
  torch's forward, which passes its bias, ``None`` included: :func:`normswap.graph.runs_torch_forward`);
- nothing else reads that output (or the reshaped ones), and the model does not return it;
- the layer is called once, has no hooks, shares no parameter with another module, and nothing else reads its
  weight or bias; it has as many output channels as the BatchNorm has features;
- the BatchNorm normalizes the layer's output channels: a batched ``(N, C, ...)`` convolution output, a Linear's
  ``(N, C)`` output, or those reshaped as above (BatchNorm1d on a Linear's ``(N, L, C)`` normalizes dim 1, the
  ``L`` positions, and is not folded);
- no branch on input-dependent tensor values in the module call that wires the two together (or in the code
  around it, before it) could wire them differently for another input (:meth:`normswap.graph.Graph.
  decision_affecting`).

A layer registered under several names is still one layer: what counts is how often the forward calls it. Layers the
example does not reach are left. With ``within="backbone"`` only the layers inside that submodule are folded.

The BatchNorm is replaced by ``nn.Identity``, or, for a layer with a fused activation (timm ``BatchNormAct2d``, frozen
and sync variants), by :class:`FoldedAct` holding its ``drop`` and ``act`` modules. A conv without bias gets one,
trainable like the weight. BatchNorm layers that are not folded stay, and :class:`FoldPlan` says why; with
``freeze_rest=True`` they become :class:`~normswap.layers.FrozenBatchNorm`.

The plan is the report: :func:`plan_fold` computes it without changing the model, ``str(plan)`` is a table and
``plan.to_dict()`` its JSON form; :meth:`FoldPlan.apply` (or :func:`fold`, which plans and applies) changes the model
and records a ``{"op": "fold", "pairs": [[conv, bn], ...]}`` step in its history. A folded model's checkpoint loads
strictly because its manifest records the structure (:mod:`normswap.checkpoint.manifest`).

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

import contextlib
import functools
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from . import registry, targets
from .errors import PlanError
from .graph import Call, Example, Graph, GraphError, Value, capture, find_example, runs_torch_forward
from .history import record_step, set_input_shape
from .placement import for_float64
from .layers import FoldedAct
from .plan import Plan, plan as plan_conversion
from .tables import text_table
from .unwrap import unwrapped, unwrapped_to_change
from .walk import every_name, find_modules, get_module, replace_module

__all__ = ["FoldPair", "FoldPlan", "FoldedAct", "LeftLayer", "fold", "fold_weights", "plan_fold"]

log = logging.getLogger("normswap")


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SPATIAL_RANK: dict[type, int] = {
    cls: rank for rank, group in enumerate(zip(_CONVS, _CONV_TRANSPOSES), 1) for cls in group
}
"""Every conv class a BatchNorm folds into (and their subclasses), with its spatial rank."""

_FUNCTIONS: dict[type, tuple[str, ...]] = {
    nn.Linear: ("torch.nn.functional.linear", "torch._C._nn.linear"),
    **{cls: (f"torch.nn.functional.conv{rank}d", f"torch.conv{rank}d") for rank, cls in enumerate(_CONVS, 1)},
    **{cls: (f"torch.nn.functional.conv_transpose{rank}d", f"torch.conv_transpose{rank}d")
       for rank, cls in enumerate(_CONV_TRANSPOSES, 1)},
}
"""The function each class a BatchNorm folds into computes its output with, as :mod:`normswap.graph` names it."""


_RESHAPES = frozenset({
    "torch.Tensor.flatten", "torch.flatten", "torch.Tensor.unflatten", "torch.unflatten", "torch.Tensor.view",
    "torch.Tensor.reshape", "torch.reshape", "torch.Tensor.view_as", "torch.Tensor.reshape_as",
    "torch.Tensor.squeeze", "torch.squeeze", "torch.Tensor.unsqueeze", "torch.unsqueeze",
})
"""Functions that only reshape a tensor (its elements keep their order): they may stand between a layer and the
BatchNorm folded into it when every channel stays in place."""

_MAX_RESHAPES = 4


def _base_class(module: nn.Module) -> Optional[type]:
    """The Conv/ConvTranspose/Linear class that ``module`` is or derives from, or ``None``."""
    kind = type(module)
    if kind not in _BASE_CLASSES:  # (asked of every module of a model in every plan)
        _BASE_CLASSES[kind] = next((cls for cls in kind.__mro__ if cls in _FUNCTIONS), None)
    return _BASE_CLASSES[kind]


_BASE_CLASSES: dict[type, Optional[type]] = {}


@contextlib.contextmanager
def _provisional_biases(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Give every Conv/ConvTranspose/Linear layer without bias a zero bias while the model is captured (adding zero
    changes no output), so the recorded forward shows whether the layer passes its bias to its convolution: the bias
    folding would give it. Layers of torch's own classes running torch's forward, which passes the bias, are left as
    they are (:func:`normswap.graph.runs_torch_forward`): a bias would only make their forward slower. Yields
    ``id(layer)`` -> that bias; the layers are put back afterwards."""
    given: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    for _, module in every_name(model):  # (a module under a second name has the bias it was given under the first)
        if _base_class(module) is None or module._parameters.get("bias", False) is not None \
                or runs_torch_forward(module):
            continue
        weight = module.weight
        if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
            continue
        bias = nn.Parameter(torch.zeros(_output_channels(module), dtype=weight.dtype, device=weight.device),
                            requires_grad=False)
        module._parameters["bias"] = bias
        given[id(module)] = (module, bias)
    try:
        yield {key: bias for key, (_, bias) in given.items()}
    finally:
        for module, _ in given.values():
            module._parameters["bias"] = None


def _channels_in_place(source: Sequence[int], channel_dim: int, normalized: Sequence[int]) -> bool:
    """True if reshaping a tensor of shape ``source`` whose channels are dimension ``channel_dim`` to ``normalized``
    keeps every element in its channel, and puts the channels in dimension 1 (what BatchNorm normalizes)."""
    return len(normalized) >= 2 and 0 <= channel_dim < len(source) and source[channel_dim] == normalized[1] \
        and math.prod(source[:channel_dim]) == normalized[0] and math.prod(source) == math.prod(normalized)


def _output_channels(conv: nn.Module) -> int:
    return conv.weight.shape[1] * conv.groups if isinstance(conv, _CONV_TRANSPOSES) else conv.weight.shape[0]


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

    ``len(plan)`` counts the folded pairs; ``str(plan)`` is a table; :meth:`apply` performs it. ``example`` describes
    the input the model was run on; ``captured`` is false when it could not be run (``capture_error`` says why) and
    nothing is folded.
    """

    pairs: list[FoldPair] = field(default_factory=list)
    left: list[LeftLayer] = field(default_factory=list)
    captured: bool = True
    capture_error: str = ""
    example: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def layers(self) -> int:
        """How many BatchNorm-like layers the model has: folded and left."""
        return len(self.pairs) + len(self.left)

    def __str__(self) -> str:
        return format_fold_plan(self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the whole plan."""
        return {
            "pairs": [asdict(pair) for pair in self.pairs],
            "left": [asdict(layer) for layer in self.left],
            "captured": self.captured,
            "capture_error": self.capture_error,
            "example": self.example,
            "options": dict(self.options),
        }

    def why_empty(self) -> str:
        """Why folding changes nothing, in one sentence (for a plan that folds or freezes: an empty string).

        >>> print(plan_fold(torch.nn.Sequential(torch.nn.GroupNorm(2, 4))).why_empty())
        the model has no BatchNorm layer to fold
        """
        if self.pairs or any(layer.frozen for layer in self.left):
            return ""
        if not self.left:
            return "the model has no BatchNorm layer to fold"
        reason = self.capture_error if not self.captured else self.left[0].reason
        return f"folded 0 of {self.layers} BatchNorm layer(s) (first reason: {reason})"

    def step(self) -> dict[str, Any]:
        """The history step :meth:`apply` records."""
        return {"op": "fold", "pairs": [[pair.conv, pair.bn] for pair in self.pairs],
                "freeze_rest": bool(self.options.get("freeze_rest", False))}

    def apply(self, model: nn.Module) -> nn.Module:
        """Fold the planned pairs of ``model`` in place (and freeze the rest if planned); returns the model.

        Everything is checked and computed before the first change: a plan that does not fit the model raises
        :class:`PlanError` and leaves the model as it was. A wrapper (:mod:`normswap.unwrap`) is looked through.
        """
        model = unwrapped_to_change(model, "fold")
        folded = [_fold_values(model, pair) for pair in self.pairs]
        freeze_plan = _freeze_plan(model, self.left)
        for pair, (conv, weight, bias, replacement) in zip(self.pairs, folded):
            with torch.no_grad():
                conv.weight.copy_(weight)
                if conv.bias is None:
                    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)
                else:
                    conv.bias.copy_(bias)
            replace_module(model, _names(model, get_module(model, pair.bn)), replacement)
        record_step(model, self.step())
        if self.options.get("input_shape"):
            set_input_shape(model, self.options["input_shape"])
        if freeze_plan is not None:
            model = freeze_plan.apply(model)
        log.info("folded %d of %d BatchNorm layer(s)", len(self.pairs), self.layers)
        return model


def _names(model: nn.Module, module: nn.Module) -> list[str]:
    """Every qualified name ``module`` is registered under in ``model``."""
    return [name for name, found in model.named_modules(remove_duplicate=False) if found is module]


def _freeze_plan(model: nn.Module, left: list[LeftLayer]) -> Optional[Plan]:
    """The conversion plan that freezes the layers marked ``frozen``, or ``None`` if there are none."""
    names = [name for layer in left if layer.frozen for name in layer.names]
    if not names:
        return None
    exact = ["".join(f"[{c}]" if c in "*?[" else c for c in name) for name in names]
    return plan_conversion(model, "frozen", include=exact, unknown="skip")


def format_fold_plan(p: FoldPlan) -> str:
    """The plan as a table of folded pairs, followed by the layers left and why."""
    frozen = f", {sum(layer.frozen for layer in p.left)} of the rest frozen" if p.options.get("freeze_rest") else ""
    example = f", example input {p.example}" if p.example else ""
    out = [f"fold: folded {len(p.pairs)} of {p.layers} BatchNorm layer(s){frozen}{example}"]
    if not p.captured:
        out.append(f"nothing folded: {p.capture_error}")
    if p.pairs:
        header = ("layer", "into", "C", "bias", "keeps")
        rows = [(pair.bn, f"{pair.conv} ({pair.conv_class.rsplit('.', 1)[-1]})", str(pair.channels),
                 "new" if pair.new_bias else "updated", pair.keeps or "") for pair in p.pairs]
        out.append(text_table(header, rows))
    groups: dict[tuple[str, str], list[str]] = {}
    for layer in p.left:
        groups.setdefault(("frozen" if layer.frozen else "left", layer.reason), []).append(layer.names[0])
    for (state, reason), names in groups.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
        out.append(f"{state} ({reason}): {shown}")
    return "\n".join(out)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


@dataclass
class _Candidate:
    names: list[str]
    bn: nn.Module
    source: str
    reason: Optional[str] = None
    conv_name: str = ""
    conv: Optional[nn.Module] = None

    @property
    def bn_name(self) -> str:
        return self.names[0]

    @functools.cached_property
    def layer(self) -> targets.SourceLayer:
        """The norm layer as :class:`~normswap.targets.SourceLayer` reads it (once: planning asks several times)."""
        return targets.SourceLayer.read(self.bn)


def plan_fold(
    model: nn.Module,
    *,
    freeze_rest: bool = False,
    within: Optional[str] = None,
    example_input: Any = None,
    data: Optional[Iterable[Any]] = None,
    input_shape: Optional[Sequence[int]] = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
    progress: Optional[bool] = None,
) -> FoldPlan:
    """Plan folding the BatchNorm layers of ``model`` into the layers that feed them; the model is not changed.

    The model is run once, in eval mode, on an example input: ``example_input`` (one model input, as
    :func:`normswap.data.call_model` takes it), else the first batch of ``data``, else a random tensor of
    ``input_shape``, else one made from the architecture (:func:`normswap.graph.find_example`). If it cannot be
    run, nothing is folded and the plan says why.

    Args:
        freeze_rest: plan to convert the BatchNorm layers that are not folded to FrozenBatchNorm (those without
            running statistics and unknown subclasses stay as they are).
        within: qualified name of a submodule: fold only the layers inside it.
        example_input, data, input_shape: the example input, see above.
        input_fn, input_key: how to find the model input in the first batch of ``data``, as in
            :func:`normswap.data.iter_inputs` (``input_key="pixel_values"`` for dict batches).
        progress: ``True`` shows a progress bar while the model runs, ``False`` never; ``None`` shows one on a
            terminal once the run has lasted two seconds (:mod:`normswap.progress`).

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(12, 4), nn.BatchNorm1d(4, affine=False))
    >>> print(plan_fold(model))
    fold: folded 1 of 1 BatchNorm layer(s), example input 2x12 (guessed from the input of layer 0)
    layer  into        C  bias     keeps
    1      0 (Linear)  4  updated
    """
    model = unwrapped(model)
    options = {"freeze_rest": freeze_rest, "within": within, "example_input": example_input is not None,
               "data": data is not None, "input_shape": list(input_shape) if input_shape is not None else None}
    prefix = ""
    if within:
        try:
            get_module(model, within)
        except KeyError:
            raise PlanError(f"the model has no submodule '{within}' to fold within") from None
        prefix = within + "."
    candidates = [
        _Candidate(found.names, found.module, targets.class_path(type(found.module)))
        for found in find_modules(model, _is_candidate)
    ]
    result = FoldPlan(options=options)
    graph: Optional[Graph] = None
    provisional: dict[int, torch.Tensor] = {}
    if candidates:
        try:
            example = Example(example_input, "example_input") if example_input is not None else find_example(
                model, data, input_shape, input_fn=input_fn, input_key=input_key)
            result.example = str(example)
            with _provisional_biases(model) as provisional:
                graph = capture(model, example.value, example=result.example, progress=progress)
        except GraphError as exc:
            given = example_input is not None or data is not None or input_shape is not None
            hint = "" if given else ("; give the input it takes (input_shape=, data= or example_input=; "
                                     "--input-shape or --data on the command line)")
            result.captured, result.capture_error = False, f"{exc}{hint}"
    for cand in candidates:
        cand.reason = _layer_reason(cand)
        if cand.reason is None and within and not any(name.startswith(prefix) for name in cand.names):
            cand.reason = f"outside {within}"
        if cand.reason is None:
            cand.reason = "the model could not be run" if graph is None else _pair_reason(graph, cand, provisional)
        if cand.reason is None and within and not cand.conv_name.startswith(prefix):
            cand.reason = f"its input comes from {cand.conv_name}, outside {within}"
        if cand.reason is None:
            result.pairs.append(_pair(cand))
        else:
            kind = targets.classify(cand.bn)
            freezable = freeze_rest and kind.foldable and kind.family != "frozen" \
                and cand.layer.has_stats
            result.left.append(LeftLayer(list(cand.names), cand.source, cand.reason, freezable))
    _freeze_plan(model, result.left)  # a layer that cannot be frozen raises here, before anything changes
    return result


def _is_candidate(module: nn.Module) -> bool:
    """A layer folding looks at: one it can fold, or a BatchNorm-like one it reports (lazy, unknown subclass)."""
    kind = targets.classify(module)
    return kind is not None and (kind.foldable or kind in (registry.LAZY, registry.UNKNOWN, registry.UNPROVEN))


def _layer_reason(cand: _Candidate) -> Optional[str]:
    """Why this norm layer cannot be folded whatever feeds it, or ``None``."""
    bn = cand.bn
    kind = targets.classify(bn)
    if kind is registry.LAZY:
        return "uninitialized lazy layer"
    if kind is registry.UNKNOWN:
        return "a BatchNorm subclass normswap does not know (its forward may differ)"
    if kind is registry.UNPROVEN:
        return registry.probed(bn)[1]
    if not cand.layer.has_stats:
        return "no running statistics (track_running_stats=False)"
    if _has_hooks(bn):
        return "has hooks"
    return None


def _short(name: str) -> str:
    """A function's name without its module: ``torch.Tensor.add_`` -> ``add_``."""
    return name.rsplit(".", 1)[-1]


def _where(call: Call) -> str:
    return f" in {call.parent.name or '<model>'}" if call.parent is not None else ""


def _pair_reason(graph: Graph, cand: _Candidate, provisional: dict[int, torch.Tensor]) -> Optional[str]:
    """Why this BatchNorm cannot be folded into the layer that produced its input in the captured forward, or
    ``None`` (then ``cand.conv`` and ``cand.conv_name`` are set)."""
    calls = graph.module_calls(cand.bn)
    if not calls:
        return "not called by the example forward"
    if len(calls) > 1:
        return f"called {len(calls)} times"
    call = calls[0]
    inputs = call.inputs
    if call.positional != 1 or len(inputs) != 1:
        return "not called with its input as the one positional argument"
    layer = cand.layer
    for tensor in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
        own = graph.parameter(tensor)
        if own is not None and graph.readers(own, outside=call):
            return "its tensors are read directly by the forward"
    normalized = inputs[0]
    value, reader = normalized, call
    chain: list[tuple[Value, Call]] = []  # (value, the one call allowed to read it), from the BatchNorm back
    producer = value.producer
    while producer is not None and producer.name in _RESHAPES and len(chain) < _MAX_RESHAPES:
        reshaped = producer.inputs
        if len(reshaped) != 1:
            break
        chain.append((value, reader))
        value, reader = reshaped[0], producer
        producer = value.producer
    if producer is None:
        return "its input is an input of the model" if value.from_input and value.name is None else \
            "its input comes from outside the computation normswap sees"
    conv_call = producer.parent
    conv = conv_call.module if conv_call is not None else None
    base = _base_class(conv) if conv is not None else None
    if base is None or producer.name not in _FUNCTIONS[base]:
        return f"its input comes from {_short(producer.name)}{_where(producer)}, not from a Conv, ConvTranspose or " \
               "Linear layer"
    label = f"{conv_call.name} ({type(conv).__name__})"
    reason = _producer_reason(graph, conv, base, label, producer, conv_call, value, provisional)
    if reason is not None:
        return reason
    for seen, allowed in [(value, reader), *chain]:
        readers = [found for found in graph.readers(seen, outside=call) if found is not allowed]
        if readers:
            return f"the output of {label} also feeds {_short(readers[0].name)}{_where(readers[0])}"
        if graph.is_output(seen):
            return f"the output of {label} is also an output of the model"
    wiring = graph.common_caller(call, conv_call)
    decision = graph.decision_affecting(wiring) if wiring is not None else None
    if decision is not None:
        return f"the forward branches on tensor values ({_short(decision.name)}{_where(decision)}), which could " \
               f"wire {label} differently for other inputs"
    features = cand.layer.num_features
    if _output_channels(conv) != features:
        return f"{label} has {_output_channels(conv)} output channels, the layer has {features}"
    shape, normalized_shape = value.shape, normalized.shape
    channel_dim = len(shape) - 1 if base is nn.Linear else len(shape) - _SPATIAL_RANK[base] - 1
    if not _channels_in_place(shape, channel_dim, normalized_shape):
        if chain:
            return f"the output of {label} is reshaped to {'x'.join(map(str, normalized_shape))}, which moves its " \
                   "channels out of the dimension BatchNorm normalizes"
        if base is nn.Linear:
            return f"{label} outputs {len(shape)}-D tensors, and BatchNorm normalizes their dim 1, not the features"
        return f"{label} runs on unbatched input"
    cand.conv_name, cand.conv = conv_call.name, conv
    return None


def _producer_reason(graph: Graph, conv: nn.Module, base: type, label: str, producer: Call, conv_call: Call,
                     value: Value, provisional: dict[int, torch.Tensor]) -> Optional[str]:
    """Why ``conv`` (which computed the BatchNorm's input in ``producer``) cannot take the fold, or ``None``."""
    weight = graph.parameter(conv.weight)
    inputs = producer.inputs
    if len(inputs) < 2 or inputs[1] is not weight:
        return f"{label} does not compute with its own weight (its forward changes it, as weight standardization does)"
    bias: Optional[Value] = None
    if conv.bias is not None or not runs_torch_forward(conv):
        own_bias = conv.bias if conv.bias is not None else provisional.get(id(conv))
        if own_bias is None:
            return f"{label} has no bias parameter to take the one folding would give it"
        bias = graph.parameter(own_bias)
        if bias is None or inputs[2:] != [bias]:
            if conv.bias is None:
                return f"{label} has no bias, and its forward does not pass the bias folding would give it to its " \
                       f"{_short(producer.name)}"
            return f"{label} does not add its own bias in its {_short(producer.name)}"
    elif inputs[2:]:  # (torch's forward passes no other tensor)
        return f"{label} does not add its own bias in its {_short(producer.name)}"
    if value not in conv_call.outputs:  # (values compare by identity)
        return f"{label} does not return the output of its {_short(producer.name)} unchanged"
    if graph.call_count(conv) > 1:
        return f"{label} is called {graph.call_count(conv)} times"
    if any(graph.is_shared(p) for p in conv._parameters.values() if p is not None):
        return f"{label} shares its weight with another module"
    if any(graph.readers(param, outside=producer) for param in (weight, bias) if param is not None):
        return f"the weights of {label} are read directly by the forward"
    if _has_hooks(conv):
        return f"{label} has hooks"
    return None


def _pair(cand: _Candidate) -> FoldPair:
    src = cand.layer
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
    weight, bias = fold_weights(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(),
                                src.running_mean.detach(), src.running_var.detach(), src.eps,
                                None if src.weight is None else src.weight.detach(),
                                None if src.bias is None else src.bias.detach(),
                                transposed=isinstance(conv, _CONV_TRANSPOSES), groups=getattr(conv, "groups", 1))
    return conv, weight, bias, _replacement(bn)


def fold_weights(
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    bn_weight: Optional[torch.Tensor] = None,
    bn_bias: Optional[torch.Tensor] = None,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of a Conv/ConvTranspose/Linear layer with the eval-mode BatchNorm after it multiplied in,
    computed in float64 and returned in the layer's dtype (a pure function: nothing is changed).

    BatchNorm's eval output is ``y * scale + shift`` per output channel, ``scale = bn_weight / sqrt(running_var +
    eps)``, ``shift = bn_bias - running_mean * scale``; the folded layer computes it directly. A transposed
    convolution's output channels are its weight's second dimension, per group (``transposed``, ``groups``).

    >>> conv, bn = torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3).eval()
    >>> bn.running_mean.fill_(0.5); bn.running_var.fill_(4.0)  # doctest: +ELLIPSIS
    tensor(...)
    >>> w, b = fold_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    >>> x = torch.randn(1, 2, 4, 4)
    >>> torch.allclose(torch.nn.functional.conv2d(x, w, b), bn(conv(x)), atol=1e-6)
    True
    """
    compute = torch.float64
    work = for_float64(weight)
    scale = torch.rsqrt(for_float64(running_var).to(work.device, compute) + eps)
    if bn_weight is not None:
        scale = scale * for_float64(bn_weight).to(work.device, compute)
    shift = -for_float64(running_mean).to(work.device, compute) * scale
    if bn_bias is not None:
        shift = shift + for_float64(bn_bias).to(work.device, compute)
    if transposed:
        grouped = work.to(compute).reshape(groups, work.shape[0] // groups, *work.shape[1:])
        shape = [groups, 1, work.shape[1]] + [1] * (work.dim() - 2)
        folded = (grouped * scale.reshape(shape)).reshape(work.shape)
    else:
        folded = work.to(compute) * scale.reshape([-1] + [1] * (work.dim() - 1))
    old_bias = for_float64(bias).to(work.device, compute) if bias is not None else torch.zeros_like(shift)
    new_bias = old_bias * scale + shift
    return folded.to(weight.device, weight.dtype), new_bias.to(weight.device, weight.dtype)


def fold(
    model: nn.Module,
    *,
    freeze_rest: bool = False,
    within: Optional[str] = None,
    example_input: Any = None,
    data: Optional[Iterable[Any]] = None,
    input_shape: Optional[Sequence[int]] = None,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
    progress: Optional[bool] = None,
) -> nn.Module:
    """Fold every BatchNorm of ``model`` that provably can be into the layer feeding it (in place); returns it.

    The folded model computes the original's eval-mode output. To see what was folded and why the rest was not,
    plan first: ``p = plan_fold(model); print(p); model = p.apply(model)``. Options are those of :func:`plan_fold`.
    A fold that changes nothing warns (``UserWarning``) naming why, as ``normswap fold`` refuses it.

    >>> import timm, torch
    >>> model = timm.create_model("efficientnet_b0").eval()
    >>> x = torch.randn(1, 3, 32, 32)
    >>> expected = model(x)
    >>> model = fold(model, input_shape=(1, 3, 64, 64))
    >>> model.bn1, torch.allclose(model(x), expected, rtol=1e-4, atol=1e-5)
    (FoldedAct(
      (drop): Identity()
      (act): SiLU(inplace=True)
    ), True)
    """
    planned = plan_fold(model, freeze_rest=freeze_rest, within=within, example_input=example_input, data=data,
                        input_shape=input_shape, input_fn=input_fn, input_key=input_key, progress=progress)
    if planned.why_empty():
        warnings.warn(f"fold changed nothing: {planned.why_empty()}", UserWarning, stacklevel=2)
    return planned.apply(model)
