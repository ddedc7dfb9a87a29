"""Local-disk storage: the embedded default.

Every call reaches its file through open folder handles, one path component at a
time, and never follows a symbolic link below the run's root: a checkpoint is
untrusted input, and a link would let it name any file on the machine
(``model.bin -> /home/me/other-run/model.bin``) or make a delete or a write land
outside the run. The rules:

* a read, size or atomic-write target, or any folder on the way to one, that is a
  link raises :class:`~spotsafe.storage.base.UnsafePathError` (a restore skips the
  checkpoint that needs it); so does a named pipe, socket or device where a file
  should be (it is never opened for reading, so a restore cannot block on it);
* listings show a link as an entry (never as a folder) and never enter it; listing
  a folder that is a link raises;
* deleting a link removes the link, never what it points at; a key behind a
  link is not in the run, so there is nothing to delete;
* a streamed write never writes through a link; :meth:`LocalStorage.write_atomic`
  renames a new file over its target, so a link there is replaced, not followed.

The root itself (the folder the user named) may be, or lie under, a link. Hard
links cannot be told apart from ordinary files and are read like them.

On top of that, the two writes the commit protocol depends on carry the
guarantees a disk needs: every write is fsynced, and so is the folder that gains
a name; :meth:`LocalStorage.write_atomic` writes a temporary file next to the
target (``.<name>.tmp-<random>``, so cleanup can find it) and renames it over the target.
Streamed writes (blobs) use ``O_DIRECT`` where the file system takes it (:mod:`spotsafe.storage.direct`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from io import FileIO
from pathlib import Path
from typing import BinaryIO

from fsspec.implementations.local import LocalFileSystem

from spotsafe.errors import ConfigError, PermanentStorageError
from spotsafe.storage.base import TMP_MARKER, BlobNotFoundError, ChunkSource, ReadProgress, UnsafePathError
from spotsafe.storage.direct import O_DIRECT, DirectWriter
from spotsafe.storage.errors import translate
from spotsafe.storage.fsspec_store import FsspecStorage, check_key, read_fully

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
_WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC
MAX_FIND_DEPTH = 64
""":meth:`LocalStorage.find` does not descend deeper than this below its prefix (spotsafe's own keys are 3 deep)."""


def local_root(url: str | os.PathLike[str]) -> Path:
    text = os.fspath(url)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if not text:
        raise ConfigError("the checkpoint location is empty: give a folder such as runs/my-run")
    if "://" in text:
        raise ConfigError(f"{url!r} is not a local path")
    return Path(text).absolute()


IOV_MAX = 1024
"""Buffers per ``preadv`` call (POSIX guarantees at least 16; Linux allows 1024)."""


def preadv_fully(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """``preadv`` into ``views`` from ``offset`` until they are full or the file ends; the bytes read."""
    pending = [v for v in views if v.nbytes]
    first, got = 0, 0
    while first < len(pending):
        n = os.preadv(fd, pending[first : first + IOV_MAX], offset + got)
        if not n:
            break
        got += n
        while first < len(pending) and n >= pending[first].nbytes:
            n -= pending[first].nbytes
            first += 1
        if n:
            pending[first] = pending[first][n:]
    return got


class _Behind(Exception):
    """A key lies behind a file where a folder should be: it is not in the run."""


class LocalStorage(FsspecStorage):
    """A folder on a local (or network-mounted POSIX) file system."""

    def __init__(self, root: str | os.PathLike[str], *, direct_io: bool | None = None) -> None:
        """``direct_io``: write large blobs with ``O_DIRECT`` (:mod:`spotsafe.storage.direct`), bypassing the page
        cache. ``None`` (the default): yes where the platform has it, unless ``SPOTSAFE_DIRECT_IO=0``."""
        path = local_root(root)
        super().__init__(LocalFileSystem(), str(path), os.fspath(root))
        self.root_path = path
        if direct_io is None:
            direct_io = os.environ.get("SPOTSAFE_DIRECT_IO", "1").strip().lower() not in ("0", "false", "no", "off")
        self.direct_io = bool(direct_io and O_DIRECT)

    def path_of(self, key: str) -> Path:
        """The local path of ``key`` (inside the root, or an error). Open it with :meth:`open_read`, not ``open``."""
        return self.root_path.joinpath(*check_key(key))

    # -- walking without following links ---------------------------------------
    def _unsafe(self, key: str, parts: Sequence[str], what: str) -> UnsafePathError:
        shown = "/".join(parts)
        through = "" if shown == key else f" (on the way to {key})"
        return UnsafePathError(
            f"{self.url}/{shown} is {what}{through}; spotsafe never follows or opens one inside a run folder. "
            "Replace it with the real file or folder."
        )

    def _refuse_entry(self, parent: int, key: str, parts: Sequence[str]) -> None:
        """Raise the error for ``parts[-1]`` (in folder ``parent``) if it is a link or a special file."""
        try:
            mode = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISLNK(mode):
            raise self._unsafe(key, parts, "a symbolic link")
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise self._unsafe(key, parts, "not a regular file (a named pipe, socket or device)")

    def _open_root(self, create: bool) -> int:
        if create:
            self.root_path.mkdir(parents=True, exist_ok=True)
        return os.open(self.root_path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)

    def _child_dir(self, parent: int, key: str, parts: Sequence[str], create: bool) -> int:
        name = parts[-1]
        for _ in range(2):
            try:
                return os.open(name, _DIR, dir_fd=parent)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, dir_fd=parent)
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                self._refuse_entry(parent, key, parts)
                if create:
                    raise
                raise _Behind from err
        return os.open(name, _DIR, dir_fd=parent)

    @contextlib.contextmanager
    def _folder(self, key: str, parts: Sequence[str], *, create: bool = False) -> Iterator[int]:
        """An open handle on the folder ``parts`` under the root, reached without following a link.

        Raises :class:`UnsafePathError` for a link on the way, ``FileNotFoundError`` if a folder is
        missing (created instead when ``create``), :class:`_Behind` if a file stands where a folder should.
        """
        fd = self._open_root(create)
        try:
            for i in range(len(parts)):
                child = self._child_dir(fd, key, parts[: i + 1], create)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _file_parts(self, key: str) -> list[str]:
        parts = check_key(key)
        if not parts:
            raise BlobNotFoundError(f"{self.url}: the run folder itself is not an object")
        return parts

    def _open_file(self, key: str) -> int:
        """A read handle on the regular file at ``key``; never a link, pipe or device."""
        parts = self._file_parts(key)
        try:
            with self._folder(key, parts[:-1]) as parent:
                self._refuse_entry(parent, key, parts)  # a pipe or device is not even opened
                try:
                    fd = os.open(parts[-1], _READ, dir_fd=parent)
                except OSError as err:
                    if err.errno != errno.ELOOP:
                        raise
                    raise self._unsafe(key, parts, "a symbolic link") from err
        except _Behind as err:
            raise BlobNotFoundError(f"{self.url}/{key}: not found") from err
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise BlobNotFoundError(f"{self.url}/{key}: not found (a folder)")
            if not stat.S_ISREG(mode):
                raise self._unsafe(key, parts, "not a regular file (a named pipe, socket or device)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_read(self, key: str) -> FileIO:
        """The regular file at ``key``, open for reading (unbuffered), reached without following a link."""
        try:
            return os.fdopen(self._open_file(key), "rb", buffering=0)
        except OSError as err:
            raise translate(err, key, self.url) from err

    # -- writing ---------------------------------------------------------------
    def _opened(self, key: str, name: str, fd: int) -> BinaryIO:
        """A standard file object on ``fd`` (opened without following links), named by its local path."""
        return open(self.path_of(key).with_name(name), "wb", opener=lambda _path, _flags: fd)

    def write_stream(self, key: str, source: ChunkSource) -> int:
        parts = self._file_parts(key)
        total = 0
        try:
            with self._folder(key, parts[:-1], create=True) as parent:
                self._refuse_entry(parent, key, parts)
                fd = self._open_for_write(parent, key, parts)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise self._unsafe(key, parts, "not a regular file (a named pipe, socket or device)")
            try:
                writer = DirectWriter(fd)
                for chunk in source():
                    writer.write(chunk)
                total = writer.finish()
                if writer.refused:
                    self.direct_io = False  # this file system does not take them: buffered from now on
                os.fsync(fd)
            finally:
                os.close(fd)
        except _Behind as err:
            raise PermanentStorageError(f"{self.url}/{key}: a file stands where a folder should be") from err
        except OSError as err:
            raise translate(err, key, self.url) from err
        return total

    def _open_for_write(self, parent: int, key: str, parts: Sequence[str]) -> int:
        """A new (truncated) file for a streamed write, with ``O_DIRECT`` if this storage uses it and the file
        system takes it (``EINVAL`` from the open: not here, and not again on this storage)."""
        while True:
            flags = _WRITE | (O_DIRECT if self.direct_io else 0)
            try:
                return os.open(parts[-1], flags, 0o666, dir_fd=parent)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENXIO):
                    self._refuse_entry(parent, key, parts)
                if err.errno == errno.EINVAL and self.direct_io:
                    self.direct_io = False
                    continue
                raise

    def write_atomic(self, key: str, data: bytes) -> None:
        parts = self._file_parts(key)
        name = parts[-1]
        tmp = f".{name}{TMP_MARKER}{secrets.token_hex(4)}"
        try:
            with self._folder(key, parts[:-1], create=True) as parent:
                try:
                    fd = os.open(tmp, _CREATE, 0o666, dir_fd=parent)
                    with self._opened(key, tmp, fd) as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    # A rename replaces whatever is at the target, a link included, without following it.
                    os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
                    os.fsync(parent)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=parent)
                    raise
        except _Behind as err:
            raise PermanentStorageError(f"{self.url}/{key}: a file stands where a folder should be") from err
        except OSError as err:
            raise translate(err, key, self.url) from err

    # -- reading ---------------------------------------------------------------
    def read(self, key: str) -> bytes:
        try:
            with self.open_read(key) as handle:
                return handle.read()
        except OSError as err:
            raise translate(err, key, self.url) from err

    def read_into(
        self, key: str, buffer: bytearray | memoryview, progress: ReadProgress | None = None, *, offset: int = 0
    ) -> int:
        view = memoryview(buffer)
        try:
            with self.open_read(key) as handle:
                if offset:
                    handle.seek(offset)
                return read_fully(handle, view, progress)
        except OSError as err:
            raise translate(err, key, self.url) from err

    def read_into_views(self, key: str, views: Sequence[memoryview], *, offset: int = 0) -> int:
        """Fill ``views`` one after the other from byte ``offset`` on with ``preadv`` (no copy, one system call
        for up to :data:`IOV_MAX` views); see :func:`~spotsafe.storage.base.read_views`."""
        try:
            with self.open_read(key) as handle:
                return preadv_fully(handle.fileno(), views, offset)
        except OSError as err:
            raise translate(err, key, self.url) from err

    def size(self, key: str) -> int:
        parts = self._file_parts(key)
        try:
            with self._folder(key, parts[:-1]) as parent:
                info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    raise BlobNotFoundError(f"{self.url}/{key}: not found (a folder)")
                self._refuse_entry(parent, key, parts)
                return info.st_size
        except _Behind as err:
            raise BlobNotFoundError(f"{self.url}/{key}: not found") from err
        except OSError as err:
            raise translate(err, key, self.url) from err

    def exists(self, key: str) -> bool:
        """Whether an entry other than a folder is at ``key`` (a link counts: it is there, and refused when read).

        A key behind a link is not in the run: ``False``.
        """
        parts = self._file_parts(key)
        try:
            with self._folder(key, parts[:-1]) as parent:
                info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                return not stat.S_ISDIR(info.st_mode)
        except (FileNotFoundError, _Behind, UnsafePathError):
            return False
        except OSError as err:
            raise translate(err, key, self.url) from err

    # -- listing ---------------------------------------------------------------
    def _scan(self, prefix: str) -> list[tuple[str, bool]]:
        """``(name, is a real folder)`` for each entry of the folder ``prefix``; none if it is missing."""
        parts = check_key(prefix)
        try:
            with self._folder(prefix, parts) as fd, os.scandir(fd) as entries:
                return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        except (FileNotFoundError, _Behind):
            return []
        except OSError as err:
            raise translate(err, prefix, self.url) from err

    def list_dirs(self, prefix: str) -> list[str]:
        return sorted(name for name, is_dir in self._scan(prefix) if is_dir)

    def list_files(self, prefix: str) -> list[str]:
        """Every entry that is not a real folder: files, and links (whatever they point at)."""
        return sorted(name for name, is_dir in self._scan(prefix) if not is_dir)

    def find(self, prefix: str) -> list[str]:
        """Keys of every entry under ``prefix`` that is not a real folder; links are entries, never entered."""
        parts = check_key(prefix)
        found: list[str] = []

        def walk(fd: int, at: list[str], depth: int) -> None:
            with os.scandir(fd) as entries:
                listed = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
            for name, is_dir in listed:
                if not is_dir:
                    found.append("/".join([*at, name]))
                elif depth < MAX_FIND_DEPTH:
                    try:
                        child = self._child_dir(fd, prefix, [*at, name], create=False)
                    except (FileNotFoundError, _Behind, UnsafePathError):
                        continue  # changed since it was listed
                    try:
                        walk(child, [*at, name], depth + 1)
                    finally:
                        os.close(child)

        try:
            with self._folder(prefix, parts) as fd:
                walk(fd, parts, 0)
        except (FileNotFoundError, _Behind):
            return []
        except OSError as err:
            raise translate(err, prefix, self.url) from err
        return sorted(found)

    # -- stat (the Stat capability) --------------------------------------------
    def modified(self, key: str) -> float | None:
        """Unix time of the newest write of ``key`` or, for a folder, of the entries directly in it (a link's own
        time, never its target's); ``None`` when nothing is there, or it lies behind a link."""
        parts = check_key(key)
        try:
            try:
                with self._folder(key, parts) as fd, os.scandir(fd) as entries:
                    times: list[float] = []
                    for entry in entries:
                        with contextlib.suppress(FileNotFoundError):  # removed since it was listed
                            times.append(entry.stat(follow_symlinks=False).st_mtime)
                return max(times, default=None)
            except _Behind:  # a file: its own time
                with self._folder(key, parts[:-1]) as parent:
                    return os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mtime
        except (FileNotFoundError, _Behind, UnsafePathError):
            return None
        except OSError as err:
            raise translate(err, key, self.url) from err

    # -- deleting --------------------------------------------------------------
    def delete(self, key: str) -> None:
        parts = self._file_parts(key)
        try:
            with self._folder(key, parts[:-1]) as parent:
                os.unlink(parts[-1], dir_fd=parent)  # a link is removed itself, never what it points at
        except (FileNotFoundError, _Behind, UnsafePathError):
            return  # missing, or behind a link: not in the run
        except OSError as err:
            raise translate(err, key, self.url) from err

    def delete_prefix(self, prefix: str) -> None:
        parts = check_key(prefix)
        if not parts:
            raise PermanentStorageError("refusing to delete the whole run folder")
        try:
            with self._folder(prefix, parts[:-1]) as parent:
                info = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    # fd-based on POSIX: it never follows a link inside the tree either.
                    shutil.rmtree(parts[-1], dir_fd=parent)
                else:
                    os.unlink(parts[-1], dir_fd=parent)
        except (FileNotFoundError, _Behind, UnsafePathError):
            return
        except OSError as err:
            raise translate(err, prefix, self.url) from err

    def sync_prefix(self, prefix: str) -> None:
        parts = check_key(prefix)
        try:
            with self._folder(prefix, parts) as fd:
                os.fsync(fd)
        except _Behind as err:
            raise BlobNotFoundError(f"{self.url}/{prefix}: not found") from err
        except OSError as err:
            raise translate(err, prefix, self.url) from err
