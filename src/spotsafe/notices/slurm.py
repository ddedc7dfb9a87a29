"""Slurm: ``sbatch --signal=[B:]USR1@N`` warns N seconds before the time limit; ``scontrol requeue``.

:class:`SlurmNotices` is a :class:`~spotsafe.notices.signals.SignalNotices` for the job's
warning signal (``SIGUSR1`` by default) whose deadline is ``lead_s`` after the signal
(Slurm may send it up to 60 s early, so that is the least time left), and whose
``after_stop`` runs ``scontrol requeue $SLURM_JOB_ID`` when ``requeue=True``: the job goes
back to the queue and its script starts again from the top, which resumes from the
checkpoint just written. The requeue only happens when the warning signal caused the
stop (never after a plain ``scancel``'s SIGTERM).
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from spotsafe.checks import check_bool, check_callable, check_number, check_signal, check_str, check_strings
from spotsafe.notices.base import SourceReport
from spotsafe.notices.signals import SignalNotices

RunFn = Callable[..., Any]


class SlurmNotices(SignalNotices):
    """The Slurm warning signal as a ``slurm`` notice, and an optional requeue after the emergency save."""

    def __init__(
        self,
        *,
        job_id: str | None,
        warning_signal: int = signal.SIGUSR1,
        lead_s: float | None = None,
        requeue: bool = False,
        scontrol: Sequence[str] = ("scontrol",),
        run: RunFn = subprocess.run,
        **kwargs: Any,
    ) -> None:
        check_str("job_id", job_id, empty=True, allow_none=True)
        check_signal("warning_signal", warning_signal)
        check_number("lead_s", lead_s, at_least=0, unit="seconds", allow_none=True)
        check_bool("requeue", requeue)
        scontrol = check_strings("scontrol", scontrol)
        check_callable("run", run)
        grace = {warning_signal: lead_s} if lead_s is not None else None
        super().__init__([warning_signal], grace=grace, source="slurm", **kwargs)
        self.job_id = job_id
        self.requeue = requeue
        self.scontrol = tuple(scontrol)
        self._run = run
        self.requeued = False

    def after_stop(self, committed: bool) -> None:
        """Requeue the job (whether or not the emergency save committed: the last verified checkpoint resumes)."""
        if not (self.fired and self.requeue) or self.requeued:
            return
        board = self._board
        if not self.job_id:
            if board is not None:
                board.report(
                    SourceReport("slurm", "ack_failed", "requeue asked for but $SLURM_JOB_ID is not set", self._clock())
                )
            return
        command = [*self.scontrol, "requeue", self.job_id]
        try:
            done = self._run(command, capture_output=True, text=True, timeout=30, check=False)
            ok, message = done.returncode == 0, (done.stderr or done.stdout or "").strip()
        except (OSError, subprocess.SubprocessError) as err:
            ok, message = False, str(err)
        self.requeued = ok
        if board is not None:
            status = "acknowledged" if ok else "ack_failed"
            board.report(SourceReport("slurm", status, f"{' '.join(command)}: {message or 'ok'}", self._clock()))
