"""The one storage retry mechanism: transient errors, the shared :class:`~spotsafe.backoff.Backoff`, a time budget.

Only :class:`~spotsafe.errors.TransientStorageError` is retried. Permanent errors
(no such bucket, access denied, bad credentials) pass straight through, so a
misconfiguration fails in milliseconds with a message, not after minutes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

from spotsafe.backoff import Backoff
from spotsafe.checks import check_number
from spotsafe.errors import TransientStorageError
from spotsafe.storage.base import Storage
from spotsafe.storage.wrapper import StorageWrapper

T = TypeVar("T")
RetryHook = Callable[[str, int, float, Exception], None]
"""Called as ``hook(operation, attempt, delay_s, error)`` before each retry."""


@dataclass(frozen=True, kw_only=True)
class StorageRetry:
    """How storage calls are retried: backoff ``min(max_delay, initial * multiplier**n)`` with full jitter,
    until ``budget_s`` is spent (see :attr:`backoff`).

    The budget bounds when the last retry may start; that attempt's own duration comes on top.
    """

    budget_s: float = 120.0
    initial: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        check_number("StorageRetry.budget_s", self.budget_s, at_least=0, finite=False, unit="seconds")
        check_number("StorageRetry.initial", self.initial, at_least=0, unit="seconds")
        check_number("StorageRetry.max_delay", self.max_delay, at_least=0, finite=False, unit="seconds")
        check_number("StorageRetry.multiplier", self.multiplier, at_least=1)

    @cached_property
    def backoff(self) -> Backoff:
        """These settings as the shared backoff value: ``backoff.delay(attempt, rng)`` before retry ``attempt``."""
        return Backoff(
            initial_s=self.initial, multiplier=self.multiplier, max_delay_s=self.max_delay, budget_s=self.budget_s
        )


DEFAULT_RETRY = StorageRetry()


class RetryingStorage(StorageWrapper):
    """Wraps a :class:`Storage`; every call is retried on transient errors within the policy's budget.

    ``on_retry`` (the :class:`~spotsafe.storage.base.RetryReporting` capability) is told about each retry
    before its wait; it may be set after construction, before the first call.
    """

    def __init__(
        self,
        inner: Storage,
        policy: StorageRetry = DEFAULT_RETRY,
        *,
        on_retry: RetryHook | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(inner)
        self.policy = policy
        self.on_retry = on_retry
        self._sleep, self._clock = sleep, clock
        self._rng = rng or random.Random()

    def _around(self, operation: str, fn: Callable[[], T]) -> T:
        backoff = self.policy.backoff
        started = self._clock()
        attempt = 0
        while True:
            try:
                return fn()
            except TransientStorageError as err:
                attempt += 1
                delay = backoff.delay(attempt, self._rng)
                spent = self._clock() - started
                if not backoff.allows(spent_s=spent, delay_s=delay):
                    raise TransientStorageError(
                        f"{operation} still failing after {attempt} attempts over {spent:.1f} s "
                        f"(retry budget {self.policy.budget_s:g} s): {err}"
                    ) from err
                if self.on_retry is not None:
                    self.on_retry(operation, attempt, delay, err)
                self._sleep(delay)
