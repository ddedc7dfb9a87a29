"""Cost-based save intervals (Young/Daly, max_loss), notice settings, composition, and the run history they read."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import pytest

import spotsafe
from spotsafe import ConfigError, every
from spotsafe.notices.aws import AwsSpotNotices
from spotsafe.notices.emulator import ProviderEmulator
from spotsafe.policy.adaptive import (
    DEFAULT_RESTART_S,
    FIRST_SAVE_S,
    HOUR,
    MaxLoss,
    OnNotice,
    YoungDaly,
    daly_interval,
    max_loss,
    on_notice,
    young_daly,
)
from spotsafe.policy.interval import AnyOf, Choice, EverySeconds, EverySteps, SaveContext
from spotsafe.storage.local import LocalStorage
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, EventLog, RunIdentity, read_events
from spotsafe.telemetry.store import read_history

from .conftest import Exited, fake_exit, make_job, wait_until


def ctx(**fields: Any) -> SaveContext:
    base: dict[str, Any] = {"step": 100, "steps_since_save": 10, "seconds_since_save": 0.0}
    base.update(fields)
    return SaveContext(**base)


def events(run: Path, kind: str) -> list[Any]:
    return [e.event for e in read_events(run / EVENTS_FILE) if e.event.type == kind]


# -- Daly's formula ----------------------------------------------------------------------------------------------------


def test_daly_interval_matches_hand_computed_values() -> None:
    # d = 2 s, M = 1 h: sqrt(2 d M) = 120, d / 2M = 1/3600, sqrt of it = 1/60:
    # t = 120 (1 + 1/180 + 1/32400) - 2 = 118.67037...
    assert daly_interval(2.0, 3600.0) == pytest.approx(120 * (1 + 1 / 180 + 1 / 32400) - 2, rel=1e-12)
    assert daly_interval(2.0, 3600.0) == pytest.approx(118.670370, rel=1e-6)
    # d = 10 s, M = 1000 s: x = 0.005, sqrt(20000) (1 + sqrt(0.005)/3 + 0.005/9) - 10
    assert daly_interval(10.0, 1000.0) == pytest.approx(134.833257, rel=1e-6)
    # d just under 2M: the formula still applies (8 < 10): sqrt(80) (1 + sqrt(0.8)/3 + 0.8/9) - 8
    assert daly_interval(8.0, 5.0) == pytest.approx(4.405985, rel=1e-6)


@pytest.mark.parametrize(("d", "m"), [(10.0, 5.0), (11.0, 5.0), (1000.0, 3.0), (2.0, 1.0)])
def test_daly_interval_is_m_when_a_checkpoint_costs_2m_or_more(d: float, m: float) -> None:
    assert daly_interval(d, m) == m


@pytest.mark.parametrize("d", [1e-6, 1e-4, 1e-2])
def test_daly_interval_tends_to_young_for_tiny_checkpoints(d: float) -> None:
    m = 4 * HOUR
    young = math.sqrt(2 * d * m)
    assert daly_interval(d, m) == pytest.approx(young, rel=1e-3)
    assert daly_interval(d, m) < young  # Daly's correction subtracts d, which dominates the + terms for tiny d


# -- young_daly() ------------------------------------------------------------------------------------------------------


def test_young_daly_before_any_save_is_measured_waits_first_save_s() -> None:
    policy = young_daly()
    choice = policy.choose(ctx())
    assert (choice.seconds, choice.steps) == (FIRST_SAVE_S, None)
    assert "no save measured yet" in choice.reason and "first save after 60.0 s" in choice.reason
    custom = young_daly(first_save_s=5).choose(ctx())
    assert custom.seconds == 5
    assert "5.0 s" in custom.reason


def test_young_daly_uses_the_measured_stall_and_the_prior() -> None:
    policy = young_daly(prior_mtbi_hours=1.0, cost="stall")
    choice = policy.choose(ctx(stall_s=2.0, commit_s=30.0, run_s=0.0))
    assert choice.seconds == pytest.approx(118.670370, rel=1e-6)  # M = 1 h, d = 2 s (hand value above)
    assert choice.steps is None
    assert "d=2.000 s" in choice.reason and "M=60.0 min" in choice.reason and "a 1 h prior" in choice.reason


def test_young_daly_mtbi_counts_unnoticed_or_all_interruptions() -> None:
    c = ctx(stall_s=1.0, commit_s=1.0, run_s=2 * HOUR, interruptions=3, unnoticed=1)
    unnoticed = young_daly(prior_mtbi_hours=4.0)
    m, n = unnoticed.mtbi(c)
    assert m == pytest.approx((4 * HOUR + 2 * HOUR) / 2) and n == 1
    everything = young_daly(prior_mtbi_hours=4.0, count="all")
    m, n = everything.mtbi(c)
    assert m == pytest.approx((4 * HOUR + 2 * HOUR) / 4) and n == 3
    assert unnoticed.choose(c).seconds == pytest.approx(daly_interval(1.0, 3 * HOUR))
    assert everything.choose(c).seconds == pytest.approx(daly_interval(1.0, 1.5 * HOUR))
    assert "1 interruptions that lost work in 2.0 h" in unnoticed.choose(c).reason
    assert "3 interruptions in 2.0 h" in everything.choose(c).reason


def test_young_daly_interval_shrinks_as_interruptions_are_observed() -> None:
    for count, field in (("unnoticed", "unnoticed"), ("all", "interruptions")):
        policy = young_daly(count=count)
        chosen = [policy.choose(ctx(stall_s=5.0, commit_s=5.0, run_s=HOUR, **{field: n})).seconds for n in range(6)]
        intervals = [t for t in chosen if t is not None]
        assert len(intervals) == len(chosen)
        assert all(a > b for a, b in itertools.pairwise(intervals)), (count, intervals)
    # "unnoticed" ignores interruptions whose notice was used for an emergency save.
    policy = young_daly()
    base = policy.choose(ctx(commit_s=5.0, run_s=HOUR)).seconds
    assert policy.choose(ctx(commit_s=5.0, run_s=HOUR, interruptions=5, unnoticed=0)).seconds == base


def test_young_daly_never_below_the_commit_time_or_one_second() -> None:
    policy = young_daly(prior_mtbi_hours=0.01, cost="stall")  # M = 36 s, d = 1 ms: Daly says ~0.27 s
    assert daly_interval(0.001, 36.0) < 1.0
    by_floor = policy.choose(ctx(stall_s=0.001))
    assert by_floor.seconds == 1.0
    assert "raised to 1.0 s, the time a save takes to commit" in by_floor.reason
    by_commit = policy.choose(ctx(stall_s=0.001, commit_s=3.0))
    assert by_commit.seconds == 3.0
    assert "raised to 3.0 s" in by_commit.reason
    unraised = young_daly(cost="stall").choose(ctx(stall_s=5.0, commit_s=3.0))
    assert "raised" not in unraised.reason
    # A zero stall is treated as 1 ms (a save is never free).
    assert policy.choose(ctx(stall_s=0.0)).seconds == 1.0
    assert "d=0.001 s" in policy.choose(ctx(stall_s=0.0)).reason


def test_young_daly_should_save_uses_seconds_since_save_and_needs_a_new_step() -> None:
    policy = young_daly(first_save_s=10, cost="stall")
    assert not policy.should_save(ctx(steps_since_save=3, seconds_since_save=9.9))
    assert policy.should_save(ctx(steps_since_save=3, seconds_since_save=10.0))
    assert not policy.should_save(ctx(steps_since_save=0, seconds_since_save=1e9))
    t = policy.choose(ctx(stall_s=1.0)).seconds
    assert t is not None
    assert not policy.should_save(ctx(stall_s=1.0, seconds_since_save=t * 0.99, steps_since_save=1))
    assert policy.should_save(ctx(stall_s=1.0, seconds_since_save=t, steps_since_save=1))
    assert policy.describe() == "young_daly(cost='stall', first_save_s=10)"
    assert young_daly().describe() == "young_daly()"


def test_young_daly_takes_the_commit_time_as_the_save_cost_by_default() -> None:
    c = ctx(stall_s=0.01, commit_s=8.0, run_s=0.0)
    chosen = young_daly(prior_mtbi_hours=1.0).choose(c)
    assert chosen.seconds == pytest.approx(daly_interval(8.0, HOUR))
    assert "d=8.000 s (time to commit a save)" in chosen.reason
    stall = young_daly(prior_mtbi_hours=1.0, cost="stall").choose(c)
    assert stall.seconds is not None and chosen.seconds > stall.seconds
    assert "(stall per save)" in stall.reason
    # Until a commit is measured, the first save comes after first_save_s even if a stall is known.
    assert young_daly().choose(ctx(stall_s=0.01)).seconds == 60.0
    with pytest.raises(ConfigError):
        young_daly(cost="io")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prior_mtbi_hours": 0},
        {"prior_mtbi_hours": -1.0},
        {"prior_mtbi_hours": float("nan")},
        {"prior_mtbi_hours": float("inf")},
        {"prior_mtbi_hours": True},
        {"first_save_s": 0},
        {"first_save_s": float("nan")},
        {"count": "some"},
    ],
)
def test_young_daly_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        young_daly(**kwargs)


# -- max_loss() --------------------------------------------------------------------------------------------------------


def test_max_loss_minutes_uses_measured_commit_and_restart() -> None:
    policy = max_loss(minutes=10)
    assert isinstance(policy, MaxLoss) and policy.budget_s == 600
    choice = policy.choose(ctx(commit_s=30.0, restart_s=90.0))
    assert choice.seconds == pytest.approx(2 * (600 - 30 - 90))  # 960 s
    assert choice.steps is None
    assert "max_loss(minutes=10)" in choice.reason and "L=10.0 min" in choice.reason
    assert "d=30.0 s" in choice.reason and "R=90.0 s" in choice.reason and "assumed" not in choice.reason


def test_max_loss_assumes_the_default_restart_until_one_is_measured() -> None:
    choice = max_loss(minutes=10).choose(ctx(commit_s=30.0))
    assert choice.seconds == pytest.approx(2 * (600 - 30 - DEFAULT_RESTART_S))
    assert "assumed until a restart is measured" in choice.reason
    custom = max_loss(minutes=10, default_restart_s=10).choose(ctx())
    assert custom.seconds == pytest.approx(2 * (600 - 0 - 10))
    assert "d not measured yet" in custom.reason and "assumed" in custom.reason


def test_max_loss_that_cannot_be_met_saves_as_often_as_saves_commit() -> None:
    unmet = max_loss(minutes=1).choose(ctx(commit_s=5.0))  # R assumed 120 s > 60 s budget
    assert unmet.seconds == 5.0
    assert "cannot be met" in unmet.reason and "every 5.0 s" in unmet.reason
    no_commit = max_loss(minutes=1).choose(ctx())
    assert no_commit.seconds == 1.0
    assert "cannot be met" in no_commit.reason
    # Exactly used up by d + R: t = 0 is unreachable too.
    assert "cannot be met" in max_loss(minutes=2).choose(ctx(commit_s=60.0, restart_s=60.0)).reason


def test_max_loss_interval_is_floored_at_the_commit_time() -> None:
    choice = max_loss(minutes=1).choose(ctx(commit_s=20.0, restart_s=39.0))  # t = 2 (60 - 59) = 2 s < 20 s
    assert choice.seconds == 20.0
    assert "raised to 20.0 s" in choice.reason


def test_max_loss_dollars_converts_to_a_time_budget() -> None:
    policy = max_loss(dollars=2.0, price_per_hour=3.0, nodes=4)  # 2 / (3 x 4) h = 10 min
    assert policy.budget_s == pytest.approx(600.0)
    assert policy.describe() == "max_loss(dollars=2, price_per_hour=3, nodes=4)"
    choice = policy.choose(ctx(commit_s=30.0, restart_s=90.0))
    assert choice.seconds == pytest.approx(960.0)
    assert choice.reason.startswith("max_loss(dollars=2, price_per_hour=3, nodes=4): t = 2 (L - d - R)")
    assert max_loss(dollars=1.5, price_per_hour=0.9).budget_s == pytest.approx(1.5 / 0.9 * HOUR)


def test_max_loss_should_save_uses_seconds_since_save_and_needs_a_new_step() -> None:
    policy = max_loss(minutes=10)
    c = {"commit_s": 30.0, "restart_s": 90.0}
    assert not policy.should_save(ctx(seconds_since_save=959.0, **c))
    assert policy.should_save(ctx(seconds_since_save=960.0, **c))
    assert not policy.should_save(ctx(seconds_since_save=1e9, steps_since_save=0, **c))


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"minutes": 5, "dollars": 1, "price_per_hour": 1},
        {"dollars": 1},
        {"dollars": 1, "price_per_hour": 1, "nodes": 0},
        {"dollars": 1, "price_per_hour": 1, "nodes": -2},
        {"dollars": 1, "price_per_hour": 1, "nodes": True},
        {"dollars": 1, "price_per_hour": 1, "nodes": 2.0},
        {"minutes": 0},
        {"minutes": -5},
        {"minutes": float("nan")},
        {"minutes": float("inf")},
        {"minutes": True},
        {"minutes": "10"},
        {"dollars": -1, "price_per_hour": 1},
        {"dollars": float("nan"), "price_per_hour": 1},
        {"dollars": float("inf"), "price_per_hour": 1},
        {"dollars": 1, "price_per_hour": 0},
        {"dollars": 1, "price_per_hour": float("nan")},
        {"dollars": 1, "price_per_hour": float("inf")},
        {"minutes": 5, "default_restart_s": 0},
        {"minutes": 5, "default_restart_s": float("nan")},
    ],
)
def test_max_loss_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        max_loss(**kwargs)


# -- on_notice() -------------------------------------------------------------------------------------------------------


def test_on_notice_defaults_and_never_asks_for_a_save() -> None:
    settings = on_notice()
    assert (settings.safety, settings.margin_s, settings.warnings) == (1.5, 2.0, "save")
    assert settings == OnNotice()
    assert settings.choose(ctx()) is None
    for c in (ctx(), ctx(steps_since_save=10**6, seconds_since_save=1e12), ctx(steps_since_save=0)):
        assert not settings.should_save(c)
    assert settings.describe() == "on notice"
    assert on_notice(safety=1, margin_s=0, warnings="ignore").warnings == "ignore"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"safety": 0.99},
        {"safety": 0},
        {"safety": -2},
        {"safety": float("nan")},
        {"safety": float("inf")},
        {"margin_s": -0.1},
        {"margin_s": True},
        {"margin_s": "2"},
        {"warnings": "stop"},
        {"warnings": "SAVE"},
    ],
)
def test_on_notice_rejects_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        on_notice(**kwargs)


def test_on_notice_rejects_a_nan_margin() -> None:
    with pytest.raises(ConfigError):
        on_notice(margin_s=float("nan"))


# -- composition and Choice --------------------------------------------------------------------------------------------


def test_composition_flattens_parts_and_describes_each() -> None:
    policy = every(minutes=15) | on_notice()
    assert [type(p) for p in policy.parts()] == [EverySeconds, OnNotice]
    assert policy.describe() == "every 900 s or on notice"
    assert (spotsafe.young_daly, spotsafe.max_loss, spotsafe.on_notice) == (young_daly, max_loss, on_notice)
    assert [p.choose(ctx()) for p in policy.parts()] == [Choice(900.0, None, "fixed: every 900 s of work"), None]

    mixed = every(steps=5) | young_daly() | max_loss(minutes=10)
    parts = mixed.parts()
    assert [type(p) for p in parts] == [EverySteps, YoungDaly, MaxLoss]
    assert mixed.describe() == "every 5 steps or young_daly() or max_loss(minutes=10)"
    choices = [p.choose(ctx()) for p in parts]
    assert choices[0] == Choice(None, 5, "fixed: every 5 steps")
    assert choices[1] is not None and choices[1].seconds == FIRST_SAVE_S
    assert choices[2] is not None and choices[2].seconds == pytest.approx(2 * (600 - DEFAULT_RESTART_S))
    # A nested composition flattens too (every(steps=, minutes=) is itself an AnyOf).
    nested = every(steps=3, minutes=1) | (young_daly() | on_notice())
    assert isinstance(nested, AnyOf)
    assert [type(p) for p in nested.parts()] == [EverySteps, EverySeconds, YoungDaly, OnNotice]


def test_composition_saves_when_any_part_wants_to() -> None:
    policy = every(steps=5) | young_daly(first_save_s=30) | max_loss(minutes=10) | on_notice()
    assert not policy.should_save(ctx(steps_since_save=1, seconds_since_save=1.0))
    assert policy.should_save(ctx(steps_since_save=5, seconds_since_save=1.0))  # every 5 steps
    assert policy.should_save(ctx(steps_since_save=1, seconds_since_save=30.0))  # young_daly's first save
    assert not policy.should_save(ctx(steps_since_save=0, seconds_since_save=1e9))


def test_choice_differs() -> None:
    base = Choice(100.0, None, "a")
    assert base.differs(None)
    assert base.differs(Choice(None, 5, "steps"))  # a new kind
    assert base.differs(Choice(100.0, 5, "also steps"))
    assert Choice(None, 5, "x").differs(Choice(None, 6, "x"))  # any change in steps
    assert not Choice(None, 5, "x").differs(Choice(None, 5, "y"))
    assert not base.differs(Choice(100.0, None, "another reason"))
    assert not base.differs(Choice(80.0, None, "a"))  # 100 is 25% above 80: not more
    assert not Choice(125.0, None, "a").differs(base)
    assert Choice(126.0, None, "a").differs(base)
    assert Choice(74.0, None, "a").differs(base)
    assert not Choice(76.0, None, "a").differs(base)


# -- in a Checkpointer -------------------------------------------------------------------------------------------------


def test_interval_choices_are_recorded_at_the_first_step(tmp_path: Path) -> None:
    policy = every(steps=5) | young_daly() | max_loss(minutes=10) | on_notice()
    job = make_job(tmp_path, policy=policy, notices=[])
    job.train(1)
    chosen = events(tmp_path, "interval_chosen")
    assert [e.policy for e in chosen] == ["every 5 steps", "young_daly()", "max_loss(minutes=10)"]
    assert [(e.interval_s, e.interval_steps) for e in chosen[:2]] == [(None, 5), (FIRST_SAVE_S, None)]
    assert chosen[2].interval_s == pytest.approx(2 * (600 - DEFAULT_RESTART_S))
    assert chosen[0].reason == "fixed: every 5 steps"
    assert "no save measured yet" in chosen[1].reason
    assert "assumed until a restart is measured" in chosen[2].reason
    # They came with the first step: after its progress event, before anything else.
    kinds = [e.event.type for e in read_events(tmp_path / EVENTS_FILE)]
    first = kinds.index("progress")
    assert kinds[first + 1 : first + 4] == ["interval_chosen"] * 3
    job.ckpt.close()


def test_a_fixed_policy_records_its_choice_once(tmp_path: Path) -> None:
    job = make_job(tmp_path, policy=every(steps=5), notices=[])
    job.train(23)
    job.ckpt.finish()
    [chosen] = events(tmp_path, "interval_chosen")
    assert (chosen.policy, chosen.interval_s, chosen.interval_steps) == ("every 5 steps", None, 5)
    assert [e.step for e in events(tmp_path, "save_committed")] == [5, 10, 15, 20, 23]


def test_young_daly_records_a_new_choice_once_a_save_is_measured(tmp_path: Path) -> None:
    # A choice is news when the interval moves by more than 25%. Young/Daly's interval never exceeds M (here the
    # 4 h prior plus the run's few seconds), whatever a save measures on this machine, loaded or not, so it is far
    # from a first save after 10 h. (From the default 60 s it is no news when a save commits in 0.07-0.2 s.)
    first = 10 * HOUR
    policy = young_daly(first_save_s=first)
    job = make_job(tmp_path, policy=every(steps=5) | policy, notices=[])

    def on_step(step: int) -> None:
        if step == 7:
            job.ckpt.wait()  # the save of step 5 is measured before step 7 ends

    job.train(8, on_step=on_step)
    chosen = [e for e in events(tmp_path, "interval_chosen") if e.policy == policy.describe()]
    assert len(chosen) >= 2
    assert chosen[0].interval_s == first and "no save measured yet" in chosen[0].reason
    assert "Young/Daly: d=" in chosen[1].reason and "(time to commit a save)" in chosen[1].reason
    assert chosen[1].interval_s is not None and 1.0 <= chosen[1].interval_s < 0.75 * first
    # The fixed part did not change: still one event for it.
    assert len([e for e in events(tmp_path, "interval_chosen") if e.policy == "every 5 steps"]) == 1
    job.ckpt.close()


def test_save_context_carries_measured_costs(tmp_path: Path) -> None:
    job = make_job(tmp_path, policy=every(steps=3), notices=[])
    before = job.ckpt.save_context()
    assert (before.stall_s, before.commit_s, before.restart_s) == (None, None, None)
    assert (before.step, before.steps_since_save, before.interruptions, before.unnoticed) == (0, 0, 0, 0)
    job.train(9)
    job.ckpt.wait()
    after = job.ckpt.save_context()
    committed = events(tmp_path, "save_committed")
    assert [e.step for e in committed] == [3, 6, 9]
    stalls = sorted(e.stall_s for e in committed)
    durations = sorted(e.duration_s for e in committed)
    assert after.stall_s == pytest.approx(stalls[1])
    assert after.commit_s == pytest.approx(durations[1])
    assert (after.step, after.steps_since_save) == (9, 0)
    assert after.restart_s is None and after.run_s > 0
    job.ckpt.close()


def _emit(log: EventLog, cls: type[ev.Event], at: float, **fields: Any) -> None:
    log.emit(cls(time=at, **fields))


def _committed(log: EventLog, at: float, step: int, reason: str = "interval", stall: float = 0.5) -> None:
    _emit(
        log,
        ev.SaveCommitted,
        at,
        step=step,
        checkpoint=f"c{step}",
        reason=reason,
        bytes=1000,
        blobs=3,
        stall_s=stall,
        duration_s=4.0,
        written_bytes=400,
        route="direct",
    )


def test_read_history_counts_interruptions_restarts_and_run_time(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    attempts = [EventLog(run / EVENTS_FILE, RunIdentity("run", a, 100 + a)) for a in range(1, 6)]
    a1, a2, a3, a4, a5 = attempts
    # 1: a notice, the emergency save committed at the stop step: interrupted, lost nothing.
    _emit(a1, ev.RunStarted, 1000, url="run")
    _emit(a1, ev.RestoreFresh, 1001, skipped=0)
    _emit(a1, ev.Progress, 1050, step=10, epoch=0)
    _committed(a1, 1060, 10, "notice")
    _emit(a1, ev.RunExited, 1100, reason="preempted", step=10, exit_code=75)
    # 2: killed without a word: interrupted and lost work.
    _emit(a2, ev.RunStarted, 1200, url="run")
    _emit(a2, ev.RestoreCompleted, 1230, **_restored(10))
    _emit(a2, ev.Progress, 1300, step=15, epoch=0)
    # 3: a notice, but the emergency save did not commit (exit at 25, last commit 20): lost work.
    _emit(a3, ev.RunStarted, 1400, url="run")
    _emit(a3, ev.RestoreCompleted, 1420, **_restored(10))
    _committed(a3, 1500, 20, stall=1.5)
    _emit(a3, ev.RunExited, 1510, reason="preempted", step=25, exit_code=75)
    # 4: finished: not an interruption.
    _emit(a4, ev.RunStarted, 1600, url="run")
    _emit(a4, ev.RestoreCompleted, 1610, **_restored(20))
    _emit(a4, ev.RunExited, 1700, reason="finished", step=30, exit_code=0)
    # 5: stopped right after restoring: the restored step is the resume point, nothing lost.
    # Its restart does not count (the attempt before it finished).
    _emit(a5, ev.RunStarted, 1800, url="run")
    _emit(a5, ev.RestoreCompleted, 1805, **_restored(30))
    _emit(a5, ev.RunExited, 1806, reason="preempted", step=30, exit_code=75)
    for log in attempts:
        log.close()

    history = read_history(LocalStorage(run))
    assert history.attempts == 5
    assert history.interruptions == 4
    assert history.unnoticed == 2
    assert history.restart_s == pytest.approx([130.0, 120.0, 100.0])
    assert history.run_s == pytest.approx(100 + 100 + 110 + 100 + 6)
    assert history.last_step == 30
    assert [s.stall_s for s in history.saves] == [0.5, 1.5]
    assert history.saves[0].written_bytes == 400 and history.saves[0].route == "direct"

    # A new attempt sees all of it through its save context.
    ckpt = make_job(run, policy=young_daly(), notices=[]).ckpt
    assert ckpt.attempt == 6
    c = ckpt.save_context()
    assert (c.interruptions, c.unnoticed, c.restart_s) == (4, 2, 120.0)
    assert 416 <= c.run_s < 416 + 60
    assert c.stall_s == pytest.approx(1.0) and c.commit_s == pytest.approx(4.0)
    choice = ckpt.policy.choose(c)
    assert choice is not None
    reason = choice.reason
    assert "2 interruptions that lost work" in reason
    assert "d=4.000 s" in reason  # the median commit time
    ckpt.close()


def _restored(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": 0,
        "checkpoint": f"c{step}",
        "bytes": 1000,
        "duration_s": 0.1,
        "last_known_step": step,
        "replayed_steps": 0,
    }


def test_history_across_real_attempts_feeds_the_next_save_context(tmp_path: Path) -> None:
    policy = every(steps=5) | young_daly() | on_notice()
    with ProviderEmulator() as em:
        # Attempt 1: an AWS notice at step 7; the emergency save commits; exit 75.
        job = make_job(tmp_path, policy=policy, exit=fake_exit, notices=[AwsSpotNotices(env=em.env(), poll_s=0.05)])
        job.ckpt.restore()

        def on_step(step: int) -> None:
            time.sleep(0.002)
            if step == 7:
                em.aws_interrupt(in_s=120)
                wait_until(lambda: job.ckpt.stop_requested, "the AWS notice")

        with pytest.raises(Exited) as info:
            job.train(100, on_step=on_step)
        assert info.value.code == 75
    # Attempt 2: resumes, trains a little, and vanishes (no run_exited: killed without notice).
    second = make_job(tmp_path, policy=policy, notices=[])
    assert second.ckpt.restore() == 7
    second.train(9)
    second.ckpt.close()

    history = read_history(LocalStorage(tmp_path))
    assert history.attempts == 2
    assert (history.interruptions, history.unnoticed) == (2, 1)
    assert len(history.restart_s) == 1 and history.restart_s[0] >= 0
    assert history.run_s > 0 and history.last_step == 9
    assert {s.route for s in history.saves} == {"direct"} and len(history.saves) == 2  # 5 and the notice save at 7

    third = make_job(tmp_path, policy=policy, notices=[])
    assert third.ckpt.attempt == 3
    c = third.ckpt.save_context()
    assert (c.interruptions, c.unnoticed) == (2, 1)
    assert c.restart_s == history.restart_s[0]
    assert c.run_s >= history.run_s
    assert c.stall_s is not None and c.commit_s is not None
    assert "1 interruptions that lost work" in young_daly().choose(c).reason
    # With count="all" both interruptions count and the interval is shorter.
    assert young_daly(count="all").mtbi(c)[0] < young_daly().mtbi(c)[0]
    assert third.ckpt.restore() == 7  # attempt 2 saved nothing after step 7
    third.ckpt.close()


def test_the_default_notice_settings_apply_without_on_notice_in_the_policy(tmp_path: Path) -> None:
    with ProviderEmulator() as em:
        job = make_job(
            tmp_path, policy=every(steps=5), exit=fake_exit, notices=[AwsSpotNotices(env=em.env(), poll_s=0.05)]
        )
        assert job.ckpt.notice_settings == OnNotice()
        deadline: list[float] = []

        def on_step(step: int) -> None:
            time.sleep(0.002)
            if step == 7:
                job.ckpt.wait()
                deadline.append(em.aws_interrupt(in_s=120))
                wait_until(lambda: job.ckpt.stop_requested, "the AWS notice")

        with pytest.raises(Exited) as info:
            job.train(100, on_step=on_step)
    assert info.value.code == spotsafe.EXIT_PREEMPTED
    assert [(e.step, e.reason) for e in events(tmp_path, "save_committed")] == [(5, "interval"), (7, "notice")]
    [planned] = events(tmp_path, "emergency_planned")
    assert planned.deadline == deadline[0]
    assert "x 1.5 safety" in planned.reason  # the default safety factor
    assert planned.time_left_s is not None
    # time_left = deadline - now - 2 s (the default margin), now being the moment of planning
    assert planned.time_left_s == pytest.approx(deadline[0] - planned.time - 2.0, abs=1.0)
    assert planned.time_left_s < deadline[0] - planned.time - 1.0
