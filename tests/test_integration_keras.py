"""Keras 3: ``SpotsafeCallback`` with real Keras on the torch and TensorFlow backends, in real subprocesses.

The job is ``examples/keras_mlp.py`` (an MLP with Dropout, Adam with a warm-up + cosine schedule, NumPy arrays
that fit() shuffles every epoch) run through a small wrapper (:data:`JOB`) that can hold after a chosen step
until a stop notice arrives: the test decides where each run is stopped, not the machine's speed. Each backend
runs in its own processes (``--backend``), never in the test process.

For each backend, once (module fixtures): the uninterrupted reference run (with the callback, through the
drill's own :func:`ensure_reference`) and a run without spotsafe (``--plain``).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spotsafe.engine.reader import load_newest_valid
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.drill import DrillConfig, DrillReport
from spotsafe.supervisor.reference import REFERENCE_MARKER, bit_identical, compare_final, ensure_reference
from spotsafe.supervisor.store import read_store
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import PROCESS_HANG_S, ROOT, wait_until
from .test_drill import Drill, FakeClock

EXAMPLE = ROOT / "examples" / "keras_mlp.py"
BACKENDS = ("torch", "tensorflow")
EPOCHS, SAMPLES, BATCH = 3, 256, 32
STEPS_PER_EPOCH = SAMPLES // BATCH  # 8
TOTAL = EPOCHS * STEPS_PER_EPOCH  # 24
ARGS = ("--epochs", str(EPOCHS), "--samples", str(SAMPLES), "--batch-size", str(BATCH), "--save-every", "5")
DRILL_HOLD = 10  # a fresh drill attempt holds after step 10 until its notice (then stops at 11, mid-epoch 1)

JOB = f"""
'''examples/keras_mlp.py, plus a hold: after step --hold (or --hold-fresh, in a run that restored nothing and is not
a drill's reference run), write <run>.holding and wait for a stop notice; then the next step stops the job (exit 75).
The final weights and optimizer variables go to <run>.final.npz.'''
import argparse, os, pathlib, sys, time

sys.path.insert(0, {str(EXAMPLE.parent)!r})
import keras_mlp

parser = argparse.ArgumentParser()
parser.add_argument("--hold", type=int, default=None)
parser.add_argument("--hold-fresh", type=int, default=None)
parser.add_argument("--run-dir", default=None)
ours, rest = parser.parse_known_args()
run = ours.run_dir or os.environ["SPOTSAFE_CHECKPOINT_URL"]


def holds(spot):
    import keras

    class Hold(keras.callbacks.Callback):
        held = None

        def on_train_batch_end(self, batch, logs=None):
            ckpt = spot.checkpointer
            fresh = spot.start_step == 0 and os.environ.get("SPOTSAFE_RUN_ID") != "reference"
            target = ours.hold if ours.hold is not None else (ours.hold_fresh if fresh else None)
            if ckpt.step == target and self.held != target:
                self.held = target
                pathlib.Path(run + ".holding").write_text(str(target))
                while not ckpt.stop_requested:
                    time.sleep(0.01)

    return [Hold()]


keras_mlp.main([*rest, "--run-dir", run, "--verbose", "0", "--weights-out", run + ".final.npz"], more_callbacks=holds)
"""


def job_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_") and k != "KERAS_BACKEND"}
    env.update(SPOTSAFE_NOTICES="signals", AWS_EC2_METADATA_DISABLED="true", TF_CPP_MIN_LOG_LEVEL="2")
    return env


@dataclass(frozen=True)
class Runs:
    backend: str
    job: Path
    command: tuple[str, ...]  # the drill's command; its reference run is `reference`
    reference: Path
    plain: Path  # the final weights and optimizer variables of a run without spotsafe


@pytest.fixture(scope="module")
def job_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keras-job") / "held_keras_job.py"
    path.write_text(JOB, encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=BACKENDS)
def runs(request: pytest.FixtureRequest, job_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    backend: str = request.param
    folder = tmp_path_factory.mktemp(f"keras-{backend}")
    command = (sys.executable, str(job_file), "--backend", backend, *ARGS, "--hold-fresh", str(DRILL_HOLD))
    with pytest.MonkeyPatch.context() as env:  # module scope: conftest's per-test environment is not there yet
        wanted = job_env()
        for key in list(os.environ):
            env.delenv(key)
        for key, value in wanted.items():
            env.setenv(key, value)
        ensure_reference(command, folder / "reference", lambda line: None)
    plain = folder / "plain.npz"
    plain_command = [sys.executable, str(EXAMPLE), "--backend", backend, *ARGS, "--plain", "--verbose", "0"]
    done = subprocess.run(
        [*plain_command, "--weights-out", str(plain)],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=PROCESS_HANG_S,
    )
    assert done.returncode == 0, done.stderr
    return Runs(backend, job_file, command, folder / "reference", plain)


def arrays(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def same_bits(a: dict[str, np.ndarray[Any, Any]], b: dict[str, np.ndarray[Any, Any]]) -> list[str]:
    """The keys whose arrays differ in dtype, shape or any bit (empty: identical)."""
    assert list(a) == list(b)
    return [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]


def newest(run: Path) -> Any:
    checkpoint = load_newest_valid(CheckpointRepository(open_storage(run)))
    assert checkpoint is not None, f"no checkpoint in {run}"
    return checkpoint


def as_numpy(value: Any) -> np.ndarray[Any, Any]:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


# -- 1. non-invasive ---------------------------------------------------------------------------------------------------


def test_the_callback_changes_nothing_that_is_computed(runs: Runs) -> None:
    """The same script with and without the callback ends with the same weights and optimizer state, bit for bit
    (the reference run had the callback; it ran uninterrupted to the end, and saved its last step)."""
    with_callback = arrays(Path(f"{runs.reference}.final.npz"))
    without = arrays(runs.plain)
    assert len(without) > 10 and any(k.startswith("optimizer/") for k in without)
    assert same_bits(with_callback, without) == []
    final = newest(runs.reference)
    assert final.step == TOTAL
    assert (final.components["keras_fit"]["epoch"], final.components["keras_fit"]["batch"]) == (2, STEPS_PER_EPOCH)
    saved = [as_numpy(v) for v in final.components["model"]["values"]]
    assert (
        same_bits({str(i): v for i, v in enumerate(saved)}, {str(i): without[f"model/{i}"] for i in range(len(saved))})
        == []
    )
    assert int(as_numpy(final.components["keras_optimizer"]["values"][0])) == TOTAL  # iterations


# -- 2. interrupted runs ----------------------------------------------------------------------------------------------

# (hold after step, where the stop lands: step, epoch, batches done in that epoch)
STOPS = [
    (4, 5, 0, 5),  # mid-epoch
    (8, 9, 1, 1),  # the notice comes at the epoch boundary; the first step of epoch 1 is the last
    (15, 16, 1, STEPS_PER_EPOCH),  # the last step of an epoch
    (23, TOTAL, 2, STEPS_PER_EPOCH),  # the very last step of fit()
]


def launch(runs: Runs, run: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, str(runs.job), "--backend", runs.backend, *ARGS, "--run-dir", str(run), *extra]
    return subprocess.Popen(command, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def output(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=PROCESS_HANG_S)
    return out + err


def test_interrupted_fits_end_bit_identical(runs: Runs, tmp_path: Path) -> None:
    """SIGTERM at chosen steps (mid-epoch, at epoch boundaries, at the very last step); each run saves at the next
    step boundary and exits 75; relaunched, fit() resumes there and never trains past its end; the final state is
    the uninterrupted run's, bit for bit, component by component."""
    run = tmp_path / "run"
    holding = Path(f"{run}.holding")
    for hold, step, epoch, batch in STOPS:
        holding.unlink(missing_ok=True)
        proc = launch(runs, run, "--hold", str(hold))
        wait_until(
            lambda p=proc: holding.exists() or p.poll() is not None,
            f"the job to hold at {hold}",
            timeout=PROCESS_HANG_S,
        )
        assert holding.exists(), output(proc)
        proc.send_signal(signal.SIGTERM)
        text = output(proc)
        assert proc.returncode == 75, text
        stopped = newest(run)
        assert stopped.step == step, text
        assert (stopped.components["keras_fit"]["epoch"], stopped.components["keras_fit"]["batch"]) == (epoch, batch)
        assert int(as_numpy(stopped.components["keras_optimizer"]["values"][0])) == step
    last = launch(runs, run)
    text = output(last)
    assert last.returncode == 0, text
    assert f"finished at step {TOTAL}, 1 epochs in this run" in text  # resumed at the end; trained nothing more
    ref_step, run_step, diffs = compare_final(runs.reference, run)
    assert ref_step == run_step == TOTAL
    assert {"model", "keras_optimizer", "keras_fit", "progress", "rng"} <= set(diffs)
    assert bit_identical(ref_step, run_step, diffs), diffs
    assert same_bits(arrays(Path(f"{run}.final.npz")), arrays(runs.plain)) == []
    saves = [e.event for e in read_events(run / EVENTS_FILE) if isinstance(e.event, ev.SaveCommitted)]
    assert sorted(s.step for s in saves if s.reason == "notice") == [step for _, step, _, _ in STOPS]


# -- 3. a drill --------------------------------------------------------------------------------------------------------


def attempt(store: Path, number: int, what: Callable[[Any], bool]) -> bool:
    return any(a.number == number and what(a) for _, attempts in read_store(store) for a in attempts)


def drill(config: DrillConfig, driver: Callable[[FakeClock], None]) -> DrillReport:
    """``run_drill`` (what ``spotsafe drill`` runs) on the main thread, its market's clock moved by ``driver``."""
    return Drill(config).run(lambda running: driver(running.clock))


@pytest.mark.parametrize("runs", ["torch"], indirect=True)  # one backend; the interrupted runs above cover both
def test_drill_of_a_keras_fit_reports_identical(runs: Runs, tmp_path: Path) -> None:
    """A drill through an AWS spot notice on the emulated metadata endpoint: it comes while attempt 1 holds after step
    10 (the market's clock moves only then); the job saves at step 11 and exits 75; capacity comes back, attempt 2
    resumes mid-epoch and finishes; the drill's report says bit-identical."""
    marker = json.loads((runs.reference / REFERENCE_MARKER).read_text(encoding="utf-8"))
    assert marker["command"] == list(runs.command)
    workdir = tmp_path / "drill"
    run, store = workdir / "run", workdir / "jobs.sqlite"
    trace = tmp_path / "zone.json"
    trace.write_text(json.dumps({"metadata": {"gap_seconds": 60}, "data": [1, 0] + [1] * 20}), encoding="utf-8")
    config = DrillConfig(
        command=runs.command,
        workdir=workdir,
        reference=runs.reference,
        trace=str(trace),
        trace_start_s=0,
        time_scale=60.0,  # one tick per drill second: the outage at 1, capacity back at 2
        mode="aws",
        window_s=5.0,  # on the fake clock: it never ends, the job stops on its own
        max_interruptions=1,
    )

    def driver(clock: FakeClock) -> None:
        holding = Path(f"{run}.holding")
        wait_until(holding.exists, "attempt 1 to hold", timeout=PROCESS_HANG_S)
        clock.set(1.0)
        wait_until(
            lambda: attempt(store, 1, lambda a: a.ended is not None), "attempt 1 to stop", timeout=PROCESS_HANG_S
        )
        clock.set(2.0)

    report = drill(config, driver)
    assert report.ok and report.identical, report
    assert report.exit_code == 0 and report.reference_reused
    assert report.final_step_reference == report.final_step_drill == TOTAL
    assert {"model", "keras_optimizer", "keras_fit", "rng"} <= set(report.component_diffs)
    assert not any(report.component_diffs.values())
    assert report.interruptions == 1 and report.exit_classes.get("preempted", 0) == 1, report
    logged = [e.event for e in read_events(run / EVENTS_FILE)]
    assert any(isinstance(e, ev.NoticeReceived) and e.source == "aws" for e in logged)
    notice_saves = [e.step for e in logged if isinstance(e, ev.SaveCommitted) and e.reason == "notice"]
    assert notice_saves == [DRILL_HOLD + 1]


# -- the boundary: import spotsafe never imports Keras ----------------------------------------------------------------


def test_import_spotsafe_does_not_import_keras_or_tensorflow() -> None:
    code = (
        "import sys, spotsafe, spotsafe.integrations; spotsafe.Checkpointer; "
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('keras', 'tensorflow')]; "
        "assert not loaded, loaded"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=PROCESS_HANG_S)
    assert done.returncode == 0, done.stderr


# -- clear errors ------------------------------------------------------------------------------------------------------

MISUSE = """
import os, sys
os.environ["KERAS_BACKEND"] = "torch"
import keras, numpy as np
from spotsafe.errors import CheckpointMismatchError, ConfigError
from spotsafe.integrations.keras import SpotsafeCallback

run = sys.argv[1]


def expect(error, words, action):
    try:
        action()
    except error as err:
        assert all(w in str(err) for w in words), str(err)
        print("raised:", type(err).__name__, err)
        return
    raise AssertionError(f"no {error.__name__} ({words})")


def model(width=8):
    keras.utils.set_random_seed(0)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(width), keras.layers.Dense(1)])
    m.compile(optimizer="adam", loss="mse")
    return m


x, y = np.ones((32, 4), "float32"), np.zeros((32, 1), "float32")
expect(ConfigError, ["fit() owns"], lambda: SpotsafeCallback(run, model=object()))
expect(ConfigError, ["either"], lambda: SpotsafeCallback(run, checkpointer=object(), policy=None))
first = SpotsafeCallback(run)
model().fit(x, y, batch_size=8, epochs=1, callbacks=[first], verbose=0)  # ends at epoch 0, batch 4
expect(ConfigError, ["one fit()"], lambda: model().fit(x, y, batch_size=8, callbacks=[first], verbose=0))
fewer = lambda: model().fit(x[:16], y[:16], batch_size=8, callbacks=[SpotsafeCallback(run)], verbose=0)
expect(ConfigError, ["fewer batches", "same data"], fewer)
wider = lambda: model(16).fit(x, y, batch_size=8, callbacks=[SpotsafeCallback(run)], verbose=0)
expect(CheckpointMismatchError, ["different model"], wider)
"""


def test_misuse_is_a_clear_error(tmp_path: Path) -> None:
    """Arguments fit() owns, two ways of making the checkpointer, a callback reused for a second fit(), a resumed
    fit() on fewer batches or on another model: each raises and says what to do."""
    script = tmp_path / "misuse.py"
    script.write_text(MISUSE, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run")],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=PROCESS_HANG_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("raised:") == 5, done.stdout


STREAMS = """
import os, random
os.environ["KERAS_BACKEND"] = "tensorflow"
import keras, numpy as np, tensorflow as tf, torch
from spotsafe.integrations.keras.state import apply_streams, capture_streams


def draw():
    return [
        random.random(),
        float(np.random.random()),
        float(torch.rand(())),
        float(keras.random.uniform(())),  # Keras' global SeedGenerator (no seed given)
        float(tf.random.get_global_generator().uniform(())),
    ]


keras.utils.set_random_seed(3)
draw()  # every stream exists now
state = capture_streams()
first = draw()
assert draw() != first
apply_streams(state)
assert draw() == first, "the streams were not put back"
keras.utils.set_random_seed(3)  # forgets Keras' global SeedGenerator: putting it back makes one
apply_streams(state)
assert draw() == first, "Keras' global SeedGenerator was not recreated"
print("streams put back")
"""


def test_every_random_stream_is_put_back() -> None:
    """Python, NumPy, torch, Keras' global SeedGenerator and TensorFlow's global generator: captured, drawn from,
    put back, drawn again: the same numbers (TensorFlow backend, in its own process)."""
    done = subprocess.run(
        [sys.executable, "-c", STREAMS], env=job_env(), capture_output=True, text=True, timeout=PROCESS_HANG_S
    )
    assert done.returncode == 0, done.stderr
    assert "streams put back" in done.stdout


# -- trackers ----------------------------------------------------------------------------------------------------------

TRACKED = """
import csv, os, sys
os.environ["KERAS_BACKEND"] = "torch"
import keras, numpy as np
import spotsafe
from spotsafe.integrations.keras import SpotsafeCallback

run, table = sys.argv[1], sys.argv[2]
keras.utils.set_random_seed(0)
m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
m.compile(optimizer="adam", loss="mse")
x, y = np.ones((32, 4), "float32"), np.zeros((32, 1), "float32")
spot = SpotsafeCallback(run, policy=spotsafe.every(steps=2), progress_interval=0, trackers="logs")
m.fit(x, y, batch_size=8, epochs=3, callbacks=[spot, keras.callbacks.CSVLogger(table)], verbose=0)
"""


def test_trackers_logs_puts_the_spot_figures_in_fits_logs_for_the_callbacks_after_it(tmp_path: Path) -> None:
    """Keras' own CSVLogger, after the callback, records the figures beside the loss at every epoch's end."""
    table = tmp_path / "fit.csv"
    done = subprocess.run(
        [sys.executable, "-c", TRACKED, str(tmp_path / "run"), str(table)],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=PROCESS_HANG_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    for row in rows:
        assert row["loss"] and float(row["spotsafe/checkpoint_stall_s"]) >= 0
        assert row["spotsafe/interruptions"] == "0.0" and float(row["spotsafe/goodput"]) > 0
