"""What an attempt's exit means, so the supervisor knows whether and how to go on.

=================  ========================================================  ===============
class              when                                                      counts against
=================  ========================================================  ===============
``succeeded``      exit 0                                                    (done)
``preempted``      exit 75 (a notice: saved or kept a verified checkpoint,   preemptions
                   or a stop held during start-up: nothing new to save)
``killed``         killed by a signal from outside: a lost machine           preemptions
                   (SIGKILL), or a stop signal before it could react
                   (:data:`STOP_SIGNALS`, e.g. in start-up without
                   ``protect_startup()``); as the signal, or as 128 + N
                   through a shell (137, 143)
``out_of_memory``  killed while the cgroup's ``oom_kill`` counter went up    errors
``no_progress``    stopped by the supervisor: no progress for too long       errors
``crashed``        any other exit (an exception: 1, a native crash: SIGSEGV) errors
``usage``          exit 2: the command or its configuration is wrong         (give up)
``no_usable_       exit 65: the run has committed checkpoints and none can   (give up)
checkpoint``       be restored; a relaunch would meet the same ones
``no_capacity``    a pool's launcher could not get a machine (its exit code  (failover)
                   or output says so; the job never started)
=================  ========================================================  ===============

The kernel's OOM killer sends SIGKILL like any other; only the memory cgroup's
``oom_kill`` counter (``memory.events`` on cgroup v2, ``memory.oom_control`` on v1)
tells the two apart, so the supervisor reads it before and after each attempt.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Callable

from spotsafe.exit_codes import EXIT_NO_USABLE_CHECKPOINT, EXIT_PREEMPTED, EXIT_SUCCESS, EXIT_USAGE

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1})
"""Signals that stop a job from outside, not a fault: a shutdown or a pod deletion, Ctrl-C, a closed terminal,
Slurm's warning (``--signal=USR1@N``)."""


class ExitClass(enum.Enum):
    SUCCEEDED = "succeeded"
    PREEMPTED = "preempted"
    KILLED = "killed"
    OUT_OF_MEMORY = "out_of_memory"
    NO_PROGRESS = "no_progress"
    CRASHED = "crashed"
    USAGE = "usage"
    NO_USABLE_CHECKPOINT = "no_usable_checkpoint"
    NO_CAPACITY = "no_capacity"

    @property
    def is_preemption(self) -> bool:
        """Counted against the preemption budget (the machine went away; the job did nothing wrong)."""
        return self in (ExitClass.PREEMPTED, ExitClass.KILLED)

    @property
    def is_error(self) -> bool:
        """Counted against the error budget (the job itself failed)."""
        return self in (ExitClass.OUT_OF_MEMORY, ExitClass.NO_PROGRESS, ExitClass.CRASHED)


def classify(code: int, *, oom_kills: int = 0, stalled: bool = False) -> ExitClass:
    """The class of an exit ``code`` (negative: killed by that signal, as :mod:`subprocess` reports it).

    ``oom_kills`` is how many OOM kills the job's cgroup counted during the attempt; ``stalled``
    says the supervisor itself stopped the job for lack of progress.
    """
    if stalled:
        return ExitClass.NO_PROGRESS
    if code == EXIT_SUCCESS:
        return ExitClass.SUCCEEDED
    if code == EXIT_PREEMPTED:
        return ExitClass.PREEMPTED
    if code == EXIT_USAGE:
        return ExitClass.USAGE
    if code == EXIT_NO_USABLE_CHECKPOINT:
        return ExitClass.NO_USABLE_CHECKPOINT
    if code == -signal.SIGKILL or code == 128 + signal.SIGKILL:
        return ExitClass.OUT_OF_MEMORY if oom_kills > 0 else ExitClass.KILLED
    if (code < 0 and -code in STOP_SIGNALS) or code - 128 in STOP_SIGNALS:
        return ExitClass.KILLED  # stopped from outside before it could react (128 + N: through a shell)
    return ExitClass.CRASHED


def _cgroup_dirs(proc_cgroup: str, root: str) -> list[str]:
    """Memory cgroup folders of this process: the v2 unified one, or the v1 ``memory`` one."""
    dirs = []
    try:
        with open(proc_cgroup, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            dirs.append(os.path.join(root, path.lstrip("/")))
        elif "memory" in controllers.split(","):
            dirs.append(os.path.join(root, "memory", path.lstrip("/")))
    return dirs


def oom_kill_counter(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Callable[[], int]:
    """A function that reads the memory cgroup's OOM-kill count (0 where the system does not say).

    The job runs in the supervisor's cgroup, so the supervisor's own counter is the job's.
    """
    files = []
    for folder in _cgroup_dirs(proc_cgroup, root):
        files += [os.path.join(folder, "memory.events"), os.path.join(folder, "memory.oom_control")]

    def read() -> int:
        for name in files:
            try:
                with open(name, encoding="utf-8") as handle:
                    for line in handle:
                        key, _, value = line.partition(" ")
                        if key == "oom_kill":
                            return int(value)
            except (OSError, ValueError):
                continue
        return 0

    return read
