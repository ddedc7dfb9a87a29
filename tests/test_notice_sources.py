"""Notice sources against real parts.

The provider emulator is a real HTTP server on 127.0.0.1; the AWS, GCP and Azure watchers are
real threads polling it; signal sources get real signals sent to this process; Slurm's requeue
runs a fake ``scontrol`` script that records its arguments.

Nothing here talks to a real metadata address: every watcher gets ``env=emulator.env()`` or an
explicit 127.0.0.1 endpoint (the factories below check it). No test asserts a duration: they
wait for conditions with :func:`wait_until` and generous time-outs.
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import json
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from spotsafe import ConfigError
from spotsafe.notices import (
    STOP,
    WARNING,
    AwsSpotNotices,
    AzureScheduledEvents,
    GcpNotices,
    Notice,
    NoticeBoard,
    NoticeSource,
    SignalNotices,
    SlurmNotices,
    SourceReport,
    build_sources,
    detect,
)
from spotsafe.notices.emulator import AWS_NOT_FOUND, ProviderEmulator, Request
from spotsafe.notices.watcher import MetadataClient, Reply, Watcher

from .conftest import HANG_S
from .conftest import wait_until as shared_wait_until

# The paths as the providers document them (../shared/PREEMPTION-SIGNALS.md), not the implementation's constants.
AWS_TOKEN = "/latest/api/token"
AWS_ACTION = "/latest/meta-data/spot/instance-action"
AWS_LEGACY = "/latest/meta-data/spot/termination-time"
AWS_REBALANCE = "/latest/meta-data/events/recommendations/rebalance"
TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"
GCP_PREFIX = "/computeMetadata/v1/instance/"
FLAVOR = {"Metadata-Flavor": "Google"}
AZURE_EVENTS = "/metadata/scheduledevents?api-version=2020-07-01"
AZURE_HEADERS = {"Metadata": "true"}
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
RFC1123 = re.compile(
    r"^(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT$"
)
GUID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}$")
LOCAL = "http://127.0.0.1:"


# -- helpers -------------------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], object], *, timeout: float = HANG_S, what: str = "the condition") -> None:
    """Poll ``condition`` until it is true; ``timeout`` only bounds a hang (a shorter one is a test's point)."""
    shared_wait_until(condition, what, timeout=timeout)


def wait_polls(watcher: Watcher, more: int = 3, *, timeout: float = HANG_S) -> None:
    """Wait until ``watcher`` has answered ``more`` further successful polls."""
    target = watcher.polls + more
    wait_until(lambda: watcher.polls >= target, timeout=timeout, what=f"{watcher.name} poll #{target}")


def free_port() -> int:
    """A 127.0.0.1 port with nothing listening on it (just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Seen:
    """A board plus everything drained from it so far (``drain`` forgets; this remembers)."""

    def __init__(self) -> None:
        self.board = NoticeBoard()
        self.notices: list[Notice] = []
        self.reports: list[SourceReport] = []

    def pump(self) -> Seen:
        self.notices += self.board.drain()
        self.reports += self.board.reports()
        return self

    def statuses(self, source: str | None = None) -> list[str]:
        self.pump()
        return [r.status for r in self.reports if source is None or r.source == source]

    def wait_notices(self, count: int = 1, *, timeout: float = HANG_S) -> list[Notice]:
        wait_until(lambda: len(self.pump().notices) >= count, timeout=timeout, what=f"{count} notice(s)")
        return list(self.notices)

    def wait_status(self, status: str, count: int = 1, *, timeout: float = HANG_S) -> None:
        wait_until(
            lambda: self.statuses().count(status) >= count, timeout=timeout, what=f"{count} {status!r} report(s)"
        )


@contextlib.contextmanager
def running(source: NoticeSource, board: NoticeBoard, *, down_first: ProviderEmulator | None = None) -> Iterator[None]:
    """``start`` the source, and always ``stop`` it.

    ``down_first``: stop this emulator before the source, which ends GCP's hanging GETs at once
    (``GcpNotices.stop`` would otherwise wait up to a second per key for them).
    """
    source.start(board)
    try:
        yield
    finally:
        if down_first is not None:
            shut(down_first)
        source.stop()


def shut(emulator: ProviderEmulator) -> None:
    """``emulator.stop()`` without the wait for ``serve_forever``'s 0.5 s poll: connections wake its select."""
    stopper = threading.Thread(target=emulator.stop)
    stopper.start()
    while stopper.is_alive():
        with contextlib.suppress(OSError):
            socket.create_connection((emulator.host, emulator.port), timeout=1).close()
        stopper.join(0.01)


def count_calls(client: MetadataClient) -> list[str]:
    """Record every request ``client`` makes (also those that never reach a server)."""
    calls: list[str] = []
    original = client.request

    def request(method: str, path: str, **kwargs: Any) -> Reply:
        calls.append(f"{method} {path}")
        return original(method, path, **kwargs)

    client.request = request  # type: ignore[method-assign]
    return calls


@dataclass(frozen=True)
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw(
    emulator: ProviderEmulator,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 30.0,
) -> Raw:
    """One plain HTTP request (http.client: no extra headers beyond Host and Accept-Encoding)."""
    conn = http.client.HTTPConnection(emulator.host, emulator.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Raw(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def aws_token(emulator: ProviderEmulator, ttl: str = "21600") -> str:
    reply = raw(emulator, "PUT", AWS_TOKEN, {TTL: ttl})
    assert reply.status == 200
    return reply.body.decode()


def azure_doc(emulator: ProviderEmulator) -> dict[str, Any]:
    reply = raw(emulator, "GET", AZURE_EVENTS, AZURE_HEADERS)
    assert reply.status == 200
    document: dict[str, Any] = reply.json()
    return document


def azure_event(emulator: ProviderEmulator, event_id: str) -> dict[str, Any]:
    (event,) = [e for e in azure_doc(emulator)["Events"] if e["EventId"] == event_id]
    return event


def rfc1123(value: str) -> float:
    return email.utils.parsedate_to_datetime(value).timestamp()


def query_of(path: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(path).query)


def gcp_path(key: str) -> str:
    return GCP_PREFIX + key


def hanging_gets(emulator: ProviderEmulator, key: str = "preempted") -> list[Request]:
    """The hanging GETs for ``key`` the emulator has answered so far."""
    return [r for r in emulator.requests if r.path.startswith(gcp_path(key + "?"))]


# -- watchers pointed at the emulator, with test-sized intervals ---------------------------------------------------


def aws(emulator: ProviderEmulator, **kwargs: Any) -> AwsSpotNotices:
    kwargs.setdefault("poll_s", 0.05)
    watcher = AwsSpotNotices(env=emulator.env(), **kwargs)
    assert watcher.endpoint == emulator.url and watcher.endpoint.startswith(LOCAL)
    return watcher


def gcp(emulator: ProviderEmulator, **kwargs: Any) -> GcpNotices:
    kwargs.setdefault("hang_s", 1)
    kwargs.setdefault("retry_s", 0.05)
    kwargs.setdefault("maintenance", False)
    source = GcpNotices(env=emulator.env(), **kwargs)
    assert source.endpoint == emulator.url and source.endpoint.startswith(LOCAL)
    return source


def azure(emulator: ProviderEmulator, **kwargs: Any) -> AzureScheduledEvents:
    kwargs.setdefault("poll_s", 0.05)
    kwargs.setdefault("first_call_timeout_s", 10.0)
    watcher = AzureScheduledEvents(env=emulator.env(), **kwargs)
    assert watcher.endpoint == emulator.url and watcher.endpoint.startswith(LOCAL)
    return watcher


class ScriptedEmulator(ProviderEmulator):
    """The emulator plus the few provider behaviours its own switches cannot produce.

    ``token_status``: the IMDSv2 token ``PUT`` answers this (an IMDSv1-only endpoint);
    ``hide_instance_action``: only the legacy ``termination-time`` tells of an interruption;
    ``slow_first_events_s``: only the first Scheduled Events ``GET`` is slow (Azure's documented start-up);
    ``hanging``: how many GCP hanging GETs are in progress right now.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.token_status: int | None = None
        self.hide_instance_action = False
        self.slow_first_events_s = 0.0
        self.hanging = 0
        self._events_asked = 0
        self._count = threading.Lock()

    def _aws(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if self.token_status is not None and path == AWS_TOKEN:
            return self.token_status, {"Content-Type": "text/html"}, b"Forbidden\n"
        status, reply_headers, body = super()._aws(method, path, headers)
        if self.hide_instance_action and path == AWS_ACTION and status == 200:
            return 404, {"Content-Type": "text/html"}, AWS_NOT_FOUND
        return status, reply_headers, body

    def _gcp(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        hangs = query.get("wait_for_change") == ["true"]
        with self._count:
            self.hanging += hangs
        try:
            return super()._gcp(method, path, query, headers)
        finally:
            with self._count:
                self.hanging -= hangs

    def _azure(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if method == "GET" and path == "/metadata/scheduledevents":
            with self._count:
                self._events_asked += 1
                first = self._events_asked == 1
            if first and self.slow_first_events_s:
                time.sleep(self.slow_first_events_s)
        return super()._azure(method, path, query, headers, body)

    def azure_patch(self, event_id: str, **fields: Any) -> None:
        """Overwrite fields of a scheduled event (for answers the real service should never give)."""
        with self._changed:
            for event in self._state.azure_events:
                if event["EventId"] == event_id:
                    event.update(fields)
            self._state.azure_incarnation += 1


@pytest.fixture
def emulator() -> Iterator[ProviderEmulator]:
    emu = ProviderEmulator().start()
    try:
        yield emu
    finally:
        shut(emu)


@pytest.fixture
def scripted() -> Iterator[ScriptedEmulator]:
    emu = ScriptedEmulator().start()
    try:
        yield emu
    finally:
        shut(emu)


@pytest.fixture
def seen() -> Seen:
    return Seen()


# == 1. the emulator answers like the real services ================================================================

# -- AWS IMDSv2 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-5", "soon"])
def test_emulator_aws_token_put_needs_a_valid_ttl(emulator: ProviderEmulator, ttl: str | None) -> None:
    headers = {} if ttl is None else {TTL: ttl}
    assert raw(emulator, "PUT", AWS_TOKEN, headers).status == 400


@pytest.mark.parametrize("ttl", ["1", "21600"])
def test_emulator_aws_token_put_returns_a_token_and_echoes_the_ttl(emulator: ProviderEmulator, ttl: str) -> None:
    reply = raw(emulator, "PUT", AWS_TOKEN, {TTL: ttl})
    assert reply.status == 200
    assert len(reply.body.strip()) >= 20
    assert reply.headers[TTL.lower()] == ttl


def test_emulator_aws_token_path_refuses_get_and_forwarded_puts(emulator: ProviderEmulator) -> None:
    assert raw(emulator, "GET", AWS_TOKEN).status == 405
    assert raw(emulator, "PUT", AWS_TOKEN, {TTL: "60", "X-Forwarded-For": "10.0.0.1"}).status == 403


def test_emulator_aws_get_needs_a_valid_live_token(emulator: ProviderEmulator) -> None:
    assert raw(emulator, "GET", AWS_ACTION).status == 401
    assert raw(emulator, "GET", AWS_ACTION, {TOKEN: "not-a-token"}).status == 401
    token = aws_token(emulator)
    found = raw(emulator, "GET", AWS_ACTION, {TOKEN: token})
    assert found.status == 404  # nothing pending
    assert b"404 - Not Found" in found.body
    emulator.expire_tokens()
    assert raw(emulator, "GET", AWS_ACTION, {TOKEN: token}).status == 401
    assert raw(emulator, "GET", AWS_ACTION, {TOKEN: aws_token(emulator)}).status == 404


def test_emulator_aws_short_ttl_token_expires_on_its_own(emulator: ProviderEmulator) -> None:
    token = aws_token(emulator, ttl="1")
    assert raw(emulator, "GET", AWS_ACTION, {TOKEN: token}).status == 404
    wait_until(lambda: raw(emulator, "GET", AWS_ACTION, {TOKEN: token}).status == 401, what="the 1 s token to expire")


def test_emulator_aws_without_required_tokens_serves_imdsv1(emulator: ProviderEmulator) -> None:
    emulator.require_token = False
    assert raw(emulator, "GET", AWS_ACTION).status == 404
    assert raw(emulator, "GET", AWS_ACTION, {TOKEN: "forged"}).status == 401  # a wrong token is still refused


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_emulator_aws_instance_action_shape(emulator: ProviderEmulator, action: str) -> None:
    token = {TOKEN: aws_token(emulator)}
    when = emulator.aws_interrupt(action, in_s=120)
    reply = raw(emulator, "GET", AWS_ACTION, token)
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {"action", "time"}
    assert body["action"] == action
    assert ISO_Z.match(body["time"]), body["time"]
    assert datetime.fromisoformat(body["time"]).timestamp() == when
    legacy = raw(emulator, "GET", AWS_LEGACY, token)
    if action == "terminate":
        assert legacy.status == 200
        assert legacy.body.decode() == body["time"]  # a bare timestamp, not JSON
    else:
        assert legacy.status == 404


def test_emulator_aws_rebalance_and_clear(emulator: ProviderEmulator) -> None:
    token = {TOKEN: aws_token(emulator)}
    assert raw(emulator, "GET", AWS_REBALANCE, token).status == 404
    emulator.aws_rebalance()
    reply = raw(emulator, "GET", AWS_REBALANCE, token)
    assert reply.status == 200
    body = reply.json()
    assert list(body) == ["noticeTime"]
    assert ISO_Z.match(body["noticeTime"])
    emulator.aws_interrupt()
    emulator.aws_clear()
    for path in (AWS_ACTION, AWS_LEGACY, AWS_REBALANCE):
        assert raw(emulator, "GET", path, token).status == 404


# -- GCP metadata --------------------------------------------------------------------------------------------------


def test_emulator_gcp_needs_the_flavor_header(emulator: ProviderEmulator) -> None:
    assert raw(emulator, "GET", gcp_path("preempted")).status == 403
    assert raw(emulator, "GET", gcp_path("preempted"), {"Metadata-Flavor": "google-ish"}).status == 403
    assert raw(emulator, "GET", gcp_path("preempted"), {**FLAVOR, "X-Forwarded-For": "10.0.0.1"}).status == 403


def test_emulator_gcp_values_etags_and_headers(emulator: ProviderEmulator) -> None:
    first = raw(emulator, "GET", gcp_path("preempted"), FLAVOR)
    assert first.status == 200
    assert first.body == b"FALSE"
    assert first.headers["metadata-flavor"] == "Google"
    assert first.headers["etag"]
    assert raw(emulator, "GET", gcp_path("preempted"), FLAVOR).headers["etag"] == first.headers["etag"]  # stable
    maintenance = raw(emulator, "GET", gcp_path("maintenance-event"), FLAVOR)
    assert (maintenance.status, maintenance.body) == (200, b"NONE")
    emulator.gcp_preempt()
    second = raw(emulator, "GET", gcp_path("preempted"), FLAVOR)
    assert second.body == b"TRUE"
    assert second.headers["etag"] != first.headers["etag"]
    assert raw(emulator, "GET", gcp_path("no-such-key"), FLAVOR).status == 404


def test_emulator_gcp_hanging_get_times_out_with_the_same_etag(emulator: ProviderEmulator) -> None:
    etag = raw(emulator, "GET", gcp_path("preempted"), FLAVOR).headers["etag"]
    reply = raw(emulator, "GET", gcp_path(f"preempted?wait_for_change=true&timeout_sec=1&last_etag={etag}"), FLAVOR)
    assert reply.status == 200
    assert reply.body == b"FALSE"
    assert reply.headers["etag"] == etag


def test_emulator_gcp_hanging_get_returns_when_the_value_changes(scripted: ScriptedEmulator) -> None:
    etag = raw(scripted, "GET", gcp_path("preempted"), FLAVOR).headers["etag"]
    answers: list[Raw] = []
    path = gcp_path(f"preempted?wait_for_change=true&timeout_sec=60&last_etag={etag}")
    thread = threading.Thread(target=lambda: answers.append(raw(scripted, "GET", path, FLAVOR, timeout=90)))
    thread.start()
    try:
        wait_until(lambda: scripted.hanging == 1, what="the GET to hang")
        assert answers == []
        scripted.gcp_preempt()
        wait_until(lambda: bool(answers), timeout=20, what="the hanging GET to return (it may hang 60 s)")
    finally:
        thread.join(90)
    (reply,) = answers
    assert reply.body == b"TRUE"
    assert reply.headers["etag"] != etag


def test_emulator_gcp_hanging_get_with_a_stale_etag_returns_at_once(emulator: ProviderEmulator) -> None:
    path = gcp_path("preempted?wait_for_change=true&timeout_sec=60&last_etag=0000stale")
    reply = raw(emulator, "GET", path, FLAVOR, timeout=20)  # would hang 60 s if the stale ETag were ignored
    assert (reply.status, reply.body) == (200, b"FALSE")


# -- Azure Scheduled Events ----------------------------------------------------------------------------------------


def test_emulator_azure_needs_metadata_header_and_api_version(emulator: ProviderEmulator) -> None:
    missing_header = raw(emulator, "GET", AZURE_EVENTS)
    assert missing_header.status == 400
    assert "metadata header" in missing_header.json()["error"].lower()
    missing_version = raw(emulator, "GET", "/metadata/scheduledevents", AZURE_HEADERS)
    assert missing_version.status == 400
    assert "api-version" in missing_version.json()["error"]
    assert raw(emulator, "GET", AZURE_EVENTS, {"Metadata": "false"}).status == 400


def test_emulator_azure_document_shape(emulator: ProviderEmulator) -> None:
    empty = azure_doc(emulator)
    assert empty["Events"] == []
    assert type(empty["DocumentIncarnation"]) is int
    event_id = emulator.azure_event("Preempt", in_s=30)
    document = azure_doc(emulator)
    assert document["DocumentIncarnation"] == empty["DocumentIncarnation"] + 1
    (event,) = document["Events"]
    assert set(event) == {
        "EventId",
        "EventType",
        "ResourceType",
        "Resources",
        "EventStatus",
        "NotBefore",
        "Description",
        "EventSource",
        "DurationInSeconds",
    }
    assert event["EventId"] == event_id and GUID.match(event_id)
    assert event["EventType"] == "Preempt"
    assert event["ResourceType"] == "VirtualMachine"
    assert event["Resources"] == ["spotsafe-vm"]
    assert event["EventStatus"] == "Scheduled"
    assert RFC1123.match(event["NotBefore"]), event["NotBefore"]
    assert 0 < rfc1123(event["NotBefore"]) - time.time() <= 31
    assert isinstance(event["Description"], str)
    assert event["EventSource"] in ("Platform", "User")
    assert event["DurationInSeconds"] == -1
    assert azure_doc(emulator)["DocumentIncarnation"] == document["DocumentIncarnation"]  # no change, same number


def test_emulator_azure_vm_name_endpoint(emulator: ProviderEmulator) -> None:
    path = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
    reply = raw(emulator, "GET", path, AZURE_HEADERS)
    assert (reply.status, reply.body) == (200, b"spotsafe-vm")


def test_emulator_azure_start_requests_marks_started_and_records_the_ack(emulator: ProviderEmulator) -> None:
    event_id = emulator.azure_event("Preempt", in_s=30)
    other_id = emulator.azure_event("Reboot", in_s=300)
    before = azure_doc(emulator)["DocumentIncarnation"]
    body = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
    reply = raw(emulator, "POST", AZURE_EVENTS, {**AZURE_HEADERS, "Content-Type": "application/json"}, body)
    assert reply.status == 200
    assert emulator.acks == [event_id]
    document = azure_doc(emulator)
    assert document["DocumentIncarnation"] == before + 1
    events = {e["EventId"]: e for e in document["Events"]}
    assert (events[event_id]["EventStatus"], events[event_id]["NotBefore"]) == ("Started", "")
    assert events[other_id]["EventStatus"] == "Scheduled" and events[other_id]["NotBefore"] != ""


def test_emulator_azure_rejects_a_malformed_start_request(emulator: ProviderEmulator) -> None:
    reply = raw(emulator, "POST", AZURE_EVENTS, AZURE_HEADERS, b'{"Start": []}')
    assert reply.status == 400
    assert emulator.acks == []


def test_emulator_azure_start_and_clear_change_the_incarnation(emulator: ProviderEmulator) -> None:
    event_id = emulator.azure_event("Terminate", in_s=60)
    first = azure_doc(emulator)["DocumentIncarnation"]
    emulator.azure_start(event_id)
    started = azure_doc(emulator)
    assert started["DocumentIncarnation"] == first + 1
    assert (started["Events"][0]["EventStatus"], started["Events"][0]["NotBefore"]) == ("Started", "")
    emulator.azure_clear()
    cleared = azure_doc(emulator)
    assert (cleared["DocumentIncarnation"], cleared["Events"]) == (first + 2, [])


def test_emulator_stop_also_ends_open_keep_alive_connections(emulator: ProviderEmulator) -> None:
    conn = http.client.HTTPConnection(emulator.host, emulator.port, timeout=10)
    try:
        conn.request("GET", AZURE_EVENTS, headers=AZURE_HEADERS)
        first = conn.getresponse()
        first.read()
        assert first.status == 200
        shut(emulator)
        with pytest.raises(OSError):  # RemoteDisconnected, ConnectionRefusedError...
            conn.request("GET", AZURE_EVENTS, headers=AZURE_HEADERS)
            conn.getresponse().read()
    finally:
        conn.close()


def test_emulator_faults_status_and_stop(emulator: ProviderEmulator) -> None:
    emulator.status["azure"] = 503
    assert raw(emulator, "GET", AZURE_EVENTS, AZURE_HEADERS).status == 503
    assert raw(emulator, "GET", gcp_path("preempted"), FLAVOR).status == 200  # the other providers still answer
    port = emulator.port
    emulator.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


# == 2. AWS ========================================================================================================


@pytest.mark.parametrize("action", ["terminate", "stop", "hibernate"])
def test_aws_posts_one_stop_notice_per_interruption(emulator: ProviderEmulator, seen: Seen, action: str) -> None:
    watcher = aws(emulator)
    t0 = time.time()
    with running(watcher, seen.board):
        wait_polls(watcher, 3)
        assert seen.pump().notices == []
        assert not seen.board.pending()
        when = emulator.aws_interrupt(action, in_s=120)
        seen.wait_notices(1)
        wait_polls(watcher, 5)  # it sees the same notice on every poll
    t1 = time.time()
    (notice,) = seen.pump().notices
    assert (notice.source, notice.kind, notice.detail, notice.key) == ("aws", STOP, action, "aws:spot-interruption")
    assert t0 <= notice.received_at <= t1
    if action == "hibernate":
        assert notice.deadline == notice.received_at  # hibernation starts at once
    else:
        assert notice.deadline == when
    assert seen.board.pending()
    assert seen.board.first == notice
    assert seen.statuses() == ["watching"]


def test_aws_legacy_termination_time_alone_is_a_stop_notice(scripted: ScriptedEmulator, seen: Seen) -> None:
    scripted.hide_instance_action = True
    watcher = aws(scripted)
    with running(watcher, seen.board):
        when = scripted.aws_interrupt("terminate", in_s=90)
        seen.wait_notices(1)
        wait_polls(watcher, 5)
    (notice,) = seen.pump().notices
    assert (notice.source, notice.kind, notice.deadline) == ("aws", STOP, when)
    assert notice.detail == "terminate (termination-time)"
    assert any(r.path == AWS_LEGACY and r.status == 200 for r in scripted.requests)


def test_aws_rebalance_is_a_warning_only(emulator: ProviderEmulator, seen: Seen) -> None:
    watcher = aws(emulator)
    with running(watcher, seen.board):
        emulator.aws_rebalance()
        seen.wait_notices(1)
        wait_polls(watcher, 5)
        (notice,) = seen.pump().notices
        assert (notice.source, notice.kind, notice.deadline) == ("aws", WARNING, None)
        assert notice.detail == "rebalance recommendation"
        assert notice.key is not None and notice.key.startswith("aws:rebalance:")
        assert not seen.board.pending()
        assert seen.board.first is None and seen.board.deadline is None
        when = emulator.aws_interrupt("terminate", in_s=120)
        seen.wait_notices(2)
    assert seen.board.pending()
    assert seen.board.deadline == when


def test_aws_without_rebalance_does_not_ask_for_it(emulator: ProviderEmulator, seen: Seen) -> None:
    watcher = aws(emulator, rebalance=False)
    emulator.aws_rebalance()
    with running(watcher, seen.board):
        wait_polls(watcher, 3)
    assert seen.pump().notices == []
    assert not any(r.path == AWS_REBALANCE for r in emulator.requests)


def test_aws_token_is_fetched_once_and_refreshed_after_expiry(emulator: ProviderEmulator, seen: Seen) -> None:
    watcher = aws(emulator)
    with running(watcher, seen.board):
        wait_polls(watcher, 5)
        assert watcher.token_fetches == 1
        puts = [r for r in emulator.requests if r.method == "PUT"]
        assert [(r.path, r.headers[TTL.lower()]) for r in puts] == [(AWS_TOKEN, "21600")]
        tokens = {r.headers.get(TOKEN.lower()) for r in emulator.requests if r.method == "GET"}
        assert len(tokens) == 1 and None not in tokens
        emulator.expire_tokens()
        wait_until(lambda: watcher.token_fetches == 2, what="a fresh token after a 401")
        wait_polls(watcher, 3)
        when = emulator.aws_interrupt()
        (notice,) = seen.wait_notices(1)
    assert watcher.token_fetches == 2
    assert notice.deadline == when
    assert sum(r.status == 401 for r in emulator.requests) == 1  # one 401, one retry with the new token
    assert "bad_response" not in seen.statuses()


def test_aws_token_is_renewed_before_it_expires(emulator: ProviderEmulator, seen: Seen) -> None:
    now = [time.time()]
    watcher = aws(emulator, token_ttl_s=120, clock=lambda: now[0])
    with running(watcher, seen.board):
        wait_polls(watcher, 3)
        assert watcher.token_fetches == 1
        now[0] += 61  # past the renewal point (a minute before expiry)
        wait_until(lambda: watcher.token_fetches == 2, what="the token to be renewed")
        wait_polls(watcher, 3)
    assert watcher.token_fetches == 2
    assert [r.headers[TTL.lower()] for r in emulator.requests if r.method == "PUT"] == ["120", "120"]
    assert not any(r.status == 401 for r in emulator.requests)


@pytest.mark.parametrize("ttl", [0, 21601])
def test_aws_rejects_an_impossible_token_ttl(emulator: ProviderEmulator, ttl: int) -> None:
    with pytest.raises(ValueError, match="token_ttl_s"):
        aws(emulator, token_ttl_s=ttl)


@pytest.mark.parametrize("token_status", [403, 404, 405])
def test_aws_imdsv1_only_endpoint_is_read_without_a_token(
    scripted: ScriptedEmulator, seen: Seen, token_status: int
) -> None:
    scripted.require_token = False
    scripted.token_status = token_status
    watcher = aws(scripted)
    with running(watcher, seen.board):
        wait_polls(watcher, 3)
        when = scripted.aws_interrupt("stop", in_s=120)
        (notice,) = seen.wait_notices(1)
    assert (notice.detail, notice.deadline) == ("stop", when)
    assert watcher.token_fetches == 0
    assert "IMDSv1" in watcher.describe()
    assert len([r for r in scripted.requests if r.method == "PUT"]) == 1  # asked once, then remembered
    gets = [r for r in scripted.requests if r.method == "GET"]
    assert gets and all(TOKEN.lower() not in r.headers for r in gets)
    assert seen.statuses() == ["watching"]


def test_aws_garbage_is_reported_once_and_the_watcher_keeps_going(emulator: ProviderEmulator, seen: Seen) -> None:
    emulator.garbage.add("aws")
    watcher = aws(emulator)
    with running(watcher, seen.board):
        seen.wait_status("bad_response")
        asked = len(emulator.requests)
        wait_until(lambda: len(emulator.requests) >= asked + 20, what="20 more requests")
        assert seen.statuses() == ["bad_response"]
        assert seen.notices == []
        emulator.garbage.clear()
        when = emulator.aws_interrupt()
        (notice,) = seen.wait_notices(1)
        wait_polls(watcher, 3)
    assert notice.deadline == when
    assert seen.statuses() == ["bad_response", "watching"]


def test_aws_unknown_action_is_a_bad_response(emulator: ProviderEmulator, seen: Seen) -> None:
    emulator.aws_interrupt("explode", in_s=120)
    watcher = aws(emulator)
    with running(watcher, seen.board):
        seen.wait_status("bad_response")
        asked = len(emulator.requests)
        wait_until(lambda: len(emulator.requests) >= asked + 10, what="10 more requests")
    assert seen.pump().notices == []
    (report,) = seen.reports
    assert report.source == "aws" and "instance-action" in report.message and "explode" in report.message


def test_aws_endpoint_down_then_up(seen: Seen) -> None:
    port = free_port()
    watcher = AwsSpotNotices(f"http://127.0.0.1:{port}", poll_s=0.05, timeout_s=1.0, env={})
    watcher.max_backoff_s = 0.2
    calls = count_calls(watcher.client)
    watcher.start(seen.board)
    try:
        seen.wait_status("unreachable")
        wait_until(lambda: len(calls) >= 6, what="six attempts while down")
        assert seen.statuses() == ["unreachable"]  # once per outage, not once per poll
        (report,) = seen.reports
        assert report.source == "aws" and str(port) in report.message
        late = ProviderEmulator(port=port).start()
        try:
            seen.wait_status("recovered")
            when = late.aws_interrupt()
            (notice,) = seen.wait_notices(1)
            watcher.stop()
        finally:
            shut(late)
    finally:
        watcher.stop()
    assert notice.deadline == when
    assert seen.statuses() == ["unreachable", "recovered"]


def test_aws_slow_endpoint_is_unreachable_not_fatal(emulator: ProviderEmulator, seen: Seen) -> None:
    emulator.delay_s = 2.0
    watcher = aws(emulator, timeout_s=0.5)
    watcher.max_backoff_s = 0.2
    with running(watcher, seen.board):
        seen.wait_status("unreachable")
        assert watcher.polls == 0
        emulator.delay_s = 0.0
        seen.wait_status("recovered")
        when = emulator.aws_interrupt()
        (notice,) = seen.wait_notices(1)
    assert notice.deadline == when
    assert seen.statuses() == ["unreachable", "recovered"]


def test_aws_stop_ends_the_thread_without_waiting_for_the_next_poll(emulator: ProviderEmulator, seen: Seen) -> None:
    watcher = aws(emulator, poll_s=600.0)
    watcher.start(seen.board)
    try:
        seen.wait_status("watching")
        thread = watcher._thread
        assert thread is not None and thread.is_alive() and thread.daemon
    finally:
        watcher.stop()
    wait_until(lambda: not thread.is_alive(), what="the watcher thread to end (it was in a 600 s pause)")
    assert watcher.stopped
    assert watcher.polls == 1


# == 3. GCP ========================================================================================================


@pytest.mark.parametrize("notice_s", [0.0, 120.0])
def test_gcp_preempted_is_a_stop_notice(emulator: ProviderEmulator, seen: Seen, notice_s: float) -> None:
    source = gcp(emulator, notice_s=notice_s)
    watcher = source.watchers[0]
    with running(source, seen.board, down_first=emulator):
        wait_until(lambda: watcher.etag is not None, what="the first answer")
        assert seen.pump().notices == []
        emulator.gcp_preempt()
        seen.wait_notices(1)
        wait_polls(watcher, 1)  # TRUE again at the end of the next hang: still one notice
        statuses = seen.statuses()  # before the emulator goes down (that is reported too)
    (notice,) = seen.pump().notices
    assert (notice.source, notice.kind, notice.detail, notice.key) == ("gcp", STOP, "preempted", "gcp:preempted")
    assert notice.deadline == pytest.approx(notice.received_at + 30.0 + notice_s, abs=1e-6)
    assert statuses == ["watching"]


@pytest.mark.parametrize(
    ("value", "kind"), [("TERMINATE_ON_HOST_MAINTENANCE", STOP), ("MIGRATE_ON_HOST_MAINTENANCE", WARNING)]
)
def test_gcp_maintenance_events(emulator: ProviderEmulator, seen: Seen, value: str, kind: str) -> None:
    source = gcp(emulator, maintenance=True, maintenance_window_s=45.0)
    assert [w.key for w in source.watchers] == ["preempted", "maintenance-event"]
    with running(source, seen.board, down_first=emulator):
        wait_until(lambda: all(w.etag is not None for w in source.watchers), what="both keys answered")
        emulator.gcp_set("maintenance-event", value)
        seen.wait_notices(1)
        wait_polls(source.watchers[1], 1)
    (notice,) = seen.pump().notices
    assert (notice.source, notice.kind, notice.detail) == ("gcp", kind, value)
    if kind == STOP:
        assert notice.deadline == pytest.approx(notice.received_at + 45.0, abs=1e-6)
        assert seen.board.pending()
    else:
        assert notice.deadline is None
        assert not seen.board.pending()


def test_gcp_notice_arrives_while_a_hanging_get_is_in_progress(scripted: ScriptedEmulator, seen: Seen) -> None:
    etag = raw(scripted, "GET", gcp_path("preempted"), FLAVOR).headers["etag"]
    source = gcp(scripted, hang_s=60)
    with running(source, seen.board, down_first=scripted):
        wait_until(lambda: scripted.hanging == 1, what="the watcher's GET to hang")
        scripted.gcp_preempt()
        (notice,) = seen.wait_notices(1, timeout=30)  # the hang would last 60 s
    assert notice.detail == "preempted"
    asked = [r for r in scripted.requests if r.path.startswith(gcp_path("preempted"))]
    assert all(r.headers["metadata-flavor"] == "Google" for r in asked)
    plain = [r for r in asked if not query_of(r.path)]
    hung = [r for r in asked if query_of(r.path)]
    assert len(plain) == 2  # this test's own read, then the watcher's first read
    assert query_of(hung[0].path) == {"wait_for_change": ["true"], "timeout_sec": ["60"], "last_etag": [etag]}


def test_gcp_hangs_again_after_each_timeout(emulator: ProviderEmulator, seen: Seen) -> None:
    etag = raw(emulator, "GET", gcp_path("preempted"), FLAVOR).headers["etag"]
    source = gcp(emulator, hang_s=1)
    with running(source, seen.board, down_first=emulator):
        wait_until(lambda: len(hanging_gets(emulator)) >= 2, what="two hanging GETs to time out")
        statuses = seen.statuses()
        asked = hanging_gets(emulator)
    assert all(query_of(r.path)["last_etag"] == [etag] for r in asked)
    assert seen.pump().notices == []
    assert statuses == ["watching"]


def test_gcp_unexpected_value_is_reported_once_then_a_notice_still_arrives(
    emulator: ProviderEmulator, seen: Seen
) -> None:
    source = gcp(emulator)
    with running(source, seen.board, down_first=emulator):
        seen.wait_status("watching")
        emulator.gcp_set("preempted", "MAYBE")
        seen.wait_status("bad_response")
        asked = len(emulator.requests)
        wait_until(lambda: len(emulator.requests) >= asked + 10, what="10 more requests")
        assert seen.statuses() == ["watching", "bad_response"]
        assert "MAYBE" in seen.reports[-1].message
        emulator.gcp_preempt()
        (notice,) = seen.wait_notices(1)
        statuses = seen.statuses()
    assert notice.kind == STOP
    assert statuses == ["watching", "bad_response"]


def test_gcp_garbage_is_reported_once(emulator: ProviderEmulator, seen: Seen) -> None:
    emulator.garbage.add("gcp")
    source = gcp(emulator)
    with running(source, seen.board, down_first=emulator):
        seen.wait_status("bad_response")
        asked = len(emulator.requests)
        wait_until(lambda: len(emulator.requests) >= asked + 10, what="10 more requests")
        assert seen.statuses() == ["bad_response"]
        emulator.garbage.clear()
        emulator.gcp_preempt()
        seen.wait_notices(1)
        seen.wait_status("watching")
        statuses = seen.statuses()
    assert statuses == ["bad_response", "watching"]


def test_gcp_endpoint_down_is_reported_once(seen: Seen) -> None:
    port = free_port()
    source = GcpNotices(f"http://127.0.0.1:{port}", retry_s=0.05, timeout_s=1.0, maintenance=False, env={})
    source.watchers[0].max_backoff_s = 0.2
    calls = count_calls(source.client)
    with running(source, seen.board):
        seen.wait_status("unreachable")
        wait_until(lambda: len(calls) >= 5, what="five attempts while down")
    assert seen.statuses() == ["unreachable"]
    assert seen.reports[0].source == "gcp"


# == 4. Azure ======================================================================================================


@pytest.mark.parametrize("kind", ["Preempt", "Terminate"])
def test_azure_stop_event_deadline_is_not_before(emulator: ProviderEmulator, seen: Seen, kind: str) -> None:
    watcher = azure(emulator)
    with running(watcher, seen.board):
        seen.wait_status("watching")
        event_id = emulator.azure_event(kind, in_s=45)
        seen.wait_notices(1)
        wait_polls(watcher, 5)  # the same event on every poll: still one notice
    (notice,) = seen.pump().notices
    event = azure_event(emulator, event_id)
    assert (notice.source, notice.kind, notice.key) == ("azure", STOP, f"azure:{event_id}")
    assert notice.detail == f"{kind} {event_id} (Scheduled)"
    assert notice.deadline == rfc1123(event["NotBefore"])
    assert 0 < notice.deadline - notice.received_at <= 45
    assert watcher.vm_name == "spotsafe-vm"  # learned from the instance metadata
    assert watcher.incarnation == azure_doc(emulator)["DocumentIncarnation"]


def test_azure_started_event_deadline_is_now(emulator: ProviderEmulator, seen: Seen) -> None:
    event_id = emulator.azure_event("Preempt", in_s=30)
    emulator.azure_start(event_id)
    watcher = azure(emulator)
    with running(watcher, seen.board):
        (notice,) = seen.wait_notices(1)
    assert notice.kind == STOP
    assert notice.deadline == notice.received_at
    assert notice.detail == f"Preempt {event_id} (Started)"


@pytest.mark.parametrize("kind", ["Reboot", "Redeploy"])
def test_azure_reboot_and_redeploy_are_warnings(emulator: ProviderEmulator, seen: Seen, kind: str) -> None:
    watcher = azure(emulator)
    with running(watcher, seen.board):
        event_id = emulator.azure_event(kind, in_s=300)
        seen.wait_notices(1)
        wait_polls(watcher, 5)
    (notice,) = seen.pump().notices
    assert (notice.source, notice.kind, notice.deadline) == ("azure", WARNING, None)
    assert notice.detail == f"{kind} {event_id}"
    assert not seen.board.pending()


def test_azure_ignores_freeze_and_other_vms_events(emulator: ProviderEmulator, seen: Seen) -> None:
    emulator.azure_event("Freeze", in_s=30)
    emulator.azure_event("Preempt", in_s=30, resources=["someone-else"])
    emulator.azure_event("Reboot", in_s=30, resources=["someone-else", "another-one"])
    incarnation = azure_doc(emulator)["DocumentIncarnation"]
    watcher = azure(emulator)
    with running(watcher, seen.board):
        wait_until(lambda: watcher.incarnation == incarnation, what="the document to be read")
        wait_polls(watcher, 5)
        assert seen.pump().notices == []
        mine = emulator.azure_event("Preempt", in_s=30, resources=["someone-else", "spotsafe-vm"])
        (notice,) = seen.wait_notices(1)
    assert notice.key == f"azure:{mine}"


def test_azure_vm_name_given_overrides_the_lookup(emulator: ProviderEmulator, seen: Seen) -> None:
    watcher = azure(emulator, vm_name="trainer-7")
    with running(watcher, seen.board):
        emulator.azure_event("Preempt", in_s=30)  # for spotsafe-vm: not us
        theirs_done = azure_doc(emulator)["DocumentIncarnation"]
        wait_until(lambda: watcher.incarnation == theirs_done, what="the document to be read")
        wait_polls(watcher, 3)
        assert seen.pump().notices == []
        ours = emulator.azure_event("Preempt", in_s=30, resources=["trainer-7"])
        (notice,) = seen.wait_notices(1)
    assert ours in notice.detail
    assert not any(r.path.startswith("/metadata/instance/compute/name") for r in emulator.requests)


def test_azure_acknowledges_after_a_committed_stop(emulator: ProviderEmulator, seen: Seen) -> None:
    watcher = azure(emulator, acknowledge=True)
    with running(watcher, seen.board):
        event_id = emulator.azure_event("Preempt", in_s=60)
        emulator.azure_event("Reboot", in_s=60)  # a warning: never acknowledged
        seen.wait_notices(2)
        watcher.after_stop(committed=True)
        assert emulator.acks == [event_id]
        assert seen.statuses().count("acknowledged") == 1
    event = azure_event(emulator, event_id)
    assert (event["EventStatus"], event["NotBefore"]) == ("Started", "")
    (post,) = [r for r in emulator.requests if r.method == "POST"]
    assert urlsplit(post.path).path == "/metadata/scheduledevents"
    assert query_of(post.path)["api-version"] == ["2020-07-01"]
    assert post.headers["metadata"] == "true"
    assert json.loads(post.body) == {"StartRequests": [{"EventId": event_id}]}
    (report,) = [r for r in seen.reports if r.status == "acknowledged"]
    assert report.source == "azure" and event_id in report.message


@pytest.mark.parametrize(("acknowledge", "committed"), [(False, True), (True, False)])
def test_azure_does_not_acknowledge_unless_asked_and_committed(
    emulator: ProviderEmulator, seen: Seen, acknowledge: bool, committed: bool
) -> None:
    watcher = azure(emulator, acknowledge=acknowledge)
    with running(watcher, seen.board):
        emulator.azure_event("Preempt", in_s=60)
        seen.wait_notices(1)
        watcher.after_stop(committed=committed)
    assert emulator.acks == []
    assert not any(r.method == "POST" for r in emulator.requests)
    assert "acknowledged" not in seen.statuses() and "ack_failed" not in seen.statuses()


def test_azure_acknowledge_without_a_stop_event_posts_nothing(emulator: ProviderEmulator, seen: Seen) -> None:
    watcher = azure(emulator, acknowledge=True)
    with running(watcher, seen.board):
        emulator.azure_event("Reboot", in_s=60)
        seen.wait_notices(1)
        watcher.after_stop(committed=True)
    assert not any(r.method == "POST" for r in emulator.requests)


@pytest.mark.parametrize("fault", ["status", "down"])
def test_azure_failed_acknowledgement_is_reported(emulator: ProviderEmulator, seen: Seen, fault: str) -> None:
    emulator.azure_event("Preempt", in_s=60)
    # One poll, then a long pause: no request of the watcher's own is in flight when the fault is set.
    watcher = azure(emulator, acknowledge=True, poll_s=600.0)
    with running(watcher, seen.board):
        seen.wait_notices(1)
        if fault == "status":
            emulator.status["azure"] = 500
        else:
            shut(emulator)  # connections kept alive from before are dropped too
        watcher.after_stop(committed=True)
    assert emulator.acks == []
    assert seen.statuses().count("ack_failed") == 1
    assert "acknowledged" not in seen.statuses()


def test_azure_first_call_may_take_long(emulator: ProviderEmulator, seen: Seen) -> None:
    emulator.delay_s = 1.0
    watcher = azure(emulator, vm_name="spotsafe-vm", timeout_s=0.3, first_call_timeout_s=5.0)
    watcher.max_backoff_s = 0.2
    event_id = emulator.azure_event("Preempt", in_s=60)
    with running(watcher, seen.board):
        seen.wait_status("watching")
        assert seen.statuses()[0] == "watching"  # the first call got its answer, late as it was
        (notice,) = seen.notices
        seen.wait_status("unreachable")  # the next ones use the short timeout
    assert notice.key == f"azure:{event_id}"


def test_azure_slow_first_scheduled_events_call(scripted: ScriptedEmulator, seen: Seen) -> None:
    scripted.slow_first_events_s = 2.0
    watcher = azure(scripted, timeout_s=1.0, first_call_timeout_s=10.0)
    with running(watcher, seen.board):
        seen.wait_status("watching")
        event_id = scripted.azure_event("Terminate", in_s=60)
        (notice,) = seen.wait_notices(1)
        wait_polls(watcher, 3)
    assert notice.key == f"azure:{event_id}"
    assert watcher.vm_name == "spotsafe-vm"
    assert seen.statuses() == ["watching"]


def test_azure_garbage_is_reported_once(emulator: ProviderEmulator, seen: Seen) -> None:
    watcher = azure(emulator, vm_name="spotsafe-vm")
    with running(watcher, seen.board):
        seen.wait_status("watching")
        emulator.garbage.add("azure")
        seen.wait_status("bad_response")
        asked = len(emulator.requests)
        wait_until(lambda: len(emulator.requests) >= asked + 10, what="10 more requests")
        assert seen.statuses() == ["watching", "bad_response"]
        emulator.garbage.clear()
        emulator.azure_event("Preempt", in_s=60)
        seen.wait_notices(1)
    assert seen.statuses() == ["watching", "bad_response"]


def test_azure_garbage_vm_name_at_startup_does_not_hide_later_events(emulator: ProviderEmulator, seen: Seen) -> None:
    emulator.garbage.add("azure")
    watcher = azure(emulator)
    with running(watcher, seen.board):
        seen.wait_status("bad_response")
        emulator.garbage.clear()
        event_id = emulator.azure_event("Preempt", in_s=60)
        incarnation = azure_doc(emulator)["DocumentIncarnation"]
        wait_until(lambda: watcher.incarnation == incarnation, what="the events to be read")
        wait_polls(watcher, 3)
    assert [n.key for n in seen.pump().notices] == [f"azure:{event_id}"]


def test_azure_malformed_not_before_is_reported_once(scripted: ScriptedEmulator, seen: Seen) -> None:
    event_id = scripted.azure_event("Preempt", in_s=60)
    scripted.azure_patch(event_id, NotBefore=1_700_000_000)
    watcher = azure(scripted, vm_name="spotsafe-vm")
    with running(watcher, seen.board):
        seen.wait_status("bad_response")
        asked = len(scripted.requests)
        wait_until(lambda: len(scripted.requests) >= asked + 10, what="10 more requests")
    assert seen.statuses() == ["bad_response"]


# == 5. the board ==================================================================================================


def test_board_keyed_notice_is_posted_once_and_deadline_is_the_earliest() -> None:
    board = NoticeBoard()
    late = Notice("aws", 100.0, 220.0, STOP, "terminate", key="aws:spot-interruption")
    assert board.post(late)
    assert not board.post(Notice("aws", 105.0, 225.0, STOP, "terminate", key="aws:spot-interruption"))
    assert board.post(Notice("aws", 101.0, None, WARNING, "rebalance recommendation", key="aws:rebalance:x"))
    assert [n.received_at for n in board.drain()] == [100.0, 101.0]
    assert board.deadline == 220.0
    early = Notice("azure", 110.0, 140.0, STOP, "Preempt", key="azure:1")
    board.post(early)
    board.post(Notice("SIGTERM", 111.0))  # a stop without a deadline changes nothing
    board.post(Notice("gcp", 112.0, 500.0, STOP, "preempted", key="gcp:preempted"))
    board.drain()
    assert board.deadline == 140.0
    assert board.first == late


def test_board_warnings_alone_are_not_pending() -> None:
    board = NoticeBoard()
    board.post(Notice("azure", 1.0, 99.0, WARNING, "Reboot", key="azure:r"))
    board.post(Notice("gcp", 2.0, None, WARNING, "MIGRATE_ON_HOST_MAINTENANCE"))
    assert not board.pending()
    assert len(board.drain()) == 2
    assert (board.pending(), board.first, board.deadline) == (False, None, None)
    board.post(Notice("SIGTERM", 3.0))
    assert board.pending()  # before the drain too


def test_board_two_watchers_seeing_the_same_interruption_post_it_once(emulator: ProviderEmulator, seen: Seen) -> None:
    one, two = aws(emulator), aws(emulator)
    with running(one, seen.board), running(two, seen.board):
        when = emulator.aws_interrupt("terminate", in_s=120)
        seen.wait_notices(1)
        wait_polls(one, 3)
        wait_polls(two, 3)
    (notice,) = seen.pump().notices
    assert notice.deadline == when


def test_board_instance_action_after_termination_time_is_the_same_notice(
    scripted: ScriptedEmulator, seen: Seen
) -> None:
    scripted.hide_instance_action = True
    watcher = aws(scripted)
    with running(watcher, seen.board):
        scripted.aws_interrupt("terminate", in_s=120)
        seen.wait_notices(1)
        scripted.hide_instance_action = False
        wait_until(
            lambda: any(r.path == AWS_ACTION and r.status == 200 for r in scripted.requests),
            what="instance-action to be read",
        )
        wait_polls(watcher, 3)
    (notice,) = seen.pump().notices
    assert notice.detail == "terminate (termination-time)"


def test_board_deadline_is_the_earliest_across_providers(emulator: ProviderEmulator, seen: Seen) -> None:
    with contextlib.ExitStack() as stack:
        stack.enter_context(running(aws(emulator), seen.board))
        stack.enter_context(running(azure(emulator), seen.board))
        stack.enter_context(running(gcp(emulator, maintenance=True), seen.board, down_first=emulator))
        emulator.gcp_set("maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE")
        seen.wait_notices(1)
        assert not seen.board.pending()
        aws_when = emulator.aws_interrupt("terminate", in_s=120)
        seen.wait_notices(2)
        event_id = emulator.azure_event("Preempt", in_s=40)
        seen.wait_notices(3)
        azure_when = rfc1123(azure_event(emulator, event_id)["NotBefore"])
    assert azure_when < aws_when
    assert [(n.source, n.kind) for n in seen.pump().notices] == [("gcp", WARNING), ("aws", STOP), ("azure", STOP)]
    assert seen.board.deadline == azure_when
    assert seen.board.first is not None and seen.board.first.source == "aws"


# == 6. signals, Kubernetes, Slurm =================================================================================


@dataclass
class Previous:
    """The Python-level handler installed before a test's signal source (so a broken install cannot kill pytest)."""

    handler: Callable[[int, FrameType | None], None]
    seen: list[int]


@pytest.fixture
def previous_handlers() -> Iterator[Previous]:
    got: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        got.append(signum)

    originals = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield Previous(handler, got)
    finally:
        for sig, original in originals.items():
            signal.signal(sig, original)


def send(sig: int) -> None:
    os.kill(os.getpid(), sig)


@dataclass(frozen=True)
class FakeScontrol:
    """An executable ``scontrol`` that appends its arguments to ``log``, one call a line."""

    path: Path
    log: Path

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split("\x1f")[:-1] for line in self.log.read_text().splitlines()]


def fake_scontrol(tmp_path: Path, exit_code: int = 0) -> FakeScontrol:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    script, log = folder / "scontrol", tmp_path / "scontrol.argv"
    script.write_text(
        "#!/bin/sh\n"
        f"for arg in \"$@\"; do printf '%s\\037' \"$arg\" >> '{log}'; done\n"
        f"printf '\\n' >> '{log}'\n"
        'echo "fake scontrol: $*" >&2\n'
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)
    return FakeScontrol(script, log)


def test_kubernetes_sigterm_notice(previous_handlers: Previous, seen: Seen) -> None:
    source = SignalNotices([signal.SIGTERM], source="kubernetes", grace_seconds=30)
    assert source.name == "kubernetes"
    with running(source, seen.board):
        assert signal.getsignal(signal.SIGTERM) is not previous_handlers.handler
        send(signal.SIGTERM)
        (notice,) = seen.wait_notices(1)
    assert notice == Notice("kubernetes", notice.received_at, notice.received_at + 30, STOP, "SIGTERM", None)
    assert previous_handlers.seen == []
    assert signal.getsignal(signal.SIGTERM) is previous_handlers.handler  # stop() put it back
    send(signal.SIGTERM)
    wait_until(lambda: previous_handlers.seen == [signal.SIGTERM], what="the restored handler")
    assert seen.pump().notices == [notice]


@pytest.mark.parametrize("committed", [True, False])
def test_slurm_warning_signal_then_one_requeue(
    previous_handlers: Previous, seen: Seen, tmp_path: Path, committed: bool
) -> None:
    fake = fake_scontrol(tmp_path)
    source = SlurmNotices(job_id="123", lead_s=90, requeue=True, scontrol=(str(fake.path),))
    assert (source.name, source.signals) == ("slurm", (signal.SIGUSR1,))
    with running(source, seen.board):
        send(signal.SIGUSR1)
        (notice,) = seen.wait_notices(1)
        source.after_stop(committed)
        source.after_stop(committed)  # at most once
    assert (notice.source, notice.kind, notice.detail) == ("slurm", STOP, "SIGUSR1")
    assert notice.deadline == notice.received_at + 90
    assert fake.calls() == [["requeue", "123"]]
    assert source.requeued
    assert seen.statuses() == ["acknowledged"]
    assert f"{fake.path} requeue 123" in seen.reports[0].message


def test_slurm_failing_requeue_is_reported(previous_handlers: Previous, seen: Seen, tmp_path: Path) -> None:
    fake = fake_scontrol(tmp_path, exit_code=1)
    source = SlurmNotices(job_id="77", lead_s=60, requeue=True, scontrol=(str(fake.path),))
    with running(source, seen.board):
        send(signal.SIGUSR1)
        seen.wait_notices(1)
        source.after_stop(True)
    assert fake.calls() == [["requeue", "77"]]
    assert not source.requeued
    assert seen.statuses() == ["ack_failed"]
    assert "fake scontrol: requeue 77" in seen.reports[0].message  # its stderr is in the report


def test_slurm_missing_scontrol_is_reported(previous_handlers: Previous, seen: Seen, tmp_path: Path) -> None:
    source = SlurmNotices(job_id="77", requeue=True, scontrol=(str(tmp_path / "nowhere" / "scontrol"),))
    with running(source, seen.board):
        send(signal.SIGUSR1)
        (notice,) = seen.wait_notices(1)
        source.after_stop(True)
    assert notice.deadline is None  # no lead given
    assert seen.statuses() == ["ack_failed"]


def test_slurm_no_requeue_without_the_signal(previous_handlers: Previous, seen: Seen, tmp_path: Path) -> None:
    fake = fake_scontrol(tmp_path)
    source = SlurmNotices(job_id="123", lead_s=90, requeue=True, scontrol=(str(fake.path),))
    with running(source, seen.board):
        source.after_stop(True)
    assert fake.calls() == []
    assert seen.statuses() == []
    assert not source.requeued


def test_slurm_no_requeue_unless_asked(previous_handlers: Previous, seen: Seen, tmp_path: Path) -> None:
    fake = fake_scontrol(tmp_path)
    source = SlurmNotices(job_id="123", lead_s=90, scontrol=(str(fake.path),))
    with running(source, seen.board):
        send(signal.SIGUSR1)
        seen.wait_notices(1)
        source.after_stop(True)
    assert fake.calls() == []
    assert seen.statuses() == []


def test_slurm_requeue_without_a_job_id_is_reported(previous_handlers: Previous, seen: Seen, tmp_path: Path) -> None:
    fake = fake_scontrol(tmp_path)
    source = SlurmNotices(job_id=None, requeue=True, scontrol=(str(fake.path),))
    with running(source, seen.board):
        send(signal.SIGUSR1)
        seen.wait_notices(1)
        source.after_stop(True)
    assert fake.calls() == []
    assert seen.statuses() == ["ack_failed"]
    assert "SLURM_JOB_ID" in seen.reports[0].message


def test_slurm_from_the_environment_requeues_with_scontrol_on_path(
    previous_handlers: Previous, seen: Seen, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.path.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env = {"SLURM_JOB_ID": "4242", "SPOTSAFE_SLURM_SIGNAL_LEAD": "120", "SPOTSAFE_SLURM_REQUEUE": "1"}
    sources = build_sources(
        detect(env, dmi_root=str(tmp_path / "dmi"), hypervisor_uuid=str(tmp_path / "uuid")).names, env=env
    )
    (slurm,) = [s for s in sources if isinstance(s, SlurmNotices)]
    with running(slurm, seen.board):
        send(signal.SIGUSR1)
        (notice,) = seen.wait_notices(1)
        slurm.after_stop(True)
    assert notice.deadline == notice.received_at + 120
    assert fake.calls() == [["requeue", "4242"]]
    assert seen.statuses() == ["acknowledged"]


# == 7. detect() and build_sources() ===============================================================================


@dataclass(frozen=True)
class Machine:
    """A fake /sys: a DMI folder and a hypervisor UUID path under tmp_path."""

    dmi_root: str
    hypervisor_uuid: str

    def detect(self, env: dict[str, str]) -> tuple[str, ...]:
        return detect(env, dmi_root=self.dmi_root, hypervisor_uuid=self.hypervisor_uuid).names


def machine(tmp_path: Path, uuid: str | None = None, **dmi: str) -> Machine:
    root = tmp_path / "dmi"
    root.mkdir(exist_ok=True)
    for name, value in dmi.items():
        (root / name).write_text(value + "\n")
    uuid_path = tmp_path / "hypervisor-uuid"
    if uuid is not None:
        uuid_path.write_text(uuid + "\n")
    return Machine(str(root), str(uuid_path))


def test_detect_nothing_special_is_signals_only(tmp_path: Path) -> None:
    found = detect({}, dmi_root=str(tmp_path / "missing"), hypervisor_uuid=str(tmp_path / "missing-uuid"))
    assert found.names == ("signals",)
    assert found.reasons == {"signals": "always"}


@pytest.mark.parametrize("setting", ["none", "NONE", " none "])
def test_detect_none(tmp_path: Path, setting: str) -> None:
    bare = machine(tmp_path, sys_vendor="Amazon EC2")
    assert bare.detect({"SPOTSAFE_NOTICES": setting, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == ()


@pytest.mark.parametrize("setting", ["auto", "", "Auto"])
def test_detect_auto_is_the_default(tmp_path: Path, setting: str) -> None:
    env = {"SPOTSAFE_NOTICES": setting, "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert machine(tmp_path).detect(env) == ("kubernetes", "signals")


def test_detect_explicit_list(tmp_path: Path) -> None:
    found = detect(
        {"SPOTSAFE_NOTICES": " GCP, azure,,slurm "}, dmi_root=str(tmp_path), hypervisor_uuid=str(tmp_path / "u")
    )
    assert found.names == ("gcp", "azure", "slurm")
    assert set(found.reasons) == {"gcp", "azure", "slurm"}


@pytest.mark.parametrize("setting", ["aws,oracle", "auto,aws", "everything"])
def test_detect_unknown_name_is_a_config_error(tmp_path: Path, setting: str) -> None:
    with pytest.raises(ConfigError, match="SPOTSAFE_NOTICES"):
        machine(tmp_path).detect({"SPOTSAFE_NOTICES": setting})


@pytest.mark.parametrize(
    ("dmi", "uuid", "env"),
    [
        ({}, None, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:1"}),
        ({"sys_vendor": "Amazon EC2"}, None, {}),
        ({"board_vendor": "Amazon EC2"}, None, {}),
        ({}, "ec2e1916-9099-7caf-fd21-012345abcdef", {}),
        ({}, "EC2E1916-9099-7CAF-FD21-012345ABCDEF", {}),
    ],
)
def test_detect_aws(tmp_path: Path, dmi: dict[str, str], uuid: str | None, env: dict[str, str]) -> None:
    here = machine(tmp_path, uuid, **dmi)
    assert here.detect(env) == ("aws", "signals")
    assert here.detect({**env, "AWS_EC2_METADATA_DISABLED": "true"}) == ("signals",)
    assert here.detect({**env, "AWS_EC2_METADATA_DISABLED": "false"}) == ("aws", "signals")


def test_detect_not_aws_for_other_vendors_and_uuids(tmp_path: Path) -> None:
    here = machine(tmp_path, "4f1e1916-9099-7caf-fd21-012345abcdef", sys_vendor="QEMU", product_name="Standard PC")
    assert here.detect({}) == ("signals",)


@pytest.mark.parametrize(
    ("dmi", "env"),
    [
        ({}, {"GCE_METADATA_HOST": "127.0.0.1:1"}),
        ({"product_name": "Google Compute Engine"}, {}),
        ({"sys_vendor": "Google"}, {}),
    ],
)
def test_detect_gcp(tmp_path: Path, dmi: dict[str, str], env: dict[str, str]) -> None:
    assert machine(tmp_path, **dmi).detect(env) == ("gcp", "signals")


@pytest.mark.parametrize(
    ("dmi", "env"),
    [
        ({}, {"SPOTSAFE_AZURE_METADATA_ENDPOINT": "http://127.0.0.1:1"}),
        ({"chassis_asset_tag": AZURE_ASSET_TAG, "sys_vendor": "Microsoft Corporation"}, {}),
    ],
)
def test_detect_azure(tmp_path: Path, dmi: dict[str, str], env: dict[str, str]) -> None:
    assert machine(tmp_path, **dmi).detect(env) == ("azure", "signals")


def test_detect_not_azure_for_another_asset_tag(tmp_path: Path) -> None:
    here = machine(tmp_path, chassis_asset_tag="7783-7084-3265-9085-8269-3286-78", sys_vendor="Microsoft Corporation")
    assert here.detect({}) == ("signals",)


def test_detect_kubernetes_and_slurm_with_reasons(tmp_path: Path) -> None:
    here = machine(tmp_path, product_name="Google Compute Engine")
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "SLURM_JOB_ID": "99"}
    found = detect(env, dmi_root=here.dmi_root, hypervisor_uuid=here.hypervisor_uuid)
    assert found.names == ("gcp", "kubernetes", "slurm", "signals")
    assert found.reasons["kubernetes"] == "$KUBERNETES_SERVICE_HOST"
    assert found.reasons["slurm"] == "$SLURM_JOB_ID"


def test_detect_everything_at_once_from_the_emulator_env(tmp_path: Path, emulator: ProviderEmulator) -> None:
    assert machine(tmp_path).detect(emulator.env()) == ("aws", "gcp", "azure", "signals")


def signal_sources(sources: list[NoticeSource]) -> list[SignalNotices]:
    return [s for s in sources if isinstance(s, SignalNotices)]


def test_build_sources_plain_signals() -> None:
    sources = build_sources(["signals"], env={})
    (plain,) = sources
    assert isinstance(plain, SignalNotices) and not isinstance(plain, SlurmNotices)
    assert plain.name == "signals" and plain.source is None
    assert plain.signals == (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    assert plain.grace_seconds is None


def test_build_sources_always_includes_signals_unless_told_not_to() -> None:
    (plain,) = build_sources([], env={})
    assert isinstance(plain, SignalNotices) and plain.name == "signals"
    assert build_sources(["signals", "kubernetes", "slurm"], env={"SLURM_JOB_ID": "1"}, handle_signals=False) == []


@pytest.mark.parametrize(
    ("env", "grace_s", "expected"),
    [({}, None, 30.0), ({"SPOTSAFE_GRACE_SECONDS": "45"}, None, 45.0), ({"SPOTSAFE_GRACE_SECONDS": "45"}, 12.5, 12.5)],
)
def test_build_sources_kubernetes_grace(env: dict[str, str], grace_s: float | None, expected: float) -> None:
    (k8s,) = build_sources(["kubernetes", "signals"], env=env, grace_s=grace_s)
    assert isinstance(k8s, SignalNotices)
    assert (k8s.name, k8s.source, k8s.grace_seconds) == ("kubernetes", "kubernetes", expected)
    assert k8s.signals == (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def test_a_torchrun_worker_gives_sigterm_torchruns_shutdown_timeout(tmp_path: Path) -> None:
    """torchrun sends its workers SIGTERM, then SIGKILL after --shutdown-timeout (30 s unless changed)."""
    env = {"TORCHELASTIC_RUN_ID": "none", "SPOTSAFE_NOTICES": "auto"}
    found = machine(tmp_path).detect(env)
    assert found == ("torchrun", "signals")
    (worker,) = build_sources(found, env=env)
    assert isinstance(worker, SignalNotices)
    assert (worker.name, worker.source, worker.grace_seconds) == ("torchrun", "torchrun", 30.0)
    (worker,) = build_sources(found, env={**env, "SPOTSAFE_GRACE_SECONDS": "50"})
    assert isinstance(worker, SignalNotices) and worker.grace_seconds == 50.0


def test_build_sources_plain_signals_take_the_grace_setting() -> None:
    (plain,) = build_sources(["signals"], env={"SPOTSAFE_GRACE_SECONDS": "20"})
    assert isinstance(plain, SignalNotices) and plain.grace_seconds == 20.0


def test_build_sources_slurm_owns_sigusr1() -> None:
    env = {"SLURM_JOB_ID": "555", "SPOTSAFE_SLURM_SIGNAL_LEAD": "90", "SPOTSAFE_SLURM_REQUEUE": "yes"}
    sources = build_sources(["kubernetes", "slurm", "signals"], env=env)
    (slurm,) = [s for s in sources if isinstance(s, SlurmNotices)]
    (other,) = [s for s in signal_sources(sources) if s is not slurm]
    assert slurm.signals == (signal.SIGUSR1,)
    assert (slurm.job_id, slurm.requeue, slurm.deadline_after(signal.SIGUSR1)) == ("555", True, 90.0)
    assert slurm.scontrol == ("scontrol",)
    assert other.name == "kubernetes"
    assert other.signals == (signal.SIGTERM, signal.SIGINT)
    assert signal.SIGUSR1 not in other.signals


def test_build_sources_slurm_defaults() -> None:
    (slurm, plain) = build_sources(["slurm"], env={"SLURM_JOB_ID": "8"})
    assert isinstance(slurm, SlurmNotices) and isinstance(plain, SignalNotices)
    assert (slurm.requeue, slurm.deadline_after(signal.SIGUSR1)) == (False, None)
    assert plain.signals == (signal.SIGTERM, signal.SIGINT)


def test_build_sources_slurm_without_sigusr1_in_the_signals() -> None:
    sources = build_sources(["slurm"], env={"SLURM_JOB_ID": "8"}, signals=[signal.SIGTERM])
    (plain,) = sources
    assert not isinstance(plain, SlurmNotices)
    assert isinstance(plain, SignalNotices) and plain.signals == (signal.SIGTERM,)


@pytest.mark.parametrize(
    "env",
    [
        {"SPOTSAFE_GRACE_SECONDS": "thirty"},
        {"SPOTSAFE_GRACE_SECONDS": "-1"},
        {"SPOTSAFE_SLURM_SIGNAL_LEAD": "soon", "SLURM_JOB_ID": "1"},
        {"SPOTSAFE_NOTICE_POLL_SECONDS": "fast"},
    ],
)
def test_build_sources_bad_numbers_are_config_errors(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        build_sources(["kubernetes", "slurm", "signals"], env=env)


def test_build_sources_nan_grace_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        build_sources(["kubernetes"], env={"SPOTSAFE_GRACE_SECONDS": "nan"})


def test_build_sources_provider_watchers_follow_the_env(emulator: ProviderEmulator) -> None:
    env = {**emulator.env(), "SPOTSAFE_NOTICE_POLL_SECONDS": "0.5", "SPOTSAFE_AZURE_ACKNOWLEDGE": "1"}
    aws_source, gcp_source, azure_source = build_sources(["aws", "gcp", "azure"], env=env, handle_signals=False)
    assert isinstance(aws_source, AwsSpotNotices) and isinstance(gcp_source, GcpNotices)
    assert isinstance(azure_source, AzureScheduledEvents)
    assert aws_source.endpoint == gcp_source.endpoint == azure_source.endpoint == emulator.url
    assert aws_source.poll_s == azure_source.poll_s == 0.5
    assert azure_source.acknowledge
    plain_azure = build_sources(["azure"], env=emulator.env(), handle_signals=False)[0]
    assert isinstance(plain_azure, AzureScheduledEvents)
    assert (plain_azure.acknowledge, plain_azure.poll_s) == (False, 1.0)


def test_detected_sources_watch_the_emulator(tmp_path: Path, emulator: ProviderEmulator, seen: Seen) -> None:
    env = {**emulator.env(), "SPOTSAFE_NOTICE_POLL_SECONDS": "0.05"}
    names = machine(tmp_path).detect(env)
    sources = build_sources(names, env=env, handle_signals=False)
    assert [s.name for s in sources] == ["aws", "gcp", "azure"]
    for source in sources:
        source.start(seen.board)
    try:
        wait_until(lambda: set(seen.statuses()) == {"watching"} and len(seen.reports) == 4, what="four watchers")
        emulator.aws_interrupt("terminate", in_s=120)
        emulator.gcp_preempt()
        emulator.azure_event("Preempt", in_s=60)
        seen.wait_notices(3)
    finally:
        shut(emulator)  # ends GCP's 60 s hanging GETs at once
        for source in sources:
            source.stop()
    assert sorted(n.source for n in seen.pump().notices) == ["aws", "azure", "gcp"]
    assert all(n.kind == STOP for n in seen.notices)


def test_the_emulator_is_quiet_when_a_killed_job_resets_its_connection(capfd: pytest.CaptureFixture[str]) -> None:
    """A drill kills jobs mid-request; the emulator's server must not print a traceback for the reset."""
    emu = ProviderEmulator().start()
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", emu.port)) as client:
                client.sendall(b"GET /latest/meta-data/spot/instance-action HTTP/1.1\r\nHost: x\r\n")  # unfinished
                # SO_LINGER 0: close() sends a reset, as the kernel does for a process killed with SIGKILL.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The server answers a well-formed request after the resets (it handled them and lives on).
        connection = http.client.HTTPConnection("127.0.0.1", emu.port, timeout=30)
        connection.request("PUT", "/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        emu.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err, err
