"""Where and how the run-management commands print.

Output rules, shared by every command:

* tables and reports go to stdout (:data:`out`); progress bars and notes go to stderr (:data:`err`), bars only
  when stderr is a terminal (or ``--progress`` forces them), so ``--json`` output and redirected output stay
  clean;
* every URL shown goes through :func:`~spotsafe.storage.errors.redact_url` and every error message through the
  command's :class:`~spotsafe.storage.redactor.Redactor` (which also knows the secrets of the URL and the
  ``--storage-option`` values given on this command line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from spotsafe.cli.consoles import console as make_console
from spotsafe.cli.live import bar_console
from spotsafe.exit_codes import EXIT_CRASH, EXIT_USAGE
from spotsafe.telemetry.rows import human_bytes as human_bytes  # the report's, for every table

EXIT_DAMAGED = EXIT_CRASH
"""Exit code when a command found damage (1)."""
EXIT_NOTHING = EXIT_USAGE
"""Exit code when nothing matched the selection (2)."""

out = make_console(highlight=False, soft_wrap=True)  # every column in full when piped (see cli.consoles)
"""Tables and reports of ``ls``, ``verify``, ``inspect``, ``gc``."""
err = make_console(stderr=True, highlight=False, soft_wrap=True)
"""Bars, notes and errors."""
console = make_console()
"""What ``run``, ``drill``, ``demo``, ``report``, ``dashboard`` and ``notices`` print on stdout."""


@dataclass(frozen=True)
class Bars:
    """Progress bars on stderr: shown when stderr is a terminal, or as ``--progress/--no-progress`` forces."""

    forced: bool | None = None

    def _console(self) -> Console | None:
        """Where bars go: stderr when it is a terminal, stderr anyway when forced, else nowhere."""
        return bar_console(self.forced, err)

    def bar(self, *, count: bool = False) -> Progress:
        """A transient bar: of bytes (size, speed), or with ``count`` of items done out of all."""
        console = self._console()
        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        if count:
            columns.append(MofNCompleteColumn())
        else:
            columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        columns.append(TimeRemainingColumn())
        return Progress(*columns, console=console or err, disable=console is None, transient=True)


def utc_iso(seconds: float) -> str:
    """Unix time as ``2026-01-02T03:04:05Z``."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def print_json(doc: Any) -> None:
    """``doc`` as indented JSON on stdout (no NaN or infinity: they are not JSON)."""
    click.echo(json.dumps(doc, indent=2, allow_nan=False))
