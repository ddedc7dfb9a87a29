"""Storage wrappers that misbehave on purpose: the fault-injection test kit.

* :class:`FaultyStorage` fails a given fraction of calls with transient errors
  (as a throttled or flaky object store does), cuts uploads in the middle (half
  the object is written, then the connection "resets"), and adds latency.
* :class:`SlowStorage` acknowledges each write late, emulating a slower disk or
  network store, so that an interruption can land in the middle of a save.

Both are deterministic for a given ``seed``. Both are storage wrappers
(:class:`~spotsafe.storage.wrapper.StorageWrapper`): what ``inner`` offers beyond
the protocol is found with :func:`~spotsafe.storage.base.local_paths` and its siblings.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from spotsafe.errors import TransientStorageError
from spotsafe.storage.base import Chunk, ChunkSource, Storage
from spotsafe.storage.wrapper import StorageWrapper

T = TypeVar("T")


class FaultyStorage(StorageWrapper):
    """Delegates to ``inner`` but fails ``fail_rate`` of calls and cuts ``cut_rate`` of uploads."""

    def __init__(
        self,
        inner: Storage,
        *,
        fail_rate: float = 0.0,
        cut_rate: float = 0.0,
        latency: float = 0.0,
        seed: int = 0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        for name, value in (("fail_rate", fail_rate), ("cut_rate", cut_rate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        super().__init__(inner)
        self.fail_rate, self.cut_rate, self.latency = fail_rate, cut_rate, latency
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sleep = sleep
        self.calls = 0
        self.failures = 0
        self.cuts = 0

    def _draw(self) -> float:
        with self._lock:
            self.calls += 1
            return self._rng.random()

    def _around(self, operation: str, fn: Callable[[], T]) -> T:
        if self.latency:
            self._sleep(self.latency)
        if self._draw() < self.fail_rate:
            with self._lock:
                self.failures += 1
            raise TransientStorageError(f"injected fault: 503 SlowDown during {operation}")
        return fn()

    def write_stream(self, key: str, source: ChunkSource) -> int:
        return self._around(f"write {key}", lambda: self._maybe_cut(key, source))

    def _maybe_cut(self, key: str, source: ChunkSource) -> int:
        if self._draw() < self.cut_rate:
            with self._lock:
                self.cuts += 1

            def half() -> Iterator[Chunk]:
                chunks = [bytes(c) for c in source()]
                data = b"".join(chunks)
                yield data[: len(data) // 2]

            self.inner.write_stream(key, half)
            raise TransientStorageError(f"injected fault: connection reset in the middle of uploading {key}")
        return self.inner.write_stream(key, source)


class SlowStorage(StorageWrapper):
    """Delegates to ``inner``; each write call (one object) is acknowledged ``latency`` seconds late."""

    def __init__(self, inner: Storage, latency: float, *, sleep: Callable[[float], None] = time.sleep) -> None:
        if latency < 0:
            raise ValueError("latency must be >= 0")
        super().__init__(inner)
        self.latency = latency
        self._sleep = sleep

    def write_stream(self, key: str, source: ChunkSource) -> int:
        written = self.inner.write_stream(key, source)
        self._sleep(self.latency)
        return written

    def write_atomic(self, key: str, data: bytes) -> None:
        self.inner.write_atomic(key, data)
        self._sleep(self.latency)
