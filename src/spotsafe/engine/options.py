"""The Checkpointer's arguments, checked before anything happens.

:func:`check_checkpointer_args` runs first in ``Checkpointer.__init__``: before
storage is opened, a writer lease claimed, an event log written or a signal
handler installed, so a bad argument raises
:class:`~spotsafe.errors.ConfigError` (naming the argument, what was given and
what is expected) and leaves nothing behind. It returns the arguments that
need normalising (a generator of signals or notice sources is read once, here).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from spotsafe.checks import (
    check_bool,
    check_callable,
    check_choice,
    check_instance,
    check_int,
    check_iterable,
    check_mapping,
    check_number,
    check_signals,
    check_str,
    fail,
    given,
    is_int,
)
from spotsafe.engine.components import RESERVED
from spotsafe.engine.staging import default_budget, parse_budget
from spotsafe.errors import ConfigError, StateError
from spotsafe.notices.base import NoticeSource
from spotsafe.policy.interval import SavePolicy
from spotsafe.state.rng import as_stateful
from spotsafe.state.snapshot import check_component_name
from spotsafe.storage.retry import RetryPolicy

NAMED = ("model", "optimizer", "scheduler", "scaler", "loader")
STORAGE_METHODS = (
    "write_stream",
    "write_atomic",
    "read",
    "read_into",
    "size",
    "exists",
    "list_dirs",
    "list_files",
    "find",
    "delete",
    "delete_prefix",
    "sync_prefix",
)
NOTICE_METHODS = ("start", "after_stop", "stop")
_EXTRA_HINT = "; pass other objects with state_dict() as extra={'name': obj}"
STATEFUL = "an object with state_dict() and load_state_dict() (or a torch/numpy Generator)"


@dataclass(frozen=True)
class CheckedArgs:
    """The normalised arguments: ``staging_budget`` in bytes (``None``: no limit)."""

    signals: tuple[signal.Signals, ...]
    notices: tuple[NoticeSource, ...] | str
    staging_budget: int | None
    metadata: dict[str, Any]


def check_location(name: str, value: object, *, allow_none: bool = False) -> Path | None:
    """A run location: a ``str`` or ``os.PathLike`` URL. Returns the local folder (``None`` for ``s3://``...).

    A local location may not exist yet (it is created), but it may not be a file or lie inside one.
    """
    if value is None and allow_none:
        return None
    expected = "a folder or URL (str or os.PathLike) such as 'runs/my-run' or 's3://bucket/my-run'"
    if not isinstance(value, (str, os.PathLike)):
        fail(name, expected + (" or None" if allow_none else ""), value)
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        fail(name, expected, value)
    if text.startswith("file://"):
        text = text[len("file://") :]
        if not text.strip():
            fail(name, expected, value)
    elif "://" in text:
        return None
    path = Path(text).absolute()
    for place in (path, *path.parents):
        try:
            if not place.exists():
                continue
            is_dir = place.is_dir()
        except OSError:  # not ours to judge (no permission...): opening the storage reports it
            break
        if not is_dir:
            where = "is a file" if place == path else f"is inside {str(place)!r}, which is a file"
            raise ConfigError(f"{name} {text!r} {where}, not a folder: give the run's folder (created if missing)")
        break
    return path


def check_stateful(name: str, value: object, *, allow_none: bool = False) -> None:
    """Something the checkpointer can save (see :func:`~spotsafe.state.rng.as_stateful`)."""
    if value is None and allow_none:
        return
    try:
        as_stateful(value, name)
    except StateError:
        fail(name, STATEFUL + (" or None" if allow_none else ""), value)


def check_extra(extra: object, named: Mapping[str, object]) -> None:
    """A mapping of free component names to savable objects."""
    check_mapping("extra", extra, keys="str", allow_none=True)
    assert extra is None or isinstance(extra, Mapping)
    for key, value in (extra or {}).items():
        try:
            check_component_name(key)
        except StateError as err:
            raise ConfigError(f"extra: {err}") from err
        if key in RESERVED or named.get(key) is not None:
            raise ConfigError(f"extra object name {key!r} is reserved; pick another name")
        check_stateful(f"extra[{key!r}]", value)


def check_notice_source(name: str, value: object) -> None:
    """Something with a ``name`` and ``start``/``after_stop``/``stop`` (the :class:`NoticeSource` protocol)."""
    has_methods = all(callable(getattr(value, m, None)) for m in NOTICE_METHODS)
    if not has_methods or not isinstance(getattr(value, "name", None), str):
        fail(name, "a notice source (a name, and start(), after_stop() and stop()) such as AwsSpotNotices()", value)


def check_notices(value: object) -> tuple[NoticeSource, ...] | str:
    """``"auto"``, or an iterable of notice sources (as a tuple)."""
    expected = "'auto' or a list of notice sources such as [AwsSpotNotices()]"
    if isinstance(value, str):
        if value != "auto":
            fail("notices", expected, value)
        return value
    sources = check_iterable("notices", value, expected)
    for i, source in enumerate(sources):
        check_notice_source(f"notices[{i}]", source)
    return sources


def check_budget(value: object) -> int | None:
    """``staging_budget`` in bytes: ``"auto"`` (half the machine's memory), ``None``, bytes, or ``"8GB"``."""
    if value == "auto":
        return default_budget()
    if value is not None and not isinstance(value, str) and not is_int(value, integral=True):
        fail("staging_budget", "a byte count, a size such as '8GB', 'auto' or None", value)
    return parse_budget(int(value) if is_int(value, integral=True) else value)  # type: ignore[call-overload, arg-type]


def check_metadata(value: object) -> dict[str, Any]:
    """A JSON-serialisable mapping (a copy)."""
    check_mapping("metadata", value, allow_none=True)
    metadata: dict[str, Any] = dict(value) if isinstance(value, Mapping) else {}
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"metadata must be JSON-serialisable (str, numbers, lists, dicts), got {given(value)}: {err}"
        ) from err
    return metadata


def check_checkpointer_args(
    *,
    url: object,
    model: object,
    optimizer: object,
    scheduler: object,
    scaler: object,
    loader: object,
    extra: object,
    policy: object,
    keep: object,
    stage_dir: object,
    async_save: object,
    incremental: object,
    overlap: object,
    staging_budget: object,
    when_busy: object,
    storage_options: object,
    retry: object,
    handle_signals: object,
    signals: object,
    grace_s: object,
    exit_on_notice: object,
    progress_interval: object,
    metadata: object,
    notices: object,
    distributed: object,
    process_group: object,
    storage: object,
    events: object,
    clock: object,
    wall_clock: object,
    exit: object,
) -> CheckedArgs:
    """Check every argument of :class:`~spotsafe.Checkpointer` (no side effects); raise ConfigError."""
    if storage is None and url is None:
        raise ConfigError("no checkpoint location: pass Checkpointer(url=...) or storage=...")
    root = check_location("url", url, allow_none=storage is not None)
    stage_root = check_location("stage_dir", stage_dir, allow_none=True)
    if stage_dir is not None and stage_root is None:
        fail("stage_dir", "a local folder (a fast local disk) or None", stage_dir)
    if stage_root is not None and storage is None and stage_root == root:
        raise ConfigError(f"stage_dir must differ from the run's location, got {given(stage_dir)} for both")

    check_instance("model", model, torch.nn.Module, "a torch.nn.Module", allow_none=True, hint=_EXTRA_HINT)
    check_instance("optimizer", optimizer, torch.optim.Optimizer, "a torch.optim.Optimizer", allow_none=True)
    for name, value in (("scheduler", scheduler), ("scaler", scaler), ("loader", loader)):
        check_stateful(name, value, allow_none=True)
    named = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "loader": loader}
    check_extra(extra, named)

    hint = "; call it: every(steps=500)" if callable(policy) else ""
    check_instance(
        "policy", policy, SavePolicy, "a save policy such as spotsafe.every(steps=500)", allow_none=True, hint=hint
    )
    check_int("keep", keep, at_least=1)
    for name, value in (
        ("async_save", async_save),
        ("incremental", incremental),
        ("overlap", overlap),
        ("handle_signals", handle_signals),
        ("exit_on_notice", exit_on_notice),
    ):
        check_bool(name, value)
    check_bool("distributed", distributed, allow_none=True)
    if overlap and (optimizer is None or not async_save):
        raise ConfigError("overlap=True needs an optimizer (its step pre-hook ends the copy) and async_save=True")
    budget = check_budget(staging_budget)
    check_choice("when_busy", when_busy, ("wait", "skip"))
    check_mapping("storage_options", storage_options, keys="str", allow_none=True)
    check_instance("retry", retry, RetryPolicy, "a spotsafe.storage.RetryPolicy", allow_none=True)
    checked_signals = check_signals("signals", signals)
    check_number("grace_s", grace_s, at_least=0, unit="seconds", allow_none=True)
    check_number("progress_interval", progress_interval, at_least=0, unit="seconds")
    checked_metadata = check_metadata(metadata)
    checked_notices = check_notices(notices)
    if process_group is not None and dist.is_available() and not isinstance(process_group, dist.ProcessGroup):
        fail("process_group", "a torch.distributed ProcessGroup or None (the default group)", process_group)
    if storage is not None and (
        not isinstance(getattr(storage, "url", None), str)
        or not all(callable(getattr(storage, m, None)) for m in STORAGE_METHODS)
    ):
        fail("storage", "a spotsafe.storage.Storage (such as open_storage(url)) or None", storage)
    if events is not None and not callable(getattr(events, "emit", None)):
        fail("events", "an event sink (an object with emit(event)) or None", events)
    for name, value in (("clock", clock), ("wall_clock", wall_clock), ("exit", exit)):
        check_callable(name, value)
    return CheckedArgs(checked_signals, checked_notices, budget, checked_metadata)


def check_save_args(reason: object, full: object, via_stage: object) -> None:
    """The arguments of :meth:`~spotsafe.Checkpointer.save`."""
    check_str("reason", reason)
    check_bool("full", full)
    check_bool("via_stage", via_stage, allow_none=True)


def check_restore_args(strict: object) -> None:
    """The arguments of :meth:`~spotsafe.Checkpointer.restore`."""
    check_bool("strict", strict)
