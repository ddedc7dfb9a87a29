"""An emulated spot market on this machine: when capacity goes away, and how the job hears of it.

A schedule of :class:`Outage` s (drill seconds from the start) comes from a
real preemption trace, time-scaled, or from a constant interruption rate.
:class:`Market` runs the schedule on a thread: at each outage it interrupts the
attempt that is running, the way the provider would (a notice on the emulated
metadata endpoint, and/or SIGTERM, then SIGKILL to the whole process group when the
notice window ends; with ``kill``, SIGKILL at once), and reports no capacity until
the outage ends.

An interruption counts only when it hits an attempt that is running: an outage
that comes between attempts, or while an attempt is already being stopped by an
earlier one (inside its window), only takes capacity; it is recorded (and logged
as a ``market_interruption`` event) with no attempt. So the market's count of
interruptions is the number of attempts it stopped, as the job store and the run's
report count them.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from spotsafe.errors import ConfigError
from spotsafe.jobenv import JobEnv
from spotsafe.notices.emulator import ProviderEmulator
from spotsafe.supervisor.market_loop import MODES as MODES
from spotsafe.supervisor.market_loop import MarketLoop, take_machines
from spotsafe.supervisor.pools import Handle
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventSink

READINGS = ("available", "preempted")
"""How to read a trace value: ``available`` (the upstream README: the number of instances available,
so 0 means preempted) or ``preempted`` (1 means preempted)."""
CITATION = (
    'skypilot-org/spot-traces, from "Can\'t Be Late: Optimizing Spot Instance Savings under Deadlines" '
    "(Wu et al., NSDI 2024)"
)


@dataclass(frozen=True)
class Trace:
    """One spot instance's availability over time: ``up[i]`` for the tick starting at ``i * gap_s``."""

    name: str
    gap_s: float
    up: tuple[bool, ...]
    reading: str
    levels: tuple[int, ...] = ()  # the values: for a trace of several nodes, how many of them run at each tick

    @property
    def nodes(self) -> int:
        """How many nodes the trace follows: its largest value (1 for a trace of one instance)."""
        return max(1, *self.levels) if self.levels else 1

    @property
    def duration_s(self) -> float:
        return len(self.up) * self.gap_s

    @property
    def preemptions(self) -> int:
        return sum(1 for a, b in zip(self.up, self.up[1:], strict=False) if a and not b)


def trace_names() -> list[str]:
    """The traces shipped with spotsafe (see ``spotsafe/data/traces/README.md`` for their source)."""
    folder = resources.files("spotsafe") / "data" / "traces"
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json"))


def load_trace(name_or_path: str, reading: str = "available") -> Trace:
    """A shipped trace by name (``aws-us-west-2c``), or a trace file in the same format by path."""
    if reading not in READINGS:
        raise ConfigError(f"the trace reading must be one of {', '.join(READINGS)}, got {reading!r}")
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read the trace {path}: {err.strerror or err}") from None
        name = path.stem
    else:
        if name_or_path not in trace_names():
            raise ConfigError(
                f"no trace named {name_or_path!r}; shipped traces: {', '.join(trace_names())} (or give a path)"
            )
        text = (resources.files("spotsafe") / "data" / "traces" / f"{name_or_path}.json").read_text(encoding="utf-8")
        name = name_or_path
    try:
        doc = json.loads(text)
        gap = float(doc["metadata"]["gap_seconds"])
        values = doc["data"]
        if not gap > 0 or not isinstance(values, list) or not values:
            raise ValueError("empty")
        levels = tuple(int(v) for v in values)
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise ValueError("every value must be a whole number >= 0")
        up = tuple((v >= 1) == (reading == "available") for v in levels)
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"trace {name_or_path} is not in the spot-traces format "
            f'{{"metadata": {{"gap_seconds": N}}, "data": [0, 1, ...]}} ({err})'
        ) from None
    if max(levels) > 1 and reading != "available":
        raise ConfigError(
            f"trace {name_or_path} follows {max(levels)} nodes (each value: how many run); it has only the "
            "'available' reading"
        )
    return Trace(name, gap, up, reading, levels)


@dataclass(frozen=True)
class Outage:
    """Capacity is taken at ``at_s`` and can be had again from ``back_s`` (drill seconds)."""

    at_s: float
    back_s: float
    nodes: int = 0
    """The nodes left while it lasts (a market of several nodes; 0: none)."""


def outages_from_trace(trace: Trace, *, start_s: float, time_scale: float) -> list[Outage]:
    """The trace's preemptions from ``start_s`` (trace seconds) on, ``time_scale`` trace seconds per drill second.

    The drill starts at the first tick from ``start_s`` where the instance is up.
    """
    if not time_scale > 0 or math.isinf(time_scale):
        raise ConfigError(f"the time scale must be > 0 (trace seconds per drill second), got {time_scale!r}")
    first = int(start_s // trace.gap_s)
    if not 0 <= first < len(trace.up):
        raise ConfigError(
            f"the trace start {start_s / 3600:g} h is outside trace {trace.name} (0 to {trace.duration_s / 3600:.1f} h)"
        )
    while first < len(trace.up) and not trace.up[first]:
        first += 1
    out = []
    i = first + 1
    while i < len(trace.up):
        if trace.up[i - 1] and not trace.up[i]:
            j = i
            while j < len(trace.up) and not trace.up[j]:
                j += 1
            out.append(Outage((i - first) * trace.gap_s / time_scale, (j - first) * trace.gap_s / time_scale))
            i = j
        i += 1
    return out


def outages_at_rate(
    rate_per_hour: float, *, time_scale: float, seed: int, count: int, downtime_s: float = 0.0
) -> list[Outage]:
    """``count`` preemptions at exponential intervals of mean ``1 / rate`` trace hours, time-scaled;
    capacity comes back ``downtime_s`` trace seconds after each."""
    if not rate_per_hour > 0 or math.isinf(rate_per_hour):
        raise ConfigError(f"the interruption rate must be > 0 per hour, got {rate_per_hour!r}")
    if not time_scale > 0 or math.isinf(time_scale):
        raise ConfigError(f"the time scale must be > 0, got {time_scale!r}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate_per_hour / 3600.0) / time_scale
        out.append(Outage(t, t + downtime_s / time_scale))
        t += downtime_s / time_scale
    return out


@dataclass
class Interruption:
    number: int
    at_s: float
    attempt: int | None
    """The attempt interrupted (``None``: none was running, or it was already being stopped by an earlier
    interruption, or it finished its work before this one could stop it; only capacity went away)."""
    killed: bool = False
    """The job got SIGKILL: at once (``kill``), or when it outlived the notice window."""
    wall: float = field(default_factory=time.time, compare=False, repr=False)
    """When the market took it up (Unix time): the ``market_interruption`` event's time."""


@dataclass
class Market(MarketLoop):
    """Runs ``outages`` against the attempts :meth:`attach` ed to it. Use as a context manager."""

    outages: list[Outage]
    mode: str = "aws"
    window_s: float = 10.0
    max_interruptions: int = 20
    log: Callable[[str], None] = lambda line: None
    events: EventSink | None = None
    clock: Callable[[], float] = time.monotonic
    interruptions: list[Interruption] = field(default_factory=list)
    kill_wait_s: float = 10.0
    """How long (real seconds) to wait for an attempt sent SIGKILL to be gone before capacity comes back."""

    def __post_init__(self) -> None:
        self._open(self.mode)
        self._handle: Handle | None = None
        self._attempt: int | None = None
        self._down_until = -math.inf
        self._busy = False
        self._struck: set[int] = set()  # attempts already interrupted: never counted twice
        self._emulator = ProviderEmulator() if self.mode in ("aws", "azure", "gcp") else None
        self._emulators = [self._emulator]

    # -- what the launcher asks ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for an attempt: where its notices come from."""
        if self._emulator is None:
            return JobEnv(notices="signals").to_env()
        return {**self._emulator.env(), **JobEnv(notices=self.mode, notice_poll_s=0.5).to_env()}

    def capacity(self) -> bool:
        with self._lock:
            return not self._busy and self.now() >= self._down_until

    def attach(self, handle: Handle, attempt: int) -> None:
        with self._lock:
            self._handle, self._attempt = handle, attempt

    def start_if_capacity(self, start: Callable[[], Handle], attempt: int) -> Handle | None:
        """``start()`` the attempt and attach it, if there is capacity now (``None`` if not), as one step:
        an outage cannot begin between the check and the attach, so no attempt runs through one."""
        with self._lock:
            if self._busy or self.now() < self._down_until:
                return None
            handle = start()
            self._handle, self._attempt = handle, attempt
            return handle

    @property
    def delivered(self) -> int:
        return sum(1 for i in self.interruptions if i.attempt is not None)

    # -- the schedule ------------------------------------------------------------------------------------
    def _run(self) -> None:
        i = 0
        while i < len(self.outages):
            number, outage = i + 1, self.outages[i]
            if self.delivered >= self.max_interruptions or not self._wait_until(outage.at_s):
                return
            i += 1
            with self._lock:
                handle, attempt = self._handle, self._attempt
                running = (
                    handle is not None and attempt is not None and attempt not in self._struck and handle.poll() is None
                )
                self._down_until = max(self._down_until, outage.back_s, outage.at_s)
                self._busy = running
                if running and attempt is not None:
                    self._struck.add(attempt)
            record = Interruption(number, self.now(), attempt if running else None)
            self.interruptions.append(record)
            absorbed: list[Interruption] = []
            try:
                if running and handle is not None:
                    self._deliver(handle, record)
            finally:
                with self._lock:
                    # Outages that came while the attempt was being stopped found none running: they only
                    # take capacity, and are no interruption of the job.
                    while running and i < len(self.outages) and self.outages[i].at_s <= self.now():
                        late = self.outages[i]
                        i += 1
                        self._down_until = max(self._down_until, late.back_s)
                        absorbed.append(Interruption(i, late.at_s, None))
                    self.interruptions.extend(absorbed)
                    self._busy = False
            self._emit(record)
            for late_record in absorbed:
                self.log(
                    f"market: interruption {late_record.number} ({self.mode}) came while attempt {attempt} was "
                    "being stopped: it only takes capacity"
                )
                self._emit(late_record)

    def _emit(self, record: Interruption) -> None:
        if self.events is None:
            return
        now = self.now()
        self.events.emit(
            ev.MarketInterruption(
                time=record.wall,  # when it came, not when its window ended
                number=record.number,
                mode=self.mode,
                interrupted=record.attempt,
                window_s=0.0 if self.mode == "kill" else self.window_s,
                capacity_back_in_s=max(0.0, self._down_until - now),
                killed=record.killed,
            )
        )

    def _deliver(self, handle: Handle, record: Interruption) -> None:
        if self.mode == "kill":
            self.log(f"market: interruption {record.number} (kill) of attempt {record.attempt}: SIGKILL, no warning")
        else:
            self.log(
                f"market: interruption {record.number} ({self.mode}) of attempt {record.attempt}, "
                f"window {self.window_s:g} s"
            )
        record.killed = take_machines(
            [handle],
            [self._emulator],
            mode=self.mode,
            window_s=self.window_s,
            now=self.now,
            closed=lambda: self._closed,
            kill_wait_s=self.kill_wait_s,
        )
        if not record.killed and handle.poll() == 0:
            self.log(f"market: attempt {record.attempt} finished its work before interruption {record.number} took it")
            record.attempt = None  # nothing was interrupted
