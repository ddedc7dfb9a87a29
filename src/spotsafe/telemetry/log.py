"""The run's event log: typed events appended as JSON lines.

Writers append one line per event with ``O_APPEND`` (a line is one ``write``
call, so lines from a killed process are never interleaved). A process killed
mid-write can leave a truncated last line; readers skip lines that do not
parse, so a damaged log never stops a run or a report.

A full disk (``ENOSPC``, ``EDQUOT``) never stops the run either: a line is written
whole or not at all (a short write is cut back off the file), and lines that do not
fit are held in memory, in order, and written as soon as there is room again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spotsafe.storage.base import UnsafePathError
from spotsafe.storage.layout import rank_of
from spotsafe.telemetry.events import EVENT_TYPES, Event, RunWarning

EVENTS_FILE = "events.jsonl"
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
HELD_LINES = 10_000
"""Most lines held in memory while the disk is full; beyond it, only durable events are still held."""

log = logging.getLogger("spotsafe")


class EventSink(Protocol):
    """Anything that receives events. ``emit`` may be called from any thread."""

    def emit(self, event: Event) -> None: ...


@dataclass(frozen=True)
class RunIdentity:
    """Fields stamped on every event a process writes."""

    run_id: str
    attempt: int
    pid: int


class EventLog:
    """Appends events to ``path`` as JSON lines and forwards them to listeners.

    Thread-safe. ``durable`` event types are fsynced after writing so that the
    record of a commit or a notice survives a machine loss as well as the
    checkpoint it describes. While the disk is full, lines are held in memory and
    written, in order, by the first :meth:`emit` (or :meth:`close`) that finds room;
    listeners and the uploader get every event at once either way.
    """

    DURABLE = frozenset(
        {
            "save_committed",
            "save_failed",
            "notice_received",
            "run_exited",
            "restore_completed",
            "checkpoint_skipped",
            "emergency_planned",
            "emergency_finished",
        }
    )

    def __init__(self, path: str | os.PathLike[str], identity: RunIdentity, *, uploader: Any = None) -> None:
        self.path = Path(path)
        self.identity = identity
        self._uploader = uploader
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Event], None]] = []
        self._held: deque[tuple[bytes, bool]] = deque()
        self._dropped = 0
        self._last_time = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = open_no_link(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` for every event after it is written."""
        self._listeners.append(listener)

    def emit(self, event: Event) -> None:
        line = self._encode(event)
        with self._lock:
            if self._fd is None:
                raise RuntimeError("event log is closed")
            self._last_time = event.time
            self._append(line, event.type in self.DURABLE)
            if self._uploader is not None:
                self._uploader.add(line)
        # Outside the lock: an upload can itself emit events (a storage retry).
        if self._uploader is not None and event.type in self.DURABLE:
            self._uploader.flush()
        for listener in self._listeners:
            listener(event)

    @property
    def held(self) -> int:
        """Lines waiting in memory for room on a full disk."""
        return len(self._held)

    def close(self) -> None:
        """Write what is still held if there is room now (else say how much is lost), and close."""
        if self._uploader is not None:
            self._uploader.flush()
        with self._lock:
            if self._fd is not None:
                if self._held and not self._write_held():
                    log.error(
                        "spotsafe: no space left for the event log %s: %d events were not written",
                        self.path,
                        len(self._held) + self._dropped,
                    )
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing (under the lock) ------------------------------------------------------
    def _encode(self, event: Event) -> bytes:
        record: dict[str, Any] = {
            "type": event.type,
            "run_id": self.identity.run_id,
            "attempt": self.identity.attempt,
            "pid": self.identity.pid,
        }
        fields = event.fields()
        clash = set(fields) & set(record)
        if clash:
            raise ValueError(f"event {event.type} uses reserved field names {sorted(clash)}")
        record.update(fields)
        return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()

    def _append(self, line: bytes, durable: bool) -> None:
        """Write ``line`` after the held ones, or hold it while the disk is full."""
        if (not self._held or self._write_held()) and self._write(line, durable):
            return
        if len(self._held) >= HELD_LINES and not durable:
            self._dropped += 1
            return
        self._held.append((line, durable))

    def _write_held(self) -> bool:
        """Write the held lines in order; whether all of them are written."""
        while self._held:
            line, durable = self._held[0]
            if not self._write(line, durable):
                return False
            self._held.popleft()
        log.info("spotsafe: there is room for the event log %s again; the held events are written", self.path)
        if self._dropped:
            message = f"the disk was full: {self._dropped} events (progress and the like) were not written"
            if self._write(self._encode(RunWarning(time=self._last_time, message=message)), True):
                self._dropped = 0
        return True

    def _write(self, line: bytes, durable: bool) -> bool:
        """Append the whole line, or nothing (False) when the disk is full. Other errors propagate."""
        assert self._fd is not None
        view = memoryview(line)
        done = 0
        try:
            while done < len(view):
                n = os.write(self._fd, view[done:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
                done += n
            if durable:
                os.fsync(self._fd)
        except OSError as err:
            if done < len(view):
                self._cut(done)
            elif err.errno in DISK_FULL:
                return True  # the line is written; only flushing it to disk failed
            if err.errno not in DISK_FULL:
                raise
            if not self._held:
                log.warning(
                    "spotsafe: no space left for the event log %s; events are held in memory until there is room",
                    self.path,
                )
            return False
        return True

    def _cut(self, written: int) -> None:
        """Remove the ``written`` bytes of a line that did not fit, unless another process appended after them."""
        assert self._fd is not None
        if not written:
            return
        with contextlib.suppress(OSError):
            end = os.lseek(self._fd, 0, os.SEEK_CUR)
            if os.fstat(self._fd).st_size == end:
                os.ftruncate(self._fd, end - written)


@dataclass(frozen=True)
class LoggedEvent:
    """An event read back from a log, with the identity it was written under."""

    event: Event
    run_id: str
    attempt: int
    pid: int


def open_no_link(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> int:
    """``os.open`` that refuses a symbolic link (or a pipe or device) where the log should be a plain file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafePathError(
                f"{path} is a symbolic link: spotsafe never reads or writes an event log through a link; remove it"
            ) from err
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(f"{path} is not a plain file; remove it")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_events(path: str | os.PathLike[str]) -> Iterator[LoggedEvent]:
    """Yield the events in ``path`` in order, skipping damaged or unknown lines."""
    try:
        handle = os.fdopen(open_no_link(path), "rb")
    except FileNotFoundError:
        return
    with handle:
        yield from parse_lines(handle)


class EventTail:
    """Follows a growing event log, returning only complete new lines on each poll."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[LoggedEvent]:
        try:
            handle = os.fdopen(open_no_link(self.path), "rb")
        except FileNotFoundError:
            return []
        with handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out: list[LoggedEvent] = []
        for raw in lines:
            out.extend(parse_lines([raw]))
        return out


class RunTail:
    """Follows a run's event log and, for a run of several ranks on local disk, each rank folder's log beside
    it (``rank-<r>/events.jsonl``), picked up as they appear. The first :meth:`poll` reads what is there
    already; a rank log that appears later is read from its beginning (it was created since)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tails = {self.path: EventTail(self.path)}

    def poll(self) -> list[LoggedEvent]:
        folder = self.path.parent
        names = sorted(p.name for p in folder.iterdir() if rank_of(p.name) is not None) if folder.is_dir() else []
        for rank_log in (folder / name / self.path.name for name in names):
            if rank_log.exists():
                self._tails.setdefault(rank_log, EventTail(rank_log))
        return [logged for tail in self._tails.values() for logged in tail.poll()]


def parse_lines(lines: Iterable[bytes]) -> Iterator[LoggedEvent]:
    """Typed events from raw JSON lines; damaged or unknown lines are skipped."""
    for raw in lines:
        try:
            record = json.loads(raw)
            cls = EVENT_TYPES[record.pop("type")]
            run_id = str(record.pop("run_id"))
            attempt = int(record.pop("attempt"))
            pid = int(record.pop("pid"))
            event = cls(**record)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        yield LoggedEvent(event=event, run_id=run_id, attempt=attempt, pid=pid)
