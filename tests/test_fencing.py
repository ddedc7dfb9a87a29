"""Writer generations: a stale writer (a zombie from an earlier attempt) can neither publish nor delete.

Every test runs on a local folder and on the S3 server (``run_url``).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
import torch
from torch import nn

from spotsafe.engine.persist import persist
from spotsafe.engine.reader import load_newest_valid
from spotsafe.errors import PermanentError
from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.base import Storage
from spotsafe.storage.fencing import WRITERS, Claim, FencedError, WriterLease, claims
from spotsafe.storage.manifest import MANIFEST_NAME
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CHECKPOINTS, LATEST, CheckpointRef, CheckpointRepository


def acquire(storage: Storage, attempt: int) -> WriterLease:
    return WriterLease.acquire(storage, run_id="run", attempt=attempt, clock=lambda: 1_700_000_000.0 + attempt)


def model_state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def save(repo: CheckpointRepository, step: int, generation: int) -> CheckpointRef:
    ref, _ = persist(
        repo, Snapshot.capture(step, model_state(step)), metadata={}, writer={"gen": generation}, generation=generation
    )
    return ref


@pytest.fixture
def storage(run_url: str) -> Storage:
    return open_storage(run_url)


def test_generations_count_up_and_the_newest_fences_the_older(storage: Storage) -> None:
    first = acquire(storage, 1)
    assert first.generation == 1
    first.check()
    second = acquire(storage, 2)
    assert second.generation == 2
    second.check()
    with pytest.raises(FencedError) as info:
        first.check()
    assert isinstance(info.value, PermanentError)
    assert "generation 1 is stale" in str(info.value) and "generation 2" in str(info.value)
    third = acquire(storage, 3)
    assert third.generation == 3
    for stale in (first, second):
        with pytest.raises(FencedError):
            stale.check()
    assert [c.generation for c in claims(storage)] == [3, 2, 1]


def test_a_claim_records_who_claimed(storage: Storage) -> None:
    lease = acquire(storage, 4)
    record = json.loads(storage.read(lease.claim.key))
    assert record["generation"] == 1
    assert (record["run_id"], record["attempt"], record["claimed_at"]) == ("run", 4, 1_700_000_004.0)
    assert {"host", "pid"} <= set(record)
    assert storage.list_files(WRITERS) == [lease.claim.key.split("/")[-1]]


def test_claims_ignore_foreign_files(storage: Storage) -> None:
    storage.write_atomic(f"{WRITERS}/notes.txt", b"hello")
    storage.write_atomic(f"{WRITERS}/gen-999999-zzzzzzzz.json", b"{}")  # not hex: not a claim
    storage.write_atomic(f"{WRITERS}/gen-7-abcdef01.json", b"{}")  # not six digits: not a claim
    assert claims(storage) == []
    assert acquire(storage, 1).generation == 1


@pytest.fixture
def fenced(storage: Storage) -> tuple[CheckpointRepository, CheckpointRepository, WriterLease, WriterLease]:
    """A zombie (generation 1) and its replacement (generation 2), each with a fenced repository."""
    old = acquire(storage, 1)
    old_repo = CheckpointRepository(storage, fence=old.check)
    new = acquire(storage, 2)
    new_repo = CheckpointRepository(storage, fence=new.check)
    return old_repo, new_repo, old, new


def test_a_stale_writer_cannot_commit(fenced: Any, storage: Storage) -> None:
    old_repo, new_repo, _, new = fenced
    current = save(new_repo, 5, new.generation)
    before = new_repo.committed()
    pending = old_repo.begin(9, 1)
    pending.write_blob("model.bin", lambda: [b"zombie bytes"])
    with pytest.raises(FencedError):
        pending.commit(metadata={}, writer={})
    assert not pending.committed
    assert not storage.exists(f"{pending.ref.key}/{MANIFEST_NAME}")
    assert new_repo.committed() == before == [current]
    # and through persist: the zombie's partial folder is cleaned up, nothing becomes visible
    with pytest.raises(FencedError):
        save(old_repo, 10, 1)
    assert new_repo.committed() == [current]
    assert [ref.step for ref in new_repo.folders()] == [5, 9]


def test_a_stale_writer_cannot_write_the_latest_hint(fenced: Any, storage: Storage) -> None:
    old_repo, new_repo, _, new = fenced
    current = save(new_repo, 5, new.generation)
    new_repo.write_latest(current)
    with pytest.raises(FencedError):
        old_repo.write_latest(CheckpointRef(1, 99, 1, "g000001-step-000000000099-0000000000001-abcd"))
    assert new_repo.read_latest() == current
    assert json.loads(storage.read(LATEST))["checkpoint"] == current.name


def test_a_stale_writer_cannot_delete(fenced: Any, storage: Storage) -> None:
    old_repo, new_repo, _, new = fenced
    current = save(new_repo, 5, new.generation)
    with pytest.raises(FencedError):
        old_repo.delete(current)
    assert new_repo.committed() == [current]
    assert storage.exists(f"{current.key}/{MANIFEST_NAME}")
    new_repo.verify(current)


def test_a_stale_writer_cannot_remove_leftovers(fenced: Any, storage: Storage) -> None:
    old_repo, new_repo, _, new = fenced
    current = save(new_repo, 5, new.generation)
    in_progress = new_repo.begin(6, new.generation)  # the current writer's save in progress
    in_progress.write_blob("model.bin", lambda: [b"being written"])
    with pytest.raises(FencedError):
        old_repo.remove_leftovers()
    assert storage.exists(f"{in_progress.ref.key}/model.bin")
    in_progress.commit(metadata={}, writer={})
    assert new_repo.committed() == [in_progress.ref, current]


def test_a_stale_writer_cannot_remove_temporary_files(fenced: Any, storage: Storage) -> None:
    old_repo, new_repo, _, new = fenced
    current = save(new_repo, 5, new.generation)
    stray = f"{current.key}/.{MANIFEST_NAME}.tmp-0a1b2c3d"
    storage.write_atomic(stray, b"{")
    with pytest.raises(FencedError):
        old_repo.remove_leftovers()
    assert storage.exists(stray)


def test_the_current_writer_can_do_everything(fenced: Any, storage: Storage) -> None:
    _, new_repo, _, new = fenced
    first = save(new_repo, 5, new.generation)
    second = save(new_repo, 6, new.generation)
    new_repo.write_latest(second)
    new_repo.delete(first)
    leftover = new_repo.begin(7, new.generation)
    leftover.write_blob("model.bin", lambda: [b"x"])
    assert new_repo.remove_leftovers() == [leftover.ref.key]
    assert new_repo.committed() == [second]


def test_a_zombies_higher_step_ranks_below_the_new_generation(fenced: Any, storage: Storage) -> None:
    _, new_repo, old, new = fenced
    current = save(new_repo, 10, new.generation)
    # The zombie checked its fence just before the new writer claimed, then committed: step 50 > 10.
    unfenced_zombie = CheckpointRepository(storage)
    zombie = save(unfenced_zombie, 50, old.generation)
    assert zombie.step > current.step
    assert new_repo.committed() == [current, zombie]
    assert new_repo.candidates() == [current, zombie]
    restored = load_newest_valid(new_repo)
    assert restored is not None
    assert restored.checkpoint.ref == current
    assert restored.step == 10
    assert restored.checkpoint.manifest.writer == {"gen": 2}
    # A pointer to the zombie's checkpoint does not change that either.
    unfenced_zombie.write_latest(zombie)
    restored = load_newest_valid(new_repo)
    assert restored is not None and restored.checkpoint.ref == current


def test_two_writers_claiming_the_same_generation(storage: Storage) -> None:
    """Both saw no claims and both wrote generation 1: the higher random suffix wins, the other is stale."""
    low = Claim(1, "0a0a0a0a")
    high = Claim(1, "f0f0f0f0")
    for claim in (high, low):
        storage.write_atomic(claim.key, json.dumps({"generation": 1}).encode())
    leases = [WriterLease(storage, low), WriterLease(storage, high)]
    current = []
    for lease in leases:
        try:
            lease.check()
            current.append(lease)
        except FencedError:
            pass
    assert current == [leases[1]]
    assert claims(storage) == [high, low]
    assert acquire(storage, 3).generation == 2
    for lease in leases:
        with pytest.raises(FencedError):
            lease.check()


class BlindListing:
    """Writers that start at the same instant: the claims listing is empty for the first ``blind`` calls."""

    def __init__(self, inner: Storage, blind: int) -> None:
        self.inner = inner
        self.blind = blind

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def list_files(self, prefix: str) -> list[str]:
        if prefix == WRITERS and self.blind:
            self.blind -= 1
            return []
        return self.inner.list_files(prefix)


def test_a_race_between_two_acquires_leaves_exactly_one_current(storage: Storage) -> None:
    a = WriterLease.acquire(BlindListing(storage, 1), run_id="run", attempt=1)  # type: ignore[arg-type]
    b_lease: WriterLease | None = None
    with contextlib.suppress(FencedError):  # b may lose the tie-break while still acquiring
        b_lease = WriterLease.acquire(BlindListing(storage, 1), run_id="run", attempt=2)  # type: ignore[arg-type]
    found = claims(storage)
    assert [c.generation for c in found] == [1, 1]
    current = []
    for lease in (a, b_lease):
        if lease is None:
            continue
        try:
            lease.check()
            current.append(lease.claim)
        except FencedError:
            pass
    assert current == [max(found)]
    assert (b_lease is None) == (max(found) == a.claim)


def test_folders_from_both_generations_keep_their_generation(fenced: Any, storage: Storage) -> None:
    old_repo, new_repo, old, new = fenced
    current = save(new_repo, 3, new.generation)
    assert current.name.startswith("g000002-step-000000000003-")
    stale = old_repo.begin(4, old.generation)
    stale.write_blob("model.bin", lambda: [b"zombie"])
    assert stale.ref.name.startswith("g000001-step-000000000004-")
    assert new_repo.folders() == [current, stale.ref]
    assert new_repo.committed() == [current]
    assert all(key.startswith((f"{CHECKPOINTS}/", f"{WRITERS}/")) for key in storage.find(""))
    # The current writer may clear the zombie's save in progress: it would rank below anyway.
    assert new_repo.remove_leftovers() == [stale.ref.key]
