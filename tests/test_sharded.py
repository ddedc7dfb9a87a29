"""One checkpoint for all ranks (spotsafe.sharded over torch.distributed.checkpoint), with real ranks.

Each test starts real processes (gloo on CPU, tests/jobs/sharded_worker.py): a save at N ranks and a
load at M ranks of the same model, FSDP2 (``fully_shard``: every parameter and optimizer state a
``DTensor`` shard) or DDP (everything replicated). The loaded state, gathered in full, must equal the
saved state bit for bit, tensor by tensor, and each rank that existed at the save gets its own state back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from spotsafe.sharded.layout import consolidate
from spotsafe.sharded.storage import rank_blob
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import Manifest
from spotsafe.storage.repository import CheckpointRepository

from .conftest import PROCESS_HANG_S

WORKER = Path(__file__).parent / "jobs" / "sharded_worker.py"

pytestmark = pytest.mark.e2e


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(script: Path, world: int, *args: str) -> list[subprocess.Popen[bytes]]:
    """``world`` ranks of ``script`` (gloo on 127.0.0.1), each given ``args``."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_port()), "WORLD_SIZE": str(world)}
    env["OMP_NUM_THREADS"] = "1"
    return [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env={**env, "RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for rank in range(world)
    ]


def finish(procs: list[subprocess.Popen[bytes]], ok: tuple[int, ...] = (0, 3)) -> list[int]:
    """Wait for every rank; their exit codes (one outside ``ok`` fails the test, with its stderr)."""
    codes = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=PROCESS_HANG_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        codes.append(proc.returncode)
        if proc.returncode not in ok:
            raise AssertionError(f"a rank exited {proc.returncode}: {err.decode()[-3000:]}")
    return codes


def launch(world: int, mode: str, **options: Any) -> list[int]:
    """Run ``world`` ranks of the worker to the end; their exit codes."""
    return finish(start(WORKER, world, mode, json.dumps(options)))


def assert_equal_trees(saved: Any, loaded: Any, path: str = "") -> int:
    """Bit-equal, tensor by tensor (dtype, shape and every bit); other values equal. Returns the tensor count."""
    if isinstance(saved, torch.Tensor):
        assert isinstance(loaded, torch.Tensor), path
        assert (saved.dtype, saved.shape) == (loaded.dtype, loaded.shape), path
        assert torch.equal(_bits(saved), _bits(loaded)), path
        return 1
    if isinstance(saved, dict):
        assert set(saved) == set(loaded), (path, set(saved) ^ set(loaded))
        return sum(assert_equal_trees(saved[k], loaded[k], f"{path}/{k}") for k in saved)
    if isinstance(saved, (list, tuple)):
        assert type(saved) is type(loaded) and len(saved) == len(loaded), path
        return sum(assert_equal_trees(a, b, f"{path}/{i}") for i, (a, b) in enumerate(zip(saved, loaded, strict=True)))
    assert saved == loaded and type(saved) is type(loaded), (path, saved, loaded)
    return 0


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def full(path: Path) -> dict[str, Any]:
    state = torch.load(path, weights_only=False)  # the test's own file
    del state["checkpoint"]
    return state


def manifests(url: Path) -> list[tuple[str, Manifest]]:
    repo = CheckpointRepository(LocalStorage(url))
    return [(ref.name, repo.read_manifest(ref)) for ref in repo.committed()]


KINDS = ("fsdp", "ddp")


@pytest.fixture(scope="module")
def saves(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A save at ``world`` ranks of each model kind, made once per module (one launch for both kinds):
    ``{kind: (checkpoint location, saved.pt)}``."""
    made: dict[int, dict[str, tuple[Path, Path]]] = {}

    def get(world: int) -> dict[str, tuple[Path, Path]]:
        if world not in made:
            base = tmp_path_factory.mktemp(f"saved-at-{world}")
            (base / "out").mkdir()
            options = dict(kinds=list(KINDS), url=str(base / "ck"), out=str(base / "out"), steps=3)
            assert launch(world, "save", **options) == [0] * world
            made[world] = {kind: (base / "ck" / kind, base / "out" / kind / "saved.pt") for kind in KINDS}
        return made[world]

    return get


@pytest.mark.parametrize(("saved_at", "loaded_at"), [(2, 1), (1, 2), (2, 3), (3, 2)])
def test_resume_at_another_world_size_is_bit_equal(saves: Any, tmp_path: Path, saved_at: int, loaded_at: int) -> None:
    """FSDP2 (DTensor shards) and DDP (replicated), saved at one world size and loaded at another."""
    saved = saves(saved_at)
    base = saved["fsdp"][0].parent
    assert launch(loaded_at, "load", kinds=list(KINDS), url=str(base), out=str(tmp_path)) == [0] * loaded_at
    for kind in KINDS:
        out = tmp_path / kind
        count = assert_equal_trees(full(saved[kind][1]), full(out / "loaded.pt"))
        assert count >= 4 * 3, kind  # 7 parameters, and AdamW's exp_avg, exp_avg_sq and step for each
        for rank in range(loaded_at):
            report = json.loads((out / f"rank-{rank}.json").read_text())
            assert (report["step"], report["world_size"]) == (3, saved_at), kind
            if rank < saved_at:  # its own saved state, bit for bit
                assert (report["rank_state_of"], report["rng_equal"]) == (rank, True), kind
            else:  # a rank that did not exist at the save gets none (the caller's rule applies)
                assert report["rank_state_of"] is None, kind


def test_one_manifest_lists_every_ranks_blobs_and_replicated_state_is_written_once(saves: Any) -> None:
    url, saved = saves(2)["ddp"]
    (_, manifest), *older = manifests(url)
    assert not older
    assert manifest.metadata["layout"] == "sharded" and manifest.metadata["world_size"] == 2
    paths = {b.path for b in manifest.blobs}
    assert {"dcp.json", "state.json", "r00000.state.json", "r00001.state.json"} <= paths
    # DDP: every tensor is replicated; DCP gives each to one rank, so the ranks' blobs together hold one copy.
    tensors = full(saved)
    one_copy = sum(t.numel() * t.element_size() for t in _tensors(tensors["model"]) + _tensors(tensors["optim"]))
    written = sum(b.size for b in manifest.blobs if b.path.endswith(".distcp"))
    assert one_copy <= written <= one_copy + 64 * 40, (written, one_copy)
    assert {rank_blob(0), rank_blob(1)} <= paths  # balanced: both ranks wrote a share


def _tensors(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def test_incremental_save_shares_unchanged_shards_and_retention_keeps_them(tmp_path: Path) -> None:
    """A frozen layer's shards do not change: the second save shares them with the first; after the first
    is deleted (keep=1) its shared blobs stay, and the second loads bit-equal at another world size."""
    url, out, loaded = tmp_path / "ck", tmp_path / "out", tmp_path / "loaded"
    out.mkdir(), loaded.mkdir()
    opts = dict(kind="fsdp", url=str(url), steps=2, rounds=2, keep=1, freeze=True)
    assert launch(2, "save", out=str(out), **opts) == [0, 0]
    [(_, manifest)] = manifests(url)
    shared = [b for b in manifest.blobs if b.checkpoint is not None]
    assert shared and all(b.path.endswith(".distcp") for b in shared)
    folders = sorted(p.name for p in (url / "checkpoints").iterdir())
    assert len(folders) == 2 and not (url / "checkpoints" / folders[0] / "manifest.json").exists()
    assert launch(1, "load", kind="fsdp", url=str(url), out=str(loaded), freeze=True) == [0]
    assert_equal_trees(full(out / "saved.pt"), full(loaded / "loaded.pt"))


def test_a_rank_that_fails_to_write_commits_nothing_on_any_rank(tmp_path: Path) -> None:
    url, out = tmp_path / "ck", tmp_path / "out"
    out.mkdir()
    assert launch(2, "save", kind="fsdp", url=str(url), out=str(out), steps=2, fail_rank=1) == [3, 3]
    assert "injected failure" in (out / "error-1.txt").read_text()
    assert (out / "error-0.txt").exists()  # rank 0 learned of it too
    assert manifests(url) == []
    assert not list((url / "checkpoints").iterdir())  # the coordinator removed the partial folder


def test_a_damaged_rank_blob_falls_back_to_the_older_checkpoint_on_every_rank(tmp_path: Path) -> None:
    url, out, loaded = tmp_path / "ck", tmp_path / "out", tmp_path / "loaded"
    out.mkdir(), loaded.mkdir()
    assert launch(2, "save", kind="fsdp", url=str(url), out=str(out), steps=2, rounds=2, incremental=False) == [0, 0]
    (newest, _), (older, _) = manifests(url)
    blob = url / "checkpoints" / newest / rank_blob(1)
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert launch(3, "load", kind="fsdp", url=str(url), out=str(loaded)) == [0, 0, 0]
    reports = [json.loads((loaded / f"rank-{r}.json").read_text()) for r in range(3)]
    assert {r["checkpoint"] for r in reports} == {older}
    assert all(r["step"] == 2 for r in reports)


def test_ls_verify_and_inspect_read_one_checkpoint_of_all_ranks(saves: Any) -> None:
    """The CLI sees one committed checkpoint; inspect assembles each whole tensor from the ranks' shards."""
    url, saved = saves(3)["fsdp"]
    spotsafe = str(Path(sys.executable).with_name("spotsafe"))
    listed, verified, inspected = (
        subprocess.run([spotsafe, *args, str(url)], capture_output=True, text=True, timeout=PROCESS_HANG_S)
        for args in (["ls"], ["verify"], ["inspect", "--json"])
    )
    assert listed.returncode == 0 and "1 committed" in listed.stdout, listed.stdout + listed.stderr
    assert verified.returncode == 0 and "1 of 1 verified" in verified.stdout, verified.stdout + verified.stderr
    assert inspected.returncode == 0, inspected.stderr
    components = {c["name"]: c for c in json.loads(inspected.stdout)["components"]}
    assert set(components) == {"model", "optim", "scheduler", "rank-00000", "rank-00001", "rank-00002"}
    # The whole tensors, assembled in one process from 3 ranks' chunks, equal the gathered saved state.
    repo = CheckpointRepository(LocalStorage(url))
    [ref] = repo.committed()
    loaded = repo.load(ref)
    whole = consolidate(loaded.blobs.__getitem__, loaded.manifest, ref.name)
    expected = full(saved)
    assert_equal_trees(expected["model"], dict(whole["model"]))
    assert_equal_trees(expected["optim"], whole["optim"])


def test_a_background_save_holds_the_state_of_when_it_was_called(tmp_path: Path) -> None:
    """save(blocking=False) returns once DCP copied the tensors; the ranks train on (the parameters and
    the optimizer state change) while it is written; the checkpoint holds the state at the call."""
    url, out, loaded = tmp_path / "ck", tmp_path / "out", tmp_path / "loaded"
    out.mkdir(), loaded.mkdir()
    opts = dict(kind="fsdp", url=str(url), steps=3)
    assert launch(2, "save", out=str(out), **opts, **{"async": True}) == [0, 0]
    assert launch(3, "load", kind="fsdp", url=str(url), out=str(loaded)) == [0, 0, 0]
    assert_equal_trees(full(out / "saved.pt"), full(loaded / "loaded.pt"))


def test_global_values_that_differ_between_ranks_are_refused_on_every_rank(tmp_path: Path) -> None:
    url, out = tmp_path / "ck", tmp_path / "out"
    out.mkdir()
    assert launch(2, "save", kind="ddp", url=str(url), out=str(out), steps=1, diverge=True) == [3, 3]
    for rank in (0, 1):
        error = (out / f"error-{rank}.txt").read_text()
        assert error.startswith("StateError") and "rank_state" in error and "rank(s) [1]" in error
    assert not (url / "checkpoints").exists() or manifests(url) == []


def test_a_run_through_2_then_1_then_3_ranks_trains_on_every_sample_of_the_epoch_once(tmp_path: Path) -> None:
    """Real ranks (DDP, gloo), an ElasticLoader in the sharded checkpoint's global state: the job is stopped
    and resumed at another world size twice; the sample ids the ranks were served cover the epoch once."""
    url, out = tmp_path / "ck", tmp_path / "out"
    out.mkdir()
    for launch_no, (world, batches) in enumerate([(2, 3), (1, 6), (3, None)]):
        opts = dict(url=str(url), out=str(out), n=60, batches=batches, launch=launch_no)
        assert launch(world, "elastic", **opts) == [0] * world
    served = [
        [json.loads((out / f"ids-{n}-{r}.json").read_text()) for r in range(world)] for n, world in enumerate([2, 1, 3])
    ]
    assert [sum(len(ids) for ids in launch_ids) for launch_ids in served] == [12, 12, 36]
    everything = sorted(i for launch_ids in served for ids in launch_ids for i in ids)
    assert everything == list(range(60))
    (_, manifest), *_ = manifests(url)
    assert manifest.metadata["world_size"] == 3 and manifest.step == 3 + 6 + 6
