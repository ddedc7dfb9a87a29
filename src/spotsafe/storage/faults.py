"""Storage wrappers that misbehave on purpose, for drills, demos and tests.

:class:`SlowStorage` adds latency to every write, emulating a slower disk or a
network store so that saves take long enough for an interruption to land in
the middle of one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from spotsafe.storage.base import Chunk, Storage


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

    def write_stream(self, key: str, chunks: Iterable[Chunk]) -> int:
        written = self.inner.write_stream(key, chunks)
        self._sleep(self.latency)
        return written

    def write_atomic(self, key: str, data: bytes) -> None:
        self.inner.write_atomic(key, data)
        self._sleep(self.latency)
