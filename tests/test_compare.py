"""Comparing two models: output agreement figures match a direct computation, and the per-layer table finds the
layer where two models part ways."""

import copy
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.compare import compare
from normswap.errors import CalibrationError, NormswapError
from normswap.fold import fold
from tests.helpers import randomize_norm_layers, small_cnn


def batches(count=3, size=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=gen), torch.randint(0, 5, (size,), generator=gen))
            for _ in range(count)]


def test_a_model_compared_with_itself_agrees_exactly_even_with_inplace_activations():
    model = small_cnn()
    report = compare(model, model, batches())
    assert (report.samples, report.batches) == (12, 3)
    assert report.max_abs == 0 and report.relative == 0
    assert report.cosine_min == pytest.approx(1.0) and report.top1_agreement == 1.0
    assert [layer.name for layer in report.layers] == [str(i) for i in range(9)]
    assert all(layer.relative == 0 for layer in report.layers), "captured outputs must not be overwritten in place"
    assert report.first_divergence is None


def test_output_figures_match_a_direct_computation():
    model_a = small_cnn()
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        model_b[8].weight.add_(0.3 * torch.randn_like(model_b[8].weight))
    data = batches()
    with torch.no_grad():
        out_a = torch.cat([model_a(x) for x, _ in data]).double()
        out_b = torch.cat([model_b(x) for x, _ in data]).double()
    labels = torch.cat([y for _, y in data])
    report = compare(model_a, model_b, data)
    assert report.max_abs == pytest.approx(float((out_b - out_a).abs().max()), rel=1e-6)
    assert report.relative == pytest.approx(float((out_b - out_a).norm() / out_a.norm()), rel=1e-6)
    cosine = F.cosine_similarity(out_a, out_b, dim=1)
    assert report.cosine_mean == pytest.approx(float(cosine.mean()), rel=1e-9)
    assert report.cosine_min == pytest.approx(float(cosine.min()), rel=1e-9)
    assert report.top1_agreement == pytest.approx(float((out_a.argmax(1) == out_b.argmax(1)).double().mean()))
    assert report.accuracy_a == pytest.approx(float((out_a.argmax(1) == labels).double().mean()))
    assert report.accuracy_b == pytest.approx(float((out_b.argmax(1) == labels).double().mean()))


def test_the_first_diverging_layer_is_where_the_models_part_ways():
    model_a = small_cnn()
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        model_b[4].running_mean.add_(1.0)
    report = compare(model_a, model_b, batches())
    by_name = {layer.name: layer for layer in report.layers}
    assert all(by_name[name].relative == 0 for name in "0123")
    assert by_name["4"].relative > 0.1
    assert report.first_divergence == "4"
    assert "the models part ways at 4" in str(report)


def test_a_folded_model_matches_and_its_folded_convs_are_left_out():
    model = small_cnn()
    folded = fold(copy.deepcopy(model))
    report = compare(model, folded, batches())
    assert report.relative < 1e-6 and report.top1_agreement == 1.0
    names = [layer.name for layer in report.layers]
    assert "0" not in names and "3" not in names
    assert report.layers[0].name == "1" and report.layers[0].class_b == "Identity"
    assert report.first_divergence is None


def test_groupnorm_conversion_of_a_timm_model_parts_ways_at_the_first_norm_layer():
    model = randomize_norm_layers(timm.create_model("resnet18", pretrained=False, num_classes=5), seed=0).eval()
    converted = normswap.convert(copy.deepcopy(model), "gn", groups=8)
    data = [torch.randn(2, 3, 32, 32)]
    report = compare(model, converted, data)
    assert report.first_divergence == "bn1"
    text = str(report)
    assert "bn1" in text and "GroupNorm" in text and "<- first divergence" in text
    assert len(text.splitlines()) < 45, "the table stays readable on a deep model"
    assert len(report.layers) > 60


def test_labels_can_be_given_or_come_from_dict_batches():
    model = small_cnn()
    data = batches(count=2)
    labels = torch.cat([y for _, y in data])
    with torch.no_grad():
        predicted = torch.cat([model(x) for x, _ in data]).argmax(1)
    expected = float((predicted == labels).double().mean())
    report = compare(model, model, [x for x, _ in data], labels=labels.tolist())
    assert report.accuracy_a == pytest.approx(expected)
    dict_batches = [{"pixels": x, "label": y} for x, y in data]
    report = compare(model, model, dict_batches, input_key="pixels")
    assert report.accuracy_b == pytest.approx(expected)
    assert compare(model, model, [x for x, _ in data]).accuracy_a is None


def test_batches_limits_the_data_and_labels_must_cover_it():
    model = small_cnn()
    assert compare(model, model, batches(count=5), batches=2).samples == 8
    with pytest.raises(CalibrationError, match="labels has 3 entries but the data has 4 samples"):
        compare(model, model, [torch.randn(4, 3, 8, 8)], labels=[0, 1, 2])
    with pytest.raises(CalibrationError, match="no batches"):
        compare(model, model, [])


def test_models_run_in_eval_mode_and_keep_their_training_flags_and_statistics():
    model_a = small_cnn().train()
    model_b = copy.deepcopy(model_a)
    model_b[1].eval()
    mean = model_a[1].running_mean.clone()
    report = compare(model_a, model_b, batches())
    assert report.max_abs < 1e-6, "both run in eval mode (train-mode BatchNorm would differ by far more)"
    assert model_a.training and model_a[1].training and not model_b[1].training and model_b[4].training
    assert torch.equal(model_a[1].running_mean, mean)


class DictOutput(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.scale = scale

    def forward(self, x):
        return {"features": x, "logits": self.linear(x) * self.scale}


def test_dict_and_tuple_outputs_are_compared_by_their_main_tensor():
    torch.manual_seed(0)
    model_a, model_b = DictOutput(1.0), DictOutput(2.0)
    model_b.load_state_dict(model_a.state_dict())
    report = compare(model_a, model_b, [torch.randn(6, 4)])
    assert report.relative == pytest.approx(1.0) and report.cosine_min == pytest.approx(1.0)
    assert report.top1_agreement == 1.0

    tuple_model = nn.Sequential(nn.Linear(4, 3))
    tuple_model.register_forward_hook(lambda module, args, out: (out, out.sum()))
    assert compare(tuple_model, tuple_model, [torch.randn(6, 4)]).max_abs == 0


def test_outputs_of_different_shapes_are_an_error():
    with pytest.raises(NormswapError, match="different shapes"):
        compare(nn.Linear(4, 3), nn.Linear(4, 2), [torch.randn(2, 4)])


def test_the_report_serialises_to_json_and_layers_can_be_skipped():
    model = small_cnn()
    data = json.loads(json.dumps(compare(model, model, batches()).to_dict()))
    assert data["first_divergence"] is None and len(data["layers"]) == 9 and data["samples"] == 12
    assert compare(model, model, batches(), layers=False).layers == []


@pytest.mark.cuda
def test_comparing_a_cuda_model_with_a_cpu_model():
    model = small_cnn()
    on_gpu = copy.deepcopy(model).cuda()
    report = compare(model, on_gpu, batches())
    assert report.relative < 1e-4 and report.top1_agreement == 1.0
