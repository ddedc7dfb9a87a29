"""Storage on any fsspec file system: S3, GCS, Azure, memory, and (subclassed) local disk.

The fsspec file system does the talking; this class adds what the commit protocol
needs on top: keys confined to the run's root, error translation at the boundary,
streaming writes with bounded memory (object stores upload in parts of
``block_size``), and no listing caches (another process may have written since).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from spotsafe.errors import PermanentStorageError
from spotsafe.storage.base import BlobNotFoundError, ChunkSource, ReadProgress
from spotsafe.storage.errors import redact_url, translate

T = TypeVar("T")
DEFAULT_BLOCK_SIZE = 32 * 1024 * 1024


def _abandon(handle: Any) -> None:
    """Throw away a half-written file: never complete a multipart upload of part of an object."""
    with contextlib.suppress(Exception):
        if hasattr(handle, "discard"):
            handle.discard()
            handle.closed = True  # otherwise its __del__ tries to close (and upload) it again
        else:
            handle.close()


def _missing_ok(err: FileNotFoundError, key: str, where: str) -> None:
    """Re-raise unless ``err`` means the key itself is absent (a missing bucket is an error)."""
    if not isinstance(translate(err, key, where), BlobNotFoundError):
        raise err


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


def check_key(key: str) -> list[str]:
    """The key's parts; refuse anything that could escape the run's root."""
    parts = [p for p in key.split("/") if p]
    if key.startswith("/") or any(p in (".", "..") or "\\" in p or "\0" in p for p in parts):
        raise PermanentStorageError(f"refusing storage key {key!r}: keys must stay inside the run folder")
    return parts


class FsspecStorage:
    """A run's folder on an fsspec file system ``fs`` at ``root`` (no protocol prefix)."""

    def __init__(self, fs: Any, root: str, url: str, *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self._url = redact_url(url)
        self.block_size = block_size

    @property
    def url(self) -> str:
        return self._url

    def _path(self, key: str) -> str:
        parts = check_key(key)
        return "/".join([self.root, *parts]) if parts else self.root

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as err:
            raise translate(err, key, self._url) from err

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

        handle = self._call(key, start)
        total = 0
        try:
            for chunk in source():
                self._call(key, functools.partial(handle.write, chunk))
                total += memoryview(chunk).nbytes
        except BaseException:
            _abandon(handle)
            raise
        self._call(key, handle.close)
        return total

    def write_atomic(self, key: str, data: bytes) -> None:
        path = self._path(key)

        def run() -> None:
            self._ensure_parent(path)
            self.fs.pipe_file(path, data)

        self._call(key, run)

    def _ensure_parent(self, path: str) -> None:
        """Object stores need no folders; local-like file systems do."""

    # -- reading -------------------------------------------------------------
    def read(self, key: str) -> bytes:
        path = self._path(key)
        data = self._call(key, lambda: self.fs.cat_file(path))
        return bytes(data)

    def read_into(self, key: str, buffer: bytearray | memoryview, progress: ReadProgress | None = None) -> int:
        path = self._path(key)
        view = memoryview(buffer)

        def run() -> int:
            with self.fs.open(path, "rb", block_size=self.block_size) as handle:
                return read_fully(handle, view, progress)

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
                _missing_ok(err, key, self._url)
                return False

        return self._call(key, run)

    # -- listing -------------------------------------------------------------
    def _entries(self, prefix: str) -> Iterator[dict[str, Any]]:
        path = self._path(prefix)

        def run() -> list[dict[str, Any]]:
            self.fs.invalidate_cache(path)
            try:
                return list(self.fs.ls(path, detail=True))
            except FileNotFoundError as err:
                _missing_ok(err, prefix, self._url)
                return []

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
                return [self._relative(p) for p in self.fs.find(path)]
            except FileNotFoundError as err:
                _missing_ok(err, prefix, self._url)
                return []

        return sorted(self._call(prefix, run))

    # -- deleting ------------------------------------------------------------
    def delete(self, key: str) -> None:
        path = self._path(key)

        def run() -> None:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError as err:
                _missing_ok(err, key, self._url)

        self._call(key, run)

    def delete_prefix(self, prefix: str) -> None:
        if not check_key(prefix):
            raise PermanentStorageError("refusing to delete the whole run folder")
        path = self._path(prefix)

        def run() -> None:
            try:
                self.fs.rm(path, recursive=True)
            except FileNotFoundError as err:
                _missing_ok(err, prefix, self._url)

        self._call(prefix, run)

    def sync_prefix(self, prefix: str) -> None:
        """Nothing to do: an object store's PUT is durable when it returns."""
        check_key(prefix)
