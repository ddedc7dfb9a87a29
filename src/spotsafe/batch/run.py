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

import contextlib
import logging
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn

from spotsafe.batch.job import BatchJob, BatchResult, Shard, done_items
from spotsafe.batch.layout import DONE, ShardRecord
from spotsafe.engine.emergency import Option, plan_emergency
from spotsafe.engine.watch import NoticeHub, make_sources
from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.jobenv import JobEnv
from spotsafe.notices.base import NoticeSource
from spotsafe.notices.signals import DEFAULT_SIGNALS
from spotsafe.reasons import ExitReason, SaveReason
from spotsafe.storage.base import Storage
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import RunIdentity
from spotsafe.telemetry.runlog import Emitter, open_run_log
from spotsafe.telemetry.store import read_history

log = logging.getLogger("spotsafe")
SAFETY = 1.5
FINISH = "finish-shard"
PROGRESS_S = 1.0
SHARD, NOTICE = "shard", SaveReason.NOTICE.value


class _Rates:
    """Measured seconds per item and per commit (the slowest of the recent ones: estimates lean long)."""

    def __init__(self) -> None:
        self.item_s: deque[float] = deque(maxlen=8)
        self.commit_s: deque[float] = deque(maxlen=3)

    def estimate(self, items_left: int) -> float | None:
        """Seconds to do ``items_left`` items and commit (``None``: no item measured yet; a commit not measured
        yet counts as 1 s)."""
        if not self.item_s:
            return None
        return items_left * max(self.item_s) + (max(self.commit_s) if self.commit_s else 1.0)


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
    progress_s: float = PROGRESS_S,
    exit: Callable[[int], NoReturn] = sys.exit,
) -> BatchResult:
    """Apply ``fn`` to every item of ``items`` (a sequence: a list, a map-style dataset, :func:`parquet_rows`)
    and write the results at ``url`` in shards of ``shard_size`` items, as JSONL or Parquet parts under
    ``parts/``. ``fn`` returns one row per item (``None``: no row). Run again after an interruption, the same
    command goes on where it stopped; every item's result is in the output exactly once.

    ``notices``: ``"auto"`` (detect the provider, and handle SIGTERM) or a list of notice sources. On a stop
    notice the process exits 75 (after committing the shard in progress when that fits before the deadline).
    ``progress_s``: how often the event log records the items processed (``spotsafe report`` counts the items
    a stopped run processed and did not commit from it: a lower bound, exact with 0, one event per item).
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
    with contextlib.ExitStack() as stack:
        run = stack.enter_context(_Run(job, progress_s))
        sources, reasons = make_sources(notices, signals=DEFAULT_SIGNALS, handle_signals=True, grace_s=None)
        hub = NoticeHub(sources, reasons, run.emit)
        hub.start()
        stack.callback(hub.close)
        rates = _Rates()
        for shard in job.todo(run.done):
            if job.is_done(shard):
                continue
            rows, finishing, t0 = [], False, time.monotonic()
            for i in shard.items:
                if not finishing and run.notice(hub):
                    finishing = _finish(hub, rates, shard, i)
                    if not finishing:
                        run.stop(exit, f"stop notice at item {i}: shard {shard.index} left for the next run")
                t = time.monotonic()
                row = fn(items[i])
                rates.item_s.append(time.monotonic() - t)
                if row is not None:
                    rows.append(row)
                run.processed(1)
            t = time.monotonic()
            record = job.commit(shard, rows, t - t0)
            rates.commit_s.append(time.monotonic() - t)
            run.committed(record, NOTICE if finishing else SHARD, rates.commit_s[-1])
            if finishing or hub.poll(run.step):
                run.stop(exit, f"stop notice: stopped after committing shard {shard.index}")
        run.finished()
    return BatchResult(run.shards, run.items, run.shards_before, job.spec.shards, time.monotonic() - started)


class _Run:
    """One run of a batch job as its event log tells it (rank 0's; other workers log nothing), in the terms
    ``spotsafe report`` reads for training: a step is an item; the run restores the items done before it
    (``restore_completed``, with the items the run before processed and did not commit as ``replayed_steps``),
    reports ``progress`` every second, and each shard committed is a ``save_committed`` at the items done."""

    def __init__(self, job: BatchJob, progress_s: float) -> None:
        self.job = job
        self.progress_s = progress_s
        self.emit = Emitter(time.time)
        self.shards = self.items = 0
        self._stack = contextlib.ExitStack()
        self._last_progress = 0.0
        self.done = job.done()
        self.shards_before = len(self.done)
        self.done_before = done_items(self.done)
        self._sizes = sum(r.size for r in self.done.values())
        self._processed = 0

    @property
    def step(self) -> int:
        """Items done before this run and processed in it (committed or not)."""
        return self.done_before + self._processed

    def __enter__(self) -> _Run:
        job = self.job
        if job.rank == 0:
            history = read_history(job.storage)
            env = JobEnv.from_env()
            run_id = env.run_id or os.path.basename(str(job.storage.url).rstrip("/"))
            identity = RunIdentity(run_id, env.attempt or history.attempts + 1, os.getpid())
            self.emit.sink = open_run_log(self._stack, job.storage, identity, env)
            self.emit(ev.RunStarted, url=str(job.storage.url), host=socket.gethostname(), unit="item")
            if self.done_before:
                last = history.last_step
                self.emit(
                    ev.RestoreCompleted,
                    step=self.done_before,
                    epoch=0,
                    checkpoint=DONE,
                    bytes=self._sizes,
                    duration_s=0.0,
                    last_known_step=last,
                    replayed_steps=None if last is None else max(0, last - self.done_before),
                )
            else:
                self.emit(ev.RestoreFresh, skipped=0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def notice(self, hub: NoticeHub) -> bool:
        """Whether a stop notice has come: one flag read per item; the board is drained (its notices logged)
        when one has, and after each shard."""
        return hub.board.pending() and hub.poll(self.step)

    def processed(self, count: int) -> None:
        self._processed += count
        now = time.monotonic()
        if now - self._last_progress >= self.progress_s:
            self._last_progress = now
            self.emit(ev.Progress, step=self.step, epoch=0)

    def committed(self, record: ShardRecord, reason: str, seconds: float) -> None:
        self.shards, self.items = self.shards + 1, self.items + (record.end - record.start)
        self.emit(
            ev.SaveCommitted,
            step=self.done_before + self.items,
            checkpoint=record.key,
            reason=reason,
            bytes=record.size,
            blobs=1,
            stall_s=seconds,
            duration_s=seconds,
        )

    def stop(self, exit: Callable[[int], NoReturn], why: str) -> NoReturn:
        log.warning(
            "spotsafe batch: %s; %d of %d shards done: run the same command again to go on",
            why,
            self.shards_before + self.shards,
            self.job.spec.shards,
        )
        step = self.done_before + self.items
        self.emit(ev.RunExited, reason=ExitReason.PREEMPTED, step=step, exit_code=EXIT_PREEMPTED)
        exit(EXIT_PREEMPTED)

    def finished(self) -> None:
        self.emit(ev.Progress, step=self.step, epoch=0)
        self.emit(ev.RunExited, reason=ExitReason.FINISHED, step=self.step, exit_code=0)


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
