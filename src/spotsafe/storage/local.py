"""Local-disk storage: the embedded default.

Reads, listings and deletes go through fsspec's local file system like every
other backend; the two writes that the commit protocol depends on are done here
with the guarantees a disk needs and fsspec does not give:

* every write is fsynced, and so is the directory that gains a name;
* :meth:`LocalStorage.write_atomic` writes a temporary file next to the target
  (``.<name>.tmp-<random>``, so cleanup can find it) and renames it over the target.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

from spotsafe.errors import ConfigError
from spotsafe.storage.base import TMP_MARKER, ChunkSource, ReadProgress
from spotsafe.storage.errors import translate
from spotsafe.storage.fsspec_store import FsspecStorage, check_key, read_fully


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def local_root(url: str | os.PathLike[str]) -> Path:
    text = os.fspath(url)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not text:
        raise ConfigError("the checkpoint location is empty: give a folder such as runs/my-run")
    if "://" in text:
        raise ConfigError(f"{url!r} is not a local path")
    return Path(text).absolute()


class LocalStorage(FsspecStorage):
    """A folder on a local (or network-mounted POSIX) file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        path = local_root(root)
        super().__init__(LocalFileSystem(), str(path), os.fspath(root))
        self.root_path = path

    def path_of(self, key: str) -> Path:
        """The local path of ``key`` (inside the root, or an error)."""
        return self.root_path.joinpath(*check_key(key))

    def _ensure_parent(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write_stream(self, key: str, source: ChunkSource) -> int:
        path = self.path_of(key)
        total = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                for chunk in source():
                    handle.write(chunk)
                    total += memoryview(chunk).nbytes
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise translate(err, key, self.url) from err
        return total

    def write_atomic(self, key: str, data: bytes) -> None:
        path = self.path_of(key)
        tmp = path.with_name(f".{path.name}{TMP_MARKER}{secrets.token_hex(4)}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise translate(err, key, self.url) from err

    def read_into(self, key: str, buffer: bytearray | memoryview, progress: ReadProgress | None = None) -> int:
        view = memoryview(buffer)
        try:
            with open(self.path_of(key), "rb", buffering=0) as handle:
                return read_fully(handle, view, progress)
        except OSError as err:
            raise translate(err, key, self.url) from err

    def sync_prefix(self, prefix: str) -> None:
        try:
            _fsync_dir(self.path_of(prefix))
        except OSError as err:
            raise translate(err, prefix, self.url) from err
