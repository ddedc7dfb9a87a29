"""``spotsafe.batch.map``: run a function over items, shard by shard, resumably, each result committed once.

On a stop notice (SIGTERM, a provider's notice: the same sources as the
Checkpointer's) the worker stops taking shards. The shard in progress is finished
and committed when that fits before the notice's deadline, as the emergency
checkpoint planner judges it (:func:`~spotsafe.engine.emergency.plan_emergency`,
from the measured time per item and per commit, times a safety factor); otherwise
it is left, and its items are done again by the next run. Then the process exits
75 (preempted): run the same command again to go on. Without a deadline, the
shard is finished.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

from spotsafe.batch.job import BatchJob, BatchResult, Shard
from spotsafe.engine.emergency import Option, plan_emergency
from spotsafe.engine.watch import NoticeHub, make_sources
from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.notices.base import NoticeSource
from spotsafe.notices.signals import DEFAULT_SIGNALS
from spotsafe.storage.base import Storage

log = logging.getLogger("spotsafe")
SAFETY = 1.5
FINISH = "finish-shard"


class _Rates:
    """Measured seconds per item and per commit (the slowest of the recent ones: estimates lean long)."""

    def __init__(self) -> None:
        self.item_s: list[float] = []
        self.commit_s: list[float] = []

    def estimate(self, items_left: int) -> float | None:
        """Seconds to do ``items_left`` items and commit (``None``: no item measured yet; a commit not measured
        yet counts as 1 s)."""
        if not self.item_s:
            return None
        return items_left * max(self.item_s[-8:]) + (max(self.commit_s[-3:]) if self.commit_s else 1.0)


def map(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    url: str | os.PathLike[str] | Storage,
    *,
    shard_size: int = 1000,
    format: str = "jsonl",
    rank: int | None = None,
    world_size: int | None = None,
    notices: Iterable[NoticeSource] | str = "auto",
    verify: str = "size",
    storage_options: Mapping[str, Any] | None = None,
    exit: Callable[[int], NoReturn] = sys.exit,
) -> BatchResult:
    """Apply ``fn`` to every item of ``items`` (a sequence: a list, a map-style dataset, :func:`parquet_rows`)
    and write the results at ``url`` in shards of ``shard_size`` items, as JSONL or Parquet parts under
    ``parts/``. ``fn`` returns one row per item (``None``: no row). Run again after an interruption, the same
    command goes on where it stopped; every item's result is in the output exactly once.

    ``notices``: ``"auto"`` (detect the provider, and handle SIGTERM) or a list of notice sources. On a stop
    notice the process exits 75 (after committing the shard in progress when that fits before the deadline).
    """
    started = time.monotonic()
    job = BatchJob(
        url,
        items=len(items),
        shard_size=shard_size,
        format=format,
        rank=rank,
        world_size=world_size,
        verify=verify,
        storage_options=storage_options,
    )
    sources, reasons = make_sources(notices, signals=DEFAULT_SIGNALS, handle_signals=True, grace_s=None)
    hub = NoticeHub(sources, reasons, lambda cls, **fields: None)
    hub.start()
    before = len(job.done())
    committed = items_committed = 0
    rates = _Rates()

    def stop(reason: str) -> NoReturn:
        log.warning(
            "spotsafe batch: %s; %d of %d shards done: run the same command again to go on",
            reason,
            before + committed,
            job.spec.shards,
        )
        exit(EXIT_PREEMPTED)

    try:
        for shard in job.todo():
            rows, finishing, t0 = [], False, time.monotonic()
            for i in shard.items:
                if not finishing and hub.poll(i):
                    finishing = _finish(hub, rates, shard, i)
                    if not finishing:
                        stop(f"stop notice at item {i}: shard {shard.index} left for the next run")
                t = time.monotonic()
                row = fn(items[i])
                rates.item_s.append(time.monotonic() - t)
                if row is not None:
                    rows.append(row)
            t = time.monotonic()
            job.commit(shard, rows, time.monotonic() - t0)
            rates.commit_s.append(time.monotonic() - t)
            committed, items_committed = committed + 1, items_committed + len(shard.items)
            if finishing or hub.poll(shard.end):
                stop(f"stop notice: stopped after committing shard {shard.index}")
    finally:
        hub.close()
    return BatchResult(committed, items_committed, before, job.spec.shards, time.monotonic() - started)


def _finish(hub: NoticeHub, rates: _Rates, shard: Shard, item: int) -> bool:
    """Whether to finish ``shard`` (``item`` onwards still to do) before stopping: it fits before the deadline."""
    deadline = hub.deadline
    time_left = None if deadline is None else deadline - time.time()
    option = Option(FINISH, "direct", False, 0, rates.estimate(shard.end - item))
    plan = plan_emergency([option], time_left_s=time_left, safety=SAFETY, preferred=FINISH)
    # Nothing measured yet (a notice before the first item): leave the shard rather than guess.
    plan_ok = plan.choice is not None and not (time_left is not None and option.estimate_s is None)
    log.warning("spotsafe batch: stop notice at item %d: %s", item, plan.reason if plan_ok else "leaving the shard")
    return plan_ok
