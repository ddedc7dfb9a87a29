"""Where ``fit()`` is, saved as the ``keras_fit`` component, and how a resumed ``fit()`` gets back there.

Keras' ``fit()`` has ``initial_epoch`` but no way to start in the middle of an epoch, and the order of an
epoch's batches comes from a random stream drawn when the epoch's data iterator starts (torch backend: the
``RandomSampler`` behind ``fit(x, y, shuffle=True)`` seeds itself from torch's global generator; TensorFlow
backend: ``tf.random.shuffle`` in the ``tf.data`` pipeline, seeded by TensorFlow's global seed, the same order
in every epoch). So a checkpoint records, besides the epoch and the batches done in it:

* ``epoch_start``: every random stream as it was when the epoch began (before its iterator drew its order);
* ``streams``: every random stream now (at the step boundary of the save);
* ``metrics``: the model's metric variables (the epoch's running loss and metrics, which end in the logs).

A resumed ``fit()`` starts at the saved epoch (``model._initial_epoch``, as ``keras.callbacks.BackupAndRestore``
does); when that epoch begins, ``epoch_start`` is put back, so its iterator draws the same order; the batches
already trained are then taken from the iterator and passed over (:class:`SkipBatches` stands in for
``model.train_function``: no forward, no backward, nothing drawn); after the last of them, ``streams`` and
``metrics`` are put back, exactly as they were at the save, and training goes on with the next batch.
Passing over a batch reads it (a NumPy slice, a ``PyDataset`` item); it does not train on it.
"""

from __future__ import annotations

from typing import Any

import keras  # type: ignore[import-untyped]  # no type information

from spotsafe.errors import CheckpointMismatchError, ConfigError
from spotsafe.integrations.keras.state import apply_streams, capture_streams, load_variables, variables_state


class SkipBatches:
    """Stands in for ``model.train_function`` while a resumed epoch passes over the batches already trained.

    Called as fit() calls its train function: with the fetched batch (torch backend) or with the data
    iterator (TensorFlow backend, whose train function takes the next batch itself: here it is taken and
    dropped). Returns the model's metric results (the same ones each time: nothing is trained while passing over,
    so they do not change), so that fit()'s logs keep their keys.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.original = model.train_function
        self.tensorflow = keras.backend.backend() == "tensorflow"
        self.built = False
        self.results: Any = None
        model.train_function = self

    def __call__(self, data: Any) -> Any:
        batch = next(data) if self.tensorflow else data[0]
        if not self.built:
            # TensorFlow builds the compiled metrics and loss when it first traces the train function; the
            # metric state to put back needs them now. Keras builds them the same way under a distribution
            # strategy, and on the torch backend before fit() begins (then this does nothing).
            self.model._symbolic_build(data_batch=batch)
            self.built = True
        if self.results is None:  # nothing is trained while passing over: the metrics stay as they are
            self.results = self.model.get_metrics_result()
        return dict(self.results) if isinstance(self.results, dict) else self.results

    def remove(self) -> None:
        """Give ``model.train_function`` back (the very object it was: a traced tf.function stays traced)."""
        if self.model.train_function is self:
            self.model.train_function = self.original


def _check_state(state: Any) -> dict[str, Any]:
    if not isinstance(state, dict) or not {"epoch", "batch", "epoch_start", "streams", "metrics"} <= set(state):
        raise CheckpointMismatchError("the checkpoint's keras_fit record is incomplete")
    epoch, batch = state["epoch"], state["batch"]
    if not isinstance(epoch, int) or not isinstance(batch, int) or epoch < 0 or batch < 0:
        raise CheckpointMismatchError(f"bad keras_fit position: epoch {epoch!r}, batch {batch!r}")
    if batch > 0 and state["epoch_start"] is None:
        raise CheckpointMismatchError("the checkpoint's keras_fit record has batches done but no epoch start")
    return state


class FitPosition:
    """The ``keras_fit`` component; the callback tells it where fit() is (see the module docstring).

    Call sequence, on the training thread: ``load_state_dict`` (by ``Checkpointer.restore()``), then
    :meth:`after_restore`; per epoch :meth:`epoch_begins`, :meth:`batch_ends` after each batch,
    :meth:`epoch_ends`; :meth:`close` when fit() ends.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.epoch = 0
        self.batch = 0
        self.epoch_start: dict[str, Any] | None = None
        self._resume: dict[str, Any] | None = None  # the loaded record, until the resumed epoch is back there
        self._skip: SkipBatches | None = None

    # -- the component ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._resume is not None:  # not back at the restored position yet: it is still the position
            return self._resume
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "epoch_start": self.epoch_start,
            "streams": capture_streams(),
            "metrics": variables_state(self.model.metrics_variables),
        }

    def load_state_dict(self, state: Any) -> None:
        self._resume = _check_state(state)
        self.epoch, self.batch, self.epoch_start = state["epoch"], state["batch"], state["epoch_start"]

    # -- fit's hooks -----------------------------------------------------------------------------------
    def after_restore(self) -> int | None:
        """After ``restore()``: put the random streams back as they were at the save; return the epoch
        fit() must start at (``None`` when nothing was restored)."""
        if self._resume is None:
            return None
        apply_streams(self._resume["streams"])
        epoch = int(self._resume["epoch"])
        if self._resume["batch"] == 0:  # saved before the epoch began: fit() starts it as it would have
            self._resume = None
        return epoch

    def epoch_begins(self, epoch: int) -> None:
        resume = self._resume
        if resume is None:
            self.epoch, self.batch, self.epoch_start = epoch, 0, capture_streams()
            return
        if epoch != resume["epoch"]:
            raise ConfigError(
                f"the checkpoint is in epoch {resume['epoch']} (batch {resume['batch']}) but fit() began epoch "
                f"{epoch}: run fit() with the arguments of the interrupted run (epochs, initial_epoch)"
            )
        apply_streams(resume["epoch_start"])  # the epoch's data iterator draws the same order
        self.epoch, self.batch = epoch, 0
        self._skip = SkipBatches(self.model)

    def batch_ends(self, batch: int) -> bool:
        """Record that batch ``batch`` (0-based in its epoch) ended; ``True`` when it was passed over, not trained."""
        if self._skip is None:
            self.batch = batch + 1
            return False
        resume = self._resume
        assert resume is not None
        self.batch = batch + 1
        if self.batch < resume["batch"]:
            return True
        self._skip.remove()
        self._skip = None
        apply_streams(resume["streams"])
        load_variables(self.model.metrics_variables, resume["metrics"], "metrics")
        self._resume = None
        return True

    def epoch_ends(self, epoch: int) -> None:
        if self._skip is not None and self._resume is not None:
            self.close()
            raise ConfigError(
                f"epoch {epoch} ended after {self.batch} batches while resuming at batch {self._resume['batch']}: "
                "the data has fewer batches than when the checkpoint was written; resume with the same data and "
                "batch size"
            )

    def close(self) -> None:
        if self._skip is not None:
            self._skip.remove()
            self._skip = None


__all__ = ["FitPosition", "SkipBatches"]
