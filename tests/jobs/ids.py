"""A dataset whose sample is its own index: which samples a loader served is what it yields."""

from __future__ import annotations

import torch


class Ids(torch.utils.data.Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index
