"""Old spellings of the public API, still accepted, each with a ``DeprecationWarning`` that names the new one.

Public names are never broken between versions: a renamed keyword keeps working through :func:`renamed_keywords`,
a moved function through :func:`moved` (and, in the module it left, :func:`forwarding`), and each says what to
write instead.

>>> import warnings
>>> @renamed_keywords(reference="original")
... def distance(model, original):
...     return model - original
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     distance(5, reference=3)
2
>>> str(caught[0].message)
'distance(reference=...) is deprecated: pass original=... instead'
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Any, Callable, TypeVar

__all__ = ["forwarding", "moved", "renamed_keywords", "warn_deprecated"]

F = TypeVar("F", bound=Callable[..., Any])


def warn_deprecated(message: str, *, stacklevel: int = 3) -> None:
    """Issue a ``DeprecationWarning`` pointing at the caller of the deprecated function (``stacklevel``)."""
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """A decorator accepting each old keyword name (``old="new"``) for its new one, with a ``DeprecationWarning``.

    The decorated function keeps its own signature (``inspect.signature`` and ``typing.get_type_hints`` see the
    new names only); giving both the old and the new name is a ``TypeError``, as for any duplicate argument.
    """

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def accepting_old_names(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{function.__name__}() got {old}= and {new}=, the same argument twice: "
                                    f"pass {new}= only")
                warn_deprecated(f"{function.__name__}({old}=...) is deprecated: pass {new}=... instead")
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return accepting_old_names  # type: ignore[return-value]

    return decorate


def moved(function: F, old_name: str, new_name: str) -> F:
    """``function`` under the name it used to have, warning that it is now ``new_name``.

    >>> import warnings
    >>> size = moved(len, "normswap.size", "len")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     size([1, 2])
    2
    >>> str(caught[0].message)
    'normswap.size is deprecated: use len (same arguments)'
    """

    @functools.wraps(function)
    def under_old_name(*args: Any, **kwargs: Any) -> Any:
        warn_deprecated(f"{old_name} is deprecated: use {new_name} (same arguments)")
        return function(*args, **kwargs)

    return under_old_name  # type: ignore[return-value]


def forwarding(module: str, names: dict[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that serves the functions that left ``module``: ``names`` maps each old attribute to
    ``(new module, public name)``, and the function is imported from its new module on first use and returned as
    :func:`moved` wraps it. The new home is named as data, so the module it left does not import its replacement
    (a façade built on it): the layers keep pointing one way.

    >>> import warnings
    >>> __getattr__ = forwarding("normswap.old", {"size": ("operator", "operator.length_hint")})
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     __getattr__("size")([1, 2, 3])
    3
    >>> __getattr__("shape")
    Traceback (most recent call last):
    ...
    AttributeError: module 'normswap.old' has no attribute 'shape'
    """

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        home, public = names[name]
        function = getattr(importlib.import_module(home), public.rpartition(".")[2])
        return moved(function, f"{module}.{name}", public)

    return __getattr__
