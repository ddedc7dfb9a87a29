"""The README's "Accelerate without Trainer" loop, as a job the tests stop and resume.

    python accelerate_job.py RUN_DIR FINAL.pt [--hold STEP] [--epochs N]

An MLP with Dropout, AdamW and a LambdaLR warm-up, prepared by ``accelerate.Accelerator`` (one CPU process); the
DataLoader (shuffled, 2 workers, a random augmentation per sample) is not prepared: spotsafe makes it resumable
in place. ``--hold STEP``: a run that starts from scratch holds after step STEP (writing ``RUN_DIR.holding``)
until a stop signal comes; it then trains one more step, saves there and exits 75. At the end the model's and
optimizer's state go to FINAL.pt.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import spotsafe

spotsafe.protect_startup()

import torch  # noqa: E402  (after protect_startup: a stop during these imports is held)
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402


class Noisy(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed features and labels; each read adds noise seeded by the sample's index (exact after a resume)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 8, generator=g)
        self.y = (self.x.sum(dim=1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(8, generator=torch.Generator().manual_seed(1000 + i)) * 0.01
        return self.x[i] + noise, self.y[i]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("final")
    parser.add_argument("--hold", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loader = DataLoader(Noisy(96), batch_size=8, shuffle=True, num_workers=2)  # 12 batches an epoch; not prepared
    ckpt = spotsafe.Checkpointer(
        args.run_dir,
        model=accelerator.unwrap_model(model),
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        policy=spotsafe.every(steps=5),
        progress_interval=0,
    )
    hold = args.hold if ckpt.restore() == 0 else None
    for _ in range(ckpt.epoch, args.epochs):
        for x, y in loader:
            x, y = x.to(accelerator.device), y.to(accelerator.device)
            accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            ckpt.step_done()  # on a stop notice: the emergency save, then exit 75
            if hold is not None and ckpt.step == hold:
                Path(f"{args.run_dir}.holding").write_text(str(ckpt.step))
                while not ckpt.stop_requested:  # until the stop signal; the next step_done() saves and exits 75
                    time.sleep(0.01)
    ckpt.finish()
    unwrapped = accelerator.unwrap_model(model)
    torch.save({"model": unwrapped.state_dict(), "optimizer": optimizer.state_dict()}, args.final)


if __name__ == "__main__":
    main()
