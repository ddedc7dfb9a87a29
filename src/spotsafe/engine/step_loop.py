"""``step_done()``'s work: count the step, record progress, then do what the step decision says.

:class:`StepLoop` gathers the :class:`~spotsafe.engine.step_decision.StepContext` (polling the
notice sources; at an exchange step, collecting what the ranks agreed), asks
:func:`~spotsafe.engine.step_decision.decide`, and carries the action out: saves through
``save(reason)``, a stop through ``stop(deadline)`` (the checkpointer's stop path, which may exit),
and at an exchange step posts this rank's flags. It also records ``progress`` and
``interval_chosen`` events. Training thread only.
"""

from __future__ import annotations

from collections.abc import Callable

from spotsafe.engine.agreement import Agreement
from spotsafe.engine.components import Components
from spotsafe.engine.config import SaveConfig
from spotsafe.engine.effects import Effects
from spotsafe.engine.saves import SaveTracker
from spotsafe.engine.step_decision import Exchange, StepContext, decide, flags_to_post
from spotsafe.policy.adaptive import OnNotice
from spotsafe.policy.interval import Choice, SaveContext
from spotsafe.reasons import SaveReason
from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.repository import CheckpointRef
from spotsafe.telemetry import events as ev


class StepLoop:
    """Runs ``step_done()`` for one checkpointer (see the module docstring)."""

    def __init__(
        self,
        effects: Effects,
        saves: SaveTracker,
        components: Components,
        *,
        config: SaveConfig,
        notice: OnNotice,
        agreement: Agreement | None,
        save: Callable[[SaveReason], CheckpointRef | None],
        stop: Callable[[float | None], None],
        clock: Callable[[], float],
        started_wall: float,
    ) -> None:
        self.policy = config.policy
        self.progress_interval = config.progress_interval
        self.warnings_save = notice.warnings == "save"
        self.components = components
        self.counters = components.counters
        self.saves = saves
        self.hub = effects.hub
        self.history = effects.history
        self.costs = effects.costs
        self._emit = effects.emit
        self.agreement = agreement
        self._save = save
        self._stop = stop
        self._clock = clock
        self._wall = effects.emit.wall
        self._started_wall = started_wall
        self._last_progress = -float("inf")
        self._choices: dict[str, Choice | None] = {}
        # Fixed for the process, so worked out once rather than at every step:
        # each policy part keyed by repr (not describe(): two parts may describe themselves alike) ...
        self._keyed_parts = [(repr(part), part) for part in self.policy.parts()]
        # ... and the median restart time of earlier attempts (the history is read once, at start).
        restarts = sorted(effects.history.restart_s)
        self._restart_s = restarts[len(restarts) // 2] if restarts else None

    def step_done(self) -> bool:
        """One step completed (see :meth:`~spotsafe.Checkpointer.step_done`); whether a save went through."""
        saver = self.saves.saver
        saver.settle()
        if not saver.prepared:  # the process's first step is done, undisturbed; the optimizer's state exists now
            saver.prepare(Snapshot.capture(self.counters.step, self.components.states()))
        self.counters.step += 1
        epoch = self.components.loader_epoch()
        if epoch is not None:
            self.counters.epoch = epoch
        step = self.counters.step
        now = self._clock()
        if now - self._last_progress >= self.progress_interval:
            self._last_progress = now
            self._emit(ev.Progress, step=step, epoch=self.counters.epoch)
        self.saves.raise_failure()
        hub = self.hub
        ctx = self.context(hub.poll(step), now)
        action = decide(ctx)
        saved = any(self._save(reason) is not None for reason in action.saves)  # stops at the first that goes through
        if action.stop:
            self._stop(action.deadline)
            return True
        if action.recheck and hub.poll(step):
            self._stop(hub.deadline)
        if action.post and self.agreement is not None:
            flags = flags_to_post(
                self.policy,
                self.save_context(now),
                stop=ctx.stop or hub.pending(),
                warning=ctx.warning and ctx.warnings_save,
                deadline=hub.deadline,
            )
            self.agreement.post_flags(step, flags)
        return saved

    def context(self, stop: bool, now: float) -> StepContext:
        """What :func:`decide` sees now. At an exchange step it collects the last exchange; it takes the warning."""
        hub, agreement = self.hub, self.agreement
        save = self.save_context(now)
        self._note_choices(save)
        exchange = None
        if agreement is None:
            warning = not stop and hub.take_warning() is not None
        else:
            due = agreement.due(self.counters.step)
            agreed = agreement.collect() if due else None
            warning = agreed is not None and not agreed.stop and hub.take_warning() is not None
            exchange = Exchange(due=due, agreed=agreed)
        return StepContext(
            step=self.counters.step,
            policy=self.policy,
            save=save,
            last_save_step=self.saves.last_step,
            stop=stop,
            deadline=hub.deadline,
            warning=warning,
            warnings_save=self.warnings_save,
            exchange=exchange,
        )

    def save_context(self, now: float | None = None) -> SaveContext:
        """What the save policy sees now: counters, measured save and restart costs, the run's interruptions."""
        now = self._clock() if now is None else now
        history, saves = self.history, self.saves
        last = saves.last_step if saves.last_step is not None else saves.failed_step
        return SaveContext(
            step=self.counters.step,
            steps_since_save=self.counters.step - (last or 0),
            seconds_since_save=now - saves.last_time,
            stall_s=self.costs.stall_s,
            commit_s=self.costs.commit_s,
            restart_s=self._restart_s,
            run_s=history.run_s + max(0.0, self._wall() - self._started_wall),
            interruptions=history.interruptions,
            unnoticed=history.unnoticed,
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
