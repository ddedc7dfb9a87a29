"""End to end: the example job in real subprocesses, killed with real signals, resumed, compared bit for bit."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from spotsafe.cli.demo import compare_final, run_reference
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.chaos import DEFAULT_MODES, ChaosRun, KillMode
from spotsafe.telemetry.log import EVENTS_FILE, LoggedEvent, read_events
from spotsafe.telemetry.store import read_run_events

from .conftest import EXAMPLE, ROOT, S3Server

pytestmark = pytest.mark.e2e

SMALL = ["--steps", "160", "--samples", "384", "--save-every", "20", "--progress-interval", "0", "--log-every", "1000"]


def example(*extra: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), *SMALL, *extra]


def assert_sigterm_loses_no_steps(logged: Iterable[LoggedEvent]) -> None:
    """Every preempted exit has a checkpoint committed by the same process at exactly that step."""
    committed: set[tuple[int, int]] = set()
    preempted: list[tuple[int, int]] = []
    for item in logged:
        if item.event.type == "save_committed":
            committed.add((item.pid, item.event.step))
        elif item.event.type == "run_exited" and item.event.reason == "preempted":
            preempted.append((item.pid, item.event.step))
    assert preempted, "no attempt exited as preempted"
    missing = [p for p in preempted if p not in committed]
    assert not missing, f"preempted without a checkpoint at the stopping step: {missing}"


def event_types(run: Path) -> list[str]:
    return [e.event.type for e in read_events(run / EVENTS_FILE)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference")
    run_reference(example("--storage-latency", "0.05"), run)
    return run


def test_killed_repeatedly_with_sigterm_and_sigkill_resumes_bit_exact(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "interrupted"
    # Signals only: provider notices get their own end-to-end test (test_notices_e2e.py) and the demo's.
    modes = [*(m for m in DEFAULT_MODES if not m.is_notice), KillMode.SIGKILL_IN_SAVE]
    chaos = ChaosRun(example("--storage-latency", "0.05"), run, modes=modes, seed=11, max_delay=0.8).run()

    assert chaos.ok, chaos.problems
    assert len(chaos.interruptions) == len(modes) >= 5
    assert all(i.as_expected for i in chaos.interruptions)
    assert any(i.in_save for i in chaos.interruptions), "at least one kill must land in the middle of a save"
    types = event_types(run)
    assert types.count("partial_removed") >= sum(i.in_save for i in chaos.interruptions)
    assert types.count("run_exited") >= 3  # emergency exits on SIGTERM, then the finish
    assert_sigterm_loses_no_steps(read_events(run / EVENTS_FILE))

    ref_step, run_step, diffs = compare_final(reference, run)
    assert ref_step == run_step == 160
    assert {"model", "optimizer", "scheduler", "loader", "rng"} <= set(diffs)
    assert all(not d for d in diffs.values()), diffs


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "local-then-upload"])
def test_killed_repeatedly_on_s3_resumes_bit_exact(
    reference: Path, s3_server: S3Server, tmp_path: Path, staged: bool
) -> None:
    url = f"s3://{s3_server.new_bucket()}/runs/interrupted"
    extra = ["--stage-dir", str(tmp_path / "stage")] if staged else []
    modes = [
        KillMode.SIGTERM,
        KillMode.SIGKILL_IN_SAVE,
        KillMode.SIGKILL,
        KillMode.SIGTERM_TWICE,
        KillMode.SIGKILL_IN_SAVE,
    ]
    chaos = ChaosRun(
        example("--storage-latency", "0.05", *extra),
        url,
        events_file=tmp_path / "events.jsonl",
        modes=modes,
        seed=5,
        max_delay=0.5,  # staged saves are quick: interrupt early so all five kills land before the end
    ).run()
    assert chaos.ok, chaos.problems
    assert len(chaos.interruptions) == 5
    ref_step, run_step, diffs = compare_final(reference, url)
    assert ref_step == run_step == 160
    assert all(not d for d in diffs.values()), diffs
    logged = list(read_run_events(open_storage(url)))
    assert_sigterm_loses_no_steps(logged)
    uploaded = [e.event.type for e in logged]
    assert uploaded.count("run_started") == 6, "every attempt's events are kept with the run on S3"
    if staged:
        assert "save_staged" in uploaded


def test_resume_from_older_checkpoint_after_corruption_is_still_bit_exact(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "SPOTSAFE_CHECKPOINT_URL": str(run)}
    first = subprocess.Popen(example("--storage-latency", "0.05"), env=env, start_new_session=True)
    repo = CheckpointRepository(LocalStorage(run))
    while len(repo.committed()) < 2:
        assert first.poll() is None, "the job ended before two checkpoints"
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    newest = repo.committed()[0]
    blob = run / newest.key / "model.bin"
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))

    second = subprocess.run(example(), env=env, check=False, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    skipped = [e.event for e in read_events(run / EVENTS_FILE) if e.event.type == "checkpoint_skipped"]
    assert [s.checkpoint for s in skipped] == [newest.name]
    assert "checksum" in skipped[0].reason
    _, _, diffs = compare_final(reference, run)
    assert all(not d for d in diffs.values()), diffs


def _child_of(pid: int) -> int:
    for _ in range(500):
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.01)
    raise AssertionError("no child process appeared")


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) is not installed")
def test_sigterm_to_pid_1_in_a_container_saves_and_exits_75(tmp_path: Path) -> None:
    probe = subprocess.run(["unshare", "--fork", "--pid", "--mount-proc", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {probe.stderr.decode().strip()}")
    run = tmp_path / "pid1"
    env = {**os.environ, "SPOTSAFE_CHECKPOINT_URL": str(run)}
    wrapper = subprocess.Popen(
        ["unshare", "--fork", "--pid", "--mount-proc", *example("--steps", "100000")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        job = _child_of(wrapper.pid)  # PID 1 inside the namespace
        assert wrapper.stdout is not None
        assert "starting at step" in wrapper.stdout.readline()
        while not any(e.event.type == "progress" for e in read_events(run / EVENTS_FILE)):
            time.sleep(0.01)
        os.kill(job, signal.SIGTERM)
        code = wrapper.wait(timeout=120)
    finally:
        if wrapper.poll() is None:
            wrapper.kill()
    assert code == 75
    exits = [e.event for e in read_events(run / EVENTS_FILE) if e.event.type == "run_exited"]
    assert [(e.reason, e.exit_code) for e in exits] == [("preempted", 75)]
    newest = CheckpointRepository(LocalStorage(run)).committed()[0]
    assert newest.step == exits[0].step


def test_a_crash_exits_1_not_75(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text(
        "import torch, spotsafe\n"
        "m = torch.nn.Linear(2, 2)\n"
        "c = spotsafe.Checkpointer(model=m, policy=spotsafe.every(steps=1))\n"
        "c.restore(); c.step_done()\n"
        "raise RuntimeError('boom')\n"
    )
    env = {**os.environ, "SPOTSAFE_CHECKPOINT_URL": str(tmp_path / "run")}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and "boom" in proc.stderr
    assert "run_exited" not in event_types(tmp_path / "run")


def test_demo_command_reports_bit_identical(tmp_path: Path) -> None:
    spotsafe_bin = Path(sys.executable).with_name("spotsafe")
    cmd = [str(spotsafe_bin), "demo", "--workdir", str(tmp_path / "demo"), "--kills", "5", "--max-delay", "1.5"]
    proc = subprocess.run(
        [*cmd, "--", *example("--storage-latency", "0.05")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bit-identical to the uninterrupted run" in proc.stdout
    assert "interruptions" in proc.stdout and "steps replayed" in proc.stdout
