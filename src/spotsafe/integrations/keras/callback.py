"""``SpotsafeCallback``: Keras 3 ``fit()`` that survives preemption, with one callback.

::

    model.fit(x, y, epochs=10, callbacks=[SpotsafeCallback("runs/mlp")])

Run the same command again after an interruption and ``fit()`` resumes where it stopped, bit-exact: the
model's variables (weights, non-trainable state, the layers' seed generators), the optimizer's variables
(``iterations``, so any learning-rate schedule, and the moments), fit()'s epoch and batch, the metrics, every
random stream and the data order (:mod:`spotsafe.integrations.keras.position`). Like Keras' own
``BackupAndRestore``, but exact, mid-epoch, atomic on any storage, and aware of preemption notices.

Hook sequence (fit() calls them on its thread):

1. ``SpotsafeCallback(url, **checkpointer_arguments)``: creates the :class:`~spotsafe.Checkpointer` (a
   stop signal or provider notice from then on is a pending notice, not lost). Or pass
   ``checkpointer=`` one made earlier.
2. ``on_train_begin``: registers the ``model``, ``keras_optimizer`` and ``keras_fit`` components and
   ``restore()``s the newest verified checkpoint (a notice that came during start-up stops the job here,
   exit 75); a resumed fit() starts at the saved epoch.
3. ``on_epoch_begin``: records the random streams as the epoch begins (a resumed epoch: puts them back, and
   passes over the batches already trained).
4. ``on_train_batch_end``: ``step_done()``: saves when the policy says so; on a stop notice saves (the
   emergency save) and exits 75 at this step boundary, never letting fit() go on. The last step of fit()
   is always saved here (so a resumed run and an uninterrupted one end with the same checkpoint).
5. ``on_train_end``: ``finish()``: the final checkpoint (when the last step's is not already there), close.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from spotsafe.integrations import missing_extra

try:
    import keras  # type: ignore[import-untyped]  # no type information
except ImportError as _err:
    raise missing_extra("keras", "keras", _err) from _err

from spotsafe.engine.checkpointer import Checkpointer
from spotsafe.errors import ConfigError
from spotsafe.integrations.keras.position import FitPosition
from spotsafe.integrations.keras.state import ModelVariables, OptimizerVariables, seed_torch_like_keras
from spotsafe.reasons import SaveReason
from spotsafe.trackers import Latest

BACKENDS = ("torch", "tensorflow")
"""The Keras backends this callback is built and tested for."""

COMPONENTS = ("model", "keras_optimizer", "keras_fit")
"""The components it registers on the checkpointer (names a user's ``extra`` must not take)."""


class SpotsafeCallback(keras.callbacks.Callback):  # type: ignore[misc]  # Keras' classes are untyped (Any)
    """Checkpoints ``fit()``'s whole state with spotsafe and resumes it exactly (see the module docstring).

    Args:
        url: where the run lives (default ``$SPOTSAFE_CHECKPOINT_URL``); see :class:`~spotsafe.Checkpointer`.
        checkpointer: a :class:`~spotsafe.Checkpointer` created earlier (then give no ``url`` or other
            arguments): create it before the slow set-up to be protected from the start. Components of its
            own (``extra``) are saved and restored with fit()'s; the names in :data:`COMPONENTS` are taken.
        **checkpointer_arguments: passed to :class:`~spotsafe.Checkpointer` (``policy``, ``keep``,
            ``exit_on_notice``, ``extra``, ...). Not ``model``/``optimizer``/``loader``: fit() owns those.
            ``trackers="logs"`` puts the run's spot figures (:mod:`spotsafe.trackers`) into fit()'s ``logs`` at
            each epoch's end, for the callbacks after this one (TensorBoard, CSVLogger...) to record.

    One callback serves one ``fit()`` call. Create it in the main thread (it installs signal handlers).
    With ``exit_on_notice=False`` a notice makes fit() stop at the step boundary (``model.stop_training``)
    and return; :attr:`stop_requested` is then true, the checkpointer is closed, and the script decides
    (usually ``sys.exit(spotsafe.EXIT_PREEMPTED)``).
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        checkpointer: Checkpointer | None = None,
        **checkpointer_arguments: Any,
    ) -> None:
        super().__init__()
        taken = [name for name in ("model", "optimizer", "scheduler", "loader") if name in checkpointer_arguments]
        if taken:
            raise ConfigError(
                f"SpotsafeCallback: {', '.join(taken)} cannot be given: fit() owns the model, optimizer and data; "
                "the callback saves them itself"
            )
        if checkpointer is not None and (url is not None or checkpointer_arguments):
            raise ConfigError(
                "SpotsafeCallback: give either checkpointer= or the checkpointer's arguments (url, policy, ...), "
                "not both"
            )
        if checkpointer is not None and not isinstance(checkpointer, Checkpointer):
            raise ConfigError(
                f"SpotsafeCallback: checkpointer must be a spotsafe.Checkpointer, got {type(checkpointer).__name__}"
            )
        self._latest: Latest | None = None
        if checkpointer_arguments.get("trackers") == "logs":  # the spot figures in fit()'s logs, at each epoch's end
            self._latest = Latest()
            checkpointer_arguments["trackers"] = [self._latest]
        self.checkpointer = checkpointer if checkpointer is not None else Checkpointer(url, **checkpointer_arguments)
        self._position: FitPosition | None = None
        self._previous_initial_epoch: Any = None
        self.start_step: int | None = None
        """The step fit() started from: the restored checkpoint's, 0 on a fresh start (``None`` before fit())."""

    @property
    def stop_requested(self) -> bool:
        """A stop notice arrived (with ``exit_on_notice=False``: fit() stopped early because of it)."""
        return self.checkpointer.stop_requested

    # -- fit's hooks -------------------------------------------------------------------------------------
    def on_train_begin(self, logs: Any = None) -> None:
        if self._position is not None:
            raise ConfigError(
                "SpotsafeCallback serves one fit() call: its checkpoint is this fit()'s state; create another "
                "callback, on another run location, for another fit()"
            )
        model = self.model
        self._position = FitPosition(model)
        self._previous_initial_epoch = model._initial_epoch
        with self._closing_on_error():
            _check_model(model)
            seed_torch_like_keras()  # before restore(), which puts a resumed run's torch generator back
            ckpt = self.checkpointer
            ckpt.register("model", ModelVariables(model))
            ckpt.register("keras_optimizer", OptimizerVariables(model))
            ckpt.register("keras_fit", self._position)
            self.start_step = ckpt.restore()  # a notice that came during start-up ends the job here (exit 75)
            start = self._position.after_restore()
            if start:  # fit() reads it right after this hook: `initial_epoch = self._initial_epoch or initial_epoch`
                model._initial_epoch = start

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        assert self._position is not None
        with self._closing_on_error():
            self._position.epoch_begins(epoch)
            self.checkpointer.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        position = self._position
        assert position is not None
        with self._closing_on_error():
            if position.batch_ends(batch):
                return  # passed over while resuming: it was trained before the checkpoint
            ckpt = self.checkpointer
            saved = ckpt.step_done()  # on a stop notice (exit_on_notice=True): the emergency save, then exit 75
            if ckpt.stop_requested and not ckpt.notice_config.exit_on_notice:
                self.model.stop_training = True
                return
            if self._last_step(position) and not saved:
                ckpt.save(reason=SaveReason.FINAL)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        assert self._position is not None
        with self._closing_on_error():
            self._position.epoch_ends(epoch)
        if self._latest is not None and logs is not None:  # callbacks after this one (TensorBoard, CSVLogger,
            logs.update(self._latest.newest())  # W&B's...) see the same dict: the figures sit beside the metrics

    def on_train_end(self, logs: Any = None) -> None:
        assert self._position is not None
        self._give_back()
        ckpt = self.checkpointer
        if ckpt.stop_requested and not ckpt.notice_config.exit_on_notice:
            ckpt.close()  # stopped early: the emergency checkpoint is the resume point; no "final" one
        else:
            ckpt.finish()

    def _give_back(self) -> None:
        """Leave the model as fit() found it: its own train function, its own ``_initial_epoch``."""
        if self._position is not None:
            self._position.close()
        self.model._initial_epoch = self._previous_initial_epoch

    @contextlib.contextmanager
    def _closing_on_error(self) -> Iterator[None]:
        """An error in a hook ends fit(): give the model back and close the checkpointer (its signal handlers,
        its writer claim) before it propagates. (The stop path's exit closes it itself.)"""
        try:
            yield
        except Exception:
            self._give_back()
            self.checkpointer.close()
            raise

    def _last_step(self, position: FitPosition) -> bool:
        """This batch is fit()'s last (known when the data's length is: NumPy arrays, sized datasets)."""
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        return bool(epochs and steps) and position.epoch == epochs - 1 and position.batch == steps


def _check_model(model: Any) -> None:
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise ConfigError(
            f"SpotsafeCallback supports the Keras backends {', '.join(BACKENDS)}; this one is {backend!r} "
            "(set KERAS_BACKEND before importing keras)"
        )
    if getattr(model, "optimizer", None) is None:
        raise ConfigError("SpotsafeCallback: the model has no optimizer; compile() it before fit()")
    if int(getattr(model, "steps_per_execution", 1)) != 1:
        raise ConfigError(
            f"SpotsafeCallback needs compile(steps_per_execution=1) (got {model.steps_per_execution}): "
            "it saves and stops at step boundaries"
        )


__all__ = ["BACKENDS", "COMPONENTS", "SpotsafeCallback"]
