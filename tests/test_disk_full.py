"""A full disk loses nothing: the failing save is reported, nothing half-written becomes visible, the last good
checkpoint stays intact and restorable, and the run goes on (and ends bit-exact) once there is room again.

The disk is a real tmpfs of a few MiB where this process may mount one (root), and an emulated small disk
everywhere (:class:`~tests.small_disk.SmallDisk`: ENOSPC at the level of the write calls, so the real
LocalStorage, writer lease, ``latest.json`` and event log code paths all see it). Faults at one exact moment
(the manifest, ``latest.json``, the lease, the event log) use the emulated disk only.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import spotsafe
from spotsafe.engine.reader import load_state
from spotsafe.errors import PermanentStorageError
from spotsafe.state.compare import differences
from spotsafe.storage.base import TMP_MARKER
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository
from spotsafe.telemetry import events as ev
from spotsafe.telemetry import log as event_log
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, RunIdentity, read_events

from .conftest import Exited, Job, fake_exit, make_job
from .small_disk import Disk, SmallDisk, mount_tmpfs

SPOTSAFE = str(Path(sys.executable).with_name("spotsafe"))
CAPACITY = 8 * 1024 * 1024
TMPFS_SIZE = "8m"
COMPONENTS = ("model", "optimizer", "scheduler")


@pytest.fixture(params=["tmpfs", "emulated"])
def disk(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    """A small disk: a real tmpfs (skipped where mounting is not allowed), then the emulated one."""
    root = tmp_path / "disk"
    if request.param == "tmpfs":
        yield from mount_tmpfs(root, TMPFS_SIZE)
        return
    small = SmallDisk(root, CAPACITY)
    small.install(monkeypatch)
    yield small


@pytest.fixture
def small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SmallDisk:
    """The emulated disk (unlimited until a test fills it)."""
    disk = SmallDisk(tmp_path / "disk")
    disk.install(monkeypatch)
    return disk


# -- helpers -----------------------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def listen(job: Job) -> list[ev.Event]:
    """Every event the checkpointer emits from now on, as it is emitted (the log on disk may be full)."""
    seen: list[ev.Event] = []
    log = job.ckpt.events
    assert isinstance(log, EventLog)
    log.subscribe(seen.append)
    return seen


def of_type(seen: list[ev.Event], kind: str) -> list[Any]:
    return [e for e in seen if e.type == kind]


def state_of(job: Job) -> dict[str, Any]:
    """A deep copy of what a checkpoint of ``job`` must hold."""
    return copy.deepcopy({"model": job.model.state_dict(), "optimizer": job.optimizer.state_dict(), **sched(job)})


def sched(job: Job) -> dict[str, Any]:
    state = {k: v for k, v in job.scheduler.state_dict().items() if k != "lr_lambdas"}
    return {"scheduler": state}


def assert_same(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    diffs = [d for name in expected for d in differences(actual[name], expected[name], name)]
    assert diffs == []


def repo_of(run: Path) -> CheckpointRepository:
    return CheckpointRepository(LocalStorage(run))


def saved_state(run: Path, ref: CheckpointRef) -> dict[str, Any]:
    """Read and verify every byte of ``ref``, decoded as a restore would apply it."""
    components = load_state(repo_of(run), ref).components
    out = {name: components[name] for name in ("model", "optimizer")}
    out["scheduler"] = {k: v for k, v in components["scheduler"].items() if k != "lr_lambdas"}
    return out


def temp_files(run: Path) -> list[str]:
    return [str(p.relative_to(run)) for p in run.rglob("*") if TMP_MARKER in p.name]


def log_lines(run: Path) -> list[dict[str, Any]]:
    """Every line of the event log, each of which must be whole JSON."""
    raw = (run / EVENTS_FILE).read_bytes()
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def assert_nothing_half_written(run: Path, good: list[CheckpointRef]) -> None:
    """Only ``good`` are visible, no folder of a failed save is left, and no temporary file either."""
    repo = repo_of(run)
    assert repo.committed() == good
    assert repo.folders() == good  # the failed save's partial folder was removed
    assert temp_files(run) == []


# -- the whole story ---------------------------------------------------------------------------------------------------


def test_a_full_disk_loses_nothing(disk: Disk, tmp_path: Path) -> None:
    run = disk.root / "run"
    job = make_job(run, policy=spotsafe.every(steps=5), keep=2)
    seen = listen(job)
    job.train(10)
    job.ckpt.wait()
    good = repo_of(run).committed()
    assert [r.step for r in good] == [10, 5]
    at_10 = state_of(job)

    disk.fill()
    job.train(15)  # the save of step 15 is staged; its write fails in the background...
    wait_until(lambda: not job.ckpt.saving, "the save of step 15 to end")
    with pytest.raises(PermanentStorageError) as info:
        job.train(20)  # ...and the next step_done raises it
    message = str(info.value)
    assert "no space left" in message and "free space" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert job.ckpt.step == 16  # the step that raised is counted: training on keeps an exact count
    [failed] = of_type(seen, "save_failed")
    assert (failed.step, failed.reason) == (15, "interval")
    assert "PermanentStorageError" in failed.error and "no space left" in failed.error

    # Nothing half-written is visible; the last good checkpoint is intact, the hint names it, it restores.
    assert_nothing_half_written(run, good)
    assert repo_of(run).read_latest() == good[0]
    listing = subprocess.run(
        [SPOTSAFE, "ls", str(run), "--json", "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listing.returncode == 0, listing.stderr
    assert [(r["step"], r["status"]) for r in json.loads(listing.stdout)] == [(10, "verified"), (5, "verified")]
    assert_same(saved_state(run, good[0]), at_10)

    # Room again: training goes on, the next saves commit, and the held events reach the log in order.
    disk.make_room()
    job.train(30)
    job.ckpt.finish()
    assert [r.step for r in repo_of(run).committed()] == [30, 25]
    assert temp_files(run) == []
    final = state_of(job)
    lines = log_lines(run)
    assert [(e["step"], e["reason"]) for e in lines if e["type"] == "save_failed"] == [(15, "interval")]
    progress = [e["step"] for e in lines if e["type"] == "progress"]
    assert progress == sorted(set(progress)) and progress[-1] == 30

    # A fresh process resumes from the last commit, and the run ends exactly as one that never hit a full disk.
    fresh = make_job(run, policy=spotsafe.every(steps=5), keep=2)
    assert fresh.ckpt.restore() == 30
    assert_same(state_of(fresh), final)
    fresh.ckpt.close()
    reference = make_job(tmp_path / "reference", policy=spotsafe.every(steps=5), keep=2)
    reference.train(30)
    reference.ckpt.finish()
    assert_same(state_of(reference), final)


# -- one moment at a time (emulated disk) ------------------------------------------------------------------------------


def test_no_space_for_the_manifest_leaves_no_trace(small: SmallDisk) -> None:
    run = small.root / "run"
    job = make_job(run, policy=spotsafe.every(steps=5))
    job.train(5)
    job.ckpt.wait()
    good = repo_of(run).committed()
    at_5 = state_of(job)

    small.full_at("manifest.json", leave=40)  # the manifest's temporary file gets 40 bytes, then ENOSPC
    job.train(10)
    wait_until(lambda: not job.ckpt.saving, "the save of step 10 to end")
    with pytest.raises(PermanentStorageError, match="no space left") as info:
        job.ckpt.wait()
    assert "manifest.json" in str(info.value)
    assert any("manifest.json" in path and TMP_MARKER in path for path in small.refused)
    assert_nothing_half_written(run, good)
    assert repo_of(run).read_latest() == good[0]
    assert_same(saved_state(run, good[0]), at_5)

    small.make_room()
    job.train(15)
    job.ckpt.finish()
    assert [r.step for r in repo_of(run).committed()] == [15, 5]
    fresh = make_job(run)
    assert fresh.ckpt.restore() == 15
    assert_same(state_of(fresh), state_of(job))
    fresh.ckpt.close()


def test_no_space_for_latest_keeps_the_commit_and_still_applies_retention(small: SmallDisk) -> None:
    run = small.root / "run"
    job = make_job(run, policy=spotsafe.every(steps=5), keep=1)
    seen = listen(job)
    job.train(5)
    job.ckpt.wait()
    [first] = repo_of(run).committed()

    small.full_at("latest.json")
    job.train(10)
    job.ckpt.wait()  # the checkpoint committed: nothing to raise
    [warning] = of_type(seen, "warning")
    assert "latest.json" in warning.message and "no space left" in warning.message
    [second] = repo_of(run).committed()
    assert second.step == 10
    assert [(e.checkpoint, e.step) for e in of_type(seen, "checkpoint_deleted")] == [(first.name, 5)]
    assert repo_of(run).read_latest() == first  # the hint is stale but whole; readers do not trust it alone
    assert repo_of(run).candidates() == [second]
    assert temp_files(run) == []

    # Room again: the next save commits and points the hint at itself.
    small.make_room()
    job.train(15)
    job.ckpt.finish()
    [third] = repo_of(run).committed()
    assert third.step == 15 and repo_of(run).read_latest() == third
    fresh = make_job(run)
    assert fresh.ckpt.restore() == 15
    fresh.ckpt.close()


def test_no_space_to_claim_the_run_is_a_clear_error_at_start(small: SmallDisk) -> None:
    run = small.root / "run"
    job = make_job(run, policy=spotsafe.every(steps=5))
    job.train(5)
    job.ckpt.finish()
    at_5 = state_of(job)

    small.fill()
    with pytest.raises(PermanentStorageError, match="no space left") as info:
        make_job(run)
    assert "writers/gen-000002-" in str(info.value) and "free space" in str(info.value)
    assert temp_files(run) == []
    assert [p.name[:11] for p in (run / "writers").iterdir()] == ["gen-000001-"]  # no claim, whole or torn

    small.make_room()
    again = make_job(run)
    assert again.ckpt.restore() == 5
    assert_same(state_of(again), at_5)
    again.ckpt.close()


def test_a_final_save_on_a_full_disk_raises_and_finish_saves_it_once_there_is_room(small: SmallDisk) -> None:
    run = small.root / "run"
    job = make_job(run, policy=spotsafe.every(steps=5))
    job.train(7)
    job.ckpt.wait()
    good = repo_of(run).committed()
    small.fill()
    with pytest.raises(PermanentStorageError, match="no space left"):
        job.ckpt.finish()
    assert_nothing_half_written(run, good)

    small.make_room()
    job.ckpt.finish()  # the final state is saved now, not skipped as "already saved at this step"
    assert [r.step for r in repo_of(run).committed()][:2] == [7, 5]
    assert_same(saved_state(run, repo_of(run).committed()[0]), state_of(job))


@pytest.mark.parametrize("async_save", [True, False], ids=["background", "direct"])
def test_training_on_after_the_error_retries_at_the_next_interval(small: SmallDisk, async_save: bool) -> None:
    run = small.root / "run"
    job = make_job(run, policy=spotsafe.every(steps=5), async_save=async_save)
    seen = listen(job)
    job.train(5)
    job.ckpt.wait()
    small.fill()
    with pytest.raises(PermanentStorageError, match="no space left"):
        job.train(10)
        job.ckpt.wait()
    failed_at = job.ckpt.step
    small.make_room()
    job.train(20)
    job.ckpt.finish()
    assert [e.step for e in of_type(seen, "save_failed")] == [10]
    assert failed_at == 10  # a direct save raises at its own step; a background one at wait()
    assert [r.step for r in repo_of(run).committed()] == [20, 15, 5]


def test_an_emergency_save_on_a_full_disk_keeps_the_last_checkpoint_as_the_resume_point(small: SmallDisk) -> None:
    run = small.root / "run"
    job = make_job(run, policy=spotsafe.every(steps=5), handle_signals=True, exit=fake_exit)
    seen = listen(job)
    job.train(5)
    job.ckpt.wait()
    good = repo_of(run).committed()
    at_5 = state_of(job)

    def at_step(step: int) -> None:
        if step == 8:
            small.fill()
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Exited) as info:
        job.train(100, on_step=at_step)
    assert info.value.code == spotsafe.EXIT_PREEMPTED
    [failed] = of_type(seen, "save_failed")
    assert (failed.step, failed.reason) == (8, "notice") and "no space left" in failed.error
    [finished] = of_type(seen, "emergency_finished")
    assert finished.committed is False
    assert [(e.reason, e.step) for e in of_type(seen, "run_exited")] == [("preempted", 8)]
    assert_nothing_half_written(run, good)

    small.make_room()
    fresh = make_job(run)
    assert fresh.ckpt.restore() == 5
    assert_same(state_of(fresh), at_5)
    fresh.ckpt.close()


# -- the event log ----------------------------------------------------------------------------------------------------


def progress_log(path: Path) -> EventLog:
    return EventLog(path, RunIdentity("run", 1, os.getpid()))


def test_the_event_log_never_tears_a_line_and_writes_held_events_once_there_is_room(
    small: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    path = small.root / "run" / EVENTS_FILE
    log = progress_log(path)
    for step in range(1, 4):
        log.emit(ev.Progress(time=float(step), step=step, epoch=0))
    whole = path.read_bytes()
    small.fill(leave=25)  # the next line fits only in part: a short write, then ENOSPC
    with caplog.at_level(logging.WARNING, logger="spotsafe"):
        for step in range(4, 8):
            log.emit(ev.Progress(time=float(step), step=step, epoch=0))
        log.emit(ev.SaveFailed(time=8.0, step=7, reason="interval", error="no space left"))
    assert any("no space left for the event log" in r.getMessage() for r in caplog.records)
    assert path.read_bytes() == whole  # the part that fitted was cut off again: no torn line
    assert log.held == 5

    small.make_room()
    log.emit(ev.Progress(time=9.0, step=8, epoch=0))
    log.close()
    lines = log_lines(path.parent)
    assert [(e["type"], e["step"]) for e in lines] == [("progress", s) for s in range(1, 8)] + [
        ("save_failed", 7),
        ("progress", 8),
    ]
    assert [e.event.type for e in read_events(path)].count("save_failed") == 1


def test_the_event_log_writes_what_it_holds_at_close_if_there_is_room(small: SmallDisk) -> None:
    path = small.root / EVENTS_FILE
    log = progress_log(path)
    small.fill()
    log.emit(ev.RunExited(time=1.0, reason="finished", step=3, exit_code=0))
    assert path.read_bytes() == b"" and log.held == 1
    small.make_room()
    log.close()
    assert [e.event.type for e in read_events(path)] == ["run_exited"]


def test_beyond_the_held_lines_only_durable_events_wait_and_a_warning_counts_the_rest(
    small: SmallDisk, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(event_log, "HELD_LINES", 3)
    path = small.root / EVENTS_FILE
    log = progress_log(path)
    small.fill()
    for step in range(1, 6):
        log.emit(ev.Progress(time=float(step), step=step, epoch=0))
    log.emit(ev.SaveFailed(time=6.0, step=5, reason="interval", error="no space left"))
    assert log.held == 4
    small.make_room()
    log.emit(ev.Progress(time=7.0, step=6, epoch=0))
    log.close()
    logged = [e.event for e in read_events(path)]
    assert [(e.type, getattr(e, "step", None)) for e in logged] == [
        ("progress", 1),
        ("progress", 2),
        ("progress", 3),
        ("save_failed", 5),
        ("warning", None),
        ("progress", 6),
    ]
    assert isinstance(logged[4], ev.RunWarning) and "2 events" in logged[4].message


def test_other_write_errors_of_the_event_log_still_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = progress_log(tmp_path / EVENTS_FILE)

    def broken(fd: int, data: Any) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "write", broken)
    with pytest.raises(OSError, match="I/O error"):
        log.emit(ev.Progress(time=1.0, step=1, epoch=0))
    monkeypatch.undo()
    log.close()
