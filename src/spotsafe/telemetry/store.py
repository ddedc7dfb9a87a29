"""Keeping a run's events with the run, wherever the run lives.

On a local disk the run's ``events.jsonl`` is appended in place. Object stores
cannot append, so each process appends to a local spool file and uploads what it
wrote since the last upload as a new, immutable part::

    events/a000003-p00012345-9f2c1b7a/part-000001.jsonl

Parts are uploaded after every event that matters for recovery (commits,
notices, exits) and on close. Readers concatenate every process's parts in order.
A process killed without warning loses only the events since its last upload
(typically a few ``progress`` lines).
"""

from __future__ import annotations

import heapq
import logging
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from spotsafe.errors import StorageError
from spotsafe.reasons import ExitReason
from spotsafe.storage.base import Storage, local_paths
from spotsafe.storage.layout import rank_folder, rank_folders
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, LoggedEvent, parse_lines, read_events
from spotsafe.telemetry.runmodel import RunModel

EVENTS_PREFIX = "events"
_SEGMENT = re.compile(r"^a(\d{6})-p(\d{8})-([0-9a-f]{8})$")
_PART = re.compile(r"^part-(\d{6})\.jsonl$")
log = logging.getLogger("spotsafe")


class EventUploader:
    """Uploads one process's new event lines as numbered parts. Used by :class:`EventLog`."""

    def __init__(self, storage: Storage, attempt: int, pid: int) -> None:
        self.storage = storage
        self.segment = f"{EVENTS_PREFIX}/a{attempt:06d}-p{pid:08d}-{secrets.token_hex(4)}"
        self._part = 0
        self._pending: list[bytes] = []
        self._lock = threading.Lock()  # guards _pending; never held during I/O
        self._flushing = threading.Lock()  # one upload at a time; a re-entrant flush is skipped

    def add(self, line: bytes) -> None:
        with self._lock:
            self._pending.append(line)

    def flush(self) -> None:
        """Upload the lines added since the last flush. On failure they stay pending for the next one.

        Thread-safe. A flush that starts while another runs (for instance from an event the
        upload itself emitted) returns at once; its lines go with the next flush.
        """
        if not self._flushing.acquire(blocking=False):
            return
        try:
            with self._lock:
                lines, self._pending = self._pending, []
            if not lines:
                return
            key = f"{self.segment}/part-{self._part + 1:06d}.jsonl"
            try:
                self.storage.write_atomic(key, b"".join(lines))
            except StorageError as err:
                log.warning("spotsafe: could not upload events (%s); will try again", err)
                with self._lock:
                    self._pending = lines + self._pending
                return
            self._part += 1
        finally:
            self._flushing.release()


def _segment_order(name: str) -> tuple[int, int, str]:
    match = _SEGMENT.match(name)
    return (int(match.group(1)), int(match.group(2)), name) if match else (-1, -1, name)


def event_parts(storage: Storage, folder: str = "") -> list[str]:
    """The keys of the run's uploaded event parts (under ``folder``: a rank's), in order: by attempt, process,
    then part number."""
    parts: dict[str, list[tuple[int, str]]] = {}
    prefix = f"{folder}/{EVENTS_PREFIX}" if folder else EVENTS_PREFIX
    depth = prefix.count("/") + 3
    for key in storage.find(prefix):
        pieces = key.split("/")
        if len(pieces) == depth and _SEGMENT.match(pieces[-2]) and (match := _PART.match(pieces[-1])):
            parts.setdefault(pieces[-2], []).append((int(match.group(1)), key))
    return [key for segment in sorted(parts, key=_segment_order) for _, key in sorted(parts[segment])]


def _folder_events(storage: Storage, folder: str) -> Iterator[LoggedEvent]:
    local = local_paths(storage)
    if local is not None:
        yield from read_events(local.path_of(f"{folder}/{EVENTS_FILE}" if folder else EVENTS_FILE))
    for key in event_parts(storage, folder):
        yield from parse_lines(storage.read(key).splitlines())


def read_run_events(storage: Storage) -> Iterator[LoggedEvent]:
    """Every event of the run, in order: the local ``events.jsonl`` and/or uploaded parts. For a job of several
    ranks (each with its own events under ``rank-<r>/``), rank 0's events too, merged in time order: the ranks
    save, stop and restore at the same steps, so rank 0's stand for all of them."""
    folders = rank_folders(storage)
    if not folders or folders[0] != rank_folder(0):
        yield from _folder_events(storage, "")
        return
    yield from heapq.merge(
        _folder_events(storage, ""), _folder_events(storage, folders[0]), key=lambda logged: logged.event.time
    )


@dataclass
class RunHistory:
    """What the run's event log says about earlier attempts (see :func:`read_history`).

    ``interruptions`` counts attempts that ended without finishing; ``unnoticed`` those
    that lost work (no emergency checkpoint committed at the step where they stopped).
    ``run_s`` is the time the attempts ran; ``restart_s`` the time from the end of each
    interrupted attempt to the restored state of the next.
    """

    attempts: int = 0
    last_step: int | None = None
    run_s: float = 0.0
    interruptions: int = 0
    unnoticed: int = 0
    restart_s: list[float] = field(default_factory=list)
    saves: list[ev.SaveCommitted] = field(default_factory=list)


def read_history(storage: Storage, *, max_saves: int = 50) -> RunHistory:
    """The run's history from its event log, read by a process about to start a new attempt
    (every attempt in the log has ended)."""
    return history_of(RunModel.fold(read_run_events(storage), series=False), max_saves=max_saves)


def history_of(model: RunModel, *, max_saves: int = 50) -> RunHistory:
    """The history of the attempts that ran (wrote events) in ``model``: each is an interruption unless the
    job itself said it finished."""
    worked = [a for a in model.attempts if not a.silent]
    history = RunHistory(attempts=len(worked), last_step=worked[-1].furthest_step if worked else None)
    history.saves = list(model.checkpoints[-max_saves:])
    for i, attempt in enumerate(worked):
        history.run_s += attempt.end - attempt.start
        before = worked[i - 1] if i > 0 else None
        if before is not None and before.exited != ExitReason.FINISHED and attempt.first_restored_at is not None:
            history.restart_s.append(max(0.0, attempt.first_restored_at - before.end))
        if attempt.exited == ExitReason.FINISHED:
            continue
        history.interruptions += 1
        if attempt.exited != ExitReason.PREEMPTED or attempt.exit_step not in attempt.committed_steps:
            history.unnoticed += 1
    return history
