"""One rank of a sharded save or load (spotsafe.sharded), started by tests/test_sharded.py.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (gloo on CPU). Arguments: a mode and a JSON
document of options. Modes:

* ``save``: build the model (``ddp``: DistributedDataParallel; ``fsdp``: FSDP2 ``fully_shard``; ``plain``:
  replicated tensors without a wrapper), train ``steps`` steps on this rank's own batches, save the
  model, the optimizer (AdamW) and a scheduler through ``spotsafe.sharded.save`` with this rank's RNG
  state as its ``rank_state``, and (rank 0) write the full state, gathered, to ``<out>/saved.pt``.
* ``load``: build the same model differently initialised, load through ``spotsafe.sharded.load``, and
  (rank 0) write the full state, gathered, to ``<out>/loaded.pt``; every rank writes what it restored
  (step, world size, whether it got a rank state and whose) to ``<out>/rank-<r>.json``.

With ``kinds`` (a list) instead of ``kind``, one launch does each kind in turn, under ``<url>/<kind>`` and
``<out>/<kind>``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ids import Ids  # this script's folder is on sys.path
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from spotsafe import sharded
from spotsafe.data.elastic import ElasticLoader
from spotsafe.errors import PermanentStorageError
from spotsafe.storage.base import ChunkSource
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.wrapper import StorageWrapper


class FailingBlobs(StorageWrapper):
    """Fails every write of this rank's DCP blob (a permanent error, as a full or read-only store gives)."""

    def write_stream(self, key: str, source: ChunkSource) -> int:
        if key.endswith(".distcp"):
            raise PermanentStorageError(f"{key}: injected failure")
        return self.inner.write_stream(key, source)


def build(kind: str, seed: int, freeze: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6), torch.nn.Linear(6, 5, bias=False)
    )
    if freeze:  # a frozen first layer: its chunks never change, an incremental save shares them
        model[0].requires_grad_(False)
    if kind == "fsdp":
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    elif kind == "ddp":
        model = DistributedDataParallel(model) if dist.get_world_size() > 1 else model
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-2, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=100)
    return model, optimizer, scheduler


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, steps: int, rank: int) -> None:
    data = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=data)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=options)
    return {"model": msd, "optim": osd}


def elastic(options: dict[str, Any], rank: int, out: Path) -> None:
    """Resume (if there is a checkpoint) at this world size, train ``batches`` DDP steps (``None``: to the end
    of the epoch) on ElasticLoader batches, log the sample ids served to this rank, save."""
    model, optimizer, _ = build("ddp", seed=0)
    loader = ElasticLoader(Ids(options["n"]), batch_size=2, seed=1)
    msd, osd = get_state_dict(model, optimizer)
    template = {"model": msd, "optim": osd, "loader": loader.state_dict()}
    restored = sharded.load(template, options["url"])
    step = 0
    if restored is not None:
        set_state_dict(
            model, optimizer, model_state_dict=restored.state["model"], optim_state_dict=restored.state["optim"]
        )
        loader.load_state_dict(restored.state["loader"])
        step = restored.step
    seen: list[int] = []
    for batch in loader:
        seen += batch.tolist()
        x = batch.float().unsqueeze(1).expand(-1, 8) / options["n"]
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        step += 1
        if options["batches"] is not None and len(seen) >= options["batches"] * 2:
            break
    (out / f"ids-{options['launch']}-{rank}.json").write_text(json.dumps(seen))
    msd, osd = get_state_dict(model, optimizer)
    sharded.save({"model": msd, "optim": osd, "loader": loader.state_dict()}, options["url"], step=step)


def one(mode: str, options: dict[str, Any], rank: int, out: Path) -> None:
    """Save or load one model kind (see the module docstring)."""
    freeze = options.get("freeze", False)
    model, optimizer, scheduler = build(options["kind"], seed=0 if mode == "save" else 1 + rank, freeze=freeze)
    target: Any = options["url"]
    if options.get("fail_rank") == rank:
        target = FailingBlobs(LocalStorage(target))
    msd, osd = get_state_dict(model, optimizer)
    if mode == "save":
        for round_ in range(options.get("rounds", 1)):
            train(model, optimizer, scheduler, options["steps"], rank)
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd, "scheduler": scheduler.state_dict()}
            if options.get("diverge"):  # a value that differs between ranks, wrongly in the global state
                state["seen_by"] = rank
            rng = torch.Generator().manual_seed(1000 + rank)
            if options.get("async"):
                at_save = copy.deepcopy(full_state(model, optimizer))  # plain CPU tensors come back live
            try:
                ref = sharded.save(
                    state,
                    target,
                    step=options["steps"] * (round_ + 1),
                    rank_state={"rank": rank, "rng": rng.get_state()},
                    keep=options.get("keep", 3),
                    incremental=options.get("incremental", True),
                    blocking=not options.get("async", False),
                )
                if isinstance(ref, sharded.SaveInFlight):  # train on while it is written, then wait
                    scheduler_at_save = copy.deepcopy(scheduler.state_dict())
                    train(model, optimizer, scheduler, 2, rank)
                    ref = ref.wait()
            except BaseException as err:  # noqa: BLE001 - reported to the test
                (out / f"error-{rank}.txt").write_text(f"{type(err).__name__}: {err}")
                dist.barrier()
                dist.destroy_process_group()
                os._exit(3)
        full = full_state(model, optimizer)
        if options.get("async"):  # what the checkpoint must hold: the state when save() was called
            full = {**at_save, "scheduler": scheduler_at_save}
        if rank == 0:
            torch.save({"scheduler": scheduler.state_dict(), **full, "checkpoint": ref.name}, out / "saved.pt")
    else:
        template = {"model": msd, "optim": osd, "scheduler": scheduler.state_dict()}
        restored = sharded.load(template, options["url"])
        assert restored is not None, "nothing to load"
        set_state_dict(
            model, optimizer, model_state_dict=restored.state["model"], optim_state_dict=restored.state["optim"]
        )
        scheduler.load_state_dict(restored.state["scheduler"])
        full = full_state(model, optimizer)
        if rank == 0:
            torch.save(
                {**full, "scheduler": scheduler.state_dict(), "checkpoint": restored.ref.name}, out / "loaded.pt"
            )
        got = restored.rank_state
        report = {
            "step": restored.step,
            "world_size": restored.world_size,
            "checkpoint": restored.ref.name,
            "rank_state_of": None if got is None else got["rank"],
            "rng_equal": None
            if got is None
            else torch.equal(got["rng"], torch.Generator().manual_seed(1000 + rank).get_state()),
        }
        (out / f"rank-{rank}.json").write_text(json.dumps(report))


def main() -> None:
    mode, options = sys.argv[1], json.loads(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(options["out"])
    if mode == "elastic":
        elastic(options, rank, out)
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)
    for kind in options.get("kinds", [options.get("kind")]):
        if "kinds" in options:  # one launch for several models: each in its own location and output folder
            mine = {**options, "kind": kind, "url": f"{options['url']}/{kind}", "out": str(out / kind)}
            Path(mine["out"]).mkdir(parents=True, exist_ok=True)
        else:
            mine = options
        one(mode, mine, rank, Path(mine["out"]))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
