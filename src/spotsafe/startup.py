"""Start-up protection: a stop that arrives before the Checkpointer is ready is not lost.

A framework job spends 5-20 s importing torch and the framework, building the model and setting
up before its callback creates the :class:`~spotsafe.Checkpointer`, whose signal handlers make a
stop signal a notice. Without them, a SIGTERM in that time ends the process at once (exit -15).
The one early line::

    import spotsafe
    spotsafe.protect_startup()   # first lines of train.py: ``import spotsafe`` does not import torch
    import torch, lightning      # a SIGTERM from here on is held, not fatal

Call sequence:

1. :func:`protect_startup` (main thread; idempotent): handlers for the stop signals
   (:data:`DEFAULT_SIGNALS`) record each signal and its time instead of ending the process, and
   say so on stderr.
2. The Checkpointer opens its notice sources (its :class:`~spotsafe.notices.signals.SignalNotices`
   replace these handlers) and, once everything is open, takes what was recorded
   (:func:`hand_over`): each recorded stop becomes a pending notice of the source that watches its
   signal, as if it had arrived then (same source name, same deadline from the signal's time).
   ``restore()`` then takes the stop path: the newest verified checkpoint is restored, nothing new
   is saved (``emergency_planned`` with ``already-saved``: nothing was trained since it), then
   ``run_exited`` and exit 75. From then on these handlers do what the ones before them did.
3. A recorded stop that no Checkpointer takes is not swallowed: ``exit_after_s`` after it (60 s by
   default) a watchdog thread ends the process with 75, and a process that ends sooner (a crash
   in set-up, ``sys.exit``) ends with 75 too (an ``atexit`` hook). A line on stderr says why.

A signal the process was started with ignored (``SIG_IGN``: a shell starts a background job, ``cmd &``,
with SIGINT ignored) stays ignored: the guard does not take it over.

Ctrl-C pressed twice during start-up is not held the second time: it raises ``KeyboardInterrupt``
as usual (the exit status is then 75, as for any held stop). A signal that arrives while the main
thread is inside a long C call (an extension module's import) runs its handler as soon as the
interpreter regains control; the stop is recorded then, and nothing is lost.

Signal handlers belong to the process, and so does this guard: one :class:`StartupGuard`,
:data:`GUARD`, behind the module's functions. This module imports only the standard library.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from spotsafe.checks import check_bool, check_number, check_signals
from spotsafe.exit_codes import EXIT_PREEMPTED

if TYPE_CHECKING:
    from spotsafe.notices.base import NoticeBoard, NoticeSource

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""The signals spotsafe treats as stop requests: SIGTERM (Kubernetes, systemd, GCP soft-off, Slurm's
end), SIGINT (Ctrl-C), SIGUSR1 (Slurm ``--signal=USR1@N``). The Checkpointer's default, too."""

EXIT_AFTER_S = 60.0
"""How long a recorded stop waits for a Checkpointer to take it before the process exits with 75."""

WATCH_POLL_S = 0.2

log = logging.getLogger("spotsafe")


@dataclass(frozen=True)
class EarlyStop:
    """A stop signal that arrived during start-up: ``received_at`` is Unix time, ``monotonic`` the same moment."""

    signum: int
    received_at: float
    monotonic: float

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _stderr(text: str) -> None:
    """Write to fd 2 directly: safe in a signal handler (``sys.stderr`` takes a lock the main thread may hold)."""
    with contextlib.suppress(OSError):
        os.write(2, text.encode("utf-8", "replace"))


class StartupGuard:
    """Holds stop signals until a Checkpointer takes them (see the module docstring).

    Every effect is injectable for tests: ``install``/``getsignal`` (:func:`signal.signal`,
    :func:`signal.getsignal`), ``clock``/``monotonic``, ``exit`` (:func:`os._exit`: the watchdog
    ends the process from its own thread), ``write`` (stderr), ``at_exit`` (:func:`atexit.register`).
    """

    def __init__(
        self,
        *,
        install: Callable[[int, Any], Any] = signal.signal,
        getsignal: Callable[[int], Any] = signal.getsignal,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        exit: Callable[[int], Any] = os._exit,
        write: Callable[[str], None] = _stderr,
        at_exit: Callable[[Callable[[], None]], Any] = atexit.register,
    ) -> None:
        self._install, self._getsignal = install, getsignal
        self._clock, self._monotonic = clock, monotonic
        self._exit, self._write, self._at_exit = exit, write, at_exit
        self._armed = False
        self._originals: dict[int, Any] = {}
        self._stops: list[EarlyStop] = []
        self._done: threading.Event | None = None
        self._exit_hook = False

    # -- state ---------------------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        """Stop signals are being held (between :meth:`protect` and :meth:`take` or :meth:`release`)."""
        return self._armed

    @property
    def signals(self) -> tuple[int, ...]:
        """The signals this guard handles (and the ones whose previous handlers it keeps)."""
        return tuple(self._originals)

    def pending(self) -> list[EarlyStop]:
        """The stops recorded so far and not yet taken, oldest first."""
        return list(self._stops)

    def is_handler(self, handler: object) -> bool:
        return handler == self._handle

    def original(self, signum: int, handler: Any) -> Any:
        """What to put back instead of ``handler`` for ``signum``: a Checkpointer that found this guard's
        handler installed puts back the handler from before :meth:`protect` once the guard is done."""
        if not self._armed and self.is_handler(handler):
            return self._originals.get(signum, signal.SIG_DFL)
        return handler

    # -- 1. protect -----------------------------------------------------------------------------------
    def protect(
        self,
        signals: Iterable[int] = DEFAULT_SIGNALS,
        *,
        exit_after_s: float | None = EXIT_AFTER_S,
        strict: bool = True,
    ) -> bool:
        """Hold ``signals`` until a Checkpointer takes them; whether they are held now (by this guard or by an
        open Checkpointer's handlers). Idempotent: a second call adds the signals not yet held and changes
        nothing else. A signal that is ignored (``SIG_IGN``) stays ignored. Off the main thread it raises
        :class:`RuntimeError`, or with ``strict=False`` returns ``False`` and does nothing.
        ``exit_after_s=None``: no watchdog (the ``atexit`` hook remains)."""
        wanted = check_signals("signals", signals)
        check_number("exit_after_s", exit_after_s, above=0, unit="seconds", allow_none=True)
        check_bool("strict", strict)
        if threading.current_thread() is not threading.main_thread():
            if strict:
                raise RuntimeError(
                    "protect_startup() must run in the main thread: Python runs signal handlers there only. "
                    "Call it in the first lines of the training script, before the heavy imports"
                )
            return False
        watched = _checkpointer_signals(self._getsignal, wanted)  # an open Checkpointer holds these already
        ignored = {s for s in wanted if self._getsignal(s) == signal.SIG_IGN}  # the process was told to ignore them
        taken = [
            s for s in wanted if s not in watched and s not in ignored and (s not in self._originals or not self._armed)
        ]
        if not self._armed and not taken:
            return True
        if not self._armed:  # a new start-up (an earlier one was handed over)
            self._stops = []
        for sig in taken:
            previous = self._install(sig, self._handle)
            # Our own handler still installed (passing signals on since take()): keep what it passes them to.
            self._originals[sig] = self._originals.get(sig, signal.SIG_DFL) if self.is_handler(previous) else previous
        if not self._armed:
            self._armed = True
            if not self._exit_hook:
                self._exit_hook = True
                self._at_exit(self._at_exit_hook)
            if exit_after_s is not None:
                self._done = threading.Event()
                threading.Thread(
                    target=self._watch, args=(self._done, exit_after_s), name="spotsafe-startup", daemon=True
                ).start()
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """Record the stop. Runs in the main thread between two bytecodes: no locks, no buffered I/O."""
        if not self._armed:  # after take(): what the handler from before protect() would have done
            self._call_original(signum, frame)
            return
        again = any(s.signum == signum for s in self._stops)
        self._stops.append(EarlyStop(signum, self._clock(), self._monotonic()))
        name = signal.Signals(signum).name
        if again and signum == signal.SIGINT:
            self._write("spotsafe: SIGINT again during start-up: stopping now\n")
            self._call_original(signum, frame)
            return
        if not again:
            hint = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            self._write(
                f"spotsafe: {name} during start-up: held until the checkpointer is ready, "
                f"then exit {EXIT_PREEMPTED} without a new checkpoint{hint}\n"
            )

    def _call_original(self, signum: int, frame: FrameType | None) -> None:
        original = self._originals.get(signum, signal.SIG_DFL)
        if callable(original):
            original(signum, frame)
        elif original != signal.SIG_IGN:  # SIG_DFL, or None (a handler not set from Python): the default action
            self._install(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    # -- 2. hand over ---------------------------------------------------------------------------------
    def take(self) -> list[EarlyStop]:
        """End the protection: return the stops recorded (oldest first) for the caller to act on, and put back
        the previous handlers where this guard's are still installed (from the main thread; elsewhere they
        pass signals on to the previous handlers). A no-op returning ``[]`` when not armed."""
        if not self._armed:
            return []
        self._armed = False  # before the swap: a signal from now on is passed on, not recorded
        stops, self._stops = self._stops, []
        if self._done is not None:
            self._done.set()
            self._done = None
        if threading.current_thread() is threading.main_thread():
            for sig, original in self._originals.items():
                if self.is_handler(self._getsignal(sig)):
                    self._install(sig, original if original is not None else signal.SIG_DFL)
        return stops

    def release(self) -> list[EarlyStop]:
        """Stop holding signals without a Checkpointer (a script that will not create one after all, a test).
        Returns the stops that were recorded: they are the caller's to act on now."""
        return self.take()

    # -- 3. nobody took it ----------------------------------------------------------------------------
    def _watch(self, done: threading.Event, limit: float) -> None:
        while not done.wait(WATCH_POLL_S):
            stops = list(self._stops)
            if stops and self._monotonic() - stops[0].monotonic >= limit:
                self._give_up(stops[0], f"no checkpointer took it within {limit:g} s")
                return

    def _at_exit_hook(self) -> None:
        stops = list(self._stops)
        if self._armed and stops:
            if "logging" in sys.modules:
                logging.shutdown()
            self._give_up(stops[0], "the process ended before a checkpointer took it")

    def _give_up(self, stop: EarlyStop, why: str) -> None:
        self._write(
            f"spotsafe: {stop.name} arrived during start-up and {why}: exiting with {EXIT_PREEMPTED} "
            "(preempted; nothing new was saved)\n"
        )
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
        self._exit(EXIT_PREEMPTED)


def _checkpointer_signals(getsignal: Callable[[int], Any], signals: Sequence[int]) -> set[int]:
    """The ``signals`` whose current handler is an open Checkpointer's (a :class:`SignalNotices` source)."""
    module = sys.modules.get("spotsafe.notices.signals")
    if module is None:  # not imported: no Checkpointer exists
        return set()
    return {s for s in signals if isinstance(getattr(getsignal(s), "__self__", None), module.SignalNotices)}


GUARD = StartupGuard()
"""The process's guard (signal handlers are per process)."""


def protect_startup(
    signals: Iterable[int] = DEFAULT_SIGNALS, *, exit_after_s: float | None = EXIT_AFTER_S, strict: bool = True
) -> bool:
    """Hold stop signals until the Checkpointer is ready: call it in the first lines of the training script.

    A SIGTERM, SIGINT or SIGUSR1 (``signals``) that arrives before a :class:`~spotsafe.Checkpointer`
    exists is recorded instead of ending the process; the Checkpointer takes it as a pending stop
    notice, and ``restore()`` restores the newest checkpoint and exits with 75, writing nothing new.
    If no Checkpointer takes it within ``exit_after_s`` seconds (``None``: never), or the process ends
    first, the process exits with 75. Idempotent; main thread only (:class:`RuntimeError` elsewhere,
    or ``False`` with ``strict=False``). Returns whether the signals are held. See :mod:`spotsafe.startup`.
    """
    return GUARD.protect(signals, exit_after_s=exit_after_s, strict=strict)


def hand_over(sources: Iterable[NoticeSource], board: NoticeBoard) -> list[EarlyStop]:
    """End start-up protection for a Checkpointer whose notice sources have started: post each recorded stop
    on ``board`` through the signal source that watches its signal (or as a plain stop notice when none does:
    ``handle_signals=False``, other ``signals``). Returns the stops handed over."""
    stops = GUARD.take()
    if not stops:
        return []
    from spotsafe.notices.base import Notice
    from spotsafe.notices.signals import SignalNotices

    watchers = [s for s in sources if isinstance(s, SignalNotices)]
    for stop in stops:
        taker = next((s for s in watchers if stop.signum in s.signals), None)
        if taker is not None:
            taker.post_early(stop.signum, stop.received_at)
        else:
            board.post(Notice(source=stop.name, received_at=stop.received_at))
    first = stops[0]
    log.warning(
        "spotsafe: %s arrived during start-up (%.1f s ago): handed to the checkpointer as a stop notice; "
        "restore() stops right after it, writing nothing new",
        first.name,
        max(0.0, time.time() - first.received_at),
    )
    return stops


def release() -> list[EarlyStop]:
    """Stop holding signals without a Checkpointer; returns the stops recorded (see :meth:`StartupGuard.release`)."""
    return GUARD.release()


__all__ = ["DEFAULT_SIGNALS", "EXIT_AFTER_S", "GUARD", "EarlyStop", "StartupGuard", "hand_over", "protect_startup"]
