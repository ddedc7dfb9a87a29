"""Two-phase saves: snapshot into staging memory on the training thread, persist in the background.

Lifecycle of one save (:class:`~spotsafe.engine.lifecycle.SaveState` lists the legal
transitions and the event each one emits)::

    STAGING ──▶ STAGED ──▶ COMMITTED
       │           ├─────▶ FAILED       (storage error; the error is raised at the next call)
       │           └─────▶ ABANDONED    (overlap: the state changed while it was being copied)
       ├──────────────────▶ COMMITTED   (a direct save)
       └──────────────────▶ FAILED      (raised at once)

* STAGING: the training thread copies what changed into reused staging slots
  (:mod:`spotsafe.engine.staging`). With ``overlap``, the optimizer-owned tensors
  (parameters, optimizer state) are copied by the save worker while forward and
  backward run instead; :meth:`Saver.settle`, called from an optimizer step
  pre-hook and from every checkpointer call, waits for that copy and checks
  that nothing it copied was modified meanwhile.
* STAGED: training may modify every tensor. One worker thread writes the new
  blobs, ``state.json`` and the manifest (and, with a stage folder, uploads).
* At most one save is in flight. A new save waits for it (or, for interval
  saves with ``when_busy="skip"``, is deferred to a later step).

A state bigger than the staging budget is saved *directly*: the training thread
streams it to storage in pieces (memory stays bounded; the stall becomes the
write time), and the save is a full one. It goes from STAGING to COMMITTED.

Threads: every public method is for the training thread. ``on_staged`` runs on the
training thread; ``on_done`` on the worker thread (inline for a direct save, or for a
save whose copy into staging memory failed).
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from spotsafe.engine.lifecycle import SaveJob, SaveOutcome, SaveState, SnapshotTornError, save_reason
from spotsafe.engine.persist import persist
from spotsafe.engine.plan import locations_of, make_plan
from spotsafe.engine.staging import StagingArea, TensorKey, nbytes_of, version_of
from spotsafe.engine.upload_stage import upload_staged
from spotsafe.errors import CorruptCheckpointError
from spotsafe.priority import WORKER_NICE, lower_priority
from spotsafe.reasons import SaveReason
from spotsafe.state.snapshot import STATE_BLOB, DecodedState, Snapshot
from spotsafe.state.tensors import unpack
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import BlobEntry, Manifest
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository, LoadedCheckpoint


class Saver:
    """Runs saves for one checkpointer, at most one in flight. See the module docstring.

    ``on_staged(job)`` is called when a background save is STAGED (before its worker
    starts); ``on_done(outcome)`` once for every save that ends (COMMITTED, FAILED or
    ABANDONED). ``stage`` is the local ``(repository, storage)`` that ``local-then-upload``
    saves commit on first; ``owned()`` the data pointers the optimizer updates (``overlap``).
    """

    def __init__(
        self,
        repo: CheckpointRepository,
        *,
        on_done: Callable[[SaveOutcome], None],
        on_staged: Callable[[SaveJob], None] = lambda job: None,
        budget: int | None,
        background: bool = True,
        incremental: bool = True,
        overlap: bool = False,
        stage: tuple[CheckpointRepository, LocalStorage] | None = None,
        owned: Callable[[], set[int]] = set,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repo, self.stage = repo, stage  # where saves commit: the run's repository, or first a stage folder
        self.on_done, self.on_staged = on_done, on_staged
        self.area = StagingArea(budget)
        self.background, self.incremental, self.overlap = background, incremental, overlap
        self._owned, self._clock = owned, clock
        self._known: dict[str, BlobEntry] = {}
        self.prepared = False
        """Whether staging was prepared ahead of the first save (:meth:`prepare`)."""
        self._job: SaveJob | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None
        self._exit_hook = functools.partial(_finish_at_exit, weakref.ref(self))
        atexit.register(self._exit_hook)

    # -- state ---------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A save is still being written."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def staging_bytes(self) -> int:
        return self.area.reserved_bytes

    @property
    def current(self) -> SaveJob | None:
        """The save in flight (or the last one, until :meth:`wait` sees it finish)."""
        return self._job

    @property
    def can_share(self) -> bool:
        """Whether the next save may share chunks with committed checkpoints (an incremental save)."""
        return self.incremental and self.background and bool(self._known)

    def take_failure(self) -> BaseException | None:
        """The error of a failed background save not yet reported, and forget it."""
        failure, self._failure = self._failure, None
        return failure

    # -- the training thread's calls -------------------------------------------------
    def settle(self) -> None:
        """A safe point (no forward/backward running): finish an overlapped copy and judge it."""
        job = self._job
        if job is None or job.verdict.is_set():
            return
        job.copied.wait()
        for key, tensor in job.deferred:
            before = job.versions.get(key)
            now = version_of(tensor)
            if before is not None and now is not None and now != before:
                job.torn = f"{key[0]} tensor {key[1]} was modified while it was being copied (overlap)"
                break
        job.deferred = []
        job.verdict.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no save is in flight, or ``timeout`` seconds pass; return whether none is."""
        self.settle()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        self._job = None
        return True

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
        """Snapshot ``states`` and persist them. Returns when training may modify the state again.

        The caller has waited for the previous save. A direct (synchronous) save has
        committed or raised when this returns; a background one has only been staged.
        ``full`` writes every byte (shares nothing); ``via_stage=False`` writes straight to
        the run's storage even when a stage folder is configured (``None``: as configured).
        """
        started = self._clock()
        snapshot = Snapshot.capture(step, states)
        staged_route = self.stage is not None and via_stage is not False
        job = SaveJob(
            step=step,
            reason=save_reason(reason),
            ref=self._target(staged_route).begin(step, generation).ref,
            snapshot=snapshot,
            started=started,
            metadata=metadata,
            writer=writer,
            staged_route=staged_route,
        )
        items = [((p.name, i), t) for p in snapshot.components for i, t in enumerate(p.tensors)]
        if not self.incremental or full:
            self.area.forget_locations()  # every chunk is written; the slots are still reused
        if not self.background or not self.area.fits(items):
            self._direct(job)
            return job
        try:
            self._stage(job, items)
        except BaseException as err:
            job.to(SaveState.FAILED)
            job.copied.set()
            job.verdict.set()
            self._done(job, None, err)
            raise
        job.stall_s = self._clock() - started
        job.to(SaveState.STAGED)
        job.background = True
        self.on_staged(job)  # before the worker starts, so its events come after this one
        self._job = job
        self._thread = threading.Thread(target=self._run, args=(job,), name="spotsafe-save", daemon=True)
        self._thread.start()
        return job

    def adopt(self, loaded: LoadedCheckpoint, decoded: DecodedState, live: Iterable[torch.Tensor]) -> None:
        """After a restore: the verified bytes become staging slots, so the next save can share them.

        ``live`` are the state's tensors after loading. The loaded blob memory is used as the
        slots themselves (no copy) wherever no live tensor uses that memory: ``load_state_dict``
        copies into a model's parameters, but an optimizer keeps the tensors it is given, and a
        slot must never be memory that training modifies. Such tensors get no slot; the next
        save copies them (optimizer moments change at every step anyway).
        """
        if not self.incremental or not self.background:
            return
        name = loaded.ref.name
        items = [((c, i), e) for c, entries in decoded.entries.items() for i, e in enumerate(entries)]
        if self.area.budget is not None and sum(e.nbytes for _, e in items) > self.area.budget:
            return
        used = _ranges(live)
        for key, entry in items:
            if key in decoded.in_place:  # read into a live tensor: its blob memory holds nothing
                continue
            tensor = unpack(loaded.blobs, entry)
            if tensor.numel() == 0 or _overlaps(tensor, used):
                continue
            self.area.adopt(key, tensor, locations_of(entry, name))
        self._remember(loaded.ref, loaded.manifest)

    def prepare(self, snapshot: Snapshot) -> None:
        """Prepare staging slots for ``snapshot``'s tensors while training runs (once per process; see
        :meth:`~spotsafe.engine.staging.StagingArea.prepare`), so the first save does not allocate them."""
        if self.prepared:
            return
        self.prepared = True
        if self.background:
            self.area.prepare([((p.name, i), t) for p in snapshot.components for i, t in enumerate(p.tensors)])

    def close(self) -> None:
        self.wait()
        self.area.take_prepared()
        atexit.unregister(self._exit_hook)

    def _stage(self, job: SaveJob, items: list[tuple[TensorKey, torch.Tensor]]) -> None:
        """Copy what changed into staging memory; optimizer-owned tensors are left to the worker (overlap)."""
        self.area.release_except({key for key, _ in items})
        owned = self._owned() if self.overlap else set()
        now = [(k, t) for k, t in items if not _is_owned(k, t, owned)]
        job.deferred = [(k, t) for k, t in items if _is_owned(k, t, owned)]
        job.versions = {k: version_of(t) for k, t in job.deferred}
        job.staged.update({s.key: s for s in self.area.stage(now, job.stats)})
        if not job.deferred:
            job.copied.set()
            job.verdict.set()

    def _target(self, staged_route: bool) -> CheckpointRepository:
        """Where a save commits first: the stage folder's repository, or the run's."""
        return self.stage[0] if self.stage is not None and staged_route else self.repo

    def _upload(self, job: SaveJob) -> Manifest:
        """``local-then-upload``: copy the checkpoint committed on the stage folder to the run's storage."""
        assert self.stage is not None
        local_done = self._clock()
        job.local_s = local_done - job.started
        manifest = upload_staged(self.stage[0], self.stage[1], self.repo, job.ref)
        job.upload_s = self._clock() - local_done
        return manifest

    def _done(self, job: SaveJob, manifest: Manifest | None, error: BaseException | None) -> None:
        self.on_done(SaveOutcome(job, manifest, error, self._clock() - job.started))

    # -- the worker ------------------------------------------------------------------
    def _run(self, job: SaveJob) -> None:
        manifest: Manifest | None = None
        error: BaseException | None = None
        lower_priority(WORKER_NICE)
        try:
            if job.deferred:
                try:
                    job.staged.update({s.key: s for s in self.area.stage(job.deferred, job.stats)})
                finally:
                    job.copied.set()
            manifest = self._write(job)
        except BaseException as err:  # noqa: BLE001 - reported at the training thread's next call
            error = err
            self._failure = err
            if isinstance(err, CorruptCheckpointError):
                # A blob the slots point at is gone or changed: share nothing until a save writes it all again.
                self._known = {}
                self.area.forget_locations()
            job.to(SaveState.ABANDONED if isinstance(err, SnapshotTornError) else SaveState.FAILED)
        finally:
            job.copied.set()
        self._done(job, manifest, error)

    def _write(self, job: SaveJob) -> Manifest:
        plan = make_plan(job.snapshot, job.staged, self._known)
        staged_route = job.staged_route and self.stage is not None
        pending = self._target(staged_route).begin_copy(job.ref)
        try:
            for blob in plan.blobs:
                pending.write_blob(blob.name, blob.chunks)
            for entry in plan.shared:
                pending.add_shared(entry)
            state = job.snapshot.state_json(plan.entries)
            pending.write_blob(STATE_BLOB, lambda: (state,))
            job.verdict.wait()
            if job.torn is not None:
                raise SnapshotTornError(f"save of step {job.step} abandoned: {job.torn}")
            manifest = pending.commit(metadata=job.metadata, writer=job.writer, verify_shared=not staged_route)
        except BaseException:
            if not pending.committed:
                with contextlib.suppress(Exception):  # leftovers are removed at the next start
                    pending.abort()
            raise
        if staged_route:
            manifest = self._upload(job)
        self.area.committed(list(job.staged.values()), plan.placed(job.ref.name))
        self._remember(job.ref, manifest)
        job.to(SaveState.COMMITTED)
        return manifest

    def _remember(self, ref: CheckpointRef, manifest: Manifest) -> None:
        """Blobs the slots may point at from now on: exactly the ones this manifest lists."""
        self._known = {}
        for blob in manifest.blobs:
            shared = blob if blob.checkpoint is not None else BlobEntry(blob.path, blob.size, blob.checksum, ref.name)
            self._known[shared.ref] = shared

    def _direct(self, job: SaveJob) -> None:
        """A full save streamed from the live tensors on this thread (over budget, or background off)."""
        job.stats.bytes = sum(nbytes_of(t) for p in job.snapshot.components for t in p.tensors)
        job.stats.copied_bytes = 0
        manifest: Manifest | None = None
        error: BaseException | None = None
        try:
            job.ref, manifest = persist(
                self._target(job.staged_route),
                job.snapshot,
                metadata=job.metadata,
                writer=job.writer,
                generation=job.ref.generation,
            )
            if job.staged_route and self.stage is not None:
                manifest = self._upload(job)
            self._known = {}  # the slots' locations may be deleted by retention from now on
            self.area.forget_locations()
            job.stall_s = self._clock() - job.started
            job.to(SaveState.COMMITTED)
        except BaseException as err:
            error = err
            job.to(SaveState.FAILED)
            raise
        finally:
            job.copied.set()
            job.verdict.set()
            self._done(job, manifest, error)


def _finish_at_exit(ref: weakref.ref[Saver]) -> None:
    """At interpreter exit, finish a save in flight rather than abandon it half-written."""
    saver = ref()
    if saver is not None:
        with contextlib.suppress(Exception):
            saver.wait()


def _ranges(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """Sorted memory ranges ``[start, end)`` of the CPU tensors' storages."""
    out = []
    for t in tensors:
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            if storage.nbytes():
                out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return sorted(out)


def _overlaps(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether the tensor's storage shares memory with any of ``ranges`` (sorted by start)."""
    lo = tensor.untyped_storage().data_ptr()
    hi = lo + tensor.untyped_storage().nbytes()
    below = bisect.bisect_left(ranges, (hi, hi))  # only ranges that start before ``hi`` can overlap
    return any(end > lo for _, end in ranges[:below])


def _is_owned(key: TensorKey, tensor: torch.Tensor, owned: set[int]) -> bool:
    """Optimizer-owned: optimizer state, or a parameter the optimizer updates (copied during overlap)."""
    if not owned:
        return False
    return key[0] == "optimizer" or (tensor.numel() > 0 and tensor.data_ptr() in owned)
