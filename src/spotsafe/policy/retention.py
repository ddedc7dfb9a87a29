"""Which committed checkpoints to delete after a save.

The rule that nothing may break: the newest checkpoint known to be intact is
never deleted, however many newer (possibly broken) checkpoints exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spotsafe.errors import ConfigError


@dataclass(frozen=True)
class Candidate:
    """A committed checkpoint as retention sees it. ``intact`` is ``None`` when not checked."""

    name: str
    step: int
    intact: bool | None


@dataclass(frozen=True)
class KeepLast:
    """Keep the newest ``n`` committed checkpoints, and always the newest intact one."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ConfigError(f"keep must be an integer >= 1 (the newest checkpoint is always kept), got {self.n!r}")

    def to_delete(self, newest_first: Sequence[Candidate]) -> list[Candidate]:
        """Candidates to delete. Only candidates beyond the newest ``n`` need an ``intact`` answer."""
        kept = list(newest_first[: self.n])
        older = list(newest_first[self.n :])
        if not any(c.intact for c in kept):
            for i, candidate in enumerate(older):
                if candidate.intact:
                    del older[i]
                    break
            else:
                # Nothing known intact: delete nothing rather than guess.
                return []
        return older

    def describe(self) -> str:
        return f"keep the newest {self.n}"
