"""spotsafe.batch benchmark: the bookkeeping per item against the same loop without it.

Run with ``make bench-batch`` (``.venv/bin/python bench/batch.py``). For two functions (``trivial``: builds a
small dict, a few microseconds, the worst case for relative overhead; ``hash``: about 0.1 ms of sha256 per
item, a cheap real task), in the same process, alternating rounds (``--rounds``, median) of:

- **plain loop**: ``rows = [fn(i) for i in items]`` written as one JSONL file, fsynced once at the end:
  the same work with no resumability;
- **spotsafe.batch.map**, JSONL, shards of 100 and of 1000 items (``notices="auto"``: SIGTERM handled and
  polled at every item, as in a real run), on local disk: each shard's part and commit record written
  atomically (write, fsync, rename), plus the event log.

Per item: wall time / items; overhead = the difference with the plain loop, in microseconds per item and as
a ratio. Results go into ``BENCHMARKS.md`` between the ``<!-- batch -->`` markers (``--out ''``: none).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from run import disk_description, machine, markdown, section, write_between

import spotsafe.batch

START = "<!-- batch: written by bench/batch.py -->"
END = "<!-- end of batch -->"


def trivial(item: int) -> dict[str, Any]:
    return {"item": item, "double": item * 2, "name": f"item-{item}"}


def hashed(item: int) -> dict[str, Any]:
    digest = str(item).encode()
    for _ in range(200):
        digest = hashlib.sha256(digest).digest()
    return {"item": item, "digest": digest.hex()}


def plain(fn: Callable[[int], Any], items: list[int], folder: Path) -> None:
    rows = [fn(i) for i in items]
    path = folder / "out.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, separators=(",", ":")) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def timed(run: Callable[[Path], None], root: Path) -> float:
    folder = Path(tempfile.mkdtemp(dir=root))
    try:
        start = time.perf_counter()
        run(folder)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trivial-items", type=int, default=20000)
    parser.add_argument("--hash-items", type=int, default=4000)
    parser.add_argument("--dir", default=None, help="scratch folder [default: a temporary folder]")
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "BENCHMARKS.md"))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="spotsafe-bench-batch-", dir=args.dir))
    console = Console()
    table = [["function", "items", "method", "s per round", "us per item", "overhead us/item", "vs plain loop"]]
    try:
        for name, fn, count in (("trivial", trivial, args.trivial_items), ("hash", hashed, args.hash_items)):
            items = list(range(count))
            methods: dict[str, Callable[[Path], None]] = {
                "plain loop": lambda f, fn=fn, items=items: plain(fn, items, f)
            }
            for shard in (100, 1000):
                methods[f"spotsafe.batch.map, shards of {shard}"] = lambda f, fn=fn, items=items, shard=shard: (
                    spotsafe.batch.map(fn, items, f, shard_size=shard)
                )
            times: dict[str, list[float]] = {m: [] for m in methods}
            for _ in range(args.rounds):
                for method, run in methods.items():
                    times[method].append(timed(run, root))
            base = statistics.median(times["plain loop"])
            for method, seconds in times.items():
                median = statistics.median(seconds)
                table.append(
                    [
                        name,
                        str(count),
                        method,
                        f"{median:.3f}",
                        f"{median / count * 1e6:.1f}",
                        f"{(median - base) / count * 1e6:.1f}",
                        f"{median / base:.2f}x",
                    ]
                )
                console.print(" | ".join(table[-1]))
        body = [
            f"Median of {args.rounds} rounds, in one process, methods alternating; {disk_description(root)}.",
            "",
            markdown(table),
            "",
        ]
        if args.out:
            text = section(START, END, machine(), body)
            write_between(Path(args.out), START, END, text, "## Batch jobs: bookkeeping per item\n\n")
            console.print(f"written to {args.out}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
