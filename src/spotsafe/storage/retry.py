"""The one retry mechanism: transient storage errors, exponential backoff with full jitter, a time budget.

Only :class:`~spotsafe.errors.TransientStorageError` is retried. Permanent errors
(no such bucket, access denied, bad credentials) pass straight through, so a
misconfiguration fails in milliseconds with a message, not after minutes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from spotsafe.checks import check_number
from spotsafe.errors import TransientStorageError
from spotsafe.storage.base import ChunkSource, ReadProgress, Storage

T = TypeVar("T")
RetryHook = Callable[[str, int, float, Exception], None]
"""Called as ``hook(operation, attempt, delay_s, error)`` before each retry."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Backoff ``min(max_delay, initial * multiplier**n)`` with full jitter, until ``budget_s`` is spent.

    The budget bounds when the last retry may start; that attempt's own duration comes on top.
    """

    budget_s: float = 120.0
    initial: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        check_number("RetryPolicy.budget_s", self.budget_s, at_least=0, finite=False, unit="seconds")
        check_number("RetryPolicy.initial", self.initial, at_least=0, unit="seconds")
        check_number("RetryPolicy.max_delay", self.max_delay, at_least=0, finite=False, unit="seconds")
        check_number("RetryPolicy.multiplier", self.multiplier, at_least=1)

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Delay before retry number ``attempt`` (1-based): uniform in [0, capped exponential]."""
        cap = min(self.max_delay, self.initial * self.multiplier ** (attempt - 1))
        return rng.uniform(0.0, cap)


DEFAULT_RETRY = RetryPolicy()


class RetryingStorage:
    """Wraps a :class:`Storage`; every call is retried on transient errors within the policy's budget."""

    def __init__(
        self,
        inner: Storage,
        policy: RetryPolicy = DEFAULT_RETRY,
        *,
        on_retry: RetryHook | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.inner = inner
        self.policy = policy
        self.on_retry = on_retry
        self._sleep, self._clock = sleep, clock
        self._rng = rng or random.Random()

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    @property
    def url(self) -> str:
        return self.inner.url

    def _retry(self, operation: str, fn: Callable[[], T]) -> T:
        started = self._clock()
        attempt = 0
        while True:
            try:
                return fn()
            except TransientStorageError as err:
                attempt += 1
                delay = self.policy.delay(attempt, self._rng)
                spent = self._clock() - started
                if spent + delay > self.policy.budget_s:
                    raise TransientStorageError(
                        f"{operation} still failing after {attempt} attempts over {spent:.1f} s "
                        f"(retry budget {self.policy.budget_s:g} s): {err}"
                    ) from err
                if self.on_retry is not None:
                    self.on_retry(operation, attempt, delay, err)
                self._sleep(delay)

    def write_stream(self, key: str, source: ChunkSource) -> int:
        return self._retry(f"write {key}", lambda: self.inner.write_stream(key, source))

    def write_atomic(self, key: str, data: bytes) -> None:
        self._retry(f"write {key}", lambda: self.inner.write_atomic(key, data))

    def read(self, key: str) -> bytes:
        return self._retry(f"read {key}", lambda: self.inner.read(key))

    def read_into(self, key: str, buffer: bytearray | memoryview, progress: ReadProgress | None = None) -> int:
        return self._retry(f"read {key}", lambda: self.inner.read_into(key, buffer, progress))

    def size(self, key: str) -> int:
        return self._retry(f"stat {key}", lambda: self.inner.size(key))

    def exists(self, key: str) -> bool:
        return self._retry(f"stat {key}", lambda: self.inner.exists(key))

    def list_dirs(self, prefix: str) -> list[str]:
        return self._retry(f"list {prefix}", lambda: self.inner.list_dirs(prefix))

    def list_files(self, prefix: str) -> list[str]:
        return self._retry(f"list {prefix}", lambda: self.inner.list_files(prefix))

    def find(self, prefix: str) -> list[str]:
        return self._retry(f"list {prefix}", lambda: self.inner.find(prefix))

    def delete(self, key: str) -> None:
        self._retry(f"delete {key}", lambda: self.inner.delete(key))

    def delete_prefix(self, prefix: str) -> None:
        self._retry(f"delete {prefix}", lambda: self.inner.delete_prefix(prefix))

    def sync_prefix(self, prefix: str) -> None:
        self._retry(f"sync {prefix}", lambda: self.inner.sync_prefix(prefix))
