"""Reading blobs as ranged parts on a few threads, checksummed in order as the parts arrive.

One stream rarely reaches what a cloud disk or an object store can deliver: a single reader waits out each
request before it sends the next, and faults fresh memory in on the same thread. :func:`read_blobs` keeps
:data:`READERS` ranged reads of :data:`PART` bytes in flight (through :meth:`Storage.read_into` with an
``offset``, so every backend does it), while the calling thread hashes each blob from its first byte to its last,
part after part as they complete (xxhash releases the GIL, so hashing overlaps the reads). A failed request costs
one part, not the whole blob: a retrying storage retries each part on its own, and a part is hashed only once its
read has returned, so a retried part never leaves stale bytes in the digest.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from spotsafe.storage.base import Storage
from spotsafe.storage.manifest import new_hasher

PART = 32 * 2**20
"""Bytes per ranged read: large enough that a request's latency is small against its transfer."""

READERS = 4
"""Ranged reads in flight at once."""


def part_bounds(size: int, part: int = PART) -> list[tuple[int, int]]:
    """``(offset, length)`` of each part of a blob of ``size`` bytes (one empty part for an empty blob)."""
    return [(offset, min(part, size - offset)) for offset in range(0, size, part)] or [(0, 0)]


def read_blobs(
    storage: Storage, reads: Sequence[tuple[str, memoryview]], *, readers: int | None = None, part: int | None = None
) -> Generator[tuple[int, str], None, None]:
    """Fill each ``(key, view)`` from the blob ``key`` (``view`` sized by the caller); yield, blob by blob in order,
    ``(bytes read, xxh3-128 hex digest of those bytes)``.

    A blob shorter than its view yields fewer bytes (the caller decides what that means). A storage error of a
    blob is raised when that blob's result is due. Closing the generator early (or an error) cancels the parts not
    yet started and waits for those in flight, so no thread writes into a view after this returns.
    """
    readers, part = readers or READERS, part or PART
    tasks = [(key, view, bounds) for key, view in reads for bounds in part_bounds(view.nbytes, part)]
    pool = ThreadPoolExecutor(min(readers, len(tasks)), "spotsafe-read") if len(tasks) > 1 else None
    futures: list[Future[int]] = []
    try:
        if pool is not None:
            futures = [pool.submit(_read_part, storage, key, view, bounds) for key, view, bounds in tasks]
        index = 0
        for key, view in reads:
            hasher, got, short = new_hasher(), 0, False
            for offset, length in part_bounds(view.nbytes, part):
                n = futures[index].result() if pool is not None else _read_part(storage, key, view, (offset, length))
                index += 1
                if short:
                    continue  # past the blob's end: a part that came back only says so again
                hasher.update(view[offset : offset + n])
                got = offset + n
                short = n < length
            yield got, str(hasher.hexdigest())
    finally:
        for future in futures:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=True)


def _read_part(storage: Storage, key: str, view: memoryview, bounds: tuple[int, int]) -> int:
    offset, length = bounds
    if not offset:  # as every Storage reads, also one written before ranged reads (an empty blob: one empty read)
        return storage.read_into(key, view[:length])
    return storage.read_into(key, view[offset : offset + length], offset=offset)
