"""The ``spotsafe`` command line: the group, ``run`` and ``drill``, and :func:`main`, which turns what a command
ends with into an exit code and a message without credentials.

The other commands live beside their printers: :mod:`spotsafe.cli.inspect_cmds` (``ls``, ``verify``,
``inspect``, ``gc``), :mod:`spotsafe.cli.observe_cmds` (``report``, ``dashboard``), :mod:`spotsafe.cli.demo_cmd`
and :mod:`spotsafe.cli.notices`.
"""

from __future__ import annotations

import io
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import click
from rich.markup import escape

from spotsafe.cli import demo_cmd, inspect_cmds, notices, observe_cmds
from spotsafe.cli.demo import default_drill_command
from spotsafe.cli.options import float_option
from spotsafe.cli.output import EXIT_DAMAGED, console, err, print_json
from spotsafe.errors import CorruptCheckpointError, SpotsafeError
from spotsafe.exit_codes import EXIT_CRASH, EXIT_USAGE
from spotsafe.storage.redactor import Redactor
from spotsafe.version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spotsafe")
def cli() -> None:
    """spotsafe: training jobs that survive spot and preemptible instances."""


def _add_commands(group: click.Group) -> None:
    for command in (*demo_cmd.COMMANDS, *inspect_cmds.COMMANDS, *observe_cmds.COMMANDS, *notices.COMMANDS):
        group.add_command(command)


_add_commands(cli)


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
    help="A shipped spot trace (aws-us-east-1c, aws-us-east-1f, aws-us-west-2b, aws-us-west-2c; 4 nodes: "
    "aws-4node-us-east-1f, aws-4node-us-east-2a, aws-4node-us-west-2c) or a trace file to replay "
    "[default: aws-us-west-2c, unless --rate].",
)
@float_option("--trace-start", 16.8, "Where to begin (trace hours).")
@click.option(
    "--trace-reading",
    type=click.Choice(["available", "preempted"]),
    default="available",
    show_default=True,
    help="A trace value is the instances available (upstream README), or 1 means preempted.",
)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None, help="Interruptions per trace hour.")
@float_option("--time-scale", 120.0, "Trace seconds per drill second.", above_zero=True)
@click.option(
    "--notice",
    type=click.Choice(["aws", "azure", "gcp", "sigterm", "kill"]),
    default="aws",
    show_default=True,
    help="How each interruption is announced (kill: SIGKILL at once, no warning).",
)
@float_option("--window", 10.0, "Seconds from the notice to SIGKILL (not with --notice kill).", above_zero=True)
@click.option("--max-interruptions", type=click.IntRange(min=0), default=20, show_default=True)
@float_option("--spot-price", 0.918, "Dollars per hour.")
@float_option("--on-demand-price", 3.06, "Dollars per hour.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --rate.")
@click.option(
    "--nodes",
    type=click.IntRange(min=1),
    default=None,
    help="Run the job on this many nodes: the command once per node, each a torchrun agent (--nnodes MIN:MAX, "
    "--rdzv-backend c10d); a market of several nodes takes one node at a time [default: a multi-node trace's "
    "node count, within --nnodes; else 1].",
)
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
    nodes: int | None,
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
    uninterrupted run's (a job that resumed on fewer nodes: finished at the same final step; another world size
    cannot be bit-identical, and the report says so).
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
        nodes=nodes,
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
        print_json(report.to_json())
    else:
        print_drill(report, console)
    sys.exit(0 if report.ok else 1)


def main() -> None:
    """The ``spotsafe`` entry point. Exit codes: the command's own, 2 for usage and configuration errors, 1 for
    damage and crashes, 130 for Ctrl-C. Every message goes through this command's :class:`Redactor`."""
    for stream in (sys.stdout, sys.stderr):  # a checkpoint's strings (lone surrogates) must not crash a print
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    redactor = Redactor()
    try:
        cli.main(standalone_mode=False, obj=redactor)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as error:
        shown = io.StringIO()
        error.show(file=shown)
        sys.stderr.write(redactor.redact(shown.getvalue()))
        sys.exit(EXIT_USAGE)
    except CorruptCheckpointError as error:
        err.print(f"[red]damaged:[/red] {escape(redactor.reason(error))}")
        sys.exit(EXIT_DAMAGED)
    except SpotsafeError as error:
        err.print(f"[red]error:[/red] {escape(redactor.reason(error))}")
        sys.exit(EXIT_USAGE)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001 - a crash report must not leak credentials either
        text = "".join(traceback.format_exception(error))
        err.print(escape(redactor.redact(text)), end="")
        sys.exit(EXIT_CRASH)
