"""Staging memory and change detection: the copy a save makes before training goes on.

Every tensor the checkpointer saves has a *slot* here: host memory of the
tensor's size (pinned when the tensor lives on a GPU), allocated once and reused
by every later save, so a save does not page-fault or allocate. A slot always
holds the bytes of the tensor as of the last save that staged it, and, per
1 MiB chunk, where those exact bytes are committed (blob and offset), if they are.

Staging a tensor walks its chunks and compares the live bytes with the slot
(``memcmp``). Equal chunks whose bytes are committed somewhere are not copied
and not written again: the new checkpoint points at the old blob. Different
chunks are copied into the slot and written. This is exact, not a guess:

* a chunk is reused only if its bytes are equal, byte for byte, to the slot,
  and the slot's bytes are equal to the committed bytes it points at (the slot
  was filled from those bytes, by a save that committed them or by the restore
  that verified them);
* a location is dropped the moment its slot chunk is overwritten and set again
  only when the save that wrote the new bytes commits; a failed save leaves the
  chunk without a location, so the next save writes it.

Why not version counters or hashes: ``tensor._version`` is not bumped by fused
optimizers (``torch.optim.AdamW(fused=True)``), ``.data`` writes or NumPy views,
so it would silently keep stale bytes; hashing reads every byte at a lower rate
than ``memcmp``, and a hash match is only probable. ``memcmp`` stops at the first
difference, so a changed chunk costs about a copy and an unchanged one a read.

Threads: :meth:`StagingArea.stage` runs on one thread at a time (the training
thread, or the save worker for overlapped copies); the comparisons are spread
over a few threads that call libc ``memcmp`` without the GIL, and each run of
changed chunks is copied with one ``Tensor.copy_`` (torch's own threads).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from spotsafe.errors import ConfigError
from spotsafe.priority import PREPARE_NICE, lower_priority
from spotsafe.storage.base import new_buffer

log = logging.getLogger("spotsafe")

CHUNK = 1 << 20
"""Change-detection granularity in bytes."""

_libc = ctypes.CDLL(None)
_memcmp = _libc.memcmp
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_memcmp.restype = ctypes.c_int

Location = tuple[str, int]
"""Committed bytes of a chunk: (blob reference ``checkpoint/file``, offset in that blob)."""

TensorKey = tuple[str, int]
"""One saved tensor: (component name, index of the tensor in the component's snapshot)."""


def parse_budget(value: int | str | None) -> int | None:
    """``None`` (no limit), a byte count, or a size such as ``"2GB"``, ``"512MiB"``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"staging_budget must be a byte count or a size such as '4GB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"staging_budget must be >= 0 bytes, got {value}")
        return value
    text = str(value).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6}
    units |= {"KB": 10**3, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                amount = float(number)
            except ValueError:
                break
            if amount < 0:
                break
            return int(amount * scale)
    raise ConfigError(f"staging_budget {value!r} is not a size: use bytes or a size such as '4GB' or '512MiB'")


def default_budget() -> int | None:
    """Half the machine's physical memory (``None`` where it cannot be read)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class Slot:
    """Staged bytes of one tensor, and where each chunk's bytes are committed."""

    buffer: torch.Tensor
    dtype: torch.dtype
    shape: tuple[int, ...]
    locations: list[Location | None]

    @property
    def nbytes(self) -> int:
        return int(self.buffer.numel())

    @property
    def form(self) -> tuple[int, torch.dtype, tuple[int, ...]]:
        """What the slot holds: bytes, dtype and shape (a tensor of another form needs another slot)."""
        return self.nbytes, self.dtype, self.shape

    def chunks(self) -> int:
        return len(self.locations)


@dataclass
class StagedTensor:
    """One tensor of a save: its slot, and the chunks this save must write."""

    key: TensorKey
    slot: Slot
    dirty: list[int]
    version: int | None = None

    def runs(self) -> Iterator[tuple[int, int]]:
        """Consecutive dirty chunks as (start byte, end byte) ranges of the tensor."""
        return _runs(self.dirty, self.slot.nbytes)


@dataclass
class StageStats:
    tensors: int = 0
    bytes: int = 0
    copied_bytes: int = 0


@dataclass
class _Work:
    """Chunks of one tensor to compare: ``src`` and ``dst`` are flat uint8 views of equal length."""

    src: torch.Tensor
    dst: torch.Tensor
    offsets: list[tuple[int, int, int]] = field(default_factory=list)  # (chunk index, start, length)
    base: int = 0  # byte offset of ``src[0]`` within the tensor (GPU windows)


class StagingArea:
    """Slots for every saved tensor, within an optional byte budget.

    ``threads`` workers split the compare-and-copy work; ``None`` uses up to 4,
    at most the number of CPUs.
    """

    def __init__(self, budget: int | None = None, *, threads: int | None = None) -> None:
        self.budget = budget
        self.slots: dict[TensorKey, Slot] = {}
        self._threads = max(1, min(4, os.cpu_count() or 1) if threads is None else threads)
        self._bounce: torch.Tensor | None = None
        self._preparing: threading.Thread | None = None
        self._prepared: dict[TensorKey, Slot] = {}
        self._hurry = threading.Event()

    @property
    def reserved_bytes(self) -> int:
        """Host memory held for staging now."""
        bounce = int(self._bounce.numel()) if self._bounce is not None else 0
        return sum(s.nbytes for s in self.slots.values()) + bounce

    def fits(self, tensors: Sequence[tuple[TensorKey, torch.Tensor]]) -> bool:
        """Whether staging ``tensors`` stays within the budget (slots of other keys are released first)."""
        if self.budget is None:
            return True
        need = sum(nbytes_of(t) for _, t in tensors)
        if any(t.device.type == "cuda" for _, t in tensors):
            need += min(64 * CHUNK, max((nbytes_of(t) for _, t in tensors), default=0))
        return need <= self.budget

    def release_except(self, keys: set[TensorKey]) -> None:
        self.take_prepared()
        for key in [k for k in self.slots if k not in keys]:
            del self.slots[key]

    # -- preparing slots ahead of the first save ------------------------------------
    def prepare(self, items: Sequence[tuple[TensorKey, torch.Tensor]]) -> bool:
        """Allocate and fault in the slots ``items`` will need, on a background thread; whether it started.

        A process's first save would otherwise allocate all its staging memory on the training thread, and
        touching fresh memory page by page costs several times the copy itself. Preparing it while training
        runs (from the process's first ``step_done()`` on: not during the first step, whose own fresh memory
        would compete with it) makes the first save, often the emergency save soon after a restart, cost what
        a steady-state save costs. Only within the budget; tensors that already have a fitting slot (adopted
        from a restore) are left alone. The next :meth:`stage` takes what was prepared; what the thread has not
        reached by then is not waited for: it stops, and the save allocates the rest itself. The thread runs at
        training's priority (:data:`~spotsafe.priority.PREPARE_NICE` says why).
        """
        if self._preparing is not None or not self.fits(items):
            return False
        todo = [(key, _Shape.of(t)) for key, t in items if not self._fitting(self.slots.get(key), t)]
        if not todo:
            return False
        self._hurry.clear()
        self._preparing = threading.Thread(target=self._prepare, args=(todo,), name="spotsafe-prepare", daemon=True)
        self._preparing.start()
        return True

    def wait_prepared(self) -> None:
        """Let the preparing thread, if any, finish everything, then take it (:meth:`take_prepared`)."""
        if self._preparing is not None:
            self._preparing.join()
        self.take_prepared()

    def take_prepared(self) -> None:
        """Stop the preparing thread, if any (it finishes the slot at hand), and make what it prepared the slots."""
        if self._preparing is None:
            return
        self._hurry.set()
        self._preparing.join()
        self._preparing = None
        for key, slot in self._prepared.items():
            held = self.slots.get(key)  # adopted from a restore meanwhile: keep it, it may be shared
            if held is None or held.form != slot.form:
                self.slots[key] = slot
        self._prepared = {}

    def _prepare(self, todo: list[tuple[TensorKey, _Shape]]) -> None:
        lower_priority(PREPARE_NICE)
        try:
            for key, shape in todo:
                if self._hurry.is_set():
                    break
                slot = self._new_slot(shape)
                if not shape.pinned:
                    _touch(slot.buffer, self._hurry)
                self._prepared[key] = slot
        except (MemoryError, RuntimeError) as err:  # the save allocates what is missing (and reports any error)
            log.info("spotsafe: staging memory not prepared ahead (%s); the next save allocates it", err)

    @staticmethod
    def _fitting(slot: Slot | None, tensor: torch.Tensor) -> bool:
        return slot is not None and slot.form == (nbytes_of(tensor), tensor.dtype, tuple(tensor.shape))

    def forget_locations(self) -> None:
        """No slot's bytes may be shared any more (the next save writes every chunk)."""
        for slot in self.slots.values():
            slot.locations = [None] * slot.chunks()

    # -- staging ---------------------------------------------------------------
    def stage(self, items: Sequence[tuple[TensorKey, torch.Tensor]], stats: StageStats) -> list[StagedTensor]:
        """Bring every slot up to date with the live tensors; return what each save must write.

        Dirty chunks lose their location here (the slot no longer matches it);
        :meth:`committed` gives them their new one.
        """
        self.take_prepared()
        staged: list[StagedTensor] = []
        pending: list[tuple[StagedTensor, _Work, torch.Tensor]] = []
        for key, tensor in items:
            slot = self._slot(key, tensor)
            entry = StagedTensor(key=key, slot=slot, dirty=[], version=version_of(tensor))
            staged.append(entry)
            stats.tensors += 1
            stats.bytes += slot.nbytes
            if slot.nbytes == 0:
                continue
            src = _host_source(tensor)
            if src.device.type == "cuda":
                self._stage_from_gpu(src, entry)
                continue
            job = _Work(src=src.reshape(-1).view(torch.uint8), dst=slot.buffer)
            job.offsets = [(c, c * CHUNK, min(CHUNK, slot.nbytes - c * CHUNK)) for c in range(slot.chunks())]
            pending.append((entry, job, src))
        dirty = self._run([job for _, job, _ in pending])
        for entry, job, _ in pending:
            entry.dirty.extend(dirty[id(job)])
        for entry in staged:
            entry.dirty.sort()
            for c in entry.dirty:
                entry.slot.locations[c] = None
            stats.copied_bytes += sum(end - start for start, end in entry.runs())
        return staged

    def _slot(self, key: TensorKey, tensor: torch.Tensor) -> Slot:
        slot = self.slots.get(key)
        if not self._fitting(slot, tensor):
            slot = self.slots[key] = self._new_slot(_Shape.of(tensor))
        assert slot is not None
        return slot

    @staticmethod
    def _new_slot(shape: _Shape) -> Slot:
        nbytes = shape.nbytes
        if shape.pinned:
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        elif nbytes >= CHUNK:  # page-aligned: written to disk straight from here (see spotsafe.storage.direct)
            buffer = torch.frombuffer(new_buffer(nbytes, aligned=True), dtype=torch.uint8)
        else:
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        return Slot(buffer=buffer, dtype=shape.dtype, shape=shape.shape, locations=[None] * _chunks(nbytes))

    def _run(self, work: list[_Work]) -> dict[int, list[int]]:
        """Find the chunks that differ (``memcmp``, spread over the threads), then copy them.

        ``memcmp`` stops at the first differing byte, so finding a changed chunk costs almost
        nothing and an unchanged one a read of both copies; the copy of each run of changed
        chunks is one ``Tensor.copy_`` (torch's own threads).
        """
        tasks = [(job, c, start, length) for job in work for c, start, length in job.offsets]
        result: dict[int, list[int]] = {id(job): [] for job in work}
        if not tasks:
            return result
        lock = threading.Lock()

        def run(part: Sequence[tuple[_Work, int, int, int]]) -> None:
            found: list[tuple[int, int]] = []
            for job, c, start, length in part:
                at = start - job.base
                if _memcmp(job.src.data_ptr() + at, job.dst.data_ptr() + start, length) != 0:
                    found.append((id(job), c))
            with lock:
                for job_id, c in found:
                    result[job_id].append(c)

        # Hand out contiguous ranges of roughly equal bytes, one per thread.
        total = sum(t[3] for t in tasks)
        n = self._threads if total >= 8 * CHUNK else 1
        parts: list[list[tuple[_Work, int, int, int]]] = [[] for _ in range(n)]
        share, acc, i = total / n, 0, 0
        for task in tasks:
            if acc >= share * (i + 1) and i < n - 1:
                i += 1
            parts[i].append(task)
            acc += task[3]
        threads = [threading.Thread(target=run, args=(p,), name="spotsafe-stage") for p in parts[1:] if p]
        for t in threads:
            t.start()
        try:
            run(parts[0])
        finally:
            for t in threads:
                t.join()
        for job in work:
            dirty = sorted(result[id(job)])
            result[id(job)] = dirty
            for start, end in _runs(dirty, job.dst.numel()):
                job.dst[start:end].copy_(job.src[start - job.base : end - job.base])
        return result

    def _stage_from_gpu(self, src: torch.Tensor, entry: StagedTensor) -> None:
        """Copy a GPU tensor through a pinned bounce buffer, window by window, comparing on the host."""
        window = 64 * CHUNK
        if self._bounce is None or self._bounce.numel() < min(window, entry.slot.nbytes):
            self._bounce = torch.empty(min(window, max(entry.slot.nbytes, CHUNK)), dtype=torch.uint8, pin_memory=True)
        flat = src.reshape(-1).view(torch.uint8)
        slot = entry.slot
        for base in range(0, slot.nbytes, window):
            n = min(window, slot.nbytes - base)
            self._bounce[:n].copy_(flat[base : base + n])  # synchronous: the bounce is reused at once
            job = _Work(src=self._bounce[:n], dst=slot.buffer, base=base)
            job.offsets = [
                (c, c * CHUNK, min(CHUNK, slot.nbytes - c * CHUNK)) for c in range(base // CHUNK, _chunks(base + n))
            ]
            entry.dirty.extend(self._run([job])[id(job)])

    # -- bookkeeping after a save ----------------------------------------------------
    def committed(self, staged: Sequence[StagedTensor], placed: dict[TensorKey, list[Location]]) -> None:
        """The save of ``staged`` committed: its dirty chunks are now at ``placed[key][i]``."""
        for entry in staged:
            locations = placed.get(entry.key, [])
            for c, location in zip(entry.dirty, locations, strict=True):
                entry.slot.locations[c] = location

    def adopt(self, key: TensorKey, data: torch.Tensor, locations: list[Location | None]) -> None:
        """Make ``data`` (verified checkpoint bytes, on the CPU, used by nothing else) the slot of ``key``.

        No copy: the slot views ``data``'s memory from now on.
        """
        flat = data.reshape(-1).view(torch.uint8)
        self.slots[key] = Slot(buffer=flat, dtype=data.dtype, shape=tuple(data.shape), locations=list(locations))


@dataclass(frozen=True)
class _Shape:
    """What a slot is made for: a tensor's bytes, dtype and shape, and whether it lives on a GPU (pinned)."""

    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    pinned: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _Shape:
        pinned = tensor.device.type == "cuda" and torch.cuda.is_available()
        return cls(nbytes_of(tensor), tensor.dtype, tuple(tensor.shape), pinned)


PAGE = 4096
_TOUCH_PAGES = 16384
"""Pages touched per call: few enough that torch fills them on this thread, not its worker pool."""


def _touch(buffer: torch.Tensor, stop: threading.Event | None = None) -> None:
    """Fault in every page of fresh memory (one write per page; torch releases the GIL), until ``stop`` is set
    (the pages left are faulted in by the copy that first writes them)."""
    step = PAGE * _TOUCH_PAGES
    for start in range(0, buffer.numel(), step):
        if stop is not None and stop.is_set():
            return
        buffer[start : start + step : PAGE].fill_(0)


def _runs(chunks: Sequence[int], nbytes: int) -> Iterator[tuple[int, int]]:
    """Sorted chunk indexes as coalesced (start byte, end byte) ranges."""
    start = prev = -2
    for c in chunks:
        if c == prev + 1:
            prev = c
            continue
        if start >= 0:
            yield start * CHUNK, min((prev + 1) * CHUNK, nbytes)
        start = prev = c
    if start >= 0:
        yield start * CHUNK, min((prev + 1) * CHUNK, nbytes)


def nbytes_of(tensor: torch.Tensor) -> int:
    """The tensor's size in bytes."""
    return tensor.numel() * tensor.element_size()


def _chunks(nbytes: int) -> int:
    return (nbytes + CHUNK - 1) // CHUNK


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (``None``: it has none)."""
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors have no version counter
        return None


def _host_source(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous view of the tensor's bytes (a copy only if it is not contiguous)."""
    t = tensor.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.device.type not in ("cpu", "cuda"):
        t = t.cpu()
    return t
