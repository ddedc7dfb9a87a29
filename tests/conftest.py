"""Shared fixtures: a small deterministic training job to checkpoint in-process."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spotsafe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_lm.py"


class Noisy(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed features plus random noise drawn at fetch time (an augmentation)."""

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.01 * torch.randn(6), self.y[i]


@dataclass
class Job:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: spotsafe.ResumableLoader
    ckpt: spotsafe.Checkpointer

    def train(self, until: int, on_step: Callable[[int], None] | None = None) -> None:
        """Train until ``ckpt.step == until`` (the loop a user writes)."""
        while self.ckpt.step < until:
            for x, y in self.loader:
                loss = nn.functional.mse_loss(self.model(x), y)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                if on_step is not None:
                    on_step(self.ckpt.step + 1)
                self.ckpt.step_done()
                if self.ckpt.step >= until:
                    break


def make_job(run_dir: Path | str, **checkpointer_kwargs: Any) -> Job:
    """A fresh model/optimizer/scheduler/loader (same init every time) and a Checkpointer on ``run_dir``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, 50) / 50)))
    loader = spotsafe.ResumableLoader(Noisy(), batch_size=8, shuffle=True, seed=1)
    kwargs: dict[str, Any] = {"policy": spotsafe.every(steps=7), "handle_signals": False, "progress_interval": 0}
    kwargs.update(checkpointer_kwargs)
    ckpt = spotsafe.Checkpointer(
        str(run_dir), model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, **kwargs
    )
    return Job(model, optimizer, scheduler, loader, ckpt)


@pytest.fixture
def job_factory() -> Callable[..., Job]:
    return make_job


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(autouse=True)
def _no_inherited_run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SPOTSAFE_"):
            monkeypatch.delenv(key)
