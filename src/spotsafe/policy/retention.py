"""Which committed checkpoints to delete after a save.

The rules that nothing may break: the newest checkpoint known to be intact is never
deleted, however many newer (possibly broken) checkpoints exist; and no checkpoint is
deleted unless an intact one is newer than it. A damaged checkpoint with nothing intact
after it is the run's evidence (and may be all that is left of its progress): it stays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spotsafe.errors import ConfigError


@dataclass(frozen=True)
class Candidate:
    """A committed checkpoint as retention sees it. ``intact`` is ``None`` when not checked."""

    name: str
    step: int
    intact: bool | None


IntactCheck = Callable[[Candidate], bool]
"""Says whether a candidate is intact; asked only where ``Candidate.intact`` is ``None``."""


@dataclass(frozen=True)
class KeepLast:
    """Keep the newest ``n`` committed checkpoints, and always the newest intact one."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise ConfigError(f"keep must be an integer >= 1 (the newest checkpoint is always kept), got {self.n!r}")

    def to_delete(self, newest_first: Sequence[Candidate], check: IntactCheck | None = None) -> list[Candidate]:
        """Candidates to delete: beyond the newest ``n``, and older than the newest intact one.

        Walks newest first and asks ``check`` (for candidates whose ``intact`` is ``None``) only
        until the first intact candidate: usually the first one, the save just committed.
        Without ``check``, an unchecked candidate counts as not known to be intact. Nothing known
        intact: nothing is deleted.
        """
        if len(newest_first) <= self.n:
            return []
        for i, candidate in enumerate(newest_first):
            intact = candidate.intact
            if intact is None:
                intact = check(candidate) if check is not None else False
            if intact:
                return list(newest_first[max(i + 1, self.n) :])
        return []

    def describe(self) -> str:
        return f"keep the newest {self.n}"
