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

import bisect
import itertools
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from spotsafe.storage.base import Storage, read_views
from spotsafe.storage.manifest import new_hasher

PART = 32 * 2**20
"""Bytes per ranged read: large enough that a request's latency is small against its transfer."""

READERS = 4
"""Ranged reads in flight at once."""


def part_bounds(size: int, part: int = PART) -> list[tuple[int, int]]:
    """``(offset, length)`` of each part of a blob of ``size`` bytes (one empty part for an empty blob)."""
    return [(offset, min(part, size - offset)) for offset in range(0, size, part)] or [(0, 0)]


Pieces = Sequence[memoryview]
"""Where one blob's bytes go: views that, one after the other, are exactly as long as the blob."""


def read_blobs(
    storage: Storage, reads: Sequence[tuple[str, Pieces]], *, readers: int | None = None, part: int | None = None
) -> Generator[tuple[int, str], None, None]:
    """Fill each ``(key, pieces)`` from the blob ``key`` (the pieces sized by the caller, in order, the first
    byte of the blob into the first byte of the first piece); yield, blob by blob in order,
    ``(bytes read, xxh3-128 hex digest of those bytes)``.

    The pieces let a blob land in several places (a restore reads tensors straight into the live ones); a part
    that spans several pieces is still one request (:func:`~spotsafe.storage.base.read_views`). A blob shorter
    than its pieces yields fewer bytes (the caller decides what that means). A storage error of a blob is
    raised when that blob's result is due. Closing the generator early (or an error) cancels the parts not
    yet started and waits for those in flight, so no thread writes into a piece after this returns.
    """
    readers, part = readers or READERS, part or PART
    tasks = [
        (blob, key, bounds, views) for blob, (key, pieces) in enumerate(reads) for bounds, views in _parts(pieces, part)
    ]
    pool = ThreadPoolExecutor(min(readers, len(tasks)), "spotsafe-read") if len(tasks) > 1 else None
    futures: list[Future[int]] = []
    try:
        if pool is not None:
            futures = [pool.submit(_read_part, storage, key, views, bounds) for _, key, bounds, views in tasks]
        hasher, got, short = new_hasher(), 0, False
        for index, (blob, key, bounds, views) in enumerate(tasks):
            n = futures[index].result() if pool is not None else _read_part(storage, key, views, bounds)
            if not short:  # past the blob's end, a part that came back only says so again
                _hash(hasher, views, n)
                got = bounds[0] + n
                short = n < bounds[1]
            if index + 1 == len(tasks) or tasks[index + 1][0] != blob:
                yield got, str(hasher.hexdigest())
                hasher, got, short = new_hasher(), 0, False
    finally:
        for future in futures:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=True)


def _parts(pieces: Pieces, part: int) -> list[tuple[tuple[int, int], list[memoryview]]]:
    """Each part of the blob that ``pieces`` receive: its ``(offset, length)`` and the slices of the pieces that
    hold those bytes, in order (one empty view for an empty blob)."""
    starts = list(itertools.accumulate((p.nbytes for p in pieces), initial=0))
    out = []
    for offset, length in part_bounds(starts[-1], part):
        views = []
        for index in range(max(0, bisect.bisect_right(starts, offset) - 1), len(pieces)):
            start = starts[index]
            if start >= offset + length:
                break
            view = pieces[index][max(0, offset - start) : min(pieces[index].nbytes, offset + length - start)]
            if view.nbytes:
                views.append(view)
        out.append(((offset, length), views or [memoryview(bytearray(0))]))
    return out


def _hash(hasher: Any, views: Sequence[memoryview], n: int) -> None:
    """Add the first ``n`` bytes of ``views`` to ``hasher``."""
    for view in views:
        if n <= 0:
            break
        hasher.update(view[:n])
        n -= view.nbytes


def _read_part(storage: Storage, key: str, views: Sequence[memoryview], bounds: tuple[int, int]) -> int:
    return read_views(storage, key, views, bounds[0])
