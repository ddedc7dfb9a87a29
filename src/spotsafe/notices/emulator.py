"""Emulated provider metadata services on 127.0.0.1: AWS IMDSv2, GCP metadata, Azure Scheduled Events.

One HTTP server answers the three providers' paths the way the real services do
(``../shared/PREEMPTION-SIGNALS.md``): required headers, status codes, JSON
shapes, ``404`` while nothing is pending, IMDSv2 tokens that expire, GCP hanging
GETs with ETags, Azure's ``DocumentIncarnation`` and ``StartRequests``. Tests and
``spotsafe drill`` post notices on it and point a job at it with :meth:`env`::

    with ProviderEmulator() as market:
        subprocess.Popen(cmd, env={**os.environ, **market.env()})
        market.aws_interrupt(in_s=120)           # the two-minute warning
        market.azure_event("Preempt", in_s=30)

Faults for tests: ``delay_s`` (every answer comes late), ``garbage`` (a provider's
answers are not what it promises), ``status`` (a provider answers with this status),
:meth:`stop` (the endpoint is down: connections are refused).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from spotsafe.notices.azure import ENV_ENDPOINT as AZURE_ENDPOINT

AWS_NOT_FOUND = (
    b'<?xml version="1.0" encoding="iso-8859-1"?>\n<!DOCTYPE html>\n<html><head><title>404 - Not Found</title>'
    b"</head><body><h1>404 - Not Found</h1></body></html>\n"
)
GCP_PREFIX = "/computeMetadata/v1/instance/"
AZURE_EVENTS = "/metadata/scheduledevents"
AZURE_NAME = "/metadata/instance/compute/name"


def iso_utc(unix: float) -> str:
    """AWS's notice time format: ``2017-09-18T08:22:00Z`` (whole seconds, UTC)."""
    return datetime.fromtimestamp(int(unix), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Request:
    """One request the emulator answered (for assertions)."""

    method: str
    path: str
    headers: dict[str, str]
    status: int
    body: bytes = b""


@dataclass
class _State:
    tokens: dict[str, float] = field(default_factory=dict)
    instance_action: dict[str, str] | None = None
    rebalance: str | None = None
    gcp: dict[str, tuple[str, str]] = field(default_factory=dict)
    azure_events: list[dict[str, Any]] = field(default_factory=list)
    azure_incarnation: int = 1
    acks: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)


class ProviderEmulator:
    """The three metadata services on one local port. Thread-safe; start with :meth:`start` or ``with``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        vm_name: str = "spotsafe-vm",
        require_token: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.port = port
        self.vm_name = vm_name
        self.require_token = require_token
        self.clock = clock
        self.delay_s = 0.0
        self.garbage: set[str] = set()
        self.status: dict[str, int] = {}
        self._state = _State()
        self._changed = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for key, value in (("preempted", "FALSE"), ("maintenance-event", "NONE")):
            self._state.gcp[key] = (value, secrets.token_hex(8))

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> ProviderEmulator:
        handler = type("Handler", (_Handler,), {"emulator": self})
        self._server = _Server((self.host, self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="provider-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering: from now on connections are refused (the endpoint is down)."""
        server, self._server = self._server, None
        if server is not None:
            with self._changed:
                self._changed.notify_all()
            server.shutdown()
            server.server_close()

    def __enter__(self) -> ProviderEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point spotsafe's watchers (and botocore, google-auth) here."""
        return {
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.url,
            "GCE_METADATA_HOST": f"{self.host}:{self.port}",
            AZURE_ENDPOINT: self.url,
        }

    # -- posting notices -----------------------------------------------------------------
    def aws_interrupt(self, action: str = "terminate", in_s: float = 120.0) -> float:
        """A spot interruption notice for ``in_s`` seconds from now; returns its time (Unix, whole seconds)."""
        when = int(self.clock() + in_s)
        with self._changed:
            self._state.instance_action = {"action": action, "time": iso_utc(when)}
        return float(when)

    def aws_rebalance(self) -> None:
        with self._changed:
            self._state.rebalance = iso_utc(self.clock())

    def aws_clear(self) -> None:
        with self._changed:
            self._state.instance_action = None
            self._state.rebalance = None

    def gcp_set(self, key: str, value: str) -> None:
        """Set ``preempted`` (``TRUE``/``FALSE``) or ``maintenance-event``; wakes hanging GETs."""
        with self._changed:
            self._state.gcp[key] = (value, secrets.token_hex(8))
            self._changed.notify_all()

    def gcp_preempt(self) -> None:
        self.gcp_set("preempted", "TRUE")

    def azure_event(
        self,
        event_type: str = "Preempt",
        in_s: float = 30.0,
        *,
        resources: list[str] | None = None,
        duration_s: int = -1,
    ) -> str:
        """Schedule an event (``NotBefore`` ``in_s`` from now); returns its ``EventId``."""
        event_id = str(uuid.uuid4()).upper()
        event = {
            "EventId": event_id,
            "EventType": event_type,
            "ResourceType": "VirtualMachine",
            "Resources": resources if resources is not None else [self.vm_name],
            "EventStatus": "Scheduled",
            "NotBefore": formatdate(self.clock() + in_s, usegmt=True),
            "Description": f"emulated {event_type} event",
            "EventSource": "Platform",
            "DurationInSeconds": duration_s,
        }
        with self._changed:
            self._state.azure_events.append(event)
            self._state.azure_incarnation += 1
        return event_id

    def azure_start(self, event_id: str) -> None:
        """The event has started: ``EventStatus`` ``Started`` and ``NotBefore`` empty."""
        with self._changed:
            for event in self._state.azure_events:
                if event["EventId"] == event_id:
                    event["EventStatus"], event["NotBefore"] = "Started", ""
            self._state.azure_incarnation += 1

    def azure_finish(self, event_id: str) -> None:
        """The event is over: it disappears from the document."""
        with self._changed:
            self._state.azure_events = [e for e in self._state.azure_events if e["EventId"] != event_id]
            self._state.azure_incarnation += 1

    def azure_clear(self) -> None:
        with self._changed:
            self._state.azure_events.clear()
            self._state.azure_incarnation += 1

    # -- what happened ---------------------------------------------------------------------
    @property
    def requests(self) -> list[Request]:
        with self._changed:
            return list(self._state.requests)

    @property
    def acks(self) -> list[str]:
        """Azure ``EventId`` values approved with ``StartRequests``."""
        with self._changed:
            return list(self._state.acks)

    def expire_tokens(self) -> None:
        """Every IMDSv2 token issued so far is now expired."""
        with self._changed:
            self._state.tokens = dict.fromkeys(self._state.tokens, 0.0)

    # -- answering (called by the handler) ------------------------------------------------------
    def answer(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if self.delay_s:
            time.sleep(self.delay_s)
        parts = urlsplit(raw_path)
        path, query = parts.path, parse_qs(parts.query)
        provider = "aws" if path.startswith("/latest/") else "gcp" if path.startswith("/computeMetadata/") else "azure"
        if provider in self.status:
            return self.status[provider], {"Content-Type": "text/plain"}, b"emulated failure\n"
        if provider in self.garbage:
            return 200, {"Content-Type": "text/plain", "ETag": secrets.token_hex(8)}, b"\x00<garbage>{not json"
        if provider == "aws":
            return self._aws(method, path, headers)
        if provider == "gcp":
            return self._gcp(method, path, query, headers)
        return self._azure(method, path, query, headers, body)

    def _aws(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        html = {"Content-Type": "text/html"}
        if "x-forwarded-for" in headers:
            return 403, html, b"Forbidden\n"
        if path == "/latest/api/token":
            if method != "PUT":
                return 405, html, b"Method Not Allowed\n"
            try:
                ttl = int(headers.get("x-aws-ec2-metadata-token-ttl-seconds", ""))
            except ValueError:
                return 400, html, b"Bad Request\n"
            if not 1 <= ttl <= 21600:
                return 400, html, b"Bad Request\n"
            issued = secrets.token_urlsafe(42)
            with self._changed:
                self._state.tokens[issued] = self.clock() + ttl
            reply = {"Content-Type": "text/plain", "X-aws-ec2-metadata-token-ttl-seconds": str(ttl)}
            return 200, reply, issued.encode()
        if method != "GET":
            return 405, html, b"Method Not Allowed\n"
        token = headers.get("x-aws-ec2-metadata-token")
        with self._changed:
            expires = self._state.tokens.get(token) if token is not None else None
            action, rebalance = self._state.instance_action, self._state.rebalance
        if (token is not None or self.require_token) and (expires is None or expires <= self.clock()):
            return 401, html, b"Unauthorized\n"
        if path == "/latest/meta-data/spot/instance-action" and action is not None:
            return 200, {"Content-Type": "text/plain"}, json.dumps(action).encode()
        if path == "/latest/meta-data/spot/termination-time" and action is not None and action["action"] == "terminate":
            return 200, {"Content-Type": "text/plain"}, action["time"].encode()
        if path == "/latest/meta-data/events/recommendations/rebalance" and rebalance is not None:
            return 200, {"Content-Type": "text/plain"}, json.dumps({"noticeTime": rebalance}).encode()
        return 404, html, AWS_NOT_FOUND

    def _gcp(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        base = {"Metadata-Flavor": "Google", "Content-Type": "application/text"}
        if headers.get("metadata-flavor") != "Google" or "x-forwarded-for" in headers:
            return 403, {"Content-Type": "text/html"}, b"Your client does not have permission to get URL.\n"
        key = path[len(GCP_PREFIX) :] if path.startswith(GCP_PREFIX) else ""
        if key not in self._state.gcp:
            return 404, {"Content-Type": "text/html"}, b"Not Found\n"
        if method != "GET":
            return 405, {"Content-Type": "text/html"}, b"Method Not Allowed\n"
        if query.get("wait_for_change", ["false"])[0].lower() == "true":
            last = query.get("last_etag", [None])[0]
            try:
                timeout = float(query.get("timeout_sec", ["300"])[0])
            except ValueError:
                return 400, {"Content-Type": "text/html"}, b"Bad Request: timeout_sec\n"
            deadline = time.monotonic() + timeout
            with self._changed:
                start_etag = self._state.gcp[key][1]
                while self._server is not None:
                    etag = self._state.gcp[key][1]
                    if (last is not None and etag != last) or (last is None and etag != start_etag):
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
        with self._changed:
            value, etag = self._state.gcp[key]
        return 200, {**base, "ETag": etag}, value.encode()

    def _azure(
        self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        js = {"Content-Type": "application/json; charset=utf-8"}
        if headers.get("metadata", "").lower() != "true" or "x-forwarded-for" in headers:
            return 400, js, json.dumps({"error": "Bad request. Required metadata header not specified"}).encode()
        if not query.get("api-version"):
            return 400, js, json.dumps({"error": "Bad request. api-version was not specified"}).encode()
        if path == AZURE_NAME and method == "GET":
            return 200, {"Content-Type": "text/plain; charset=utf-8"}, self.vm_name.encode()
        if path != AZURE_EVENTS:
            return 404, js, json.dumps({"error": "Not found"}).encode()
        if method == "POST":
            try:
                ids = [r["EventId"] for r in json.loads(body)["StartRequests"]]
            except (ValueError, KeyError, TypeError):
                return 400, js, json.dumps({"error": "Bad request. Invalid StartRequests"}).encode()
            with self._changed:
                self._state.acks.extend(ids)
                for event in self._state.azure_events:
                    if event["EventId"] in ids:
                        event["EventStatus"], event["NotBefore"] = "Started", ""
                self._state.azure_incarnation += 1
            return 200, js, b""
        with self._changed:
            document = {"DocumentIncarnation": self._state.azure_incarnation, "Events": list(self._state.azure_events)}
            return 200, js, json.dumps(document).encode()

    def _log(self, request: Request) -> None:
        with self._changed:
            self._state.requests.append(request)


class _Server(ThreadingHTTPServer):
    """Drills kill jobs mid-request on purpose: a client gone away is not an error worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    emulator: ProviderEmulator
    protocol_version = "HTTP/1.1"
    server_version = "EC2ws"

    def _serve(self) -> None:
        if self.emulator._server is None:  # stopped: drop connections kept alive from before, unanswered
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        status, reply_headers, reply = self.emulator.answer(self.command, self.path, headers, body)
        self.emulator._log(Request(self.command, self.path, headers, status, body))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up (a read timeout)
            self.send_response(status)
            for key, value in reply_headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    do_GET = do_PUT = do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: requests are recorded in :attr:`ProviderEmulator.requests`."""
