"""``spotsafe.integrations.lightning.SpotsafeCallback`` with the real Lightning, real subprocesses and real signals.

The job is ``examples/lightning_mlp.py`` (a tiny MLP with dropout, AdamW, StepLR, a shuffled DataLoader with 2
worker processes, deterministic CPU settings) run through :data:`JOB`, which adds a ``Hold`` callback: in attempt
A it holds after optimizer step S until spotsafe has a stop notice. The test (or the drill's market) sends the
notice once the job holds, so every interruption lands at the step the test chose, whatever the machine's speed.
Each interrupted run is relaunched until it finishes, and its final checkpoint is compared, component by component,
with an uninterrupted run's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from spotsafe.engine.reader import load_newest_valid
from spotsafe.errors import ConfigError
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.drill import DrillConfig
from spotsafe.supervisor.reference import REFERENCE_RUN_ID, compare_final, ensure_reference
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import PROCESS_HANG_S, wait_until
from .test_drill import Drill, launched, write_trace

L = pytest.importorskip("lightning.pytorch", reason="Lightning is not installed: pip install -e '.[lightning]'")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "lightning_mlp.py"

JOB = f"""
import spotsafe

spotsafe.protect_startup()

import argparse, os, sys, time
from pathlib import Path

sys.path.insert(0, {str(EXAMPLE.parent)!r})
import lightning.pytorch as L
import lightning_mlp
from spotsafe.integrations.lightning import SpotsafeCallback


class Hold(L.Callback):
    # After each optimizer step in `steps` (once per run: a marker file says it was held), write the marker and
    # hold until spotsafe has a stop notice, or until a kill comes.
    def __init__(self, steps, folder):
        self.steps, self.folder = steps, folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        marker = self.folder / f"holding-{{trainer.global_step}}"
        if trainer.global_step not in self.steps or marker.exists():
            return
        spot = next(c for c in trainer.callbacks if isinstance(c, SpotsafeCallback))
        marker.write_text(os.environ.get("SPOTSAFE_ATTEMPT", "?"))
        while not spot.stop_requested:
            time.sleep(0.01)


class Sleep(L.Callback):
    # At least `seconds` per step, so that ranks agree on a stop within a bounded number of steps (spotsafe's
    # exchanges are about half a second apart, counted in steps from the measured step time).
    def __init__(self, seconds):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


parser = argparse.ArgumentParser()
parser.add_argument("--hold", type=int, action="append", default=[], metavar="STEP")
parser.add_argument("--hold-dir", default=".")
parser.add_argument("--sleep", type=float, default=0.0)
args, rest = parser.parse_known_args()
callbacks = [Sleep(args.sleep)] if args.sleep else []
if os.environ.get("SPOTSAFE_RUN_ID") != {REFERENCE_RUN_ID!r} and os.environ.get("LOCAL_RANK", "0") == "0":
    callbacks.append(Hold(set(args.hold), Path(args.hold_dir)))
lightning_mlp.main(rest, callbacks)
"""

EPOCHS = ("--max-epochs", "3", "--samples", "320", "--batch-size", "32")
"""10 batches per epoch, 30 steps, ended by max_epochs."""
EPOCHS_STEPS = 30
STEPS_VAL = ("--max-epochs", "9", "--max-steps", "25", "--samples", "320", "--batch-size", "32", "--val-every", "6")
"""Ended by max_steps in the middle of epoch 2; a validation after every 6th batch (steps 6, 12, 18, 24)."""
STEPS_VAL_STEPS = 25


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = tmp_path_factory.mktemp("lightning-job") / "job.py"
    script.write_text(JOB, encoding="utf-8")
    return script


def command(job: Path, args: Sequence[str], holds: Sequence[int] = (), hold_dir: Path | None = None) -> list[str]:
    """The job's command line: checkpoints every 4 steps, and holds at ``holds`` (markers in ``hold_dir``)."""
    cmd = [sys.executable, str(job), *args, "--save-every", "4", "--progress-interval", "0"]
    for step in holds:
        cmd += ["--hold", str(step)]
    if hold_dir is not None:
        cmd += ["--hold-dir", str(hold_dir)]
    return cmd


@dataclass
class Attempt:
    code: int
    output: str


def launch(cmd: Sequence[str], url: Path, attempt: int, *, hold: int | None = None, startup: bool = False) -> Attempt:
    """Run attempt ``attempt`` of the job on ``url`` (its holding markers are in ``url``'s folder). With ``hold``,
    SIGTERM once it holds at that step; with ``startup``, SIGTERM as soon as it runs (during its imports)."""
    work = url.parent
    env = {**os.environ, "SPOTSAFE_CHECKPOINT_URL": str(url), "SPOTSAFE_ATTEMPT": str(attempt)}
    env["SPOTSAFE_RUN_ID"] = url.name
    log = work / f"{url.name}-{attempt}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*cmd, "--hold-dir", str(work)], stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            if startup:
                # The job's first lines are `import spotsafe; spotsafe.protect_startup()`, and `import spotsafe` does
                # not load torch: once torch is loading, the signal is held, seconds before the Checkpointer exists.
                wait_until(lambda: _loaded(proc.pid, "torch") or proc.poll() is not None, "the job's imports")
                proc.send_signal(signal.SIGTERM)
            if hold is not None:
                marker = work / f"holding-{hold}"
                wait_until(
                    lambda: marker.exists() or proc.poll() is not None, "the job to hold", timeout=PROCESS_HANG_S
                )
                assert proc.poll() is None, log.read_text(errors="replace")
                proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=PROCESS_HANG_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return Attempt(code, log.read_text(errors="replace"))


def _loaded(pid: int, library: str) -> bool:
    """Process ``pid`` has mapped a file of ``library`` (its import has begun)."""
    try:
        return f"/{library}/" in Path(f"/proc/{pid}/maps").read_text(errors="replace")
    except OSError:
        return False


def logged(url: Path) -> list[Any]:
    return list(read_events(url / EVENTS_FILE))


def of(url: Path, kind: type[Any], attempt: int | None = None) -> list[Any]:
    return [e.event for e in logged(url) if isinstance(e.event, kind) and attempt in (None, e.attempt)]


def check_identical(reference: Path, run: Path, steps: int) -> None:
    ref_step, run_step, diffs = compare_final(reference, run)
    assert (ref_step, run_step) == (steps, steps)
    expected = {"model", "optimizer", "scheduler", "precision", "lightning_loops", "loader", "rng", "progress"}
    assert expected <= set(diffs), sorted(diffs)
    assert not any(diffs.values()), {k: v for k, v in diffs.items() if v}


@pytest.fixture(scope="module")
def reference(job: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Sequence[str]], Path]:
    """An uninterrupted run of a configuration, made on first use and shared by the tests of this module."""
    made: dict[tuple[str, ...], Path] = {}
    folder = tmp_path_factory.mktemp("lightning-references")

    def get(args: Sequence[str]) -> Path:
        key = tuple(args)
        if key not in made:
            url = folder / f"config-{len(made)}" / "reference"
            url.parent.mkdir()
            done = launch(command(job, args), url, 1)
            assert done.code == 0, done.output
            made[key] = url
        return made[key]

    return get


# -- the callback object -------------------------------------------------------------------------------------------


def test_the_callback_belongs_to_the_package_in_use() -> None:
    import pytorch_lightning as pl

    from spotsafe.integrations.lightning import SpotsafeCallback

    default = SpotsafeCallback()
    assert isinstance(default, L.Callback) and isinstance(default, SpotsafeCallback)
    assert not isinstance(default, pl.Callback)
    standalone = SpotsafeCallback(package="pytorch_lightning", keep=5)
    assert isinstance(standalone, pl.Callback) and isinstance(standalone, SpotsafeCallback)
    assert not isinstance(standalone, L.Callback)
    copy = pickle.loads(pickle.dumps(standalone))
    assert type(copy) is type(standalone) and copy.checkpointer_kwargs == {"keep": 5}
    for owned in ("model", "optimizer", "scheduler", "scaler", "loader"):
        with pytest.raises(ConfigError, match=owned):
            SpotsafeCallback(**{owned: object()})
    with pytest.raises(ConfigError, match="lightning"):
        SpotsafeCallback(package="keras")


def test_importing_spotsafe_imports_no_lightning_and_a_program_with_pytorch_lightning_gets_its_callback(
    tmp_path: Path,
) -> None:
    script = """
import sys
import spotsafe, spotsafe.integrations.lightning
assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules, sorted(sys.modules)
import pytorch_lightning as pl
from spotsafe.integrations.lightning import SpotsafeCallback
cb = SpotsafeCallback()
assert isinstance(cb, pl.Callback), type(cb).__mro__
assert "lightning" not in sys.modules, "the lightning package was imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=PROCESS_HANG_S)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


# -- in the test process: non-invasive, and what it refuses ---------------------------------------------------------


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    """The example's module, imported here (its protect_startup() is released again: no Checkpointer takes it)."""
    from spotsafe import startup

    spec = importlib.util.spec_from_file_location("lightning_mlp_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    startup.release()
    yield module


def test_non_invasive_the_same_weights_with_and_without_the_callback(example: ModuleType, tmp_path: Path) -> None:
    args = [*EPOCHS, "--save-every", "3", "--url", str(tmp_path / "run"), "--progress-interval", "0"]
    without = example.main([*args, "--no-spotsafe"])
    before = signal.getsignal(signal.SIGTERM)
    with_callback = example.main(args)
    assert signal.getsignal(signal.SIGTERM) == before  # handlers put back after fit
    plain, spot = without.state_dict(), with_callback.state_dict()
    assert plain.keys() == spot.keys()
    for name in plain:
        assert torch.equal(plain[name], spot[name]), name
    # The callback did checkpoint: every 3 steps and the final state, whose model is the trained one.
    assert [s.step for s in of(tmp_path / "run", ev.SaveCommitted)] == list(range(3, 31, 3))
    final = load_newest_valid(CheckpointRepository(open_storage(str(tmp_path / "run"))))
    assert final is not None and final.step == 30
    for name, tensor in spot.items():
        assert torch.equal(final.components["model"][name], tensor), name


def test_exit_on_notice_false_stops_fit_at_the_step_and_saves(example: ModuleType, tmp_path: Path) -> None:
    from spotsafe.integrations.lightning import SpotsafeCallback

    class Signal(L.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 13:
                os.kill(os.getpid(), signal.SIGTERM)  # handled by spotsafe while fit runs

    spot = SpotsafeCallback(tmp_path / "run", exit_on_notice=False, progress_interval=0)
    model = example.MLP()
    loader = torch.utils.data.DataLoader(example.dataset(320), batch_size=32, shuffle=True, num_workers=2)
    trainer = L.Trainer(
        max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[Signal(), spot]
    )
    trainer.fit(model, loader)
    assert spot.stop_requested and trainer.global_step == 13
    assert [(s.step, s.reason) for s in of(tmp_path / "run", ev.SaveCommitted)] == [(13, "notice")]
    assert [(x.reason, x.exit_code) for x in of(tmp_path / "run", ev.RunExited)] == [("preempted", 75)]


def test_trackers_trainer_puts_the_spot_figures_beside_the_training_metrics(
    example: ModuleType, tmp_path: Path
) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    import spotsafe
    from spotsafe.integrations.lightning import SpotsafeCallback

    spot = SpotsafeCallback(tmp_path / "run", policy=spotsafe.every(steps=5), progress_interval=0, trackers="trainer")
    logger = CSVLogger(str(tmp_path / "logs"), name="mlp")
    loader = torch.utils.data.DataLoader(example.dataset(320), batch_size=32, shuffle=True)
    trainer = L.Trainer(
        max_epochs=2,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[spot],
    )
    trainer.fit(example.MLP(), loader)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {"loss", "spotsafe/checkpoint_stall_s", "spotsafe/goodput", "spotsafe/interruptions"} <= set(rows[0])
    assert [int(r["step"]) for r in rows if r["spotsafe/checkpoint_stall_s"]] == [5, 10, 15, 20]
    assert len([r for r in rows if r["loss"]]) == 20  # the training's own metric, every step
    assert next(r["spotsafe/interruptions"] for r in rows if r["spotsafe/interruptions"]) == "0.0"


def test_train_data_that_is_not_a_dataloader_is_a_config_error(example: ModuleType, tmp_path: Path) -> None:
    from spotsafe.integrations.lightning import SpotsafeCallback

    batches = [(torch.randn(8, 16), torch.randint(0, 4, (8,))) for _ in range(4)]
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.callbacks.append(SpotsafeCallback(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"one torch\.utils\.data\.DataLoader"):
        trainer.fit(example.MLP(), batches)


def test_resuming_with_a_lightning_ckpt_path_is_a_config_error(example: ModuleType, tmp_path: Path) -> None:
    from spotsafe.integrations.lightning import SpotsafeCallback

    def trainer(epochs: int) -> Any:
        spot = SpotsafeCallback(tmp_path / "run", progress_interval=0)
        return L.Trainer(
            max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[spot]
        )

    loader = torch.utils.data.DataLoader(example.dataset(64), batch_size=32, shuffle=True)
    first = trainer(1)
    first.fit(example.MLP(), loader)
    first.save_checkpoint(tmp_path / "lightning.ckpt")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(ConfigError, match=r"ckpt_path=.*spotsafe's is the resume point"):
        trainer(2).fit(example.MLP(), loader, ckpt_path=tmp_path / "lightning.ckpt")
    assert signal.getsignal(signal.SIGTERM) == before


class _StopAt:
    """SIGTERM to this process after optimizer step ``step``: spotsafe's handler makes it a stop notice."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


class StopAt(_StopAt, L.Callback):
    pass


@pytest.mark.parametrize(
    ("args", "stops", "steps"),
    [
        # 4 optimizer steps per epoch (batches 3, 6, 9 and the last); mid-epoch, an epoch's last step, the end.
        pytest.param(("--accumulate", "3", "--persistent-workers"), (6, 8, 12), 12, id="accumulate-persistent"),
        # Epochs cut at 6 of 10 batches: the rest of each epoch's order is never served.
        pytest.param(("--limit-batches", "6", "--workers", "0", "--max-epochs", "4"), (3, 12, 24), 24, id="limit-0w"),
    ],
)
def test_in_process_stops_exit_75_and_resume_bit_identical(
    example: ModuleType, tmp_path: Path, args: Sequence[str], stops: Sequence[int], steps: int
) -> None:
    """The stop path in the test process: ``fit`` raises SystemExit(75) through Lightning, whose teardown stops the
    DataLoader workers; the next ``fit`` resumes. Settings the subprocess tests do not cover."""
    base = [*EPOCHS, *args, "--save-every", "5", "--progress-interval", "0"]
    before = signal.getsignal(signal.SIGTERM)
    example.main([*base, "--url", str(tmp_path / "reference")])
    for stop in stops:
        with pytest.raises(SystemExit) as exited:
            example.main([*base, "--url", str(tmp_path / "run")], [StopAt(stop)])
        assert exited.value.code == 75
        assert signal.getsignal(signal.SIGTERM) == before  # what was there before fit, not a closed checkpointer's
    example.main([*base, "--url", str(tmp_path / "run")])
    check_identical(tmp_path / "reference", tmp_path / "run", steps)
    assert [s.step for s in of(tmp_path / "run", ev.SaveCommitted) if s.reason == "notice"] == list(stops)
    assert [e.step for e in of(tmp_path / "run", ev.RestoreCompleted)] == list(stops)


def test_a_pytorch_lightning_trainer_stops_and_resumes_bit_identical(example: ModuleType, tmp_path: Path) -> None:
    """The standalone ``pytorch_lightning`` package: its Trainer, its LightningModule, the callback made for it."""
    pl = pytest.importorskip("pytorch_lightning")
    from spotsafe import every
    from spotsafe.integrations.lightning import SpotsafeCallback

    class Net(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)]

    class Stop(_StopAt, pl.Callback):  # type: ignore[misc,name-defined]
        pass

    def fit(url: Path, stop: int | None = None) -> None:
        pl.seed_everything(0, verbose=False)
        loader = torch.utils.data.DataLoader(example.dataset(320), batch_size=32, shuffle=True, num_workers=2)
        spot = SpotsafeCallback(url, policy=every(steps=4), progress_interval=0)
        assert isinstance(spot, L.Callback)  # this program imported both packages: lightning's, until fit
        trainer = pl.Trainer(
            max_epochs=2, deterministic=True, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[*([Stop(stop)] if stop else []), spot],
        )  # fmt: skip
        try:
            trainer.fit(Net(), loader)
        finally:
            assert isinstance(spot, pl.Callback) and not isinstance(spot, L.Callback)  # the Trainer's package's

    fit(tmp_path / "reference")
    for stop in (6, 10):
        with pytest.raises(SystemExit) as exited:
            fit(tmp_path / "run", stop)
        assert exited.value.code == 75
    fit(tmp_path / "run")
    check_identical(tmp_path / "reference", tmp_path / "run", 20)
    assert [e.step for e in of(tmp_path / "run", ev.RestoreCompleted)] == [6, 10]


# -- interrupted in real subprocesses, relaunched until done --------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "holds", "steps", "finished"),
    [
        # mid-epoch; the last batch of epoch 0 (the boundary waits for the epoch's end); the very last step.
        pytest.param(EPOCHS, (4, 10, 30), EPOCHS_STEPS, "finished: 30 steps, 3 epochs", id="max_epochs"),
        # after a mid-epoch validation (the boundary waits for it); an epoch boundary; the last step, by max_steps.
        pytest.param(STEPS_VAL, (12, 20, 25), STEPS_VAL_STEPS, "finished: 25 steps, 3 epochs", id="max_steps-val"),
    ],
)
def test_interrupted_runs_resume_bit_identical(
    job: Path,
    reference: Callable[[Sequence[str]], Path],
    tmp_path: Path,
    args: Sequence[str],
    holds: Sequence[int],
    steps: int,
    finished: str,
) -> None:
    ref = reference(args)
    url = tmp_path / "run"
    cmd = command(job, args, holds)
    attempts = [launch(cmd, url, 1, hold=holds[0])]
    attempts.append(launch(cmd, url, 2, startup=True))  # a stop during start-up: nothing new is saved
    for number, step in enumerate(holds[1:], start=3):
        attempts.append(launch(cmd, url, number, hold=step))
    attempts.append(launch(cmd, url, len(holds) + 2))
    codes = [a.code for a in attempts]
    assert codes == [75] * (len(holds) + 1) + [0], [a.output[-2000:] for a in attempts]

    check_identical(ref, url, steps)
    # Each stop saved the step it came at, and the next attempt resumed there.
    notices = [(s.step, s.reason) for s in of(url, ev.SaveCommitted) if s.reason == "notice"]
    assert notices == [(step, "notice") for step in holds]
    restored = [(e.attempt, e.event.step) for e in logged(url) if isinstance(e.event, ev.RestoreCompleted)]
    assert restored == [(2, holds[0]), (3, holds[0]), *((n + 4, s) for n, s in enumerate(holds[1:]))]
    assert not of(url, ev.SaveCommitted, attempt=2)  # stopped during start-up: restored, saved nothing, exit 75
    assert of(url, ev.RunExited, attempt=2)[0].exit_code == 75
    # The last attempt found the run finished: it trained nothing and saved nothing; Lightning did not go past
    # its end, and the code after fit() ran only there.
    last = len(holds) + 2
    assert not of(url, ev.SaveCommitted, attempt=last)
    assert finished in attempts[-1].output
    assert all("finished:" not in a.output for a in attempts[:-1])


# -- a drill: the emulated spot market, on a clock the test moves once the job holds --------------------------------


def ended(store: Path, attempt: int) -> bool:
    from spotsafe.supervisor.store import read_store

    return any(a.number == attempt and a.ended is not None for _, attempts in read_store(store) for a in attempts)


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["aws", "kill"])
def test_drill_reports_identical(job: Path, tmp_path: Path, mode: str) -> None:
    """Two interruptions: at step 7 (mid-epoch 0) and at step 20 (the end of epoch 1). An AWS notice on the emulated
    metadata endpoint stops the job at that step; a kill (no notice) loses the steps since the last checkpoint,
    which the next attempt trains again."""
    holds = tmp_path / "holds"
    holds.mkdir()
    cmd = tuple(command(job, EPOCHS, (7, 20), holds))
    reference_dir = tmp_path / "reference"
    ensure_reference(cmd, reference_dir, lambda line: None)
    # One tick per drill second: outages at 1 (capacity back at 2) and 3 (back at 4).
    trace = write_trace(tmp_path / "zone.json", [1, 0, 1, 0] + [1] * 20)
    workdir = tmp_path / "drill"
    store = workdir / "jobs.sqlite"
    config = DrillConfig(
        command=cmd,
        workdir=workdir,
        reference=reference_dir,
        trace=str(trace),
        trace_start_s=0,
        time_scale=60.0,
        mode=mode,
        window_s=60.0,
        max_interruptions=2,
    )

    def driver(drill: Drill) -> None:
        wait_until(lambda: (holds / "holding-7").exists(), "the job to hold at step 7", timeout=PROCESS_HANG_S)
        drill.clock.set(1.0)
        drill.wait_events(1)
        wait_until(lambda: ended(store, 1), "attempt 1 to stop", timeout=PROCESS_HANG_S)
        drill.clock.set(2.0)  # capacity is back: the supervisor relaunches
        wait_until(lambda: launched(store, after=1), "the next attempt", timeout=PROCESS_HANG_S)
        wait_until(lambda: (holds / "holding-20").exists(), "the job to hold at step 20", timeout=PROCESS_HANG_S)
        drill.clock.set(3.0)
        drill.wait_events(2)
        drill.clock.set(4.0)

    drill = Drill(config)
    report = drill.run(driver)

    assert report.ok and report.identical, (report, drill.lines)
    assert report.final_step_reference == report.final_step_drill == EPOCHS_STEPS
    assert report.interruptions == 2, (report, drill.lines)
    assert {"model", "optimizer", "scheduler", "lightning_loops", "loader", "rng"} <= set(report.component_diffs)
    if mode == "aws":
        assert report.exit_classes.get("preempted", 0) == 2, report
        notices = of(workdir / "run", ev.NoticeReceived)
        assert {n.source for n in notices} == {"aws"}, notices
        assert report.emergency_saves == 2
    else:
        assert report.exit_classes.get("killed", 0) == 2, report
        assert report.steps_replayed > 0  # killed at 7 and 20, resumed from the checkpoints at 4 and 16
    doc = json.loads(json.dumps(report.to_json()))
    assert doc["identical"] is True and doc["interruptions"] == 2


# -- DDP: 2 CPU processes on gloo ------------------------------------------------------------------------------------

DDP = ("--max-epochs", "2", "--samples", "1600", "--batch-size", "16", "--devices", "2", "--strategy", "ddp")
"""50 batches per epoch on each rank, 100 steps; at least 50 ms a step (``--sleep``), so the ranks' exchanges (about
every half second) are at most 10 steps apart and agree on a stop well before the end."""
DDP_STEPS = 100
RANKS = ("rank-00000", "rank-00001")


@pytest.mark.e2e
def test_ddp_ranks_stop_at_the_same_step_and_resume_bit_identical(
    job: Path, reference: Callable[[Sequence[str]], Path], tmp_path: Path
) -> None:
    args = (*DDP, "--sleep", "0.05")
    ref = reference(args)
    url = tmp_path / "run"
    cmd = command(job, args, (10,))
    first = launch(cmd, url, 1, hold=10)  # SIGTERM to rank 0 only, while it holds after step 10
    assert first.code == 75, first.output
    # Rank 1 is rank 0's child process: it stops on its own, at the step the ranks agreed on.
    wait_until(lambda: bool(of(url / RANKS[1], ev.RunExited, attempt=1)), "rank 1 to exit", timeout=PROCESS_HANG_S)
    saved = [[(s.step, s.reason) for s in of(url / rank, ev.SaveCommitted, attempt=1)] for rank in RANKS]
    exits = [[x.step for x in of(url / rank, ev.RunExited, attempt=1)] for rank in RANKS]
    assert len(exits[0]) == 1 and exits[0] == exits[1], exits
    stop = exits[0][0]
    assert 10 <= stop < DDP_STEPS
    # Each rank committed a checkpoint at the stop step: the emergency save ("notice"), or an interval save that
    # was due at that very step (a loaded machine can put the agreed stop on one), which the stop then keeps.
    for ranks in saved:
        assert [reason for step, reason in ranks if step == stop] in (["notice"], ["interval"]), saved
    assert [(x.reason, x.exit_code, x.step) for x in of(url / RANKS[1], ev.RunExited)] == [("preempted", 75, stop)]
    assert [n.step for n in of(url / RANKS[0], ev.NoticeReceived)] == [10]
    assert not of(url / RANKS[1], ev.NoticeReceived)  # rank 1 stopped on the agreement alone

    second = launch(cmd, url, 2)
    assert second.code == 0, second.output
    for rank in RANKS:
        assert [r.step for r in of(url / rank, ev.RestoreCompleted)] == [stop]
        check_identical(ref / rank, url / rank, DDP_STEPS)
