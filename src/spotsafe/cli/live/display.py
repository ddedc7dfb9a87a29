"""The live display on stderr: one rich progress line per phase (:class:`Tracker`), each following a run's
event log, with the command's output scrolling above (:class:`LiveStatus`)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import IO, Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn
from rich.table import Column
from rich.text import Text

from spotsafe.cli.live.capture import OutputCapture
from spotsafe.cli.live.follow import EventFollower, EventSource
from spotsafe.cli.live.state import LiveState, Phase
from spotsafe.telemetry.log import LoggedEvent

log = logging.getLogger("spotsafe")


def wants_progress(progress: bool | None, console: Console) -> bool:
    """Whether to show progress on ``console``: when it is a terminal, unless ``--progress/--no-progress`` say."""
    return console.is_terminal if progress is None else progress


def bar_console(progress: bool | None, console: Console) -> Console | None:
    """Where bars go: ``console`` when it is a terminal, a terminal-like console on stderr when forced, else nowhere."""
    if not wants_progress(progress, console):
        return None
    return console if console.is_terminal else Console(stderr=True, force_terminal=True, highlight=False)


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
        self._update(refresh=True)  # the idle phase is drawn too, however soon the first event comes
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
