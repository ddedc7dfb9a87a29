"""Choosing the emergency save that fits before the deadline, from measured save costs.

:class:`SaveCosts` keeps what recent saves cost (this process's, and earlier
attempts' from the event log): the stall, the time to write to the run's storage,
and with ``stage_dir`` the local commit and the upload separately. Estimates scale
each sample to the bytes at hand and take the slowest of the three most recent
(storage speed drifts, and an estimate that is too short costs a save); scaling
never makes a smaller save cheaper than a measured one (fixed costs such as fsyncs
and round trips do not shrink), so estimates lean long.

:func:`plan_emergency` weighs the options:

* ``incremental``: only the chunks that changed since the last commit, straight to the
  run's storage (its size is estimated from the last save's written fraction);
* ``full``: every byte, straight to the run's storage (when nothing can be shared);
* ``local-then-upload`` (with ``stage_dir``): commit on local disk, then upload. It is
  durable later than a direct save, but its local commit is quick: when no durable
  option fits, it still secures the state on a disk that may survive the stop (EBS on
  an AWS ``stop``/``hibernate``, a persistent volume), and the next start uploads it.

The fastest option whose estimate, times ``safety``, fits the time left is chosen.
If none does, the local commit of ``local-then-upload`` when it fits; else the quickest
option if its bare estimate fits (a save that runs out of time costs nothing: it never
becomes visible); else ``none``: the last verified checkpoint stays the resume point.
Without a deadline or without measurements, the configured route is tried.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from spotsafe.telemetry import events as ev

DIRECT = "direct"
STAGED = "local-then-upload"
INCREMENTAL = "incremental"
FULL = "full"
NONE = "none"
RECENT = 3


def _recent_high(estimates: list[float]) -> float | None:
    """The slowest of the most recent estimates (samples are oldest first)."""
    return max(estimates[-RECENT:]) if estimates else None


def _written(save: ev.SaveCommitted) -> int:
    """What the save wrote (an event from before ``written_bytes`` was recorded: all of it)."""
    return save.written_bytes if save.written_bytes is not None else save.bytes


class SaveCosts:
    """Recent save costs, from the saves' ``save_committed`` events. Thread-safe: the save worker adds, the
    training thread estimates."""

    def __init__(self, samples: Iterable[ev.SaveCommitted] = (), keep: int = 20) -> None:
        self._samples: deque[ev.SaveCommitted] = deque(samples, maxlen=keep)
        self._lock = threading.Lock()

    def add(self, sample: ev.SaveCommitted) -> None:
        with self._lock:
            self._samples.append(sample)

    def _all(self) -> list[ev.SaveCommitted]:
        with self._lock:
            return list(self._samples)

    def __len__(self) -> int:
        return len(self._all())

    @property
    def stall_s(self) -> float | None:
        """Median time training waited per save."""
        samples = self._all()
        return statistics.median(s.stall_s for s in samples) if samples else None

    @property
    def commit_s(self) -> float | None:
        """Median time from the start of a save until it was durable."""
        samples = self._all()
        return statistics.median(s.duration_s for s in samples) if samples else None

    @property
    def written_fraction(self) -> float | None:
        """What share of the state the latest save had to write (incremental saves write less)."""
        samples = self._all()
        if not samples or samples[-1].bytes <= 0:
            return None
        return min(1.0, _written(samples[-1]) / samples[-1].bytes)

    def stall_for(self, nbytes: int) -> float | None:
        """Estimated stall for a state of ``nbytes`` (compare and copy scale with the state)."""
        return _recent_high([s.stall_s * max(1.0, nbytes / s.bytes) for s in self._all() if s.bytes > 0])

    def write_for(self, nbytes: int, leg: str) -> float | None:
        """Estimated seconds to write ``nbytes``: ``leg`` is ``direct`` (to the run's storage),
        ``local`` (commit on ``stage_dir``) or ``upload`` (stage to the run's storage).
        Direct writes and uploads go to the same storage, so each stands in for the other."""
        estimates: list[float] = []
        fallback: list[float] = []
        for s in self._all():
            scale = max(1.0, nbytes / max(_written(s), 1))
            if s.route == STAGED and s.local_s is not None and s.upload_s is not None:
                seconds = {"local": s.local_s, "upload": s.upload_s, "direct": s.upload_s}[leg]
                (estimates if leg != "direct" else fallback).append(seconds * scale)
            elif (s.route or DIRECT) == DIRECT and leg in ("direct", "upload"):
                (estimates if leg == "direct" else fallback).append(max(0.0, s.duration_s - s.stall_s) * scale)
        return _recent_high(estimates or fallback)


@dataclass(frozen=True)
class Option:
    """One way to save now: what it writes, where, and how long until it is durable."""

    name: str
    route: str
    full: bool
    bytes: int
    estimate_s: float | None
    local_s: float | None = None


@dataclass(frozen=True)
class Plan:
    choice: Option | None
    options: tuple[Option, ...]
    time_left_s: float | None
    reason: str

    @property
    def name(self) -> str:
        return self.choice.name if self.choice is not None else NONE

    def estimates(self) -> dict[str, float | None]:
        return {o.name: None if o.estimate_s is None else round(o.estimate_s, 3) for o in self.options}


def _sum(*parts: float | None) -> float | None:
    return None if any(p is None for p in parts) else sum(p for p in parts if p is not None)


def options_for(costs: SaveCosts, *, total_bytes: int, can_share: bool, staged: bool) -> list[Option]:
    """The options available now, with their estimates (see the module docstring)."""
    fraction = costs.written_fraction if can_share else 1.0
    part = int(total_bytes * fraction) if fraction is not None else total_bytes
    stall = costs.stall_for(total_bytes)
    options: list[Option] = []
    if can_share:
        options.append(Option(INCREMENTAL, DIRECT, False, part, _sum(stall, costs.write_for(part, "direct"))))
    options.append(Option(FULL, DIRECT, True, total_bytes, _sum(stall, costs.write_for(total_bytes, "direct"))))
    if staged:
        size = part if can_share else total_bytes
        local = _sum(stall, costs.write_for(size, "local"))
        options.append(Option(STAGED, STAGED, not can_share, size, _sum(local, costs.write_for(size, "upload")), local))
    return options


def plan_emergency(options: list[Option], *, time_left_s: float | None, safety: float, preferred: str) -> Plan:
    """Pick the option to run now (``preferred`` names the configured route's option)."""
    default = next((o for o in options if o.name == preferred), options[0])
    if time_left_s is None:
        return Plan(default, tuple(options), None, f"no deadline given: {default.name} as configured")
    if time_left_s <= 0:
        return Plan(None, tuple(options), time_left_s, "the deadline has passed: no time for a save")
    known = [o for o in options if o.estimate_s is not None]
    if not known:
        return Plan(default, tuple(options), time_left_s, f"no save measured yet: trying {default.name}")
    fits = [o for o in known if o.estimate_s is not None and o.estimate_s * safety <= time_left_s]
    if fits:
        best = min(fits, key=lambda o: (o.estimate_s, o.name != preferred))
        return Plan(
            best,
            tuple(options),
            time_left_s,
            f"{best.name} fits: ~{best.estimate_s:.1f} s x {safety:g} safety <= {time_left_s:.1f} s left",
        )
    unknown = [o for o in options if o.estimate_s is None]
    if unknown:
        return Plan(
            unknown[0],
            tuple(options),
            time_left_s,
            f"measured options do not fit; trying {unknown[0].name} (not measured)",
        )
    quickest = min(known, key=lambda o: o.estimate_s or 0.0)
    for option in known:
        if option.route == STAGED and option.local_s is not None and option.local_s * safety <= time_left_s:
            return Plan(
                option,
                tuple(options),
                time_left_s,
                f"no durable save fits (quickest ~{quickest.estimate_s:.1f} s x {safety:g} > "
                f"{time_left_s:.1f} s left); the local commit fits (~{option.local_s:.1f} s) and is "
                "uploaded at the next start if its disk survives",
            )
    if quickest.estimate_s is not None and quickest.estimate_s <= time_left_s:
        return Plan(
            quickest,
            tuple(options),
            time_left_s,
            f"{quickest.name} fits only without the safety factor (~{quickest.estimate_s:.1f} s of "
            f"{time_left_s:.1f} s left): trying it; if it runs out of time it is never used",
        )
    return Plan(
        None,
        tuple(options),
        time_left_s,
        f"nothing fits: quickest ({quickest.name}) ~{quickest.estimate_s:.1f} s x {safety:g} > "
        f"{time_left_s:.1f} s left; the last verified checkpoint stays the resume point",
    )
