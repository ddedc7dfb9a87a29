"""A storage that wraps another: every protocol method goes through one hook, ``_around``.

:class:`StorageWrapper` is the one place where the :class:`~spotsafe.storage.base.Storage`
methods are forwarded to ``inner``, each with its operation's name for messages
(``"write <key>"``, ``"read <key>"``, ``"stat <key>"``, ``"list <prefix>"``,
``"delete <key>"``, ``"sync <prefix>"``). A subclass overrides ``_around`` (retries,
injected faults) or single methods (latency on writes). Wrappers satisfy the
:class:`~spotsafe.storage.base.Wrapping` protocol, so callers find the optional
capabilities underneath with :func:`~spotsafe.storage.base.local_paths` and its siblings, not with
attribute reach-throughs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from spotsafe.storage.base import ChunkSource, ReadProgress, Storage, read_views, read_views_by_copy

T = TypeVar("T")


class StorageWrapper:
    """Forwards every :class:`Storage` method to ``inner`` through :meth:`_around`.

    Thread safety and durability are ``inner``'s; the wrapper adds only what its ``_around`` does.
    """

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    @property
    def url(self) -> str:
        return self.inner.url

    def _around(self, operation: str, fn: Callable[[], T]) -> T:
        """Run one call to ``inner`` (``operation`` names it for messages); the default just calls it."""
        return fn()

    def write_stream(self, key: str, source: ChunkSource) -> int:
        return self._around(f"write {key}", lambda: self.inner.write_stream(key, source))

    def write_atomic(self, key: str, data: bytes) -> None:
        self._around(f"write {key}", lambda: self.inner.write_atomic(key, data))

    def read(self, key: str) -> bytes:
        return self._around(f"read {key}", lambda: self.inner.read(key))

    def read_into(
        self, key: str, buffer: bytearray | memoryview, progress: ReadProgress | None = None, *, offset: int = 0
    ) -> int:
        if offset == 0:  # as any Storage can, also one written before ranged reads
            return self._around(f"read {key}", lambda: self.inner.read_into(key, buffer, progress))
        return self._around(f"read {key}", lambda: self.inner.read_into(key, buffer, progress, offset=offset))

    def read_into_views(self, key: str, views: Sequence[memoryview], *, offset: int = 0) -> int:
        if type(self).read_into is not StorageWrapper.read_into:  # a subclass that reads its own way sees every read
            return read_views_by_copy(self, key, views, offset)
        return self._around(f"read {key}", lambda: read_views(self.inner, key, views, offset))

    def size(self, key: str) -> int:
        return self._around(f"stat {key}", lambda: self.inner.size(key))

    def exists(self, key: str) -> bool:
        return self._around(f"stat {key}", lambda: self.inner.exists(key))

    def list_dirs(self, prefix: str) -> list[str]:
        return self._around(f"list {prefix}", lambda: self.inner.list_dirs(prefix))

    def list_files(self, prefix: str) -> list[str]:
        return self._around(f"list {prefix}", lambda: self.inner.list_files(prefix))

    def find(self, prefix: str) -> list[str]:
        return self._around(f"list {prefix}", lambda: self.inner.find(prefix))

    def delete(self, key: str) -> None:
        self._around(f"delete {key}", lambda: self.inner.delete(key))

    def delete_prefix(self, prefix: str) -> None:
        self._around(f"delete {prefix}", lambda: self.inner.delete_prefix(prefix))

    def sync_prefix(self, prefix: str) -> None:
        self._around(f"sync {prefix}", lambda: self.inner.sync_prefix(prefix))
