"""``spotsafe report``: the run report as a terminal table or JSON (see :mod:`spotsafe.telemetry.report`)."""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from spotsafe.cli.manage import Run, _print_json, human_bytes
from spotsafe.errors import ConfigError
from spotsafe.supervisor.store import AttemptRecord, read_store
from spotsafe.telemetry.plot import draw, plot_format
from spotsafe.telemetry.report import Report, Spread, build_report
from spotsafe.telemetry.store import read_run_events
from spotsafe.telemetry.timeline import build_timeline


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
    run: Run,
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
    events = list(read_run_events(run.storage))
    built = build_report(run.url, events, on_demand_price=on_demand_price, now=now)
    job, attempts = store_attempts(store, run.url)
    if not built.attempts and not as_json:
        console.print(f"no events in {run.shown}: is it a spotsafe run (a folder with events.jsonl)?")
        return 1
    if plot is not None and built.attempts:
        try:
            draw(build_timeline(run.shown, events, built, now=now), built, plot, fmt)
        except OSError as err:
            raise ConfigError(f"cannot write the plot to {plot}: {err.strerror or err}") from None
        print(f"timeline written to {plot}", file=sys.stderr)
    if as_json:
        doc: dict[str, Any] = built.to_json()
        doc["job"] = job
        doc["store_attempts"] = [asdict(a) for a in attempts]
        _print_json(doc)
        return 0 if built.attempts else 1
    print_report(built, job, attempts, console)
    return 0


def _s(value: float | None, unit: str = "s") -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
    return f"{value:.0f}"


def _spread(spread: Spread, unit: str = "s") -> str:
    if not spread.count:
        return "none"
    if unit == "B":
        return (
            f"median {human_bytes(int(spread.median or 0))}, p95 {human_bytes(int(spread.p95 or 0))}, "
            f"max {human_bytes(int(spread.max or 0))} ({spread.count})"
        )
    return f"median {_s(spread.median, unit)}, p95 {_s(spread.p95, unit)}, max {_s(spread.max, unit)} ({spread.count})"


def _mean_worst(spread: Spread, unit: str) -> str:
    if not spread.count:
        return "none"
    return f"mean {_s(spread.mean, unit)}, worst {_s(spread.max, unit)}"


def report_rows(r: Report, job: str | None, attempts: list[AttemptRecord]) -> list[tuple[str, str]]:
    """The report's figures as (label, text) rows: the terminal table and the dashboard show the same."""
    rows: list[tuple[str, str]] = []
    since = dt.datetime.fromtimestamp(r.first_event or 0, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    rows.append(("state", f"{r.state}, final step {r.final_step}, since {since} ({_s(r.wall_seconds)})"))
    rows.append(("attempts", f"{r.attempts}" + (f" (job {job}: {len(attempts)} in the store)" if job else "")))
    sources = ", ".join(f"{n} {s}" for s, n in sorted(r.interruptions_by_source.items())) or "none"
    drill = f"; {r.drill_interruptions} delivered by a drill's emulated market" if r.drill_interruptions else ""
    rows.append(("interruptions", f"{r.interruptions} ({sources}{drill})"))
    rate = f"{r.resume_rate:.0%}" if r.resume_rate is not None else "-"
    rows.append(("resumed from a checkpoint", f"{r.resumed} of {r.restarts} restarts ({rate})"))
    rows.append(("replayed per interruption", f"steps: {_mean_worst(r.replayed_steps, 'n')}; "
                 f"time: {_mean_worst(r.replayed_seconds, 's')}"))  # fmt: skip
    rows.append(("time to recover", _spread(r.recover_seconds)))
    rows.append(("checkpoints", f"{r.checkpoints} ({r.emergency_checkpoints} on a notice)"))
    rows.append(("  stall", _spread(r.stall_seconds)))
    rows.append(("  write", _spread(r.write_seconds)))
    rows.append(("  size", _spread(r.checkpoint_bytes, "B")))
    rows.append(("  written", _spread(r.written_bytes, "B")))
    goodput = f"{r.goodput:.0%}" if r.goodput is not None else "-"
    rows.append(("goodput", f"{goodput} (useful {_s(r.useful_seconds)} of {_s(r.wall_seconds)})"))
    if r.cost is not None:
        line = f"${r.cost:.4f} spent"
        if r.on_demand_cost is not None and r.saved is not None:
            line += (
                f"; the same work on demand ${r.on_demand_cost:.4f} (at ${r.on_demand_price:g}/h): ${r.saved:.4f} saved"
            )
        rows.append(("cost", line))
    elif r.on_demand_cost is not None:
        rows.append(("cost", f"not recorded (run under spotsafe run); on demand ${r.on_demand_cost:.4f}"))
    for choice in r.intervals[-5:]:
        rows.append(("  interval", choice.reason))
    return rows


ATTEMPT_COLUMNS = ("#", "pool", "machine", "exit", "steps", "duration", "cost")


def attempt_rows(attempts: list[AttemptRecord]) -> list[tuple[str, ...]]:
    """The job store's attempts as table rows (a run of waits for capacity is one row)."""
    rows: list[tuple[str, ...]] = []
    i = 0
    while i < len(attempts):
        a = attempts[i]
        j = i
        while a.exit_class == "no_capacity" and j + 1 < len(attempts) and attempts[j + 1].exit_class == a.exit_class:
            j += 1  # a wait for capacity: one row
        number = str(a.number) if j == i else f"{a.number}-{attempts[j].number}"
        end = attempts[j].ended
        duration = _s((end - a.started) if end is not None else None)
        cost = f"${sum(x.cost or 0.0 for x in attempts[i : j + 1]):.4f}" if a.cost is not None else "-"
        exit_class = a.exit_class or "running"
        if j > i:
            exit_class += f" x{j - i + 1}"
        steps = f"{a.step_before} -> {a.step_after}"
        rows.append((number, a.pool, a.machine or "-", exit_class, steps, duration, cost))
        i = j + 1
    return rows


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
