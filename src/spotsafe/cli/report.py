"""``spotsafe report``: the run report as a terminal table or JSON (figures: :mod:`spotsafe.telemetry.report`,
rows: :mod:`spotsafe.telemetry.rows`); this module only reads the run and prints."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from spotsafe.cli.output import print_json
from spotsafe.errors import ConfigError
from spotsafe.storage.inventory import RunFolder
from spotsafe.supervisor.store import AttemptRecord, read_store
from spotsafe.telemetry.plot import draw, plot_format
from spotsafe.telemetry.report import Report, report_of
from spotsafe.telemetry.rows import ATTEMPT_COLUMNS, attempt_rows, report_rows
from spotsafe.telemetry.runmodel import RunModel
from spotsafe.telemetry.store import read_run_events
from spotsafe.telemetry.timeline import timeline_of


def store_attempts(store: Path | None, url: str) -> tuple[str | None, list[AttemptRecord]]:
    """The job in ``store`` whose checkpoint URL is ``url``, and its attempts (none when there is no store).
    The store is only read."""
    if store is None:
        return None, []
    for job, attempts in read_store(store):
        if _same_place(job.url, url):
            return job.name, attempts
    return None, []


def _same_place(a: str, b: str) -> bool:
    """Two run URLs name the same place (local paths compared absolute)."""

    def norm(url: str) -> str:
        return url.rstrip("/") if "://" in url else os.path.abspath(url)

    return norm(a) == norm(b)


def report(
    run: RunFolder,
    *,
    store: Path | None,
    as_json: bool,
    on_demand_price: float | None,
    console: Console,
    plot: Path | None = None,
) -> int:
    """Print the report of ``run`` (and draw its timeline into ``plot``). Exit 0 (1 when the run has no
    events at all)."""
    fmt = plot_format(plot) if plot is not None else None
    now = time.time()
    model = RunModel.fold(read_run_events(run.storage), now=now)
    built = report_of(run.url, model, on_demand_price=on_demand_price)
    job, attempts = store_attempts(store, run.url)
    if not built.attempts and not as_json:
        console.print(f"no events in {run.shown}: is it a spotsafe run (a folder with events.jsonl)?")
        return 1
    if plot is not None and built.attempts:
        try:
            draw(timeline_of(run.shown, model, built), built, plot, fmt)
        except OSError as err:
            raise ConfigError(f"cannot write the plot to {plot}: {err.strerror or err}") from None
        print(f"timeline written to {plot}", file=sys.stderr)
    if as_json:
        doc: dict[str, Any] = built.to_json()
        doc["job"] = job
        doc["store_attempts"] = [asdict(a) for a in attempts]
        print_json(doc)
        return 0 if built.attempts else 1
    print_report(built, job, attempts, console)
    return 0


def print_report(r: Report, job: str | None, attempts: list[AttemptRecord], console: Console) -> None:
    table = Table(title=f"spotsafe report: {r.run}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, text in report_rows(r, job, attempts):
        table.add_row(label, text)
    console.print(table)
    if attempts:
        rows = Table(title="attempts (job store)", title_justify="left")
        for name in ATTEMPT_COLUMNS:
            rows.add_column(name)
        for row in attempt_rows(attempts):
            rows.add_row(*row)
        console.print(rows)
