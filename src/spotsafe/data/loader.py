"""A DataLoader that can stop anywhere and resume with exactly the remaining batches.

:class:`ResumableLoader` is a cursor over an endless sequence of epochs. Each
epoch's order is a pure function of ``(seed, epoch)`` (a permutation drawn from
a private generator, never from the global RNG), and the loader counts the
batches it has handed to the training loop: that count, not how far worker
processes have prefetched, is the position saved in a checkpoint. On resume,
iteration restarts at the saved epoch and skips exactly the consumed batches.

With ``sampler=`` (a ``DistributedSampler``, a ``WeightedRandomSampler``, any sampler of integer indices with
``len()``) the sampler decides each epoch's order instead: the loader calls its ``set_epoch(epoch)`` when it
has one, reads the epoch's order from it when the epoch begins, and saves that order with the position, so a
resume serves exactly the rest of it (at the index level: no sample is loaded to skip one).

Randomness inside ``dataset[i]`` stays reproducible too:

* with ``num_workers=0`` the dataset runs in the main process and draws from the
  global RNGs, which the checkpoint saves and restores;
* with worker processes, each sample is fetched after seeding ``random``,
  NumPy and torch in the worker from ``(seed, epoch, index)``
  (``reseed_workers=True``, the default), so a sample's augmentation no longer
  depends on which worker fetched it or on how many samples that worker saw
  since it started. Without it, a resumed run would restart the workers' random
  streams and differ from an uninterrupted run.

Worker processes ignore the interruption signals (``ignore_signals``), so a
signal sent to the whole process group (Ctrl-C, Slurm's ``--signal``, an OS
shutdown) reaches only the main process, which saves and exits cleanly; the
workers then exit with it.
"""

from __future__ import annotations

import atexit
import random
import signal
import weakref
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from spotsafe.checks import check_bool, check_callable, check_int, check_signals, given
from spotsafe.data.order import generators_at, indices_of, set_generator_states
from spotsafe.errors import CheckpointMismatchError, ConfigError, StateError

_MASK64 = (1 << 64) - 1
DEFAULT_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_RESERVED = {
    "batch_sampler": "ResumableLoader makes the batches from sampler= and batch_size=; to keep a batch sampler, "
    "make your DataLoader resumable in place with spotsafe.data.LoaderPosition",
    "generator": "ResumableLoader seeds its workers from seed=; give your sampler a generator of its own",
}


def mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): seeds that differ in any input are unrelated."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state


def epoch_order(length: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one epoch: a permutation from a private generator, or ``0..length-1``."""
    if not shuffle:
        return torch.arange(length)
    generator = torch.Generator()
    generator.manual_seed(mix(seed, epoch) & ((1 << 63) - 1))
    return torch.randperm(length, generator=generator)


class _EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for the loader's current epoch, from its current position."""

    def __init__(self, owner: ResumableLoader) -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[tuple[int, int]]:
        owner = self.owner
        order = owner.epoch_order()
        start = owner.position * owner.batch_size
        stop = owner.batches_per_epoch * owner.batch_size if owner.drop_last else len(order)
        epoch = owner.epoch
        for index in order[start:stop].tolist():
            yield epoch, index

    def __len__(self) -> int:
        owner = self.owner
        return max(0, (owner.batches_per_epoch - owner.position) * owner.batch_size)


class _SeededDataset(Dataset[Any]):
    """Fetches ``dataset[index]`` for an ``(epoch, index)`` key, reseeding per sample in workers."""

    def __init__(self, dataset: Dataset[Any], seed: int, reseed_workers: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.reseed_workers = reseed_workers

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if self.reseed_workers and get_worker_info() is not None:
            sample_seed = mix(self.seed, epoch, index, 0x5EED)
            random.seed(sample_seed)
            np.random.seed(sample_seed & 0xFFFFFFFF)
            torch.manual_seed(sample_seed & ((1 << 63) - 1))
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


class _WorkerInit:
    """Picklable worker_init_fn: ignore interruption signals, then call the user's hook."""

    def __init__(self, ignore: tuple[int, ...], user: Callable[[int], None] | None) -> None:
        self.ignore = ignore
        self.user = user

    def __call__(self, worker_id: int) -> None:
        for sig in self.ignore:
            signal.signal(sig, signal.SIG_IGN)
        if self.user is not None:
            self.user(worker_id)


def _close_at_exit(ref: weakref.ReferenceType[ResumableLoader]) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


class ResumableLoader:
    """A map-style DataLoader whose position is part of the checkpoint.

    Use it like a DataLoader; ``for batch in loader`` runs the rest of the
    current epoch. Pass it to :class:`~spotsafe.Checkpointer` as ``loader=`` so
    its ``state_dict()`` (seed, epoch, batches consumed) is saved and restored.
    The order is its own seeded shuffle (``shuffle=True``, the default), the
    dataset's order (``shuffle=False``), or a ``sampler``'s (see the module
    docstring; ``shuffle`` is then left out). Any other keyword is passed to
    :class:`torch.utils.data.DataLoader` (``num_workers``, ``collate_fn``,
    ``pin_memory``, ``persistent_workers``...).

    Contract: one iteration at a time, from the thread that owns the training loop.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int = 1,
        *,
        shuffle: bool | None = None,
        seed: int = 0,
        sampler: Sampler[int] | Iterable[int] | None = None,
        drop_last: bool = False,
        reseed_workers: bool = True,
        ignore_signals: tuple[int, ...] = DEFAULT_IGNORED_SIGNALS,
        worker_init_fn: Callable[[int], None] | None = None,
        **dataloader_kwargs: Any,
    ) -> None:
        if (
            isinstance(dataset, IterableDataset)
            or not isinstance(dataset, Sized)
            or not hasattr(dataset, "__getitem__")
        ):
            raise ConfigError(
                f"ResumableLoader needs a map-style dataset with __len__ and __getitem__, got {given(dataset)}; "
                "for an iterable dataset, give it state_dict()/load_state_dict() and pass it to the Checkpointer "
                "as an extra"
            )
        check_int("batch_size", batch_size, at_least=1)
        check_bool("shuffle", shuffle, allow_none=True)
        for name, flag in (("drop_last", drop_last), ("reseed_workers", reseed_workers)):
            check_bool(name, flag)
        check_int("seed", seed, integral=True)
        ignored = check_signals("ignore_signals", ignore_signals)
        check_callable("worker_init_fn", worker_init_fn, allow_none=True)
        for key, why in _RESERVED.items():
            if key in dataloader_kwargs:
                raise ConfigError(f"ResumableLoader does not take {key}=: {why}")
        if sampler is not None:
            if not isinstance(sampler, Sized) or not isinstance(sampler, Iterable):
                raise ConfigError(
                    f"sampler must be a sampler of dataset indices with len() (such as DistributedSampler(dataset)), "
                    f"got {given(sampler)}"
                )
            if shuffle is not None:
                raise ConfigError(
                    "give either sampler= or shuffle=, not both: the sampler decides the order "
                    "(DistributedSampler(dataset, shuffle=...))"
                )
        self.dataset = dataset
        self.dataset_length = len(dataset)
        self.sampler = sampler
        self.epoch_length = len(sampler) if sampler is not None else self.dataset_length
        self.batch_size = batch_size
        self.shuffle = sampler is None and shuffle is not False
        self.seed = int(seed)
        self.drop_last = drop_last
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"an epoch has {self.epoch_length} samples, fewer than one batch of {batch_size} "
                "with drop_last=True: lower batch_size or keep the last partial batch"
            )
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None  # with a sampler: the order of epoch self._order_epoch
        self._order_epoch = -1
        self._active: Any = None
        self._generator = torch.Generator()
        self._loader = DataLoader(
            _SeededDataset(dataset, self.seed, reseed_workers),
            batch_size=batch_size,
            sampler=_EpochSampler(self),
            drop_last=drop_last,
            generator=self._generator,
            worker_init_fn=_WorkerInit(ignored, worker_init_fn),
            **dataloader_kwargs,
        )
        # Workers ignore SIGTERM, so they must be told to stop before multiprocessing's exit
        # hook tries to terminate them (it would wait forever). atexit runs hooks last-in
        # first-out: this one runs before torch's and multiprocessing's.
        atexit.register(_close_at_exit, weakref.ref(self))

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.epoch_length, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    @property
    def sampler_name(self) -> str | None:
        """The sampler's class (saved, and checked on resume), or ``None`` for the loader's own order."""
        return None if self.sampler is None else type(self.sampler).__qualname__

    def epoch_order(self) -> torch.Tensor:
        """The current epoch's sample order; with a sampler, read from it once when the epoch begins."""
        if self.sampler is None:
            return epoch_order(self.dataset_length, self.seed, self.epoch, self.shuffle)
        if self._order_epoch != self.epoch:
            set_epoch = getattr(self.sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(self.epoch)
            order = indices_of(list(self.sampler))
            if len(order) != self.epoch_length:
                raise StateError(
                    f"the sampler yielded {len(order)} indices in epoch {self.epoch} but its len() is "
                    f"{self.epoch_length}; ResumableLoader needs a sampler whose len() is what it yields"
                )
            self._order, self._order_epoch = order, self.epoch
        assert self._order is not None
        return self._order

    def __len__(self) -> int:
        """Batches in one whole epoch."""
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        """Yield the remaining batches of the current epoch, counting each one as consumed."""
        self._generator.manual_seed(mix(self.seed, self.epoch, self.position, 0xB45E) & ((1 << 63) - 1))
        epoch = self.epoch
        self._active = iter(self._loader)
        try:
            for batch in self._active:
                if self.epoch != epoch:
                    raise RuntimeError("ResumableLoader was iterated twice at once or restored mid-iteration")
                self.position += 1
                if self.position >= self.batches_per_epoch:
                    self.epoch += 1
                    self.position = 0
                yield batch
        finally:
            self._active = None

    def close(self) -> None:
        """Stop worker processes now (also done at interpreter exit). Iterating again restarts them."""
        for iterator in (self._active, getattr(self._loader, "_iterator", None)):
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "dataset_length": self.dataset_length,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "sampler": self.sampler_name,
            "order": self._order if self._order_epoch == self.epoch else None,
            "generators": {name: g.get_state() for name, g in self._sampler_generators().items()},
        }

    def _sampler_generators(self) -> dict[str, torch.Generator]:
        return generators_at({"sampler": getattr(self.sampler, "generator", None)})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"sampler": self.sampler_name}
        mine.update(
            (key, getattr(self, key)) for key in ("seed", "batch_size", "dataset_length", "shuffle", "drop_last")
        )
        for key, value in mine.items():
            if state.get(key) != value:
                raise CheckpointMismatchError(
                    f"the checkpoint's data loader had {key}={state.get(key)!r}, this one has "
                    f"{key}={value!r}: resuming would feed different batches. "
                    "Use the same data settings, or start a new run."
                )
        epoch, position = state.get("epoch"), state.get("position")
        if (
            not isinstance(epoch, int)
            or not isinstance(position, int)
            or isinstance(epoch, bool)
            or isinstance(position, bool)
            or epoch < 0
            or not 0 <= position < self.batches_per_epoch
        ):
            raise CheckpointMismatchError(f"the checkpoint's loader position {epoch!r}/{position!r} is invalid")
        order = state.get("order")
        if order is not None:
            self._check_order(order)
        set_generator_states(self._sampler_generators(), state.get("generators", {}))
        self.epoch = epoch
        self.position = position
        self._order, self._order_epoch = (order.clone(), epoch) if order is not None else (None, -1)

    def _check_order(self, order: object) -> None:
        ok = isinstance(order, torch.Tensor) and order.dtype == torch.int64 and order.dim() == 1
        if self.sampler is None or not ok:
            raise CheckpointMismatchError(f"the checkpoint's loader order {given(order)} does not fit this loader")
        assert isinstance(order, torch.Tensor)
        if len(order) != self.epoch_length or (
            len(order) and (int(order.min()) < 0 or int(order.max()) >= self.dataset_length)
        ):
            raise CheckpointMismatchError(
                f"the checkpoint's epoch order has {len(order)} indices and this loader's sampler makes "
                f"{self.epoch_length} per epoch over {self.dataset_length} samples: resuming would feed different "
                "batches. Use the same sampler and dataset, or start a new run."
            )
