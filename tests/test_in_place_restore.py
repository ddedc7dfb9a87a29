"""restore() reads trainable parameters and optimizer moments straight into the live tensors, verified.

Real checkpoints on all four storages, parts smaller than the tensors (so a part spans several destinations),
damaged blobs on disk, and the events a user sees. What must hold: the state is bit-exact, the live memory is
reused (no fresh tensors for the optimizer's moments), frozen parameters keep their staging slot (a frozen
backbone is not written again by the first save after a restore), and bytes of a damaged checkpoint never
reach training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spotsafe
from spotsafe.engine.in_place import MIN_BYTES, pair_tensors
from spotsafe.errors import NoUsableCheckpointError
from spotsafe.policy.interval import Never
from spotsafe.state import codec
from spotsafe.storage import parallel_read
from spotsafe.storage.base import read_views, read_views_by_copy
from spotsafe.storage.layout import CheckpointRef
from spotsafe.storage.local import LocalStorage, preadv_fully
from spotsafe.storage.manifest import MANIFEST_NAME
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.storage.wrapper import StorageWrapper
from spotsafe.telemetry.store import read_run_events


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    """Parts of 100 KB, 3 in flight: the 256 KiB weights span three parts, most parts several destinations."""
    monkeypatch.setattr(parallel_read, "PART", 100_000)
    monkeypatch.setattr(parallel_read, "READERS", 3)
    return 100_000


class Net(nn.Module):
    """A 256 KiB trainable layer, a frozen 256 KiB layer, small biases and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(256, 256)
        self.frozen = nn.Linear(256, 256)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(256, 8)
        self.register_buffer("scale", torch.full((128, 128), 0.5))  # 64 KiB, not trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.frozen(torch.relu(self.body(x))) * self.scale[0, 0]))


def make(url: str, seed: int = 0, **options: Any) -> tuple[Net, torch.optim.Optimizer, spotsafe.Checkpointer]:
    torch.manual_seed(seed)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opts: dict[str, Any] = {"policy": Never(), "handle_signals": False, "progress_interval": 0}
    opts.update(options)
    return model, optimizer, spotsafe.Checkpointer(url, model=model, optimizer=optimizer, **opts)


def train(model: Net, optimizer: torch.optim.Optimizer, ckpt: spotsafe.Checkpointer, steps: int) -> None:
    gen = torch.Generator().manual_seed(ckpt.step)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 256, generator=gen)).square().mean().backward()
        optimizer.step()
        ckpt.step_done()


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v.clone() for k, v in state.items()})
    return out


def assert_same(model: nn.Module, optimizer: torch.optim.Optimizer, want: dict[str, torch.Tensor]) -> None:
    got = snapshot(model, optimizer)
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def moments(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    return {f"{i}.{k}": v.data_ptr() for i, s in enumerate(optimizer.state.values()) for k, v in s.items()}


def restores(url: str) -> list[Any]:
    return [e.event for e in read_run_events(open_storage(url)) if e.event.type == "restore_completed"]


def checkpoints(url: str) -> list[CheckpointRef]:
    return CheckpointRepository(open_storage(url)).committed()


def flip(url: str, ref: CheckpointRef, blob: str, at: int) -> None:
    storage = open_storage(url)
    key = f"{ref.key}/{blob}"
    data = bytearray(storage.read(key))
    data[at] ^= 0x01
    storage.write_atomic(key, bytes(data))


def saved_run(tmp_path: Path) -> str:
    """A run with one checkpoint, at step 2 of a model made with seed 0."""
    url = str(tmp_path / "run")
    model, optimizer, ckpt = make(url)
    train(model, optimizer, ckpt, 2)
    ckpt.save()
    ckpt.close()
    return url


# -- restore ---------------------------------------------------------------------------------------------------------


def test_trainable_tensors_and_moments_are_read_in_place_bit_exactly(run_url: str, small_parts: int) -> None:
    model, optimizer, ckpt = make(run_url)
    train(model, optimizer, ckpt, 2)
    ckpt.save()
    want = snapshot(model, optimizer)
    train(model, optimizer, ckpt, 3)  # the live state moves on, as a process that fell back would have
    ckpt.close()
    params, held = [p.data_ptr() for p in model.parameters()], moments(optimizer)

    again = spotsafe.Checkpointer(run_url, model=model, optimizer=optimizer, policy=Never(), handle_signals=False)
    assert again.restore() == 2
    assert_same(model, optimizer, want)
    assert [p.data_ptr() for p in model.parameters()] == params
    now = moments(optimizer)
    big = {"0.exp_avg", "0.exp_avg_sq"}  # body.weight's moments (256 KiB each); the biases' are under MIN_BYTES
    assert {k: now[k] for k in big} == {k: held[k] for k in big}, "the moments were replaced, not read into"
    [event] = restores(run_url)[-1:]
    # body.weight and its two moments; head.weight (8 KiB), the biases, the frozen layer and the buffer are not
    assert event.in_place_bytes == 3 * 256 * 256 * 4
    assert event.bytes > event.in_place_bytes
    again.close()


def test_a_fresh_process_reads_the_parameters_in_place_and_the_moments_into_new_memory(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    model, optimizer, ckpt = make(url)
    train(model, optimizer, ckpt, 2)
    ckpt.save()
    want = snapshot(model, optimizer)
    ckpt.close()

    model2, optimizer2, again = make(url, seed=1)  # a new process: other initial weights, no optimizer state
    assert again.restore() == 2
    assert_same(model2, optimizer2, want)
    assert restores(url)[-1].in_place_bytes == 256 * 256 * 4
    train(model2, optimizer2, again, 1)  # and training goes on from there
    again.close()


def test_a_frozen_layer_is_not_written_again_by_the_first_save_after_a_restore(tmp_path: Path) -> None:
    url = saved_run(tmp_path)
    model2, optimizer2, again = make(url, seed=1)
    again.restore()
    train(model2, optimizer2, again, 1)
    again.save()
    again.close()
    older, newer = sorted(checkpoints(url))
    manifest = CheckpointRepository(LocalStorage(url)).read_manifest(newer)
    shared = [b for b in manifest.blobs if b.checkpoint == older.name]
    assert "model.bin" in [b.path for b in shared], "the frozen layer's bytes must be shared, not written again"
    state = json.loads((Path(url) / newer.key / "state.json").read_bytes())
    segments = [s for t in state["components"]["model"]["tensors"] for s in t["segments"]]
    frozen = [s for s in segments if s[0].startswith(older.name)]
    assert sum(s[2] for s in frozen) >= 256 * 256 * 4  # frozen.weight at least, from the older checkpoint


def test_a_damaged_newest_checkpoint_read_in_place_falls_back_to_the_older_one_exactly(
    run_url: str, small_parts: int
) -> None:
    model, optimizer, ckpt = make(run_url, incremental=False)
    train(model, optimizer, ckpt, 2)
    ckpt.save()
    want = snapshot(model, optimizer)
    train(model, optimizer, ckpt, 2)
    ckpt.save()
    ckpt.close()
    older, newer = sorted(checkpoints(run_url))
    flip(run_url, newer, "optimizer.bin", 100)  # inside body.weight's first moment: read in place, then refused
    flip(run_url, newer, "model.bin", 1000)  # inside body.weight
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()

    again = spotsafe.Checkpointer(run_url, model=model, optimizer=optimizer, policy=Never(), handle_signals=False)
    assert again.restore() == older.step
    assert_same(model, optimizer, want)
    skipped = [e.event for e in read_run_events(open_storage(run_url)) if e.event.type == "checkpoint_skipped"]
    assert [e.checkpoint for e in skipped] == [newer.name]
    assert "checksum" in skipped[0].reason
    again.close()


def test_with_no_valid_checkpoint_left_the_run_stops(tmp_path: Path) -> None:
    url = saved_run(tmp_path)
    [only] = checkpoints(url)
    flip(url, only, "model.bin", 10)
    *_, again = make(url, seed=1)
    with pytest.raises(NoUsableCheckpointError, match="fails its checksum"):
        again.restore()
    again.close()


@pytest.mark.parametrize("how", ["start_fresh", "not_strict"])
def test_where_training_could_go_on_after_damage_nothing_is_read_in_place(tmp_path: Path, how: str) -> None:
    """``on_damaged="start_fresh"`` starts from the initial weights, so damaged bytes must never land in them;
    ``strict=False`` may load an older checkpoint that lacks a tensor the damaged one overwrote."""
    url = saved_run(tmp_path)
    [only] = checkpoints(url)
    model2, optimizer2, again = make(url, seed=1)
    initial = snapshot(model2, optimizer2)
    if how == "start_fresh":
        flip(url, only, "model.bin", 10)
        assert again.restore(on_damaged="start_fresh") == 0
        assert_same(model2, optimizer2, initial)
    else:
        assert again.restore(strict=False) == 2
        assert restores(url)[-1].in_place_bytes == 0
    again.close()


def test_tied_weights_are_read_once_and_restored_exactly(tmp_path: Path) -> None:
    url = str(tmp_path / "run")

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(512, 128)
            self.out = nn.Linear(128, 512, bias=False)
            self.out.weight = self.embed.weight

    def build(seed: int) -> tuple[Tied, torch.optim.Optimizer, spotsafe.Checkpointer]:
        torch.manual_seed(seed)
        model = Tied()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, optimizer, spotsafe.Checkpointer(url, model=model, optimizer=optimizer, handle_signals=False)

    model, optimizer, ckpt = build(0)
    model.out(model.embed(torch.arange(8))).sum().backward()
    optimizer.step()
    ckpt.save()
    want = model.embed.weight.detach().clone()
    ckpt.close()
    model2, _, again = build(1)
    again.restore()
    assert torch.equal(model2.embed.weight, want) and model2.out.weight is model2.embed.weight
    assert restores(url)[-1].in_place_bytes == 512 * 128 * 4  # one destination for the shared memory
    again.close()


# -- the parts underneath ----------------------------------------------------------------------------------------------


def test_pairs_follow_keys_not_positions_and_survive_garbage() -> None:
    live = {"state": {0: {"a": torch.zeros(2)}, 1: {"a": torch.ones(2)}}, "list": [torch.zeros(1), torch.ones(1)]}
    tensors: list[torch.Tensor] = []
    doc = codec.encode(live, tensors)
    swapped = json.loads(json.dumps(doc))
    swapped["state"]["$dict"].reverse()  # same keys, other order: key 1 first
    pairs = dict(pair_tensors(swapped, doc))
    assert pairs == {0: 0, 1: 1, 2: 2, 3: 3}
    renumbered = json.loads(json.dumps(doc).replace('{"$tensor": 0}', '{"$tensor": 7}'))
    assert dict(pair_tensors(renumbered, doc))[7] == 0
    for garbage in (None, 3, "x", [1, [2]], {"$tensor": -1}, {"$tensor": True}, {"$dict": 5}, {"$dict": [[1]]}):
        assert list(pair_tensors(garbage, doc)) == []
    assert list(pair_tensors({"state": {"$dict": [[0, {"$tensor": 0}], [0, {"$tensor": 1}]]}}, doc)) == []
    twice = {"list": [{"$tensor": 0}, {"$tensor": 0}], "again": [{"$tensor": 1}]}
    assert list(pair_tensors(twice, {"list": doc["list"], "again": doc["list"]})) == [(0, 2), (0, 3)]


def test_min_bytes_is_what_the_docs_say() -> None:
    assert MIN_BYTES == 64 * 1024


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[tuple[LocalStorage, bytes]]:
    storage = LocalStorage(tmp_path)
    data = bytes(range(256)) * 40
    storage.write_atomic("x/blob", data)
    yield storage, data


def test_preadv_fills_views_across_short_reads_and_stops_at_the_end(blob: tuple[LocalStorage, bytes]) -> None:
    storage, data = blob
    views = [memoryview(bytearray(n)) for n in (1, 0, 5000, 3000, 4000)]
    with storage.open_read("x/blob") as handle:
        got = preadv_fully(handle.fileno(), views, 7)
    assert got == len(data) - 7
    assert b"".join(bytes(v) for v in views)[:got] == data[7:]


class _ReadIntoOnly(StorageWrapper):
    """A storage that reads one buffer at a time (as one written before scattered reads), counting calls."""

    def __init__(self, inner: LocalStorage) -> None:
        super().__init__(inner)
        self.calls = 0

    def read_into(self, key: str, buffer: bytearray | memoryview, progress: Any = None, *, offset: int = 0) -> int:
        self.calls += 1
        return self.inner.read_into(key, buffer, progress, offset=offset)


def test_every_way_of_scattering_a_read_gives_the_same_bytes(blob: tuple[LocalStorage, bytes]) -> None:
    storage, data = blob
    one_by_one = _ReadIntoOnly(storage)
    for how in (
        lambda v: read_views(storage, "x/blob", v, 100),  # preadv
        lambda v: read_views(StorageWrapper(storage), "x/blob", v, 100),  # through a wrapper
        lambda v: read_views(one_by_one, "x/blob", v, 100),  # a subclass that reads its own way: one read_into
        lambda v: read_views_by_copy(storage, "x/blob", v, 100),
    ):
        views = [memoryview(bytearray(n)) for n in (10, 2000, 9000)]
        assert how(views) == len(data) - 100
        assert b"".join(bytes(v) for v in views)[: len(data) - 100] == data[100:]
    assert one_by_one.calls == 1


def test_a_blob_read_into_pieces_is_hashed_as_one(blob: tuple[LocalStorage, bytes], small_parts: int) -> None:
    storage, data = blob
    pieces = [memoryview(bytearray(n)) for n in (3, 4000, 1, 6236)]
    [(got, digest)] = list(parallel_read.read_blobs(storage, [("x/blob", pieces)], part=1000))
    whole = memoryview(bytearray(len(data)))
    [(_, expected)] = list(parallel_read.read_blobs(storage, [("x/blob", [whole])], part=1000))
    assert got == len(data) and digest == expected
    assert b"".join(bytes(p) for p in pieces) == data


def test_a_manifest_is_still_what_decides(tmp_path: Path) -> None:
    """A checkpoint without a manifest is not a candidate, in place or not (nothing is read from it)."""
    url = str(tmp_path / "run")
    model, optimizer, ckpt = make(url)
    train(model, optimizer, ckpt, 1)
    ckpt.save()
    train(model, optimizer, ckpt, 1)
    ckpt.save()
    ckpt.close()
    older, newer = sorted(checkpoints(url))
    (Path(url) / newer.key / MANIFEST_NAME).unlink()
    *_, again = make(url, seed=1)
    assert again.restore() == older.step
    again.close()
