"""The Checkpointer on local disk and S3: local-then-upload, fencing between writers, retry events."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from spotsafe.errors import TransientStorageError
from spotsafe.storage.faults import FaultyStorage
from spotsafe.storage.fencing import FencedError
from spotsafe.storage.registry import open_backend, open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.storage.retry import RetryingStorage, StorageRetry
from spotsafe.telemetry.store import read_run_events

from .conftest import Exited, fake_exit, make_job


def committed_steps(url: str) -> list[int]:
    return [r.step for r in CheckpointRepository(open_storage(url)).committed()]


def event_list(url: str, kind: str) -> list[Any]:
    return [e.event for e in read_run_events(open_storage(url)) if e.event.type == kind]


def test_local_then_upload_commits_durably_and_restores_from_the_durable_copy(run_url: str, tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    job = make_job(run_url, stage_dir=str(stage), keep=2)
    job.train(21)  # saves at 7, 14, 21, each staged then uploaded
    job.ckpt.finish()
    assert committed_steps(run_url) == [21, 14]
    staged = event_list(run_url, "save_staged")
    durable = event_list(run_url, "save_committed")
    assert [e.step for e in staged] == [7, 14, 21]
    assert [e.step for e in durable] == [7, 14, 21]
    assert all(d.duration_s >= s.stall_s for s, d in zip(staged, durable, strict=True))
    # The staging folder holds at most the newest local copy; restore never needs it.
    stage_repo = CheckpointRepository(open_storage(str(stage)))
    assert [r.step for r in stage_repo.committed()] == [21]
    fresh = make_job(run_url)
    assert fresh.ckpt.restore() == 21
    fresh.ckpt.close()


def test_a_local_copy_is_not_durable_until_uploaded_at_the_next_start(tmp_path: Path) -> None:
    durable_url = str(tmp_path / "durable")
    faulty = FaultyStorage(open_backend(durable_url))
    broken = RetryingStorage(faulty, StorageRetry(budget_s=0.05, initial=0.01))
    job = make_job(durable_url, stage_dir=str(tmp_path / "stage"), storage=broken)
    faulty.fail_rate = 1.0  # the durable store goes away after start-up
    with pytest.raises(TransientStorageError):
        job.train(100)  # the save at 7 commits locally; its upload fails in the background
    # Raised at the first call after the upload failed, and at the latest by the next save (which waits for it).
    assert 7 < job.ckpt.step <= 14
    job.ckpt.close()
    assert [e.step for e in event_list(durable_url, "save_staged")] == [7]
    assert [e.step for e in event_list(durable_url, "save_failed")] == [7]
    assert committed_steps(durable_url) == []
    # The store is back: the next start uploads the local commit (verifying it) before restoring.
    again = make_job(durable_url, stage_dir=str(tmp_path / "stage"))
    assert [e.step for e in event_list(durable_url, "stage_recovered")] == [7]
    assert committed_steps(durable_url) == [7]
    assert again.ckpt.restore() == 7
    assert not any((tmp_path / "stage").rglob("manifest.json")), "staging is wiped at start"
    again.ckpt.close()


def test_a_stage_folder_of_another_run_is_wiped_not_uploaded(tmp_path: Path) -> None:
    stage = str(tmp_path / "stage")
    first = make_job(str(tmp_path / "run-a"), stage_dir=stage)
    first.train(7)
    first.ckpt.wait()
    first.ckpt.close()
    assert any((tmp_path / "stage").rglob("manifest.json"))
    other = make_job(str(tmp_path / "run-b"), stage_dir=stage)
    assert event_list(str(tmp_path / "run-b"), "stage_recovered") == []
    assert committed_steps(str(tmp_path / "run-b")) == []
    assert not any((tmp_path / "stage").rglob("manifest.json"))
    assert other.ckpt.restore() == 0
    other.ckpt.close()


def test_emergency_save_in_local_then_upload_mode_waits_for_the_upload(run_url: str, tmp_path: Path) -> None:
    job = make_job(run_url, stage_dir=str(tmp_path / "stage"), handle_signals=True, exit=fake_exit)

    def at_step(step: int) -> None:
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Exited) as info:
        job.train(100, on_step=at_step)
    assert info.value.code == 75
    assert committed_steps(run_url)[0] == 10
    [exited] = event_list(run_url, "run_exited")
    assert (exited.reason, exited.step) == ("preempted", 10)


def test_a_stale_writer_is_fenced_off(run_url: str) -> None:
    old = make_job(run_url, keep=1)
    old.train(7)
    old.ckpt.wait()  # committed before the replacement starts (a save in flight could be cleaned up)
    new = make_job(run_url, keep=1)  # a replacement starts while the old one still runs
    assert new.ckpt.generation == old.ckpt.generation + 1
    assert new.ckpt.restore() == 7
    old.train(14)  # the old writer's save at 14 must not commit: it fails in the background ...
    with pytest.raises(FencedError, match="stale"):
        old.ckpt.wait()  # ... and the error surfaces at the next call
    assert committed_steps(run_url) == [7]
    assert [e.step for e in event_list(run_url, "save_failed")] == [14]
    new.train(14)
    new.ckpt.wait()
    assert committed_steps(run_url) == [14], "the new writer's retention removed the old checkpoint"
    new.ckpt.close()
    old.ckpt.close()
    latest = CheckpointRepository(open_storage(run_url)).read_latest()
    assert latest is not None and latest.step == 14 and latest.generation == new.ckpt.generation


def test_transient_failures_are_retried_and_recorded(run_url: str) -> None:
    flaky = RetryingStorage(
        FaultyStorage(open_backend(run_url), fail_rate=0.3, seed=4), StorageRetry(budget_s=30, initial=0.001)
    )
    job = make_job(run_url, storage=flaky)
    job.train(21)
    job.ckpt.finish()
    retries = event_list(run_url, "storage_retry")
    assert retries and all(r.error and r.operation for r in retries)
    assert committed_steps(run_url)[0] == 21
    for ref in CheckpointRepository(open_storage(run_url)).committed():
        CheckpointRepository(open_storage(run_url)).verify(ref)
