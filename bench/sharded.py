"""spotsafe sharded-save benchmark: 2 ranks, FSDP2 state, against torch.distributed.checkpoint itself.

Run with ``make bench-sharded`` (``.venv/bin/python bench/sharded.py``; ``--mib 32`` for a quick look). It
starts 2 ranks (gloo on CPU, this machine) that build the same FSDP2 model (``fully_shard`` per layer;
parameters and AdamW state are ``DTensor`` shards, about ``--mib`` MiB in all), train one step, and then
measure, in the same processes, alternating rounds (``--rounds``) of:

- **spotsafe sharded.save**: one checkpoint for both ranks (``r<rank>.distcp`` per rank, checksummed, one
  manifest committed by rank 0), blocking. Stall = time to durable.
- **spotsafe sharded.save, blocking=False**: stall = until it returns (DCP copied the tensors), then
  time to durable = until ``wait()`` returns.
- **dcp.save** with ``FileSystemWriter`` (its default: fsync on): the baseline.
- **dcp.async_save** with ``FileSystemWriter``: stall, then time to durable.
- **restore**: ``spotsafe.sharded.load`` and ``dcp.load`` (``FileSystemReader``) of what was just saved.

Each figure is the slower rank's time (every rank waits for the slowest), median over the rounds.
Incremental sharing is off (``incremental=False``): every save writes every byte, as DCP does. Results go
into ``BENCHMARKS.md`` between the ``<!-- sharded -->`` markers (``--out ''``: none).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
from run import disk_description, machine, markdown, section, write_between

START = "<!-- sharded: written by bench/sharded.py -->"
END = "<!-- end of sharded -->"
MiB = 2**20


def build(mib: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    width = 1024
    layers = max(1, round(mib * MiB / 3 / (width * width * 4)))  # parameters + AdamW's two moments
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def slowest(seconds: float) -> float:
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value[0])


def timed(fn: Any) -> tuple[float, Any]:
    dist.barrier()
    start = time.perf_counter()
    result = fn()
    return slowest(time.perf_counter() - start), result


def one_round(root: Path, state: dict[str, Any], rank: int, add: Any) -> None:
    import torch.distributed.checkpoint as dcp

    from spotsafe import sharded

    url, url_async, folder, folder_async = (str(root / name) for name in ("s", "s-async", "dcp", "dcp-async"))
    t, _ = timed(lambda: sharded.save(state, url, step=1, keep=1, incremental=False))
    add("spotsafe save: stall", t)
    add("spotsafe save: durable", t)
    t, _ = timed(lambda: sharded.load(state, url))
    add("spotsafe load", t)

    start = time.perf_counter()
    t, handle = timed(lambda: sharded.save(state, url_async, step=1, keep=1, incremental=False, blocking=False))
    add("spotsafe async: stall", t)
    handle.wait()
    add("spotsafe async: durable", slowest(time.perf_counter() - start))

    t, _ = timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(folder)))
    add("dcp.save: stall", t)
    add("dcp.save: durable", t)
    t, _ = timed(lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(folder)))
    add("dcp.load", t)

    start = time.perf_counter()
    t, future = timed(lambda: dcp.async_save(state, storage_writer=dcp.FileSystemWriter(folder_async)))
    add("dcp.async_save: stall", t)
    future.result()
    add("dcp.async_save: durable", slowest(time.perf_counter() - start))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)


def worker(options: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = Path(options["root"])
    model, optimizer = build(options["mib"])
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    local_bytes = sum(
        t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes
        for t in [*msd.values(), *(v for s in osd["state"].values() for v in s.values())]
    )
    rows: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    for round_ in range(options["rounds"]):
        one_round(root / f"round-{round_}", state, rank, add)
    if rank == 0:
        medians = {name: statistics.median(values) for name, values in rows.items()}
        (root / "result.json").write_text(json.dumps({"medians": medians, "local_bytes": local_bytes}))
    dist.barrier()
    dist.destroy_process_group()


def launch(options: dict[str, Any]) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(options)], env={**env, "RANK": str(r)})
        for r in range(2)
    ]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a rank failed: exit codes {codes}")
    result: dict[str, Any] = json.loads((Path(options["root"]) / "result.json").read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="state size in MiB (parameters and AdamW state)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder on the disk)")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(json.loads(args.worker))
        return
    root = Path(tempfile.mkdtemp(prefix="spotsafe-bench-sharded-", dir=args.dir))
    try:
        result = launch({"root": str(root), "mib": args.mib, "rounds": args.rounds})
        disk = disk_description(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    m = result["medians"]
    base_save, base_load = m["dcp.save: durable"], m["dcp.load"]
    rows = [
        ["spotsafe sharded.save", m["spotsafe save: stall"], m["spotsafe save: durable"], m["spotsafe load"]],
        ["spotsafe sharded.save(blocking=False)", m["spotsafe async: stall"], m["spotsafe async: durable"], None],
        ["dcp.save (FileSystemWriter)", m["dcp.save: stall"], m["dcp.save: durable"], m["dcp.load"]],
        ["dcp.async_save (FileSystemWriter)", m["dcp.async_save: stall"], m["dcp.async_save: durable"], None],
    ]
    table = [["method", "stall s", "durable s", "durable / dcp.save", "restore s", "restore / dcp.load"]]
    for name, stall, durable, restore in rows:
        table.append(
            [
                name,
                f"{stall:.3f}",
                f"{durable:.3f}",
                f"{durable / base_save:.2f}x",
                "" if restore is None else f"{restore:.3f}",
                "" if restore is None else f"{restore / base_load:.2f}x",
            ]
        )
    state_mib = result["local_bytes"] * 2 / MiB
    body = [
        f"2 ranks (gloo, CPU), FSDP2 state of {state_mib:.0f} MiB in all ({state_mib / 2:.0f} MiB per rank), "
        f"median of {args.rounds} rounds, each figure the slower rank's. {disk}.",
        "",
        markdown(table),
        "",
    ]
    Console().print("\n".join(body))
    if args.out:
        text = section(START, END, machine(), body)
        write_between(Path(args.out), START, END, text, "## Sharded saves (2 ranks)\n\n")


if __name__ == "__main__":
    main()
