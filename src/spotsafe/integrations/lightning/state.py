"""What the Lightning callback saves besides the model, optimizers and schedulers: Lightning's own loop
progress, and the train DataLoader's order and position.

Both are components (``state_dict``/``load_state_dict``) that read and write the live trainer, so a save
records the trainer as it is at that moment: the callback calls the Checkpointer only at *step boundaries*
(see :mod:`spotsafe.integrations.lightning.callback`), and tells :class:`LoopState` which kind it is at.

Two kinds of boundary, restored two ways (Lightning's own mid-epoch resume is unreliable: Lightning#19764,
#21938, and its restart logic depends on where a checkpoint was written, on ``max_steps`` and on validation):

* ``"batch"``, inside an epoch: after a batch's ``on_train_batch_end``, or after the validation that ran
  after it (``on_validation_end``). These are the states Lightning's ``ModelCheckpoint`` writes with
  ``every_n_train_steps``; ``fit_loop.load_state_dict`` makes Lightning go on with the next batch.
* ``"epoch"``, between epochs and at the end of training: every hook of the finished epoch has run, and
  the next one has not begun. The saved progress says "N epochs done, none begun" and, once loaded, the
  loops are told they are not restarting: Lightning then starts the next epoch exactly as an
  uninterrupted run does (``on_train_epoch_start``, progress counters), with the loader's first
  iteration of the resumed run serving that epoch.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader

from spotsafe.data.position import LoaderPosition
from spotsafe.errors import CheckpointMismatchError, ConfigError, StateError

FORMAT = 1
BATCH, EPOCH = "batch", "epoch"
KINDS = (BATCH, EPOCH)
_COUNTERS = ("ready", "started", "processed", "completed")


def _finished_epochs(progress: dict[str, Any]) -> dict[str, Any]:
    """``fit_loop.epoch_progress``'s state with every counter at ``completed``: no epoch begun after them."""
    out = copy.deepcopy(progress)
    for part in ("total", "current"):
        counters = out.get(part)
        if isinstance(counters, dict) and isinstance(counters.get("completed"), int):
            for name in _COUNTERS:
                if name in counters:
                    counters[name] = counters["completed"]
    return out


class LoopState:
    """Lightning's fit-loop progress (epochs, batches, optimizer and scheduler steps, the logging step) and
    ``trainer.should_stop``: the component ``lightning_loops``.

    ``trainer`` is a ``lightning.pytorch.Trainer`` or a ``pytorch_lightning.Trainer`` (2.x): typed ``Any``
    because either package may provide it. ``kind`` is set by the callback before each save.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.kind = BATCH
        self.restored_kind: str | None = None

    def state_dict(self) -> dict[str, Any]:
        loops: dict[str, Any] = copy.deepcopy(self.trainer.fit_loop.state_dict())
        # The data position is the "loader" component's; Lightning would load a copy of it into its own loader.
        own = loops.get("state_dict")
        if isinstance(own, dict):
            own.pop("combined_loader", None)
        if self.kind == EPOCH and isinstance(loops.get("epoch_progress"), dict):
            loops["epoch_progress"] = _finished_epochs(loops["epoch_progress"])
        return {"format": FORMAT, "kind": self.kind, "fit_loop": loops, "should_stop": bool(self.trainer.should_stop)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("kind") not in KINDS or not isinstance(state.get("fit_loop"), dict):
            raise CheckpointMismatchError(
                "the checkpoint's 'lightning_loops' component is not Lightning loop progress written by "
                "spotsafe.integrations.lightning.SpotsafeCallback"
            )
        fit_loop = self.trainer.fit_loop
        fit_loop.load_state_dict(state["fit_loop"])
        if state["kind"] == EPOCH:
            # Lightning keeps a loaded loop "restarting" (always, with max_steps), and a restarting loop skips
            # the next epoch's start (hooks, counters). Between epochs there is nothing to restart: clear the
            # flag on every loop, as a run that never stopped has it. (Private attribute: Lightning's FitLoop
            # setter would turn False back into True for max_steps runs.) The loops stay "resuming", so the
            # epoch's first iteration is the one Lightning made when it set up the data, which the loader's
            # position makes serve the resumed epoch.
            for loop in (fit_loop, fit_loop.epoch_loop, fit_loop.epoch_loop.val_loop):
                loop._restarting = False
        self.trainer.should_stop = bool(state.get("should_stop", False))
        self.restored_kind = str(state["kind"])


class TrainLoader:
    """The train DataLoader's order and position: the component ``loader``.

    Wraps one :class:`~spotsafe.data.position.LoaderPosition` (``count="manual"``: Lightning may fetch ahead,
    so the callback says when a batch is consumed) that is attached to the DataLoader Lightning iterates, once
    Lightning has made it (after its distributed-sampler and strategy processing), before its first iteration.
    ``epoch`` is Lightning's ``current_epoch`` (what the Checkpointer reports).
    """

    def __init__(self, epoch: Callable[[], int]) -> None:
        self.position = LoaderPosition(count="manual")
        self._epoch = epoch
        self.foreign: object | None = None  # a train loader that is not a DataLoader, seen by attach()

    @property
    def epoch(self) -> int:
        return self._epoch()

    @property
    def loader(self) -> DataLoader[Any] | None:
        return self.position.loader

    def attach(self, loader: object) -> bool:
        """Position ``loader`` (Lightning's train loader); ``False`` when it is not a DataLoader."""
        if not isinstance(loader, DataLoader):
            self.foreign = loader
            return False
        self.position.attach(loader)
        return True

    def check(self, train_dataloader: object) -> None:
        """The trainer's train data is the one DataLoader that is positioned, or raise :class:`ConfigError`."""
        if self.foreign is not None or not isinstance(train_dataloader, DataLoader):
            raise ConfigError(
                "SpotsafeCallback resumes the train data at the batch where it stopped, which needs one "
                "torch.utils.data.DataLoader over a map-style dataset; the trainer's train data is "
                f"{type(train_dataloader).__name__}. Return one DataLoader from train_dataloader() (for an "
                "iterable dataset, give it state_dict()/load_state_dict() and pass it as SpotsafeCallback(extra=...))"
            )
        if train_dataloader is not self.position.loader:
            raise ConfigError(
                "SpotsafeCallback could not position the trainer's train DataLoader (it was not made through the "
                "strategy's process_dataloader); use one DataLoader returned by train_dataloader() or passed to fit()"
            )

    def consumed(self) -> None:
        """One batch of the current epoch was trained on."""
        if self.position.loader is not None:
            self.position.consumed(1)

    def finish_epoch(self) -> None:
        """Lightning ended the epoch (``limit_train_batches``, ``max_steps``, ``should_stop``, or its end): the
        rest of its order is never served, and the next iteration is a new epoch."""
        loader = self.position.loader
        if loader is None:
            return
        rest = len(loader) - self.position.position
        if rest > 0:
            # StateError: the epoch's order was never drawn (no batch of it was fetched): there is nothing to end.
            with contextlib.suppress(StateError):
                self.position.consumed(rest)

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state)


def set_sampler_epoch(loader: DataLoader[Any], epoch: int) -> None:
    """``set_epoch(epoch)`` on the loader's samplers that have it (a ``DistributedSampler``), as Lightning does at
    each epoch's start: on resume the first iteration comes before Lightning's call."""
    seen: list[object] = []
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch) and all(sampler is not s for s in seen):
            seen.append(sampler)
            set_epoch(epoch)


__all__ = ["BATCH", "EPOCH", "KINDS", "LoopState", "TrainLoader", "set_sampler_epoch"]
