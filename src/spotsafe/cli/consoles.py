"""The consoles the command line prints its tables on.

On a terminal rich fits a table to the terminal's width. Written to a file or a pipe (``spotsafe ls --verify |
cat``) there is no width to fit: rich would assume 80 columns (or ``$COLUMNS``) and squeeze the columns that
may wrap to nothing, dropping a checkpoint's status and step. There a console is as wide as its lines need,
so every column is shown in full, one row per line.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

PIPED_WIDTH = 1000
"""Columns of a console whose output is no terminal: wide enough for any row of the CLI's tables (a table is
only as wide as its content, so nothing is padded to it)."""


def console(*, stderr: bool = False, **options: Any) -> Console:
    """A rich console on stdout (or ``stderr``), at least :data:`PIPED_WIDTH` wide when that is no terminal."""
    made = Console(stderr=stderr, **options)
    if not made.is_terminal and "width" not in options:
        made.width = max(made.width, PIPED_WIDTH)
    return made
