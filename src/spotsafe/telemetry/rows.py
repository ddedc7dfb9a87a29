"""The run report as rows of text: what ``spotsafe report`` prints and the dashboard shows, in one place.

:func:`report_rows` gives the report's figures as ``(label, text)``; :func:`attempt_rows` the job store's
attempts under :data:`ATTEMPT_COLUMNS`. Nothing here reads events: the figures come from the
:class:`~spotsafe.telemetry.report.Report`, the attempts from the supervisor's job store.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol

from spotsafe.telemetry.report import Report, Spread
from spotsafe.telemetry.runrecords import NO_CAPACITY, Breakdown

ATTEMPT_COLUMNS = ("#", "pool", "machine", "exit", "steps", "duration", "cost")


class StoredAttempt(Protocol):
    """One attempt as the supervisor's job store keeps it (``spotsafe.supervisor.store.AttemptRecord``)."""

    @property
    def number(self) -> int: ...
    @property
    def pool(self) -> str: ...
    @property
    def machine(self) -> str | None: ...
    @property
    def started(self) -> float: ...
    @property
    def ended(self) -> float | None: ...
    @property
    def exit_class(self) -> str | None: ...
    @property
    def step_before(self) -> int | None: ...
    @property
    def step_after(self) -> int | None: ...
    @property
    def cost(self) -> float | None: ...


def human_bytes(n: int | None) -> str:
    """``n`` bytes for people: ``512 B``, ``1.5 MiB`` (``-`` for none)."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}"


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


def report_rows(r: Report, job: str | None, attempts: Sequence[StoredAttempt]) -> list[tuple[str, str]]:
    """The report's figures as (label, text) rows: the terminal table and the dashboard show the same."""
    rows: list[tuple[str, str]] = []
    since = dt.datetime.fromtimestamp(r.first_event or 0, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    unit = r.unit
    final = f"final step {r.final_step}" if unit == "step" else f"{r.final_step} items done"
    rows.append(("state", f"{r.state}, {final}, since {since} ({_s(r.wall_seconds)})"))
    rows.append(("attempts", f"{r.attempts}" + (f" (job {job}: {len(attempts)} in the store)" if job else "")))
    sources = ", ".join(f"{n} {s}" for s, n in sorted(r.interruptions_by_source.items())) or "none"
    drill = f"; {r.drill_interruptions} delivered by a drill's emulated market" if r.drill_interruptions else ""
    rows.append(("interruptions", f"{r.interruptions} ({sources}{drill})"))
    rate = f"{r.resume_rate:.0%}" if r.resume_rate is not None else "-"
    rows.append(("resumed from a checkpoint", f"{r.resumed} of {r.restarts} restarts ({rate})"))
    label = "replayed per interruption" if unit == "step" else "items redone per interruption"
    rows.append((label, f"{unit}s: {_mean_worst(r.replayed_steps, 'n')}; "
                 f"time: {_mean_worst(r.replayed_seconds, 's')}"))  # fmt: skip
    rows.append(("time to recover", _spread(r.recover_seconds)))
    saves = "checkpoints" if unit == "step" else "shards committed"
    rows.append((saves, f"{r.checkpoints} ({r.emergency_checkpoints} on a notice)"))
    rows.append(("  stall", _spread(r.stall_seconds)))
    rows.append(("  write", _spread(r.write_seconds)))
    rows.append(("  size", _spread(r.checkpoint_bytes, "B")))
    rows.append(("  written", _spread(r.written_bytes, "B")))
    if unit == "item" and r.final_step and r.useful_seconds > 0:
        rows.append(("throughput", f"{r.final_step / r.useful_seconds:.1f} items/s of useful time"))
    goodput = f"{r.goodput:.0%}" if r.goodput is not None else "-"
    line = f"{goodput} (useful {_s(r.useful_seconds)} of {_s(r.wall_seconds)})"
    b = r.breakdown
    if b is not None and b.wall > 0:
        if b.goodput_controlled is not None:
            line += f"; {b.goodput_controlled:.0%} leaving out start-up and waiting for capacity"
        rows.append(("goodput", line))
        rows.append(("  where the time went", breakdown_text(b)))
        rows.append(("  spotsafe's own losses", f"{b.controlled / b.wall:.1%} of wall time (stalls, restore, replay)"))
    else:
        rows.append(("goodput", line))
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


def breakdown_text(b: Breakdown) -> str:
    """The split of the wall time for people: ``useful 50.0 s (57%), replayed 2.0 s (2%), ...`` (no empty parts)."""
    return ", ".join(f"{name} {_s(seconds)} ({seconds / b.wall:.0%})" for name, seconds in b.parts() if seconds > 0)


def attempt_rows(attempts: Sequence[StoredAttempt]) -> list[tuple[str, ...]]:
    """The job store's attempts as table rows (a run of waits for capacity is one row)."""
    rows: list[tuple[str, ...]] = []
    i = 0
    while i < len(attempts):
        a = attempts[i]
        j = i
        while a.exit_class == NO_CAPACITY and j + 1 < len(attempts) and attempts[j + 1].exit_class == a.exit_class:
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
