"""Walking the module tree: every module comes with all of its names, and replacing it puts one new object at each."""

import pytest
from torch import nn

from normswap.walk import find_modules, get_module, replace_module


def is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d)


def shared_model():
    """One BatchNorm object under two parents and twice under one parent, plus an unshared one."""
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential()
    model.stem = nn.Sequential(nn.Conv2d(4, 4, 1), shared)
    model.block = nn.Sequential(nn.Conv2d(4, 4, 1), shared, nn.Conv2d(4, 4, 1), shared)
    model.head = nn.BatchNorm2d(4)
    return model, shared


def test_a_shared_module_is_found_once_with_every_name_in_definition_order():
    model, shared = shared_model()
    found = find_modules(model, is_bn)
    assert [f.names for f in found] == [["stem.1", "block.1", "block.3"], ["head"]]
    assert found[0].module is shared


def test_named_modules_alone_would_miss_the_other_names():
    model, _ = shared_model()
    assert [name for name, m in model.named_modules() if is_bn(m)] == ["stem.1", "head"]


def test_children_of_a_matching_module_are_not_searched():
    outer = nn.Sequential(nn.BatchNorm2d(2))
    model = nn.Sequential(outer)
    found = find_modules(model, lambda m: isinstance(m, nn.Sequential) and m is not model)
    assert [f.names for f in found] == [["0"]]


def test_the_root_module_is_found_under_the_empty_name():
    bn = nn.BatchNorm2d(3)
    assert [(f.module, f.names) for f in find_modules(bn, is_bn)] == [(bn, [""])]


def test_get_module_resolves_qualified_names_and_raises_key_error_for_missing_ones():
    model, shared = shared_model()
    assert get_module(model, "block.3") is shared
    assert get_module(model, "") is model
    for missing in ("block.9", "nothing", "head.weight"):
        with pytest.raises(KeyError):
            get_module(model, missing)


def test_replace_puts_one_new_object_at_every_name():
    model, shared = shared_model()
    new = nn.GroupNorm(2, 4)
    names = find_modules(model, is_bn)[0].names
    assert replace_module(model, names, new) is model
    assert model.stem[1] is new and model.block[1] is new and model.block[3] is new
    assert isinstance(model.head, nn.BatchNorm2d)
    assert all(m is not shared for m in model.modules())


def test_replacing_the_root_returns_the_new_module():
    new = nn.GroupNorm(1, 3)
    assert replace_module(nn.BatchNorm2d(3), [""], new) is new
