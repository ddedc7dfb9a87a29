"""Checksumming a blob while it is being read, so verifying costs no second pass over memory."""

from __future__ import annotations

import threading

from spotsafe.storage.manifest import new_hasher


class HashAsRead:
    """Checksums a buffer while it is being read into, on a helper thread (xxhash releases the GIL).

    ``progress(n)`` says the first ``n`` bytes are in; :meth:`finish` returns the digest of
    the whole buffer. A read that starts again (a retry reports a smaller ``n``) may have
    overwritten hashed bytes, so the buffer is then hashed again from the start: the digest
    is always of the bytes the buffer holds when :meth:`finish` returns.
    """

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._filled = 0
        self._restarted = False
        self._done = False
        self._hasher = new_hasher()
        self._hashed = 0
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="spotsafe-verify", daemon=True)
        self._thread.start()

    def progress(self, n: int) -> None:
        with self._cond:
            if n < self._filled:
                self._restarted = True
            self._filled = max(self._filled, n)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._filled <= self._hashed and not self._done:
                    self._cond.wait()
                end, done = self._filled, self._done
            if end > self._hashed:
                self._hasher.update(self._view[self._hashed : end])
                self._hashed = end
            elif done:
                return

    def finish(self) -> str:
        """Wait for the helper; the digest of everything in the buffer."""
        with self._cond:
            self._done = True
            self._cond.notify()
        self._thread.join()
        if self._restarted or self._hashed != len(self._view):
            hasher = new_hasher()
            hasher.update(self._view)
            return str(hasher.hexdigest())
        return str(self._hasher.hexdigest())
