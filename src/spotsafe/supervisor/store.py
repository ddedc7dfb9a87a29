"""The durable job store: jobs and their attempts in SQLite (the embedded default, no server).

One row per job (its name, command, checkpoint URL, state) and one per attempt
(when it started and ended, where it ran, how it exited, the checkpoint step
before and after, what it cost). A supervisor that is killed and started again
for the same job reads the same rows and carries on: attempt numbers continue,
and the budgets are replayed from the attempts
(:meth:`spotsafe.supervisor.retry.RelaunchBudget.replay`).

Only one supervisor may run a job at a time: :meth:`JobStore.claim` takes an
exclusive ``flock`` on a lock file next to the database, which the kernel
releases when the holder dies, however it dies. A second supervisor for the
same job gets :class:`JobBusyError` at once, naming the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from spotsafe.errors import ConfigError, PermanentError

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    command TEXT NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    escalated INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS attempts (
    job TEXT NOT NULL REFERENCES jobs(name),
    number INTEGER NOT NULL,
    pool TEXT NOT NULL DEFAULT 'local',
    host TEXT NOT NULL,
    pid INTEGER,
    started REAL NOT NULL,
    ended REAL,
    exit_code INTEGER,
    exit_class TEXT,
    step_before INTEGER,
    step_after INTEGER,
    cost REAL,
    machine TEXT,
    PRIMARY KEY (job, number)
);
"""
# Columns added after the first release, for stores created before them: (table, column, declaration).
MIGRATIONS = (
    ("attempts", "machine", "TEXT"),
    ("jobs", "escalated", "INTEGER NOT NULL DEFAULT 0"),
)
ATTEMPT_COLUMNS = (
    "job, number, pool, host, pid, started, ended, exit_code, exit_class, step_before, step_after, cost, machine"
)
JOB_COLUMNS = "name, command, url, state, reason, created, updated, escalated"


class JobState(StrEnum):
    """Where a supervised job stands (the ``state`` column of ``jobs``, the ``job_finished`` event's ``state``).

    Legal transitions (:meth:`JobStore.open_job` and :meth:`JobStore.finish_job`)::

        (new) ---------> running        open_job: a supervisor takes the job up
        running -------> succeeded      an attempt exited 0
        running -------> failed         a budget (or a permanent exit: usage, no usable checkpoint) ended it
        running -------> stopped        the supervisor was stopped by a signal; running it again goes on
        succeeded/failed/stopped -> running   open_job again: the same job is supervised once more

    Members equal the strings the store has always held (``JobState.FAILED == "failed"``).
    """

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def finished(self) -> bool:
        """A state a job ends in (every one but ``running``)."""
        return self is not JobState.RUNNING


class JobBusyError(PermanentError):
    """Another supervisor is running this job."""


@dataclass(frozen=True)
class JobRecord:
    name: str
    command: list[str]
    url: str
    state: JobState
    reason: str
    created: float
    updated: float
    escalated: bool = False


@dataclass(frozen=True)
class AttemptRecord:
    job: str
    number: int
    pool: str
    host: str
    pid: int | None
    started: float
    ended: float | None
    exit_code: int | None
    exit_class: str | None
    step_before: int | None
    step_after: int | None
    cost: float | None
    machine: str | None = None


class JobStore:
    """Jobs and attempts in one SQLite file. One connection per store object; not shared across threads."""

    def __init__(self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        for table, column, declaration in MIGRATIONS:
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- the one-supervisor lock -------------------------------------------------------
    def claim(self, name: str) -> Claim:
        """Take the job's lock, or raise :class:`JobBusyError` naming the supervisor that holds it."""
        lock_path = self.path.with_name(f"{self.path.name}.{_safe(name)}.lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JobBusyError(
                f"job {name!r} is already being supervised ({holder}); stop that supervisor first, or pick "
                "another --name"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        return Claim(fd)

    # -- jobs ------------------------------------------------------------------------------
    def open_job(self, name: str, command: Sequence[str], url: str) -> JobRecord:
        """The job ``name``: created on first use; a job that exists must have the same command and URL."""
        now = self._clock()
        with self._tx() as db:
            row = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE name = ?", (name,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO jobs (name, command, url, state, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                    (name, json.dumps(list(command)), url, JobState.RUNNING.value, now, now),
                )
            else:
                job = _job(row)
                if job.command != list(command) or job.url != url:
                    raise ConfigError(
                        f"job {name!r} exists with another command or checkpoint URL ({job.command!r}, {job.url}); "
                        "use another --name for a new job"
                    )
                db.execute(
                    "UPDATE jobs SET state = ?, reason = '', updated = ? WHERE name = ?",
                    (JobState.RUNNING.value, now, name),
                )
        return self.job(name)

    def job(self, name: str) -> JobRecord:
        row = self._db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ConfigError(f"no job named {name!r} in {self.path}")
        return _job(row)

    def jobs(self) -> list[JobRecord]:
        return [_job(r) for r in self._db.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY created")]

    def set_escalated(self, name: str) -> None:
        """Record that the job moved to on-demand for its deadline (it stays there)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET escalated = 1, updated = ? WHERE name = ?", (self._clock(), name))

    def finish_job(self, name: str, state: JobState, reason: str) -> None:
        """Record that the job ended as ``state`` (one of the finished :class:`JobState` s) because of ``reason``."""
        try:
            end = JobState(state)
        except ValueError:
            end = JobState.RUNNING
        if not end.finished:
            ends = ", ".join(s.value for s in JobState if s.finished)
            raise ValueError(f"a job ends as one of {ends}, not {str(state)!r}")
        with self._tx() as db:
            values = (end.value, reason, self._clock(), name)
            db.execute("UPDATE jobs SET state = ?, reason = ?, updated = ? WHERE name = ?", values)

    # -- attempts -------------------------------------------------------------------------
    def start_attempt(self, name: str, *, step_before: int | None, pool: str = "local") -> int:
        """Record a new attempt (before its process starts); returns its number (1, 2, ...)."""
        with self._tx() as db:
            (last,) = db.execute("SELECT COALESCE(MAX(number), 0) FROM attempts WHERE job = ?", (name,)).fetchone()
            number = int(last) + 1
            db.execute(
                "INSERT INTO attempts (job, number, pool, host, started, step_before) VALUES (?, ?, ?, ?, ?, ?)",
                (name, number, pool, socket.gethostname(), self._clock(), step_before),
            )
        return number

    def set_pid(self, name: str, number: int, pid: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE attempts SET pid = ? WHERE job = ? AND number = ?", (pid, name, number))

    def end_attempt(
        self,
        name: str,
        number: int,
        *,
        exit_code: int | None,
        exit_class: str,
        step_after: int | None,
        cost: float | None = None,
        machine: str | None = None,
    ) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE attempts SET ended = ?, exit_code = ?, exit_class = ?, step_after = ?, cost = ?, "
                "machine = COALESCE(?, machine) WHERE job = ? AND number = ?",
                (self._clock(), exit_code, exit_class, step_after, cost, machine, name, number),
            )

    def attempts(self, name: str) -> list[AttemptRecord]:
        rows = self._db.execute(f"SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job = ? ORDER BY number", (name,))
        return [AttemptRecord(*row) for row in rows]

    def unfinished(self, name: str) -> list[AttemptRecord]:
        """Attempts with no recorded end: their supervisor died while they ran."""
        return [a for a in self.attempts(name) if a.ended is None]


class Claim:
    """The held lock of one job; released by :meth:`release` or by the process's death."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100]


def _job(row: tuple[Any, ...]) -> JobRecord:
    name, command, url, state, reason, created, updated, escalated = row
    return JobRecord(
        str(name), list(json.loads(command)), str(url), JobState(state), str(reason), created, updated, bool(escalated)
    )


def read_store(path: str | os.PathLike[str]) -> list[tuple[JobRecord, list[AttemptRecord]]]:
    """Every job in the store at ``path`` with its attempts, read without writing anything (no schema, no
    migration, no lock): for reports and the dashboard, which may read a store a supervisor is writing.

    A missing file, or a file that is not a job store, reads as no jobs. A store from before a column
    existed reads that column as its default."""
    target = Path(path)
    if not target.is_file():
        return []
    # With no write-ahead log beside it no supervisor has the store open: read it as immutable, or SQLite
    # would create (and leave) -wal and -shm files next to a store in WAL mode, and fail in a read-only folder.
    idle = not target.with_name(target.name + "-wal").exists()
    try:
        uri = f"{target.resolve().as_uri()}?mode=ro" + ("&immutable=1" if idle else "")
        db = sqlite3.connect(uri, uri=True, timeout=10.0)
    except sqlite3.Error:
        return []
    try:

        def columns(table: str, wanted: str, defaults: dict[str, str]) -> str:
            have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            return ", ".join(
                name if name in have else f"{defaults[name]} AS {name}" for name in wanted.replace(" ", "").split(",")
            )

        job_cols = columns("jobs", JOB_COLUMNS, {"escalated": "0"})
        attempt_cols = columns("attempts", ATTEMPT_COLUMNS, {"machine": "NULL"})
        out: list[tuple[JobRecord, list[AttemptRecord]]] = []
        for row in db.execute(f"SELECT {job_cols} FROM jobs ORDER BY created").fetchall():
            job = _job(row)
            query = f"SELECT {attempt_cols} FROM attempts WHERE job = ? ORDER BY number"
            out.append((job, [AttemptRecord(*r) for r in db.execute(query, (job.name,))]))
        return out
    except (sqlite3.Error, KeyError, ValueError, TypeError):
        return []  # not a job store (or one this version cannot read)
    finally:
        db.close()
