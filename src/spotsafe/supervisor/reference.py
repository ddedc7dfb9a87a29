"""Reference runs: the job once, uninterrupted, and the bit-for-bit comparison of an interrupted run with it.

The demo and the drill prove the same thing: a job interrupted again and again ends with exactly the
state it ends with uninterrupted. Both run the reference the same way, here: through the supervisor's
loop (:class:`~spotsafe.supervisor.run.Supervisor`) with one attempt and no relaunch, in a scratch job
store, the job's output discarded (its stderr kept), its checkpoints in the reference folder.

:func:`ensure_reference` (the drill) keeps a finished reference, marked with :data:`REFERENCE_MARKER`,
and reuses it for the same command; :func:`run_reference` (the demo) always runs it.
:func:`compare_final` compares the newest valid checkpoint of two runs, component by component (rank by rank for
a job of several ranks, each saving under ``rank-<r>``), and :func:`bit_identical` says whether that comparison
found them identical.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotsafe.batch.job import done_items, open_existing
from spotsafe.engine.reader import RestoredState, load_newest_valid
from spotsafe.errors import ConfigError, CorruptCheckpointError
from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.jobenv import JobEnv
from spotsafe.state.compare import differences
from spotsafe.storage.layout import rank_folders
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.supervisor.config import RunConfig
from spotsafe.supervisor.nodes import start_nodes
from spotsafe.supervisor.pools import Handle, LaunchSpec, Pool, ProcessHandle
from spotsafe.supervisor.process import describe_exit, launch
from spotsafe.supervisor.run import Supervisor
from spotsafe.supervisor.store import JobStore
from spotsafe.telemetry import events as ev

REFERENCE_MARKER = "drill-reference.json"
REFERENCE_RUN_ID = "reference"


class _Duration:
    """The reference's supervisor events go nowhere (its folder holds the job's own events only) but for the
    attempt's duration, from its launch to its exit."""

    seconds: float | None = None

    def emit(self, event: ev.Event) -> None:
        if isinstance(event, ev.AttemptEnded):
            self.seconds = event.duration_s


class _ReferenceLauncher:
    """The attempt as local processes (one per node) with ``env`` added; stdout discarded, stderr this process's."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)

    def start(self, spec: LaunchSpec) -> Handle:
        def node(i: int) -> Handle:
            job = launch(
                spec.command,
                env={**spec.env, **self.env},
                stdout=subprocess.DEVNULL,
                parent_death_signal=signal.SIGTERM,
            )
            return ProcessHandle(job, spec.pool, socket.gethostname(), None)

        return start_nodes(spec.node_count, node)


def run_reference(command: Sequence[str], folder: str | Path, *, notices: str | None = None, nodes: int = 1) -> float:
    """Run ``command`` once, uninterrupted, with its checkpoints in ``folder``; return its wall time (seconds,
    from its launch to its exit).

    ``notices``: the job's ``$SPOTSAFE_NOTICES`` (``None``: unset, the job detects its own). ``nodes``: how many
    copies of the command run, one per node (a torchrun command whose agents meet in one rendezvous). Raises
    :class:`~spotsafe.errors.ConfigError` when the run does not exit 0 (it is never relaunched).
    """
    with tempfile.TemporaryDirectory(prefix="spotsafe-reference-") as scratch:
        store = Path(scratch) / "jobs.sqlite"
        duration = _Duration()
        config = RunConfig(
            name=REFERENCE_RUN_ID,
            command=tuple(command),
            url=str(folder),
            store=store,
            pools=(Pool(name="local", nodes=nodes),),
        )
        code = Supervisor(
            config,
            launcher=_ReferenceLauncher(JobEnv(notices=notices).to_env()),
            events=duration,
            say=lambda line: None,
            stop_after=lambda number: "a reference run has one attempt",
        ).run()
        with JobStore(store) as jobs:
            attempts = jobs.attempts(REFERENCE_RUN_ID)
    last = attempts[-1] if attempts else None
    exit_code = last.exit_code if last is not None else None
    if exit_code == 0 and duration.seconds is not None:
        return duration.seconds
    if code == EXIT_PREEMPTED and exit_code is not None:
        raise ConfigError(f"the reference run was stopped ({describe_exit(exit_code)}); run it again to go on")
    what = describe_exit(exit_code) if exit_code is not None else "no exit code"
    raise ConfigError(f"the reference run failed ({what}); run the command by hand to see why")


def ensure_reference(
    command: Sequence[str],
    folder: Path,
    log: Callable[[str], None],
    started: Callable[[], None] | None = None,
    *,
    nodes: int = 1,
) -> tuple[float, bool]:
    """The reference run's wall time, running it unless ``folder`` holds a finished run of ``command`` on
    ``nodes`` nodes. ``started`` is called just before the reference run starts."""
    marker = folder / REFERENCE_MARKER
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
        same = doc.get("command") == list(command) and doc.get("nodes", 1) == nodes
        if same and _final_step(final_states(folder)) is not None:
            log(f"reusing the reference run in {folder} ({doc['seconds']:.1f} s)")
            return float(doc["seconds"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if folder.exists():
        if any(folder.iterdir()) and not marker.exists():
            raise ConfigError(
                f"{folder} is not empty and holds no drill reference ({REFERENCE_MARKER}); spotsafe drill will not "
                "delete it: pass another --reference, or empty it"
            )
        shutil.rmtree(folder)
    log(f"reference run (uninterrupted): {' '.join(command)}")
    if started is not None:
        started()
    seconds = run_reference(command, folder, notices="signals", nodes=nodes)
    if _final_step(final_states(folder)) is None:
        raise ConfigError(
            f"the reference run finished without a checkpoint in {folder} (or, with several ranks, without one "
            "at the same step in each rank-<r> folder): the command must use spotsafe's Checkpointer with the "
            "location from $SPOTSAFE_CHECKPOINT_URL (and call finish())"
        )
    marker.write_text(json.dumps({"command": list(command), "seconds": seconds, "nodes": nodes}), encoding="utf-8")
    log(f"reference run finished in {seconds:.1f} s")
    return seconds, False


@dataclass(frozen=True)
class FinalState:
    """A run's newest valid checkpoint: its step and its components."""

    step: int
    components: dict[str, Any]


def _final(state: RestoredState | None) -> FinalState | None:
    return None if state is None else FinalState(state.step, state.components)


def final_states(url: str | Path) -> dict[str, FinalState | None]:
    """The newest valid checkpoint of each process of a run: ``{"": state}`` for one process (its checkpoints
    under ``url``; a finished batch job: its items done and its output, ``{"output": {part: bytes}}``) and for
    a job whose ranks save one checkpoint together (``sharded=True``: whole tensors, assembled from every
    rank's chunks, and each rank's own state as ``rank-<r>``), ``{"rank-00000": state, ...}`` for a job of
    several ranks that save rank by rank (``None``: none valid)."""
    storage = open_storage(url)
    batch = open_existing(storage)
    if batch is not None:  # a batch job: its output, part by part
        done = batch.done()
        if len(done) < batch.spec.shards:
            return {"": None}
        output = {record.key: storage.read(record.key) for _, record in sorted(done.items())}
        return {"": FinalState(done_items(done), {"output": output})}
    repo = CheckpointRepository(storage)
    together = _newest_sharded(repo)
    if together is not None:
        return {"": together}
    own = load_newest_valid(repo)
    folders = rank_folders(storage) if own is None else []
    if not folders:
        return {"": _final(own)}
    base = str(url).rstrip("/")
    return {name: _final(load_newest_valid(CheckpointRepository(open_storage(f"{base}/{name}")))) for name in folders}


def _newest_sharded(repo: CheckpointRepository) -> FinalState | None:
    """The newest valid checkpoint written by all ranks together, consolidated (``None``: there is none)."""
    from spotsafe.sharded.layout import consolidate, is_sharded  # DCP is slow to import: only here

    for ref in repo.candidates():
        try:
            if not is_sharded(repo.read_manifest(ref)):
                return None
            loaded = repo.load(ref)
            return FinalState(ref.step, consolidate(loaded.blobs.__getitem__, loaded.manifest, ref.name))
        except CorruptCheckpointError:
            continue
    return None


def _final_step(states: Mapping[str, FinalState | None]) -> int | None:
    """The run's final step: every process's newest valid checkpoint is at it (``None``: none, or they differ)."""
    steps = {state.step if state is not None else None for state in states.values()}
    return steps.pop() if len(steps) == 1 else None


def compare_final(reference: str | Path, other: str | Path) -> tuple[int | None, int | None, dict[str, list[str]]]:
    """Final step of each run (folders or URLs) and, per component, the differences (empty list: identical).

    A run of several ranks is compared rank by rank: its components are named ``rank-<r>/<component>``, and its
    final step is the one every rank ended at (``None`` when they differ)."""
    a, b = final_states(reference), final_states(other)
    a_step, b_step = _final_step(a), _final_step(b)
    if a_step is None or b_step is None:
        return a_step, b_step, {}
    diffs: dict[str, list[str]] = {}
    for process in dict.fromkeys([*a, *b]):
        left, right = a.get(process), b.get(process)
        if left is None or right is None:
            diffs[process] = [f"{process}: present in only one run"]
            continue
        for name in dict.fromkeys([*left.components, *right.components]):
            shown = f"{process}/{name}" if process else name
            if name not in left.components or name not in right.components:
                diffs[shown] = [f"{shown}: present in only one run"]
            else:
                diffs[shown] = differences(left.components[name], right.components[name], shown)
    return a_step, b_step, diffs


def bit_identical(reference_step: int | None, other_step: int | None, diffs: Mapping[str, list[str]]) -> bool:
    """What :func:`compare_final`'s answer says: both runs ended at the same step, with components compared,
    and none of them differs."""
    return reference_step is not None and reference_step == other_step and bool(diffs) and not any(diffs.values())
