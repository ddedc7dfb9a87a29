"""An HTTP proxy on 127.0.0.1 that puts real network faults between a storage client and its server.

The clients (s3fs/botocore, gcsfs/aiohttp, adlfs/azure-core) then raise exactly what they raise
against a failing service: a 503 answered by the proxy, or a connection it drops after reading the
request. Everything else is passed through unchanged, so the server behind it does the real work.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


@dataclass(frozen=True)
class Seen:
    """A request that reached the proxy, and what became of it."""

    method: str
    path: str
    body_bytes: int
    fault: str | None  # None: passed through; "503", "drop": failed by the proxy


class FaultProxy:
    """Forwards to ``upstream`` (``http://host:port``); :meth:`fail` makes some of the next requests fail."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._plan: list[str] = []  # faults for the next requests, in order ("" passes one through)
        self.seen: list[Seen] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                fault = proxy._next_fault()
                with proxy._lock:
                    proxy.seen.append(Seen(self.command, self.path, len(body), fault))
                if fault == "drop":
                    self.close_connection = True
                    return  # no answer at all: the client sees the connection close
                if fault is not None:
                    self.send_response(int(fault))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, headers, data = proxy._forward(self.command, self.path, dict(self.headers.items()), body)
                self.send_response_only(status)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                length = next((v for n, v in headers if n.lower() == "content-length"), None)
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    def fail(self, count: int, *, fault: str = "503", after: int = 0) -> None:
        """Let ``after`` requests through, then fail the next ``count``: ``"503"`` (or another status) or ``"drop"``."""
        with self._lock:
            self._plan = [""] * after + [fault] * count

    def _next_fault(self) -> str | None:
        with self._lock:
            return (self._plan.pop(0) or None) if self._plan else None

    def clear(self) -> None:
        with self._lock:
            self._plan = []
            self.seen = []

    def faults(self) -> int:
        return sum(1 for s in self.seen if s.fault is not None)

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any, bytes]:
        connection = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            kept = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length"}}
            sized = bool(body) or "content-length" in {k.lower() for k in headers}
            if sized:
                kept["Content-Length"] = str(len(body))  # as sent: Azure's shared-key signature covers it
            connection.request(method, path, body=body if sized else None, headers=kept)
            response = connection.getresponse()
            data = response.read()
            return response.status, response.getheaders(), data
        finally:
            connection.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
