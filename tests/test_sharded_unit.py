"""spotsafe.sharded in one process: exact values, hostile metadata, mismatches (multi-rank: test_sharded.py)."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from spotsafe import sharded
from spotsafe.errors import CheckpointMismatchError, NoUsableCheckpointError, StateError
from spotsafe.sharded import metadata as dcp_json
from spotsafe.sharded.tree import split, tensor_keys
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import MANIFEST_NAME, Manifest
from spotsafe.storage.repository import CheckpointRepository


def state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.99))
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "optim": optimizer.state_dict(),
        "odd/keys": {1: torch.arange(3), "a/b": 2.5, "~x": (1, 2.0, None), "nan": float("nan")},
    }


def rewrite_blob(url: Path, name: str, change: Any) -> None:
    """Change blob ``name`` of the only checkpoint and re-seal its manifest (as an attacker can)."""
    repo = CheckpointRepository(LocalStorage(url))
    [ref] = repo.committed()
    folder = url / "checkpoints" / ref.name
    data = change((folder / name).read_bytes())
    (folder / name).write_bytes(data)
    manifest = repo.read_manifest(ref)
    import xxhash

    blobs = tuple(
        type(b)(b.path, len(data), xxhash.xxh3_128(data).hexdigest()) if b.path == name else b for b in manifest.blobs
    )
    sealed = Manifest(manifest.step, manifest.created_at, blobs, manifest.metadata, manifest.writer)
    (folder / MANIFEST_NAME).write_bytes(sealed.to_bytes())


def test_values_round_trip_exactly_in_one_process(tmp_path: Path) -> None:
    saved = state(0)
    ref = sharded.save(saved, tmp_path, step=7, rank_state={"gen": torch.Generator().manual_seed(3).get_state()})
    template = state(1)
    restored = sharded.load(template, tmp_path)
    assert restored is not None and restored.ref == ref and (restored.step, restored.world_size) == (7, 1)
    got = restored.state
    assert torch.equal(got["model"]["weight"], saved["model"]["weight"])
    assert got["optim"]["param_groups"][0]["betas"] == (0.9, 0.99)  # a tuple stays a tuple
    assert isinstance(got["optim"]["state"], dict) and set(got["optim"]["state"]) == {0, 1}  # int keys stay ints
    odd = got["odd/keys"]
    assert torch.equal(odd[1], torch.arange(3)) and odd["a/b"] == 2.5 and odd["~x"] == (1, 2.0, None)
    assert odd["nan"] != odd["nan"]
    assert torch.equal(restored.rank_state["gen"], torch.Generator().manual_seed(3).get_state())
    assert isinstance(got["model"], OrderedDict)


def test_tensor_keys_are_paths_and_do_not_collide() -> None:
    doc, tensors = split({"a/b": torch.zeros(1), "a": {"b": torch.ones(1)}, "t": (torch.zeros(2),)})
    assert sorted(tensors) == ["/a/b", "/a~1b", "/t/0"]
    assert tensor_keys(doc) == list(tensors)


def test_nothing_saved_loads_none_and_a_plain_checkpoint_is_not_taken_for_a_sharded_one(tmp_path: Path) -> None:
    assert sharded.load(state(), tmp_path) is None


def test_another_model_is_a_mismatch_not_damage(tmp_path: Path) -> None:
    sharded.save(state(), tmp_path, step=1)
    other = {**state(), "model": torch.nn.Linear(5, 3).state_dict()}
    with pytest.raises(CheckpointMismatchError, match="weight has shape"):
        sharded.load(other, tmp_path)
    with pytest.raises(CheckpointMismatchError, match="wanted but not saved"):
        sharded.load({**state(), "more": torch.zeros(1)}, tmp_path)


@pytest.mark.parametrize(
    ("blob", "change"),
    [
        ("dcp.json", lambda d: d.replace(b'"float32"', b'"pickle"', 1)),
        ("dcp.json", lambda d: d.replace(b'"format":"spotsafe-dcp"', b'"format":"x"')),
        ("dcp.json", lambda d: d.replace(b'"segments":[["r00000.distcp",0,', b'"segments":[["../../x",0,', 1)),
        ("state.json", lambda d: d.replace(b'"$tensor"', b'"$pickle"', 1)),
        ("dcp.json", lambda d: json.dumps(json.loads(d) | {"items": [{"fqn": "nope"}]}).encode()),
    ],
    ids=["unknown-dtype", "not-ours", "blob-outside", "unknown-tag", "unknown-fqn"],
)
def test_hostile_metadata_is_refused_not_run(tmp_path: Path, blob: str, change: Any) -> None:
    """A re-sealed checkpoint (checksums match) whose JSON says something spotsafe would never write."""
    sharded.save(state(), tmp_path, step=1)
    rewrite_blob(tmp_path, blob, change)
    with pytest.raises(NoUsableCheckpointError) as caught:
        sharded.load(state(1), tmp_path)
    assert len(caught.value.damaged) == 1


def test_a_non_tensor_item_never_reaches_dcp_and_bytes_items_are_refused() -> None:
    metadata, _ = dcp_json.decode(dcp_json.encode(_metadata(), {}), "x")
    assert set(metadata.state_dict_metadata) == {"w"}
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    with pytest.raises(TypeError, match="only tensors"):
        dcp_json.encode(Metadata(state_dict_metadata={"b": BytesStorageMetadata()}), {})


def _metadata() -> Any:
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    chunk = ChunkStorageMetadata(torch.Size([0]), torch.Size([3]))
    return Metadata(state_dict_metadata={"w": TensorStorageMetadata(TensorProperties(), torch.Size([3]), [chunk])})


def test_state_that_spotsafe_cannot_encode_fails_before_anything_is_committed(tmp_path: Path) -> None:
    with pytest.raises(StateError):
        sharded.save({"x": object()}, tmp_path, step=1)
    assert CheckpointRepository(LocalStorage(tmp_path)).committed() == []


def test_a_background_save_is_not_changed_by_training_on(tmp_path: Path) -> None:
    saved = state(0)
    expected = {k: v.clone() for k, v in saved["model"].items()}
    in_flight = sharded.save(saved, tmp_path, step=1, blocking=False)
    assert isinstance(in_flight, sharded.SaveInFlight)
    for tensor in saved["model"].values():
        tensor.add_(1.0)  # training goes on
    ref = in_flight.wait()
    restored = sharded.load(state(1), tmp_path)
    assert restored is not None and restored.ref == ref
    for key, tensor in expected.items():
        assert torch.equal(restored.state["model"][key], tensor)


@pytest.mark.parametrize("reshape", [False, True], ids=["straight-into-the-tensor", "through-a-buffer"])
def test_a_flipped_bit_in_a_chunk_is_caught_by_its_own_checksum(tmp_path: Path, reshape: bool) -> None:
    """A chunk read straight into its tensor, or read into a buffer first (the target is another view), is
    checked against its checksum; with the only checkpoint damaged the load refuses it, naming the chunk."""
    sharded.save({"w": torch.arange(64, dtype=torch.float32)}, tmp_path, step=1)
    [folder] = (tmp_path / "checkpoints").iterdir()
    blob = folder / "r00000.distcp"
    data = bytearray(blob.read_bytes())
    data[7] ^= 0x01
    blob.write_bytes(bytes(data))
    target = torch.zeros(128)[::2] if reshape else torch.zeros(64)  # a strided view cannot be read into
    with pytest.raises(NoUsableCheckpointError, match="fails its checksum"):
        sharded.load({"w": target}, tmp_path)


def test_every_storage_url_holds_a_sharded_checkpoint(run_url: str) -> None:
    """Local disk and the S3, GCS and Azure emulators: an incremental pair of saves, ranged reads of the
    chunks on restore, and retention that keeps the blobs the newest one shares."""
    first = {"frozen": torch.arange(1000, dtype=torch.float32), "w": torch.zeros(8)}
    sharded.save(first, run_url, step=1)
    second = {"frozen": first["frozen"], "w": torch.ones(8)}
    sharded.save(second, run_url, step=2, keep=1)
    restored = sharded.load({"frozen": torch.zeros(1000), "w": torch.zeros(8)}, run_url)
    assert restored is not None and restored.step == 2
    assert torch.equal(restored.state["frozen"], first["frozen"]) and torch.equal(restored.state["w"], torch.ones(8))
    repo = sharded.api.repository(run_url)
    [ref] = repo.committed()
    assert any(b.checkpoint is not None for b in repo.read_manifest(ref).blobs)  # the frozen chunk is shared
    repo.verify(ref)
