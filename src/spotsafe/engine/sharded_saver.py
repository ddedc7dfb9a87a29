"""The saver of a ``Checkpointer(sharded=True)``: one checkpoint for all ranks, through spotsafe.sharded.

It stands where :class:`~spotsafe.engine.saver.Saver` stands (the save tracker, the emergency save and the
checkpointer call the same methods) and reports the same lifecycle (:class:`~spotsafe.engine.lifecycle.SaveState`):
a background save is STAGED when DCP has copied the tensors to host memory and ``save`` returns, and
COMMITTED or FAILED when the write ends, on DCP's thread; a blocking one goes from STAGING to COMMITTED. Every
rank calls ``save`` at the same step (the ranks agree on saves). The states it gets are split by
:mod:`spotsafe.engine.sharded_state`. Retention and the ``latest`` hint are ``on_done``'s business, on rank 0.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from spotsafe.engine.lifecycle import SaveJob, SaveOutcome, SaveState, save_reason
from spotsafe.engine.sharded_state import split_states
from spotsafe.reasons import SaveReason
from spotsafe.sharded import api as sharded
from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository


class ShardedSaver:
    """Saves through :func:`spotsafe.sharded.save` (see the module docstring)."""

    stage = None  # no local stage folder: DCP's stager holds the host copy
    staging_bytes = 0

    def __init__(
        self,
        repo: CheckpointRepository,
        *,
        on_done: Callable[[SaveOutcome], None],
        on_staged: Callable[[SaveJob], None],
        background: bool,
        incremental: bool,
        process_group: Any,
        clock: Callable[[], float],
    ) -> None:
        self.repo = repo
        self.on_done, self.on_staged = on_done, on_staged
        self.background, self.incremental = background, incremental
        self.process_group = process_group
        self._clock = clock
        self._job: SaveJob | None = None
        self._ended = threading.Event()
        self._ended.set()
        self._failure: BaseException | None = None
        self._committed_any = False

    @property
    def busy(self) -> bool:
        return not self._ended.is_set()

    @property
    def current(self) -> SaveJob | None:
        return self._job

    @property
    def can_share(self) -> bool:
        """Whether a save now could share unchanged chunks with an earlier checkpoint."""
        return self.incremental and (self._committed_any or bool(self.repo.committed()))

    def settle(self) -> None:
        return None  # no overlapped copy

    def wait(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)

    def take_failure(self) -> BaseException | None:
        failure, self._failure = self._failure, None
        return failure

    def adopt(self, *args: object) -> None:
        return None  # nothing to keep from a restore: DCP stages anew each save

    prepared = True
    """No staging memory of its own to prepare ahead (DCP stages anew each save)."""

    def prepare(self, *args: object) -> None:
        return None

    def close(self) -> None:
        self._ended.wait()

    def save(
        self,
        step: int,
        reason: SaveReason | str,
        states: Mapping[str, Any],
        *,
        generation: int,
        metadata: dict[str, Any],
        writer: dict[str, Any],
        full: bool = False,
        via_stage: bool | None = None,
    ) -> SaveJob:
        started = self._clock()
        shared, own = split_states(states)
        background = self.background and reason != SaveReason.FINAL
        options = dict(
            step=step,
            rank_state=own,
            process_group=self.process_group,
            keep=None,
            incremental=self.incremental and not full,
            generation=generation,
            metadata=metadata,
            writer=writer,
        )
        self._ended.clear()
        try:
            result = sharded.save(shared, self.repo, blocking=not background, **options)
        except BaseException as err:
            failed = SaveJob(
                step=step,
                reason=save_reason(reason),
                ref=CheckpointRef(generation, step, int(started * 1000), ""),  # nothing was committed under it
                snapshot=Snapshot(step=step, components=[]),
                started=started,
                metadata=metadata,
                writer=writer,
            )
            failed.to(SaveState.FAILED)
            try:
                self.on_done(SaveOutcome(failed, None, err, self._clock() - started))
            finally:
                self._ended.set()
            raise
        ref = result.ref if isinstance(result, sharded.SaveInFlight) else result
        job = SaveJob(
            step=step,
            reason=save_reason(reason),
            ref=ref,
            snapshot=Snapshot(step=step, components=[]),
            started=started,
            metadata=metadata,
            writer=writer,
        )
        job.stall_s = self._clock() - started
        self._job = job
        if isinstance(result, sharded.SaveInFlight):
            job.background = True
            job.to(SaveState.STAGED)
            self.on_staged(job)
            result.add_done_callback(lambda flight: self._end(job, flight))
        else:
            self._end(job, None)
        return job

    def _end(self, job: SaveJob, flight: sharded.SaveInFlight | None) -> None:
        """The save ended: COMMITTED (its manifest read back) or FAILED; ``on_done`` either way."""
        error: BaseException | None = None
        manifest = None
        try:
            if flight is not None:
                flight.wait()
            manifest = self.repo.read_manifest(job.ref)
            self._committed_any = True
        except BaseException as err:  # noqa: BLE001 - reported at the training thread's next call
            error = err
        job.to(SaveState.COMMITTED if error is None else SaveState.FAILED)
        try:
            self.on_done(SaveOutcome(job, manifest, error, self._clock() - job.started))
        finally:
            if error is not None and flight is not None:
                self._failure = error
            self._job = None
            self._ended.set()
        if error is not None and flight is None:
            raise error
