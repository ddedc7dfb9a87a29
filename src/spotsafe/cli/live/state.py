"""What a supervised job is doing right now, from its run's events: a pure state machine (no I/O, no clock).

The phase and its text are this module's; the figures (interruptions so far) are the run model's
(:mod:`spotsafe.telemetry.runmodel`), fed the same events one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from spotsafe.reasons import ExitReason, SaveReason
from spotsafe.supervisor.process import describe_exit
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import LoggedEvent
from spotsafe.telemetry.runmodel import RunModel
from spotsafe.telemetry.runrecords import CAPACITY_TAKEN, NO_CAPACITY, SUCCEEDED


class Phase(StrEnum):
    STARTING = "starting"
    RESTORING = "restoring"
    RESTORED = "restored"
    TRAINING = "training"
    SAVING = "saving"
    STOPPING = "stopping"
    EXITING = "exiting"
    ENDED = "ended"
    WAITING = "waiting"
    CAPACITY = "capacity"
    FINISHED = "finished"
    FAILED = "failed"


INTERRUPTED = CAPACITY_TAKEN
"""Exit classes that are interruptions (the capacity was taken), not errors."""


@dataclass
class LiveState:
    """What a supervised job is doing, from its run's events. Feed events to :meth:`apply` in log order.

    ``total`` is the step the job runs to, when known. Job events of an attempt other than the current
    one (a late upload, a process left from an earlier attempt) do not move the state.
    """

    total: int | None = None
    phase: Phase = Phase.STARTING
    text: str = "starting"
    step: int | None = None
    attempt: int | None = None
    pool: str | None = None
    checkpoint_step: int | None = None
    """The newest step this run committed or restored, as far as the events tell."""
    done: bool = False
    ok: bool | None = None
    model: RunModel = field(default_factory=lambda: RunModel(series=False), repr=False)
    """Every event this state saw, folded (the figures come from it)."""
    _notice: str | None = field(default=None, init=False, repr=False)
    _background: int | None = field(default=None, init=False, repr=False)
    _last_class: str | None = field(default=None, init=False, repr=False)

    @property
    def interruptions(self) -> int:
        """Interruptions so far: those the drill's market delivered, else attempts that ended preempted or killed."""
        return self.model.capacity_interruptions

    def apply(self, logged: LoggedEvent) -> bool:
        """Take one event; returns whether the phase or its text changed."""
        event = logged.event
        self.model.apply(logged)
        if (
            event.type not in ev.SUPERVISOR_TYPES
            and self.attempt is not None
            and logged.attempt not in (0, self.attempt)
        ):
            return False
        before = (self.phase, self.text)
        self._apply(event)
        return (self.phase, self.text) != before

    def _set(self, phase: Phase, text: str) -> None:
        self.phase, self.text = phase, text

    def _stopping(self) -> str:
        return f"stopping on a notice from {self._notice}" if self._notice else "stopping"

    def _training(self) -> str:
        return "training" + (
            f" (writing checkpoint step {self._background} in the background)" if self._background is not None else ""
        )

    def _apply(self, event: ev.Event) -> None:
        match event:
            # -- the supervisor ------------------------------------------------------------------------------------
            case ev.PoolChosen():
                self.pool = event.pool
            case ev.Escalated():
                self._set(Phase.STARTING, f"moving to on-demand capacity: {event.reason}")
            case ev.AttemptStarted():
                self.attempt, self.pool = event.number, event.pool
                self._notice, self._background = None, None
                if event.step_before is not None:
                    self.step = event.step_before
                where = event.pool + (f" ({event.market})" if event.market != "spot" else "")
                if self.phase is Phase.CAPACITY and self._last_class == NO_CAPACITY:
                    self.text = f"waiting for capacity in {where}: trying attempt {event.number}"
                else:
                    self._set(Phase.STARTING, f"starting attempt {event.number} on {where}")
            case ev.AttemptEnded():
                self._last_class = event.exit_class
                if self.step is None and event.step_after is not None:
                    self.step = event.step_after
                if event.exit_class == NO_CAPACITY:
                    self._set(Phase.CAPACITY, f"waiting for capacity in {event.pool}: it has none")
                elif event.exit_class == SUCCEEDED:
                    self._set(Phase.ENDED, f"attempt {event.number} succeeded")
                else:
                    code = f"{describe_exit(event.exit_code)}, " if event.exit_code is not None else ""
                    after = event.step_after if event.step_after is not None else "none"
                    self._set(
                        Phase.ENDED,
                        f"attempt {event.number} ended: {event.exit_class} ({code}checkpoint step {after})",
                    )
            case ev.RetryDecided():
                if not event.relaunch:
                    self._set(Phase.ENDED, f"not relaunching: {event.reason}")
                elif self.phase is Phase.CAPACITY:
                    where = f" in {self.pool}" if self.pool else ""
                    self.text = f"waiting for capacity{where}: next try in {event.delay_s:.1f} s"
                else:
                    after = f" (attempt {self.attempt} {self._last_class})" if self._last_class else ""
                    wait = (
                        f"waiting {event.delay_s:.1f} s before relaunching" if event.delay_s >= 0.05 else "relaunching"
                    )
                    self._set(Phase.WAITING, wait + after)
            case ev.NoPoolAvailable():
                self._set(Phase.CAPACITY, f"waiting for capacity: {event.reason}; next try in {event.wait_s:.0f} s")
            case ev.JobFinished():
                self.done, self.ok = True, event.state == "succeeded"
                if self.ok:
                    self._set(Phase.FINISHED, "finished")
                else:
                    self._set(Phase.FAILED, f"{event.state}: {event.reason}")
            # -- the job -------------------------------------------------------------------------------------------
            case ev.RunStarted():
                self._notice, self._background = None, None
                self._set(Phase.RESTORING, "restoring the newest checkpoint")
            case ev.StageRecovered():
                self.checkpoint_step = max(self.checkpoint_step or 0, event.step)
                self._set(Phase.RESTORING, f"uploaded the staged checkpoint of step {event.step}; restoring")
            case ev.CheckpointSkipped():
                which = f"step {event.step}" if event.step is not None else event.checkpoint
                self._set(Phase.RESTORING, f"restoring: skipped {which} ({event.reason}); trying an older one")
            case ev.RestoreCompleted():
                self.step = self.checkpoint_step = event.step
                replay = f"; {event.replayed_steps} steps to replay" if event.replayed_steps else ""
                self._set(Phase.RESTORED, f"restored step {event.step} from {event.checkpoint}{replay}")
            case ev.RestoreFresh():
                self.step = 0
                damaged = f" ({event.skipped} damaged skipped)" if event.skipped else ""
                self._set(Phase.RESTORED, f"no checkpoint to restore{damaged}: starting from step 0")
            case ev.Progress():
                self.step = event.step
                if self.phase not in (Phase.STOPPING, Phase.EXITING):
                    self._set(Phase.TRAINING, self._training())
            case ev.SaveStarted():
                self.step = event.step
                if self.phase is Phase.STOPPING or (event.reason == SaveReason.NOTICE and self._notice):
                    self._set(Phase.STOPPING, f"{self._stopping()}: saving step {event.step}")
                elif event.reason == SaveReason.FINAL:
                    self._set(Phase.SAVING, f"saving the final checkpoint (step {event.step})")
                else:
                    why = "" if event.reason == SaveReason.INTERVAL else f" ({event.reason})"
                    self._set(Phase.SAVING, f"saving step {event.step}{why}")
            case ev.SaveStaged():
                if event.overlapped:
                    self._background = event.step
                    if self.phase is Phase.SAVING:
                        self._set(Phase.TRAINING, self._training())
                elif self.phase is Phase.STOPPING:
                    self.text = f"{self._stopping()}: writing step {event.step}"
                elif self.phase is Phase.SAVING:
                    self.text = f"writing checkpoint step {event.step}"
            case ev.SaveCommitted():
                self.checkpoint_step = max(self.checkpoint_step or 0, event.step)
                if self._background == event.step:
                    self._background = None
                if self.phase is Phase.STOPPING:
                    self.text = f"{self._stopping()}: checkpoint step {event.step} committed"
                elif event.reason == SaveReason.FINAL:
                    self._set(Phase.SAVING, f"saved the final checkpoint (step {event.step})")
                elif self.phase is Phase.SAVING:
                    self._set(Phase.TRAINING, f"training (saved step {event.step})")
            case ev.SaveFailed():
                if self._background == event.step:
                    self._background = None
                if self.phase is Phase.STOPPING:
                    self.text = f"{self._stopping()}: saving step {event.step} failed ({event.error})"
                else:
                    self._set(Phase.TRAINING, f"training (saving step {event.step} failed: {event.error})")
            case ev.NoticeReceived():
                self.step = event.step
                if event.kind == "stop":
                    self._notice = event.source
                    left = f", {max(0.0, event.deadline - event.time):.0f} s to go" if event.deadline else ""
                    self._set(Phase.STOPPING, f"{self._stopping()} at step {event.step}{left}")
                elif self.phase is not Phase.STOPPING:
                    self._set(Phase.TRAINING, f"training (early checkpoint: a warning from {event.source})")
            case ev.EmergencyPlanned():
                self._notice = self._notice or event.source
                if event.choice == "none":
                    resume = (
                        f"step {self.checkpoint_step}" if self.checkpoint_step is not None else "the last checkpoint"
                    )
                    self._set(Phase.STOPPING, f"{self._stopping()}: no save fits in time; resuming from {resume}")
                else:
                    fits = (
                        f" (~{event.estimate_s:.1f} s of {event.time_left_s:.1f} s left)"
                        if event.estimate_s is not None and event.time_left_s is not None
                        else ""
                    )
                    self._set(Phase.STOPPING, f"{self._stopping()}: {event.choice} emergency save{fits}")
            case ev.EmergencyFinished():
                if event.committed:
                    late = "" if event.before_deadline is not False else " after the deadline"
                    how = f"emergency checkpoint step {event.step} committed{late}"
                else:
                    how = "emergency save still writing" if event.still_writing else "emergency save did not commit"
                self._set(Phase.STOPPING, f"{self._stopping()}: {how}")
            case ev.RestoreFailed():
                self._set(Phase.FAILED, f"none of {event.checkpoints} committed checkpoint(s) can be restored")
            case ev.RunExited():
                self.step = event.step
                if event.reason == ExitReason.FINISHED:
                    self._set(Phase.EXITING, f"training finished at step {event.step}")
                elif event.reason == ExitReason.NO_USABLE_CHECKPOINT:
                    pass  # restore_failed said it
                else:
                    how = f" on a notice from {self._notice}" if self._notice else ""
                    self._set(Phase.EXITING, f"stopped{how} at step {event.step}")
            case _:
                pass
