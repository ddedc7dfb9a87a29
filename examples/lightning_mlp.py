"""A Lightning job that survives preemption: spotsafe's callback is the one added line (two with the early guard).

A tiny MLP with dropout, AdamW, StepLR, and a shuffled DataLoader with 2 worker processes, trained with
deterministic settings on the CPU. Stopped at any moment (a SIGTERM, an AWS/GCP/Azure preemption notice, a hard
kill), running the same command again resumes it, and it ends with the weights, optimizer, scheduler, Lightning's
loop progress, data position and RNG streams an uninterrupted run would have had, bit for bit:

    python examples/lightning_mlp.py --max-epochs 6                        # Ctrl-C it, run it again: it goes on
    spotsafe run -- python examples/lightning_mlp.py --max-epochs 6        # relaunched until done
    spotsafe drill --notice aws -- python examples/lightning_mlp.py --max-epochs 6   # a spot market, checked

The checkpoints go to ``$SPOTSAFE_CHECKPOINT_URL`` (set by ``spotsafe run`` and ``drill``), else ``--url``, else
``<default_root_dir>/spotsafe``. ``--no-spotsafe`` trains without the callback: same final weights.
``--devices 2 --strategy ddp`` trains data-parallel on 2 CPU processes (gloo); every rank stops at the same step.
"""

from __future__ import annotations

import spotsafe

spotsafe.protect_startup()  # before the slow imports: a stop that arrives during them is held, not fatal

import argparse  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from spotsafe.integrations.lightning import SpotsafeCallback  # noqa: E402


class MLP(L.LightningModule):
    def __init__(self, features: int = 16, hidden: int = 32, classes: int = 4, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Dropout(0.2), nn.Linear(hidden, classes),
        )  # fmt: skip

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.7)}


def dataset(samples: int, seed: int = 1234) -> TensorDataset:
    """A fixed classification problem: the label is which of 4 random directions the input is closest to."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 16, generator=g)
    y = (x @ torch.randn(16, 4, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--max-epochs", type=int, default=6)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    p.add_argument("--samples", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--persistent-workers", action="store_true")
    p.add_argument("--val-every", type=int, default=0, help="validate every N batches (0: no validation)")
    p.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    p.add_argument("--limit-batches", type=int, default=None, help="limit_train_batches: batches per epoch")
    p.add_argument("--save-every", type=int, default=20, help="a checkpoint every N steps (and on every notice)")
    p.add_argument("--keep", type=int, default=3, help="committed checkpoints to keep")
    p.add_argument("--url", default=None, help="where checkpoints go (default: $SPOTSAFE_CHECKPOINT_URL)")
    p.add_argument("--progress-interval", type=float, default=1.0, help="seconds between progress events")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--strategy", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-spotsafe", action="store_true", help="train without the callback (same final weights)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[L.Callback] = ()) -> MLP:
    """Train; return the model. ``callbacks`` come before spotsafe's (tests use it to hold at a step)."""
    args = parse(argv)
    L.seed_everything(args.seed, workers=True, verbose=False)
    model = MLP()
    persistent = args.persistent_workers and args.workers > 0
    train = DataLoader(
        dataset(args.samples), batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        persistent_workers=persistent,
    )  # fmt: skip
    val = None
    if args.val_every:
        val = DataLoader(dataset(args.batch_size * 2, seed=99), batch_size=args.batch_size, num_workers=args.workers)
    extra: list[L.Callback] = []
    if not args.no_spotsafe:
        policy = spotsafe.every(steps=args.save_every)
        extra.append(
            SpotsafeCallback(args.url, policy=policy, keep=args.keep, progress_interval=args.progress_interval)
        )
    trainer = L.Trainer(
        max_epochs=args.max_epochs, max_steps=args.max_steps, accelerator="cpu", devices=args.devices,
        strategy=args.strategy, deterministic=True, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, *extra],
        val_check_interval=args.val_every or None, check_val_every_n_epoch=None if args.val_every else 1,
        limit_val_batches=None if args.val_every else 0, num_sanity_val_steps=0 if not args.val_every else 2,
        accumulate_grad_batches=args.accumulate, limit_train_batches=args.limit_batches,
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    # Only a run that finished gets here: an interrupted one has exited with 75 inside fit(), checkpoint saved.
    if trainer.is_global_zero:
        print(f"finished: {trainer.global_step} steps, {trainer.current_epoch} epochs", flush=True)
    return model


if __name__ == "__main__":
    main(sys.argv[1:])
