"""Following a run's event log while it is written: the local ``events.jsonl`` (or the supervisor's spool
file, :class:`FileSource`), and for jobs on other machines the parts they upload to the run's storage
(:class:`StorageSource`), polled on a background thread by :class:`EventFollower`."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from spotsafe.telemetry.log import LoggedEvent, parse_lines
from spotsafe.telemetry.store import event_parts

if TYPE_CHECKING:
    from spotsafe.storage.base import Storage

log = logging.getLogger("spotsafe")


class EventSource(Protocol):
    """Somewhere a run's events appear. ``poll`` returns the events that appeared since the last call."""

    interval_s: float
    final: bool
    """Whether a last poll is worth waiting for when the follower stops."""

    def poll(self) -> list[LoggedEvent]: ...


class FileSource:
    """A local event log, followed from where it ends now (it may not exist yet): what earlier runs of the
    supervisor wrote there is not news, and a long log is not read at all.

    Like :class:`~spotsafe.telemetry.log.EventTail` (complete lines only; damaged lines skipped), which
    always reads from the start; a log that was replaced by a shorter one is read again from its start.
    """

    final = True
    CHUNK = 4 << 20
    """At most this many bytes a poll (the rest comes at the next)."""

    def __init__(self, path: str | os.PathLike[str], *, from_end: bool = True, interval_s: float = 0.25) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self._offset = 0
        self._partial = b""
        if from_end:
            with contextlib.suppress(OSError):
                self._offset = self.path.stat().st_size  # a line cut here fails to parse and is skipped

    def poll(self) -> list[LoggedEvent]:
        try:
            with open(self.path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size < self._offset:
                    self._offset, self._partial = 0, b""
                handle.seek(self._offset)
                data = handle.read(self.CHUNK)
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return list(parse_lines(lines))


class RankZeroSource:
    """Rank 0's event log of a job of several ranks on local disk (``rank-00000/events.jsonl`` in ``folder``, the
    run's location), once it appears: the ranks save and stop together, so rank 0's events stand for all of them.
    A log there already is followed from its end (an earlier run's); one that appears later, from its start."""

    final = True

    def __init__(self, folder: str | os.PathLike[str], *, interval_s: float = 0.25) -> None:
        from spotsafe.storage.layout import rank_folder
        from spotsafe.telemetry.log import EVENTS_FILE

        self.path = Path(folder) / rank_folder(0) / EVENTS_FILE
        self.interval_s = interval_s
        self._file = FileSource(self.path, interval_s=interval_s) if self.path.exists() else None

    def poll(self) -> list[LoggedEvent]:
        if self._file is None:
            if not self.path.exists():
                return []
            self._file = FileSource(self.path, from_end=False, interval_s=self.interval_s)
        return self._file.poll()


class StorageSource:
    """The event parts jobs upload to the run's storage (jobs on other machines write no local log).

    Parts are immutable: each poll lists them and reads only the new ones. The parts there at the
    first poll are from before this command and are not read.
    """

    final = False

    def __init__(self, storage: Storage, *, interval_s: float = 3.0) -> None:
        self.storage = storage
        self.interval_s = interval_s
        self._seen: set[str] | None = None

    def poll(self) -> list[LoggedEvent]:
        keys = event_parts(self.storage)
        if self._seen is None:
            self._seen = set(keys)
            return []
        new = [key for key in keys if key not in self._seen]
        out: list[LoggedEvent] = []
        for key in new:
            out.extend(parse_lines(self.storage.read(key).splitlines()))
            self._seen.add(key)
        return out


class EventFollower:
    """Polls ``sources`` on a background thread and hands new events to ``on_events`` (then calls ``on_tick``).

    Never raises into the caller: a source that fails (a damaged or vanished log, a storage error) is
    tried again at its next poll. An event seen in two sources (a local job's spool and its uploaded
    parts) is handed on once.
    """

    def __init__(
        self,
        sources: Sequence[EventSource],
        on_events: Callable[[list[LoggedEvent]], None],
        on_tick: Callable[[], None] = lambda: None,
        *,
        tick_s: float = 0.25,
    ) -> None:
        self.sources = list(sources)
        self._on_events = on_events
        self._on_tick = on_tick
        self._tick_s = tick_s
        self._due = [0.0] * len(self.sources)
        self._seen: dict[tuple[str, int, int, str, float], None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spotsafe-live", daemon=True)

    def start(self) -> EventFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling after one last poll of the sources that are worth it."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join(timeout)

    def poll_once(self, *, final: bool = False) -> None:
        now = time.monotonic()
        batch: list[LoggedEvent] = []
        for i, source in enumerate(self.sources):
            if (final and not source.final) or (not final and now < self._due[i]):
                continue
            self._due[i] = now + source.interval_s
            try:
                batch.extend(source.poll())
            except Exception as err:  # noqa: BLE001 - a status display never stops the command; next poll retries
                log.debug("spotsafe: live status: reading events failed: %s", err)
        if len(self.sources) > 1:
            batch = [e for e in batch if self._first_time(e)]
        try:
            if batch:
                self._on_events(batch)
            self._on_tick()
        except Exception as err:  # noqa: BLE001 - a display error must not end the follower
            log.debug("spotsafe: live status: display failed: %s", err)

    def _first_time(self, logged: LoggedEvent) -> bool:
        key = (logged.run_id, logged.attempt, logged.pid, logged.event.type, logged.event.time)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > 100_000:  # a duplicate comes within seconds of the original: forget the oldest
            for old in list(self._seen)[:50_000]:
                del self._seen[old]
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self._tick_s)
        self.poll_once(final=True)
