"""Signals as notices: SIGTERM (Kubernetes, systemd, GCP soft-off, Slurm's end), SIGINT (Ctrl-C),
SIGUSR1 (Slurm ``--signal=USR1@N``).

The handler only posts a :class:`~spotsafe.notices.base.Notice`; the training
loop reacts at its next step boundary. Repeated signals are posted too (so
they are logged) and change nothing: a second SIGTERM during the emergency save
does not interrupt it.

A signal carries no deadline; ``grace_seconds`` (or a per-signal ``grace``) gives
one: Kubernetes' ``terminationGracePeriodSeconds``, Slurm's ``--signal=SIG@N``.

Installing a handler is what makes this work when the training script is PID 1
in a container: the kernel drops signals to PID 1 that have no handler.

A signal that came before the source started (during start-up, held by
:func:`spotsafe.protect_startup`) is posted by :meth:`SignalNotices.post_early` as if
it had come then; :meth:`SignalNotices.stop` then puts back the handlers from before
start-up protection.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any

from spotsafe import startup
from spotsafe.checks import check_callable, check_mapping, check_number, check_signal, check_signals, check_str
from spotsafe.notices.base import STOP, Notice, NoticeBoard
from spotsafe.startup import DEFAULT_SIGNALS

InstallFn = Callable[[int, Any], Any]


class SignalNotices:
    """A notice source that turns signals into ``stop`` notices.

    ``source`` names the notices (default: the signal's name, ``SIGTERM``; with a
    ``source`` such as ``kubernetes``, the signal's name goes to ``detail``).
    ``grace_seconds`` sets every signal's deadline, ``grace`` overrides it per signal.
    ``on_after_stop(committed)`` runs once after the emergency checkpoint, only when
    one of these signals caused the stop (Slurm's requeue).

    ``install`` defaults to :func:`signal.signal` (injectable for tests).
    :meth:`start` must run in the main thread, as Python requires; elsewhere it
    raises :class:`RuntimeError`. :meth:`stop` puts the previous handlers back.
    """

    def __init__(
        self,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        *,
        grace_seconds: float | None = None,
        grace: Mapping[int, float] | None = None,
        source: str | None = None,
        on_after_stop: Callable[[bool], None] | None = None,
        install: InstallFn = signal.signal,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signals = check_signals("signals", signals)
        check_number("grace_seconds", grace_seconds, at_least=0, unit="seconds", allow_none=True)
        check_mapping("grace", grace, allow_none=True)
        for sig, seconds in (grace or {}).items():
            check_signal("a grace key", sig)
            check_number(f"grace[{sig!r}]", seconds, at_least=0, unit="seconds")
        check_str("source", source, allow_none=True)
        check_callable("on_after_stop", on_after_stop, allow_none=True)
        check_callable("install", install)
        check_callable("clock", clock)
        self.grace_seconds = grace_seconds
        self.grace = {signal.Signals(s): float(g) for s, g in (grace or {}).items()}
        self.source = source
        self.name = source or "signals"
        self.fired = False
        self._on_after_stop = on_after_stop
        self._install = install
        self._clock = clock
        self._previous: dict[int, Any] = {}
        self._board: NoticeBoard | None = None

    def describe(self) -> str:
        """The signals watched and the deadline a signal sets, for people."""
        names = ", ".join(s.name for s in self.signals)
        grace = f", deadline {self.grace_seconds:g} s after the signal" if self.grace_seconds else ""
        return f"signals {names}{grace}"

    def deadline_after(self, signum: int) -> float | None:
        """Seconds from the signal to the hard stop, or ``None`` when unknown."""
        return self.grace.get(signal.Signals(signum), self.grace_seconds)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._post(signum, self._clock())

    def post_early(self, signum: int, received_at: float) -> None:
        """Post ``signum``, received at ``received_at`` (Unix time) before this source started, as if it had
        come then (its deadline counts from then). Between :meth:`start` and :meth:`stop` only."""
        if self._board is None:
            raise RuntimeError("post_early() before start() or after stop(): there is no notice board")
        self._post(signum, received_at)

    def _post(self, signum: int, now: float) -> None:
        board = self._board
        if board is None:
            return
        self.fired = True
        grace = self.deadline_after(signum)
        deadline = now + grace if grace is not None else None
        name = signal.Signals(signum).name
        if self.source is None:
            board.post(Notice(source=name, received_at=now, deadline=deadline))
        else:
            board.post(Notice(source=self.source, received_at=now, deadline=deadline, kind=STOP, detail=name))

    def start(self, board: NoticeBoard) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "signal handlers can only be installed from the main thread; create the Checkpointer there "
                "or pass handle_signals=False"
            )
        self._board = board
        for sig in self.signals:
            self._previous[sig] = self._install(sig, self._handle)

    def after_stop(self, committed: bool) -> None:
        if self.fired and self._on_after_stop is not None:
            self._on_after_stop(committed)

    def stop(self) -> None:
        for sig, previous in self._previous.items():
            previous = startup.GUARD.original(sig, previous)  # start-up protection that is over: what it replaced
            self._install(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._board = None


__all__ = ["DEFAULT_SIGNALS", "InstallFn", "SignalNotices"]
