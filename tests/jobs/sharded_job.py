"""A data-parallel job with Checkpointer(sharded=True), for tests/test_sharded_checkpointer.py.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (gloo, CPU). Arguments (JSON): ``url``, ``out``,
``kind`` (``fsdp``: FSDP2 ``fully_shard``; ``ddp``), ``steps`` (train until the run's step count reaches it,
then ``finish()``), ``launch`` (a label for the files written), ``signals`` (stop on SIGTERM),
``pause_at`` (at that step, write ``<out>/paused-<rank>`` and wait for ``<out>/go``). The data is an
ElasticLoader over sample ids; each rank writes the ids it trained on to ``<out>/ids-<launch>-<rank>.json``,
and rank 0 the gathered final state to ``<out>/final-<launch>.pt`` and what it restored to
``<out>/restored-<launch>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ids import Ids  # this script's folder is on sys.path
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import spotsafe


def main() -> None:
    options: dict[str, Any] = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(options["out"])
    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 3))
    if options["kind"] == "fsdp":
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=1000)
    loader = spotsafe.ElasticLoader(Ids(48), batch_size=2, seed=3)
    ckpt = spotsafe.Checkpointer(
        options["url"],
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        sharded=True,
        policy=spotsafe.every(steps=3),
        keep=2,
        notices="auto" if options.get("signals") else [],
        handle_signals=bool(options.get("signals")),
    )
    start = ckpt.restore()
    seen: list[int] = []
    while ckpt.step < options["steps"]:
        for batch in loader:
            seen += batch.tolist()
            x = torch.stack([torch.arange(8, dtype=torch.float32) * (i + 1) / 48 for i in batch.tolist()])
            loss = model(x).square().mean() + 0.01 * torch.rand(()).item()  # the RNG streams matter
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            ckpt.step_done()
            if ckpt.step == options.get("pause_at"):  # the test sends its signal while every rank waits here
                (out / f"paused-{rank}").touch()
                while not (out / "go").exists():
                    time.sleep(0.05)
            if ckpt.step >= options["steps"]:
                break
    ckpt.finish()
    (out / f"ids-{options['launch']}-{rank}.json").write_text(json.dumps(seen))
    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save(
            {"model": msd, "optim": osd, "scheduler": scheduler.state_dict()}, out / f"final-{options['launch']}.pt"
        )
        (out / f"restored-{options['launch']}.json").write_text(json.dumps({"step": start, "world": world}))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
