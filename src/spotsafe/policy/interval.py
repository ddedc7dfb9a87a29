"""When to take a regular checkpoint: small policy values that compose with ``|``.

>>> policy = every(steps=500) | every(minutes=15) | on_notice(margin_s=5)

A policy looks only at a :class:`SaveContext` and answers yes or no, so it is
trivial to test and to combine. :meth:`SavePolicy.choose` says which interval the
policy currently wants and why (fixed ones always the same; the cost-based ones
in :mod:`spotsafe.policy.adaptive` recompute it from measured save costs and the
observed interruption rate), and the checkpointer records each new choice as an
``interval_chosen`` event. A notice always triggers the emergency save;
``on_notice()`` only tunes how.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from spotsafe.checks import check_instance, check_int, check_number
from spotsafe.errors import ConfigError

_COMBINE = "a save policy (every(...), max_loss(...), young_daly(), on_notice(...))"


@dataclass(frozen=True, kw_only=True)
class SaveContext:
    """What a policy may look at, after the training loop finished ``step``.

    Measured values are ``None`` until known: ``stall_s`` (median time training waited
    per save), ``commit_s`` (median time from the start of a save until it is durable),
    ``restart_s`` (median time from the end of an attempt to the restored state of the
    next). ``run_s`` is the run's time so far across attempts; ``interruptions`` the
    attempts that ended without finishing, ``unnoticed`` those that lost work (killed
    without an emergency checkpoint).
    """

    step: int
    steps_since_save: int
    seconds_since_save: float
    stall_s: float | None = None
    commit_s: float | None = None
    restart_s: float | None = None
    run_s: float = 0.0
    interruptions: int = 0
    unnoticed: int = 0


@dataclass(frozen=True)
class Choice:
    """The interval a policy wants now: ``seconds`` and/or ``steps`` between saves, and why."""

    seconds: float | None
    steps: int | None
    reason: str

    def differs(self, other: Choice | None, tolerance: float = 0.25) -> bool:
        """Whether this choice is news compared with ``other`` (a new kind, or an interval >25% apart)."""
        if other is None or self.steps != other.steps or (self.seconds is None) != (other.seconds is None):
            return True
        if self.seconds is None or other.seconds is None:
            return False
        return abs(self.seconds - other.seconds) > tolerance * max(other.seconds, 1e-9)


class SavePolicy(ABC):
    """Decides whether to checkpoint after a step."""

    @abstractmethod
    def should_save(self, ctx: SaveContext) -> bool: ...

    @abstractmethod
    def describe(self) -> str:
        """A short human-readable reason, used in events."""

    def choose(self, ctx: SaveContext) -> Choice | None:
        """The interval this policy wants in ``ctx``, or ``None`` when it has none."""
        return None

    def parts(self) -> tuple[SavePolicy, ...]:
        """The policies this one is made of (itself, unless it is a composition)."""
        return (self,)

    @property
    def steps_only(self) -> bool:
        """Whether the decision depends on step counts alone (the same on every rank of a job)."""
        return False

    def __or__(self, other: SavePolicy) -> SavePolicy:
        check_instance("a policy combined with |", other, SavePolicy, _COMBINE)
        return AnyOf((self, other))


@dataclass(frozen=True)
class EverySteps(SavePolicy):
    steps: int

    def __post_init__(self) -> None:
        check_int("every(steps=...)", self.steps, at_least=1)

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.steps_since_save >= self.steps

    def describe(self) -> str:
        return f"every {self.steps} steps"

    def choose(self, ctx: SaveContext) -> Choice:
        return Choice(None, self.steps, f"fixed: every {self.steps} steps")

    @property
    def steps_only(self) -> bool:
        return True


@dataclass(frozen=True)
class EverySeconds(SavePolicy):
    seconds: float

    def __post_init__(self) -> None:
        check_number("every(seconds=...)", self.seconds, above=0, unit="seconds")

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.steps_since_save > 0 and ctx.seconds_since_save >= self.seconds

    def describe(self) -> str:
        return f"every {self.seconds:g} s"

    def choose(self, ctx: SaveContext) -> Choice:
        return Choice(self.seconds, None, f"fixed: every {self.seconds:g} s of work")


@dataclass(frozen=True)
class Never(SavePolicy):
    """No regular checkpoints (only on notices, at the end, or when asked)."""

    def should_save(self, ctx: SaveContext) -> bool:
        return False

    def describe(self) -> str:
        return "never"

    @property
    def steps_only(self) -> bool:
        return True


@dataclass(frozen=True)
class AnyOf(SavePolicy):
    policies: tuple[SavePolicy, ...]

    def __post_init__(self) -> None:
        for i, policy in enumerate(self.policies):
            check_instance(f"AnyOf.policies[{i}]", policy, SavePolicy, _COMBINE)

    def should_save(self, ctx: SaveContext) -> bool:
        return any(p.should_save(ctx) for p in self.policies)

    def describe(self) -> str:
        return " or ".join(p.describe() for p in self.policies)

    def parts(self) -> tuple[SavePolicy, ...]:
        return tuple(part for p in self.policies for part in p.parts())

    def __or__(self, other: SavePolicy) -> SavePolicy:
        check_instance("a policy combined with |", other, SavePolicy, _COMBINE)
        return AnyOf((*self.policies, other))


def every(*, steps: int | None = None, seconds: float | None = None, minutes: float | None = None) -> SavePolicy:
    """A policy that saves after ``steps`` steps and/or after a wall-clock interval."""
    parts: list[SavePolicy] = []
    if steps is not None:
        parts.append(EverySteps(steps))
    for name, value in (("seconds", seconds), ("minutes", minutes)):
        check_number(f"every({name}=...)", value, above=0, allow_none=True)
    if seconds is not None or minutes is not None:
        parts.append(EverySeconds((seconds or 0.0) + 60.0 * (minutes or 0.0)))
    if not parts:
        raise ConfigError("every() needs steps=, seconds= or minutes=")
    return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))
