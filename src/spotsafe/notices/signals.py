"""Signals as notices: SIGTERM (Kubernetes, systemd, GCP soft-off), SIGINT (Ctrl-C),
SIGUSR1 (Slurm ``--signal=USR1@N``).

The handler only posts a :class:`~spotsafe.notices.base.Notice`; the training
loop reacts at its next step boundary. Repeated signals are posted too (so
they are logged) and change nothing: a second SIGTERM during the emergency save
does not interrupt it.

Installing a handler is what makes this work when the training script is PID 1
in a container: the kernel drops signals to PID 1 that have no handler.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from spotsafe.notices.base import Notice, NoticeBoard

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

InstallFn = Callable[[int, Any], Any]


class SignalNotices:
    """A notice source that turns signals into notices.

    ``install`` defaults to :func:`signal.signal` (injectable for tests).
    :meth:`start` must run in the main thread, as Python requires; elsewhere it
    raises :class:`RuntimeError`. :meth:`stop` puts the previous handlers back.
    """

    def __init__(
        self,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        *,
        grace_seconds: float | None = None,
        install: InstallFn = signal.signal,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.grace_seconds = grace_seconds
        self._install = install
        self._clock = clock
        self._previous: dict[int, Any] = {}
        self._board: NoticeBoard | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        board = self._board
        if board is None:
            return
        now = self._clock()
        deadline = now + self.grace_seconds if self.grace_seconds is not None else None
        board.post(Notice(source=signal.Signals(signum).name, received_at=now, deadline=deadline))

    def start(self, board: NoticeBoard) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "signal handlers can only be installed from the main thread; create the Checkpointer there "
                "or pass handle_signals=False"
            )
        self._board = board
        for sig in self.signals:
            self._previous[sig] = self._install(sig, self._handle)

    def stop(self) -> None:
        for sig, previous in self._previous.items():
            self._install(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self._board = None
