"""Prometheus metrics, read from the run model that a process's events fold into (opt-in, over HTTP).

A :class:`Metrics` object listens to an event log, folds every event into a
:class:`~spotsafe.telemetry.runmodel.RunModel` (the same fold as the report's) and keeps one registry
of its own (no process-wide globals) whose collector reads the model at each scrape.
:meth:`Metrics.serve` exposes it on ``addr:port``; port 0 picks a free one. The job opts in with
``$SPOTSAFE_METRICS_PORT`` (and ``$SPOTSAFE_METRICS_ADDR``, default 0.0.0.0 so that a Prometheus in the
cluster can scrape it; see :mod:`spotsafe.jobenv`), the supervisor with ``spotsafe run --metrics-port``.

Names follow Prometheus conventions: a ``spotsafe_`` prefix, base units in the name (seconds, bytes,
dollars), ``_total`` on counters, histograms for durations. A process's metrics count every event it
saw, those from before its ``run_started`` too.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from spotsafe.errors import ConfigError
from spotsafe.jobenv import ENV_METRICS_ADDR, ENV_METRICS_PORT
from spotsafe.supervisor.classify import ExitClass
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventLog, LoggedEvent
from spotsafe.telemetry.runmodel import RunModel

__all__ = ["ATTEMPT_BUCKETS", "DURATION_BUCKETS", "ENV_METRICS_ADDR", "ENV_METRICS_PORT", "Metrics", "serve_metrics"]

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ATTEMPT_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 24 * 3600.0)
Labels = tuple[str, ...]


def _counter(name: str, doc: str, counts: dict[Labels, float], labels: Sequence[str] = ()) -> CounterMetricFamily:
    """A counter family; without ``labels`` it is always there (0 before anything happened)."""
    if not labels:
        return CounterMetricFamily(name, doc, value=counts.get((), 0.0))
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, count in counts.items():
        family.add_metric(values, count)
    return family


def _histogram(
    name: str, doc: str, observed: dict[Labels, list[float]], buckets: Sequence[float], labels: Sequence[str] = ()
) -> HistogramMetricFamily:
    """A histogram family of the ``observed`` values per label values (without labels: always there)."""
    family = HistogramMetricFamily(name, doc, labels=labels)
    if not labels:
        observed = {(): observed.get((), [])}
    for values, points in observed.items():
        cumulative = [(repr(float(b)), float(sum(1 for p in points if p <= b))) for b in buckets]  # le="0.25", "1.0"
        family.add_metric(values, [*cumulative, ("+Inf", float(len(points)))], sum_value=sum(points))
    return family


def _by(pairs: Iterable[tuple[Labels, float]]) -> dict[Labels, list[float]]:
    out: dict[Labels, list[float]] = {}
    for labels, value in pairs:
        out.setdefault(labels, []).append(value)
    return out


def _count(keys: Iterable[Labels]) -> dict[Labels, float]:
    return {labels: float(n) for labels, n in Counter(keys).items()}


def _sums(pairs: Iterable[tuple[Labels, float]]) -> dict[Labels, float]:
    return {labels: sum(values) for labels, values in _by(pairs).items()}


class Metrics:
    """The metrics of one process (the job's checkpointer, or a supervisor): its events' run model, as Prometheus
    families. ``registry`` is this object's own."""

    def __init__(self) -> None:
        self.model = RunModel(series=False)
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()
        self._server: Any = None
        self.port: int | None = None
        self.registry.register(self)

    def on_event(self, event: ev.Event) -> None:
        """Fold ``event`` into the model. Thread-safe; never raises for an event it does not know."""
        with self._lock:
            self.model.apply(LoggedEvent(event=event, run_id="", attempt=0, pid=0))

    def collect(self) -> Iterator[Metric]:
        """The families, read from the model (the registry calls this at each scrape)."""
        with self._lock:
            yield from self._job(self.model)
            yield from self._supervisor(self.model)

    @staticmethod
    def _job(m: RunModel) -> Iterator[Metric]:
        saves = [s.event for s in m.saves]
        yield GaugeMetricFamily("spotsafe_step", "The newest training step this process reported.", value=m.step or 0)
        yield _counter(
            "spotsafe_checkpoints",
            "Checkpoints committed, by reason.",
            _count((s.reason,) for s in saves),
            ["reason"],
        )
        failures = sum(1 for f in m.failures if isinstance(f.event, ev.SaveFailed))
        yield _counter("spotsafe_checkpoint_failures", "Checkpoint saves that failed.", {(): failures})
        yield _histogram(
            "spotsafe_checkpoint_stall_seconds",
            "Time training was paused to copy the state for a checkpoint.",
            {(): [s.stall_s for s in saves]},
            DURATION_BUCKETS,
        )
        yield _histogram(
            "spotsafe_checkpoint_write_seconds",
            "Time from the start of a save to its commit (durable).",
            {(): [s.duration_s for s in saves]},
            DURATION_BUCKETS,
        )
        written = sum(s.written_bytes if s.written_bytes is not None else s.bytes for s in saves)
        yield _counter("spotsafe_checkpoint_written_bytes", "Bytes written by committed checkpoints.", {(): written})
        yield GaugeMetricFamily(
            "spotsafe_checkpoint_size_bytes",
            "Size of the newest committed checkpoint.",
            value=saves[-1].bytes if saves else 0,
        )
        yield _histogram(
            "spotsafe_restore_seconds",
            "Time to restore a checkpoint.",
            {(): [r.event.duration_s for r in m.restores]},
            DURATION_BUCKETS,
        )
        yield _counter("spotsafe_replayed_steps", "Training steps done again after a restore.", {(): m.replayed_total})
        yield _counter(
            "spotsafe_notices",
            "Interruption notices received, by source and kind.",
            _count((n.source, n.kind) for n in m.notices),
            ["source", "kind"],
        )
        ends = _count(
            (e.choice, "true" if e.committed and e.before_deadline is not False else "false") for e in m.emergencies
        )
        yield _counter(
            "spotsafe_emergency_saves",
            "Emergency saves on a stop notice, by choice and whether they committed before the deadline.",
            ends,
            ["choice", "committed"],
        )
        yield _counter(
            "spotsafe_checkpoints_skipped", "Damaged or partial checkpoints passed over on restore.", {(): m.skipped}
        )
        yield _counter(
            "spotsafe_restore_failures",
            "Restores that found committed checkpoints and could restore none (the run stopped).",
            {(): m.restore_failures},
        )
        yield from Metrics._freshness(m, saves)

    @staticmethod
    def _freshness(m: RunModel, saves: Sequence[ev.SaveCommitted]) -> Iterator[Metric]:
        """How old the newest checkpoint is, against the save policies' intervals (what a staleness alert needs)."""
        since = saves[-1].time if saves else m.first
        if since is not None:
            yield GaugeMetricFamily(
                "spotsafe_last_checkpoint_timestamp_seconds",
                "Unix time of the newest committed checkpoint (before the first: of the process's first event).",
                value=since,
            )
        yield GaugeMetricFamily(
            "spotsafe_last_checkpoint_step",
            "Step of the newest committed checkpoint (before the first: the restored step, or 0).",
            value=saves[-1].step if saves else (m.restores[-1].event.step if m.restores else 0),
        )
        newest: dict[str, tuple[float | None, int | None]] = {}
        for choice in m.intervals:
            newest[choice.policy] = (choice.interval_s, choice.interval_steps)
        seconds = [s for s, _ in newest.values() if s]
        steps = [n for _, n in newest.values() if n]
        if seconds:
            yield GaugeMetricFamily(
                "spotsafe_checkpoint_interval_seconds",
                "The shortest interval between saves that a time-based save policy chose.",
                value=min(seconds),
            )
        if steps:
            yield GaugeMetricFamily(
                "spotsafe_checkpoint_interval_steps",
                "The shortest interval between saves, in steps, that a step-based save policy chose.",
                value=min(steps),
            )

    @staticmethod
    def _supervisor(m: RunModel) -> Iterator[Metric]:
        # Every class at 0 in every pool launched so far, so that increase() in a rule counts the first one too.
        attempts: dict[Labels, float] = {(pool, kind.value): 0.0 for pool in m.pools for kind in ExitClass}
        attempts.update(_count((e.pool, e.exit_class) for e in m.ended))
        yield _counter(
            "spotsafe_attempts", "Attempts that ended, by pool and exit class.", attempts, ["pool", "exit_class"]
        )
        yield _histogram(
            "spotsafe_attempt_duration_seconds",
            "How long attempts ran, by pool.",
            _by(((e.pool,), e.duration_s) for e in m.ended),
            ATTEMPT_BUCKETS,
            ["pool"],
        )
        yield _counter(
            "spotsafe_cost_dollars",
            "Money spent on attempts, by pool.",
            _sums(((e.pool,), e.cost) for e in m.ended),
            ["pool"],
        )
        yield _histogram(
            "spotsafe_retry_delay_seconds",
            "Backoff before a relaunch.",
            {(): list(m.relaunch_delays)},
            DURATION_BUCKETS,
        )
        yield _counter("spotsafe_escalations", "Moves to on-demand capacity for a deadline.", {(): m.escalations})
        excluded = _count((e.pool, "machine" if e.machine else "pool") for e in m.exclusions)
        yield _counter(
            "spotsafe_exclusions",
            "Pools or machines excluded for a cool-down, by pool.",
            excluded,
            ["pool", "what"],
        )
        yield _counter(
            "spotsafe_drill_interruptions", "Interruptions a drill's emulated market delivered.", {(): len(m.market)}
        )

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
