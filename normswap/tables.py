"""Text tables: the one way normswap's reports (plan, fold, fit, compare, inspect, the demo) lay out their rows.

Columns are left-aligned, two spaces apart, each as wide as its widest cell; trailing spaces are dropped. A cell
that is not printable text (a layer name read from a file with a control character or an escape sequence in it) is
shown escaped, so that a table never moves the terminal's cursor or changes its colours.

Example::

    >>> print(text_table(("layer", "C"), [("conv1.bn", "64"), ("fc", "-")]))
    layer     C
    conv1.bn  64
    fc        -
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["printable", "text_table"]


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped (``\\x1b``, ``\\n``), else as it is.

    >>> printable("layer\\x1b[2J"), printable("été")
    ('layer\\\\x1b[2J', 'été')
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """The header and rows (sequences of strings, as long as the header) as aligned lines of text."""
    lines = [[printable(str(cell)) for cell in row] for row in [header, *rows]]
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)
