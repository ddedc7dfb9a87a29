"""Hostile checkpoints are skipped like damaged ones: bounded parsing, and no symbolic link is ever followed.

Each tamper below is done like an attacker who can write into the run folder and fixes up the manifest's
sizes and checksums, so that only the rule under test can catch it. The outside file a symlink points at is
watched: the test records every file the process opens and asserts that none of them is outside the run.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from spotsafe.errors import (
    CorruptCheckpointError,
    NoUsableCheckpointError,
    PermanentStorageError,
    StateError,
    UnsafeCheckpointError,
)
from spotsafe.state import codec
from spotsafe.state.snapshot import STATE_BLOB, decode_state
from spotsafe.state.tensors import TensorEntry
from spotsafe.storage.base import UnsafePathError
from spotsafe.storage.json_limits import MANIFEST_LIMITS, STATE_LIMITS
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import MANIFEST_NAME, Manifest, new_hasher
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import make_job
from .test_cli import run_all

SPOTSAFE = str(Path(sys.executable).with_name("spotsafe"))


# -- helpers ---------------------------------------------------------------------------------------------------------


def events(run: Path, kind: str) -> list[Any]:
    return [e.event for e in read_events(run / EVENTS_FILE) if e.event.type == kind]


def train_run(run: Path) -> tuple[Path, Path]:
    """Train a run with committed checkpoints at steps 7 and 14; returns their folders (older, newest)."""
    job = make_job(run, keep=5)
    job.train(14)
    job.ckpt.close()
    return _folders(run)


def _folders(run: Path) -> tuple[Path, Path]:
    refs = CheckpointRepository(LocalStorage(run)).committed()
    assert [r.step for r in refs] == [14, 7]
    return run / refs[1].key, run / refs[0].key


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    train_run(run)
    return run


def build_run(run: Path, trained: Path) -> tuple[Path, Path]:
    """A copy of the trained run at ``run``; returns its checkpoint folders (older, newest)."""
    shutil.copytree(trained, run)
    return _folders(run)


def checksum(data: bytes) -> str:
    hasher = new_hasher()
    hasher.update(data)
    return str(hasher.hexdigest())


def fix_manifest(ckpt: Path, contents: dict[str, bytes]) -> None:
    """Rewrite the manifest so that blob ``name`` has the size and checksum of ``contents[name]``."""
    doc = json.loads((ckpt / MANIFEST_NAME).read_bytes())
    for blob in doc["blobs"]:
        if blob["path"] in contents:
            blob["size"], blob["checksum"] = len(contents[blob["path"]]), checksum(contents[blob["path"]])
    (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))


def replace_state(ckpt: Path, data: bytes) -> None:
    (ckpt / STATE_BLOB).write_bytes(data)
    fix_manifest(ckpt, {STATE_BLOB: data})


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


def weights_of(run: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    repo = CheckpointRepository(LocalStorage(run))
    ref = CheckpointRef.parse(ckpt.name)
    assert ref is not None
    loaded = repo.load(ref)
    return {k: v.clone() for k, v in decode_state(loaded.blobs, ref.name).components["model"].items()}


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """Record the real path of every file and folder opened (``open``, ``io.open``, ``os.open``) while it runs.

    The path is read back from the open descriptor, so it is where the open really landed, links resolved.
    """
    seen: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def landed(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))

    def recording_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        fd = real_os_open(path, flags, mode, dir_fd=dir_fd)
        landed(fd)
        return fd

    def recording_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, *args, **kwargs)
        landed(handle.fileno())
        return handle

    os.open = recording_os_open
    builtins.open = io.open = recording_open
    try:
        yield seen
    finally:
        os.open = real_os_open
        builtins.open = io.open = real_open


def outside_of(run: Path, seen: list[str]) -> list[str]:
    root = os.path.realpath(run)
    python = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix})
    return [p for p in seen if p != root and not p.startswith((root + os.sep, *python))]


needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to see what is open")


# -- the two defects of the issue, reproduced -----------------------------------------------------------------------


def test_deeply_nested_state_json_is_skipped_and_restore_falls_back(tmp_path: Path, trained: Path) -> None:
    run = tmp_path / "run"
    _, newest = build_run(run, trained)
    replace_state(newest, b'{"format_version":2,"step":14,"components":{"model":' + deep(200_000) + b"}}")

    job = make_job(run, keep=5)
    assert job.ckpt.restore() == 7
    [skipped] = events(run, "checkpoint_skipped")
    assert skipped.checkpoint == newest.name and "nest" in skipped.reason
    job.ckpt.close()


@needs_proc
def test_blob_symlinked_to_a_file_outside_the_run_is_never_read(tmp_path: Path, trained: Path) -> None:
    run = tmp_path / "run"
    _, newest = build_run(run, trained)
    intact = weights_of(run, newest)
    # The attacker's weights: the same size as the real blob, and the manifest's checksum matches them.
    hostile = bytes(b ^ 0x5A for b in (newest / "model.bin").read_bytes())
    outside = tmp_path / "elsewhere" / "weights.bin"
    outside.parent.mkdir()
    outside.write_bytes(hostile)
    (newest / "model.bin").unlink()
    (newest / "model.bin").symlink_to(outside)
    fix_manifest(newest, {"model.bin": hostile})

    job = make_job(run, keep=5)
    with opened_files() as seen:
        step = job.ckpt.restore()
    assert step == 7
    assert outside_of(run, seen) == []
    [skipped] = events(run, "checkpoint_skipped")
    assert skipped.checkpoint == newest.name
    assert "symbolic link" in skipped.reason and "model.bin" in skipped.reason
    assert not torch.equal(job.model.state_dict()["0.weight"], intact["0.weight"].view_as(job.model[0].weight))
    job.ckpt.close()


# -- every other way a link can get into a run ------------------------------------------------------------------------


def _link_blob_inside(run: Path, older: Path, newest: Path, outside: Path) -> str:
    """A blob that is a link to the same blob of the older checkpoint, inside the run (still refused)."""
    (newest / "optimizer.bin").unlink()
    (newest / "optimizer.bin").symlink_to(Path("..") / older.name / "optimizer.bin")
    fix_manifest(newest, {"optimizer.bin": (older / "optimizer.bin").read_bytes()})
    return "optimizer.bin"


def _link_manifest(run: Path, older: Path, newest: Path, outside: Path) -> str:
    """manifest.json is a link to a copy outside the run."""
    shutil.copy(newest / MANIFEST_NAME, outside / MANIFEST_NAME)
    (newest / MANIFEST_NAME).unlink()
    (newest / MANIFEST_NAME).symlink_to(outside / MANIFEST_NAME)
    return MANIFEST_NAME


def _link_state_json_relative(run: Path, older: Path, newest: Path, outside: Path) -> str:
    """state.json is a relative link that climbs out of the run."""
    shutil.copy(newest / STATE_BLOB, outside / STATE_BLOB)
    (newest / STATE_BLOB).unlink()
    (newest / STATE_BLOB).symlink_to(os.path.relpath(outside / STATE_BLOB, newest))
    return STATE_BLOB


def _fifo_blob(run: Path, older: Path, newest: Path, outside: Path) -> str:
    """A named pipe where a blob should be: never opened for a read that would block."""
    size = (newest / "rng.bin").stat().st_size
    (newest / "rng.bin").unlink()
    os.mkfifo(newest / "rng.bin")
    assert size > 0
    return "rng.bin"


@needs_proc
@pytest.mark.parametrize("plant", [_link_blob_inside, _link_manifest, _link_state_json_relative, _fifo_blob])
def test_links_and_special_files_in_a_checkpoint_make_restore_skip_it(
    tmp_path: Path, plant: Any, trained: Path
) -> None:
    run = tmp_path / "run"
    outside = tmp_path / "outside"
    outside.mkdir()
    older, newest = build_run(run, trained)
    name = plant(run, older, newest, outside)

    job = make_job(run, keep=5)
    with opened_files() as seen:
        assert job.ckpt.restore() == 7
    assert outside_of(run, seen) == []
    [skipped] = events(run, "checkpoint_skipped")
    assert skipped.checkpoint == newest.name and name in skipped.reason
    assert ("symbolic link" if plant is not _fifo_blob else "not a regular file") in skipped.reason
    job.ckpt.close()
    assert os.path.lexists(newest / name)  # evidence is kept


@needs_proc
def test_a_symlinked_checkpoint_folder_is_not_part_of_the_run(tmp_path: Path, trained: Path) -> None:
    """A folder that is a link is never entered: restore loads the newest real checkpoint, even when
    ``latest.json`` names the link, and neither cleanup nor retention touches what it points at."""
    run = tmp_path / "run"
    _, newest = build_run(run, trained)
    outside = tmp_path / "outside"
    shutil.copytree(newest, outside)
    name = newest.name.replace("-step-000000000014-", "-step-000000000021-")
    (newest.parent / name).symlink_to(outside, target_is_directory=True)
    doc = json.loads((outside / MANIFEST_NAME).read_bytes())
    doc["step"] = 21
    (outside / MANIFEST_NAME).write_text(json.dumps(doc))
    (run / "latest.json").write_text(json.dumps({"checkpoint": name, "step": 21, "generation": 1}))
    before = {p.name: p.read_bytes() for p in outside.iterdir()}

    job = make_job(run, keep=1)
    with opened_files() as seen:
        assert job.ckpt.restore() == 14
        job.train(21)  # saves at 21; keep=1 deletes the older checkpoints
    job.ckpt.close()
    assert outside_of(run, seen) == []
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before
    assert (newest.parent / name).is_symlink()
    (skipped,) = events(run, "checkpoint_skipped")  # tried first (newest), refused with the reason
    assert skipped.checkpoint == name and "symbolic link" in skipped.reason


def test_a_run_whose_only_checkpoint_is_a_link_does_not_start_over(tmp_path: Path, trained: Path) -> None:
    run = tmp_path / "run"
    older, newest = build_run(run, trained)
    outside = tmp_path / "outside"
    newest.rename(outside)
    shutil.rmtree(older)
    newest.symlink_to(outside, target_is_directory=True)
    job = make_job(run, keep=1)
    with pytest.raises(NoUsableCheckpointError, match="symbolic link"):
        job.ckpt.restore()
    job.ckpt.close()
    assert newest.is_symlink() and (outside / MANIFEST_NAME).exists()


def test_an_event_log_that_is_a_link_is_refused(tmp_path: Path, trained: Path) -> None:
    run = tmp_path / "run"
    build_run(run, trained)
    outside = tmp_path / "elsewhere.jsonl"
    (run / EVENTS_FILE).rename(outside)
    (run / EVENTS_FILE).symlink_to(outside)
    before = outside.read_bytes()
    with pytest.raises(UnsafePathError, match="symbolic link"):
        make_job(run, keep=5)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        list(read_events(run / EVENTS_FILE))
    assert outside.read_bytes() == before


def test_a_manifest_over_the_size_limit_is_refused_before_it_is_read(tmp_path: Path, trained: Path) -> None:
    run = tmp_path / "run"
    _, newest = build_run(run, trained)
    with open(newest / MANIFEST_NAME, "r+b") as handle:
        handle.truncate(10 * 2**30)  # 10 GiB, sparse: reading it would take the memory
    job = make_job(run, keep=5)
    assert job.ckpt.restore() == 7
    job.ckpt.close()
    (skipped,) = events(run, "checkpoint_skipped")
    assert "more than the" in skipped.reason


def test_a_symlinked_checkpoints_folder_fails_loudly(tmp_path: Path, trained: Path) -> None:
    """Every checkpoint would be behind the link: that is not "no checkpoints" (never a silent restart)."""
    run = tmp_path / "run"
    build_run(run, trained)
    outside = tmp_path / "outside"
    (run / "checkpoints").rename(outside)
    (run / "checkpoints").symlink_to(outside, target_is_directory=True)

    with pytest.raises(UnsafeCheckpointError, match="symbolic link") as info:
        make_job(run, keep=5)
    assert isinstance(info.value, PermanentStorageError)
    assert "checkpoints" in str(info.value)


# -- the local backend's rule, method by method -----------------------------------------------------------------------


@pytest.fixture
def planted(tmp_path: Path) -> tuple[LocalStorage, Path]:
    """A run folder with a real file, a link to an outside file and a link to an outside folder."""
    outside = tmp_path / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret").write_bytes(b"outside bytes")
    (outside / "dir" / "inner").write_bytes(b"outside folder")
    root = tmp_path / "run"
    (root / "a").mkdir(parents=True)
    (root / "a" / "real").write_bytes(b"real")
    (root / "a" / "link").symlink_to(outside / "secret")
    (root / "a" / "dirlink").symlink_to(outside / "dir", target_is_directory=True)
    return LocalStorage(root), outside


def test_reads_through_a_link_are_refused(planted: tuple[LocalStorage, Path]) -> None:
    storage, _ = planted
    assert storage.read("a/real") == b"real"
    for key in ("a/link", "a/dirlink/inner"):
        with pytest.raises(UnsafePathError, match="symbolic link"):
            storage.read(key)
        with pytest.raises(UnsafePathError, match="symbolic link"):
            storage.read_into(key, bytearray(64))
        with pytest.raises(UnsafePathError, match="symbolic link"):
            storage.size(key)
    assert storage.exists("a/real") and storage.exists("a/link")  # the link is there; it is just never followed
    assert not storage.exists("a/dirlink/inner")  # behind a link is outside the run


def test_listings_show_links_as_entries_and_never_enter_them(planted: tuple[LocalStorage, Path]) -> None:
    storage, _ = planted
    assert storage.list_dirs("") == ["a"]
    assert storage.list_dirs("a") == []
    assert storage.list_files("a") == ["dirlink", "link", "real"]
    assert storage.find("") == ["a/dirlink", "a/link", "a/real"]
    with pytest.raises(UnsafePathError, match="symbolic link"):
        storage.find("a/dirlink")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        storage.list_files("a/dirlink")


def test_deletes_remove_links_never_what_they_point_at(planted: tuple[LocalStorage, Path]) -> None:
    storage, outside = planted
    storage.delete("a/dirlink/inner")  # behind a link: not in the run, nothing to delete
    storage.delete_prefix("a/dirlink")
    storage.delete("a/link")
    assert (outside / "dir" / "inner").read_bytes() == b"outside folder"
    assert (outside / "secret").read_bytes() == b"outside bytes"
    assert storage.find("") == ["a/real"]
    (storage.root_path / "a" / "again").symlink_to(outside / "dir", target_is_directory=True)
    storage.delete_prefix("a")
    assert storage.find("") == []
    assert (outside / "dir" / "inner").read_bytes() == b"outside folder"


def test_writes_never_go_through_a_link(planted: tuple[LocalStorage, Path]) -> None:
    storage, outside = planted
    with pytest.raises(UnsafePathError, match="symbolic link"):
        storage.write_stream("a/link", lambda: [b"hostile"])
    with pytest.raises(UnsafePathError, match="symbolic link"):
        storage.write_stream("a/dirlink/new", lambda: [b"hostile"])
    with pytest.raises(UnsafePathError, match="symbolic link"):
        storage.write_atomic("a/dirlink/new", b"hostile")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        storage.sync_prefix("a/dirlink")
    storage.write_atomic("a/link", b"replaced")  # an atomic write replaces the link itself
    assert storage.read("a/link") == b"replaced"
    assert not (storage.root_path / "a" / "link").is_symlink()
    assert (outside / "secret").read_bytes() == b"outside bytes"
    assert sorted(p.name for p in (outside / "dir").iterdir()) == ["inner"]


def test_a_save_refuses_a_link_planted_at_its_blob(tmp_path: Path) -> None:
    run = tmp_path / "run"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"keep me")
    repo = CheckpointRepository(LocalStorage(run))
    pending = repo.begin(step=1)
    folder = run / pending.ref.key
    folder.mkdir(parents=True)
    (folder / "model.bin").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symbolic link"):
        pending.write_blob("model.bin", lambda: [b"weights"])
    assert outside.read_bytes() == b"keep me"


def test_the_run_folder_itself_may_be_a_link(tmp_path: Path, trained: Path) -> None:
    """Only what is inside the run is checked: the user chose where the run folder lives."""
    real = tmp_path / "disk" / "run"
    build_run(real, trained)
    (tmp_path / "run").symlink_to(real, target_is_directory=True)
    job = make_job(tmp_path / "run", keep=5)
    assert job.ckpt.restore() == 14
    job.ckpt.close()


# -- bounded parsing ------------------------------------------------------------------------------------------------


def _manifest_bytes(**changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "format": "spotsafe-checkpoint",
        "format_version": 2,
        "step": 3,
        "created_at": 1.5,
        "checksum_algorithm": "xxh3-128",
        "blobs": [],
        "metadata": {},
        "writer": {},
    }
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_manifest_bytes(metadata={"x": json.loads(deep(MANIFEST_LIMITS.max_depth))}), "nest"),
        (b'{"metadata":' + deep(200_000) + b"}", "nest"),
        (_manifest_bytes(metadata={"x": "y" * MANIFEST_LIMITS.max_bytes}), "bytes"),
        (_manifest_bytes(metadata={"x": [[]] * MANIFEST_LIMITS.max_containers}), "objects and arrays"),
        (_manifest_bytes().replace(b'"step": 3', b'"step": 3, "step": 4'), "twice"),
        (_manifest_bytes(created_at=10**400), "created_at"),
        (_manifest_bytes(created_at=-1), "created_at"),
        (_manifest_bytes().replace(b"1.5", b"NaN"), "NaN"),
        (_manifest_bytes().replace(b"1.5", b"1e999"), "finite"),
        (_manifest_bytes(metadata={"x": "9" * 5000}).replace(b'"9', b"9").replace(b'9"', b"9"), "JSON"),
        (_manifest_bytes().replace(b"spotsafe-checkpoint", b"spotsafe-checkpoint\xff"), "UTF-8"),
        (b"]]]]" + b"[" * 10, "JSON"),
        (b'"' + b'\\"' * 100_000, "JSON"),
    ],
)
def test_manifest_parsing_is_bounded(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=reason):
        Manifest.from_bytes(data)


def test_manifest_limits_leave_room_for_real_manifests() -> None:
    doc = json.loads(_manifest_bytes())
    doc["metadata"] = {"x": json.loads(deep(MANIFEST_LIMITS.max_depth - 2))}
    assert Manifest.from_bytes(json.dumps(doc).encode()).metadata == doc["metadata"]


def test_a_manifest_spotsafe_could_not_read_back_is_never_written() -> None:
    nested: Any = []
    for _ in range(MANIFEST_LIMITS.max_depth):
        nested = [nested]
    with pytest.raises(StateError, match="nest"):
        Manifest(step=1, created_at=1.0, blobs=(), metadata={"x": nested}).to_bytes()


def _state(tree: bytes) -> bytes:
    return b'{"format_version":2,"step":1,"components":{"c":{"tree":' + tree + b',"tensors":[]}}}'


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_state(deep(STATE_LIMITS.max_depth)), "nest"),
        (_state(deep(300_000)), "nest"),
        (_state(b"[" + b"[]," * STATE_LIMITS.max_containers + b"[]]"), "objects and arrays"),
        (_state(b'{"a":1,"a":2}'), "twice"),
        (_state(b"NaN"), "NaN"),
        (_state(b"-Infinity"), "Infinity"),
        (_state(b"1e400"), "finite"),
        (b"\xef\xbb\xbf" + _state(b"1"), "JSON"),
        (_state(b'{"$float":[]}'), "tag"),
        (_state(b'{"$npscalar":[],"value":1}'), "tag"),
        (_state(b'{"$device":"cuda:99999999999999999999999"}'), "device"),
    ],
)
def test_state_json_decoding_is_bounded(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptCheckpointError, match=reason):
        decode_state({STATE_BLOB: bytearray(data)}, "ckpt")


def test_state_json_over_the_size_limit_is_refused_before_it_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("parsed a document over the size limit")

    monkeypatch.setattr(json, "loads", forbidden)
    big = memoryview(bytearray(STATE_LIMITS.max_bytes + 1))
    with pytest.raises(CorruptCheckpointError, match="bytes"):
        decode_state({STATE_BLOB: big}, "ckpt")


def test_state_limits_leave_room_for_deep_real_state() -> None:
    tree: Any = {"leaf": 1}
    depth = 1
    while depth + 1 <= codec.MAX_DEPTH:
        tree, depth = [tree], depth + 1
    tensors: list[torch.Tensor] = []
    doc = codec.encode(tree, tensors)
    assert codec.decode(doc, tensors.__getitem__) == tree
    data = json.dumps({"format_version": 2, "step": 1, "components": {"c": {"tree": doc, "tensors": []}}}).encode()
    assert decode_state({STATE_BLOB: bytearray(data)}, "ckpt").components["c"] == tree


def test_state_spotsafe_could_not_read_back_is_refused_at_save() -> None:
    tree: Any = 1
    for _ in range(codec.MAX_DEPTH + 1):
        tree = (tree,)
    with pytest.raises(StateError, match="nest"):
        codec.encode(tree, [])
    tree = 1
    for _ in range(sys.getrecursionlimit() * 2):
        tree = [tree]
    with pytest.raises(StateError, match="nest"):
        codec.encode(tree, [])


def test_decode_of_a_deep_python_document_is_bounded_too() -> None:
    doc: Any = 1
    for _ in range(sys.getrecursionlimit() * 2):
        doc = [doc]
    with pytest.raises(UnsafeCheckpointError, match="nest"):
        codec.decode(doc, lambda i: torch.zeros(1))


@pytest.mark.parametrize(
    "entry",
    [
        {"nbytes": 0, "dtype": "float32", "shape": [0, 2**70], "segments": []},
        {"nbytes": 0, "dtype": "float32", "shape": [0] * 100, "segments": []},
        {"nbytes": 4, "dtype": "float32", "shape": [1], "segments": [["b", 2**64, 4]]},
    ],
)
def test_tensor_entries_with_absurd_shapes_or_offsets_are_unsafe(entry: dict[str, Any]) -> None:
    with pytest.raises(UnsafeCheckpointError):
        TensorEntry.from_json(entry)


# -- the command line -------------------------------------------------------------------------------------------------


def test_cli_reports_hostile_checkpoints_as_damaged_without_a_traceback(tmp_path: Path, trained: Path) -> None:
    deep_run, link_run, dir_run = tmp_path / "deep", tmp_path / "link", tmp_path / "dir"
    _, newest = build_run(deep_run, trained)
    replace_state(newest, b'{"format_version":2,"step":14,"components":{"model":' + deep(200_000) + b"}}")
    deep_name = newest.name
    for run in (link_run, dir_run):
        shutil.copytree(deep_run, run, symlinks=True)
    outside = tmp_path / "outside.bin"
    link_ckpt = link_run / "checkpoints" / deep_name
    shutil.move(link_ckpt / STATE_BLOB, outside)
    (link_ckpt / STATE_BLOB).symlink_to(outside)
    odd_run = tmp_path / "odd"
    _, odd = build_run(odd_run, trained)
    doc = json.loads((odd / STATE_BLOB).read_bytes())
    doc["components"]["model"]["tree"]["$odict"][0][0] = "\ud800odd"  # a lone surrogate: valid JSON, not UTF-8
    replace_state(odd, json.dumps(doc).encode())
    (dir_run / "checkpoints").rename(tmp_path / "outside-checkpoints")
    (dir_run / "checkpoints").symlink_to(tmp_path / "outside-checkpoints", target_is_directory=True)

    results = run_all(
        ["inspect", str(deep_run)],
        ["inspect", str(link_run)],
        ["verify", str(link_run)],
        ["ls", "--verify", "--json", str(link_run)],
        ["ls", str(dir_run)],
        ["inspect", str(odd_run)],
    )
    for proc in results:
        assert "Traceback" not in proc.stdout + proc.stderr, proc.args
    inspect_deep, inspect_link, verify_link, ls_link, ls_dir, inspect_odd = results
    assert inspect_deep.returncode == 1 and "DAMAGED" in inspect_deep.stderr and "nest" in inspect_deep.stderr
    assert inspect_link.returncode == 1 and "symbolic link" in inspect_link.stderr
    assert verify_link.returncode == 1 and "DAMAGED" in verify_link.stdout and "symbolic link" in verify_link.stdout
    rows = {row["name"]: row for row in json.loads(ls_link.stdout)}
    assert ls_link.returncode == 0 and rows[deep_name]["status"] == "damaged"
    assert "symbolic link" in rows[deep_name]["reason"] and STATE_BLOB in rows[deep_name]["reason"]
    assert ls_dir.returncode == 1 and "symbolic link" in ls_dir.stderr
    assert inspect_odd.returncode == 0 and "\\ud800odd" in inspect_odd.stdout
