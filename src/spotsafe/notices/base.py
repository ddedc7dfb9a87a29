"""Interruption notices: the seam where signals and provider warnings come in.

A :class:`NoticeSource` turns something in the outside world (a signal, later
a cloud metadata endpoint) into :class:`Notice` records posted on a
:class:`NoticeBoard`. The training loop polls the board at step boundaries;
posting never blocks and takes no lock, so it is safe from a signal handler
and from any thread.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Notice:
    """One warning that the process will be stopped.

    ``source`` names where it came from (``SIGTERM``, later ``aws`` ...);
    ``received_at`` is Unix time; ``deadline`` is Unix time of the expected hard
    stop, or ``None`` when the source does not say.
    """

    source: str
    received_at: float
    deadline: float | None = None


class NoticeBoard:
    """Collects notices from all sources.

    Signal handlers and watcher threads call :meth:`post`; the training loop
    calls :meth:`drain` and :meth:`pending`. ``collections.deque`` appends and
    pops are atomic, so no lock is needed (a lock taken in a signal handler
    can deadlock against the interrupted main thread).
    """

    def __init__(self) -> None:
        self._queue: collections.deque[Notice] = collections.deque()
        self._first: Notice | None = None

    def post(self, notice: Notice) -> None:
        self._queue.append(notice)

    def drain(self) -> list[Notice]:
        """Return and forget the notices posted since the last drain."""
        out: list[Notice] = []
        while True:
            try:
                out.append(self._queue.popleft())
            except IndexError:
                break
        if out and self._first is None:
            self._first = out[0]
        return out

    @property
    def first(self) -> Notice | None:
        """The first notice ever drained, or ``None``: once set, the run is being stopped."""
        return self._first

    def pending(self) -> bool:
        """Whether any notice arrived (drained or not)."""
        return self._first is not None or bool(self._queue)


class NoticeSource(Protocol):
    """Something that posts notices on a board between :meth:`start` and :meth:`stop`."""

    def start(self, board: NoticeBoard) -> None: ...

    def stop(self) -> None: ...
