"""The errors a user can cause.

Every failure that the user can fix (a bad file, a wrong architecture, an indivisible channel count, an empty
loader...) raises :class:`NormswapError` or one of its subclasses, with one sentence that says what is wrong and,
where it helps, what to do. The CLI prints that sentence and exits non-zero; anything else is a bug.

Advice names an option the way the caller spells it: a message built with :func:`spelled` reads
``overwrite=True`` in Python (``str(error)``) and ``--force`` where the ``normswap`` command prints it
(:meth:`NormswapError.for_command_line`).

>>> error = OutputError(f"out.safetensors already exists: pass {spelled('overwrite=True', '--force')} to replace it")
>>> str(error)
'out.safetensors already exists: pass overwrite=True to replace it'
>>> error.for_command_line()
'out.safetensors already exists: pass --force to replace it'
"""

from __future__ import annotations

import re

_SPELLED = re.compile("\x00([^\x00\x01\x02]*)\x01([^\x00\x01\x02]*)\x02")


def spelled(python: str, command_line: str) -> str:
    """An option named in an error message: ``python`` (``key=``) for Python callers, ``command_line``
    (``--key``) where the command line prints the error. Use it inside the message's f-string."""
    return f"\x00{python}\x01{command_line}\x02"


class NormswapError(Exception):
    """Base class of every error normswap raises for a problem in the user's input."""

    def __str__(self) -> str:
        return _SPELLED.sub(r"\1", super().__str__())

    def for_command_line(self) -> str:
        """The message with options spelled as on the command line (``--force`` rather than ``overwrite=True``)."""
        return _SPELLED.sub(r"\2", super().__str__())


class PlanError(NormswapError):
    """A conversion cannot be planned or applied (indivisible channels, unknown layer class, ...)."""


class CheckpointError(NormswapError):
    """A checkpoint cannot be read, or does not fit the architecture."""


class ArchitectureError(NormswapError):
    """An architecture spec cannot be resolved or built."""


class OutputError(NormswapError):
    """An output file cannot be written (it exists, or its folder is not writable)."""


class CalibrationError(NormswapError):
    """Calibration data is missing, malformed, or gives non-finite statistics."""


class RefineError(NormswapError):
    """Refinement cannot run as asked (an invalid option, models that do not fit together, a diverging loss)."""


def shown(text: str) -> str:
    """``text`` as it may be printed in a one-line message: unchanged if every character is printable, else with
    control and other unprintable characters escaped as ``repr`` writes them.

    >>> shown("layer1.0"), shown("a\\nerror: forged")
    ('layer1.0', 'a\\\\nerror: forged')
    """
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


def byte_size(count: float) -> str:
    """``count`` bytes for a reader, in decimal units (the one way every message writes a size).

    >>> byte_size(512), byte_size(26_000), byte_size(3_141_592), byte_size(12.4e9), byte_size(2.5e13)
    ('512 B', '26.0 kB', '3.1 MB', '12.4 GB', '25.0 TB')
    """
    value = float(count)
    if abs(value) < 1000:
        return f"{value:.0f} B"
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if abs(value) < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} TB"
