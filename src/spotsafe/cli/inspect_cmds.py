"""``spotsafe ls / verify / inspect / gc``: the options of the run-management commands.

Each command opens the run (:func:`~spotsafe.cli.options.open_folder`) and hands it to its printer in
:mod:`spotsafe.cli.manage`, whose return value is the exit code.
"""

from __future__ import annotations

import sys

import click

from spotsafe.cli import manage
from spotsafe.cli.options import command_redactor, float_option, open_folder, run_options
from spotsafe.cli.output import Bars


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

    Each committed checkpoint gets a cheap check (manifest and blob sizes); --verify checks every checksum.
    """
    run = open_folder(url, storage_options, retry_budget)
    sys.exit(manage.ls(run, Bars(progress), command_redactor(), verify=verify, as_json=as_json))


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
    run = open_folder(url, storage_options, retry_budget)
    sys.exit(manage.verify(run, Bars(progress), command_redactor(), step=step, every=every))


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
    run = open_folder(url, storage_options, retry_budget)
    sys.exit(manage.inspect(run, Bars(progress), command_redactor(), step=step, name=name, as_json=as_json))


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
    run = open_folder(url, storage_options, retry_budget)
    sys.exit(
        manage.gc(
            run, Bars(progress), command_redactor(), keep=keep, apply=apply, partial_older_than=partial_older_than
        )
    )


COMMANDS = (ls, verify, inspect, gc)
"""What this module adds to the ``spotsafe`` group."""
