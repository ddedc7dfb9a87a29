"""Ranks that decide together: one small collective per step boundary (torch.distributed).

Every rank watches its own notice sources and gets a notice at its own moment
(a metadata poll a few seconds apart, a signal to one process). At each step
boundary all ranks exchange four numbers with one ``all_reduce(MAX)`` on a gloo
group: *stop*, *warning*, *save due* and the earliest deadline. Every rank then
acts on the same answer at the same step: all stop (and save) at that step, all
take the interval save a wall-clock policy asked for on any rank.

Restores agree too: each rank lists its committed steps, the newest step that
every rank has is loaded, and if any rank finds its copy damaged, the ranks go
on to the next common step together.

Call sequence: construct on every rank after ``init_process_group`` (it may
create a gloo group, which is itself collective), then call :meth:`exchange`
once per step on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Decision:
    stop: bool
    warning: bool
    save: bool
    deadline: float | None


def rank_url(url: str, rank: int) -> str:
    """Where one rank's checkpoints live: ``<url>/rank-<r>`` (each rank saves its own state)."""
    return f"{url.rstrip('/')}/rank-{rank:05d}"


def active(group: Any = None) -> bool:
    """Whether torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class Agreement:
    """Step-boundary decisions shared by all ranks of ``group`` (default: the world)."""

    def __init__(self, group: Any = None) -> None:
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # CPU tensors and no device sync: a gloo group, also when training uses NCCL.
        self.group = group if dist.get_backend(group) == "gloo" else dist.new_group(backend="gloo")
        self.exchanges = 0

    def exchange(self, *, stop: bool, warning: bool, save: bool, deadline: float | None) -> Decision:
        """One all-reduce: any rank's stop/warning/save counts for all; the earliest deadline wins."""
        values = torch.tensor(
            [float(stop), float(warning), float(save), -deadline if deadline is not None else -math.inf],
            dtype=torch.float64,
        )
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        self.exchanges += 1
        earliest = -float(values[3])
        return Decision(
            stop=bool(values[0] > 0),
            warning=bool(values[1] > 0),
            save=bool(values[2] > 0),
            deadline=earliest if math.isfinite(earliest) else None,
        )

    def common_steps(self, steps: list[int]) -> list[int]:
        """The steps every rank has, newest first."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, sorted(set(steps)), group=self.group)
        common = set(gathered[0])
        for other in gathered[1:]:
            common &= set(other)
        return sorted(common, reverse=True)

    def all_true(self, flag: bool) -> bool:
        value = torch.tensor([float(flag)], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value[0] > 0)
