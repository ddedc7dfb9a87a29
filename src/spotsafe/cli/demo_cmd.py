"""``spotsafe demo``: its options and the summary table (the demo itself is :mod:`spotsafe.cli.demo`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from spotsafe.cli.demo import DemoSummary, default_command, run_demo
from spotsafe.cli.output import console
from spotsafe.supervisor.chaos import DEFAULT_MODES, KillMode
from spotsafe.supervisor.process import describe_exit


@click.command("demo", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("spotsafe-demo"),
    show_default=True,
    help="Folder for both runs (emptied first).",
)
@click.option(
    "--kills",
    type=click.IntRange(0, 100),
    default=len(DEFAULT_MODES),
    show_default=True,
    help="How many times to interrupt the job.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for kill timing.")
@click.option(
    "--max-delay",
    type=float,
    default=3.0,
    show_default=True,
    help="Longest wait (s) after the job's first step before a random-moment kill.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def demo(workdir: Path, kills: int, seed: int, max_delay: float, command: tuple[str, ...]) -> None:
    """Run a job uninterrupted, then again while killing it repeatedly, and compare the results bit for bit.

    COMMAND defaults to the tiny transformer example (run from the repository root). A custom
    command must use spotsafe's Checkpointer with the location from $SPOTSAFE_CHECKPOINT_URL.

    Exits 0 only if the final states are bit-identical and every interruption behaved as expected.
    """
    cmd = list(command) if command else default_command()
    if not command and not Path("examples/tiny_lm.py").is_file():
        raise click.UsageError("examples/tiny_lm.py not found: run from the repository root, or give a command")
    modes = [DEFAULT_MODES[i % len(DEFAULT_MODES)] for i in range(kills)]
    summary = run_demo(
        cmd, workdir, modes=modes, seed=seed, max_delay=max_delay, log=lambda m: console.print(f"[dim]{m}[/dim]")
    )
    print_summary(summary)
    sys.exit(0 if summary.identical and summary.chaos.ok else 1)


def print_summary(s: DemoSummary) -> None:
    """The demo's result as a table on stdout, then any problem and a failed final attempt."""
    kinds: dict[KillMode, int] = {}
    for i in s.chaos.interruptions:
        kinds[i.mode] = kinds.get(i.mode, 0) + 1
    table = Table(title="spotsafe demo", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row(
        "interruptions", f"{len(s.chaos.interruptions)} (" + ", ".join(f"{n} {m.value}" for m, n in kinds.items()) + ")"
    )
    table.add_row("  landed mid-save", str(sum(i.in_save for i in s.chaos.interruptions)))
    table.add_row("attempts", str(s.chaos.attempts))
    table.add_row(
        "checkpoints committed", f"{s.checkpoints_committed} ({s.emergency_saves} emergency saves on a notice)"
    )
    table.add_row("partial saves cleaned up", str(s.partial_saves_removed))
    table.add_row("corrupt checkpoints skipped", str(s.fallbacks))
    table.add_row("steps replayed", str(s.steps_replayed))
    table.add_row("final step", f"reference {s.final_step_reference}, interrupted {s.final_step_interrupted}")
    table.add_row("wall time", f"reference {s.reference_seconds:.1f} s, interrupted {s.interrupted_seconds:.1f} s")
    for name, diffs in s.component_diffs.items():
        table.add_row(f"  {name}", "[green]identical[/green]" if not diffs else f"[red]DIFFERENT[/red]: {diffs[0]}")
    verdict = "[green]bit-identical to the uninterrupted run[/green]" if s.identical else "[red]NOT identical[/red]"
    table.add_row("result", verdict)
    console.print(table)
    for problem in s.chaos.problems:
        console.print(f"[red]problem:[/red] {problem}")
    if s.chaos.final_exit is not None and s.chaos.final_exit != 0:
        console.print(f"[red]the final attempt ended with {describe_exit(s.chaos.final_exit)}[/red]")


COMMANDS = (demo,)
"""What this module adds to the ``spotsafe`` group."""
