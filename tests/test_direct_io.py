"""Blobs are written with O_DIRECT on a local disk: from the staging memory straight to the disk, byte-exact.

Real files on this machine's disk. What must hold: whatever the chunks (sizes, alignment, read-only bytes), the
file holds exactly the stream; page-aligned large chunks are written from their own memory; a file system that
refuses O_DIRECT (at the open, or at a write) gets the same bytes through the page cache and is not asked again;
``SPOTSAFE_DIRECT_IO=0`` turns it off; and a save lays out its large runs on page boundaries, so they take the
direct route, and restores bit-exactly.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spotsafe
from spotsafe.policy.interval import Never
from spotsafe.storage import direct
from spotsafe.storage.direct import ALIGN, DIRECT_MIN, O_DIRECT, DirectWriter
from spotsafe.storage.local import LocalStorage

pytestmark = pytest.mark.skipif(not O_DIRECT, reason="O_DIRECT is Linux-only")

MiB = 1 << 20


def aligned(size: int, seed: int = 0) -> memoryview:
    """Page-aligned random bytes."""
    view = memoryview(mmap.mmap(-1, size))
    view[:] = random.Random(seed).randbytes(size)
    return view


def mixed_streams(seed: int) -> list[list[Any]]:
    """Streams of chunks of every kind: aligned and not, large and small, read-only, empty."""
    rng = random.Random(seed)
    big = aligned(8 * MiB, seed)
    streams = []
    for _ in range(60):
        chunks: list[Any] = []
        for _ in range(rng.randint(0, 8)):
            kind = rng.random()
            if kind < 0.3:
                chunks.append(rng.randbytes(rng.randint(0, 10_000)))  # read-only bytes
            elif kind < 0.7:
                start = rng.choice([0, ALIGN, MiB, 123])
                chunks.append(big[start : start + rng.choice([MiB, MiB + 17, 3 * MiB, 300 * ALIGN, 5, 0])])
            else:
                chunks.append(bytearray(rng.randint(0, 5000)))
        streams.append(chunks)
    return streams


def joined(chunks: list[Any]) -> bytes:
    return b"".join(bytes(c) for c in chunks)


def test_any_stream_of_chunks_is_written_exactly(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    assert storage.direct_io
    for i, chunks in enumerate(mixed_streams(1)):
        written = storage.write_stream("c/blob.bin", lambda chunks=chunks: iter(chunks))
        expected = joined(chunks)
        assert written == len(expected)
        assert (tmp_path / "c" / "blob.bin").read_bytes() == expected, f"stream {i}"
    assert storage.direct_io  # nothing was refused


def write_with(tmp_path: Path, chunks: list[Any]) -> DirectWriter:
    fd = os.open(tmp_path / "f.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_DIRECT, 0o644)
    try:
        writer = DirectWriter(fd)
        for chunk in chunks:
            writer.write(chunk)
        writer.finish()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (tmp_path / "f.bin").read_bytes() == joined(chunks)
    return writer


def test_page_aligned_large_chunks_go_from_their_own_memory(tmp_path: Path) -> None:
    body = aligned(3 * MiB + 100)
    writer = write_with(tmp_path, [body, b"tail"])
    assert writer.direct and not writer.refused
    assert writer.direct_bytes == 3 * MiB + 100 - 100 % ALIGN  # the last partial page went through the bounce
    # after a page-multiple of small bytes the file offset is aligned again: the next large chunk goes direct
    writer = write_with(tmp_path, [bytes(ALIGN), body[: 2 * MiB]])
    assert writer.direct_bytes == 2 * MiB


def test_unaligned_small_or_read_only_chunks_are_copied(tmp_path: Path) -> None:
    body = aligned(4 * MiB)
    cases: list[list[Any]] = [
        [body[1 : 2 * MiB + 1]],  # memory not on a page
        [b"x", body[: 2 * MiB]],  # the file offset not on a page
        [body[: DIRECT_MIN - ALIGN]],  # too small to bother
        [bytes(body[: 2 * MiB])],  # read-only: its address is not known without a copy
    ]
    for chunks in cases:
        writer = write_with(tmp_path, chunks)
        assert writer.direct_bytes == 0
        assert writer.direct  # still O_DIRECT: through the aligned bounce buffer


def refusing_open(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.open answers EINVAL to O_DIRECT, as a file system without it does."""
    refused: list[int] = []
    real_open = os.open

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & O_DIRECT:
            refused.append(flags)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    return refused


def test_a_file_system_that_refuses_o_direct_at_open_gets_buffered_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = refusing_open(monkeypatch)
    storage = LocalStorage(tmp_path)
    body = aligned(2 * MiB)
    for _ in range(2):
        assert storage.write_stream("a/b.bin", lambda: iter([body, b"end"])) == 2 * MiB + 3
        assert (tmp_path / "a" / "b.bin").read_bytes() == bytes(body) + b"end"
    assert len(refused) == 1  # asked once, then not again
    assert not storage.direct_io


def test_a_direct_write_refused_midway_finishes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL from a write (another alignment than ours, a file system that only pretends): the file is
    switched to buffered writes and gets every byte; the storage does not try O_DIRECT again."""
    real_write = os.write
    calls: list[bool] = []

    def write(fd: int, data: Any) -> int:
        is_direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)
        calls.append(is_direct)
        if is_direct and len(calls) > 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    storage = LocalStorage(tmp_path)
    body = aligned(6 * MiB, seed=3)
    chunks = [body[: 2 * MiB], b"abc", body[2 * MiB :], b"z" * 5000]
    assert storage.write_stream("k/x.bin", lambda: iter(chunks)) == len(joined(chunks))
    assert (tmp_path / "k" / "x.bin").read_bytes() == joined(chunks)
    assert calls[:2] == [True, True] and not any(calls[2:])
    assert not storage.direct_io


def test_a_short_direct_write_goes_on_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def short_write(fd: int, data: Any) -> int:
        view = memoryview(data)
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT and view.nbytes > ALIGN:
            return real_write(fd, view[: 2 * ALIGN]) if view.nbytes > 3 * ALIGN else real_write(fd, view)
        return real_write(fd, view[:1000])  # buffered: short, unaligned

    monkeypatch.setattr(os, "write", short_write)
    body = aligned(2 * MiB, seed=4)
    write_with(tmp_path, [body, b"rest"])


@pytest.mark.parametrize("setting", ["0", "off"])
def test_spotsafe_direct_io_0_turns_it_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setenv("SPOTSAFE_DIRECT_IO", setting)
    storage = LocalStorage(tmp_path)
    assert not storage.direct_io
    refused = refusing_open(monkeypatch)  # would raise if O_DIRECT were asked for
    body = aligned(2 * MiB)
    storage.write_stream("a/b.bin", lambda: iter([body]))
    assert (tmp_path / "a" / "b.bin").read_bytes() == bytes(body) and not refused
    assert LocalStorage(tmp_path, direct_io=True).direct_io  # the argument wins over the environment


def test_a_save_writes_its_large_runs_page_aligned_from_the_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[DirectWriter] = []
    real_finish = DirectWriter.finish

    def finish(self: DirectWriter) -> int:
        written.append(self)
        return real_finish(self)

    monkeypatch.setattr(DirectWriter, "finish", finish)

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(700, 700), nn.Linear(700, 3))  # 1.9 MB weights, unaligned sizes
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    model, optimizer = build()
    ckpt = spotsafe.Checkpointer(
        tmp_path / "run", model=model, optimizer=optimizer, handle_signals=False, policy=Never()
    )

    def steps() -> None:
        for _ in range(2):
            model(torch.randn(4, 700)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()

    steps()
    ckpt.save()
    ckpt.wait()
    steps()
    ckpt.save()
    ckpt.close()
    big = 700 * 700 * 4
    # weight, exp_avg, exp_avg_sq of the big layer went straight from their slots in both saves
    assert sum(w.direct_bytes for w in written) >= 2 * 3 * (big - big % ALIGN)
    folder = max((tmp_path / "run" / "checkpoints").iterdir())
    state = json.loads((folder / "state.json").read_bytes())
    offsets = [offset for _blob, offset, length in _segments(state) if length >= DIRECT_MIN]
    assert offsets and all(o % ALIGN == 0 for o in offsets)

    fresh, fresh_opt = build()
    restored = spotsafe.Checkpointer(tmp_path / "run", model=fresh, optimizer=fresh_opt, handle_signals=False)
    restored.restore()
    restored.close()
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(
        optimizer.state_dict()["state"][0]["exp_avg_sq"], fresh_opt.state_dict()["state"][0]["exp_avg_sq"]
    )


def _segments(node: Any) -> list[Any]:
    """Every segment listed anywhere in a state.json."""
    found: list[Any] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "segments":
                found.extend(value)
            else:
                found.extend(_segments(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_segments(value))
    return found


def test_the_bounce_buffer_is_page_aligned() -> None:
    view = direct._bounce()
    assert direct.address(view) is not None and direct.address(view) % ALIGN == 0  # type: ignore[operator]


def test_checksums_alongside_the_writes_run_at_the_lowest_priority() -> None:
    """Only CPU that training leaves idle (Linux schedules threads: the nice value is the thread's own)."""
    from spotsafe.storage.pending import _hash_pool

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = niceness()
    assert _hash_pool().submit(niceness).result() == 19
    assert niceness() == before  # this thread was left alone
