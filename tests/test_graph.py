"""Graph knowledge from running the model: producers, readers and call counts seen in one real forward, example
inputs made from the architecture, and a model left exactly as it was."""

import copy
import weakref

import pytest
import timm
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from normswap.graph import GraphError, capture, describe_input, example_input, find_example


class TwoUses(nn.Module):
    """conv -> bn, and the conv output read again by an in-place add after the BatchNorm ran."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        y.add_(1.0)
        return z + y


def only_call(graph, module):
    (call,) = graph.module_calls(module)
    return call


def test_the_graph_names_the_producer_and_every_other_reader_of_a_layers_input():
    model = TwoUses()
    graph = capture(model, torch.randn(2, 3, 4, 4))
    bn = only_call(graph, model.bn)
    value = bn.inputs[0]
    assert value.producer.name == "torch.nn.functional.conv2d" and value.producer.parent.module is model.conv
    assert [reader.name for reader in graph.readers(value, outside=bn)] == ["torch.Tensor.add_"]
    assert [reader.name for reader in graph.readers(value)] == ["torch.nn.functional.batch_norm", "torch.Tensor.add_"]
    later = graph.calls[-1]
    assert later.name == "torch.Tensor.add" and later.inputs[1].producer.name == "torch.Tensor.add_", \
        "an in-place change makes a new value of the same tensor"


def test_a_graph_hands_out_one_object_per_call_and_value_so_they_compare_by_identity():
    model = TwoUses()
    graph = capture(model, torch.randn(2, 3, 4, 4))
    bn, conv = only_call(graph, model.bn), only_call(graph, model.conv)
    conv_output = conv.outputs[0]
    assert bn is graph.calls[bn.index] and bn.inputs[0] is conv_output is graph.values[conv_output.index]
    assert conv_output.producer is graph.calls[conv_output.producer.index] and conv_output.producer.parent is conv
    assert [reader.index for reader in conv_output.readers] == [reader.index for reader in graph.readers(conv_output)]
    assert all(reader is graph.calls[reader.index] for reader in graph.readers(conv_output))
    weight = graph.parameter(model.conv.weight)
    assert weight is graph.parameter(model.conv.weight) and weight in conv_output.producer.inputs
    assert graph.common_caller(bn, conv_output.producer) is graph.calls[0], "the model's own call wires them"


def test_parameters_and_buffers_are_values_with_their_names_and_readers():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    graph = capture(model, torch.randn(1, 3, 2, 2))
    weight = graph.parameter(model[0].weight)
    assert weight.name == "0.weight" and [r.name for r in weight.readers] == ["torch.nn.functional.conv2d"]
    assert graph.parameter(model[1].running_var).name == "1.running_var"
    assert graph.parameter(torch.zeros(1)) is None


def test_tied_parameters_are_known_as_shared_and_a_module_under_two_names_is_not():
    embed, bn = nn.Linear(3, 3), nn.BatchNorm1d(3)
    head = nn.Linear(3, 3)
    head.weight = embed.weight
    graph = capture(nn.Sequential(embed, bn, head, bn), torch.randn(2, 3))
    assert graph.is_shared(embed.weight) and not graph.is_shared(embed.bias) and not graph.is_shared(head.bias)
    assert not graph.is_shared(bn.weight), "one module, registered twice"


def test_shape_queries_are_not_reads_and_calls_that_return_their_input_are_not_computations():
    class Queries(nn.Module):
        def forward(self, x):
            assert x.shape[1] == 3 and x.dim() == 4 and x.dtype == torch.float32
            return x.contiguous().float()

    graph = capture(Queries(), torch.randn(1, 3, 2, 2))
    assert [call.name for call in graph.calls] == [""], "only the model's own call"
    assert graph.is_output(graph.calls[0].inputs[0])


def test_tensors_in_lists_tuples_and_keywords_are_read_in_order_and_calls_on_no_tensor_are_not_recorded():
    class Joins(nn.Module):
        def forward(self, x):
            torch._assert(x.dim() == 4, "4-D input")
            joined = torch.cat([x, x * 2], dim=1)
            index = torch.tensor([0, 2])
            return torch.add(joined[:, index], other=x[(slice(None), [0, 1])], alpha=3)

    graph = capture(Joins(), torch.randn(1, 3, 2, 2))
    names = [call.name for call in graph.calls if call.module is None]
    assert names == ["torch.Tensor.mul", "torch.cat", "torch.tensor", "torch.Tensor.__getitem__",
                     "torch.Tensor.__getitem__", "torch.add"]
    mul, cat, tensor, pick, first_two, add = [call for call in graph.calls if call.module is None]
    x = graph.calls[0].inputs[0]
    assert cat.inputs == [x, mul.outputs[0]] and pick.inputs == [cat.outputs[0], tensor.outputs[0]]
    assert first_two.inputs == [x] and add.inputs == [pick.outputs[0], first_two.outputs[0]]


def test_the_recording_keeps_no_activation_alive_and_a_new_tensor_in_a_freed_ones_place_is_a_new_value():
    freed = []  # (outside the model: capture puts back what the forward changes on it)

    class Temporaries(nn.Module):
        """Each step's temporary dies before the next is made, so CPython may give the next one its address."""

        def forward(self, x):
            total = x
            for step in range(4):
                temporary = x * float(step + 2)
                died = weakref.ref(temporary)
                total = total + temporary
                del temporary
                freed.append(died() is None)
            return total

    model = Temporaries()
    x = torch.randn(3, 5)
    graph = capture(model, x)
    assert freed == [True] * 4, "the graph holds values, never the tensors of the forward"
    products = [call for call in graph.calls if call.name == "torch.Tensor.mul"]
    sums = [call for call in graph.calls if call.name == "torch.Tensor.add"]
    assert len(products) == len(sums) == 4
    for product, total in zip(products, sums):
        assert total.inputs[1] is product.outputs[0], "each sum reads its own step's product, not an earlier one's"
    assert graph.outputs == sums[-1].outputs
    torch.testing.assert_close(model(x), x * (1 + 2 + 3 + 4 + 5))


def test_call_counts_count_calls_not_names():
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    aliased = nn.Module()
    aliased.block = nn.Sequential(nn.Conv2d(3, 3, 1))
    aliased.other_name = aliased.block
    aliased.forward = lambda x: aliased.block(x)
    assert capture(model, torch.randn(1, 3, 2, 2)).call_count(shared) == 2
    graph = capture(aliased, torch.randn(1, 3, 2, 2))
    assert graph.call_count(aliased.block) == 1 and graph.names[id(aliased.block)] == ["block", "other_name"]
    assert graph.call_count(nn.ReLU()) == 0


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.a(x)
        threshold = torch.tensor(0.5)  # made from a Python value: not input-dependent
        if threshold > 0 and y.mean() > -1e9:
            y = self.b(y)
        return y


def test_branches_on_input_dependent_values_are_recorded_and_located():
    model = Branchy()
    graph = capture(model, torch.randn(1, 3, 2, 2))
    (decision,) = graph.decisions
    assert decision.name == "torch.Tensor.__bool__" and decision.parent.name == ""
    a, b = only_call(graph, model.a), only_call(graph, model.b)
    assert graph.decision_affecting(b) is decision, "the branch ran before b, in the code around it"
    assert graph.decision_affecting(a) is None, "a ran before the branch"
    assert graph.common_caller(a, b) is graph.calls[0]


def test_capture_leaves_the_model_and_torch_as_they_were():
    class Leaves(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.cache = x.shape
            self.seen += 1
            self.conv.extra = nn.Identity()
            return self.conv(x) + torch.rand(1)

    model = Leaves().train()
    attributes = {module: dict(module.__dict__) for module in model.modules()}
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 2, 2)
    rng = torch.get_rng_state()
    capture(model, x)
    for module, before in attributes.items():
        assert module.__dict__.keys() == before.keys() and all(module.__dict__[k] is v for k, v in before.items())
    assert model.training and "extra" not in model.conv._modules
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    hooks = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
             torch_module._global_forward_hooks_always_called, torch_module._global_forward_hooks_with_kwargs)
    assert not any(hooks)


def recorded(graph):
    """Everything a graph records, as plain data."""
    index = lambda call: None if call is None else call.index  # noqa: E731
    calls = [(c.name, index(c.parent), c.module, [v.index for v in c.inputs], [v.index for v in c.outputs], c.end,
              c.positional, c.decides) for c in graph.calls]
    values = [(tuple(v.shape), index(v.producer), [r.index for r in v.readers], v.name, v.from_input, v.version)
              for v in graph.values]
    return calls, values


class SeenTwice(nn.Module):
    """A layer's output read by the next layer and by an in-place add; a layer with a hook of its own."""

    def __init__(self, layer, hooked):
        super().__init__()
        self.layer, self.hooked = layer, hooked
        self.hooked.register_forward_hook(lambda module, args, output: output * 2)

    def forward(self, x):
        y = self.layer(x)
        return self.hooked(y).add_(y)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_torch_layers_recorded_from_their_hooks_are_recorded_as_the_function_mode_records_them(rank, monkeypatch):
    from normswap import graph as graph_module

    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
    bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[rank - 1]
    layers = [conv(3, 4, 3, padding=1), bn(4), nn.ReLU(inplace=True), conv(4, 4, 1, bias=False),
              bn(4, affine=False), nn.Hardswish(), conv(4, 4, 3, padding=1, padding_mode="reflect"),
              bn(4, track_running_stats=False), nn.ReLU6(inplace=True), nn.SiLU(), nn.GELU(approximate="tanh"),
              nn.LeakyReLU(0.2, inplace=True), nn.Hardsigmoid(), nn.Dropout(0.5), nn.Tanh(),
              SeenTwice(nn.Sigmoid(), nn.ReLU()), nn.Flatten(), nn.Linear(4 * 4 ** rank, 6),
              nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5)]
    if rank == 2:
        layers[15:15] = [nn.AdaptiveAvgPool2d(4)]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(2, 3, *[4] * rank)
    dispatched = []
    handler = graph_module._Recorder.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        dispatched.append(func)
        return handler(self, func, types, args, kwargs)

    monkeypatch.setattr(graph_module._Recorder, "__torch_function__", counting)
    from_hooks = capture(model, x)
    by_hooks = len(dispatched)
    monkeypatch.setattr(graph_module, "_LEAF_CALLS", {})
    assert recorded(from_hooks) == recorded(capture(model, x))
    assert by_hooks < len(dispatched) - by_hooks, "most layers' calls never reached the function mode"


def test_a_model_that_fails_or_has_uninitialized_lazy_layers_is_a_graph_error():
    with pytest.raises(GraphError, match=r"fails on the example input 1x5x2x2: RuntimeError: Given groups=1"):
        capture(nn.Conv2d(3, 3, 1), torch.randn(1, 5, 2, 2))
    with pytest.raises(GraphError, match="layer '1' is an uninitialized lazy module"):
        capture(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)), torch.randn(1, 3))
    with pytest.raises(GraphError, match="mat1 and mat2 shapes cannot be multiplied"):  # inside a leaf layer
        capture(nn.Sequential(nn.Flatten(), nn.Linear(5, 2)), torch.randn(1, 3))
    assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
    assert torch._C._len_torch_function_stack() == 0


def test_example_inputs_come_from_data_a_shape_or_the_architecture():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert example_input(model, data=[(torch.ones(5, 3, 8, 8), torch.zeros(5))]).shape == (5, 3, 8, 8)
    assert example_input(model, input_shape=(1, 3, 16, 16)).shape == (1, 3, 16, 16)
    assert str(find_example(model)) == "2x3x256x256 (guessed from the input of layer 0)"
    assert str(find_example(nn.Sequential(nn.Conv3d(1, 2, 3)))) == "2x1x32x32x32 (guessed from the input of layer 0)"
    assert str(find_example(timm.create_model("resnet18"))) == "2x3x224x224 (timm's data config)"
    half = nn.Linear(4, 2).to(torch.float64)
    assert example_input(half).dtype == torch.float64
    with pytest.raises(GraphError, match="input_shape must be"):
        example_input(model, input_shape=(1, 0, 4))
    with pytest.raises(GraphError, match="input_shape must be"):
        example_input(model, input_shape="1,3,8,8")
    with pytest.raises(GraphError, match="data is empty"):
        example_input(model, data=[])
    with pytest.raises(GraphError, match="cannot tell what input a ReLU takes"):
        example_input(nn.ReLU())


def test_example_inputs_are_packaged_as_the_libraries_models_take_them():
    import torchvision
    import transformers
    from ultralytics import YOLO

    detection = torchvision.models.detection
    detector = detection.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None)
    assert str(find_example(detector)) == "[3x224x224] (torchvision's documented input size)"
    assert str(find_example(detector, input_shape=(2, 3, 64, 64))) == "[3x64x64, 3x64x64] (input_shape)"
    video = torchvision.models.video.r3d_18()
    assert describe_input(example_input(video)) == "2x3x16x112x112"
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    assert str(find_example(transformers.ResNetModel(config))) == \
        "{pixel_values: 2x3x224x224} (the transformers config)"
    assert str(find_example(YOLO("yolov8n.yaml").model)) == "1x3x640x640 (ultralytics' documented input size)"


def test_a_made_example_is_the_same_every_time_and_draws_nothing_from_the_callers_generator():
    model, embedding = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), nn.Sequential(nn.Embedding(7, 3))
    state = torch.get_rng_state()
    first, second = example_input(model), example_input(model)
    assert torch.equal(first, second) and first.std() > 0.5
    tokens = example_input(embedding)
    assert tokens.dtype == torch.int64 and 0 <= int(tokens.min()) and int(tokens.max()) < 7
    assert torch.equal(torch.get_rng_state(), state)


def test_a_made_example_has_mean_0_and_variance_1_and_no_pattern():
    values = example_input(nn.Sequential(nn.Conv2d(3, 4, 3))).flatten().double()  # 2x3x256x256
    assert abs(float(values.mean())) < 0.01 and abs(float(values.var()) - 1) < 0.01
    assert -3 ** 0.5 <= float(values.min()) and float(values.max()) < 3 ** 0.5
    assert len(values.unique()) > 60_000  # of 65,536 levels
    # the four values made from one draw of the generator are independent of each other
    words = values.reshape(-1, 4)
    assert all(abs(float(torch.corrcoef(words[:, [0, lag]].T)[0, 1])) < 0.01 for lag in (1, 2, 3))
    assert example_input(nn.Sequential(nn.Linear(6, 2)).half()).dtype == torch.float16


def test_an_interrupt_inside_a_torch_layer_leaves_the_callers_function_modes_as_they_were(monkeypatch):
    from torch.overrides import BaseTorchFunctionMode

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.nn.functional, "relu", interrupted)  # what nn.ReLU's forward calls
    with BaseTorchFunctionMode() as own:
        with pytest.raises(KeyboardInterrupt):
            capture(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()), torch.randn(1, 3, 2, 2))
        assert torch._C._len_torch_function_stack() == 1 and torch._C._get_function_stack_at(0) is own
    assert torch._C._len_torch_function_stack() == 0
    assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
