"""The one backoff shared by storage retries and relaunches: same waits for the same seed, caps, budget."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from spotsafe.backoff import Backoff
from spotsafe.errors import ConfigError
from spotsafe.storage.retry import StorageRetry
from spotsafe.supervisor.retry import RelaunchPolicy


def test_delays_are_the_capped_exponential_with_full_jitter_drawn_once_per_call() -> None:
    backoff = Backoff(initial_s=0.5, multiplier=3.0, max_delay_s=4.0)
    assert [backoff.ceiling(n) for n in range(0, 5)] == [0.0, 0.5, 1.5, 4.0, 4.0]
    ours, reference = random.Random(11), random.Random(11)
    for n in range(1, 40):
        assert backoff.delay(n, ours) == reference.uniform(0.0, min(4.0, 0.5 * 3.0 ** (n - 1)))
    assert backoff.delay(0, ours) == 0.0 and backoff.delay(-3, ours) == 0.0
    assert ours.random() == reference.random(), "no failure, no draw"


def test_storage_and_relaunch_draw_the_same_waits_as_before_for_a_seed() -> None:
    storage = StorageRetry(initial=0.1, multiplier=2.0, max_delay=10.0)
    relaunch = RelaunchPolicy(initial_s=1.0, max_delay_s=60.0)
    rng, reference = random.Random(3), random.Random(3)
    for n in range(1, 30):
        assert storage.backoff.delay(n, rng) == reference.uniform(0.0, min(10.0, 0.1 * 2.0 ** (n - 1)))
        assert relaunch.backoff.delay(n, rng) == reference.uniform(0.0, min(60.0, 1.0 * 2 ** min(n - 1, 30)))


def test_the_policies_are_backoff_values_underneath() -> None:
    assert StorageRetry(budget_s=7.0, initial=0.2, multiplier=1.5, max_delay=3.0).backoff == Backoff(
        initial_s=0.2, multiplier=1.5, max_delay_s=3.0, budget_s=7.0
    )
    assert RelaunchPolicy(initial_s=5.0, max_delay_s=600.0).backoff == Backoff(initial_s=5.0, max_delay_s=600.0)
    assert RelaunchPolicy().backoff.budget_s == math.inf, "relaunches are limited by counts, not by time"


def test_a_very_long_run_of_failures_stays_at_the_cap() -> None:
    assert Backoff(initial_s=1.0, max_delay_s=30.0).ceiling(5_000) == 30.0
    assert Backoff(initial_s=0.0, max_delay_s=30.0).ceiling(5_000) == 0.0
    assert Backoff(initial_s=1.0, max_delay_s=math.inf).ceiling(5_000) == math.inf


def test_the_budget_bounds_when_the_last_retry_may_start() -> None:
    backoff = Backoff(initial_s=1.0, max_delay_s=1.0, budget_s=10.0)
    assert backoff.allows(spent_s=8.0, delay_s=2.0)
    assert not backoff.allows(spent_s=8.5, delay_s=2.0)
    assert Backoff(initial_s=1.0, max_delay_s=1.0).allows(spent_s=1e12, delay_s=1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_s": -1.0},
        {"initial_s": math.inf},
        {"max_delay_s": -1.0},
        {"multiplier": 0.5},
        {"budget_s": -0.1},
        {"budget_s": True},
    ],
)
def test_bad_values_are_config_errors_that_name_the_field(kwargs: dict[str, Any]) -> None:
    values: dict[str, Any] = {"initial_s": 1.0, "max_delay_s": 2.0, **kwargs}
    with pytest.raises(ConfigError, match=f"Backoff.{next(iter(kwargs))}"):
        Backoff(**values)
