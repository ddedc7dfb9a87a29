"""Checkpointer(sharded=True): one checkpoint for all ranks, resumed bit-exactly, and at another world size.

Real ranks (gloo on CPU) run tests/jobs/sharded_job.py: FSDP2 or DDP, AdamW, OneCycleLR, dropout, an
ElasticLoader. A run interrupted (SIGTERM to one rank, or stopped and started again) ends bit-identical to
an uninterrupted one at the same world size; a run that goes 2 -> 1 -> 3 ranks trains on every sample of the
epoch once.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import spotsafe
from spotsafe.engine.agreement import rank_url
from spotsafe.engine.emergency_save import ALREADY_SAVED
from spotsafe.exit_codes import EXIT_PREEMPTED, EXIT_USAGE
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.telemetry import EVENTS_FILE, read_events

from .conftest import wait_until
from .test_sharded import assert_equal_trees
from .test_sharded import finish as finish_ranks
from .test_sharded import start as start_ranks
from .test_world_size import save_one

JOB = Path(__file__).parent / "jobs" / "sharded_job.py"

pytestmark = pytest.mark.e2e


def start(world: int, **options: Any) -> list[subprocess.Popen[bytes]]:
    return start_ranks(JOB, world, json.dumps(options))


def finish(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    return finish_ranks(procs, ok=(0, EXIT_PREEMPTED))


def run(world: int, **options: Any) -> list[int]:
    return finish(start(world, **options))


def final(out: Path, launch: str) -> dict[str, Any]:
    return dict(torch.load(out / f"final-{launch}.pt", weights_only=False))  # the test's own file


def test_a_sigterm_to_one_rank_stops_both_and_the_resumed_fsdp_run_is_bit_identical(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    common = dict(out=str(out), kind="fsdp", steps=300)  # ranks act on a notice at their next exchange step
    assert run(2, url=str(tmp_path / "reference"), launch="ref", **common) == [0, 0]
    url = str(tmp_path / "run")
    procs = start(2, url=url, launch="first", signals=True, pause_at=5, **common)
    wait_until(lambda: (out / "paused-0").exists() and (out / "paused-1").exists(), "both ranks at step 5")
    procs[1].send_signal(signal.SIGTERM)  # one rank only: the other learns of it through the exchange
    (out / "go").touch()
    assert finish(procs) == [EXIT_PREEMPTED, EXIT_PREEMPTED]
    repo = CheckpointRepository(LocalStorage(url))
    newest = repo.read_manifest(repo.committed()[0])
    assert newest.metadata["layout"] == "sharded" and newest.metadata["world_size"] == 2
    assert 5 < newest.step < 300
    # Every rank stopped at the step of the newest checkpoint. Its save is the notice's, unless the ranks
    # agreed to stop at a step the interval policy (every 3 steps) had just saved: then nothing new is saved.
    logs = [Path(rank_url(url, rank)) / EVENTS_FILE for rank in (0, 1)]
    planned = [e.event for log in logs for e in read_events(log) if e.event.type == "emergency_planned"]
    assert len(planned) == 2 and {e.step for e in planned} == {newest.step}
    expected = "interval" if {e.choice for e in planned} == {ALREADY_SAVED} else "notice"
    assert newest.writer["reason"] == expected and (expected == "notice" or newest.step % 3 == 0)
    assert run(2, url=url, launch="second", **common) == [0, 0]
    assert json.loads((out / "restored-second.json").read_text())["step"] == newest.step
    assert_equal_trees(final(out, "ref"), final(out, "second"))


def test_a_ddp_run_stopped_and_started_again_is_bit_identical(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert run(2, url=str(tmp_path / "reference"), out=str(out), kind="ddp", steps=10, launch="ref") == [0, 0]
    url = str(tmp_path / "run")
    assert run(2, url=url, out=str(out), kind="ddp", steps=4, launch="first") == [0, 0]
    assert run(2, url=url, out=str(out), kind="ddp", steps=10, launch="second") == [0, 0]
    assert_equal_trees(final(out, "ref"), final(out, "second"))


def test_a_run_through_2_then_1_then_3_ranks_trains_on_every_sample_of_the_epoch_once(tmp_path: Path) -> None:
    out, url = tmp_path / "out", str(tmp_path / "run")
    out.mkdir()
    # 48 samples, batches of 2: 4 steps at 2 ranks (16), 4 at 1 rank (8), 4 at 3 ranks (24): one epoch.
    plan = [("a", 2, 4), ("b", 1, 8), ("c", 3, 12)]
    for launch, world, steps in plan:
        assert run(world, url=url, out=str(out), kind="fsdp", steps=steps, launch=launch) == [0] * world
    served = Counter(
        i
        for launch, world, _ in plan
        for r in range(world)
        for i in json.loads((out / f"ids-{launch}-{r}.json").read_text())
    )
    assert sorted(served) == list(range(48)) and set(served.values()) == {1}
    restored = [json.loads((out / f"restored-{launch}.json").read_text()) for launch, _, _ in plan]
    assert restored == [{"step": 0, "world": 2}, {"step": 4, "world": 1}, {"step": 8, "world": 3}]
    repo = CheckpointRepository(LocalStorage(url))
    assert repo.read_manifest(repo.committed()[0]).metadata["world_size"] == 3


def test_one_process_resumes_bit_exactly(tmp_path: Path) -> None:
    def train(steps: int, url: Path) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2)
        ckpt = spotsafe.Checkpointer(
            url, model=model, optimizer=optimizer, scheduler=scheduler, sharded=True, notices=[], handle_signals=False
        )
        ckpt.restore()
        while ckpt.step < steps:
            model(torch.randn(2, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            ckpt.step_done()
        ckpt.finish()
        return model.weight.detach().clone()

    straight = train(5, tmp_path / "straight")
    train(3, tmp_path / "resumed")
    assert torch.equal(train(5, tmp_path / "resumed"), straight)


def test_sharded_true_refuses_checkpoints_written_rank_by_rank(tmp_path: Path) -> None:
    for rank in (0, 1):
        save_one(tmp_path / f"rank-{rank:05d}", steps=2)
    ckpt = spotsafe.Checkpointer(tmp_path, model=torch.nn.Linear(2, 2), sharded=True, handle_signals=False, notices=[])
    with pytest.raises(spotsafe.WorldSizeMismatchError) as raised:
        ckpt.restore()
    ckpt.close()
    assert raised.value.code == EXIT_USAGE and "sharded=False and 2 ranks" in str(raised.value)


def test_what_sharded_true_does_not_do_yet_is_refused_at_construction(tmp_path: Path) -> None:
    for options in ({"overlap": True}, {"stage_dir": tmp_path / "stage"}):
        with pytest.raises(spotsafe.ConfigError, match="sharded=True"):
            spotsafe.Checkpointer(tmp_path / "run", model=torch.nn.Linear(2, 2), sharded=True, **options)
