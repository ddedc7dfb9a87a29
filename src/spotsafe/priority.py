"""Background threads yield the CPU to training: a thread's own nice value (Linux schedules threads, not processes)."""

from __future__ import annotations

import contextlib
import os
import threading

WORKER_NICE = 10
"""The save worker: writing is mostly waiting for the disk; what CPU it needs (checksums, copies into the page
cache) comes after training's, yet it still finishes well before the next save on a busy machine."""

HASH_NICE = 19
"""Checksumming the blobs being written, alongside the writes: only the CPU training leaves idle. On a host that
training keeps busy a save then takes longer, but the checksum's CPU time no longer slows the steps right after
the save (measured: the first step after a save 281 ms instead of 315, 268 ms without). If the next save comes
while it is still running, training waits for it (``when_busy="wait"``), and then the checksum has the CPU."""

PREPARE_NICE = 19
"""Preparing staging memory ahead of the first save: only the CPU nobody else wants."""


def lower_priority(nice: int) -> None:
    """Run the calling thread at ``nice`` (threads it starts inherit it). Best effort: elsewhere it runs as is."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
