"""``spotsafe ls / verify / inspect / gc``: the options of the run-management commands.

Each command opens the run (:func:`~spotsafe.cli.options.open_folder`) and hands it to its printer in
:mod:`spotsafe.cli.manage`, whose return value is the exit code. A job of several ranks keeps one run per rank
under ``rank-<r>``: given its location, each command does its work rank by rank (:func:`per_rank`).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections.abc import Callable

import click

from spotsafe.cli import manage
from spotsafe.cli.options import command_redactor, float_option, open_folder, run_options
from spotsafe.cli.output import EXIT_DAMAGED, EXIT_NOTHING, Bars, out, print_json
from spotsafe.exit_codes import EXIT_SUCCESS
from spotsafe.storage.gc import keep_common, plan_gc
from spotsafe.storage.inventory import RunFolder
from spotsafe.storage.layout import rank_folders, rank_of

WORST_FIRST = (EXIT_DAMAGED, EXIT_NOTHING)


def open_runs(
    url: str, storage_options: tuple[str, ...], retry_budget: float
) -> tuple[RunFolder, dict[str, RunFolder]]:
    """The run at ``url`` and, for a job of several ranks (no checkpoint folder of its own, ``rank-<r>`` folders
    in it), each rank's run by folder name (empty otherwise)."""
    run = open_folder(url, storage_options, retry_budget)
    names = [] if run.repo.folders() else rank_folders(run.repo.storage)
    return run, {name: open_folder(f"{url.rstrip('/')}/{name}", storage_options, retry_budget) for name in names}


def per_rank(
    runs: tuple[RunFolder, dict[str, RunFolder]], command: Callable[[RunFolder], int], *, as_json: bool = False
) -> int:
    """``command`` on the run (:func:`open_runs`); for a job of several ranks, on each rank's run in turn, under a
    heading (with ``as_json``: one JSON object, ``{"ranks": {"rank-00000": ..., ...}}``). The exit code is the
    worst: damaged, then nothing found, then 0."""
    run, ranks = runs
    if not ranks:
        return command(run)
    codes, docs = [], {}
    for name, rank in ranks.items():
        if not as_json:
            out.print(f"[bold]{name}[/] (rank {rank_of(name)}; {len(ranks)} rank folders)")
            codes.append(command(rank))
            continue
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            codes.append(command(rank))
        docs[name] = json.loads(printed.getvalue())
    if as_json:
        print_json({"ranks": docs})
    return next((code for code in WORST_FIRST if code in codes), max(codes, default=EXIT_SUCCESS))


@click.command("ls")
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

    Each committed checkpoint gets a cheap check (manifest and blob sizes); --verify checks every checksum. A job
    of several ranks is listed rank by rank (its rank-<r> folders).
    """
    bars, redactor = Bars(progress), command_redactor()
    code = per_rank(
        open_runs(url, storage_options, retry_budget),
        lambda run: manage.ls(run, bars, redactor, verify=verify, as_json=as_json),
        as_json=as_json,
    )
    sys.exit(code)


@click.command("verify")
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
    bars, redactor = Bars(progress), command_redactor()
    sys.exit(
        per_rank(
            open_runs(url, storage_options, retry_budget),
            lambda run: manage.verify(run, bars, redactor, step=step, every=every),
        )
    )


@click.command("inspect")
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
    bars, redactor = Bars(progress), command_redactor()
    code = per_rank(
        open_runs(url, storage_options, retry_budget),
        lambda run: manage.inspect(run, bars, redactor, step=step, name=name, as_json=as_json),
        as_json=as_json,
    )
    sys.exit(code)


@click.command("gc")
@click.argument("url")
@click.option(
    "--keep",
    type=click.IntRange(min=1),
    required=True,
    help="Keep the newest N committed checkpoints (and always the newest intact one).",
)
@click.option("--apply", is_flag=True, help="Delete; without it, only show what would be deleted.")
@float_option(
    "--partial-older-than",
    3600.0,
    "Delete uncommitted folders last written longer ago than this (younger ones may be saves in progress).",
    metavar="SECONDS",
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
    bars, redactor = Bars(progress), command_redactor()
    runs = open_runs(url, storage_options, retry_budget)
    now = time.time()
    # The ranks plan together: each rank alone could delete a step that another still needs.
    plans = keep_common(
        {
            rank.url: plan_gc(rank.repo, redactor, keep=keep, partial_older_than=partial_older_than, now=now)
            for rank in runs[1].values()
        }
    )
    sys.exit(
        per_rank(
            runs,
            lambda run: manage.gc(
                run,
                bars,
                redactor,
                keep=keep,
                apply=apply,
                partial_older_than=partial_older_than,
                plan=plans.get(run.url),
            ),
        )
    )


COMMANDS = (ls, verify, inspect, gc)
"""What this module adds to the ``spotsafe`` group."""
