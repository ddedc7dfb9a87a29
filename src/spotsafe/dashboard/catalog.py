"""Which runs the dashboard shows, and each run's report and timeline (read-only, cached).

Runs come from three places, looked at again on every request so that new runs appear:

* each location given: a run itself (a folder or URL with ``events.jsonl`` or uploaded
  ``events/`` parts), or, for a local folder that is not a run, the runs found below it
  (a few levels down, not inside a run);
* each job store given, and every ``*.sqlite`` job store found next to a run or in a scanned
  folder (as ``spotsafe drill`` leaves them): its jobs' checkpoint URLs;
* nothing else: the dashboard never writes, and reads only event logs and job stores.

A run's figures are recomputed only when its log changed (a local log's size and time),
or, for object storage, at most every few seconds.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotsafe.storage.base import Storage
from spotsafe.storage.errors import redact, redact_url
from spotsafe.storage.local import local_root
from spotsafe.storage.registry import open_storage, protocol_of
from spotsafe.storage.retry import StorageRetry
from spotsafe.supervisor.store import AttemptRecord, read_store
from spotsafe.telemetry.log import EVENTS_FILE, LoggedEvent
from spotsafe.telemetry.report import Report, build_report
from spotsafe.telemetry.store import EVENTS_PREFIX, read_run_events
from spotsafe.telemetry.timeline import Timeline, build_timeline

SCAN_DEPTH = 3
SCAN_LIMIT = 5000  # folders looked at per location, so that a huge tree cannot stall a page
REMOTE_TTL_S = 5.0


def run_id(url: str) -> str:
    """A short, stable id for a run's location (used in the dashboard's addresses)."""
    return hashlib.sha256(normalise(url).encode()).hexdigest()[:12]


def normalise(url: str) -> str:
    """One spelling per place: local paths absolute, no trailing slash."""
    if protocol_of(url) == "file":
        return str(local_root(url))
    return url.rstrip("/")


def is_local_run(folder: Path) -> bool:
    return (folder / EVENTS_FILE).is_file() or (folder / EVENTS_PREFIX).is_dir()


@dataclass
class RunEntry:
    id: str
    url: str
    job: str | None = None
    attempts: list[AttemptRecord] = field(default_factory=list)
    store: str | None = None

    @property
    def shown(self) -> str:
        """The location for people: relative to the current folder when it is below it."""
        if self.local:
            path = local_root(self.url)
            try:
                return str(path.relative_to(Path.cwd()))
            except ValueError:
                return str(path)
        return redact_url(self.url)

    @property
    def local(self) -> bool:
        return protocol_of(self.url) == "file"


@dataclass
class RunView:
    """One run as the dashboard shows it."""

    entry: RunEntry
    events: list[LoggedEvent]
    report: Report
    timeline: Timeline
    version: str
    error: str | None = None


class Catalog:
    """The runs under ``locations`` and in ``stores``; thread-safe."""

    def __init__(
        self,
        locations: list[str],
        stores: list[Path],
        *,
        storage_options: Mapping[str, Any] | None = None,
        on_demand_price: float | None = None,
        retry_budget: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.locations = locations
        self.stores = stores
        self.storage_options = dict(storage_options or {})
        self.on_demand_price = on_demand_price
        self.retry_budget = retry_budget
        self._clock = clock
        self._lock = threading.Lock()
        self._storages: dict[str, Storage] = {}
        self._views: dict[str, RunView] = {}

    # -- which runs --------------------------------------------------------------------
    def runs(self) -> list[RunEntry]:
        """Every run, in a stable order (the locations' runs first, then the stores' other jobs)."""
        found: dict[str, RunEntry] = {}
        stores = list(self.stores)
        for location in self.locations:
            if protocol_of(location) != "file":
                found.setdefault(run_id(location), RunEntry(run_id(location), location))
                continue
            root = local_root(location)
            for folder, sqlite in _scan(root):
                if folder is not None:
                    found.setdefault(run_id(str(folder)), RunEntry(run_id(str(folder)), str(folder)))
                if sqlite is not None and sqlite not in stores:
                    stores.append(sqlite)
        for store in stores:
            for job, attempts in read_store(store):
                key = run_id(job.url)
                entry = found.setdefault(key, RunEntry(key, job.url))
                if entry.job is None:
                    entry.job, entry.attempts, entry.store = job.name, attempts, _near(store)
        return list(found.values())

    def entry(self, rid: str) -> RunEntry | None:
        return next((e for e in self.runs() if e.id == rid), None)

    # -- one run -----------------------------------------------------------------------
    def view(self, entry: RunEntry) -> RunView:
        """The run's report and timeline, recomputed only when its log changed (and, while it runs, every
        few seconds: a running attempt's time moves on)."""
        key = self._log_key(entry)
        bucket = str(int(self._clock() // REMOTE_TTL_S))
        with self._lock:
            cached = self._views.get(entry.id)
        if cached is not None and cached.version in (key, f"{key}|{bucket}"):
            cached.entry = entry  # the store's attempts may have moved on
            return cached
        error = None
        try:
            events = list(read_run_events(self._storage(entry))) if self._exists(entry) else []
        except Exception as err:  # noqa: BLE001 - one unreadable run must not take the dashboard down
            events, error = [], redact(f"{type(err).__name__}: {err}")
        now = self._clock()
        report = build_report(entry.shown, events, on_demand_price=self.on_demand_price, now=now)
        timeline = build_timeline(entry.shown, events, report, now=now)
        version = f"{key}|{bucket}" if report.state == "running" else key
        view = RunView(entry, events, report, timeline, version, error)
        with self._lock:
            self._views[entry.id] = view
        return view

    def _exists(self, entry: RunEntry) -> bool:
        return not entry.local or local_root(entry.url).is_dir()

    def _log_key(self, entry: RunEntry) -> str:
        """Changes when the run's log may have: a local log's size and time; for object storage, every few
        seconds (listing its parts is a request of its own)."""
        if entry.local:
            root = local_root(entry.url)
            parts: list[str] = []
            for path in (root / EVENTS_FILE, root / EVENTS_PREFIX):
                try:
                    st = path.stat()
                    parts.append(f"{st.st_size}:{st.st_mtime_ns}")
                except OSError:
                    parts.append("-")
            if (root / EVENTS_PREFIX).is_dir():
                parts.append(str(sum(len(files) for _, _, files in os.walk(root / EVENTS_PREFIX))))
            return "|".join(parts)
        return "remote:" + str(int(self._clock() // REMOTE_TTL_S))

    def _storage(self, entry: RunEntry) -> Storage:
        with self._lock:
            storage = self._storages.get(entry.url)
            if storage is None:
                retry = StorageRetry(budget_s=self.retry_budget)
                storage = open_storage(entry.url, self.storage_options or None, retry=retry)
                self._storages[entry.url] = storage
            return storage


def _near(path: Path) -> str:
    """``path`` relative to the current folder when it is below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except (ValueError, OSError):
        return str(path)


def _scan(root: Path) -> list[tuple[Path | None, Path | None]]:
    """Runs and job stores at or below ``root`` (a run's own folders are not searched)."""
    out: list[tuple[Path | None, Path | None]] = []
    if not root.is_dir():
        return out
    todo: list[tuple[Path, int]] = [(root, 0)]
    seen = 0
    while todo and seen < SCAN_LIMIT:
        folder, depth = todo.pop(0)
        seen += 1
        if is_local_run(folder):
            out.append((folder, None))
        try:
            children = sorted(folder.iterdir())
        except OSError:
            continue
        for child in children:
            if child.suffix == ".sqlite" and child.is_file():
                out.append((None, child))
        if is_local_run(folder) or depth >= SCAN_DEPTH:
            continue
        todo.extend((c, depth + 1) for c in children if c.is_dir() and not c.name.startswith("."))
    return out
