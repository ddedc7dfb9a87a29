"""Live status of supervised jobs on the terminal (``spotsafe run``, ``spotsafe drill``).

Three parts, each usable alone:

* :class:`LiveState` turns a run's events into what the job is doing right now (a pure
  state machine: no I/O, no clock).
* :class:`EventFollower` polls a run's event log(s) on a background thread: the local
  ``events.jsonl`` (or the supervisor's spool file, :class:`FileSource`), and for jobs
  that run on other machines the parts they upload to the run's storage (:class:`StorageSource`).
* :class:`LiveStatus` draws one rich progress line per phase on stderr. While it is
  shown, this process's stderr (and stdout, when it is the same terminal) goes through a
  pseudo-terminal, so that the supervisor's lines and the job's own output (which
  inherits them) scroll above the status lines instead of tearing them.

Shown when stderr is a terminal, or as ``--progress/--no-progress`` say; when it is off
nothing of this runs and the output is exactly what it was.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import logging
import os
import re
import selectors
import signal
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any, Protocol

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text

from spotsafe.supervisor.process import describe_exit
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import EVENTS_FILE, LoggedEvent, parse_lines

if TYPE_CHECKING:
    from spotsafe.storage.base import Storage
    from spotsafe.supervisor.market import Market
    from spotsafe.supervisor.run import RunConfig

log = logging.getLogger("spotsafe")

# -- on or off ------------------------------------------------------------------------------------------------------


def wants_progress(progress: bool | None, console: Console) -> bool:
    """Whether to show progress on ``console``: when it is a terminal, unless ``--progress/--no-progress`` say."""
    return console.is_terminal if progress is None else progress


def bar_console(progress: bool | None, console: Console) -> Console | None:
    """Where bars go: ``console`` when it is a terminal, a terminal-like console on stderr when forced, else nowhere."""
    if not wants_progress(progress, console):
        return None
    return console if console.is_terminal else Console(stderr=True, force_terminal=True, highlight=False)


# -- events -> what the job is doing -----------------------------------------------------------------------------------


class Phase(StrEnum):
    STARTING = "starting"
    RESTORING = "restoring"
    RESTORED = "restored"
    TRAINING = "training"
    SAVING = "saving"
    STOPPING = "stopping"
    EXITING = "exiting"
    ENDED = "ended"
    WAITING = "waiting"
    CAPACITY = "capacity"
    FINISHED = "finished"
    FAILED = "failed"


INTERRUPTED = frozenset({"preempted", "killed"})
"""Exit classes that are interruptions (the capacity was taken), not errors."""


@dataclass
class LiveState:
    """What a supervised job is doing, from its run's events. Feed events to :meth:`apply` in log order.

    ``total`` is the step the job runs to, when known. Job events of an attempt other than the current
    one (a late upload, a process left from an earlier attempt) do not move the state.
    """

    total: int | None = None
    phase: Phase = Phase.STARTING
    text: str = "starting"
    step: int | None = None
    attempt: int | None = None
    pool: str | None = None
    checkpoint_step: int | None = None
    """The newest step this run committed or restored, as far as the events tell."""
    done: bool = False
    ok: bool | None = None
    _notice: str | None = field(default=None, init=False, repr=False)
    _background: int | None = field(default=None, init=False, repr=False)
    _last_class: str | None = field(default=None, init=False, repr=False)
    _ended_interruptions: int = field(default=0, init=False, repr=False)
    _market_interruptions: int | None = field(default=None, init=False, repr=False)

    @property
    def interruptions(self) -> int:
        """Interruptions so far: those the drill's market delivered, else attempts that ended preempted or killed."""
        if self._market_interruptions is not None:
            return self._market_interruptions
        return self._ended_interruptions

    def apply(self, logged: LoggedEvent) -> bool:
        """Take one event; returns whether the phase or its text changed."""
        event = logged.event
        if (
            event.type not in ev.SUPERVISOR_TYPES
            and self.attempt is not None
            and logged.attempt not in (0, self.attempt)
        ):
            return False
        before = (self.phase, self.text)
        self._apply(event)
        return (self.phase, self.text) != before

    def _set(self, phase: Phase, text: str) -> None:
        self.phase, self.text = phase, text

    def _stopping(self) -> str:
        return f"stopping on a notice from {self._notice}" if self._notice else "stopping"

    def _training(self) -> str:
        return "training" + (
            f" (writing checkpoint step {self._background} in the background)" if self._background is not None else ""
        )

    def _apply(self, event: ev.Event) -> None:
        match event:
            # -- the supervisor ------------------------------------------------------------------------------------
            case ev.PoolChosen():
                self.pool = event.pool
            case ev.Escalated():
                self._set(Phase.STARTING, f"moving to on-demand capacity: {event.reason}")
            case ev.AttemptStarted():
                self.attempt, self.pool = event.number, event.pool
                self._notice, self._background = None, None
                if event.step_before is not None:
                    self.step = event.step_before
                where = event.pool + (f" ({event.market})" if event.market != "spot" else "")
                if self.phase is Phase.CAPACITY and self._last_class == "no_capacity":
                    self.text = f"waiting for capacity in {where}: trying attempt {event.number}"
                else:
                    self._set(Phase.STARTING, f"starting attempt {event.number} on {where}")
            case ev.AttemptEnded():
                self._last_class = event.exit_class
                if event.exit_class in INTERRUPTED:
                    self._ended_interruptions += 1
                if self.step is None and event.step_after is not None:
                    self.step = event.step_after
                if event.exit_class == "no_capacity":
                    self._set(Phase.CAPACITY, f"waiting for capacity in {event.pool}: it has none")
                elif event.exit_class == "succeeded":
                    self._set(Phase.ENDED, f"attempt {event.number} succeeded")
                else:
                    code = f"{describe_exit(event.exit_code)}, " if event.exit_code is not None else ""
                    after = event.step_after if event.step_after is not None else "none"
                    self._set(
                        Phase.ENDED,
                        f"attempt {event.number} ended: {event.exit_class} ({code}checkpoint step {after})",
                    )
            case ev.RetryDecided():
                if not event.relaunch:
                    self._set(Phase.ENDED, f"not relaunching: {event.reason}")
                elif self.phase is Phase.CAPACITY:
                    where = f" in {self.pool}" if self.pool else ""
                    self.text = f"waiting for capacity{where}: next try in {event.delay_s:.1f} s"
                else:
                    after = f" (attempt {self.attempt} {self._last_class})" if self._last_class else ""
                    wait = (
                        f"waiting {event.delay_s:.1f} s before relaunching" if event.delay_s >= 0.05 else "relaunching"
                    )
                    self._set(Phase.WAITING, wait + after)
            case ev.NoPoolAvailable():
                self._set(Phase.CAPACITY, f"waiting for capacity: {event.reason}; next try in {event.wait_s:.0f} s")
            case ev.MarketInterruption():
                self._market_interruptions = (self._market_interruptions or 0) + (event.interrupted is not None)
            case ev.JobFinished():
                self.done, self.ok = True, event.state == "succeeded"
                if self.ok:
                    self._set(Phase.FINISHED, "finished")
                else:
                    self._set(Phase.FAILED, f"{event.state}: {event.reason}")
            # -- the job -------------------------------------------------------------------------------------------
            case ev.RunStarted():
                self._notice, self._background = None, None
                self._set(Phase.RESTORING, "restoring the newest checkpoint")
            case ev.StageRecovered():
                self.checkpoint_step = max(self.checkpoint_step or 0, event.step)
                self._set(Phase.RESTORING, f"uploaded the staged checkpoint of step {event.step}; restoring")
            case ev.CheckpointSkipped():
                which = f"step {event.step}" if event.step is not None else event.checkpoint
                self._set(Phase.RESTORING, f"restoring: skipped {which} ({event.reason}); trying an older one")
            case ev.RestoreCompleted():
                self.step = self.checkpoint_step = event.step
                replay = f"; {event.replayed_steps} steps to replay" if event.replayed_steps else ""
                self._set(Phase.RESTORED, f"restored step {event.step} from {event.checkpoint}{replay}")
            case ev.RestoreFresh():
                self.step = 0
                damaged = f" ({event.skipped} damaged skipped)" if event.skipped else ""
                self._set(Phase.RESTORED, f"no checkpoint to restore{damaged}: starting from step 0")
            case ev.Progress():
                self.step = event.step
                if self.phase not in (Phase.STOPPING, Phase.EXITING):
                    self._set(Phase.TRAINING, self._training())
            case ev.SaveStarted():
                self.step = event.step
                if self.phase is Phase.STOPPING or (event.reason == "notice" and self._notice):
                    self._set(Phase.STOPPING, f"{self._stopping()}: saving step {event.step}")
                elif event.reason == "final":
                    self._set(Phase.SAVING, f"saving the final checkpoint (step {event.step})")
                else:
                    why = "" if event.reason == "interval" else f" ({event.reason})"
                    self._set(Phase.SAVING, f"saving step {event.step}{why}")
            case ev.SaveStaged():
                if event.overlapped:
                    self._background = event.step
                    if self.phase is Phase.SAVING:
                        self._set(Phase.TRAINING, self._training())
                elif self.phase is Phase.STOPPING:
                    self.text = f"{self._stopping()}: writing step {event.step}"
                elif self.phase is Phase.SAVING:
                    self.text = f"writing checkpoint step {event.step}"
            case ev.SaveCommitted():
                self.checkpoint_step = max(self.checkpoint_step or 0, event.step)
                if self._background == event.step:
                    self._background = None
                if self.phase is Phase.STOPPING:
                    self.text = f"{self._stopping()}: checkpoint step {event.step} committed"
                elif event.reason == "final":
                    self._set(Phase.SAVING, f"saved the final checkpoint (step {event.step})")
                elif self.phase is Phase.SAVING:
                    self._set(Phase.TRAINING, f"training (saved step {event.step})")
            case ev.SaveFailed():
                if self._background == event.step:
                    self._background = None
                if self.phase is Phase.STOPPING:
                    self.text = f"{self._stopping()}: saving step {event.step} failed ({event.error})"
                else:
                    self._set(Phase.TRAINING, f"training (saving step {event.step} failed: {event.error})")
            case ev.NoticeReceived():
                self.step = event.step
                if event.kind == "stop":
                    self._notice = event.source
                    left = f", {max(0.0, event.deadline - event.time):.0f} s to go" if event.deadline else ""
                    self._set(Phase.STOPPING, f"{self._stopping()} at step {event.step}{left}")
                elif self.phase is not Phase.STOPPING:
                    self._set(Phase.TRAINING, f"training (early checkpoint: a warning from {event.source})")
            case ev.EmergencyPlanned():
                self._notice = self._notice or event.source
                if event.choice == "none":
                    resume = (
                        f"step {self.checkpoint_step}" if self.checkpoint_step is not None else "the last checkpoint"
                    )
                    self._set(Phase.STOPPING, f"{self._stopping()}: no save fits in time; resuming from {resume}")
                else:
                    fits = (
                        f" (~{event.estimate_s:.1f} s of {event.time_left_s:.1f} s left)"
                        if event.estimate_s is not None and event.time_left_s is not None
                        else ""
                    )
                    self._set(Phase.STOPPING, f"{self._stopping()}: {event.choice} emergency save{fits}")
            case ev.EmergencyFinished():
                if event.committed:
                    late = "" if event.before_deadline is not False else " after the deadline"
                    how = f"emergency checkpoint step {event.step} committed{late}"
                else:
                    how = "emergency save still writing" if event.still_writing else "emergency save did not commit"
                self._set(Phase.STOPPING, f"{self._stopping()}: {how}")
            case ev.RunExited():
                self.step = event.step
                if event.reason == "finished":
                    self._set(Phase.EXITING, f"training finished at step {event.step}")
                else:
                    how = f" on a notice from {self._notice}" if self._notice else ""
                    self._set(Phase.EXITING, f"stopped{how} at step {event.step}")
            case _:
                pass


# -- following a run's event log -----------------------------------------------------------------------------------


class EventSource(Protocol):
    """Somewhere a run's events appear. ``poll`` returns the events that appeared since the last call."""

    interval_s: float
    final: bool
    """Whether a last poll is worth waiting for when the follower stops."""

    def poll(self) -> list[LoggedEvent]: ...


class FileSource:
    """A local event log, followed from where it ends now (it may not exist yet): what earlier runs of the
    supervisor wrote there is not news, and a long log is not read at all.

    Like :class:`~spotsafe.telemetry.log.EventTail` (complete lines only; damaged lines skipped), which
    always reads from the start; a log that was replaced by a shorter one is read again from its start.
    """

    final = True
    CHUNK = 4 << 20
    """At most this many bytes a poll (the rest comes at the next)."""

    def __init__(self, path: str | os.PathLike[str], *, from_end: bool = True, interval_s: float = 0.25) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self._offset = 0
        self._partial = b""
        if from_end:
            with contextlib.suppress(OSError):
                self._offset = self.path.stat().st_size  # a line cut here fails to parse and is skipped

    def poll(self) -> list[LoggedEvent]:
        try:
            with open(self.path, "rb") as handle:
                if os.fstat(handle.fileno()).st_size < self._offset:
                    self._offset, self._partial = 0, b""
                handle.seek(self._offset)
                data = handle.read(self.CHUNK)
        except FileNotFoundError:
            return []
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        return list(parse_lines(lines))


_PART_KEY = re.compile(r"^events/(a\d{6}-p\d{8}-[0-9a-f]{8})/part-(\d{6})\.jsonl$")


class StorageSource:
    """The event parts jobs upload to the run's storage (jobs on other machines write no local log).

    Parts are immutable: each poll lists them and reads only the new ones. The parts there at the
    first poll are from before this command and are not read.
    """

    final = False

    def __init__(self, storage: Storage, *, interval_s: float = 3.0) -> None:
        self.storage = storage
        self.interval_s = interval_s
        self._seen: set[str] | None = None

    def poll(self) -> list[LoggedEvent]:
        keys = {k for k in self.storage.find("events") if _PART_KEY.match(k)}
        if self._seen is None:
            self._seen = keys
            return []
        new = sorted(keys - self._seen, key=_part_order)
        out: list[LoggedEvent] = []
        for key in new:
            out.extend(parse_lines(self.storage.read(key).splitlines()))
            self._seen.add(key)
        return out


def _part_order(key: str) -> tuple[str, int]:
    match = _PART_KEY.match(key)
    return (match.group(1), int(match.group(2))) if match else (key, 0)


class EventFollower:
    """Polls ``sources`` on a background thread and hands new events to ``on_events`` (then calls ``on_tick``).

    Never raises into the caller: a source that fails (a damaged or vanished log, a storage error) is
    tried again at its next poll. An event seen in two sources (a local job's spool and its uploaded
    parts) is handed on once.
    """

    def __init__(
        self,
        sources: Sequence[EventSource],
        on_events: Callable[[list[LoggedEvent]], None],
        on_tick: Callable[[], None] = lambda: None,
        *,
        tick_s: float = 0.25,
    ) -> None:
        self.sources = list(sources)
        self._on_events = on_events
        self._on_tick = on_tick
        self._tick_s = tick_s
        self._due = [0.0] * len(self.sources)
        self._seen: dict[tuple[str, int, int, str, float], None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spotsafe-live", daemon=True)

    def start(self) -> EventFollower:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling after one last poll of the sources that are worth it."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join(timeout)

    def poll_once(self, *, final: bool = False) -> None:
        now = time.monotonic()
        batch: list[LoggedEvent] = []
        for i, source in enumerate(self.sources):
            if (final and not source.final) or (not final and now < self._due[i]):
                continue
            self._due[i] = now + source.interval_s
            try:
                batch.extend(source.poll())
            except Exception as err:  # noqa: BLE001 - a status display never stops the command; next poll retries
                log.debug("spotsafe: live status: reading events failed: %s", err)
        if len(self.sources) > 1:
            batch = [e for e in batch if self._first_time(e)]
        try:
            if batch:
                self._on_events(batch)
            self._on_tick()
        except Exception as err:  # noqa: BLE001 - a display error must not end the follower
            log.debug("spotsafe: live status: display failed: %s", err)

    def _first_time(self, logged: LoggedEvent) -> bool:
        key = (logged.run_id, logged.attempt, logged.pid, logged.event.type, logged.event.time)
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > 100_000:  # a duplicate comes within seconds of the original: forget the oldest
            for old in list(self._seen)[:50_000]:
                del self._seen[old]
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self._tick_s)
        self.poll_once(final=True)


# -- the job's output, above the status ------------------------------------------------------------------------------


class LineSplitter:
    """Splits a stream of terminal text into complete lines, as a terminal would show them.

    ``\\r\\n`` ends a line like ``\\n``; within a line, a carriage return starts it over (progress
    bars redraw themselves so), so a line shows what follows its last ``\\r``. ``pending`` is the
    line being written (what a terminal would show on its last row).
    """

    LONGEST = 64 * 1024
    """A line longer than this is shown in pieces."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += self._decoder.decode(data)
        *lines, self._buffer = self._buffer.split("\n")
        if len(self._buffer) > self.LONGEST:
            lines.append(self._buffer)
            self._buffer = ""
        return [_shown(line) for line in lines]

    @property
    def pending(self) -> str:
        return _shown(self._buffer)

    def flush(self) -> list[str]:
        """The pending line as a complete one (when the output ends without a newline)."""
        rest = self._buffer + self._decoder.decode(b"", final=True)
        self._buffer = ""
        return [_shown(rest)] if rest else []


def _shown(line: str) -> str:
    line = line.removesuffix("\r")
    return line.rsplit("\r", 1)[-1]


def _same_terminal(a: int, b: int) -> bool:
    try:
        if not (os.isatty(a) and os.isatty(b)):
            return False
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino, sa.st_rdev) == (sb.st_dev, sb.st_ino, sb.st_rdev)


def _copy_size(source: int | None, target: int, fallback: tuple[int, int]) -> None:
    """Give the terminal ``target`` the size of ``source`` (``fallback`` columns, rows when it has none)."""
    size = None
    if source is not None:
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
    if size is None or struct.unpack("HHHH", size)[:2] == (0, 0):
        columns, rows = fallback
        size = struct.pack("HHHH", rows, columns, 0, 0)
    with contextlib.suppress(OSError):
        fcntl.ioctl(target, termios.TIOCSWINSZ, size)


class OutputCapture:
    """Routes this process's stderr (and stdout, when it is the same terminal) through a pseudo-terminal
    while active, and hands what is written there to ``lines`` (complete lines) and ``pending`` (the line
    being written). Child processes inherit the routed descriptors, so their output comes along; they
    still see a terminal. Falls back to a pipe where no pseudo-terminal can be had.

    The reader never stops draining while the capture is active: if ``lines`` fails, the output is dropped
    rather than left to fill the buffer and block the writers.
    """

    def __init__(
        self,
        lines: Callable[[list[str]], None],
        pending: Callable[[str], None],
        *,
        terminal: int | None,
        size: tuple[int, int],
    ) -> None:
        self._lines = lines
        self._pending = pending
        self._terminal = terminal
        self._size = size
        self._splitter = LineSplitter()
        self._saved: dict[int, int] = {}
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spotsafe-output", daemon=True)
        self._previous_winch: Any = None

    def start(self) -> None:
        targets = [2] + ([1] if _same_terminal(1, 2) else [])
        try:
            self._read_fd, self._write_fd = os.openpty()
            _copy_size(self._terminal, self._write_fd, self._size)
        except OSError:
            self._read_fd, self._write_fd = os.pipe()
        _flush_std()
        for fd in targets:
            self._saved[fd] = os.dup(fd)
            os.dup2(self._write_fd, fd)
        self._thread.start()
        if threading.current_thread() is threading.main_thread() and os.isatty(self._write_fd):
            with contextlib.suppress(ValueError, OSError):
                self._previous_winch = signal.signal(signal.SIGWINCH, self._on_resize)

    def _on_resize(self, signum: int, frame: FrameType | None) -> None:
        if self._write_fd is not None:
            _copy_size(self._terminal, self._write_fd, self._size)

    def stop(self) -> None:
        """Give the descriptors back, and print what the writers still had in the pipe."""
        if self._read_fd is None:
            return
        if self._previous_winch is not None:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGWINCH, self._previous_winch)
        _flush_std()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()
        self._stopping.set()  # the reader ends once nothing more comes (holding a writer, so nothing is lost)
        self._thread.join(timeout=2.0)
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        os.close(self._read_fd)  # processes that outlived the command now get errors writing there
        self._read_fd = None
        with contextlib.suppress(Exception):
            rest = self._splitter.flush()
            if rest:
                self._lines(rest)

    def _run(self) -> None:
        fd = self._read_fd
        assert fd is not None
        draining_since: float | None = None
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while True:
                if not selector.select(0.05):
                    if self._stopping.is_set():
                        return  # nothing more came since the command ended
                    continue
                if not self._drain(fd):
                    return
                if self._stopping.is_set():
                    draining_since = draining_since or time.monotonic()
                    if time.monotonic() - draining_since > 1.0:
                        return  # something that outlived the command keeps writing: stop listening to it

    def _drain(self, fd: int) -> bool:
        """Read what is there and show it; ``False`` when every writer is gone."""
        try:
            data = os.read(fd, 65536)
        except OSError:
            return False  # EIO: the pseudo-terminal has no writer left
        if not data:
            return False  # end of the pipe
        try:
            complete = self._splitter.feed(data)
            if complete:
                self._lines(complete)
            self._pending(self._splitter.pending)
        except Exception:  # noqa: BLE001 - keep draining whatever the display does
            pass
        return True


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# -- the display ----------------------------------------------------------------------------------------------------


NARROW = 110
"""Below this many columns the bars are shorter, leaving room for what the job is doing."""


class _Display(Progress):
    """A Progress that shows the line the job is writing (if any) above the status lines."""

    pending: Text | None = None

    def get_renderables(self) -> Iterable[RenderableType]:
        if self.pending is not None:
            yield self.pending
        if hasattr(self, "live"):  # not while Progress.__init__ builds its first renderable
            narrow = self.console.width < NARROW
            for column in self.columns:
                if isinstance(column, BarColumn):
                    column.bar_width = 10 if narrow else 20
        yield self.make_tasks_table(self.tasks)


class _MarkColumn(SpinnerColumn):
    def render(self, task: Task) -> RenderableType:
        ok = task.fields.get("ok")
        if task.fields.get("done"):
            return Text("✓", style="green") if ok else Text("✗", style="red")
        return self.spinner.render(task.get_time())  # spinning while the job runs, whatever the step


class _StepColumn(ProgressColumn):
    def render(self, task: Task) -> RenderableType:
        step = task.fields.get("step")
        if step is None:
            return Text("")
        total = task.total
        return Text(f"{step:,}/{int(total):,}" if total is not None else f"step {step:,}", style="cyan")


class _CountColumn(ProgressColumn):
    def render(self, task: Task) -> RenderableType:
        count = task.fields.get("interruptions")
        if count is None:
            return Text("")
        return Text(f"{count} interruption{'s' if count != 1 else ''}", style="magenta" if count else "dim")


class _ElapsedColumn(ProgressColumn):
    def render(self, task: Task) -> RenderableType:
        started = task.fields.get("started") or time.monotonic()
        ended = task.fields.get("ended")
        seconds = max(0, int((ended if ended is not None else time.monotonic()) - started))
        minutes, secs = divmod(seconds, 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"{hours}:{minutes:02d}:{secs:02d}", style="yellow")


_PHASE_STYLES = {
    Phase.STOPPING: "yellow",
    Phase.EXITING: "yellow",
    Phase.WAITING: "yellow",
    Phase.CAPACITY: "yellow",
    Phase.FINISHED: "green",
    Phase.FAILED: "red",
}


class Tracker:
    """One status line following one run's event log."""

    def __init__(
        self,
        live: LiveStatus,
        label: str,
        state: LiveState,
        sources: Sequence[EventSource],
        *,
        interruptions: bool,
        extra: Callable[[LiveState], str | None] | None,
    ) -> None:
        self.live = live
        self.state = state
        self._interruptions = interruptions
        self._extra = extra
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.finished = False
        self.task = live.progress.add_task(
            "",
            total=state.total,
            label=label,
            started=self.started,
            ended=None,
            done=False,
            ok=None,
            step=None,
            interruptions=None,
        )
        self._update()
        self._follower = EventFollower(sources, self._on_events, self._update).start() if sources else None

    def _on_events(self, events: list[LoggedEvent]) -> None:
        with self._lock:
            for logged in events:
                if self.state.apply(logged):
                    self._update(refresh=True)  # every phase is drawn, however short it was

    def finish(self, *, ok: bool | None = None, text: str | None = None, elapsed: float | None = None) -> None:
        """Stop following (after a last look at the log) and show the line's final state. ``ok`` and ``text``
        override what the events said; ``elapsed`` what the line took (default: until now)."""
        self.finished = True
        if self._follower is not None:
            self._follower.stop()
        with self._lock:
            state = self.state
            if ok is not None:
                state.ok = ok
            if text is not None:
                state.text = text
                state.phase = Phase.FINISHED if state.ok else Phase.FAILED
            state.done = True
        self._update(ended=self.started + elapsed if elapsed is not None else time.monotonic())

    def _update(self, *, refresh: bool = False, ended: float | None = None) -> None:
        state = self.state
        style = _PHASE_STYLES.get(state.phase)
        text = escape(state.text)
        description = f"[{style}]{text}[/]" if style else text
        if self._extra is not None and not state.done:
            with contextlib.suppress(Exception):
                extra = self._extra(state)
                if extra:
                    description += f" [dim]· {escape(extra)}[/]"
        total = state.total
        completed = state.step or 0
        if state.done and state.ok and total is None:
            total = completed or 1  # a finished run with no known total: a full bar
        fields: dict[str, Any] = {
            "step": state.step,
            "done": state.done,
            "ok": state.ok,
            "interruptions": state.interruptions if self._interruptions else None,
        }
        if ended is not None:
            fields["ended"] = ended
        self.live.progress.update(
            self.task, description=description, total=total, completed=completed, refresh=refresh, **fields
        )


class LiveStatus:
    """The live display on stderr: one line per phase, the command's own output scrolling above it.

    Use as a context manager; :meth:`open` returns ``None`` when progress is off. Lines still running
    when it closes are marked as interrupted.
    """

    def __init__(
        self,
        *,
        force: bool = False,
        console: Console | None = None,
        capture: bool = True,
        refresh_per_second: float = 5.0,
    ) -> None:
        """``force``: draw as on a terminal even where stderr is none. ``console``: draw there instead of on
        stderr (it must not write to the descriptors a capture routes). ``capture``: route the output."""
        self._out: IO[str] | None = None
        if console is None:
            self._out = os.fdopen(os.dup(2), "w", encoding="utf-8", errors="replace", buffering=1)
            console = Console(file=self._out, force_terminal=True if force else None, highlight=False)
        self.console = console
        self.progress = _Display(
            _MarkColumn(),
            TextColumn("[bold]{task.fields[label]}"),
            BarColumn(bar_width=20),
            _StepColumn(),
            _CountColumn(),
            _ElapsedColumn(),
            TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")),
            console=self.console,
            refresh_per_second=refresh_per_second,
            redirect_stdout=False,
            redirect_stderr=False,
            expand=True,
        )
        self._capture = (
            OutputCapture(
                self._print_lines,
                self._set_pending,
                terminal=self._out.fileno() if self._out is not None and self._out.isatty() else None,
                size=(self.console.width, 24),
            )
            if capture
            else None
        )
        self.trackers: list[Tracker] = []

    @classmethod
    def open(cls, progress: bool | None) -> LiveStatus | None:
        """A live status for ``--progress/--no-progress`` (``None``: leave stderr alone)."""
        if not wants_progress(progress, Console(stderr=True)):
            return None
        return cls(force=bool(progress))

    def __enter__(self) -> LiveStatus:
        self.progress.start()
        if self._capture is not None:
            try:
                self._capture.start()
            except OSError as err:  # no capture: the output still appears, only less tidily
                log.debug("spotsafe: live status: cannot capture output: %s", err)
                self._capture = None
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        try:
            for tracker in self.trackers:
                if not tracker.finished:
                    tracker.finish(ok=False, text="interrupted" if error is not None else "ended")
        finally:
            try:
                if self._capture is not None:
                    self._capture.stop()
            finally:
                self.progress.pending = None
                self.progress.stop()
                if self._out is not None:
                    with contextlib.suppress(OSError):
                        self._out.close()

    # -- output -----------------------------------------------------------------------------------------------------
    def print(self, *objects: Any, **options: Any) -> None:
        """Print above the status lines."""
        self.console.print(*objects, **options)

    def log(self, message: str, *, style: str | None = "dim") -> None:
        """A note above the status lines (``style`` None: plain)."""
        self.console.print(Text(message, style=style or ""), soft_wrap=True)

    def _print_lines(self, lines: list[str]) -> None:
        self.progress.pending = None
        self.console.print(Text.from_ansi("\n".join(lines)), soft_wrap=True)

    def _set_pending(self, text: str) -> None:
        self.progress.pending = Text.from_ansi(text, no_wrap=True, overflow="ellipsis") if text else None

    # -- lines ------------------------------------------------------------------------------------------------------
    def follow(
        self,
        label: str,
        sources: Sequence[EventSource],
        *,
        total: int | None = None,
        idle: str = "starting",
        interruptions: bool = True,
        extra: Callable[[LiveState], str | None] | None = None,
    ) -> Tracker:
        """A new status line following ``sources``; ``idle`` is what it says before the first event."""
        tracker = Tracker(
            self,
            label,
            LiveState(total=total, text=idle),
            sources,
            interruptions=interruptions,
            extra=extra,
        )
        self.trackers.append(tracker)
        return tracker


# -- spotsafe run ---------------------------------------------------------------------------------------------------


def follow_run(live: LiveStatus, config: RunConfig) -> Tracker:
    """The status line of a ``spotsafe run`` job: the supervisor's log (which local jobs append to as
    well), and for a remote run with pools on other machines, the parts those jobs upload."""
    from spotsafe.storage.registry import open_storage, protocol_of
    from spotsafe.storage.retry import RetryPolicy
    from spotsafe.supervisor.run import events_file

    sources: list[EventSource] = [FileSource(events_file(config))]
    if protocol_of(config.url) != "file" and any(not pool.local for pool in config.pools):
        try:
            sources.append(StorageSource(open_storage(config.url, retry=RetryPolicy(budget_s=5.0))))
        except Exception as err:  # noqa: BLE001 - the supervisor reports a bad location; the status goes without
            log.debug("spotsafe: live status: cannot open %s: %s", config.url, err)
    return live.follow(f"job {config.name}", sources, total=config.total_steps, idle="starting the supervisor")


# -- spotsafe drill -------------------------------------------------------------------------------------------------


def reference_step(folder: Path) -> int | None:
    """The reference run's final step: its newest committed checkpoint's."""
    from spotsafe.supervisor.run import newest_step

    try:
        return newest_step(str(folder))
    except Exception as err:  # noqa: BLE001 - the drill reports a bad reference itself
        log.debug("spotsafe: live status: cannot read the reference in %s: %s", folder, err)
        return None


def market_outlook(market: Market, state: LiveState) -> str | None:
    """When the market's next interruption is due, or when capacity comes back (from its schedule)."""
    done = len(market.interruptions)
    now = market.now()
    if state.phase is Phase.CAPACITY and done and done <= len(market.outages):
        back = market.outages[done - 1].back_s - now
        if back > 0:
            return f"capacity back in {back:.0f} s"
    if market.delivered >= market.max_interruptions or done >= len(market.outages):
        return "no more interruptions due"
    at = market.outages[done].at_s - now
    return f"next interruption in {at:.0f} s" if at >= 0.5 else "next interruption due now"


class DrillLive:
    """Shows a drill's phases (a :class:`~spotsafe.supervisor.drill.DrillWatch`): the reference run with its
    steps counting up, then the drill with a bar to the reference's final step and the market's interruptions."""

    def __init__(self, live: LiveStatus) -> None:
        self.live = live
        self.reference: Tracker | None = None
        self.drill: Tracker | None = None
        self.total: int | None = None

    def reference_started(self, folder: Path) -> None:
        self.reference = self.live.follow(
            "reference",
            [FileSource(folder / EVENTS_FILE)],
            idle="starting the uninterrupted reference run",
            interruptions=False,
        )

    def reference_finished(self, folder: Path, seconds: float, reused: bool) -> None:
        self.total = reference_step(folder)
        at = f"step {self.total:,}" if self.total is not None else "the end"
        if self.reference is not None:
            self.reference.finish(ok=True, text=f"uninterrupted run finished at {at} in {seconds:.1f} s")
            return
        line = self.live.follow("reference", [], total=self.total, interruptions=False)
        line.state.step = self.total
        line.finish(ok=True, text=f"reused: it ran to {at} in {seconds:.1f} s", elapsed=seconds)

    def drill_started(self, run: Path, market: Market) -> None:
        self.drill = self.live.follow(
            "drill",
            [FileSource(run / EVENTS_FILE)],
            total=self.total,
            idle="starting the job under the supervisor",
            extra=lambda state: market_outlook(market, state),
        )

    def drill_finished(self, code: int) -> None:
        if self.drill is not None:
            self.drill.finish()
            if not self.drill.state.ok and self.drill.state.phase is not Phase.FAILED:
                self.drill.finish(ok=False, text=f"the supervisor ended with exit {code}")
