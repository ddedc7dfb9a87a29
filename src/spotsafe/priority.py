"""Background threads yield the CPU to training: a thread's own nice value (Linux schedules threads, not processes)."""

from __future__ import annotations

import contextlib
import os
import threading

WORKER_NICE = 10
"""The save worker: writing is mostly waiting for the disk (blobs go to a local disk with ``O_DIRECT``, without
copies into the page cache); what CPU it needs comes after training's, yet it still finishes well before the next
save on a busy machine."""

HASH_NICE = 19
"""Checksumming the blobs being written, alongside the writes: only the CPU training leaves idle. On a host that
training keeps busy a save then takes longer, but the checksum's CPU time no longer slows the steps right after
the save (measured: the first step after a save 281 ms instead of 315, 268 ms without). If the next save comes
while it is still running, training waits for it (``when_busy="wait"``), and then the checksum has the CPU."""

PREPARE_NICE = 0
"""Preparing staging memory ahead of the first save, from the first ``step_done()`` after a start: at training's
own priority. Fresh memory costs what it costs (0.3-0.4 s of CPU per GiB here) whoever pays it; at nice 19 on a
host that training keeps busy the thread got no CPU, so the first save paid it inside its stall (1 GiB: 211-316 ms
instead of 98), and that save is often the emergency one soon after a restart. At nice 0 the same CPU time is
taken from the few steps after the start instead (1 GiB, both cores busy: about 0.4 s over three steps, once per
process), and on a host that waits for a GPU it is free."""


def lower_priority(nice: int) -> None:
    """Run the calling thread at ``nice`` (threads it starts inherit it). Best effort: elsewhere it runs as is."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
