"""Ranks that decide together: one small collective every half second or so (torch.distributed).

Every rank watches its own notice sources and gets a notice at its own moment
(a metadata poll a few seconds apart, a signal to one process). At agreed step
boundaries all ranks exchange five numbers with one ``all_reduce(MAX)`` on a
gloo group: *stop*, *warning*, *save due*, the earliest deadline, and the
slowest rank's seconds per step. Every rank then acts on the same answer at the
same step: all stop (and save) at that step, all take the interval save a
wall-clock policy asked for on any rank.

Two things keep it cheap. The exchange is pipelined: the all-reduce posted at
one exchange step runs in the background and is collected at the next one. And
exchange steps are ``K`` steps apart, ``K`` chosen so that they come about every
``every_s`` seconds (0.5 s) from the slowest rank's step time, which every rank
reads from the same exchange, so all ranks pick the same ``K``. An all-reduce
costs from tens of microseconds to a few milliseconds (loopback TCP on a busy
machine); once per half second it costs nothing. The price is latency: ranks
act on a notice one to two exchange periods after the first of them saw it
(about a second, against notice windows of 30 s to 2 minutes).

Restores agree too: each rank lists its committed steps, the newest step that
every rank has is loaded, and if any rank finds its copy damaged, the ranks go
on to the next common step together.

Call sequence: construct on every rank after ``init_process_group`` (it may
create a gloo group, which is itself collective); at every step, every rank
asks :meth:`Agreement.due`, and where it is due, calls :meth:`Agreement.collect`
and then :meth:`Agreement.post`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from spotsafe.errors import ConfigError
from spotsafe.storage.layout import rank_folder


@dataclass(frozen=True, kw_only=True)
class ExchangeFlags:
    """What ranks tell each other at an exchange step: a rank posts its own flags; :meth:`Agreement.collect`
    returns the combination (any rank's ``stop``/``warning``/``save`` counts for all; the earliest deadline)."""

    stop: bool = False
    warning: bool = False
    save: bool = False
    deadline: float | None = None


NOTHING = ExchangeFlags()
"""No rank asked for anything (also what :meth:`Agreement.collect` returns before the first exchange)."""


def _decode(values: torch.Tensor) -> ExchangeFlags:
    earliest = -float(values[3])
    return ExchangeFlags(
        stop=bool(values[0] > 0),
        warning=bool(values[1] > 0),
        save=bool(values[2] > 0),
        deadline=earliest if math.isfinite(earliest) else None,
    )


def rank_url(url: str, rank: int) -> str:
    """Where one rank's checkpoints live: ``<url>/rank-<r>`` (each rank saves its own state)."""
    return f"{url.rstrip('/')}/{rank_folder(rank)}"


def active(group: Any = None) -> bool:
    """Whether torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def agreement_for(distributed: bool | None, group: Any = None) -> Agreement | None:
    """The checkpointer's agreement: ``distributed=None`` decides by :func:`active`. Collective when not ``None``."""
    if distributed is None:
        distributed = active(group)
    elif distributed and not active(group):
        raise ConfigError("distributed=True needs torch.distributed initialised with more than one rank")
    return Agreement(group) if distributed else None


class Agreement:
    """Step-boundary decisions shared by all ranks of ``group`` (default: the world)."""

    def __init__(
        self,
        group: Any = None,
        *,
        every_s: float = 0.5,
        max_steps: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # CPU tensors and no device sync: a gloo group, also when training uses NCCL.
        self.group = group if dist.get_backend(group) == "gloo" else dist.new_group(backend="gloo")
        self.every_s = every_s
        self.max_steps = max_steps
        self._clock = clock
        self.exchanges = 0
        self.next_step = 0
        self.period = 1
        self._pending: tuple[torch.Tensor, Any] | None = None
        self._collected: tuple[torch.Tensor, Any] | None = None
        self._posted: tuple[int, float] | None = None

    def due(self, step: int) -> bool:
        """Whether ``step`` is an exchange step (the same answer on every rank)."""
        return step >= self.next_step

    def post(self, step: int, *, stop: bool, warning: bool, save: bool, deadline: float | None) -> None:
        """Start this exchange step's all-reduce (any rank's stop/warning/save counts for all; the
        earliest deadline wins). Every rank posts at the same steps, after collecting the previous one."""
        if self._pending is not None:
            raise RuntimeError("collect() the previous exchange before posting the next")
        now = self._clock()
        step_s = 0.0
        if self._posted is not None and step > self._posted[0]:
            step_s = (now - self._posted[1]) / (step - self._posted[0])
        self._posted = (step, now)
        values = torch.tensor(
            [float(stop), float(warning), float(save), -deadline if deadline is not None else -math.inf, step_s],
            dtype=torch.float64,
        )
        work = dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (values, work)
        self.next_step = step + self.period
        self.exchanges += 1

    def collect(self) -> ExchangeFlags:
        """The decision of the exchange posted at the previous exchange step (nothing, if none was).

        Also sets the period until the exchange after the next one, from the slowest rank's step time.
        """
        if self._pending is None:
            return NOTHING
        values, work = self._pending
        self._pending = None
        work.wait()
        # Dropped at the next collect, not now: gloo's thread lets go of the work just after it completes, and
        # whichever thread lets go last frees it. On gloo's thread that means taking the GIL, which on Python
        # < 3.11.10 can hang a child forked at that instant (a DataLoader worker; CPython gh-112275).
        self._collected = (values, work)
        slowest = float(values[4])
        if slowest > 0:
            self.period = max(1, min(self.max_steps, math.ceil(self.every_s / slowest)))
        return _decode(values)

    def exchange(self, step: int, *, stop: bool, warning: bool, save: bool, deadline: float | None) -> ExchangeFlags:
        """Post and collect at once (no pipelining; for tests and tools)."""
        self.collect()
        self.post(step, stop=stop, warning=warning, save=save, deadline=deadline)
        return self.collect()

    def common_steps(self, steps: list[int]) -> list[int]:
        """The steps every rank has, newest first."""
        gathered = self.gather(sorted(set(steps)))
        common = set(gathered[0])
        for other in gathered[1:]:
            common &= set(other)
        return sorted(common, reverse=True)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order (collective)."""
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def post_flags(self, step: int, flags: ExchangeFlags) -> None:
        """:meth:`post` with the flags as one value (see :func:`~spotsafe.engine.step_decision.flags_to_post`)."""
        self.post(step, stop=flags.stop, warning=flags.warning, save=flags.save, deadline=flags.deadline)

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` is true on every rank (collective)."""
        value = torch.tensor([float(flag)], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.group)
        return bool(value[0] > 0)
