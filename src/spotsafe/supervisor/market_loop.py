"""What the drill's markets share: the schedule's clock and thread, the emulated endpoints' lifecycle, and how a
machine is taken away (:func:`take_machines`)."""

from __future__ import annotations

import math
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Self

from spotsafe.errors import ConfigError
from spotsafe.notices.emulator import ProviderEmulator
from spotsafe.supervisor.pools import Handle

MODES = ("aws", "azure", "gcp", "sigterm", "kill")
"""How an interruption is delivered: a notice on the emulated AWS / Azure / GCP endpoint, SIGTERM
(Kubernetes, Slurm), then SIGKILL when the window ends; or SIGKILL at once, with no warning (``kill``)."""


class MarketLoop(ABC):
    """What both markets share: the drill clock, the schedule's thread, the emulated endpoints' lifecycle.
    A subclass sets ``clock``, ``window_s``, ``_emulators`` and ``_run`` and calls :meth:`_open` first."""

    clock: Callable[[], float]
    window_s: float
    _emulators: list[ProviderEmulator | None]

    def _open(self, mode: str) -> None:
        if mode not in MODES:
            raise ConfigError(f"the interruption mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0 < self.window_s < math.inf:
            raise ConfigError(f"the notice window must be > 0 seconds, got {self.window_s!r}")
        self._lock = threading.Condition()
        self._closed = False
        self._t0 = self.clock()
        self._thread = threading.Thread(target=self._run, name="spotsafe-market", daemon=True)

    @abstractmethod
    def _run(self) -> None:
        """The schedule, on the market's thread."""

    def now(self) -> float:
        """Drill seconds since the market opened."""
        return self.clock() - self._t0

    def __enter__(self) -> Self:
        for em in self._emulators:
            if em is not None:
                em.__enter__()
        self._t0 = self.clock()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=self.window_s + 5)
        for em in self._emulators:
            if em is not None:
                em.__exit__(None, None, None)

    def _wait_until(self, t: float) -> bool:
        with self._lock:
            while not self._closed and self.now() < t:
                self._lock.wait(timeout=min(0.05, max(0.0, t - self.now())))
            return not self._closed


def take_machines(
    handles: Sequence[Handle],
    emulators: Sequence[ProviderEmulator | None],
    *,
    mode: str,
    window_s: float,
    now: Callable[[], float],
    closed: Callable[[], bool],
    kill_wait_s: float,
) -> bool:
    """Take the machines ``handles`` run on, the way the provider would: a notice on each one's emulated endpoint
    (``emulators[i]``) or SIGTERM, SIGKILL to those still running when the window ends; ``kill``: SIGKILL at once.
    Returns once they are gone (or ``kill_wait_s`` after a SIGKILL), with each endpoint cleared for the next
    machine; whether any got SIGKILL."""
    killed = False
    if mode == "kill":  # no warning: the provider takes the machine now
        killed = True
        for handle in handles:
            handle.signal(signal.SIGKILL, group=True)
    else:
        for handle, em in zip(handles, emulators, strict=True):
            if mode == "aws" and em is not None:
                em.aws_interrupt(in_s=window_s)
            elif mode == "azure" and em is not None:
                em.azure_event("Preempt", in_s=window_s)
            elif mode == "gcp" and em is not None:
                em.gcp_preempt()
            elif mode == "sigterm":
                handle.signal(signal.SIGTERM)
        end = now() + window_s
        while any(h.poll() is None for h in handles) and now() < end and not closed():
            time.sleep(0.02)
        for handle in handles:
            if handle.poll() is None:
                killed = True
                handle.signal(signal.SIGKILL, group=True)  # the provider takes the machine
    if killed:  # capacity comes back only once the machine is gone
        gone_by = time.monotonic() + kill_wait_s
        while any(h.poll() is None for h in handles) and time.monotonic() < gone_by:
            time.sleep(0.01)
    for em in emulators:
        if em is not None:  # the next attempt runs on a new machine
            em.aws_clear()
            em.azure_clear()
            em.gcp_set("preempted", "FALSE")
    return killed
