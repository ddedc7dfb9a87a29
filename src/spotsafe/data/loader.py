"""A DataLoader that can stop anywhere and resume with exactly the remaining batches.

:class:`ResumableLoader` is a cursor over an endless sequence of epochs. Each
epoch's order is a pure function of ``(seed, epoch)`` (a permutation drawn from
a private generator, never from the global RNG), and the loader counts the
batches it has handed to the training loop: that count, not how far worker
processes have prefetched, is the position saved in a checkpoint. On resume,
iteration restarts at the saved epoch and skips exactly the consumed batches.

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
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from spotsafe.checks import check_bool, check_callable, check_int, check_signals, given
from spotsafe.errors import CheckpointMismatchError, ConfigError

_MASK64 = (1 << 64) - 1
DEFAULT_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_RESERVED = ("sampler", "batch_sampler", "shuffle", "generator")


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
        order = epoch_order(owner.dataset_length, owner.seed, owner.epoch, owner.shuffle)
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
    Any other keyword is passed to :class:`torch.utils.data.DataLoader`
    (``num_workers``, ``collate_fn``, ``pin_memory``, ``persistent_workers``...).

    Contract: one iteration at a time, from the thread that owns the training loop.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int = 1,
        *,
        shuffle: bool = True,
        seed: int = 0,
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
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last), ("reseed_workers", reseed_workers)):
            check_bool(name, flag)
        check_int("seed", seed, integral=True)
        ignored = check_signals("ignore_signals", ignore_signals)
        check_callable("worker_init_fn", worker_init_fn, allow_none=True)
        bad = [k for k in _RESERVED if k in dataloader_kwargs]
        if bad:
            raise ConfigError(f"ResumableLoader chooses {', '.join(bad)} itself; use shuffle= and seed= instead")
        self.dataset = dataset
        self.dataset_length = len(dataset)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"the dataset has {self.dataset_length} samples, fewer than one batch of {batch_size} "
                "with drop_last=True: lower batch_size or keep the last partial batch"
            )
        self.epoch = 0
        self.position = 0
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
        full, rest = divmod(self.dataset_length, self.batch_size)
        return full if self.drop_last or not rest else full + 1

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "dataset_length", "shuffle", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise CheckpointMismatchError(
                    f"the checkpoint's data loader had {key}={state.get(key)!r}, this one has "
                    f"{key}={getattr(self, key)!r}: resuming would feed different batches. "
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
        self.epoch = epoch
        self.position = position
