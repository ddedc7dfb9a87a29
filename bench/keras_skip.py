"""spotsafe Keras resume benchmark: what a mid-epoch resume of ``fit()`` costs before it trains again.

Run with ``.venv/bin/python bench/keras_skip.py`` (``--skip 100000`` for a quick look). Keras' ``fit()`` cannot
start inside an epoch and keeps its data iterator to itself, so :class:`spotsafe.integrations.keras.SpotsafeCallback`
resumes mid-epoch by passing over the batches already trained: each is read (a NumPy slice, converted to a tensor)
and not trained on. This measures that, per backend, each in its own process (the backend is fixed at import):

- **fresh fit()**: ``fit()`` called until its first batch is trained (set-up, no checkpoint to restore);
- **resume at sample N**: a new model and callback on a checkpoint saved at batch N / batch size of epoch 0,
  ``fit()`` called until the first batch after the checkpoint is trained (restore, then passing over);
- **train a batch** and **pass over a batch**: the mean over the epoch's batches (1,000 trained ones; the
  checkpoint's run passed over the first N / batch size batches with spotsafe's own pass-over, timed).

Keras' own ``BackupAndRestore`` starts the interrupted epoch again at its first batch: it trains the batches
again, where spotsafe passes over them. NumPy arrays of 1,000,064 x 16 float32 (61 MiB), batches of 32.
Results go into ``BENCHMARKS.md`` between the ``<!-- keras-skip -->`` markers (``--out ''``: none).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from run import machine, markdown, section, write_between

START = "<!-- keras-skip: written by bench/keras_skip.py -->"
END = "<!-- end of keras-skip -->"
FEATURES, BATCH, TAIL, TRAINED = 16, 32, 64, 1000


def build(keras: Any) -> Any:
    model = keras.Sequential(
        [keras.Input((FEATURES,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)]
    )
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def one_backend(skip: int) -> dict[str, float]:
    """Runs in a process whose ``KERAS_BACKEND`` is set; returns seconds for each measure."""
    import keras  # type: ignore[import-untyped]
    import numpy as np

    from spotsafe.integrations.keras import SpotsafeCallback
    from spotsafe.integrations.keras.position import SkipBatches

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((skip + TAIL, FEATURES)).astype("float32")
    y = rng.integers(0, 4, skip + TAIL).astype("int32")
    batches = skip // BATCH

    class Clock(keras.callbacks.Callback):  # type: ignore[misc]
        """Times fit(): when its first batch is trained; stops after ``stop_after`` batches (or by SIGTERM)."""

        def __init__(self, first: int, stop_after: int | None = None, sigterm_at: int | None = None) -> None:
            super().__init__()
            self.first, self.stop_after, self.sigterm_at = first, stop_after, sigterm_at
            self.started = time.perf_counter()
            self.first_done: float | None = None

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == self.first and self.first_done is None:
                self.first_done = time.perf_counter()
            if self.sigterm_at is not None and batch == self.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)  # the checkpointer saves at this batch's end, fit() stops
            if self.stop_after is not None and batch + 1 >= self.stop_after:
                self.model.stop_training = True

    def fit(model: Any, *callbacks: Any) -> None:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=True, verbose=0, callbacks=list(callbacks))

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as run:
        clock = Clock(0, stop_after=TRAINED)
        fit(build(keras), clock)
        assert clock.first_done is not None
        out["fresh"] = clock.first_done - clock.started
        out["train_batch"] = (time.perf_counter() - clock.first_done) / (TRAINED - 1)

        # The checkpoint at batch `batches`: spotsafe's pass-over stands in for training (timed: the per-batch
        # cost of passing over), then a SIGTERM at the last batch before it makes the callback save there.
        model = build(keras)
        model.make_train_function()
        skipper = SkipBatches(model)
        clock = Clock(0, sigterm_at=batches - 1)
        fit(model, clock, SpotsafeCallback(run, policy=None, exit_on_notice=False))
        skipper.remove()
        out["pass_batch"] = (time.perf_counter() - clock.started) / batches

        clock = Clock(batches)
        callback = SpotsafeCallback(run, policy=None)
        fit(build(keras), clock, callback)
        assert callback.start_step == batches, callback.start_step
        assert clock.first_done is not None
        out["resume"] = clock.first_done - clock.started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--skip", type=int, default=1_000_000, help="samples trained before the checkpoint")
    parser.add_argument("--backends", default="torch,tensorflow", help="comma-separated Keras backends")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: this backend only
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write the results into ('' = none)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_backend(args.skip)))
        return
    table = [
        [
            "backend",
            "fresh fit(): first batch",
            f"resume at sample {args.skip:,}: first batch",
            "train a batch",
            "pass over a batch",
            "resume vs training those batches again",
        ]
    ]
    for backend in args.backends.split(","):
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
        done = subprocess.run(
            [sys.executable, __file__, "--one", "--skip", str(args.skip)], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            sys.exit(f"{backend}: exit {done.returncode}\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        retrain = r["train_batch"] * (args.skip // BATCH)
        table.append(
            [
                backend,
                f"{r['fresh']:.2f} s",
                f"{r['resume']:.2f} s",
                f"{r['train_batch'] * 1e3:.2f} ms",
                f"{r['pass_batch'] * 1e3:.3f} ms",
                f"{r['resume']:.1f} s vs {retrain:.0f} s ({retrain / r['resume']:.0f}x less)",
            ]
        )
        print(backend, r, flush=True)
    import keras  # noqa: F401  (its version, for the record)

    text = section(
        START,
        END,
        [*machine(), f"keras {sys.modules['keras'].__version__}"],
        [
            f"Keras `fit()` on NumPy arrays ({args.skip + TAIL:,} x {FEATURES} float32, batches of {BATCH}, "
            f"shuffled), a checkpoint at sample {args.skip:,} of epoch 0 (batch {args.skip // BATCH:,}); the "
            "last column compares the resume with Keras' `BackupAndRestore`, which trains the epoch's batches again:",
            "",
            markdown(table),
            "",
        ],
    )
    print(text)
    if args.out:
        write_between(Path(args.out), START, END, text, heading="## Resuming Keras fit() mid-epoch\n\n")


if __name__ == "__main__":
    main()
