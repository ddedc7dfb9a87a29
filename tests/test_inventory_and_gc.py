"""The library behind ``spotsafe ls / verify / inspect / gc``: run inventory, GC planning, the Stat capability and
the per-command Redactor, used directly (the command line itself is tested in test_cli.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest

from spotsafe.errors import ConfigError, CorruptCheckpointError
from spotsafe.storage.base import stat_of
from spotsafe.storage.fsspec_store import FsspecStorage, listed_time
from spotsafe.storage.gc import apply_gc, newest_write, plan_gc
from spotsafe.storage.inventory import (
    FolderState,
    check_folders,
    committed_to_verify,
    open_run_folder,
    select_checkpoint,
    verify_rows,
)
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.redactor import Redactor
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRef

from .conftest import S3Server, folder

STEPS = (7, 14, 21, 28)


def leftover_name(run_dir: Path, step: int, named_at: float) -> str:
    generation = folder(run_dir, STEPS[0]).name[1:7]
    return f"g{generation}-step-{step:012d}-{int(named_at * 1000):013d}-abcd"


# -- the redactor ---------------------------------------------------------------------------------


def test_a_redactor_hides_what_its_command_was_given_and_nothing_is_shared_between_commands() -> None:
    one, other = Redactor(), Redactor()
    one.remember_url("s3://AKIAUSER:pass1234@bucket/run?sig=signed99&plain=abc")
    one.remember_options({"key": "AKIAOPTION", "client_kwargs": {"aws_secret_access_key": "nested-secret"}})
    one.remember_options({"endpoint_url": "http://127.0.0.1:9000", "token": 12345678})
    text = "AKIAUSER pass1234 signed99 AKIAOPTION nested-secret http://127.0.0.1:9000 abc"
    shown = one.redact(text)
    for secret in ("AKIAUSER", "pass1234", "signed99", "AKIAOPTION", "nested-secret"):
        assert secret not in shown
    assert "http://127.0.0.1:9000" in shown and shown.endswith(" abc")  # not secrets: kept (abc is too short)
    assert one.redact("id 12345678") == "id ***"  # a non-string secret option, as JSON
    assert other.redact(text) == text
    assert one.reason(ValueError("failed with pass1234")) == "failed with ***"


# -- the Stat capability --------------------------------------------------------------------------


def test_local_modified_is_the_newest_entry_and_never_follows_a_link(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write_atomic("ckpt/a.bin", b"a")
    storage.write_atomic("ckpt/b.bin", b"b")
    os.utime(tmp_path / "ckpt" / "a.bin", (1000, 1000))
    os.utime(tmp_path / "ckpt" / "b.bin", (2000, 2000))
    assert storage.modified("ckpt") == 2000
    assert storage.modified("ckpt/a.bin") == 1000
    assert storage.modified("missing") is None
    assert storage.modified("ckpt/a.bin/below") is None
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "new.bin").write_bytes(b"x")
    (tmp_path / "linked").symlink_to(outside)
    assert storage.modified("linked") is None  # a folder behind a link is not in the run
    os.symlink(outside / "new.bin", tmp_path / "ckpt" / "link.bin")
    os.utime(tmp_path / "ckpt" / "link.bin", (3000, 3000), follow_symlinks=False)
    assert storage.modified("ckpt") == 3000  # the link's own time, not its target's (now)


def test_fsspec_modified_reads_the_listing_times() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/spotsafe-stat/run/ckpt/x.bin", b"1")
    storage = FsspecStorage(fs, "/spotsafe-stat/run", "memory://spotsafe-stat/run")
    stamp = storage.modified("ckpt")
    assert stamp is not None and abs(stamp - time.time()) < 3600
    assert storage.modified("absent") is None
    assert listed_time("2026-01-02T03:04:05Z") == listed_time(1767323045) == 1767323045.0
    assert listed_time(True) is None and listed_time("yesterday") is None and listed_time(None) is None


def test_newest_write_looks_through_wrappers_and_says_nothing_without_stat(tmp_path: Path) -> None:
    storage = open_storage(tmp_path)  # wrapped for retries
    storage.write_atomic("ckpt/a.bin", b"a")
    os.utime(tmp_path / "ckpt" / "a.bin", (1000, 1000))
    assert stat_of(storage) is not None
    ref = CheckpointRef.parse("g000001-step-000000000001-0000000000001-abcd")
    assert ref is not None
    (tmp_path / ref.key).mkdir(parents=True)
    (tmp_path / ref.key / "m.bin").write_bytes(b"m")
    os.utime(tmp_path / ref.key / "m.bin", (1234, 1234))
    assert newest_write(storage, ref) == 1234

    class NoStat:
        pass

    assert newest_write(NoStat(), ref) is None  # type: ignore[arg-type]


# -- inventory --------------------------------------------------------------------------------------


def test_inventory_checks_sizes_then_checksums_and_selects_checkpoints(run_dir: Path) -> None:
    damaged = folder(run_dir, 21) / "model.bin"
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0x01
    damaged.write_bytes(bytes(data))
    stale = run_dir / "checkpoints" / leftover_name(run_dir, 3, time.time())
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"partial")
    run = open_run_folder(str(run_dir), {}, retry_budget=0)
    redactor = Redactor()

    rows, latest = check_folders(run.repo, redactor)
    assert latest is not None and latest.step == 28
    states = {r.ref.step: r.state for r in rows}
    assert states == {28: "committed", 21: "committed", 14: "committed", 7: "committed", 3: "uncommitted"}
    assert [r.latest for r in rows].count(True) == 1
    verify_rows(run.repo, rows, redactor)
    by_step = {r.ref.step: r for r in rows}
    assert by_step[21].state is FolderState.DAMAGED and "checksum" in (by_step[21].reason or "")
    assert {by_step[s].state for s in (7, 14, 28)} == {FolderState.VERIFIED}
    assert by_step[3].size == len(b"partial")

    assert [r.step for r in committed_to_verify(run.repo, step=None, every=False)] == [28]
    assert [r.step for r in committed_to_verify(run.repo, step=None, every=True)] == [28, 21, 14, 7]
    assert [r.step for r in committed_to_verify(run.repo, step=14, every=False)] == [14]
    chosen = select_checkpoint(run.repo, step=14, name=None)
    assert chosen is not None and chosen.step == 14
    assert select_checkpoint(run.repo, step=99, name=None) is None
    with pytest.raises(CorruptCheckpointError, match="no committed manifest"):
        select_checkpoint(run.repo, step=None, name=stale.name)
    with pytest.raises(ConfigError, match="not a checkpoint folder name"):
        select_checkpoint(run.repo, step=None, name="nonsense")
    with pytest.raises(ConfigError, match="no such folder"):
        open_run_folder(str(run_dir / "absent"), {}, retry_budget=0)


# -- gc ---------------------------------------------------------------------------------------------


def test_gc_plan_keeps_recent_writes_and_applies_exactly_the_plan(run_dir: Path) -> None:
    now = time.time()
    stale = run_dir / "checkpoints" / leftover_name(run_dir, 3, now - 7200)
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"partial")
    os.utime(stale / "model.bin", (now - 7200, now - 7200))
    # Named two hours ago, written just now: the newest write counts, so it may be a save in progress.
    busy = run_dir / "checkpoints" / leftover_name(run_dir, 5, now - 7200)
    busy.mkdir()
    (busy / "model.bin").write_bytes(b"writing")
    run = open_run_folder(str(run_dir), {}, retry_budget=0)

    plan = plan_gc(run.repo, Redactor(), keep=2, partial_older_than=3600, now=now)

    assert plan.newest_intact == folder(run_dir, 28).name
    deleting = {item.ref.name for item in plan.doomed}
    assert deleting == {folder(run_dir, 14).name, folder(run_dir, 7).name, stale.name}
    (busy_item,) = [item for item in plan.items if item.ref.name == busy.name]
    assert "may be a save in progress" in busy_item.reason
    done: list[None] = []
    result = apply_gc(run.repo, plan.doomed, Redactor(), lambda: done.append(None))
    assert len(done) == 3 and not result.failures and not result.skipped
    assert {item.ref.name for item in result.deleted} == deleting
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left == sorted([busy.name, folder(run_dir, 21).name, folder(run_dir, 28).name])


def test_gc_on_s3_reads_last_modified(pristine: Path, s3_server: S3Server) -> None:
    import s3fs

    bucket = s3_server.new_bucket()
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key="testing", secret="testing")
    fs.put(str(pristine / "checkpoints"), f"{bucket}/run/", recursive=True)
    now = time.time()
    busy = leftover_name(pristine, 5, now - 7200)
    fs.pipe(f"{bucket}/run/checkpoints/{busy}/model.bin", b"writing")
    options: dict[str, Any] = {"client_kwargs": {"endpoint_url": s3_server.endpoint}}
    run = open_run_folder(f"s3://{bucket}/run", options, retry_budget=5)

    stamp = newest_write(run.storage, CheckpointRef.parse(busy))  # type: ignore[arg-type]
    assert stamp is not None and abs(stamp - now) < 600

    plan = plan_gc(run.repo, Redactor(), keep=10, partial_older_than=3600, now=now)
    (item,) = [i for i in plan.items if i.ref.name == busy]
    assert not item.delete and "may be a save in progress" in item.reason
