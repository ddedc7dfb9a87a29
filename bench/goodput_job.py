"""The example job (``examples/tiny_lm.py``'s model and data) under three ways of surviving preemption.

Used by ``bench/goodput.py``; run as ``python goodput_job.py MODE RUN_DIR STEPS SAVE_EVERY_S``:

- ``spotsafe``: ``spotsafe.Checkpointer`` with its defaults (signals and provider notices, its interval policy),
  ``restore()`` first; a stop exits 75 after the emergency save.
- ``brief``: the pattern of the product brief: ``torch.save`` of model, optimizer, scheduler, epoch and step every
  ``SAVE_EVERY_S`` seconds, and a SIGTERM handler that saves at once (``emergency.pt``) and raises ``SystemExit``.
- ``periodic``: the same ``torch.save`` every ``SAVE_EVERY_S`` seconds, and nothing on SIGTERM.

The two torch.save modes resume from the newer of their files that loads (a file cut by a kill does not). Their
data is a plain ``DataLoader``, shuffled with a seed per epoch; a resume mid-epoch reads and discards the epoch's
batches up to its position, the usual way. Each process appends ``start T``
to ``RUN_DIR/steps.log``, then each step its number and time; the end writes the final model and optimizer to
``RUN_DIR/final.pt``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

import spotsafe

HERE = Path(__file__).parent


def tiny_lm() -> Any:
    spec = importlib.util.spec_from_file_location("tiny_lm", HERE.parent / "examples" / "tiny_lm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    mode, run, steps, save_every_s = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    run.mkdir(parents=True, exist_ok=True)
    lm = tiny_lm()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    model = lm.TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lm.warmup_cosine(steps // 10, steps))
    data = lm.MarkovText(1024)
    loss_fn = torch.nn.CrossEntropyLoss()
    log = open(run / "steps.log", "a", buffering=1)  # noqa: SIM115 - open for the whole run
    log.write(f"start {time.monotonic()}\n")

    def train(batch: torch.Tensor) -> None:
        logits = model(batch[:, :-1])
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    per_epoch = len(data) // 16
    if mode == "spotsafe":
        loader = spotsafe.ResumableLoader(data, batch_size=16, shuffle=True, seed=7, drop_last=True)
        ckpt = spotsafe.Checkpointer(
            str(run / "ckpt"), model=model, optimizer=optimizer, scheduler=scheduler, loader=loader
        )
        ckpt.restore()
        while ckpt.step < steps:
            for batch in loader:
                train(batch)
                log.write(f"{ckpt.step + 1} {time.monotonic()}\n")  # before step_done(), which may stop here
                ckpt.step_done()
                if ckpt.step >= steps:
                    break
        ckpt.finish()
    else:
        step = resume(run, model, optimizer, scheduler)
        current = {"step": step}

        def save(path: Path) -> None:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": current["step"],
                },
                path,
            )

        if mode == "brief":

            def handle_interruption(signum: int, frame: Any) -> None:
                save(run / "emergency.pt")
                raise SystemExit("Spot interruption - checkpoint saved")

            signal.signal(signal.SIGTERM, handle_interruption)
        last_save = time.monotonic()
        while current["step"] < steps:
            epoch, skip = divmod(current["step"], per_epoch)
            order = torch.Generator().manual_seed(7 + epoch)
            loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, drop_last=True, generator=order)
            for i, batch in enumerate(loader):
                if i < skip:
                    continue  # the usual resume mid-epoch: read the epoch's batches up to the position, and discard
                train(batch)
                current["step"] += 1
                log.write(f"{current['step']} {time.monotonic()}\n")
                if time.monotonic() - last_save >= save_every_s:
                    save(run / "periodic.pt")
                    last_save = time.monotonic()
                if current["step"] >= steps:
                    break
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, run / "final.pt")
    os._exit(0)


def resume(run: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    """The newest of the job's torch.save files that loads; its step (0: none)."""
    found = []
    for name in ("periodic.pt", "emergency.pt"):
        try:
            found.append(torch.load(run / name, weights_only=True))
        except Exception:  # noqa: BLE001 - missing, or cut by a kill while it was written
            continue
    if not found:
        return 0
    newest = max(found, key=lambda c: c["step"])
    model.load_state_dict(newest["model"])
    optimizer.load_state_dict(newest["optimizer"])
    scheduler.load_state_dict(newest["scheduler"])
    return int(newest["step"])


if __name__ == "__main__":
    main()
