"""Save policies, retention, notices (with real signals) and the event log."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from spotsafe import ConfigError, every
from spotsafe.notices.base import Notice, NoticeBoard
from spotsafe.notices.signals import SignalNotices
from spotsafe.policy.interval import AnyOf, EverySeconds, EverySteps, Never, SaveContext
from spotsafe.policy.retention import Candidate, KeepLast
from spotsafe.telemetry.events import Progress, RunWarning, SaveCommitted
from spotsafe.telemetry.log import EventLog, EventTail, RunIdentity, read_events


def ctx(steps: int, seconds: float = 0.0, step: int = 100) -> SaveContext:
    return SaveContext(step=step, steps_since_save=steps, seconds_since_save=seconds)


# -- save policies ----------------------------------------------------------------------------------------------------


def test_every_steps() -> None:
    policy = every(steps=5)
    assert isinstance(policy, EverySteps)
    assert [policy.should_save(ctx(n, seconds=1e9)) for n in (0, 1, 4, 5, 6, 50)] == [
        False,
        False,
        False,
        True,
        True,
        True,
    ]
    assert "5 steps" in policy.describe()


def test_every_minutes_and_seconds() -> None:
    policy = every(minutes=2)
    assert isinstance(policy, EverySeconds) and policy.seconds == 120.0
    assert not policy.should_save(ctx(3, seconds=119.99))
    assert policy.should_save(ctx(3, seconds=120.0))
    assert policy.should_save(ctx(1, seconds=500.0))
    # Nothing new to save: time alone does not trigger a save.
    assert not policy.should_save(ctx(0, seconds=10_000.0))
    combined = every(seconds=30, minutes=1)
    assert combined.should_save(ctx(1, seconds=90.0)) and not combined.should_save(ctx(1, seconds=89.0))
    assert every(seconds=0.5).should_save(ctx(1, seconds=0.5))


def test_every_steps_and_minutes_is_either() -> None:
    policy = every(steps=10, minutes=1)
    assert isinstance(policy, AnyOf)
    assert policy.should_save(ctx(10, seconds=0.0))
    assert policy.should_save(ctx(1, seconds=60.0))
    assert not policy.should_save(ctx(9, seconds=59.0))


def test_or_composition() -> None:
    policy = every(steps=100) | every(seconds=30) | every(steps=7)
    assert isinstance(policy, AnyOf)
    assert len(policy.policies) == 3
    assert policy.should_save(ctx(7))
    assert policy.should_save(ctx(2, seconds=30))
    assert not policy.should_save(ctx(6, seconds=29))
    text = policy.describe()
    assert "100 steps" in text and "30 s" in text and "7 steps" in text
    assert (Never() | every(steps=3)).should_save(ctx(3))
    assert not (Never() | every(steps=3)).should_save(ctx(2))
    assert not Never().should_save(ctx(10**6, seconds=1e9))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"steps": 0},
        {"steps": -3},
        {"steps": 1.5},
        {"steps": True},
        {"steps": "5"},
        {"seconds": 0},
        {"seconds": -1},
        {"minutes": -0.5},
        {"minutes": 0},
        {"seconds": float("nan")},
        {"steps": 0, "minutes": 5},
    ],
    ids=repr,
)
def test_bad_policy_values_raise_config_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        every(**kwargs)


def test_policy_classes_validate_directly() -> None:
    with pytest.raises(ConfigError):
        EverySteps(0)
    with pytest.raises(ConfigError):
        EverySeconds(0.0)
    with pytest.raises(ConfigError):
        EverySeconds(True)  # type: ignore[arg-type]


def test_negative_seconds_with_minutes_is_rejected() -> None:
    with pytest.raises(ConfigError):
        every(seconds=-30, minutes=1)


def test_non_numeric_minutes_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        every(minutes="15")  # type: ignore[arg-type]


# -- retention --------------------------------------------------------------------------------------------------------


def cands(*intact: bool | None) -> list[Candidate]:
    """Newest first: c0 is the newest."""
    return [Candidate(name=f"c{i}", step=100 - i, intact=v) for i, v in enumerate(intact)]


def names(deleted: list[Candidate]) -> list[str]:
    return [c.name for c in deleted]


def test_keep_last_keeps_the_newest_n() -> None:
    assert names(KeepLast(2).to_delete(cands(True, True, True, True, True))) == ["c2", "c3", "c4"]
    assert names(KeepLast(1).to_delete(cands(True, None, None))) == ["c1", "c2"]
    assert KeepLast(3).to_delete(cands(True, True)) == []
    assert KeepLast(3).to_delete(cands(True, True, True)) == []
    assert KeepLast(1).to_delete([]) == []


def test_keep_last_never_deletes_the_newest_intact_checkpoint() -> None:
    # The newest three are broken: the newest intact one (c3) survives although it is beyond n, and so do the
    # damaged ones newer than it (no intact checkpoint is newer than them: they are the run's evidence).
    deleted = names(KeepLast(2).to_delete(cands(False, False, False, True, True, None)))
    assert deleted == ["c4", "c5"]
    # Unchecked newest ones count as "not known intact" too.
    assert names(KeepLast(1).to_delete(cands(None, True, True))) == ["c2"]


def test_keep_last_never_deletes_a_damaged_checkpoint_that_nothing_intact_follows() -> None:
    """Issue 13: the damaged checkpoints of a run whose newest intact checkpoint is old stay."""
    assert names(KeepLast(1).to_delete(cands(False, False, True, False))) == ["c3"]
    assert KeepLast(1).to_delete(cands(False, False, False)) == []


def test_keep_last_asks_whether_intact_only_until_it_finds_one() -> None:
    asked: list[str] = []

    def check(candidate: Candidate) -> bool:
        asked.append(candidate.name)
        return candidate.name == "c1"

    assert names(KeepLast(1).to_delete(cands(None, None, None, None), check)) == ["c2", "c3"]
    assert asked == ["c0", "c1"]
    asked.clear()
    assert names(KeepLast(2).to_delete(cands(True, None, None), check)) == ["c2"]
    assert asked == []  # the newest is known intact: nothing to ask


def test_keep_last_deletes_nothing_when_nothing_is_intact() -> None:
    assert KeepLast(1).to_delete(cands(False, False, False, None)) == []
    assert KeepLast(2).to_delete(cands(None, None, None, None)) == []


@pytest.mark.parametrize("n", [1, 2, 3])
def test_keep_last_invariants_exhaustively(n: int) -> None:
    for length in range(7):
        for intact in itertools.product([True, False, None], repeat=length):
            candidates = cands(*intact)
            deleted = KeepLast(n).to_delete(candidates)
            assert all(c in candidates[n:] for c in deleted), (n, intact)
            assert len(set(deleted)) == len(deleted)
            newest_intact = next((i for i, c in enumerate(candidates) if c.intact), None)
            if newest_intact is None:
                expected: list[Candidate] = []  # nothing known intact: delete nothing rather than guess
            else:
                # Only what is beyond the newest n and older than the newest intact one.
                expected = candidates[max(n, newest_intact + 1) :]
            assert deleted == expected, (n, intact)
            for c in deleted:  # every deleted checkpoint has an intact one newer than it
                assert any(o.intact for o in candidates[: candidates.index(c)])


@pytest.mark.parametrize("n", [0, -1, True, 1.0, "3", None])
def test_keep_last_rejects_bad_values(n: Any) -> None:
    with pytest.raises(ConfigError):
        KeepLast(n)


# -- notice board -----------------------------------------------------------------------------------------------------


def test_notice_board_post_drain_pending() -> None:
    board = NoticeBoard()
    assert not board.pending() and board.first is None and board.drain() == []
    a = Notice(source="SIGTERM", received_at=1.0)
    b = Notice(source="SIGINT", received_at=2.0, deadline=32.0)
    board.post(a)
    assert board.pending()
    assert board.first is None  # not drained yet
    board.post(b)
    assert board.drain() == [a, b]
    assert board.first == a
    assert board.drain() == []
    assert board.pending()  # once a notice arrived, the run is being stopped
    c = Notice(source="SIGUSR1", received_at=3.0)
    board.post(c)
    assert board.drain() == [c]
    assert board.first == a


def test_notice_board_posts_from_threads() -> None:
    board = NoticeBoard()
    threads = [
        threading.Thread(target=lambda i=i: [board.post(Notice(f"t{i}", float(j))) for j in range(200)])
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = board.drain()
    assert len(got) == 800
    for i in range(4):
        assert [n.received_at for n in got if n.source == f"t{i}"] == [float(j) for j in range(200)]


# -- signals ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def usr1_handler() -> Any:
    """A Python-level SIGUSR1 handler as the 'previous' one (so a broken install cannot kill pytest)."""
    seen: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        seen.append(signum)

    original = signal.signal(signal.SIGUSR1, previous)
    try:
        yield previous, seen
    finally:
        signal.signal(signal.SIGUSR1, original)


def _deliver(sig: int, board: NoticeBoard | None = None) -> None:
    os.kill(os.getpid(), sig)
    # Python runs handlers between bytecodes of the main thread; a few iterations are always enough.
    for _ in range(1000):
        if board is not None and board.pending():
            break


def test_signal_becomes_a_notice_and_stop_restores_the_previous_handler(usr1_handler: Any) -> None:
    previous, seen = usr1_handler
    board = NoticeBoard()
    source = SignalNotices([signal.SIGUSR1], grace_seconds=30.0, clock=lambda: 1_000.0)
    source.start(board)
    try:
        assert signal.getsignal(signal.SIGUSR1) is not previous
        _deliver(signal.SIGUSR1, board)
        notices = board.drain()
        assert notices == [Notice(source="SIGUSR1", received_at=1_000.0, deadline=1_030.0)]
        assert seen == []  # the previous handler was replaced, not chained
        _deliver(signal.SIGUSR1, board)
        _deliver(signal.SIGUSR1, board)
        assert [n.source for n in board.drain()] == ["SIGUSR1", "SIGUSR1"]
    finally:
        source.stop()
    assert signal.getsignal(signal.SIGUSR1) is previous
    _deliver(signal.SIGUSR1)
    assert seen == [signal.SIGUSR1]
    assert board.drain() == []


def test_signal_without_grace_has_no_deadline(usr1_handler: Any) -> None:
    board = NoticeBoard()
    source = SignalNotices([signal.SIGUSR1])
    source.start(board)
    try:
        _deliver(signal.SIGUSR1, board)
    finally:
        source.stop()
    (notice,) = board.drain()
    assert notice.source == "SIGUSR1" and notice.deadline is None and notice.received_at > 0


def test_stop_restores_default_disposition_when_there_was_no_python_handler() -> None:
    recorded: list[tuple[int, Any]] = []

    def install(sig: int, handler: Any) -> Any:
        recorded.append((sig, handler))
        return None  # what signal.signal returns for a handler not installed from Python

    source = SignalNotices([signal.SIGTERM, signal.SIGINT], install=install)
    source.start(NoticeBoard())
    source.stop()
    assert recorded[2:] == [(signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.SIG_DFL)]


def test_start_outside_the_main_thread_raises() -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            SignalNotices([signal.SIGUSR1]).start(NoticeBoard())
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


# -- event log --------------------------------------------------------------------------------------------------------

IDENTITY = RunIdentity(run_id="run-a", attempt=2, pid=4242)


def test_emit_and_read_back_typed_events(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "events.jsonl"
    received: list[Any] = []
    with EventLog(path, IDENTITY) as log:
        log.subscribe(received.append)
        events = [
            Progress(time=1.5, step=3, epoch=0),
            SaveCommitted(
                time=2.0, step=3, checkpoint="c", reason="interval", bytes=10, blobs=2, stall_s=0.1, duration_s=0.2
            ),
            RunWarning(time=3.0, message="héllo"),
        ]
        for event in events:
            log.emit(event)
    assert received == events
    logged = list(read_events(path))
    assert [item.event for item in logged] == events
    assert all(type(item.event) is type(e) for item, e in zip(logged, events, strict=True))
    assert {(item.run_id, item.attempt, item.pid) for item in logged} == {("run-a", 2, 4242)}
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0])["type"] == "progress"


def test_closed_log_refuses_to_emit(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "e.jsonl", IDENTITY)
    log.close()
    log.close()
    with pytest.raises(RuntimeError):
        log.emit(Progress(time=1.0, step=1, epoch=0))


def test_damaged_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path, IDENTITY) as log:
        log.emit(Progress(time=1.0, step=1, epoch=0))
    with open(path, "ab") as handle:
        handle.write(b"garbage that is not json\n")
        handle.write(b"\xff\xfe\n")
        handle.write(b"[1, 2]\n")
        handle.write(b'{"type": "no_such_event", "run_id": "x", "attempt": 1, "pid": 1, "time": 1}\n')
        handle.write(b'{"type": "progress", "run_id": "x", "attempt": 1, "pid": 1, "time": 1, "bogus": 2}\n')
        handle.write(b'{"type": "progress", "run_id": "x", "attempt": 1, "pid": 1}\n')
    with EventLog(path, IDENTITY) as log:
        log.emit(Progress(time=2.0, step=2, epoch=0))
    with open(path, "ab") as handle:
        handle.write(b'{"type":"progress","run_id":"run-a","attempt":2,"pid":4242,"time":3.0,"st')
    steps = [item.event.step for item in read_events(path)]  # type: ignore[attr-defined]
    assert steps == [1, 2]


def test_reading_a_missing_log_yields_nothing(tmp_path: Path) -> None:
    assert list(read_events(tmp_path / "absent.jsonl")) == []
    assert EventTail(tmp_path / "absent.jsonl").poll() == []


def test_event_tail_returns_only_complete_lines_and_follows_appends(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.poll() == []
    log = EventLog(path, IDENTITY)
    log.emit(Progress(time=1.0, step=1, epoch=0))
    assert [e.event.step for e in tail.poll()] == [1]  # type: ignore[attr-defined]
    assert tail.poll() == []
    line = json.dumps({"type": "progress", "run_id": "w", "attempt": 1, "pid": 7, "time": 2.0, "step": 2, "epoch": 0})
    with open(path, "ab") as handle:
        handle.write(line[:20].encode())
    assert tail.poll() == []  # half a line is not an event yet
    with open(path, "ab") as handle:
        handle.write(line[20:].encode())
    assert tail.poll() == []  # still no newline
    with open(path, "ab") as handle:
        handle.write(b"\n")
    (item,) = tail.poll()
    assert item.event == Progress(time=2.0, step=2, epoch=0) and item.run_id == "w" and item.pid == 7
    log.emit(Progress(time=3.0, step=3, epoch=1))
    log.emit(Progress(time=4.0, step=4, epoch=1))
    assert [e.event.step for e in tail.poll()] == [3, 4]  # type: ignore[attr-defined]
    log.close()
    assert [e.event.step for e in read_events(path)] == [1, 2, 3, 4]  # type: ignore[attr-defined]
