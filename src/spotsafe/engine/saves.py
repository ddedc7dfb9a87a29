"""The checkpointer's saves, one at a time, and which step was saved last.

:class:`SaveTracker` starts saves on the :class:`~spotsafe.engine.saver.Saver` (``save_started``,
``save_skipped`` events; the saver's own ones come from :mod:`spotsafe.engine.effects` and
:mod:`spotsafe.engine.commits`) and keeps the bookkeeping that the save policy, ``finish()`` and
the emergency path read: the step of the last save that went through (``last_step``), the step
of the last one that failed (``failed_step``: the interval policy counts from it) and when the
last one started (``last_time``).

Training thread only. A background save's failure is raised once, by the next call that
looks (:meth:`SaveTracker.raise_failure`); nothing of that step counts as saved then.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from spotsafe.engine.config import SaveConfig
from spotsafe.engine.effects import Effects
from spotsafe.reasons import SaveReason
from spotsafe.storage.repository import CheckpointRef
from spotsafe.telemetry import events as ev
from spotsafe.version import __version__


@dataclass(frozen=True)
class Writer:
    """Who writes: recorded in every manifest, with the save's reason."""

    run_id: str
    attempt: int
    generation: int

    def info(self, reason: str) -> dict[str, Any]:
        return {
            "spotsafe": __version__,
            "torch": torch.__version__,
            "run_id": self.run_id,
            "attempt": self.attempt,
            "generation": self.generation,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "reason": str(reason),
        }


class SaveTracker:
    """Starts saves and remembers their steps (see the module docstring)."""

    def __init__(self, effects: Effects, config: SaveConfig, *, clock: Callable[[], float]) -> None:
        self.saver = effects.saver
        self.writer = Writer(effects.run_id, effects.attempt, effects.lease.generation)
        self.metadata = dict(config.metadata or {})
        self.when_busy = config.when_busy
        self._emit = effects.emit
        self._clock = clock
        self.last_step: int | None = None
        self.failed_step: int | None = None
        self.last_time = clock()
        self._deferred = False

    @property
    def busy(self) -> bool:
        """A save is being written in the background."""
        return self.saver.busy

    def save(
        self,
        step: int,
        reason: SaveReason | str,
        states: Callable[[], dict[str, Any]],
        *,
        full: bool = False,
        via_stage: bool | None = None,
    ) -> CheckpointRef | None:
        """Save ``states()`` as ``step``; ``None`` when an interval save is deferred (``when_busy="skip"``).

        Every other save waits for the one in flight first (raising its error). A ``final`` save
        returns once committed; others once staged (or committed, when written directly).
        """
        saver = self.saver
        saver.settle()
        if saver.busy and reason == SaveReason.INTERVAL and self.when_busy == "skip":
            if not self._deferred:
                self._deferred = True
                self._emit(ev.SaveSkipped, step=step, reason=reason, why="the previous save is still being written")
            return None
        self.wait()
        self._deferred = False
        self._emit(ev.SaveStarted, step=step, reason=reason)
        try:
            job = saver.save(
                step,
                reason,
                states(),
                generation=self.writer.generation,
                metadata=self.metadata,
                writer=self.writer.info(reason),
                full=full,
                via_stage=via_stage,
            )
        except BaseException:
            # A direct save failed here (a background one fails at the next call): the same bookkeeping.
            self.failed_step, self.last_step = step, None
            self.last_time = self._clock()
            raise
        self.last_step = step
        self.last_time = self._clock()
        if job.background and reason == SaveReason.FINAL:
            self.wait()
        return job.ref

    def wait(self) -> None:
        """Block until the save in flight (if any) ends; raise its error if it failed."""
        self.saver.wait()
        self.raise_failure()

    def wait_until(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the save in flight; whether it ended (raising its error if it failed)."""
        if not self.saver.wait(max(0.0, seconds)):
            return False
        self.raise_failure()
        return True

    def raise_failure(self) -> None:
        """Raise the error of a background save that failed since the last call, once."""
        failure = self.saver.take_failure()
        if failure is not None:
            # Nothing of that step is saved: finish() and a notice save it again; the interval
            # policy still counts from the failed attempt (it is tried again at the next interval).
            self.failed_step, self.last_step = self.last_step, None
            raise failure

    def restored(self, step: int) -> None:
        """The run resumed from a checkpoint of ``step``: it counts as the last save."""
        self.last_step = step
        self.last_time = self._clock()
