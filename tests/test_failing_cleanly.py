"""Failing cleanly: every failure is one line and a non-zero exit, and nothing is left behind.

Signals (SIGTERM is handled like Ctrl-C), a full disk, a data loader or a model that raises, input that is not a
regular file, files whose extension lies, and conversions that would change nothing.
"""

import errno
import os
import re
import signal
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import normswap
from normswap.checkpoint import TEMPORARY_SUFFIX, atomic, formats
from normswap.cli import main
from normswap.demo import DigitsResNet
from normswap.errors import OutputError

from .helpers import randomize_norm_layers

DEMO_ARCH = ["--arch", "normswap.demo:DigitsResNet"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def files(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "digits.pt"
    torch.save(randomize_norm_layers(DigitsResNet()).state_dict(), path)
    return path


# --- signals -----------------------------------------------------------------------------------------------------

SLOW_WRITE = textwrap.dedent("""
    import sys, time
    import torch
    from normswap.checkpoint import formats
    from normswap.cli import main

    written = formats._write_tensor

    def slowly(f, tensor):
        written(f, tensor)
        f.flush()
        print("writing", flush=True)
        time.sleep(0.2)

    formats._write_tensor = slowly
    main(sys.argv[1:])
""")


def _start_slow_convert(tmp_path):
    import timm

    torch.save(timm.create_model("resnet50").state_dict(), tmp_path / "big.pt")  # 102 MB
    script = tmp_path / "slow.py"
    script.write_text(SLOW_WRITE)
    process = subprocess.Popen(
        [sys.executable, str(script), "freeze", str(tmp_path / "big.pt"), "--arch", "resnet50"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    return process


def test_sigterm_during_a_write_leaves_no_file_of_any_kind(tmp_path):
    """The 105 MB output is being written when SIGTERM arrives: exit 143, one line, no temporary file."""
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(25)], torch.nn.BatchNorm1d(1024))
    script = tmp_path / "save.py"
    script.write_text(SLOW_WRITE.replace("main(sys.argv[1:])", textwrap.dedent("""
        from normswap.checkpoint import interruptible
        model = torch.load(sys.argv[1], weights_only=False)
        try:
            with interruptible():
                import normswap
                normswap.save(model, sys.argv[2])
        except KeyboardInterrupt as exc:
            print(type(exc).__name__, file=sys.stderr)
            sys.exit(143)
    """)))
    torch.save(model, tmp_path / "model.pickle")
    before = files(tmp_path)
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "model.pickle"),
                                str(tmp_path / "out.safetensors")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _wait_for_the_write(process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and stderr.strip().endswith("Terminated"), stderr
    assert files(tmp_path) == before


def _wait_for_the_write(process):
    line = process.stdout.readline()
    assert line.strip() == "writing", process.communicate(timeout=60)[1]


def test_the_command_line_handles_sigterm_like_ctrl_c(tmp_path):
    process = _start_slow_convert(tmp_path)
    _wait_for_the_write(process)
    before = [name for name in files(tmp_path) if not name.endswith(TEMPORARY_SUFFIX)]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert stderr == "error: terminated\n"
    assert files(tmp_path) == before


def test_after_sigkill_only_one_temporary_file_says_what_it_is(tmp_path):
    process = _start_slow_convert(tmp_path)
    _wait_for_the_write(process)
    process.kill()
    process.wait(timeout=60)
    left = [name for name in files(tmp_path) if name not in ("big.pt", "slow.py")]
    assert len(left) == 1 and left[0].startswith(".big-frozen.safetensors.") and left[0].endswith(TEMPORARY_SUFFIX)


# --- a full disk -------------------------------------------------------------------------------------------------

def test_too_little_free_space_is_refused_before_writing(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    before = files(tmp_path)
    result = run("freeze", ckpt, *DEMO_ARCH)
    assert result.exit_code == 1
    assert re.match(re.escape(f"error: not enough space to write {tmp_path / 'digits-frozen.safetensors'}: ") +
                    r"it needs \d+\.\d kB, the disk has 1\.0 kB free$", result.stderr)
    assert files(tmp_path) == before


def test_a_disk_that_fills_up_while_writing_is_one_line_and_leaves_nothing(ckpt, tmp_path, monkeypatch):
    def full(path, tensors, metadata):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(formats, "write_safetensors", full)
    before = files(tmp_path)
    result = run("freeze", ckpt, *DEMO_ARCH)
    assert result.exit_code == 1
    assert re.match(re.escape(f"error: the disk is full: cannot write {tmp_path / 'digits-frozen.safetensors'} ") +
                    r"\(it needs \d+\.\d kB, ", result.stderr)
    assert files(tmp_path) == before


def test_save_refuses_a_full_disk_with_an_output_error(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "write_safetensors",
                        lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OutputError, match="the disk is full"):
        normswap.save(DigitsResNet(), tmp_path / "d.safetensors")
    assert files(tmp_path) == []


# --- data and models that raise ----------------------------------------------------------------------------------

def test_a_data_loader_that_raises_is_named_with_its_batch(ckpt, tmp_path, monkeypatch):
    (tmp_path / "flaky_data.py").write_text(textwrap.dedent("""
        import torch

        def batches():
            for index in range(5):
                if index == 3:
                    raise ValueError("corrupt JPEG in shard 7")
                yield torch.rand(4, 1, 8, 8)
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = files(tmp_path)
    result = run("recalibrate", ckpt, *DEMO_ARCH, "--data", "flaky_data:batches")
    assert result.exit_code == 1
    assert result.stderr == ("error: reading batch 3 failed in the data loader: ValueError: corrupt JPEG in "
                             "shard 7\n")
    assert files(tmp_path) == before


def test_verify_on_data_of_the_wrong_channel_count_names_the_batch(ckpt, tmp_path):
    torch.save(torch.rand(8, 3, 8, 8), tmp_path / "rgb.pt")
    result = run("verify", ckpt, ckpt, *DEMO_ARCH, "--data", tmp_path / "rgb.pt")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: batch 0 (float32 8x3x8x8) failed in the original model: RuntimeError: ")
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr


def test_inspect_piped_into_head_exits_quietly(ckpt):
    pipeline = f"{sys.executable} -m normswap inspect {ckpt} {' '.join(DEMO_ARCH)} | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", pipeline], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("file: ") and result.stdout.count("\n") == 1
    assert result.stderr == ""


# --- inputs that are not what they say ---------------------------------------------------------------------------

def test_a_fifo_is_refused_without_opening_it(ckpt, tmp_path):
    fifo = tmp_path / "calib.pt"
    os.mkfifo(fifo)
    result = subprocess.run([sys.executable, "-m", "normswap", "recalibrate", str(ckpt), *DEMO_ARCH, "--data",
                             str(fifo)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr == (f"error: calibration data '{fifo}' is not a regular file or a folder (a pipe or a "
                             "device?)\n")
    result = subprocess.run([sys.executable, "-m", "normswap", "inspect", str(fifo)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "is not a regular file" in result.stderr


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_calibration_data_with_pickled_objects_is_one_line_without_advice_to_unpickle(ckpt, tmp_path):
    torch.save({"images": torch.rand(4, 1, 8, 8), "extra": _Payload()}, tmp_path / "evil.pt")
    result = run("recalibrate", ckpt, *DEMO_ARCH, "--data", tmp_path / "evil.pt")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "it holds pickled Python objects (print), which normswap does not unpickle" in result.stderr
    assert "weights_only" not in result.stderr and "trust" not in result.stderr


def test_a_file_is_read_by_its_content_whatever_its_extension(tmp_path):
    model = randomize_norm_layers(DigitsResNet()).eval()
    x = torch.rand(2, 1, 8, 8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.pt")
    torch.save(model.state_dict(), tmp_path / "weights.safetensors")
    for name in ("weights.pt", "weights.safetensors"):
        loaded = normswap.load_checkpoint(tmp_path / name, "normswap.demo:DigitsResNet").eval()
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.save(torch.rand(6, 1, 8, 8), tmp_path / "calib.safetensors")
    result = run("recalibrate", tmp_path / "weights.pt", *DEMO_ARCH, "--data", tmp_path / "calib.safetensors")
    assert result.exit_code == 0, result.output


# --- conversions that change nothing -----------------------------------------------------------------------------

def test_an_include_that_matches_nothing_writes_nothing_and_fails(ckpt, tmp_path):
    before = files(tmp_path)
    result = run("convert", ckpt, *DEMO_ARCH, "--to", "gn", "--include", "backbone.*")
    assert result.exit_code == 1
    assert "warning: the pattern 'backbone.*' matches no norm layer" in result.stderr
    assert result.stderr.endswith("error: nothing to convert: no norm layer matches the include pattern(s) "
                                  "'backbone.*'\n")
    assert files(tmp_path) == before


def test_converting_to_what_the_model_already_has_writes_nothing_and_fails(ckpt, tmp_path):
    assert run("freeze", ckpt, *DEMO_ARCH).exit_code == 0
    frozen = tmp_path / "digits-frozen.safetensors"
    before = files(tmp_path)
    result = run("freeze", frozen)
    assert result.exit_code == 1
    assert result.stderr == ("error: nothing to convert: every norm layer is left as it is (already frozen: bn1, "
                             "layer1.bn1, layer1.bn2, ...)\n")
    assert files(tmp_path) == before


def test_a_safetensors_header_whose_length_looks_like_a_pickle_is_read_as_safetensors(tmp_path):
    """A header of 0x480 bytes begins with the bytes 0x80 0x04, which also start a pickle of protocol 4."""
    path = tmp_path / "weights.safetensors"
    for padding in range(2000):
        save_file({"w": torch.ones(2)}, path, metadata={"note": "x" * padding})
        if path.read_bytes()[:2] == b"\x80\x04":
            break
    assert path.read_bytes()[:2] == b"\x80\x04"
    assert formats.file_kind(path) == "safetensors"
    assert torch.equal(normswap.checkpoint.read_checkpoint(path).tensors["w"], torch.ones(2))
