"""Keras 3 ``fit()`` that survives spot preemptions: one callback.

A small MLP (two hidden layers, each followed by Dropout, one of them seeded) learns a synthetic 4-class
problem from NumPy arrays that ``fit()`` shuffles every epoch, with Adam and a warm-up + cosine learning-rate
schedule. It runs on the torch or the TensorFlow backend (``KERAS_BACKEND``, or ``--backend``):

    KERAS_BACKEND=torch python examples/keras_mlp.py --run-dir runs/keras-mlp
    KERAS_BACKEND=tensorflow python examples/keras_mlp.py --run-dir runs/keras-mlp-tf

Stop it at any moment (SIGTERM, SIGINT, SIGUSR1 or a provider's preemption notice: it saves at the next step
boundary and exits with 75; SIGKILL: it loses the steps since the last checkpoint) and run the same command
again: ``fit()`` resumes at the same epoch and batch and ends with exactly the weights of an uninterrupted
run. Under the supervisor, or in a drill against an emulated spot market:

    spotsafe run --checkpoint-url runs/keras-mlp -- python examples/keras_mlp.py
    spotsafe drill --rate 60 --notice aws -- python examples/keras_mlp.py

``--plain`` trains the same way without spotsafe: with ``--weights-out`` it shows that the callback changes
nothing that is computed (the weights, bit for bit).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import spotsafe

FEATURES, CLASSES = 16, 4


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--run-dir", default=None, help="checkpoint location (default: $SPOTSAFE_CHECKPOINT_URL)")
    parser.add_argument("--backend", choices=["torch", "tensorflow"], default=None, help="default: $KERAS_BACKEND")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="train without spotsafe (to compare)")
    parser.add_argument("--weights-out", default=None, help="write the final weights and optimizer state (.npz)")
    parser.add_argument("--verbose", type=int, default=2, help="fit()'s verbose (0: quiet, 2: a line per epoch)")
    return parser.parse_args(argv)


def deterministic(backend: str) -> None:
    """One thread and deterministic kernels: the same script computes the same bits every time."""
    if backend == "torch":
        import torch

        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
    else:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.experimental.enable_op_determinism()


def make_data(samples: int) -> tuple[Any, Any]:
    """Fixed features and the labels of a fixed random linear teacher (float32, int32)."""
    import numpy as np

    rng = np.random.default_rng(1234)
    x = rng.standard_normal((samples, FEATURES)).astype("float32")
    teacher = rng.standard_normal((FEATURES, CLASSES)).astype("float32")
    y = np.argmax(x @ teacher + 0.3 * rng.standard_normal((samples, CLASSES)), axis=1).astype("int32")
    return x, y


def make_model(total_steps: int) -> Any:
    import keras

    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.2),  # unseeded: torch's global generator (torch), a SeedGenerator (TensorFlow)
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dropout(0.2, seed=7),  # seeded: its own SeedGenerator, a variable of the model
            keras.layers.Dense(CLASSES),
        ]
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total_steps, warmup_target=1e-2, warmup_steps=max(1, total_steps // 10)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def save_final(model: Any, path: str) -> None:
    import keras
    import numpy as np

    arrays = {f"model/{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.variables)}
    arrays.update({f"optimizer/{i}": keras.ops.convert_to_numpy(v) for i, v in enumerate(model.optimizer.variables)})
    np.savez(path, **arrays)


def main(argv: Sequence[str] | None = None, more_callbacks: Callable[[Any], list[Any]] | None = None) -> None:
    """Train; ``more_callbacks(spotsafe_callback)`` adds callbacks after spotsafe's (tests use it)."""
    args = parse(argv)
    if not args.plain:
        spotsafe.protect_startup()  # a stop from here on (the slow imports and set-up below) is held, not fatal
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    import keras

    from spotsafe.integrations.keras import SpotsafeCallback

    callbacks: list[Any] = []
    if not args.plain:
        # Created early: from here on a stop signal or notice is a pending notice for the checkpointer.
        spot = SpotsafeCallback(args.run_dir, policy=spotsafe.every(steps=args.save_every))
        callbacks = [spot, *(more_callbacks(spot) if more_callbacks else [])]
    backend = keras.backend.backend()
    deterministic(backend)
    keras.utils.set_random_seed(args.seed)  # Python, NumPy, torch and TensorFlow (tf.data's shuffle)
    x, y = make_data(args.samples)
    steps_per_epoch = -(-args.samples // args.batch_size)
    model = make_model(args.epochs * steps_per_epoch)
    history = model.fit(
        x, y, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, callbacks=callbacks, verbose=args.verbose
    )
    epochs_run = len(history.history.get("loss", []))
    print(f"keras_mlp ({backend}): finished at step {int(model.optimizer.iterations)}, {epochs_run} epochs in this run")
    if args.weights_out:
        save_final(model, args.weights_out)


if __name__ == "__main__":
    main(sys.argv[1:])
