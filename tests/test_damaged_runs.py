"""A run whose committed checkpoints are all damaged never starts over silently, and its evidence stays (issue 13).

Real runs on disk, damaged the way storage damages them (one flipped bit in a blob that an incremental
chain shares), restored in-process, by a real job process and under the real supervisor.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spotsafe
from spotsafe.errors import NoUsableCheckpointError, TransientStorageError
from spotsafe.exit_codes import EXIT_NO_USABLE_CHECKPOINT
from spotsafe.jobenv import ENV_ON_DAMAGED
from spotsafe.storage.base import Buffer, ReadProgress
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.storage.retry import RetryingStorage, StorageRetry
from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.supervisor.run import RunConfig, Supervisor
from spotsafe.supervisor.store import JobState, JobStore
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import PROCESS_HANG_S, fake_exit

SPOTSAFE = str(Path(sys.executable).with_name("spotsafe"))


def make_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model with a frozen table (2.4 MB) that every incremental checkpoint shares with the first one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    model.register_buffer("table", torch.randn(600_000))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(run: Path, steps: int, **kwargs: Any) -> tuple[nn.Module, int]:
    model, opt = make_model()
    options: dict[str, Any] = {"policy": spotsafe.every(steps=3), "handle_signals": False, "keep": 10}
    options.update(kwargs)
    with spotsafe.Checkpointer(str(run), model=model, optimizer=opt, **options) as ckpt:
        start = ckpt.restore()
        while ckpt.step < steps:
            opt.zero_grad()
            model(torch.ones(4)).sum().backward()
            opt.step()
            ckpt.step_done()
        ckpt.finish()
    return model, start


def tree(run: Path) -> dict[str, bytes]:
    """Every checkpoint file and its bytes (the evidence)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}


def flip_shared_blob(run: Path) -> str:
    """Flip one bit in the big blob every checkpoint shares (sizes stay right: only checksums can tell)."""
    repo = CheckpointRepository(LocalStorage(run))
    refs = repo.committed()
    shared = [b for b in repo.read_manifest(refs[0]).blobs if b.checkpoint is not None and b.size > 1_000_000]
    (entry,) = shared
    for ref in refs:  # the chain: every checkpoint lists that same blob
        assert any(b.ref == entry.ref for b in repo.read_manifest(ref).blobs) or ref.name == entry.checkpoint
    path = run / "checkpoints" / str(entry.checkpoint) / entry.path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return entry.ref


def events(run: Path) -> list[Any]:
    return [e.event for e in read_events(run / EVENTS_FILE)]


@pytest.fixture
def damaged(tmp_path: Path) -> Iterator[Path]:
    run = tmp_path / "run"
    train(run, 12)
    flip_shared_blob(run)
    yield run


def test_restore_raises_naming_each_damaged_checkpoint_and_deletes_nothing(damaged: Path) -> None:
    before = tree(damaged)
    names = [r.name for r in CheckpointRepository(LocalStorage(damaged)).committed()]
    assert len(names) == 4
    model, opt = make_model()
    with spotsafe.Checkpointer(str(damaged), model=model, optimizer=opt, handle_signals=False) as ckpt:
        with pytest.raises(NoUsableCheckpointError) as info:
            ckpt.restore()
        assert ckpt.step == 0
    error = info.value
    assert [name for name, _ in error.damaged] == names
    assert all("fails its checksum" in why for _, why in error.damaged)
    text = str(error)
    assert all(name in text for name in names)
    assert "none can be restored" in text and ENV_ON_DAMAGED in text and "spotsafe verify --all" in text
    # An Exception to except clauses, and a SystemExit with a code of its own when uncaught.
    assert isinstance(error, spotsafe.SpotsafeError) and isinstance(error, SystemExit)
    assert error.code == EXIT_NO_USABLE_CHECKPOINT == 65
    assert tree(damaged) == before
    kinds = [e.type for e in events(damaged)]
    assert kinds.count("checkpoint_skipped") == 4
    failed = kinds.index("restore_failed")
    assert kinds[failed + 1] == "run_exited" and "restore_fresh" not in kinds[failed:]


def test_a_job_process_exits_65_with_the_reasons_and_the_supervisor_does_not_relaunch(
    damaged: Path, tmp_path: Path
) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import torch, spotsafe\n"
        "from torch import nn\n"
        "torch.manual_seed(0)\n"
        "model = nn.Sequential(nn.Linear(4, 4)); model.register_buffer('table', torch.randn(600_000))\n"
        "opt = torch.optim.AdamW(model.parameters(), lr=1e-2)\n"
        "ckpt = spotsafe.Checkpointer(model=model, optimizer=opt, policy=spotsafe.every(steps=3), keep=10)\n"
        "ckpt.restore()\n"
        "while ckpt.step < 20:\n"
        "    opt.zero_grad(); model(torch.ones(4)).sum().backward(); opt.step(); ckpt.step_done()\n"
        "ckpt.finish()\n"
    )
    before = tree(damaged)
    env = {"SPOTSAFE_CHECKPOINT_URL": str(damaged), "SPOTSAFE_NOTICES": "signals", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=PROCESS_HANG_S
    )
    assert proc.returncode == EXIT_NO_USABLE_CHECKPOINT, proc.stderr
    assert "none can be restored" in proc.stderr and "fails its checksum" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tree(damaged) == before

    config = RunConfig(
        name="job",
        command=(sys.executable, str(script)),
        url=str(damaged),
        store=tmp_path / "jobs.sqlite",
        retry=RelaunchPolicy(initial_s=0.05, max_delay_s=0.2),
        grace_s=5.0,
    )
    said: list[str] = []
    code = Supervisor(config, say=said.append, output=subprocess.DEVNULL).run()
    assert code == EXIT_NO_USABLE_CHECKPOINT
    store = JobStore(tmp_path / "jobs.sqlite")
    assert [a.exit_class for a in store.attempts("job")] == ["no_usable_checkpoint"]  # one attempt, no budget burnt
    job = store.job("job")
    assert job is not None and job.state == JobState.FAILED
    assert any("none it can restore" in line for line in said)
    assert tree(damaged) == before


def test_starting_fresh_is_an_explicit_choice(damaged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = make_model()
    with spotsafe.Checkpointer(str(damaged), model=model, optimizer=opt, handle_signals=False) as ckpt:
        assert ckpt.restore(on_damaged="start_fresh") == 0
    warnings = [e for e in events(damaged) if e.type == "warning"]
    assert warnings and "starting from step 0" in warnings[-1].message

    monkeypatch.setenv(ENV_ON_DAMAGED, "start_fresh")
    model, opt = make_model()
    with spotsafe.Checkpointer(str(damaged), model=model, optimizer=opt, handle_signals=False) as ckpt:
        assert ckpt.restore() == 0
        with pytest.raises(NoUsableCheckpointError):
            ckpt.restore(on_damaged="fail")  # the argument wins over the environment

    monkeypatch.setenv(ENV_ON_DAMAGED, "sure")
    with spotsafe.Checkpointer(str(damaged), model=make_model()[0], handle_signals=False) as ckpt:
        with pytest.raises(spotsafe.ConfigError, match=ENV_ON_DAMAGED):
            ckpt.restore()
        with pytest.raises(spotsafe.ConfigError, match="on_damaged"):
            ckpt.restore(on_damaged="yes")


def test_a_fresh_run_and_a_run_with_an_intact_checkpoint_are_unchanged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _, start = train(run, 6)
    assert start == 0  # nothing committed yet: a fresh start needs no opt-in
    repo = CheckpointRepository(LocalStorage(run))
    newest = repo.committed()[0]
    data = bytearray((run / newest.key / "optimizer.bin").read_bytes())
    data[3] ^= 1
    (run / newest.key / "optimizer.bin").write_bytes(bytes(data))
    _, start = train(run, 9)
    assert start == 3  # the newest is damaged: an older one is used, as before


class ReadsFail:
    """Local storage whose blob reads fail with a transient error, every time (an outage longer than the budget)."""

    def __init__(self, inner: LocalStorage) -> None:
        self.inner = inner
        self.failed = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read_into(self, key: str, buffer: Buffer, progress: ReadProgress | None = None, *, offset: int = 0) -> int:
        if key.endswith(".bin"):
            self.failed += 1
            raise TransientStorageError(f"{key}: connection reset")
        return self.inner.read_into(key, buffer, progress, offset=offset)


def test_a_transient_error_that_outlives_the_retry_budget_is_not_damage(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, 9)
    before = tree(run)
    logged = len(events(run))
    flaky = ReadsFail(LocalStorage(run))
    storage = RetryingStorage(flaky, StorageRetry(budget_s=0.0))  # type: ignore[arg-type]
    model, opt = make_model()
    ckpt = spotsafe.Checkpointer(model=model, optimizer=opt, storage=storage, handle_signals=False, exit=fake_exit)
    try:
        with pytest.raises(TransientStorageError):
            ckpt.restore()
        with pytest.raises(TransientStorageError):
            ckpt.restore(on_damaged="start_fresh")  # not damage: the opt-in does not apply either
    finally:
        ckpt.close()
    assert flaky.failed >= 2
    assert ckpt.step == 0
    kinds = [e.type for e in events(run)[logged:]]
    assert "run_started" in kinds
    assert "checkpoint_skipped" not in kinds and "restore_fresh" not in kinds and "restore_failed" not in kinds
    assert tree(run) == before


def test_gc_never_deletes_damaged_checkpoints_that_no_intact_one_follows(damaged: Path) -> None:
    """Bit flips keep every size right: gc verifies checksums before it trusts a checkpoint to be newer."""
    before = tree(damaged)
    proc = subprocess.run(
        [SPOTSAFE, "gc", str(damaged), "--keep", "1", "--apply"], capture_output=True, text=True, timeout=PROCESS_HANG_S
    )
    assert proc.returncode == 0, proc.stderr
    assert tree(damaged) == before
    assert "no intact" in proc.stdout


def test_gc_deletes_only_what_is_older_than_the_newest_verified_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, 12, incremental=False)  # no sharing: damage stays in one checkpoint
    repo = CheckpointRepository(LocalStorage(run))
    refs = repo.committed()  # steps 12, 9, 6, 3
    for ref in refs[:2]:  # the newest two: one flipped bit each
        path = run / ref.key / "model.bin"
        data = bytearray(path.read_bytes())
        data[-5] ^= 1
        path.write_bytes(bytes(data))
    proc = subprocess.run(
        [SPOTSAFE, "gc", str(run), "--keep", "1", "--apply"],
        capture_output=True,
        text=True,
        timeout=PROCESS_HANG_S,
        env={"COLUMNS": "250", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    left = [r.step for r in repo.committed()]
    assert left == [12, 9, 6]  # the damaged newest two are evidence; step 6 verifies; step 3 is older: deleted
    assert "fails its checksum" in proc.stdout


def test_retention_after_a_save_deletes_nothing_newer_than_an_intact_checkpoint(tmp_path: Path) -> None:
    """Retention in a running job: the checkpoint just committed is intact, so older ones beyond keep may go."""
    run = tmp_path / "run"
    train(run, 15, keep=2)
    assert [r.step for r in CheckpointRepository(LocalStorage(run)).committed()] == [15, 12]
    recorded = [e for e in events(run) if e.type == "checkpoint_deleted"]
    assert [e.step for e in recorded] == [3, 6, 9]
    assert json.loads((run / "latest.json").read_text())["step"] == 15
