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

Durability when ``save()`` returns: the state is copied into staging memory
and being written in the background (training may change it at once); a
``final`` save, or any save with ``async_save=False``, has committed on the
run's storage. The emergency save on a notice is waited for until its deadline.
A background failure is raised by the next call and recorded as a
``save_failed`` event. See :mod:`spotsafe.engine.saver`.
"""

from __future__ import annotations

import contextlib
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

from spotsafe.version import __version__
from spotsafe.engine import agreement as agree
from spotsafe.engine.commits import AfterSave
from spotsafe.engine.components import Progress, apply_states, collect
from spotsafe.engine.emergency import FULL, INCREMENTAL, STAGED, Plan, SaveCosts, options_for, plan_emergency
from spotsafe.engine.options import check_checkpointer_args, check_restore_args, check_save_args
from spotsafe.engine.reader import (
    FAIL,
    START_FRESH,
    load_agreed,
    load_newest_valid,
    no_usable_checkpoint,
    on_damaged_setting,
)
from spotsafe.engine.saver import SaveJob, Saver
from spotsafe.engine.staged import recover_stage, wipe_stage
from spotsafe.engine.watch import NoticeHub, make_sources
from spotsafe.errors import ConfigError, CorruptCheckpointError, SpotsafeError
from spotsafe.exit_codes import EXIT_NO_USABLE_CHECKPOINT, EXIT_PREEMPTED
from spotsafe.notices.base import NoticeSource
from spotsafe.notices.signals import DEFAULT_SIGNALS
from spotsafe.policy.adaptive import OnNotice
from spotsafe.policy.interval import Choice, SaveContext, SavePolicy, every
from spotsafe.policy.retention import KeepLast
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
from spotsafe.telemetry.metrics import ENV_METRICS_ADDR, ENV_METRICS_PORT, Metrics, serve_metrics
from spotsafe.telemetry.store import EventUploader, read_history

log = logging.getLogger("spotsafe")

ENV_URL = "SPOTSAFE_CHECKPOINT_URL"
ENV_RUN_ID = "SPOTSAFE_RUN_ID"
ENV_ATTEMPT = "SPOTSAFE_ATTEMPT"
ENV_EVENTS_FILE = "SPOTSAFE_EVENTS_FILE"
ALREADY_SAVED = "already-saved"
STAGE_MARKER = "stage-of.json"


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
        stage_dir: a fast local folder: saves commit there first, then upload.
        async_save: snapshot into staging memory and write in the background (default);
            ``False`` writes on the training thread.
        incremental: write only the chunks that changed since the last commit; the new
            checkpoint shares the rest with older ones (exact: compared byte for byte).
        overlap: copy the optimizer-owned state while forward/backward run and block only
            before ``optimizer.step()`` (a step pre-hook on ``optimizer``).
        staging_budget: most host memory for staging (bytes, or ``"8GB"``); ``"auto"`` is half
            the machine's memory, ``None`` no limit. A bigger state is saved directly.
        when_busy: what an interval save does while the previous one is still being
            written: ``"wait"`` (default: keeps the steps the policy names) or ``"skip"`` (defer it to a later step).
        storage_options: passed to the fsspec file system (credentials, endpoint, ...).
        retry: how long to retry transient storage errors (default: 120 s budget).
        handle_signals: install handlers for ``signals`` (default SIGTERM, SIGINT, SIGUSR1).
        grace_s: seconds from a signal to the hard stop (its deadline); ``None``: unknown, or
            ``$SPOTSAFE_GRACE_SECONDS``, or 30 s under Kubernetes.
        exit_on_notice: after the emergency save, exit the process with
            :data:`~spotsafe.EXIT_PREEMPTED` (75). If ``False``, ``step_done`` returns
            and :attr:`stop_requested` is ``True``; the caller must stop.
        progress_interval: seconds between ``progress`` events (0: every step).
        metadata: JSON-serialisable values stored in every manifest.
        notices: ``"auto"`` (default): detect the provider (AWS, GCP, Azure), Kubernetes and
            Slurm from the environment (see :mod:`spotsafe.notices.detect`); or a list of
            notice sources, used as given (plus signal handling when ``handle_signals``).
        distributed: decide together with the other ranks of ``process_group`` (torch.distributed):
            every rank stops, saves and restores at the same step. ``None``: when torch.distributed
            is initialised with more than one rank. Each rank saves its own state; with a ``url``,
            under ``<url>/rank-<r>``.
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
        async_save: bool = True,
        incremental: bool = True,
        overlap: bool = False,
        staging_budget: int | str | None = "auto",
        when_busy: str = "wait",
        storage_options: Mapping[str, Any] | None = None,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        handle_signals: bool = True,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        grace_s: float | None = None,
        exit_on_notice: bool = True,
        progress_interval: float = 1.0,
        metadata: Mapping[str, Any] | None = None,
        notices: Iterable[NoticeSource] | str = "auto",
        distributed: bool | None = None,
        process_group: Any = None,
        storage: Storage | None = None,
        events: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        exit: Callable[[int], NoReturn] = sys.exit,
    ) -> None:
        self._closed = False
        self._hub: NoticeHub | None = None
        self._owned_log: EventLog | None = None
        self._metrics: Metrics | None = None
        self._saver: Saver | None = None
        self._hooks: list[Any] = []
        if url is None and storage is None:
            url = os.environ.get(ENV_URL)
            if not url:
                raise ConfigError(
                    f"no checkpoint location: pass Checkpointer(url=...) or set ${ENV_URL} (for example runs/my-run)"
                )
        # Every argument is checked before storage, the lease, the event log or a signal handler is touched.
        args = check_checkpointer_args(
            url=url,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            loader=loader,
            extra=extra,
            policy=policy,
            keep=keep,
            stage_dir=stage_dir,
            async_save=async_save,
            incremental=incremental,
            overlap=overlap,
            staging_budget=staging_budget,
            when_busy=when_busy,
            storage_options=storage_options,
            retry=retry,
            handle_signals=handle_signals,
            signals=signals,
            grace_s=grace_s,
            exit_on_notice=exit_on_notice,
            progress_interval=progress_interval,
            metadata=metadata,
            notices=notices,
            distributed=distributed,
            process_group=process_group,
            storage=storage,
            events=events,
            clock=clock,
            wall_clock=wall_clock,
            exit=exit,
        )
        self.metadata = args.metadata
        budget = args.staging_budget
        self.when_busy = when_busy
        self.optimizer = optimizer
        self.policy = policy if policy is not None else every(minutes=10)
        self.retention = KeepLast(keep)
        self.loader = loader
        self.notice_settings = next((p for p in self.policy.parts() if isinstance(p, OnNotice)), OnNotice())
        self._agreement = agree.Agreement(process_group) if _distributed(distributed, process_group) else None
        if self._agreement is not None and url is not None and storage is None:
            url = agree.rank_url(str(url), self._agreement.rank)
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
        self._history = read_history(self.storage)
        self._last_known_step = self._history.last_step
        self.costs = SaveCosts(s for s in self._history.saves)
        self._started_wall = wall_clock()
        self.run_id = os.environ.get(ENV_RUN_ID) or os.path.basename(str(self.storage.url).rstrip("/"))
        self.attempt = int(os.environ.get(ENV_ATTEMPT) or self._history.attempts + 1)
        self.lease = WriterLease.acquire(self.storage, run_id=self.run_id, attempt=self.attempt, clock=wall_clock)
        self.generation = self.lease.generation
        self.repo = CheckpointRepository(self.storage, clock=wall_clock, fence=self.lease.check)
        self.events: EventSink = events if events is not None else self._open_log()
        self._emit(ev.RunStarted, url=str(self.storage.url), host=socket.gethostname())
        self._emit(ev.WriterClaimed, generation=self.generation)
        for key in self.repo.remove_leftovers():
            self._emit(ev.PartialRemoved, path=key)
        stage = self._open_stage(LocalStorage(stage_dir)) if stage_dir is not None else None
        self._saver = Saver(
            self.repo,
            on_done=AfterSave(self.repo, self.retention, self._emit, measured=self.costs.add),
            on_staged=self._on_staged,
            budget=budget,
            background=async_save,
            incremental=incremental,
            overlap=overlap,
            stage=stage,
            owned=self._optimizer_owned,
            clock=clock,
        )
        if overlap and optimizer is not None:
            self._hooks.append(optimizer.register_step_pre_hook(lambda *_: self.before_optimizer_step()))

        try:
            sources, reasons = make_sources(
                args.notices, signals=args.signals, handle_signals=handle_signals, grace_s=grace_s
            )
            self._hub = NoticeHub(sources, reasons, self._emit)
            self._hub.start()
        except BaseException:
            self.close()
            raise
        self.board = self._hub.board
        self._choices: dict[str, Choice | None] = {}
        # Keyed by repr, not describe(): two parts may describe themselves alike.
        self._keyed_parts = [(repr(part), part) for part in self.policy.parts()]
        self._last_save_step: int | None = None
        self._failed_save_step: int | None = None
        self._last_save_time = clock()
        self._last_progress_time = -float("inf")
        self._stop_requested = False
        self._deferred = False

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
        port = os.environ.get(ENV_METRICS_PORT)
        if port:
            self._metrics = serve_metrics(self._owned_log, port, os.environ.get(ENV_METRICS_ADDR) or "0.0.0.0")
        return self._owned_log

    def _open_stage(self, stage: LocalStorage) -> tuple[CheckpointRepository, LocalStorage]:
        if stage.root_path == getattr(self.storage, "root_path", None):
            raise ConfigError("stage_dir must differ from the run's location")
        repo = CheckpointRepository(stage, clock=self._wall)
        owner = str(self.storage.url)
        try:
            marker = json.loads(stage.read(STAGE_MARKER)).get("run")
        except (SpotsafeError, ValueError, AttributeError):
            marker = None
        if marker == owner:  # only this run's local copies may be uploaded into it
            for ref in recover_stage(repo, stage, self.repo):
                self._emit(ev.StageRecovered, checkpoint=ref.name, step=ref.step)
        else:
            wipe_stage(stage)
        stage.write_atomic(STAGE_MARKER, json.dumps({"run": owner}).encode())
        return repo, stage

    def _optimizer_owned(self) -> set[int]:
        """Addresses of the parameters the optimizer updates (copied during overlap)."""
        if self.optimizer is None:
            return set()
        return {p.data_ptr() for group in self.optimizer.param_groups for p in group["params"] if p.numel()}

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
        return self._stop_requested or (self._hub is not None and self._hub.pending())

    # -- restore -------------------------------------------------------------
    def restore(self, *, strict: bool = True, on_damaged: str | None = None) -> int:
        """Load the newest verified checkpoint; return its step (0 when starting fresh).

        Damaged checkpoints are skipped with a ``checkpoint_skipped`` event and a
        logged warning. A checkpoint that verifies but does not fit the objects
        (another model shape, a missing component when ``strict``) raises
        :class:`~spotsafe.errors.CheckpointMismatchError`: an older one would not
        fit either.

        When the run has committed checkpoints and none can be restored, this raises
        :class:`~spotsafe.errors.NoUsableCheckpointError` (uncaught, the process exits with 65)
        naming each one and what is wrong with it, rather than start over.
        ``on_damaged="start_fresh"`` (or ``$SPOTSAFE_ON_DAMAGED=start_fresh``) starts from step 0
        instead. A storage error that outlives the retry budget is not damage: it is raised as it is.
        """
        check_restore_args(strict)
        mode = on_damaged_setting(on_damaged)
        started = self._clock()
        skipped: list[tuple[str, str]] = []

        def on_skip(ref: CheckpointRef, err: CorruptCheckpointError) -> None:
            skipped.append((ref.name, str(err)))
            log.warning("spotsafe: skipping checkpoint %s: %s", ref.name, err)
            self._emit(ev.CheckpointSkipped, checkpoint=ref.name, step=ref.step, reason=str(err))

        if self._agreement is not None:
            restored = load_agreed(self.repo, self._agreement, on_skip)
        else:
            restored = load_newest_valid(self.repo, on_skip)
        if restored is None:
            lost = bool(skipped)
            if self._agreement is not None:  # collective: any rank's committed progress stops every rank
                lost = not self._agreement.all_true(not (skipped or self.repo.candidates()))
            if lost and mode == FAIL:
                error = no_usable_checkpoint(str(self.storage.url), skipped)
                self._emit(ev.RestoreFailed, checkpoints=len(skipped), reason=str(error))
                self._emit(ev.RunExited, reason="no_usable_checkpoint", step=0, exit_code=EXIT_NO_USABLE_CHECKPOINT)
                log.error("spotsafe: %s", error)
                raise error
            if lost:
                message = (
                    f"starting from step 0 although {len(skipped) or 'other ranks'} committed checkpoint(s) exist "
                    f"(on_damaged={START_FRESH!r}); none could be restored"
                )
                log.warning("spotsafe: %s", message)
                self._emit(ev.RunWarning, message=message)
            self._emit(ev.RestoreFresh, skipped=len(skipped))
            self._react_after_restore()
            return 0
        name = restored.checkpoint.ref.name
        warn = lambda message: self._emit(ev.RunWarning, message=message)  # noqa: E731
        apply_states(self._components, restored.components, strict=strict, where=name, warn=warn)
        if self._saver is not None:
            live = Snapshot.capture(self.step, {n: c.state_dict() for n, c in self._components.items()})
            self._saver.adopt(restored.checkpoint, restored.decoded, [t for p in live.components for t in p.tensors])
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
        self._react_after_restore()
        return self.step

    def _react_after_restore(self) -> None:
        """A stop notice that came during the restore: the restored checkpoint is the resume point; stop now."""
        if self._agreement is None and self._hub is not None and self._hub.poll(self.step):
            self._handle_notice(self._hub.deadline)

    # -- the loop ------------------------------------------------------------
    def step_done(self) -> bool:
        """Count one completed step; save if due; handle notices. Returns whether it saved.

        With ``distributed``, every rank must call it at every step (ranks exchange a few numbers
        about every half second, see :mod:`spotsafe.engine.agreement`).
        Raises the error of a failed background save, once, at the next call after it failed. The
        step is counted first, so a caller that catches the error and trains on keeps an exact count.
        """
        self._settle()
        self._progress.step += 1
        if self.loader is not None and hasattr(self.loader, "epoch"):
            self._progress.epoch = int(self.loader.epoch)
        now = self._clock()
        if now - self._last_progress_time >= self.progress_interval:
            self._last_progress_time = now
            self._emit(ev.Progress, step=self.step, epoch=self.epoch)
        self._raise_save_failure()
        hub = self._hub
        assert hub is not None
        stop = hub.poll(self.step)
        if self._agreement is not None:
            return self._step_together(stop, now)
        ctx = self.save_context(now)
        self._note_choices(ctx)
        if stop:
            self._handle_notice(hub.deadline)
            return True
        warning = hub.take_warning() is not None and self.notice_settings.warnings == "save"
        if warning and self._last_save_step != self.step:
            return self.save(reason="warning") is not None
        if not self.policy.should_save(ctx):
            return False
        saved = self.save(reason="interval") is not None
        if hub.poll(self.step):
            self._handle_notice(hub.deadline)
        return saved

    def _step_together(self, stop: bool, now: float) -> bool:
        """``step_done`` with other ranks: at exchange steps (the same on every rank), act on the exchange
        posted at the previous one, then post this rank's flags (see :mod:`spotsafe.engine.agreement`)."""
        agreement, hub = self._agreement, self._hub
        assert agreement is not None and hub is not None
        ctx = self.save_context(now)
        self._note_choices(ctx)
        parts = self.policy.parts()
        saved = False
        # Step-count policies say the same on every rank: they need no exchange.
        if any(p.steps_only and p.should_save(ctx) for p in parts):
            saved = self.save(reason="interval") is not None
        if not agreement.due(self.step):
            return saved  # between exchange steps: notices and wall-clock saves wait for the next one
        decision = agreement.collect()
        if decision.stop:
            self._handle_notice(decision.deadline)
            return True
        if (decision.warning or decision.save) and self._last_save_step != self.step:
            saved = self.save(reason="warning" if decision.warning else "interval") is not None
        ctx = self.save_context(now)
        warning = hub.take_warning() is not None and self.notice_settings.warnings == "save"
        due = any(not p.steps_only and p.should_save(ctx) for p in parts)
        agreement.post(self.step, stop=stop or hub.pending(), warning=warning, save=due, deadline=hub.deadline)
        return saved

    def save_context(self, now: float | None = None) -> SaveContext:
        """What the save policy sees now: counters, measured save and restart costs, the run's interruptions."""
        now = self._clock() if now is None else now
        restarts = sorted(self._history.restart_s)
        last = self._last_save_step if self._last_save_step is not None else self._failed_save_step
        return SaveContext(
            step=self.step,
            steps_since_save=self.step - (last or 0),
            seconds_since_save=now - self._last_save_time,
            stall_s=self.costs.stall_s,
            commit_s=self.costs.commit_s,
            restart_s=restarts[len(restarts) // 2] if restarts else None,
            run_s=self._history.run_s + max(0.0, self._wall() - self._started_wall),
            interruptions=self._history.interruptions,
            unnoticed=self._history.unnoticed,
        )

    def _note_choices(self, ctx: SaveContext) -> None:
        """An ``interval_chosen`` event for each policy whose interval is new (or changed by >25%)."""
        for key, part in self._keyed_parts:
            choice = part.choose(ctx)
            if choice is not None and choice.differs(self._choices.get(key)):
                self._choices[key] = choice
                self._emit(
                    ev.IntervalChosen,
                    policy=part.describe(),
                    interval_s=choice.seconds,
                    interval_steps=choice.steps,
                    reason=choice.reason,
                )

    def _handle_notice(self, deadline: float | None) -> None:
        """Stop: the emergency save that fits before ``deadline`` (Unix time), then exit 75."""
        self._stop_requested = True
        hub = self._hub
        assert hub is not None
        started = self._wall()
        try:
            self._wait_for_save()
        except Exception as err:  # noqa: BLE001 - the emergency save below is what matters now
            log.error("spotsafe: the save in flight failed (%s); saving again", redact(str(err)))
            self._last_save_step = None
        first = hub.first
        source = first.source if first is not None else "another rank"
        nothing_new = self._last_save_step == self.step or (self._last_save_step is None and self.step == 0)
        if nothing_new:
            why = "a checkpoint of this step is already committed" if self.step else "nothing trained yet"
            plan, choice = Plan(None, (), None, why), ALREADY_SAVED
        else:
            plan = self._plan_emergency(deadline)
            choice = plan.name
            log.warning("spotsafe: stop notice from %s at step %d: %s (%s)", source, self.step, plan.name, plan.reason)
        self._emit(
            ev.EmergencyPlanned,
            step=self.step,
            source=source,
            deadline=deadline,
            time_left_s=plan.time_left_s,
            choice=choice,
            estimate_s=plan.choice.estimate_s if plan.choice is not None else None,
            options=plan.estimates(),
            reason=plan.reason,
        )
        committed = nothing_new
        if plan.choice is not None:
            option = plan.choice
            writing = False
            job: SaveJob | None = None
            try:
                self.save(reason="notice", full=option.full, via_stage=option.route == STAGED)
                job = self._saver.current if self._saver is not None else None
                committed = self._await_emergency(deadline)
                writing = not committed
            except Exception as err:  # noqa: BLE001 - the last verified checkpoint stays the resume point
                log.error(
                    "spotsafe: emergency save failed (%s); the last committed checkpoint is the resume point", err
                )
            done = self._wall()
            if writing:
                log.warning(
                    "spotsafe: the emergency save is still being written at the deadline; it goes on until the "
                    "machine is taken, and the last committed checkpoint is the resume point unless it finishes"
                )
            self._emit(
                ev.EmergencyFinished,
                step=self.step,
                choice=option.name,
                committed=committed,
                deadline=deadline,
                before_deadline=None if deadline is None or not committed else done <= deadline,
                margin_s=None if deadline is None or not committed else deadline - done,
                duration_s=done - started,
                still_writing=writing,
                local_committed=None if job is None or not job.staged_route else job.local_s is not None,
            )
        hub.after_stop(committed)
        hub.poll(self.step)
        self._emit(ev.RunExited, reason="preempted", step=self.step, exit_code=EXIT_PREEMPTED)
        if self.exit_on_notice:
            self.close()
            self._exit(EXIT_PREEMPTED)

    def _await_emergency(self, deadline: float | None) -> bool:
        """Wait for the emergency save until ``deadline`` minus the margin; whether it committed by then.

        Raises its error if it failed. When it is still being written at the deadline, the caller
        records the stop and exits, and ``close()`` keeps waiting for it until the machine is taken.
        """
        saver = self._saver
        assert saver is not None
        if deadline is None:
            self._wait_for_save()
            return True
        left = deadline - self.notice_settings.margin_s - self._wall()
        if not saver.wait(max(0.0, left)):
            return False
        self._raise_save_failure()
        return True

    def _plan_emergency(self, deadline: float | None) -> Plan:
        saver = self._saver
        assert saver is not None
        states = {n: c.state_dict() for n, c in self._components.items()}
        snapshot = Snapshot.capture(self.step, states)
        total = sum(t.numel() * t.element_size() for p in snapshot.components for t in p.tensors)
        staged = saver.stage is not None
        options = options_for(self.costs, total_bytes=total, can_share=saver.can_share, staged=staged)
        preferred = STAGED if staged else INCREMENTAL if saver.can_share else FULL
        settings = self.notice_settings
        time_left = None if deadline is None else deadline - self._wall() - settings.margin_s
        return plan_emergency(options, time_left_s=time_left, safety=settings.safety, preferred=preferred)

    # -- saving --------------------------------------------------------------
    @property
    def saving(self) -> bool:
        """A save is being written in the background."""
        return self._saver is not None and self._saver.busy

    @property
    def staging_bytes(self) -> int:
        """Host memory held for staging snapshots (reused by every save)."""
        return self._saver.staging_bytes if self._saver is not None else 0

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        self._wait_for_save()

    def before_optimizer_step(self) -> None:
        """With ``overlap=True``: wait until the snapshot copy of the optimizer-owned state is done.

        Called automatically by a step pre-hook on the registered optimizer; call it yourself
        right before anything else that modifies parameters or optimizer state in place (a
        second optimizer, manual weight updates, an EMA written with ``.data``). A no-op when no
        overlapped copy is running.
        """
        if self._saver is not None:
            self._saver.settle()

    _settle = before_optimizer_step

    def _wait_for_save(self) -> None:
        if self._saver is not None:
            self._saver.wait()
        self._raise_save_failure()

    def save(
        self, reason: str = "manual", *, full: bool = False, via_stage: bool | None = None
    ) -> CheckpointRef | None:
        """Checkpoint the current state now; return the checkpoint's name.

        Returns once the state is staged (training may change it); a ``final`` save, and
        every save with ``async_save=False``, return once committed. An
        ``interval`` save while the previous one is still being written is deferred
        (``None``) when ``when_busy="skip"``; every other save waits for it first.
        ``full=True`` writes every byte; ``via_stage=False`` bypasses ``stage_dir``.
        """
        check_save_args(reason, full, via_stage)
        if self._closed:
            raise RuntimeError("this Checkpointer is closed")
        saver = self._saver
        assert saver is not None
        saver.settle()
        if saver.busy and reason == "interval" and self.when_busy == "skip":
            if not self._deferred:
                self._deferred = True
                self._emit(
                    ev.SaveSkipped, step=self.step, reason=reason, why="the previous save is still being written"
                )
            return None
        self._wait_for_save()
        self._deferred = False
        step = self.step
        self._emit(ev.SaveStarted, step=step, reason=reason)
        try:
            job = saver.save(
                step,
                reason,
                {n: c.state_dict() for n, c in self._components.items()},
                generation=self.generation,
                metadata=self.metadata,
                writer=self._writer_info(reason),
                full=full,
                via_stage=via_stage,
            )
        except BaseException:
            # A direct save failed here (a background one fails at the next call): the same bookkeeping.
            self._failed_save_step, self._last_save_step = step, None
            self._last_save_time = self._clock()
            raise
        self._last_save_step = step
        self._last_save_time = self._clock()
        if job.background and reason == "final":
            self._wait_for_save()
        return job.ref

    def _on_staged(self, job: SaveJob) -> None:
        assert self._saver is not None
        self._emit(
            ev.SaveStaged,
            step=job.step,
            checkpoint=job.ref.name,
            reason=job.reason,
            bytes=job.stats.bytes,
            stall_s=job.stall_s,
            copied_bytes=job.stats.copied_bytes,
            staging_bytes=self._saver.staging_bytes,
            overlapped=bool(job.deferred),
        )

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

    def _raise_save_failure(self) -> None:
        failure = self._saver.take_failure() if self._saver is not None else None
        if failure is not None:
            # Nothing of that step is saved: finish() and a notice save it again; the interval
            # policy still counts from the failed attempt (it is tried again at the next interval).
            self._failed_save_step, self._last_save_step = self._last_save_step, None
            raise failure

    def finish(self) -> None:
        """Save the final state (unless the last save was at this step), wait until it is durable, close."""
        self._wait_for_save()
        if self._last_save_step != self.step:
            self.save(reason="final")
        self._wait_for_save()
        self._emit(ev.RunExited, reason="finished", step=self.step, exit_code=0)
        self.close()

    def close(self) -> None:
        """Finish a save in flight, put signal handlers back, close the event log. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._agreement is not None:
            # Every rank posted the last exchange, so it completes; collecting it leaves no collective in flight.
            with contextlib.suppress(Exception):
                self._agreement.collect()
        if self._saver is not None:
            self._saver.close()
            failure = self._saver.take_failure()
            if failure is not None:
                log.error("spotsafe: the last save failed: %s", redact(str(failure)))
        for hook in self._hooks:
            hook.remove()
        if self._hub is not None:
            self._hub.close()
        if self._owned_log is not None:
            self._owned_log.close()
        if self._metrics is not None:
            self._metrics.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _distributed(setting: bool | None, group: Any) -> bool:
    if setting is None:
        return agree.active(group)
    if setting and not agree.active(group):
        raise ConfigError("distributed=True needs torch.distributed initialised with more than one rank")
    return setting
