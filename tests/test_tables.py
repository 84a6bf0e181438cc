"""Text tables (normswap.tables): one layout for every report, and names that are not printable text escaped."""

from __future__ import annotations

import torch
from torch import nn

import normswap
from normswap.inspection import format_reports, inspect_model
from normswap.errors import shown
from normswap.tables import text_table

HOSTILE = "bn\x1b[2J\r"  # a layer name as a crafted file could carry it: clears the screen, moves the cursor


def test_columns_are_as_wide_as_their_widest_cell_two_spaces_apart_without_trailing_spaces():
    assert text_table(("name", "C", "note"), [("a", "128", ""), ("layer1.0.bn1", "8", "x")]).splitlines() == [
        "name          C    note",
        "a             128",
        "layer1.0.bn1  8    x",
    ]
    assert text_table(("only", "header"), []) == "only  header"


def test_what_is_not_printable_is_escaped_and_the_rest_kept():
    assert shown(HOSTILE) == "bn\\x1b[2J\\r"
    assert shown("schön 1×1") == "schön 1×1"
    assert "\x1b" not in text_table(("layer",), [(HOSTILE,)])


def hostile_model() -> nn.Module:
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 8, 3))
    model.add_module(HOSTILE, nn.BatchNorm2d(8))
    return model.eval()


def test_every_report_lays_out_its_table_the_same_way_and_escapes_layer_names():
    model = hostile_model()
    texts = {
        "plan": str(normswap.plan(model, "gn", groups=4)),
        "fold": str(normswap.plan_fold(model, input_shape=(1, 3, 8, 8))),
        "inspect": format_reports(inspect_model(model)),
        "fit": str(normswap.fit_report(normswap.convert(hostile_model(), "gn", groups=4, affine="fit",
                                                        data=[torch.randn(2, 3, 8, 8)]))),
    }
    for name, text in texts.items():
        assert "\x1b" not in text and "\r" not in text, name
        assert "bn\\x1b[2J\\r" in text, name
