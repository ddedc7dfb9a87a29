"""The sharded path on an accelerator: FSDP2 on one GPU (NCCL), saved and restored through spotsafe.

Run on a machine with a CUDA GPU: ``.venv/bin/python bench/gpu_sharded.py`` (``--device cpu`` runs the same
checks on CPU with gloo, to test the script itself). One process forms a world of one rank (NCCL on
``cuda:0``), builds a model with ``fully_shard`` on the GPU, trains a few steps, and checks:

1. ``spotsafe.sharded.save``/``load`` of the model and AdamW state (``DTensor`` on the GPU): written from
   device memory, read back into a differently initialised model, every tensor bit-equal.
2. The same through ``Checkpointer(sharded=True)`` with a background save (DCP's async staging from the
   GPU): a run stopped at step 6 and resumed to step 12 ends bit-identical to one run straight to step 12,
   CUDA RNG streams included (dropout on the GPU).

It prints one line per check and the times, and exits 0 when every check passed, 1 when one failed, 2 when
no CUDA device is there (nothing was checked).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(device: str, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(512, 64)
    ).to(device)
    for layer in (model[0], model[3]):
        fully_shard(layer)
    fully_shard(model)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str) -> None:
    x = torch.randn(32, 256, device=device)  # the device's RNG stream
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def full(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optim": osd}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def check_api(root: Path, device: str) -> bool:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from spotsafe import sharded

    model, optimizer = build(device, 0)
    for _ in range(3):
        step(model, optimizer, device)
    msd, osd = get_state_dict(model, optimizer)
    started = time.perf_counter()
    sharded.save({"model": msd, "optim": osd}, str(root / "api"), step=3)
    saved_s = time.perf_counter() - started
    expected = full(model, optimizer)
    other, other_optimizer = build(device, 1)
    step(other, other_optimizer, device)
    msd2, osd2 = get_state_dict(other, other_optimizer)
    started = time.perf_counter()
    restored = sharded.load({"model": msd2, "optim": osd2}, str(root / "api"))
    loaded_s = time.perf_counter() - started
    assert restored is not None
    set_state_dict(
        other, other_optimizer, model_state_dict=restored.state["model"], optim_state_dict=restored.state["optim"]
    )
    ok = same(expected, full(other, other_optimizer))
    print(
        f"{'OK  ' if ok else 'FAIL'} sharded.save/load of FSDP2 state on {device}: "
        f"save {saved_s:.3f} s, load {loaded_s:.3f} s"
    )
    return ok


def train_with_checkpointer(url: str, device: str, steps: int) -> dict[str, Any]:
    import spotsafe

    model, optimizer = build(device, 0)
    ckpt = spotsafe.Checkpointer(
        url,
        model=model,
        optimizer=optimizer,
        sharded=True,
        policy=spotsafe.every(steps=4),
        notices=[],
        handle_signals=False,
    )
    ckpt.restore()
    while ckpt.step < steps:
        step(model, optimizer, device)
        ckpt.step_done()
    ckpt.finish()
    return full(model, optimizer)


def check_checkpointer(root: Path, device: str) -> bool:
    straight = train_with_checkpointer(str(root / "straight"), device, 12)
    train_with_checkpointer(str(root / "resumed"), device, 6)
    resumed = train_with_checkpointer(str(root / "resumed"), device, 12)
    ok = same(straight, resumed)
    print(
        f"{'OK  ' if ok else 'FAIL'} Checkpointer(sharded=True) stopped at 6 and resumed to 12 on {device}: "
        "bit-identical"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing was checked")
        return 2
    if args.device == "cuda":
        torch.cuda.set_device(0)
        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    torch.use_deterministic_algorithms(True)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("cpu:gloo,cuda:nccl" if args.device == "cuda" else "gloo")
    try:
        with tempfile.TemporaryDirectory(prefix="spotsafe-gpu-") as tmp:
            results = [check_api(Path(tmp), args.device), check_checkpointer(Path(tmp), args.device)]
    finally:
        dist.destroy_process_group()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
