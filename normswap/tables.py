"""Text tables: the one way normswap's reports (plan, fold, fit, compare, inspect, the demo) lay out their rows.

Columns are left-aligned, two spaces apart, each as wide as its widest cell; trailing spaces are dropped. A cell
that is not printable text (a layer name read from a file with a control character or an escape sequence in it) is
shown escaped (:func:`normswap.errors.shown`, as in messages), so that a table never moves the terminal's cursor or
changes its colours.

Example::

    >>> print(text_table(("layer", "C"), [("conv1.bn", "64"), ("fc", "-")]))
    layer     C
    conv1.bn  64
    fc        -
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import shown

__all__ = ["text_table"]


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """The header and rows (sequences of strings, as long as the header) as aligned lines of text."""
    lines = [[shown(str(cell)) for cell in row] for row in [header, *rows]]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
