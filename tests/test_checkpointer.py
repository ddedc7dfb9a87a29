"""The Checkpointer in-process: resume, fallback, retention, leftovers, signals, events."""

from __future__ import annotations

import json
import os
import pickle
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import spotsafe
from spotsafe.cli.demo import compare_final
from spotsafe.errors import CheckpointMismatchError, ConfigError, TransientStorageError
from spotsafe.storage.base import Chunk
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import MANIFEST_NAME, Manifest
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import Exited, fake_exit, make_job


def events(run: Path, kind: str) -> list[Any]:
    return [e.event for e in read_events(run / EVENTS_FILE) if e.event.type == kind]


def committed(run: Path) -> list[Any]:
    return CheckpointRepository(LocalStorage(run)).committed()


def run_uninterrupted(run: Path, steps: int) -> None:
    job = make_job(run)
    assert job.ckpt.restore() == 0
    job.train(steps)
    job.ckpt.finish()


def test_fresh_run_starts_at_zero(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    assert job.ckpt.restore() == 0
    assert [e.skipped for e in events(tmp_path, "restore_fresh")] == [0]
    job.ckpt.close()


def test_crash_and_resume_in_process_is_bit_exact(tmp_path: Path) -> None:
    run_uninterrupted(tmp_path / "ref", 30)
    run = tmp_path / "run"
    first = make_job(run)
    first.ckpt.restore()
    first.train(17)  # saves at 7 and 14, then "crashes" at 17 without saving
    first.ckpt.close()
    second = make_job(run)
    assert second.ckpt.restore() == 14
    second.train(30)
    second.ckpt.finish()
    ref_step, run_step, diffs = compare_final(tmp_path / "ref", run)
    assert ref_step == run_step == 30
    assert set(diffs) >= {"model", "optimizer", "scheduler", "loader", "rng", "progress"}
    assert all(not d for d in diffs.values()), diffs
    [restored] = events(run, "restore_completed")
    assert restored.step == 14 and restored.last_known_step == 17 and restored.replayed_steps == 3


def test_resume_without_rng_state_would_differ(tmp_path: Path) -> None:
    """Negative control: the comparison above can fail. Skipping the RNG restore breaks exactness."""
    run_uninterrupted(tmp_path / "ref", 20)
    run = tmp_path / "run"
    first = make_job(run)
    first.train(10)
    first.ckpt.close()
    second = make_job(run)
    saved_rng = torch.get_rng_state()
    second.ckpt.restore()
    torch.set_rng_state(saved_rng)  # undo the RNG part of the restore
    second.train(20)
    second.ckpt.finish()
    _, _, diffs = compare_final(tmp_path / "ref", run)
    assert diffs["model"], "dropout masks drawn from the wrong RNG state must change the weights"


def damage_truncate(ckpt: Path) -> None:
    blob = ckpt / "model.bin"
    blob.write_bytes(blob.read_bytes()[:-10])


def damage_flip(ckpt: Path) -> None:
    blob = ckpt / "optimizer.bin"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))


def damage_delete_manifest(ckpt: Path) -> None:
    (ckpt / MANIFEST_NAME).unlink()


def damage_delete_blob(ckpt: Path) -> None:
    (ckpt / "state.json").unlink()


def damage_garbage_manifest(ckpt: Path) -> None:
    (ckpt / MANIFEST_NAME).write_bytes(b"{not json")


def _rewrite(ckpt: Path, edit: Any) -> None:
    """Tamper like an attacker who also fixes up sizes and checksums in the manifest."""
    from spotsafe.storage.manifest import BlobEntry, new_hasher

    manifest = Manifest.from_bytes((ckpt / MANIFEST_NAME).read_bytes())
    edit(ckpt)
    blobs = []
    for entry in manifest.blobs:
        path = ckpt / entry.path
        data = path.read_bytes() if path.exists() else b""
        h = new_hasher()
        h.update(data)
        blobs.append(BlobEntry(entry.path, len(data), h.hexdigest()))
    doc = json.loads(manifest.to_bytes())
    doc["blobs"] = [b.to_json() for b in blobs]
    (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))


def tamper_pickle_tag(ckpt: Path) -> None:
    def edit(ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        state["components"]["progress"]["tree"]["step"] = {"$pickle": "Y29zCnN5c3RlbQ=="}
        (ckpt / "state.json").write_text(json.dumps(state))

    _rewrite(ckpt, edit)


def tamper_path_escape(ckpt: Path) -> None:
    doc = json.loads((ckpt / MANIFEST_NAME).read_text())
    doc["blobs"][0]["path"] = "../../../../etc/passwd"
    (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))


def tamper_tensor_overrun(ckpt: Path) -> None:
    def edit(ckpt: Path) -> None:
        state = json.loads((ckpt / "state.json").read_text())
        state["components"]["model"]["tensors"][0]["segments"][0][1] = 10**9
        (ckpt / "state.json").write_text(json.dumps(state))

    _rewrite(ckpt, edit)


@pytest.mark.parametrize(
    "damage",
    [
        damage_truncate,
        damage_flip,
        damage_delete_manifest,
        damage_delete_blob,
        damage_garbage_manifest,
        tamper_pickle_tag,
        tamper_path_escape,
        tamper_tensor_overrun,
    ],
)
def test_restore_falls_back_past_damaged_checkpoint(tmp_path: Path, damage: Any) -> None:
    job = make_job(tmp_path, keep=5)
    job.train(14)  # checkpoints at 7 and 14
    job.ckpt.close()
    newest = committed(tmp_path)[0]
    assert newest.step == 14
    damage(tmp_path / newest.key)

    fresh = make_job(tmp_path, keep=5)
    assert fresh.ckpt.restore() == 7
    skipped = events(tmp_path, "checkpoint_skipped")
    if damage is damage_delete_manifest:
        assert skipped == []  # without a manifest the checkpoint never existed
    else:
        assert [(s.checkpoint, s.step) for s in skipped] == [(newest.name, 14)]
        assert skipped[0].reason
    fresh.ckpt.close()


def test_restore_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = make_job(tmp_path)
    job.train(7)
    job.ckpt.close()

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling during restore")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    fresh = make_job(tmp_path)
    assert fresh.ckpt.restore() == 7
    fresh.ckpt.close()


def test_all_damaged_is_an_error_and_starting_fresh_an_explicit_choice(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job.train(7)
    job.ckpt.close()
    damage_flip(tmp_path / committed(tmp_path)[0].key)
    again = make_job(tmp_path)
    with pytest.raises(spotsafe.NoUsableCheckpointError, match="none can be restored"):
        again.ckpt.restore()
    assert events(tmp_path, "restore_fresh") == []
    assert again.ckpt.restore(on_damaged="start_fresh") == 0
    assert [e.skipped for e in events(tmp_path, "restore_fresh")] == [1]
    again.ckpt.close()


def test_retention_keeps_newest_n(tmp_path: Path) -> None:
    job = make_job(tmp_path, keep=2)
    job.train(35)  # saves at 7, 14, 21, 28, 35
    job.ckpt.close()
    assert [r.step for r in committed(tmp_path)] == [35, 28]
    assert sorted(e.step for e in events(tmp_path, "checkpoint_deleted")) == [7, 14, 21]


def test_retention_keeps_older_intact_checkpoint_when_newer_ones_are_damaged(tmp_path: Path) -> None:
    job = make_job(tmp_path, keep=5)
    job.train(14)
    job.ckpt.close()
    for ref in committed(tmp_path):
        if ref.step == 14:
            damage_truncate(tmp_path / ref.key)
    # A new run with keep=1 saves at 21: the newest is intact, so the damaged 14 and the old 7 may go.
    again = make_job(tmp_path, keep=1)
    assert again.ckpt.restore() == 7
    again.train(21)  # saves at 14 (a new folder) and 21
    again.ckpt.close()
    assert [r.step for r in committed(tmp_path)] == [21]
    assert make_job(tmp_path).ckpt.restore() == 21


def test_leftovers_of_killed_save_are_removed_at_start(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job.train(7)
    job.ckpt.close()
    good = committed(tmp_path)[0]
    partial = tmp_path / "checkpoints" / "g000001-step-000000000014-1795402769996-abcd"
    partial.mkdir()
    (partial / "model.bin").write_bytes(b"half")
    stray = tmp_path / good.key / f".{MANIFEST_NAME}.tmp-1234abcd"
    stray.write_bytes(b"{")

    fresh = make_job(tmp_path)
    assert not partial.exists() and not stray.exists()
    assert (tmp_path / good.key / MANIFEST_NAME).exists()
    removed = {e.path for e in events(tmp_path, "partial_removed")}
    assert removed == {"checkpoints/" + partial.name, f"{good.key}/{stray.name}"}
    assert fresh.ckpt.restore() == 7
    fresh.ckpt.close()


def test_signal_saves_at_step_boundary_and_exits_75(tmp_path: Path) -> None:
    previous = signal.getsignal(signal.SIGTERM)
    job = make_job(tmp_path, handle_signals=True, exit=fake_exit)

    def at_step(step: int) -> None:
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Exited) as info:
        job.train(100, on_step=at_step)
    assert info.value.code == spotsafe.EXIT_PREEMPTED == 75
    assert committed(tmp_path)[0].step == 10
    [notice] = events(tmp_path, "notice_received")
    assert (notice.source, notice.step) == ("SIGTERM", 10)
    assert [(e.reason, e.step, e.exit_code) for e in events(tmp_path, "run_exited")] == [("preempted", 10, 75)]
    assert [e.reason for e in events(tmp_path, "save_committed")] == ["interval", "notice"]
    assert signal.getsignal(signal.SIGTERM) == previous, "handlers are put back on close"
    assert make_job(tmp_path).ckpt.restore() == 10


class SignalDuringWrite(LocalStorage):
    """Sends a signal to this process in the middle of writing the N-th blob."""

    def __init__(self, root: Path, sig: int, on_write: int) -> None:
        super().__init__(root)
        self.sig, self.on_write, self.writes = sig, on_write, 0

    def write_stream(self, key: str, chunks: Iterable[Chunk]) -> int:
        self.writes += 1
        if self.writes == self.on_write:
            os.kill(os.getpid(), self.sig)
        return super().write_stream(key, chunks)


def test_second_signal_during_emergency_save_changes_nothing(tmp_path: Path) -> None:
    storage = SignalDuringWrite(tmp_path, signal.SIGINT, on_write=2)  # 2nd blob of the first save...
    job = make_job(tmp_path, handle_signals=True, exit=fake_exit, storage=storage, policy=spotsafe.every(steps=1000))

    def at_step(step: int) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Exited):
        job.train(100, on_step=at_step)
    # ...which is the emergency save: SIGINT arrives while it writes, and is only recorded.
    [ref] = committed(tmp_path)
    assert ref.step == 5
    CheckpointRepository(LocalStorage(tmp_path)).verify(ref)
    assert [(e.source, e.count) for e in events(tmp_path, "notice_received")] == [("SIGTERM", 1), ("SIGINT", 1)]
    assert len(events(tmp_path, "save_committed")) == 1


def test_signal_during_regular_save_exits_without_saving_twice(tmp_path: Path) -> None:
    storage = SignalDuringWrite(tmp_path, signal.SIGUSR1, on_write=2)  # during the save at step 7
    job = make_job(tmp_path, handle_signals=True, exit=fake_exit, storage=storage)
    with pytest.raises(Exited):
        job.train(100)
    # The save at step 7 is written in the background while training goes on; the notice is
    # handled at a later step boundary (under load, after the next interval save): the process
    # exits at the step of its last commit, and no step is saved twice.
    saves = [(e.step, e.reason) for e in events(tmp_path, "save_committed")]
    exited = [e.step for e in events(tmp_path, "run_exited")]
    assert saves[0] == (7, "interval") and len(exited) == 1, (saves, exited)
    assert saves[-1][0] == exited[0], (saves, exited)
    assert len({step for step, _ in saves}) == len(saves), (saves, exited)
    assert all(reason == "interval" for _, reason in saves[:-1]), (saves, exited)


class FailingWrites(LocalStorage):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fail = False

    def write_stream(self, key: str, chunks: Iterable[Chunk]) -> int:
        if self.fail:
            raise TransientStorageError(f"{key}: injected failure")
        return super().write_stream(key, chunks)


def test_failed_emergency_save_keeps_last_checkpoint_and_still_exits_75(tmp_path: Path) -> None:
    storage = FailingWrites(tmp_path)
    job = make_job(tmp_path, handle_signals=True, exit=fake_exit, storage=storage)

    def at_step(step: int) -> None:
        if step == 10:
            job.ckpt.wait()  # the save of step 7 is committed before the storage breaks
            storage.fail = True
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Exited) as info:
        job.train(100, on_step=at_step)
    assert info.value.code == 75
    assert [e.step for e in events(tmp_path, "save_failed")] == [10]
    assert [r.step for r in committed(tmp_path)] == [7]
    assert not any("-step-000000000010-" in p.name for p in (tmp_path / "checkpoints").iterdir())
    assert make_job(tmp_path).ckpt.restore() == 7


def test_save_events_describe_the_save(tmp_path: Path) -> None:
    job = make_job(tmp_path, metadata={"experiment": "abc", "lr": 0.01})
    job.train(7)
    job.ckpt.close()
    [started] = events(tmp_path, "save_started")
    [done] = events(tmp_path, "save_committed")
    ref = committed(tmp_path)[0]
    manifest = CheckpointRepository(LocalStorage(tmp_path)).read_manifest(ref)
    assert (started.step, started.reason) == (7, "interval")
    assert done.checkpoint == ref.name and done.bytes == manifest.total_bytes and done.blobs == len(manifest.blobs)
    assert done.duration_s >= 0 and done.time >= started.time
    assert manifest.metadata == {"experiment": "abc", "lr": 0.01}
    assert manifest.writer["run_id"] == tmp_path.name


def test_mismatched_model_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    job.train(7)
    job.ckpt.close()
    other = torch.nn.Linear(6, 3)
    ckpt = spotsafe.Checkpointer(str(tmp_path), model=other, handle_signals=False)
    with pytest.raises(CheckpointMismatchError, match="model"):
        ckpt.restore(strict=False)
    ckpt.close()
    extra = make_job(tmp_path, extra={"counter": torch.optim.SGD([torch.zeros(1)], lr=1)})
    with pytest.raises(CheckpointMismatchError, match="counter"):
        extra.ckpt.restore()
    extra.ckpt.close()


def test_location_comes_from_argument_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="SPOTSAFE_CHECKPOINT_URL"):
        spotsafe.Checkpointer(model=torch.nn.Linear(1, 1), handle_signals=False)
    monkeypatch.setenv("SPOTSAFE_CHECKPOINT_URL", str(tmp_path / "from-env"))
    monkeypatch.setenv("SPOTSAFE_ATTEMPT", "4")
    ckpt = spotsafe.Checkpointer(model=torch.nn.Linear(1, 1), handle_signals=False)
    assert ckpt.attempt == 4
    ckpt.save()
    ckpt.close()
    assert committed(tmp_path / "from-env")


def test_bad_configuration_is_rejected_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="JSON"):
        spotsafe.Checkpointer(str(tmp_path), metadata={"x": object()}, handle_signals=False)
    with pytest.raises(ConfigError, match="keep"):
        spotsafe.Checkpointer(str(tmp_path), keep=0, handle_signals=False)
    with pytest.raises(ConfigError, match="reserved"):
        spotsafe.Checkpointer(str(tmp_path), extra={"rng": torch.Generator()}, handle_signals=False)
    with pytest.raises(spotsafe.SpotsafeError, match="state_dict"):
        spotsafe.Checkpointer(str(tmp_path), extra={"thing": object()}, handle_signals=False)
    with pytest.raises(ConfigError, match="unsupported storage URL"):
        spotsafe.Checkpointer("ftp://host/run", handle_signals=False)


def test_extras_generators_and_scaler_round_trip(tmp_path: Path) -> None:
    def build() -> tuple[spotsafe.Checkpointer, torch.Generator, np.random.Generator, torch.amp.GradScaler]:
        gen = torch.Generator().manual_seed(5)
        npgen = np.random.default_rng(5)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        ckpt = spotsafe.Checkpointer(
            str(tmp_path), extra={"gen": gen, "npgen": npgen}, scaler=scaler, handle_signals=False
        )
        return ckpt, gen, npgen, scaler

    ckpt, gen, npgen, scaler = build()
    torch.rand(3, generator=gen)
    npgen.random(3)
    scaler.scale(torch.ones(1, requires_grad=True))  # initialises the scale tensor
    scaler.update(new_scale=77.0)
    ckpt.save()
    expected = (torch.rand(4, generator=gen), npgen.random(4), scaler.get_scale())
    ckpt.close()

    ckpt2, gen2, npgen2, scaler2 = build()
    ckpt2.restore()
    assert torch.equal(torch.rand(4, generator=gen2), expected[0])
    assert np.array_equal(npgen2.random(4), expected[1])
    assert scaler2.get_scale() == expected[2] == 77.0
    ckpt2.close()


def test_signal_handlers_need_the_main_thread(tmp_path: Path) -> None:
    import threading

    errors: list[RuntimeError] = []

    def build() -> None:
        try:
            spotsafe.Checkpointer(str(tmp_path), model=torch.nn.Linear(1, 1))
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])
    ckpt = spotsafe.Checkpointer(str(tmp_path), model=torch.nn.Linear(1, 1), handle_signals=False)
    ckpt.close()
