"""Watching a metadata endpoint from a background thread.

:class:`Watcher` holds what every provider watcher shares: a daemon thread that
calls :meth:`Watcher.poll` in a loop, the pause between polls, backoff while the
endpoint is down, de-duplicated posting, and one :class:`SourceReport` per state
change (``watching`` on the first good answer, ``unreachable`` once per outage,
``recovered``, ``bad_response`` once per distinct problem), never one per poll.

HTTP goes through :class:`MetadataClient` (urllib3 with short, explicit
timeouts, no retries, no redirects and no proxies: a metadata service is a
link-local address, and a slow answer must never hold up training). Start-up
never waits for the network: :meth:`Watcher.start` only starts the thread.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import urllib3

from spotsafe.checks import check_callable, check_number
from spotsafe.notices.base import Notice, NoticeBoard, SourceReport

log = logging.getLogger("spotsafe")


class EndpointDown(Exception):
    """The endpoint could not be reached or did not answer in time."""


class BadResponse(Exception):
    """The endpoint answered with something this watcher does not understand."""


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


class MetadataClient:
    """A tiny HTTP client for one metadata service. Thread-safe (one urllib3 pool)."""

    def __init__(self, base_url: str, *, connect_timeout_s: float = 1.0, read_timeout_s: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s)
        self._pool = urllib3.PoolManager(retries=False, timeout=self._timeout)

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        read_timeout_s: float | None = None,
    ) -> Reply:
        timeout = self._timeout
        if read_timeout_s is not None:
            timeout = urllib3.Timeout(connect=self._timeout.connect_timeout, read=read_timeout_s)
        try:
            response = self._pool.request(
                method,
                self.base_url + path,
                headers=dict(headers or {}),
                body=body,
                timeout=timeout,
                redirect=False,
                retries=False,
            )
        except urllib3.exceptions.HTTPError as err:
            raise EndpointDown(f"{method} {self.base_url}{path}: {err}") from err
        return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.data)

    def close(self) -> None:
        self._pool.clear()


class Watcher(ABC):
    """A notice source that polls an endpoint on a daemon thread.

    Subclasses implement :meth:`poll`, which asks the endpoint once, posts what it
    finds with :meth:`_post`, and returns how long to wait before the next poll
    (``None``: ``poll_s``). Raising :class:`EndpointDown` makes the watcher back off
    (doubling from ``poll_s`` up to ``max_backoff_s``); :class:`BadResponse` is
    reported and the next poll comes after ``poll_s``.
    """

    name = "watcher"

    def __init__(
        self,
        *,
        poll_s: float,
        max_backoff_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_number("poll_s", poll_s, above=0, unit="seconds")
        check_number("max_backoff_s", max_backoff_s, above=0, unit="seconds")
        check_callable("clock", clock)
        self.poll_s = float(poll_s)
        self.max_backoff_s = float(max_backoff_s)
        self._clock = clock
        self._board: NoticeBoard | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._down = False
        self._healthy_once = False
        self._last_problem: str | None = None
        self.polls = 0

    # -- lifecycle ------------------------------------------------------------------
    def start(self, board: NoticeBoard) -> None:
        self._board = board
        self._thread = threading.Thread(target=self._loop, name=f"spotsafe-{self.name}", daemon=True)
        self._thread.start()

    def after_stop(self, committed: bool) -> None:  # noqa: B027 - an optional hook, empty by default
        """Nothing by default (Azure acknowledges its events here)."""

    def stop(self) -> None:
        self._stopping.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            # A hanging GET ends at its read timeout; the thread is a daemon, so do not wait for it long.
            thread.join(timeout=0.2)

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    # -- for subclasses ---------------------------------------------------------------
    @abstractmethod
    def poll(self) -> float | None:
        """Ask the endpoint once; post notices; return the pause before the next poll."""

    @abstractmethod
    def describe(self) -> str:
        """What is watched, for the ``watching`` report (an URL and a poll interval)."""

    def now(self) -> float:
        return self._clock()

    def _post(self, notice: Notice) -> None:
        if self._board is not None and self._board.post(notice):
            log.warning(
                "spotsafe: %s notice from %s (%s), deadline %s",
                notice.kind,
                notice.source,
                notice.detail,
                "unknown" if notice.deadline is None else f"in {notice.deadline - notice.received_at:.0f} s",
            )

    def _report(self, status: str, message: str) -> None:
        if self._board is not None:
            self._board.report(SourceReport(self.name, status, message, self.now()))

    # -- the thread -----------------------------------------------------------------
    def _loop(self) -> None:
        backoff = self.poll_s
        while not self._stopping.is_set():
            try:
                pause = self.poll()
            except EndpointDown as err:
                if not self._down:
                    self._down = True
                    self._report("unreachable", f"{err}; retrying with backoff up to {self.max_backoff_s:g} s")
                pause, backoff = backoff, min(self.max_backoff_s, backoff * 2)
            except Exception as err:  # noqa: BLE001 - a watcher must never die silently
                problem = str(err) if isinstance(err, BadResponse) else f"{type(err).__name__}: {err}"
                if problem != self._last_problem:  # once per distinct problem, not once per poll
                    self._last_problem = problem
                    self._report("bad_response", problem)
                pause = self.poll_s
            else:
                self.polls += 1
                backoff = self.poll_s
                self._last_problem = None
                if self._down:
                    self._down = False
                    self._report("recovered", f"answering again: {self.describe()}")
                elif not self._healthy_once:
                    self._report("watching", self.describe())
                self._healthy_once = True
            if pause is None:
                pause = self.poll_s
            if pause > 0:
                self._stopping.wait(pause)
