"""The few collectives a sharded save or load needs besides DCP's own, on a gloo group.

Small Python objects (a checkpoint's name, each rank's verdict on a candidate, the blobs a rank wrote)
travel with ``*_object`` collectives, which need a CPU backend: with an NCCL training group, a gloo group
over the same ranks is created once (collectively, the first time) and reused. Without torch.distributed,
one process is its own group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_GLOO: dict[int, Any] = {}


class Group:
    """``process_group`` (``None``: the default group) as seen by one of its ranks."""

    def __init__(self, process_group: Any = None) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.dcp_group = process_group
        if not self.active:
            self.rank, self.world_size, self._gloo = 0, 1, None
            return
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        if dist.get_backend(process_group) == "gloo":
            self._gloo = process_group
        else:
            key = id(process_group)
            if key not in _GLOO:
                _GLOO[key] = dist.new_group(
                    ranks=dist.get_process_group_ranks(process_group) if process_group else None, backend="gloo"
                )
            self._gloo = _GLOO[key]
        self._root = 0 if process_group is None else dist.get_global_rank(process_group, 0)

    def background_group(self) -> Any:
        """A gloo group of these ranks for DCP's background saves, apart from the training's own
        collectives and from this group's (created collectively on first use, then reused)."""
        if not self.active:
            return None
        key = -1 - id(self.dcp_group)
        if key not in _GLOO:
            ranks = None if self.dcp_group is None else dist.get_process_group_ranks(self.dcp_group)
            _GLOO[key] = dist.new_group(ranks=ranks, backend="gloo")
        return _GLOO[key]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if not self.active or self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self._gloo)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every rank."""
        if not self.active or self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=self._root, group=self._gloo)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        if not self.active or self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self._gloo)
        return bool(value[0] > 0)


__all__ = ["Group"]
