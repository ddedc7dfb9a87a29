"""What happens after a save ends: its event, the ``latest`` hint, and retention.

Runs on the save worker (or inline for a direct save), at the end of the only
save in flight, so retention never races a save of this process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from spotsafe.engine.lifecycle import SaveOutcome
from spotsafe.errors import CorruptCheckpointError, SpotsafeError
from spotsafe.policy.retention import Candidate, KeepLast
from spotsafe.storage.errors import redact
from spotsafe.storage.fencing import FencedError
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository
from spotsafe.telemetry import events as ev

log = logging.getLogger("spotsafe")

Emit = Callable[..., None]


class AfterSave:
    """Records how each save ended and applies retention after each commit."""

    def __init__(
        self,
        repo: CheckpointRepository,
        retention: KeepLast,
        emit: Emit,
        measured: Callable[[ev.SaveCommitted], None] | None = None,
        *,
        publish: bool = True,
    ) -> None:
        self.publish = publish  # False: another process (a sharded save's rank 0) writes the hint and retains
        self.repo = repo
        self.retention = retention
        self._emit = emit
        self._measured = measured

    def __call__(self, outcome: SaveOutcome) -> None:
        """A save ended."""
        job = outcome.job
        if outcome.error is not None or outcome.manifest is None:
            error = outcome.error
            self._emit(
                ev.SaveFailed, step=job.step, reason=job.reason, error=redact(f"{type(error).__name__}: {error}")
            )
            return
        manifest = outcome.manifest
        fields: dict[str, Any] = dict(
            step=job.step,
            checkpoint=job.ref.name,
            reason=job.reason,
            bytes=manifest.total_bytes,
            blobs=len(manifest.blobs),
            stall_s=job.stall_s,
            duration_s=outcome.duration_s,
            written_bytes=manifest.own_bytes,
            route=job.route,
            local_s=job.local_s,
            upload_s=job.upload_s,
        )
        self._emit(ev.SaveCommitted, **fields)
        if self._measured is not None:
            self._measured(ev.SaveCommitted(time=0.0, **fields))  # the cost model reads the sizes and times only
        if not self.publish:
            return
        # The new checkpoint is committed; failing to update the hint or delete old ones must not undo that.
        # A hint that could not be written (a full disk) does not stop retention, which may free the space.
        for action in (self.repo.write_latest, self.apply_retention):
            try:
                action(job.ref)
            except SpotsafeError as err:
                log.warning("spotsafe: after committing %s: %s", job.ref.name, err)
                self._emit(ev.RunWarning, message=redact(f"after committing {job.ref.name}: {err}"))
                if isinstance(err, FencedError):
                    return  # a newer writer owns the run: delete nothing

    def apply_retention(self, just_committed: CheckpointRef) -> None:
        """Delete what the retention policy says, after ``just_committed`` was committed.

        The checkpoint this process just committed is intact by construction (its blobs have
        the sizes it wrote), and it is normally the newest: then nothing else is read. Otherwise
        the newer ones are verified, newest first, until one is intact (every checksum): nothing
        is deleted that no intact checkpoint follows. Files that a kept checkpoint shares
        survive their own checkpoint's deletion.
        """
        refs = {r.name: r for r in self.repo.committed()}
        candidates = [
            Candidate(name=r.name, step=r.step, intact=True if r == just_committed else None) for r in refs.values()
        ]
        deleted = False
        for candidate in self.retention.to_delete(candidates, lambda c: self._intact(refs[c.name])):
            self.repo.delete(refs[candidate.name])
            deleted = True
            self._emit(
                ev.CheckpointDeleted, checkpoint=candidate.name, step=candidate.step, reason=self.retention.describe()
            )
        if deleted:
            # Folders kept only for their shared files may be unreferenced now. No save is in
            # flight here (this runs at the end of the only one), so every uncommitted folder is garbage.
            self.repo.remove_leftovers()

    def _intact(self, ref: CheckpointRef) -> bool:
        """Every size and checksum verified. A storage error is not damage: it propagates, nothing is deleted."""
        try:
            self.repo.verify(ref)
        except CorruptCheckpointError:
            return False
        return True
