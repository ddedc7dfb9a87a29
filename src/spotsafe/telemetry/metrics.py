"""Prometheus metrics, derived from the typed events (opt-in, over HTTP, through prometheus-client).

A :class:`Metrics` object listens to an event log and keeps one registry of its
own (no process-wide globals). :meth:`Metrics.serve` exposes it on
``addr:port``; port 0 picks a free one. The job opts in with
``$SPOTSAFE_METRICS_PORT`` (and ``$SPOTSAFE_METRICS_ADDR``, default 0.0.0.0 so
that a Prometheus in the cluster can scrape it), the supervisor with
``spotsafe run --metrics-port``.

Names follow Prometheus conventions: a ``spotsafe_`` prefix, base units in the
name (seconds, bytes, dollars), ``_total`` on counters, histograms for durations.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from spotsafe.errors import ConfigError
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventLog

ENV_METRICS_PORT, ENV_METRICS_ADDR = "SPOTSAFE_METRICS_PORT", "SPOTSAFE_METRICS_ADDR"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ATTEMPT_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0)


class Metrics:
    """Event -> metric translation for one process (the job's checkpointer, or a supervisor)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.step = Gauge("spotsafe_step", "The newest training step this process reported.", registry=r)
        self.checkpoints = Counter(
            "spotsafe_checkpoints_total", "Checkpoints committed, by reason.", ["reason"], registry=r
        )
        self.checkpoint_failures = Counter(
            "spotsafe_checkpoint_failures_total", "Checkpoint saves that failed.", registry=r
        )
        self.stall = Histogram(
            "spotsafe_checkpoint_stall_seconds",
            "Time training was paused to copy the state for a checkpoint.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.write = Histogram(
            "spotsafe_checkpoint_write_seconds",
            "Time from the start of a save to its commit (durable).",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.written = Counter(
            "spotsafe_checkpoint_written_bytes_total", "Bytes written by committed checkpoints.", registry=r
        )
        self.size = Gauge("spotsafe_checkpoint_size_bytes", "Size of the newest committed checkpoint.", registry=r)
        self.restore = Histogram(
            "spotsafe_restore_seconds", "Time to restore a checkpoint.", buckets=DURATION_BUCKETS, registry=r
        )
        self.replayed = Counter(
            "spotsafe_replayed_steps_total", "Training steps done again after a restore.", registry=r
        )
        self.notices = Counter(
            "spotsafe_notices_total", "Interruption notices received, by source and kind.", ["source", "kind"],
            registry=r,
        )  # fmt: skip
        self.emergency = Counter(
            "spotsafe_emergency_saves_total",
            "Emergency saves on a stop notice, by choice and whether they committed before the deadline.",
            ["choice", "committed"],
            registry=r,
        )
        self.skipped = Counter(
            "spotsafe_checkpoints_skipped_total", "Damaged or partial checkpoints passed over on restore.", registry=r
        )
        # The supervisor's.
        self.attempts = Counter(
            "spotsafe_attempts_total", "Attempts that ended, by pool and exit class.", ["pool", "exit_class"],
            registry=r,
        )  # fmt: skip
        self.attempt_seconds = Histogram(
            "spotsafe_attempt_duration_seconds",
            "How long attempts ran, by pool.",
            ["pool"],
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        self.cost = Counter("spotsafe_cost_dollars_total", "Money spent on attempts, by pool.", ["pool"], registry=r)
        self.retry_delay = Histogram(
            "spotsafe_retry_delay_seconds",
            "Backoff before a relaunch.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.escalations = Counter(
            "spotsafe_escalations_total", "Moves to on-demand capacity for a deadline.", registry=r
        )
        self.exclusions = Counter(
            "spotsafe_exclusions_total", "Pools or machines excluded for a cool-down, by pool.", ["pool", "what"],
            registry=r,
        )  # fmt: skip
        self.market_interruptions = Counter(
            "spotsafe_drill_interruptions_total", "Interruptions a drill's emulated market delivered.", registry=r
        )
        self._lock = threading.Lock()
        self._server: Any = None
        self.port: int | None = None

    def on_event(self, event: ev.Event) -> None:
        """Update the metrics for ``event``. Thread-safe; never raises for an event it does not know."""
        with self._lock:
            self._on_event(event)

    def _on_event(self, e: ev.Event) -> None:
        if isinstance(e, ev.Progress):
            self.step.set(e.step)
        elif isinstance(e, ev.SaveCommitted):
            self.checkpoints.labels(e.reason).inc()
            self.stall.observe(e.stall_s)
            self.write.observe(e.duration_s)
            self.written.inc(e.written_bytes if e.written_bytes is not None else e.bytes)
            self.size.set(e.bytes)
        elif isinstance(e, ev.SaveFailed):
            self.checkpoint_failures.inc()
        elif isinstance(e, ev.RestoreCompleted):
            self.restore.observe(e.duration_s)
            self.replayed.inc(e.replayed_steps or 0)
            self.step.set(e.step)
        elif isinstance(e, ev.NoticeReceived):
            self.notices.labels(e.source, e.kind).inc()
        elif isinstance(e, ev.EmergencyFinished):
            self.emergency.labels(e.choice, "true" if e.committed and e.before_deadline is not False else "false").inc()
        elif isinstance(e, ev.CheckpointSkipped):
            self.skipped.inc()
        elif isinstance(e, ev.AttemptEnded):
            self.attempts.labels(e.pool, e.exit_class).inc()
            self.attempt_seconds.labels(e.pool).observe(e.duration_s)
            self.cost.labels(e.pool).inc(e.cost)
        elif isinstance(e, ev.RetryDecided) and e.relaunch:
            self.retry_delay.observe(e.delay_s)
        elif isinstance(e, ev.Escalated):
            self.escalations.inc()
        elif isinstance(e, ev.Excluded):
            self.exclusions.labels(e.pool, "machine" if e.machine else "pool").inc()
        elif isinstance(e, ev.MarketInterruption) and e.interrupted is not None:
            self.market_interruptions.inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Expose ``/metrics`` on ``addr:port`` (0: a free port) from a daemon thread; returns the port."""
        server, _ = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve_metrics(log: EventLog, port: str | int, addr: str = "0.0.0.0") -> Metrics:
    """Metrics for every event ``log`` writes, served on ``addr:port``. Under torchrun each rank adds its
    ``$LOCAL_RANK`` to the port, so that the ranks of one machine do not collide."""
    try:
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"the metrics port must be 0-65535, got {port!r} (${ENV_METRICS_PORT})") from None
    if number:
        number += int(os.environ.get("LOCAL_RANK", "0") or 0)
    metrics = Metrics()
    log.subscribe(metrics.on_event)
    try:
        metrics.port = metrics.serve(number, addr)
    except OSError as err:
        raise ConfigError(f"cannot serve metrics on {addr}:{number}: {err.strerror or err}") from None
    return metrics
