"""The storage seam: a tiny key/value interface that the commit protocol needs.

Keys are relative, ``/``-separated strings (URLs stay strings: pathlib would
collapse ``s3://``). A backend promises, per method, what is durable and what
is visible when the call returns; the commit protocol in
:mod:`spotsafe.storage.repository` is built only on those promises, so it works
the same on a local disk (rename is atomic) and on an object store (a single
PUT is atomic, nothing else is).
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, cast, runtime_checkable

from spotsafe.errors import PermanentStorageError, UnsafeCheckpointError

Chunk = bytes | bytearray | memoryview
ReadProgress = Callable[[int], None]
Buffer = bytearray | memoryview
"""Writable memory that a blob is read into."""
ChunkSource = Callable[[], Iterable[Chunk]]
TMP_MARKER = ".tmp-"
"""Marks temporary files (``.<name>.tmp-<random>``) that cleanup may delete."""
"""Produces an object's bytes from the start each time it is called, so a write can be retried."""


HUGE = 2 * 1024 * 1024


def new_buffer(size: int, *, aligned: bool = False) -> memoryview:
    """Writable, uninitialised memory of ``size`` bytes, for reading a blob into (``aligned``: page-aligned
    whatever the size).

    Large buffers are anonymous maps advised to use transparent huge pages: touching fresh
    memory page by page is a large part of reading a big checkpoint (``bytearray(size)``
    would also zero it first, a wasted pass).
    """
    if size < HUGE and not aligned:
        return memoryview(bytearray(size))
    region = mmap.mmap(-1, size)
    with contextlib.suppress(AttributeError, OSError):
        region.madvise(mmap.MADV_HUGEPAGE)
    return memoryview(region)


def read_views(storage: Storage, key: str, views: Sequence[memoryview], offset: int = 0) -> int:
    """Fill ``views``, one after the other, from byte ``offset`` of ``key``; return the bytes read (fewer where
    the object ends first).

    One view is one :meth:`Storage.read_into`. Several are one request where the storage can scatter a read
    (``read_into_views``: the local disk's ``preadv``, an object store's single ranged stream); elsewhere they
    are read into one temporary buffer and copied out (:func:`read_views_by_copy`).
    """
    if len(views) == 1:
        return storage.read_into(key, views[0], offset=offset) if offset else storage.read_into(key, views[0])
    scatter = getattr(storage, "read_into_views", None)
    if scatter is not None:
        return int(scatter(key, views, offset=offset))
    return read_views_by_copy(storage, key, views, offset)


def read_views_by_copy(storage: Storage, key: str, views: Sequence[memoryview], offset: int = 0) -> int:
    """:func:`read_views` through one :meth:`Storage.read_into` into a temporary buffer, copied out."""
    temp = memoryview(bytearray(sum(v.nbytes for v in views)))
    got = storage.read_into(key, temp, offset=offset) if offset else storage.read_into(key, temp)
    at = 0
    for view in views:
        n = max(0, min(view.nbytes, got - at))
        view[:n] = temp[at : at + n]
        at += view.nbytes
    return got


class BlobNotFoundError(PermanentStorageError):
    """The key does not exist."""


class UnsafePathError(PermanentStorageError, UnsafeCheckpointError):
    """The key leads through something a run folder must not contain: a symbolic link, a named pipe, a device.

    Never followed or opened. A storage error (retrying will not help) and an unsafe checkpoint at once,
    so a restore skips the checkpoint that needs it, like a damaged one.
    """


@runtime_checkable
class Storage(Protocol):
    """Where checkpoints live. All methods may be called from any one thread at a time."""

    @property
    def url(self) -> str:
        """The location, as the user gave it (credentials never included)."""
        ...

    def write_stream(self, key: str, source: ChunkSource) -> int:
        """Write the chunks ``source()`` yields to ``key`` and return the byte count.

        Durable when it returns. Memory stays bounded however large the object is
        (object stores upload it in parts). Not atomic: a reader may see a partial
        object while it runs, or after a crash. Callers publish it only via a later
        :meth:`write_atomic`. A retrying wrapper may call ``source`` again.
        """
        ...

    def write_atomic(self, key: str, data: bytes) -> None:
        """Make ``data`` visible at ``key`` all at once, durable when it returns."""
        ...

    def read(self, key: str) -> bytes:
        """Return the whole object. Raises :class:`BlobNotFoundError`."""
        ...

    def read_into(
        self, key: str, buffer: bytearray | memoryview, progress: ReadProgress | None = None, *, offset: int = 0
    ) -> int:
        """Read the object, from byte ``offset`` on, into ``buffer`` (sized by the caller), returning bytes read.

        ``progress(n)``, if given, is called as bytes arrive with how many are in ``buffer`` so
        far (so a caller can checksum while the rest is read); a retried read starts again at 0.
        """
        ...

    def size(self, key: str) -> int:
        """Size in bytes. Raises :class:`BlobNotFoundError`."""
        ...

    def exists(self, key: str) -> bool: ...

    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders (common prefixes) under ``prefix``."""
        ...

    def list_files(self, prefix: str) -> list[str]:
        """Names (not keys) of the objects directly under ``prefix``."""
        ...

    def find(self, prefix: str) -> list[str]:
        """Keys of every object under ``prefix``, at any depth (one listing on object stores)."""
        ...

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Delete everything under ``prefix`` (a folder)."""
        ...

    def sync_prefix(self, prefix: str) -> None:
        """Make the set of names under ``prefix`` durable (fsync a directory).

        Object stores have nothing to do here.
        """
        ...


# -- optional capabilities ------------------------------------------------------
# A backend or wrapper may offer more than the Storage protocol. Callers ask with
# local_paths(), stat_of(), retry_reporting(), which look through wrappers (retry, fault injection),
# instead of reaching for attributes with getattr.


@runtime_checkable
class LocalPaths(Protocol):
    """Objects are files on this machine: a reader may open them by path."""

    @property
    def root_path(self) -> str:
        """The run's folder, absolute."""
        ...

    def path_of(self, key: str) -> str:
        """The file that holds ``key`` (checked: never through a link)."""
        ...


@runtime_checkable
class Stat(Protocol):
    """The backend knows when objects were written."""

    def modified(self, key: str) -> float | None:
        """Unix time of the newest write of ``key`` or, for a folder, of the objects directly in it;
        ``None`` when the backend cannot say."""
        ...


@runtime_checkable
class RetryReporting(Protocol):
    """A wrapper that retries transient errors and tells ``on_retry`` about each retry."""

    on_retry: Callable[[str, int, float, Exception], None] | None


@runtime_checkable
class Wrapping(Protocol):
    """A storage that delegates to another one (retries, fault injection)."""

    inner: Storage


def _through_wrappers(storage: object, kind: type) -> object | None:
    """``storage`` or the first storage it wraps that is an instance of ``kind``, else None."""
    current: object = storage
    for _ in range(16):
        if isinstance(current, kind):
            return current
        if not isinstance(current, Wrapping):
            return None
        current = current.inner
    return None


def local_paths(storage: object) -> LocalPaths | None:
    """The storage (or one it wraps) whose objects are local files, else None."""
    return cast("LocalPaths | None", _through_wrappers(storage, LocalPaths))


def stat_of(storage: object) -> Stat | None:
    """The storage (or one it wraps) that knows when objects were written, else None."""
    return cast("Stat | None", _through_wrappers(storage, Stat))


def retry_reporting(storage: object) -> RetryReporting | None:
    """The retrying wrapper around (or in) ``storage`` that reports retries, else None."""
    return cast("RetryReporting | None", _through_wrappers(storage, RetryReporting))
