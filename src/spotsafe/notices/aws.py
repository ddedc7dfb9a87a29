"""AWS EC2 Spot: the two-minute interruption notice, from the instance metadata service (IMDSv2).

Every poll (``poll_s``, AWS recommends 5 s):

1. a session token: ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds``,
   renewed a minute before it expires, and at once when a request gets ``401``;
2. ``GET /latest/meta-data/spot/instance-action`` -> ``{"action": ..., "time": ...}``, ``404`` while
   nothing is pending; when it is ``404``, the legacy ``spot/termination-time`` (a bare timestamp);
3. ``GET /latest/meta-data/events/recommendations/rebalance`` -> ``{"noticeTime": ...}``: an early,
   soft warning (a ``warning`` notice: take a checkpoint, keep training).

The deadline is the notice's ``time`` (``hibernate`` starts at once: deadline now). An
endpoint that only speaks IMDSv1 (the token ``PUT`` gets ``403``/``404``/``405``) is read without a token.
The endpoint is ``$AWS_EC2_METADATA_SERVICE_ENDPOINT`` (botocore's variable) or ``http://169.254.169.254``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime

from spotsafe.checks import check_bool, check_int, check_mapping, check_number, check_str
from spotsafe.notices.base import STOP, WARNING, Notice
from spotsafe.notices.watcher import BadResponse, MetadataClient, Reply, Watcher

DEFAULT_ENDPOINT = "http://169.254.169.254"
ENV_ENDPOINT = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
TOKEN_PATH = "/latest/api/token"
ACTION_PATH = "/latest/meta-data/spot/instance-action"
LEGACY_PATH = "/latest/meta-data/spot/termination-time"
REBALANCE_PATH = "/latest/meta-data/events/recommendations/rebalance"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
ACTIONS = ("terminate", "stop", "hibernate")


def parse_time(value: str) -> float:
    """``2017-09-18T08:22:00Z`` -> Unix time."""
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as err:
        raise BadResponse(f"not an ISO 8601 time: {value[:80]!r}") from err
    if parsed.tzinfo is None:
        raise BadResponse(f"time without a time zone: {value[:80]!r}")
    return parsed.timestamp()


class AwsSpotNotices(Watcher):
    """Posts a ``stop`` notice for a spot interruption and a ``warning`` for a rebalance recommendation."""

    name = "aws"

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        poll_s: float = 5.0,
        token_ttl_s: int = 21600,
        rebalance: bool = True,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
        env: Mapping[str, str] | None = None,
    ) -> None:
        check_str("endpoint", endpoint, allow_none=True)
        check_int("token_ttl_s", token_ttl_s, at_least=1, at_most=21600, integral=True, hint=" (IMDSv2's limits)")
        check_bool("rebalance", rebalance)
        check_number("timeout_s", timeout_s, above=0, unit="seconds")
        check_mapping("env", env, allow_none=True)
        super().__init__(poll_s=poll_s, clock=clock)
        env = os.environ if env is None else env
        self.endpoint = (endpoint or env.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT).rstrip("/")
        self.token_ttl_s = int(token_ttl_s)
        self.rebalance = rebalance
        self.client = MetadataClient(self.endpoint, connect_timeout_s=timeout_s, read_timeout_s=timeout_s)
        self._token: str | None = None
        self._token_expires = 0.0
        self._v1 = False
        self.token_fetches = 0

    def describe(self) -> str:
        mode = "IMDSv1" if self._v1 else "IMDSv2"
        return f"{self.endpoint}{ACTION_PATH} ({mode}) every {self.poll_s:g} s"

    # -- tokens ---------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        if self._v1:
            return {}
        if self._token is None or self.now() >= self._token_expires:
            reply = self.client.request("PUT", TOKEN_PATH, headers={TTL_HEADER: str(self.token_ttl_s)})
            if reply.status in (403, 404, 405):
                self._v1 = True  # IMDSv1 only (or tokens turned off): read without one
                return {}
            if reply.status != 200 or not reply.body.strip():
                raise BadResponse(f"PUT {TOKEN_PATH} answered {reply.status} {reply.text[:80]!r}")
            self.token_fetches += 1
            self._token = reply.text.strip()
            # Renew a minute early (or at half the TTL for short ones), so a poll never uses a dying token.
            self._token_expires = self.now() + max(self.token_ttl_s - 60, self.token_ttl_s / 2)
        return {TOKEN_HEADER: self._token}

    def _get(self, path: str) -> Reply:
        reply = self.client.request("GET", path, headers=self._headers())
        if reply.status == 401 and not self._v1:
            self._token = None  # expired or revoked: one fresh token, one retry
            reply = self.client.request("GET", path, headers=self._headers())
        if reply.status not in (200, 404):
            raise BadResponse(f"GET {path} answered {reply.status} {reply.text[:80]!r}")
        return reply

    # -- polling --------------------------------------------------------------------
    def poll(self) -> float | None:
        received = self.now()
        reply = self._get(ACTION_PATH)
        if reply.status == 200:
            self._post_action(reply, received)
        else:
            legacy = self._get(LEGACY_PATH)
            if legacy.status == 200:
                deadline = parse_time(legacy.text)
                self._post(
                    Notice("aws", received, deadline, STOP, "terminate (termination-time)", key="aws:spot-interruption")
                )
        if self.rebalance:
            rebalance = self._get(REBALANCE_PATH)
            if rebalance.status == 200:
                body = _json_object(rebalance, REBALANCE_PATH)
                notice_time = body.get("noticeTime")
                if not isinstance(notice_time, str):
                    raise BadResponse(f"{REBALANCE_PATH}: no noticeTime in {rebalance.text[:80]!r}")
                parse_time(notice_time)
                self._post(
                    Notice(
                        "aws", received, None, WARNING, "rebalance recommendation", key=f"aws:rebalance:{notice_time}"
                    )
                )
        return None

    def _post_action(self, reply: Reply, received: float) -> None:
        body = _json_object(reply, ACTION_PATH)
        action, when = body.get("action"), body.get("time")
        if action not in ACTIONS or not isinstance(when, str):
            raise BadResponse(
                f"{ACTION_PATH}: expected {{'action': one of {ACTIONS}, 'time': ...}}, got {reply.text[:120]!r}"
            )
        deadline = received if action == "hibernate" else parse_time(when)
        self._post(Notice("aws", received, deadline, STOP, str(action), key="aws:spot-interruption"))

    def stop(self) -> None:
        super().stop()
        self.client.close()


def _json_object(reply: Reply, path: str) -> dict[str, object]:
    try:
        body = json.loads(reply.body)
    except ValueError as err:
        raise BadResponse(f"{path}: not JSON: {reply.text[:80]!r}") from err
    if not isinstance(body, dict):
        raise BadResponse(f"{path}: not a JSON object: {reply.text[:80]!r}")
    return body
