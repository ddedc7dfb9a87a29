"""A run's event log as a process writing it opens it, and the emitter that stamps its events.

Shared by the :class:`~spotsafe.Checkpointer` and batch jobs (:mod:`spotsafe.batch`); imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import Any

from spotsafe.jobenv import JobEnv
from spotsafe.storage.base import Storage, local_paths
from spotsafe.storage.errors import redact
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, EventSink, RunIdentity
from spotsafe.telemetry.metrics import serve_metrics
from spotsafe.telemetry.store import EventUploader


class Emitter:
    """Emits typed events stamped with the wall clock: ``emit(ev.SaveStarted, step=3, reason=...)``.

    Events before the sink is set (a storage retry while the event log is not open yet) are dropped.
    """

    def __init__(self, wall: Callable[[], float]) -> None:
        self.wall = wall
        self.sink: EventSink | None = None

    def __call__(self, cls: type[ev.Event], **fields: Any) -> None:
        if self.sink is not None:
            self.sink.emit(cls(time=self.wall(), **fields))

    def storage_retry(self, operation: str, attempt: int, delay: float, error: Exception) -> None:
        """The hook a retrying storage calls before each retry."""
        self(ev.StorageRetry, operation=operation, retry=attempt, delay_s=delay, error=redact(str(error)))


def open_run_log(stack: contextlib.ExitStack, storage: Storage, identity: RunIdentity, job: JobEnv) -> EventLog:
    """The run's event log: in the run folder when it is on this machine, else a local spool that is uploaded."""
    local = local_paths(storage)
    if local is not None:
        event_log = EventLog(local.path_of(EVENTS_FILE), identity)
    else:
        spool = job.events_file or os.path.join(
            tempfile.gettempdir(), "spotsafe-events", f"{identity.run_id}-{identity.attempt}-{identity.pid}.jsonl"
        )
        event_log = EventLog(spool, identity, uploader=EventUploader(storage, identity.attempt, identity.pid))
    stack.callback(event_log.close)
    if job.metrics_port is not None:
        metrics = serve_metrics(event_log, job.metrics_port, job.metrics_addr or "0.0.0.0")
        stack.callback(metrics.close)
    return event_log
