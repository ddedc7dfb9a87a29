"""The single-process checkpoint path on a GPU: stall, DCP async_save, restore to the device, CUDA RNG exactness.

Run on a machine with a CUDA GPU: ``make bench-gpu-save`` (or ``.venv/bin/python bench/gpu.py``; ``--device cpu``
runs the same steps here, to test the script itself). One process builds square linear layers and AdamW on the
device until the state reaches ``--size`` (1 GiB by default), and measures, each the best of ``--repeats``:

1. **floor**: the device-to-host copy of every state tensor into pinned buffers allocated beforehand;
2. **spotsafe stall**: ``Checkpointer.save()`` until it returns (pinned staging slots, prepared after the first
   step), first save and steady state (every byte changed between saves), against the floor;
3. **DCP async_save** with pinned memory (``DefaultStager`` with ``use_pinned_memory=True``, reused), until it
   returns, on the same state;
4. **restore to the device**: ``restore()`` into a model and optimizer on the device, against ``torch.load`` to
   the device + ``load_state_dict`` of the same state;
5. **CUDA RNG**: a run with dropout on the device, stopped after step 6, its model re-initialised and its RNG
   streams scrambled, restored and run to step 12, ends bit-identical to a run straight to step 12.

It prints one line per measure and per check, and exits 0 when every check passed, 1 when one failed, 2 when
no CUDA device is there (nothing was measured).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import spotsafe

MB = 2**20


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(device: str, nbytes: int, seed: int = 0, width: int = 2048) -> tuple[torch.nn.Sequential, torch.optim.AdamW]:
    """Square linear layers (and dropout) until the model + AdamW state reaches ``nbytes``; one step taken."""
    layers = max(1, math.ceil(nbytes / (3 * (width * width + width) * 4)))
    torch.manual_seed(seed)
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.Dropout(0.1)]
    model = torch.nn.Sequential(*blocks).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    train(model, optimizer, device)
    return model, optimizer


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str) -> None:
    x = torch.randn(16, 2048, device=device)  # the device's RNG stream, as dropout's
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for per_param in optimizer.state.values():
        out += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
    return out


def best(fn: Callable[[], float], repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def d2h_floor(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str, repeats: int) -> float:
    sources = tensors(model, optimizer)
    pinned = device.startswith("cuda")
    targets = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in sources]

    def once() -> float:
        sync(device)
        start = time.perf_counter()
        for source, target in zip(sources, targets, strict=True):
            target.copy_(source, non_blocking=pinned)
        sync(device)
        return time.perf_counter() - start

    return best(once, repeats)


def spotsafe_stalls(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str, root: Path, repeats: int
) -> tuple[float, float]:
    """(first save's stall, best steady-state stall); the first comes one step after the Checkpointer started."""
    ckpt = spotsafe.Checkpointer(
        str(root / "stall"), model=model, optimizer=optimizer, handle_signals=False, keep=1, staging_budget=None
    )
    train(model, optimizer, device)
    ckpt.step_done()  # from here the pinned slots are being prepared; the first save takes them
    stalls = []
    for _ in range(repeats + 1):
        with torch.no_grad():
            for t in tensors(model, optimizer):
                if t.is_floating_point():
                    t.add_(1e-3)
        sync(device)
        start = time.perf_counter()
        ckpt.save()
        stalls.append(time.perf_counter() - start)
        ckpt.wait()
    ckpt.close()
    return stalls[0], min(stalls[1:])


def dcp_async_pinned(model: torch.nn.Module, optimizer: torch.optim.Optimizer, root: Path, repeats: int) -> float:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    on_gpu = torch.cuda.is_available()  # pinned memory and non-blocking copies need the device
    # Staging done when async_save returns (as spotsafe's stall): training may then modify the state.
    options = StagingOptions(
        use_pinned_memory=on_gpu, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=on_gpu
    )
    stager = DefaultStager(options)
    stalls = []
    for i in range(repeats + 1):  # the first call allocates the stager's buffers
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
        start = time.perf_counter()
        future = dcp.async_save(state, checkpoint_id=str(root / f"dcp{i}"), no_dist=True, async_stager=stager)
        stalls.append(time.perf_counter() - start)
        (future.upload_completion if hasattr(future, "upload_completion") else future).result()
    stager.close()
    return min(stalls[1:])


def restores(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: str, root: Path, repeats: int, nbytes: int
) -> tuple[float, float, bool]:
    """(best restore(), best torch.load + load_state_dict, restored state bit-equal to the saved one)."""
    run = root / "restore"
    ckpt = spotsafe.Checkpointer(str(run), model=model, optimizer=optimizer, handle_signals=False)
    ckpt.save()
    ckpt.close()
    saved = [t.detach().to("cpu", copy=True) for t in tensors(model, optimizer)]
    path = root / "state.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    other_model, other_optimizer = build(device, nbytes, seed=1)
    spotsafe_s, torch_s = [], []
    for _ in range(repeats):
        again = spotsafe.Checkpointer(str(run), model=other_model, optimizer=other_optimizer, handle_signals=False)
        sync(device)
        start = time.perf_counter()
        again.restore()
        sync(device)
        spotsafe_s.append(time.perf_counter() - start)
        again.close()
        start = time.perf_counter()
        loaded = torch.load(path, map_location=device, weights_only=True)
        other_model.load_state_dict(loaded["model"])
        other_optimizer.load_state_dict(loaded["optimizer"])
        sync(device)
        torch_s.append(time.perf_counter() - start)
        del loaded
    again = spotsafe.Checkpointer(str(run), model=other_model, optimizer=other_optimizer, handle_signals=False)
    again.restore()
    again.close()
    same = all(
        torch.equal(a.to("cpu"), b) and a.device.type == torch.device(device).type
        for a, b in zip(tensors(other_model, other_optimizer), saved, strict=True)
    )
    return min(spotsafe_s), min(torch_s), same


def rng_exact(device: str, root: Path) -> bool:
    """Stopped after step 6 and resumed to 12 (a new model, scrambled RNG streams) == straight to 12."""

    def run(url: str, steps: int, seed: int) -> list[torch.Tensor]:
        model, optimizer = build(device, 1, seed=seed)
        ckpt = spotsafe.Checkpointer(url, model=model, optimizer=optimizer, handle_signals=False)
        ckpt.restore()
        while ckpt.step < steps:
            train(model, optimizer, device)
            ckpt.step_done()
        ckpt.save()
        ckpt.close()
        return [t.detach().to("cpu", copy=True) for t in tensors(model, optimizer)]

    torch.manual_seed(7)
    straight = run(str(root / "straight"), 12, seed=3)
    torch.manual_seed(7)
    run(str(root / "stopped"), 6, seed=3)
    torch.manual_seed(12345)  # every stream elsewhere: the restore must bring them back
    if device.startswith("cuda"):
        torch.cuda.manual_seed_all(12345)
    resumed = run(str(root / "stopped"), 12, seed=4)
    return all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="1GiB", help="model + AdamW state on the device")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing measured", file=sys.stderr)
        return 2
    from spotsafe.engine.staging import parse_budget

    nbytes = parse_budget(args.size) or 0
    model, optimizer = build(args.device, nbytes)
    total = sum(t.numel() * t.element_size() for t in tensors(model, optimizer))
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"state: {total / MB:.0f} MiB of model + AdamW on {args.device} ({where}); torch {torch.__version__}")
    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="spotsafe-gpu-") as tmp:
        root = Path(tmp)
        floor = d2h_floor(model, optimizer, args.device, args.repeats)
        print(f"floor: device-to-host copy into pinned buffers: {floor * 1000:.0f} ms ({total / floor / MB:.0f} MiB/s)")
        first, steady = spotsafe_stalls(model, optimizer, args.device, root, args.repeats)
        print(f"spotsafe stall, first save after one step: {first * 1000:.0f} ms = {first / floor:.2f}x floor")
        print(f"spotsafe stall, steady state: {steady * 1000:.0f} ms = {steady / floor:.2f}x floor")
        dcp_s = dcp_async_pinned(model, optimizer, root, args.repeats)
        print(f"DCP async_save (pinned, reused stager): {dcp_s * 1000:.0f} ms = {dcp_s / floor:.2f}x floor")
        restore_s, torch_s, checks["restore bit-equal, on the device"] = restores(
            model, optimizer, args.device, root, args.repeats, nbytes
        )
        print(
            f"restore() to the device: {restore_s * 1000:.0f} ms; torch.load + load_state_dict: {torch_s * 1000:.0f} ms"
        )
        checks["CUDA RNG: stopped and resumed == uninterrupted"] = rng_exact(args.device, root)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
