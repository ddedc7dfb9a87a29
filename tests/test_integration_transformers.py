"""The Hugging Face Trainer integration (``SpotsafeCallback``) with the real Trainer, real processes and real signals.

The job is ``examples/hf_gpt2.py``: a tiny GPT-2 built from a config, a synthetic token dataset, Trainer's AdamW
with a cosine schedule and warm-up, dropout, two loader workers, ``save_strategy="no"``. Each attempt is a real
process that holds after a chosen step until a stop notice comes (``--hold-at``), so the test, not the machine's
speed, decides where it is interrupted. Every interrupted run must end bit-identical (weights, optimizer,
scheduler, loader position, ``TrainerState``, RNG) to the uninterrupted one, at exactly ``max_steps``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
from safetensors.torch import load_file

from spotsafe.engine.reader import RestoredState, load_newest_valid
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.drill import DrillConfig
from spotsafe.supervisor.process import signal_tree
from spotsafe.supervisor.reference import ensure_reference
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import PROCESS_HANG_S, wait_until
from .test_drill import Drill, write_trace

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "hf_gpt2.py"
STEPS = 25
TRAINING = ("--max-steps", str(STEPS), "--samples", "40", "--save-every", "5", "--warmup", "5", "--eval-every", "10")
"""10 batches an epoch, so 2.5 epochs; Trainer evaluates after steps 10, 20 and 25 (the last)."""
HOLDS = ("--hold-at", "7", "--hold-at", "20", "--hold-at", "25")
"""Where the drill's attempts hold (the reference never does): inside epoch 0; at the end of epoch 1, where Trainer
also evaluates (the evaluation draws from the global RNG: the checkpoint must be taken after it); the last step."""
COMPONENTS = {"model", "optimizer", "scheduler", "loader", "trainer_state", "progress", "rng"}


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_")}
    env.update(HF_HUB_OFFLINE="1", SPOTSAFE_NOTICES="signals", AWS_EC2_METADATA_DISABLED="true")
    env.update(extra)
    return env


class Job:
    """One attempt of the example as a real process in its own session; its output is collected line by line."""

    started: ClassVar[
        list[Job]
    ] = []  # killed after each test if still running (a failed test must not leave one holding)

    def __init__(self, run: Path, *args: str, torchrun: bool = False) -> None:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        command = [*(launcher if torchrun else [sys.executable]), str(EXAMPLE), "--output-dir", str(run.parent / "out")]
        self.proc = subprocess.Popen(
            [*command, *args],
            env=job_env(SPOTSAFE_CHECKPOINT_URL=str(run)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        Job.started.append(self)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str) -> None:
        def seen() -> bool:
            if any(text in line for line in self.lines):
                return True
            assert self.proc.poll() is None, f"the job exited {self.proc.returncode} before {text!r}:\n{self.text}"
            return False

        wait_until(seen, repr(text), timeout=PROCESS_HANG_S)

    def signal(self, sig: int, *, group: bool = False) -> None:
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def finish(self) -> int:
        try:
            code = self.proc.wait(timeout=PROCESS_HANG_S)
        except subprocess.TimeoutExpired:
            signal_tree(self.proc.pid, signal.SIGKILL)  # torchrun's ranks too, each in a session of its own
            raise
        self._reader.join(timeout=60)
        return code


@pytest.fixture(autouse=True)
def _no_job_left() -> Iterator[None]:
    yield
    while Job.started:
        job = Job.started.pop()
        if job.proc.poll() is None:
            signal_tree(job.proc.pid, signal.SIGKILL)
            job.proc.wait()


def newest(run: Path) -> RestoredState:
    state = load_newest_valid(CheckpointRepository(open_storage(str(run))))
    assert state is not None, f"no checkpoint in {run}"
    return state


def same_tensors(saved: dict[str, torch.Tensor], model: dict[str, Any]) -> None:
    """Every tensor of a saved model file equals, bit for bit, the checkpoint's model component."""
    assert len(saved) >= 20
    for name, tensor in saved.items():
        other = model[name]
        assert tensor.dtype == other.dtype and torch.equal(tensor, other), name


@contextmanager
def offline() -> Iterator[None]:
    """A module fixture's environment: no inherited spotsafe settings, signals only, nothing downloaded."""
    with pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("SPOTSAFE_")]:
            env.delenv(key)
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="module")
def drill_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[str, ...], Path]:
    """The drill's command and its uninterrupted reference run (under the supervisor, as ``spotsafe drill`` runs it),
    which is also the reference of every other test here (the holds do not change what is computed)."""
    folder = tmp_path_factory.mktemp("hf-trainer")
    command = (sys.executable, str(EXAMPLE), "--output-dir", str(folder / "out"), *TRAINING, *HOLDS)
    with offline():
        ensure_reference(command, folder / "reference", lambda line: None)
    return command, folder / "reference"


def test_the_callback_changes_nothing_that_trainer_computes(
    drill_job: tuple[tuple[str, ...], Path], tmp_path: Path
) -> None:
    _, reference = drill_job
    final = tmp_path / "final"
    job = Job(tmp_path / "run", *TRAINING, "--no-spotsafe", "--final-dir", str(final))
    assert job.finish() == 0, job.text
    assert not (tmp_path / "run").exists()
    state = newest(reference)
    assert state.step == STEPS and state.components["trainer_state"]["global_step"] == STEPS
    same_tensors(load_file(str(final / "model.safetensors")), state.components["model"])


@pytest.mark.parametrize(
    ("samples", "accumulation", "holds", "resumed"),
    [
        # 9 batches an epoch, 2 per step: the epoch's last step has 1 batch (5 steps an epoch, 15 in all)
        (36, 2, (2, 9), ("resumed at step 2 (epoch 0, batch 4 of 9)", "resumed at step 9 (epoch 1, batch 8 of 9)")),
        # 11 batches an epoch, 4 per step: the epoch's last step has 3 (3 steps an epoch, 9 in all)
        (44, 4, (1,), ("resumed at step 1 (epoch 0, batch 4 of 11)",)),
    ],
    ids=["last-step-of-1-batch", "last-step-of-3-batches"],
)
def test_gradient_accumulation_resumes_inside_an_epoch_bit_exact(
    tmp_path: Path, samples: int, accumulation: int, holds: tuple[int, ...], resumed: tuple[str, ...]
) -> None:
    """Trainer ends an epoch's last, shorter accumulation by its local batch count, which a resumed epoch starts at 0:
    the callback must still make it an optimizer step, as in the uninterrupted run (epochs mode, no max_steps)."""
    args = ("--max-steps", "-1", "--epochs", "3", "--samples", str(samples), "--accumulation", str(accumulation))
    steps = 3 * math.ceil(samples // 4 / accumulation)  # batches of 4
    plain = Job(tmp_path / "plain", *args, "--no-spotsafe", "--final-dir", str(tmp_path / "plain-final"))
    assert plain.finish() == 0, plain.text

    run, final = tmp_path / "run", tmp_path / "final"
    hold_args = [a for step in holds for a in ("--hold-at", str(step))]
    for attempt, step in enumerate(holds):
        job = Job(run, *args, *hold_args, "--save-every", "2", "--final-dir", str(final))
        job.wait_for(f"holding after step {step}")
        assert attempt == 0 or resumed[attempt - 1] in job.text
        # First a SIGTERM to the whole process group (as at a shutdown: the loader's workers ignore it and the
        # job saves), then Ctrl-C's SIGINT.
        job.signal(signal.SIGTERM if attempt == 0 else signal.SIGINT, group=attempt == 0)
        assert job.finish() == 75, job.text
        assert newest(run).step == step
        assert "finished" not in job.text and not final.exists()  # the script's code after trainer.train()
    job = Job(run, *args, *hold_args, "--save-every", "2", "--final-dir", str(final))
    assert job.finish() == 0, job.text
    assert resumed[-1] in job.text
    state = newest(run)
    assert state.step == steps and state.components["trainer_state"]["global_step"] == steps
    assert state.components["scheduler"]["last_epoch"] == steps
    same_tensors(load_file(str(tmp_path / "plain-final" / "model.safetensors")), state.components["model"])
    same_tensors(load_file(str(final / "model.safetensors")), state.components["model"])


def test_drill_with_aws_notices_inside_an_epoch_at_its_end_and_at_the_last_step_is_identical(
    drill_job: tuple[tuple[str, ...], Path], tmp_path: Path
) -> None:
    """``spotsafe drill`` with AWS notices on the emulated metadata endpoint; the market's clock moves only once
    the running attempt holds, so each outage lands where the test wants it."""
    command, reference = drill_job
    # One tick per drill second: outages at 1, 3 and 5, capacity back one tick later.
    trace = write_trace(tmp_path / "zone.json", [1, 0, 1, 0, 1, 0] + [1] * 30)
    workdir = tmp_path / "drill"
    config = DrillConfig(
        command=command,
        workdir=workdir,
        reference=reference,
        trace=str(trace),
        trace_start_s=0,
        time_scale=60.0,
        mode="aws",
        window_s=120.0,
    )

    def holding(step: int) -> bool:
        log = workdir / "attempts.log"
        return log.exists() and f"holding after step {step}" in log.read_text(encoding="utf-8", errors="replace")

    def driver(drill: Drill) -> None:
        for number, step in enumerate((7, 20, 25), start=1):
            wait_until(lambda s=step: holding(s), f"an attempt to hold after step {step}", timeout=PROCESS_HANG_S)
            drill.clock.set(2.0 * number - 1)  # the outage: an AWS instance-action notice
            drill.wait_events(number)
            drill.clock.set(2.0 * number)  # capacity again

    drill = Drill(config)
    report = drill.run(driver)

    assert report.reference_reused, drill.lines
    assert report.exit_code == 0 and report.identical, (report.component_diffs, drill.lines)
    assert set(report.component_diffs) >= COMPONENTS
    assert report.final_step_reference == report.final_step_drill == STEPS
    assert report.interruptions == 3 and report.exit_classes.get("preempted") == 3, report
    assert report.killed_at_window_end == 0 and report.emergency_saves >= 3
    notices = [e.event for e in read_events(workdir / "run" / EVENTS_FILE) if e.event.type == "notice_received"]
    assert len(notices) >= 3 and all(getattr(n, "source", None) == "aws" for n in notices), notices
    log = (workdir / "attempts.log").read_text(encoding="utf-8", errors="replace")
    assert "resumed at step 7 (epoch 0, batch 7 of 10)" in log
    assert "resumed at step 20 (epoch 2, batch 0 of 10)" in log  # epoch 1 ended: epoch 2 begins afresh
    assert "resumed at step 25 (epoch 2, batch 5 of 10)" in log
    # The script's code after trainer.train() ran once, in the last attempt: an interrupted one exits 75 instead.
    assert log.count("hf_gpt2: finished at step") == 1 and "hf_gpt2: finished at step 25" in log
    # Resumed at the last step, Trainer trained nothing more: not one step past max_steps.
    final = newest(workdir / "run")
    assert final.step == STEPS and final.components["trainer_state"]["global_step"] == STEPS
    assert final.components["scheduler"]["last_epoch"] == STEPS
    json.dumps(report.to_json())  # what --json prints


def rank_events(run: Path, rank: int, kind: str) -> list[Any]:
    path = run / f"rank-{rank:05d}" / EVENTS_FILE
    return [e.event for e in read_events(path) if e.event.type == kind] if path.exists() else []


def test_torchrun_ranks_stop_and_resume_at_the_same_step(tmp_path: Path) -> None:
    """Two ranks (DDP over gloo, CPU): SIGTERM to torchrun, which passes it to both; the ranks agree on one step,
    save there, and the next run resumes both at it and finishes at max_steps."""
    run = tmp_path / "ddp"
    args = (*TRAINING, "--workers", "1", "--sleep", "0.1", "--hold-at", "5")
    first = Job(run, *args, torchrun=True)
    first.wait_for("holding after step 5")
    wait_until(lambda: first.text.count("holding after step 5") == 2, "both ranks to hold", timeout=PROCESS_HANG_S)
    first.signal(signal.SIGTERM)
    first.finish()
    stopped = {r: [e.step for e in rank_events(run, r, "run_exited") if e.reason == "preempted"] for r in (0, 1)}
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, (stopped, first.text[-3000:])
    (step,) = stopped[0]
    assert 5 <= step < STEPS
    for rank in (0, 1):
        assert step in [e.step for e in rank_events(run, rank, "save_committed")]

    second = Job(run, *TRAINING, "--workers", "1", torchrun=True)
    assert second.finish() == 0, second.text[-3000:]
    assert second.text.count(f"resumed at step {step} ") == 2
    finals = [newest(run / f"rank-{rank:05d}") for rank in (0, 1)]
    for state in finals:
        assert state.step == STEPS and state.components["trainer_state"]["global_step"] == STEPS
    # Data-parallel replicas: both ranks end with the same weights and optimizer state.
    for name, tensor in finals[0].components["model"].items():
        assert torch.equal(tensor, finals[1].components["model"][name]), name


def test_import_spotsafe_does_not_import_transformers() -> None:
    code = (
        "import sys, spotsafe, spotsafe.integrations\n"
        "spotsafe.Checkpointer, spotsafe.ResumableLoader\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PROCESS_HANG_S)
    assert done.returncode == 0, done.stderr


def test_wrong_arguments_are_config_errors_that_say_why(tmp_path: Path) -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from spotsafe import ConfigError
    from spotsafe.integrations.transformers import SpotsafeCallback

    with pytest.raises(ConfigError, match="finds model, optimizer in the Trainer"):
        SpotsafeCallback(model=torch.nn.Linear(2, 2), optimizer=None)
    with pytest.raises(ConfigError, match="exit_on_notice must be True or False"):
        SpotsafeCallback(exit_on_notice="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown Checkpointer keyword 'polcy'"):
        SpotsafeCallback(polcy=None)
    args = TrainingArguments(output_dir=str(tmp_path), enable_jit_checkpoint=True, use_cpu=True, report_to="none")
    with pytest.raises(ConfigError, match="enable_jit_checkpoint"):
        SpotsafeCallback().on_init_end(args, TrainerState(), TrainerControl(), model=torch.nn.Linear(2, 2))
    assert not (tmp_path / "spotsafe").exists()  # nothing was opened
