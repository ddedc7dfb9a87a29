"""The Checkpointer's arguments, checked before anything happens.

The settings groups (:mod:`spotsafe.engine.config`) use the checks here in their
``__post_init__``; :func:`check_components` and :func:`check_effects` check the rest.
All of them run first in ``Checkpointer.__init__``: before storage is opened, a
writer lease claimed, an event log written or a signal handler installed, so a bad
argument raises :class:`~spotsafe.errors.ConfigError` (naming the argument, what was
given and what is expected) and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from spotsafe.checks import (
    check_bool,
    check_callable,
    check_instance,
    check_iterable,
    check_mapping,
    check_str,
    fail,
    given,
    is_int,
)
from spotsafe.engine.components import RESERVED
from spotsafe.engine.staging import default_budget, parse_budget
from spotsafe.errors import ConfigError, StateError
from spotsafe.notices.base import NoticeSource
from spotsafe.state.rng import as_stateful
from spotsafe.state.snapshot import check_component_name

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
OVERLAP_NEEDS = "overlap=True needs an optimizer (its step pre-hook ends the copy) and async_save=True"
STATEFUL = "an object with state_dict() and load_state_dict() (or a torch/numpy Generator)"


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


def check_loader(value: object) -> None:
    """``loader=``: a ``torch.utils.data.DataLoader`` (made resumable in place), or anything savable, or None."""
    if value is None:
        return
    from spotsafe.data.position import needs_position

    if needs_position(value):
        return
    try:
        as_stateful(value, "loader")
    except StateError:
        fail("loader", "a torch DataLoader, a spotsafe.ResumableLoader, " + STATEFUL + " or None", value)


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


def check_components(named: Mapping[str, object], extra: object, *, overlap: bool) -> None:
    """The Checkpointer's training objects: ``named`` maps model/optimizer/scheduler/scaler/loader to objects
    (``None``: absent); ``extra`` maps more names to objects. ``overlap`` needs an optimizer."""
    check_instance("model", named["model"], torch.nn.Module, "a torch.nn.Module", allow_none=True, hint=_EXTRA_HINT)
    check_instance("optimizer", named["optimizer"], torch.optim.Optimizer, "a torch.optim.Optimizer", allow_none=True)
    for name in ("scheduler", "scaler"):
        check_stateful(name, named[name], allow_none=True)
    check_loader(named["loader"])
    check_extra(extra, named)
    if overlap and named["optimizer"] is None:
        raise ConfigError(OVERLAP_NEEDS)


def check_effects(keywords: Mapping[str, object]) -> None:
    """The Checkpointer's injectable effects, by keyword (no side effects); raise ConfigError."""
    distributed, process_group = keywords["distributed"], keywords["process_group"]
    storage, events = keywords["storage"], keywords["events"]
    check_bool("distributed", distributed, allow_none=True)
    if process_group is not None and dist.is_available() and not isinstance(process_group, dist.ProcessGroup):
        fail("process_group", "a torch.distributed ProcessGroup or None (the default group)", process_group)
    if storage is not None and (
        not isinstance(getattr(storage, "url", None), str)
        or not all(callable(getattr(storage, m, None)) for m in STORAGE_METHODS)
    ):
        fail("storage", "a spotsafe.storage.Storage (such as open_storage(url)) or None", storage)
    if events is not None and not callable(getattr(events, "emit", None)):
        fail("events", "an event sink (an object with emit(event)) or None", events)
    for name in ("clock", "wall_clock", "exit"):
        check_callable(name, keywords[name])


def check_save_args(reason: object, full: object, via_stage: object) -> None:
    """The arguments of :meth:`~spotsafe.Checkpointer.save`."""
    check_str("reason", reason)
    check_bool("full", full)
    check_bool("via_stage", via_stage, allow_none=True)


def check_restore_args(strict: object) -> None:
    """The arguments of :meth:`~spotsafe.Checkpointer.restore`."""
    check_bool("strict", strict)
