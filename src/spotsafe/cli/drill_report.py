"""The terminal report of ``spotsafe drill``."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spotsafe.supervisor.drill import DrillReport
from spotsafe.telemetry.rows import breakdown_text


def print_drill(r: DrillReport, console: Console) -> None:
    table = Table(title="spotsafe drill", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("market", escape(r.schedule))
    if r.mode == "kill":
        how = "kill: SIGKILL at once, no notice"
    else:
        how = f"{r.mode}, {r.window_s:g} s window; {r.killed_at_window_end} outlived it and got SIGKILL"
    table.add_row(
        "interruptions",
        f"{r.interruptions} of running attempts ({how}); {r.interruptions_idle} more outages found no attempt "
        "running (between attempts, or one already stopping)",
    )
    classes = ", ".join(f"{n} {c}" for c, n in sorted(r.exit_classes.items()))
    table.add_row("attempts", f"{r.attempts} ({classes})")
    table.add_row(
        "checkpoints committed", f"{r.checkpoints_committed} ({r.emergency_saves} emergency saves on a notice)"
    )
    table.add_row("steps replayed", str(r.steps_replayed))
    table.add_row(
        "wall time",
        f"reference {r.reference_seconds:.1f} s{' (reused)' if r.reference_reused else ''}, "
        f"drill {r.drill_seconds:.1f} s (machines held {r.machine_seconds:.1f} s)",
    )
    table.add_row("goodput", f"{r.goodput:.0%} (useful time / total time)")
    b = r.breakdown
    if b is not None and b.wall > 0:
        table.add_row("  where the time went", breakdown_text(b))
        table.add_row(
            "  spotsafe's own losses",
            f"{b.controlled / b.wall:.1%} of wall time (stalls, restore, replay)"
            + (
                f"; goodput {b.goodput_controlled:.0%} leaving out start-up and capacity"
                if b.goodput_controlled
                else ""
            ),
        )
    table.add_row(
        "cost",
        f"spot ${r.spot_cost:.4f} (at ${r.spot_price:g}/h, machine time) vs on-demand ${r.on_demand_cost:.4f} "
        f"(at ${r.on_demand_price:g}/h, uninterrupted): {r.saving:.0%} saved",
    )
    if r.node_counts:
        counts = ", ".join(map(str, r.node_counts))
        table.add_row("nodes", f"reference {r.nodes}; drill attempts on {counts} (in order)")
    table.add_row("final step", f"reference {r.final_step_reference}, drill {r.final_step_drill}")
    for name, diffs in r.component_diffs.items():
        table.add_row(f"  {name}", "[green]identical[/green]" if not diffs else f"[red]DIFFERENT[/red]: {diffs[0]}")
    if r.exit_code != 0:
        table.add_row("job", f"[red]{r.job_state} (supervisor exit {r.exit_code})[/red]")
    verdict = "[green]bit-identical to the uninterrupted run[/green]" if r.identical else "[red]NOT identical[/red]"
    if r.resized and not r.identical:
        verdict = (
            f"[{'green' if r.ok else 'red'}]{'finished' if r.ok else 'did not finish'} at the reference's final "
            "step[/]; not bit-identical, as expected: part of the run had fewer nodes, another world size (each "
            "batch split another way, gradients summed in another order); bit-identity holds at a fixed size"
        )
    table.add_row("result", verdict)
    console.print(table)
