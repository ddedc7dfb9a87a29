"""Storage wrappers that misbehave on purpose: the fault-injection test kit.

* :class:`FaultyStorage` fails a given fraction of calls with transient errors
  (as a throttled or flaky object store does), cuts uploads in the middle (half
  the object is written, then the connection "resets"), and adds latency.
* :class:`SlowStorage` acknowledges each write late, emulating a slower disk or
  network store, so that an interruption can land in the middle of a save.

Both are deterministic for a given ``seed``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from spotsafe.errors import TransientStorageError
from spotsafe.storage.base import Chunk, ChunkSource, ReadProgress, Storage

T = TypeVar("T")


class FaultyStorage:
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
        self.inner = inner
        self.fail_rate, self.cut_rate, self.latency = fail_rate, cut_rate, latency
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sleep = sleep
        self.calls = 0
        self.failures = 0
        self.cuts = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    @property
    def url(self) -> str:
        return self.inner.url

    def _draw(self) -> float:
        with self._lock:
            self.calls += 1
            return self._rng.random()

    def _maybe_fail(self, operation: str) -> None:
        if self.latency:
            self._sleep(self.latency)
        if self._draw() < self.fail_rate:
            with self._lock:
                self.failures += 1
            raise TransientStorageError(f"injected fault: 503 SlowDown during {operation}")

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        self._maybe_fail(operation)
        return fn()

    def write_stream(self, key: str, source: ChunkSource) -> int:
        self._maybe_fail(f"write {key}")
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

    def write_atomic(self, key: str, data: bytes) -> None:
        self._call(f"write {key}", lambda: self.inner.write_atomic(key, data))

    def read(self, key: str) -> bytes:
        return self._call(f"read {key}", lambda: self.inner.read(key))

    def read_into(self, key: str, buffer: bytearray | memoryview, progress: ReadProgress | None = None) -> int:
        return self._call(f"read {key}", lambda: self.inner.read_into(key, buffer, progress))

    def size(self, key: str) -> int:
        return self._call(f"stat {key}", lambda: self.inner.size(key))

    def exists(self, key: str) -> bool:
        return self._call(f"stat {key}", lambda: self.inner.exists(key))

    def list_dirs(self, prefix: str) -> list[str]:
        return self._call(f"list {prefix}", lambda: self.inner.list_dirs(prefix))

    def list_files(self, prefix: str) -> list[str]:
        return self._call(f"list {prefix}", lambda: self.inner.list_files(prefix))

    def find(self, prefix: str) -> list[str]:
        return self._call(f"list {prefix}", lambda: self.inner.find(prefix))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.inner.delete(key))

    def delete_prefix(self, prefix: str) -> None:
        self._call(f"delete {prefix}", lambda: self.inner.delete_prefix(prefix))

    def sync_prefix(self, prefix: str) -> None:
        self._call(f"sync {prefix}", lambda: self.inner.sync_prefix(prefix))


class SlowStorage:
    """Delegates to ``inner``; each write call (one object) is acknowledged ``latency`` seconds late."""

    def __init__(self, inner: Storage, latency: float, *, sleep: Callable[[float], None] = time.sleep) -> None:
        if latency < 0:
            raise ValueError("latency must be >= 0")
        self.inner = inner
        self.latency = latency
        self._sleep = sleep

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    @property
    def url(self) -> str:
        return self.inner.url

    def write_stream(self, key: str, source: ChunkSource) -> int:
        written = self.inner.write_stream(key, source)
        self._sleep(self.latency)
        return written

    def write_atomic(self, key: str, data: bytes) -> None:
        self.inner.write_atomic(key, data)
        self._sleep(self.latency)
