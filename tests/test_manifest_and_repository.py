"""The commit protocol on a real run location (local folder and S3): what counts as a checkpoint,
cleanup, verification, ordering."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from spotsafe.errors import (
    CorruptCheckpointError,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
    UnsafeCheckpointError,
)
from spotsafe.storage import parallel_read
from spotsafe.storage.base import Storage, local_paths
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import MANIFEST_NAME, Manifest, new_hasher
from spotsafe.storage.parallel_read import part_bounds
from spotsafe.storage.pending import HASH_INLINE
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CHECKPOINTS, CheckpointRef, CheckpointRepository
from spotsafe.storage.retry import RetryingStorage, StorageRetry
from spotsafe.storage.wrapper import StorageWrapper

from .conftest import PROCESS_HANG_S

BLOBS = {"model.bin": bytes(range(256)) * 40 + b"tail", "state.json": b'{"step": 1}', "empty.bin": b""}


class Clock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def save(
    repo: CheckpointRepository,
    step: int,
    blobs: dict[str, bytes] = BLOBS,
    *,
    generation: int = 0,
    **metadata: Any,
) -> CheckpointRef:
    pending = repo.begin(step, generation)
    for name, data in blobs.items():
        # Several chunks, including a memoryview, as the snapshot writer streams them.
        pending.write_blob(name, lambda data=data: [data[:100], memoryview(data)[100:]])
    pending.commit(metadata=dict(metadata), writer={"test": True})
    return pending.ref


@pytest.fixture
def storage(run_url: str) -> Storage:
    """The run's storage as spotsafe opens it (with retries), on local disk and on S3."""
    return open_storage(run_url)


@pytest.fixture
def repo(storage: Storage) -> CheckpointRepository:
    return CheckpointRepository(storage, clock=Clock())


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "run")


def local_path(storage: Storage, key: str) -> Path | None:
    """The local path of ``key`` when the storage is a local folder, else ``None``."""
    local = local_paths(storage)
    return None if local is None else Path(local.path_of(key))


# -- committing -------------------------------------------------------------------------------------------------------


def test_commit_makes_a_checkpoint_that_loads_back(repo: CheckpointRepository, storage: Storage) -> None:
    assert repo.committed() == []
    ref = save(repo, 7, generation=3, note="hello")
    assert repo.committed() == [ref]
    assert (ref.step, ref.generation) == (7, 3)
    assert ref.name.startswith("g000003-step-000000000007-1700000000000-")
    loaded = repo.load(ref)
    assert {name: bytes(data) for name, data in loaded.blobs.items()} == BLOBS
    assert loaded.manifest.step == 7
    assert loaded.manifest.metadata == {"note": "hello"}
    assert loaded.manifest.writer == {"test": True}
    for entry in loaded.manifest.blobs:
        assert entry.size == len(BLOBS[entry.path])
        assert entry.checksum == xxhash.xxh3_128(BLOBS[entry.path]).hexdigest()
    assert repo.verify(ref) == loaded.manifest
    assert repo.check_sizes(ref) == loaded.manifest
    assert sorted(storage.list_files(ref.key)) == sorted([*BLOBS, MANIFEST_NAME])


def test_progress_reports_every_blob(repo: CheckpointRepository) -> None:
    ref = save(repo, 1)
    seen: list[int] = []
    repo.load(ref, progress=seen.append)
    assert sorted(seen) == sorted(len(d) for d in BLOBS.values())
    seen.clear()
    repo.verify(ref, progress=seen.append)
    assert sorted(seen) == sorted(len(d) for d in BLOBS.values())


def test_write_blob_records_size_and_checksum_of_what_the_source_yields(repo: CheckpointRepository) -> None:
    pending = repo.begin(1)
    data = os.urandom(10_000)
    entry = pending.write_blob("x.bin", lambda: (memoryview(data)[i : i + 999] for i in range(0, len(data), 999)))
    assert entry.size == len(data)
    assert entry.checksum == xxhash.xxh3_128(data).hexdigest()


def test_large_chunks_are_checksummed_alongside_their_write_even_from_a_reused_buffer(
    repo: CheckpointRepository, storage: Storage
) -> None:
    """Chunks from HASH_INLINE bytes up are hashed on another thread while storage writes them; a source may refill
    one buffer for its next chunk, so each must be hashed before the source is resumed."""
    pieces = [os.urandom(HASH_INLINE + 17) for _ in range(6)] + [os.urandom(100)]

    def refilled() -> Iterator[memoryview]:
        buffer = bytearray(HASH_INLINE + 17)
        for piece in pieces:
            buffer[: len(piece)] = piece
            yield memoryview(buffer)[: len(piece)]

    pending = repo.begin(1)
    entry = pending.write_blob("x.bin", refilled)
    data = b"".join(pieces)
    assert entry.size == len(data) and entry.checksum == xxhash.xxh3_128(data).hexdigest()
    pending.commit(metadata={}, writer={})
    assert bytes(repo.load(pending.ref).blobs["x.bin"]) == data


def test_pending_checkpoint_is_invisible_until_commit(repo: CheckpointRepository) -> None:
    pending = repo.begin(3)
    pending.write_blob("model.bin", lambda: [b"abc"])
    assert repo.committed() == []
    assert repo.candidates() == []
    assert repo.folders() == [pending.ref]
    assert not repo.is_committed(pending.ref)
    pending.commit(metadata={}, writer={})
    assert repo.committed() == [pending.ref]
    assert repo.is_committed(pending.ref)


def test_abort_removes_the_folder_and_commit_cannot_be_aborted(repo: CheckpointRepository, storage: Storage) -> None:
    pending = repo.begin(3)
    pending.write_blob("model.bin", lambda: [b"abc"])
    pending.abort()
    assert repo.folders() == []
    assert storage.find(pending.ref.key) == []
    path = local_path(storage, pending.ref.key)
    assert path is None or not path.exists()
    done = repo.begin(4)
    done.write_blob("state.json", lambda: [b"{}"])
    done.commit(metadata={}, writer={})
    with pytest.raises(RuntimeError):
        done.abort()
    assert repo.committed() == [done.ref]


def test_commit_without_blobs(repo: CheckpointRepository) -> None:
    pending = repo.begin(2)
    pending.commit(metadata={}, writer={})
    assert repo.committed() == [pending.ref]
    assert repo.load(pending.ref).blobs == {}


def test_write_blob_refuses_unsafe_names_and_duplicates(repo: CheckpointRepository, storage: Storage) -> None:
    pending = repo.begin(1)
    for name in ("../x", "/etc/passwd", "a/b", MANIFEST_NAME, ".hidden", "", "a..b"):
        with pytest.raises(UnsafeCheckpointError):
            pending.write_blob(name, lambda: [b"x"])
    pending.write_blob("ok.bin", lambda: [b"x"])
    with pytest.raises(ValueError):
        pending.write_blob("ok.bin", lambda: [b"y"])
    assert storage.find("") == [f"{pending.ref.key}/ok.bin"]


def test_folder_without_manifest_is_not_committed(repo: CheckpointRepository) -> None:
    good = save(repo, 1)
    orphan = repo.begin(2)
    orphan.write_blob("model.bin", lambda: [b"partial"])
    assert repo.committed() == [good]
    assert repo.folders() == [orphan.ref, good]
    assert not repo.is_committed(orphan.ref)
    with pytest.raises(CorruptCheckpointError):
        repo.load(orphan.ref)


def test_manifest_in_a_nested_folder_does_not_count(repo: CheckpointRepository, storage: Storage) -> None:
    good = save(repo, 1)
    deeper = repo.begin(5)
    storage.write_atomic(f"{deeper.ref.key}/sub/{MANIFEST_NAME}", b"{}")
    storage.write_atomic(f"{CHECKPOINTS}/{MANIFEST_NAME}", b"{}")
    assert repo.committed() == [good]


# -- cleanup ----------------------------------------------------------------------------------------------------------


def test_remove_leftovers_deletes_partials_and_temp_files_only(repo: CheckpointRepository, storage: Storage) -> None:
    good = save(repo, 5)
    newer_partial = repo.begin(9)
    newer_partial.write_blob("model.bin", lambda: [b"partial"])
    older_partial = repo.begin(2)
    older_partial.write_blob("model.bin", lambda: [b"partial"])
    expected = {newer_partial.ref.key, older_partial.ref.key}
    empty_partial = repo.begin(6)
    empty_path = local_path(storage, empty_partial.ref.key)
    if empty_path is not None:  # object stores have no empty folders
        empty_path.mkdir(parents=True)
        expected.add(empty_partial.ref.key)
    stray = f"{good.key}/.{MANIFEST_NAME}.tmp-1a2b3c4d"
    storage.write_atomic(stray, b'{"half": ')
    expected.add(stray)
    storage.write_atomic(f"{CHECKPOINTS}/notes/keep.txt", b"mine")

    removed = repo.remove_leftovers()

    assert set(removed) == expected
    assert len(removed) == len(expected)
    assert not storage.exists(stray)
    assert repo.folders() == [good]
    assert repo.committed() == [good]
    assert {name: bytes(data) for name, data in repo.load(good).blobs.items()} == BLOBS
    assert storage.read(f"{CHECKPOINTS}/notes/keep.txt") == b"mine"
    assert repo.remove_leftovers() == []
    assert sorted(storage.find("")) == sorted(
        [*(f"{good.key}/{n}" for n in [*BLOBS, MANIFEST_NAME]), f"{CHECKPOINTS}/notes/keep.txt"]
    )


def test_remove_leftovers_on_an_empty_run(repo: CheckpointRepository) -> None:
    assert repo.remove_leftovers() == []


# -- verification -----------------------------------------------------------------------------------------------------


def _rewrite_manifest(storage: Storage, ref: CheckpointRef, edit: Any) -> None:
    key = f"{ref.key}/{MANIFEST_NAME}"
    doc = json.loads(storage.read(key))
    edit(doc)
    storage.write_atomic(key, json.dumps(doc).encode())


def _truncate(storage: Storage, ref: CheckpointRef) -> None:
    key = f"{ref.key}/model.bin"
    storage.write_atomic(key, storage.read(key)[:-1])


def _flip(storage: Storage, ref: CheckpointRef) -> None:
    key = f"{ref.key}/model.bin"
    data = bytearray(storage.read(key))
    data[len(data) // 2] ^= 0x01
    storage.write_atomic(key, bytes(data))


def _grow(storage: Storage, ref: CheckpointRef) -> None:
    key = f"{ref.key}/state.json"
    storage.write_atomic(key, storage.read(key) + b" ")


def _delete_blob(storage: Storage, ref: CheckpointRef) -> None:
    storage.delete(f"{ref.key}/model.bin")


def _garbage_manifest(storage: Storage, ref: CheckpointRef) -> None:
    storage.write_atomic(f"{ref.key}/{MANIFEST_NAME}", b"\x00\xffnot json{{{")


def _empty_manifest(storage: Storage, ref: CheckpointRef) -> None:
    storage.write_atomic(f"{ref.key}/{MANIFEST_NAME}", b"")


def _wrong_step(storage: Storage, ref: CheckpointRef) -> None:
    _rewrite_manifest(storage, ref, lambda d: d.update(step=d["step"] + 1))


def _bad_checksum_text(storage: Storage, ref: CheckpointRef) -> None:
    _rewrite_manifest(storage, ref, lambda d: d["blobs"][0].update(checksum="XYZ"))


def _wrong_checksum(storage: Storage, ref: CheckpointRef) -> None:
    _rewrite_manifest(storage, ref, lambda d: d["blobs"][0].update(checksum="0" * 32))


def _wrong_format(storage: Storage, ref: CheckpointRef) -> None:
    _rewrite_manifest(storage, ref, lambda d: d.update(format_version=99))


def _listed_twice(storage: Storage, ref: CheckpointRef) -> None:
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
def test_load_and_verify_detect_damage(repo: CheckpointRepository, storage: Storage, damage: Any) -> None:
    ref = save(repo, 4)
    repo.load(ref)
    damage(storage, ref)
    with pytest.raises(CorruptCheckpointError) as info:
        repo.load(ref)
    assert not isinstance(info.value, UnsafeCheckpointError)
    assert info.value.checkpoint in (ref.name, None)
    with pytest.raises(CorruptCheckpointError):
        repo.verify(ref)


def test_deleted_manifest_means_no_checkpoint(repo: CheckpointRepository, storage: Storage) -> None:
    ref = save(repo, 4)
    storage.delete(f"{ref.key}/{MANIFEST_NAME}")
    assert repo.committed() == []
    with pytest.raises(CorruptCheckpointError) as info:
        repo.load(ref)
    assert info.value.checkpoint == ref.name


def test_size_check_catches_truncation_without_reading(repo: CheckpointRepository, storage: Storage) -> None:
    ref = save(repo, 4)
    _truncate(storage, ref)
    with pytest.raises(CorruptCheckpointError, match="bytes"):
        repo.check_sizes(ref)


def test_size_check_catches_a_missing_blob(repo: CheckpointRepository, storage: Storage) -> None:
    ref = save(repo, 4)
    _delete_blob(storage, ref)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        repo.check_sizes(ref)


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/b", "..", ".", MANIFEST_NAME, "x\\y", "", 5, None])
def test_manifest_with_an_escaping_blob_path_is_unsafe(local: LocalStorage, path: Any) -> None:
    # About parsing, not storage: one backend is enough.
    repo = CheckpointRepository(local, clock=Clock())
    ref = save(repo, 4)
    _rewrite_manifest(local, ref, lambda d: d["blobs"][0].update(path=path))
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


def test_newest_first_by_generation_then_step_then_creation_time(storage: Storage) -> None:
    clock = Clock(1_000.0)
    repo = CheckpointRepository(storage, clock=clock)
    made = {}
    for label, generation, step, when in [
        ("g1s5_early", 1, 5, 100.0),
        ("g1s3_late", 1, 3, 900.0),
        ("g1s5_late", 1, 5, 500.0),
        ("g1s10", 1, 10, 50.0),
        ("g1s0", 1, 0, 1_000.0),
        ("g1s5_mid", 1, 5, 300.5),
        ("g2s1", 2, 1, 10.0),
        ("g0s99", 0, 99, 2_000.0),
    ]:
        clock.now = when
        made[label] = save(repo, step, generation=generation)
    order = [next(k for k, v in made.items() if v == ref) for ref in repo.committed()]
    assert order == ["g2s1", "g1s10", "g1s5_late", "g1s5_mid", "g1s5_early", "g1s3_late", "g1s0", "g0s99"]
    assert repo.candidates() == repo.committed()
    assert repo.folders() == repo.committed()
    assert repo.load(made["g1s5_mid"]).manifest.created_at == 300.5
    assert made["g1s5_mid"].created_ms == 300_500


def test_checkpoint_names_parse_strictly() -> None:
    name = "g000003-step-000000000120-1763869512345-9f2c"
    ref = CheckpointRef.parse(name)
    assert ref == CheckpointRef(generation=3, step=120, created_ms=1763869512345, name=name)
    assert ref.key == f"{CHECKPOINTS}/{name}"
    for bad in (
        "step-000000000120-1763869512345-9f2c",  # the old, generation-less name
        "g3-step-000000000120-1763869512345-9f2c",
        "g000003-step-120-1763869512345-9f2c",
        "g000003-step-000000000120-1763869512345-9F2C",
        "g000003-step-000000000120-1763869512345-9f2c-x",
        "x",
        "g000003-step-000000000120",
    ):
        assert CheckpointRef.parse(bad) is None


def test_folder_names_carry_generation_step_and_time(repo: CheckpointRepository) -> None:
    pending = repo.begin(120, 7)
    assert pending.ref.name.startswith("g000007-step-000000000120-1700000000000-")
    assert CheckpointRef.parse(pending.ref.name) == pending.ref
    assert repo.begin(120, 7).ref.name != pending.ref.name  # a folder of its own per save


def test_begin_refuses_negative_steps_and_generations(repo: CheckpointRepository) -> None:
    with pytest.raises(ValueError):
        repo.begin(-1)
    with pytest.raises(ValueError):
        repo.begin(1, -1)


# -- deleting ---------------------------------------------------------------------------------------------------------


class Recording:
    """A storage that records calls and can fail on ``delete_prefix``."""

    def __init__(self, inner: Storage, fail_delete_prefix: bool = False) -> None:
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


def test_delete_removes_the_manifest_first(storage: Storage) -> None:
    recording = Recording(storage)
    repo = CheckpointRepository(recording, clock=Clock())  # type: ignore[arg-type]
    keep = save(repo, 1)
    doomed = save(repo, 2)
    repo.delete(doomed)
    assert recording.calls[0] == ("delete", f"{doomed.key}/{MANIFEST_NAME}")
    assert ("delete_prefix", doomed.key) in recording.calls
    assert repo.folders() == [keep]
    assert repo.committed() == [keep]
    assert storage.find(doomed.key) == []


def test_delete_interrupted_after_the_manifest_leaves_no_checkpoint(storage: Storage) -> None:
    recording = Recording(storage, fail_delete_prefix=True)
    repo = CheckpointRepository(recording, clock=Clock())  # type: ignore[arg-type]
    keep = save(repo, 1)
    doomed = save(repo, 2)
    with pytest.raises(StorageError):
        repo.delete(doomed)
    # The blobs are still there, but the checkpoint no longer exists for readers.
    assert storage.exists(f"{doomed.key}/model.bin")
    assert repo.committed() == [keep]


# -- LocalStorage -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["..", "../x", "a/../b", "a/..", "/etc/passwd", "/abs", "a/./b", ".", "a\\..\\b", "a\0b"]
)
def test_path_of_refuses_keys_that_could_escape(local: LocalStorage, key: str) -> None:
    with pytest.raises(PermanentStorageError):
        local.path_of(key)


def test_path_of_maps_keys_inside_the_root(local: LocalStorage) -> None:
    assert local.path_of("a/b") == local.root_path / "a" / "b"
    assert local.path_of("a//b/") == local.root_path / "a" / "b"
    assert local.path_of("..x/y..") == local.root_path / "..x" / "y.."


def test_escaping_keys_are_refused_by_every_operation(local: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    key = "../outside.txt"
    local.write_atomic("inside.txt", b"x")
    for call in (
        lambda: local.read(key),
        lambda: local.write_atomic(key, b"overwritten"),
        lambda: local.write_stream(key, lambda: [b"overwritten"]),
        lambda: local.delete(key),
        lambda: local.size(key),
    ):
        with pytest.raises(PermanentStorageError):
            call()
    assert outside.read_text() == "secret"


def test_write_atomic_leaves_no_temp_file(local: LocalStorage) -> None:
    local.write_atomic("dir/target.json", b"first")
    local.write_atomic("dir/target.json", b"second, longer")
    assert os.listdir(local.path_of("dir")) == ["target.json"]
    assert local.read("dir/target.json") == b"second, longer"


def test_write_atomic_failure_leaves_no_temp_file_and_keeps_the_target(local: LocalStorage) -> None:
    local.write_atomic("dir/sub/inner.txt", b"x")  # "dir/sub" is a folder: replacing it with a file must fail
    with pytest.raises(StorageError):
        local.write_atomic("dir/sub", b"data")
    assert sorted(os.listdir(local.path_of("dir"))) == ["sub"]
    assert local.read("dir/sub/inner.txt") == b"x"


def test_storage_basics(storage: Storage) -> None:
    assert storage.write_stream("p/blob", lambda: [b"ab", bytearray(b"cd"), memoryview(b"efgh")[1:]]) == 7
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
    assert storage.find("") == []
    path = local_path(storage, "p")
    assert path is None or not path.exists()


# -- blobs read as parallel parts, checksummed in order ---------------------------------------------


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    """Parts of 1000 bytes, 3 in flight: BLOBS' model.bin (10244 bytes) is read as 11 ranged reads."""
    monkeypatch.setattr(parallel_read, "PART", 1000)
    monkeypatch.setattr(parallel_read, "READERS", 3)
    return 1000


def test_part_bounds_cover_the_blob_once() -> None:
    assert part_bounds(0, 10) == [(0, 0)]
    assert part_bounds(10, 10) == [(0, 10)]
    assert part_bounds(25, 10) == [(0, 10), (10, 10), (20, 5)]


def test_a_blob_read_in_parts_loads_back_and_verifies(repo: CheckpointRepository, small_parts: int) -> None:
    ref = save(repo, 3)
    loaded = repo.load(ref)
    assert {name: bytes(data) for name, data in loaded.blobs.items()} == BLOBS
    assert repo.verify(ref) == loaded.manifest


@pytest.mark.parametrize("damage", [_truncate, _flip, _grow, _delete_blob], ids=lambda f: f.__name__.strip("_"))
def test_damage_in_any_part_is_detected(
    repo: CheckpointRepository, storage: Storage, small_parts: int, damage: Any
) -> None:
    ref = save(repo, 4)
    damage(storage, ref)
    with pytest.raises(CorruptCheckpointError):
        repo.load(ref)
    with pytest.raises(CorruptCheckpointError):
        repo.verify(ref)


@pytest.mark.parametrize("where", [0, 999, 1000, 5500, 10243])
def test_a_flipped_byte_in_any_part_fails_the_checksum(
    repo: CheckpointRepository, storage: Storage, small_parts: int, where: int
) -> None:
    ref = save(repo, 4)
    key = f"{ref.key}/model.bin"
    data = bytearray(storage.read(key))
    data[where] ^= 0x80
    storage.write_atomic(key, bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"model\.bin fails its checksum"):
        repo.load(ref)


class _Shrinking(StorageWrapper):
    """Says a blob has the size the manifest recorded, but ``cut`` bytes of it are gone (as if truncated between
    the size check and the read)."""

    def __init__(self, inner: Storage, cut: int) -> None:
        super().__init__(inner)
        self.cut = cut

    def size(self, key: str) -> int:
        return self.inner.size(key) + (self.cut if key.endswith("model.bin") else 0)


def test_a_blob_that_ends_inside_a_part_says_where(local: LocalStorage, small_parts: int) -> None:
    ref = save(CheckpointRepository(local, clock=Clock()), 5)
    key = f"{ref.key}/model.bin"
    local.write_atomic(key, local.read(key)[:4321])
    repo = CheckpointRepository(_Shrinking(local, 10244 - 4321), clock=Clock())
    with pytest.raises(CorruptCheckpointError, match="ended after 4321 of 10244 bytes"):
        repo.load(ref)


class _FailOnce(StorageWrapper):
    """The first read at each offset in ``offsets`` scribbles over its part of the buffer, then fails transiently."""

    def __init__(self, inner: Storage, offsets: set[int]) -> None:
        super().__init__(inner)
        self.offsets = set(offsets)
        self.failed: list[int] = []
        self.lock = threading.Lock()

    def read_into(self, key: str, buffer: bytearray | memoryview, progress: Any = None, *, offset: int = 0) -> int:
        with self.lock:
            fail = key.endswith("model.bin") and offset in self.offsets
            self.offsets.discard(offset) if fail else None
        if fail:
            memoryview(buffer)[:] = b"\xee" * memoryview(buffer).nbytes
            self.failed.append(offset)
            raise TransientStorageError(f"connection reset reading {key} at {offset}")
        return self.inner.read_into(key, buffer, progress, offset=offset)


def test_a_failed_part_is_retried_alone_and_leaves_nothing_in_the_digest(local: LocalStorage, small_parts: int) -> None:
    ref = save(CheckpointRepository(local, clock=Clock()), 6)
    flaky = _FailOnce(local, {0, 3000, 10000})
    reads: list[int] = []
    counting = _Counting(flaky, reads)
    retrying = RetryingStorage(counting, StorageRetry(budget_s=60, initial=0.0), sleep=lambda s: None)
    loaded = CheckpointRepository(retrying, clock=Clock()).load(ref)
    assert {name: bytes(data) for name, data in loaded.blobs.items()} == BLOBS
    assert sorted(flaky.failed) == [0, 3000, 10000]
    assert len(reads) == 11 + 3  # every part once, and the three that failed once more


class _Counting(StorageWrapper):
    def __init__(self, inner: Storage, reads: list[int]) -> None:
        super().__init__(inner)
        self.reads = reads

    def read_into(self, key: str, buffer: bytearray | memoryview, progress: Any = None, *, offset: int = 0) -> int:
        if key.endswith("model.bin"):
            self.reads.append(offset)
        return self.inner.read_into(key, buffer, progress, offset=offset)


def test_closing_the_reads_early_waits_for_the_reads_in_flight(local: LocalStorage, small_parts: int) -> None:
    """After the caller stops (an error in an earlier blob), no reader writes into a buffer any more."""
    ref = save(CheckpointRepository(local, clock=Clock()), 7)
    blocked, release = threading.Event(), threading.Event()
    began: list[int] = []
    ended: list[int] = []

    class Held(StorageWrapper):
        def read_into(self, key: str, buffer: bytearray | memoryview, progress: Any = None, *, offset: int = 0) -> int:
            if key.endswith("second"):
                began.append(offset)
                blocked.set()
                release.wait()
            n = self.inner.read_into(f"{ref.key}/model.bin", buffer, progress, offset=offset)
            ended.append(offset) if key.endswith("second") else None
            return n

    first, second = memoryview(bytearray(10244)), memoryview(bytearray(10244))
    reads = parallel_read.read_blobs(Held(local), [("first", [first]), ("second", [second])])
    assert next(reads) == (10244, _digest(BLOBS["model.bin"]))
    assert blocked.wait(PROCESS_HANG_S)  # reads of the second blob are in flight
    threading.Timer(0.1, release.set).start()  # most likely while close() waits; either way nothing may outlive it
    reads.close()
    assert sorted(began) == sorted(ended) and len(began) <= 11
    assert not [t for t in threading.enumerate() if t.name.startswith("spotsafe-read")]


def _digest(data: bytes | bytearray) -> str:
    hasher = new_hasher()
    hasher.update(data)
    return str(hasher.hexdigest())
