"""The emergency save: estimating save costs, planning what fits before the deadline, and the whole path
from a provider notice (emulated AWS/Azure metadata endpoints on 127.0.0.1) to exit code 75 and the resume."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import spotsafe
from spotsafe import every
from spotsafe.engine.emergency import (
    DIRECT,
    FULL,
    INCREMENTAL,
    STAGED,
    Option,
    Plan,
    SaveCosts,
    options_for,
    plan_emergency,
)
from spotsafe.notices.aws import ACTION_PATH, AwsSpotNotices
from spotsafe.notices.azure import AzureScheduledEvents
from spotsafe.notices.emulator import ProviderEmulator
from spotsafe.policy.adaptive import on_notice
from spotsafe.policy.interval import SavePolicy
from spotsafe.storage.faults import FaultyStorage, SlowStorage
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, LoggedEvent, read_events
from spotsafe.telemetry.store import read_history

from .conftest import Exited, Job, fake_exit, make_job, wait_until

# -- helpers -----------------------------------------------------------------------------------------------------------


def logged(run: Path) -> list[LoggedEvent]:
    return list(read_events(run / EVENTS_FILE))


def events(run: Path, kind: str, attempt: int | None = None) -> list[Any]:
    return [e.event for e in logged(run) if e.event.type == kind and (attempt is None or e.attempt == attempt)]


def committed_steps(run: Path) -> list[int]:
    return [r.step for r in CheckpointRepository(LocalStorage(run)).committed()]


def notice_job(run: Path, source: Any, policy: SavePolicy | None = None, **kwargs: Any) -> Job:
    policy = policy if policy is not None else every(steps=5) | on_notice()
    return make_job(run, policy=policy, notices=[source], exit=fake_exit, **kwargs)


def post_at(job: Job, step: int, post: Callable[[], Any]) -> Callable[[int], None]:
    """An ``on_step`` callback: at ``step``, post a stop notice and wait until the watcher saw it, so the
    loop stops exactly at the end of that step. Every step sleeps a little so that watchers get to poll."""

    def on_step(current: int) -> None:
        time.sleep(0.002)
        if current == step:
            post()
            wait_until(lambda: job.ckpt.stop_requested, "the stop notice to reach the board")

    return on_step


def sample(
    stall: float = 0.1,
    duration: float = 1.0,
    nbytes: int = 1000,
    written: int | None = None,
    route: str = DIRECT,
    local: float | None = None,
    upload: float | None = None,
) -> ev.SaveCommitted:
    return ev.SaveCommitted(
        time=0.0,
        step=1,
        checkpoint="step-000000001",
        reason="interval",
        blobs=1,
        bytes=nbytes,
        written_bytes=nbytes if written is None else written,
        stall_s=stall,
        duration_s=duration,
        route=route,
        local_s=local,
        upload_s=upload,
    )


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- SaveCosts ---------------------------------------------------------------------------------------------------------


def test_save_costs_without_samples_know_nothing() -> None:
    costs = SaveCosts()
    assert len(costs) == 0
    assert (costs.stall_s, costs.commit_s, costs.written_fraction) == (None, None, None)
    assert costs.stall_for(1000) is None
    assert [costs.write_for(1000, leg) for leg in ("direct", "local", "upload")] == [None, None, None]


def test_save_costs_medians() -> None:
    costs = SaveCosts([sample(stall=0.1, duration=1.0), sample(stall=0.5, duration=9.0)])
    costs.add(sample(stall=0.2, duration=2.0))
    assert len(costs) == 3
    assert costs.stall_s == pytest.approx(0.2)
    assert costs.commit_s == pytest.approx(2.0)


def test_save_costs_keep_only_the_most_recent_samples() -> None:
    costs = SaveCosts([sample(stall=9.0)] * 5, keep=3)
    for _ in range(3):
        costs.add(sample(stall=1.0))
    assert len(costs) == 3 and costs.stall_s == 1.0


def test_save_costs_scale_with_size_but_never_below_a_measured_sample() -> None:
    costs = SaveCosts([sample(stall=0.5, duration=2.5, nbytes=1000, written=1000)])
    assert costs.stall_for(1000) == pytest.approx(0.5)
    assert costs.stall_for(3000) == pytest.approx(1.5)
    assert costs.stall_for(10) == pytest.approx(0.5)  # a smaller state is not cheaper: fixed costs stay
    assert costs.write_for(1000, "direct") == pytest.approx(2.0)  # duration - stall
    assert costs.write_for(2000, "direct") == pytest.approx(4.0)
    assert costs.write_for(1, "direct") == pytest.approx(2.0)


def test_save_costs_estimate_from_the_slowest_of_the_three_most_recent_samples() -> None:
    # Oldest first: a slow save long ago no longer counts; among the last three, the slowest does.
    costs = SaveCosts([sample(stall=0.1, duration=9.1)] + [sample(stall=0.1, duration=d) for d in (1.1, 3.1, 2.1)])
    assert costs.write_for(1000, "direct") == pytest.approx(3.0)
    assert costs.commit_s == pytest.approx(2.6)  # the policies' d stays a median over all kept samples
    costs.add(sample(stall=0.1, duration=1.1))
    costs.add(sample(stall=0.1, duration=1.1))
    assert costs.write_for(1000, "direct") == pytest.approx(2.0)
    assert costs.stall_for(1000) == pytest.approx(0.1)


def test_save_costs_direct_and_upload_stand_in_for_each_other() -> None:
    direct_only = SaveCosts([sample(stall=0.5, duration=2.5)])
    assert direct_only.write_for(1000, "upload") == pytest.approx(2.0)
    assert direct_only.write_for(1000, "local") is None  # no local commit was ever measured

    staged_only = SaveCosts([sample(stall=0.1, duration=5.0, route=STAGED, local=0.3, upload=4.0)])
    assert staged_only.write_for(1000, "local") == pytest.approx(0.3)
    assert staged_only.write_for(1000, "upload") == pytest.approx(4.0)
    assert staged_only.write_for(1000, "direct") == pytest.approx(4.0)  # the upload goes to the same storage
    assert staged_only.write_for(2000, "local") == pytest.approx(0.6)

    # With both kinds measured, each leg uses its own kind only.
    both = SaveCosts(
        [sample(stall=0.5, duration=2.5), sample(stall=0.1, duration=5.0, route=STAGED, local=0.3, upload=4.0)]
    )
    assert both.write_for(1000, "direct") == pytest.approx(2.0)
    assert both.write_for(1000, "upload") == pytest.approx(4.0)
    # A staged save that never finished its legs (no local/upload times) says nothing about them.
    partial = SaveCosts([sample(route=STAGED, local=None, upload=None)])
    assert [partial.write_for(1000, leg) for leg in ("direct", "local", "upload")] == [None, None, None]


def test_save_costs_scale_writes_by_what_a_sample_wrote() -> None:
    # An incremental sample wrote 250 of 1000 bytes in 1 s: writing 1000 bytes is estimated at 4 s.
    costs = SaveCosts([sample(stall=0.0, duration=1.0, nbytes=1000, written=250)])
    assert costs.write_for(1000, "direct") == pytest.approx(4.0)
    assert costs.write_for(250, "direct") == pytest.approx(1.0)


def test_save_costs_written_fraction_is_the_latest_saves() -> None:
    costs = SaveCosts([sample(nbytes=1000, written=1000)])
    assert costs.written_fraction == 1.0
    costs.add(sample(nbytes=1000, written=300))
    assert costs.written_fraction == pytest.approx(0.3)
    costs.add(sample(nbytes=1000, written=5000))
    assert costs.written_fraction == 1.0  # capped
    costs.add(sample(nbytes=0, written=0))
    assert costs.written_fraction is None


def test_save_costs_are_safe_to_add_from_another_thread() -> None:
    costs = SaveCosts(keep=1000)

    def add() -> None:
        for _ in range(200):
            costs.add(sample())

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        assert costs.stall_s in (None, 0.1)
    for t in threads:
        t.join()
    assert len(costs) == 800


# -- options_for -------------------------------------------------------------------------------------------------------


def test_options_without_samples_have_no_estimates() -> None:
    [full] = options_for(SaveCosts(), total_bytes=1000, can_share=False, staged=False)
    assert (full.name, full.route, full.full, full.bytes, full.estimate_s) == (FULL, DIRECT, True, 1000, None)
    options = options_for(SaveCosts(), total_bytes=1000, can_share=True, staged=True)
    assert [o.name for o in options] == [INCREMENTAL, FULL, STAGED]
    assert all(o.estimate_s is None for o in options)
    assert options[0].bytes == 1000  # no written fraction known: assume everything


def test_incremental_only_when_chunks_can_be_shared_and_staged_only_with_a_stage() -> None:
    costs = SaveCosts([sample(stall=0.5, duration=2.5, nbytes=1000, written=400)])
    assert [o.name for o in options_for(costs, total_bytes=1000, can_share=False, staged=False)] == [FULL]
    assert [o.name for o in options_for(costs, total_bytes=1000, can_share=True, staged=False)] == [INCREMENTAL, FULL]
    assert [o.name for o in options_for(costs, total_bytes=1000, can_share=False, staged=True)] == [FULL, STAGED]
    incremental, full = options_for(costs, total_bytes=1000, can_share=True, staged=False)
    assert (incremental.route, incremental.full, incremental.bytes) == (DIRECT, False, 400)
    assert (full.route, full.full, full.bytes) == (DIRECT, True, 1000)
    # stall 0.5 + write: 400 bytes as measured (2.0 s), 1000 bytes scaled (5.0 s)
    assert incremental.estimate_s == pytest.approx(2.5)
    assert full.estimate_s == pytest.approx(5.5)


def test_the_staged_option_adds_the_local_commit_and_the_upload() -> None:
    costs = SaveCosts([sample(stall=0.5, duration=5.0, route=STAGED, local=0.5, upload=4.0)])
    incremental, _, staged = options_for(costs, total_bytes=1000, can_share=True, staged=True)
    assert (staged.route, staged.full, staged.bytes) == (STAGED, False, 1000)
    assert staged.local_s == pytest.approx(1.0)  # stall + local commit
    assert staged.estimate_s == pytest.approx(5.0)  # + upload
    assert incremental.estimate_s == pytest.approx(4.5)  # the upload stands in for a direct write
    [_, full_staged] = options_for(costs, total_bytes=1000, can_share=False, staged=True)
    assert full_staged.full  # nothing to share: the staged copy is a full one
    # Only direct saves measured: the staged option is not estimated.
    direct = SaveCosts([sample()])
    assert options_for(direct, total_bytes=1000, can_share=False, staged=True)[1].estimate_s is None


# -- plan_emergency ----------------------------------------------------------------------------------------------------


def opt(name: str, estimate: float | None, route: str = DIRECT, local: float | None = None) -> Option:
    return Option(name, route, name == FULL, 1000, estimate, local)


def test_plan_without_a_deadline_takes_the_configured_route() -> None:
    options = [opt(INCREMENTAL, 50.0), opt(FULL, 1.0)]
    plan = plan_emergency(options, time_left_s=None, safety=1.5, preferred=INCREMENTAL)
    assert plan.name == INCREMENTAL and plan.time_left_s is None
    assert "no deadline given" in plan.reason
    # An unknown preferred name falls back to the first option.
    assert plan_emergency(options, time_left_s=None, safety=1.5, preferred=STAGED).name == INCREMENTAL


@pytest.mark.parametrize("left", [0.0, -0.001, -30.0])
def test_plan_after_the_deadline_is_none(left: float) -> None:
    plan = plan_emergency([opt(FULL, 0.001)], time_left_s=left, safety=1.0, preferred=FULL)
    assert plan.choice is None and plan.name == "none"
    assert "the deadline has passed" in plan.reason


def test_plan_without_measurements_tries_the_configured_route() -> None:
    options = [opt(INCREMENTAL, None), opt(FULL, None), opt(STAGED, None, STAGED)]
    plan = plan_emergency(options, time_left_s=5.0, safety=1.5, preferred=STAGED)
    assert plan.name == STAGED
    assert plan.reason == "no save measured yet: trying local-then-upload"


def test_plan_takes_the_fastest_option_that_fits_with_the_safety_factor() -> None:
    options = [opt(INCREMENTAL, 4.0), opt(FULL, 8.0), opt(STAGED, 6.0, STAGED, local=1.0)]
    plan = plan_emergency(options, time_left_s=10.0, safety=1.0, preferred=FULL)
    assert plan.name == INCREMENTAL
    assert plan.reason == "incremental fits: ~4.0 s x 1 safety <= 10.0 s left"
    # 4 s x 1.5 = 6 s fits in 6 s left, 4 s x 2 = 8 s does not: the staged local commit (1 s x 2) does.
    assert plan_emergency(options, time_left_s=6.0, safety=1.5, preferred=FULL).name == INCREMENTAL
    tight = plan_emergency(options, time_left_s=6.0, safety=2.0, preferred=FULL)
    assert tight.name == STAGED and "the local commit fits" in tight.reason


def test_plan_breaks_ties_towards_the_configured_route() -> None:
    options = [opt(INCREMENTAL, 2.0), opt(FULL, 2.0)]
    assert plan_emergency(options, time_left_s=10.0, safety=1.0, preferred=FULL).name == FULL
    assert plan_emergency(options, time_left_s=10.0, safety=1.0, preferred=INCREMENTAL).name == INCREMENTAL


def test_plan_falls_back_to_the_local_commit_when_no_durable_save_fits() -> None:
    options = [opt(INCREMENTAL, 20.0), opt(FULL, 40.0), opt(STAGED, 21.0, STAGED, local=1.0)]
    plan = plan_emergency(options, time_left_s=5.0, safety=1.5, preferred=STAGED)
    assert plan.name == STAGED and plan.choice is not None and plan.choice.route == STAGED
    assert "no durable save fits (quickest ~20.0 s x 1.5 > 5.0 s left)" in plan.reason
    assert "the local commit fits (~1.0 s)" in plan.reason and "uploaded at the next start" in plan.reason


def test_plan_is_none_when_nothing_fits() -> None:
    options = [opt(INCREMENTAL, 20.0), opt(FULL, 40.0), opt(STAGED, 21.0, STAGED, local=4.0)]
    plan = plan_emergency(options, time_left_s=5.0, safety=1.5, preferred=STAGED)  # 4 x 1.5 > 5
    assert plan.choice is None and plan.name == "none"
    assert plan.reason.startswith("nothing fits: quickest (incremental) ~20.0 s x 1.5 > 5.0 s left")
    assert "the last verified checkpoint stays the resume point" in plan.reason
    direct_only = plan_emergency([opt(FULL, 3.0)], time_left_s=2.0, safety=1.0, preferred=FULL)
    assert direct_only.choice is None


def test_plan_tries_the_quickest_option_that_fits_only_without_the_safety_factor() -> None:
    # Running out of time costs nothing (a save that does not commit is never used): better to try.
    options = [opt(INCREMENTAL, 4.0), opt(FULL, 9.0)]
    plan = plan_emergency(options, time_left_s=5.0, safety=1.5, preferred=INCREMENTAL)  # 4 x 1.5 > 5 >= 4
    assert plan.name == INCREMENTAL
    assert plan.reason.startswith("incremental fits only without the safety factor (~4.0 s of 5.0 s left)")
    # A local commit that fits with the factor still comes first: it is sure to secure the state.
    staged = plan_emergency(
        [*options, opt(STAGED, 9.0, STAGED, local=1.0)], time_left_s=5.0, safety=1.5, preferred=STAGED
    )
    assert staged.name == STAGED and "the local commit fits" in staged.reason


def test_plan_tries_an_unmeasured_option_when_the_measured_ones_do_not_fit() -> None:
    options = [opt(INCREMENTAL, 20.0), opt(FULL, 40.0), opt(STAGED, None, STAGED)]
    plan = plan_emergency(options, time_left_s=5.0, safety=1.0, preferred=INCREMENTAL)
    assert plan.name == STAGED
    assert plan.reason == "measured options do not fit; trying local-then-upload (not measured)"


def test_plan_estimates_are_rounded_per_option() -> None:
    options = [opt(INCREMENTAL, 1.23456), opt(FULL, None)]
    plan = plan_emergency(options, time_left_s=9.0, safety=1.0, preferred=INCREMENTAL)
    assert isinstance(plan, Plan)
    assert plan.estimates() == {INCREMENTAL: 1.235, FULL: None}
    assert plan.options == tuple(options) and plan.time_left_s == 9.0


# -- end to end: a notice while training -------------------------------------------------------------------------------


def test_notice_mid_step_stops_at_the_next_boundary_with_one_emergency_save(tmp_path: Path) -> None:
    with ProviderEmulator() as em:
        job = notice_job(tmp_path, AwsSpotNotices(env=em.env(), poll_s=0.05))
        assert job.ckpt.restore() == 0
        deadline: list[float] = []
        with pytest.raises(Exited) as info:
            job.train(100, on_step=post_at(job, 7, lambda: deadline.append(em.aws_interrupt(in_s=120))))
    assert info.value.code == spotsafe.EXIT_PREEMPTED == 75
    [notice] = events(tmp_path, "notice_received")
    assert (notice.source, notice.step, notice.kind, notice.count) == ("aws", 7, "stop", 1)
    assert notice.detail.startswith("terminate")  # from instance-action, or termination-time if a poll straddled it
    assert notice.deadline == deadline[0]
    assert max(e.step for e in events(tmp_path, "progress")) == 7  # no step after the notice
    [planned] = events(tmp_path, "emergency_planned")
    assert (planned.step, planned.source, planned.choice, planned.deadline) == (7, "aws", INCREMENTAL, deadline[0])
    assert set(planned.options) == {INCREMENTAL, FULL}
    assert "incremental fits" in planned.reason
    [finished] = events(tmp_path, "emergency_finished")
    assert (finished.step, finished.choice, finished.committed, finished.before_deadline) == (
        7,
        INCREMENTAL,
        True,
        True,
    )
    assert finished.margin_s is not None and finished.margin_s > 0
    assert [(e.step, e.reason) for e in events(tmp_path, "save_committed")] == [(5, "interval"), (7, "notice")]
    assert [(e.reason, e.step, e.exit_code) for e in events(tmp_path, "run_exited")] == [("preempted", 7, 75)]
    assert committed_steps(tmp_path)[0] == 7

    fresh = make_job(tmp_path, notices=[])
    assert fresh.ckpt.restore() == 7
    [restored] = events(tmp_path, "restore_completed", attempt=2)
    assert (restored.step, restored.last_known_step, restored.replayed_steps) == (7, 7, 0)
    fresh.ckpt.close()


def test_notice_before_any_save_is_measured_tries_the_configured_route(tmp_path: Path) -> None:
    with ProviderEmulator() as em:
        job = notice_job(tmp_path, AwsSpotNotices(env=em.env(), poll_s=0.05))
        with pytest.raises(Exited):
            job.train(100, on_step=post_at(job, 2, lambda: em.aws_interrupt(in_s=120)))
    [planned] = events(tmp_path, "emergency_planned")
    assert (planned.step, planned.choice) == (2, FULL)  # nothing committed yet: nothing to share
    assert planned.reason == "no save measured yet: trying full"
    assert planned.options == {FULL: None}
    assert [(e.step, e.reason) for e in events(tmp_path, "save_committed")] == [(2, "notice")]


def test_a_save_still_writing_at_the_deadline_is_recorded_then_goes_on_until_the_machine_is_taken(
    tmp_path: Path,
) -> None:
    # Nothing measured yet, so the plan tries; the store takes 0.8 s per write (a save needs several), and
    # the deadline is 2-3 s away (AWS notice times are whole seconds).
    slow = SlowStorage(LocalStorage(tmp_path), latency=0.8)
    with ProviderEmulator() as em:
        job = notice_job(
            tmp_path,
            AwsSpotNotices(env=em.env(), poll_s=0.05),
            policy=every(steps=1000) | on_notice(margin_s=0.5),
            storage=slow,
        )
        with pytest.raises(Exited) as info:
            job.train(100, on_step=post_at(job, 3, lambda: em.aws_interrupt(in_s=3)))
    assert info.value.code == 75
    [finished] = events(tmp_path, "emergency_finished")
    assert (finished.step, finished.committed, finished.still_writing) == (3, False, True)
    assert finished.before_deadline is None and finished.local_committed is None
    # The stop was recorded before the deadline; the save went on (close() waits for it) and committed late.
    order = [e.type for e in events(tmp_path, "run_exited") + events(tmp_path, "save_committed")]
    types = [item.event.type for item in logged(tmp_path) if item.event.type in ("run_exited", "save_committed")]
    assert sorted(order) == sorted(types) and types == ["run_exited", "save_committed"]
    assert committed_steps(tmp_path) == [3]


def test_notice_while_a_background_save_is_in_flight_still_commits_at_the_stop_step(tmp_path: Path) -> None:
    slow = SlowStorage(LocalStorage(tmp_path), latency=0.25)  # a save takes >= 1.5 s
    in_flight: list[bool] = []
    with ProviderEmulator() as em:
        job = notice_job(tmp_path, AwsSpotNotices(env=em.env(), poll_s=0.05), storage=slow)

        def post() -> None:
            in_flight.append(job.ckpt.saving)
            em.aws_interrupt(in_s=120)

        with pytest.raises(Exited) as info:
            job.train(100, on_step=post_at(job, 6, post))
    assert info.value.code == 75
    assert in_flight == [True], "the save of step 5 was still being written when the notice came"
    assert [(e.step, e.reason) for e in events(tmp_path, "save_committed")] == [(5, "interval"), (6, "notice")]
    [planned] = events(tmp_path, "emergency_planned")
    assert planned.step == 6 and planned.choice in (INCREMENTAL, FULL)
    [finished] = events(tmp_path, "emergency_finished")
    assert finished.committed and finished.before_deadline
    assert [(e.reason, e.step) for e in events(tmp_path, "run_exited")] == [("preempted", 6)]
    assert committed_steps(tmp_path)[0] == 6
    assert make_job(tmp_path, notices=[]).ckpt.restore() == 6


class NoticeDuringRestore(LocalStorage):
    """Posts a notice (``hook``) when restore reads the first blob, and waits until the watcher saw it."""

    def __init__(self, root: Path, hook: Callable[[], None]) -> None:
        super().__init__(root)
        self.hook: Callable[[], None] | None = hook

    def read_into(self, key: str, buffer: Any, progress: Any = None, *, offset: int = 0) -> int:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return super().read_into(key, buffer, progress, offset=offset)


@pytest.mark.parametrize("when", ["before", "during"])
def test_notice_around_restore_exits_75_at_the_restored_step_without_saving(tmp_path: Path, when: str) -> None:
    first = make_job(tmp_path, notices=[])
    first.train(10)
    first.ckpt.finish()
    before = committed_steps(tmp_path)
    assert before[0] == 10
    with ProviderEmulator() as em:
        aws = AwsSpotNotices(env=em.env(), poll_s=0.05)
        holder: list[Job] = []

        def post() -> None:
            em.aws_interrupt(in_s=120)
            wait_until(lambda: holder[0].ckpt.stop_requested, "the stop notice")

        storage = NoticeDuringRestore(tmp_path, post) if when == "during" else None
        job = notice_job(tmp_path, aws, storage=storage)
        holder.append(job)
        if when == "before":
            post()
        with pytest.raises(Exited) as info:
            job.ckpt.restore()
    assert info.value.code == 75
    assert job.ckpt.step == 10
    kinds = [e.event.type for e in logged(tmp_path) if e.attempt == 2]
    assert kinds.index("restore_completed") < kinds.index("emergency_planned") < kinds.index("run_exited")
    [planned] = events(tmp_path, "emergency_planned", attempt=2)
    assert (planned.step, planned.choice, planned.source) == (10, "already-saved", "aws")
    assert planned.reason == "a checkpoint of this step is already committed"
    assert events(tmp_path, "emergency_finished") == []
    assert events(tmp_path, "save_started", attempt=2) == []
    assert [(e.reason, e.step, e.exit_code) for e in events(tmp_path, "run_exited", attempt=2)] == [
        ("preempted", 10, 75)
    ]
    assert committed_steps(tmp_path) == before


def _preempt_a_fresh_restore(run: Path) -> None:
    with ProviderEmulator() as em:
        job = notice_job(run, AwsSpotNotices(env=em.env(), poll_s=0.05))
        em.aws_interrupt(in_s=120)
        wait_until(lambda: job.ckpt.stop_requested, "the stop notice")
        with pytest.raises(Exited) as info:
            job.ckpt.restore()
    assert info.value.code == 75


def test_notice_during_a_fresh_restore_exits_75_with_nothing_to_save(tmp_path: Path) -> None:
    _preempt_a_fresh_restore(tmp_path)
    assert len(events(tmp_path, "restore_fresh")) == 1
    [planned] = events(tmp_path, "emergency_planned")
    assert (planned.step, planned.choice, planned.reason) == (0, "already-saved", "nothing trained yet")
    assert events(tmp_path, "save_started") == [] and committed_steps(tmp_path) == []
    assert [(e.reason, e.step) for e in events(tmp_path, "run_exited")] == [("preempted", 0)]


def test_a_notice_during_a_fresh_restore_is_not_an_unnoticed_interruption(tmp_path: Path) -> None:
    _preempt_a_fresh_restore(tmp_path)
    history = read_history(LocalStorage(tmp_path))
    assert history.interruptions == 1
    assert history.unnoticed == 0


def test_the_same_provider_notice_on_many_polls_is_one_notice(tmp_path: Path) -> None:
    with ProviderEmulator() as em:
        aws = AwsSpotNotices(env=em.env(), poll_s=0.05)
        job = notice_job(tmp_path, aws)

        def post() -> None:
            em.aws_interrupt(in_s=120)
            wait_until(lambda: job.ckpt.stop_requested, "the stop notice")
            seen = aws.polls
            wait_until(lambda: aws.polls >= seen + 6, "five more polls that see the same notice")

        with pytest.raises(Exited):
            job.train(100, on_step=post_at(job, 3, post))
        answered = [r for r in em.requests if r.path == ACTION_PATH and r.status == 200]
    assert len(answered) >= 5
    [notice] = events(tmp_path, "notice_received")
    assert (notice.source, notice.count, notice.step) == ("aws", 1, 3)
    assert len(events(tmp_path, "emergency_planned")) == 1
    assert [e.reason for e in events(tmp_path, "save_committed")] == ["notice"]


def test_hibernate_leaves_no_time_and_the_last_checkpoint_stays_the_resume_point(tmp_path: Path) -> None:
    with ProviderEmulator() as em:
        job = notice_job(tmp_path, AwsSpotNotices(env=em.env(), poll_s=0.05))

        def post() -> None:
            job.ckpt.wait()
            em.aws_interrupt("hibernate")

        with pytest.raises(Exited) as info:
            job.train(100, on_step=post_at(job, 7, post))
    assert info.value.code == 75
    [planned] = events(tmp_path, "emergency_planned")
    assert (planned.step, planned.choice) == (7, "none")
    assert planned.time_left_s is not None and planned.time_left_s <= 0
    assert "the deadline has passed" in planned.reason
    assert events(tmp_path, "emergency_finished") == []
    assert [(e.step, e.reason) for e in events(tmp_path, "save_committed")] == [(5, "interval")]
    assert [(e.reason, e.step, e.exit_code) for e in events(tmp_path, "run_exited")] == [("preempted", 7, 75)]
    assert make_job(tmp_path, notices=[]).ckpt.restore() == 5


def test_a_deadline_too_close_for_the_measured_cost_saves_nothing(tmp_path: Path) -> None:
    # Each write is acknowledged 0.6 s late: a save takes ~3 s to commit. The notice leaves 1-2 s.
    slow = SlowStorage(LocalStorage(tmp_path), latency=0.6)
    with ProviderEmulator() as em:
        job = notice_job(
            tmp_path,
            AwsSpotNotices(env=em.env(), poll_s=0.05),
            policy=every(steps=5) | on_notice(safety=1.0, margin_s=0.0),
            storage=slow,
        )

        def post() -> None:
            job.ckpt.wait()  # the save of step 5 is measured
            em.aws_interrupt(in_s=2)

        with pytest.raises(Exited) as info:
            job.train(100, on_step=post_at(job, 7, post))
    assert info.value.code == 75
    [measured] = events(tmp_path, "save_committed")
    assert (measured.step, measured.reason) == (5, "interval") and measured.duration_s >= 2.5
    [planned] = events(tmp_path, "emergency_planned")
    assert (planned.step, planned.choice) == (7, "none")
    assert planned.time_left_s is not None and 0 < planned.time_left_s < 2.0
    assert planned.options[INCREMENTAL] is not None and planned.options[INCREMENTAL] > planned.time_left_s
    assert planned.reason.startswith("nothing fits")
    assert events(tmp_path, "emergency_finished") == []
    assert [e.step for e in events(tmp_path, "save_started")] == [5]
    assert [(e.reason, e.step, e.exit_code) for e in events(tmp_path, "run_exited")] == [("preempted", 7, 75)]
    assert committed_steps(tmp_path) == [5]
    assert read_history(LocalStorage(tmp_path)).unnoticed == 1  # it lost steps 6 and 7
    assert make_job(tmp_path, notices=[]).ckpt.restore() == 5


def test_local_then_upload_when_only_the_local_commit_fits_and_the_next_start_uploads_it(tmp_path: Path) -> None:
    run, stage = tmp_path / "run", tmp_path / "stage"
    # The durable store acknowledges each write 0.6 s late (an upload takes ~3 s); local disk is fast.
    durable = FaultyStorage(LocalStorage(run))
    slow = SlowStorage(durable, latency=0.6)
    with ProviderEmulator() as em:
        job = notice_job(
            run,
            AwsSpotNotices(env=em.env(), poll_s=0.05),
            policy=every(steps=5) | on_notice(safety=1.0, margin_s=0.0),
            storage=slow,
            stage_dir=str(stage),
        )

        def post() -> None:
            job.ckpt.wait()  # the save of step 5 is measured: committed locally, then uploaded
            # The machine stops before any upload can finish. (Failing late, not at once: see
            # test_a_background_emergency_save_that_fails_fast_is_not_reported_committed.)
            durable.fail_rate, durable.latency = 1.0, 0.3
            # AWS notice times are whole seconds: post just after a second turns, so ~2 s are left
            # (less than the ~3 s upload, more than the local commit plus the failing write).
            time.sleep(1.0 - time.time() % 1.0 + 0.01)
            em.aws_interrupt(in_s=2)

        with pytest.raises(Exited) as info:
            job.train(100, on_step=post_at(job, 7, post))
    assert info.value.code == 75
    [measured] = events(run, "save_committed")
    assert (measured.step, measured.route) == (5, STAGED) and measured.upload_s >= 2.5
    [planned] = events(run, "emergency_planned")
    assert (planned.step, planned.choice) == (7, STAGED)
    assert "no durable save fits" in planned.reason and "the local commit fits" in planned.reason
    [finished] = events(run, "emergency_finished")
    assert (finished.choice, finished.committed) == (STAGED, False)  # committed locally only
    assert finished.local_committed and not finished.still_writing  # the upload failed before the deadline
    assert [(e.reason, e.step) for e in events(run, "run_exited")] == [("preempted", 7)]
    assert committed_steps(run) == [5]
    assert max(r.step for r in CheckpointRepository(LocalStorage(stage)).committed()) == 7

    # The next start on the same machine (the stage disk survived) uploads the local copy first.
    nxt = make_job(run, stage_dir=str(stage), notices=[])
    [recovered] = events(run, "stage_recovered")
    assert recovered.step == 7
    assert committed_steps(run)[0] == 7
    assert nxt.ckpt.restore() == 7
    assert CheckpointRepository(LocalStorage(stage)).committed() == []
    nxt.ckpt.close()


# -- Azure acknowledgements --------------------------------------------------------------------------------------------


def test_azure_event_is_acknowledged_after_the_emergency_save_commits(tmp_path: Path) -> None:
    with ProviderEmulator() as em:
        azure = AzureScheduledEvents(env=em.env(), poll_s=0.05, acknowledge=True)
        job = notice_job(tmp_path, azure)
        event_id: list[str] = []
        with pytest.raises(Exited) as info:
            job.train(100, on_step=post_at(job, 7, lambda: event_id.append(em.azure_event("Preempt", in_s=30))))
        acks = em.acks
    assert info.value.code == 75
    assert acks == event_id
    [notice] = events(tmp_path, "notice_received")
    assert (notice.source, notice.step) == ("azure", 7) and event_id[0] in notice.detail
    [finished] = events(tmp_path, "emergency_finished")
    assert finished.committed and finished.before_deadline
    statuses = [(e.source, e.status) for e in events(tmp_path, "notice_source")]
    assert ("azure", "acknowledged") in statuses
    [acknowledged] = [e for e in events(tmp_path, "notice_source") if e.status == "acknowledged"]
    assert event_id[0] in acknowledged.message
    kinds = [e.event.type for e in logged(tmp_path)]
    assert kinds.index("emergency_finished") < kinds.index("run_exited")
    assert [(e.step, e.reason) for e in events(tmp_path, "save_committed")] == [(5, "interval"), (7, "notice")]


def test_azure_event_is_not_acknowledged_when_the_emergency_save_fails(tmp_path: Path) -> None:
    faulty = FaultyStorage(LocalStorage(tmp_path))
    with ProviderEmulator() as em:
        job = notice_job(tmp_path, AzureScheduledEvents(env=em.env(), poll_s=0.05, acknowledge=True), storage=faulty)

        def post() -> None:
            job.ckpt.wait()  # step 5 is committed before the storage breaks
            # Every storage call now fails after 1 s (a failure that comes at once races: see the next test).
            faulty.fail_rate, faulty.latency = 1.0, 1.0
            em.azure_event("Preempt", in_s=30)

        with pytest.raises(Exited) as info:
            job.train(100, on_step=post_at(job, 7, post))
        time.sleep(0.2)  # an acknowledgement, if any, would have been sent before the exit
        acks = em.acks
    assert info.value.code == 75
    assert acks == []
    assert not [e for e in events(tmp_path, "notice_source") if e.status in ("acknowledged", "ack_failed")]
    [finished] = events(tmp_path, "emergency_finished")
    assert (finished.step, finished.committed, finished.before_deadline) == (7, False, None)
    assert [e.step for e in events(tmp_path, "save_failed")] == [7]
    assert [(e.reason, e.step, e.exit_code) for e in events(tmp_path, "run_exited")] == [("preempted", 7, 75)]
    assert committed_steps(tmp_path) == [5]


class MainThreadLag:
    """A monotonic clock that, once ``armed``, is slow to answer on the main (training) thread only: the
    save worker gets ahead of the training thread, as it may on a loaded machine."""

    def __init__(self) -> None:
        self.armed = False

    def __call__(self) -> float:
        if self.armed and threading.current_thread() is threading.main_thread():
            time.sleep(0.25)
        return time.monotonic()


def test_a_background_emergency_save_that_fails_fast_is_not_reported_committed(tmp_path: Path) -> None:
    faulty = FaultyStorage(LocalStorage(tmp_path))
    lag = MainThreadLag()
    with ProviderEmulator() as em:
        azure = AzureScheduledEvents(env=em.env(), poll_s=0.05, acknowledge=True)
        job = notice_job(tmp_path, azure, storage=faulty, clock=lag)

        def post() -> None:
            job.ckpt.wait()
            faulty.fail_rate = 1.0  # every storage call fails at once
            em.azure_event("Preempt", in_s=30)
            wait_until(lambda: job.ckpt.stop_requested, "the stop notice")
            lag.armed = True

        with pytest.raises(Exited) as info:
            job.train(100, on_step=post_at(job, 7, post))
        acks = em.acks
    assert info.value.code == 75
    assert [e.step for e in events(tmp_path, "save_failed")] == [7]
    [finished] = events(tmp_path, "emergency_finished")
    assert finished.committed is False
    assert acks == []


# -- soft warnings and unreachable endpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("warnings", ["save", "ignore"])
def test_aws_rebalance_warning(tmp_path: Path, warnings: str) -> None:
    with ProviderEmulator() as em:
        aws = AwsSpotNotices(env=em.env(), poll_s=0.05)
        job = notice_job(tmp_path, aws, policy=every(steps=5) | on_notice(warnings=warnings))

        def on_step(step: int) -> None:
            time.sleep(0.002)
            if step == 7:
                em.aws_rebalance()
                seen = aws.polls
                wait_until(lambda: aws.polls >= seen + 2, "a full poll after the rebalance recommendation")

        job.train(20, on_step=on_step)
        job.ckpt.finish()
    [notice] = events(tmp_path, "notice_received")
    assert (notice.source, notice.kind, notice.step, notice.deadline) == ("aws", "warning", 7, None)
    assert notice.detail == "rebalance recommendation"
    saves = [(e.step, e.reason) for e in events(tmp_path, "save_committed")]
    if warnings == "save":
        assert saves == [(5, "interval"), (7, "warning"), (12, "interval"), (17, "interval"), (20, "final")]
    else:
        assert saves == [(5, "interval"), (10, "interval"), (15, "interval"), (20, "interval")]
    assert events(tmp_path, "emergency_planned") == []
    assert [(e.reason, e.step) for e in events(tmp_path, "run_exited")] == [("finished", 20)]


def test_an_endpoint_down_at_start_neither_stalls_nor_breaks_training(tmp_path: Path) -> None:
    em = ProviderEmulator().start()
    em.stop()  # nothing listens on its port any more
    aws = AwsSpotNotices(env=em.env(), poll_s=0.05)
    azure = AzureScheduledEvents(f"http://127.0.0.1:{unused_port()}", poll_s=0.05)
    job = make_job(tmp_path, policy=every(steps=5), notices=[aws, azure], exit=fake_exit)
    job.ckpt.restore()

    def on_step(step: int) -> None:
        time.sleep(0.002)
        if step == 3:
            # Both watchers have found their endpoint down before the step ends.
            wait_until(lambda: aws._down and azure._down, "the watchers to notice the endpoints are down")

    job.train(20, on_step=on_step)
    job.ckpt.finish()
    statuses = [(e.source, e.status) for e in events(tmp_path, "notice_source")]
    assert ("aws", "unreachable") in statuses and ("azure", "unreachable") in statuses
    assert statuses.count(("aws", "unreachable")) == 1  # once per outage, not once per poll
    assert ("aws", "watching") not in statuses
    assert events(tmp_path, "notice_received") == []
    assert [e.step for e in events(tmp_path, "save_committed")] == [5, 10, 15, 20]
    assert [(e.reason, e.step) for e in events(tmp_path, "run_exited")] == [("finished", 20)]
