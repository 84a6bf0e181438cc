"""Calibration data sources: tensor files, image folders and callables become batches; inputs are moved and called."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from normswap.data import TensorBatches, call_model, iter_inputs, move_input, open_data
from normswap.errors import CalibrationError

# --- tensor files ------------------------------------------------------------------------------------------------


def test_a_tensor_file_is_cut_into_batches_along_its_first_dimension(tmp_path):
    x = torch.randn(10, 3, 4, 4)
    torch.save(x, tmp_path / "x.pt")
    batches = list(open_data(tmp_path / "x.pt", batch_size=4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat(batches), x)


def test_a_tensor_file_can_be_read_again_for_every_pass(tmp_path):
    torch.save(torch.randn(5, 2), tmp_path / "x.pt")
    data = open_data(tmp_path / "x.pt", batch_size=2)
    assert len(data) == 3 and len(list(data)) == len(list(data)) == 3


def test_images_with_labels_become_tuple_batches_whose_first_element_is_the_input(tmp_path):
    images, labels = torch.randn(5, 3, 2, 2), torch.arange(5)
    torch.save((images, labels), tmp_path / "labelled.pt")
    batches = list(open_data(tmp_path / "labelled.pt", batch_size=3))
    assert torch.equal(batches[1][1], labels[3:])
    assert torch.equal(torch.cat([x for _, x in iter_inputs(batches)]), images)


def test_npy_and_safetensors_files_are_read(tmp_path):
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert torch.equal(torch.cat(list(open_data(tmp_path / "x.npy", batch_size=4))), torch.from_numpy(x))
    save_file({"pixel_values": torch.from_numpy(x), "label": torch.arange(6)}, str(tmp_path / "x.safetensors"))
    batches = list(open_data(tmp_path / "x.safetensors", batch_size=4))
    assert sorted(batches[0]) == ["label", "pixel_values"]
    inputs = [x for _, x in iter_inputs(batches)]  # found under one of the default input keys
    assert torch.equal(torch.cat(inputs), torch.from_numpy(x))


def test_tensors_of_different_lengths_are_refused():
    with pytest.raises(CalibrationError, match=r"one length.*\(tensor\[4, 2\], tensor\[3\]\)"):
        TensorBatches((torch.zeros(4, 2), torch.zeros(3)), batch_size=2)


def test_a_damaged_or_foreign_tensor_file_is_a_clear_error(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a tensor")
    with pytest.raises(CalibrationError, match="cannot read tensor file .*broken.pt.: it is neither a safetensors"):
        open_data(tmp_path / "broken.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CalibrationError, match="cannot read tensor file .*notes.txt.: it is neither"):
        open_data(tmp_path / "notes.txt")
    with pytest.raises(CalibrationError, match="does not exist"):
        open_data(tmp_path / "missing.pt")


# --- image folders -----------------------------------------------------------------------------------------------


def gray(value: int, size=(12, 10)) -> Image.Image:
    return Image.new("RGB", size, color=(value, value, value))


@pytest.mark.parametrize("layout", ["flat", "class subfolders"])
def test_a_folder_of_images_is_read_in_sorted_order_with_the_data_config(tmp_path, layout):
    for i, value in enumerate((0, 51, 102)):
        folder = tmp_path / (f"class{i}" if layout == "class subfolders" else "")
        folder.mkdir(exist_ok=True)
        gray(value).save(folder / f"{i}.png")
    config = {"input_size": (3, 8, 8), "mean": (0.2, 0.2, 0.2), "std": (0.5, 0.5, 0.5)}
    batches = list(open_data(tmp_path, batch_size=2, data_config=config))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 8, 8), (1, 3, 8, 8)]
    pixels = torch.cat(batches)[:, :, 4, 4]
    expected = (torch.tensor([0, 51, 102]) / 255 - 0.2) / 0.5
    assert torch.allclose(pixels, expected[:, None].expand(3, 3), atol=1e-5)


def test_the_model_data_config_decides_size_and_normalization(tmp_path):
    gray(255, size=(40, 40)).save(tmp_path / "white.jpg")
    model = timm.create_model("resnet18", pretrained=False)
    (batch,) = list(open_data(tmp_path, model=model))
    assert batch.shape == (1, 3, 224, 224)
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    assert torch.allclose(batch[0, :, 100, 100], (1 - torch.tensor(mean)) / torch.tensor(std), atol=1e-3)


def test_one_channel_models_get_grayscale_images(tmp_path):
    gray(255).save(tmp_path / "a.png")
    config = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,)}
    (batch,) = list(open_data(tmp_path, data_config=config))
    assert batch.shape == (1, 1, 8, 8) and torch.allclose(batch, torch.ones(1, 1, 8, 8))
    with pytest.raises(CalibrationError, match="mean and std per channel"):
        open_data(tmp_path, data_config={"input_size": (1, 8, 8)})


def test_an_empty_folder_and_an_unreadable_image_are_clear_errors(tmp_path):
    with pytest.raises(CalibrationError, match="has no image files"):
        open_data(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CalibrationError, match="cannot read image .*broken.png"):
        list(open_data(tmp_path, data_config={"input_size": (3, 8, 8)}))


# --- callables ---------------------------------------------------------------------------------------------------


@pytest.fixture
def data_module(tmp_path, monkeypatch):
    (tmp_path / "calib_source.py").write_text(
        "import torch\n"
        "def loader(batch_size):\n"
        "    return [torch.full((batch_size, 2), float(i)) for i in range(3)]\n"
        "def fixed():\n"
        "    return [torch.zeros(1, 2)]\n"
        "def number():\n"
        "    return 7\n"
    )
    monkeypatch.chdir(tmp_path)
    yield "calib_source"
    sys.modules.pop("calib_source", None)


def test_a_callable_named_by_import_path_returns_the_batches_and_gets_the_batch_size(data_module):
    batches = list(open_data(f"{data_module}:loader", batch_size=5))
    assert [b.shape for b in batches] == [torch.Size([5, 2])] * 3
    assert len(list(open_data(f"{data_module}:fixed", batch_size=5))) == 1


def test_a_callable_that_cannot_be_imported_or_returns_no_iterable_is_a_clear_error(data_module):
    with pytest.raises(CalibrationError, match="returned a int: expected an iterable"):
        open_data(f"{data_module}:number")
    with pytest.raises(CalibrationError, match="cannot use calibration data 'calib_source:nothing'"):
        open_data(f"{data_module}:nothing")
    with pytest.raises(CalibrationError, match="cannot use calibration data 'no_such_module:f'"):
        open_data("no_such_module:f")


# --- inputs ------------------------------------------------------------------------------------------------------


def test_move_input_moves_nested_tensors_and_makes_4d_ones_channels_last():
    value = {"x": torch.randn(2, 3, 4, 4), "extra": (torch.randn(2, 3), "keep")}
    moved = move_input(value, "cpu", channels_last=True)
    assert moved["x"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(moved["x"], value["x"]) and moved["extra"][1] == "keep"


def test_call_model_unpacks_tuples_and_dicts():
    def model(a, b=0):
        return a + b

    assert call_model(model, (1, 2)) == 3 and call_model(model, {"a": 1, "b": 5}) == 6 and call_model(model, 4) == 4


def test_iter_inputs_refuses_a_bare_tensor_and_a_non_iterable():
    with pytest.raises(CalibrationError, match="single tensor"):
        list(iter_inputs(torch.zeros(3, 2)))
    with pytest.raises(CalibrationError, match="the calibration data is a int"):
        list(iter_inputs(3))


@pytest.mark.cuda
def test_move_input_to_cuda_goes_through_pinned_memory_without_changing_values():
    x = torch.randn(2, 3, 4, 4)
    moved = move_input([x], "cuda", non_blocking=True)[0]
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), x)
