"""An elastic torchrun job (``--nnodes 1:2``) drilled on a market of two nodes: each node is a torchrun agent on
this machine, and they meet in one c10d rendezvous on 127.0.0.1.

The market takes one node of the two: the other's rank agrees to stop, both save one checkpoint together
and exit. The supervisor asks for two nodes, finds one, and relaunches on that one rather than waiting (world
size 2 -> 1); the market then takes that node too, and when both come back the job grows back to two (1 -> 2)
and finishes, at the reference's final step.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from spotsafe.engine.emergency_save import ALREADY_SAVED
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.drill import DrillConfig
from spotsafe.supervisor.nodemarket import NodeMarket
from spotsafe.supervisor.reference import ensure_reference
from spotsafe.supervisor.store import JobStore
from spotsafe.telemetry.log import EVENTS_FILE, read_events
from spotsafe.telemetry.store import read_run_events

from .conftest import EXAMPLE, PROCESS_HANG_S, wait_until
from .test_drill import Drill, ended, write_trace

pytestmark = pytest.mark.e2e

STEPS = 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def elastic_command(port: int) -> tuple[str, ...]:
    """The example as an elastic torchrun job: 1 to 2 nodes of one worker each, saving one sharded checkpoint.
    The rendezvous waits 10 s after the first node for the second (``last_call_timeout``, torchrun's default is
    30 s): nodes that start apart by more meet in a second round, which restarts the first one's workers."""
    return (
        *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1"),
        *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic"),
        *("--rdzv-conf", "last_call_timeout=10", "--max-restarts", "0"),
        *(str(EXAMPLE), "--workers", "1", "--sharded", "--steps", str(STEPS), "--samples", "256"),
        *("--save-every", "20", "--progress-interval", "0"),
    )


def newest_world_size(run: Path) -> int | None:
    repo = CheckpointRepository(LocalStorage(run))
    committed = repo.committed()
    return int(repo.read_manifest(max(committed)).metadata.get("world_size", 1)) if committed else None


def found_none(run: Path, after: int) -> list[int]:
    """The node counts of the attempts after ``after`` that found no capacity, in order."""
    logged = [e.event for e in read_events(run / EVENTS_FILE)]
    asked = {e.number: e.nodes for e in logged if e.type == "attempt_started"}  # type: ignore[attr-defined]
    ends = [e for e in logged if e.type == "attempt_ended" and e.number > after]  # type: ignore[attr-defined]
    return [asked[e.number] for e in ends if e.exit_class == "no_capacity"]  # type: ignore[attr-defined]


def backing_off(run: Path, at_least: float) -> bool:
    """The supervisor's last decision is a relaunch after ``at_least`` seconds or more (it is sleeping)."""
    logged = [e.event for e in read_events(run / EVENTS_FILE) if e.event.type in ("retry_decided", "attempt_started")]
    last = logged[-1] if logged else None
    return last is not None and last.type == "retry_decided" and last.delay_s >= at_least  # type: ignore[attr-defined]


def test_the_market_takes_one_node_of_two_and_the_job_goes_on_on_one_then_grows_back(tmp_path: Path) -> None:
    command = elastic_command(free_port())
    reference = tmp_path / "reference"
    ensure_reference(command, reference, lambda line: None, nodes=2)
    assert newest_world_size(reference) == 2  # the reference ran on both nodes
    # Two nodes, one taken at 1 s, the other at 2 s, both back at 3 s (one-minute ticks, 60x faster).
    trace = write_trace(tmp_path / "cluster.json", [2, 1, 0] + [2] * 20)
    workdir = tmp_path / "drill"
    run, store = workdir / "run", workdir / "jobs.sqlite"
    config = DrillConfig(
        command=command,
        workdir=workdir,
        reference=reference,
        trace=str(trace),
        trace_start_s=0,
        time_scale=60.0,
        mode="sigterm",
        window_s=60.0,
        max_interruptions=5,
    )

    def driver(drill: Drill) -> None:
        wait_until(lambda: newest_world_size(run) == 2, "a first checkpoint on two nodes", timeout=PROCESS_HANG_S)
        drill.clock.set(1.0)  # node 1 goes
        drill.wait_events(1)
        wait_until(lambda: ended(store, 1), "attempt 1 to stop", timeout=PROCESS_HANG_S)
        wait_until(lambda: newest_world_size(run) == 1, "a checkpoint on the one node left", timeout=PROCESS_HANG_S)
        drill.clock.set(2.0)  # node 0 goes too
        drill.wait_events(2)
        market = drill.market
        assert isinstance(market, NodeMarket)
        one_node = max(market.started)
        wait_until(lambda: ended(store, one_node), "the one-node attempt to stop", timeout=PROCESS_HANG_S)
        # Once the supervisor has found no capacity for two nodes and then for one, and waits in its backoff
        # (not between an ask for two and one for one), both come back: its next ask, for two, finds them.
        wait_until(lambda: found_none(run, one_node)[:2] == [2, 1], "asks for 2 and 1 nodes", timeout=PROCESS_HANG_S)
        wait_until(lambda: backing_off(run, 1.5), "a backoff of 1.5 s or more", timeout=PROCESS_HANG_S)
        drill.clock.set(3.0)

    drill = Drill(config)
    report = drill.run(driver)
    assert report.nodes == 2 and report.node_counts == [2, 1, 2], (report, drill.lines)
    assert report.resized and report.ok, (report, drill.lines)
    assert report.exit_code == 0 and report.final_step_reference == report.final_step_drill == STEPS
    assert report.interruptions == 2
    # Rank 0 answers each notice (its events are the run's, merged); it saves nothing new when the ranks agreed to
    # stop at a step just saved (an interval save, or the restored one): no emergency save for that interruption.
    planned = [e.event for e in read_run_events(LocalStorage(run)) if e.event.type == "emergency_planned"]
    assert len(planned) == 2, planned
    saved = [e for e in planned if e.choice != ALREADY_SAVED]  # type: ignore[attr-defined]
    assert report.emergency_saves == len(saved), (planned, report)
    with JobStore(store) as jobs:
        attempts = jobs.attempts("drill")
    ran = [a for a in attempts if a.exit_class != "no_capacity"]
    assert [a.exit_class for a in ran] == ["preempted", "preempted", "succeeded"], drill.lines
    # Between the first two: one ask for two nodes that found one, and at once an ask for one.
    between = [a for a in attempts if ran[0].number < a.number < ran[1].number]
    assert [a.exit_class for a in between] == ["no_capacity"]
    starts = [e.event for e in read_events(run / EVENTS_FILE) if e.event.type == "attempt_started"]
    nodes = [e.nodes for e in starts if e.number in {a.number for a in ran} | {between[0].number}]  # type: ignore[attr-defined]
    assert nodes == [2, 2, 1, 2]
    assert any("asking for 1 now rather than waiting" in line for line in drill.lines), drill.lines
    taken = [e.event for e in read_events(run / EVENTS_FILE) if e.event.type == "market_interruption"]
    assert [(e.nodes_taken, e.nodes_left) for e in taken] == [(1, 1), (1, 0)]  # type: ignore[attr-defined]
    assert newest_world_size(run) == 2
