"""Live status of supervised jobs on the terminal (``spotsafe run``, ``spotsafe drill``).

Four parts, each usable alone:

* :mod:`.state`: :class:`LiveState` turns a run's events into what the job is doing right now (a pure
  state machine: no I/O, no clock).
* :mod:`.follow`: :class:`EventFollower` polls a run's event log(s) on a background thread: the local
  ``events.jsonl`` (or the supervisor's spool file, :class:`FileSource`), and for jobs that run on other
  machines the parts they upload to the run's storage (:class:`StorageSource`).
* :mod:`.capture`: while the status is shown, this process's stderr (and stdout, when it is the same
  terminal) goes through a pseudo-terminal, so that the supervisor's lines and the job's own output (which
  inherits them) scroll above the status lines instead of tearing them.
* :mod:`.display`: :class:`LiveStatus` draws one rich progress line per phase on stderr;
  :mod:`.supervised` has the lines of ``spotsafe run`` and ``spotsafe drill``.

Shown when stderr is a terminal, or as ``--progress/--no-progress`` say; when it is off nothing of this
runs and the output is exactly what it was.
"""

from spotsafe.cli.live.capture import LineSplitter, OutputCapture
from spotsafe.cli.live.display import LiveStatus, Tracker, bar_console, wants_progress
from spotsafe.cli.live.follow import EventFollower, EventSource, FileSource, RankZeroSource, StorageSource
from spotsafe.cli.live.state import INTERRUPTED, LiveState, Phase
from spotsafe.cli.live.supervised import DrillLive, follow_run, market_outlook, reference_step

__all__ = [
    "INTERRUPTED",
    "DrillLive",
    "EventFollower",
    "EventSource",
    "FileSource",
    "RankZeroSource",
    "LineSplitter",
    "LiveState",
    "LiveStatus",
    "OutputCapture",
    "Phase",
    "StorageSource",
    "Tracker",
    "bar_console",
    "follow_run",
    "market_outlook",
    "reference_step",
    "wants_progress",
]
