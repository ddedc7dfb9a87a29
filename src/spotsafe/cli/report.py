"""``spotsafe report``: the run report as a terminal table or JSON (see :mod:`spotsafe.telemetry.report`)."""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from spotsafe.cli.manage import Run, _print_json, human_bytes
from spotsafe.supervisor.store import AttemptRecord, JobStore
from spotsafe.telemetry.report import Report, Spread, build_report
from spotsafe.telemetry.store import read_run_events


def store_attempts(store: Path | None, url: str) -> tuple[str | None, list[AttemptRecord]]:
    """The job in ``store`` whose checkpoint URL is ``url``, and its attempts (none when there is no store)."""
    if store is None or not store.exists():
        return None, []
    with JobStore(store) as db:
        for job in db.jobs():
            if _same_place(job.url, url):
                return job.name, db.attempts(job.name)
    return None, []


def _same_place(a: str, b: str) -> bool:
    """Two run URLs name the same place (local paths compared absolute)."""

    def norm(url: str) -> str:
        return url.rstrip("/") if "://" in url else os.path.abspath(url)

    return norm(a) == norm(b)


def report(run: Run, *, store: Path | None, as_json: bool, on_demand_price: float | None, console: Console) -> int:
    """Print the report of ``run``. Exit 0 (1 when the run has no events at all)."""
    built = build_report(run.url, read_run_events(run.storage), on_demand_price=on_demand_price, now=time.time())
    job, attempts = store_attempts(store, run.url)
    if as_json:
        doc: dict[str, Any] = built.to_json()
        doc["job"] = job
        doc["store_attempts"] = [asdict(a) for a in attempts]
        _print_json(doc)
        return 0 if built.attempts else 1
    if not built.attempts:
        console.print(f"no events in {run.shown}: is it a spotsafe run (a folder with events.jsonl)?")
        return 1
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


def print_report(r: Report, job: str | None, attempts: list[AttemptRecord], console: Console) -> None:
    table = Table(title=f"spotsafe report: {r.run}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    since = dt.datetime.fromtimestamp(r.first_event or 0, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    table.add_row("state", f"{r.state}, final step {r.final_step}, since {since} ({_s(r.wall_seconds)})")
    table.add_row("attempts", f"{r.attempts}" + (f" (job {job}: {len(attempts)} in the store)" if job else ""))
    sources = ", ".join(f"{n} {s}" for s, n in sorted(r.interruptions_by_source.items())) or "none"
    drill = f"; {r.drill_interruptions} delivered by a drill's emulated market" if r.drill_interruptions else ""
    table.add_row("interruptions", f"{r.interruptions} ({sources}{drill})")
    rate = f"{r.resume_rate:.0%}" if r.resume_rate is not None else "-"
    table.add_row("resumed from a checkpoint", f"{r.resumed} of {r.restarts} restarts ({rate})")
    table.add_row("replayed per interruption", f"steps: {_mean_worst(r.replayed_steps, 'n')}; "
                  f"time: {_mean_worst(r.replayed_seconds, 's')}")  # fmt: skip
    table.add_row("time to recover", _spread(r.recover_seconds))
    table.add_row("checkpoints", f"{r.checkpoints} ({r.emergency_checkpoints} on a notice)")
    table.add_row("  stall", _spread(r.stall_seconds))
    table.add_row("  write", _spread(r.write_seconds))
    table.add_row("  size", _spread(r.checkpoint_bytes, "B"))
    table.add_row("  written", _spread(r.written_bytes, "B"))
    goodput = f"{r.goodput:.0%}" if r.goodput is not None else "-"
    table.add_row("goodput", f"{goodput} (useful {_s(r.useful_seconds)} of {_s(r.wall_seconds)})")
    if r.cost is not None:
        line = f"${r.cost:.4f} spent"
        if r.on_demand_cost is not None and r.saved is not None:
            line += (
                f"; the same work on demand ${r.on_demand_cost:.4f} (at ${r.on_demand_price:g}/h): ${r.saved:.4f} saved"
            )
        table.add_row("cost", line)
    elif r.on_demand_cost is not None:
        table.add_row("cost", f"not recorded (run under spotsafe run); on demand ${r.on_demand_cost:.4f}")
    for choice in r.intervals[-5:]:
        table.add_row("  interval", choice.reason)
    console.print(table)
    if attempts:
        rows = Table(title="attempts (job store)", title_justify="left")
        for name in ("#", "pool", "machine", "exit", "steps", "duration", "cost"):
            rows.add_column(name)
        i = 0
        while i < len(attempts):
            a = attempts[i]
            j = i
            while (
                a.exit_class == "no_capacity" and j + 1 < len(attempts) and attempts[j + 1].exit_class == a.exit_class
            ):
                j += 1  # a wait for capacity: one row
            number = str(a.number) if j == i else f"{a.number}-{attempts[j].number}"
            end = attempts[j].ended
            duration = _s((end - a.started) if end is not None else None)
            cost = f"${sum(x.cost or 0.0 for x in attempts[i : j + 1]):.4f}" if a.cost is not None else "-"
            exit_class = a.exit_class or "running"
            if j > i:
                exit_class += f" x{j - i + 1}"
            rows.add_row(number, a.pool, a.machine or "-", exit_class, f"{a.step_before} -> {a.step_after}",
                         duration, cost)  # fmt: skip
            i = j + 1
        console.print(rows)
