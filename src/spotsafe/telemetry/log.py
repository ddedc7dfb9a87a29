"""The run's event log: typed events appended as JSON lines.

Writers append one line per event with ``O_APPEND`` (a line is one ``write``
call, so lines from a killed process are never interleaved). A process killed
mid-write can leave a truncated last line; readers skip lines that do not
parse, so a damaged log never stops a run or a report.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from spotsafe.telemetry.events import EVENT_TYPES, Event

EVENTS_FILE = "events.jsonl"


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
    checkpoint it describes.
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener(event)`` for every event after it is written."""
        self._listeners.append(listener)

    def emit(self, event: Event) -> None:
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
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise RuntimeError("event log is closed")
            os.write(self._fd, line)
            if event.type in self.DURABLE:
                os.fsync(self._fd)
            if self._uploader is not None:
                self._uploader.add(line)
        # Outside the lock: an upload can itself emit events (a storage retry).
        if self._uploader is not None and event.type in self.DURABLE:
            self._uploader.flush()
        for listener in self._listeners:
            listener(event)

    def close(self) -> None:
        if self._uploader is not None:
            self._uploader.flush()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class LoggedEvent:
    """An event read back from a log, with the identity it was written under."""

    event: Event
    run_id: str
    attempt: int
    pid: int


def read_events(path: str | os.PathLike[str]) -> Iterator[LoggedEvent]:
    """Yield the events in ``path`` in order, skipping damaged or unknown lines."""
    try:
        with open(path, "rb") as handle:
            yield from parse_lines(handle)
    except FileNotFoundError:
        return


class EventTail:
    """Follows a growing event log, returning only complete new lines on each poll."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[LoggedEvent]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out: list[LoggedEvent] = []
        for raw in lines:
            out.extend(parse_lines([raw]))
        return out


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
