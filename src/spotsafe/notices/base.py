"""Interruption notices: the seam where signals and provider warnings come in.

A :class:`NoticeSource` turns something in the outside world (a signal, a
cloud metadata endpoint) into :class:`Notice` records posted on a
:class:`NoticeBoard`. The training loop drains the board at step boundaries;
posting never blocks and takes no lock, so it is safe from a signal handler
and from any thread.

Two kinds of notice:

* ``stop``: the machine is going away (AWS ``instance-action``, GCP
  ``preempted``, Azure ``Preempt``, SIGTERM...). The loop stops taking work at
  the next step boundary and writes an emergency checkpoint that fits before
  ``deadline``.
* ``warning``: it may go away soon (AWS rebalance recommendation, Azure
  ``Reboot``, GCP live migration). The loop takes an early regular checkpoint
  and keeps training.

A notice with a ``key`` is posted once per key: a watcher that sees the same
provider notice on every poll, or two watchers that see the same event, post
it once.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

_T = TypeVar("_T")

STOP = "stop"
WARNING = "warning"


@dataclass(frozen=True)
class Notice:
    """One warning that the process will (or may) be stopped.

    ``source`` names where it came from (``SIGTERM``, ``aws``, ``gcp``, ``azure``,
    ``kubernetes``, ``slurm``...); ``received_at`` is Unix time; ``deadline`` is Unix
    time of the expected hard stop, or ``None`` when the source does not say.
    ``kind`` is :data:`STOP` or :data:`WARNING`; ``detail`` is what the source said
    (``terminate``, ``Preempt``, ``SIGUSR1``...); ``key`` identifies the notice for
    de-duplication (``None``: every post counts, as for signals).
    """

    source: str
    received_at: float
    deadline: float | None = None
    kind: str = STOP
    detail: str = ""
    key: str | None = None

    @property
    def stops(self) -> bool:
        return self.kind == STOP


@dataclass(frozen=True)
class SourceReport:
    """A watcher's state change worth an event: ``status`` is ``watching``, ``unreachable``,
    ``recovered``, ``bad_response`` or ``acknowledged``/``ack_failed``."""

    source: str
    status: str
    message: str
    time: float


class NoticeBoard:
    """Collects notices from all sources.

    Signal handlers and watcher threads call :meth:`post` and :meth:`report`; the
    training loop calls :meth:`drain`, :meth:`reports` and :meth:`pending`.
    ``collections.deque`` appends and pops are atomic and so is a ``set.add`` under
    the GIL, so no lock is needed (a lock taken in a signal handler can deadlock
    against the interrupted main thread).
    """

    def __init__(self) -> None:
        self._queue: collections.deque[Notice] = collections.deque()
        self._reports: collections.deque[SourceReport] = collections.deque()
        self._keys: set[str] = set()
        self._first: Notice | None = None
        self._stop_posted = False
        self._deadline: float | None = None

    def post(self, notice: Notice) -> bool:
        """Post a notice; returns ``False`` for a keyed notice already posted (dropped)."""
        if notice.key is not None:
            if notice.key in self._keys:
                return False
            self._keys.add(notice.key)
        self._queue.append(notice)
        if notice.stops:
            self._stop_posted = True
        return True

    def report(self, report: SourceReport) -> None:
        self._reports.append(report)

    def drain(self) -> list[Notice]:
        """Return and forget the notices posted since the last drain."""
        out = _pop_all(self._queue)
        for notice in out:
            if notice.stops:
                if self._first is None:
                    self._first = notice
                if notice.deadline is not None and (self._deadline is None or notice.deadline < self._deadline):
                    self._deadline = notice.deadline
        return out

    def reports(self) -> list[SourceReport]:
        """Return and forget the source reports posted since the last call."""
        return _pop_all(self._reports)

    @property
    def first(self) -> Notice | None:
        """The first stop notice ever drained, or ``None``: once set, the run is being stopped."""
        return self._first

    @property
    def deadline(self) -> float | None:
        """The earliest deadline of the stop notices drained so far (Unix time), or ``None``."""
        return self._deadline

    def pending(self) -> bool:
        """Whether any stop notice arrived (drained or not). Warnings do not count."""
        return self._first is not None or self._stop_posted


def _pop_all(queue: collections.deque[_T]) -> list[_T]:
    out: list[_T] = []
    while True:
        try:
            out.append(queue.popleft())
        except IndexError:
            return out


class NoticeSource(Protocol):
    """Something that posts notices on a board between :meth:`start` and :meth:`stop`.

    Call sequence: ``start(board)`` once (from the main thread: signal sources
    install handlers; watchers start a daemon thread and return at once, so
    start-up never waits for the network), then ``after_stop(committed)`` at
    most once, after the emergency checkpoint for a stop notice is durable
    (``committed``) or given up (Azure acknowledges the event, Slurm requeues the
    job), then ``stop()``.
    """

    name: str

    def start(self, board: NoticeBoard) -> None: ...

    def after_stop(self, committed: bool) -> None: ...

    def stop(self) -> None: ...


@runtime_checkable
class Describes(Protocol):
    """A notice source that can say, for people, what it watches (``spotsafe notices``)."""

    def describe(self) -> str: ...
