"""When to take a regular checkpoint: small policy values that compose with ``|``.

>>> policy = every(steps=500) | every(minutes=15)

A policy looks only at a :class:`SaveContext` and answers yes or no, so it is
trivial to test and to combine. Interruption notices are not a policy: a
notice always triggers the emergency save.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from spotsafe.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class SaveContext:
    """What a policy may look at, after the training loop finished ``step``."""

    step: int
    steps_since_save: int
    seconds_since_save: float


class SavePolicy(ABC):
    """Decides whether to checkpoint after a step."""

    @abstractmethod
    def should_save(self, ctx: SaveContext) -> bool: ...

    @abstractmethod
    def describe(self) -> str:
        """A short human-readable reason, used in events."""

    def __or__(self, other: SavePolicy) -> SavePolicy:
        return AnyOf((self, other))


@dataclass(frozen=True)
class EverySteps(SavePolicy):
    steps: int

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise ConfigError(f"every(steps=...) needs a positive integer, got {self.steps!r}")

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.steps_since_save >= self.steps

    def describe(self) -> str:
        return f"every {self.steps} steps"


@dataclass(frozen=True)
class EverySeconds(SavePolicy):
    seconds: float

    def __post_init__(self) -> None:
        if not isinstance(self.seconds, (int, float)) or isinstance(self.seconds, bool) or not self.seconds > 0:
            raise ConfigError(f"every(seconds=...) needs a positive number, got {self.seconds!r}")

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.steps_since_save > 0 and ctx.seconds_since_save >= self.seconds

    def describe(self) -> str:
        return f"every {self.seconds:g} s"


@dataclass(frozen=True)
class Never(SavePolicy):
    """No regular checkpoints (only on notices, at the end, or when asked)."""

    def should_save(self, ctx: SaveContext) -> bool:
        return False

    def describe(self) -> str:
        return "never"


@dataclass(frozen=True)
class AnyOf(SavePolicy):
    policies: tuple[SavePolicy, ...]

    def should_save(self, ctx: SaveContext) -> bool:
        return any(p.should_save(ctx) for p in self.policies)

    def describe(self) -> str:
        return " or ".join(p.describe() for p in self.policies)

    def __or__(self, other: SavePolicy) -> SavePolicy:
        return AnyOf((*self.policies, other))


def every(*, steps: int | None = None, seconds: float | None = None, minutes: float | None = None) -> SavePolicy:
    """A policy that saves after ``steps`` steps and/or after a wall-clock interval."""
    parts: list[SavePolicy] = []
    if steps is not None:
        parts.append(EverySteps(steps))
    for name, value in (("seconds", seconds), ("minutes", minutes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ConfigError(f"every({name}=...) needs a positive number, got {value!r}")
    if seconds is not None or minutes is not None:
        parts.append(EverySeconds((seconds or 0.0) + 60.0 * (minutes or 0.0)))
    if not parts:
        raise ConfigError("every() needs steps=, seconds= or minutes=")
    return parts[0] if len(parts) == 1 else AnyOf(tuple(parts))
