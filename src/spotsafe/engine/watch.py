"""The checkpointer's notice sources: which ones run, and what they posted since the last step.

:class:`NoticeHub` builds the sources (auto-detected from the environment, or
given), starts them, and at each step boundary turns what they posted into
events: ``notice_received`` per notice, ``notice_source`` per watcher state
change. Stop notices make :meth:`poll` true; warnings are kept for
:meth:`take_warning`. Training-thread only, except that sources post from
their own threads and signal handlers (the board needs no lock).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from spotsafe.notices.base import Notice, NoticeBoard, NoticeSource
from spotsafe.notices.detect import build_sources, detect
from spotsafe.notices.signals import SignalNotices
from spotsafe.telemetry import events as ev

log = logging.getLogger("spotsafe")

Emit = Callable[..., None]


def make_sources(
    notices: Iterable[NoticeSource] | str,
    *,
    signals: Iterable[int],
    handle_signals: bool,
    grace_s: float | None,
) -> tuple[list[NoticeSource], dict[str, str]]:
    """The sources to run, and why each one (``"auto"``: :func:`~spotsafe.notices.detect.detect`)."""
    if isinstance(notices, str):
        if notices != "auto":
            raise ValueError(f"notices must be 'auto' or a list of notice sources, got {notices!r}")
        found = detect()
        sources = build_sources(found.names, signals=signals, handle_signals=handle_signals, grace_s=grace_s)
        return sources, {s.name: found.reasons.get(s.name, "signals") for s in sources}
    sources = list(notices)
    if handle_signals:
        sources.insert(0, SignalNotices(signals, grace_seconds=grace_s))
    return sources, {s.name: "given" for s in sources}


class NoticeHub:
    """Runs the notice sources of one checkpointer and reports what they post."""

    def __init__(self, sources: list[NoticeSource], reasons: dict[str, str], emit: Emit) -> None:
        self.board = NoticeBoard()
        self.sources = sources
        self.reasons = reasons
        self._emit = emit
        self._counts: dict[str, int] = {}
        self._warning: Notice | None = None
        self._after_stop_done = False
        self._started: list[NoticeSource] = []

    def start(self) -> None:
        """Start every source (signal handlers need the main thread). On error, stop the started ones."""
        try:
            for source in self.sources:
                source.start(self.board)
                self._started.append(source)
        except BaseException:
            self.close()
            raise
        for source in self.sources:
            self._emit(
                ev.NoticeSourceStatus, source=source.name, status="started", message=self.reasons.get(source.name, "")
            )

    @property
    def first(self) -> Notice | None:
        return self.board.first

    @property
    def deadline(self) -> float | None:
        return self.board.deadline

    def pending(self) -> bool:
        return self.board.pending()

    def poll(self, step: int) -> bool:
        """Record what arrived since the last call; return whether a stop notice is pending."""
        for notice in self.board.drain():
            count = self._counts.get(notice.source, 0) + 1
            self._counts[notice.source] = count
            self._emit(
                ev.NoticeReceived,
                source=notice.source,
                count=count,
                step=step,
                deadline=notice.deadline,
                kind=notice.kind,
                detail=notice.detail,
            )
            if not notice.stops:
                self._warning = notice
        for report in self.board.reports():
            log.info("spotsafe: notice source %s: %s: %s", report.source, report.status, report.message)
            self._emit(ev.NoticeSourceStatus, source=report.source, status=report.status, message=report.message)
        return self.board.pending()

    def take_warning(self) -> Notice | None:
        """The latest soft warning not yet acted on (and forget it)."""
        warning, self._warning = self._warning, None
        return warning

    def after_stop(self, committed: bool) -> None:
        """Tell every source the emergency checkpoint is done (Azure acknowledges, Slurm requeues). Once."""
        if self._after_stop_done:
            return
        self._after_stop_done = True
        for source in self._started:
            try:
                source.after_stop(committed)
            except Exception as err:  # noqa: BLE001 - one source's failure must not stop the exit
                self._emit(
                    ev.NoticeSourceStatus,
                    source=source.name,
                    status="ack_failed",
                    message=f"{type(err).__name__}: {err}",
                )

    def close(self) -> None:
        for source in self._started:
            source.stop()
        self._started = []
