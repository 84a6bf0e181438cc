"""The package's shape: no import cycle, nothing imports upwards, type hints resolve, Python 3.10 imports it.

The import graph is read from the source with ``ast``, every ``import`` counted: at module level, inside functions
and under ``if TYPE_CHECKING:`` alike, since each of them is a dependency a refactoring has to respect. Importing a
submodule of another subpackage (``normswap.checkpoint.formats``) also runs that subpackage's ``__init__``, so it
counts as importing the subpackage too. The command line (``normswap/cli.py``, ``__main__.py``) sits above
everything and is left out, as is the package root, which only gathers the public names. A function that moved up
(``normswap.plan.convert``, now ``normswap.api.convert``) is served in its old module by name, as data
(:func:`normswap.deprecation.forwarding`): the old module does not depend on its replacement.
"""

from __future__ import annotations

import ast
import functools
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import normswap

PACKAGE = Path(normswap.__file__).parent
TOP = ("normswap", "normswap.__main__", "normswap.cli")
"""Modules above every layer: the package root (the public names), the command line."""

LAYERS = {
    "core": ["_version", "deprecation", "errors", "history", "layers", "offline", "plan_rows", "registry", "tables",
             "targets", "unwrap", "walk"],
    "files": ["arch", "checkpoint", "imports"],
    "runtime": ["data", "distributed", "graph", "lockstep", "model_state", "placement", "progress", "report_page"],
    "operations": ["compare", "fit", "fold", "inspection", "plan", "recalibrate", "refine"],
    "façade": ["api", "demo", "recipe"],
}
"""normswap's layers, lowest first (``/work/shared/DESIGN.md``, the README's "How it works"): a module may import
its own layer's modules (without a cycle) and those of the layers below it, never those above. A package
(``checkpoint``, ``recalibrate``) stands for all its submodules. Text tables and wrapper unwrapping need nothing but
the errors, and ``history`` and ``checkpoint.saving`` use them: they sit in the core."""


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The normswap modules that module ``name`` imports anywhere in its source, each ``from X import y`` counted as
    importing ``X.y`` when that is a module, else ``X``; plus the subpackages whose ``__init__`` that runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    found = {module for module in found if module == "normswap" or module.startswith("normswap.")}
    own_packages = {".".join(name.split(".")[:n]) for n in range(1, name.count(".") + 2)}
    for module in list(found):
        parts = module.split(".")
        found.update(".".join(parts[:n]) for n in range(2, len(parts)) if ".".join(parts[:n]) not in own_packages)
    return {module for module in found if module != name}


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, frozenset[str]]:
    """Every module's imports (read once per test session)."""
    names = module_names()
    return {name: frozenset(imported_modules(name, path, set(names))) for name, path in names.items()}


def layer_of(module: str) -> str:
    top = module.split(".")[1]
    for layer, members in LAYERS.items():
        if top in members:
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's module table)")


def cycles(graph: dict[str, typing.AbstractSet[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_counts_lazy_type_only_and_package_imports(tmp_path):
    graph = import_graph()
    assert "normswap.plan_rows" in graph["normswap.targets"]  # a type import
    assert "normswap.fit" in graph["normswap.plan"]  # inside Plan.apply
    assert {"normswap.checkpoint", "normswap.checkpoint.formats"} <= graph["normswap.data"]  # runs checkpoint/
    assert "normswap.checkpoint" not in graph["normswap.checkpoint.loading"]  # its own package is already running
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_the_package_root():
    graph = import_graph()
    upward = sorted(name for name, imports in graph.items() if "normswap" in imports and name not in TOP)
    assert upward == []


def test_there_is_no_import_cycle_among_normswaps_modules():
    graph = {name: imports - set(TOP) for name, imports in import_graph().items() if name not in TOP}
    assert cycles(graph) == []


def test_no_module_imports_a_layer_above_its_own():
    order = list(LAYERS)
    upward = []
    for name, imports in import_graph().items():
        if name in TOP:
            continue
        for module in imports - set(TOP):
            if order.index(layer_of(module)) > order.index(layer_of(name)):
                upward.append(f"{name} ({layer_of(name)}) imports {module} ({layer_of(module)})")
    assert sorted(upward) == []


def public_callables() -> list[tuple[str, typing.Any]]:
    """Every public function, class and public method defined in a normswap module (not the command line's click
    commands, whose annotations are click's business), by qualified name."""
    import importlib

    found = []
    for name in module_names():
        if name in TOP or any(part.startswith("_") and part != "__init__" for part in name.split(".")[1:]):
            continue
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if attribute.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if inspect.isfunction(value):
                found.append((f"{name}.{attribute}", value))
            elif inspect.isclass(value):
                found.append((f"{name}.{attribute}", value))
                for method_name, method in vars(value).items():
                    if method_name.startswith("_") and method_name != "__init__":
                        continue
                    function = getattr(method, "__func__", method)
                    if isinstance(method, property):
                        function = method.fget
                    if inspect.isfunction(function):
                        found.append((f"{name}.{attribute}.{method_name}", function))
    return found


def test_type_hints_resolve_on_every_public_function_and_method():
    callables = public_callables()
    names = {name for name, _ in callables}
    assert {"normswap.fit.fit_converted", "normswap.targets.build", "normswap.api.convert",
            "normswap.plan.Plan.apply"} <= names
    failures = []
    for name, value in callables:
        try:
            typing.get_type_hints(value)
        except Exception as exc:  # any failure to resolve is what this test reports, with the name
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
    assert failures == []


def test_the_facade_shows_every_option_in_its_signature():
    from normswap.api import apply_conversion

    for function in (normswap.convert, normswap.freeze, apply_conversion):
        kinds = {parameter.kind for parameter in inspect.signature(function).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, function.__name__
    assert {"groups", "affine", "data", "fit_target", "refine", "refine_options", "strict"} <= set(
        inspect.signature(normswap.convert).parameters)


PYTHON_310 = """
import sys, tomllib
sys.modules["tomli"] = tomllib  # the tomli package Python 3.10 installs: the same parser
sys.modules["tomllib"] = None   # Python 3.10 has no tomllib: importing it raises ImportError
import normswap
from normswap.recipe import Recipe
path = sys.argv[1]
print(Recipe.load(path).rules[0].to)
"""


def test_normswap_imports_and_reads_recipes_without_tomllib_as_on_python_3_10(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[[rules]]\nmatch = '*'\nto = 'frozen'\n")
    result = subprocess.run([sys.executable, "-c", PYTHON_310, str(recipe)], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "frozen"


def test_pyproject_asks_for_tomli_where_python_has_no_tomllib_and_reads_the_version_from_the_package():
    text = (PACKAGE.parent / "pyproject.toml").read_text()
    assert 'tomli>=1.1; python_version < \\"3.11\\"' in text
    assert 'version = { attr = "normswap._version.__version__" }' in text
    from normswap._version import __version__

    assert normswap.__version__ == __version__


@pytest.mark.parametrize("old, new", [("convert", "normswap.convert"), ("freeze", "normswap.freeze"),
                                      ("apply_conversion", "normswap.api.apply_conversion")])
def test_the_facades_old_home_in_normswap_plan_still_works_with_a_deprecation_warning(old, new):
    import torch

    old_function = getattr(sys.modules["normswap.plan"], old)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 1), torch.nn.BatchNorm2d(4))
    arguments = (model, normswap.plan(model, "frozen")) if old == "apply_conversion" else (model,)
    with pytest.warns(DeprecationWarning, match=f"normswap.plan.{old} is deprecated: use {new}"):
        converted = old_function(*arguments) if old != "convert" else old_function(model, "frozen")
    assert type(converted[1]).__name__ == "FrozenBatchNorm"
