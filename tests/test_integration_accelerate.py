"""The README's Accelerate recipe (no Trainer, tests/jobs/accelerate_job.py): stopped by SIGTERM inside an epoch
and run again, it ends with the model and optimizer of an uninterrupted run, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import PROCESS_HANG_S, ROOT, wait_until

pytest.importorskip("accelerate")
pytestmark = pytest.mark.e2e

JOB = ROOT / "tests" / "jobs" / "accelerate_job.py"


def start(run: Path, final: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(JOB), str(run), str(final), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=PROCESS_HANG_S)
    return proc.returncode, out


def test_an_accelerate_loop_stopped_mid_epoch_resumes_bit_identical(tmp_path: Path) -> None:
    code, out = finish(start(tmp_path / "reference", tmp_path / "reference.pt"))
    assert code == 0, out

    run, final = tmp_path / "run", tmp_path / "run.pt"
    first = start(run, final, "--hold", "17")  # holds after step 17, inside epoch 2 (12 batches an epoch)
    holding = Path(f"{run}.holding")
    wait_until(lambda: holding.exists() or first.poll() is not None, "the job to hold", timeout=PROCESS_HANG_S)
    os.kill(first.pid, signal.SIGTERM)
    code, out = finish(first)
    assert code == 75 and not final.exists(), out
    code, out = finish(start(run, final))
    assert code == 0, out

    restored = [e.event for e in read_events(run / EVENTS_FILE) if isinstance(e.event, ev.RestoreCompleted)]
    assert [(r.step, r.epoch) for r in restored] == [(18, 1)]  # the stop's save: step 18, inside epoch 2 (index 1)
    reference, resumed = flatten(torch.load(tmp_path / "reference.pt")), flatten(torch.load(final))
    assert reference.keys() == resumed.keys()
    for key, value in reference.items():
        same = torch.equal(value, resumed[key]) if isinstance(value, torch.Tensor) else value == resumed[key]
        assert same, key


def flatten(state: object, prefix: str = "") -> dict[str, object]:
    """Leaves of nested dicts and lists by path (tensors and plain values)."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in flatten(value, f"{prefix}{key}/").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in flatten(value, f"{prefix}{i}/").items()}
    return {prefix: state}
