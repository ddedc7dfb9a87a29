"""Prometheus metrics: event -> metric translation, and the real HTTP endpoints of a job and a supervisor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from spotsafe.errors import ConfigError
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventLog, RunIdentity
from spotsafe.telemetry.metrics import Metrics, serve_metrics

from .conftest import TINY_JOB, wait_until

SPOTSAFE = Path(sys.executable).with_name("spotsafe")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, object]:
    """``{name: family}`` of the metrics served on 127.0.0.1:``port``."""
    response = urllib3.request("GET", f"http://127.0.0.1:{port}/metrics", timeout=5.0, retries=False)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return {family.name: family for family in text_string_to_metric_families(response.data.decode())}


def value(families: dict[str, object], sample: str, **labels: str) -> float | None:
    for family in families.values():
        for s in family.samples:  # type: ignore[attr-defined]
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


def test_events_become_metrics_with_conventional_names_and_types() -> None:
    m = Metrics()
    t = 1.0
    m.on_event(ev.Progress(time=t, step=7, epoch=0))
    for stall, dur, size in ((0.01, 0.2, 1000), (0.02, 0.4, 3000)):
        m.on_event(ev.SaveCommitted(time=t, step=7, checkpoint="c", reason="interval", bytes=size, blobs=1,
                                    stall_s=stall, duration_s=dur, written_bytes=size // 2))  # fmt: skip
    m.on_event(ev.SaveCommitted(time=t, step=8, checkpoint="c", reason="notice", bytes=10, blobs=1, stall_s=0.0,
                                duration_s=0.1))  # fmt: skip
    m.on_event(ev.SaveFailed(time=t, step=9, reason="interval", error="x"))
    m.on_event(ev.NoticeReceived(time=t, source="aws", count=1, step=8, deadline=None))
    m.on_event(ev.NoticeReceived(time=t, source="aws", count=1, step=8, deadline=None, kind="warning"))
    m.on_event(ev.RestoreCompleted(time=t, step=5, epoch=0, checkpoint="c", bytes=1, duration_s=0.3,
                                   last_known_step=8, replayed_steps=3))  # fmt: skip
    attempt = {"time": t, "job": "j", "pool": "p", "machine": "m"}
    m.on_event(ev.AttemptEnded(number=1, exit_code=75, exit_class="preempted", step_before=None, step_after=8,
                               duration_s=90.0, cost=0.25, **attempt))  # type: ignore[arg-type]  # fmt: skip
    m.on_event(ev.AttemptEnded(number=2, exit_code=0, exit_class="succeeded", step_before=8, step_after=9,
                               duration_s=30.0, cost=0.5, **attempt))  # type: ignore[arg-type]  # fmt: skip
    m.on_event(ev.RetryDecided(time=t, job="j", relaunch=True, delay_s=2.0, reason="r"))
    m.on_event(ev.Escalated(time=t, job="j", reason="r", deadline=1.0, spot_finish=None, on_demand_finish=None))
    m.on_event(ev.RunWarning(time=t, message="unknown to metrics: ignored"))
    get = m.registry.get_sample_value
    assert get("spotsafe_checkpoints_total", {"reason": "interval"}) == 2
    assert get("spotsafe_checkpoints_total", {"reason": "notice"}) == 1
    assert get("spotsafe_checkpoint_failures_total") == 1
    assert get("spotsafe_checkpoint_stall_seconds_count") == 3
    assert get("spotsafe_checkpoint_stall_seconds_sum") == pytest.approx(0.03)
    assert get("spotsafe_checkpoint_write_seconds_bucket", {"le": "0.25"}) == 2  # 0.2 and 0.1
    assert get("spotsafe_checkpoint_written_bytes_total") == 500 + 1500 + 10
    assert get("spotsafe_checkpoint_size_bytes") == 10
    assert get("spotsafe_notices_total", {"source": "aws", "kind": "stop"}) == 1
    assert get("spotsafe_notices_total", {"source": "aws", "kind": "warning"}) == 1
    assert get("spotsafe_replayed_steps_total") == 3
    assert get("spotsafe_restore_seconds_count") == 1
    assert get("spotsafe_step") == 5  # the restore put the run back at step 5
    assert get("spotsafe_attempts_total", {"pool": "p", "exit_class": "preempted"}) == 1
    assert get("spotsafe_attempt_duration_seconds_sum", {"pool": "p"}) == 120.0
    assert get("spotsafe_cost_dollars_total", {"pool": "p"}) == 0.75
    assert get("spotsafe_retry_delay_seconds_count") == 1
    assert get("spotsafe_escalations_total") == 1


def test_the_endpoint_serves_what_an_event_log_writes(tmp_path: Path) -> None:
    with EventLog(tmp_path / "events.jsonl", RunIdentity("r", 1, os.getpid())) as log:
        metrics = serve_metrics(log, 0, "127.0.0.1")
        try:
            assert metrics.port
            log.emit(ev.Progress(time=1.0, step=42, epoch=0))
            log.emit(ev.SaveCommitted(time=1.0, step=42, checkpoint="c", reason="interval", bytes=9, blobs=1,
                                      stall_s=0.003, duration_s=0.05))  # fmt: skip
            families = scrape(metrics.port)
        finally:
            metrics.close()
    assert families["spotsafe_checkpoint_stall_seconds"].type == "histogram"  # type: ignore[attr-defined]
    assert families["spotsafe_checkpoints"].type == "counter"  # type: ignore[attr-defined]
    assert families["spotsafe_step"].type == "gauge"  # type: ignore[attr-defined]
    assert value(families, "spotsafe_step") == 42
    assert value(families, "spotsafe_checkpoints_total", reason="interval") == 1


@pytest.mark.parametrize("port", ["x", "-1", "70000"])
def test_a_bad_metrics_port_is_a_config_error(tmp_path: Path, port: str) -> None:
    with EventLog(tmp_path / "e.jsonl", RunIdentity("r", 1, 1)) as log, pytest.raises(ConfigError, match="0-65535"):
        serve_metrics(log, port)


def test_a_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as taken, EventLog(tmp_path / "e.jsonl", RunIdentity("r", 1, 1)) as log:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="cannot serve metrics"):
            serve_metrics(log, taken.getsockname()[1], "127.0.0.1")


@pytest.mark.e2e
def test_a_supervised_job_and_its_supervisor_both_serve_metrics(tmp_path: Path) -> None:
    job_port = free_port()
    while (sup_port := free_port()) == job_port:
        pass
    env = {**os.environ, "SPOTSAFE_METRICS_PORT": str(job_port), "SPOTSAFE_METRICS_ADDR": "127.0.0.1"}
    cmd = [str(SPOTSAFE), "run", "--url", str(tmp_path / "run"), "--store", str(tmp_path / "jobs.sqlite"),
           "--metrics-port", str(sup_port), "--metrics-addr", "127.0.0.1", "--backoff", "0",
           "--", sys.executable, str(TINY_JOB), "40", "--stop", "1:12", "--hold", "2:20"]  # fmt: skip
    sup = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def job_reports() -> bool:
            try:
                families = scrape(job_port)
            except (urllib3.exceptions.HTTPError, OSError):
                return False
            # Only the second attempt restores; the first one also passes step 12 (it stops at 13) and
            # may still be serving on the port while the supervisor has not yet recorded its end.
            return (
                value(families, "spotsafe_restore_seconds_count") == 1
                and (value(families, "spotsafe_step") or 0) > 13
                and bool(value(families, "spotsafe_checkpoints_total", reason="interval"))
            )

        # The first attempt stops itself at step 12; the second holds at step 20 until the supervisor's SIGTERM.
        wait_until(job_reports, "the second attempt's metrics", poll_s=0.1)
        families = scrape(sup_port)
        assert value(families, "spotsafe_attempts_total", pool="local", exit_class="preempted") == 1
        assert value(families, "spotsafe_attempt_duration_seconds_count", pool="local") == 1
        assert families["spotsafe_attempt_duration_seconds"].type == "histogram"  # type: ignore[attr-defined]
        job = scrape(job_port)
        assert value(job, "spotsafe_restore_seconds_count") == 1
    finally:
        sup.send_signal(signal.SIGTERM)
        assert sup.wait(timeout=60) == 75
