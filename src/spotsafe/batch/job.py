"""Resumable batch jobs: :class:`BatchJob` (shards to do, commit one) and :func:`map` (the whole loop).

Items are numbered ``0 .. n-1`` and belong to fixed shards of ``shard_size``. A worker
(``rank`` of ``world_size``: torchrun's ``RANK``/``WORLD_SIZE``, a Slurm array's task
id and count, or given) takes its share of the shards not done yet, so when the
number of workers changes between runs the unfinished shards are shared out again.
There is no coordinator. Under torch.distributed, rank 0 reads the commit records
and the others receive its list, which they share out evenly; workers that cannot
talk take the shards whose index is their rank modulo the world size, a share no
other worker's overlaps however late it reads the records. Before each shard a
worker checks that nobody committed it meanwhile.

Under the supervisor (``$SPOTSAFE_ATTEMPT``), each attempt records that it started;
a worker of an older attempt that is still running (a zombie) finds a newer one
before it commits and stops (:class:`~spotsafe.storage.fencing.FencedError`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spotsafe.batch.formats import encode
from spotsafe.batch.layout import (
    SPEC_KEY,
    WRITERS,
    BatchSpec,
    ShardRecord,
    checksum,
    newest_attempt,
    record_shards,
)
from spotsafe.errors import ConfigError
from spotsafe.jobenv import JobEnv
from spotsafe.storage.base import BlobNotFoundError, Storage
from spotsafe.storage.fencing import FencedError
from spotsafe.storage.registry import open_storage

log = logging.getLogger("spotsafe")


@dataclass(frozen=True)
class Shard:
    """Shard ``index``: items ``start`` to ``end`` (``range(start, end)``)."""

    index: int
    start: int
    end: int

    @property
    def items(self) -> range:
        return range(self.start, self.end)


def worker_of(env: Mapping[str, str], rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This worker's ``(rank, world_size)``: as given, else torchrun's or a Slurm array's, else ``(0, 1)``."""
    if rank is None and world_size is None:
        if "RANK" in env and "WORLD_SIZE" in env:
            rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            low = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            rank, world_size = int(env["SLURM_ARRAY_TASK_ID"]) - low, int(env["SLURM_ARRAY_TASK_COUNT"])
    rank = 0 if rank is None else rank
    world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError(f"a batch worker's rank must be in 0..{world_size - 1} (world size {world_size}), got {rank}")
    return rank, world_size


class BatchJob:
    """A batch job of ``items`` items at ``url`` (any storage URL, or a :class:`Storage`). The first run records
    the job's shape (``batch.json``); a rerun must give the same ``items``, ``shard_size`` and ``format``."""

    def __init__(
        self,
        url: str | os.PathLike[str] | Storage,
        *,
        items: int,
        shard_size: int = 1000,
        format: str = "jsonl",
        rank: int | None = None,
        world_size: int | None = None,
        verify: str = "size",
        storage_options: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if verify not in ("size", "full"):
            raise ConfigError(f"verify must be 'size' or 'full', got {verify!r}")
        env = os.environ if env is None else env
        self.storage = url if isinstance(url, Storage) else open_storage(url, storage_options)
        self.spec = BatchSpec(items, shard_size, format)
        self.rank, self.world_size = worker_of(env, rank, world_size)
        self.attempt = JobEnv.from_env(env).attempt or 0
        self.verify = verify
        found = BatchSpec.read(self.storage)
        if found is None:
            self.storage.write_atomic(SPEC_KEY, self.spec.encode())  # every worker writes the same bytes
        elif found != self.spec:
            raise ConfigError(
                f"{self.storage.url} holds a batch job of {found.items} items in shards of {found.shard_size} as "
                f"{found.format}, not {items} in shards of {shard_size} as {format}: give the same items and "
                "settings to go on with it, or another location to start a new job"
            )
        if self.attempt:
            self.storage.write_atomic(f"{WRITERS}/attempt-{self.attempt:06d}", b"")

    # -- what is done ----------------------------------------------------------------------------------
    def _check(self, record: ShardRecord | None, shard: int) -> bool:
        if record is None or record.shard != shard or (record.start, record.end) != self.spec.bounds(shard):
            return False
        if record.key != self.spec.part_key(shard):
            return False
        try:
            if self.verify == "full":
                return checksum(self.storage.read(record.key)) == record.checksum
            return self.storage.size(record.key) == record.size
        except BlobNotFoundError:
            return False

    def _record(self, shard: int) -> ShardRecord | None:
        """``shard``'s commit record when it is intact and names an intact part (``None``: not done)."""
        try:
            record = ShardRecord.decode(self.storage.read(ShardRecord.key_of(shard)))
        except BlobNotFoundError:
            return None
        return record if self._check(record, shard) else None

    def done(self) -> dict[int, ShardRecord]:
        """The shards committed so far and intact, by index (a damaged record or part: not done)."""
        out: dict[int, ShardRecord] = {}
        for shard in record_shards(self.storage):
            if shard >= self.spec.shards:
                continue
            record = self._record(shard)
            if record is not None:
                out[shard] = record
            else:
                log.warning("spotsafe batch: shard %d's commit record or part is damaged: it is done again", shard)
        return out

    def todo(self, done: Collection[int] | None = None) -> list[Shard]:
        """This worker's share of the shards not done yet.

        Under torch.distributed, rank 0's list of what is left, shared out: every ``world_size``-th shard of it
        from the worker's ``rank`` (all ranks get the same list, so the shares never overlap, and they are even).
        Otherwise (workers that cannot talk: a Slurm array, processes started by hand) the shards whose index is
        ``rank`` modulo ``world_size``: a worker that lists the records a moment later than another (which may
        have committed since) still gets a share that overlaps no other's. ``done``: :meth:`done`'s shards when the
        caller has read them already."""
        found = set(self.done() if done is None else done)
        shared = _shared(sorted(found))
        if shared is not None:
            skip = set(shared)
            mine = [k for k in range(self.spec.shards) if k not in skip][self.rank :: self.world_size]
        else:
            mine = [k for k in range(self.rank, self.spec.shards, self.world_size) if k not in found]
        return [Shard(k, *self.spec.bounds(k)) for k in mine]

    def is_done(self, shard: Shard) -> bool:
        """Whether ``shard`` was committed since this worker planned (by a zombie, or by hand): checked before it
        starts one, so that no shard is done twice when it can be helped."""
        return self._record(shard.index) is not None

    # -- committing ------------------------------------------------------------------------------------
    def commit(self, shard: Shard, rows: Sequence[Any], seconds: float = 0.0) -> ShardRecord:
        """Write ``shard``'s part, then its record (the commit point). Raises :class:`FencedError` when a newer
        attempt of the supervised job has started (this worker is a zombie and must stop)."""
        data = encode(rows, self.spec.format)
        key = self.spec.part_key(shard.index)
        self._fence()
        self.storage.write_atomic(key, data)
        record = ShardRecord(
            shard=shard.index,
            start=shard.start,
            end=shard.end,
            key=key,
            size=len(data),
            checksum=checksum(data),
            rows=len(rows),
            attempt=self.attempt,
            rank=self.rank,
            seconds=round(seconds, 6),
        )
        self._fence()
        self.storage.write_atomic(ShardRecord.key_of(shard.index), record.encode())
        return record

    def _fence(self) -> None:
        newest = newest_attempt(self.storage) if self.attempt else 0
        if newest > self.attempt:
            raise FencedError(
                f"attempt {self.attempt} of this batch job is stale: attempt {newest} has started at "
                f"{self.storage.url}; this worker must stop writing"
            )

    def parts(self) -> Iterator[str]:
        """The keys of every done shard's part, in item order (what a reader concatenates)."""
        return (record.key for _, record in sorted(self.done().items()))


def open_existing(storage: Storage) -> BatchJob | None:
    """The batch job at ``storage``, as its ``batch.json`` describes it (``None``: there is none), for tools that
    read its progress or output (the supervisor, the drill) without knowing its settings."""
    spec = BatchSpec.read(storage)
    if spec is None:
        return None
    return BatchJob(storage, items=spec.items, shard_size=spec.shard_size, format=spec.format, env={})


def done_items(done: Mapping[int, ShardRecord]) -> int:
    """How many items the shards ``done`` (:meth:`BatchJob.done`) hold: a batch job's step, as the supervisor
    and the reports count."""
    return sum(record.end - record.start for record in done.values())


def _shared(done: list[int]) -> list[int] | None:
    """``done`` as rank 0 read it, when torch.distributed runs (every rank then shares out the same list);
    ``None`` when it does not."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    if dist.get_world_size() == 1:
        return done
    box: list[Any] = [done]
    dist.broadcast_object_list(box, src=0)
    return list(box[0])


@dataclass(frozen=True)
class BatchResult:
    """What one run of :func:`map` did: shards and items it committed, and how many were done before it."""

    shards_committed: int
    items_committed: int
    shards_done_before: int
    shards_total: int
    seconds: float
