"""The Checkpointer: what a training loop talks to.

A plain loop needs five lines::

    ckpt = spotsafe.Checkpointer("s3://bucket/runs/lm", model=model, optimizer=opt, scheduler=sched,
                                 loader=loader, policy=spotsafe.every(steps=200))
    ckpt.restore()                       # newest verified checkpoint, or a fresh start
    while ckpt.step < total_steps:
        for batch in loader:
            ...train one step...
            ckpt.step_done()             # may save; on SIGTERM saves and exits with 75
            if ckpt.step >= total_steps:
                break
    ckpt.finish()                        # final checkpoint

Call sequence and contracts:

1. ``Checkpointer(...)`` opens the run's storage, claims the next writer
   generation (older writers of the run are fenced off from then on), opens the
   event log, removes leftovers of saves that never committed, and installs the
   signal handlers. Main thread only (Python installs signal handlers only there),
   unless ``handle_signals=False``.
2. ``restore()`` walks committed checkpoints newest to oldest, verifies every
   size and checksum, skips damaged ones (a ``checkpoint_skipped`` event each)
   and loads the first good one into the registered objects.
3. ``step_done()`` after every optimizer step: counts the step, records
   progress, saves when the policy says so, and reacts to notices.
4. ``finish()`` writes the final checkpoint and closes. ``close()`` alone only
   releases resources (it waits for an upload in flight).

Durability when ``save()`` returns: the checkpoint is committed on the run's
storage; in local-then-upload mode (``stage_dir=``) it is committed on local
disk and uploading, except for ``notice`` and ``final`` saves, which wait for
the upload.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import torch

from spotsafe import __version__
from spotsafe.engine.components import Progress, collect
from spotsafe.engine.persist import persist
from spotsafe.engine.reader import load_newest_valid
from spotsafe.engine.staged import Upload, UploadDone, Uploader, wipe_stage
from spotsafe.errors import CheckpointMismatchError, ConfigError, CorruptCheckpointError, SpotsafeError
from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.notices.base import NoticeBoard, NoticeSource
from spotsafe.notices.signals import DEFAULT_SIGNALS, SignalNotices
from spotsafe.policy.interval import SaveContext, SavePolicy, every
from spotsafe.policy.retention import Candidate, KeepLast
from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.base import Storage
from spotsafe.storage.errors import redact
from spotsafe.storage.fencing import WriterLease
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository
from spotsafe.storage.retry import DEFAULT_RETRY, RetryPolicy
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, EventSink, RunIdentity
from spotsafe.telemetry.store import EventUploader, read_run_events

log = logging.getLogger("spotsafe")

ENV_URL = "SPOTSAFE_CHECKPOINT_URL"
ENV_RUN_ID = "SPOTSAFE_RUN_ID"
ENV_ATTEMPT = "SPOTSAFE_ATTEMPT"
ENV_EVENTS_FILE = "SPOTSAFE_EVENTS_FILE"


class Checkpointer:
    """Saves and restores the full training state of one run.

    Args:
        url: where the run lives: a local folder, ``s3://bucket/run``, ``gs://...``,
            ``az://...``, ``memory://...``. ``None`` reads ``$SPOTSAFE_CHECKPOINT_URL``.
        model, optimizer, scheduler, scaler, loader: the usual training objects;
            any may be ``None``. ``loader`` is normally a :class:`~spotsafe.ResumableLoader`.
        extra: more named objects with ``state_dict``/``load_state_dict``, or
            ``torch.Generator`` / ``numpy.random.Generator`` objects.
        policy: when to take regular checkpoints (default ``every(minutes=10)``).
        keep: how many committed checkpoints to keep (the newest intact one is always kept).
        stage_dir: a fast local folder: saves commit there first and upload in the background.
        storage_options: passed to the fsspec file system (credentials, endpoint, ...).
        retry: how long to retry transient storage errors (default: 120 s budget).
        handle_signals: install handlers for ``signals`` (default SIGTERM, SIGINT, SIGUSR1).
        exit_on_notice: after the emergency save, exit the process with
            :data:`~spotsafe.EXIT_PREEMPTED` (75). If ``False``, ``step_done`` returns
            and :attr:`stop_requested` is ``True``; the caller must stop.
        progress_interval: seconds between ``progress`` events (0: every step).
        metadata: JSON-serialisable values stored in every manifest.
        notices: extra notice sources (cloud watchers, later).
        storage, events, clock, wall_clock, exit: injectable effects for tests.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        loader: Any = None,
        extra: Mapping[str, Any] | None = None,
        policy: SavePolicy | None = None,
        keep: int = 3,
        stage_dir: str | os.PathLike[str] | None = None,
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        handle_signals: bool = True,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        exit_on_notice: bool = True,
        progress_interval: float = 1.0,
        metadata: Mapping[str, Any] | None = None,
        notices: Iterable[NoticeSource] = (),
        storage: Storage | None = None,
        events: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        exit: Callable[[int], NoReturn] = sys.exit,
    ) -> None:
        self._closed = False
        self._sources: list[NoticeSource] = []
        self._owned_log: EventLog | None = None
        self._uploader: Uploader | None = None
        if url is None and storage is None:
            url = os.environ.get(ENV_URL)
            if not url:
                raise ConfigError(
                    f"no checkpoint location: pass Checkpointer(url=...) or set ${ENV_URL} (for example runs/my-run)"
                )
        if progress_interval < 0:
            raise ConfigError(f"progress_interval must be >= 0 seconds, got {progress_interval!r}")
        self.metadata = dict(metadata or {})
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"metadata must be JSON-serialisable: {err}") from err
        self.policy = policy if policy is not None else every(minutes=10)
        self.retention = KeepLast(keep)
        self.loader = loader
        self.exit_on_notice = exit_on_notice
        self.progress_interval = float(progress_interval)
        self._clock, self._wall, self._exit = clock, wall_clock, exit
        self._progress = Progress()
        named = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "loader": loader}
        self._components = collect(named, extra, self._progress)

        if storage is None:
            assert url is not None
            storage = open_storage(url, storage_options, retry=retry, on_retry=self._on_retry)
        elif getattr(storage, "on_retry", False) is None:
            storage.on_retry = self._on_retry  # type: ignore[attr-defined]  # an injected RetryingStorage
        self.storage: Storage = storage
        history = self._read_history()
        self.run_id = os.environ.get(ENV_RUN_ID) or os.path.basename(str(self.storage.url).rstrip("/"))
        self.attempt = int(os.environ.get(ENV_ATTEMPT) or history["attempts"] + 1)
        self._last_known_step: int | None = history["last_step"]
        self.lease = WriterLease.acquire(self.storage, run_id=self.run_id, attempt=self.attempt, clock=wall_clock)
        self.generation = self.lease.generation
        self.repo = CheckpointRepository(self.storage, clock=wall_clock, fence=self.lease.check)
        self.events: EventSink = events if events is not None else self._open_log()
        self._emit(ev.RunStarted, url=str(self.storage.url))
        self._emit(ev.WriterClaimed, generation=self.generation)
        for key in self.repo.remove_leftovers():
            self._emit(ev.PartialRemoved, path=key)
        if stage_dir is not None:
            self._start_stage(LocalStorage(stage_dir))

        self.board = NoticeBoard()
        self._sources = list(notices)
        if handle_signals:
            self._sources.insert(0, SignalNotices(signals))
        try:
            for source in self._sources:
                source.start(self.board)
        except BaseException:
            self.close()
            raise
        self._notice_counts: dict[str, int] = {}
        self._last_save_step: int | None = None
        self._last_save_time = clock()
        self._last_progress_time = -float("inf")
        self._stop_requested = False

    # -- set-up helpers ------------------------------------------------------
    def _open_log(self) -> EventLog:
        identity = RunIdentity(self.run_id, self.attempt, os.getpid())
        path_of = getattr(self.storage, "path_of", None)
        if path_of is not None:
            self._owned_log = EventLog(path_of(EVENTS_FILE), identity)
        else:
            spool = os.environ.get(ENV_EVENTS_FILE) or os.path.join(
                tempfile.gettempdir(), "spotsafe-events", f"{self.run_id}-{self.attempt}-{os.getpid()}.jsonl"
            )
            uploader = EventUploader(self.storage, self.attempt, os.getpid())
            self._owned_log = EventLog(spool, identity, uploader=uploader)
        return self._owned_log

    def _start_stage(self, stage: LocalStorage) -> None:
        if stage.root_path == getattr(self.storage, "root_path", None):
            raise ConfigError("stage_dir must differ from the run's location")
        wipe_stage(stage)
        self._stage_repo = CheckpointRepository(stage, clock=self._wall)
        self._uploader = Uploader(self._stage_repo, stage, self.repo, self._upload_done, clock=self._clock)

    def _read_history(self) -> dict[str, Any]:
        """Attempts so far and the furthest step the latest attempt reached, from the event log."""
        attempts, last_step = 0, None
        for logged in read_run_events(self.storage):
            event = logged.event
            if isinstance(event, ev.RunStarted):
                attempts += 1
                last_step = None
            elif isinstance(event, (ev.Progress, ev.SaveCommitted, ev.RunExited, ev.RestoreCompleted)):
                last_step = max(last_step or 0, event.step)
        return {"attempts": attempts, "last_step": last_step}

    def _emit(self, cls: type[ev.Event], **fields: Any) -> None:
        self.events.emit(cls(time=self._wall(), **fields))

    def _on_retry(self, operation: str, attempt: int, delay: float, error: Exception) -> None:
        if getattr(self, "events", None) is not None:
            self._emit(ev.StorageRetry, operation=operation, retry=attempt, delay_s=delay, error=redact(str(error)))

    # -- counters ------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps completed (restored from the checkpoint on resume)."""
        return self._progress.step

    @property
    def epoch(self) -> int:
        """The loader's epoch when a loader is registered, else the value you set."""
        if self.loader is not None and hasattr(self.loader, "epoch"):
            return int(self.loader.epoch)
        return self._progress.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if self.loader is not None and hasattr(self.loader, "epoch"):
            raise AttributeError("the epoch comes from the registered loader; it cannot be set here")
        self._progress.epoch = int(value)

    @property
    def stop_requested(self) -> bool:
        """True once an interruption notice arrived; the loop must stop taking work."""
        return self._stop_requested or self.board.pending()

    # -- restore -------------------------------------------------------------
    def restore(self, *, strict: bool = True) -> int:
        """Load the newest verified checkpoint; return its step (0 when starting fresh).

        Damaged checkpoints are skipped with a ``checkpoint_skipped`` event and a
        logged warning. A checkpoint that verifies but does not fit the objects
        (another model shape, a missing component when ``strict``) raises
        :class:`~spotsafe.errors.CheckpointMismatchError`: an older one would not
        fit either.
        """
        started = self._clock()
        skipped: list[str] = []

        def on_skip(ref: CheckpointRef, err: CorruptCheckpointError) -> None:
            skipped.append(ref.name)
            log.warning("spotsafe: skipping checkpoint %s: %s", ref.name, err)
            self._emit(ev.CheckpointSkipped, checkpoint=ref.name, step=ref.step, reason=str(err))

        restored = load_newest_valid(self.repo, on_skip)
        if restored is None:
            self._emit(ev.RestoreFresh, skipped=len(skipped))
            return 0
        name = restored.checkpoint.ref.name
        self._apply(restored.components, strict=strict, where=name)
        self._last_save_step = self.step
        self._last_save_time = self._clock()
        replayed = None if self._last_known_step is None else max(0, self._last_known_step - self.step)
        self._emit(
            ev.RestoreCompleted,
            step=self.step,
            epoch=self.epoch,
            checkpoint=name,
            bytes=restored.checkpoint.manifest.total_bytes,
            duration_s=self._clock() - started,
            last_known_step=self._last_known_step,
            replayed_steps=replayed,
        )
        return self.step

    def _apply(self, states: Mapping[str, Any], *, strict: bool, where: str) -> None:
        missing = [n for n in self._components if n not in states]
        if missing and strict:
            raise CheckpointMismatchError(
                f"checkpoint {where} has no state for {', '.join(missing)}; it was written by a run with "
                "different objects. Register the same objects, or call restore(strict=False).",
                checkpoint=where,
            )
        unknown = [n for n in states if n not in self._components]
        if unknown:
            self._emit(ev.RunWarning, message=f"checkpoint {where} holds state for unregistered {', '.join(unknown)}")
        for name, component in self._components.items():
            if name not in states:
                continue
            try:
                component.load_state_dict(states[name])
            except CheckpointMismatchError:
                raise
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
                raise CheckpointMismatchError(
                    f"checkpoint {where}: the saved {name} does not fit the current one: {err}", checkpoint=where
                ) from err

    # -- the loop ------------------------------------------------------------
    def step_done(self) -> bool:
        """Count one completed step; save if due; handle notices. Returns whether it saved.

        Raises the error of a failed background upload, once, at the next call after it failed.
        """
        self._raise_upload_failure()
        self._progress.step += 1
        if self.loader is not None and hasattr(self.loader, "epoch"):
            self._progress.epoch = int(self.loader.epoch)
        now = self._clock()
        if now - self._last_progress_time >= self.progress_interval:
            self._last_progress_time = now
            self._emit(ev.Progress, step=self.step, epoch=self.epoch)
        if self._poll_notices():
            self._handle_notice()
            return True
        ctx = SaveContext(
            step=self.step,
            steps_since_save=self.step - (self._last_save_step or 0),
            seconds_since_save=now - self._last_save_time,
        )
        if not self.policy.should_save(ctx):
            return False
        self.save(reason="interval")
        if self._poll_notices():
            self._handle_notice()
        return True

    def _poll_notices(self) -> bool:
        for notice in self.board.drain():
            count = self._notice_counts.get(notice.source, 0) + 1
            self._notice_counts[notice.source] = count
            self._emit(ev.NoticeReceived, source=notice.source, count=count, step=self.step, deadline=notice.deadline)
        return self.board.pending()

    def _handle_notice(self) -> None:
        self._stop_requested = True
        try:
            if self._last_save_step != self.step:
                self.save(reason="notice")
            elif self._uploader is not None:
                self._uploader.wait()
                self._raise_upload_failure()
        except Exception as err:  # noqa: BLE001 - the last verified checkpoint stays the resume point
            log.error("spotsafe: emergency save failed (%s); the last committed checkpoint is the resume point", err)
        self._poll_notices()
        self._emit(ev.RunExited, reason="preempted", step=self.step, exit_code=EXIT_PREEMPTED)
        if self.exit_on_notice:
            self.close()
            self._exit(EXIT_PREEMPTED)

    # -- saving --------------------------------------------------------------
    def save(self, reason: str = "manual") -> CheckpointRef:
        """Write a checkpoint of the current state now.

        Direct mode: durable and visible when it returns. Local-then-upload mode:
        committed locally and uploading; ``notice`` and ``final`` saves wait for the upload.
        """
        if self._closed:
            raise RuntimeError("this Checkpointer is closed")
        if self._uploader is not None:
            self._uploader.wait()  # at most one save in flight
            self._raise_upload_failure()
        step = self.step
        started = self._clock()
        self._emit(ev.SaveStarted, step=step, reason=reason)
        target = self._stage_repo if self._uploader is not None else self.repo
        try:
            snapshot = Snapshot.capture(step, {n: c.state_dict() for n, c in self._components.items()})
            ref, manifest = persist(
                target, snapshot, metadata=self.metadata, writer=self._writer_info(reason), generation=self.generation
            )
        except Exception as err:
            self._emit(ev.SaveFailed, step=step, reason=reason, error=redact(f"{type(err).__name__}: {err}"))
            raise
        stall = self._clock() - started
        self._last_save_step = step
        self._last_save_time = self._clock()
        if self._uploader is None:
            self._committed(ref, manifest.total_bytes, len(manifest.blobs), reason, stall, stall)
            return ref
        self._emit(
            ev.SaveStaged, step=step, checkpoint=ref.name, reason=reason, bytes=manifest.total_bytes, stall_s=stall
        )
        self._uploader.submit(Upload(ref=ref, reason=reason, started=started, stall_s=stall))
        if reason in ("notice", "final"):
            self._uploader.wait()
            self._raise_upload_failure()
        return ref

    def _writer_info(self, reason: str) -> dict[str, Any]:
        return {
            "spotsafe": __version__,
            "torch": torch.__version__,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "generation": self.generation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "reason": reason,
        }

    def _committed(self, ref: CheckpointRef, nbytes: int, blobs: int, reason: str, stall: float, total: float) -> None:
        """A checkpoint became durable: record it, point the hint at it, apply retention."""
        self._emit(
            ev.SaveCommitted,
            step=ref.step,
            checkpoint=ref.name,
            reason=reason,
            bytes=nbytes,
            blobs=blobs,
            stall_s=stall,
            duration_s=total,
        )
        try:
            if self._uploader is None:
                self.repo.write_latest(ref)
            self._apply_retention(ref)
        except SpotsafeError as err:
            # The new checkpoint is committed; failing to update the hint or delete old ones must not undo that.
            log.warning("spotsafe: after committing %s: %s", ref.name, err)
            self._emit(ev.RunWarning, message=redact(f"after committing {ref.name}: {err}"))

    def _upload_done(self, done: UploadDone) -> None:
        """Runs on the upload thread."""
        upload = done.upload
        if done.error is not None or done.manifest is None:
            self._emit(
                ev.SaveFailed,
                step=upload.ref.step,
                reason=upload.reason,
                error=redact(f"upload: {type(done.error).__name__}: {done.error}"),
            )
            return
        total = done.finished - upload.started
        self._committed(
            upload.ref, done.manifest.total_bytes, len(done.manifest.blobs), upload.reason, upload.stall_s, total
        )

    def _raise_upload_failure(self) -> None:
        failure = self._uploader.take_failure() if self._uploader is not None else None
        if failure is not None:
            raise failure

    def _apply_retention(self, just_committed: CheckpointRef) -> None:
        """Delete what the retention policy says, after ``just_committed`` was committed.

        The checkpoint this process just committed is intact by construction (its blobs have
        the sizes it wrote), so the others are only checked when it is not among the kept ones.
        """
        refs = {r.name: r for r in self.repo.committed()}
        candidates = [
            Candidate(name=r.name, step=r.step, intact=True if r == just_committed else None) for r in refs.values()
        ]
        if not any(c.intact for c in candidates[: self.retention.n]):
            candidates = [Candidate(name=r.name, step=r.step, intact=self._intact(r)) for r in refs.values()]
        for candidate in self.retention.to_delete(candidates):
            self.repo.delete(refs[candidate.name])
            self._emit(
                ev.CheckpointDeleted, checkpoint=candidate.name, step=candidate.step, reason=self.retention.describe()
            )

    def _intact(self, ref: CheckpointRef) -> bool:
        try:
            self.repo.check_sizes(ref)
        except CorruptCheckpointError:
            return False
        return True

    def finish(self) -> None:
        """Save the final state (unless the last save was at this step), record success, close."""
        if self._last_save_step != self.step:
            self.save(reason="final")
        elif self._uploader is not None:
            self._uploader.wait()
            self._raise_upload_failure()
        self._emit(ev.RunExited, reason="finished", step=self.step, exit_code=0)
        self.close()

    def close(self) -> None:
        """Wait for an upload in flight, put signal handlers back, close the event log. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._uploader is not None:
            self._uploader.wait()
            failure = self._uploader.take_failure()
            if failure is not None:
                log.error("spotsafe: the last upload failed: %s", redact(str(failure)))
        for source in self._sources:
            source.stop()
        if self._owned_log is not None:
            self._owned_log.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
