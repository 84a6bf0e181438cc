"""Checkpoint files: safe reading, strict loading, safetensors that rebuild their model, atomic writes."""

import copy
import hashlib
import json
import os
import pathlib
import signal

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

import normswap
from normswap.checkpoint import (
    atomic_write,
    load,
    load_checkpoint,
    read_checkpoint,
    read_metadata,
    save,
)
from normswap.errors import CheckpointError, OutputError
from normswap.history import get_arch, get_history, get_source

from .helpers import randomize_norm_layers

ARCH = "test_efficientnet"
KWARGS = {"num_classes": 10}


@pytest.fixture(scope="module")
def reference():
    """A small timm model with fused BatchNorm+activation layers and non-trivial statistics, in eval mode."""
    torch.manual_seed(0)
    return randomize_norm_layers(timm.create_model(ARCH, **KWARGS)).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def state_file(tmp_path, reference):
    path = tmp_path / "model.pt"
    torch.save(reference.state_dict(), path)
    return path


def tensors_of(model):
    return list(model.parameters()) + list(model.buffers())


def assert_same_outputs(model, reference, images):
    """Bit-identical weights and buffers, and the same outputs up to float rounding.

    Outputs are not compared bit for bit: oneDNN may pick a different kernel for differently aligned memory (an
    mmapped file against a freshly allocated model), which changes the last bits (more after InstanceNorm).
    """
    expected_state = reference.state_dict()
    state = model.state_dict()
    assert state.keys() == expected_state.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, expected_state[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(model.eval()(images), reference(images), rtol=1e-5, atol=1e-5)


def test_a_state_dict_loads_into_the_named_architecture(state_file, reference, images):
    model = load_checkpoint(state_file, ARCH, arch_kwargs=KWARGS)
    assert_same_outputs(model, reference, images)
    assert all(t.device.type == "cpu" for t in tensors_of(model))
    assert get_arch(model) == {"name": ARCH, "kwargs": KWARGS}
    assert get_source(model) == {"file": "model.pt", "sha256": hashlib.sha256(state_file.read_bytes()).hexdigest()}


@pytest.mark.parametrize("to", ["gn", "ln", "in", "frozen", "sync", "bn"])
def test_a_loaded_model_converts_like_the_in_memory_one(state_file, reference, images, to):
    expected = normswap.convert(copy.deepcopy(reference), to).eval()
    model = normswap.convert(load_checkpoint(state_file, ARCH, arch_kwargs=KWARGS), to)
    assert all(t.device.type == "cpu" for t in tensors_of(model))
    assert [type(m) for m in model.modules()] == [type(m) for m in expected.modules()]
    assert_same_outputs(model, expected, images)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {"ema": sd},
        lambda sd: {"module." + k: v for k, v in sd.items()},
        lambda sd: {"_orig_mod." + k: v for k, v in sd.items()},
        lambda sd: {"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}},
        lambda sd: {"model." + k: v for k, v in sd.items()},
    ],
    ids=["state_dict", "model", "ema", "ddp", "compile", "nested", "lightning-prefix"],
)
def test_training_checkpoints_are_unwrapped(tmp_path, reference, images, wrap):
    path = tmp_path / "train.pth"
    torch.save(wrap(reference.state_dict()), path)
    assert_same_outputs(load_checkpoint(path, ARCH, arch_kwargs=KWARGS), reference, images)


def test_key_picks_the_entry_and_the_source_says_which(tmp_path, reference, images):
    ema = randomize_norm_layers(copy.deepcopy(reference), seed=5)
    path = tmp_path / "train.pt"
    torch.save({"state_dict": reference.state_dict(), "state_dict_ema": ema.state_dict()}, path)
    default = load_checkpoint(path, ARCH, arch_kwargs=KWARGS)
    picked = load_checkpoint(path, ARCH, arch_kwargs=KWARGS, key="state_dict_ema")
    assert_same_outputs(default, reference, images)
    assert_same_outputs(picked, ema, images)
    assert get_source(default)["entry"] == "state_dict"
    assert get_source(picked)["entry"] == "state_dict_ema"
    with pytest.raises(CheckpointError, match="has no entry 'emma'.*state_dict, state_dict_ema"):
        load_checkpoint(path, ARCH, arch_kwargs=KWARGS, key="emma")


def test_legacy_and_safetensors_files_load(tmp_path, reference, images):
    legacy, plain = tmp_path / "legacy.pt", tmp_path / "plain.safetensors"
    torch.save(reference.state_dict(), legacy, _use_new_zipfile_serialization=False)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, plain)
    for path in (legacy, plain):
        assert_same_outputs(load_checkpoint(path, ARCH, arch_kwargs=KWARGS), reference, images)


def test_half_precision_checkpoints_keep_their_dtype(tmp_path, reference):
    path = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in reference.state_dict().items()}, path)
    model = load_checkpoint(path, ARCH, arch_kwargs=KWARGS)
    assert model.conv_stem.weight.dtype == torch.float16


def test_missing_num_batches_tracked_is_tolerated(tmp_path, reference, images):
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in reference.state_dict().items() if "num_batches_tracked" not in k}, path)
    assert_same_outputs(load_checkpoint(path, ARCH, arch_kwargs=KWARGS), reference, images)


def test_a_wrong_num_classes_is_named_as_the_likely_cause(state_file):
    with pytest.raises(CheckpointError, match=r"does not fit test_efficientnet: 2 shape mismatch.*classifier.weight"
                                              r".*wrong num_classes\? .*10 outputs.*num_classes"):
        load_checkpoint(state_file, ARCH)


def test_a_wrong_architecture_lists_the_first_missing_and_unexpected_keys(state_file):
    with pytest.raises(CheckpointError, match=r"does not fit test_resnet: \d+ missing key\(s\) \(first: .*\); "
                                              r"\d+ unexpected key\(s\) \(first: conv_stem.weight\);.*\(wrong "
                                              r"architecture\? .* in the top level of the file") as raised:
        load_checkpoint(state_file, "test_resnet")
    assert len(str(raised.value)) - len(str(state_file)) < 400 and "\n" not in str(raised.value)


def test_a_state_dict_without_an_architecture_asks_for_one(state_file):
    with pytest.raises(CheckpointError, match=r"weights only, not the architecture: pass arch=, a timm"):
        load_checkpoint(state_file)


def test_a_pickled_model_needs_trust_pickle(tmp_path, reference, images):
    path = tmp_path / "whole.pt"
    torch.save(reference, path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects .*EfficientNet.*pass trust_pickle=True "
                                              r"only if you trust the file$"):
        load_checkpoint(path)
    assert_same_outputs(load_checkpoint(path, trust_pickle=True), reference, images)


class _Payload:
    """Unpickling this creates a file: the stand-in for code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_crafted_pickle_runs_no_code_without_trust_pickle(tmp_path, reference):
    marker = tmp_path / "code-ran"
    path = tmp_path / "crafted.pt"
    torch.save({"state_dict": reference.state_dict(), "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        read_checkpoint(path)
    assert not marker.exists()
    read_checkpoint(path, trust_pickle=True)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_torchscript_archive_is_a_clear_error(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))).save(str(path))
    with pytest.raises(CheckpointError, match="TorchScript archive.*torch.jit.load"):
        read_checkpoint(path)


@pytest.mark.parametrize("to", ["gn", "in", "frozen", "sync"])
def test_save_then_load_rebuilds_the_converted_model(tmp_path, state_file, images, to):
    options = {"groups": 8} if to == "gn" else {}
    model = normswap.convert(load_checkpoint(state_file, ARCH, arch_kwargs=KWARGS), to, **options).eval()
    path = save(model, tmp_path / "converted.safetensors")
    loaded = load(path)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]
    assert_same_outputs(loaded, model, images)
    assert get_history(loaded) == get_history(model) and get_arch(loaded) == get_arch(model)


def test_history_of_several_steps_replays_in_order(tmp_path, reference, images):
    model = normswap.convert(copy.deepcopy(reference), "frozen", include="blocks.0.*")
    model = normswap.convert(model, "gn", groups=4, exclude="blocks.0.*").eval()
    normswap.history.set_arch(model, {"name": ARCH, "kwargs": KWARGS})
    loaded = load(save(model, tmp_path / "two-steps.safetensors"))
    assert [step["plan"]["target"] for step in get_history(loaded)] == ["frozen", "gn"]
    assert_same_outputs(loaded, model, images)


def test_a_folded_model_round_trips(tmp_path, reference, images):
    from normswap.fold import fold

    model = fold(copy.deepcopy(reference))
    normswap.history.set_arch(model, {"name": ARCH, "kwargs": KWARGS})
    loaded = load(save(model, tmp_path / "folded.safetensors"))
    assert_same_outputs(loaded, model, images)


def test_the_header_records_arch_history_source_and_versions(tmp_path, state_file):
    model = normswap.convert(load_checkpoint(state_file, ARCH, arch_kwargs=KWARGS), "gn")
    metadata = read_metadata(save(model, tmp_path / "out.safetensors"))
    assert metadata["arch"] == {"name": ARCH, "kwargs": KWARGS}
    assert metadata["history"][0]["op"] == "plan" and metadata["history"][0]["plan"]["target"] == "gn"
    assert metadata["source"] == {"file": "model.pt", "sha256": hashlib.sha256(state_file.read_bytes()).hexdigest()}
    assert metadata["normswap"] == normswap.__version__ and metadata["torch"] == torch.__version__


class BufferNet(nn.Module):
    """A network with a non-persistent buffer (set by ``__init__``, not saved) and a transposed (non-contiguous)
    weight that is a view of another layer's weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 4, bias=False)
        self.norm = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = nn.Parameter(self.embed.weight.t())
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, x):
        return self.out(self.norm(self.embed(x))) * self.scale


class SharedNet(nn.Module):
    """Two heads tied to one weight object, and a buffer whose two halves are views of one tensor."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        self.head_a = nn.Linear(4, 3)
        self.head_b = nn.Linear(4, 3)
        self.head_b.weight = self.head_a.weight
        self.register_buffer("table", torch.arange(12.0).reshape(3, 4))
        self.register_buffer("table_t", self.table.t())

    def forward(self, x):
        h = self.body(x)
        return self.head_a(h) + self.head_b(h) + self.table.sum() + self.table_t[0, 0]


def test_shared_and_non_contiguous_tensors_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = randomize_norm_layers(SharedNet()).eval()
    with torch.no_grad():
        model.table.mul_(3)
    normswap.history.set_arch(model, {"name": "tests.test_checkpoint:SharedNet", "kwargs": {}})
    path = save(model, tmp_path / "shared.safetensors")
    assert read_metadata(path)["aliases"] == {"head_b.weight": "head_a.weight"}
    loaded = load_checkpoint(path, "tests.test_checkpoint:SharedNet").eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-6, atol=1e-6)
    assert loaded.head_b.weight is loaded.head_a.weight
    torch.testing.assert_close(loaded.table_t, model.table.t(), rtol=0, atol=0)


def test_a_model_with_non_persistent_buffers_is_built_for_real(tmp_path):
    torch.manual_seed(0)
    model = randomize_norm_layers(BufferNet()).eval()
    with torch.no_grad():
        model.embed.weight.mul_(2)
    normswap.history.set_arch(model, {"name": "tests.test_checkpoint:BufferNet", "kwargs": {}})
    path = save(model, tmp_path / "buffers.safetensors")
    loaded = load_checkpoint(path, "tests.test_checkpoint:BufferNet").eval()
    assert all(t.device.type == "cpu" for t in tensors_of(loaded))
    assert loaded.scale.item() == 0.5
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded(x), model(x))  # the saved weight is contiguous: another matmul order


def test_save_refuses_an_existing_file_unless_told(tmp_path, reference):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists: pass overwrite=True to replace it$"):
        save(reference, path)
    assert path.read_bytes() == b"keep me"
    save(reference, path, overwrite=True)
    assert read_metadata(path)["normswap"] == normswap.__version__


def test_save_writes_safetensors_only(tmp_path, reference):
    with pytest.raises(OutputError, match=r"name it \*.safetensors"):
        save(reference, tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("interruption", [RuntimeError("disk full"), "sigint"])
def test_an_interrupted_write_leaves_nothing_behind(tmp_path, interruption):
    target = tmp_path / "out.bin"

    def write(temporary):
        temporary.write_bytes(b"half of it")
        if interruption == "sigint":
            signal.raise_signal(signal.SIGINT)
        raise interruption

    expected = KeyboardInterrupt if interruption == "sigint" else RuntimeError
    with pytest.raises(expected):
        atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_write_replaces_only_when_asked_and_keeps_the_umask_mode(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write(target, lambda temporary: temporary.write_bytes(b"one"))
    with pytest.raises(OutputError, match="already exists"):
        atomic_write(target, lambda temporary: temporary.write_bytes(b"two"))
    atomic_write(target, lambda temporary: temporary.write_bytes(b"three"), overwrite=True)
    assert target.read_bytes() == b"three"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_an_atomic_write_into_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(OutputError, match="folder .*missing.* does not exist"):
        atomic_write(tmp_path / "missing" / "out.bin", lambda temporary: temporary.write_bytes(b""))


def test_read_metadata_needs_a_safetensors_file(state_file):
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_metadata(state_file)


@pytest.mark.cuda
def test_a_model_on_the_gpu_saves_and_loads_on_the_cpu(tmp_path, state_file, images):
    model = normswap.convert(load_checkpoint(state_file, ARCH, arch_kwargs=KWARGS), "gn").cuda().eval()
    loaded = load(save(model, tmp_path / "gpu.safetensors")).eval()
    assert all(t.device.type == "cpu" for t in tensors_of(loaded))
    torch.testing.assert_close(loaded(images), model(images.cuda()).cpu(), rtol=1e-4, atol=1e-5)


def test_a_file_of_normswap_0_1_with_a_structural_history_and_no_manifest_says_what_to_do(tmp_path):
    """normswap 0.1 recorded conversions as steps to replay; loading no longer replays anything."""
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    plan_step = {"op": "plan", "plan": normswap.plan(model, "frozen").to_dict()}
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata={
        "normswap": "0.1.0", "arch": '{"name": "resnet18", "kwargs": {}}', "history": json.dumps([plan_step])})
    with pytest.raises(CheckpointError, match=r"written by normswap 0.1.0, which recorded its structure as steps "
                                              r"\(plan\) rather than a manifest: load it with that version and save"):
        load(path)
