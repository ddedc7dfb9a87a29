"""A sharded save written in the background (``spotsafe.sharded.save(blocking=False)``)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from spotsafe.storage.repository import CheckpointRef


class SaveInFlight:
    """A save written in the background (``save(blocking=False)``); ``ref`` is its checkpoint's name."""

    def __init__(self, ref: CheckpointRef, future: Future[Any], after: Callable[[bool], None]) -> None:
        self.ref = ref
        self._future = future
        self._after = after
        self._settled = False

    def done(self) -> bool:
        """Whether it has ended (committed or failed)."""
        return self._future.done()

    def add_done_callback(self, fn: Callable[[SaveInFlight], object]) -> None:
        """Call ``fn(self)`` when it ends (on the thread that ends it, or now if it has)."""
        self._future.add_done_callback(lambda _: fn(self))

    def wait(self, timeout: float | None = None) -> CheckpointRef:
        """Block until it is committed; raise its error if it failed (on every rank)."""
        try:
            self._future.result(timeout)
        finally:
            if self._future.done() and not self._settled:
                self._settled = True
                self._after(self._future.exception() is None)
        return self.ref

    def settle(self) -> None:
        """Wait, raising its error only if nobody has seen it yet."""
        seen = self._settled
        try:
            self.wait()
        except BaseException:
            if not seen:
                raise


__all__ = ["SaveInFlight"]
