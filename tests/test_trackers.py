"""The run's spot figures in real trackers: TensorBoard event files, an MLflow file store, W&B offline runs.

Each test trains a small model for two attempts (the first ends without finishing, as an interrupted one does),
with the training's own metric logged beside spotsafe's, then reads the tracker back with the tracker's own reader.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import spotsafe
from spotsafe.errors import ConfigError
from spotsafe.policy.interval import every
from spotsafe.trackers import PREFIX, TensorBoard, Tracker


def two_attempts(run: Path, trackers: list[Any], own: Any = None) -> list[int]:
    """Attempt 1 saves at steps 3 and 6 and stops at 7 without finishing; attempt 2 resumes from 6 and finishes at
    10 (saves at 9 and the final one). ``own(loss, step)`` logs the training's own metric. Returns the steps seen."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for last in (7, 10):
        ckpt = spotsafe.Checkpointer(
            str(run), model=model, optimizer=optimizer, policy=every(steps=3), handle_signals=False, trackers=trackers
        )
        ckpt.restore()
        while ckpt.step < last:
            optimizer.zero_grad()
            loss = model(torch.ones(2, 4)).square().mean()
            loss.backward()
            optimizer.step()
            ckpt.step_done()
            steps.append(ckpt.step)
            if own is not None:
                own(loss.item(), ckpt.step)
        if last == 10:
            ckpt.finish()
        ckpt.close()
    return steps


def test_tensorboard_gets_every_figure_beside_the_training_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    two_attempts(
        tmp_path / "run", [TensorBoard(writer=writer)], lambda loss, step: writer.add_scalar("loss", loss, step)
    )
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "loss" in tags
    expected = {"interruptions", "replayed_steps", "checkpoint_stall_s", "checkpoint_write_s", "restore_s", "goodput"}
    assert {PREFIX + name for name in expected} <= tags
    stalls = events.Scalars(f"{PREFIX}checkpoint_stall_s")
    assert [s.step for s in stalls] == [3, 6, 6, 9, 10]  # after each commit at its step, and at the restore (6)
    assert all(s.value >= 0 for s in stalls)
    interruptions = {s.step: s.value for s in events.Scalars(f"{PREFIX}interruptions")}
    assert interruptions[3] == 0 and interruptions[10] == 1  # the second attempt knows the first was interrupted
    assert {s.step for s in events.Scalars(f"{PREFIX}restore_s")} == {6, 9, 10}  # restored at 6, then known


def test_tensorboard_with_a_folder_of_its_own(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    two_attempts(tmp_path / "run", [TensorBoard(str(tmp_path / "tb"))])
    tags: set[str] = set()
    for folder in {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert f"{PREFIX}goodput" in tags and f"{PREFIX}replayed_steps" in tags


def test_mlflow_gets_the_figures_in_the_active_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a local file store, as the issue asks
    from spotsafe.trackers import MLflow

    mlflow.set_tracking_uri((tmp_path / "mlruns").as_uri())
    try:
        with mlflow.start_run() as run:
            two_attempts(tmp_path / "run", [MLflow()], lambda loss, step: mlflow.log_metric("loss", loss, step=step))
        client = mlflow.MlflowClient()
        history = client.get_metric_history(run.info.run_id, f"{PREFIX}checkpoint_write_s")
        assert [m.step for m in history] == [3, 6, 6, 9, 10]
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 11  # step 7 twice: replayed
        assert client.get_metric_history(run.info.run_id, f"{PREFIX}interruptions")[-1].value == 1
    finally:
        mlflow.set_tracking_uri("")


def test_wandb_offline_gets_the_figures_on_their_own_axis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from spotsafe.trackers import WandB

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="spotsafe-test", dir=str(tmp_path), mode="offline")
    try:
        two_attempts(tmp_path / "run", [WandB()], lambda loss, step: run.log({"loss": loss}))
        summary = dict(run.summary)
    finally:
        run.finish()
    assert "loss" in summary
    assert summary[f"{PREFIX}step"] == 10
    assert summary[f"{PREFIX}interruptions"] == 1
    assert f"{PREFIX}checkpoint_stall_s" in summary
    assert list(tmp_path.rglob("offline-run-*/run-*.wandb"))  # the offline run, for `wandb sync` to upload later


class _Broken:
    def __init__(self) -> None:
        self.calls = 0

    def log(self, figures: Mapping[str, float], step: int) -> None:
        self.calls += 1
        raise OSError("the tracker's server is gone")


class _Kept:
    def __init__(self) -> None:
        self.logged: list[tuple[int, dict[str, float]]] = []

    def log(self, figures: Mapping[str, float], step: int) -> None:
        self.logged.append((step, dict(figures)))


def test_a_failing_tracker_is_skipped_with_a_warning_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken, kept = _Broken(), _Kept()
    with caplog.at_level(logging.WARNING, logger="spotsafe"):
        steps = two_attempts(tmp_path / "run", [broken, kept])
    assert steps[-1] == 10
    assert broken.calls == 2  # once per attempt (each a process of its own, in real runs)
    assert len([r for r in caplog.records if "tracker _Broken failed" in r.getMessage()]) == 2
    assert [step for step, _ in kept.logged] == [0, 3, 6, 6, 9, 10]  # a fresh start, saves, a restore at 6
    assert isinstance(kept, Tracker)


@pytest.mark.parametrize("bad", ["tb", [object()], TensorBoard.__name__])
def test_trackers_that_are_not_trackers_are_a_config_error(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match="trackers must be a list of trackers"):
        spotsafe.Checkpointer(str(tmp_path / "run"), trackers=bad, handle_signals=False)


def test_tensorboard_needs_a_folder_or_a_writer() -> None:
    with pytest.raises(ConfigError, match="give one of them"):
        TensorBoard()


def test_a_hugging_face_trainer_reports_the_figures_where_it_reports_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SpotsafeCallback(trackers="report_to")`` with ``report_to=["tensorboard"]``: the Trainer's TensorBoard
    folder gets the spot figures beside ``train/loss``."""
    pytest.importorskip("transformers")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import Trainer, TrainingArguments

    from spotsafe.integrations.transformers import SpotsafeCallback

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.lin(x).squeeze(-1)
            return {"loss": (out - labels).square().mean(), "logits": out}

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    data = [{"x": torch.full((4,), float(i)), "labels": torch.tensor(float(i % 3))} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=6,
        logging_steps=1,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    spot = SpotsafeCallback(str(tmp_path / "run"), policy=every(steps=2), trackers="report_to", progress_interval=0)
    Trainer(model=Tiny(), args=args, train_dataset=data, callbacks=[spot]).train()
    tags: set[str] = set()
    steps: list[int] = []
    for folder in {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}:
        accumulator = EventAccumulator(str(folder))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
        if f"{PREFIX}checkpoint_write_s" in accumulator.Tags()["scalars"]:
            steps = [s.step for s in accumulator.Scalars(f"{PREFIX}checkpoint_write_s")]
    assert "train/loss" in tags and f"{PREFIX}goodput" in tags
    assert steps[:3] == [2, 4, 6]
