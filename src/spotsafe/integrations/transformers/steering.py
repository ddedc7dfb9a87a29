"""How :class:`~spotsafe.integrations.transformers.SpotsafeCallback` steers Trainer's unchanged loop to a restored step.

Trainer's inner loop (transformers 5.x ``Trainer._run_epoch``) always starts at epoch 0 when it is not given
``resume_from_checkpoint``, and counts micro-batches with a local ``step`` from the start of each epoch. From
a callback, the loop is brought to the restored step and data position as follows (:class:`LoopSteering`):

* **Epochs already trained** are made empty: for their iteration, accelerate's ``DataLoaderShard`` is given an
  empty stand-in for its inner ``DataLoader`` (:class:`SteeredLoader`), so no data is read, no worker started
  and no random number drawn. Trainer logs nothing for them and its "no sample in epoch" stop is undone at
  ``on_epoch_end``. When the run had finished (a notice at the last step), every epoch is empty.
* **The resumed epoch** is served by :class:`~spotsafe.data.position.LoaderPosition` (attached to the inner
  ``DataLoader``): the rest of the recorded order, skipped at the index level, with the workers' original seed.
  Trainer's local ``step`` then counts from 0 instead of the position, which changes two things it computes from
  it: ``TrainerState.epoch`` (set again at ``on_step_end``) and, with gradient accumulation whose steps do not
  divide the epoch, where the epoch's last, shorter accumulation ends (Trainer syncs there when ``step + 1``
  equals the epoch's length). For that last partial step only, ``args.gradient_accumulation_steps`` is changed
  so that Trainer syncs at its last batch as the uninterrupted run did (:meth:`LoopSteering._before_chunk`);
  it is put back at the end of that step, and a Trainer checkpoint never saves the changed value.
* **RNG streams**: restored by ``restore()``, and put back once more at ``on_epoch_begin`` of the resumed epoch
  (anything Trainer drew before, ``eval_on_start`` for one, is undone); an epoch that starts fresh then draws
  its workers' seed from them, as the uninterrupted run did.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.data_loader import SeedableRandomSampler
from torch.utils.data import DataLoader

from spotsafe.data.position import LoaderPosition
from spotsafe.errors import CheckpointMismatchError, ConfigError
from spotsafe.state.rng import GlobalRNG

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
EMPTY_EPOCH_WARNING = "There seems not to be a single sample in your epoch_iterator"

_FIELDS: dict[str, tuple[type, ...]] = {
    "global_step": (int,),
    "epoch": (float, int),
    "num_input_tokens_seen": (int,),
    "best_metric": (float, int, type(None)),
    "best_global_step": (int, type(None)),
    "best_model_checkpoint": (str, type(None)),
}


class TrainerProgress:
    """``TrainerState``'s fields that decide the future of the run, as a component.

    Not saved: ``log_history``, ``total_flos`` and timings (they differ between two identical runs, so a drill
    would find every run different), and what Trainer sets from its arguments (``max_steps``, ``logging_steps``...).
    """

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self.state, name) for name in _FIELDS}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        for name, types in _FIELDS.items():
            value = saved.get(name)
            if not isinstance(value, types) or isinstance(value, bool):
                raise CheckpointMismatchError(f"the checkpoint's TrainerState.{name} is {value!r}")
        for name in _FIELDS:
            setattr(self.state, name, saved[name])


class _IgnoreStops:
    """A picklable ``worker_init_fn``: loader workers ignore stop signals, then run the original hook.

    A SIGTERM to the whole process group (an OS shutdown, Ctrl-C in a terminal) would otherwise kill the workers,
    and the main process would fail on its next batch instead of saving; the main process handles it once.
    """

    def __init__(self, original: Callable[[int], None] | None) -> None:
        self.original = original

    def __call__(self, worker_id: int) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        if self.original is not None:
            self.original(worker_id)


class _Empty:
    """Stands in for the shard's inner DataLoader during an epoch already trained: iterates nothing."""

    def __init__(self, inner: DataLoader[Any]) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property  # type: ignore[misc]  # accelerate's DataLoaderAdapter reports its inner loader's class
    def __class__(self) -> type:
        return type(self._inner)


def _materialize_generators(loader: DataLoader[Any]) -> None:
    """Give accelerate's ``SeedableRandomSampler`` the generator it would create at its first iteration.

    It creates its generator lazily and seeds it at every iteration (``data_seed + epoch``), so a run that has
    iterated has one and a run about to resume has none yet: the position's generators would not match. Made
    now, it is the same generator, seeded the same way before every draw: the order does not change.
    """
    batch_sampler = loader.batch_sampler
    wrapped = getattr(batch_sampler, "batch_sampler", None)  # accelerate's BatchSamplerShard, with several ranks
    places = (loader.sampler, getattr(batch_sampler, "sampler", None), getattr(wrapped, "sampler", None))
    for sampler in places:
        if isinstance(sampler, SeedableRandomSampler) and sampler.generator is None:
            sampler.generator = torch.Generator(device=torch.get_default_device())


class SteeredLoader:
    """Trainer's training loader, positioned: ``tracker`` saves its order and position; epochs can be emptied."""

    def __init__(self, loader: Any) -> None:
        inner = getattr(loader, "base_dataloader", None)  # accelerate's DataLoaderShard wraps a torch DataLoader
        if inner is None or not isinstance(inner, DataLoader) or type(loader).__name__ == "DataLoaderDispatcher":
            raise ConfigError(
                "SpotsafeCallback needs Trainer's map-style training loader (accelerate's DataLoaderShard around a "
                f"torch DataLoader), got {type(loader).__name__}; an IterableDataset or dispatch_batches=True is not "
                "supported: give the dataset state_dict()/load_state_dict() and write the loop with the Checkpointer"
            )
        self.shard, self.inner = loader, inner
        self.batches = len(inner)
        _materialize_generators(inner)
        self.tracker = LoaderPosition(count="manual")
        self.tracker.attach(inner)
        if inner.num_workers > 0 and not isinstance(inner.worker_init_fn, _IgnoreStops):
            inner.worker_init_fn = _IgnoreStops(inner.worker_init_fn)
        self._empty = _Empty(inner)

    def empty(self, yes: bool) -> None:
        """Make the next iteration yield nothing (``yes``) or serve the loader again."""
        self.shard.base_dataloader = self._empty if yes else self.inner

    def close(self) -> None:
        self.empty(False)


class _QuietEmptyEpochs(logging.Filter):
    """Drops Trainer's warning about an empty epoch while the epochs already trained are skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and str(record.msg).startswith(EMPTY_EPOCH_WARNING))


class LoopSteering:
    """Brings Trainer's loop to the restored step (see the module docstring); one per ``trainer.train()``.

    ``restored_rng``: the global RNG state ``restore()`` set (``None``: a fresh run). ``finished``: the restored
    run had trained all its steps, so no epoch serves data.
    """

    def __init__(
        self, loader: SteeredLoader, args: Any, state: Any, *, restored_rng: dict[str, Any] | None, finished: bool
    ) -> None:
        self.loader, self.args, self.state = loader, args, state
        self.rng, self.finished = restored_rng, finished
        tracker = loader.tracker
        self.resume_epoch = tracker.epoch if restored_rng is not None else 0
        self.resume_at = tracker.position if restored_rng is not None else 0
        self.epoch = -1  # Trainer's epoch (the loop's counter: on_epoch_begin calls - 1)
        self.pos = 0  # micro-batches consumed in Trainer's current epoch
        self.skipping = False  # the current epoch was emptied
        self.accumulation = int(args.gradient_accumulation_steps)
        self._short_pending = False
        self._quiet = _QuietEmptyEpochs()
        self._logger = logging.getLogger("transformers.trainer")
        self._logger.addFilter(self._quiet)

    # -- epochs ---------------------------------------------------------------------------------------
    def epoch_begins(self) -> None:
        self.epoch += 1
        self.skipping = self.finished or self.epoch < self.resume_epoch
        self._quiet.active = self.skipping
        self.loader.empty(self.skipping)
        self.pos = self.resume_at if self.epoch == self.resume_epoch and not self.skipping else 0
        if self.epoch == self.resume_epoch and self.rng is not None and not self.skipping:
            GlobalRNG().load_state_dict(self.rng)
            self.rng = None
        self._before_chunk(chunk_start=False, save_pending=False)

    def epoch_ends(self, control: Any) -> None:
        self._restore_accumulation()
        if self.skipping:
            # Trainer stops training after an epoch without samples; this one was emptied on purpose.
            control.should_training_stop = self.finished
            control.should_log = control.should_evaluate = control.should_save = False
            self.loader.empty(False)
            self._quiet.active = False

    @property
    def epoch_complete(self) -> bool:
        """Every batch of Trainer's current epoch was consumed."""
        return self.pos >= self.loader.batches

    # -- batches --------------------------------------------------------------------------------------
    def step_begins(self) -> None:
        """The first micro-batch of an optimizer step is about to be trained (``pos`` counts the ones before)."""
        self._before_chunk(chunk_start=True, save_pending=False)

    def batch_done(self, control: Any, *, optimizer_step: bool) -> None:
        """A micro-batch was consumed (``optimizer_step``: it ended an optimizer step, ``on_step_end``)."""
        if self.skipping:
            raise CheckpointMismatchError("Trainer trained a batch in an epoch that the restored run had finished")
        self.pos += 1
        self.loader.tracker.consumed(1)
        if not optimizer_step:
            return
        if self.epoch == self.resume_epoch and self.resume_at:
            # Trainer computed the epoch from its local step, which began at 0 in the resumed epoch.
            self.state.epoch = self.epoch + self.pos / self.loader.batches
        if self.pos >= self.loader.batches:
            self._restore_accumulation()
        else:
            self._before_chunk(chunk_start=False, save_pending=bool(control.should_save))

    def trainer_saved(self) -> None:
        if self._short_pending:
            self._short_pending = False
            self._set_accumulation(1)

    # -- the last, shorter accumulation of a resumed epoch ----------------------------------------------------
    def _before_chunk(self, *, chunk_start: bool, save_pending: bool) -> None:
        """Trainer decides whether a micro-batch ends an optimizer step from its local ``step``; in the resumed
        epoch that count began at 0, so at the epoch's last, shorter accumulation (``r`` batches) it would not
        sync. ``r == 1``: the one batch syncs with an accumulation of 1, set before Trainer looks at the batch
        (after this step's Trainer checkpoint, if one is due). ``r >= 2``: at ``on_step_begin`` of that step (its
        first batch does not sync either way), the accumulation becomes the number of batches the resumed epoch
        serves, so that Trainer syncs at its last one."""
        batches, k = self.loader.batches, self.accumulation
        if k <= 1 or batches % k == 0 or self.epoch != self.resume_epoch or not self.resume_at or self.skipping:
            return
        r = batches % k
        if self.pos != batches - r:
            return
        if r == 1 and not chunk_start:
            if save_pending:  # a Trainer checkpoint of this step comes first: it must save the real arguments
                self._short_pending = True
            else:
                self._set_accumulation(1)
        elif r >= 2 and chunk_start:
            self._set_accumulation(batches - self.resume_at)

    def _set_accumulation(self, value: int) -> None:
        self.args.gradient_accumulation_steps = value

    def _restore_accumulation(self) -> None:
        self._short_pending = False
        if self.args.gradient_accumulation_steps != self.accumulation:
            self.args.gradient_accumulation_steps = self.accumulation

    def close(self) -> None:
        self._restore_accumulation()
        self.loader.close()
        self._quiet.active = False
        self._logger.removeFilter(self._quiet)
