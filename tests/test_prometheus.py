"""The Prometheus rules and the Grafana dashboard that spotsafe ships, checked by Prometheus itself.

``promtool check rules`` and ``promtool test rules`` (each alert provoked by synthetic series, and quiet when things
are fine); then a real Prometheus server (Debian's ``prometheus``, installed with apt-get when missing and the
test runs as root; otherwise skipped, saying why) scrapes a running job and its supervisor every second,
evaluates the rules, fires an alert when the job is preempted again and again, and answers every query of the
dashboard with data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from spotsafe.notices.emulator import ProviderEmulator

from .conftest import HANG_S, PROCESS_HANG_S, ROOT, TINY_JOB, apt_install, stop, wait_for_port, wait_until
from .test_metrics import free_port, scrape, value

RULES = ROOT / "examples" / "prometheus" / "spotsafe-rules.yml"
RULE_TESTS = ROOT / "examples" / "prometheus" / "spotsafe-rules.test.yml"
DASHBOARD = ROOT / "examples" / "grafana" / "spotsafe-dashboard.json"
SPOTSAFE = Path(sys.executable).with_name("spotsafe")


@pytest.fixture(scope="module")
def tools() -> tuple[str, str]:
    """Paths of ``prometheus`` and ``promtool`` (installed from Debian's package when missing)."""
    found = shutil.which("prometheus"), shutil.which("promtool")
    if None in found:
        why = apt_install("prometheus")
        found = shutil.which("prometheus"), shutil.which("promtool")
        if None in found:
            pytest.skip(f"no Prometheus: {why or 'prometheus or promtool still missing after apt-get'}")
    return str(found[0]), str(found[1])


def test_promtool_accepts_the_rules_and_their_unit_tests_pass(tools: tuple[str, str]) -> None:
    _, promtool = tools
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0 and "SUCCESS: 12 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True, check=False
    )
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_unit_tests_cover_every_alert() -> None:
    rules = RULES.read_text()
    alerts = {line.split(":", 1)[1].strip() for line in rules.splitlines() if line.strip().startswith("- alert:")}
    tested = {line.split(":", 1)[1].strip() for line in RULE_TESTS.read_text().splitlines() if "alertname:" in line}
    assert alerts and alerts == tested


class Prometheus:
    """A Prometheus server on 127.0.0.1 and its HTTP API."""

    def __init__(self, binary: str, folder: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                for name, port in targets.items()
            ],
        }
        (folder / "prometheus.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.proc, self.port, "Prometheus")
        wait_until(self._ready, "Prometheus to be ready", timeout=PROCESS_HANG_S, poll_s=0.1)

    def _ready(self) -> bool:
        """``/-/ready`` answers 200 once the server serves queries (503 while it starts)."""
        assert self.proc.poll() is None, "Prometheus exited"
        response = urllib3.request("GET", f"http://127.0.0.1:{self.port}/-/ready", timeout=10.0, retries=False)
        return response.status == 200

    def api(self, path: str, **fields: str) -> Any:
        response = urllib3.request(
            "GET", f"http://127.0.0.1:{self.port}/api/v1/{path}", fields=fields, timeout=10.0, retries=False
        )
        doc = json.loads(response.data)
        assert response.status == 200 and doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def firing(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name and a["state"] == "firing"]


@pytest.fixture
def market() -> Iterator[ProviderEmulator]:
    with ProviderEmulator() as emulator:
        yield emulator


@pytest.mark.e2e
def test_a_real_prometheus_scrapes_a_job_and_its_supervisor(
    tools: tuple[str, str], tmp_path: Path, market: ProviderEmulator
) -> None:
    """The job holds at step 3 until the test preempts it (so Prometheus has seen every counter at 0 first), stops
    itself in attempts 2 to 4, and trains on in attempt 5 (5 steps a second): four preemptions in the pool within
    seconds. A rebalance recommendation (a warning) from attempt 2 on is counted at a step, and nothing stops."""
    job_port = free_port()
    while (sup_port := free_port()) == job_port:
        pass
    env = {
        **os.environ,
        **market.env(),
        "SPOTSAFE_NOTICES": "aws",
        "SPOTSAFE_NOTICE_POLL_SECONDS": "0.2",
        "SPOTSAFE_METRICS_PORT": str(job_port),
        "SPOTSAFE_METRICS_ADDR": "127.0.0.1",
    }
    run = tmp_path / "run"
    cmd = [str(SPOTSAFE), "run", "--url", str(run), "--store", str(tmp_path / "jobs.sqlite"),
           "--metrics-port", str(sup_port), "--metrics-addr", "127.0.0.1", "--backoff", "0", "--",
           sys.executable, str(TINY_JOB), "5000", "--sleep", "0.2", "--hold", "1:3", "--stop", "2:6", "--stop", "3:9",
           "--stop", "4:12"]  # fmt: skip
    sup = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp_path / "prom").mkdir()
    prometheus = Prometheus(tools[0], tmp_path / "prom", {"train": job_port, "supervisor": sup_port})
    try:
        wait_until(lambda: len(prometheus.query("up == 1")) == 2, "both targets up", timeout=PROCESS_HANG_S)
        preempted = 'spotsafe_attempts_total{job="supervisor",pool="local",exit_class="preempted"}'
        wait_until(lambda: prometheus.query(f"{preempted} == 0"), "the preemption counter at 0, scraped")
        assert not prometheus.firing("SpotsafeFrequentPreemptions")

        market.aws_interrupt(in_s=60)  # attempt 1 (held at step 3) saves and exits 75
        wait_until(lambda: (value(scrape(sup_port), "spotsafe_attempts_total", exit_class="preempted") or 0) >= 1,
                   "attempt 1 preempted", timeout=PROCESS_HANG_S)  # fmt: skip
        market.aws_clear()
        market.aws_rebalance()  # a warning, which every later attempt counts at its first step and goes on

        def fifth_attempt_trains() -> bool:
            try:
                job = scrape(job_port)
            except (urllib3.exceptions.HTTPError, OSError):
                return False
            return (value(job, "spotsafe_step") or 0) >= 15 and value(job, "spotsafe_restore_seconds_count") == 1

        wait_until(fifth_attempt_trains, "attempt 5 past step 15", timeout=PROCESS_HANG_S, poll_s=0.1)
        assert value(scrape(sup_port), "spotsafe_attempts_total", exit_class="preempted") == 4
        warned = 'spotsafe_notices_total{job="train",source="aws",kind="warning"} == 1'
        wait_until(lambda: prometheus.query(warned), "the warning, scraped")

        wait_until(lambda: prometheus.firing("SpotsafeFrequentPreemptions"), "the preemption alert", timeout=HANG_S)
        [alert] = prometheus.firing("SpotsafeFrequentPreemptions")
        assert alert["labels"]["pool"] == "local" and alert["labels"]["severity"] == "warning"
        assert "preemptions in the last hour" in alert["annotations"]["summary"]
        for quiet in ("SpotsafeCheckpointStale", "SpotsafeCheckpointStaleSteps", "SpotsafeResumeFailed"):
            assert not prometheus.firing(quiet), quiet

        panels = json.loads(DASHBOARD.read_text())["panels"]
        exprs = {p["title"]: t["expr"] for p in panels for t in p["targets"]}
        assert len(exprs) == len(panels) >= 10

        def every_panel_has_data() -> bool:
            return all(prometheus.query(expr) for expr in exprs.values())

        wait_until(every_panel_has_data, "data for every panel of the dashboard", timeout=HANG_S)
        since = 'spotsafe:steps_since_checkpoint{job="train"}'
        wait_until(lambda: prometheus.query(since), "the recorded steps since the last checkpoint of the job")
        assert 0 <= float(prometheus.query(since)[0]["value"][1]) <= 5  # attempt 5 saves every 5 steps
        assert float(prometheus.query("spotsafe:preemptions_per_hour:by_pool")[0]["value"][1]) > 0
    finally:
        stop(prometheus.proc)
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sup.kill()
