"""The Checkpointer: what a training loop talks to.

A plain loop needs five lines (README, "Five lines in your loop"): ``Checkpointer(url, model=...,
optimizer=..., policy=...)``, ``restore()``, ``step_done()`` after every step, ``finish()``.

Call sequence (each step's contract is in the method's docstring):

1. ``Checkpointer(...)``: checks every argument (:mod:`spotsafe.engine.config`), opens the effects
   (:mod:`spotsafe.engine.effects`: storage, writer lease, event log, notice sources; main thread
   only, unless ``handle_signals=False``), then registers the components it was given.
2. ``register(name, obj)``: more components (a framework's optimizer, once built), before ``restore()``.
3. ``restore()``: the newest verified checkpoint, loaded into the components.
4. ``step_done()`` after every optimizer step: does what :mod:`spotsafe.engine.step_decision` says:
   save, stop (:mod:`spotsafe.engine.emergency_save`, then exit 75), exchange flags with other ranks.
5. ``finish()``: the final checkpoint, then ``close()``, which releases everything in reverse order.

Durability when ``save()`` returns: the state is copied into staging memory and being written in the
background (training may change it at once); a ``final`` save, or any save with ``async_save=False``,
has committed. A background failure is raised by the next call (and is a ``save_failed`` event).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

import torch

from spotsafe.engine import agreement as agree
from spotsafe.engine.components import OPTIMIZER, Components, LoopCounters
from spotsafe.engine.config import NoticeConfig, SaveConfig, StorageConfig, located, replace_url, settings
from spotsafe.engine.effects import open_effects
from spotsafe.engine.emergency_save import EmergencySave
from spotsafe.engine.options import NAMED, check_components, check_effects, check_restore_args, check_save_args
from spotsafe.engine.reader import restore_newest
from spotsafe.engine.saver import Saver
from spotsafe.engine.saves import SaveTracker
from spotsafe.engine.step_loop import StepLoop
from spotsafe.engine.world import check_world
from spotsafe.errors import ConfigError
from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.jobenv import JobEnv
from spotsafe.notices.base import NoticeSource
from spotsafe.notices.signals import DEFAULT_SIGNALS
from spotsafe.policy.adaptive import OnNotice
from spotsafe.policy.interval import SaveContext, SavePolicy
from spotsafe.reasons import ExitReason, SaveReason
from spotsafe.storage.base import Storage
from spotsafe.storage.repository import CheckpointRef
from spotsafe.storage.retry import DEFAULT_RETRY, StorageRetry
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventSink
from spotsafe.trackers import Tracker, check_trackers


class Checkpointer:
    """Saves and restores the full training state of one run.

    ``url`` and most keywords are fields of one settings group each, documented there:
    :class:`~spotsafe.engine.config.StorageConfig` (``url``, ``stage_dir``, ``storage_options``, ``retry``),
    :class:`~spotsafe.engine.config.SaveConfig` (``policy``, ``keep``, ``async_save``, ``incremental``,
    ``overlap``, ``staging_budget``, ``when_busy``, ``metadata``, ``progress_interval``, ``sharded``) and
    :class:`~spotsafe.engine.config.NoticeConfig` (``notices``, ``handle_signals``, ``signals``, ``grace_s``,
    ``exit_on_notice``). ``storage_config=``, ``save_config=``, ``notice_config=`` pass a group whole
    (then leave its keywords out); the groups are attributes of the same names.

    Args:
        model, optimizer, scheduler, scaler, loader: registered as components of those names
            (any may be ``None``); ``loader`` may be a ``torch.utils.data.DataLoader`` (made resumable in
            place, keeping its order: :class:`~spotsafe.LoaderPosition`), a :class:`~spotsafe.ResumableLoader`,
            a ``LoaderPosition``, or any object with ``state_dict``/``load_state_dict``.
        extra: more named components: objects with ``state_dict``/``load_state_dict``, or
            ``torch.Generator`` / ``numpy.random.Generator`` objects. See :meth:`register`.
        distributed: decide together with the other ranks of ``process_group`` (torch.distributed):
            every rank stops, saves and restores at the same step. ``None``: when torch.distributed
            is initialised with more than one rank. Each rank saves its own state; with a ``url``,
            under ``<url>/rank-<r>``; with ``sharded=True``, all ranks save one checkpoint at ``<url>``,
            resumable at another number of ranks (:mod:`spotsafe.engine.sharded_state`).
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
        retry: StorageRetry | None = DEFAULT_RETRY,
        handle_signals: bool = True,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        grace_s: float | None = None,
        exit_on_notice: bool = True,
        progress_interval: float = 1.0,
        metadata: Mapping[str, Any] | None = None,
        sharded: bool = False,
        notices: Iterable[NoticeSource] | str = "auto",
        distributed: bool | None = None,
        process_group: Any = None,
        save_config: SaveConfig | None = None,
        notice_config: NoticeConfig | None = None,
        storage_config: StorageConfig | None = None,
        trackers: Sequence[Tracker] | None = None,
        storage: Storage | None = None,
        events: EventSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        exit: Callable[[int], NoReturn] = sys.exit,
    ) -> None:
        self._closed = True  # nothing to close until the effects are open
        keywords = dict(locals())  # a settings field is set by the keyword of the same name
        # 1. Settings and components, checked before storage, the lease, the event log or a signal handler.
        job = JobEnv.from_env()
        storage_cfg = located(settings(StorageConfig, storage_config, keywords), storage, job.checkpoint_url)
        self.save_config = settings(SaveConfig, save_config, keywords)
        self.notice_config = settings(NoticeConfig, notice_config, keywords)
        if self.save_config.sharded and storage_cfg.stage_dir is not None:
            raise ConfigError("stage_dir is not available with sharded=True yet: leave it out")
        named = {name: keywords[name] for name in NAMED}
        check_components(named, extra, overlap=self.save_config.overlap)
        check_effects(keywords)
        tracked = check_trackers(trackers)
        self._agreement = agree.agreement_for(distributed, process_group)
        self._run_location, self._injected = storage_cfg, storage is not None
        if self._agreement is not None and storage is None:
            storage_cfg = replace_url(storage_cfg, agree.rank_url(str(storage_cfg.url), self._agreement.rank))
        self.storage_config = storage_cfg
        self._clock, self._exit, started_wall = clock, exit, wall_clock()
        self._components = Components(LoopCounters())
        # 2. Effects, opened in one place and closed in reverse by close(); the parts that use them.
        fx = self._effects = open_effects(
            storage_cfg,
            self.save_config,
            self.notice_config,
            storage=storage,
            events=events,
            job=job,
            agreement=self._agreement,
            run_location=self._run_location,
            process_group=process_group,
            owned=self._components.optimizer_owned,
            clock=clock,
            wall=wall_clock,
            trackers=tracked,
        )
        self._closed = self._restored = self._stop_requested = False
        self._states: Callable[[], dict[str, Any]] = self._components.states
        if self.save_config.sharded:  # imported only when used: torch.distributed.checkpoint is slow to import
            from spotsafe.engine.sharded_state import sharded_states

            self._states = lambda: sharded_states(self._components)
        self.storage, self.repo, self.lease, self.events = fx.storage, fx.repo, fx.lease, fx.events
        self.run_id, self.attempt, self.generation = fx.run_id, fx.attempt, fx.lease.generation
        self.costs, self.board = fx.costs, fx.hub.board
        self._saves = SaveTracker(fx, self.save_config, clock=clock)
        self._emergency = EmergencySave(fx, self._saves, self.notice_settings)
        self._loop = StepLoop(
            fx,
            self._saves,
            self._components,
            config=self.save_config,
            notice=self.notice_settings,
            agreement=self._agreement,
            save=lambda reason: self.save(reason=reason),
            stop=self._stop,
            clock=clock,
            started_wall=started_wall,
        )
        # 3. Components: the ones given here are registered like later ones.
        try:
            for name, obj in {**named, **(extra or {})}.items():
                if obj is not None:
                    self.register(name, obj)
        except BaseException:
            self.close()
            raise

    # -- settings and components ---------------------------------------------------
    @property
    def policy(self) -> SavePolicy:
        """When regular checkpoints are taken."""
        return self.save_config.policy

    @property
    def notice_settings(self) -> OnNotice:
        """The emergency save's settings: the policy's ``on_notice(...)`` part, or the defaults."""
        return next((p for p in self.policy.parts() if isinstance(p, OnNotice)), OnNotice())

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.save_config.metadata or {})

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._components.get(OPTIMIZER)  # type: ignore[no-any-return]

    @property
    def loader(self) -> Any:
        return self._components.get("loader")

    def register(self, name: str, obj: object) -> None:
        """Add the component ``obj`` under ``name``: saved with every checkpoint, restored by ``restore()``.

        ``obj`` is :class:`~spotsafe.engine.components.Stateful` (``state_dict``/``load_state_dict``) or a
        torch/numpy generator. ``"optimizer"`` (a ``torch.optim.Optimizer``) and ``"loader"`` play the
        roles they play as constructor arguments: the optimizer's step pre-hook ends an overlapped
        copy, the loader gives :attr:`epoch`. Raises :class:`~spotsafe.errors.ConfigError` after
        ``restore()`` or ``close()``, for a name already taken or reserved, and for an object that is not
        Stateful; nothing is registered then.
        """
        if self._restored:
            raise ConfigError(
                f"register({name!r}, ...) after restore(): it would not be restored (the checkpoint was "
                "already loaded), and the resumed run would not be exact; register every component before restore()"
            )
        if self._closed:
            raise ConfigError(f"register({name!r}, ...) on a closed Checkpointer")
        self._components.add(name, obj)
        if name == OPTIMIZER and self.save_config.overlap:
            assert isinstance(obj, torch.optim.Optimizer)
            hook = obj.register_step_pre_hook(lambda *_: self.before_optimizer_step())
            self._effects.on_close(hook.remove)

    # -- counters ------------------------------------------------------------
    @property
    def step(self) -> int:
        """Optimizer steps completed (restored from the checkpoint on resume)."""
        return self._components.counters.step

    @property
    def epoch(self) -> int:
        """The loader's epoch when a loader is registered, else the value you set."""
        return self._components.epoch()

    @epoch.setter
    def epoch(self, value: int) -> None:
        if self._components.loader_epoch() is not None:
            raise AttributeError("the epoch comes from the registered loader; it cannot be set here")
        self._components.counters.epoch = int(value)

    @property
    def stop_requested(self) -> bool:
        """True once an interruption notice arrived; the loop must stop taking work."""
        return self._stop_requested or self._effects.hub.pending()

    @property
    def stopped(self) -> bool:
        """True once the stop path ran: the emergency save is done and, with ``exit_on_notice=False``, the loop must
        end now. (``stop_requested`` is true earlier, while a notice is pending; with several ranks the stop comes
        at the step the ranks agree on.)"""
        return self._stop_requested

    # -- restore -------------------------------------------------------------
    def restore(self, *, strict: bool = True, on_damaged: str | None = None) -> int:
        """Load the newest verified checkpoint; return its step (0 when starting fresh).

        Damaged checkpoints are skipped with a ``checkpoint_skipped`` event and a logged warning. A
        checkpoint that verifies but does not fit the components (another model shape, a missing
        component when ``strict``) raises :class:`~spotsafe.errors.CheckpointMismatchError`: an older one
        would not fit either.

        When the run has committed checkpoints and none can be restored, this raises
        :class:`~spotsafe.errors.NoUsableCheckpointError` (uncaught, the process exits with 65) naming
        each one and what is wrong with it, rather than start over. ``on_damaged="start_fresh"`` (or
        ``$SPOTSAFE_ON_DAMAGED=start_fresh``) starts from step 0 instead. A storage error that outlives
        the retry budget is not damage: it is raised as it is. Components cannot be registered after it.
        Checkpoints written by another number of processes (one, or ``N`` ranks) raise
        :class:`~spotsafe.errors.WorldSizeMismatchError` (uncaught: exit 2), see :mod:`spotsafe.engine.world`.
        """
        check_restore_args(strict)
        self._restored = True
        fx = self._effects
        if self.save_config.sharded:  # one checkpoint for all ranks, at the run's location
            from spotsafe.engine.sharded_restore import restore_sharded
            from spotsafe.engine.sharded_saver import ShardedSaver

            assert isinstance(fx.saver, ShardedSaver)
            load, repo = functools.partial(restore_sharded, saver=fx.saver), fx.saver.repo
        else:
            assert isinstance(fx.saver, Saver)
            check_world(self._run_location, fx.storage, self._agreement, injected=self._injected, emit=fx.emit)
            load, repo = functools.partial(restore_newest, saver=fx.saver), fx.repo
        step = load(
            repo,
            self._components,
            agreement=self._agreement,
            strict=strict,
            on_damaged=on_damaged,
            env_on_damaged=JobEnv.from_env().on_damaged,
            last_known_step=fx.history.last_step,
            restored=self._saves.restored,
            emit=fx.emit,
            clock=self._clock,
        )
        # A stop notice that came during the restore: the restored checkpoint is the resume point; stop now.
        if self._agreement is None and fx.hub.poll(self.step):
            self._stop(fx.hub.deadline)
        return 0 if step is None else self.step

    # -- the loop ------------------------------------------------------------
    def step_done(self) -> bool:
        """Count one completed step; save if due; handle notices. Returns whether it saved.

        With ``distributed``, every rank must call it at every step (ranks exchange a few numbers
        about every half second, see :mod:`spotsafe.engine.agreement`).
        Raises the error of a failed background save, once, at the next call after it failed. The
        step is counted first, so a caller that catches the error and trains on keeps an exact count.
        """
        return self._loop.step_done()

    def _stop(self, deadline: float | None) -> None:
        """The stop path: the emergency save that fits before ``deadline`` (Unix time), then exit 75."""
        self._stop_requested = True
        self._emergency.run(self.step, self._states, deadline)
        self._effects.emit(ev.RunExited, reason=ExitReason.PREEMPTED, step=self.step, exit_code=EXIT_PREEMPTED)
        if self.notice_config.exit_on_notice:
            self.close()
            self._exit(EXIT_PREEMPTED)

    def save_context(self, now: float | None = None) -> SaveContext:
        """What the save policy sees now: counters, measured save and restart costs, the run's interruptions."""
        return self._loop.save_context(now)

    # -- saving --------------------------------------------------------------
    @property
    def saving(self) -> bool:
        """A save is being written in the background."""
        return self._saves.busy

    @property
    def staging_bytes(self) -> int:
        """Host memory held for staging snapshots (reused by every save)."""
        return self._effects.saver.staging_bytes

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error if it failed."""
        self._saves.wait()

    def before_optimizer_step(self) -> None:
        """With ``overlap=True``: wait until the snapshot copy of the optimizer-owned state is done.

        Called automatically by a step pre-hook on the registered optimizer; call it yourself
        right before anything else that modifies parameters or optimizer state in place (a
        second optimizer, manual weight updates, an EMA written with ``.data``). A no-op when no
        overlapped copy is running.
        """
        self._effects.saver.settle()

    def save(
        self, reason: SaveReason | str = SaveReason.MANUAL, *, full: bool = False, via_stage: bool | None = None
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
        return self._saves.save(self.step, reason, self._states, full=full, via_stage=via_stage)

    def finish(self) -> None:
        """Save the final state (unless the last save was at this step), wait until it is durable, close."""
        self._saves.wait()
        if self._saves.last_step != self.step:
            self.save(reason=SaveReason.FINAL)
        self._saves.wait()
        self._effects.emit(ev.RunExited, reason=ExitReason.FINISHED, step=self.step, exit_code=0)
        self.close()

    def close(self) -> None:
        """Finish a save in flight, put signal handlers back, close the event log. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._effects.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Checkpointer", "NoticeConfig", "SaveConfig", "StorageConfig"]
