"""The ``spotsafe`` command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from spotsafe import __version__
from spotsafe.cli.demo import DemoSummary, default_command, run_demo
from spotsafe.errors import CorruptCheckpointError, SpotsafeError
from spotsafe.exit_codes import EXIT_USAGE
from spotsafe.storage.local import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.chaos import DEFAULT_MODES, KillMode
from spotsafe.supervisor.process import describe_exit

console = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spotsafe")
def cli() -> None:
    """spotsafe: training jobs that survive spot and preemptible instances."""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
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
        "checkpoints committed", f"{s.checkpoints_committed} ({s.emergency_saves} emergency saves on SIGTERM)"
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


@cli.command("ls")
@click.argument("url")
def ls(url: str) -> None:
    """List the checkpoints at URL (a run folder), newest first, with a cheap integrity check."""
    repo = CheckpointRepository(open_storage(url))
    table = Table(title=f"checkpoints in {url}")
    for col in ("step", "name", "bytes", "state"):
        table.add_column(col)
    for ref in repo.folders():
        if not repo.is_committed(ref):
            table.add_row(str(ref.step), ref.name, "-", "[yellow]uncommitted (leftover)[/yellow]")
            continue
        try:
            manifest = repo.check_sizes(ref)
            table.add_row(str(ref.step), ref.name, f"{manifest.total_bytes:,}", "committed")
        except CorruptCheckpointError as err:
            table.add_row(str(ref.step), ref.name, "-", f"[red]damaged: {err}[/red]")
    console.print(table)


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(EXIT_USAGE)
    except SpotsafeError as err:
        console.print(f"[red]error:[/red] {err}")
        sys.exit(EXIT_USAGE)
    except SystemExit:
        raise
