"""Checkpoints written by another number of processes are refused, never silently restarted (spotsafe.engine.world).

The torchrun cases (2 ranks resumed by 1 or 3, 1 process resumed by 2) are in test_distributed.py; here the
rule itself and the one-process side, on real folders.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spotsafe
from spotsafe.engine.world import SavedLayout, mismatch, saved_layout
from spotsafe.exit_codes import EXIT_USAGE
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import PROCESS_HANG_S


def save_one(url: Path, steps: int = 1) -> None:
    ckpt = spotsafe.Checkpointer(url, model=torch.nn.Linear(2, 2), handle_signals=False, notices=[])
    ckpt.restore()
    for _ in range(steps):
        ckpt.step_done()
    ckpt.save()
    ckpt.close()


@pytest.mark.parametrize(
    ("layout", "world_size", "refused"),
    [
        (SavedLayout(), 1, None),
        (SavedLayout(), 3, None),
        (SavedLayout(single=True), 1, None),
        (SavedLayout(single=True), 2, 1),
        (SavedLayout(ranks=frozenset({0, 1})), 1, 2),
        (SavedLayout(ranks=frozenset({0, 1})), 2, None),
        (SavedLayout(ranks=frozenset({0, 1})), 3, 2),
        (SavedLayout(ranks=frozenset({0, 1, 2})), 2, 3),
        (SavedLayout(ranks=frozenset({1})), 2, None),  # rank 0's checkpoints lost: the restore refuses (exit 65)
        (SavedLayout(single=True, ranks=frozenset({0, 1})), 1, None),  # its own checkpoints come first
        (SavedLayout(single=True, ranks=frozenset({0, 1})), 2, None),
    ],
)
def test_the_rule(layout: SavedLayout, world_size: int, refused: int | None) -> None:
    assert mismatch(layout, world_size) == refused


def test_the_layout_counts_only_folders_with_a_committed_checkpoint(tmp_path: Path) -> None:
    save_one(tmp_path / "rank-00000")
    save_one(tmp_path / "rank-00002")
    (tmp_path / "rank-00001" / "checkpoints" / "ckpt-000000000001-x").mkdir(parents=True)  # never committed
    (tmp_path / "rank-00003").mkdir()
    (tmp_path / "rank-3").mkdir()  # not a rank folder's name
    save_one(tmp_path / "rank-3")
    assert saved_layout(LocalStorage(tmp_path)) == SavedLayout(single=False, ranks=frozenset({0, 2}))
    assert saved_layout(LocalStorage(tmp_path / "rank-00000")) == SavedLayout(single=True)


def test_one_process_on_two_ranks_checkpoints_exits_2_saying_both_numbers(tmp_path: Path) -> None:
    for rank in (0, 1):
        save_one(tmp_path / f"rank-{rank:05d}", steps=3)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "checkpoints" in p.parts)
    ckpt = spotsafe.Checkpointer(tmp_path, model=torch.nn.Linear(2, 2), handle_signals=False, notices=[])
    with pytest.raises(spotsafe.WorldSizeMismatchError) as raised:
        ckpt.restore()
    ckpt.close()
    error = raised.value
    assert (error.saved, error.world_size, error.code) == (2, 1, EXIT_USAGE)
    assert isinstance(error, SystemExit) and isinstance(error, spotsafe.CheckpointMismatchError)
    assert f"{tmp_path} holds checkpoints written by 2 ranks" in str(error)
    assert "this job runs one process" in str(error) and "torchrun --nproc-per-node 2" in str(error)
    logged = [e.event for e in read_events(tmp_path / EVENTS_FILE)]
    assert [e.type for e in logged][-2:] == ["restore_failed", "run_exited"]
    assert logged[-1].reason == "world_size_mismatch" and logged[-1].exit_code == EXIT_USAGE  # type: ignore[attr-defined]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "checkpoints" in p.parts) == before


def test_one_process_with_checkpoints_of_its_own_resumes_them(tmp_path: Path) -> None:
    save_one(tmp_path, steps=4)
    save_one(tmp_path / "rank-00000")
    save_one(tmp_path / "rank-00001")
    ckpt = spotsafe.Checkpointer(tmp_path, model=torch.nn.Linear(2, 2), handle_signals=False, notices=[])
    assert ckpt.restore() == 4
    ckpt.close()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).with_name("spotsafe")), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=PROCESS_HANG_S)


def test_ls_verify_inspect_and_gc_go_rank_by_rank(tmp_path: Path) -> None:
    for rank in (0, 1):
        for steps in (2, 3, 4, 5):  # checkpoints at steps 2, 5, 9 and 14
            save_one(tmp_path / f"rank-{rank:05d}", steps=steps)
    listed = cli("ls", str(tmp_path))
    assert listed.returncode == 0, listed.stderr
    assert "rank-00000 (rank 0; 2 rank folders)" in listed.stdout and f"checkpoints in {tmp_path}/rank-00001" in (
        listed.stdout
    )
    doc = json.loads(cli("ls", "--json", str(tmp_path)).stdout)
    assert sorted(doc["ranks"]) == ["rank-00000", "rank-00001"]
    assert [row["step"] for row in doc["ranks"]["rank-00001"]] == [14, 9, 5, 2]
    assert json.loads(cli("inspect", "--json", str(tmp_path)).stdout)["ranks"]["rank-00000"]["step"] == 14
    assert cli("verify", str(tmp_path)).returncode == 0

    rank1 = CheckpointRepository(LocalStorage(tmp_path / "rank-00001"))
    for newest in rank1.committed()[:2]:  # rank 1's steps 14 and 9 damaged: its newest intact is step 5
        blob = tmp_path / "rank-00001" / newest.key / "state.json"
        blob.write_bytes(b"garbage" + blob.read_bytes()[7:])
    damaged = cli("verify", str(tmp_path))
    assert damaged.returncode == 1 and "OK" in damaged.stdout  # rank 0's is fine; rank 1's is not
    # Alone, rank 0 would keep step 14 only; rank 1 keeps 14 (the newest) down to 5 (its newest intact). Together,
    # rank 0 keeps 9 and 5 too: step 5 is the one a restore of both ranks can use.
    done = cli("gc", "--keep", "1", "--apply", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "another rank keeps step 5" in done.stdout
    for rank in (0, 1):
        steps = [r.step for r in CheckpointRepository(LocalStorage(tmp_path / f"rank-{rank:05d}")).committed()]
        assert steps == [14, 9, 5], (rank, steps)


def test_a_checkpointer_refuses_a_sharded_checkpoint_naming_what_reads_it(tmp_path: Path) -> None:
    from spotsafe import sharded

    sharded.save({"model": torch.nn.Linear(2, 2).state_dict()}, tmp_path, step=5)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    ckpt = spotsafe.Checkpointer(tmp_path, model=torch.nn.Linear(2, 2), handle_signals=False, notices=[])
    with pytest.raises(spotsafe.WorldSizeMismatchError) as raised:
        ckpt.restore()
    ckpt.close()
    assert raised.value.code == EXIT_USAGE and "spotsafe.sharded.load" in str(raised.value)
    assert all(p in sorted(q.relative_to(tmp_path) for q in tmp_path.rglob("*")) for p in before)  # nothing deleted
