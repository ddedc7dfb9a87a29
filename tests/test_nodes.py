"""Jobs of several nodes: torchrun's node range, the supervisor asking for fewer nodes rather than waiting,
and the emulated market of several nodes (a fake clock, fake handles: no processes)."""

from __future__ import annotations

import json
import math
import signal
import sys
from pathlib import Path

import pytest

from spotsafe.errors import ConfigError
from spotsafe.supervisor.drill import DrillConfig, DrillReport
from spotsafe.supervisor.market import Trace, load_trace
from spotsafe.supervisor.nodemarket import Level, NodeMarket, drops, levels_at_rate, levels_from_trace
from spotsafe.supervisor.nodes import NodeRange, NodesHandle, check_multinode, node_range, start_nodes
from spotsafe.supervisor.pools import LaunchSpec
from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.telemetry import events as ev

from .test_drill import FakeClock, FakeHandle, Sink, wait_for, write_trace
from .test_failover import STANDARD, Script, no_capacity, spot, succeeds, supervise

TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
RDZV = ("--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29400", "--rdzv-id", "job")


def elastic(nnodes: str) -> tuple[str, ...]:
    return ("torchrun", f"--nnodes={nnodes}", "--nproc-per-node", "1", *RDZV, "train.py", "--nnodes", "9")


# -- torchrun's node range -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (("torchrun", "--nnodes", "2:4", "train.py"), NodeRange(2, 4)),
        (("torchrun", "--nnodes=1:8", "--standalone", "train.py"), NodeRange(1, 8)),
        (("/opt/bin/torchrun", "--nproc_per_node=2", "--nnodes", "3", "t.py"), NodeRange(3, 3)),
        ((*TORCHRUN, "--standalone", "--nproc-per-node", "2", "t.py"), NodeRange(1, 1)),
        (("python3", "-m", "torch.distributed.launch", "--nnodes", "1:2", "t.py"), NodeRange(1, 2)),
        (("torchrun", "--no-python", "--nnodes", "2:3", "bash", "-c", "x"), NodeRange(2, 3)),
        (elastic("2:4"), NodeRange(2, 4)),  # the script's own --nnodes is not torchrun's
        (("python", "train.py", "--nnodes", "1:4"), None),
        (("python", "-m", "mypkg.train", "--nnodes", "1:4"), None),
    ],
)
def test_the_node_range_is_read_from_torchruns_own_options(command: tuple[str, ...], expected: object) -> None:
    assert node_range(command) == expected


@pytest.mark.parametrize("value", ["0:2", "3:2", "a", "1:b", "1:2:3", ""])
def test_a_bad_nnodes_is_refused_naming_the_form(value: str) -> None:
    with pytest.raises(ConfigError, match="--nnodes"):
        node_range(("torchrun", "--nnodes", value, "t.py"))


def test_several_local_nodes_need_torchrun_with_a_rendezvous_they_can_meet_in() -> None:
    assert check_multinode(elastic("1:4"), 3) == NodeRange(1, 4)
    with pytest.raises(ConfigError, match="must be torchrun with --nnodes"):
        check_multinode(("python", "train.py"), 2)
    with pytest.raises(ConfigError, match="cannot meet"):
        check_multinode(("torchrun", "--standalone", "--nnodes", "1:2", "t.py"), 2)
    with pytest.raises(ConfigError, match="cannot meet"):
        check_multinode(("torchrun", "--nnodes", "1:2", "t.py"), 2)  # static rendezvous: node ranks by hand
    with pytest.raises(ConfigError, match="not 5"):
        check_multinode(elastic("1:4"), 5)


# -- the supervisor: fewer nodes rather than waiting ----------------------------------------------


def room_for(nodes: int, after: float = 100.0) -> object:
    """A pool with room for ``nodes`` nodes: asks for more find no capacity, the others run to the end."""

    def behaviour(spec: LaunchSpec, index: int) -> Script:
        return succeeds(after, to=100) if spec.node_count <= nodes else no_capacity(after=5.0)

    return behaviour


def test_an_elastic_job_asks_for_one_node_fewer_at_once_down_to_what_the_pool_has(tmp_path: Path) -> None:
    pool = spot("cluster", 2.0, nodes=8)
    slow = RelaunchPolicy(initial_s=600.0, max_delay_s=600.0)  # a backoff would show in the start times
    r = supervise(tmp_path, [pool], room_for(3), retry=slow, command=elastic("2:8"))  # type: ignore[arg-type]
    assert r.code == 0
    assert [s.node_count for s in r.launcher.specs] == [8, 7, 6, 5, 4, 3]
    assert [s.fields()["nodes"] for s in r.launcher.specs][-1] == "3"
    assert [t - r.began for t in r.launcher.started_at] == pytest.approx([0, 5, 10, 15, 20, 25])
    assert [e.nodes for e in r.sink.of(ev.AttemptStarted)] == [8, 7, 6, 5, 4, 3]
    assert [a.exit_class for a in r.attempts] == ["no_capacity"] * 5 + ["succeeded"]
    assert r.attempts[-1].cost == pytest.approx(2.0 * 3 * 100 / 3600)  # three nodes held, not eight
    # Five asks without room in a row, and the pool was never excluded for lack of capacity: each was a probe.
    assert STANDARD.capacity_failures <= 5 and r.sink.of(ev.Excluded) == []
    decided = r.sink.of(ev.RetryDecided)
    assert all(d.delay_s == 0 and "rather than waiting" in d.reason for d in decided[:5])
    assert "cluster had no room for 8 nodes; the job runs on 2 to 8: asking for 7" in decided[0].reason
    assert any("on 3 nodes" in line for line in r.lines)


def test_with_no_room_even_for_the_minimum_it_backs_off_and_asks_for_the_most_again(tmp_path: Path) -> None:
    calls: list[int] = []

    def behaviour(spec: LaunchSpec, index: int) -> Script:
        calls.append(spec.node_count)
        return no_capacity(after=5.0) if len(calls) <= 3 else succeeds(50, to=100)

    r = supervise(tmp_path, [spot("cluster", 1.0, nodes=4)], behaviour, command=elastic("2:4"))
    assert r.code == 0 and calls == [4, 3, 2, 4]
    decided = r.sink.of(ev.RetryDecided)
    assert "rather than waiting" not in decided[2].reason  # at the minimum: the budget's own decision


@pytest.mark.parametrize("command", [("torchrun", "--nnodes", "4", *RDZV, "t.py"), ("python", "train.py")])
def test_a_job_of_a_fixed_size_always_asks_for_the_pools_nodes(tmp_path: Path, command: tuple[str, ...]) -> None:
    calls: list[int] = []

    def behaviour(spec: LaunchSpec, index: int) -> Script:
        calls.append(spec.node_count)
        return no_capacity(after=5.0) if len(calls) <= 2 else succeeds(50, to=100)

    r = supervise(tmp_path, [spot("cluster", 1.0, nodes=4)], behaviour, command=command)
    assert r.code == 0 and calls == [4, 4, 4]


def test_an_elastic_job_asks_a_pool_for_at_most_its_maximum(tmp_path: Path) -> None:
    r = supervise(tmp_path, [spot("big", 1.0, nodes=16)], room_for(16), command=elastic("1:4"))  # type: ignore[arg-type]
    assert [s.node_count for s in r.launcher.specs] == [4]


# -- an attempt of several node processes ---------------------------------------------------------


def test_an_attempt_of_several_nodes_runs_while_any_does_and_reports_the_worst_exit() -> None:
    nodes = [FakeHandle(), FakeHandle(), FakeHandle()]
    handle = start_nodes(3, nodes.__getitem__)
    assert isinstance(handle, NodesHandle) and handle.machine == "fake-machine"
    assert handle.poll() is None
    nodes[2].signal(signal.SIGTERM)
    assert handle.poll() is None  # two still run
    nodes[0].code, nodes[1].code = 1, 0
    assert handle.poll() == 1
    nodes[1].code = -9
    assert handle.poll() == -9  # a death by a signal says more than a failure
    handle.signal(signal.SIGKILL, group=True)
    assert all(n.signals[-1] == (signal.SIGKILL, True) for n in nodes)
    one = FakeHandle()
    assert start_nodes(1, lambda i: one) is one


# -- the market of several nodes ------------------------------------------------------------------


def open_node_market(levels: list[Level], nodes: int) -> tuple[NodeMarket, FakeClock, Sink]:
    clock, sink = FakeClock(), Sink()
    market = NodeMarket(levels, nodes, mode="sigterm", window_s=5.0, events=sink, clock=clock)  # type: ignore[arg-type]
    return market, clock, sink


def test_a_fall_in_capacity_takes_the_highest_nodes_of_the_attempt_and_counts_it_once() -> None:
    levels = [Level(0.0, 3), Level(1.0, 2), Level(2.0, 1), Level(3.0, 3)]
    market, clock, sink = open_node_market(levels, 3)
    assert market.outages == drops(levels) and [o.nodes for o in market.outages] == [2, 1]
    assert market.outages[0].back_s == market.outages[1].back_s == 3.0
    nodes = [FakeHandle(exits_on=()), FakeHandle(exits_on=()), FakeHandle()]
    with market:
        assert market.env(2) == {"SPOTSAFE_NOTICES": "signals"}
        assert market.start_if_capacity(lambda: NodesHandle(nodes), 1, 4) is None  # the market offers 3
        assert market.start_if_capacity(lambda: NodesHandle(nodes), 1, 3) is not None
        assert market.started == {1: 3}
        clock.set(1.0)
        wait_for(lambda: len(sink.events) == 1, "the first fall")
        assert [n.signals for n in nodes] == [[], [], [(signal.SIGTERM, False)]]  # node 2 only
        clock.set(2.0)
        wait_for(lambda: nodes[1].signals == [(signal.SIGTERM, False)], "node 1's SIGTERM")
        assert nodes[0].signals == [] and market.capacity() == 0  # being interrupted: nothing starts
        nodes[1].code = 75  # node 1 saved with the others and stopped
        wait_for(lambda: len(sink.events) == 2, "the second fall")
        assert market.delivered == 1  # one attempt, however many of its nodes went
        taken = [(e.nodes_taken, e.nodes_left, e.interrupted) for e in sink.events]  # type: ignore[attr-defined]
        assert taken == [(1, 2, 1), (1, 1, 1)]
        assert market.capacity() == 1
        nodes[0].code = 75  # the job saved and stopped on its last node
        assert market.start_if_capacity(lambda: FakeHandle(), 2, 2) is None
        clock.set(3.0)
        wait_for(lambda: market.capacity() == 3, "capacity back")
        assert market.start_if_capacity(lambda: NodesHandle([FakeHandle(), FakeHandle()]), 2, 2) is not None


def test_a_fall_that_leaves_the_attempt_its_nodes_interrupts_nothing() -> None:
    market, clock, sink = open_node_market([Level(0.0, 4), Level(1.0, 3), Level(2.0, 1)], 4)
    nodes = [FakeHandle(), FakeHandle()]
    with market:
        assert market.start_if_capacity(lambda: NodesHandle(nodes), 1, 2) is not None  # 2 of the 4 offered
        clock.set(1.0)
        wait_for(lambda: len(sink.events) == 1, "the first fall")
        assert market.interruptions[0].attempt is None and not any(n.signals for n in nodes)
        clock.set(2.0)
        wait_for(lambda: len(sink.events) == 2, "the second fall")
        assert nodes[1].signals == [(signal.SIGTERM, False)] and nodes[0].signals == []


def test_each_node_gets_its_notice_on_its_own_emulated_endpoint() -> None:
    market = NodeMarket([Level(0.0, 2)], 2, mode="aws", window_s=5.0)
    with market:
        first, second = market.env(0), market.env(1)
        assert first["SPOTSAFE_NOTICES"] == second["SPOTSAFE_NOTICES"] == "aws"
        assert first["AWS_EC2_METADATA_SERVICE_ENDPOINT"] != second["AWS_EC2_METADATA_SERVICE_ENDPOINT"]


# -- the schedule from traces and rates ------------------------------------------------------------


def test_a_four_node_trace_offers_at_most_the_jobs_nodes_from_a_tick_where_all_can_run() -> None:
    trace = Trace("t", 60.0, (), "available", (0, 4, 3, 2, 2, 4, 1, 0, 4))
    levels = levels_from_trace(trace, start_s=0, time_scale=60.0, nodes=2)  # 60 trace seconds per drill second
    assert levels == [Level(0.0, 2), Level(5.0, 1), Level(6.0, 0), Level(7.0, 2)]
    full = levels_from_trace(trace, start_s=0, time_scale=60.0, nodes=4)
    assert full[:3] == [Level(0.0, 4), Level(1.0, 3), Level(2.0, 2)]
    with pytest.raises(ConfigError, match="never offers 5 nodes"):
        levels_from_trace(trace, start_s=400, time_scale=60.0, nodes=5)


def test_a_one_node_trace_offers_all_the_nodes_or_none(tmp_path: Path) -> None:
    trace = load_trace(str(write_trace(tmp_path / "z.json", [1, 1, 0, 1])))
    assert trace.nodes == 1
    assert levels_from_trace(trace, start_s=0, time_scale=60.0, nodes=3) == [
        Level(0.0, 3),
        Level(2.0, 0),
        Level(3.0, 3),
    ]


def test_a_rate_takes_one_node_at_a_time() -> None:
    levels = levels_at_rate(2.0, time_scale=60.0, seed=1, count=3, nodes=4, downtime_s=60.0)
    assert [lv.nodes for lv in levels] == [4, 3, 4, 3, 4, 3, 4]
    assert all(b.at_s - a.at_s == pytest.approx(1.0) for a, b in zip(levels[1::2], levels[2::2], strict=True))


@pytest.mark.parametrize("name", ["aws-4node-us-east-1f", "aws-4node-us-east-2a", "aws-4node-us-west-2c"])
def test_the_shipped_four_node_traces_follow_four_nodes(name: str) -> None:
    trace = load_trace(name)
    assert trace.nodes == 4 and trace.gap_s == 300 and set(trace.levels) == {0, 1, 2, 3, 4}
    levels = levels_from_trace(trace, start_s=0, time_scale=600.0, nodes=4)
    assert levels[0] == Level(0.0, 4) and min(lv.nodes for lv in levels) == 0
    assert any(lv.nodes == 3 for lv in levels)  # one node of the four goes alone
    with pytest.raises(ConfigError, match="only the 'available' reading"):
        load_trace(name, "preempted")


def test_a_trace_with_a_value_that_is_no_count_is_refused(tmp_path: Path) -> None:
    for bad in ([1, -1], [1, 1.5], [1, True]):
        (tmp_path / "t.json").write_text(json.dumps({"metadata": {"gap_seconds": 5}, "data": bad}))
        with pytest.raises(ConfigError, match="spot-traces format"):
            load_trace(str(tmp_path / "t.json"))


# -- the drill's node count and verdict -------------------------------------------------------------


def test_the_drill_runs_on_a_multi_node_traces_nodes_within_the_commands_range(tmp_path: Path) -> None:
    def config(command: tuple[str, ...], **kw: object) -> DrillConfig:
        return DrillConfig(command=command, workdir=tmp_path, **kw)  # type: ignore[arg-type]

    assert config(elastic("1:2"), trace="aws-4node-us-east-1f").node_count() == 2
    assert config(elastic("1:8"), trace="aws-4node-us-east-1f").node_count() == 4
    assert config(elastic("1:8")).node_count() == 1  # a one-node trace
    assert config(elastic("1:8"), nodes=3).node_count() == 3
    assert config(("python", "t.py"), trace="aws-4node-us-east-1f").node_count() == 1
    with pytest.raises(ConfigError, match="must be torchrun"):
        config(("python", "t.py"), nodes=2).node_count()


def report(**kw: object) -> DrillReport:
    base: dict[str, object] = dict.fromkeys(
        ["schedule", "mode", "job_state"],
        "x",
    )
    base.update(
        window_s=1.0,
        exit_code=0,
        reference_seconds=1.0,
        reference_reused=False,
        drill_seconds=1.0,
        attempts=3,
        no_capacity_attempts=0,
        interruptions=1,
        interruptions_idle=0,
        killed_at_window_end=0,
        exit_classes={},
        emergency_saves=1,
        checkpoints_committed=1,
        steps_replayed=0,
        machine_seconds=1.0,
        spot_cost=0.0,
        on_demand_cost=1.0,
        spot_price=1.0,
        on_demand_price=1.0,
        final_step_reference=100,
        final_step_drill=100,
        component_diffs={"model": ["model.w: differs"]},
        nodes=2,
    )
    base.update(kw)
    return DrillReport(**base)  # type: ignore[arg-type]


def test_a_resized_run_passes_when_it_finishes_at_the_reference_step_and_a_fixed_one_must_be_identical() -> None:
    assert report(node_counts=[2, 1, 2]).resized and report(node_counts=[2, 1, 2]).ok
    assert not report(node_counts=[2, 2]).ok  # a fixed size and a difference: a failure
    assert not report(node_counts=[2, 1], final_step_drill=80).ok
    assert not report(node_counts=[2, 1], exit_code=1).ok
    assert report(node_counts=[2, 2], component_diffs={"model": []}).ok
    assert report(node_counts=[2, 1]).to_json()["resized"] is True
    assert not math.isnan(report().saving)


def test_a_node_that_finishes_its_work_inside_the_window_was_not_interrupted() -> None:
    market, clock, sink = open_node_market([Level(0.0, 2), Level(1.0, 1)], 2)
    nodes = [FakeHandle(exits_on=()), FakeHandle(exits_on=())]
    with market:
        assert market.start_if_capacity(lambda: NodesHandle(nodes), 1, 2) is not None
        clock.set(1.0)
        wait_for(lambda: nodes[1].signals != [], "node 1's notice")
        nodes[0].code = nodes[1].code = 0  # the job's last step came first: it finished
        wait_for(lambda: len(sink.events) == 1, "the fall's event")
        assert market.interruptions[0].attempt is None and market.delivered == 0
