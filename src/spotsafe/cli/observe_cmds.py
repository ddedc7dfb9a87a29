"""``spotsafe report`` and ``spotsafe dashboard``: reading what runs did (their event logs and job stores).

Where a run or a job store is not given, both take them from the job contract
(:class:`~spotsafe.jobenv.JobEnv`: ``$SPOTSAFE_CHECKPOINT_URL``, ``$SPOTSAFE_JOB_STORE``), as a supervised job
would see them.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from spotsafe.cli.options import (
    command_redactor,
    open_folder,
    parse_storage_options,
    run_options,
    storage_options_option,
)
from spotsafe.cli.output import console
from spotsafe.jobenv import JobEnv


@click.command("report")
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
    from spotsafe.cli import report as report_cli

    env = JobEnv.from_env()
    url = url or env.checkpoint_url
    if not url:
        raise click.UsageError("give the run's URL (or set $SPOTSAFE_CHECKPOINT_URL)")
    store = store or Path(env.store_or_default())
    if plot is not None:
        from spotsafe.telemetry.plot import plot_format

        plot_format(plot)  # a bad file name is the first thing said, before the run is opened
    run = open_folder(url, storage_options, retry_budget)
    sys.exit(
        report_cli.report(
            run, store=store, as_json=as_json, on_demand_price=on_demand_price, console=console, plot=plot
        )
    )


@click.command("dashboard")
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
@storage_options_option("Option for the storage backend of remote runs (repeatable; VALUE is JSON when it parses).")
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
    from spotsafe.dashboard.catalog import Catalog
    from spotsafe.dashboard.server import serve

    env = JobEnv.from_env()
    places = list(locations)
    if not places:
        places = ["."]
        if env.checkpoint_url:
            places.append(env.checkpoint_url)
    store_list = list(stores) or [Path(env.store_or_default())]
    catalog = Catalog(
        places,
        [s for s in store_list if s.exists() or stores],
        storage_options=parse_storage_options(storage_options, command_redactor()),
        on_demand_price=on_demand_price,
    )
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


COMMANDS = (report_cmd, dashboard_cmd)
"""What this module adds to the ``spotsafe`` group."""
