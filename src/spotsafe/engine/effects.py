"""Everything a checkpointer opens, opened in one place and closed in reverse.

:func:`open_effects` opens, in this order (each step may use the ones before it):

1. the run's storage (retrying transient errors; every retry becomes a ``storage_retry`` event);
2. the run's history from its event log (earlier attempts: costs, interruptions, the last step);
3. the writer lease: the next writer generation (older writers of the run are fenced off);
4. the event log (in the run folder, or a local spool uploaded to the run) and, when
   ``$SPOTSAFE_METRICS_PORT`` is set, the metrics endpoint; then ``run_started`` and
   ``writer_claimed``, and the leftovers of saves that never committed are removed;
5. the stage folder (``stage_dir``): this run's cut-off upload is finished first;
6. the notice sources (signal handlers: main thread only);
7. the :class:`~spotsafe.engine.saver.Saver`, which writes checkpoints;
8. last, once nothing can fail: the stops that start-up protection (:func:`spotsafe.protect_startup`)
   held are handed over as pending notices (``restore()`` then stops at once: no new checkpoint, exit 75).

:meth:`Effects.close` closes them in reverse: the last exchange with other ranks is collected,
the save in flight finishes, notice sources stop (signal handlers are put back), the metrics
endpoint and the event log close. If opening fails halfway, what was opened is closed and the
error propagates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from spotsafe.engine.agreement import Agreement
from spotsafe.engine.commits import AfterSave
from spotsafe.engine.config import NoticeConfig, SaveConfig, StorageConfig
from spotsafe.engine.emergency import SaveCosts
from spotsafe.engine.lifecycle import SaveJob
from spotsafe.engine.saver import Saver

if TYPE_CHECKING:
    from spotsafe.engine.sharded_saver import ShardedSaver
from spotsafe.engine.upload_stage import open_stage
from spotsafe.engine.watch import NoticeHub, make_sources
from spotsafe.errors import ConfigError
from spotsafe.jobenv import JobEnv
from spotsafe.policy.retention import KeepLast
from spotsafe.startup import hand_over
from spotsafe.storage.base import Storage, retry_reporting
from spotsafe.storage.errors import redact
from spotsafe.storage.fencing import WriterLease
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EventSink, RunIdentity
from spotsafe.telemetry.runlog import Emitter, open_run_log
from spotsafe.telemetry.runmodel import RunModel
from spotsafe.telemetry.store import RunHistory, history_of, read_run_events
from spotsafe.trackers import Tracker, TrackerFeed

log = logging.getLogger("spotsafe")


@dataclass(eq=False)
class Effects:
    """What :func:`open_effects` opened (see the module docstring). ``close()`` is safe to call twice."""

    storage: Storage
    history: RunHistory
    run_id: str
    attempt: int
    lease: WriterLease
    repo: CheckpointRepository
    events: EventSink
    emit: Emitter
    costs: SaveCosts
    hub: NoticeHub
    saver: Saver | ShardedSaver
    stack: contextlib.ExitStack = field(repr=False)

    def on_close(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` first at :meth:`close` (a hook on a component registered later)."""
        self.stack.callback(callback)

    def close(self) -> None:
        self.stack.close()


def open_effects(
    storage_config: StorageConfig,
    save_config: SaveConfig,
    notice_config: NoticeConfig,
    *,
    storage: Storage | None,
    events: EventSink | None,
    job: JobEnv,
    agreement: Agreement | None,
    run_location: StorageConfig | None = None,
    trackers: Sequence[Tracker] = (),
    process_group: Any = None,
    owned: Callable[[], set[int]],
    clock: Callable[[], float],
    wall: Callable[[], float],
) -> Effects:
    """Open everything, in the order of the module docstring; on an error, close what was opened."""
    emit = Emitter(wall)
    with contextlib.ExitStack() as stack:
        if storage is None:
            assert storage_config.url is not None
            storage = open_storage(
                storage_config.url,
                storage_config.storage_options,
                retry=storage_config.retry,
                on_retry=emit.storage_retry,
            )
        else:
            retrying = retry_reporting(storage)
            if retrying is not None and retrying.on_retry is None:  # an injected RetryingStorage
                retrying.on_retry = emit.storage_retry
        earlier = RunModel.fold(read_run_events(storage), series=False)  # the run's log, read once
        history = history_of(earlier)
        run_id = job.run_id or os.path.basename(str(storage.url).rstrip("/"))
        attempt = job.attempt or history.attempts + 1
        lease = WriterLease.acquire(storage, run_id=run_id, attempt=attempt, clock=wall)
        repo = CheckpointRepository(storage, clock=wall, fence=lease.check)
        if events is None:
            events = open_run_log(stack, storage, RunIdentity(run_id, attempt, os.getpid()), job)
        if trackers:  # before run_started: the feed goes on from the earlier attempts with every event of this one
            subscribe = getattr(events, "subscribe", None)
            if not callable(subscribe):
                raise ConfigError("trackers need spotsafe's own event log: leave events= out to use them")
            feed = TrackerFeed(trackers, earlier, RunIdentity(run_id, attempt, os.getpid()))
            subscribe(feed.on_event)
            stack.callback(feed.close)
        emit.sink = events
        emit(ev.RunStarted, url=str(storage.url), host=socket.gethostname())
        emit(ev.WriterClaimed, generation=lease.generation)
        for key in repo.remove_leftovers():
            emit(ev.PartialRemoved, path=key)
        stage = None
        if storage_config.stage_dir is not None:
            stage_repo, stage_storage, recovered = open_stage(storage_config.stage_dir, repo, clock=wall)
            for ref in recovered:
                emit(ev.StageRecovered, checkpoint=ref.name, step=ref.step)
            stage = (stage_repo, stage_storage)
        sources, reasons = make_sources(
            notice_config.notices,
            signals=notice_config.signals,
            handle_signals=notice_config.handle_signals,
            grace_s=notice_config.grace_s,
        )
        hub = NoticeHub(sources, reasons, emit)
        hub.start()
        stack.callback(hub.close)
        costs = SaveCosts(s for s in history.saves)
        saver: Saver | ShardedSaver
        if save_config.sharded:
            from spotsafe.engine.sharded_saver import ShardedSaver  # DCP is slow to import: only when used

            base = _base_repo(run_location, repo, agreement, emit, run_id, attempt, wall)
            saver = ShardedSaver(
                base,
                on_done=AfterSave(
                    base, KeepLast(save_config.keep), emit, measured=costs.add, publish=_coordinates(agreement)
                ),
                on_staged=lambda job: _staged(emit, job, saver),
                background=save_config.async_save,
                incremental=save_config.incremental,
                process_group=process_group,
                clock=clock,
            )
        else:
            saver = Saver(
                repo,
                on_done=AfterSave(repo, KeepLast(save_config.keep), emit, measured=costs.add),
                on_staged=lambda job: _staged(emit, job, saver),
                budget=save_config.staging_bytes,
                background=save_config.async_save,
                incremental=save_config.incremental,
                overlap=save_config.overlap,
                stage=stage,
                owned=owned,
                clock=clock,
            )
        stack.callback(_close_saver, saver)
        if agreement is not None:
            # Every rank posted the last exchange, so it completes; collecting it leaves no collective in flight.
            stack.callback(_collect_quietly, agreement)
        hand_over(hub.sources, hub.board)
        return Effects(
            storage=storage,
            history=history,
            run_id=run_id,
            attempt=attempt,
            lease=lease,
            repo=repo,
            events=events,
            emit=emit,
            costs=costs,
            hub=hub,
            saver=saver,
            stack=stack.pop_all(),
        )


def _coordinates(agreement: Agreement | None) -> bool:
    return agreement is None or agreement.rank == 0


def _base_repo(
    run_location: StorageConfig | None,
    repo: CheckpointRepository,
    agreement: Agreement | None,
    emit: Emitter,
    run_id: str,
    attempt: int,
    wall: Callable[[], float],
) -> CheckpointRepository:
    """Where a sharded save's one checkpoint for all ranks goes: the run's location. One process: its own
    repository. Several ranks: rank 0 claims the location (the fence of every commit and deletion, all of
    them rank 0's) and removes what unfinished saves left there; the other ranks only write blobs."""
    if agreement is None:
        return repo
    if run_location is None or run_location.url is None:
        raise ConfigError(
            "sharded=True with several ranks needs the run's checkpoint url (all ranks write one checkpoint "
            "there), not an injected storage"
        )
    base = open_storage(
        run_location.url, run_location.storage_options, retry=run_location.retry, on_retry=emit.storage_retry
    )
    if agreement.rank != 0:
        return CheckpointRepository(base, clock=wall)
    lease = WriterLease.acquire(base, run_id=run_id, attempt=attempt, clock=wall)
    shared = CheckpointRepository(base, clock=wall, fence=lease.check)
    for key in shared.remove_leftovers():
        emit(ev.PartialRemoved, path=key)
    return shared


def _staged(emit: Emitter, job: SaveJob, saver: Saver | ShardedSaver) -> None:
    emit(
        ev.SaveStaged,
        step=job.step,
        checkpoint=job.ref.name,
        reason=job.reason,
        bytes=job.stats.bytes,
        stall_s=job.stall_s,
        copied_bytes=job.stats.copied_bytes,
        staging_bytes=saver.staging_bytes,
        overlapped=bool(job.deferred),
    )


def _close_saver(saver: Saver | ShardedSaver) -> None:
    """Finish the save in flight; its failure can only be logged now."""
    saver.close()
    failure = saver.take_failure()
    if failure is not None:
        log.error("spotsafe: the last save failed: %s", redact(str(failure)))


def _collect_quietly(agreement: Agreement) -> None:
    with contextlib.suppress(Exception):
        agreement.collect()
