"""Small disks for tests: a real tmpfs where mounting is allowed, and an emulated one everywhere.

:class:`SmallDisk` makes a folder behave like a disk of ``capacity`` bytes at the level of the
operating system's write calls: every file opened for writing under the folder with ``open()``
(and ``io.open``, ``Path.write_bytes``) or ``os.open`` gets exactly the bytes that fit, then
``OSError(ENOSPC)``, like ``write(2)`` on a full disk (a short write, then the error). Space in
use is what the files under the folder hold, so deleting files frees it, as on a real disk. The
code under test runs unchanged: LocalStorage's streamed writes with fsync, its temporary file
and rename, the writer lease, ``latest.json`` and the event log all see the real error.

:class:`Tmpfs` is the real thing (``mount -t tmpfs -o size=...``, root only). Both fill up with
a filler file (:meth:`fill`) and get their space back when it is deleted (:meth:`make_room`).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

FILLER = "filler.bin"


class Disk(Protocol):
    """A folder with little room in it."""

    root: Path

    def fill(self, leave: int = 0) -> None:
        """Take all but ``leave`` bytes of the free space with a filler file."""
        ...

    def make_room(self) -> None:
        """Delete the filler file: the space is free again."""
        ...


def _no_space(path: str) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _writable(mode: str) -> bool:
    return any(c in mode for c in "wax+")


class _Limited:
    """A file object opened for writing under a :class:`SmallDisk`: writes what fits, then ENOSPC."""

    def __init__(self, raw: Any, path: str, disk: SmallDisk) -> None:
        self._raw = raw
        self._path = path
        self._disk = disk

    def write(self, data: Any) -> int:
        if isinstance(data, str):
            size = len(data.encode())
            with self._disk.lock:
                if self._disk.room(self._path, size) < size:
                    raise _no_space(self._path)
                written = int(self._raw.write(data))
                self._raw.flush()
                return written
        view = memoryview(data).cast("B")
        with self._disk.lock:
            fit = self._disk.room(self._path, view.nbytes)
            if fit:
                self._raw.write(view[:fit])
                self._raw.flush()  # write through, so the space in use is what the files hold
        if fit < view.nbytes:
            raise _no_space(self._path)
        return view.nbytes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> _Limited:
        return self

    def __exit__(self, *exc: object) -> None:
        self._raw.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._raw)


class SmallDisk:
    """Emulates a disk of ``capacity`` bytes (``None``: unlimited) under ``root``; see the module docstring.

    Use :meth:`install` for the duration of a test. ``full_at(fragment)`` makes the disk fill up
    the moment a file whose path contains ``fragment`` is written (the manifest, ``latest.json``...).
    Thread-safe: the save worker writes while the training thread logs events.
    """

    def __init__(self, root: Path, capacity: int | None = None) -> None:
        self.root = root
        self.capacity = capacity
        self._capacity = capacity
        self.lock = threading.RLock()
        self.refused: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        self._prefix = os.path.realpath(root) + os.sep
        self._fds: dict[int, str] = {}
        self._trigger: tuple[str, int] | None = None

    # -- the disk --------------------------------------------------------------------------------
    def used(self) -> int:
        """Bytes the files under the root hold."""
        total = 0
        for folder, _, names in os.walk(self.root):
            for name in names:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    continue  # deleted meanwhile (an abort on another thread)
        return total

    def room(self, path: str, wanted: int) -> int:
        """How many of ``wanted`` bytes to ``path`` fit now (recording a refusal when not all do)."""
        with self.lock:
            if self._trigger is not None and self._trigger[0] in path:
                self.capacity = self.used() + self._trigger[1]
                self._trigger = None
            if self.capacity is None:
                return wanted
            fit = max(0, min(wanted, self.capacity - self.used()))
            if fit < wanted:
                self.refused.append(os.path.relpath(path, self.root))
            return fit

    def fill(self, leave: int = 0) -> None:
        if self.capacity is None:
            self.capacity = self.used() + leave  # no filler needed: the disk just ends here
            return
        free = self.capacity - self.used()
        (self.root / FILLER).write_bytes(bytes(max(0, free - leave)))

    def full_at(self, fragment: str, leave: int = 0) -> None:
        """When a path containing ``fragment`` is next written, the disk is full but ``leave`` bytes."""
        self._trigger = (fragment, leave)

    def make_room(self) -> None:
        """Delete the filler and undo :meth:`full_at`: the disk has its own capacity again."""
        (self.root / FILLER).unlink(missing_ok=True)
        self._trigger = None
        self.capacity = self._capacity

    # -- the system calls ------------------------------------------------------------------------
    def _under(self, fd: int, file: Any = None) -> str | None:
        """The path of the file open as ``fd`` if it lies under the root.

        Asked of the system where it can say (``/proc/self/fd``), so a file opened relative to a
        folder handle (``os.open(name, dir_fd=...)``) or wrapped later (``os.fdopen``, ``opener=``)
        counts too; elsewhere the path it was opened by.
        """
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            if not isinstance(file, (str, bytes, os.PathLike)):
                return None
            path = os.path.realpath(os.fsdecode(file))
        return path if path.startswith(self._prefix) else None

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Route writes under the root through the disk until the test ends."""
        real_open: Callable[..., Any] = builtins.open
        real_os_open, real_write, real_close = os.open, os.write, os.close

        def limited_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            handle = real_open(file, mode, *args, **kwargs)
            if not _writable(mode):
                return handle
            fd = handle.fileno()
            self._fds.pop(fd, None)  # its writes are limited by the wrapper, not again by os.write
            path = self._under(fd, file)
            return handle if path is None else _Limited(handle, path, self)

        def limited_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            fd = real_os_open(path, flags, mode, dir_fd=dir_fd)
            under = self._under(fd, path if dir_fd is None else None) if flags & (os.O_WRONLY | os.O_RDWR) else None
            if under is None:
                self._fds.pop(fd, None)  # a number reused after a close that did not go through os.close
            else:
                self._fds[fd] = under
            return fd

        def limited_write(fd: int, data: Any) -> int:
            path = self._fds.get(fd)
            if path is None:
                return real_write(fd, data)
            view = memoryview(data).cast("B")
            with self.lock:
                fit = self.room(path, view.nbytes)
                if view.nbytes and not fit:
                    raise _no_space(path)
                return real_write(fd, view[:fit])  # a short write when only part fits, as write(2) does

        def limited_close(fd: int) -> None:
            self._fds.pop(fd, None)
            real_close(fd)

        monkeypatch.setattr(builtins, "open", limited_open)
        monkeypatch.setattr(io, "open", limited_open)
        monkeypatch.setattr(os, "open", limited_os_open)
        monkeypatch.setattr(os, "write", limited_write)
        monkeypatch.setattr(os, "close", limited_close)


class Tmpfs:
    """A real tmpfs of ``size`` mounted at ``root`` (Linux, root or CAP_SYS_ADMIN). Use :func:`mount_tmpfs`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Write zeros until only ``leave`` bytes are free (page granularity: tmpfs allocates pages)."""
        fd = os.open(self.root / FILLER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        block = bytes(64 * 1024)
        try:
            while (free := self.free() - leave) > 0:
                os.write(fd, block[:free])
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)

    def make_room(self) -> None:
        (self.root / FILLER).unlink(missing_ok=True)


def mount_tmpfs(root: Path, size: str) -> Iterator[Tmpfs]:
    """Mount a tmpfs of ``size`` (``"8m"``) at ``root`` for the duration of a fixture; skip where not allowed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("a tmpfs needs Linux")
    root.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(root)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot mount a tmpfs here: {err}")
    if proc.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs root or CAP_SYS_ADMIN: {proc.stderr.strip()}")
    try:
        yield Tmpfs(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True, timeout=60, check=False)
