"""``spotsafe drill``: preemption traces, the emulated spot market, and whole drills of real jobs.

The market tests drive :class:`Market` with fake attempt handles and a fake clock, so that every
step of an interruption (notice, SIGTERM, the window's end, SIGKILL, capacity coming back) is checked
in order without depending on timing. The end-to-end tests run the example job (and a job that is not
resumable) as real subprocesses under the drill, through the API and through the ``spotsafe`` CLI.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import urllib3
from rich.console import Console

from spotsafe.cli.drill_report import print_drill
from spotsafe.engine.emergency_save import ALREADY_SAVED
from spotsafe.errors import ConfigError
from spotsafe.notices.base import NoticeBoard, NoticeSource
from spotsafe.notices.detect import build_sources, detect
from spotsafe.supervisor.drill import JOB_NAME, DrillConfig, DrillLauncher, DrillReport, run_drill
from spotsafe.supervisor.market import (
    CITATION,
    MODES,
    READINGS,
    Interruption,
    Market,
    Outage,
    Trace,
    load_trace,
    outages_at_rate,
    outages_from_trace,
    trace_names,
)
from spotsafe.supervisor.nodemarket import NodeMarket
from spotsafe.supervisor.pools import LaunchSpec, Pool
from spotsafe.supervisor.reference import REFERENCE_MARKER, compare_final, ensure_reference
from spotsafe.supervisor.store import AttemptRecord, JobState, JobStore, read_store
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, LoggedEvent, read_events
from spotsafe.telemetry.report import build_report

from .conftest import PROCESS_HANG_S, TINY_JOB

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_lm.py"

SHIPPED = ["aws-us-east-1c", "aws-us-east-1f", "aws-us-west-2b", "aws-us-west-2c"]
SYNTHETIC = [1, 1, 0, 0, 1, 1, 1, 0, 1]  # preemptions at ticks 2 and 7; capacity back at ticks 4 and 8
SPOTSAFE = Path(sys.executable).with_name("spotsafe")


def write_trace(path: Path, data: Sequence[object], gap_seconds: float = 60) -> Path:
    path.write_text(json.dumps({"metadata": {"gap_seconds": gap_seconds}, "data": list(data)}), encoding="utf-8")
    return path


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds (the timeout only guards against a hang)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- traces ----------------------------------------------------------------------------------------------------------


def test_trace_names_list_the_shipped_aws_traces() -> None:
    names = trace_names()
    assert [n for n in names if n.startswith("aws-") and "node-" not in n] == SHIPPED
    assert [n for n in names if "node-" in n] == [
        *(f"aws-16node-{zone}" for zone in ("us-east-2b", "us-west-2a", "us-west-2c")),
        *(f"aws-4node-{zone}" for zone in ("us-east-1f", "us-east-2a", "us-west-2c")),
    ]
    assert names == sorted(names)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_trace_loads(name: str) -> None:
    trace = load_trace(name)
    assert trace.name == name
    assert trace.reading == "available"
    assert trace.gap_s == 32.0  # the traces README: one value per 32 s tick
    assert trace.duration_s == len(trace.up) * 32.0
    assert 7.0 * 86400 < trace.duration_s < 7.5 * 86400  # "kept running ... for about 7.4 days"
    assert any(trace.up) and not all(trace.up)
    assert trace.preemptions == sum(1 for a, b in zip(trace.up, trace.up[1:], strict=False) if a and not b)
    assert trace.preemptions > 0
    outages = outages_from_trace(trace, start_s=0, time_scale=1.0)
    assert len(outages) == trace.preemptions  # from the start, every 1 -> 0 transition is an outage
    assert all(o.at_s < o.back_s for o in outages)
    assert all(a.back_s < b.at_s for a, b in itertools.pairwise(outages))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_trace_readings_are_inverses(name: str) -> None:
    available = load_trace(name, "available")
    preempted = load_trace(name, "preempted")
    assert preempted.reading == "preempted"
    assert preempted.gap_s == available.gap_s
    assert len(preempted.up) == len(available.up)
    assert all(a != b for a, b in zip(available.up, preempted.up, strict=True))


def test_citation_names_the_source_of_the_shipped_traces() -> None:
    assert "skypilot-org/spot-traces" in CITATION
    assert "Can't Be Late" in CITATION and "NSDI 2024" in CITATION
    readme = (ROOT / "src" / "spotsafe" / "data" / "traces" / "README.md").read_text(encoding="utf-8")
    assert "skypilot-org/spot-traces" in readme and "Can't Be Late" in readme
    for name in SHIPPED:
        assert f"`{name}`" in readme
    assert READINGS == ("available", "preempted")


def test_a_trace_file_in_the_same_format_loads_by_path(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "my-zone.json", SYNTHETIC)
    trace = load_trace(str(path))
    up = (True, True, False, False, True, True, True, False, True)
    assert trace == Trace("my-zone", 60.0, up, "available", tuple(map(int, up)))
    assert trace.duration_s == 540.0
    assert trace.preemptions == 2

    flipped = load_trace(str(path), reading="preempted")
    assert flipped.up == tuple(not u for u in trace.up)
    assert flipped.reading == "preempted"
    assert flipped.preemptions == 2  # up at ticks 2-3 and 7: 1 -> 0 at ticks 4 and 8
    assert flipped.preemptions == sum(1 for a, b in zip(flipped.up, flipped.up[1:], strict=False) if a and not b)


def test_trace_file_without_a_json_suffix_and_counts_above_one(tmp_path: Path) -> None:
    """The upstream values are counts of available instances: 2 available is as up as 1."""
    path = write_trace(tmp_path / "counts.trace", [2, 1, 0, 3, 0, 0, 1], gap_seconds=32)
    trace = load_trace(str(path))
    assert trace.name == "counts"
    assert trace.up == (True, True, False, True, False, False, True)
    assert trace.preemptions == 2
    assert trace.gap_s == 32.0


@pytest.mark.parametrize(
    ("data", "preemptions"),
    [([1, 1, 1], 0), ([0, 0, 0], 0), ([1, 0], 1), ([0, 1], 0), ([1, 0, 1, 0, 1, 0], 3), ([1, 0, 0, 1, 1, 0, 0], 2)],
)
def test_trace_preemptions_count_one_to_zero_transitions(tmp_path: Path, data: list[int], preemptions: int) -> None:
    assert load_trace(str(write_trace(tmp_path / "t.json", data))).preemptions == preemptions


def test_unknown_trace_name_lists_the_shipped_traces() -> None:
    with pytest.raises(ConfigError) as err:
        load_trace("aws-mars-1a")
    message = str(err.value)
    assert "aws-mars-1a" in message
    for name in SHIPPED:
        assert name in message
    assert "path" in message


def test_bad_trace_reading_is_a_config_error(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.json", SYNTHETIC)
    for reading in ("up", "Available", ""):
        with pytest.raises(ConfigError, match="available, preempted"):
            load_trace(str(path), reading)
    with pytest.raises(ConfigError, match="reading"):
        load_trace("aws-us-west-2c", "down")


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"data": [1, 0]}',
        '{"metadata": {}, "data": [1, 0]}',
        '{"metadata": {"gap_seconds": 0}, "data": [1, 0]}',
        '{"metadata": {"gap_seconds": -32}, "data": [1, 0]}',
        '{"metadata": {"gap_seconds": "often"}, "data": [1, 0]}',
        '{"metadata": {"gap_seconds": 32}, "data": []}',
        '{"metadata": {"gap_seconds": 32}, "data": {"0": 1}}',
        '{"metadata": {"gap_seconds": 32}, "data": [1, "lots", 0]}',
        '{"metadata": {"gap_seconds": 32}, "data": [1, null, 0]}',
        '{"metadata": {"gap_seconds": 32}}',
    ],
)
def test_a_trace_file_in_another_format_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_trace(str(path))
    message = str(err.value)
    assert str(path) in message
    assert "spot-traces format" in message and "gap_seconds" in message


def test_a_missing_trace_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError, match="cannot read the trace"):
        load_trace(str(missing))
    with pytest.raises(ConfigError, match="cannot read the trace"):
        load_trace(str(tmp_path))  # a folder


# -- schedules -------------------------------------------------------------------------------------------------------


def synthetic(tmp_path: Path, reading: str = "available") -> Trace:
    return load_trace(str(write_trace(tmp_path / "synthetic.json", SYNTHETIC)), reading)


def test_outages_from_trace_are_exact_and_time_scaled(tmp_path: Path) -> None:
    trace = synthetic(tmp_path)
    # 60 trace seconds per drill second: one tick is one drill second.
    assert outages_from_trace(trace, start_s=0, time_scale=60) == [Outage(2.0, 4.0), Outage(7.0, 8.0)]
    # Twice as slow, then ten times faster: every time scales.
    assert outages_from_trace(trace, start_s=0, time_scale=30) == [Outage(4.0, 8.0), Outage(14.0, 16.0)]
    assert outages_from_trace(trace, start_s=0, time_scale=600) == pytest.approx([Outage(0.2, 0.4), Outage(0.7, 0.8)])
    # A later start shifts the schedule to the start's tick.
    assert outages_from_trace(trace, start_s=60, time_scale=60) == [Outage(1.0, 3.0), Outage(6.0, 7.0)]
    assert outages_from_trace(trace, start_s=4 * 60, time_scale=60) == [Outage(3.0, 4.0)]
    assert outages_from_trace(trace, start_s=8 * 60, time_scale=60) == []


def test_a_start_inside_an_outage_begins_at_the_next_up_tick(tmp_path: Path) -> None:
    trace = synthetic(tmp_path)
    for start in (2 * 60, 3 * 60, 150):  # ticks 2 and 3 are down: the drill starts at tick 4
        assert outages_from_trace(trace, start_s=start, time_scale=60) == [Outage(3.0, 4.0)]
    assert outages_from_trace(trace, start_s=7 * 60, time_scale=60) == []  # starts at tick 8: no preemption after


def test_the_preempted_reading_gives_the_other_schedule(tmp_path: Path) -> None:
    trace = synthetic(tmp_path, "preempted")  # up at ticks 2, 3 and 7
    # From tick 2: down at ticks 4-6, up at 7, down at 8 to the trace's end (tick 9).
    assert outages_from_trace(trace, start_s=0, time_scale=60) == [Outage(2.0, 5.0), Outage(6.0, 7.0)]


@pytest.mark.parametrize("start_s", [-1.0, -60.0, 9 * 60.0, 10_000.0])
def test_a_start_outside_the_trace_is_a_config_error(tmp_path: Path, start_s: float) -> None:
    with pytest.raises(ConfigError, match=r"outside trace synthetic \(0 to 0\.1 h\)"):
        outages_from_trace(synthetic(tmp_path), start_s=start_s, time_scale=60)


@pytest.mark.parametrize("time_scale", [0.0, -1.0, math.inf, math.nan])
def test_outages_from_trace_reject_a_bad_time_scale(tmp_path: Path, time_scale: float) -> None:
    with pytest.raises(ConfigError, match="time scale must be > 0"):
        outages_from_trace(synthetic(tmp_path), start_s=0, time_scale=time_scale)


def test_the_default_market_has_five_preemptions_then_four_quiet_hours() -> None:
    """drill.py's default: us-west-2c from hour 16.8 at 120x: five preemptions, then four hours of running."""
    config = DrillConfig(command=("true",), workdir=Path("unused"))
    outages, what = config.schedule()
    assert "aws-us-west-2c" in what and CITATION in what and "'available'" in what
    assert len(outages) > 5
    quiet_trace_s = (outages[5].at_s - outages[4].back_s) * config.time_scale
    assert quiet_trace_s >= 4 * 3600
    assert all((b.at_s - a.back_s) * config.time_scale < 3600 for a, b in itertools.pairwise(outages[:5]))


def test_outages_at_rate_count_order_and_determinism() -> None:
    outages = outages_at_rate(12.0, time_scale=60.0, seed=7, count=25, downtime_s=120.0)
    assert len(outages) == 25
    assert all(o.back_s == pytest.approx(o.at_s + 2.0) for o in outages)  # 120 trace seconds at 60x
    assert all(a.back_s <= b.at_s for a, b in itertools.pairwise(outages))
    assert outages[0].at_s > 0
    assert outages == outages_at_rate(12.0, time_scale=60.0, seed=7, count=25, downtime_s=120.0)
    assert outages != outages_at_rate(12.0, time_scale=60.0, seed=8, count=25, downtime_s=120.0)
    assert outages_at_rate(12.0, time_scale=60.0, seed=7, count=0) == []
    # Capacity comes back at once by default.
    assert all(o.back_s == o.at_s for o in outages_at_rate(3.0, time_scale=1.0, seed=1, count=5))


@pytest.mark.parametrize(("rate", "time_scale"), [(6.0, 10.0), (1.0, 120.0), (30.0, 1.0)])
def test_outages_at_rate_have_the_mean_spacing_of_the_rate(rate: float, time_scale: float) -> None:
    count = 20_000
    expected = 3600.0 / rate / time_scale
    for seed in range(3):
        outages = outages_at_rate(rate, time_scale=time_scale, seed=seed, count=count)
        # The standard error of the mean spacing is expected / sqrt(count) (0.7 %); 10 % is 14 of them.
        assert outages[-1].at_s / count == pytest.approx(expected, rel=0.1)
    with_downtime = outages_at_rate(rate, time_scale=time_scale, seed=0, count=count, downtime_s=600.0)
    assert with_downtime[-1].at_s / count == pytest.approx(expected + 600.0 / time_scale, rel=0.1)


@pytest.mark.parametrize(
    ("rate", "time_scale", "match"),
    [
        (0.0, 1.0, "rate must be > 0"),
        (-2.0, 1.0, "rate must be > 0"),
        (math.inf, 1.0, "rate must be > 0"),
        (math.nan, 1.0, "rate must be > 0"),
        (1.0, 0.0, "time scale must be > 0"),
        (1.0, -3.0, "time scale must be > 0"),
        (1.0, math.inf, "time scale must be > 0"),
        (1.0, math.nan, "time scale must be > 0"),
    ],
)
def test_outages_at_rate_reject_bad_values(rate: float, time_scale: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        outages_at_rate(rate, time_scale=time_scale, seed=0, count=3)


# -- the market, with fake attempts and a fake clock -----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def set(self, drill_s: float) -> None:
        """Move to ``drill_s`` drill seconds after the market opened (it opens at 1000)."""
        self.t = 1000.0 + drill_s


class MarketWatch:
    """Hands the test the drill's market as the drill starts."""

    def __init__(self) -> None:
        self.market: Market | NodeMarket | None = None

    def reference_started(self, folder: Path) -> None:
        pass

    def reference_finished(self, folder: Path, seconds: float, reused: bool) -> None:
        pass

    def drill_started(self, run: Path, market: Market | NodeMarket) -> None:
        self.market = market

    def drill_finished(self, code: int) -> None:
        pass


class Drill:
    """A drill whose market runs on a fake clock that a driver (on a thread) moves; the drill itself runs on the
    main thread (the supervisor installs signal handlers)."""

    def __init__(self, config: DrillConfig) -> None:
        self.config = config
        self.clock = FakeClock()
        self.watch = MarketWatch()
        self.lines: list[str] = []

    @property
    def market(self) -> Market | NodeMarket:
        wait_for(lambda: self.watch.market is not None, "the drill to start", timeout=120)
        assert self.watch.market is not None
        return self.watch.market

    def wait_events(self, count: int) -> None:
        wait_for(lambda: len(self.market.interruptions) == count, f"{count} outages", timeout=60)

    def run(self, driver: Callable[[Drill], None]) -> DrillReport:
        failure: list[BaseException] = []

        def drive() -> None:
            try:
                driver(self)
            except BaseException as err:  # noqa: BLE001 - raised again on the test's thread
                failure.append(err)
                self.clock.set(1e9)  # let the schedule play out, so that the job ends

        thread = threading.Thread(target=drive, daemon=True)
        thread.start()
        try:
            report = run_drill(self.config, log=self.lines.append, watch=self.watch, clock=self.clock)
        finally:
            thread.join(timeout=60)
        if failure:
            raise failure[0]
        return report


def launched(store: Path, after: int) -> bool:
    """The supervisor has started a process for an attempt numbered above ``after``."""
    return any(a.number > after and a.pid is not None for _, attempts in read_store(store) for a in attempts)


class FakeHandle:
    """An attempt as the market sees it: exits on the signals in ``exits_on`` (or when told)."""

    def __init__(self, *, exits_on: Sequence[int] = (signal.SIGTERM, signal.SIGKILL)) -> None:
        self.pid: int | None = None
        self.machine: str | None = "fake-machine"
        self.code: int | None = None
        self.exits_on = tuple(exits_on)
        self.signals: list[tuple[int, bool]] = []

    def poll(self) -> int | None:
        return self.code

    def signal(self, sig: int, *, group: bool = False) -> None:
        self.signals.append((sig, group))
        if sig in self.exits_on and self.code is None:
            self.code = 75 if sig == signal.SIGTERM else -sig

    def reap_group(self) -> None:
        pass

    def no_capacity(self, code: int) -> bool:
        return False


class Sink:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    def emit(self, event: ev.Event) -> None:
        self.events.append(event)

    @property
    def interruptions(self) -> list[ev.MarketInterruption]:
        return [e for e in self.events if isinstance(e, ev.MarketInterruption)]


def open_market(outages: list[Outage], mode: str, window_s: float, **kwargs: Any) -> tuple[Market, FakeClock, Sink]:
    clock, sink = FakeClock(), Sink()
    market = Market(outages, mode=mode, window_s=window_s, clock=clock, events=sink, **kwargs)
    return market, clock, sink


TERM, KILL = signal.SIGTERM, signal.SIGKILL


def test_sigterm_mode_sends_sigterm_and_capacity_returns_at_back_s() -> None:
    lines: list[str] = []
    market, clock, sink = open_market([Outage(1.0, 3.0)], "sigterm", 5.0, log=lines.append)
    assert market.env() == {"SPOTSAFE_NOTICES": "signals"}
    handle = FakeHandle()
    with market:
        market.attach(handle, 4)
        assert market.capacity()
        clock.set(0.99)
        time.sleep(0.2)
        assert handle.signals == [] and market.capacity() and market.interruptions == []
        clock.set(1.0)
        wait_for(lambda: len(sink.events) == 1, "the interruption's event")
        assert handle.signals == [(TERM, False)]  # the job saved and exited in time: no SIGKILL
        assert market.interruptions == [Interruption(1, 1.0, 4, killed=False)]
        assert market.delivered == 1
        assert not market.capacity()
        clock.set(2.99)
        assert not market.capacity()
        clock.set(3.0)
        assert market.capacity()
    (event,) = sink.interruptions
    assert (event.number, event.mode, event.interrupted, event.window_s, event.killed) == (1, "sigterm", 4, 5.0, False)
    assert event.capacity_back_in_s == pytest.approx(2.0)
    assert any("interruption 1" in line and "attempt 4" in line for line in lines)


def test_sigterm_mode_kills_the_group_when_the_job_outlives_the_window() -> None:
    market, clock, sink = open_market([Outage(1.0, 1.0)], "sigterm", 2.0)
    handle = FakeHandle(exits_on=(KILL,))  # ignores SIGTERM
    with market:
        market.attach(handle, 1)
        clock.set(1.0)
        wait_for(lambda: handle.signals == [(TERM, False)], "SIGTERM")
        # The outage is over (back_s == at_s) but the machine is still being taken: no capacity yet.
        assert not market.capacity()
        clock.set(2.9)
        time.sleep(0.2)
        assert handle.signals == [(TERM, False)]
        assert not market.capacity()
        clock.set(3.0)
        wait_for(lambda: len(sink.events) == 1, "the interruption's event")
        assert handle.signals == [(TERM, False), (KILL, True)]
        assert market.interruptions == [Interruption(1, 1.0, 1, killed=True)]
        assert market.capacity()
    assert sink.interruptions[0].killed


def test_kill_mode_kills_at_once_without_waiting_for_the_window() -> None:
    """``kill`` is the machine taken with no warning: SIGKILL at the outage's instant. The market's clock never
    moves past the outage here, so a market that waited for the window would never send it."""
    lines: list[str] = []
    market, clock, sink = open_market([Outage(1.0, 1.5)], "kill", 30.0, log=lines.append)
    assert market.env() == {"SPOTSAFE_NOTICES": "signals"}
    handle = FakeHandle()
    with market:
        market.attach(handle, 2)
        clock.set(1.0)
        wait_for(lambda: len(sink.events) == 1, "the interruption's event")
        assert handle.signals == [(KILL, True)]  # no SIGTERM, no notice: SIGKILL to the whole group
        assert market.interruptions == [Interruption(1, 1.0, 2, killed=True)]
        assert market.delivered == 1
        assert not market.capacity()  # the outage lasts to 1.5
        clock.set(1.5)
        assert market.capacity()
    (event,) = sink.interruptions
    assert (event.mode, event.interrupted, event.killed, event.window_s) == ("kill", 2, True, 0.0)
    assert event.capacity_back_in_s == pytest.approx(0.5)
    assert any("interruption 1 (kill) of attempt 2: SIGKILL, no warning" in line for line in lines), lines


def test_outages_inside_an_interruptions_window_only_take_capacity() -> None:
    """Outages that come while an attempt is already being stopped interrupt nothing: one attempt, one count."""
    outages = [Outage(1.0, 1.0), Outage(1.5, 1.5), Outage(2.0, 4.0), Outage(5.0, 5.0)]
    market, clock, sink = open_market(outages, "sigterm", 2.0)
    first, second = FakeHandle(exits_on=(KILL,)), FakeHandle()  # the first ignores SIGTERM
    with market:
        market.attach(first, 1)
        clock.set(1.0)
        wait_for(lambda: first.signals == [(TERM, False)], "SIGTERM")
        clock.set(1.5)
        clock.set(2.0)  # two more outages inside the window (1 to 3)
        time.sleep(0.2)
        assert len(market.interruptions) == 1 and sink.events == []
        assert not market.capacity()
        clock.set(3.0)  # the window ends
        wait_for(lambda: len(sink.events) == 3, "the interruption and the two outages inside its window")
        assert first.signals == [(TERM, False), (KILL, True)]
        assert market.interruptions == [
            Interruption(1, 1.0, 1, killed=True),
            Interruption(2, 1.5, None),
            Interruption(3, 2.0, None),
        ]
        assert not market.capacity()  # the third outage lasts to 4
        clock.set(4.0)
        assert market.capacity()
        market.attach(second, 2)
        clock.set(5.0)
        wait_for(lambda: len(sink.events) == 4, "the next outage")
        assert second.signals == [(TERM, False)]
    assert [i.attempt for i in market.interruptions] == [1, None, None, 2]
    assert market.delivered == 2  # = the attempts stopped
    assert [(e.number, e.interrupted, e.killed) for e in sink.interruptions] == [
        (1, 1, True),
        (2, None, False),
        (3, None, False),
        (4, 2, False),
    ]


def test_an_attempt_is_never_interrupted_twice() -> None:
    """A process that outlives its SIGKILL (still reaped, say) is the same attempt: a later outage only takes
    capacity, and is not counted again."""
    market, clock, sink = open_market([Outage(1.0, 1.0), Outage(2.0, 2.0)], "kill", 5.0, kill_wait_s=0.05)
    stuck = FakeHandle(exits_on=())
    with market:
        market.attach(stuck, 1)
        clock.set(1.0)
        wait_for(lambda: len(sink.events) == 1, "the first outage")
        clock.set(2.0)
        wait_for(lambda: len(sink.events) == 2, "the second outage")
    assert stuck.signals == [(KILL, True)]
    assert [i.attempt for i in market.interruptions] == [1, None]
    assert market.delivered == 1
    assert [e.interrupted for e in sink.interruptions] == [1, None]


def test_an_attempt_that_finishes_its_work_on_the_notice_was_not_interrupted() -> None:
    lines: list[str] = []
    market, clock, sink = open_market([Outage(1.0, 1.0)], "sigterm", 5.0, log=lines.append)
    handle = FakeHandle(exits_on=())
    with market:
        market.attach(handle, 3)
        clock.set(1.0)
        wait_for(lambda: handle.signals == [(TERM, False)], "SIGTERM")
        handle.code = 0  # it was writing its final checkpoint: it commits it and exits 0
        wait_for(lambda: len(sink.events) == 1, "the interruption's end")
    assert market.interruptions == [Interruption(1, 1.0, None)]
    assert market.delivered == 0
    assert sink.interruptions[0].interrupted is None
    assert any("attempt 3 finished its work before interruption 1 took it" in line for line in lines), lines


# Clients of the emulated endpoints, written from the providers' documentation.
HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=2.0, read=5.0))


def aws_action(env: dict[str, str]) -> dict[str, Any] | None:
    base = env["AWS_EC2_METADATA_SERVICE_ENDPOINT"]
    token = HTTP.request("PUT", f"{base}/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    assert token.status == 200
    reply = HTTP.request(
        "GET",
        f"{base}/latest/meta-data/spot/instance-action",
        headers={"X-aws-ec2-metadata-token": token.data.decode()},
    )
    if reply.status == 404:
        return None
    assert reply.status == 200
    doc: dict[str, Any] = json.loads(reply.data)
    return doc


def azure_events(env: dict[str, str]) -> list[dict[str, Any]]:
    base = env["SPOTSAFE_AZURE_METADATA_ENDPOINT"]
    reply = HTTP.request("GET", f"{base}/metadata/scheduledevents?api-version=2020-07-01", headers={"Metadata": "true"})
    assert reply.status == 200
    events: list[dict[str, Any]] = json.loads(reply.data)["Events"]
    return events


def gcp_preempted(env: dict[str, str]) -> str:
    host = env["GCE_METADATA_HOST"]
    reply = HTTP.request(
        "GET", f"http://{host}/computeMetadata/v1/instance/preempted", headers={"Metadata-Flavor": "Google"}
    )
    assert reply.status == 200
    return str(reply.data.decode())


def notice_posted(mode: str, env: dict[str, str]) -> bool:
    if mode == "aws":
        return aws_action(env) is not None
    if mode == "azure":
        return bool(azure_events(env))
    return gcp_preempted(env) == "TRUE"


@pytest.mark.parametrize("mode", ["aws", "azure", "gcp"])
def test_provider_modes_post_a_notice_a_client_sees_and_clear_it(mode: str) -> None:
    market, clock, sink = open_market([Outage(1.0, 2.0)], mode, 30.0)
    handle = FakeHandle()
    with market:
        env = market.env()
        assert env["SPOTSAFE_NOTICES"] == mode
        assert env["SPOTSAFE_NOTICE_POLL_SECONDS"] == "0.5"
        assert env["AWS_EC2_METADATA_SERVICE_ENDPOINT"].startswith("http://127.0.0.1:")
        assert not notice_posted(mode, env)
        # spotsafe's own watchers, configured from the environment the attempt gets.
        names = detect(env).names
        assert names == (mode,)
        board = NoticeBoard()
        sources: list[NoticeSource] = build_sources(names, env=env, handle_signals=False)
        for source in sources:
            source.start(board)
        try:
            market.attach(handle, 3)
            clock.set(1.0)
            wait_for(lambda: notice_posted(mode, env), f"the {mode} notice on the endpoint")
            if mode == "aws":
                action = aws_action(env)
                assert action is not None and action["action"] == "terminate"
                deadline = time.mktime(time.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
                assert time.time() + 25 < deadline <= time.time() + 31  # the 30 s window
            elif mode == "azure":
                (event,) = azure_events(env)
                assert event["EventType"] == "Preempt" and event["EventStatus"] == "Scheduled"
            wait_for(board.pending, "spotsafe's watcher to see the notice")
            (notice,) = [n for n in board.drain() if n.stops]
            assert notice.source == mode
            assert handle.signals == []  # a provider notice, not a signal
            assert not market.capacity()
            handle.code = 75  # the job saved and exited
            wait_for(lambda: len(sink.events) == 1, "the interruption's end")
            assert not notice_posted(mode, env)  # the next attempt runs on a new machine
            assert handle.signals == []
            assert market.interruptions == [Interruption(1, 1.0, 3, killed=False)]
        finally:
            for source in sources:
                source.stop()
    with pytest.raises(urllib3.exceptions.HTTPError):  # the endpoint closes with the market
        HTTP.request("GET", env["AWS_EC2_METADATA_SERVICE_ENDPOINT"] + "/latest/meta-data/", retries=False)


def test_provider_notice_then_sigkill_when_the_window_ends() -> None:
    market, clock, sink = open_market([Outage(1.0, 1.0)], "aws", 2.0)
    handle = FakeHandle()
    with market:
        env = market.env()
        market.attach(handle, 1)
        clock.set(1.0)
        wait_for(lambda: notice_posted("aws", env), "the notice")
        clock.set(2.5)
        time.sleep(0.2)
        assert handle.signals == [] and notice_posted("aws", env)
        clock.set(3.0)
        wait_for(lambda: len(sink.events) == 1, "the interruption's end")
        assert handle.signals == [(KILL, True)]
        assert market.interruptions[0].killed
        assert not notice_posted("aws", env)


@pytest.mark.parametrize("mode", ["aws", "sigterm"])
def test_an_outage_with_no_attempt_running_only_takes_capacity(mode: str) -> None:
    market, clock, sink = open_market([Outage(1.0, 2.0), Outage(3.0, 4.0)], mode, 1.0)
    finished = FakeHandle()
    finished.code = 0
    with market:
        env = market.env()
        clock.set(1.0)  # nothing attached yet
        wait_for(lambda: len(sink.events) == 1, "the first outage")
        assert market.interruptions == [Interruption(1, 1.0, None)]
        assert not market.capacity()
        if mode == "aws":
            assert not notice_posted(mode, env)
        clock.set(2.0)
        assert market.capacity()
        market.attach(finished, 5)  # attached, but it has already exited
        clock.set(3.0)
        wait_for(lambda: len(sink.events) == 2, "the second outage")
        assert market.interruptions[1] == Interruption(2, 3.0, None)
        assert finished.signals == []
        assert not market.capacity()
        clock.set(4.0)
        assert market.capacity()
    assert market.delivered == 0
    assert [e.interrupted for e in sink.interruptions] == [None, None]
    assert [e.number for e in sink.interruptions] == [1, 2]
    assert [e.capacity_back_in_s for e in sink.interruptions] == pytest.approx([1.0, 1.0])


def test_max_interruptions_stops_delivering() -> None:
    market, clock, sink = open_market([Outage(t, t + 0.5) for t in (1.0, 2.0, 3.0, 4.0)], "sigterm", 1.0)
    market.max_interruptions = 2
    first, second, third = FakeHandle(), FakeHandle(), FakeHandle(exits_on=())
    with market:
        market.attach(first, 1)
        clock.set(1.0)
        wait_for(lambda: len(sink.events) == 1, "outage 1")
        clock.set(2.0)  # the first attempt has exited: an idle outage, which does not count
        wait_for(lambda: len(sink.events) == 2, "outage 2")
        market.attach(second, 2)
        clock.set(3.0)
        wait_for(lambda: len(sink.events) == 3, "outage 3")
        market.attach(third, 3)
        clock.set(4.0)
        time.sleep(0.3)
        assert third.signals == []
        assert market.capacity()  # the schedule is over
    assert [i.attempt for i in market.interruptions] == [1, None, 2]
    assert market.delivered == 2
    assert first.signals == [(TERM, False)] and second.signals == [(TERM, False)]
    assert len(sink.interruptions) == 3


def test_max_interruptions_zero_delivers_nothing() -> None:
    market, clock, sink = open_market([Outage(1.0, 2.0)], "sigterm", 1.0, max_interruptions=0)
    handle = FakeHandle()
    with market:
        market.attach(handle, 1)
        clock.set(1.5)
        time.sleep(0.3)
        assert market.capacity()
    assert handle.signals == [] and market.interruptions == [] and sink.events == []


@pytest.mark.parametrize("mode", ["AWS", "spot", "", "sigkill"])
def test_market_rejects_an_unknown_mode(mode: str) -> None:
    with pytest.raises(ConfigError) as err:
        Market([], mode=mode)
    for known in MODES:
        assert known in str(err.value)


@pytest.mark.parametrize("window_s", [0.0, -1.0, math.inf, math.nan])
def test_market_rejects_a_bad_window(window_s: float) -> None:
    with pytest.raises(ConfigError, match="notice window must be > 0"):
        Market([], mode="aws", window_s=window_s)


def test_drill_launcher_starts_real_attempts_only_while_there_is_capacity(tmp_path: Path) -> None:
    """A real attempt gets the market's environment and is interrupted by it; during an outage none starts."""
    script = "import os, sys, time; print(os.environ['SPOTSAFE_NOTICES'], os.environ['SPOTSAFE_ATTEMPT']); "
    script += "sys.stdout.flush(); time.sleep(60)"
    market, clock, _ = open_market([Outage(1.0, 2.0)], "sigterm", 10.0)
    pool = Pool(name="drill-spot", price_per_hour=1.0)
    out = tmp_path / "attempt.log"
    with market, open(out, "wb") as output:
        launcher = DrillLauncher(market, output.fileno())
        spec = LaunchSpec(
            job="drill",
            attempt=7,
            url=str(tmp_path / "run"),
            command=(sys.executable, "-c", script),
            env={"SPOTSAFE_ATTEMPT": "7"},
            pool=pool,
        )
        handle = launcher.start(spec)
        try:
            assert handle.pid is not None and handle.poll() is None
            wait_for(lambda: out.read_text() != "", "the attempt's output")
            assert out.read_text().split() == ["signals", "7"]
            clock.set(1.0)
            wait_for(lambda: handle.poll() is not None, "the attempt to end on SIGTERM")
            assert handle.poll() == -signal.SIGTERM
            wait_for(lambda: len(market.interruptions) == 1 and market.capacity() is False, "the outage")
            assert market.interruptions == [Interruption(1, 1.0, 7, killed=False)]
            none = launcher.start(spec)  # no capacity: no process
            assert none.pid is None and none.poll() is not None and none.no_capacity(none.poll() or 1)
        finally:
            handle.signal(signal.SIGKILL, group=True)
            handle.reap_group()


def test_an_attempt_launched_as_an_outage_begins_does_not_run_through_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import spotsafe.supervisor.drill_launch as drill_module

    market, clock, _ = open_market([Outage(1.0, 60.0)], "sigterm", 1.0)
    real_launch = getattr(drill_module, "launch")  # noqa: B009 - not re-exported by the module

    def launch_as_the_outage_begins(*args: Any, **kwargs: Any) -> Any:
        clock.set(1.0)  # the zone loses its capacity while the launcher is starting the process
        time.sleep(0.3)  # the market's thread wakes up now (it must wait for the attempt to be attached)
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(drill_module, "launch", launch_as_the_outage_begins)
    spec = LaunchSpec(
        job="drill",
        attempt=1,
        url=str(tmp_path / "run"),
        command=(sys.executable, "-c", "import time; time.sleep(60)"),
        env={},
        pool=Pool(name="drill-spot"),
    )
    with market, open(tmp_path / "attempt.log", "wb") as output:
        handle = DrillLauncher(market, output.fileno()).start(spec)
        try:
            # Either no process starts (no capacity) or the market interrupts it: none runs through the outage.
            wait_for(lambda: handle.poll() is not None, "the attempt to be refused or interrupted", timeout=5)
        finally:
            if handle.poll() is None:
                handle.signal(signal.SIGKILL, group=True)
            handle.reap_group()


# -- DrillConfig -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trace": "aws-us-west-2c", "rate_per_hour": 2.0}, "not both or neither"),
        ({"trace": None, "rate_per_hour": None}, "not both or neither"),
        ({"spot_price": -0.1}, "spot_price must be a number >= 0"),
        ({"on_demand_price": -3.0}, "on_demand_price must be a number >= 0"),
        ({"on_demand_price": math.inf}, "on_demand_price"),
        ({"spot_price": math.nan}, "spot_price"),
        ({"max_interruptions": -1}, "max_interruptions must be >= 0"),
        ({"command": ()}, "needs the job's command"),
    ],
)
def test_drill_config_validation(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"command": ("python", "job.py"), "workdir": Path("unused")}
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        DrillConfig(**args)


def test_drill_config_schedules(tmp_path: Path) -> None:
    rate = DrillConfig(
        command=("job",), workdir=tmp_path, trace=None, rate_per_hour=4.0, time_scale=60, max_interruptions=6, seed=3
    )
    outages, what = rate.schedule()
    assert outages == outages_at_rate(4.0, time_scale=60, seed=3, count=6)
    assert "4 interruptions per hour" in what and "seed 3" in what
    assert rate.reference_dir == tmp_path / "reference"
    path = write_trace(tmp_path / "zone.json", SYNTHETIC)
    replay = DrillConfig(
        command=("job",),
        workdir=tmp_path,
        reference=tmp_path / "elsewhere",
        trace=str(path),
        trace_start_s=60,
        trace_reading="preempted",
        time_scale=60,
    )
    outages, what = replay.schedule()
    assert outages == outages_from_trace(load_trace(str(path), "preempted"), start_s=60, time_scale=60)
    assert "trace zone" in what and "'preempted'" in what and CITATION in what
    assert replay.reference_dir == tmp_path / "elsewhere"
    with pytest.raises(ConfigError, match="outside trace"):
        DrillConfig(command=("job",), workdir=tmp_path, trace=str(path), trace_start_s=3600.0).schedule()
    with pytest.raises(ConfigError, match="time scale"):
        DrillConfig(command=("job",), workdir=tmp_path, trace=str(path), trace_start_s=0, time_scale=0).schedule()


def test_a_failed_reference_run_is_a_config_error(tmp_path: Path) -> None:
    folder = tmp_path / "reference"
    with pytest.raises(ConfigError, match=r"the reference run failed \(exit 3\)"):
        ensure_reference((sys.executable, "-c", "raise SystemExit(3)"), folder, lambda line: None)
    assert not (folder / REFERENCE_MARKER).exists()


def test_a_reference_run_that_leaves_no_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        ensure_reference((sys.executable, "-c", "pass"), tmp_path / "reference", lambda line: None)


def test_a_bad_mode_is_reported_before_the_reference_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    job = f"import os; os.makedirs(os.environ['SPOTSAFE_CHECKPOINT_URL']); open({str(marker)!r}, 'w').close()"
    command = (sys.executable, "-c", job)
    with pytest.raises(ConfigError, match="interruption mode"):
        run_drill(
            DrillConfig(command=command, workdir=tmp_path / "w", trace=None, rate_per_hour=1.0, mode="AWS"),
            log=lambda line: None,
        )
    assert not marker.exists(), "the reference job ran before the configuration was checked"


# -- end to end: real jobs under the drill ---------------------------------------------------------------------------

TINY = (
    sys.executable,
    str(EXAMPLE),
    "--steps",
    "600",
    "--samples",
    "512",
    "--save-every",
    "40",
    "--progress-interval",
    "0",
    "--log-every",
    "1000",
)
TINY_STEPS = 600


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The example job's reference run, shared by the drills of it (which must reuse it)."""
    folder = tmp_path_factory.mktemp("drill-shared") / "reference"
    seconds, reused = ensure_reference(TINY, folder, lambda line: None)
    assert not reused and seconds > 0
    return folder, seconds


HELD = (sys.executable, str(TINY_JOB), "60", "--hold-fresh", "20")
"""A job that, started from scratch under a drill, holds after step 20 until the market stops it: however fast
the machine, the market's outage finds it running."""
HELD_STEPS = 60


@pytest.fixture(scope="module")
def held_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """:data:`HELD`'s reference run (which does not hold: nothing would stop it)."""
    folder = tmp_path_factory.mktemp("drill-held") / "reference"
    seconds, reused = ensure_reference(HELD, folder, lambda line: None)
    assert not reused and seconds > 0
    return folder, seconds


def saved_in(run: Path, attempt: int) -> bool:
    """The job's attempt ``attempt`` has committed a checkpoint (it is past its start, training)."""
    return any(isinstance(e.event, ev.SaveCommitted) and e.attempt == attempt for e in events_of(run))


def ended(store: Path, attempt: int) -> bool:
    return any(a.number == attempt and a.ended is not None for _, attempts in read_store(store) for a in attempts)


def events_of(run: Path) -> list[LoggedEvent]:
    return list(read_events(run / EVENTS_FILE))


def check_report_against_records(report: DrillReport, workdir: Path, config: DrillConfig) -> list[AttemptRecord]:
    """What the report says agrees with the job store and the event log it was computed from."""
    with JobStore(workdir / "jobs.sqlite") as store:
        attempts = store.attempts(JOB_NAME)
        assert store.job(JOB_NAME).state == JobState.SUCCEEDED
    assert report.job_state == JobState.SUCCEEDED
    assert report.attempts == len(attempts)
    assert [a.number for a in attempts] == list(range(1, len(attempts) + 1))
    assert all(a.pool == "drill-spot" and a.ended is not None for a in attempts)
    assert attempts[-1].exit_class == "succeeded" and attempts[-1].step_after == TINY_STEPS
    classes: dict[str, int] = {}
    for a in attempts:
        assert a.exit_class is not None
        classes[a.exit_class] = classes.get(a.exit_class, 0) + 1
    assert report.exit_classes == classes
    assert report.no_capacity_attempts == classes.get("no_capacity", 0)
    # Cost: machine time at the spot price; no machine, no cost.
    held = 0.0
    for a in attempts:
        assert a.cost is not None and a.ended is not None
        if a.exit_class == "no_capacity":
            assert a.cost == 0.0 and a.pid is None
        else:
            held += a.ended - a.started
            assert a.cost == pytest.approx(config.spot_price * (a.ended - a.started) / 3600, rel=0.02, abs=1e-6)
    assert report.machine_seconds == pytest.approx(held)
    assert report.spot_cost == pytest.approx(sum(a.cost or 0.0 for a in attempts))
    assert report.spot_cost > 0
    assert report.spot_price == config.spot_price and report.on_demand_price == config.on_demand_price
    assert report.on_demand_cost == pytest.approx(config.on_demand_price * report.reference_seconds / 3600)
    assert report.saving == pytest.approx(1 - report.spot_cost / report.on_demand_cost)
    assert 0 < report.goodput <= 1
    # The same figure spotsafe report and the dashboard show for the drill's run.
    assert report.goodput == build_report(str(workdir / "run"), events_of(workdir / "run")).goodput
    # Where the time went: the parts cover the wall time; every attempt started a process and saved.
    b = report.breakdown
    assert b is not None and b == build_report(str(workdir / "run"), events_of(workdir / "run")).breakdown
    assert sum(seconds for _, seconds in b.parts()) == pytest.approx(b.wall) and b.useful / b.wall == report.goodput
    assert b.startup > 0 and b.stalls > 0 and b.controlled < b.wall
    assert report.to_json()["breakdown"]["start-up"] == b.startup
    # The event log.
    logged = events_of(workdir / "run")
    kinds = [e.event.type for e in logged]
    for kind in ("pool_chosen", "attempt_started", "attempt_ended", "market_interruption", "job_finished"):
        assert kind in kinds, kind
    assert kinds.count("attempt_started") == kinds.count("attempt_ended") == len(attempts)
    market = [e.event for e in logged if isinstance(e.event, ev.MarketInterruption)]
    assert len(market) == report.interruptions + report.interruptions_idle
    assert [m.number for m in market] == list(range(1, len(market) + 1))
    assert all(m.mode == config.mode and m.window_s == config.window_s for m in market)
    assert sum(m.interrupted is not None for m in market) == report.interruptions
    assert sum(m.killed for m in market) == report.killed_at_window_end
    by_number = {a.number: a for a in attempts}
    for m in market:  # an attempt the market interrupted did not succeed (unless it was finishing anyway)
        if m.interrupted is not None and m.interrupted != attempts[-1].number:
            assert by_number[m.interrupted].exit_class in ("preempted", "killed")
    saves = [e.event for e in logged if isinstance(e.event, ev.SaveCommitted)]
    assert report.checkpoints_committed == len(saves)
    assert report.emergency_saves == sum(s.reason == "notice" for s in saves)
    doc = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert doc["identical"] is report.identical and doc["ok"] is report.ok
    assert doc["goodput"] == pytest.approx(report.goodput) and doc["attempts"] == report.attempts
    return attempts


@pytest.mark.e2e
def test_drill_of_the_example_job_through_aws_notices(tmp_path: Path, tiny_reference: tuple[Path, float]) -> None:
    """Two interruptions on the market's fake clock, each moved once the job is where it should be: the first while
    attempt 1 trains (it has committed a checkpoint), the second as attempt 2 starts (the notice is on the endpoint
    before the job asks). The notice window never ends on that clock: each attempt stops on its own."""
    reference, reference_s = tiny_reference
    # One tick per drill second: outages at 1 (capacity back at 2) and 3 (back at 4).
    trace = write_trace(tmp_path / "zone-a.json", [1, 0, 1, 0] + [1] * 20)
    workdir = tmp_path / "drill"
    run, store = workdir / "run", workdir / "jobs.sqlite"
    config = DrillConfig(
        command=TINY,
        workdir=workdir,
        reference=reference,
        trace=str(trace),
        trace_start_s=0,
        time_scale=60.0,
        mode="aws",
        window_s=5.0,
        max_interruptions=3,
        spot_price=1.25,
        on_demand_price=4.0,
    )

    def driver(drill: Drill) -> None:
        wait_for(lambda: saved_in(run, 1), "attempt 1's first checkpoint", timeout=PROCESS_HANG_S)
        drill.clock.set(1.0)
        drill.wait_events(1)
        wait_for(lambda: ended(store, 1), "attempt 1 to stop", timeout=PROCESS_HANG_S)
        drill.clock.set(2.0)  # capacity is back: the supervisor relaunches
        wait_for(lambda: launched(store, after=1), "the next attempt's process", timeout=PROCESS_HANG_S)
        drill.clock.set(3.0)
        drill.wait_events(2)
        drill.clock.set(4.0)

    drill = Drill(config)
    report = drill.run(driver)
    lines = drill.lines

    assert report.ok and report.identical, (report, lines)
    assert report.exit_code == 0
    assert report.final_step_reference == report.final_step_drill == TINY_STEPS
    assert report.component_diffs and not any(report.component_diffs.values())
    assert {"model", "optimizer"} <= set(report.component_diffs)
    assert report.interruptions == 2, (report, lines)
    assert report.exit_classes.get("preempted", 0) == 2, (report, lines)
    assert report.emergency_saves >= 1  # attempt 2 may stop before its first step: nothing new to save
    assert report.reference_reused and report.reference_seconds == reference_s
    assert report.mode == "aws" and report.window_s == 5.0
    assert "trace zone-a" in report.schedule and "'available'" in report.schedule and CITATION in report.schedule
    check_report_against_records(report, workdir, config)
    logged = events_of(workdir / "run")
    notices = [e.event for e in logged if isinstance(e.event, ev.NoticeReceived)]
    assert any(n.source == "aws" for n in notices)  # the job heard of it through the metadata endpoint
    assert (workdir / "attempts.log").stat().st_size > 0
    assert any(line.startswith("reusing the reference run") for line in lines)
    assert any("market: interruption 1 (aws)" in line for line in lines)
    # The run's own report (spotsafe report, the dashboard) compares with the drill's on-demand price.
    assert build_report("drill", logged).on_demand_price == 4.0

    shown = Console(record=True, width=200)
    print_drill(report, shown)
    text = shown.export_text()
    assert "bit-identical to the uninterrupted run" in text and "NOT identical" not in text
    assert f"{report.interruptions} of running attempts (aws, 5 s window" in text


@pytest.mark.e2e
def test_cli_drill_through_azure_notices(tmp_path: Path, held_reference: tuple[Path, float]) -> None:
    reference, reference_s = held_reference
    marker = json.loads((reference / REFERENCE_MARKER).read_text(encoding="utf-8"))
    assert marker == {"command": list(HELD), "seconds": reference_s, "nodes": 1}
    # One tick per drill second: one outage, at 5 s. The job holds at step 20 until it comes, then saves at step 21.
    # If it comes first (a slow start), the notice waits on the endpoint, well inside the 20 s window, and the job
    # stops at its next step, or during its restore with nothing trained to save.
    trace = write_trace(tmp_path / "zone-b.json", [1] * 5 + [0] + [1] * 20)
    workdir = tmp_path / "drill"
    args = ["--workdir", str(workdir), "--reference", str(reference), "--trace", str(trace), "--trace-start", "0"]
    args += ["--time-scale", "60", "--notice", "azure", "--window", "20", "--max-interruptions", "3"]
    done = subprocess.run(
        [str(SPOTSAFE), "drill", *args, "--json", "--", *HELD], capture_output=True, text=True, timeout=PROCESS_HANG_S
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] is True and doc["identical"] is True
    assert doc["exit_code"] == 0 and doc["job_state"] == "succeeded"
    assert doc["reference_reused"] is True and doc["reference_seconds"] == pytest.approx(reference_s)
    assert doc["mode"] == "azure" and doc["window_s"] == 20.0
    assert doc["interruptions"] == 1, doc
    assert doc["final_step_reference"] == doc["final_step_drill"] == HELD_STEPS
    assert doc["exit_classes"].get("preempted", 0) == 1, doc
    planned = [e.event for e in events_of(workdir / "run") if isinstance(e.event, ev.EmergencyPlanned)]
    assert len(planned) == 1, planned
    if planned[0].choice == ALREADY_SAVED:  # a slow start: the notice came at step 0 or at an interval save's step
        assert planned[0].step % 5 == 0 and doc["emergency_saves"] == 0
    else:
        assert doc["emergency_saves"] == 1
    assert 0 < doc["goodput"] <= 1
    assert doc["spot_price"] == 0.918 and doc["on_demand_price"] == 3.06  # the defaults
    assert doc["on_demand_cost"] == pytest.approx(3.06 * doc["reference_seconds"] / 3600)
    assert "reusing the reference run" in done.stderr
    with JobStore(workdir / "jobs.sqlite") as store:
        attempts = store.attempts(JOB_NAME)
    assert len(attempts) == doc["attempts"]
    assert doc["spot_cost"] == pytest.approx(sum(a.cost or 0.0 for a in attempts))
    kinds = {e.event.type for e in events_of(workdir / "run")}
    assert {"market_interruption", "attempt_started", "attempt_ended", "pool_chosen"} <= kinds
    notices = [e.event for e in events_of(workdir / "run") if isinstance(e.event, ev.NoticeReceived)]
    assert any(n.source == "azure" for n in notices), notices  # a Preempt event on the emulated endpoint


BAD_STEPS = 100
BAD_JOB = f"""
import os, random, time
import numpy as np
import torch
import spotsafe

random.seed(0)
np.random.seed(0)
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
ckpt = spotsafe.Checkpointer(model=model, policy=spotsafe.every(steps=10), progress_interval=0)
ckpt.restore()
# Not resumable: the update depends on which attempt this is, which no checkpoint restores.
bump = 0.001 * int(os.environ["SPOTSAFE_ATTEMPT"])
while ckpt.step < {BAD_STEPS}:
    with torch.no_grad():
        model.weight.add_(bump)
    time.sleep(0.03)
    ckpt.step_done()
ckpt.finish()
"""


@pytest.fixture
def bad_job(tmp_path: Path) -> tuple[tuple[str, ...], Path]:
    """The job's command, and a trace with one outage 3 s into the drill (the job needs more than 3 s)."""
    script = tmp_path / "not_resumable.py"
    script.write_text(BAD_JOB, encoding="utf-8")
    trace = write_trace(tmp_path / "one-outage.json", [1, 1, 1, 0] + [1] * 30, gap_seconds=60)
    return (sys.executable, str(script)), trace


@pytest.mark.e2e
def test_a_job_that_is_not_resumable_fails_the_drill(
    tmp_path: Path, tiny_reference: tuple[Path, float], bad_job: tuple[tuple[str, ...], Path]
) -> None:
    command, trace = bad_job
    # A reference folder holding a finished run of another command (the example's) is not reused.
    reference = tmp_path / "reference"
    shutil.copytree(tiny_reference[0], reference)
    config = DrillConfig(
        command=command,
        workdir=tmp_path / "drill",
        reference=reference,
        trace=str(trace),
        trace_start_s=0,
        time_scale=60.0,
        mode="sigterm",
        window_s=5.0,
        max_interruptions=1,
    )
    lines: list[str] = []
    report = run_drill(config, log=lines.append)
    assert not report.reference_reused
    assert any(line.startswith("reference run (uninterrupted)") for line in lines)
    assert json.loads((reference / REFERENCE_MARKER).read_text(encoding="utf-8"))["command"] == list(command)
    assert report.interruptions == 1
    assert report.exit_code == 0 and report.job_state == JobState.SUCCEEDED  # the job itself finished
    assert report.final_step_reference == report.final_step_drill == BAD_STEPS
    # Only the model differs: everything else the checkpoint holds resumed exactly.
    assert [name for name, diffs in report.component_diffs.items() if diffs] == ["model"], report.component_diffs
    assert not report.identical and not report.ok
    doc = report.to_json()
    assert doc["identical"] is False and doc["ok"] is False
    shown = Console(record=True, width=200)
    print_drill(report, shown)
    text = shown.export_text()
    assert "NOT identical" in text and "DIFFERENT: model.weight" in text

    # Now the reference holds this command's run: it is reused without running the job again.
    seconds, reused = ensure_reference(command, reference, lines.append)
    assert reused and seconds == report.reference_seconds
    ref_step, same_step, diffs = compare_final(reference, reference)
    assert ref_step == same_step == BAD_STEPS and diffs and not any(diffs.values())


@pytest.mark.e2e
def test_cli_drill_exits_1_when_the_result_differs(tmp_path: Path, bad_job: tuple[tuple[str, ...], Path]) -> None:
    command, trace = bad_job
    workdir = tmp_path / "drill"
    (workdir / "run").mkdir(parents=True)  # a previous drill's leftovers: emptied first
    (workdir / "run" / "stale.txt").write_text("old", encoding="utf-8")
    (workdir / "jobs.sqlite").write_bytes(b"not a database")
    args = ["--workdir", str(workdir), "--trace", str(trace), "--trace-start", "0", "--time-scale", "60"]
    args += ["--notice", "sigterm", "--window", "5", "--max-interruptions", "1", "--json"]
    done = subprocess.run([str(SPOTSAFE), "drill", *args, "--", *command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    doc = json.loads(done.stdout)
    assert doc["identical"] is False and doc["ok"] is False
    assert doc["exit_code"] == 0 and doc["interruptions"] == 1
    assert doc["component_diffs"]["model"]
    assert doc["reference_reused"] is False
    marker = json.loads((workdir / "reference" / REFERENCE_MARKER).read_text(encoding="utf-8"))
    assert marker["command"] == list(command)  # the default reference folder: WORKDIR/reference
    assert not (workdir / "run" / "stale.txt").exists()
    with JobStore(workdir / "jobs.sqlite") as store:
        assert len(store.attempts(JOB_NAME)) == doc["attempts"]


def test_compare_final_against_an_empty_run(tmp_path: Path, tiny_reference: tuple[Path, float]) -> None:
    reference = tiny_reference[0]
    step, same, diffs = compare_final(reference, reference)
    assert step == same == TINY_STEPS and diffs and not any(diffs.values())
    (tmp_path / "empty").mkdir()
    assert compare_final(reference, tmp_path / "empty") == (TINY_STEPS, None, {})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trace", "aws-mars-1a"], "aws-us-west-2c"),
        (["--trace", "aws-us-west-2c", "--rate", "3"], "not both or neither"),
        (["--trace", "aws-us-west-2c", "--trace-start", "1000"], "outside trace"),
    ],
)
def test_cli_drill_configuration_errors_exit_2_before_running_anything(
    tmp_path: Path, args: list[str], message: str
) -> None:
    marker = tmp_path / "ran"
    job = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    done = subprocess.run(
        [str(SPOTSAFE), "drill", "--workdir", str(tmp_path / "w"), *args, "--", *job],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in " ".join(done.stderr.split())
    assert not marker.exists()
