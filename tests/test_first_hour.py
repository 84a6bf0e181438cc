"""What a new user meets in the first hour: help at once, the real error first and in the caller's words, progress
bars on a terminal (and none when piped), verify's verdicts in words, and HTML pages of a comparison and an
inspection (structure always; a headless browser where one is installed)."""

import copy
import fcntl
import html.parser
import importlib
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

import normswap
from normswap.cli import main
from normswap.inspection import inspect_model

from .helpers import randomize_norm_layers, save_resnet18_with_data

ROOT = Path(__file__).parent.parent
ARCH = ["--arch", "resnet18", "--arch-kwargs", '{"num_classes": 10}']
COMMANDS = ["apply", "convert", "demo", "fold", "freeze", "inspect", "recalibrate", "verify"]


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def environment():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def checkpoint(tmp_path):
    """A resnet18 state dict (10 classes, non-trivial statistics), its model and a labelled tensor data file."""
    return save_resnet18_with_data(tmp_path)


# --- help ----------------------------------------------------------------------------------------------------------

HELP_IMPORTS = """
import sys
from normswap.cli import main
for args in [["--help"]] + [[command, "--help"] for command in sys.argv[1:]]:
    try:
        main(args)
    except SystemExit as done:
        assert done.code == 0, (args, done.code)
heavy = sorted(name for name in ("torch", "timm", "torchvision", "numpy", "safetensors", "tqdm") if name in sys.modules)
print("imported:", ",".join(heavy) or "nothing heavy")
"""


def test_help_of_the_command_and_of_every_subcommand_imports_no_torch():
    result = subprocess.run([sys.executable, "-c", HELP_IMPORTS, *COMMANDS], capture_output=True, text=True,
                            env=environment(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "imported: nothing heavy"
    assert sorted(main.commands) == COMMANDS  # a new command joins COMMANDS, and so this test


def test_the_summary_names_every_command():
    summary = main.help.split("\n\n")[0]
    assert all(re.search(rf"\b{command}\b", summary, flags=re.I) for command in COMMANDS), summary


def _fastest(command: list[str], rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, env=environment(), check=True, timeout=60)
        times.append(time.perf_counter() - start)
    return times


def test_help_takes_at_most_twice_as_long_as_importing_click():
    """Interleaved rounds, the fastest of each: a ratio, no absolute time."""
    click_times, help_times = [], []
    for _ in range(5):
        click_times += _fastest([sys.executable, "-c", "import click"], 1)
        help_times += _fastest([sys.executable, "-m", "normswap", "--help"], 1)
    ratio = min(help_times) / min(click_times)
    assert ratio <= 2.0, f"normswap --help took {ratio:.2f}x the time of importing click"


def test_a_function_keeps_its_name_when_its_module_of_the_same_name_is_imported():
    """``import normswap`` imports no torch (the help test above): names are resolved on first use, and the import
    system binding the submodule ``normswap.fold`` on the package does not replace the function ``fold``."""
    for name in ("fold", "compare", "plan", "refine", "recalibrate"):
        module = importlib.import_module(f"normswap.{name}")
        setattr(normswap, name, module)  # what the import system does when it first loads the submodule
        assert getattr(normswap, name) is getattr(module, name) and callable(getattr(normswap, name))
    assert set(normswap.__all__) <= set(dir(normswap)) and normswap.plan_fold.__module__ == "normswap.fold"


# --- the real error first, in the caller's words --------------------------------------------------------------------

def test_an_existing_output_does_not_hide_a_missing_trust_pickle(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(timm.create_model("test_resnet"), whole)
    (tmp_path / "whole-gn.safetensors").write_bytes(b"earlier run")
    result = run("convert", whole, "--to", "gn")
    assert result.exit_code == 1
    assert "--trust-pickle only if you trust the file" in result.stderr and "already exists" not in result.stderr
    assert "trust_pickle=True" not in result.stderr


def test_an_existing_output_does_not_hide_missing_data(checkpoint, tmp_path):
    _, path, _ = checkpoint
    for command, extra in (("recalibrate", []), ("convert", ["--to", "gn", "--affine", "fit"])):
        suffix = "recalibrated" if command == "recalibrate" else "gn"
        (tmp_path / f"resnet18-{suffix}.safetensors").write_bytes(b"earlier run")
        result = run(command, path, *ARCH, *extra, "--data", tmp_path / "no-such-folder")
        assert result.exit_code == 1, result.output
        assert "no-such-folder" in result.stderr and "already exists" not in result.stderr, result.stderr


def test_a_fold_with_nothing_to_fold_says_so_before_the_output(tmp_path):
    path = tmp_path / "plain.safetensors"
    normswap.save(torch.nn.Linear(4, 4), path, arch="torch.nn:Linear", arch_kwargs={"in_features": 4,
                                                                                   "out_features": 4})
    (tmp_path / "plain-folded.safetensors").write_bytes(b"earlier run")
    result = run("fold", path, "--arch", "torch.nn:Linear")
    assert result.exit_code == 1
    assert result.stderr == "error: the model has no BatchNorm layer to fold: nothing written\n"


def test_the_existing_output_message_says_force_on_the_command_line_and_overwrite_in_python(checkpoint, tmp_path):
    model, path, _ = checkpoint
    out = tmp_path / "resnet18-frozen.safetensors"
    out.write_bytes(b"earlier run")
    result = run("freeze", path, *ARCH)
    assert result.exit_code == 1
    assert result.stderr == f"error: {out} already exists: pass --force to replace it\n"
    with pytest.raises(normswap.OutputError) as raised:
        normswap.save(model, out)
    assert str(raised.value) == f"{out} already exists: pass overwrite=True to replace it"
    assert out.read_bytes() == b"earlier run"


# --- progress ------------------------------------------------------------------------------------------------------

PROGRESS_SCRIPT = """
import sys, torch, normswap, normswap.progress
from torch import nn
normswap.progress.DELAY_S = 0.0          # the policy's default, without waiting two seconds for it
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)).eval()
data = [torch.randn(2, 3, 8, 8) for _ in range(5)]
normswap.compare(model, model, data)
normswap.plan_fold(model, data=data)
print("SILENCED", file=sys.stderr, flush=True)
normswap.compare(model, model, data, progress=False)
normswap.plan_fold(model, data=data, progress=False)
print("done")
"""


def test_compare_and_fold_planning_show_a_bar_on_a_terminal_and_nothing_when_piped():
    """The same script twice, at the same time: stderr on a pseudo-terminal of 24 x 120 characters, and piped."""
    piped = subprocess.Popen([sys.executable, "-c", PROGRESS_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=environment())
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    on_terminal = subprocess.Popen([sys.executable, "-c", PROGRESS_SCRIPT], stdout=subprocess.PIPE, stderr=follower,
                                   env=environment())
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert on_terminal.wait(timeout=120) == 0 and on_terminal.stdout.read().strip() == b"done"
    written, silenced = b"".join(chunks).decode(errors="replace").split("SILENCED")
    assert re.search(r"compare: 100%.*5/5", written), written
    assert re.search(r"running the model: .*\d+/\d+", written), written
    final_lines = {line.split(":")[0] for line in written.replace("\r", "\n").splitlines() if "%|" in line}
    assert final_lines == {"compare", "running the model"}
    assert silenced.strip() == ""  # progress=False

    out, err = piped.communicate(timeout=120)
    assert piped.returncode == 0 and out.strip() == b"done"
    assert err == b"SILENCED\n"


def test_the_command_line_progress_option_shows_or_silences_the_bars(checkpoint, tmp_path, monkeypatch):
    _, path, data = checkpoint
    shown = run("fold", path, *ARCH, "--dry-run", "--progress")
    assert shown.exit_code == 0 and re.search(r"running the model: .*\d+/\d+", shown.stderr), shown.stderr
    compared = run("verify", path, path, *ARCH, "--data", data, "--batch-size", 2, "--progress")
    assert compared.exit_code == 0 and re.search(r"compare: 100%.*3/3", compared.stderr), compared.stderr
    silent = run("verify", path, path, *ARCH, "--data", data, "--batch-size", 2, "--no-progress")
    assert silent.exit_code == 0 and silent.stderr == ""
    monkeypatch.setenv("RANK", "1")  # a process torchrun started, other than the first: never a bar
    other_rank = run("verify", path, path, *ARCH, "--data", data, "--batch-size", 2, "--progress")
    assert other_rank.exit_code == 0 and other_rank.stderr == ""


# --- verdicts ------------------------------------------------------------------------------------------------------

def test_verify_ends_with_one_verdict_line_per_threshold(checkpoint, tmp_path):
    model, path, data = checkpoint
    folded_model = normswap.fold(copy.deepcopy(model), input_shape=(1, 3, 32, 32))
    folded = tmp_path / "folded.safetensors"
    normswap.save(folded_model, folded)
    passed = run("verify", path, folded, *ARCH, "--data", data, "--max-relative", "1e-5", "--min-agreement", "0.9")
    assert passed.exit_code == 0, passed.output
    relative = normswap.compare(model, folded_model, [torch.load(data)[0]]).relative
    lines = passed.stdout.strip().splitlines()
    assert lines[-2] == f"relative difference {relative:.3g} <= 1e-05: passed"
    assert lines[-1] == "top-1 agreement 1 >= 0.9: passed"

    converted = tmp_path / "gn.safetensors"
    normswap.save(normswap.convert(copy.deepcopy(model), "gn"), converted)
    failed = run("verify", path, converted, *ARCH, "--data", data, "--max-relative", "1e-5")
    assert failed.exit_code == 1
    verdict = failed.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"relative difference \S+ > 1e-05: failed", verdict), verdict
    assert failed.stderr == f"error: verify failed: {verdict}\n"


# --- pages ---------------------------------------------------------------------------------------------------------

class _Page(html.parser.HTMLParser):
    """Every tag with its attributes, and the text of ``<title>`` elements inside the SVG charts."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.stack: list[str] = []
        self.point_titles: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.stack.append(tag)

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop() != tag:
            pass

    def handle_data(self, data):
        if self.stack[-2:] == ["circle", "title"]:
            self.point_titles.append(data)

    def points(self, svg_index: int) -> list[dict]:
        found, index = [], -1
        for tag, attrs in self.tags:
            index += tag == "svg"
            if index == svg_index and tag == "circle" and "point" in attrs.get("class", "").split():
                found.append(attrs)
        return found


def parse(path: Path) -> _Page:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"(?i)<script|https?://|\bsrc=|<link|@import", text), "the page must be self-contained"
    page = _Page()
    page.feed(text)
    page.close()
    return page


def test_verify_report_has_a_point_per_compared_layer_and_marks_the_first_divergence(checkpoint, tmp_path):
    model, path, data = checkpoint
    converted_model = normswap.convert(copy.deepcopy(model), "gn")
    converted = tmp_path / "gn.safetensors"
    normswap.save(converted_model, converted)
    page_path = tmp_path / "report.html"
    result = run("verify", path, converted, *ARCH, "--data", data, "--report", page_path)
    assert result.exit_code == 0, result.output
    assert f"wrote {page_path}" in result.stdout
    expected = normswap.compare(model, converted_model, [torch.load(data)[0]])
    page = parse(page_path)
    points = page.points(0)
    assert len(points) == len(expected.layers) > 20
    assert [title.split(" (")[0] for title in page.point_titles] == [layer.name for layer in expected.layers]
    diverged = [i for i, attrs in enumerate(points) if "diverged" in attrs["class"]]
    assert expected.layers[diverged[0]].name == expected.first_divergence == "bn1"
    assert any(attrs.get("class") == "first" for _, attrs in page.tags)
    heights = [float(attrs["cy"]) for attrs in points]
    ordered = sorted(range(len(points)), key=lambda i: expected.layers[i].relative)
    assert [heights[i] for i in ordered] == sorted(heights, reverse=True)  # higher difference, higher on the page
    again = run("verify", path, converted, *ARCH, "--data", data, "--report", page_path)
    assert again.exit_code == 1 and "already exists: pass --force" in again.stderr


def test_a_layer_name_from_a_file_is_escaped_in_the_page(tmp_path):
    report = normswap.compare(nn_with_odd_name(), nn_with_odd_name(), [torch.randn(2, 4)])
    path = report.save_html(tmp_path / "odd.html")
    text = path.read_text()
    assert "<b onmouseover" not in text and "&lt;b onmouseover=&quot;x&quot;&gt;" in text
    assert len(parse(path).points(0)) == len(report.layers) == 2


def nn_with_odd_name() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module('<b onmouseover="x">', torch.nn.Linear(4, 4))
    model.add_module("head", torch.nn.Linear(4, 2))
    return model


def test_inspect_report_charts_the_statistics_of_every_layer_and_lists_warnings(tmp_path):
    model = randomize_norm_layers(timm.create_model("test_resnet", num_classes=10), seed=3)
    model.layer1[0].bn1.running_var[0] = -1.0
    path = tmp_path / "sick.pt"
    torch.save(model.state_dict(), path)
    page_path = tmp_path / "inspect.html"
    result = run("inspect", path, "--arch", "test_resnet", "--arch-kwargs", '{"num_classes": 10}',
                 "--report", page_path)
    assert result.exit_code == 0, result.output
    page = parse(page_path)
    layers = inspect_model(model)
    for chart in (0, 1):
        assert len(page.points(chart)) == len(layers)
    bad = [attrs for attrs in page.points(1) if "bad" in attrs["class"].split()]
    assert len(bad) == 1
    assert "layer1.0.bn1: running_var has 1 negative value(s)" in page_path.read_text()


def test_a_report_path_that_is_not_html_is_a_usage_error_before_any_work(checkpoint, tmp_path):
    _, path, data = checkpoint
    result = run("verify", path, path, *ARCH, "--data", data, "--report", tmp_path / "report.txt")
    assert result.exit_code == 2 and "name it *.html" in result.stderr
    assert "report.txt" not in files(tmp_path)


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium installed")
def test_the_page_renders_in_a_real_browser_without_errors(checkpoint, tmp_path):
    model, _, _ = checkpoint
    report = normswap.compare(model, normswap.convert(copy.deepcopy(model), "gn"), [torch.randn(2, 3, 32, 32)])
    page = report.save_html(tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    log = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                          "--v=0", f"--screenshot={shot}", "--window-size=1100,900", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000, log.stderr
    assert "CONSOLE" not in log.stderr and "Uncaught" not in log.stderr, log.stderr
    from PIL import Image

    pixels = Image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 16) or []
    assert len(colours) > 20, "the screenshot is blank"
    blue = sum(count for count, (r, g, b) in colours if b > 200 and r < 80)
    assert blue > 50, "the chart's points and line are not drawn"
