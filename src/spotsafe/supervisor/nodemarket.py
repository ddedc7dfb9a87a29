"""An emulated spot market of several nodes: capacity is a node count over time, and an outage takes nodes away.

A job of ``nodes`` nodes (torchrun agents on this machine, one process each; see
:mod:`spotsafe.supervisor.nodes`) runs while the market offers that many. The
schedule is a list of capacity levels (drill seconds, nodes on offer):

* a trace of several nodes (``4node`` traces: each value is how many of the
  cluster's 4 nodes run at that tick) offers ``min(nodes, value)``: when the
  drill's job has fewer nodes than the trace, its nodes are the last to go;
* a trace of one instance offers all the nodes or none (the whole zone goes);
* a constant rate takes one node at each interruption, back after the downtime.

When the level drops below what the running attempt holds, the market takes the
difference from it, its highest-numbered nodes first (node 0 hosts the c10d
rendezvous): each gets its own notice (its own emulated metadata endpoint) or
SIGTERM, then SIGKILL when the window ends. Its ranks agree to stop with the
others, so the whole job saves one checkpoint and exits; the supervisor then
relaunches on the nodes the market offers. An attempt is counted once however
many of its nodes go. While an attempt is being interrupted, no new one starts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from spotsafe.errors import ConfigError
from spotsafe.jobenv import JobEnv
from spotsafe.notices.emulator import ProviderEmulator
from spotsafe.supervisor.market import Interruption, Outage, Trace, outages_at_rate
from spotsafe.supervisor.market_loop import MarketLoop, take_machines
from spotsafe.supervisor.nodes import NodesHandle
from spotsafe.supervisor.pools import Handle
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventSink


@dataclass(frozen=True)
class Level:
    """From ``at_s`` (drill seconds), the market offers ``nodes`` nodes."""

    at_s: float
    nodes: int


def levels_from_trace(trace: Trace, *, start_s: float, time_scale: float, nodes: int) -> list[Level]:
    """The capacity ``trace`` offers a job of ``nodes`` nodes, from the first tick at or after ``start_s``
    (trace seconds) where all of them can run; ``time_scale`` trace seconds per drill second."""
    if not time_scale > 0 or math.isinf(time_scale):
        raise ConfigError(f"the time scale must be > 0 (trace seconds per drill second), got {time_scale!r}")
    values = trace.levels if trace.nodes > 1 else tuple(int(u) for u in trace.up)  # up: read as the user asked
    offer = [min(nodes, v) if trace.nodes > 1 else nodes * min(v, 1) for v in values]
    first = int(start_s // trace.gap_s)
    if not 0 <= first < len(offer):
        raise ConfigError(
            f"the trace start {start_s / 3600:g} h is outside trace {trace.name} (0 to {trace.duration_s / 3600:.1f} h)"
        )
    while first < len(offer) and offer[first] < nodes:
        first += 1
    if first == len(offer):
        raise ConfigError(f"trace {trace.name} never offers {nodes} nodes after {start_s / 3600:g} h")
    out = [Level(0.0, nodes)]
    for i in range(first + 1, len(offer)):
        if offer[i] != offer[i - 1]:
            out.append(Level((i - first) * trace.gap_s / time_scale, offer[i]))
    return out


def levels_at_rate(
    rate_per_hour: float, *, time_scale: float, seed: int, count: int, nodes: int, downtime_s: float = 0.0
) -> list[Level]:
    """``count`` interruptions at the rate (as :func:`outages_at_rate`), each taking one node until it is back."""
    out = [Level(0.0, nodes)]
    for outage in outages_at_rate(rate_per_hour, time_scale=time_scale, seed=seed, count=count, downtime_s=downtime_s):
        out += [Level(outage.at_s, nodes - 1), Level(outage.back_s, nodes)]
    return out


def drops(levels: list[Level]) -> list[Outage]:
    """Each fall of the level, as an outage: when it comes, the nodes left, and when the level is back."""
    out = []
    for i in range(1, len(levels)):
        before, level = levels[i - 1].nodes, levels[i]
        if level.nodes < before:
            back = next((later.at_s for later in levels[i + 1 :] if later.nodes >= before), math.inf)
            out.append(Outage(level.at_s, back, level.nodes))
    return out


@dataclass
class NodeMarket(MarketLoop):
    """Runs ``levels`` against the attempts started through :meth:`start_if_capacity`. A context manager; the
    drill uses it as it uses :class:`~spotsafe.supervisor.market.Market`."""

    levels: list[Level]
    nodes: int
    mode: str = "sigterm"
    window_s: float = 10.0
    max_interruptions: int = 20
    log: Callable[[str], None] = lambda line: None
    events: EventSink | None = None
    clock: Callable[[], float] = time.monotonic
    interruptions: list[Interruption] = field(default_factory=list)
    kill_wait_s: float = 10.0
    started: dict[int, int] = field(default_factory=dict)
    """Attempt number -> the nodes it started with."""

    def __post_init__(self) -> None:
        self._open(self.mode)
        self.outages = drops(self.levels)
        self._level = self.levels[0].nodes if self.levels else self.nodes
        self._handle: Handle | None = None
        self._attempt: int | None = None
        self._held = 0
        self._busy = False
        per_node = self.mode in ("aws", "azure", "gcp")
        self._emulators: list[ProviderEmulator | None] = [
            ProviderEmulator() if per_node else None for _ in range(self.nodes)
        ]

    def env(self, node: int = 0) -> dict[str, str]:
        """Environment for node ``node`` of an attempt: where its own notices come from."""
        em = self._emulators[node]
        if em is None:
            return JobEnv(notices="signals").to_env()
        return {**em.env(), **JobEnv(notices=self.mode, notice_poll_s=0.5).to_env()}

    def capacity(self) -> int:
        """Nodes on offer now (0 while an attempt is being interrupted)."""
        with self._lock:
            return 0 if self._busy else self._level

    def start_if_capacity(self, start: Callable[[], Handle], attempt: int, nodes: int) -> Handle | None:
        """``start()`` an attempt of ``nodes`` nodes if the market offers that many now (``None`` if not)."""
        with self._lock:
            if self._busy or self._level < nodes:
                return None
            handle = start()
            self._handle, self._attempt, self._held = handle, attempt, nodes
            self.started[attempt] = nodes
            return handle

    @property
    def delivered(self) -> int:
        """Attempts the market interrupted (each once, however many of its nodes it took)."""
        return len({i.attempt for i in self.interruptions if i.attempt is not None})

    def _run(self) -> None:
        number = 0
        for level in self.levels[1:]:
            if self.delivered >= self.max_interruptions or not self._wait_until(level.at_s):
                return
            with self._lock:
                fell = level.nodes < self._level
                self._level = level.nodes
                if not fell:
                    continue
                number += 1
                handle, attempt = self._handle, self._attempt
                running = handle is not None and handle.poll() is None
                take = self._held - level.nodes if running else 0
                record = Interruption(number, self.now(), attempt if take > 0 else None)
                self.interruptions.append(record)
                if take > 0:
                    self._busy = True
                    first = self._held - take
                    self._held = level.nodes
            if take > 0 and handle is not None:
                self._take(handle, record, first, take)
            self._emit(record, take)

    def _take(self, handle: Handle, record: Interruption, first: int, take: int) -> None:
        machines = list(handle.nodes) if isinstance(handle, NodesHandle) else [handle]
        taken = range(first, first + take)
        self.log(
            f"market: interruption {record.number} ({self.mode}) takes node(s) {', '.join(map(str, taken))} of "
            f"attempt {record.attempt}" + ("" if self.mode == "kill" else f", window {self.window_s:g} s")
        )
        try:
            record.killed = take_machines(
                [machines[i] for i in taken],
                [self._emulators[i] for i in taken],
                mode=self.mode,
                window_s=self.window_s,
                now=self.now,
                closed=lambda: self._closed,
                kill_wait_s=self.kill_wait_s,
            )
            if not record.killed and all(machines[i].poll() == 0 for i in taken):
                self.log(f"market: attempt {record.attempt} finished its work before interruption {record.number}")
                record.attempt = None  # nothing was interrupted
        finally:
            with self._lock:
                self._busy = False

    def _emit(self, record: Interruption, take: int) -> None:
        if self.events is None:
            return
        outage = self.outages[record.number - 1]
        self.events.emit(
            ev.MarketInterruption(
                time=record.wall,
                number=record.number,
                mode=self.mode,
                interrupted=record.attempt,
                window_s=0.0 if self.mode == "kill" else self.window_s,
                capacity_back_in_s=max(0.0, min(outage.back_s, 1e9) - self.now()),
                killed=record.killed,
                nodes_taken=take,
                nodes_left=outage.nodes,
            )
        )
