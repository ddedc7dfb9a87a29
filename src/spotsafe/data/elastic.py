"""A data-parallel loader whose position is global, so it survives a change in the number of ranks.

``DistributedSampler`` gives rank ``r`` of ``W`` every ``W``-th index of one global order (padded to a
multiple of ``W``). After ``k`` batches of ``B`` on every rank, the ranks have together consumed exactly the
first ``k·B·W`` positions of that order. :class:`ElasticLoader` saves that number (the *global cursor*)
instead of each rank's own offset, and the state is the same on every rank. Resumed by ``W'`` ranks, it
splits what is left of the epoch's order (from the cursor on) the same way among them: no sample of the
epoch is skipped and none is served twice, whatever the world sizes a run goes through.

Each world size's stretch of an epoch (a *segment*) is split like ``DistributedSampler`` splits a whole
epoch: the rest of the order, padded to a multiple of ``W`` with its own first indices (``drop_last=False``,
the padding is counted in :attr:`ElasticLoader.padding`), or cut to one (``drop_last=True``), then every
``W``-th index from the rank's own. A run that never changes its world size therefore gets exactly the
batches of ``DataLoader(dataset, batch_size, sampler=DistributedSampler(...))`` with ``set_epoch(epoch)``
each epoch (the same order: ``torch.randperm(len(dataset))`` seeded with ``seed + epoch``).

Ranks must consume batches in lockstep (data-parallel training does, and spotsafe saves all ranks at one
step); the state each rank saves is then identical, as a sharded checkpoint's global state must be.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from spotsafe.checks import check_bool, check_int, given
from spotsafe.data.loader import DEFAULT_IGNORED_SIGNALS, _SeededDataset, _WorkerInit, mix
from spotsafe.errors import CheckpointMismatchError, ConfigError

FORMAT = "spotsafe-elastic-cursor"


def global_order(length: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """One epoch's global order, as ``DistributedSampler`` draws it (before padding)."""
    if not shuffle:
        return torch.arange(length)
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(length, generator=generator)


def split(rest: torch.Tensor, world_size: int, rank: int, drop_last: bool) -> tuple[torch.Tensor, int]:
    """Rank ``rank``'s share of ``rest`` (the epoch's order from the cursor on), and how many padded
    positions the segment has (repeats of its first indices, to give every rank as many)."""
    if drop_last:
        usable = len(rest) - len(rest) % world_size
        return rest[:usable][rank::world_size], 0
    padding = -len(rest) % world_size
    if padding and len(rest):
        repeats = -(-padding // len(rest))
        rest = torch.cat([rest, rest.repeat(repeats)[:padding]])
    return rest[rank::world_size], padding


class _SegmentSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` for this rank's share of the current segment, from its position on."""

    def __init__(self, owner: ElasticLoader) -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[tuple[int, int]]:
        owner = self.owner
        share = owner.share()
        epoch = owner.epoch
        stop = owner.batches_in_segment() * owner.batch_size
        for index in share[owner.batches * owner.batch_size : stop].tolist():
            yield epoch, index

    def __len__(self) -> int:
        owner = self.owner
        return max(0, owner.batches_in_segment() - owner.batches) * owner.batch_size


class ElasticLoader:
    """Data-parallel batches with a global cursor (see the module docstring); pass it as ``loader=``.

    Args:
        dataset: a map-style dataset.
        batch_size: per rank.
        shuffle, seed, drop_last: as ``DistributedSampler``'s (the epoch's order is
            ``torch.randperm(len(dataset))`` seeded with ``seed + epoch``); ``drop_last`` also drops a rank's
            last partial batch.
        num_replicas, rank: default: torch.distributed's world size and rank (1 and 0 without it).
        Any other keyword goes to :class:`torch.utils.data.DataLoader` (``num_workers``, ``collate_fn``...);
        with workers, each sample is fetched after seeding the worker's RNGs from ``(seed, epoch, index)``.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int = 1,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        reseed_workers: bool = True,
        **dataloader_kwargs: Any,
    ) -> None:
        if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
            raise ConfigError(f"ElasticLoader needs a map-style dataset with __len__, got {given(dataset)}")
        check_int("batch_size", batch_size, at_least=1)
        check_int("seed", seed, integral=True)
        for name, flag in (("shuffle", shuffle), ("drop_last", drop_last), ("reseed_workers", reseed_workers)):
            check_bool(name, flag)
        for key in ("sampler", "batch_sampler", "shuffle", "drop_last", "generator"):
            if key in dataloader_kwargs:
                raise ConfigError(f"ElasticLoader does not take {key}=: it decides the order itself")
        joined = dist.is_available() and dist.is_initialized()
        self.world_size = num_replicas if num_replicas is not None else dist.get_world_size() if joined else 1
        self.rank = rank if rank is not None else dist.get_rank() if joined else 0
        check_int("num_replicas", self.world_size, at_least=1)
        check_int("rank", self.rank, at_least=0)
        if self.rank >= self.world_size:
            raise ConfigError(f"rank {self.rank} is not below num_replicas {self.world_size}")
        self.dataset_length = len(dataset)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, int(seed), drop_last
        self.epoch = 0
        self.start = 0  # the global cursor where this segment began
        self.batches = 0  # batches this rank has consumed in this segment
        self._share: tuple[tuple[int, int, int], torch.Tensor, int] | None = None
        # The DataLoader draws its workers' base seed when an iteration starts: from this private generator,
        # seeded from the position, never from the global RNG (a resumed run would draw at another moment).
        self._generator = torch.Generator()
        self._loader = DataLoader(
            _SeededDataset(dataset, self.seed, reseed_workers),
            batch_size=batch_size,
            sampler=_SegmentSampler(self),
            generator=self._generator,
            worker_init_fn=_WorkerInit(DEFAULT_IGNORED_SIGNALS, dataloader_kwargs.pop("worker_init_fn", None)),
            **dataloader_kwargs,
        )
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- the segment ---------------------------------------------------------------------------------
    def share(self) -> torch.Tensor:
        """This rank's indices for the current segment (computed once per segment)."""
        key = (self.epoch, self.start, self.world_size)
        if self._share is None or self._share[0] != key:
            rest = global_order(self.dataset_length, self.seed, self.epoch, self.shuffle)[self.start :]
            share, padding = split(rest, self.world_size, self.rank, self.drop_last)
            self._share = (key, share, padding)
        return self._share[1]

    @property
    def padding(self) -> int:
        """Padded positions of the current segment (indices served twice this epoch, at its end)."""
        self.share()
        assert self._share is not None
        return self._share[2]

    def batches_in_segment(self) -> int:
        full, rest = divmod(len(self.share()), self.batch_size)
        return full if self.drop_last or not rest else full + 1

    @property
    def consumed(self) -> int:
        """The global cursor: positions of the epoch's order that all ranks together have consumed."""
        remaining = self.dataset_length - self.start
        if self.drop_last:
            remaining -= remaining % self.world_size
        return self.start + min(self.batches * self.batch_size * self.world_size, remaining)

    def __len__(self) -> int:
        """Batches left in the current segment (the rest of the epoch at this world size)."""
        return max(0, self.batches_in_segment() - self.batches)

    def __iter__(self) -> Iterator[Any]:
        """Yield this rank's remaining batches of the current epoch, counting each one as consumed."""
        epoch = self.epoch
        self._generator.manual_seed(mix(self.seed, epoch, self.consumed, 0xB45E) & ((1 << 63) - 1))
        for batch in self._loader:
            if self.epoch != epoch:
                raise RuntimeError("ElasticLoader was iterated twice at once or restored mid-iteration")
            self.batches += 1
            if self.batches >= self.batches_in_segment():
                self.epoch, self.start, self.batches = self.epoch + 1, 0, 0
            yield batch

    def close(self) -> None:
        """Stop worker processes now (also done at interpreter exit)."""
        iterator = getattr(self._loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    # -- the checkpoint ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The global position: the same on every rank that consumed as many batches."""
        return {
            "format": FORMAT,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "dataset_length": self.dataset_length,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from a saved position, at this loader's world size (which may differ from the saver's)."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointMismatchError(f"the checkpoint's loader state is not an ElasticLoader's: {given(state)}")
        for key in ("seed", "dataset_length", "shuffle", "drop_last"):
            if state.get(key) != getattr(self, key):
                raise CheckpointMismatchError(
                    f"the checkpoint's data loader had {key}={state.get(key)!r}, this one has "
                    f"{key}={getattr(self, key)!r}: resuming would feed different samples. "
                    "Use the same data settings, or start a new run."
                )
        epoch, consumed = state.get("epoch"), state.get("consumed")
        if not isinstance(epoch, int) or not isinstance(consumed, int) or not _count(epoch) or not _count(consumed):
            raise CheckpointMismatchError(f"the checkpoint's loader position {epoch!r}/{consumed!r} is invalid")
        if consumed > self.dataset_length:
            raise CheckpointMismatchError(
                f"the checkpoint's loader consumed {consumed} of {self.dataset_length} samples"
            )
        self.epoch, self.start, self.batches = epoch, consumed, 0
        if self.batches_in_segment() == 0:  # the saved epoch was used up: the next one begins
            self.epoch, self.start = epoch + 1, 0


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _close_at_exit(ref: weakref.ReferenceType[ElasticLoader]) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


__all__ = ["ElasticLoader", "global_order", "split"]
