"""``spotsafe demo``: prove bit-exact resume on this machine.

1. Run the job once, uninterrupted (the reference: :func:`spotsafe.supervisor.reference.run_reference`).
2. Run it again under the supervisor while interrupting it repeatedly (SIGTERM, SIGKILL and emulated AWS and
   Azure notices, at random moments and in the middle of saves: :class:`~spotsafe.supervisor.chaos.ChaosRun`),
   resuming each time, until it finishes.
3. Compare the final checkpoints of both runs bit for bit, and summarise what
   happened from the interrupted run's event log.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spotsafe.storage.registry import open_storage
from spotsafe.supervisor.chaos import DEFAULT_MODES, ChaosResult, ChaosRun, KillMode
from spotsafe.supervisor.reference import compare_final, run_reference
from spotsafe.telemetry.runmodel import RunModel
from spotsafe.telemetry.store import read_run_events

DEFAULT_COMMAND = (
    "{python} examples/tiny_lm.py --steps 600 --save-every 40 --progress-interval 0 --storage-latency 0.05"
)


@dataclass
class DemoSummary:
    reference_seconds: float
    interrupted_seconds: float
    chaos: ChaosResult
    checkpoints_committed: int
    emergency_saves: int
    steps_replayed: int
    partial_saves_removed: int
    fallbacks: int
    final_step_reference: int | None
    final_step_interrupted: int | None
    component_diffs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return (
            self.final_step_reference is not None
            and self.final_step_reference == self.final_step_interrupted
            and bool(self.component_diffs)
            and not any(self.component_diffs.values())
        )


def summarise(run: str | Path, chaos: ChaosResult, ref_s: float, int_s: float, reference: Path) -> DemoSummary:
    """The demo's figures: the interrupted run's model (as ``spotsafe report`` reads it) and the final comparison."""
    model = RunModel.fold(read_run_events(open_storage(run)), series=False)
    ref_step, int_step, diffs = compare_final(reference, run)
    return DemoSummary(
        reference_seconds=ref_s,
        interrupted_seconds=int_s,
        chaos=chaos,
        checkpoints_committed=len(model.checkpoints),
        emergency_saves=model.emergency_checkpoints,
        steps_replayed=model.replayed_total,
        partial_saves_removed=model.partials_removed,
        fallbacks=model.skipped,
        final_step_reference=ref_step,
        final_step_interrupted=int_step,
        component_diffs=diffs,
    )


def run_demo(
    command: Sequence[str],
    workdir: Path,
    *,
    modes: Sequence[KillMode] = DEFAULT_MODES,
    seed: int = 0,
    max_delay: float = 3.0,
    log: Callable[[str], None] = print,
) -> DemoSummary:
    """Run the whole demo in ``workdir`` (emptied first)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    reference, interrupted = workdir / "reference", workdir / "interrupted"
    log(f"reference run: {' '.join(command)}")
    ref_s = run_reference(command, reference)
    log(f"reference run finished in {ref_s:.1f} s; now the same job with {len(modes)} interruptions")
    started = time.monotonic()
    chaos = ChaosRun(command, interrupted, modes=modes, seed=seed, max_delay=max_delay, log=log).run()
    int_s = time.monotonic() - started
    return summarise(interrupted, chaos, ref_s, int_s, reference)


def default_command() -> list[str]:
    return DEFAULT_COMMAND.format(python=sys.executable).split()


DRILL_COMMAND = (
    "{python} examples/tiny_lm.py --steps 2000 --save-every 100 --progress-interval 0 --storage-latency 0.05"
)


def default_drill_command() -> list[str]:
    """The example job ``spotsafe drill`` runs when given no command."""
    return DRILL_COMMAND.format(python=sys.executable).split()
