"""Local-disk storage: the embedded default.

Durability: every write is fsynced, and so is the directory that gains a name.
Atomicity: :meth:`LocalStorage.write_atomic` writes a temporary file next to the
target and renames it over the target (atomic on POSIX file systems).
Temporary files are named ``.<name>.tmp-<random>`` so that cleanup can find them.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

from spotsafe.errors import ConfigError, PermanentStorageError, TransientStorageError
from spotsafe.storage.base import BlobNotFoundError, Chunk

TMP_MARKER = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(err: OSError, key: str) -> Exception:
    import errno

    if isinstance(err, FileNotFoundError):
        return BlobNotFoundError(f"{key}: not found")
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return PermanentStorageError(f"{key}: no space left on the device; free space or point the run elsewhere")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermanentStorageError(f"{key}: permission denied ({err.strerror}); check the folder's owner and mode")
    if err.errno in (errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY):
        return TransientStorageError(f"{key}: {err.strerror}")
    return PermanentStorageError(f"{key}: {err.strerror or err}")


class LocalStorage:
    """A folder on a local (or network-mounted POSIX) file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        text = os.fspath(root)
        if text.startswith("file://"):
            text = text[len("file://") :]
        if "://" in text:
            raise ConfigError(
                f"{root!r} is not a local path; object storage (s3://, gs://, az://) is not supported "
                "by this version of spotsafe: use a local folder"
            )
        if not text:
            raise ConfigError("the checkpoint location is empty: give a folder such as runs/my-run")
        self._url = os.fspath(root)
        self.root = Path(text).absolute()

    @property
    def url(self) -> str:
        return self._url

    def path_of(self, key: str) -> Path:
        """Map a key to a path inside the root; refuse anything that could escape it."""
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") or "\\" in p or "\0" in p for p in parts) or key.startswith("/"):
            raise PermanentStorageError(f"refusing storage key {key!r}: keys must stay inside the run folder")
        return self.root.joinpath(*parts)

    def write_stream(self, key: str, chunks: Iterable[Chunk]) -> int:
        path = self.path_of(key)
        total = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
                    total += len(chunk) if not isinstance(chunk, memoryview) else chunk.nbytes
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as err:
            raise _translate(err, key) from err
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
            raise _translate(err, key) from err

    def read(self, key: str) -> bytes:
        try:
            return self.path_of(key).read_bytes()
        except OSError as err:
            raise _translate(err, key) from err

    def read_into(self, key: str, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer)
        try:
            with open(self.path_of(key), "rb", buffering=0) as handle:
                got = 0
                while got < view.nbytes:
                    n = handle.readinto(view[got:])
                    if not n:
                        break
                    got += n
                return got
        except OSError as err:
            raise _translate(err, key) from err

    def size(self, key: str) -> int:
        try:
            return self.path_of(key).stat().st_size
        except OSError as err:
            raise _translate(err, key) from err

    def exists(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def _scan(self, prefix: str, want_dirs: bool) -> list[str]:
        try:
            entries = list(os.scandir(self.path_of(prefix)))
        except FileNotFoundError:
            return []
        except OSError as err:
            raise _translate(err, prefix) from err
        if want_dirs:
            return sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        return sorted(e.name for e in entries if e.is_file(follow_symlinks=False))

    def list_dirs(self, prefix: str) -> list[str]:
        return self._scan(prefix, want_dirs=True)

    def list_files(self, prefix: str) -> list[str]:
        return self._scan(prefix, want_dirs=False)

    def delete(self, key: str) -> None:
        try:
            self.path_of(key).unlink(missing_ok=True)
        except OSError as err:
            raise _translate(err, key) from err

    def delete_prefix(self, prefix: str) -> None:
        path = self.path_of(prefix)
        if not prefix.strip("/"):
            raise PermanentStorageError("refusing to delete the whole run folder")
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            return
        except OSError as err:
            raise _translate(err, prefix) from err

    def sync_prefix(self, prefix: str) -> None:
        try:
            _fsync_dir(self.path_of(prefix))
        except OSError as err:
            raise _translate(err, prefix) from err


def open_storage(url: str | os.PathLike[str]) -> LocalStorage:
    """Open the storage backend for ``url`` (a local folder or ``file://`` URL)."""
    return LocalStorage(url)
