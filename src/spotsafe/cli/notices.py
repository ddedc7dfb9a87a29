"""``spotsafe notices``: which preemption notice sources apply on this machine, and a live watch of them.

Run it on the instance (or in the pod) where training will run: it shows what
auto-detection found and why, and with ``--watch`` it polls the real endpoints
and prints every notice and every endpoint problem as it happens, so that a
missing IMDS hop limit or a blocked metadata server shows up before a job
depends on it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spotsafe.cli.output import console as stdout_console
from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.notices.base import Describes, NoticeBoard, NoticeSource
from spotsafe.notices.detect import Detection, build_sources, detect


def _when(unix: float | None) -> str:
    if unix is None:
        return "unknown"
    return datetime.fromtimestamp(unix).astimezone().strftime("%H:%M:%S %Z")


def describe_sources(detection: Detection, sources: list[NoticeSource]) -> Table:
    table = Table(title="spotsafe notices", show_lines=False)
    table.add_column("source")
    table.add_column("why")
    table.add_column("watches")
    for source in sources:
        watches = source.describe() if isinstance(source, Describes) else source.name
        table.add_row(source.name, detection.reasons.get(source.name, "signals"), escape(watches))
    return table


def watch(
    sources: list[NoticeSource],
    console: Console,
    *,
    seconds: float | None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run the sources and print what they post until a stop notice arrives or ``seconds`` pass.

    Returns the number of stop notices seen (0 or 1).
    """
    board = NoticeBoard()
    started: list[NoticeSource] = []
    ends = None if seconds is None else clock() + seconds
    try:
        for source in sources:
            source.start(board)
            started.append(source)
        console.print("watching; Ctrl-C (itself a SIGINT notice) stops")
        while ends is None or clock() < ends:
            for report in board.reports():
                console.print(
                    f"[dim]{_when(report.time)}[/dim] {report.source}: {report.status}: {escape(report.message)}"
                )
            for notice in board.drain():
                console.print(
                    f"[bold]{_when(notice.received_at)}[/bold] {notice.kind} notice from {notice.source}"
                    f" ({escape(notice.detail or notice.source)}), deadline {_when(notice.deadline)}"
                )
            if board.pending():
                return 1
            sleep(0.2)
        return 0
    finally:
        for source in started:
            source.stop()


def run(watch_too: bool, seconds: float | None, console: Console) -> int:
    detection = detect()
    sources = build_sources(detection.names)
    console.print(describe_sources(detection, sources))
    if not watch_too:
        return 0
    return watch(sources, console, seconds=seconds)


@click.command("notices")
@click.option("--watch", "watch_too", is_flag=True, help="Run the sources and print notices as they arrive.")
@click.option(
    "--seconds", type=click.FloatRange(min=0, min_open=True), default=None, help="With --watch: stop after this long."
)
def notices(watch_too: bool, seconds: float | None) -> None:
    """Show the preemption notice sources spotsafe detects here (and why); --watch runs them.

    Detection reads only the environment and /sys (set $SPOTSAFE_NOTICES to choose by hand).
    With --watch, exits 0 when the time is up and 75 when a stop notice arrived.
    """
    stopped = run(watch_too, seconds, stdout_console)
    sys.exit(EXIT_PREEMPTED if stopped else 0)


COMMANDS = (notices,)
"""What this module adds to the ``spotsafe`` group."""
