"""The errors a user can cause.

Every failure that the user can fix (a bad file, a wrong architecture, an indivisible channel count, an empty
loader...) raises :class:`NormswapError` or one of its subclasses, with one sentence that says what is wrong and,
where it helps, what to do. The CLI prints that sentence and exits non-zero; anything else is a bug.
"""

from __future__ import annotations


class NormswapError(Exception):
    """Base class of every error normswap raises for a problem in the user's input."""


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
