"""How the drill starts attempts: on this machine, while its emulated market has capacity for them.

:class:`DrillLauncher` hands each attempt to the market (:class:`~spotsafe.supervisor.market.Market` for a job of
one machine, :class:`~spotsafe.supervisor.nodemarket.NodeMarket` for several nodes, one process each); when the
market has none, the attempt is a :class:`_NoCapacity`, as a zone with no machines would answer.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spotsafe.supervisor.market import Market, Outage
from spotsafe.supervisor.nodemarket import Level, NodeMarket
from spotsafe.supervisor.nodes import start_nodes
from spotsafe.supervisor.pools import Handle, LaunchSpec, ProcessHandle
from spotsafe.supervisor.process import launch
from spotsafe.telemetry.log import EventLog

if TYPE_CHECKING:
    from spotsafe.supervisor.drill import DrillConfig


class _NoCapacity:
    """An attempt that found no machine: the market is between capacity."""

    pid: int | None = None
    machine: str | None = None

    def poll(self) -> int | None:
        return 1

    def signal(self, sig: int, *, group: bool = False) -> None:
        pass

    def reap_group(self) -> None:
        pass

    def no_capacity(self, code: int) -> bool:
        return True


class DrillLauncher:
    """Launches attempts on this machine while the market has capacity, and hands them to it."""

    def __init__(self, market: Market | NodeMarket, output: int | None) -> None:
        self.market = market
        self.output = output

    def start(self, spec: LaunchSpec) -> Handle:
        market = self.market

        def node(i: int) -> Handle:
            env = {**spec.env, **market.env(i)} if isinstance(market, NodeMarket) else {**spec.env, **market.env()}
            job = launch(
                spec.command, env=env, stdout=self.output, stderr=self.output, parent_death_signal=signal.SIGTERM
            )
            return ProcessHandle(job, spec.pool, socket.gethostname(), None)

        if isinstance(market, NodeMarket):  # one process per node, each a torchrun agent
            nodes = spec.node_count
            handle = market.start_if_capacity(lambda: start_nodes(nodes, node), spec.attempt, nodes)
        else:
            handle = market.start_if_capacity(lambda: node(0), spec.attempt)
        return handle if handle is not None else _NoCapacity()


def quiet_capacity(say: Callable[[str], None]) -> Callable[[str], None]:
    """``say`` with the supervisor's lines about polling for capacity collapsed: one line per wait."""
    waiting = False

    def quiet(line: str) -> None:
        nonlocal waiting
        polling = "no_capacity" in line or "no capacity" in line
        if polling and waiting:
            return
        waiting = polling
        say("waiting for spot capacity to come back (the market's outage)" if polling else line)

    return quiet


def drill_market(
    config: DrillConfig,
    outages: list[Outage],
    levels: list[Level],
    nodes: int,
    log: Callable[[str], None],
    events: EventLog,
    clock: Callable[[], float],
) -> Market | NodeMarket:
    common: dict[str, Any] = dict(
        mode=config.mode,
        window_s=config.window_s,
        max_interruptions=config.max_interruptions,
        log=log,
        events=events,
        clock=clock,
    )
    if nodes > 1:
        return NodeMarket(levels, nodes, **common)
    return Market(outages, **common)
