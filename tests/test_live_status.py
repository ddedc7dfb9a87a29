"""The live status of ``spotsafe run`` / ``spotsafe drill``: the event -> phase state machine, following a log,
the job's output above the status, and the real commands with ``--progress`` / ``--no-progress``."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from rich.console import Console

from spotsafe.cli.live import (
    DrillLive,
    EventFollower,
    FileSource,
    LineSplitter,
    LiveState,
    LiveStatus,
    Phase,
    RankZeroSource,
    StorageSource,
    bar_console,
    market_outlook,
    wants_progress,
)
from spotsafe.storage.local import LocalStorage
from spotsafe.supervisor.market import Interruption, Market, Outage
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, LoggedEvent, RunIdentity
from spotsafe.telemetry.store import EventUploader

from .conftest import TINY_JOB, wait_until

SPOTSAFE = Path(sys.executable).with_name("spotsafe")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# -- the state machine ----------------------------------------------------------------------------------------------


class Feed:
    """Feeds events to a LiveState the way they appear in a run's log (supervisor lines are attempt 0)."""

    def __init__(self, state: LiveState) -> None:
        self.state = state
        self.t = 1000.0
        self.attempt = 0

    def __call__(self, cls: type[ev.Event], *, attempt: int | None = None, **fields: object) -> bool:
        self.t += 1.0
        if cls is ev.AttemptStarted:
            self.attempt = int(str(fields["number"]))
        if cls.type in ev.SUPERVISOR_TYPES:
            if "job" in {f.name for f in dataclasses.fields(cls)}:
                fields.setdefault("job", "train")
            who = 0
        else:
            who = self.attempt if attempt is None else attempt
        event = cls(time=self.t, **fields)
        return self.state.apply(LoggedEvent(event=event, run_id="train", attempt=who, pid=100 + who))


def attempt_started(feed: Feed, number: int, step_before: int | None, pool: str = "spot-a") -> None:
    feed(ev.PoolChosen, pool=pool, market="spot", price_per_hour=1.0, reason="cheapest")
    feed(
        ev.AttemptStarted, number=number, pool=pool, market="spot", price_per_hour=1.0, step_before=step_before, nodes=1
    )


def attempt_ended(feed: Feed, number: int, exit_class: str, code: int | None, after: int | None) -> None:
    feed(
        ev.AttemptEnded,
        number=number,
        pool="spot-a",
        machine="m1",
        exit_code=code,
        exit_class=exit_class,
        step_before=None,
        step_after=after,
        duration_s=5.0,
        cost=0.01,
    )


def test_a_preempted_then_resumed_job_goes_through_every_phase() -> None:
    state = LiveState(total=40, text="starting the supervisor")
    feed = Feed(state)
    assert (state.phase, state.text, state.step, state.interruptions) == (
        Phase.STARTING,
        "starting the supervisor",
        None,
        0,
    )

    attempt_started(feed, 1, None)
    assert state.phase is Phase.STARTING and state.text == "starting attempt 1 on spot-a"
    assert feed(ev.RunStarted, url="runs/x", host="m1")
    assert state.phase is Phase.RESTORING and state.text == "restoring the newest checkpoint"
    feed(ev.RestoreFresh, skipped=0)
    assert state.phase is Phase.RESTORED and state.text == "no checkpoint to restore: starting from step 0"
    assert state.step == 0
    assert feed(ev.Progress, step=1, epoch=0)
    assert (state.phase, state.text, state.step) == (Phase.TRAINING, "training", 1)
    assert not feed(ev.Progress, step=2, epoch=0)  # the step moved; the phase did not
    assert state.step == 2
    feed(ev.SaveStarted, step=5, reason="interval")
    assert (state.phase, state.text, state.step) == (Phase.SAVING, "saving step 5", 5)
    feed(ev.SaveStaged, step=5, checkpoint="c5", reason="interval", bytes=10, stall_s=0.0)
    assert state.text == "writing checkpoint step 5"
    feed(
        ev.SaveCommitted,
        step=5,
        checkpoint="c5",
        reason="interval",
        bytes=10,
        blobs=2,
        stall_s=0.0,
        duration_s=0.1,
    )
    assert (state.phase, state.text, state.checkpoint_step) == (Phase.TRAINING, "training (saved step 5)", 5)
    feed(ev.Progress, step=9, epoch=0)

    # A stop notice: the emergency save, the exit.
    feed(ev.NoticeReceived, source="aws", count=1, step=9, deadline=feed.t + 1 + 30.0, detail="terminate")
    assert state.phase is Phase.STOPPING
    assert state.text == "stopping on a notice from aws at step 9, 30 s to go"
    feed(
        ev.EmergencyPlanned,
        step=9,
        source="aws",
        deadline=None,
        time_left_s=28.0,
        choice="incremental",
        estimate_s=0.5,
        options={"incremental": 0.5, "full": 1.0},
        reason="fits",
    )
    assert state.text == "stopping on a notice from aws: incremental emergency save (~0.5 s of 28.0 s left)"
    feed(ev.SaveStarted, step=9, reason="notice")
    assert (state.phase, state.text) == (Phase.STOPPING, "stopping on a notice from aws: saving step 9")
    feed(ev.Progress, step=9, epoch=0)  # a late progress line does not end the stop
    assert state.phase is Phase.STOPPING
    feed(ev.SaveCommitted, step=9, checkpoint="c9", reason="notice", bytes=10, blobs=2, stall_s=0.1, duration_s=0.2)
    assert state.text == "stopping on a notice from aws: checkpoint step 9 committed"
    feed(
        ev.EmergencyFinished,
        step=9,
        choice="incremental",
        committed=True,
        deadline=None,
        before_deadline=True,
        margin_s=None,
        duration_s=0.2,
    )
    assert state.text == "stopping on a notice from aws: emergency checkpoint step 9 committed"
    feed(ev.RunExited, reason="preempted", step=9, exit_code=75)
    assert (state.phase, state.text) == (Phase.EXITING, "stopped on a notice from aws at step 9")
    assert state.interruptions == 0  # counted when the attempt ends

    # The supervisor: the attempt ends, a backoff, the relaunch.
    attempt_ended(feed, 1, "preempted", 75, 9)
    assert state.phase is Phase.ENDED
    assert state.text == "attempt 1 ended: preempted (exit 75, checkpoint step 9)"
    assert state.interruptions == 1
    feed(ev.RetryDecided, relaunch=True, delay_s=1.5, reason="preempted: relaunching")
    assert (state.phase, state.text) == (Phase.WAITING, "waiting 1.5 s before relaunching (attempt 1 preempted)")
    attempt_started(feed, 2, 9)
    assert (state.phase, state.text, state.step) == (Phase.STARTING, "starting attempt 2 on spot-a", 9)
    feed(ev.RunStarted, url="runs/x", host="m2")
    feed(ev.CheckpointSkipped, checkpoint="c9", step=9, reason="blob model.bin fails its checksum")
    assert state.phase is Phase.RESTORING
    assert state.text == "restoring: skipped step 9 (blob model.bin fails its checksum); trying an older one"
    feed(
        ev.RestoreCompleted,
        step=5,
        epoch=0,
        checkpoint="c5",
        bytes=10,
        duration_s=0.1,
        last_known_step=9,
        replayed_steps=4,
    )
    assert (state.phase, state.text, state.step) == (Phase.RESTORED, "restored step 5 from c5; 4 steps to replay", 5)
    feed(ev.Progress, step=6, epoch=0, attempt=1)  # a late line of the first attempt: not what runs now
    assert state.step == 5 and state.phase is Phase.RESTORED
    feed(ev.Progress, step=40, epoch=0)
    feed(ev.SaveStarted, step=40, reason="final")
    assert state.text == "saving the final checkpoint (step 40)"
    feed(ev.SaveCommitted, step=40, checkpoint="c40", reason="final", bytes=10, blobs=2, stall_s=0.1, duration_s=0.1)
    assert state.text == "saved the final checkpoint (step 40)"
    feed(ev.RunExited, reason="finished", step=40, exit_code=0)
    assert state.text == "training finished at step 40"
    attempt_ended(feed, 2, "succeeded", 0, 40)
    assert state.text == "attempt 2 succeeded"
    feed(ev.RetryDecided, relaunch=False, delay_s=0.0, reason="the job succeeded")
    assert state.text == "not relaunching: the job succeeded" and not state.done
    feed(ev.JobFinished, state="succeeded", reason="the job succeeded")
    assert (state.phase, state.text, state.done, state.ok) == (Phase.FINISHED, "finished", True, True)
    assert (state.step, state.total, state.interruptions, state.attempt) == (40, 40, 1, 2)


def test_waiting_for_capacity_stays_one_phase_while_attempts_find_none() -> None:
    state = LiveState()
    feed = Feed(state)
    feed(ev.NoPoolAvailable, wait_s=30.0, reason="every pool is cooling down")
    assert state.phase is Phase.CAPACITY
    assert state.text == "waiting for capacity: every pool is cooling down; next try in 30 s"
    attempt_started(feed, 1, None)
    assert state.phase is Phase.STARTING  # a wait for a pool, not a failed try: this one may well start
    attempt_ended(feed, 1, "no_capacity", 1, None)
    assert (state.phase, state.text) == (Phase.CAPACITY, "waiting for capacity in spot-a: it has none")
    feed(ev.RetryDecided, relaunch=True, delay_s=0.5, reason="no capacity")
    assert (state.phase, state.text) == (Phase.CAPACITY, "waiting for capacity in spot-a: next try in 0.5 s")
    attempt_started(feed, 2, None)
    assert (state.phase, state.text) == (Phase.CAPACITY, "waiting for capacity in spot-a: trying attempt 2")
    feed(ev.RunStarted, url="runs/x", host="m1")  # this one got a machine
    assert state.phase is Phase.RESTORING
    assert state.interruptions == 0  # finding no capacity is not an interruption


def test_interruptions_count_preempted_and_killed_attempts_not_errors() -> None:
    state = LiveState()
    feed = Feed(state)
    for number, exit_class, code in (
        (1, "preempted", 75),
        (2, "crashed", 1),
        (3, "killed", -9),
        (4, "out_of_memory", -9),
    ):
        attempt_started(feed, number, None)
        attempt_ended(feed, number, exit_class, code, None)
        feed(ev.RetryDecided, relaunch=True, delay_s=2.0, reason=exit_class)
    assert state.interruptions == 2
    assert state.text == "waiting 2.0 s before relaunching (attempt 4 out_of_memory)"
    feed(ev.RetryDecided, relaunch=True, delay_s=0.0, reason="progressed")
    assert (state.phase, state.text) == (Phase.WAITING, "relaunching (attempt 4 out_of_memory)")


def test_a_drill_counts_the_interruptions_its_market_delivered() -> None:
    state = LiveState(total=100)
    feed = Feed(state)
    attempt_started(feed, 1, None)

    def market(number: int, interrupted: int | None) -> None:
        feed(
            ev.MarketInterruption,
            number=number,
            mode="aws",
            interrupted=interrupted,
            window_s=10.0,
            capacity_back_in_s=3.0,
            killed=False,
        )

    market(1, 1)
    assert state.interruptions == 1
    attempt_ended(feed, 1, "preempted", 75, 10)
    assert state.interruptions == 1  # the same interruption, not a second one
    market(2, None)  # capacity taken while no attempt ran: nothing was interrupted
    assert state.interruptions == 1
    attempt_started(feed, 2, 10)
    market(3, 2)
    attempt_ended(feed, 2, "killed", -9, 10)
    assert state.interruptions == 2


def test_a_warning_notice_keeps_training_and_overlapped_saves_are_background_work() -> None:
    state = LiveState()
    feed = Feed(state)
    feed(ev.RunStarted, url="runs/x")  # no supervisor (a reference run): every attempt's events count
    feed(ev.Progress, step=3, epoch=0, attempt=1)
    feed(ev.NoticeReceived, source="gcp", count=1, step=3, deadline=None, kind="warning", attempt=1)
    assert (state.phase, state.text) == (Phase.TRAINING, "training (early checkpoint: a warning from gcp)")
    feed(ev.SaveStarted, step=4, reason="notice", attempt=1)
    assert state.text == "saving step 4 (notice)"
    feed(ev.SaveStaged, step=4, checkpoint="c4", reason="notice", bytes=1, stall_s=0.0, overlapped=True, attempt=1)
    assert (state.phase, state.text) == (Phase.TRAINING, "training (writing checkpoint step 4 in the background)")
    feed(ev.Progress, step=5, epoch=0, attempt=1)
    assert state.text == "training (writing checkpoint step 4 in the background)"
    feed(ev.SaveCommitted, step=4, checkpoint="c4", reason="notice", bytes=1, blobs=1, stall_s=0.0, duration_s=1.0)
    feed(ev.Progress, step=6, epoch=0, attempt=1)
    assert state.text == "training" and state.checkpoint_step == 4
    feed(ev.SaveStarted, step=8, reason="interval")
    feed(ev.SaveFailed, step=8, reason="interval", error="disk full")
    assert (state.phase, state.text) == (Phase.TRAINING, "training (saving step 8 failed: disk full)")


def test_an_emergency_save_that_does_not_fit_or_commit() -> None:
    state = LiveState()
    feed = Feed(state)
    attempt_started(feed, 1, 20)
    feed(ev.RunStarted, url="runs/x")
    feed(ev.StageRecovered, checkpoint="c24", step=24)
    assert state.text == "uploaded the staged checkpoint of step 24; restoring"
    feed(
        ev.RestoreCompleted,
        step=24,
        epoch=0,
        checkpoint="c24",
        bytes=1,
        duration_s=0.1,
        last_known_step=None,
        replayed_steps=None,
    )
    assert state.text == "restored step 24 from c24"
    feed(ev.NoticeReceived, source="SIGTERM", count=1, step=30, deadline=None)
    assert state.text == "stopping on a notice from SIGTERM at step 30"
    feed(
        ev.EmergencyPlanned,
        step=30,
        source="SIGTERM",
        deadline=None,
        time_left_s=1.0,
        choice="none",
        estimate_s=None,
        options={"full": 9.0},
        reason="nothing fits",
    )
    assert state.text == "stopping on a notice from SIGTERM: no save fits in time; resuming from step 24"
    feed(
        ev.EmergencyFinished,
        step=30,
        choice="none",
        committed=False,
        deadline=None,
        before_deadline=None,
        margin_s=None,
        duration_s=0.0,
    )
    assert state.text == "stopping on a notice from SIGTERM: emergency save did not commit"


def test_a_failed_or_stopped_job_ends_red() -> None:
    state = LiveState()
    feed = Feed(state)
    attempt_started(feed, 1, None)
    attempt_ended(feed, 1, "crashed", 1, None)
    assert state.text == "attempt 1 ended: crashed (exit 1, checkpoint step none)"
    feed(ev.RetryDecided, relaunch=False, delay_s=0.0, reason="3 errors in a row")
    assert (state.phase, state.text) == (Phase.ENDED, "not relaunching: 3 errors in a row")
    feed(ev.JobFinished, state="failed", reason="3 errors in a row")
    assert (state.phase, state.text, state.done, state.ok) == (Phase.FAILED, "failed: 3 errors in a row", True, False)


def test_unknown_total_and_an_escalation() -> None:
    state = LiveState()
    feed = Feed(state)
    feed(
        ev.Escalated, reason="the spot finish passes the deadline", deadline=1.0, spot_finish=2.0, on_demand_finish=0.5
    )
    assert state.text == "moving to on-demand capacity: the spot finish passes the deadline"
    feed(ev.PoolChosen, pool="od", market="on-demand", price_per_hour=3.0, reason="deadline")
    feed(ev.AttemptStarted, number=1, pool="od", market="on-demand", price_per_hour=3.0, step_before=None)
    assert state.text == "starting attempt 1 on od (on-demand)"
    feed(ev.Progress, step=7, epoch=0)
    assert state.total is None and state.step == 7


# -- on or off ----------------------------------------------------------------------------------------------------


def test_progress_is_shown_on_a_terminal_unless_told_otherwise() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    piped = Console(file=io.StringIO(), force_terminal=False)
    assert wants_progress(None, terminal) and not wants_progress(None, piped)
    assert wants_progress(True, piped) and not wants_progress(False, terminal)
    assert bar_console(None, terminal) is terminal and bar_console(None, piped) is None
    assert bar_console(False, terminal) is None
    forced = bar_console(True, piped)
    assert forced is not None and forced.is_terminal and forced is not piped


# -- following a log ----------------------------------------------------------------------------------------------


def log_to(path: Path, attempt: int = 1) -> EventLog:
    return EventLog(path, RunIdentity(run_id="train", attempt=attempt, pid=os.getpid()))


def test_a_file_source_starts_at_the_end_and_survives_damage_and_replacement(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    with log_to(path) as old:
        old.emit(ev.Progress(time=1.0, step=1, epoch=0))
    source = FileSource(path)
    assert source.poll() == []  # what was there before is not news
    with log_to(path) as events, open(path, "ab") as raw:
        events.emit(ev.Progress(time=2.0, step=2, epoch=0))
        raw.write(b'{"type": "progress", "garbage\n')  # a damaged line
        raw.write(b'{"type":"progress","run_id":"train","attempt":1,"pid":1,"time":3.0,"step":3,')  # half a line
        raw.flush()
        assert [e.event.step for e in source.poll()] == [2]  # type: ignore[attr-defined]
        raw.write(b'"epoch":0}\n')
        raw.flush()
        assert [e.event.step for e in source.poll()] == [3]  # type: ignore[attr-defined]
    path.unlink()
    assert source.poll() == []
    with log_to(path) as fresh:  # a new log (a drill empties its folders): read from its start
        fresh.emit(ev.Progress(time=4.0, step=4, epoch=0))
    assert [e.event.step for e in source.poll()] == [4]  # type: ignore[attr-defined]
    assert [e.event.step for e in FileSource(tmp_path / "none.jsonl", from_end=False).poll()] == []  # type: ignore[attr-defined]


def test_a_rank_zero_source_follows_rank_0s_log_once_it_appears(tmp_path: Path) -> None:
    """A job of several ranks writes its events in rank-<r>/; the status follows rank 0's (they stop together)."""
    source = RankZeroSource(tmp_path)
    assert source.poll() == []  # no rank log yet: nothing, and no error
    with log_to(tmp_path / "rank-00001" / EVENTS_FILE) as other:
        other.emit(ev.Progress(time=1.0, step=1, epoch=0))
    with log_to(tmp_path / "rank-00000" / EVENTS_FILE) as rank0:
        rank0.emit(ev.Progress(time=1.0, step=1, epoch=0))  # it appeared after the source started: read it all
        rank0.emit(ev.Progress(time=2.0, step=2, epoch=0))
    assert [e.event.step for e in source.poll()] == [1, 2]  # type: ignore[attr-defined]
    later = RankZeroSource(tmp_path)  # a log already there is an earlier run's: from its end
    with log_to(tmp_path / "rank-00000" / EVENTS_FILE) as rank0:
        rank0.emit(ev.Progress(time=3.0, step=3, epoch=0))
    assert [e.event.step for e in later.poll()] == [3]  # type: ignore[attr-defined]


def test_a_storage_source_reads_only_parts_uploaded_since_it_started(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "run")
    first = EventUploader(storage, attempt=1, pid=11)
    first.add(b'{"type":"progress","run_id":"r","attempt":1,"pid":11,"time":1.0,"step":1,"epoch":0}\n')
    first.flush()
    source = StorageSource(storage)
    assert source.poll() == []
    second = EventUploader(storage, attempt=2, pid=12)
    for step in (5, 6):
        second.add(
            f'{{"type":"progress","run_id":"r","attempt":2,"pid":12,"time":{step},"step":{step},"epoch":0}}\n'.encode()
        )
        second.flush()
    first.add(b'{"type":"progress","run_id":"r","attempt":1,"pid":11,"time":2.0,"step":2,"epoch":0}\n')
    first.flush()
    got = source.poll()
    assert [(e.attempt, e.event.step) for e in got] == [(1, 2), (2, 5), (2, 6)]  # type: ignore[attr-defined]
    assert source.poll() == []


class ListSource:
    def __init__(self, batches: Iterable[list[LoggedEvent]], *, final: bool = True, fail: bool = False) -> None:
        self.batches = list(batches)
        self.final = final
        self.fail = fail
        self.interval_s = 0.0

    def poll(self) -> list[LoggedEvent]:
        if self.fail:
            raise OSError("the log is gone")
        return self.batches.pop(0) if self.batches else []


def logged(step: int, attempt: int = 1, t: float | None = None) -> LoggedEvent:
    return LoggedEvent(ev.Progress(time=t if t is not None else float(step), step=step, epoch=0), "r", attempt, 7)


def test_the_follower_hands_each_event_on_once_and_shrugs_off_failures() -> None:
    got: list[int] = []
    ticks: list[int] = []
    both = [logged(1), logged(2)]
    follower = EventFollower(
        [ListSource([both]), ListSource([[*both, logged(3)]]), ListSource([], fail=True)],
        lambda events: got.extend(e.event.step for e in events),  # type: ignore[attr-defined]
        lambda: ticks.append(1),
    )
    follower.poll_once()
    follower.poll_once()
    assert got == [1, 2, 3] and len(ticks) == 2

    def broken(events: list[LoggedEvent]) -> None:
        raise RuntimeError("display broke")

    crashy = EventFollower([ListSource([[logged(1)], [logged(2)]])], broken)
    crashy.poll_once()
    crashy.poll_once()  # still polling


def test_the_follower_thread_takes_a_last_look_when_stopped(tmp_path: Path) -> None:
    path = tmp_path / EVENTS_FILE
    got: list[int] = []
    follower = EventFollower(
        [FileSource(path)],
        lambda events: got.extend(e.event.step for e in events),  # type: ignore[attr-defined]
        tick_s=3600.0,  # it would not look again by itself
    ).start()
    with log_to(path) as events:
        events.emit(ev.Progress(time=time.time(), step=42, epoch=0))
    follower.stop()
    assert got == [42]


# -- the job's output ---------------------------------------------------------------------------------------------


def test_line_splitter_shows_lines_as_a_terminal_would() -> None:
    split = LineSplitter()
    assert split.feed(b"epoch 1\r\nloss 0.5\nhal") == ["epoch 1", "loss 0.5"]
    assert split.pending == "hal"
    assert split.feed("f \u00e9".encode()[:-1]) == []  # half a UTF-8 character waits for the rest
    assert split.feed("\u00e9".encode()[-1:] + b"\n") == ["half \u00e9"]
    assert split.feed(b" 10%\r 50%\r100%") == []
    assert split.pending == "100%"  # a progress bar redrawing itself: its latest state
    assert split.feed(b"\r\n") == ["100%"]
    assert split.feed(b"no newline at the end") == [] and split.flush() == ["no newline at the end"]
    assert split.flush() == []
    assert split.feed(b"x" * (LineSplitter.LONGEST + 1)) == ["x" * (LineSplitter.LONGEST + 1)]


# -- the display ----------------------------------------------------------------------------------------------------


def rendered(console: Console) -> str:
    assert isinstance(console.file, io.StringIO)
    return ANSI.sub("", console.file.getvalue())


def wait_drawn(console: Console, text: str) -> None:
    """Wait until a frame with ``text`` was drawn: the state changes on the follower's thread just before it draws,
    so a test that changes what the next frame would show (the market's clock) waits for the frame itself."""
    wait_until(lambda: text in rendered(console), f"a frame showing {text!r}")


def test_a_drill_shows_the_reference_then_the_drill_with_the_markets_schedule(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=200, color_system=None)
    reference, run = tmp_path / "reference", tmp_path / "run"
    clock = [0.0]
    market = Market([Outage(5.0, 8.0), Outage(20.0, 21.0)], mode="sigterm", clock=lambda: clock[0])
    with LiveStatus(console=console, capture=False) as live:
        shown = DrillLive(live)
        shown.reference_started(reference)
        with log_to(reference / EVENTS_FILE) as events:
            events.emit(ev.RunStarted(time=time.time(), url=str(reference)))
            events.emit(ev.RestoreFresh(time=time.time(), skipped=0))
            events.emit(ev.Progress(time=time.time(), step=17, epoch=0))
        assert shown.reference is not None
        wait_drawn(console, "step 17")
        assert shown.reference.state.step == 17
        live.log("a note from the drill")
        shown.reference_finished(reference, 12.5, reused=False)
        shown.drill_started(run, market)
        assert shown.drill is not None and shown.drill.state.total is None  # the reference left no checkpoint
        with log_to(run / EVENTS_FILE, attempt=0) as events:
            events.emit(
                ev.AttemptStarted(
                    time=time.time(),
                    job="drill",
                    number=1,
                    pool="drill-spot",
                    market="spot",
                    price_per_hour=1.0,
                    step_before=None,
                )
            )
        wait_drawn(console, "starting attempt 1 on drill-spot · next interruption in 5 s")  # before the clock moves
        assert shown.drill.state.attempt == 1
        assert market_outlook(market, shown.drill.state) == "next interruption in 5 s"
        clock[0] = 6.0
        market.interruptions.append(Interruption(1, 5.0, 1))
        with log_to(run / EVENTS_FILE, attempt=0) as events:
            events.emit(
                ev.MarketInterruption(
                    time=time.time(),
                    number=1,
                    mode="sigterm",
                    interrupted=1,
                    window_s=3.0,
                    capacity_back_in_s=2.0,
                    killed=False,
                )
            )
            events.emit(ev.NoPoolAvailable(time=time.time(), job="drill", wait_s=1.0, reason="no capacity"))
        wait_drawn(console, "waiting for capacity: no capacity; next try in 1 s · capacity back in 2 s")
        assert shown.drill.state.phase is Phase.CAPACITY and shown.drill.state.interruptions == 1
        assert market_outlook(market, shown.drill.state) == "capacity back in 2 s"
        clock[0] = 9.0
        assert market_outlook(market, shown.drill.state) == "next interruption in 11 s"
        clock[0] = 22.0
        market.interruptions.append(Interruption(2, 20.0, None))
        assert market_outlook(market, shown.drill.state) == "no more interruptions due"
        with log_to(run / EVENTS_FILE, attempt=0) as events:
            events.emit(ev.JobFinished(time=time.time(), job="drill", state="succeeded", reason="done"))
        shown.drill_finished(0)
        assert shown.drill.state.done and shown.drill.state.ok
    text = rendered(console)
    for expected in (
        "starting the uninterrupted reference run",
        "restoring the newest checkpoint",
        "step 17",
        "a note from the drill",
        "uninterrupted run finished at the end in 12.5 s",
        "starting attempt 1 on drill-spot",
        "next interruption in 5 s",
        "waiting for capacity: no capacity",
        "1 interruption",
        "✓ reference",
        "✓ drill",
    ):
        assert expected in text, expected
    assert text.rstrip().splitlines()[-1].lstrip().startswith("✓ drill")  # the last frame stays


def test_capacity_comes_back_when_the_longest_of_overlapping_outages_ends() -> None:
    clock = [0.0]
    market = Market([Outage(5.0, 30.0), Outage(6.0, 7.0), Outage(40.0, 41.0)], mode="sigterm", clock=lambda: clock[0])
    waiting = LiveState(phase=Phase.CAPACITY)
    market.interruptions += [Interruption(1, 5.0, 1), Interruption(2, 6.0, None)]
    clock[0] = 10.0
    assert market_outlook(market, waiting) == "capacity back in 20 s"  # not the second outage's end, 7 s
    assert market_outlook(market, LiveState(phase=Phase.TRAINING)) == "next interruption in 30 s"
    clock[0] = 30.5
    assert market_outlook(market, waiting) == "next interruption in 10 s"


def test_a_reused_reference_is_one_finished_line_and_sets_the_drills_total(tmp_path: Path) -> None:
    from .conftest import make_job

    reference = tmp_path / "reference"
    job = make_job(reference)
    for _ in range(7):
        job.ckpt.step_done()
    job.ckpt.finish()
    console = Console(file=io.StringIO(), force_terminal=True, width=200, color_system=None)
    with LiveStatus(console=console, capture=False) as live:
        shown = DrillLive(live)
        shown.reference_finished(reference, 40.0, reused=True)
        market = Market([], mode="sigterm")
        shown.drill_started(tmp_path / "run", market)
        assert shown.drill is not None and shown.drill.state.total == 7
    text = rendered(console)
    assert "✓ reference" in text and "7/7" in text and "reused: it ran to step 7 in 40.0 s" in text
    assert "0:00:40" in text  # the reference's own time, not this command's
    assert "✗ drill" in text and "ended" in text  # a line still running when the display closed


# -- the real commands ----------------------------------------------------------------------------------------------

STEPS = 24


def spotsafe_run(
    tmp_path: Path, name: str, *flags: str, steps: int = STEPS
) -> tuple[subprocess.CompletedProcess[str], Path]:
    run = tmp_path / name
    where = ["--url", str(run), "--store", str(tmp_path / f"{name}.sqlite")]
    job = [sys.executable, str(TINY_JOB), str(steps), "--stop", "1:12", "--sleep", "0.02", "--say"]
    done = subprocess.run(
        [str(SPOTSAFE), "run", *flags, *where, "--", *job],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )
    return done, run


@pytest.fixture(scope="module")
def progress_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    return spotsafe_run(tmp_path_factory.mktemp("live"), "run", "--progress", "--total-steps", str(STEPS))


def test_spotsafe_run_progress_shows_every_phase_of_a_preempted_job(
    progress_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    done, _ = progress_run
    assert done.returncode == 0, done.stderr
    text = ANSI.sub("", done.stderr)
    for expected in (
        "starting attempt 1 on local",
        "restoring the newest checkpoint",
        "no checkpoint to restore: starting from step 0",
        "training",
        "stopping on a notice from SIGTERM",
        "relaunching (attempt 1 preempted)",  # at once: the checkpoint advanced
        "starting attempt 2 on local",
        "1 interruption",
        f"{STEPS}/{STEPS}",
    ):
        assert expected in text, expected
    assert re.search(r"restored step 1[23] from g\d+-step-0+1[23]-", text), text
    # The supervisor's and the job's own lines are whole lines above the status, not torn by it.
    lines = text.splitlines()
    for expected in ("spotsafe run: attempt 1 in local: exit 75 -> preempted", "job output on stderr, attempt 2"):
        assert any(line.startswith(expected) for line in lines), expected
    assert re.search(rf"✓ job run .*{STEPS}/{STEPS} +1 interruption .*finished", lines[-1]), lines[-1]
    assert "\x1b[?25h" in done.stderr  # the cursor is shown again
    # stdout is not the terminal: the job's stdout goes there untouched.
    assert done.stdout.splitlines() == ["job output on stdout, attempt 1", "job output on stdout, attempt 2"]


def test_spotsafe_run_no_progress_prints_no_status(tmp_path: Path) -> None:
    done, _ = spotsafe_run(tmp_path, "quiet", "--no-progress", "--total-steps", "8", steps=8)  # one attempt
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stderr
    for status in ("restoring the newest checkpoint", "no checkpoint to restore", "8/8", "interruption", "✓"):
        assert status not in done.stderr
    lines = done.stderr.splitlines()  # what it always was: the job's own lines and the supervisor's
    assert "job output on stderr, attempt 1" in lines
    assert any(line.startswith("spotsafe run: attempt 1 in local: exit 0 -> succeeded") for line in lines)
    assert all(line.startswith(("job output", "spotsafe")) for line in lines), lines
    assert done.stdout == "job output on stdout, attempt 1\n"


def test_spotsafe_inspect_progress_shows_a_bar_for_verifying_and_loading(
    progress_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    _, run = progress_run
    shown = subprocess.run(
        [str(SPOTSAFE), "inspect", str(run), "--json", "--progress"], capture_output=True, text=True, timeout=120
    )
    plain = subprocess.run([str(SPOTSAFE), "inspect", str(run), "--json"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == plain.returncode == 0, shown.stderr + plain.stderr
    assert json.loads(shown.stdout) == json.loads(plain.stdout)  # the bar goes to stderr only
    assert json.loads(shown.stdout)["step"] == STEPS
    assert "verifying and loading" in ANSI.sub("", shown.stderr)
    assert plain.stderr == ""


DRILL_JOB = """
import random, time
import numpy as np
import torch, spotsafe

random.seed(0)
np.random.seed(0)
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
ckpt = spotsafe.Checkpointer(model=model, policy=spotsafe.every(steps=10), progress_interval=0)
ckpt.restore()
while ckpt.step < 60:
    with torch.no_grad():
        model.weight.mul_(0.99)
    time.sleep(0.02)
    ckpt.step_done()
ckpt.finish()
"""


@pytest.mark.e2e
def test_spotsafe_drill_json_progress_keeps_stdout_pure_json(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(DRILL_JOB, encoding="utf-8")
    trace = tmp_path / "quiet.json"
    trace.write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": [1] * 50}), encoding="utf-8")
    args = ["--workdir", str(tmp_path / "drill"), "--trace", str(trace), "--trace-start", "0", "--notice", "sigterm"]
    done = subprocess.run(
        [str(SPOTSAFE), "drill", *args, "--json", "--progress", "--", sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["ok"] is True and doc["final_step_drill"] == 60
    text = ANSI.sub("", done.stderr)
    lines = text.splitlines()
    assert any(line.startswith("reference run (uninterrupted)") for line in lines)  # the log, as plain lines
    assert re.search(r"✓ reference .*uninterrupted run finished at step 60 in", text), text
    assert re.search(r"✓ drill .*60/60 +0 interruptions .*finished", lines[-1]), lines[-1]
    assert "no more interruptions due" in text
