"""Several ranks under torchrun (gloo, 2 CPU processes): they stop, save, restore and finish together.

Each rank watches its own notice sources and gets the notice at its own moment: a
SIGTERM to one rank only, or the same emulated AWS notice seen by each rank's own
watcher at a different poll. The ranks must still save at the same step, and the
resumed run must end bit-identical, rank by rank, to an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spotsafe.cli.demo import compare_final
from spotsafe.engine.emergency_save import ALREADY_SAVED
from spotsafe.notices.emulator import ProviderEmulator
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.drill import DrillConfig
from spotsafe.supervisor.process import signal_tree
from spotsafe.supervisor.reference import ensure_reference
from spotsafe.supervisor.store import JobStore
from spotsafe.telemetry.events import Event
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import EXAMPLE, PROCESS_HANG_S, wait_until
from .test_drill import Drill, ended, write_trace

pytestmark = pytest.mark.e2e

STEPS = 100
ARGS = ["--steps", str(STEPS), "--samples", "256", "--save-every", "20", "--progress-interval", "0"]
RANKS = ("rank-00000", "rank-00001")


def torchrun(run: Path, env: dict[str, str] | None = None, ranks: int = 2) -> subprocess.Popen[bytes]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
    command = [
        *(launcher if ranks > 1 else [sys.executable]),
        str(EXAMPLE),
        "--run-dir",
        str(run),
        "--workers",
        "1",
        *ARGS,
    ]
    return subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float = PROCESS_HANG_S) -> int:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_tree(proc.pid, signal.SIGKILL)  # torchrun and its ranks, each in a session of its own
        raise
    if proc.returncode not in (0, 1):
        raise AssertionError(f"torchrun exited {proc.returncode}: {err.decode()[-2000:]}")
    return proc.returncode


def events(run: Path, rank: str, kind: str | None = None) -> list[Event]:
    found = [e.event for e in read_events(run / rank / EVENTS_FILE)]
    return [e for e in found if kind is None or e.type == kind]


def wait_for_step(run: Path, rank: str, step: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, "torchrun ended before the notice"
        if any(getattr(e, "step", 0) >= step for e in events(run, rank, "progress")):
            return
        time.sleep(0.05)
    raise AssertionError(f"{rank} never reached step {step}")


def stop_steps(run: Path, attempt: int) -> dict[str, int]:
    """Per rank: the step of this attempt's preempted exit (asserting a checkpoint committed there)."""
    out: dict[str, int] = {}
    for rank in RANKS:
        logged = events(run, rank)
        exits = [e for e in logged if e.type == "run_exited" and e.reason == "preempted"]  # type: ignore[attr-defined]
        assert len(exits) >= attempt, f"{rank}: no preempted exit in attempt {attempt}"
        step = exits[attempt - 1].step  # type: ignore[attr-defined]
        committed = [e.step for e in logged if e.type == "save_committed"]  # type: ignore[attr-defined]
        assert step in committed, f"{rank} stopped at {step} without a checkpoint there"
        out[rank] = step
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ddp-reference")
    assert finish(torchrun(run)) == 0
    return run


def test_ranks_stop_at_the_same_step_and_resume_bit_exact(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "ddp"

    # Attempt 1: SIGTERM to rank 1 only. Rank 0 learns of it through the step-boundary agreement.
    first = torchrun(run)
    wait_for_step(run, "rank-00001", 15, first)
    rank1_pid = next(e.pid for e in read_events(run / "rank-00001" / EVENTS_FILE) if e.event.type == "run_started")
    os.kill(rank1_pid, signal.SIGTERM)
    finish(first)
    steps = stop_steps(run, 1)
    assert steps["rank-00000"] == steps["rank-00001"] > 15
    planned = {rank: events(run, rank, "emergency_planned")[-1] for rank in RANKS}
    assert planned["rank-00001"].source == "SIGTERM"  # type: ignore[attr-defined]
    assert planned["rank-00000"].source == "another rank"  # type: ignore[attr-defined]
    assert events(run, "rank-00000", "notice_received") == []

    # Attempt 2: an emulated AWS notice, which each rank's own watcher sees at its own poll.
    with ProviderEmulator() as market:
        env = {**market.env(), "SPOTSAFE_NOTICES": "aws", "SPOTSAFE_NOTICE_POLL_SECONDS": "0.3"}
        second = torchrun(run, env)
        wait_for_step(run, "rank-00000", steps["rank-00000"] + 5, second)
        market.aws_interrupt(in_s=60)
        finish(second)
    again = stop_steps(run, 2)
    assert again["rank-00000"] == again["rank-00001"] > steps["rank-00000"]
    for rank in RANKS:
        (restored,) = [e for e in events(run, rank, "restore_completed")]
        assert restored.step == steps[rank] and restored.replayed_steps == 0  # type: ignore[attr-defined]

    # Damage rank 1's newest checkpoint: both ranks must restore the newest step they both have intact.
    newest = CheckpointRepository(LocalStorage(run / "rank-00001")).committed()[0]
    assert newest.step == again["rank-00001"]
    blob = run / "rank-00001" / newest.key / "state.json"
    blob.write_bytes(b"garbage" + blob.read_bytes()[7:])
    assert finish(torchrun(run)) == 0
    restored_steps = {rank: events(run, rank, "restore_completed")[-1].step for rank in RANKS}  # type: ignore[attr-defined]
    assert restored_steps["rank-00000"] == restored_steps["rank-00001"] < again["rank-00000"]
    assert [e.checkpoint for e in events(run, "rank-00001", "checkpoint_skipped")] == [newest.name]  # type: ignore[attr-defined]

    for rank in RANKS:
        ref_step, run_step, diffs = compare_final(reference / rank, run / rank)
        assert ref_step == run_step == STEPS
        assert {"model", "optimizer", "scheduler", "loader", "rng"} <= set(diffs)
        assert all(not d for d in diffs.values()), (rank, diffs)


def test_when_one_rank_has_nothing_usable_every_rank_refuses_to_start_over(reference: Path, tmp_path: Path) -> None:
    """Rank 1's checkpoints are all damaged: neither rank starts from step 0 (rank 0's alone would desync them)."""
    run = tmp_path / "ddp"
    shutil.copytree(reference, run)
    for ref in CheckpointRepository(LocalStorage(run / "rank-00001")).committed():
        blob = run / "rank-00001" / ref.key / "state.json"
        blob.write_bytes(b"garbage" + blob.read_bytes()[7:])
    before = sorted(p.name for rank in RANKS for p in (run / rank / "checkpoints").iterdir())
    assert finish(torchrun(run)) == 1  # torchrun's own code for failed workers; each worker exited 65
    for rank in RANKS:
        (failed,) = events(run, rank, "restore_failed")
        exits = events(run, rank, "run_exited")
        assert exits[-1].reason == "no_usable_checkpoint" and exits[-1].exit_code == 65  # type: ignore[attr-defined]
        assert all(e.time < failed.time for e in events(run, rank, "restore_fresh"))  # only the reference run's
    assert events(run, "rank-00001", "checkpoint_skipped")
    assert sorted(p.name for rank in RANKS for p in (run / rank / "checkpoints").iterdir()) == before


def checkpoint_files(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_size for p in run.rglob("checkpoints/**/*") if p.is_file()}


@pytest.mark.parametrize("ranks", [1, 3])
def test_a_two_rank_run_resumed_at_another_world_size_is_refused_naming_both(
    reference: Path, tmp_path: Path, ranks: int
) -> None:
    """Never a silent restart: 2 ranks' checkpoints resumed by 1 process or by 3 ranks stop every process with
    exit 2 (torchrun's own exit is 1), saying both numbers; no checkpoint is written or removed."""
    run = tmp_path / "ddp"
    shutil.copytree(reference, run)
    before = checkpoint_files(run)
    proc = torchrun(run, ranks=ranks)
    _, err = proc.communicate(timeout=PROCESS_HANG_S)
    assert proc.returncode == (2 if ranks == 1 else 1), err.decode()[-2000:]
    this_job = "one process" if ranks == 1 else f"{ranks} ranks"
    assert f"holds checkpoints written by 2 ranks ({run}/rank-00000 .. rank-00001); this job runs {this_job}" in (
        err.decode()
    )
    assert "torchrun --nproc-per-node 2" in err.decode()
    logs = [run / f"rank-{r:05d}" for r in range(ranks)] if ranks > 1 else [run]
    for folder in logs:
        exits = [e.event for e in read_events(folder / EVENTS_FILE) if e.event.type == "run_exited"]
        assert exits[-1].reason == "world_size_mismatch" and exits[-1].exit_code == 2  # type: ignore[attr-defined]
    assert checkpoint_files(run) == before


def test_a_one_process_run_resumed_by_two_ranks_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "single"
    assert finish(torchrun(run, ranks=1)) == 0
    before = checkpoint_files(run)
    proc = torchrun(run)
    _, err = proc.communicate(timeout=PROCESS_HANG_S)
    assert proc.returncode == 1
    assert f"{run} holds checkpoints written by one process ({run}); this job runs 2 ranks" in err.decode()
    assert "To go on from the checkpoint, run it as one process" in err.decode()
    assert checkpoint_files(run) == before


def test_distributed_true_without_torch_distributed_is_a_config_error(tmp_path: Path) -> None:
    import torch

    import spotsafe

    with pytest.raises(spotsafe.ConfigError, match=r"torch\.distributed initialised"):
        spotsafe.Checkpointer(tmp_path / "run", model=torch.nn.Linear(2, 2), distributed=True)


def test_each_rank_saves_under_its_own_folder() -> None:
    from spotsafe.engine.agreement import rank_url

    assert rank_url("s3://bucket/runs/lm/", 3) == "s3://bucket/runs/lm/rank-00003"
    assert rank_url("runs/lm", 0) == "runs/lm/rank-00000"


TORCHRUN_JOB = (
    *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"),
    *(str(EXAMPLE), "--workers", "1", *ARGS),
)
"""The example under torchrun, as ``spotsafe drill -- ...`` runs it (its location from $SPOTSAFE_CHECKPOINT_URL)."""


def drill_one_outage(tmp_path: Path, command: tuple[str, ...]) -> tuple[Drill, Any, Path, Path]:
    """``spotsafe drill`` of a torchrun ``command``: a reference run, then one outage (SIGTERM to torchrun at
    1 s, once a first checkpoint is committed; capacity back at 2 s). The drill, its report, run and store."""
    reference = tmp_path / "reference"
    ensure_reference(command, reference, lambda line: None)
    trace = write_trace(tmp_path / "zone.json", [1, 0] + [1] * 20)  # one outage at 1 s, capacity back at 2 s
    workdir = tmp_path / "drill"
    run, store = workdir / "run", workdir / "jobs.sqlite"
    config = DrillConfig(
        command=command,
        workdir=workdir,
        reference=reference,
        trace=str(trace),
        trace_start_s=0,
        time_scale=60.0,
        mode="sigterm",
        window_s=60.0,
        max_interruptions=2,
    )

    def driver(drill: Drill) -> None:
        wait_until(lambda: events(run, "rank-00000", "save_committed"), "a first checkpoint", timeout=PROCESS_HANG_S)
        drill.clock.set(1.0)
        drill.wait_events(1)
        wait_until(lambda: ended(store, 1), "attempt 1 to stop", timeout=PROCESS_HANG_S)
        drill.clock.set(2.0)  # capacity is back: the supervisor relaunches

    drill = Drill(config)
    report = drill.run(driver)
    assert report.ok and report.identical, (report, drill.lines)
    assert report.final_step_reference == report.final_step_drill == STEPS
    assert report.interruptions == 1
    # Every rank saves at the notice, unless the ranks agreed to stop at a step that was just saved (an interval
    # save, or the restored one): then nothing new is saved, and the drill counts no emergency save.
    planned = [e for rank in RANKS for e in events(run, rank, "emergency_planned")]
    assert len(planned) == 2, planned
    already = {getattr(e, "choice", None) for e in planned} == {ALREADY_SAVED}
    assert report.emergency_saves == (0 if already else 1), planned
    return drill, report, run, store


def test_a_drill_of_a_torchrun_job_preempts_every_rank_and_proves_each_identical(tmp_path: Path) -> None:
    """The market's SIGTERM goes to torchrun, which passes it to its workers: both save at the same step and exit
    75, torchrun exits 1 (its SignalException), and the supervisor counts a preemption, not a crash. The drill
    finds the reference's checkpoints in its rank folders and compares the two runs rank by rank."""
    _, report, run, store = drill_one_outage(tmp_path, TORCHRUN_JOB)
    ranked = {f"{rank}/{name}" for rank in RANKS for name in ("model", "optimizer", "scheduler", "loader", "rng")}
    assert ranked <= set(report.component_diffs) and not any(report.component_diffs.values())
    with JobStore(store) as jobs:
        attempts = [a for a in jobs.attempts("drill") if a.exit_class != "no_capacity"]
    assert [(a.exit_code, a.exit_class) for a in attempts] == [(1, "preempted"), (0, "succeeded")]
    stopped = stop_steps(run, 1)
    assert stopped["rank-00000"] == stopped["rank-00001"] == attempts[0].step_after
    assert report.checkpoints_committed >= 2  # rank 0's events stand for the run


def test_a_drill_of_a_sharded_torchrun_job_compares_the_one_checkpoint_of_all_ranks(tmp_path: Path) -> None:
    """With sharded=True the ranks save one checkpoint at the run's location; the drill compares the
    reference's and the drilled run's final checkpoints whole (tensors assembled from both ranks' chunks)."""
    _, report, run, _ = drill_one_outage(tmp_path, (*TORCHRUN_JOB, "--sharded"))
    whole = {"model", "optimizer", "scheduler", "loader", "progress", "rank-00000", "rank-00001"}
    assert whole <= set(report.component_diffs) and not any(report.component_diffs.values())
    repo = CheckpointRepository(LocalStorage(run))
    assert repo.read_manifest(repo.committed()[0]).metadata["world_size"] == 2
