"""Google Cloud Spot and preemptible VMs: ``instance/preempted`` and ``instance/maintenance-event``.

Each key is watched with the metadata server's hanging GET: the first request reads
the value and its ``ETag``; the next ones add ``?wait_for_change=true&timeout_sec=N&last_etag=E``
and return as soon as the value changes (or after ``N`` seconds with the same value).
Every request carries ``Metadata-Flavor: Google`` (without it the server answers ``403``).

* ``preempted`` becomes ``TRUE``: a ``stop`` notice. Soft-off (SIGTERM) follows after
  ``notice_s`` (``preemptionNoticeDuration``, 0 by default), hard-off 30 s after that:
  the deadline is ``notice_s + 30`` seconds after the notice.
* ``maintenance-event`` becomes ``TERMINATE_ON_HOST_MAINTENANCE``: a ``stop`` notice with a
  ``maintenance_window_s`` deadline (60 s); ``MIGRATE_ON_HOST_MAINTENANCE``: a ``warning``.

The server is ``$GCE_METADATA_HOST`` (host[:port], google-auth's variable) or
``metadata.google.internal``.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable, Mapping

from spotsafe.checks import check_bool, check_int, check_mapping, check_number, check_str
from spotsafe.notices.base import STOP, WARNING, Notice, NoticeBoard
from spotsafe.notices.watcher import BadResponse, MetadataClient, Watcher

DEFAULT_HOST = "metadata.google.internal"
ENV_HOST = "GCE_METADATA_HOST"
PREFIX = "/computeMetadata/v1/instance/"
FLAVOR = {"Metadata-Flavor": "Google"}
PREEMPTED_VALUES = ("TRUE", "FALSE")
MAINTENANCE_VALUES = ("NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE")
SOFT_OFF_TO_HARD_OFF_S = 30.0


class GcpKeyWatcher(Watcher):
    """Watches one metadata key with hanging GETs and hands each new value to ``on_value``."""

    def __init__(
        self,
        client: MetadataClient,
        key: str,
        allowed: tuple[str, ...],
        on_value: Callable[[str, str, float], None],
        *,
        hang_s: int,
        poll_s: float,
        clock: Callable[[], float],
    ) -> None:
        super().__init__(poll_s=poll_s, clock=clock)
        self.name = "gcp"
        self.client = client
        self.key = key
        self.allowed = allowed
        self.on_value = on_value
        self.hang_s = int(hang_s)
        self.etag: str | None = None

    def describe(self) -> str:
        return f"{self.client.base_url}{PREFIX}{self.key} (hanging GET, {self.hang_s} s)"

    def poll(self) -> float | None:
        path = PREFIX + self.key
        timeout: float | None = None
        if self.etag is not None:
            query = {"wait_for_change": "true", "timeout_sec": str(self.hang_s), "last_etag": self.etag}
            path += "?" + urllib.parse.urlencode(query)
            timeout = self.hang_s + 5.0
        asked = time.monotonic()
        reply = self.client.request("GET", path, headers=FLAVOR, read_timeout_s=timeout)
        if reply.status != 200:
            raise BadResponse(f"GET {PREFIX}{self.key} answered {reply.status} {reply.text[:80]!r}")
        value = reply.text.strip()
        if value not in self.allowed:
            raise BadResponse(f"{self.key}: unexpected value {value[:80]!r} (expected one of {self.allowed})")
        etag = reply.headers.get("etag")
        changed = etag is None or etag != self.etag
        self.on_value(value, etag or "", self.now())
        if etag is None:
            return None  # no ETag: plain polling
        self.etag = etag
        if changed or time.monotonic() - asked >= self.hang_s / 2:
            return 0.0  # hang again at once
        return None  # the server answered at once with nothing new: do not spin


class GcpNotices:
    """Watches ``preempted`` and (optionally) ``maintenance-event`` on two daemon threads."""

    name = "gcp"

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        notice_s: float = 0.0,
        maintenance: bool = True,
        maintenance_window_s: float = 60.0,
        hang_s: int = 60,
        timeout_s: float = 2.0,
        retry_s: float = 5.0,
        clock: Callable[[], float] = time.time,
        env: Mapping[str, str] | None = None,
    ) -> None:
        check_str("endpoint", endpoint, allow_none=True)
        check_number("notice_s", notice_s, at_least=0, unit="seconds")
        check_bool("maintenance", maintenance)
        check_number("maintenance_window_s", maintenance_window_s, at_least=0, unit="seconds")
        check_int("hang_s", hang_s, at_least=1, integral=True)
        check_number("timeout_s", timeout_s, above=0, unit="seconds")
        check_number("retry_s", retry_s, above=0, unit="seconds")
        check_mapping("env", env, allow_none=True)
        env = os.environ if env is None else env
        if endpoint is None:
            endpoint = "http://" + (env.get(ENV_HOST) or DEFAULT_HOST)
        self.endpoint = endpoint.rstrip("/")
        self.window_s = float(notice_s) + SOFT_OFF_TO_HARD_OFF_S
        self.maintenance_window_s = float(maintenance_window_s)
        self.client = MetadataClient(self.endpoint, connect_timeout_s=timeout_s, read_timeout_s=timeout_s)
        self.watchers = [
            GcpKeyWatcher(
                self.client, "preempted", PREEMPTED_VALUES, self._preempted, hang_s=hang_s, poll_s=retry_s, clock=clock
            )
        ]
        if maintenance:
            self.watchers.append(
                GcpKeyWatcher(
                    self.client,
                    "maintenance-event",
                    MAINTENANCE_VALUES,
                    self._maintenance,
                    hang_s=hang_s,
                    poll_s=retry_s,
                    clock=clock,
                )
            )

    def _preempted(self, value: str, etag: str, now: float) -> None:
        if value == "TRUE":
            self.watchers[0]._post(Notice("gcp", now, now + self.window_s, STOP, "preempted", key="gcp:preempted"))

    def _maintenance(self, value: str, etag: str, now: float) -> None:
        watcher = self.watchers[-1]
        if value == "TERMINATE_ON_HOST_MAINTENANCE":
            deadline = now + self.maintenance_window_s
            watcher._post(Notice("gcp", now, deadline, STOP, value, key=f"gcp:maintenance:{value}:{etag}"))
        elif value == "MIGRATE_ON_HOST_MAINTENANCE":
            watcher._post(Notice("gcp", now, None, WARNING, value, key=f"gcp:maintenance:{value}:{etag}"))

    def describe(self) -> str:
        """What each of its watchers watches, for people."""
        return "; ".join(w.describe() for w in self.watchers)

    def start(self, board: NoticeBoard) -> None:
        for watcher in self.watchers:
            watcher.start(board)

    def after_stop(self, committed: bool) -> None:
        """GCP has no acknowledgement."""

    def stop(self) -> None:
        for watcher in self.watchers:
            watcher.stop()
        self.client.close()
