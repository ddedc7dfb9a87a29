"""The per-step decision is a pure function: no processes, no storage, no clocks."""

from __future__ import annotations

import dataclasses

import pytest

from spotsafe import every, on_notice
from spotsafe.engine.agreement import ExchangeFlags
from spotsafe.engine.step_decision import NOTHING_TO_DO, Exchange, StepAction, StepContext, decide, flags_to_post
from spotsafe.policy.interval import Never, SaveContext, SavePolicy
from spotsafe.reasons import SaveReason

INTERVAL, WARNING = SaveReason.INTERVAL, SaveReason.WARNING


def seen(step: int, *, since_steps: int | None = None, since_s: float = 0.0) -> SaveContext:
    return SaveContext(
        step=step, steps_since_save=step if since_steps is None else since_steps, seconds_since_save=since_s
    )


def ctx(step: int = 10, policy: SavePolicy | None = None, **fields: object) -> StepContext:
    base = StepContext(step=step, policy=policy or Never(), save=seen(step), last_save_step=None)
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


# -- one process ----------------------------------------------------------------------------------------------------


def test_nothing_due_does_nothing() -> None:
    assert decide(ctx(policy=every(steps=50))) == NOTHING_TO_DO == StepAction()


def test_an_interval_save_when_the_policy_says_so_then_a_second_look_at_notices() -> None:
    action = decide(ctx(step=50, policy=every(steps=50), save=seen(50)))
    assert action == StepAction(saves=(INTERVAL,), recheck=True)
    assert decide(ctx(step=60, policy=every(minutes=1), save=seen(60, since_s=61.0))).saves == (INTERVAL,)
    assert decide(ctx(step=60, policy=every(minutes=1), save=seen(60, since_s=59.0))) == NOTHING_TO_DO


def test_a_warning_saves_with_warnings_save_and_is_ignored_otherwise() -> None:
    assert decide(ctx(warning=True)) == StepAction(saves=(WARNING,))
    assert decide(ctx(warning=True, warnings_save=False)) == NOTHING_TO_DO
    # a warning save replaces the interval save of the same step
    assert decide(ctx(step=50, policy=every(steps=50), warning=True)).saves == (WARNING,)


def test_a_stop_notice_stops_with_its_deadline_and_nothing_else() -> None:
    action = decide(ctx(stop=True, deadline=1234.5, warning=True, policy=every(steps=1)))
    assert action == StepAction(stop=True, deadline=1234.5)
    assert decide(ctx(stop=True)).deadline is None


def test_a_warning_at_a_step_already_saved_saves_nothing_more() -> None:
    assert decide(ctx(step=7, last_save_step=7, warning=True)) == NOTHING_TO_DO
    assert decide(ctx(step=7, last_save_step=6, warning=True)).saves == (WARNING,)


# -- several ranks --------------------------------------------------------------------------------------------------

BETWEEN = Exchange(due=False)


def together(agreed: ExchangeFlags | None = None, **fields: object) -> StepContext:
    return ctx(exchange=Exchange(due=True, agreed=agreed or ExchangeFlags()), **fields)


def test_between_exchanges_notices_and_wall_clock_policies_wait_for_the_next_exchange() -> None:
    policy = every(minutes=1) | on_notice()
    waiting = ctx(policy=policy, save=seen(10, since_s=3600.0), stop=True, warning=True, exchange=BETWEEN)
    assert decide(waiting) == NOTHING_TO_DO  # no stop, no save, no post: the other ranks would not know


def test_step_count_policies_save_at_once_on_every_rank_even_between_exchanges() -> None:
    policy = every(steps=10) | every(minutes=1)
    assert decide(ctx(policy=policy, exchange=BETWEEN)) == StepAction(saves=(INTERVAL,))
    assert decide(ctx(step=11, policy=policy, save=seen(11, since_steps=1), exchange=BETWEEN)) == NOTHING_TO_DO
    # the steps-only part saves; the wall-clock part would only be posted
    assert decide(together(policy=policy, save=seen(10, since_s=3600.0))) == StepAction(saves=(INTERVAL,), post=True)


def test_an_exchange_step_acts_on_what_the_ranks_agreed_and_then_posts() -> None:
    assert decide(together()) == StepAction(post=True)
    assert decide(together(ExchangeFlags(save=True))) == StepAction(saves=(INTERVAL,), post=True)
    assert decide(together(ExchangeFlags(save=True, warning=True))) == StepAction(saves=(WARNING,), post=True)
    # what this rank saw itself is not acted on before the others know: it is posted
    assert decide(together(stop=True, warning=True)) == StepAction(post=True)
    assert decide(ctx(exchange=Exchange(due=True, agreed=None))) == StepAction(post=True)  # the first exchange


def test_an_agreed_stop_stops_every_rank_at_the_same_step() -> None:
    action = decide(together(ExchangeFlags(stop=True, deadline=99.0, save=True)))
    assert action == StepAction(stop=True, deadline=99.0)
    steps_due = together(ExchangeFlags(stop=True), policy=every(steps=10))
    assert decide(steps_due) == StepAction(saves=(INTERVAL,), stop=True)  # the stop then finds it saved


def test_an_agreed_save_is_skipped_at_a_step_already_saved_and_comes_after_a_steps_save() -> None:
    assert decide(together(ExchangeFlags(save=True), last_save_step=10)) == StepAction(post=True)
    both = together(ExchangeFlags(warning=True), policy=every(steps=10))
    assert decide(both).saves == (INTERVAL, WARNING)  # the warning save only if the interval one is deferred


@pytest.mark.parametrize(("since_s", "due"), [(30.0, False), (61.0, True)])
def test_the_flags_to_post_ask_for_a_save_only_for_wall_clock_policies(since_s: float, due: bool) -> None:
    policy = every(steps=1) | every(minutes=1)
    flags = flags_to_post(policy, seen(10, since_s=since_s), stop=True, warning=False, deadline=5.0)
    assert flags == ExchangeFlags(stop=True, warning=False, save=due, deadline=5.0)


def test_the_decision_reads_nothing_but_its_context() -> None:
    context = together(ExchangeFlags(save=True), policy=every(steps=3))
    assert decide(context) == decide(context) == decide(dataclasses.replace(context))
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.step = 11  # type: ignore[misc]
