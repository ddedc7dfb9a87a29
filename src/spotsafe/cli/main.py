"""The ``spotsafe`` command line."""

from __future__ import annotations

import io
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.markup import escape
from rich.table import Table

from spotsafe.version import __version__
from spotsafe.cli import manage
from spotsafe.cli.consoles import console as make_console
from spotsafe.cli.demo import DemoSummary, default_command, default_drill_command, run_demo
from spotsafe.errors import CorruptCheckpointError, SpotsafeError
from spotsafe.exit_codes import EXIT_CRASH, EXIT_USAGE
from spotsafe.supervisor.chaos import DEFAULT_MODES, KillMode
from spotsafe.supervisor.process import describe_exit

console = make_console()  # every column in full when piped (see cli.consoles)


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


F = TypeVar("F", bound=Callable[..., Any])


def run_options(fn: F) -> F:
    """The options every run-management command takes."""
    fn = click.option(
        "--progress/--no-progress",
        default=None,
        help="Force the progress bar on or off (default: shown when stderr is a terminal).",
    )(fn)
    fn = click.option(
        "--retry-budget",
        type=click.FloatRange(min=0),
        default=120.0,
        show_default=True,
        metavar="SECONDS",
        help="How long to keep retrying transient storage errors.",
    )(fn)
    fn = click.option(
        "--storage-option",
        "storage_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="Option for the storage backend (repeatable; VALUE is JSON when it parses, a dotted KEY nests).",
    )(fn)
    return fn


def _open(url: str, storage_options: tuple[str, ...], retry_budget: float, progress: bool | None) -> manage.Run:
    return manage.open_run(url, manage.parse_storage_options(storage_options), retry_budget, progress)


@cli.command("ls")
@click.argument("url")
@click.option("--verify", is_flag=True, help="Also read every blob and check its checksum (slow).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@run_options
def ls(
    url: str,
    verify: bool,
    as_json: bool,
    storage_options: tuple[str, ...],
    retry_budget: float,
    progress: bool | None,
) -> None:
    """List the checkpoint folders at URL (a run folder or s3://, gs://, az:// URL), newest first.

    Each committed checkpoint gets a cheap check (manifest and blob sizes); --verify checks every checksum.
    """
    run = _open(url, storage_options, retry_budget, progress)
    sys.exit(manage.ls(run, verify=verify, as_json=as_json))


@cli.command("verify")
@click.argument("url")
@click.option("--step", type=click.IntRange(min=0), default=None, help="Verify every committed checkpoint at step N.")
@click.option("--all", "every", is_flag=True, help="Verify every committed checkpoint.")
@run_options
def verify(
    url: str,
    step: int | None,
    every: bool,
    storage_options: tuple[str, ...],
    retry_budget: float,
    progress: bool | None,
) -> None:
    """Verify the size and checksum of every blob of checkpoints at URL (default: the newest committed one).

    Exits 0 if all are intact, 1 if any is damaged, 2 if no checkpoint matched.
    """
    if step is not None and every:
        raise click.UsageError("give --step or --all, not both")
    run = _open(url, storage_options, retry_budget, progress)
    sys.exit(manage.verify(run, step=step, every=every))


@cli.command("inspect")
@click.argument("url")
@click.option("--step", type=click.IntRange(min=0), default=None, help="The newest committed checkpoint at step N.")
@click.option("--name", default=None, help="The checkpoint folder NAME (as ls shows it).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@run_options
def inspect(
    url: str,
    step: int | None,
    name: str | None,
    as_json: bool,
    storage_options: tuple[str, ...],
    retry_budget: float,
    progress: bool | None,
) -> None:
    """Verify and load one checkpoint at URL (default: the newest committed one) and describe its contents.

    Exits 1 if it is damaged, 2 if no checkpoint matched.
    """
    if step is not None and name is not None:
        raise click.UsageError("give --step or --name, not both")
    run = _open(url, storage_options, retry_budget, progress)
    sys.exit(manage.inspect(run, step=step, name=name, as_json=as_json))


@cli.command("gc")
@click.argument("url")
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    required=True,
    help="Keep the newest N committed checkpoints (and always the newest intact one).",
)
@click.option("--apply", is_flag=True, help="Delete; without it, only show what would be deleted.")
@click.option(
    "--partial-older-than",
    type=click.FloatRange(min=0),
    default=3600.0,
    show_default=True,
    metavar="SECONDS",
    help="Delete uncommitted folders last written longer ago than this (younger ones may be saves in progress).",
)
@run_options
def gc(
    url: str,
    keep: int,
    apply: bool,
    partial_older_than: float,
    storage_options: tuple[str, ...],
    retry_budget: float,
    progress: bool | None,
) -> None:
    """Delete old checkpoints and stale uncommitted folders at URL. A dry run unless --apply is given."""
    run = _open(url, storage_options, retry_budget, progress)
    sys.exit(manage.gc(run, keep=keep, apply=apply, partial_older_than=partial_older_than))


@cli.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--job-file",
    "-f",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A job file (.toml or .yaml): command, checkpoint URL, criticality, deadline, pools. Options below win.",
)
@click.option("--name", default=None, help="Job name in the store (default: the last part of the URL).")
@click.option("--url", default=None, help="The job's checkpoint location (default: $SPOTSAFE_CHECKPOINT_URL).")
@click.option("--store", default=None, help="SQLite job store (default: $SPOTSAFE_JOB_STORE or .spotsafe/jobs.sqlite).")
@click.option(
    "--criticality",
    type=click.Choice(["critical", "standard", "opportunistic"]),
    default=None,
    help="Preset for budgets, failover and on-demand escalation (default: standard).",
)
@click.option("--deadline", default=None, help="Finish by this time (ISO 8601 with zone, e.g. 2026-11-24T18:00:00Z).")
@click.option("--total-steps", type=click.IntRange(min=1), default=None, help="Steps the job runs (for the deadline).")
@click.option("--max-preemptions", type=click.IntRange(min=0), default=None, help="[preset: 100]")
@click.option(
    "--max-errors",
    type=click.IntRange(min=0),
    default=None,
    help="Give up after this many failed attempts in a row without the checkpoint advancing. [preset: 3]",
)
@click.option("--backoff", type=click.FloatRange(min=0), default=None, help="First backoff (s). [preset: 1]")
@click.option("--max-backoff", type=click.FloatRange(min=0), default=None, help="[preset: 60]")
@click.option("--grace", type=click.FloatRange(min=0), default=None, help="SIGTERM to SIGKILL (s). [default: 30]")
@click.option(
    "--stall-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop an attempt that logs no event for this long (s), as no_progress.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve the supervisor's Prometheus metrics on this port (0: a free one).",
)
@click.option("--metrics-addr", default="0.0.0.0", show_default=True, help="Address for --metrics-port.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Force the live status line (phase, step, interruptions) on or off [default: when stderr is a terminal].",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run_cmd(
    job_file: Path | None,
    name: str | None,
    url: str | None,
    store: str | None,
    criticality: str | None,
    deadline: str | None,
    total_steps: int | None,
    max_preemptions: int | None,
    max_errors: int | None,
    backoff: float | None,
    max_backoff: float | None,
    grace: float | None,
    stall_timeout: float | None,
    metrics_port: int | None,
    metrics_addr: str,
    progress: bool | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND (or the job file's) and relaunch it until it succeeds or a retry budget ends it.

    Every exit is classified (succeeded, preempted, killed, out_of_memory, no_progress, crashed, usage,
    no_capacity); preemptions and errors have separate budgets, and an error counts only when the job's
    checkpoint did not advance. With a job file's pools, each attempt runs in the cheapest healthy spot pool;
    a pool that keeps getting reclaimed or has no capacity is left for a cool-down, and the job moves to
    on-demand when its projected finish passes the deadline. Jobs and attempts are kept in a SQLite store:
    run the same command again to continue a job after the supervisor itself was stopped.
    Exit: 0 succeeded, 1 failed, 2 usage, 75 stopped.
    """
    from spotsafe.cli.live import LiveStatus, follow_run
    from spotsafe.supervisor.jobfile import overlay, parse_job, read_job_doc
    from spotsafe.supervisor.run import run_config

    doc = read_job_doc(job_file) if job_file is not None else {}
    merged = overlay(
        doc,
        {
            "job": {
                "criticality": criticality,
                "deadline": deadline,
                "total_steps": total_steps,
                "grace_seconds": grace,
                "stall_timeout_seconds": stall_timeout,
            },
            "retry": {
                "max_preemptions": max_preemptions,
                "max_errors": max_errors,
                "backoff_seconds": backoff,
                "max_backoff_seconds": max_backoff,
            },
        },
    )
    spec = parse_job(merged, job_file or Path("spotsafe run"))
    if not command and not spec.command:
        raise click.UsageError("give the job's command after --, or a job file with [job] command")
    config = spec.config(command=command, name=name, url=url, store=store)
    live = LiveStatus.open(progress)
    if live is None:
        sys.exit(run_config(config, metrics_port=metrics_port, metrics_addr=metrics_addr))
    with live:
        line = follow_run(live, config)
        code = run_config(config, metrics_port=metrics_port, metrics_addr=metrics_addr)
        line.finish()
    sys.exit(code)


@cli.command("drill", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("spotsafe-drill"),
    show_default=True,
    help="Folder for the drill's run, job store and attempts.log (emptied first; the reference is kept).",
)
@click.option(
    "--reference",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The uninterrupted run's folder, reused when it holds a finished run of the same command "
    "[default: WORKDIR/reference].",
)
@click.option(
    "--trace",
    default=None,
    help="A shipped spot trace (aws-us-east-1c, aws-us-east-1f, aws-us-west-2b, aws-us-west-2c) or a trace file "
    "to replay [default: aws-us-west-2c, unless --rate].",
)
@click.option(
    "--trace-start",
    type=click.FloatRange(min=0),
    default=16.8,
    show_default=True,
    help="Where to begin (trace hours).",
)
@click.option(
    "--trace-reading",
    type=click.Choice(["available", "preempted"]),
    default="available",
    show_default=True,
    help="A trace value is the instances available (upstream README), or 1 means preempted.",
)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None, help="Interruptions per trace hour.")
@click.option(
    "--time-scale",
    type=click.FloatRange(min=0, min_open=True),
    default=120.0,
    show_default=True,
    help="Trace seconds per drill second.",
)
@click.option(
    "--notice",
    type=click.Choice(["aws", "azure", "gcp", "sigterm", "kill"]),
    default="aws",
    show_default=True,
    help="How each interruption is announced (kill: SIGKILL at once, no warning).",
)
@click.option(
    "--window",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds from the notice to SIGKILL (not with --notice kill).",
)
@click.option("--max-interruptions", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--spot-price", type=click.FloatRange(min=0), default=0.918, show_default=True, help="Dollars per hour.")
@click.option(
    "--on-demand-price", type=click.FloatRange(min=0), default=3.06, show_default=True, help="Dollars per hour."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --rate.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Force the live status lines (reference run, then the drill: phase, step, interruptions) on or off "
    "[default: when stderr is a terminal].",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def drill(
    workdir: Path,
    reference: Path | None,
    trace: str | None,
    trace_start: float,
    trace_reading: str,
    rate: float | None,
    time_scale: float,
    notice: str,
    window: float,
    max_interruptions: int,
    spot_price: float,
    on_demand_price: float,
    seed: int,
    as_json: bool,
    progress: bool | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND under an emulated spot market and prove the resumed result is bit-identical.

    Interruptions are replayed from a real preemption trace (time-scaled) or drawn at a rate; each is a
    notice on the emulated provider endpoint (or SIGTERM), then SIGKILL when the window ends (kill: SIGKILL at
    once). An interruption counts only when it stops a running attempt. The job runs
    under spotsafe run's supervisor. COMMAND defaults to the tiny transformer example (run from the
    repository root). Exits 0 only if the job finished and its final state is bit-identical to an
    uninterrupted run's.
    """
    from spotsafe.cli.drill_report import print_drill
    from spotsafe.cli.live import DrillLive, LiveStatus
    from spotsafe.supervisor.drill import DrillConfig, run_drill

    cmd = tuple(command) if command else tuple(default_drill_command())
    if not command and not Path("examples/tiny_lm.py").is_file():
        raise click.UsageError("examples/tiny_lm.py not found: run from the repository root, or give a command")
    config = DrillConfig(
        command=cmd,
        workdir=workdir,
        reference=reference,
        trace=None if rate is not None and trace is None else (trace or "aws-us-west-2c"),
        trace_start_s=trace_start * 3600.0,
        trace_reading=trace_reading,
        rate_per_hour=rate,
        time_scale=time_scale,
        mode=notice,
        window_s=window,
        max_interruptions=max_interruptions,
        spot_price=spot_price,
        on_demand_price=on_demand_price,
        seed=seed,
    )
    log: Callable[[str], None] = (
        (lambda m: print(m, file=sys.stderr)) if as_json else (lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
    )
    live = LiveStatus.open(progress)
    if live is None:
        report = run_drill(config, log=log)
    else:
        with live:  # the status and the log lines go to stderr; stdout gets only the report
            report = run_drill(
                config, log=lambda m: live.log(m, style=None if as_json else "dim"), watch=DrillLive(live)
            )
    if as_json:
        manage._print_json(report.to_json())
    else:
        print_drill(report, console)
    sys.exit(0 if report.ok else 1)


@cli.command("report")
@click.argument("url", required=False)
@click.option(
    "--store",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The job store to read attempts and costs from [default: $SPOTSAFE_JOB_STORE or .spotsafe/jobs.sqlite].",
)
@click.option("--on-demand-price", type=click.FloatRange(min=0), default=None, help="Dollars per hour, to compare.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    default=None,
    help="Also draw the run's timeline (attempts, interruptions, checkpoints, progress, cost) into FILE "
    "(.png, .svg or .pdf).",
)
@run_options
def report_cmd(
    url: str | None,
    store: Path | None,
    on_demand_price: float | None,
    as_json: bool,
    plot: Path | None,
    storage_options: tuple[str, ...],
    retry_budget: float,
    progress: bool | None,
) -> None:
    """What interruptions cost the run at URL (default: $SPOTSAFE_CHECKPOINT_URL), from its event log and job store.

    Attempts, interruptions by source, resume success rate, replayed work, checkpoint stall, write time and size,
    time to recover, goodput, cost against on-demand, and the interval policy's choices. Works on a running run.
    """
    import os

    from spotsafe.cli import report as report_cli

    url = url or os.environ.get("SPOTSAFE_CHECKPOINT_URL")
    if not url:
        raise click.UsageError("give the run's URL (or set $SPOTSAFE_CHECKPOINT_URL)")
    store = store or Path(os.environ.get("SPOTSAFE_JOB_STORE") or ".spotsafe/jobs.sqlite")
    if plot is not None:
        from spotsafe.telemetry.plot import plot_format

        plot_format(plot)  # a bad file name is the first thing said, before the run is opened
    run = _open(url, storage_options, retry_budget, progress)
    sys.exit(
        report_cli.report(
            run, store=store, as_json=as_json, on_demand_price=on_demand_price, console=console, plot=plot
        )
    )


@cli.command("dashboard")
@click.argument("locations", nargs=-1)
@click.option(
    "--store",
    "stores",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="A job store to list jobs from (repeatable) [default: $SPOTSAFE_JOB_STORE or .spotsafe/jobs.sqlite].",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: a free port.")
@click.option(
    "--addr",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. The pages show run locations and costs: keep it local, or put it behind a proxy.",
)
@click.option("--on-demand-price", type=click.FloatRange(min=0), default=None, help="Dollars per hour, to compare.")
@click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option for the storage backend of remote runs (repeatable; VALUE is JSON when it parses).",
)
def dashboard_cmd(
    locations: tuple[str, ...],
    stores: tuple[Path, ...],
    port: int,
    addr: str,
    on_demand_price: float | None,
    storage_options: tuple[str, ...],
) -> None:
    """Serve a web page of runs: per run, a timeline of attempts, interruptions and checkpoints, training
    progress and cost over time, and the report's figures. Read-only: it reads event logs and job stores.

    LOCATIONS are runs (folders or URLs) or local folders to search for runs (default: the current folder
    and $SPOTSAFE_CHECKPOINT_URL). Jobs in the job stores are listed too. Stop it with Ctrl-C.
    """
    import os
    import threading

    from spotsafe.dashboard.catalog import Catalog
    from spotsafe.dashboard.server import serve

    places = list(locations)
    if not places:
        places = ["."]
        if os.environ.get("SPOTSAFE_CHECKPOINT_URL"):
            places.append(os.environ["SPOTSAFE_CHECKPOINT_URL"])
    store_list = list(stores) or [Path(os.environ.get("SPOTSAFE_JOB_STORE") or ".spotsafe/jobs.sqlite")]
    catalog = Catalog(
        places,
        [s for s in store_list if s.exists() or stores],
        storage_options=manage.parse_storage_options(storage_options),
        on_demand_price=on_demand_price,
    )
    import signal

    stop = threading.Event()
    # Before anything says where it listens: a SIGTERM from then on is a clean stop.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        server = serve(catalog, port, addr)
    except OSError as err:
        raise click.ClickException(
            f"cannot listen on {addr}:{port}: {err.strerror or err} (pick another --port, or 0 for a free one)"
        ) from None
    host = f"[{addr}]" if ":" in addr else addr
    found = len(catalog.runs())
    runs = f"{found} run{'s' if found != 1 else ''}"
    console.print(f"spotsafe dashboard: http://{host}:{server.server_port}/ ({runs}; Ctrl-C to stop)")
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


@cli.command("notices")
@click.option("--watch", "watch_too", is_flag=True, help="Run the sources and print notices as they arrive.")
@click.option(
    "--seconds", type=click.FloatRange(min=0, min_open=True), default=None, help="With --watch: stop after this long."
)
def notices(watch_too: bool, seconds: float | None) -> None:
    """Show the preemption notice sources spotsafe detects here (and why); --watch runs them.

    Detection reads only the environment and /sys (set $SPOTSAFE_NOTICES to choose by hand).
    With --watch, exits 0 when the time is up and 75 when a stop notice arrived.
    """
    from spotsafe.cli import notices as notices_cli
    from spotsafe.exit_codes import EXIT_PREEMPTED

    stopped = notices_cli.run(watch_too, seconds, console)
    sys.exit(EXIT_PREEMPTED if stopped else 0)


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # a checkpoint's strings (lone surrogates) must not crash a print
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        shown = io.StringIO()
        err.show(file=shown)
        sys.stderr.write(manage.redact(shown.getvalue()))
        sys.exit(EXIT_USAGE)
    except CorruptCheckpointError as err:
        manage.err.print(f"[red]damaged:[/red] {escape(manage.redact(str(err)))}")
        sys.exit(manage.EXIT_DAMAGED)
    except SpotsafeError as err:
        manage.err.print(f"[red]error:[/red] {escape(manage.redact(str(err)))}")
        sys.exit(EXIT_USAGE)
    except SystemExit:
        raise
    except Exception as err:  # noqa: BLE001 - a crash report must not leak credentials either
        text = "".join(traceback.format_exception(err))
        manage.err.print(escape(manage.redact(text)), end="")
        sys.exit(EXIT_CRASH)
