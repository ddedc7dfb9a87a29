"""The status lines of ``spotsafe run`` (one line for the job) and ``spotsafe drill`` (the reference run, then
the drill with the market's schedule)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from spotsafe.cli.live.display import LiveStatus, Tracker
from spotsafe.cli.live.follow import EventSource, FileSource, RankZeroSource, StorageSource
from spotsafe.cli.live.state import LiveState, Phase
from spotsafe.telemetry.log import EVENTS_FILE

if TYPE_CHECKING:
    from spotsafe.supervisor.market import Market
    from spotsafe.supervisor.nodemarket import NodeMarket
    from spotsafe.supervisor.run import RunConfig

log = logging.getLogger("spotsafe")


def follow_run(live: LiveStatus, config: RunConfig) -> Tracker:
    """The status line of a ``spotsafe run`` job: the supervisor's log (which local jobs append to as
    well), and for a remote run with pools on other machines, the parts those jobs upload."""
    from spotsafe.storage.registry import open_storage, protocol_of
    from spotsafe.storage.retry import StorageRetry
    from spotsafe.supervisor.run import events_file

    log_file = events_file(config)
    sources: list[EventSource] = [FileSource(log_file), RankZeroSource(log_file.parent)]
    if protocol_of(config.url) != "file" and any(not pool.local for pool in config.pools):
        try:
            sources.append(StorageSource(open_storage(config.url, retry=StorageRetry(budget_s=5.0))))
        except Exception as err:  # noqa: BLE001 - the supervisor reports a bad location; the status goes without
            log.debug("spotsafe: live status: cannot open %s: %s", config.url, err)
    return live.follow(f"job {config.name}", sources, total=config.total_steps, idle="starting the supervisor")


# -- spotsafe drill -------------------------------------------------------------------------------------------------


def reference_step(folder: Path) -> int | None:
    """The reference run's final step: its newest committed checkpoint's."""
    from spotsafe.supervisor.run import newest_step

    try:
        return newest_step(str(folder))
    except Exception as err:  # noqa: BLE001 - the drill reports a bad reference itself
        log.debug("spotsafe: live status: cannot read the reference in %s: %s", folder, err)
        return None


def market_outlook(market: Market | NodeMarket, state: LiveState) -> str | None:
    """When the market's next interruption is due, or when capacity comes back (from its schedule)."""
    done = min(len(market.interruptions), len(market.outages))  # outages begun so far
    now = market.now()
    if state.phase is Phase.CAPACITY and done:
        back = max(outage.back_s for outage in market.outages[:done]) - now  # outages may overlap
        if 0 < back < float("inf"):
            return f"capacity back in {back:.0f} s"
    if market.delivered >= market.max_interruptions or done >= len(market.outages):
        return "no more interruptions due"
    at = market.outages[done].at_s - now
    return f"next interruption in {at:.0f} s" if at >= 0.5 else "next interruption due now"


class DrillLive:
    """Shows a drill's phases (a :class:`~spotsafe.supervisor.drill.DrillWatch`): the reference run with its
    steps counting up, then the drill with a bar to the reference's final step and the market's interruptions."""

    def __init__(self, live: LiveStatus) -> None:
        self.live = live
        self.reference: Tracker | None = None
        self.drill: Tracker | None = None
        self.total: int | None = None

    def reference_started(self, folder: Path) -> None:
        self.reference = self.live.follow(
            "reference",
            [FileSource(folder / EVENTS_FILE), RankZeroSource(folder)],
            idle="starting the uninterrupted reference run",
            interruptions=False,
        )

    def reference_finished(self, folder: Path, seconds: float, reused: bool) -> None:
        self.total = reference_step(folder)
        at = f"step {self.total:,}" if self.total is not None else "the end"
        if self.reference is not None:
            self.reference.finish(ok=True, text=f"uninterrupted run finished at {at} in {seconds:.1f} s")
            return
        line = self.live.follow("reference", [], total=self.total, interruptions=False)
        line.state.step = self.total
        line.finish(ok=True, text=f"reused: it ran to {at} in {seconds:.1f} s", elapsed=seconds)

    def drill_started(self, run: Path, market: Market | NodeMarket) -> None:
        self.drill = self.live.follow(
            "drill",
            [FileSource(run / EVENTS_FILE), RankZeroSource(run)],
            total=self.total,
            idle="starting the job under the supervisor",
            extra=lambda state: market_outlook(market, state),
        )

    def drill_finished(self, code: int) -> None:
        if self.drill is not None:
            self.drill.finish()
            if not self.drill.state.ok and self.drill.state.phase is not Phase.FAILED:
                self.drill.finish(ok=False, text=f"the supervisor ended with exit {code}")
