"""The stop path: after a stop notice, the emergency save that fits before the deadline.

Call sequence (:meth:`EmergencySave.run`, once per stop, on the training thread):

1. wait for the save in flight (its failure is logged: the emergency save is what matters now);
2. if nothing new was trained since the last committed save, there is nothing to save
   (``already-saved``); else plan with :func:`~spotsafe.engine.emergency.plan_emergency` from the
   measured save costs and the time left (``emergency_planned``);
3. run the chosen save and wait for it until the deadline minus ``on_notice(margin_s=...)``;
   a save still being written then goes on until the machine is taken (``emergency_finished``);
4. tell every notice source the checkpoint is done (Azure acknowledges, Slurm requeues).

The caller records the exit (``run_exited``) and exits with 75.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from spotsafe.engine.effects import Effects
from spotsafe.engine.emergency import FULL, INCREMENTAL, STAGED, Plan, options_for, plan_emergency
from spotsafe.engine.saves import SaveTracker
from spotsafe.policy.adaptive import OnNotice
from spotsafe.reasons import SaveReason
from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.errors import redact
from spotsafe.telemetry import events as ev

log = logging.getLogger("spotsafe")

ALREADY_SAVED = "already-saved"
"""The ``choice`` of ``emergency_planned`` when the last committed checkpoint is of this step."""


class EmergencySave:
    """Runs the stop path of one checkpointer (see the module docstring)."""

    def __init__(self, effects: Effects, saves: SaveTracker, settings: OnNotice) -> None:
        self.hub = effects.hub
        self.saves = saves
        self.costs = effects.costs
        self.settings = settings
        self._emit = effects.emit
        self._wall = effects.emit.wall

    def run(self, step: int, states: Callable[[], dict[str, Any]], deadline: float | None) -> bool:
        """Steps 1-4 for the state ``states()`` of ``step``; whether a checkpoint of ``step`` is committed."""
        saves, hub = self.saves, self.hub
        started = self._wall()
        try:
            saves.wait()
        except Exception as err:  # noqa: BLE001 - the emergency save below is what matters now
            log.error("spotsafe: the save in flight failed (%s); saving again", redact(str(err)))
            saves.last_step = None
        first = hub.first
        source = first.source if first is not None else "another rank"
        nothing_new = saves.last_step == step or (saves.last_step is None and step == 0)
        if nothing_new:
            why = "a checkpoint of this step is already committed" if step else "nothing trained yet"
            plan, choice = Plan(None, (), None, why), ALREADY_SAVED
        else:
            plan = self.plan(step, states, deadline)
            choice = plan.name
            log.warning("spotsafe: stop notice from %s at step %d: %s (%s)", source, step, plan.name, plan.reason)
        self._emit(
            ev.EmergencyPlanned,
            step=step,
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
            committed = self._save(step, states, plan, deadline, started)
        hub.after_stop(committed)
        hub.poll(step)
        return committed

    def plan(self, step: int, states: Callable[[], dict[str, Any]], deadline: float | None) -> Plan:
        """The emergency save that fits before ``deadline`` (Unix time), from the measured costs."""
        saver = self.saves.saver
        snapshot = Snapshot.capture(step, states())
        total = sum(t.numel() * t.element_size() for p in snapshot.components for t in p.tensors)
        staged = saver.stage is not None
        options = options_for(self.costs, total_bytes=total, can_share=saver.can_share, staged=staged)
        preferred = STAGED if staged else INCREMENTAL if saver.can_share else FULL
        time_left = None if deadline is None else deadline - self._wall() - self.settings.margin_s
        return plan_emergency(options, time_left_s=time_left, safety=self.settings.safety, preferred=preferred)

    def _save(
        self, step: int, states: Callable[[], dict[str, Any]], plan: Plan, deadline: float | None, started: float
    ) -> bool:
        """Run the planned save and wait for it until the deadline; whether it committed by then."""
        option = plan.choice
        assert option is not None
        committed = writing = False
        job = None
        try:
            self.saves.save(step, SaveReason.NOTICE, states, full=option.full, via_stage=option.route == STAGED)
            job = self.saves.saver.current
            committed = self._await(deadline)
            writing = not committed
        except Exception as err:  # noqa: BLE001 - the last verified checkpoint stays the resume point
            log.error("spotsafe: emergency save failed (%s); the last committed checkpoint is the resume point", err)
        done = self._wall()
        if writing:
            log.warning(
                "spotsafe: the emergency save is still being written at the deadline; it goes on until the "
                "machine is taken, and the last committed checkpoint is the resume point unless it finishes"
            )
        self._emit(
            ev.EmergencyFinished,
            step=step,
            choice=option.name,
            committed=committed,
            deadline=deadline,
            before_deadline=None if deadline is None or not committed else done <= deadline,
            margin_s=None if deadline is None or not committed else deadline - done,
            duration_s=done - started,
            still_writing=writing,
            local_committed=None if job is None or not job.staged_route else job.local_s is not None,
        )
        return committed

    def _await(self, deadline: float | None) -> bool:
        """Wait for the emergency save until ``deadline`` minus the margin; whether it committed by then.

        Raises its error if it failed. When it is still being written at the deadline, the caller
        records the stop and exits, and ``close()`` keeps waiting for it until the machine is taken.
        """
        if deadline is None:
            self.saves.wait()
            return True
        return self.saves.wait_until(deadline - self.settings.margin_s - self._wall())
