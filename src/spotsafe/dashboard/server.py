"""``spotsafe dashboard``: a read-only web page of runs, each with its timeline and report.

Addresses (all ``GET``):

* ``/``: the runs, with their headline figures;
* ``/run/<id>``: one run: the timeline image, the report's figures, the job store's attempts,
  and the timeline's moments as a table; refreshes itself while the run is going;
* ``/run/<id>/timeline.svg`` (``.png``): the timeline image (the same drawing as
  ``spotsafe report --plot``);
* ``/api/runs`` and ``/api/run/<id>``: the same as JSON;
* ``/healthz``: ``ok``.

The server is the standard library's threading HTTP server, bound to 127.0.0.1 unless told
otherwise; pages are Jinja2 templates with autoescaping; nothing it serves can change a run.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape

from spotsafe.dashboard.catalog import Catalog, RunEntry, RunView
from spotsafe.storage.errors import redact
from spotsafe.telemetry.plot import headline, render, time_unit
from spotsafe.telemetry.rows import ATTEMPT_COLUMNS, attempt_rows, report_rows
from spotsafe.telemetry.timeline import Mark
from spotsafe.version import __version__

log = logging.getLogger("spotsafe")
REFRESH_S = 5


def _env() -> Environment:
    env = Environment(loader=PackageLoader("spotsafe.dashboard", "templates"), autoescape=select_autoescape())
    env.filters["utc"] = lambda t: dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if t else "-"
    env.filters["pct"] = lambda v: "-" if v is None else f"{v:.0%}"
    env.filters["money"] = lambda v: "-" if v is None else f"${v:.4f}"
    env.filters["secs"] = _secs
    return env


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    if value < 7200:
        return f"{value / 60:.1f} min"
    return f"{value / 3600:.1f} h"


@dataclasses.dataclass
class Moment:
    time: float
    offset: float
    what: str
    label: str
    step: int | None


def moments(view: RunView) -> list[Moment]:
    """The timeline's marks and attempts in time order, for the table under the image."""
    t = view.timeline
    marks: list[tuple[str, Mark]] = [("checkpoint", m) for m in t.checkpoints]
    marks += [("notice", m) for m in t.notices]
    marks += [("interruption", m) for m in t.interruptions]
    marks += [("market", m) for m in t.market]
    marks += [("restore", m) for m in t.restores]
    marks += [("problem", m) for m in t.failures]
    out = [Moment(m.time, m.time - t.start, what, m.label, m.step) for what, m in marks]
    for a in t.attempts:
        where = f" on {a.pool} ({a.market})" if a.pool else ""
        out.append(Moment(a.start, a.start - t.start, "attempt", f"attempt {a.number} started{where}", None))
    for g in t.gaps:
        out.append(Moment(g.start, g.start - t.start, "wait", f"{g.label}: {_secs(g.end - g.start)}", None))
    return sorted(out, key=lambda m: (m.time, m.what != "attempt"))


class Dashboard:
    """The pages and data of the dashboard, independent of the HTTP server."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.env = _env()
        self._render_lock = threading.Lock()  # matplotlib is not thread-safe
        self._images: dict[tuple[str, str, str], bytes] = {}

    def index(self) -> str:
        rows = [(entry, self.catalog.view(entry)) for entry in self.catalog.runs()]
        rows.sort(key=lambda row: -(row[1].report.last_event or 0.0))
        running = any(view.report.state == "running" for _, view in rows)
        return self.env.get_template("index.html").render(
            rows=rows,
            locations=self.catalog.locations,
            stores=self.catalog.stores,
            refresh=REFRESH_S if running or not rows else None,
            version=__version__,
            now=time.time(),
        )

    def run_page(self, entry: RunEntry) -> str:
        view = self.catalog.view(entry)
        r = view.report
        return self.env.get_template("run.html").render(
            entry=entry,
            view=view,
            report=r,
            headline=headline(r) if r.attempts else "",
            figures=report_rows(r, entry.job, entry.attempts) if r.attempts else [],
            attempt_columns=ATTEMPT_COLUMNS,
            attempt_rows=attempt_rows(entry.attempts),
            moments=moments(view),
            unit=time_unit(view.timeline.duration)[0],
            refresh=REFRESH_S if r.state == "running" else None,
            version=__version__,
        )

    def image(self, entry: RunEntry, fmt: str) -> bytes:
        view = self.catalog.view(entry)
        key = (entry.id, view.version, fmt)
        with self._render_lock:
            cached = self._images.get(key)
            if cached is None:
                cached = render(view.timeline, view.report if view.report.attempts else None, fmt)
                self._images = {k: v for k, v in self._images.items() if k[0] != entry.id}
                self._images[key] = cached
            return cached

    def runs_json(self) -> list[dict[str, Any]]:
        out = []
        for entry in self.catalog.runs():
            view = self.catalog.view(entry)
            out.append(_summary(entry, view))
        return out

    def run_json(self, entry: RunEntry) -> dict[str, Any]:
        view = self.catalog.view(entry)
        doc = _summary(entry, view)
        doc["report"] = view.report.to_json()
        doc["timeline"] = view.timeline.to_json()
        doc["store_attempts"] = [dataclasses.asdict(a) for a in entry.attempts]
        return doc


def _summary(entry: RunEntry, view: RunView) -> dict[str, Any]:
    return {
        "id": entry.id,
        "url": entry.shown,
        "job": entry.job,
        "state": view.report.state,
        "attempts": view.report.attempts,
        "interruptions": view.report.interruptions,
        "final_step": view.report.final_step,
        "goodput": view.report.goodput,
        "cost": view.report.cost,
        "last_event": view.report.last_event,
        "error": view.error,
    }


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("dashboard: " + format, *args)

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        board = self.server.dashboard
        try:
            status, kind, body = self._route(board, path)
        except Exception as err:  # noqa: BLE001 - a page that fails says why and the server goes on
            log.warning("dashboard: %s failed: %s", path, err)
            detail = redact("".join(traceback.format_exception_only(err)).strip())
            status, kind, body = HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", detail.encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, board: Dashboard, path: str) -> tuple[HTTPStatus, str, bytes]:
        html, text = "text/html; charset=utf-8", "text/plain; charset=utf-8"
        if path == "/":
            return HTTPStatus.OK, html, board.index().encode()
        if path == "/healthz":
            return HTTPStatus.OK, text, b"ok\n"
        if path == "/static/style.css":
            css = resources.files("spotsafe.dashboard").joinpath("static/style.css").read_bytes()
            return HTTPStatus.OK, "text/css; charset=utf-8", css
        if path == "/api/runs":
            return HTTPStatus.OK, "application/json", _json(board.runs_json())
        parts = path.strip("/").split("/")
        if len(parts) >= 2 and parts[0] in ("run", "api"):
            if parts[0] == "api" and (len(parts) != 3 or parts[1] != "run"):
                return HTTPStatus.NOT_FOUND, text, b"not found\n"
            rid = parts[2] if parts[0] == "api" else parts[1]
            entry = board.catalog.entry(rid)
            if entry is None:
                return HTTPStatus.NOT_FOUND, text, f"no run {rid} (it may have been removed)\n".encode()
            if parts[0] == "api":
                return HTTPStatus.OK, "application/json", _json(board.run_json(entry))
            if len(parts) == 2:
                return HTTPStatus.OK, html, board.run_page(entry).encode()
            if len(parts) == 3 and parts[2] in ("timeline.svg", "timeline.png"):
                fmt = parts[2].rsplit(".", 1)[1]
                kind = "image/svg+xml" if fmt == "svg" else "image/png"
                return HTTPStatus.OK, kind, board.image(entry, fmt)
        return HTTPStatus.NOT_FOUND, text, b"not found\n"


def _json(doc: object) -> bytes:
    return json.dumps(doc, indent=1, default=str, allow_nan=False).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        super().__init__(address, _Handler)


def serve(catalog: Catalog, port: int, addr: str = "127.0.0.1") -> _Server:
    """Start the dashboard on ``addr:port`` (0: a free port) in a daemon thread; ``.server_port`` says where;
    stop it with ``.shutdown()`` then ``.server_close()``."""
    server = _Server((addr, port), Dashboard(catalog))
    threading.Thread(target=server.serve_forever, name="spotsafe-dashboard", daemon=True).start()
    return server
