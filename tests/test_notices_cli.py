"""``spotsafe notices``: what detection picks, and a live watch against emulated endpoints."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from spotsafe.notices.emulator import ProviderEmulator

from .conftest import PROCESS_HANG_S

SPOTSAFE = str(Path(sys.executable).with_name("spotsafe"))


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SPOTSAFE, "notices", *args],
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_lists_the_detected_sources_and_why() -> None:
    with ProviderEmulator() as market:
        env = {**market.env(), "KUBERNETES_SERVICE_HOST": "10.0.0.1", "AWS_EC2_METADATA_DISABLED": "false"}
        done = run([], {**env, "SPOTSAFE_NOTICES": "auto"})
    assert done.returncode == 0, done.stderr
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") >= 3}
    assert set(rows) >= {"aws", "gcp", "azure", "kubernetes"}
    assert "$AWS_EC2_METADATA_SERVICE_ENDPOINT" in rows["aws"] and market.url in rows["aws"]
    assert "$GCE_METADATA_HOST" in rows["gcp"] and "hanging GET" in rows["gcp"]
    assert "deadline 30 s after the signal" in rows["kubernetes"]
    assert "slurm" not in rows


def test_watch_prints_notices_and_exits_75_on_a_stop_notice() -> None:
    with ProviderEmulator() as market:
        env = {**market.env(), "SPOTSAFE_NOTICES": "aws,azure", "SPOTSAFE_NOTICE_POLL_SECONDS": "0.1"}
        proc = subprocess.Popen(
            [SPOTSAFE, "notices", "--watch", "--seconds", "600"],  # ended by the stop notice, not the time
            env={**os.environ, "COLUMNS": "200", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        while not any(r.path.startswith("/metadata/scheduledevents") for r in market.requests):
            assert proc.poll() is None
            time.sleep(0.05)
        market.aws_rebalance()
        # The warning is printed before the stop is posted: a stop ends the watch, and a warning still on its way
        # from the aws poller's thread would not be printed.
        assert proc.stdout is not None
        seen = ""
        while "warning notice from aws (rebalance recommendation)" not in seen:
            line = proc.stdout.readline()
            assert line, f"the watch ended before printing the warning: {seen!r}"
            seen += line
        event_id = market.azure_event("Preempt", in_s=30)
        rest, err = proc.communicate(timeout=PROCESS_HANG_S)
        out = seen + rest
    assert proc.returncode == 75, err
    assert f"stop notice from azure (Preempt {event_id}" in out
    assert "azure: watching" in out


def test_watch_without_notices_ends_after_the_given_time() -> None:
    with ProviderEmulator() as market:
        done = run(["--watch", "--seconds", "1"], {**market.env(), "SPOTSAFE_NOTICES": "aws"})
    assert done.returncode == 0, done.stderr
    assert "notice from" not in done.stdout


def test_an_unknown_source_name_is_a_usage_error() -> None:
    done = run([], {"SPOTSAFE_NOTICES": "aws,ibm"})
    assert done.returncode == 2
    assert "unknown source(s) ['ibm']" in done.stderr
