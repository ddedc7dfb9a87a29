"""Checkpoints written by another number of processes are refused, never silently restarted (spotsafe.engine.world).

The torchrun cases (2 ranks resumed by 1 or 3, 1 process resumed by 2) are in test_distributed.py; here the
rule itself and the one-process side, on real folders.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import spotsafe
from spotsafe.engine.world import SavedLayout, mismatch, saved_layout
from spotsafe.exit_codes import EXIT_USAGE
from spotsafe.storage.local import LocalStorage
from spotsafe.telemetry.log import EVENTS_FILE, read_events


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
