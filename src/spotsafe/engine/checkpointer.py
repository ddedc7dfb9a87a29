"""The Checkpointer: what a training loop talks to.

A plain loop needs five lines::

    ckpt = spotsafe.Checkpointer("runs/lm", model=model, optimizer=opt, scheduler=sched,
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

1. ``Checkpointer(...)`` opens the run's storage and event log, removes leftovers
   of saves that never committed, and installs the signal handlers. Main thread only
   (Python installs signal handlers only there), unless ``handle_signals=False``.
2. ``restore()`` walks committed checkpoints newest to oldest, verifies every
   size and checksum, skips damaged ones (a ``checkpoint_skipped`` event each)
   and loads the first good one into the registered objects.
3. ``step_done()`` after every optimizer step: counts the step, records
   progress, saves when the policy says so, and reacts to notices. Returns
   only when the loop should go on (or, with ``exit_on_notice=False``, with
   :attr:`stop_requested` set).
4. ``finish()`` writes the final checkpoint and closes. ``close()`` alone only
   releases resources. Saves are synchronous in this release: when ``save()``
   returns, the checkpoint is durable and visible.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import torch

from spotsafe import __version__
from spotsafe.engine.persist import persist
from spotsafe.engine.reader import load_newest_valid
from spotsafe.errors import CheckpointMismatchError, ConfigError, CorruptCheckpointError, SpotsafeError
from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.notices.base import NoticeBoard, NoticeSource
from spotsafe.notices.signals import DEFAULT_SIGNALS, SignalNotices
from spotsafe.policy.interval import SaveContext, SavePolicy, every
from spotsafe.policy.retention import Candidate, KeepLast
from spotsafe.state.rng import GlobalRNG, as_stateful
from spotsafe.state.snapshot import Snapshot, check_component_name
from spotsafe.storage.base import Storage
from spotsafe.storage.local import open_storage
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, EventSink, RunIdentity, read_events

log = logging.getLogger("spotsafe")

ENV_URL = "SPOTSAFE_CHECKPOINT_URL"
ENV_RUN_ID = "SPOTSAFE_RUN_ID"
ENV_ATTEMPT = "SPOTSAFE_ATTEMPT"


class _Progress:
    """The loop counters, saved as the ``progress`` component."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        step, epoch = state.get("step"), state.get("epoch")
        if not isinstance(step, int) or not isinstance(epoch, int) or step < 0 or epoch < 0:
            raise CheckpointMismatchError(f"bad progress record {dict(state)!r}")
        self.step, self.epoch = step, epoch


class Checkpointer:
    """Saves and restores the full training state of one run.

    Args:
        url: where the run's checkpoints and events live (a local folder). ``None``
            reads ``$SPOTSAFE_CHECKPOINT_URL`` (set by spotsafe's supervisor and demo).
        model, optimizer, scheduler, scaler, loader: the usual training objects;
            any may be ``None``. ``loader`` is normally a :class:`~spotsafe.ResumableLoader`.
        extra: more named objects with ``state_dict``/``load_state_dict``, or
            ``torch.Generator`` / ``numpy.random.Generator`` objects.
        policy: when to take regular checkpoints (default ``every(minutes=10)``).
        keep: how many committed checkpoints to keep (the newest intact one is always kept).
        handle_signals: install handlers for ``signals`` (default SIGTERM, SIGINT, SIGUSR1).
        exit_on_notice: after the emergency save, exit the process with
            :data:`~spotsafe.EXIT_PREEMPTED` (75). If ``False``, ``step_done`` returns
            and :attr:`stop_requested` is ``True``; the caller must stop.
        progress_interval: seconds between ``progress`` events (0: every step). Smaller
            makes "steps replayed" exact after a hard kill, at the cost of a log line per step.
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
        self.storage: Storage = storage if storage is not None else open_storage(url)  # type: ignore[arg-type]
        self.repo = CheckpointRepository(self.storage, clock=wall_clock)
        self.policy = policy if policy is not None else every(minutes=10)
        self.retention = KeepLast(keep)
        self.loader = loader
        self.exit_on_notice = exit_on_notice
        self.progress_interval = float(progress_interval)
        self._clock, self._wall, self._exit = clock, wall_clock, exit
        self._progress = _Progress()
        self._closed = False
        self._sources: list[NoticeSource] = []
        self._components = self._collect(model, optimizer, scheduler, scaler, loader, extra)

        history = self._read_history()
        self.run_id = os.environ.get(ENV_RUN_ID) or os.path.basename(os.path.normpath(str(self.storage.url)))
        self.attempt = int(os.environ.get(ENV_ATTEMPT) or history["attempts"] + 1)
        self._last_known_step: int | None = history["last_step"]
        self._owned_log: EventLog | None = None
        if events is None:
            self._owned_log = EventLog(self._events_path(), RunIdentity(self.run_id, self.attempt, os.getpid()))
            events = self._owned_log
        self.events: EventSink = events
        self._emit(ev.RunStarted, url=str(self.storage.url))
        for key in self.repo.remove_leftovers():
            self._emit(ev.PartialRemoved, path=key)

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
    def _collect(self, *objs: Any) -> dict[str, Any]:
        model, optimizer, scheduler, scaler, loader, extra = objs
        named = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "loader": loader}
        components = {name: as_stateful(obj, name) for name, obj in named.items() if obj is not None}
        for name, obj in (extra or {}).items():
            check_component_name(name)
            if name in components or name in ("progress", "rng"):
                raise ConfigError(f"extra object name {name!r} is reserved; pick another name")
            components[name] = as_stateful(obj, name)
        components["progress"] = self._progress
        components["rng"] = GlobalRNG()
        return components

    def _events_path(self) -> str:
        path_of = getattr(self.storage, "path_of", None)
        if path_of is None:
            raise ConfigError("this storage has no local folder for the event log: pass events= explicitly")
        return str(path_of(EVENTS_FILE))

    def _read_history(self) -> dict[str, Any]:
        """Attempts so far and the furthest step the latest attempt reached, from the event log."""
        path_of = getattr(self.storage, "path_of", None)
        attempts, last_step = 0, None
        if path_of is not None:
            for logged in read_events(path_of(EVENTS_FILE)):
                event = logged.event
                if isinstance(event, ev.RunStarted):
                    attempts += 1
                    last_step = None
                elif isinstance(event, (ev.Progress, ev.SaveCommitted, ev.RunExited, ev.RestoreCompleted)):
                    last_step = max(last_step or 0, event.step)
        return {"attempts": attempts, "last_step": last_step}

    def _emit(self, cls: type[ev.Event], **fields: Any) -> None:
        self.events.emit(cls(time=self._wall(), **fields))

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
        """Count one completed step; save if due; handle notices. Returns whether it saved."""
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
        if self._last_save_step != self.step:
            try:
                self.save(reason="notice")
            except Exception as err:  # noqa: BLE001 - the last verified checkpoint stays the resume point
                log.error(
                    "spotsafe: emergency save failed (%s); the last committed checkpoint is the resume point", err
                )
        self._poll_notices()
        self._emit(ev.RunExited, reason="preempted", step=self.step, exit_code=EXIT_PREEMPTED)
        if self.exit_on_notice:
            self.close()
            self._exit(EXIT_PREEMPTED)

    # -- saving --------------------------------------------------------------
    def save(self, reason: str = "manual") -> CheckpointRef:
        """Write a checkpoint of the current state now. Durable and visible when it returns."""
        if self._closed:
            raise RuntimeError("this Checkpointer is closed")
        step = self.step
        started = self._clock()
        self._emit(ev.SaveStarted, step=step, reason=reason)
        try:
            snapshot = Snapshot.capture(step, {n: c.state_dict() for n, c in self._components.items()})
            ref, manifest = persist(
                self.repo,
                snapshot,
                metadata=self.metadata,
                writer={
                    "spotsafe": __version__,
                    "torch": torch.__version__,
                    "run_id": self.run_id,
                    "attempt": self.attempt,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "reason": reason,
                },
            )
        except Exception as err:
            self._emit(ev.SaveFailed, step=step, reason=reason, error=f"{type(err).__name__}: {err}")
            raise
        duration = self._clock() - started
        self._emit(
            ev.SaveCommitted,
            step=step,
            checkpoint=ref.name,
            reason=reason,
            bytes=manifest.total_bytes,
            blobs=len(manifest.blobs),
            stall_s=duration,
            duration_s=duration,
        )
        self._last_save_step = step
        self._last_save_time = self._clock()
        try:
            self._apply_retention()
        except SpotsafeError as err:
            # The new checkpoint is committed; failing to delete old ones must not undo that.
            log.warning("spotsafe: retention failed: %s", err)
            self._emit(ev.RunWarning, message=f"retention failed, old checkpoints kept: {err}")
        return ref

    def _apply_retention(self) -> None:
        refs = {r.name: r for r in self.repo.committed()}
        candidates = []
        for ref in refs.values():
            try:
                self.repo.check_sizes(ref)
                intact = True
            except CorruptCheckpointError:
                intact = False
            candidates.append(Candidate(name=ref.name, step=ref.step, intact=intact))
        for candidate in self.retention.to_delete(candidates):
            self.repo.delete(refs[candidate.name])
            self._emit(
                ev.CheckpointDeleted, checkpoint=candidate.name, step=candidate.step, reason=self.retention.describe()
            )

    def finish(self) -> None:
        """Save the final state (unless the last save was at this step), record success, close."""
        if self._last_save_step != self.step:
            self.save(reason="final")
        self._emit(ev.RunExited, reason="finished", step=self.step, exit_code=0)
        self.close()

    def close(self) -> None:
        """Put signal handlers back and close the event log. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for source in self._sources:
            source.stop()
        if self._owned_log is not None:
            self._owned_log.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
