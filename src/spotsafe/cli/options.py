"""Options shared by several commands, and what each command opens from them.

Every command's secrets go into one :class:`~spotsafe.storage.redactor.Redactor`, the click context's object:
:func:`~spotsafe.cli.main.main` creates it before the command runs and redacts any error the command ends with
through it (:func:`command_redactor` makes one where a command runs without ``main``, e.g. in tests).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from spotsafe.storage.inventory import RunFolder, open_run_folder
from spotsafe.storage.redactor import Redactor

F = TypeVar("F", bound=Callable[..., Any])


def command_redactor() -> Redactor:
    """The running command's redactor (the click context's object)."""
    return click.get_current_context().ensure_object(Redactor)


def float_option(
    name: str, default: float, help: str, *, above_zero: bool = False, metavar: str | None = None
) -> Callable[[F], F]:
    """An option ``NAME``: a number >= 0 (> 0 with ``above_zero``) with a default that ``--help`` shows."""
    return click.option(
        name,
        type=click.FloatRange(min=0, min_open=above_zero),
        default=default,
        show_default=True,
        metavar=metavar,
        help=help,
    )


def storage_options_option(help: str) -> Callable[[F], F]:
    """``--storage-option KEY=VALUE`` (repeatable), into the parameter ``storage_options``."""
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE", help=help)


def run_options(fn: F) -> F:
    """The options every run-management command takes."""
    fn = click.option(
        "--progress/--no-progress",
        default=None,
        help="Force the progress bar on or off (default: shown when stderr is a terminal).",
    )(fn)
    fn = float_option(
        "--retry-budget", 120.0, "How long to keep retrying transient storage errors.", metavar="SECONDS"
    )(fn)
    fn = storage_options_option(
        "Option for the storage backend (repeatable; VALUE is JSON when it parses, a dotted KEY nests)."
    )(fn)
    return fn


def parse_storage_options(items: Sequence[str], redactor: Redactor) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict; VALUE is JSON when it parses, else a string.

    A dotted KEY sets a nested value: ``client_kwargs.endpoint_url=http://...``. Values whose names say they are
    secrets are remembered by ``redactor``; a bad item is refused without being echoed.
    """
    options: dict[str, Any] = {}
    for n, item in enumerate(items, 1):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            # The item is not echoed: it may be a secret typed in the wrong place.
            raise click.BadParameter(f"item {n} has no '=': give each as OPTION=VALUE", param_hint="'--storage-option'")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        path = key.split(".")
        if any(not p for p in path):
            raise click.BadParameter(f"item {n} has an empty part in its name", param_hint="'--storage-option'")
        target = options
        for part in path[:-1]:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise click.BadParameter(
                    f"item {n}: {'.'.join(path[:-1])} is set both to a value and to keys",
                    param_hint="'--storage-option'",
                )
            target = child
        target[path[-1]] = value
    redactor.remember_options(options)
    return options


def open_folder(url: str, storage_options: Sequence[str], retry_budget: float) -> RunFolder:
    """Open the run at ``url`` with the ``--storage-option`` items given, its secrets remembered first."""
    redactor = command_redactor()
    options = parse_storage_options(storage_options, redactor)
    redactor.remember_url(url)
    return open_run_folder(url, options, retry_budget=retry_budget)


__all__ = [
    "command_redactor",
    "open_folder",
    "parse_storage_options",
    "run_options",
    "float_option",
    "storage_options_option",
]
