"""``spotsafe report --plot``, the read-only job store reader, and the dashboard over real HTTP on 127.0.0.1.

Runs are synthetic event logs written through the real :class:`EventLog` (see ``test_timeline``), in real
folders next to real SQLite job stores; the dashboard is served in-process with :func:`serve` and, once, by
the ``spotsafe dashboard`` command in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import urllib3
from PIL import Image

from spotsafe.dashboard import catalog as catalog_module
from spotsafe.dashboard import server as server_module
from spotsafe.dashboard.catalog import Catalog, run_id
from spotsafe.dashboard.server import serve
from spotsafe.storage.local import LocalStorage
from spotsafe.supervisor.store import JobStore, read_store
from spotsafe.telemetry.log import EVENTS_FILE
from spotsafe.telemetry.plot import figure, headline
from spotsafe.telemetry.report import build_report
from spotsafe.telemetry.rows import ATTEMPT_COLUMNS, attempt_rows, report_rows
from spotsafe.telemetry.store import read_run_events
from spotsafe.telemetry.timeline import build_timeline

from .conftest import S3Server
from .test_timeline import (
    SUPERVISOR,
    Log,
    attempt_ended,
    attempt_started,
    commit,
    exited,
    fresh,
    job,
    progress,
    retry,
    started,
    write_preempted,
)

SPOTSAFE = Path(sys.executable).with_name("spotsafe")
PNG = b"\x89PNG\r\n\x1a\n"


# -- runs, stores and pages --------------------------------------------------------------------------------------------


def write_finished(run_dir: Path, base: float = 100.0, steps: int = 8) -> Log:
    """One uninterrupted attempt from ``base``: ``steps`` steps, a final save, finished."""
    log = Log(run_dir)
    log.write(SUPERVISOR, attempt_started(base, 1))
    log.write(
        job(1),
        started(base + 1),
        fresh(base + 1.5),
        *[progress(base + 1 + s, s) for s in range(1, steps + 1)],
        commit(base + steps + 2, steps, "final"),
        exited(base + steps + 3, "finished", steps),
    )
    log.write(SUPERVISOR, attempt_ended(base + steps + 4, 1, 0.01, "succeeded", duration=steps + 4.0))
    return log


def write_running(run_dir: Path) -> Log:
    """An attempt that started a minute ago and is still going (no exit)."""
    base = time.time() - 60.0
    log = Log(run_dir)
    log.write(SUPERVISOR, attempt_started(base, 1, price=3.6))
    log.write(job(1), started(base + 1), fresh(base + 1.5), *[progress(base + 1 + s, s) for s in range(1, 6)])
    return log


def fill_store(path: Path, jobs: Sequence[tuple[str, str]]) -> None:
    """A job store with ``(name, url)`` jobs; the first gets two attempts (preempted, then succeeded)."""
    clock = iter(float(t) for t in range(1000, 2000, 10))
    with JobStore(path, clock=lambda: next(clock)) as store:
        for i, (name, url) in enumerate(jobs):
            store.open_job(name, ["python", "train.py"], url)
            if i == 0:
                first = store.start_attempt(name, step_before=None, pool="spot-a")
                store.end_attempt(name, first, exit_code=75, exit_class="preempted", step_after=14, cost=0.008)
                second = store.start_attempt(name, step_before=14, pool="spot-b")
                store.end_attempt(name, second, exit_code=0, exit_class="succeeded", step_after=20, cost=0.0077)


@dataclass
class Tree:
    """``runs/a`` (preempted once, resumed), ``runs/team/x/b`` (finished), ``runs/jobs.sqlite`` with a job on
    ``runs/a`` and one on ``runs/later`` (no folder yet)."""

    root: Path
    a: Path
    b: Path
    later: Path
    store: Path


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Tree:
    monkeypatch.chdir(tmp_path)  # runs are shown relative to the current folder
    root = tmp_path / "runs"
    a, b, later = root / "a", root / "team" / "x" / "b", root / "later"
    write_preempted(Log(a), retry(17.0, delay=5.0))
    write_finished(b)
    (root / "team" / "notes").mkdir()  # a folder that is no run
    fill_store(root / "jobs.sqlite", [("train-a", str(a)), ("pending", str(later))])
    return Tree(root, a, b, later, root / "jobs.sqlite")


@contextlib.contextmanager
def served(catalog: Catalog) -> Iterator[str]:
    server = serve(catalog, 0, "127.0.0.1")
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def get(url: str, method: str = "GET") -> urllib3.BaseHTTPResponse:
    return urllib3.request(method, url, timeout=60.0, retries=False, redirect=False)


def ok(url: str) -> urllib3.BaseHTTPResponse:
    response = get(url)
    assert response.status == 200, (url, response.status, response.data[:2000])
    return response


def api(url: str) -> Any:
    response = ok(url)
    assert response.headers["Content-Type"] == "application/json"
    return json.loads(response.data)


@dataclass
class Page(HTMLParser):
    """What a test needs of a page: its tables by id (rows of cell texts), meta tags, links, element ids."""

    tables: dict[str, list[list[str]]] = field(default_factory=dict)
    metas: list[dict[str, str | None]] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    _table: str | None = None
    _cell: list[str] | None = None

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)

    @classmethod
    def of(cls, html: bytes) -> Page:
        page = cls()
        page.feed(html.decode())
        page.close()
        return page

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "meta":
            self.metas.append(a)
        elif tag == "a" and a.get("href"):
            self.links.append(str(a["href"]))
        elif tag == "table":
            self._table = str(a.get("id"))
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    @property
    def refreshes(self) -> bool:
        return any((m.get("http-equiv") or "").lower() == "refresh" for m in self.metas)


def events_of(run_dir: Path) -> list[Any]:
    return list(read_run_events(LocalStorage(run_dir)))


# -- spotsafe report --plot --------------------------------------------------------------------------------------------


def spotsafe(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_")}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [str(SPOTSAFE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def plotted_run(tmp_path: Path) -> Path:
    run = tmp_path / "my-run-7"
    write_preempted(Log(run), retry(17.0, delay=5.0))
    return run


def test_report_plot_png_is_a_real_image(plotted_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "pics" / "timeline.png"
    out.parent.mkdir()
    done = spotsafe(["report", plotted_run.name, "--plot", str(out)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "interruptions" in done.stdout and "1 (1 aws)" in done.stdout  # the table is still printed
    assert f"timeline written to {out}" in done.stderr
    data = out.read_bytes()
    assert data[:8] == PNG
    with Image.open(out) as image:
        image.load()
        width, height = image.size
    assert width >= 800 and height >= 500 and width > height


def test_every_text_on_the_timeline_is_drawn_as_written(tmp_path: Path) -> None:
    """matplotlib reads text between two ``$`` as math: the title's "$0.0157 spent vs $0.0160 on demand" came
    out as "0.0157spentvs0.0160 on demand" in italics. Every text on the figure (title, labels, legends, ticks,
    notes) is drawn as written, dollar signs included, in the run's name too."""
    from matplotlib.text import Text

    run = tmp_path / "budget-$5-or-$6"
    write_preempted(Log(run), retry(17.0, delay=5.0))  # costs recorded; compared with $3.6/h on demand
    events = events_of(run)
    report = build_report(str(run), events, on_demand_price=3.6)
    assert report.cost is not None and report.on_demand_cost is not None
    fig = figure(build_timeline(str(run), events, report), report)
    fig.savefig(BytesIO(), format="png")  # lays everything out, tick labels included
    shown = []
    for text in fig.findobj(Text):
        if text.get_text():
            drawn, math = text._preprocess_math(text.get_text())  # type: ignore[attr-defined]  # as it is drawn
            assert math is False, text.get_text()
            shown.append(drawn)
    money = f"${report.cost:.4f} spent vs ${report.on_demand_cost:.4f} on demand"
    assert [s for s in shown if money in s] == [f"spotsafe: {run}\n{headline(report)}"]
    assert "$" in headline(report) and money in headline(report)  # the dashboard's HTML shows it as it is
    assert {"#1 spot-a", "#2 spot-b", "dollars", "spent", "same progress on demand"} <= set(shown)


def test_report_plot_pdf(plotted_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "timeline.PDF"  # the suffix's case does not matter
    done = spotsafe(["report", plotted_run.name, "--plot", out.name], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")


def test_report_plot_svg_with_json_keeps_stdout_pure_json(plotted_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "timeline.svg"
    done = spotsafe(
        ["report", plotted_run.name, "--plot", str(out), "--json", "--on-demand-price", "3.6"], cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # nothing else on stdout
    expected = build_report(plotted_run.name, events_of(plotted_run), on_demand_price=3.6).to_json()
    assert (doc.pop("job"), doc.pop("store_attempts")) == (None, [])
    assert doc == json.loads(json.dumps(expected))
    assert "timeline written to" in done.stderr
    text = out.read_text()
    root = ET.fromstring(text)
    assert root.tag.endswith("svg")
    assert "spotsafe: my-run-7" in text  # the title names the run


def test_report_plot_with_a_bad_extension_fails_before_reading_the_run(tmp_path: Path) -> None:
    # A run whose events cannot be read: the name of the plot is refused before the events are touched.
    run = tmp_path / "run"
    (run / "events").mkdir(parents=True)
    (run / EVENTS_FILE).mkdir()
    done = spotsafe(["report", "run", "--plot", "out.jpg"], cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "out.jpg" in done.stderr and ".png, .svg or .pdf" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "out.jpg").exists()


def test_report_plot_with_a_bad_extension_is_refused_even_for_a_missing_run(tmp_path: Path) -> None:
    done = spotsafe(["report", "no-such-run", "--plot", "out.txt"], cwd=tmp_path)
    assert done.returncode == 2 and ".png, .svg or .pdf" in done.stderr, done.stderr


def test_report_plot_into_a_missing_folder_is_a_clear_error(plotted_run: Path, tmp_path: Path) -> None:
    done = spotsafe(["report", plotted_run.name, "--plot", "missing/out.png"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "missing" in done.stderr


def test_report_plot_of_a_run_without_events_draws_nothing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    done = spotsafe(["report", "empty", "--plot", "out.png"], cwd=tmp_path)
    assert done.returncode == 1
    assert "no events in" in done.stdout
    assert not (tmp_path / "out.png").exists()


# -- read_store: read-only, whatever the file --------------------------------------------------------------------------


def snapshot(path: Path) -> tuple[bytes, int, list[str]]:
    """The file's bytes, its mtime and what lies next to it."""
    return path.read_bytes(), path.stat().st_mtime_ns, sorted(p.name for p in path.parent.iterdir())


OLD_SCHEMA = """
CREATE TABLE jobs (name TEXT PRIMARY KEY, command TEXT NOT NULL, url TEXT NOT NULL, state TEXT NOT NULL,
                   reason TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE attempts (job TEXT NOT NULL REFERENCES jobs(name), number INTEGER NOT NULL,
                       pool TEXT NOT NULL DEFAULT 'local', host TEXT NOT NULL, pid INTEGER, started REAL NOT NULL,
                       ended REAL, exit_code INTEGER, exit_class TEXT, step_before INTEGER, step_after INTEGER,
                       cost REAL, PRIMARY KEY (job, number));
INSERT INTO jobs VALUES ('old', '["python", "t.py"]', '/data/run', 'succeeded', 'done', 1.0, 2.0);
INSERT INTO attempts VALUES ('old', 1, 'spot', 'h', 42, 1.0, 2.0, 0, 'succeeded', NULL, 10, 0.25);
"""


def test_read_store_of_a_missing_file_is_no_jobs_and_creates_nothing(tmp_path: Path) -> None:
    assert read_store(tmp_path / "jobs.sqlite") == []
    assert read_store(tmp_path / "no" / "such" / "jobs.sqlite") == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["text", "other-sqlite", "empty"])
def test_read_store_of_a_file_that_is_no_job_store_is_no_jobs_and_leaves_it_alone(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "jobs.sqlite"
    if kind == "text":
        path.write_text("not a database at all\n" * 100)
    elif kind == "empty":
        path.touch()
    else:
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.executescript(
                "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes VALUES (1, 'x');"
            )
            db.commit()
    before = snapshot(path)
    assert read_store(path) == []
    assert snapshot(path) == before


def test_read_store_of_an_old_schema_reads_defaults_and_does_not_migrate(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_SCHEMA)
        db.commit()
    before = snapshot(path)
    [(job_record, attempts)] = read_store(path)
    assert (job_record.name, job_record.command, job_record.url, job_record.state) == (
        "old",
        ["python", "t.py"],
        "/data/run",
        "succeeded",
    )
    assert job_record.escalated is False
    [attempt] = attempts
    assert (attempt.number, attempt.pool, attempt.pid, attempt.exit_class, attempt.cost) == (
        1,
        "spot",
        42,
        "succeeded",
        0.25,
    )
    assert attempt.machine is None
    assert snapshot(path) == before  # not migrated: same bytes, same time, no journal or WAL beside it
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        assert "machine" not in {row[1] for row in db.execute("PRAGMA table_info(attempts)")}


def test_read_store_reads_a_store_its_supervisor_is_writing(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    with JobStore(path) as store:
        store.open_job("live", ["python", "t.py"], "s3://bucket/run")
        number = store.start_attempt("live", step_before=None, pool="spot-a")
        store.end_attempt("live", number, exit_code=75, exit_class="preempted", step_after=5, cost=0.1, machine="m1")
        store.set_escalated("live")
        store.start_attempt("live", step_before=5, pool="od")  # running now
        wal = path.with_name(path.name + "-wal")
        before, wal_before = snapshot(path), wal.read_bytes()
        [(job_record, attempts)] = read_store(path)
        assert (job_record.name, job_record.url, job_record.state, job_record.escalated) == (
            "live",
            "s3://bucket/run",
            "running",
            True,
        )
        assert [(a.number, a.pool, a.exit_class, a.machine, a.ended is None) for a in attempts] == [
            (1, "spot-a", "preempted", "m1", False),
            (2, "od", None, None, True),
        ]
        assert snapshot(path) == before and wal.read_bytes() == wal_before
        # The supervisor goes on writing while readers read.
        store.end_attempt("live", 2, exit_code=0, exit_class="succeeded", step_after=9, cost=0.2)
        assert [a.exit_class for _, attempts in read_store(path) for a in attempts] == ["preempted", "succeeded"]


def test_read_store_of_a_finished_store_creates_no_wal_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    fill_store(path, [("done", "/data/run")])  # created, used and closed by its supervisor
    before = snapshot(path)
    assert [job_record.name for job_record, _ in read_store(path)] == ["done"]
    assert snapshot(path) == before


# -- the dashboard, in-process -----------------------------------------------------------------------------------------


def test_runs_are_discovered_at_any_depth_and_from_the_job_store_next_to_them(tree: Tree) -> None:
    with served(Catalog([str(tree.root)], [])) as base:
        page = Page.of(ok(base + "/").data)
        runs = api(base + "/api/runs")
    ids = {run_id(str(p)): p for p in (tree.a, tree.b, tree.later)}
    assert {f"/run/{i}" for i in ids} <= set(page.links)
    rows = {r[0]: r for r in page.tables["runs"][1:]}
    assert set(rows) == {"runs/a", "runs/team/x/b", "runs/later"}
    assert rows["runs/a"][1:6] == ["train-a", "finished", "2", "1", "1/1"]
    assert rows["runs/team/x/b"][1:4] == ["-", "finished", "1"]
    assert rows["runs/later"][1:4] == ["pending", "empty", "0"]
    by_id = {r["id"]: r for r in runs}
    assert set(by_id) == set(ids)
    assert (by_id[run_id(str(tree.a))]["job"], by_id[run_id(str(tree.a))]["final_step"]) == ("train-a", 20)
    assert by_id[run_id(str(tree.later))]["state"] == "empty"
    assert all(r["error"] is None for r in runs)


def test_a_job_whose_folder_does_not_exist_yet_is_a_run_without_events(tree: Tree) -> None:
    rid = run_id(str(tree.later))
    with served(Catalog([str(tree.root)], [])) as base:
        page = Page.of(ok(f"{base}/run/{rid}").data)
        assert "no-events" in page.ids and "error" not in page.ids
        doc = api(f"{base}/api/run/{rid}")
        assert (doc["job"], doc["report"]["state"], doc["report"]["attempts"]) == ("pending", "empty", 0)
        assert doc["timeline"]["attempts"] == []
        assert ok(f"{base}/run/{rid}/timeline.svg").data.lstrip().startswith(b"<?xml")
        assert not tree.later.exists()  # the dashboard created nothing
        # The job starts: the same page now shows it, without restarting the dashboard.
        write_finished(tree.later)
        page = Page.of(ok(f"{base}/run/{rid}").data)
        assert "no-events" not in page.ids and "figures" in page.ids
        assert api(f"{base}/api/run/{rid}")["report"]["state"] == "finished"


def test_new_runs_appear_without_restarting(tree: Tree) -> None:
    new = tree.root / "team" / "y" / "new"
    with served(Catalog([str(tree.root)], [])) as base:
        assert run_id(str(new)) not in {r["id"] for r in api(base + "/api/runs")}
        write_finished(new, base=500.0)
        runs = {r["id"]: r for r in api(base + "/api/runs")}
        assert runs[run_id(str(new))]["state"] == "finished"
        assert f"/run/{run_id(str(new))}" in Page.of(ok(base + "/").data).links


def test_the_run_page_shows_the_reports_figures_the_attempts_and_the_moments(tree: Tree) -> None:
    rid = run_id(str(tree.a))
    with served(Catalog([str(tree.root)], [], on_demand_price=3.6)) as base:
        response = ok(f"{base}/run/{rid}")
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    page = Page.of(response.data)
    assert not page.refreshes  # finished
    [attempts] = [a for j, a in read_store(tree.store) if j.name == "train-a"]
    report = build_report("runs/a", events_of(tree.a), on_demand_price=3.6)
    assert [tuple(row) for row in page.tables["figures"]] == report_rows(report, "train-a", attempts)
    header, *rows = page.tables["attempts"]
    assert tuple(header) == ATTEMPT_COLUMNS
    assert [tuple(r) for r in rows] == attempt_rows(attempts)
    assert [r[3] for r in rows] == ["preempted", "succeeded"]
    # The moments: every mark of the timeline, each attempt's start and each wait, in time order.
    timeline = build_timeline("runs/a", events_of(tree.a), report)
    _, *moments = page.tables["moments"]
    kinds, labels = [m[2] for m in moments], [m[4] for m in moments]
    marks = [*timeline.checkpoints, *timeline.notices, *timeline.interruptions, *timeline.restores]
    assert len(moments) == len(marks) + len(timeline.attempts) + len(timeline.gaps)
    assert {m.label for m in marks} <= set(labels)
    assert "attempt 1 interrupted (aws notice, preempted)" in labels
    assert "attempt 2 started on spot-b (spot)" in labels
    assert "backoff 5 s: 7.0 s" in labels
    backoff = labels.index("backoff 5 s: 7.0 s")
    assert kinds.index("notice") < kinds.index("interruption") < backoff < kinds.index("restore")
    assert kinds[backoff] == "wait" and kinds[0] == "wait"  # the first wait: launching attempt 1
    assert kinds.count("attempt") == 2 and kinds.count("checkpoint") == 2


def test_paths_and_job_names_are_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / 'x<b>bold</b>&"q"'
    write_finished(run)
    fill_store(tmp_path / "runs" / "jobs.sqlite", [("<script>alert(1)</script>", str(run))])
    rid = run_id(str(run))
    with served(Catalog([str(tmp_path / "runs")], [])) as base:
        pages = [ok(base + "/").data.decode(), ok(f"{base}/run/{rid}").data.decode()]
        svg = ok(f"{base}/run/{rid}/timeline.svg").data
    for html in pages:
        assert "<b>bold" not in html and "<script>alert" not in html
        assert "x&lt;b&gt;bold&lt;/b&gt;&amp;" in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert Page.of(pages[1].encode()).tables["attempts"]  # the page still parses into its tables
    ET.fromstring(svg)  # the drawing's text is escaped too


def test_the_timeline_images(tree: Tree) -> None:
    rid = run_id(str(tree.a))
    with served(Catalog([str(tree.root)], [])) as base:
        svg, png = ok(f"{base}/run/{rid}/timeline.svg"), ok(f"{base}/run/{rid}/timeline.png?v=anything")
        head = get(f"{base}/run/{rid}/timeline.png", "HEAD")
        page = Page.of(ok(f"{base}/run/{rid}").data)
    assert svg.headers["Content-Type"] == "image/svg+xml"
    assert ET.fromstring(svg.data).tag.endswith("svg")
    assert b"spotsafe: runs/a" in svg.data
    assert png.headers["Content-Type"] == "image/png" and png.data[:8] == PNG
    with Image.open(BytesIO(png.data)) as image:
        assert image.size[0] >= 800 and image.size[1] >= 500
    assert head.status == 200 and head.data == b"" and int(head.headers["Content-Length"]) == len(png.data)
    assert f"/run/{rid}/timeline.png" in page.links


def test_the_api_matches_build_report_and_build_timeline(tree: Tree) -> None:
    rid = run_id(str(tree.a))
    with served(Catalog([str(tree.root)], [], on_demand_price=3.6)) as base:
        doc = api(f"{base}/api/run/{rid}")
    events = events_of(tree.a)
    report = build_report("runs/a", events, on_demand_price=3.6)
    timeline = build_timeline("runs/a", events, report)
    assert doc["report"] == json.loads(json.dumps(report.to_json()))
    assert doc["timeline"] == json.loads(json.dumps(timeline.to_json()))
    assert doc["report"]["saved"] == pytest.approx(report.saved)
    [(_, attempts)] = [(j, a) for j, a in read_store(tree.store) if j.name == "train-a"]
    assert doc["store_attempts"] == [json.loads(json.dumps(asdict(a))) for a in attempts]
    assert (doc["id"], doc["url"], doc["job"], doc["state"], doc["error"]) == (
        rid,
        "runs/a",
        "train-a",
        "finished",
        None,
    )


@pytest.mark.parametrize(
    "path",
    [
        "/run/000000000000",
        "/run/000000000000/timeline.svg",
        "/api/run/000000000000",
        "/run/{a}/timeline.gif",
        "/run/{a}/timeline.svg/more",
        "/run/{a}/x/y",
        "/api/run/{a}/timeline",
        "/api/run",
        "/api/foo",
        "/nothing",
        "/static/nothing.css",
    ],
)
def test_unknown_runs_and_paths_are_404(tree: Tree, path: str) -> None:
    with served(Catalog([str(tree.root)], [])) as base:
        response = get(base + path.format(a=run_id(str(tree.a))))
        assert response.status == 404, response.data
        assert ok(base + "/healthz").data == b"ok\n"  # and the server goes on


def test_static_style_and_health(tree: Tree) -> None:
    with served(Catalog([str(tree.root)], [])) as base:
        css = ok(base + "/static/style.css")
        assert css.headers["Content-Type"].startswith("text/css") and css.data
        assert ok(base + "/healthz").data == b"ok\n"


def test_an_unreadable_run_shows_its_error_and_the_others_still_show(tree: Tree) -> None:
    broken = tree.root / "broken"
    (broken / "events").mkdir(parents=True)
    (broken / EVENTS_FILE).mkdir()  # a run (it has events/), whose events.jsonl cannot be read
    rid = run_id(str(broken))
    with served(Catalog([str(tree.root)], [])) as base:
        index = Page.of(ok(base + "/").data)
        rows = {r[0].split(" ")[0]: r for r in index.tables["runs"][1:]}
        assert "unreadable" in rows["runs/broken"][0]
        assert {"runs/a", "runs/team/x/b", "runs/later"} <= set(rows)
        page = ok(f"{base}/run/{rid}").data.decode()
        assert 'id="error"' in page and "is not a plain file" in page
        doc = api(f"{base}/api/run/{rid}")
        assert "is not a plain file" in doc["error"] and doc["report"]["attempts"] == 0
        assert {r["id"]: r["error"] for r in api(base + "/api/runs")}[rid] == doc["error"]
        assert get(f"{base}/run/{rid}/timeline.svg").status == 200


def unreachable_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point S3 at a port on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)


def test_a_remote_run_from_a_store_is_listed_even_when_it_cannot_be_read(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable_s3(monkeypatch)
    remote = "s3://far-away-bucket/runs/remote-run"
    other = tree.root.parent / "elsewhere" / "jobs.sqlite"
    fill_store(other, [("remote-job", remote)])
    with served(Catalog([str(tree.root)], [other], retry_budget=0.2)) as base:
        runs = {r["id"]: r for r in api(base + "/api/runs")}
        index = Page.of(ok(base + "/").data)
        page = Page.of(ok(f"{base}/run/{run_id(remote)}").data)
    entry = runs[run_id(remote)]
    assert (entry["url"], entry["job"], entry["state"]) == (remote, "remote-job", "empty")
    assert entry["error"] and "far-away-bucket" in entry["error"]
    assert run_id(str(tree.a)) in runs  # the local runs are all still there
    assert any(r[0].startswith(remote) and "unreadable" in r[0] for r in index.tables["runs"][1:])
    assert "error" in page.ids


def test_the_stores_attempts_show_even_when_the_runs_events_cannot_be_read(
    tree: Tree, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreachable_s3(monkeypatch)
    remote = "s3://far-away-bucket/runs/remote-run"
    fill_store(tree.root.parent / "elsewhere" / "jobs.sqlite", [("remote-job", remote)])
    catalog = Catalog([], [tree.root.parent / "elsewhere" / "jobs.sqlite"], retry_budget=0.2)
    with served(catalog) as base:
        page = Page.of(ok(f"{base}/run/{run_id(remote)}").data)
    assert [r[3] for r in page.tables["attempts"][1:]] == ["preempted", "succeeded"]


def test_a_remote_read_error_is_shown_as_it_was_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    unreachable_s3(monkeypatch)
    remote = "s3://far-away-bucket/runs/remote-run"
    catalog = Catalog([remote], [], retry_budget=0.2)
    [entry] = catalog.runs()
    error = catalog.view(entry).error
    assert error is not None
    name = error.split(":")[0]  # "TransientStorageError", as raised
    assert name.endswith("Error") and name != name.lower(), error


def upload_events(s3_server: S3Server, url: str, run_dir: Path) -> None:
    """Put a local run's events where a remote run keeps them: one uploaded part per process."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key="testing", secret="testing")
    by_pid: dict[tuple[int, int], list[bytes]] = {}
    for line in (run_dir / EVENTS_FILE).read_bytes().splitlines(keepends=True):
        record = json.loads(line)
        by_pid.setdefault((record["attempt"], record["pid"]), []).append(line)
    for (attempt, pid), lines in by_pid.items():
        fs.pipe(f"{url[5:]}/events/a{attempt:06d}-p{pid:08d}-0badcafe/part-000001.jsonl", b"".join(lines))


def test_a_remote_run_from_a_store_is_read_from_object_storage(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "local-copy"
    write_preempted(Log(local), retry(17.0, delay=5.0))
    url = f"s3://{s3_server.new_bucket()}/runs/remote"
    upload_events(s3_server, url, local)
    store = tmp_path / "state" / "jobs.sqlite"
    fill_store(store, [("remote-job", url)])
    with served(Catalog([], [store])) as base:
        [entry] = api(base + "/api/runs")
        doc = api(f"{base}/api/run/{run_id(url)}")
        page = Page.of(ok(f"{base}/run/{run_id(url)}").data)
        svg = ok(f"{base}/run/{run_id(url)}/timeline.svg")
    expected = build_report(url, events_of(local))
    assert (entry["url"], entry["job"], entry["state"], entry["error"]) == (url, "remote-job", "finished", None)
    assert doc["report"] == json.loads(json.dumps(expected.to_json()))
    assert dict(page.tables["figures"])["interruptions"] == "1 (1 aws)"
    assert ET.fromstring(svg.data).tag.endswith("svg")


def test_a_running_run_refreshes_itself_and_a_finished_one_does_not(tmp_path: Path) -> None:
    running, done = tmp_path / "runs" / "running", tmp_path / "runs" / "done"
    write_running(running)
    write_finished(done)
    with served(Catalog([str(tmp_path / "runs")], [])) as base:
        live = Page.of(ok(f"{base}/run/{run_id(str(running))}").data)
        finished = Page.of(ok(f"{base}/run/{run_id(str(done))}").data)
        index = Page.of(ok(base + "/").data)
        doc = api(f"{base}/api/run/{run_id(str(running))}")
    assert live.refreshes and not finished.refreshes
    assert index.refreshes  # something on it is running
    assert doc["state"] == "running" and doc["timeline"]["attempts"][0]["running"] is True
    # A running attempt runs to the time the page was made, not to its last event.
    assert doc["timeline"]["end"] > doc["report"]["first_event"] + 60.0 - 1e-6


def test_an_index_of_finished_runs_does_not_refresh(tree: Tree) -> None:
    with served(Catalog([str(tree.root)], [])) as base:
        assert not Page.of(ok(base + "/").data).refreshes


def test_views_are_cached_until_the_log_grows(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    reports: list[str] = []
    drawings: list[str] = []
    real_report, real_render = catalog_module.build_report, server_module.render

    def counting_report(run: str, *args: Any, **kwargs: Any) -> Any:
        reports.append(run)
        return real_report(run, *args, **kwargs)

    def counting_render(timeline: Any, *args: Any, **kwargs: Any) -> Any:
        drawings.append(timeline.run)
        return real_render(timeline, *args, **kwargs)

    monkeypatch.setattr(catalog_module, "build_report", counting_report)
    monkeypatch.setattr(server_module, "render", counting_render)
    rid = run_id(str(tree.b))
    with served(Catalog([str(tree.root)], [])) as base:
        for _ in range(2):
            ok(base + "/")
            ok(f"{base}/run/{rid}")
            ok(f"{base}/run/{rid}/timeline.svg")
            ok(f"{base}/api/run/{rid}")
        assert reports.count("runs/team/x/b") == 1
        assert drawings.count("runs/team/x/b") == 1
        # The run went on: a second attempt is appended; the next request recomputes it, once.
        Log(tree.b).write(job(2), started(200.0), fresh(200.5), progress(201.0, 1), exited(202.0, "finished", 1))
        doc = api(f"{base}/api/run/{rid}")
        assert doc["report"]["attempts"] == 2
        ok(f"{base}/run/{rid}")
        ok(f"{base}/run/{rid}/timeline.svg")
        assert reports.count("runs/team/x/b") == 2
        assert drawings.count("runs/team/x/b") == 2
        assert reports.count("runs/a") == 1  # the other runs did not change


# -- the spotsafe dashboard command ------------------------------------------------------------------------------------


def first_line(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "spotsafe dashboard printed nothing"
    return proc.stdout.readline()


def test_the_dashboard_command_serves_the_runs_until_sigterm(tree: Tree) -> None:
    before = tree.store.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_")}
    env["COLUMNS"] = "200"
    cmd = [str(SPOTSAFE), "dashboard", "runs", "--port", "0", "--addr", "127.0.0.1", "--on-demand-price", "3.6"]
    proc = subprocess.Popen(
        cmd, cwd=tree.root.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = first_line(proc)
        assert line.startswith("spotsafe dashboard: http://127.0.0.1:") and "(3 runs;" in line, line
        base = line.split()[2].rstrip("/")
        runs = {r["id"]: r for r in api(base + "/api/runs")}
        assert set(runs) == {run_id(str(p)) for p in (tree.a, tree.b, tree.later)}
        assert runs[run_id(str(tree.a))]["job"] == "train-a"
        doc = api(f"{base}/api/run/{run_id(str(tree.a))}")
        assert doc["report"]["on_demand_price"] == 3.6 and doc["report"]["saved"] is not None
        assert ok(f"{base}/run/{run_id(str(tree.a))}/timeline.png").data[:8] == PNG
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    assert tree.store.read_bytes() == before


def test_the_dashboard_command_on_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = spotsafe(["dashboard", str(tmp_path), "--port", str(taken.getsockname()[1])], cwd=tmp_path)
    assert done.returncode == 2
    assert "cannot listen on 127.0.0.1:" in done.stderr and "Traceback" not in done.stderr


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def count_reports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = catalog_module.build_report

    def counting(run: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(run)
        return real(run, *args, **kwargs)

    monkeypatch.setattr(catalog_module, "build_report", counting)
    return calls


def test_a_running_runs_view_moves_on_with_the_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "running"
    write_running(run)
    clock = Clock()
    catalog = Catalog([str(run)], [], clock=clock)
    [entry] = catalog.runs()
    first = catalog.view(entry)
    assert first.report.state == "running" and first.timeline.end == clock.now
    clock.now += 3600.0  # its log did not change, but its running attempt has gone on for an hour
    later = catalog.view(entry)
    assert later.timeline.end == clock.now and later.timeline.attempts[0].end == clock.now
    assert later.report.wall_seconds == pytest.approx(first.report.wall_seconds + 3600.0)


def test_a_running_run_is_computed_once_per_refresh_period(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_reports(monkeypatch)
    write_running(tmp_path / "running")
    catalog = Catalog([str(tmp_path / "running")], [], clock=Clock())
    [entry] = catalog.runs()
    for _ in range(3):
        catalog.view(entry)
    assert len(calls) == 1
