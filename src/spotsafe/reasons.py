"""Why a save happened and why a run ended: the values that events, policies and reports share.

They are :class:`~enum.StrEnum` members, so they equal the plain strings that older event logs
hold (``SaveReason.NOTICE == "notice"``) and serialise to them unchanged; events gain values,
never rename them.
"""

from __future__ import annotations

from enum import StrEnum


class SaveReason(StrEnum):
    """Why a checkpoint was written (the ``reason`` of ``save_started``/``save_staged``/``save_committed``)."""

    MANUAL = "manual"  # Checkpointer.save() called by the user
    INTERVAL = "interval"  # the save policy said it was time
    WARNING = "warning"  # an early warning (a rebalance recommendation) with on_notice(warnings="save")
    NOTICE = "notice"  # the emergency save after a stop notice
    FINAL = "final"  # Checkpointer.finish()


class ExitReason(StrEnum):
    """Why a job process ended (the ``reason`` of ``run_exited``).

    ``finished`` exits 0; ``preempted`` exits 75 after the emergency save (or keeping the last one);
    ``no_usable_checkpoint`` exits 65 when committed checkpoints exist and none can be restored;
    ``world_size_mismatch`` exits 2 when they were written by another number of processes.
    """

    FINISHED = "finished"
    PREEMPTED = "preempted"
    NO_USABLE_CHECKPOINT = "no_usable_checkpoint"
    WORLD_SIZE_MISMATCH = "world_size_mismatch"


NOT_STOPPED = frozenset({ExitReason.FINISHED, ExitReason.NO_USABLE_CHECKPOINT, ExitReason.WORLD_SIZE_MISMATCH})
"""Outcomes of an attempt that was not stopped from outside: it finished, or it refused to go on by itself."""


__all__ = ["NOT_STOPPED", "ExitReason", "SaveReason"]
