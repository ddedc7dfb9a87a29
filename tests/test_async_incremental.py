"""Two-phase saves and incremental checkpoints: errors, isolation, sharing, retention, memory, overlap, exit."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spotsafe
from spotsafe.engine import staging
from spotsafe.engine.lifecycle import SnapshotTornError
from spotsafe.engine.reader import load_state
from spotsafe.engine.staging import CHUNK, StagingArea, parse_budget
from spotsafe.errors import (
    ConfigError,
    CorruptCheckpointError,
    NoUsableCheckpointError,
    PermanentStorageError,
    TransientStorageError,
    UnsafeCheckpointError,
)
from spotsafe.policy.interval import Never
from spotsafe.state.compare import differences
from spotsafe.state.rng import GlobalRNG
from spotsafe.state.snapshot import STATE_BLOB, Snapshot
from spotsafe.state.tensors import ALIGN, Segment, pack, plan
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import MANIFEST_NAME, BlobEntry, Manifest, new_hasher
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository
from spotsafe.telemetry.log import EVENTS_FILE, read_events
from spotsafe.telemetry.store import read_run_events

from .conftest import HANG_S

ROOT = Path(__file__).resolve().parents[1]

# -- a small job whose parts change in known ways ------------------------------------------------


@dataclass
class Job:
    """A model with a 2 MiB backbone (frozen unless asked) and a small head, AdamW, fixed inputs."""

    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    ckpt: spotsafe.Checkpointer
    x: torch.Tensor

    def train_step(self, forward_hook: Any = None) -> None:
        """One optimizer step (no randomness, so the RNG state never changes)."""
        if forward_hook is not None:
            forward_hook()
        loss = self.model(self.x).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def step(self) -> bool:
        self.train_step()
        return self.ckpt.step_done()

    def saved(self) -> CheckpointRef:
        """Save now and wait until the checkpoint is committed."""
        ref = self.ckpt.save()
        self.ckpt.wait()
        assert ref is not None
        return ref

    def state(self) -> dict[str, Any]:
        """A deep copy of the state a checkpoint of this job must hold."""
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()})


_SEEDS = itertools.count(1000)


def build(url: str | Path, *, frozen: bool = True, fused: bool = False, seed: int | None = None, **kwargs: Any) -> Job:
    """A fresh job. Each call draws new weights unless ``seed`` is given.

    Fresh weights keep a new staging slot from landing on freed memory that holds the same bytes
    (see :func:`test_full_saves_with_incremental_off_repeat`).
    """
    torch.manual_seed(next(_SEEDS) if seed is None else seed)
    model = nn.Sequential(nn.Linear(1024, 512), nn.Tanh(), nn.Linear(512, 8))
    if frozen:
        model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    options: dict[str, Any] = {"policy": Never(), "handle_signals": False, "progress_interval": 0, "keep": 10}
    options.update(kwargs)
    ckpt = spotsafe.Checkpointer(str(url), model=model, optimizer=optimizer, **options)
    return Job(model, optimizer, ckpt, torch.randn(16, 1024, generator=torch.Generator().manual_seed(1)))


def diff(restored: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Bitwise differences between a restored checkpoint's model/optimizer and an expected state (empty: equal)."""
    return [d for name in expected for d in differences(restored[name], expected[name], name)]


def repo_of(url: str | Path) -> CheckpointRepository:
    return CheckpointRepository(open_storage(str(url)))


def restored_state(url: str | Path, ref: CheckpointRef) -> dict[str, Any]:
    """Read, verify and decode one checkpoint (what a restore would apply)."""
    return load_state(repo_of(url), ref).components


def local_events(run: Path, kind: str) -> list[Any]:
    return [e.event for e in read_events(run / EVENTS_FILE) if e.event.type == kind]


def run_events(url: str | Path, kind: str) -> list[Any]:
    return [e.event for e in read_run_events(open_storage(str(url))) if e.event.type == kind]


def own_blobs(url: str | Path, ref: CheckpointRef) -> dict[str, int]:
    return {b.path: b.size for b in repo_of(url).read_manifest(ref).blobs if b.checkpoint is None}


def files_of(url: str | Path, ref: CheckpointRef) -> set[str]:
    storage = open_storage(str(url))
    return {k.rsplit("/", 1)[1] for k in storage.find(ref.key) if k.startswith(ref.key + "/")}


def until_idle(ckpt: spotsafe.Checkpointer) -> None:
    """Let the save in flight end (without a checkpointer call, which would report its error)."""
    deadline = time.monotonic() + 30
    while ckpt.saving and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not ckpt.saving


def aligned(n: int) -> int:
    return n + (-n % ALIGN)


class Gated(LocalStorage):
    """Blob writes wait for ``gate`` (open by default): a save stays in flight while the test acts."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.writing = threading.Event()

    def write_stream(self, key: str, source: Any) -> int:
        self.writing.set()
        self.gate.wait(30)
        return super().write_stream(key, source)


class Failing(LocalStorage):
    """Blob writes raise ``error`` while it is set."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.error: type[Exception] | None = None
        self.failed: list[str] = []

    def write_stream(self, key: str, source: Any) -> int:
        if self.error is not None:
            self.failed.append(key)
            raise self.error(f"{key}: injected failure")
        return super().write_stream(key, source)


# -- 1. no lost errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("error", [TransientStorageError, PermanentStorageError])
@pytest.mark.parametrize("surfaces_at", ["step_done", "wait", "save", "finish"])
def test_a_background_failure_is_raised_once_at_the_next_call(
    tmp_path: Path, error: type[Exception], surfaces_at: str
) -> None:
    storage = Failing(tmp_path)
    job = build(tmp_path, storage=storage)
    job.step()
    good = job.saved()
    job.step()
    storage.error = error
    bad = job.ckpt.save()  # staged: returns before the write fails
    assert bad is not None and bad != good
    until_idle(job.ckpt)
    assert storage.failed
    storage.error = None
    with pytest.raises(error, match="injected failure"):
        getattr(job.ckpt, surfaces_at)()
    # Reported exactly once.
    if surfaces_at != "finish":
        job.ckpt.wait()
        job.ckpt.step_done()
        job.ckpt.wait()
    job.ckpt.close()
    failed = local_events(tmp_path, "save_failed")
    assert [(e.step, e.reason) for e in failed] == [(2, "manual")]
    assert error.__name__ in failed[0].error and "injected failure" in failed[0].error
    # Nothing of the failed save is visible: no manifest, no folder, latest names the good one.
    repo = repo_of(tmp_path)
    assert good in repo.committed() and bad not in repo.committed()
    assert not (tmp_path / bad.key).exists()
    assert repo.read_latest() == good
    assert [e.checkpoint for e in local_events(tmp_path, "save_committed")] == [good.name]


def test_saves_go_on_after_a_failure_and_restore_bit_exact(tmp_path: Path) -> None:
    storage = Failing(tmp_path)
    job = build(tmp_path, storage=storage)
    job.step()
    job.ckpt.save()
    job.ckpt.wait()
    job.step()
    storage.error = TransientStorageError
    job.ckpt.save()
    until_idle(job.ckpt)
    storage.error = None
    with pytest.raises(TransientStorageError):
        job.step()  # raised by step_done, after it counted the step
    job.step()
    expected = job.state()
    ref = job.saved()
    job.ckpt.close()
    assert ref is not None and ref.step == job.ckpt.step
    assert not diff(restored_state(tmp_path, ref), expected)
    fresh = build(tmp_path)
    assert fresh.ckpt.restore() == ref.step
    assert not diff(fresh.state(), expected)
    fresh.ckpt.close()


def test_the_save_after_a_failure_writes_the_chunks_that_failed(tmp_path: Path) -> None:
    emb = nn.Embedding(4096, 256)  # 4 MiB: four chunks
    storage = Failing(tmp_path)
    with spotsafe.Checkpointer(str(tmp_path), model=emb, storage=storage, handle_signals=False, policy=Never()) as ckpt:
        ckpt.save()
        ckpt.wait()
        emb.weight.data[1500:1503] = 2.5  # rows in chunk 1 only
        storage.error = TransientStorageError
        ckpt.save()
        until_idle(ckpt)
        storage.error = None
        with pytest.raises(TransientStorageError):
            ckpt.wait()
        expected = emb.weight.detach().clone()
        ref = ckpt.save()  # nothing changed since the failed save: its chunk must be written now
        ckpt.wait()  # raises AssertionError('a clean chunk always has a location')
    assert ref is not None
    assert own_blobs(tmp_path, ref)["model.bin"] == CHUNK
    assert torch.equal(restored_state(tmp_path, ref)["model"]["weight"], expected)


# -- 2. snapshot isolation -----------------------------------------------------------------------


def _modify_via_data(job: Job) -> None:
    for p in job.model.parameters():
        p.data.add_(1.0)
    for state in job.optimizer.state.values():
        state["exp_avg"].data.add_(1.0)


def _modify_via_numpy(job: Job) -> None:
    for p in job.model.parameters():
        p.detach().numpy()[...] = 7.0
    for state in job.optimizer.state.values():
        state["exp_avg_sq"].numpy()[...] = 3.0


def _modify_via_fused_step(job: Job) -> None:
    versions = [p._version for p in job.model.parameters()]
    job.train_step()
    assert [p._version for p in job.model.parameters()] == versions, "fused AdamW does not bump _version"


@pytest.mark.parametrize(
    ("modify", "fused"),
    [(_modify_via_data, False), (_modify_via_numpy, False), (_modify_via_fused_step, True)],
    ids=["data-add_", "numpy-view", "fused-adamw-step"],
)
def test_a_staged_save_holds_the_state_of_the_step_it_was_taken_at(tmp_path: Path, modify: Any, fused: bool) -> None:
    storage = Gated(tmp_path)
    job = build(tmp_path, storage=storage, frozen=False, fused=fused)
    job.step()
    job.ckpt.save()
    job.ckpt.wait()
    job.step()
    expected = job.state()
    storage.gate.clear()
    storage.writing.clear()
    ref = job.ckpt.save()
    assert storage.writing.wait(30) and job.ckpt.saving  # the write has started and is held
    modify(job)
    assert diff(job.state(), expected), "the live state has changed"
    storage.gate.set()
    job.ckpt.wait()
    job.ckpt.close()
    assert ref is not None
    assert not diff(restored_state(tmp_path, ref), expected)
    fresh = build(tmp_path, frozen=False, fused=fused)
    assert fresh.ckpt.restore() == 2
    assert not diff(fresh.state(), expected)
    fresh.ckpt.close()


# -- 3. incremental saves --------------------------------------------------------------------------


def test_a_frozen_backbone_is_written_once(tmp_path: Path) -> None:
    job = build(tmp_path)
    job.step()
    first = job.saved()
    job.step()
    second = job.saved()
    third = job.ckpt.save()  # nothing changed since the second
    job.ckpt.wait()
    job.ckpt.close()
    assert first is not None and second is not None and third is not None
    committed = {e.checkpoint: e for e in local_events(tmp_path, "save_committed")}
    staged = {e.checkpoint: e for e in local_events(tmp_path, "save_staged")}
    head = job.model[2]
    head_bytes = aligned(head.weight.numel() * 4) + head.bias.numel() * 4
    backbone_bytes = sum(p.numel() * 4 for p in job.model[0].parameters())

    full = committed[first.name]
    assert full.written_bytes == full.bytes > backbone_bytes

    inc = committed[second.name]
    assert inc.bytes > backbone_bytes  # a restore reads the shared backbone too
    assert inc.written_bytes < inc.bytes / 10
    mine = own_blobs(tmp_path, second)
    assert set(mine) == {"model.bin", "optimizer.bin", STATE_BLOB}  # the RNG state did not change
    assert mine["model.bin"] == head_bytes
    assert mine["optimizer.bin"] >= 2 * head.weight.numel() * 4  # exp_avg and exp_avg_sq of the head
    assert inc.written_bytes == sum(mine.values())
    assert inc.written_bytes < 3 * head_bytes + 2 * ALIGN * 4 + mine[STATE_BLOB]
    assert staged[second.name].copied_bytes == 3 * (head.weight.numel() + head.bias.numel()) * 4 + 4 * 2
    shared = repo_of(tmp_path).read_manifest(second).shared
    assert {(b.checkpoint, b.path) for b in shared} == {(first.name, "model.bin"), (first.name, "rng.bin")}

    unchanged = committed[third.name]
    assert own_blobs(tmp_path, third) == {STATE_BLOB: unchanged.written_bytes}
    assert staged[third.name].copied_bytes == 0
    for ref in (first, second, third):
        repo_of(tmp_path).verify(ref)


def test_index_writes_to_a_big_embedding_rewrite_exactly_the_changed_chunk(tmp_path: Path) -> None:
    emb = nn.Embedding(4096, 256)  # 4 MiB float32: chunks of 1024 rows
    ckpt = spotsafe.Checkpointer(str(tmp_path), model=emb, handle_signals=False, policy=Never(), keep=5)
    first = ckpt.save()
    ckpt.wait()
    version = emb.weight._version
    emb.weight.data[2050:2053] = 1.5  # rows of chunk 2, written through .data
    emb.weight.detach().numpy()[3000] = -4.0  # and through a NumPy view, same chunk
    assert emb.weight._version == version, "such writes do not bump the version counter"
    expected = emb.weight.detach().clone()
    second = ckpt.save()
    ckpt.wait()
    ckpt.close()
    assert first is not None and second is not None
    [_, staged] = local_events(tmp_path, "save_staged")
    assert staged.copied_bytes == CHUNK
    assert own_blobs(tmp_path, second) == {"model.bin": CHUNK, STATE_BLOB: own_blobs(tmp_path, second)[STATE_BLOB]}
    [_, committed] = local_events(tmp_path, "save_committed")
    assert committed.written_bytes == CHUNK + own_blobs(tmp_path, second)[STATE_BLOB]
    # The tensor's bytes: chunks 0-1 and 3 from the first checkpoint, chunk 2 from the second.
    doc = json.loads((tmp_path / second.key / STATE_BLOB).read_bytes())
    segments = [Segment(*s) for s in doc["components"]["model"]["tensors"][0]["segments"]]
    old = f"{first.name}/model.bin"
    assert segments == [Segment(old, 0, 2 * CHUNK), Segment("model.bin", 0, CHUNK), Segment(old, 3 * CHUNK, CHUNK)]
    restored = restored_state(tmp_path, second)["model"]["weight"]
    assert torch.equal(restored, expected) and restored[2051].eq(1.5).all() and restored[3000].eq(-4.0).all()
    assert not torch.equal(restored_state(tmp_path, first)["model"]["weight"], expected)


def test_fused_adamw_updates_are_saved_although_versions_do_not_change(tmp_path: Path) -> None:
    job = build(tmp_path, frozen=False, fused=True)
    expected: dict[CheckpointRef, dict[str, Any]] = {}
    for _ in range(4):
        versions = [p._version for p in job.model.parameters()]
        job.step()
        assert [p._version for p in job.model.parameters()] == versions
        ref = job.ckpt.save()
        assert ref is not None
        expected[ref] = job.state()
        job.ckpt.wait()
    job.ckpt.close()
    copied = [e.copied_bytes for e in local_events(tmp_path, "save_staged")]
    params = sum(p.numel() * 4 for p in job.model.parameters())
    assert all(c >= 3 * params for c in copied), "every parameter and its moments changed at every step"
    for ref, state in expected.items():
        assert not diff(restored_state(tmp_path, ref), state)


def test_a_zero_initialised_tensor_is_saved_on_the_first_save(tmp_path: Path) -> None:
    # Zero-initialised like a LoRA "B" matrix; 64 MiB, above glibc's largest mmap threshold, so that the new
    # slot is always fresh (zero) pages from the kernel.
    adapter = nn.Linear(4096, 4096, bias=False)
    nn.init.zeros_(adapter.weight)
    with spotsafe.Checkpointer(str(tmp_path), model=adapter, handle_signals=False, policy=Never()) as ckpt:
        ref = ckpt.save()
        ckpt.wait()  # raises AssertionError('a clean chunk always has a location')
    assert ref is not None
    assert torch.equal(restored_state(tmp_path, ref)["model"]["weight"], torch.zeros(4096, 4096))


def test_full_saves_with_incremental_off_repeat(tmp_path: Path) -> None:
    job = build(tmp_path, incremental=False)
    failures = []
    for _ in range(10):
        job.step()
        job.ckpt.save()
        try:
            job.ckpt.wait()
        except AssertionError as err:
            failures.append(str(err))
    job.ckpt.close()
    assert failures == []
    assert len(repo_of(tmp_path).committed()) == 10


# -- 4. every checkpoint of a chain restores bit-exact ---------------------------------------------


def test_every_checkpoint_of_an_incremental_chain_restores_bit_exact(run_url: str) -> None:
    job = build(run_url, keep=10)
    rows = job.model[0].weight  # frozen for the optimizer; we edit a few rows of one chunk per step
    expected: dict[CheckpointRef, dict[str, Any]] = {}
    for i in range(5):
        job.step()
        if i:
            rows.data[(i * 128) % 512] += float(i)
        ref = job.ckpt.save()
        assert ref is not None
        expected[ref] = job.state()
    job.ckpt.close()
    repo = repo_of(run_url)
    assert sorted(repo.committed()) == sorted(expected)
    owners = set()
    for ref, state in expected.items():
        repo.verify(ref)
        assert not diff(load_state(repo, ref).components, state), ref.name
        owners |= {b.checkpoint for b in repo.read_manifest(ref).shared}
    assert len(owners) >= 3, "later checkpoints share chunks written by several older ones"


# -- 5. retention and garbage collection of shared blobs ---------------------------------------


def _flip_byte(url: str, key: str, at: int) -> None:
    storage = open_storage(url)
    data = bytearray(storage.read(key))
    data[at] ^= 0x01
    storage.write_atomic(key, bytes(data))


def test_retention_keeps_shared_blobs_until_nothing_needs_them(run_url: str) -> None:
    job = build(run_url, keep=1)
    job.step()
    first = job.saved()
    for _ in range(3):
        job.step()
        job.ckpt.save()
        job.ckpt.wait()
    expected = job.state()
    job.ckpt.close()
    assert first is not None
    repo = repo_of(run_url)
    [kept] = repo.committed()
    assert kept.step == 4
    assert not repo.is_committed(first)
    assert files_of(run_url, first) == {"model.bin", "rng.bin"}  # the frozen backbone and the RNG state
    assert {(b.checkpoint, b.path) for b in repo.read_manifest(kept).shared} == {
        (first.name, "model.bin"),
        (first.name, "rng.bin"),
    }
    repo.verify(kept)  # reads the blobs of the deleted checkpoint's folder
    assert repo.shared_folders() == {first: 2}
    assert repo.folders() == [kept, first]

    again = build(run_url, keep=1)  # its start removes leftovers, but not shared files
    assert files_of(run_url, first) == {"model.bin", "rng.bin"}
    assert again.ckpt.restore() == 4
    assert not diff(again.state(), expected)
    again.step()
    after_restore = again.ckpt.save()  # shares what the restored checkpoint shared
    again.ckpt.wait()
    again.ckpt.close()
    assert after_restore is not None
    assert {b.checkpoint for b in repo.read_manifest(after_restore).shared} == {first.name}
    assert files_of(run_url, first) == {"model.bin", "rng.bin"}

    full = build(run_url, keep=1, async_save=False)  # a direct save writes everything
    assert full.ckpt.restore() == 5
    full.step()
    last = full.saved()
    expected = full.state()
    full.ckpt.close()
    assert last is not None
    assert repo.read_manifest(last).shared == ()
    assert repo.committed() == [last]
    assert repo.folders() == [last], "nothing references the first folder any more"
    assert files_of(run_url, first) == set()
    assert not diff(restored_state(run_url, last), expected)


def test_a_damaged_shared_blob_fails_its_referencing_checkpoints(run_url: str) -> None:
    job = build(run_url, keep=5)
    job.step()
    a = job.saved()
    job.step()
    b = job.saved()
    job.ckpt.step_done()  # step 3, nothing changed: everything but state.json is shared
    c = job.saved()
    job.ckpt.close()
    assert a is not None and b is not None and c is not None
    repo = repo_of(run_url)
    assert set(own_blobs(run_url, c)) == {STATE_BLOB}
    assert {(x.checkpoint, x.path) for x in repo.read_manifest(c).shared} >= {(b.name, "model.bin")}
    _flip_byte(run_url, f"{b.key}/model.bin", 100)  # the head's weights, written by b, shared by c
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        repo.verify(c)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        repo.verify(b)
    repo.verify(a)
    fresh = build(run_url, keep=5)
    assert fresh.ckpt.restore() == 1
    fresh.ckpt.close()
    skipped = run_events(run_url, "checkpoint_skipped")
    assert [(s.checkpoint, s.step) for s in skipped] == [(c.name, 3), (b.name, 2)]
    assert all("checksum" in s.reason for s in skipped)


def test_a_damaged_blob_of_a_deleted_checkpoint_fails_the_one_that_shares_it(tmp_path: Path) -> None:
    job = build(tmp_path, keep=1)
    job.step()
    first = job.saved()
    job.step()
    kept = job.saved()
    job.ckpt.close()
    assert first is not None and kept is not None
    assert repo_of(tmp_path).committed() == [kept]
    _flip_byte(str(tmp_path), f"{first.key}/model.bin", 12345)  # in the frozen backbone
    with pytest.raises(CorruptCheckpointError, match=f"{first.name}/model.bin fails its checksum"):
        repo_of(tmp_path).verify(kept)
    fresh = build(tmp_path, keep=1)
    with pytest.raises(NoUsableCheckpointError, match=f"{first.name}/model.bin fails its checksum"):
        fresh.ckpt.restore()  # committed progress that cannot be used is an error, not a fresh start
    fresh.ckpt.close()
    assert [s.checkpoint for s in local_events(tmp_path, "checkpoint_skipped")] == [kept.name]


# -- 6. manifests that point outside the checkpoints -------------------------------------------


def _committed_pair(run: Path) -> tuple[CheckpointRef, CheckpointRef]:
    job = build(run, keep=5)
    job.step()
    a = job.saved()
    job.step()
    b = job.saved()
    job.ckpt.close()
    assert a is not None and b is not None
    return a, b


@pytest.mark.parametrize(
    "owner",
    ["../x", "checkpoints", "g1", "", ".", "..", "g000001-step-000000000001-1795402769996-abcd/..", 5, ["g1"]],
    ids=repr,
)
def test_a_shared_entry_must_name_a_checkpoint_folder(tmp_path: Path, owner: Any) -> None:
    a, b = _committed_pair(tmp_path)
    path = tmp_path / b.key / MANIFEST_NAME
    doc = json.loads(path.read_bytes())
    shared = [blob for blob in doc["blobs"] if blob.get("checkpoint") == a.name]
    assert shared
    shared[0]["checkpoint"] = owner
    path.write_text(json.dumps(doc))
    with pytest.raises(UnsafeCheckpointError):
        Manifest.from_bytes(path.read_bytes())
    with pytest.raises(UnsafeCheckpointError):
        repo_of(tmp_path).read_manifest(b)
    fresh = build(tmp_path, keep=5)
    assert fresh.ckpt.restore() == 1
    fresh.ckpt.close()
    assert [s.checkpoint for s in local_events(tmp_path, "checkpoint_skipped")] == [b.name]


def test_a_manifest_that_shares_its_own_folder_is_refused(tmp_path: Path) -> None:
    _, b = _committed_pair(tmp_path)
    path = tmp_path / b.key / MANIFEST_NAME
    doc = json.loads(path.read_bytes())
    own = next(blob for blob in doc["blobs"] if blob["path"] == "model.bin")
    own["checkpoint"] = b.name
    path.write_text(json.dumps(doc))
    Manifest.from_bytes(path.read_bytes())  # well-formed on its own ...
    with pytest.raises(CorruptCheckpointError, match="own folder"):
        repo_of(tmp_path).read_manifest(b)  # ... but not as the manifest of that folder
    fresh = build(tmp_path, keep=5)
    assert fresh.ckpt.restore() == 1
    fresh.ckpt.close()
    pending = repo_of(tmp_path).begin(9)
    with pytest.raises(ValueError, match="another checkpoint"):
        pending.add_shared(BlobEntry("model.bin", 1, "0" * 32, pending.ref.name))
    with pytest.raises(ValueError, match="another checkpoint"):
        pending.add_shared(BlobEntry("model.bin", 1, "0" * 32))


def test_a_segment_must_name_a_blob_its_manifest_lists(tmp_path: Path) -> None:
    a, b = _committed_pair(tmp_path)
    repo = repo_of(tmp_path)
    manifest = repo.read_manifest(b)
    state_path = tmp_path / b.key / STATE_BLOB
    doc = json.loads(state_path.read_bytes())
    # Point the backbone at the optimizer blob of a, which b's manifest does not list (checksums fixed up).
    doc["components"]["model"]["tensors"][0]["segments"][0][0] = f"{a.name}/optimizer.bin"
    data = json.dumps(doc).encode()
    state_path.write_bytes(data)
    hasher = new_hasher()
    hasher.update(data)
    blobs = [
        BlobEntry(x.path, len(data), hasher.hexdigest()) if x.path == STATE_BLOB and x.checkpoint is None else x
        for x in manifest.blobs
    ]
    fixed = Manifest(manifest.step, manifest.created_at, tuple(blobs), manifest.metadata, manifest.writer)
    (tmp_path / b.key / MANIFEST_NAME).write_bytes(fixed.to_bytes())
    repo.verify(b)  # every listed blob is intact ...
    with pytest.raises(UnsafeCheckpointError, match="not in the manifest"):
        load_state(repo, b)  # ... but state.json reaches for one that is not listed
    fresh = build(tmp_path, keep=5)
    assert fresh.ckpt.restore() == 1
    fresh.ckpt.close()


def test_commit_refuses_when_a_shared_blob_is_gone_or_changed(tmp_path: Path) -> None:
    a, _ = _committed_pair(tmp_path)
    repo = repo_of(tmp_path)
    entry = next(x for x in repo.read_manifest(a).blobs if x.path == "model.bin")
    shared = BlobEntry(entry.path, entry.size, entry.checksum, a.name)

    pending = repo.begin(7)
    pending.add_shared(shared)
    pending.write_blob(STATE_BLOB, lambda: (b"{}",))
    (tmp_path / a.key / "model.bin").rename(tmp_path / "moved")
    with pytest.raises(CorruptCheckpointError, match="gone or changed"):
        pending.commit(metadata={}, writer={})
    assert not pending.committed and not repo.is_committed(pending.ref)

    (tmp_path / "moved").rename(tmp_path / a.key / "model.bin")
    with open(tmp_path / a.key / "model.bin", "ab") as handle:
        handle.write(b"\0")
    pending = repo.begin(8)
    pending.add_shared(shared)
    with pytest.raises(CorruptCheckpointError, match="gone or changed"):
        pending.commit(metadata={}, writer={})
    assert not repo.is_committed(pending.ref)
    # Without the check (a local staging copy), the same commit goes through.
    pending = repo.begin(9)
    pending.add_shared(shared)
    pending.commit(metadata={}, writer={}, verify_shared=False)
    assert repo.is_committed(pending.ref)


def test_a_save_whose_shared_blob_was_deleted_fails_and_commits_nothing(tmp_path: Path) -> None:
    job = build(tmp_path, keep=5)
    job.step()
    a = job.saved()
    assert a is not None
    (tmp_path / a.key / "model.bin").unlink()  # someone deletes the frozen backbone's blob
    job.step()
    b = job.ckpt.save()
    with pytest.raises(CorruptCheckpointError, match="gone or changed"):
        job.ckpt.wait()
    job.ckpt.close()
    assert b is not None
    assert repo_of(tmp_path).committed() == [a]
    assert not (tmp_path / b.key).exists()
    assert [e.step for e in local_events(tmp_path, "save_failed")] == [2]


def test_saves_recover_after_a_shared_blob_was_deleted(tmp_path: Path) -> None:
    job = build(tmp_path, keep=5)
    with job.ckpt:
        job.step()
        a = job.saved()
        assert a is not None
        (tmp_path / a.key / "model.bin").unlink()
        job.step()
        job.ckpt.save()
        with pytest.raises(CorruptCheckpointError, match="gone or changed"):
            job.ckpt.wait()
        job.step()
        expected = job.state()
        ref = job.ckpt.save()  # must write the backbone again instead of pointing at the missing blob
        job.ckpt.wait()  # raises CorruptCheckpointError again
    assert ref is not None
    assert not diff(restored_state(tmp_path, ref), expected)


# -- 7. bounded staging memory -------------------------------------------------------------------


def test_a_state_over_the_staging_budget_is_saved_directly(tmp_path: Path) -> None:
    budget = CHUNK  # the backbone alone is 2 MiB
    job = build(tmp_path, staging_budget=budget)
    job.step()
    expected = job.state()
    ref = job.ckpt.save()
    # Committed when save() returns: a direct save.
    assert ref is not None and not job.ckpt.saving
    assert repo_of(tmp_path).committed() == [ref]
    assert local_events(tmp_path, "save_staged") == []
    assert job.ckpt.staging_bytes <= budget
    job.step()
    second = job.ckpt.save()
    assert second is not None and repo_of(tmp_path).committed()[0] == second
    job.ckpt.close()
    assert local_events(tmp_path, "save_staged") == []
    assert job.ckpt.staging_bytes <= budget
    committed = local_events(tmp_path, "save_committed")
    assert [e.written_bytes == e.bytes for e in committed] == [True, True], "direct saves are full"
    assert repo_of(tmp_path).read_manifest(second).shared == ()
    assert not diff(restored_state(tmp_path, ref), expected)
    fresh = build(tmp_path)
    assert fresh.ckpt.restore() == 2
    fresh.ckpt.close()


def test_staging_memory_is_reported_and_reused(tmp_path: Path) -> None:
    job = build(tmp_path, staging_budget="64MiB", frozen=False)
    for _ in range(3):
        job.step()
        job.ckpt.save()
        job.ckpt.wait()
    reported = [e.staging_bytes for e in local_events(tmp_path, "save_staged")]
    tensors = sum(p.numel() * 4 for p in job.model.parameters()) * 3  # params, exp_avg, exp_avg_sq
    assert len(reported) == 3 and len(set(reported)) == 1
    assert tensors < reported[0] == job.ckpt.staging_bytes <= 64 * 2**20
    job.ckpt.close()


def staging_of(job: Job) -> StagingArea:
    return job.ckpt._saves.saver.area  # type: ignore[union-attr]


def test_staging_is_prepared_after_the_first_step_and_the_first_save_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touched_on: list[str] = []
    touch = staging._touch
    monkeypatch.setattr(staging, "_touch", lambda *a: (touched_on.append(threading.current_thread().name), touch(*a)))
    job = build(tmp_path, frozen=False)
    area = staging_of(job)
    job.step()  # the optimizer's state exists from here on: its slots are prepared in the background
    area.wait_prepared()
    prepared = {key: slot.buffer.data_ptr() for key, slot in area.slots.items()}
    params = sum(p.numel() * 4 for p in job.model.parameters())
    assert sum(slot.nbytes for slot in area.slots.values()) >= 3 * params  # params, exp_avg, exp_avg_sq
    assert touched_on and set(touched_on) == {"spotsafe-prepare"}  # not on the training thread
    expected = job.state()
    ref = job.saved()
    assert {key: slot.buffer.data_ptr() for key, slot in area.slots.items()} == prepared  # nothing allocated anew
    assert not diff(restored_state(tmp_path, ref), expected)
    job.step()
    expected = job.state()
    assert not diff(restored_state(tmp_path, job.saved()), expected)
    job.ckpt.close()


def test_a_save_does_not_wait_for_a_preparation_that_got_no_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a busy host the preparing thread may not have got far when the first save comes: the save stops it (it
    finishes the slot at hand) and allocates the rest itself."""
    started, stopped = threading.Event(), []

    def starved(buffer: Any, stop: threading.Event | None = None) -> None:
        started.set()
        assert stop is not None
        stopped.append(stop.wait(HANG_S))  # no CPU until someone asks: True once the save has asked

    monkeypatch.setattr(staging, "_touch", starved)
    job = build(tmp_path, frozen=False)
    area = staging_of(job)
    job.step()
    assert started.wait(HANG_S)
    expected = job.state()
    ref = job.saved()
    assert stopped == [True]  # the save asked the thread to stop, and it stopped after its first slot
    assert not diff(restored_state(tmp_path, ref), expected)
    assert len(area.slots) > 1  # the slots it did not reach were allocated by the save
    job.ckpt.close()


def test_after_a_restore_the_slots_no_loaded_bytes_became_are_prepared(tmp_path: Path) -> None:
    job = build(tmp_path, frozen=False, seed=5)
    job.step()
    job.saved()
    job.ckpt.close()
    again = build(tmp_path, frozen=False, seed=6)
    assert again.ckpt.restore() == 1
    area = staging_of(again)
    adopted = dict(area.slots)  # loaded bytes nothing uses (the rest was read into the live tensors, or is kept
    assert "optimizer" not in {key[0] for key in adopted}  # by the optimizer, which keeps the tensors it is given)
    assert ("rng", 0) in adopted
    area.wait_prepared()
    assert area.slots == adopted  # nothing is prepared during the first step: its own fresh memory comes first
    again.step()  # from its step_done() on
    area.wait_prepared()
    assert {key[0] for key in area.slots} >= {"model", "optimizer"}
    assert all(area.slots[key] is slot for key, slot in adopted.items())
    prepared = {key: slot.buffer.data_ptr() for key, slot in area.slots.items()}
    expected = again.state()
    ref = again.saved()
    assert {key: slot.buffer.data_ptr() for key, slot in area.slots.items()} == prepared
    assert not diff(restored_state(tmp_path, ref), expected)
    again.ckpt.close()


def test_no_staging_is_prepared_beyond_the_budget_or_for_direct_saves(tmp_path: Path) -> None:
    for name, options in (("small", {"staging_budget": "1MiB"}), ("direct", {"async_save": False})):
        job = build(tmp_path / name, frozen=False, **options)
        job.step()
        area = staging_of(job)
        area.wait_prepared()
        assert area.slots == {}
        expected = job.state()
        assert not diff(restored_state(tmp_path / name, job.saved()), expected)
        job.ckpt.close()


def test_async_save_false_commits_before_save_returns(tmp_path: Path) -> None:
    job = build(tmp_path, async_save=False)
    job.step()
    ref = job.ckpt.save()
    assert ref is not None and repo_of(tmp_path).committed() == [ref]
    assert local_events(tmp_path, "save_staged") == []
    job.ckpt.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1MiB", 2**20), ("2GB", 2 * 10**9), ("512 kib", 512 * 2**10), ("1.5GiB", 3 * 2**29), (7, 7), (None, None)],
)
def test_staging_budget_sizes_parse(tmp_path: Path, text: Any, expected: int | None) -> None:
    assert parse_budget(text) == expected  # None: no limit
    spotsafe.Checkpointer(str(tmp_path), model=nn.Linear(2, 2), staging_budget=text, handle_signals=False).close()


@pytest.mark.parametrize("bad", ["lots", "-1MB", "1.2.3GB", "", "GB", -5, True, 2.5, "1PB"], ids=repr)
def test_bad_staging_budgets_are_refused(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match="staging_budget"):
        spotsafe.Checkpointer(str(tmp_path), model=nn.Linear(2, 2), staging_budget=bad, handle_signals=False)


# -- 8. at most one save in flight ---------------------------------------------------------------


def test_an_interval_save_while_busy_is_deferred_with_skip(tmp_path: Path) -> None:
    storage = Gated(tmp_path)
    job = build(tmp_path, storage=storage, policy=spotsafe.every(steps=2), when_busy="skip")
    job.step()
    storage.gate.clear()
    assert job.step()  # step 2: staged, its write is held
    assert job.ckpt.saving
    assert not job.step()  # 3: not due
    assert not job.step()  # 4: due, busy: skipped
    assert not job.step()  # 5: still busy: deferred again, no second event
    storage.gate.set()
    until_idle(job.ckpt)
    assert job.step()  # 6: taken
    expected = job.state()
    job.ckpt.wait()
    job.ckpt.close()
    assert [(e.step, e.reason) for e in local_events(tmp_path, "save_skipped")] == [(4, "interval")]
    assert [e.step for e in local_events(tmp_path, "save_committed")] == [2, 6]
    assert [r.step for r in repo_of(tmp_path).committed()] == [6, 2]
    assert not diff(restored_state(tmp_path, repo_of(tmp_path).committed()[0]), expected)


def test_every_policy_step_is_saved_with_wait(tmp_path: Path) -> None:
    storage = Gated(tmp_path)
    job = build(tmp_path, storage=storage, policy=spotsafe.every(steps=2), when_busy="wait")
    job.step()
    storage.gate.clear()
    assert job.step()  # 2: staged, held
    job.step()
    assert job.ckpt.saving  # 2 is still being written when 4 is due
    release = threading.Timer(0.05, storage.gate.set)
    release.start()
    assert job.step()  # 4: waits for 2 to commit, then saves
    release.join()
    for _ in range(4):
        job.step()
    job.ckpt.finish()
    assert local_events(tmp_path, "save_skipped") == []
    assert [e.step for e in local_events(tmp_path, "save_committed")] == [2, 4, 6, 8]


# -- 9. overlap ----------------------------------------------------------------------------------


def _train_and_capture(
    run: Path, steps: int, seed: int, rng_draws: int, **kwargs: Any
) -> tuple[Job, dict[int, dict[str, Any]]]:
    job = build(run, frozen=False, policy=spotsafe.every(steps=1), seed=seed, **kwargs)
    torch.rand(rng_draws)  # the runs' RNG states differ (only model and optimizer must match)
    expected: dict[int, dict[str, Any]] = {}
    for _ in range(steps):
        job.step()
        expected[job.ckpt.step] = job.state()
    job.ckpt.finish()
    return job, expected


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_overlap_saves_the_same_bits_as_no_overlap(tmp_path: Path, fused: bool) -> None:
    # Same weights in both runs (and in no other test). The first job stays referenced while the second runs
    # and the RNG states differ, so that no new slot of the second lands on freed memory with the same bytes.
    seed = next(_SEEDS)
    first, plain = _train_and_capture(tmp_path / "plain", 5, seed, 1, overlap=False, fused=fused)
    second, overlapped = _train_and_capture(tmp_path / "overlap", 5, seed, 2, overlap=True, fused=fused)
    assert all(e.overlapped for e in local_events(tmp_path / "overlap", "save_staged"))
    assert not any(e.overlapped for e in local_events(tmp_path / "plain", "save_staged"))
    plain_refs = {r.step: r for r in repo_of(tmp_path / "plain").committed()}
    overlap_refs = {r.step: r for r in repo_of(tmp_path / "overlap").committed()}
    assert sorted(plain_refs) == sorted(overlap_refs) == [1, 2, 3, 4, 5]
    for step in plain_refs:
        a = restored_state(tmp_path / "plain", plain_refs[step])
        b = restored_state(tmp_path / "overlap", overlap_refs[step])
        assert not diff(b, plain[step]) and not diff(a, overlapped[step])
        assert not [d for name in ("model", "optimizer") for d in differences(a[name], b[name], name)]
    assert first is not second


def test_an_in_place_change_during_an_overlapped_copy_abandons_the_save(tmp_path: Path) -> None:
    job = build(tmp_path, frozen=False, overlap=True)
    job.step()
    good = job.saved()
    job.step()
    torn = job.ckpt.save()  # the optimizer-owned tensors are copied while the next step runs

    def touch() -> None:
        with torch.no_grad():
            job.model[0].weight.mul_(1.0)  # an in-place change in "forward": the copy may be torn

    job.train_step(forward_hook=touch)  # the optimizer step pre-hook judges the copy
    until_idle(job.ckpt)
    with pytest.raises(SnapshotTornError, match="modified while it was being copied"):
        job.ckpt.step_done()  # counts the step, then reports the failure
    job.step()  # reported once
    expected = job.state()
    after = job.saved()
    job.ckpt.close()
    assert good is not None and torn is not None and after is not None
    [failed] = local_events(tmp_path, "save_failed")
    assert failed.step == 2 and "SnapshotTornError" in failed.error
    assert [e.step for e in local_events(tmp_path, "save_committed")] == [1, 4]
    assert torn not in repo_of(tmp_path).committed() and not (tmp_path / torn.key).exists()
    assert not diff(restored_state(tmp_path, after), expected)


def test_overlap_needs_an_optimizer_and_async_saves(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="overlap"):
        spotsafe.Checkpointer(str(tmp_path), model=nn.Linear(2, 2), overlap=True, handle_signals=False)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="overlap"):
        spotsafe.Checkpointer(
            str(tmp_path), model=model, optimizer=optimizer, overlap=True, async_save=False, handle_signals=False
        )


# -- 10. a save in flight at exit is finished ------------------------------------------------------


def test_a_save_in_flight_when_the_process_ends_is_committed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import torch
        import spotsafe
        from spotsafe.storage.faults import SlowStorage
        from spotsafe.storage.local import LocalStorage
        from spotsafe.policy.interval import Never

        torch.manual_seed(0)
        model = torch.nn.Linear(256, 256)
        storage = SlowStorage(LocalStorage({str(run)!r}), latency=0.1)
        ckpt = spotsafe.Checkpointer(storage=storage, model=model, policy=Never(), handle_signals=False)
        for _ in range(3):
            ckpt.step_done()
        ckpt.save()
        assert ckpt.saving
        print("returning", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "returning" in done.stdout
    [ref] = repo_of(run).committed()
    assert ref.step == 3
    repo_of(run).verify(ref)
    torch.manual_seed(0)
    model = nn.Linear(256, 256)
    assert not differences(restored_state(run, ref)["model"], model.state_dict())


# -- 11. format 1 checkpoints still restore ------------------------------------------------------


def _write_format_1(run: Path, step: int, states: dict[str, Any]) -> CheckpointRef:
    """A checkpoint as spotsafe wrote it before format 2: per-component blob and per-tensor offsets."""
    snapshot = Snapshot.capture(step, states)
    name = f"g000001-step-{step:012d}-1795402769996-beef"
    ref = CheckpointRef.parse(name)
    assert ref is not None
    folder = run / ref.key
    folder.mkdir(parents=True)
    blobs: list[tuple[str, bytes]] = []
    index: dict[str, Any] = {}
    for part in snapshot.components:
        entries, _ = plan(part.tensors, part.blob_name)
        tensors = []
        for e in entries:
            offset = e.segments[0].offset if e.segments else 0
            tensors.append({"offset": offset, "nbytes": e.nbytes, "dtype": e.dtype, "shape": list(e.shape)})
        index[part.name] = {
            "tree": part.tree,
            "blob": part.blob_name if part.tensors else None,
            "tensors": tensors,
        }
        if part.tensors:
            blobs.append((part.blob_name, b"".join(bytes(c) for c in pack(part.tensors, entries))))
    state = {"format_version": 1, "step": step, "components": index}
    blobs.append((STATE_BLOB, json.dumps(state, separators=(",", ":")).encode()))
    listed = []
    for blob_name, data in blobs:
        (folder / blob_name).write_bytes(data)
        hasher = new_hasher()
        hasher.update(data)
        listed.append({"path": blob_name, "size": len(data), "checksum": hasher.hexdigest()})
    manifest = {
        "format": "spotsafe-checkpoint",
        "format_version": 1,
        "step": step,
        "created_at": 1795402769.996,
        "checksum_algorithm": "xxh3-128",
        "blobs": listed,
        "metadata": {},
        "writer": {"spotsafe": "0.0.9"},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
    return ref


def test_a_format_1_checkpoint_restores_bit_exact_and_seeds_incremental_saves(tmp_path: Path) -> None:
    source = build(tmp_path / "source")
    for _ in range(3):
        source.step()
    expected = source.state()
    states = {
        "model": source.model.state_dict(),
        "optimizer": source.optimizer.state_dict(),
        "progress": {"step": 3, "epoch": 0},
        "rng": GlobalRNG().state_dict(),
    }
    source.ckpt.close()
    run = tmp_path / "run"
    old = _write_format_1(run, 3, states)
    manifest_doc = json.loads((run / old.key / MANIFEST_NAME).read_bytes())
    assert manifest_doc["format_version"] == 1
    assert all("checkpoint" not in b for b in manifest_doc["blobs"])

    assert not diff(restored_state(run, old), expected)
    job = build(run, keep=5)
    assert job.ckpt.restore() == 3
    assert not diff(job.state(), expected)
    job.step()
    expected_next = job.state()
    ref = job.ckpt.save()  # format 2, sharing the frozen backbone with the format-1 checkpoint
    job.ckpt.wait()
    job.ckpt.close()
    assert ref is not None
    assert ("model.bin", old.name) in {(b.path, b.checkpoint) for b in repo_of(run).read_manifest(ref).shared}
    assert not diff(restored_state(run, ref), expected_next)
    assert [r.step for r in repo_of(run).committed()] == [4, 3]
