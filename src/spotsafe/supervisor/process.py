"""Starting and signalling job processes. The only module that does either.

A job runs in a session (process group) of its own, so that a "machine loss"
can be emulated by killing the whole group at once (the main process and its
data-loader workers), while a polite stop signals the main process only, as
Kubernetes and systemd do.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass
class Job:
    """A running job process."""

    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the main process, or to its whole process group."""
        try:
            if group:
                os.killpg(self.popen.pid, sig)
            else:
                self.popen.send_signal(sig)
        except ProcessLookupError:
            pass

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def reap_group(self) -> None:
        """Kill whatever is left of the job's process group (orphaned workers)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def launch(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
) -> Job:
    """Start ``command`` in a new session with ``env`` added to this process's environment."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    popen = subprocess.Popen(list(command), env=full_env, cwd=cwd, stdout=stdout, stderr=stderr, start_new_session=True)
    return Job(popen)


def describe_exit(code: int) -> str:
    """``0`` -> ``exit 0``; ``-9`` -> ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"
