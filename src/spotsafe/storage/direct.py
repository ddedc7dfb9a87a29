"""Writing a file with ``O_DIRECT``: large aligned chunks go from their own memory straight to the disk.

A buffered write copies every byte into the page cache (fresh pages, faulted in and
zeroed by the kernel on the writing thread), and the kernel's writeback threads then
copy them out again. For a checkpoint that is written once and read only after a
restart, all of that is CPU and memory bandwidth taken from training. ``O_DIRECT``
skips the page cache: the disk reads the bytes from the process's memory.

``O_DIRECT`` wants the file offset, the length and the memory address of every write
aligned (to the logical block size; :data:`ALIGN` covers every common disk). A
:class:`DirectWriter` takes chunks of any size and alignment:

* a chunk whose memory is aligned, at an aligned file offset, of at least
  :data:`DIRECT_MIN` bytes, is written from its own memory (its last partial block
  goes to the bounce buffer);
* anything else is copied into a small aligned bounce buffer, written when full;
* the file's last partial block is written padded with zeros and the file then
  truncated to its real length.

Staging slots are page-aligned and an incremental save page-aligns its large runs in
the blob (see :mod:`spotsafe.engine.plan`), so a save's bytes take the first route.
Whenever the file system refuses (``EINVAL``: no ``O_DIRECT`` there, or another
alignment) the writer switches the file back to buffered writes and goes on, and
:attr:`DirectWriter.refused` tells the storage not to try again.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading

ALIGN = 4096
"""File offsets, lengths and addresses of direct writes are multiples of this (a page; >= any logical block)."""
DIRECT_MIN = 1 << 20
"""Aligned chunks at least this large are written from their own memory; smaller ones through the bounce buffer."""
BOUNCE = 4 << 20
"""Bytes of the bounce buffer (page-aligned, one per thread, reused)."""
O_DIRECT = getattr(os, "O_DIRECT", 0)

_local = threading.local()


def _bounce() -> memoryview:
    view = getattr(_local, "bounce", None)
    if view is None:
        view = _local.bounce = memoryview(mmap.mmap(-1, BOUNCE))
    return view


def address(view: memoryview) -> int | None:
    """The address of ``view``'s first byte, or ``None`` when it cannot be known without a copy (read-only)."""
    if view.readonly or not view.nbytes:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _flat(chunk: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(chunk)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class DirectWriter:
    """Writes a stream of chunks to ``fd`` (at offset 0): with ``O_DIRECT`` when ``fd`` was opened with it, falling
    back to buffered writes when the file system refuses; on any ``fd``, small chunks are gathered in the bounce
    buffer and large ones written from their own memory."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.direct = bool(O_DIRECT and fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)
        self.refused = False
        """The file system refused a direct write (``EINVAL``): later files should not try."""
        self.written = 0
        """Bytes of the stream so far (the bounce's included)."""
        self.direct_bytes = 0
        """Bytes written with ``O_DIRECT`` from their own memory, without a copy."""
        self._fill = 0
        self._bounce = _bounce()

    def write(self, chunk: bytes | bytearray | memoryview) -> None:
        view = _flat(chunk)
        self.written += view.nbytes
        while view.nbytes:
            if view.nbytes >= DIRECT_MIN and (not self.direct or self._at_page(view)):
                self._flush_bounce()
                n = view.nbytes - view.nbytes % ALIGN if self.direct else view.nbytes
                self._put(view[:n], own=True)
                view = view[n:]
                continue
            take = min(view.nbytes, BOUNCE - self._fill)
            self._bounce[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == BOUNCE:
                self._flush_bounce()

    def _at_page(self, view: memoryview) -> bool:
        """Whether ``view`` can be written directly: its memory and the file offset on a page."""
        at = address(view)
        return self._fill % ALIGN == 0 and at is not None and at % ALIGN == 0

    def finish(self) -> int:
        """Write what is left, set the file's length; the stream's byte count. (The caller fsyncs.)"""
        if self._fill and self.direct and self._fill % ALIGN:
            padded = self._fill + (-self._fill % ALIGN)
            self._bounce[self._fill : padded] = bytes(padded - self._fill)
            self._fill = padded
            self._flush_bounce()
            os.ftruncate(self.fd, self.written)  # drop the padding
        else:
            self._flush_bounce()
        return self.written

    def _flush_bounce(self) -> None:
        if self._fill:
            fill, self._fill = self._fill, 0
            self._put(self._bounce[:fill], own=False)

    def _put(self, view: memoryview, *, own: bool) -> None:
        """Write ``view`` (aligned, when direct); on refusal switch the file to buffered writes and write it so."""
        if not self.direct:
            _write_all(self.fd, view)
            return
        while view.nbytes:
            try:
                n = os.write(self.fd, view)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                self.refused = True
                self._buffered()
                _write_all(self.fd, view)
                return
            if own:
                self.direct_bytes += n
            view = view[n:]
            if n % ALIGN:  # a short write left the offset unaligned: the rest goes through the page cache
                self._buffered()
                _write_all(self.fd, view)
                return

    def _buffered(self) -> None:
        """Clear ``O_DIRECT`` on the open file (Linux allows it): later writes go through the page cache."""
        if self.direct:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~O_DIRECT)
            self.direct = False


def _write_all(fd: int, view: memoryview) -> None:
    while view.nbytes:
        view = view[os.write(fd, view) :]
