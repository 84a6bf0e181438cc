"""Progress bars (normswap.progress): one policy for every operation, and no other module builds a bar itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import normswap
from normswap.progress import DELAY_S, progress_bar

PACKAGE = Path(normswap.__file__).parent


def test_no_module_but_progress_imports_tqdm():
    importing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "tqdm" for name in names):
                importing.append(path.relative_to(PACKAGE).as_posix())
    assert importing == ["progress.py"]


@pytest.mark.parametrize("progress, rank, disabled", [
    (True, 0, False), (True, 1, True), (False, 0, True), (None, 1, True),
])
def test_a_bar_is_shown_on_request_on_rank_zero_only(progress, rank, disabled):
    with progress_bar(3, "test", "step", progress=progress, rank=rank) as bar:
        assert bar.disable is disabled


def test_by_default_no_bar_is_shown_when_standard_error_is_not_a_terminal(capsys):
    assert DELAY_S == 2.0  # and on a terminal, only once the work has lasted that long
    with progress_bar(3, "test", "step", progress=None) as bar:
        bar.update(3)
        assert bar.disable  # pytest's captured standard error is not a terminal
    assert capsys.readouterr().err == ""
