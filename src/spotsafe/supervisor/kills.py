"""What the chaos run does to a job and what came of it: the kill modes, one interruption's record, the result.

:mod:`spotsafe.supervisor.chaos` delivers the kills (through the supervisor's loop); ``spotsafe demo``
chooses the modes and prints the result.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field

from spotsafe.exit_codes import EXIT_PREEMPTED, EXIT_SUCCESS


class KillMode(enum.Enum):
    """How one interruption is delivered, and what the job must do about it."""

    SIGTERM = "sigterm"
    """SIGTERM to the main process only (Kubernetes, systemd): save and exit 75."""
    SIGTERM_GROUP = "sigterm-group"
    """SIGTERM to every process of the job, workers included (an OS shutdown): save and exit 75."""
    SIGTERM_TWICE = "sigterm-twice"
    """SIGTERM, then SIGTERM again while the emergency save runs: still one clean save, exit 75."""
    SIGKILL = "sigkill"
    """SIGKILL to every process at a random moment (the machine is gone): resume from the last commit."""
    SIGKILL_IN_SAVE = "sigkill-in-save"
    """SIGKILL to every process while a checkpoint is being written: that save must never be used."""
    AWS_NOTICE = "aws-notice"
    """An AWS spot interruption notice on the emulated IMDS, SIGKILL at its deadline: save in time, exit 75."""
    AZURE_NOTICE = "azure-notice"
    """An Azure ``Preempt`` scheduled event, SIGKILL at its ``NotBefore``: save in time, exit 75."""

    @property
    def is_notice(self) -> bool:
        return self in (KillMode.AWS_NOTICE, KillMode.AZURE_NOTICE)

    @property
    def expected_exit(self) -> int:
        return -signal.SIGKILL if self in (KillMode.SIGKILL, KillMode.SIGKILL_IN_SAVE) else EXIT_PREEMPTED


DEFAULT_MODES: tuple[KillMode, ...] = (
    KillMode.SIGTERM,
    KillMode.SIGKILL_IN_SAVE,
    KillMode.AWS_NOTICE,
    KillMode.SIGKILL,
    KillMode.SIGTERM_TWICE,
    KillMode.SIGKILL_IN_SAVE,
    KillMode.AZURE_NOTICE,
    KillMode.SIGTERM_GROUP,
)


@dataclass(frozen=True)
class Interruption:
    attempt: int
    mode: KillMode
    exit_code: int
    step: int | None
    """The last step the attempt reported before the kill (None if it reported none)."""
    in_save: bool
    """The kill left a save folder without a manifest: it landed in the middle of a save."""
    as_expected: bool


@dataclass
class ChaosResult:
    interruptions: list[Interruption] = field(default_factory=list)
    attempts: int = 0
    final_exit: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.final_exit == EXIT_SUCCESS and not self.problems
