"""Import paths the user types: ``package.module:callable``, resolved without reaching outside that package.

An import path runs code: importing a module executes it, calling the callable executes more. normswap resolves one
only when the user typed it (``--arch``, ``--data``, ``arch=``); a path read from a file is shown to the user
instead (see :mod:`normswap.arch`). Even then the path must name a callable *defined in* the package it is imported
from: ``torchvision.models:resnet50`` resolves, ``torchvision.models:resnet.torch.hub.os.system`` does not (walking
attributes from ``resnet`` into ``torch`` and ``os`` leaves the package), nor does ``normswap.checkpoint:os.remove``,
nor a private name (``normswap.data:_import``).

Importing a library can reach the network on its own (ultralytics checks whether it is online when imported and
pip-installs what it misses; Hugging Face libraries look up the hub): the import runs within
:func:`normswap.offline.offline`.

Example::

    >>> resolve("torchvision.models:resnet18").__name__
    'resnet18'
    >>> resolve("normswap.arch:dataclass")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    normswap.errors.NormswapError: ... it is not a callable of the normswap package (it is defined in dataclasses); ...
"""

from __future__ import annotations

import importlib
import inspect
import re
import types
from typing import Any, Callable

from .errors import NormswapError
from .offline import offline

__all__ = ["IMPORT_PATH", "describe_callable", "is_import_path", "resolve"]

IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
"""``package.module:attribute.attribute``: what an import path looks like."""


def is_import_path(text: str) -> bool:
    """True if ``text`` is written like ``package.module:callable``.

    >>> is_import_path("monai.networks.nets:UNet"), is_import_path("resnet50"), is_import_path("a:b;rm")
    (True, False, False)
    """
    return isinstance(text, str) and bool(IMPORT_PATH.fullmatch(text))


def describe_callable(target: Any) -> str:
    """What a callable is, in words, for a message: ``"a function (subprocess.getoutput)"``, ``"a class that is not
    a torch.nn.Module (subprocess.Popen)"``...

    >>> describe_callable(re.compile)
    'a function (re.compile)'
    """
    name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__name__)}"
    if inspect.isclass(target):
        return f"a class that is not a torch.nn.Module ({name})"
    if inspect.isbuiltin(target):
        return f"a built-in function ({name})"
    if inspect.isfunction(target) or inspect.ismethod(target):
        return f"a function ({name})"
    if isinstance(target, types.ModuleType):
        return f"a module ({target.__name__})"
    return f"a callable {type(target).__name__} object ({name})"


def _within(module_name: str, package: str) -> bool:
    return module_name == package or module_name.startswith(package + ".")


def resolve(path: str, *, what: str = "import path", error: type[NormswapError] = NormswapError,
            importer: Callable[[str], Any] = importlib.import_module) -> Callable[..., Any]:
    """The callable an import path names, imported; ``error`` (a :class:`NormswapError` subclass) says why not,
    calling the path ``what`` (``"architecture"``, ``"calibration data"``).

    The module is imported with ``importer``; every attribute walked must stay in the module's top-level package,
    and the callable found must be defined there (its ``__module__``).
    """
    where = f"cannot use {what} '{path}'"
    if not is_import_path(path):
        raise error(f"{where}: it is not an import path, write it as package.module:callable")
    module_name, _, attributes = path.partition(":")
    package = module_name.split(".")[0]
    if any(part.startswith("_") for part in attributes.split(".")):
        raise error(f"{where}: '{attributes}' is private; name a public callable")
    try:
        with offline():
            target: Any = importer(module_name)
    except ImportError as exc:
        raise error(f"{where}: cannot import '{module_name}' ({exc})") from None
    except Exception as exc:
        raise error(f"{where}: importing '{module_name}' failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    for part in attributes.split("."):
        if not hasattr(target, part):
            raise error(f"{where}: '{module_name}' has no '{attributes}'")
        target = getattr(target, part)
        if isinstance(target, types.ModuleType) and not _within(target.__name__, package):
            raise error(f"{where}: it leaves the {package} package (through the module {target.__name__}); name "
                        "the callable where its package defines it")
    if not callable(target) or isinstance(target, types.ModuleType):
        raise error(f"{where}: it is a {type(target).__name__}, not a callable")
    owner = getattr(target, "__module__", None)
    if not isinstance(owner, str) or not _within(owner, package):
        raise error(f"{where}: it is not a callable of the {package} package (it is defined in {owner}); name "
                    "the callable where its package defines it")
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
