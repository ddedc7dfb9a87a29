"""A batch job for tests/test_batch.py: ``spotsafe.batch.map`` over ``ITEMS`` numbers, killed or held where told.

Arguments: URL (``-``: ``$SPOTSAFE_CHECKPOINT_URL``) FORMAT. Environment:

- ``KILL_ITEM=n``: send this process ``KILL_SIGNAL`` (9 or 15) as the n-th item of this run is processed;
- ``KILL_WRITE=n``: SIGKILL at this run's n-th atomic write, before it when ``KILL_WHEN=before``, else just after
  it (between a part and its record, or after a record);
- ``HOLD_FILE=path``: at item 100 of a run, while ``path`` does not exist, write ``path.waiting`` and wait;
- ``PROGRESS_S``: ``spotsafe.batch.map``'s ``progress_s``;
- ``COMMIT_LOG=path``: append ``<pid> <record key>`` to ``path`` at each commit;
- ``RANK``, ``WORLD_SIZE``: this worker, as torchrun sets them.

The results are a deterministic function of the item.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time

import spotsafe.batch
from spotsafe.storage.registry import open_storage
from spotsafe.storage.wrapper import StorageWrapper

ITEMS, SHARD = 1400, 7


class LogCommits(StorageWrapper):
    """Appends ``<pid> <key>`` to ``path`` for every commit record written (one line, one write)."""

    def __init__(self, inner: object, path: str) -> None:
        super().__init__(inner)  # type: ignore[arg-type]
        self.path = path

    def write_atomic(self, key: str, data: bytes) -> None:
        super().write_atomic(key, data)
        if key.startswith("done/"):
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(f"{os.getpid()} {key}\n")


class KillAtWrite(StorageWrapper):
    def __init__(self, inner: object, at: int, before: bool) -> None:
        super().__init__(inner)  # type: ignore[arg-type]
        self.count, self.at, self.before = 0, at, before

    def write_atomic(self, key: str, data: bytes) -> None:
        self.count += 1
        if self.count == self.at and self.before:
            os.kill(os.getpid(), signal.SIGKILL)
        super().write_atomic(key, data)
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    url, fmt = sys.argv[1], sys.argv[2]
    url = os.environ["SPOTSAFE_CHECKPOINT_URL"] if url == "-" else url
    hold = os.environ.get("HOLD_FILE")
    storage = open_storage(url)
    if "COMMIT_LOG" in os.environ:
        storage = LogCommits(storage, os.environ["COMMIT_LOG"])
    if "KILL_WRITE" in os.environ:
        storage = KillAtWrite(storage, int(os.environ["KILL_WRITE"]), os.environ.get("KILL_WHEN") == "before")
    kill_item = int(os.environ.get("KILL_ITEM", "0"))
    kill_signal = int(os.environ.get("KILL_SIGNAL", "9"))
    seen = 0

    def score(item: int) -> dict[str, object]:
        nonlocal seen
        seen += 1
        if seen == kill_item:
            os.kill(os.getpid(), kill_signal)
        if seen == 100 and hold and not os.path.exists(hold):
            open(hold + ".waiting", "w").close()
            while not os.path.exists(hold):  # the test's driver creates it (the wait is the test's condition)
                time.sleep(0.01)
        digest = hashlib.sha256(str(item).encode()).hexdigest()
        return {"item": item, "digest": digest[:16], "square": item * item}

    progress_s = float(os.environ.get("PROGRESS_S", "1"))
    spotsafe.batch.map(score, list(range(ITEMS)), storage, shard_size=SHARD, format=fmt, progress_s=progress_s)


if __name__ == "__main__":
    main()
