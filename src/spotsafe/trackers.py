"""The run's spot figures in the experiment tracker people already watch: MLflow, Weights & Biases, TensorBoard.

Opt-in: ``Checkpointer(..., trackers=[...])``. After every restore (or fresh start: step 0) and every committed
checkpoint, the checkpointer logs, at that checkpoint's step, under ``spotsafe/``:

===============================  =================================================================================
``interruptions``                attempts of this run that ended before it finished (all attempts, from its log)
``replayed_steps``               training steps done again after restores, in all
``checkpoint_stall_s``           the newest checkpoint's training stall (seconds)
``checkpoint_write_s``           the newest checkpoint's time from its start to durable (seconds)
``restore_s``                    the newest restore's duration (seconds)
``recover_s``                    mean time from an interruption to training again (seconds; after one)
``goodput``                      useful training time / wall time of the run so far
``cost_usd``, ``saved_usd``      what the run cost, and what it saved against on demand (when prices are known)
===============================  =================================================================================

Each figure is logged only when it is known. A tracker's failure never stops training: it is logged once as
a warning and that tracker is skipped from then on. Each tracker imports its package only when it is made:
``TensorBoard`` needs ``tensorboard``, ``MLflow`` needs ``mlflow`` (or ``mlflow-skinny``), ``WandB`` needs ``wandb``
(the extras ``spotsafe[tensorboard]``, ``spotsafe[mlflow]``, ``spotsafe[wandb]``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from spotsafe.errors import ConfigError
from spotsafe.telemetry import events as ev
from spotsafe.telemetry.log import LoggedEvent, RunIdentity
from spotsafe.telemetry.report import report_of
from spotsafe.telemetry.runmodel import RunModel

log = logging.getLogger("spotsafe")

PREFIX = "spotsafe/"

__all__ = [
    "Latest",
    "MLflow",
    "ReportTo",
    "PREFIX",
    "TensorBoard",
    "Tracker",
    "TrackerFeed",
    "TrainerLoggers",
    "WandB",
    "figures",
]


@runtime_checkable
class Tracker(Protocol):
    """Receives the figures: ``log({"spotsafe/goodput": 0.93, ...}, step)``. ``close()`` is optional."""

    def log(self, figures: Mapping[str, float], step: int) -> None: ...


def _need(package: str, extra: str, err: ImportError) -> ImportError:
    return ImportError(f"this tracker needs {package}: pip install 'spotsafe[{extra}]' ({err})")


class TensorBoard:
    """Scalars in TensorBoard event files, through ``torch.utils.tensorboard.SummaryWriter``.

    Give the training's own ``writer`` to put the figures beside its metrics, or a ``log_dir`` for a writer of
    their own (closed with the checkpointer).
    """

    def __init__(self, log_dir: str | None = None, *, writer: Any = None) -> None:
        if (log_dir is None) == (writer is None):
            raise ConfigError("TensorBoard(log_dir) or TensorBoard(writer=SummaryWriter(...)): give one of them")
        self._own = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise _need("tensorboard", "tensorboard", err) from err
            writer = SummaryWriter(log_dir)
        self.writer = writer

    def log(self, figures: Mapping[str, float], step: int) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        if self._own:
            self.writer.close()


class MLflow:
    """Metrics of an MLflow run: ``run_id``'s, or else the run active when the tracker is made (or, failing
    that, when it first logs): ``mlflow.start_run()`` first, so they sit beside the training's own
    ``mlflow.log_metric`` calls. (MLflow's active run belongs to a thread; saves commit on a background one.)"""

    def __init__(self, run_id: str | None = None) -> None:
        try:
            import mlflow
        except ImportError as err:
            raise _need("mlflow", "mlflow", err) from err
        self._mlflow = mlflow
        active = mlflow.active_run()
        self.run_id = run_id if run_id is not None else (active.info.run_id if active is not None else None)

    def log(self, figures: Mapping[str, float], step: int) -> None:
        run_id = self.run_id
        if run_id is None:
            active = self._mlflow.active_run()
            if active is None:
                raise RuntimeError("no active MLflow run: call mlflow.start_run() first, or give MLflow(run_id=...)")
            run_id = self.run_id = active.info.run_id
        self._mlflow.MlflowClient().log_batch(
            run_id, metrics=[self._mlflow.entities.Metric(k, float(v), _now_ms(), step) for k, v in figures.items()]
        )


class WandB:
    """Metrics of a Weights & Biases run (``run``, or else ``wandb.run``): offline mode works as online does.

    The figures get their own x-axis, ``spotsafe/step`` (``define_metric``), so they never disturb the step
    counter of the training's own ``wandb.log`` calls.
    """

    def __init__(self, run: Any = None) -> None:
        try:
            import wandb
        except ImportError as err:
            raise _need("wandb", "wandb", err) from err
        self._wandb = wandb
        self._run = run
        self._defined: set[int] = set()

    def log(self, figures: Mapping[str, float], step: int) -> None:
        run = self._run if self._run is not None else self._wandb.run
        if run is None:
            raise RuntimeError("no W&B run: call wandb.init() first, or give WandB(run=...)")
        if id(run) not in self._defined:
            run.define_metric(f"{PREFIX}step")
            run.define_metric(f"{PREFIX}*", step_metric=f"{PREFIX}step")
            self._defined.add(id(run))
        run.log({**figures, f"{PREFIX}step": step})


class TrainerLoggers:
    """The loggers of a Lightning ``Trainer`` (``trainer.loggers``: TensorBoard, CSV, MLflow, W&B...): what
    ``SpotsafeCallback(trackers="trainer")`` logs to, beside the training's own ``self.log`` metrics."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def log(self, figures: Mapping[str, float], step: int) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(dict(figures), step=step)


class ReportTo:
    """The trackers a Hugging Face Trainer reports to (``TrainingArguments.report_to``), made once its own
    reporters are set up (``SpotsafeCallback(trackers="report_to")``): ``tensorboard`` (a writer in the same folder
    as the Trainer's: ``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/spotsafe``), ``mlflow`` (the run the
    Trainer started), ``wandb`` (``wandb.run``). Other reporters get nothing (logged once)."""

    def __init__(self) -> None:
        self.targets: list[Tracker] = []

    def attach(self, report_to: Sequence[str] | str | None, output_dir: str) -> None:
        names = [report_to] if isinstance(report_to, str) else list(report_to or [])
        for name in names:
            if name == "tensorboard":
                folder = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(output_dir, "runs", "spotsafe")
                self.targets.append(TensorBoard(folder))
            elif name == "mlflow":
                self.targets.append(MLflow())
            elif name == "wandb":
                self.targets.append(WandB())
            elif name not in ("none", "all"):
                log.info(
                    "spotsafe: the spot figures are not sent to the %r reporter (only tensorboard, mlflow, wandb)", name
                )

    def log(self, figures: Mapping[str, float], step: int) -> None:
        for target in self.targets:
            target.log(figures, step)

    def close(self) -> None:
        close_all(self.targets)


class Latest:
    """Keeps the newest figures, for a framework callback to put beside its own metrics (Keras' ``logs``)."""

    def __init__(self) -> None:
        self.figures: dict[str, float] = {}
        self._lock = threading.Lock()

    def log(self, figures: Mapping[str, float], step: int) -> None:
        with self._lock:
            self.figures = dict(figures)

    def newest(self) -> dict[str, float]:
        with self._lock:
            return dict(self.figures)


def _now_ms() -> int:
    return int(time.time() * 1000)


def figures(model: RunModel, *, on_demand_price: float | None = None) -> dict[str, float]:
    """The figures of the module docstring for a run's model (the known ones)."""
    report = report_of("", model, on_demand_price=on_demand_price)
    out: dict[str, float | None] = {
        "interruptions": report.interruptions,
        "replayed_steps": model.replayed_total,
        "checkpoint_stall_s": model.saves[-1].event.stall_s if model.saves else None,
        "checkpoint_write_s": model.saves[-1].event.duration_s if model.saves else None,
        "restore_s": model.restores[-1].event.duration_s if model.restores else None,
        "recover_s": report.recover_seconds.mean,
        "goodput": report.goodput,
        "cost_usd": report.cost,
        "saved_usd": report.saved,
    }
    return {PREFIX + name: float(value) for name, value in out.items() if value is not None}


LOG_AFTER = (ev.RestoreCompleted, ev.RestoreFresh, ev.SaveCommitted)
"""The events after which the figures are logged."""


class TrackerFeed:
    """Folds a run's events (``model``: the earlier attempts', then this process's as they are written) and logs
    :func:`figures` to every tracker after each event of :data:`LOG_AFTER`. Any thread; never raises."""

    def __init__(
        self,
        trackers: Sequence[Tracker],
        model: RunModel,
        identity: RunIdentity,
        *,
        on_demand_price: float | None = None,
    ) -> None:
        self.trackers = list(trackers)
        self.model = model
        self.identity = identity
        self.on_demand_price = on_demand_price
        self._lock = threading.Lock()
        self._broken: set[int] = set()

    def on_event(self, event: ev.Event) -> None:
        with self._lock:
            i = self.identity
            self.model.apply(LoggedEvent(event=event, run_id=i.run_id, attempt=i.attempt, pid=i.pid))
            if not isinstance(event, LOG_AFTER):
                return
            step = event.step if isinstance(event, (ev.RestoreCompleted, ev.SaveCommitted)) else 0
            values = figures(self.model, on_demand_price=self.on_demand_price)
            for index, tracker in enumerate(self.trackers):
                if index in self._broken:
                    continue
                try:
                    tracker.log(values, step)
                except Exception as err:  # noqa: BLE001 (a tracker never stops training)
                    self._broken.add(index)
                    log.warning(
                        "spotsafe: tracker %s failed and is skipped from now on: %s", type(tracker).__name__, err
                    )

    def close(self) -> None:
        close_all(self.trackers)


def close_all(trackers: Sequence[Tracker]) -> None:
    """Close each tracker that has ``close()``; a failure is logged, never raised."""
    for tracker in trackers:
        close = getattr(tracker, "close", None)
        if callable(close):
            try:
                close()
            except Exception as err:  # noqa: BLE001
                log.warning("spotsafe: closing tracker %s failed: %s", type(tracker).__name__, err)


def check_trackers(trackers: object) -> list[Tracker]:
    """The ``trackers`` keyword: a sequence of objects with ``log(figures, step)``."""
    if trackers is None:
        return []
    if not isinstance(trackers, (list, tuple)) or not all(isinstance(t, Tracker) for t in trackers):
        raise ConfigError(
            "trackers must be a list of trackers (objects with log(figures, step)), such as "
            f"[spotsafe.trackers.TensorBoard('runs/tb')], got {trackers!r:.80}"
        )
    return list(trackers)
