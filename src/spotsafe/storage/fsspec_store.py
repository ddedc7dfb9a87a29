"""Storage on any fsspec file system: S3, GCS, Azure, memory, and (subclassed) local disk.

The fsspec file system does the talking; this class adds what the commit protocol
needs on top: keys confined to the run's root, error translation at the boundary,
streaming writes with bounded memory (object stores upload in parts of
``block_size``), and no listing caches (another process may have written since).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from spotsafe.errors import PermanentStorageError, TransientStorageError
from spotsafe.storage.base import BlobNotFoundError, ChunkSource, ReadProgress
from spotsafe.storage.errors import bucket_missing, redact, redact_url, translate

T = TypeVar("T")
DEFAULT_BLOCK_SIZE = 32 * 1024 * 1024


def _abandon(handle: Any) -> None:
    """Throw away a half-written file: never complete a multipart upload of part of an object."""
    if not hasattr(handle, "discard"):
        with contextlib.suppress(Exception):
            handle.close()
        return
    try:
        with contextlib.suppress(Exception):
            handle.discard()  # S3: abort the multipart upload; GCS: cancel the resumable upload; Azure: nothing
    finally:
        # Closed even when discarding failed: otherwise its __del__ closes it, which uploads the rest and completes
        # the upload (gcsfs does that on a background thread, later).
        try:
            handle.closed = True
        except AttributeError:  # a local file (``closed`` is read-only): closing it completes nothing
            with contextlib.suppress(Exception):
                handle.close()


READ_PIECE = 16 * 1024 * 1024


def read_fully(handle: Any, view: memoryview, progress: ReadProgress | None = None) -> int:
    """Fill ``view`` from ``handle`` until it is full or the file ends; return the bytes read.

    Reads at most :data:`READ_PIECE` bytes at a time and reports each to ``progress``; it
    reports 0 first, so a listener sees every retried read start again.
    """
    got = 0
    if progress is not None:
        progress(0)
    while got < view.nbytes:
        n = handle.readinto(view[got : got + READ_PIECE])
        if not n:
            break
        got += n
        if progress is not None:
            progress(got)
    return got


def read_views_fully(handle: Any, views: Sequence[memoryview]) -> int:
    """:func:`read_fully` into each of ``views`` in turn (one stream, scattered); stops where the file ends."""
    got = 0
    for view in views:
        n = read_fully(handle, view)
        got += n
        if n < view.nbytes:
            break
    return got


def check_key(key: str) -> list[str]:
    """The key's parts; refuse anything that could escape the run's root."""
    parts = [p for p in key.split("/") if p]
    if key.startswith("/") or any(p in (".", "..") or "\\" in p or "\0" in p for p in parts):
        raise PermanentStorageError(f"refusing storage key {key!r}: keys must stay inside the run folder")
    return parts


LISTED_TIMES = ("mtime", "LastModified", "last_modified", "updated", "created")
"""Fields of an fsspec listing entry that say when it was written, in the order they are trusted."""


def listed_time(value: object) -> float | None:
    """A listing's time field as Unix time: a number, a ``datetime`` (naive means UTC) or an ISO 8601 string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, str):
        try:
            return listed_time(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


class FsspecStorage:
    """A run's folder on an fsspec file system ``fs`` at ``root`` (no protocol prefix)."""

    def __init__(
        self, fs: Any, root: str, url: str, *, block_size: int = DEFAULT_BLOCK_SIZE, bucket: str | None = None
    ) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self._url = redact_url(url)
        self.block_size = block_size
        self.bucket = bucket
        """The bucket (container) of an object store, checked explicitly when a write says "not found"."""
        self._bucket_seen = bucket is None

    @property
    def url(self) -> str:
        return self._url

    def _path(self, key: str) -> str:
        parts = check_key(key)
        return "/".join([self.root, *parts]) if parts else self.root

    def _call(self, key: str, fn: Callable[[], T], *, writing: bool = False) -> T:
        try:
            return fn()
        except Exception as err:
            error = translate(err, key, self._url)
            if writing and isinstance(error, BlobNotFoundError):
                # A write cannot miss its key: the bucket is gone, or the backend said "not found" without a
                # code that says what. Ask explicitly rather than guess from the message.
                self.check_bucket()
                error = PermanentStorageError(
                    f"{self._url}/{key}: the store answered 'not found' to a write ({redact(str(err))})"
                )
            elif isinstance(error, BlobNotFoundError):
                self._absent(None, key)
            raise error from err

    def check_bucket(self) -> None:
        """Raise :class:`~spotsafe.errors.PermanentStorageError` if the bucket does not exist (one request).

        Nothing to check on a file system without buckets; nothing is said either where the credentials may use
        the bucket's objects but not look at the bucket itself (GCS's object roles lack ``storage.buckets.get``).
        A transient failure of the check is raised, translated.
        """
        if self.bucket is None:
            return

        def run() -> bool | None:
            try:
                self.fs.info(self.bucket)
            except FileNotFoundError:
                return False
            except Exception as err:
                error = translate(err, "", self._url)
                if isinstance(error, TransientStorageError):
                    raise error from err
                return None  # not allowed to look: say nothing
            return True

        exists = run()
        self._bucket_seen = exists is not False
        if exists is False:
            raise bucket_missing(self._url)

    def _absent(self, err: FileNotFoundError | None, key: str) -> None:
        """Return if the key (or folder) is simply absent; raise if ``err`` means more, or the bucket is missing.

        Some backends say "not found" for a missing bucket without a code that says so (gcsfs, for every 404), or
        list one as empty (adlfs's ``find``): the first time something is absent, the bucket is checked (one
        request per storage object; a write that is told "not found" always checks).
        """
        if err is not None and not isinstance(translate(err, key, self._url), BlobNotFoundError):
            raise err
        if not self._bucket_seen:
            self.check_bucket()

    def _relative(self, path: str) -> str:
        path = path.rstrip("/")
        root = self.root + "/"
        stripped = self.fs._strip_protocol(path) if hasattr(self.fs, "_strip_protocol") else path
        return stripped[len(root) :] if stripped.startswith(root) else stripped

    # -- writing -------------------------------------------------------------
    def write_stream(self, key: str, source: ChunkSource) -> int:
        """Errors from the file system are translated; errors raised by ``source`` pass through unchanged."""
        path = self._path(key)

        def start() -> Any:
            self._ensure_parent(path)
            return self.fs.open(path, "wb", block_size=self.block_size)

        handle = self._call(key, start, writing=True)
        total = 0
        try:
            for chunk in source():
                self._call(key, functools.partial(handle.write, chunk), writing=True)
                total += memoryview(chunk).nbytes
        except BaseException:
            _abandon(handle)
            raise
        self._call(key, handle.close, writing=True)
        return total

    def write_atomic(self, key: str, data: bytes) -> None:
        path = self._path(key)

        def run() -> None:
            self._ensure_parent(path)
            self.fs.pipe_file(path, data)

        self._call(key, run, writing=True)

    def _ensure_parent(self, path: str) -> None:
        """Object stores need no folders; local-like file systems do."""

    # -- reading -------------------------------------------------------------
    def read(self, key: str) -> bytes:
        path = self._path(key)
        data = self._call(key, lambda: self.fs.cat_file(path))
        return bytes(data)

    def read_into(
        self, key: str, buffer: bytearray | memoryview, progress: ReadProgress | None = None, *, offset: int = 0
    ) -> int:
        path = self._path(key)
        view = memoryview(buffer)

        def run() -> int:
            with self.fs.open(path, "rb", block_size=self.block_size) as handle:
                if offset:
                    handle.seek(offset)  # object stores: the reads that follow are ranged requests
                return read_fully(handle, view, progress)

        return self._call(key, run)

    def read_into_views(self, key: str, views: Sequence[memoryview], *, offset: int = 0) -> int:
        """Fill ``views`` one after the other from byte ``offset`` on, in one stream (ranged requests as one
        read would make them); see :func:`~spotsafe.storage.base.read_views`."""
        path = self._path(key)

        def run() -> int:
            with self.fs.open(path, "rb", block_size=self.block_size) as handle:
                if offset:
                    handle.seek(offset)
                return read_views_fully(handle, views)

        return self._call(key, run)

    def size(self, key: str) -> int:
        path = self._path(key)
        return int(self._call(key, lambda: self.fs.size(path)))

    def exists(self, key: str) -> bool:
        path = self._path(key)

        def run() -> bool:
            # Not fs.isfile: it turns every error (bad credentials, no network) into False.
            try:
                return bool(self.fs.info(path)["type"] == "file")
            except FileNotFoundError as err:
                self._absent(err, key)
                return False

        return self._call(key, run)

    # -- listing -------------------------------------------------------------
    def _entries(self, prefix: str) -> Iterator[dict[str, Any]]:
        path = self._path(prefix)

        def run() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(path)
            try:
                entries = list(self.fs.ls(path, detail=True))
            except FileNotFoundError as err:
                self._absent(err, prefix)
                return []
            if not entries:
                self._absent(None, prefix)
            return entries

        yield from self._call(prefix, run)

    def list_dirs(self, prefix: str) -> list[str]:
        names = (
            self._relative(e["name"]).rsplit("/", 1)[-1] for e in self._entries(prefix) if e["type"] == "directory"
        )
        return sorted(names)

    def list_files(self, prefix: str) -> list[str]:
        names = (self._relative(e["name"]).rsplit("/", 1)[-1] for e in self._entries(prefix) if e["type"] == "file")
        return sorted(names)

    def find(self, prefix: str) -> list[str]:
        path = self._path(prefix)

        def run() -> list[str]:
            self.fs.invalidate_cache(path)
            try:
                keys = [self._relative(p) for p in self.fs.find(path)]
            except FileNotFoundError as err:
                self._absent(err, prefix)
                return []
            if not keys:
                self._absent(None, prefix)
            return keys

        return sorted(self._call(prefix, run))

    # -- stat (the Stat capability) -------------------------------------------
    def modified(self, key: str) -> float | None:
        """Unix time of the newest write of ``key`` or, for a folder, of the entries directly in it, from the
        listing's time fields (``mtime``, ``LastModified``, ``last_modified``, ``updated``, ``created``: the first
        an entry has); ``None`` when nothing is there or no entry has one."""
        path = self._path(key)

        def run() -> list[Any]:
            self.fs.invalidate_cache(path)
            try:
                return list(self.fs.ls(path, detail=True))
            except FileNotFoundError:
                return []

        newest: float | None = None
        for entry in self._call(key, run):
            if not isinstance(entry, Mapping):
                continue
            for name in LISTED_TIMES:
                stamp = listed_time(entry.get(name))
                if stamp is not None:
                    newest = stamp if newest is None else max(newest, stamp)
                    break
        return newest

    # -- deleting ------------------------------------------------------------
    def delete(self, key: str) -> None:
        path = self._path(key)

        def run() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError as err:
                self._absent(err, key)

        self._call(key, run)

    def delete_prefix(self, prefix: str) -> None:
        if not check_key(prefix):
            raise PermanentStorageError("refusing to delete the whole run folder")
        path = self._path(prefix)

        def run() -> None:
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError as err:
                self._absent(err, prefix)

        self._call(prefix, run)

    def sync_prefix(self, prefix: str) -> None:
        """Nothing to do: an object store's PUT is durable when it returns."""
        check_key(prefix)
