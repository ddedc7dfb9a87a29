"""Starting and signalling job processes. The only module that does either.

A job runs in a session (process group) of its own, so that a "machine loss"
can be emulated by killing the whole group at once (the main process and its
data-loader workers), while a polite stop signals the main process only, as
Kubernetes and systemd do. A signal to the group also reaches the processes the
job started in sessions of their own (:func:`signal_tree`): torchrun starts each
rank so, and a "lost machine" whose ranks trained on would be no loss at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

PR_SET_PDEATHSIG = 1
TAIL_BYTES = 64 * 1024


class _Tee:
    """Copies a pipe to ``fd`` on a thread, keeping its last :data:`TAIL_BYTES`."""

    def __init__(self, pipe: io.BufferedReader, fd: int | None) -> None:
        self._pipe, self._fd = pipe, fd
        self._tail = bytearray()
        self._thread = threading.Thread(target=self._run, name="spotsafe-tee", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while chunk := self._pipe.read1(65536):
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.write(self._fd, chunk)
            self._tail += chunk
            del self._tail[:-TAIL_BYTES]
        self._pipe.close()

    def text(self) -> str:
        self._thread.join(timeout=5.0)  # the process has exited: the pipe ends soon (unless a child holds it)
        return bytes(self._tail).decode(errors="replace")


@dataclass
class Job:
    """A running job process."""

    popen: subprocess.Popen[bytes]
    tee: _Tee | None = None

    def output_tail(self) -> str:
        """The end of its output, when it was launched with ``keep_tail`` ("" otherwise)."""
        return self.tee.text() if self.tee is not None else ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int, *, group: bool = False) -> None:
        """Send ``sig`` to the main process, or to every process of the job (:func:`signal_tree`)."""
        if group:
            signal_tree(self.popen.pid, sig, below=self.popen.returncode is None)
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def reap_group(self) -> None:
        """Kill whatever is left of the job's processes (orphaned workers)."""
        self.signal(signal.SIGKILL, group=True)


def signal_tree(pid: int, sig: int, *, below: bool = True) -> None:
    """Send ``sig`` to the process group that ``pid`` leads and (``below``) to every process below ``pid`` outside it.

    Those below are listed first (once ``pid`` is gone they belong to no one); one that leads a group of its own
    gets the signal as a group, so the data-loader workers it starts on the way get it too. A process that the
    job's processes left behind before this looked (its parent exited first) is not found. ``below=False`` where
    ``pid`` may no longer be the job's (it has been reaped, and the number may be another process's by now).
    """
    try:
        procs = psutil.Process(pid).children(recursive=True) if below else []
    except psutil.Error:
        procs = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    for proc in procs:
        with contextlib.suppress(psutil.Error, OSError):
            group = os.getpgid(proc.pid)
            if group == pid:
                continue  # signalled with the job's group
            if group == proc.pid and proc.is_running():  # the same process as listed, not a reused pid
                os.killpg(group, sig)
            else:
                proc.send_signal(sig)  # psutil checks that the pid is still that process


def launch(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    parent_death_signal: int | None = None,
    keep_tail: bool = False,
) -> Job:
    """Start ``command`` in a new session with ``env`` added to this process's environment.

    ``parent_death_signal`` (Linux): the signal the job's main process gets if this process dies,
    however it dies. A supervisor passes SIGTERM, so that a job never outlives it unsupervised:
    it saves and exits, and the supervisor started again relaunches it.

    ``keep_tail``: stdout and stderr go through a pipe to ``stdout`` (this process's stdout if ``None``),
    and the job keeps their last bytes (:meth:`Job.output_tail`), to recognise a launcher's errors.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    preexec = None
    if parent_death_signal is not None and sys.platform.startswith("linux"):
        preexec = functools.partial(_die_with_parent, os.getpid(), parent_death_signal)
    popen = subprocess.Popen(
        list(command),
        env=full_env,
        cwd=cwd,
        stdout=subprocess.PIPE if keep_tail else stdout,
        stderr=subprocess.STDOUT if keep_tail else stderr,
        start_new_session=True,
        preexec_fn=preexec,  # only prctl and getppid run between fork and exec (no locks taken)
    )
    if not keep_tail:
        return Job(popen)
    assert popen.stdout is not None
    target = None if stdout == subprocess.DEVNULL else (stdout if stdout is not None else sys.stdout.fileno())
    return Job(popen, _Tee(popen.stdout, target))  # type: ignore[arg-type]


def _die_with_parent(parent: int, sig: int) -> None:
    """In the child, before exec: ask the kernel for ``sig`` when the parent dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def describe_exit(code: int) -> str:
    """``0`` -> ``exit 0``; ``-9`` -> ``killed by SIGKILL``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"
