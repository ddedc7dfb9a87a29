"""The command's own output (and its children's), above the status lines: this process's stderr (and
stdout, when it is the same terminal) goes through a pseudo-terminal while the status is shown, so that
the supervisor's lines and the job's output scroll above the status instead of tearing it."""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import os
import selectors
import signal
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any


class LineSplitter:
    """Splits a stream of terminal text into complete lines, as a terminal would show them.

    ``\\r\\n`` ends a line like ``\\n``; within a line, a carriage return starts it over (progress
    bars redraw themselves so), so a line shows what follows its last ``\\r``. ``pending`` is the
    line being written (what a terminal would show on its last row).
    """

    LONGEST = 64 * 1024
    """A line longer than this is shown in pieces."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += self._decoder.decode(data)
        *lines, self._buffer = self._buffer.split("\n")
        if len(self._buffer) > self.LONGEST:
            lines.append(self._buffer)
            self._buffer = ""
        return [_shown(line) for line in lines]

    @property
    def pending(self) -> str:
        return _shown(self._buffer)

    def flush(self) -> list[str]:
        """The pending line as a complete one (when the output ends without a newline)."""
        rest = self._buffer + self._decoder.decode(b"", final=True)
        self._buffer = ""
        return [_shown(rest)] if rest else []


def _shown(line: str) -> str:
    line = line.removesuffix("\r")
    return line.rsplit("\r", 1)[-1]


def _same_terminal(a: int, b: int) -> bool:
    try:
        if not (os.isatty(a) and os.isatty(b)):
            return False
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino, sa.st_rdev) == (sb.st_dev, sb.st_ino, sb.st_rdev)


def _copy_size(source: int | None, target: int, fallback: tuple[int, int]) -> None:
    """Give the terminal ``target`` the size of ``source`` (``fallback`` columns, rows when it has none)."""
    size = None
    if source is not None:
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
    if size is None or struct.unpack("HHHH", size)[:2] == (0, 0):
        columns, rows = fallback
        size = struct.pack("HHHH", rows, columns, 0, 0)
    with contextlib.suppress(OSError):
        fcntl.ioctl(target, termios.TIOCSWINSZ, size)


class OutputCapture:
    """Routes this process's stderr (and stdout, when it is the same terminal) through a pseudo-terminal
    while active, and hands what is written there to ``lines`` (complete lines) and ``pending`` (the line
    being written). Child processes inherit the routed descriptors, so their output comes along; they
    still see a terminal. Falls back to a pipe where no pseudo-terminal can be had.

    The reader never stops draining while the capture is active: if ``lines`` fails, the output is dropped
    rather than left to fill the buffer and block the writers.
    """

    def __init__(
        self,
        lines: Callable[[list[str]], None],
        pending: Callable[[str], None],
        *,
        terminal: int | None,
        size: tuple[int, int],
    ) -> None:
        self._lines = lines
        self._pending = pending
        self._terminal = terminal
        self._size = size
        self._splitter = LineSplitter()
        self._saved: dict[int, int] = {}
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spotsafe-output", daemon=True)
        self._previous_winch: Any = None

    def start(self) -> None:
        targets = [2] + ([1] if _same_terminal(1, 2) else [])
        try:
            self._read_fd, self._write_fd = os.openpty()
            _copy_size(self._terminal, self._write_fd, self._size)
        except OSError:
            self._read_fd, self._write_fd = os.pipe()
        _flush_std()
        for fd in targets:
            self._saved[fd] = os.dup(fd)
            os.dup2(self._write_fd, fd)
        self._thread.start()
        if threading.current_thread() is threading.main_thread() and os.isatty(self._write_fd):
            with contextlib.suppress(ValueError, OSError):
                self._previous_winch = signal.signal(signal.SIGWINCH, self._on_resize)

    def _on_resize(self, signum: int, frame: FrameType | None) -> None:
        if self._write_fd is not None:
            _copy_size(self._terminal, self._write_fd, self._size)

    def stop(self) -> None:
        """Give the descriptors back, and print what the writers still had in the pipe."""
        if self._read_fd is None:
            return
        if self._previous_winch is not None:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGWINCH, self._previous_winch)
        _flush_std()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()
        self._stopping.set()  # the reader ends once nothing more comes (holding a writer, so nothing is lost)
        self._thread.join(timeout=2.0)
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        os.close(self._read_fd)  # processes that outlived the command now get errors writing there
        self._read_fd = None
        with contextlib.suppress(Exception):
            rest = self._splitter.flush()
            if rest:
                self._lines(rest)

    def _run(self) -> None:
        fd = self._read_fd
        assert fd is not None
        draining_since: float | None = None
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                if not selector.select(0.05):
                    if self._stopping.is_set():
                        return  # nothing more came since the command ended
                    continue
                if not self._drain(fd):
                    return
                if self._stopping.is_set():
                    draining_since = draining_since or time.monotonic()
                    if time.monotonic() - draining_since > 1.0:
                        return  # something that outlived the command keeps writing: stop listening to it

    def _drain(self, fd: int) -> bool:
        """Read what is there and show it; ``False`` when every writer is gone."""
        try:
            data = os.read(fd, 65536)
        except OSError:
            return False  # EIO: the pseudo-terminal has no writer left
        if not data:
            return False  # end of the pipe
        try:
            complete = self._splitter.feed(data)
            if complete:
                self._lines(complete)
            self._pending(self._splitter.pending)
        except Exception:  # noqa: BLE001 - keep draining whatever the display does
            pass
        return True


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
