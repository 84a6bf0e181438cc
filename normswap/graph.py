"""Graph knowledge from running the model: who produced each tensor, who else read it, how often each module ran.

:func:`capture` runs the model once on an example input, in eval mode and without gradients, and records every call
it makes: every module call (through process-wide forward hooks) and every torch function or tensor method call
inside them that reads or makes a tensor (through a :class:`~torch.overrides.TorchFunctionMode`; the one call of a
layer of torch's own classes, ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU`` and the like, is recorded from the
hooks, the same way, with the mode off while the layer runs). Real Python runs, so control flow, list and dict
inputs, ``torch.ops`` calls and every library's own code take part as they do in deployment; nothing has to be
traceable. The :class:`Graph` it returns answers, for every tensor the forward touched (activations, parameters and
buffers):

- the call that produced it (the last one that wrote it: an in-place operation is a new producer),
- every call that read it (queries of shape, dtype or device are not reads),
- the module calls around every call, and how many times each module was *called* (a module registered under
  several names but called once is called once),
- which tensors the model returned, and which parameters and buffers more than one module holds (tied weights).

It keeps what it recorded as columns of numbers and hands out a :class:`Value` or :class:`Call` view of a row when
asked: a forward makes thousands of each, which as objects would keep the garbage collector busy while the model
runs.

:func:`example_input` makes the example: the first batch of ``data``, a tensor of ``input_shape``, or an input
derived from the architecture (timm's data config, the documented input of torchvision, transformers and
ultralytics models, otherwise the first layer's input channels or features), packaged as the model takes it
(a list of images for torchvision's detection models, ``pixel_values=`` for transformers).

Limits, and how they are guarded:

- Only the path the example takes is seen. A module the example does not call has no calls in the graph, and users
  of the graph treat that as "unknown" (fold leaves such layers alone). A branch on tensor *values* (``if
  x.sum() > 0``, ``.item()``, ``.tolist()``, ``nonzero``) is recorded as a :attr:`Call.decides` call when the value
  depends on the input; :meth:`Graph.decision_affecting` finds such a branch inside a module call or in the code
  around it that ran before it, and fold refuses what such a branch could wire differently. Branches on Python
  values computed elsewhere from tensor values, and branches on input *shapes*, are taken as the example takes
  them: give an example of the shape the model is used with (``input_shape=``).
- Tensors reached only through objects other than tuples, lists, dicts and dataclasses (for a module's inputs
  and outputs), or through code the function mode does not see (TorchScript, C++ extensions that do not dispatch
  through ``torch.ops``), appear without a producer.
- A tensor changed through another view of its memory gets a new value without producer (taken to depend on the
  input), so what reads it is not mistaken for a reader of the old value.
- Running a model can change it: capture puts back what the forward changed (:mod:`normswap.model_state`: module
  attributes such as YOLO's anchors, caches such as LeViT's attention biases, buffers, the training flags and the
  random number generators), and refuses a model with uninitialized lazy modules, which the first forward would
  change. Nothing is stored on the model.

Why a recorded eager forward: ``torch.fx`` symbolic tracing fails on most models from outside timm (YOLO,
transformers, smp, torchvision detection); ``torch.export(strict=False)`` fails on every torchvision detection model
(data-dependent shapes in its post-processing) and ``make_fx`` costs two to ten forwards and fails on Mask R-CNN,
both giving aten-level graphs without module calls; recording one eager forward costs about one forward and works on
every model that runs (``python benchmarks/bench_fold.py --capture`` measures all four).

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> graph = capture(model, example_input(model))
    >>> bn_call, = graph.module_calls(model[1])
    >>> producer = bn_call.inputs[0].producer
    >>> producer.name, producer.parent.name, graph.call_count(model[0])
    ('torch.nn.functional.conv2d', '0', 1)
    >>> [reader.name for reader in graph.readers(bn_call.inputs[0], outside=bn_call)]
    []
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, resolve_name

from . import registry, targets
from .data import SCALAR_TYPES, call_model, describe_input, iter_inputs, output_tensors
from .errors import NormswapError, spelled
from .history import checked_example_shape, get_input_shape
from .model_state import restored
from .progress import progress_bar
from .walk import every_name

__all__ = ["Call", "Example", "Graph", "GraphError", "Value", "capture", "describe_input", "example_input",
           "find_example", "runs_torch_forward"]


class GraphError(NormswapError):
    """The model could not be run on its example input, or no example input could be made."""


# Tensor methods and attributes that return facts about a tensor, not its values: not reads.
_METADATA = frozenset(f"torch.Tensor.{name}" for name in (
    "shape.__get__", "ndim.__get__", "dtype.__get__", "device.__get__", "layout.__get__", "requires_grad.__get__",
    "is_cuda.__get__", "is_cpu.__get__", "is_mps.__get__", "is_meta.__get__", "is_sparse.__get__",
    "is_quantized.__get__", "is_leaf.__get__", "is_nested.__get__", "grad_fn.__get__", "names.__get__",
    "itemsize.__get__", "nbytes.__get__", "_version.__get__", "dim", "ndimension", "size", "stride", "numel",
    "nelement", "element_size", "is_contiguous", "is_floating_point", "is_complex", "is_signed", "is_pinned",
    "get_device", "__len__", "data_ptr", "storage_offset", "has_names", "dim_order", "is_inference",
))

# Calls that turn tensor values into Python values, or whose output shape depends on the values: where code can
# branch on the data.
_DECISIONS = frozenset({
    "torch.Tensor.__bool__", "torch.Tensor.item", "torch.Tensor.tolist", "torch.Tensor.__int__",
    "torch.Tensor.__float__", "torch.Tensor.__index__", "torch.Tensor.__complex__", "torch.Tensor.numpy",
    "torch.Tensor.__array__", "torch.Tensor.is_nonzero", "torch.Tensor.equal", "torch.Tensor.allclose",
    "torch.is_nonzero", "torch.equal", "torch.allclose", "torch.Tensor.nonzero", "torch.nonzero",
    "torch.Tensor.argwhere", "torch.argwhere", "torch.Tensor.masked_select", "torch.masked_select",
    "torch.Tensor.unique", "torch.unique", "torch.unique_consecutive", "torch.Tensor.unique_consecutive",
    "torch.Tensor.bincount", "torch.bincount", "torch.Tensor.nonzero_static", "torchvision.nms",
})

# Calls whose outputs do not depend on the values of their tensor arguments (only on shape, dtype, device).
_VALUE_FREE = frozenset({
    "torch.zeros_like", "torch.ones_like", "torch.empty_like", "torch.full_like", "torch.rand_like",
    "torch.randn_like", "torch.randint_like", "torch.Tensor.new_zeros", "torch.Tensor.new_ones",
    "torch.Tensor.new_empty", "torch.Tensor.new_full", "torch.Tensor.new_tensor",
})

# Tensor methods whose second argument gives only a shape or a dtype: it is not read.
_SHAPE_OF_OTHER = frozenset(f"torch.Tensor.{name}" for name in ("reshape_as", "view_as", "expand_as", "type_as"))


class _Trace:
    """What one forward did, as columns: one list entry per value and per call, numbers where others would be
    objects. A forward makes thousands of values and calls; kept as objects, each with its lists, they would be tens
    of thousands of objects for the garbage collector to walk while the model runs. :class:`Value` and
    :class:`Call` are views of one row, made when asked for."""

    __slots__ = ("dims", "dims_start", "producer", "name", "from_input", "version", "reader", "more_readers",
                 "call_name", "parent", "module", "end", "positional", "decides", "inputs", "inputs_start",
                 "outputs", "outputs_start", "outputs_stop", "by_module")

    def __init__(self) -> None:
        # values: the shape of value i is dims[dims_start[i]:dims_start[i + 1]] (the last start is appended when
        # the forward has ended); its readers are the call reader[i] (-1: none) and, where several calls read it,
        # the calls more_readers[i], in order
        self.dims: list[int] = []
        self.dims_start: list[int] = []
        self.producer: list[int] = []  # -1: none
        self.name: list[Optional[str]] = []
        self.from_input: list[bool] = []
        self.version: list[Optional[int]] = []
        self.reader: list[int] = []
        self.more_readers: dict[int, list[int]] = {}
        # calls: the inputs of call j are inputs[inputs_start[j]:inputs_start[j + 1]] (as dims), its outputs
        # outputs[outputs_start[j]:outputs_stop[j]] (a module call's are known when it returns)
        self.call_name: list[str] = []
        self.parent: list[int] = []  # -1: none
        self.module: list[Optional[nn.Module]] = []
        self.end: list[int] = []
        self.positional: list[int] = []
        self.decides: list[bool] = []
        self.inputs: list[int] = []
        self.inputs_start: list[int] = []
        self.outputs: list[int] = []
        self.outputs_start: list[int] = []
        self.outputs_stop: list[int] = []
        self.by_module: dict[int, list[int]] = {}  # id(module) -> its calls

    def ended(self) -> "_Trace":
        """The trace of a forward that has ended: the closing starts appended."""
        self.dims_start.append(len(self.dims))
        self.inputs_start.append(len(self.inputs))
        return self


class Value:
    """One tensor state seen during the forward: an activation, a parameter or a buffer.

    ``producer`` is the function call that produced it (``None`` for the model's inputs, parameters, buffers and
    tensors made where the recorder cannot see); an in-place operation makes a new value of the same tensor.
    ``readers`` are the function calls that read it. ``name`` is the qualified name of a parameter or buffer.
    ``from_input`` says whether its values depend on the model's input. A tensor changed through another view of
    its memory (its version counter moved while the recorder was not looking) gets a new value without producer,
    taken to depend on the input. ``version`` is the tensor's version counter when the value was made (``None``
    for inference tensors).

    A view of row ``index`` of its graph: the graph gives one object per value, so values compare by identity.
    """

    __slots__ = ("_graph", "index")

    def __init__(self, graph: "Graph", index: int) -> None:
        self._graph = graph
        self.index = index

    @property
    def shape(self) -> torch.Size:
        trace, index = self._graph._trace, self.index
        return torch.Size(trace.dims[trace.dims_start[index]:trace.dims_start[index + 1]])

    @property
    def producer(self) -> Optional["Call"]:
        return self._graph._call(self._graph._trace.producer[self.index])

    @property
    def readers(self) -> list["Call"]:
        return self._graph.readers(self)

    @property
    def name(self) -> Optional[str]:
        return self._graph._trace.name[self.index]

    @property
    def from_input(self) -> bool:
        return self._graph._trace.from_input[self.index]

    @property
    def version(self) -> Optional[int]:
        return self._graph._trace.version[self.index]

    def __repr__(self) -> str:
        producer = self.producer
        what = self.name or (producer.name if producer is not None else "input")
        return f"Value({self.index}, {list(self.shape)}, {what})"


class Call:
    """One call during the forward: of a module (``module`` is set) or of a torch function or tensor method.

    ``name`` is the module's first qualified name or the function's name (``torch.nn.functional.conv2d``).
    ``parent`` is the innermost module call around this one; calls nested in a module call have indices from its
    ``index`` to its ``end`` (a function call's ``end`` is its ``index``). ``inputs`` are the tensors among the
    arguments, in order (for a module call: among the positional ones, which ``positional`` counts; keyword
    arguments of module calls are not seen). ``decides`` marks a function call that turned input-dependent values
    into Python values (see the module documentation).

    A view of row ``index`` of its graph: the graph gives one object per call, so calls compare by identity.
    """

    __slots__ = ("_graph", "index")

    def __init__(self, graph: "Graph", index: int) -> None:
        self._graph = graph
        self.index = index

    def __repr__(self) -> str:
        return f"Call({self.index}, {self.name})"

    @property
    def name(self) -> str:
        return self._graph._trace.call_name[self.index]

    @property
    def parent(self) -> Optional["Call"]:
        return self._graph._call(self._graph._trace.parent[self.index])

    @property
    def module(self) -> Optional[nn.Module]:
        return self._graph._trace.module[self.index]

    @property
    def inputs(self) -> list[Value]:
        trace, index, value = self._graph._trace, self.index, self._graph._value
        return [value(row) for row in trace.inputs[trace.inputs_start[index]:trace.inputs_start[index + 1]]]

    @property
    def outputs(self) -> list[Value]:
        trace, index, value = self._graph._trace, self.index, self._graph._value
        return [value(row) for row in trace.outputs[trace.outputs_start[index]:trace.outputs_stop[index]]]

    @property
    def end(self) -> int:
        return self._graph._trace.end[self.index]

    @property
    def positional(self) -> int:
        return self._graph._trace.positional[self.index]

    @property
    def decides(self) -> bool:
        return self._graph._trace.decides[self.index]

    @property
    def is_module(self) -> bool:
        return self.module is not None

    def within(self, outer: "Call") -> bool:
        """True if this call is ``outer`` or ran inside it."""
        return outer.index <= self.index <= outer.end

    def ancestors(self) -> Iterator["Call"]:
        """The module calls around this call, innermost first."""
        call = self.parent
        while call is not None:
            yield call
            call = call.parent


class Graph:
    """What one forward did; see the module documentation. Build it with :func:`capture`.

    ``names`` maps ``id(module)`` to every qualified name of each module of the model, ``shared`` holds the ids of
    the parameters and buffers more than one module holds, ``example`` says what input the forward ran on.
    """

    def __init__(self, trace: _Trace, outputs: list[int], registered: dict[int, int], names: dict[int, list[str]],
                 shared: set[int], example: str) -> None:
        self._trace = trace
        self._outputs = outputs
        self._registered = registered  # id(parameter or buffer) -> its value as the forward first used it
        self.names = names
        self.shared = shared
        self.example = example
        self._calls: list[Optional[Call]] = [None] * len(trace.call_name)
        self._values: list[Optional[Value]] = [None] * len(trace.producer)
        self._decisions = [index for index, decides in enumerate(trace.decides) if decides]

    def _call(self, index: int) -> Optional[Call]:
        """The one view of call ``index`` (``None`` for -1)."""
        if index < 0:
            return None
        call = self._calls[index]
        if call is None:
            call = self._calls[index] = Call(self, index)
        return call

    def _value(self, index: int) -> Value:
        value = self._values[index]
        if value is None:
            value = self._values[index] = Value(self, index)
        return value

    @property
    def calls(self) -> list[Call]:
        """Every call, in the order they started."""
        return [self._call(index) for index in range(len(self._calls))]  # type: ignore[misc]

    @property
    def values(self) -> list[Value]:
        """Every value, in the order they were seen."""
        return [self._value(index) for index in range(len(self._values))]

    @property
    def outputs(self) -> list[Value]:
        """The tensors the model returned, in order."""
        return [self._value(index) for index in self._outputs]

    def module_calls(self, module: nn.Module) -> list[Call]:
        """Every call of ``module``, in order."""
        return [self._call(index) for index in self._trace.by_module.get(id(module), ())]  # type: ignore[misc]

    def call_count(self, module: nn.Module) -> int:
        """How many times ``module`` was called (0: the example did not reach it)."""
        return len(self._trace.by_module.get(id(module), ()))

    def is_shared(self, tensor: torch.Tensor) -> bool:
        """True if more than one module of the model holds this parameter or buffer (tied weights)."""
        return id(tensor) in self.shared

    def parameter(self, tensor: Optional[torch.Tensor]) -> Optional[Value]:
        """The value of one of the model's parameters or buffers as the forward first used it (``None`` if it did
        not use it)."""
        index = None if tensor is None else self._registered.get(id(tensor))
        return None if index is None else self._value(index)

    def readers(self, value: Value, *, outside: Optional[Call] = None) -> list[Call]:
        """The function calls that read ``value``, in order, except ``outside`` and the calls inside it."""
        trace = self._trace
        first = trace.reader[value.index]
        if first < 0:
            return []
        more = trace.more_readers.get(value.index)
        if outside is None:
            indices = [first] if more is None else [first, *more]
        else:
            low, high = outside.index, trace.end[outside.index]
            if more is None:  # (most values are read once)
                return [] if low <= first <= high else [self._call(first)]  # type: ignore[list-item]
            indices = [index for index in (first, *more) if not low <= index <= high]
        return [self._call(index) for index in indices]  # type: ignore[misc]

    def is_output(self, value: Value) -> bool:
        """True if the model returned this tensor."""
        return value.index in self._outputs

    def common_caller(self, first: Call, second: Call) -> Optional[Call]:
        """The innermost module call around both calls: the one whose code wires them together."""
        # A module call starts before every call inside it: of two calls, the later one cannot be around the
        # other, so stepping up from the later one meets the innermost call around both.
        parent = self._trace.parent
        one, other = parent[first.index], parent[second.index]
        while one != other:
            if one > other:
                one = parent[one]
            else:
                other = parent[other]
        return self._call(one)

    def decision_affecting(self, call: Call) -> Optional[Call]:
        """An input-dependent branch that could have changed what happens inside module call ``call``: one inside
        it, or one in the own code of a module call around it, before it started; ``None`` if there is none."""
        trace = self._trace
        start, end = call.index, trace.end[call.index]
        for decision in self._decisions:  # (in the order they ran: none after the call ends can affect it)
            if decision > end:
                break
            if decision >= start:
                return self._call(decision)
            around = trace.parent[decision]
            if around >= 0 and around <= start <= trace.end[around]:
                return self._call(decision)
        return None

    @property
    def decisions(self) -> list[Call]:
        """Every call that turned input-dependent tensor values into Python values, in order."""
        return [self._call(index) for index in self._decisions]  # type: ignore[misc]


@dataclass
class Example:
    """A model input and where it came from (``source``), for reports."""

    value: Any
    source: str

    def __str__(self) -> str:
        return f"{describe_input(self.value)} ({self.source})"


def example_input(
    model: nn.Module,
    data: Optional[Iterable[Any]] = None,
    input_shape: Optional[Sequence[int]] = None,
    *,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
) -> Any:
    """One input for ``model``: the first batch of ``data``, else a random tensor of ``input_shape``, else one made
    from the architecture (see :func:`find_example`). On the model's device and in its floating dtype. The random
    values come from a generator of their own with a fixed seed: the same model gets the same example every time,
    and the global random number generator is not drawn from.

    >>> model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    >>> example_input(model).shape
    torch.Size([2, 6])
    >>> example_input(model, input_shape=(5, 6)).shape
    torch.Size([5, 6])
    """
    return find_example(model, data, input_shape, input_fn=input_fn, input_key=input_key).value


def find_example(
    model: nn.Module,
    data: Optional[Iterable[Any]] = None,
    input_shape: Optional[Sequence[int]] = None,
    *,
    input_fn: Optional[Callable[[Any], Any]] = None,
    input_key: Optional[str] = None,
) -> Example:
    """:func:`example_input` with where the input came from.

    Without ``data`` or ``input_shape``, the main input tensor's shape comes from, in order: the shape the model's
    checkpoint records (:func:`normswap.history.get_input_shape`), timm's data config
    (``pretrained_cfg["input_size"]``), the documented input of a transformers model (``config.image_size``,
    ``config.num_channels``), an ultralytics model (640x640) or a torchvision model (224x224; 299x299 for Inception
    v3; 16 frames of 112x112 for the video models; the image size of a ViT; a pair of 128x128 images for the
    optical-flow models, RAFT), and otherwise the first layer: a Conv1d/2d/3d's input channels (at 256, 256x256 or
    32x32x32), a Linear's features, a BatchNorm's features at the rank it is made for (``(2, C)``, ``(2, C, 64, 64)``
    for a BatchNorm2d, ``(2, C, 16, 16, 16)``), an Embedding's token ids. The tensor is then packaged as the model
    takes it: a list of 3-D images for torchvision's detection models, ``{main_input_name: tensor}`` for
    transformers models.

    Raises:
        GraphError: ``data`` is empty, ``input_shape`` is not a shape, or nothing says what the model takes.
    """
    if data is not None:
        for _, model_input in iter_inputs(data, batches=1, input_fn=input_fn, input_key=input_key):
            return Example(model_input, "the first batch of the data")
        raise GraphError("the data is empty: an example input needs at least one batch")
    draw = _Draw(model)
    if input_shape is not None:
        shape = _checked_shape(input_shape)
        return Example(_package(model, draw.values(shape)), "input_shape")
    recorded = get_input_shape(model)
    if recorded:
        return Example(_package(model, draw.values(_checked_shape(checked_example_shape(recorded)))),
                       "the input shape the checkpoint records")
    for derive in (_timm_shape, lambda model: _transformers_input(model, draw), _ultralytics_shape,
                   _torchvision_shape):
        found = derive(model)
        if found is None:
            continue
        if isinstance(found[0], torch.Tensor):
            return Example(found[0], found[1])
        shape, source = found
        if source.endswith("a pair of images"):
            return Example((draw.values(shape), draw.values(shape)), source)
        return Example(_package(model, draw.values(shape)), source)
    found = _first_layer_input(model, draw)
    if found is None:
        raise GraphError(f"cannot tell what input a {type(model).__name__} takes: pass an example input, "
                         f"{spelled('input_shape=', '--input-shape')} or {spelled('data=', '--data')}")
    return Example(_package(model, found[0]), found[1])


def _checked_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(size) for size in input_shape)
    except (TypeError, ValueError):
        raise GraphError(f"input_shape must be a sequence of sizes like (1, 3, 640, 640), got {input_shape!r}") \
            from None
    if not shape or any(size < 1 for size in shape) or any(float(a) != b for a, b in zip(input_shape, shape)):
        raise GraphError(f"input_shape must be positive whole sizes like (1, 3, 640, 640), got {input_shape!r}")
    return shape


_UNIFORM_STEP = 3 ** 0.5 / 32768
"""Spacing of :meth:`_Draw.values`: 16-bit integers times this have mean 0 and variance 1."""


class _Draw:
    """Random example tensors on the device and in the floating dtype of the model's first parameter or buffer,
    drawn from a generator of their own, seeded alike every time: the same model gets the same example, and the
    caller's random numbers are left as they were."""

    def __init__(self, model: nn.Module) -> None:
        first = next(itertools.chain(model.parameters(), model.buffers()), None)  # (no list of every tensor)
        self.device = first.device if first is not None else torch.device("cpu")
        self.dtype = next((t.dtype for t in itertools.chain(model.parameters(), model.buffers())
                           if t.is_floating_point()), torch.get_default_dtype())
        self.generator = torch.Generator().manual_seed(0)

    def values(self, shape: Sequence[int]) -> torch.Tensor:
        """Random values of mean 0 and variance 1: uniform on [-√3, √3) in steps of √3 / 32768, four to each
        64-bit number the generator draws, so each value has 16 random bits of its own. The generator's draws are
        most of the time: 0.34 ms for a 2x3x224x224 example on one CPU thread, where ``torch.randn`` takes 1 ms."""
        count = math.prod(shape)
        words = torch.randint(-2**63, 2**63 - 1, (-(-count // 4),), dtype=torch.int64, generator=self.generator)
        values = words.view(torch.int16)[:count].to(self.dtype).mul_(_UNIFORM_STEP)
        return values.view(tuple(shape)).to(self.device)

    def tokens(self, vocabulary: int, shape: Sequence[int]) -> torch.Tensor:
        return torch.randint(0, vocabulary, tuple(shape), generator=self.generator).to(self.device)


def _package(model: nn.Module, tensor: torch.Tensor) -> Any:
    """The main input tensor as the model takes it."""
    if _is_torchvision_detection(model):
        return [image for image in tensor] if tensor.dim() == 4 else [tensor]
    name = _transformers_input_name(model)
    if name is not None:
        return {name: tensor}
    return tensor


def _is_torchvision_detection(model: nn.Module) -> bool:
    transform = sys.modules.get("torchvision.models.detection.transform")
    return transform is not None and isinstance(getattr(model, "transform", None),
                                                transform.GeneralizedRCNNTransform)


def _transformers_input_name(model: nn.Module) -> Optional[str]:
    modeling = sys.modules.get("transformers.modeling_utils")
    if modeling is None or not isinstance(model, modeling.PreTrainedModel):
        return None
    return getattr(model, "main_input_name", None) or None


def _timm_shape(model: nn.Module) -> Optional[tuple[tuple[int, ...], str]]:
    config = getattr(model, "pretrained_cfg", None)
    if "timm" not in sys.modules or not isinstance(config, Mapping) or "input_size" not in config:
        return None
    return (2, *config["input_size"]), "timm's data config"


def _transformers_input(model: nn.Module, draw: _Draw) -> Optional[tuple[Any, str]]:
    name = _transformers_input_name(model)
    if name is None:
        return None
    config = model.config
    if name in ("pixel_values", "pixel_values_videos"):
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        return (2, getattr(config, "num_channels", 3), height, width), "the transformers config"
    if name == "input_ids":
        return draw.tokens(max(1, getattr(config, "vocab_size", 2)), (2, 16)), "random token ids"
    return None


def _ultralytics_shape(model: nn.Module) -> Optional[tuple[tuple[int, ...], str]]:
    tasks = sys.modules.get("ultralytics.nn.tasks")
    if tasks is None or not isinstance(model, tasks.BaseModel):
        return None
    channels = model.yaml.get("ch", 3) if isinstance(getattr(model, "yaml", None), Mapping) else 3
    size = 224 if isinstance(model, getattr(tasks, "ClassificationModel", ())) else 640
    return (1, channels, size, size), "ultralytics' documented input size"


def _torchvision_shape(model: nn.Module) -> Optional[tuple[tuple[int, ...], str]]:
    module = type(model).__module__
    if not module.startswith("torchvision.models"):
        return None
    source = "torchvision's documented input size"
    if _is_torchvision_detection(model):
        return (1, 3, 224, 224), source
    if module.startswith("torchvision.models.optical_flow"):
        return (1, 3, 128, 128), "torchvision's documented input: a pair of images"
    if module.startswith("torchvision.models.video"):
        size = 224 if type(model).__name__ in ("S3D", "MViT", "SwinTransformer3d") else 112
        return (2, 3, 16, size, size), source
    size = getattr(model, "image_size", None) or (299 if type(model).__name__ == "Inception3" else 224)
    return (2, 3, size, size), source


def _first_layer_input(model: nn.Module, draw: _Draw) -> Optional[tuple[torch.Tensor, str]]:
    """A random input for the first layer in definition order that says what it takes."""
    for name, module in model.named_modules():
        shape: Optional[tuple[int, ...]] = None
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            shape = (2, module.in_channels, 256)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            shape = (2, module.in_channels, 256, 256)
        elif isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            shape = (2, module.in_channels, 32, 32, 32)
        elif isinstance(module, nn.Linear):
            shape = (2, module.in_features)
        elif registry.record_of(module) is not None and registry.record_of(module).converts:
            rank = targets.source_rank(module)
            sizes = {2: (64, 64), 3: (16, 16, 16)}.get(rank, ())
            shape = (2, registry.channels_of(module), *sizes)
        elif isinstance(module, nn.Embedding):
            return draw.tokens(module.num_embeddings, (2, 16)), f"token ids for {name or 'the model'}"
        if shape is not None:
            where = f"layer {name}" if name else "the model"
            return draw.values(shape), f"guessed from the input of {where}"
    return None


# --- capture -----------------------------------------------------------------------------------------------------


def capture(model: nn.Module, model_input: Any, *, example: str = "", progress: Optional[bool] = None) -> Graph:
    """Run ``model`` once on ``model_input`` (see :func:`normswap.data.call_model`) in eval mode without gradients,
    and return the :class:`Graph` of what it did. The model is left exactly as it was. ``progress``: a bar counting
    the module calls (:mod:`normswap.progress`; by default on a terminal once the run has lasted two seconds).

    Raises:
        GraphError: the model has uninitialized lazy modules, or fails on the input.
    """
    recorder = _Recorder(model)
    if recorder.lazy:
        raise GraphError(f"layer '{recorder.lazy[0]}' is an uninitialized lazy module: run the model once before "
                         "folding")
    bar = progress_bar(len(recorder.names), "running the model", "module", progress=progress)
    recorder.on_call = None if bar.disable else bar.update
    with bar, restored(model, recorder.unique_modules, recorder.buffers), torch.no_grad():
        if recorder.training:
            model.eval()
        try:
            with recorder.recording(model_input):
                output = call_model(model, model_input)
        except NormswapError:
            raise
        except Exception as exc:
            message = str(exc).strip().splitlines()
            raise GraphError(f"the model fails on the example input {describe_input(model_input)}: "
                             f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")) from exc
        outputs = [recorder.value(tensor) for tensor in output_tensors(output)]
    return Graph(recorder.trace.ended(), outputs, recorder.registered_values, recorder.names, recorder.shared,
                 example or describe_input(model_input))


class _Recorder(TorchFunctionMode):
    """Records module calls (global forward hooks) and function calls (this mode) of one forward, on one thread."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # One walk over the modules gives every name of each, its tensors (each named_parameters or named_buffers
        # would walk them again), and what capture needs to check and put back.
        self.names: dict[int, list[str]] = {}
        self.unique_modules: list[nn.Module] = []
        self.lazy: list[str] = []  # uninitialized lazy modules
        self.training = False  # whether any module is in training mode
        # id(tensor) -> (tensor, first qualified name, the module holding it under that name): a parameter's name
        # before a buffer's, as named_parameters(), then named_buffers(), would list them
        parameters: dict[int, tuple[torch.Tensor, str, nn.Module]] = {}
        buffers: dict[int, tuple[torch.Tensor, str, nn.Module]] = {}
        self.shared: set[int] = set()
        for prefix, module in every_name(model):
            names = self.names.get(id(module))
            if names is not None:  # the same module under another name: its tensors are known
                names.append(prefix)
                continue
            self.names[id(module)] = [prefix]
            self.unique_modules.append(module)
            self.training = self.training or module.training
            if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
                self.lazy.append(prefix)
            own = module.__dict__
            for tensors, found in ((own["_parameters"], parameters), (own["_buffers"], buffers)):
                for name, tensor in tensors.items():  # (most modules have no buffers, many no parameters)
                    if tensor is None:
                        continue
                    first = found.get(id(tensor))
                    if first is None:
                        found[id(tensor)] = (tensor, f"{prefix}.{name}" if prefix else name, module)
                    elif first[2] is not module:
                        self.shared.add(id(tensor))
        self.buffers = [tensor for tensor, _, _ in buffers.values()]
        buffers.update(parameters)
        self.registered = buffers
        self.registered_values: dict[int, int] = {}  # id(tensor) -> its first value
        self.trace = _Trace()
        self.stack: list[int] = []  # the module calls running, innermost last
        # id(tensor) -> its current value; refs[value] tells whether a tensor with that id is the value's tensor: a
        # weak reference to it, or the tensor itself for a parameter or buffer (which self.registered holds, so no
        # other tensor can have its id). Not torch's WeakTensorKeyDictionary: that builds a Python reference object
        # on every lookup. A weak reference does not keep the activation alive; a value whose reference died (its id
        # may be reused by a new tensor) is simply not a match.
        self.known: dict[int, int] = {}
        self.refs: list[Any] = []
        self.thread = threading.get_ident()
        self.on_call: Optional[Callable[[], Any]] = None
        # the layer of :data:`_LEAF_CALLS` running now: (the layer, its function, tensors, their values, arguments)
        self.leaf: Optional[tuple[nn.Module, str, list[torch.Tensor], list[int], tuple]] = None

    @contextlib.contextmanager
    def recording(self, model_input: Any) -> Iterator[None]:
        for tensor in output_tensors(model_input):
            self.trace.from_input[self.value(tensor)] = True
        before = nn.modules.module.register_module_forward_pre_hook(self._enter)
        # (not with_kwargs=True: torch 2.x leaves such a global hook's flag behind when it is removed)
        after = nn.modules.module.register_module_forward_hook(self._leave, always_call=True)
        try:
            with self:
                try:
                    yield
                finally:
                    if self.leaf is not None:  # interrupted inside a layer of _LEAF_CALLS (Ctrl-C skips the hooks)
                        self.leaf = None
                        torch._C._push_on_torch_function_stack(self)  # for ``with self`` to take off
        finally:
            before.remove()
            after.remove()

    def value(self, tensor: torch.Tensor) -> int:
        """The current value of ``tensor``, registered on first sight."""
        trace = self.trace
        index = self.known.get(id(tensor))
        if index is not None and self.refs[index] is not tensor and self.refs[index]() is not tensor:
            index = None
        if index is None:
            registered = self.registered.get(id(tensor))
            name = registered[1] if registered is not None and registered[0] is tensor else None
            index = self._new_value(tensor, -1, name)
            if name is not None:
                self.registered_values[id(tensor)] = index
        elif trace.version[index] is not None and trace.version[index] != tensor._version:  # (see _record)
            index = self._new_value(tensor, -1, trace.name[index], True)
        return index

    def values(self, tensors: list[torch.Tensor]) -> list[int]:
        """:meth:`value` of each tensor; the common case (seen before, unchanged) without a call per tensor."""
        known, refs, versions = self.known, self.refs, self.trace.version
        found = []
        for tensor in tensors:
            index = known.get(id(tensor))
            if index is None or refs[index] is not tensor and refs[index]() is not tensor \
                    or versions[index] is not None and versions[index] != tensor._version:
                index = self.value(tensor)
            found.append(index)
        return found

    def _new_value(self, tensor: torch.Tensor, producer: int, name: Optional[str] = None,
                   from_input: bool = False) -> int:
        # (positional arguments, and the version read here without a function call: this runs for every tensor
        # recorded)
        try:
            version: Optional[int] = tensor._version
        except RuntimeError:  # inference tensors have no version counter
            version = None
        trace = self.trace
        index = len(trace.producer)
        trace.dims_start.append(len(trace.dims))
        trace.dims.extend(tensor.shape)
        trace.producer.append(producer)
        trace.name.append(name)
        trace.from_input.append(from_input)
        trace.version.append(version)
        trace.reader.append(-1)
        self.refs.append(weakref.ref(tensor) if name is None else tensor)
        self.known[id(tensor)] = index
        return index

    def _new_call(self, name: str, module: Optional[nn.Module], inputs: list[int], positional: int,
                  decides: bool) -> int:
        """A row for a call starting now, inside the innermost module call running."""
        trace = self.trace
        index = len(trace.call_name)
        stack = self.stack
        trace.call_name.append(name)
        trace.parent.append(stack[-1] if stack else -1)
        trace.module.append(module)
        trace.end.append(index if module is None else -1)  # (a module call's end is known when it returns)
        trace.positional.append(positional)
        trace.decides.append(decides)
        trace.inputs_start.append(len(trace.inputs))
        trace.inputs.extend(inputs)
        trace.outputs_start.append(len(trace.outputs))
        trace.outputs_stop.append(len(trace.outputs))
        return index

    def _enter(self, module: nn.Module, args: tuple) -> None:
        if threading.get_ident() != self.thread:
            return
        leaf = _LEAF_CALLS.get(type(module))
        # (the model may run a layer with torch functions off: then the mode would not see its call either)
        seen = leaf is not None and torch._C._is_torch_function_mode_enabled()
        # The hooks run outside this mode's handler, so each tensor attribute they read (``_version``) would come
        # back through ``__torch_function__``: switching torch functions off is cheaper than a flag checked there.
        recorded = None
        with torch._C.DisableTorchFunction():
            if seen and _runs_as_recorded(module, leaf, args) and self._on_top():
                tensors = _passed_tensors(module, leaf, args[0])  # (its argument first)
                recorded = (module, leaf.function, tensors, self.values(tensors), args)
                inputs = recorded[3][:1]
            else:
                inputs = self.values(_flat_tensors(args))
            names = self.names.get(id(module))
            index = self._new_call(names[0] if names else type(module).__name__, module, inputs, len(args), False)
            calls = self.trace.by_module.get(id(module))
            if calls is None:
                self.trace.by_module[id(module)] = [index]
            else:
                calls.append(index)
            self.stack.append(index)
            if self.on_call is not None:
                self.on_call()
        if recorded is not None:
            self.leaf = recorded
            torch._C._pop_torch_function_stack()  # the layer's own torch calls do not come here: _leave records them

    def _on_top(self) -> bool:
        """True if this mode is the innermost function mode (the model has not entered one of its own)."""
        depth = torch._C._len_torch_function_stack()
        return depth > 0 and torch._C._get_function_stack_at(depth - 1) is self

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        leaf = self.leaf
        ours = leaf is not None and leaf[0] is module
        if ours:
            self.leaf = None
            torch._C._push_on_torch_function_stack(self)
        stack = self.stack
        trace = self.trace
        with torch._C.DisableTorchFunction():
            if ours and output is not None:  # (``None``: the layer raised, and its function call never ended)
                self._record(leaf[1], leaf[2], leaf[3], output, leaf[4])  # type: ignore[index]
            if not stack or trace.module[stack[-1]] is not module:
                return
            index = stack.pop()
            trace.outputs_start[index] = len(trace.outputs)
            trace.outputs.extend(self.values([output] if isinstance(output, torch.Tensor) else output_tensors(output)))
            trace.outputs_stop[index] = len(trace.outputs)
            trace.end[index] = len(trace.call_name) - 1

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        # This runs for every torch call of the forward, so it is written for speed: local names, the common case
        # first. (A mode is per thread: calls of other threads never come here.)
        name = _FUNCTION_NAMES.get(func)
        if name is None:
            name = _FUNCTION_NAMES[func] = resolve_name(func) or getattr(func, "__name__", repr(func))
        if name in _METADATA:
            return func(*args, **kwargs) if kwargs else func(*args)
        # torch takes this mode off its stack while this handler runs: the recording's own tensor reads (shape,
        # version) and the calls inside ``func`` do not come back here, so no flag guards against that.
        tensors = _flat_tensors(args[:1]) if name in _SHAPE_OF_OTHER else _flat_tensors(args, kwargs)
        inputs = self.values(tensors)
        output = func(*args, **kwargs) if kwargs else func(*args)
        self._record(name, tensors, inputs, output, args)
        return output

    def _record(self, name: str, tensors: list[torch.Tensor], inputs: list[int], output: Any, args: tuple) -> None:
        """Record that function ``name`` read ``tensors`` (whose values before the call were ``inputs``) and
        returned ``output``: unless it returned an input unchanged, a call, its new outputs, and a new value of each
        input it changed in place."""
        trace = self.trace
        versions, from_input = trace.version, trace.from_input
        # (a value without a version is of an inference tensor, which has no counter and cannot change here)
        changed: Optional[list[torch.Tensor]] = None
        depends = False
        for tensor, value in zip(tensors, inputs):
            if from_input[value]:
                depends = True
            version = versions[value]
            if version is not None and tensor._version != version:
                changed = [tensor] if changed is None else [*changed, tensor]
        if isinstance(output, torch.Tensor):
            made = [output]
            if changed is None:
                for tensor in tensors:
                    if tensor is output:
                        return  # returns its input unchanged (``contiguous()`` on a contiguous tensor)
        else:
            made = output_tensors(output)
            if not made and not tensors:
                return  # reads no tensor and makes none (``torch._assert`` on a Python bool): nothing to record
            if changed is None and made:
                input_ids = {id(tensor) for tensor in tensors}  # one set lookup per output, not a scan of the inputs
                if all([id(out) in input_ids for out in made]):
                    return
        if depends and name in _VALUE_FREE:
            depends = False
        decides = depends and (name in _DECISIONS or (name == "torch.where" and len(args) == 1)
                               or (name == "torch.Tensor.__getitem__" and _bool_index(args)))
        index = self._new_call(name, None, inputs, 0, decides)
        reader = trace.reader
        for value in inputs:
            first = reader[value]
            if first < 0:
                reader[value] = index
            elif first != index:  # (a call reading a tensor twice reads it once)
                more = trace.more_readers.get(value)
                if more is None:
                    trace.more_readers[value] = [index]
                elif more[-1] != index:
                    more.append(index)
        new_value = self._new_value
        outputs = trace.outputs
        if changed is None:  # the common case: every output is a new value
            for out in made:
                outputs.append(new_value(out, index, None, depends))
        else:
            for tensor in changed:
                new_value(tensor, index, None, depends)
            changed_ids = {id(tensor) for tensor in changed}
            known = self.known
            outputs.extend([known[id(out)] if id(out) in changed_ids else new_value(out, index, None, depends)
                            for out in made])
        trace.outputs_stop[index] = len(outputs)


class _LeafCall(NamedTuple):
    """What a layer of one of torch's classes computes: ``function`` of its input and its ``tensors`` (attribute
    names, in the order its forward passes them; one that is ``None`` is not passed), when ``applies`` to it."""

    function: str
    tensors: tuple[str, ...] = ()
    applies: Callable[[nn.Module], bool] = lambda module: True


def _in_eval(module: nn.Module) -> bool:
    return not module.training


_CONV = ("weight", "bias")
_LEAF_CALLS: dict[type, _LeafCall] = {
    nn.Linear: _LeafCall("torch.nn.functional.linear", _CONV),
    **{cls: _LeafCall(f"torch.nn.functional.conv{rank}d", _CONV, lambda m: m.padding_mode == "zeros")
       for rank, cls in enumerate((nn.Conv1d, nn.Conv2d, nn.Conv3d), 1)},
    **{cls: _LeafCall("torch.nn.functional.batch_norm", ("running_mean", "running_var", "weight", "bias"),
                      lambda m: not m.training and m.track_running_stats and m._buffers.get("running_mean") is not None)
       for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    nn.ReLU: _LeafCall("torch.nn.functional.relu"),
    nn.ReLU6: _LeafCall("torch.nn.functional.hardtanh"),
    nn.Hardswish: _LeafCall("torch.nn.functional.hardswish"),
    nn.Hardsigmoid: _LeafCall("torch.nn.functional.hardsigmoid"),
    nn.SiLU: _LeafCall("torch.nn.functional.silu"),
    nn.GELU: _LeafCall("torch.nn.functional.gelu"),
    nn.LeakyReLU: _LeafCall("torch.nn.functional.leaky_relu"),
    nn.Sigmoid: _LeafCall("torch.sigmoid"),
    nn.Tanh: _LeafCall("torch.tanh"),
    nn.Dropout: _LeafCall("torch.nn.functional.dropout", (), _in_eval),
    nn.AdaptiveAvgPool2d: _LeafCall("torch.nn.functional.adaptive_avg_pool2d"),
}
"""Layers recorded from the module hooks alone: while one of these runs, this mode is off, and the layer's one
function call is recorded when it returns, exactly as the mode would record it (``tests/test_graph.py`` checks each
against the mode). Most calls of convolutional models are of these layers: their dispatch to the mode is saved."""

_TORCH_METHODS = {cls: (cls.forward, getattr(cls, "_conv_forward", None))
                  for cls in (*_LEAF_CALLS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)}
"""The forward methods of the torch layer classes normswap relies on, as this module found them."""


def runs_torch_forward(module: nn.Module) -> bool:
    """True if ``module`` is of one of torch's layer classes normswap relies on (convolutions, ``nn.Linear``,
    BatchNorm, the activations of :data:`_LEAF_CALLS`; not a subclass) and runs the forward torch wrote: none put on
    the instance, and its class's as this module found it (a library that replaced one is not trusted).

    >>> layer = nn.Conv2d(3, 4, 1)
    >>> runs_torch_forward(layer), runs_torch_forward(nn.Sequential(layer))
    (True, False)
    """
    kind = type(module)
    methods = _TORCH_METHODS.get(kind)
    return methods is not None and "forward" not in module.__dict__ and "_conv_forward" not in module.__dict__ \
        and (kind.forward, getattr(kind, "_conv_forward", None)) == methods


def _runs_as_recorded(module: nn.Module, leaf: _LeafCall, args: tuple) -> bool:
    """True if ``module`` (of a class in :data:`_LEAF_CALLS`) will make the call ``leaf`` describes on ``args``:
    torch's forward, no hooks of its own, one plain tensor argument, and the layer's settings the table assumes."""
    return len(args) == 1 and type(args[0]) is torch.Tensor and not (
        module._forward_pre_hooks or module._forward_hooks or module._backward_hooks or module._backward_pre_hooks
    ) and runs_torch_forward(module) and leaf.applies(module)


def _passed_tensors(module: nn.Module, leaf: _LeafCall, argument: torch.Tensor) -> list[torch.Tensor]:
    """The tensors the layer passes to its function: its argument, then its own tensors that are not ``None``."""
    parameters, buffers = module._parameters, module._buffers
    tensors = [argument]
    for name in leaf.tensors:
        tensor = parameters[name] if name in parameters else buffers.get(name)
        if tensor is not None:
            tensors.append(tensor)
    return tensors


_FUNCTION_NAMES: dict[Any, str] = {}
"""The name of every torch function and method a recorded forward called, kept for the next capture
(``torch.overrides.resolve_name`` takes 3-70 µs a function): one entry per function, a few hundred in practice."""


def _flat_tensors(args: tuple, kwargs: Optional[dict] = None) -> list[torch.Tensor]:
    """The tensors among a call's arguments, as :func:`normswap.data.output_tensors` finds them, without its walk
    where the arguments are tensors, scalars, or tuples and lists of those (an index, a shape, the tensors ``cat``
    joins): most torch calls."""
    tensors = []
    for arg in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(arg, torch.Tensor):
            tensors.append(arg)
        elif type(arg) in SCALAR_TYPES:
            continue
        elif type(arg) is tuple or type(arg) is list:
            for item in arg:
                if isinstance(item, torch.Tensor):
                    tensors.append(item)
                elif type(item) not in SCALAR_TYPES:
                    return output_tensors((args, kwargs) if kwargs else (args,))
        else:
            return output_tensors((args, kwargs) if kwargs else (args,))
    return tensors


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)
