"""spotsafe resume-skip benchmark: time to the first batch when a run resumes deep into an epoch.

Run with ``.venv/bin/python bench/resume_skip.py`` (``--skip 100000`` for a quick look). A map-style
dataset whose ``__getitem__`` decodes a small compressed tensor (1 KiB of float32, zlib) and counts its
reads; a shuffled DataLoader (``RandomSampler``, seeded) over it; a resume at sample 1,000,000 of the
epoch (batch 1,000,000 with batches of 1; batch 125,000 with batches of 8). Measured in this one process,
against each other and against a fresh epoch's first batch:

- **LoaderPosition**: ``load_state_dict()`` of a state that went through the checkpoint codec (its saved
  order included), then ``next(iter(loader))``: the loader serves the saved order from the position.
- **HF Trainer's skip**: ``accelerate.skip_first_batches(loader, n)``, what ``transformers.Trainer`` uses
  for ``resume_from_checkpoint`` mid-epoch: a ``SkipBatchSampler`` that runs the batch sampler through the
  ``n`` skipped batches (no data read), then ``next(iter(...))``.
- **iterate and discard**: ``next()`` ``n`` times, then once more (every skipped sample is read and
  collated: what a loop without index-level skipping pays).

Results go into ``BENCHMARKS.md`` between the ``<!-- resume-skip -->`` markers (``--out ''``: none).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset, RandomSampler

sys.path.insert(0, str(Path(__file__).parent))
from run import machine, markdown, section, write_between

from spotsafe.data import LoaderPosition
from spotsafe.state.codec import decode, encode

START = "<!-- resume-skip: written by bench/resume_skip.py -->"
END = "<!-- end of resume-skip -->"
TAIL = 64  # samples after the resume point, so that a batch follows it


class Encoded(Dataset[torch.Tensor]):
    """``n`` samples; reading one decompresses a 1 KiB float32 tensor (as decoding a stored record does)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = 0
        self.blob = zlib.compress(torch.linspace(0, 1, 256).numpy().tobytes())

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return torch.frombuffer(bytearray(zlib.decompress(self.blob)), dtype=torch.float32) + i


def make_loader(samples: int, batch_size: int) -> tuple[DataLoader[torch.Tensor], Encoded]:
    dataset = Encoded(samples)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler), dataset


def through_checkpoint(state: Any) -> tuple[Any, int]:
    """``state`` as a checkpoint saves it (tensors raw, the rest JSON) and the bytes that takes."""
    tensors: list[torch.Tensor] = []
    text = json.dumps(encode(state, tensors))
    size = len(text) + sum(t.numel() * t.element_size() for t in tensors)
    return (text, [t.clone() for t in tensors]), size


def saved_state(samples: int, batch_size: int, batches: int) -> tuple[Any, int]:
    """A LoaderPosition state at batch ``batches`` of epoch 0 (counted by hand: nothing is read to get there)."""
    loader, _ = make_loader(samples, batch_size)
    position = LoaderPosition(loader, count="manual")
    next(iter(loader))  # the epoch begins: its order is drawn and recorded
    position.consumed(batches)
    return through_checkpoint(position.state_dict())


def first_batch(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure(samples: int, batch_size: int, skip: int, repeats: int, console: Console) -> list[dict[str, Any]]:
    """Each way's best time to the first batch over ``repeats`` fresh loaders (iterate-and-discard: one run)."""
    batches = skip // batch_size
    total = skip + TAIL
    (text, tensors), size = saved_state(total, batch_size, batches)
    from accelerate import skip_first_batches

    def fresh(loader: DataLoader[torch.Tensor]) -> None:
        next(iter(loader))

    def recorded(loader: DataLoader[torch.Tensor]) -> None:
        LoaderPosition(loader)
        next(iter(loader))

    def resume(loader: DataLoader[torch.Tensor]) -> None:
        state = decode(json.loads(text), lambda i: tensors[i])
        LoaderPosition(loader).load_state_dict(state)
        next(iter(loader))

    def accelerate_skip(loader: DataLoader[torch.Tensor]) -> None:
        next(iter(skip_first_batches(loader, batches)))

    def discard(loader: DataLoader[torch.Tensor]) -> None:
        it = iter(loader)
        for _ in range(batches):
            next(it)
        next(it)

    ways: list[tuple[str, Callable[[DataLoader[torch.Tensor]], None], int, str]] = [
        ("fresh epoch, plain DataLoader (no resume)", fresh, repeats, ""),
        ("fresh epoch, with LoaderPosition (records the epoch's order)", recorded, repeats, ""),
        ("LoaderPosition resume", resume, repeats, f"(saved order: {size / 2**20:.1f} MiB)"),
        ("HF Trainer's skip (accelerate skip_first_batches)", accelerate_skip, repeats, ""),
        ("iterate and discard", discard, 1, ""),
    ]
    console.print(f"[bold]batches of {batch_size}[/]: resume at batch {batches:,} (sample {skip:,})")
    rows: list[dict[str, Any]] = []
    for method, way, times, note in ways:
        best, reads = float("inf"), 0
        for _ in range(times):
            loader, dataset = make_loader(total, batch_size)
            best = min(best, first_batch(lambda: way(loader)))  # noqa: B023 (called at once)
            reads = dataset.reads
        rows.append({"method": method, "seconds": best, "reads": reads, "note": note, "batch_size": batch_size})
        console.print(f"  {method}: {best * 1e3:.1f} ms, {reads:,} samples read {note}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", type=int, default=1_000_000, help="samples consumed before the resume")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=3, help="fresh loaders per way (the best time counts)")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write the results into ('' = none)")
    args = parser.parse_args()
    console = Console()
    torch.set_num_threads(1)
    results = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        results += measure(args.skip + TAIL, batch_size, args.skip, args.repeats, console)

    table = [["batch size", "how", "time to first batch", "samples read", "time vs LoaderPosition"]]
    for batch_size in sorted({r["batch_size"] for r in results}):
        group = [r for r in results if r["batch_size"] == batch_size]
        ours = next(r for r in group if r["method"] == "LoaderPosition resume")["seconds"]
        for r in group:
            seconds = r["seconds"]
            shown = f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"
            table.append(
                [
                    str(batch_size),
                    f"{r['method']} {r['note']}".strip(),
                    shown,
                    f"{r['reads']:,}",
                    f"{seconds / ours:.1f}x",
                ]
            )
    text = section(
        START,
        END,
        machine(),
        [
            f"Resume at sample {args.skip:,} of a shuffled epoch over a map-style dataset of {args.skip + TAIL:,} "
            "samples (each read decompresses a 1 KiB tensor), DataLoader in the main process; best of "
            f"{args.repeats} fresh loaders (iterate and discard: one run):",
            "",
            markdown(table),
            "",
        ],
    )
    print(text)
    if args.out:
        write_between(Path(args.out), START, END, text, heading="## Resuming deep into an epoch\n\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
