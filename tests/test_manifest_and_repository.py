"""The commit protocol on a real folder: what counts as a checkpoint, cleanup, verification, ordering."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import xxhash

from spotsafe.errors import CorruptCheckpointError, PermanentStorageError, StorageError, UnsafeCheckpointError
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import MANIFEST_NAME, Manifest
from spotsafe.storage.repository import CHECKPOINTS, CheckpointRef, CheckpointRepository

BLOBS = {"model.bin": bytes(range(256)) * 40 + b"tail", "state.json": b'{"step": 1}', "empty.bin": b""}


class Clock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def save(repo: CheckpointRepository, step: int, blobs: dict[str, bytes] = BLOBS, **metadata: Any) -> CheckpointRef:
    pending = repo.begin(step)
    for name, data in blobs.items():
        # Several chunks, including a memoryview, as the snapshot writer streams them.
        pending.write_blob(name, [data[:100], memoryview(data[100:])])
    pending.commit(metadata=dict(metadata), writer={"test": True})
    return pending.ref


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "run")


@pytest.fixture
def repo(storage: LocalStorage) -> CheckpointRepository:
    return CheckpointRepository(storage, clock=Clock())


def folder(storage: LocalStorage, ref: CheckpointRef) -> Path:
    return storage.path_of(ref.key)


# -- committing -------------------------------------------------------------------------------------------------------


def test_commit_makes_a_checkpoint_that_loads_back(repo: CheckpointRepository, storage: LocalStorage) -> None:
    assert repo.committed() == []
    ref = save(repo, 7, note="hello")
    assert repo.committed() == [ref]
    assert ref.step == 7
    loaded = repo.load(ref)
    assert {name: bytes(data) for name, data in loaded.blobs.items()} == BLOBS
    assert loaded.manifest.step == 7
    assert loaded.manifest.metadata == {"note": "hello"}
    for entry in loaded.manifest.blobs:
        assert entry.size == len(BLOBS[entry.path])
        assert entry.checksum == xxhash.xxh3_128(BLOBS[entry.path]).hexdigest()
    assert repo.verify(ref) == loaded.manifest
    assert repo.check_sizes(ref) == loaded.manifest
    assert sorted(os.listdir(folder(storage, ref))) == sorted([*BLOBS, MANIFEST_NAME])


def test_progress_reports_every_blob(repo: CheckpointRepository) -> None:
    ref = save(repo, 1)
    seen: list[int] = []
    repo.load(ref, progress=seen.append)
    assert sorted(seen) == sorted(len(d) for d in BLOBS.values())


def test_pending_checkpoint_is_invisible_until_commit(repo: CheckpointRepository) -> None:
    pending = repo.begin(3)
    pending.write_blob("model.bin", [b"abc"])
    assert repo.committed() == []
    assert repo.folders() == [pending.ref]
    pending.commit(metadata={}, writer={})
    assert repo.committed() == [pending.ref]


def test_abort_removes_the_folder_and_commit_cannot_be_aborted(
    repo: CheckpointRepository, storage: LocalStorage
) -> None:
    pending = repo.begin(3)
    pending.write_blob("model.bin", [b"abc"])
    pending.abort()
    assert repo.folders() == []
    assert not folder(storage, pending.ref).exists()
    done = repo.begin(4)
    done.write_blob("state.json", [b"{}"])
    done.commit(metadata={}, writer={})
    with pytest.raises(RuntimeError):
        done.abort()
    assert repo.committed() == [done.ref]


def test_commit_without_blobs(repo: CheckpointRepository) -> None:
    pending = repo.begin(2)
    pending.commit(metadata={}, writer={})
    assert repo.committed() == [pending.ref]
    assert repo.load(pending.ref).blobs == {}


def test_write_blob_refuses_unsafe_names_and_duplicates(repo: CheckpointRepository) -> None:
    pending = repo.begin(1)
    for name in ("../x", "/etc/passwd", "a/b", MANIFEST_NAME, ".hidden", "", "a..b"):
        with pytest.raises(UnsafeCheckpointError):
            pending.write_blob(name, [b"x"])
    pending.write_blob("ok.bin", [b"x"])
    with pytest.raises(ValueError):
        pending.write_blob("ok.bin", [b"y"])


def test_folder_without_manifest_is_not_committed(repo: CheckpointRepository, storage: LocalStorage) -> None:
    good = save(repo, 1)
    orphan = repo.begin(2)
    orphan.write_blob("model.bin", [b"partial"])
    assert repo.committed() == [good]
    assert repo.folders() == [orphan.ref, good]
    assert not repo.is_committed(orphan.ref)
    with pytest.raises(CorruptCheckpointError):
        repo.load(orphan.ref)


# -- cleanup ----------------------------------------------------------------------------------------------------------


def test_remove_leftovers_deletes_partials_and_temp_files_only(
    repo: CheckpointRepository, storage: LocalStorage
) -> None:
    good = save(repo, 5)
    newer_partial = repo.begin(9)
    newer_partial.write_blob("model.bin", [b"partial"])
    older_partial = repo.begin(2)
    older_partial.write_blob("model.bin", [b"partial"])
    empty_partial = repo.begin(6)
    folder(storage, empty_partial.ref).mkdir(parents=True)
    stray = folder(storage, good) / f".{MANIFEST_NAME}.tmp-1a2b3c4d"
    stray.write_bytes(b'{"half": ')
    unrelated = storage.path_of(CHECKPOINTS) / "notes"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine")

    removed = repo.remove_leftovers()

    assert set(removed) == {
        newer_partial.ref.key,
        older_partial.ref.key,
        empty_partial.ref.key,
        f"{good.key}/.{MANIFEST_NAME}.tmp-1a2b3c4d",
    }
    assert not stray.exists()
    assert repo.folders() == [good]
    assert repo.committed() == [good]
    assert {name: bytes(data) for name, data in repo.load(good).blobs.items()} == BLOBS
    assert (unrelated / "keep.txt").read_text() == "mine"
    assert repo.remove_leftovers() == []


def test_remove_leftovers_on_an_empty_run(repo: CheckpointRepository) -> None:
    assert repo.remove_leftovers() == []


# -- verification -----------------------------------------------------------------------------------------------------


def _rewrite_manifest(storage: LocalStorage, ref: CheckpointRef, edit: Any) -> None:
    path = folder(storage, ref) / MANIFEST_NAME
    doc = json.loads(path.read_bytes())
    edit(doc)
    path.write_text(json.dumps(doc))


def _truncate(storage: LocalStorage, ref: CheckpointRef) -> None:
    path = folder(storage, ref) / "model.bin"
    path.write_bytes(path.read_bytes()[:-1])


def _flip(storage: LocalStorage, ref: CheckpointRef) -> None:
    path = folder(storage, ref) / "model.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _grow(storage: LocalStorage, ref: CheckpointRef) -> None:
    with open(folder(storage, ref) / "state.json", "ab") as handle:
        handle.write(b" ")


def _delete_blob(storage: LocalStorage, ref: CheckpointRef) -> None:
    (folder(storage, ref) / "model.bin").unlink()


def _garbage_manifest(storage: LocalStorage, ref: CheckpointRef) -> None:
    (folder(storage, ref) / MANIFEST_NAME).write_bytes(b"\x00\xffnot json{{{")


def _empty_manifest(storage: LocalStorage, ref: CheckpointRef) -> None:
    (folder(storage, ref) / MANIFEST_NAME).write_bytes(b"")


def _wrong_step(storage: LocalStorage, ref: CheckpointRef) -> None:
    _rewrite_manifest(storage, ref, lambda d: d.update(step=d["step"] + 1))


def _bad_checksum_text(storage: LocalStorage, ref: CheckpointRef) -> None:
    _rewrite_manifest(storage, ref, lambda d: d["blobs"][0].update(checksum="XYZ"))


def _wrong_checksum(storage: LocalStorage, ref: CheckpointRef) -> None:
    _rewrite_manifest(storage, ref, lambda d: d["blobs"][0].update(checksum="0" * 32))


def _wrong_format(storage: LocalStorage, ref: CheckpointRef) -> None:
    _rewrite_manifest(storage, ref, lambda d: d.update(format_version=99))


def _listed_twice(storage: LocalStorage, ref: CheckpointRef) -> None:
    _rewrite_manifest(storage, ref, lambda d: d["blobs"].append(dict(d["blobs"][0])))


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _flip,
        _grow,
        _delete_blob,
        _garbage_manifest,
        _empty_manifest,
        _wrong_step,
        _bad_checksum_text,
        _wrong_checksum,
        _wrong_format,
        _listed_twice,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_load_and_verify_detect_damage(repo: CheckpointRepository, storage: LocalStorage, damage: Any) -> None:
    ref = save(repo, 4)
    repo.load(ref)
    damage(storage, ref)
    with pytest.raises(CorruptCheckpointError) as info:
        repo.load(ref)
    assert not isinstance(info.value, UnsafeCheckpointError)
    with pytest.raises(CorruptCheckpointError):
        repo.verify(ref)


def test_deleted_manifest_means_no_checkpoint(repo: CheckpointRepository, storage: LocalStorage) -> None:
    ref = save(repo, 4)
    (folder(storage, ref) / MANIFEST_NAME).unlink()
    assert repo.committed() == []
    with pytest.raises(CorruptCheckpointError) as info:
        repo.load(ref)
    assert info.value.checkpoint == ref.name


def test_size_check_catches_truncation_without_reading(repo: CheckpointRepository, storage: LocalStorage) -> None:
    ref = save(repo, 4)
    _truncate(storage, ref)
    with pytest.raises(CorruptCheckpointError, match="bytes"):
        repo.check_sizes(ref)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/b", "..", ".", MANIFEST_NAME, "x\\y", "", 5, None])
def test_manifest_with_an_escaping_blob_path_is_unsafe(
    repo: CheckpointRepository, storage: LocalStorage, path: Any
) -> None:
    ref = save(repo, 4)
    _rewrite_manifest(storage, ref, lambda d: d["blobs"][0].update(path=path))
    with pytest.raises(UnsafeCheckpointError):
        repo.load(ref)
    with pytest.raises(UnsafeCheckpointError):
        repo.read_manifest(ref)


def test_unsafe_is_a_kind_of_corrupt() -> None:
    assert issubclass(UnsafeCheckpointError, CorruptCheckpointError)


def test_manifest_json_round_trip() -> None:
    manifest = Manifest(step=3, created_at=12.5, blobs=(), metadata={"a": [1, 2]}, writer={"host": "h"})
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"format": "something-else"},
        {"format": "spotsafe-checkpoint", "format_version": 1, "checksum_algorithm": "md5"},
        {"format": "spotsafe-checkpoint", "format_version": 1, "checksum_algorithm": "xxh3-128", "step": -1},
        {"format": "spotsafe-checkpoint", "format_version": 1, "checksum_algorithm": "xxh3-128", "step": True},
        {
            "format": "spotsafe-checkpoint",
            "format_version": 1,
            "checksum_algorithm": "xxh3-128",
            "step": 1,
            "created_at": "now",
            "blobs": [],
        },
        {
            "format": "spotsafe-checkpoint",
            "format_version": 1,
            "checksum_algorithm": "xxh3-128",
            "step": 1,
            "created_at": 1.0,
            "blobs": {},
        },
        {
            "format": "spotsafe-checkpoint",
            "format_version": 1,
            "checksum_algorithm": "xxh3-128",
            "step": 1,
            "created_at": 1.0,
            "blobs": [{"path": "a.bin", "size": -1, "checksum": "0" * 32}],
        },
    ],
    ids=lambda d: json.dumps(d)[:60],
)
def test_manifest_parsing_is_strict(doc: Any) -> None:
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_bytes(json.dumps(doc).encode())


# -- ordering ---------------------------------------------------------------------------------------------------------


def test_newest_first_by_step_then_creation_time(storage: LocalStorage) -> None:
    clock = Clock(1_000.0)
    repo = CheckpointRepository(storage, clock=clock)
    made = {}
    for label, step, when in [
        ("s5_early", 5, 100.0),
        ("s3_late", 3, 900.0),
        ("s5_late", 5, 500.0),
        ("s10", 10, 50.0),
        ("s0", 0, 1_000.0),
        ("s5_mid", 5, 300.5),
    ]:
        clock.now = when
        made[label] = save(repo, step)
    order = [next(k for k, v in made.items() if v == ref) for ref in repo.committed()]
    assert order == ["s10", "s5_late", "s5_mid", "s5_early", "s3_late", "s0"]
    assert repo.load(made["s5_mid"]).manifest.created_at == 300.5
    assert made["s5_mid"].created_ms == 300_500


def test_checkpoint_names_parse_strictly() -> None:
    ref = CheckpointRef.parse("step-000000000120-1763869512345-9f2c")
    assert ref == CheckpointRef(step=120, created_ms=1763869512345, name="step-000000000120-1763869512345-9f2c")
    for bad in ("step-120-1763869512345-9f2c", "step-000000000120-1763869512345-9F2C", "x", "step-000000000120"):
        assert CheckpointRef.parse(bad) is None


def test_begin_refuses_negative_steps(repo: CheckpointRepository) -> None:
    with pytest.raises(ValueError):
        repo.begin(-1)


# -- deleting ---------------------------------------------------------------------------------------------------------


class Recording:
    """A storage that records calls and can fail on ``delete_prefix``."""

    def __init__(self, inner: LocalStorage, fail_delete_prefix: bool = False) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []
        self.fail_delete_prefix = fail_delete_prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        self.inner.delete(key)

    def delete_prefix(self, prefix: str) -> None:
        self.calls.append(("delete_prefix", prefix))
        if self.fail_delete_prefix:
            raise PermanentStorageError("simulated failure")
        self.inner.delete_prefix(prefix)


def test_delete_removes_the_manifest_first(storage: LocalStorage) -> None:
    recording = Recording(storage)
    repo = CheckpointRepository(recording, clock=Clock())  # type: ignore[arg-type]
    keep = save(repo, 1)
    doomed = save(repo, 2)
    repo.delete(doomed)
    assert recording.calls[0] == ("delete", f"{doomed.key}/{MANIFEST_NAME}")
    assert ("delete_prefix", doomed.key) in recording.calls
    assert repo.folders() == [keep]
    assert not folder(storage, doomed).exists()


def test_delete_interrupted_after_the_manifest_leaves_no_checkpoint(storage: LocalStorage) -> None:
    recording = Recording(storage, fail_delete_prefix=True)
    repo = CheckpointRepository(recording, clock=Clock())  # type: ignore[arg-type]
    keep = save(repo, 1)
    doomed = save(repo, 2)
    with pytest.raises(StorageError):
        repo.delete(doomed)
    # The blobs are still there, but the checkpoint no longer exists for readers.
    assert (folder(storage, doomed) / "model.bin").exists()
    assert repo.committed() == [keep]


# -- LocalStorage -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["..", "../x", "a/../b", "a/..", "/etc/passwd", "/abs", "a/./b", ".", "a\\..\\b", "a\0b"]
)
def test_path_of_refuses_keys_that_could_escape(storage: LocalStorage, key: str) -> None:
    with pytest.raises(PermanentStorageError):
        storage.path_of(key)


def test_path_of_maps_keys_inside_the_root(storage: LocalStorage) -> None:
    assert storage.path_of("a/b") == storage.root / "a" / "b"
    assert storage.path_of("a//b/") == storage.root / "a" / "b"
    assert storage.path_of("..x/y..") == storage.root / "..x" / "y.."


def test_escaping_keys_are_refused_by_every_operation(storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    key = "../outside.txt"
    storage.write_atomic("inside.txt", b"x")
    for call in (
        lambda: storage.read(key),
        lambda: storage.write_atomic(key, b"overwritten"),
        lambda: storage.write_stream(key, [b"overwritten"]),
        lambda: storage.delete(key),
        lambda: storage.size(key),
    ):
        with pytest.raises(PermanentStorageError):
            call()
    assert outside.read_text() == "secret"


def test_write_atomic_leaves_no_temp_file(storage: LocalStorage) -> None:
    storage.write_atomic("dir/target.json", b"first")
    storage.write_atomic("dir/target.json", b"second, longer")
    directory = storage.path_of("dir")
    assert os.listdir(directory) == ["target.json"]
    assert storage.read("dir/target.json") == b"second, longer"


def test_write_atomic_failure_leaves_no_temp_file_and_keeps_the_target(storage: LocalStorage) -> None:
    storage.write_atomic("dir/sub/inner.txt", b"x")  # "dir/sub" is a folder: replacing it with a file must fail
    with pytest.raises(StorageError):
        storage.write_atomic("dir/sub", b"data")
    assert sorted(os.listdir(storage.path_of("dir"))) == ["sub"]
    assert storage.read("dir/sub/inner.txt") == b"x"


def test_storage_basics(storage: LocalStorage) -> None:
    chunks: Iterable[Any] = [b"ab", bytearray(b"cd"), memoryview(b"efgh")[1:]]
    assert storage.write_stream("p/blob", chunks) == 7
    assert storage.read("p/blob") == b"abcdfgh"
    assert storage.size("p/blob") == 7
    buffer = bytearray(7)
    assert storage.read_into("p/blob", buffer) == 7 and bytes(buffer) == b"abcdfgh"
    assert storage.exists("p/blob") and not storage.exists("p/none") and not storage.exists("p")
    storage.write_atomic("p/q/r", b"")
    assert storage.list_dirs("p") == ["q"]
    assert storage.list_files("p") == ["blob"]
    assert storage.list_dirs("missing") == [] and storage.list_files("missing") == []
    storage.delete("p/blob")
    storage.delete("p/blob")  # missing is fine
    assert not storage.exists("p/blob")
    with pytest.raises(StorageError):
        storage.read("p/blob")
    with pytest.raises(PermanentStorageError):
        storage.delete_prefix("")
    storage.delete_prefix("p")
    assert not storage.path_of("p").exists()
