"""Every backend keeps the same promises: the Storage methods, the commit protocol, the latest hint, retention.

Most tests run twice through the ``run_url`` fixture: on a local folder and on a real
S3 server (moto's, in a subprocess on 127.0.0.1).
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import spotsafe
from spotsafe.engine.persist import persist
from spotsafe.engine.reader import load_newest_valid
from spotsafe.errors import ConfigError, PermanentStorageError, StorageError
from spotsafe.state.compare import differences
from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.base import BlobNotFoundError, Storage
from spotsafe.storage.fsspec_store import FsspecStorage, _abandon
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import MANIFEST_NAME
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CHECKPOINTS, LATEST, CheckpointRef, CheckpointRepository
from spotsafe.storage.retry import RetryingStorage

from .conftest import AZURITE_ACCOUNT, ObjectStore
from .http_faults import FaultProxy

MiB = 2**20


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def is_object_store(url: str) -> bool:
    """S3, GCS or Azure: a single PUT is atomic, an unfinished multipart upload is invisible."""
    return "://" in url


def backend(url: str, block_size: int | None = None) -> Storage:
    """The bare backend (no retries), optionally with a small upload part size."""
    storage = open_storage(url, retry=None)
    if block_size is not None and type(storage) is FsspecStorage:
        storage = FsspecStorage(storage.fs, storage.root, url, block_size=block_size)
    return storage


def training_state(seed: int) -> dict[str, Any]:
    """A real model and optimizer (with Adam moments) after one step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def save(repo: CheckpointRepository, step: int, generation: int = 1) -> CheckpointRef:
    ref, _ = persist(
        repo, Snapshot.capture(step, training_state(step)), metadata={}, writer={"test": True}, generation=generation
    )
    return ref


def assert_bit_equal(a: Any, b: Any) -> None:
    assert differences(a, b) == []


# -- the Storage methods ----------------------------------------------------------------------------------------------


def test_open_storage_gives_a_retrying_storage(run_url: str) -> None:
    storage = open_storage(run_url)
    assert isinstance(storage, RetryingStorage)
    assert isinstance(storage, Storage)
    assert isinstance(storage.inner, FsspecStorage if is_object_store(run_url) else LocalStorage)
    assert storage.url == run_url
    assert open_storage(run_url, retry=None).url == run_url


def test_write_stream_from_many_chunks_reads_back_exactly(run_url: str) -> None:
    storage = open_storage(run_url)
    data = os.urandom(300_001)
    cuts = [0, 1, 2, 1000, 4096, 65_536, 65_537, 200_000, 300_000, 300_001]
    chunks: list[Any] = []
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        piece = data[a:b]
        chunks.append([bytes, bytearray, memoryview][i % 3](piece))
    chunks.insert(3, b"")  # an empty chunk is allowed
    chunks.insert(5, memoryview(b""))
    assert storage.write_stream("blobs/one", lambda: iter(chunks)) == len(data)
    assert storage.read("blobs/one") == data
    assert storage.size("blobs/one") == len(data)
    # A memoryview over a non-byte array counts bytes, not elements.
    floats = torch.arange(1000, dtype=torch.float64)
    view = memoryview(floats.numpy())
    assert storage.write_stream("blobs/floats", lambda: [view]) == 8000
    assert storage.read("blobs/floats") == floats.numpy().tobytes()


def test_write_stream_replaces_an_existing_object(run_url: str) -> None:
    storage = open_storage(run_url)
    storage.write_stream("k", lambda: [b"a much longer first version"])
    storage.write_stream("k", lambda: [b"short"])
    assert storage.read("k") == b"short"
    storage.write_atomic("k", b"atomic")
    assert storage.read("k") == b"atomic"


def test_a_40_mb_object_in_small_parts_reads_back_byte_exact(run_url: str) -> None:
    storage = backend(run_url, block_size=5 * MiB)
    data = os.urandom(40 * MiB)
    view = memoryview(data)
    step = 3 * MiB + 17  # chunks that straddle the 5 MiB part boundaries
    written = storage.write_stream("big/blob.bin", lambda: (view[i : i + step] for i in range(0, len(data), step)))
    assert written == len(data)
    assert storage.size("big/blob.bin") == len(data)
    assert storage.read("big/blob.bin") == data
    buffer = bytearray(len(data))
    assert storage.read_into("big/blob.bin", buffer) == len(data)
    assert buffer == data
    if is_s3(run_url):
        # The object was uploaded in parts: S3 marks a multipart object's ETag with "-<parts>".
        assert isinstance(storage, FsspecStorage)
        etag = storage.fs.info(f"{storage.root}/big/blob.bin")["ETag"].strip('"')
        parts = int(etag.rsplit("-", 1)[1]) if "-" in etag else 1
        assert parts >= 7, etag


def test_a_large_blob_goes_up_in_parts_no_larger_than_the_block_size(object_store: ObjectStore) -> None:
    """Every request that carries data is at most one block: memory stays bounded (S3 parts, GCS resumable-upload
    chunks, Azure staged blocks), and the object reads back byte-exact."""
    proxy = FaultProxy(object_store.endpoint)
    try:
        url = object_store.url(object_store.new_bucket())
        storage = open_storage(url, object_store.options(proxy.url), retry=None)
        assert isinstance(storage, FsspecStorage)
        storage = FsspecStorage(storage.fs, storage.root, url, block_size=5 * MiB, bucket=storage.bucket)
        data = os.urandom(12 * MiB + 12345)
        view = memoryview(data)
        step = MiB + 17
        proxy.clear()
        assert storage.write_stream("big/blob.bin", lambda: (view[i : i + step] for i in range(0, len(data), step)))
        uploads = [s.body_bytes for s in proxy.seen if s.body_bytes]
        assert len([n for n in uploads if n >= MiB]) >= 3, uploads
        assert max(uploads) <= 5 * MiB + 64 * 1024, uploads  # a part, plus a multipart envelope at most
        assert sum(uploads) >= len(data)
        assert storage.read("big/blob.bin") == data
    finally:
        proxy.close()


def test_a_failing_source_leaves_no_object_on_s3(run_url: str) -> None:
    storage = backend(run_url, block_size=5 * MiB)

    def source() -> Iterator[bytes]:
        for _ in range(12):  # more than two parts already uploaded when it fails
            yield b"y" * MiB
        raise RuntimeError("the producer failed")

    try:
        storage.write_stream("w/bad", source)
        pytest.fail("the source's error did not come through")
    except RuntimeError as err:  # leaving this block frees the error, its frames and the abandoned file object
        assert "the producer failed" in str(err)
    if is_object_store(run_url):
        # The multipart upload (GCS: resumable upload; Azure: staged blocks) was abandoned, not completed with half
        # the object, not even when the file object is collected (gcsfs closes collected files on a thread).
        gc.collect()
        _wait_for_gcsfs_deferred_closes()
        assert not storage.exists("w/bad")
        assert storage.find("") == []


def test_an_upload_that_cannot_be_cancelled_is_closed_without_completing() -> None:
    """gcp-storage-emulator answers 501 to cancelling a resumable upload (a network fault can do the same to any
    store): the file object is marked closed anyway, or collecting it would upload the rest and complete it."""

    class Upload:
        closed = False
        completed = False

        def discard(self) -> None:
            raise OSError("the service would not cancel the upload")

        def close(self) -> None:
            self.completed = True

    upload = Upload()
    _abandon(upload)
    assert upload.closed and not upload.completed


def _wait_for_gcsfs_deferred_closes() -> None:
    """Wait until gcsfs's background thread has closed every file that was collected before now (FIFO queue)."""
    core = sys.modules.get("gcsfs.core")
    work = getattr(core, "_deferred_close_queue", None)
    if work is None:
        return
    done = threading.Event()
    work.put(done.set)
    assert done.wait(120), "gcsfs's deferred-close thread is stuck"


def test_a_source_error_propagates_unchanged(request: pytest.FixtureRequest, run_url: str) -> None:
    storage = backend(run_url)

    def source() -> Iterator[bytes]:
        yield b"x" * 100
        raise KeyError("not a storage problem")

    with pytest.raises(KeyError):
        storage.write_stream("w/bad", source)


def test_an_abandoned_upload_leaves_no_noise_when_collected(
    request: pytest.FixtureRequest, run_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc.collect()  # leftovers of earlier tests are not this test's business
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    storage = backend(run_url, block_size=5 * MiB)

    def source() -> Iterator[bytes]:
        yield b"y" * (6 * MiB)
        raise RuntimeError("the producer failed")

    with pytest.raises(Exception, match="the producer failed") as info:
        storage.write_stream("w/bad", source)
    del info  # the traceback holds the upload's frames
    gc.collect()
    assert unraisable == []


def test_read_into_size_exists(run_url: str) -> None:
    storage = open_storage(run_url)
    storage.write_atomic("d/obj", b"0123456789")
    exact = bytearray(10)
    assert storage.read_into("d/obj", exact) == 10 and exact == b"0123456789"
    bigger = bytearray(b"\xff" * 16)
    assert storage.read_into("d/obj", bigger) == 10 and bigger == b"0123456789" + b"\xff" * 6
    smaller = bytearray(4)
    assert storage.read_into("d/obj", smaller) == 4 and smaller == b"0123"
    view = memoryview(bytearray(20))[5:15]
    assert storage.read_into("d/obj", view) == 10 and bytes(view) == b"0123456789"
    middle = bytearray(3)  # a ranged read (a sharded checkpoint reads one chunk of a blob)
    assert storage.read_into("d/obj", middle, offset=4) == 3 and middle == b"456"
    tail = bytearray(5)
    assert storage.read_into("d/obj", tail, offset=8) == 2 and tail[:2] == b"89"
    assert storage.size("d/obj") == 10
    storage.write_atomic("d/empty", b"")
    assert storage.size("d/empty") == 0 and storage.read("d/empty") == b""
    assert storage.read_into("d/empty", bytearray(3)) == 0
    assert storage.exists("d/obj") and storage.exists("d/empty")
    assert not storage.exists("d/none") and not storage.exists("d")  # a folder is not an object
    for call in (
        lambda: storage.read("d/none"),
        lambda: storage.size("d/none"),
        lambda: storage.read_into("d/none", bytearray(1)),
    ):
        with pytest.raises(BlobNotFoundError):
            call()


def test_listing(run_url: str) -> None:
    storage = open_storage(run_url)
    for key in ["a/x", "a/y", "a/b/c/d", "a/b/e", "ab/z", "abc", "top"]:
        storage.write_atomic(key, key.encode())
    assert storage.list_dirs("") == ["a", "ab"]
    assert storage.list_files("") == ["abc", "top"]
    assert storage.list_dirs("a") == ["b"]
    assert storage.list_files("a") == ["x", "y"]
    assert storage.list_files("a/b") == ["e"]
    assert storage.list_dirs("a/b") == ["c"]
    assert storage.list_dirs("missing") == [] and storage.list_files("missing") == []
    # find: every key at any depth, relative to the run, and "a" is a folder, not a name prefix.
    assert storage.find("") == ["a/b/c/d", "a/b/e", "a/x", "a/y", "ab/z", "abc", "top"]
    assert storage.find("a") == ["a/b/c/d", "a/b/e", "a/x", "a/y"]
    assert storage.find("a/b") == ["a/b/c/d", "a/b/e"]
    assert storage.find("missing") == []
    assert all(storage.read(key) == key.encode() for key in storage.find(""))


def test_delete_is_idempotent_and_delete_prefix_is_confined(run_url: str) -> None:
    storage = open_storage(run_url)
    for key in ["a/x", "a/b/c", "ab/z", "abc", "keep"]:
        storage.write_atomic(key, b"1")
    storage.delete("keep")
    storage.delete("keep")
    storage.delete("never/existed")
    assert not storage.exists("keep")
    storage.delete_prefix("a")
    assert storage.find("") == ["ab/z", "abc"]  # siblings that share the name prefix survive
    storage.delete_prefix("a")  # again: nothing there, not an error
    storage.delete_prefix("nothing/here")
    for root in ("", "/", "//", "./"):
        with pytest.raises(PermanentStorageError):
            storage.delete_prefix(root)
    assert storage.find("") == ["ab/z", "abc"]


BAD_KEYS = ["..", "../x", "a/../b", "a/..", "../../etc/passwd", "/abs", "a/./b", ".", "a\\..\\b", "a\0b"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_that_could_escape_are_refused_everywhere(run_url: str, key: str) -> None:
    storage = open_storage(run_url)
    storage.write_atomic("inside", b"x")
    calls = {
        "write_stream": lambda: storage.write_stream(key, lambda: [b"x"]),
        "write_atomic": lambda: storage.write_atomic(key, b"x"),
        "read": lambda: storage.read(key),
        "read_into": lambda: storage.read_into(key, bytearray(1)),
        "size": lambda: storage.size(key),
        "exists": lambda: storage.exists(key),
        "list_dirs": lambda: storage.list_dirs(key),
        "list_files": lambda: storage.list_files(key),
        "find": lambda: storage.find(key),
        "delete": lambda: storage.delete(key),
        "delete_prefix": lambda: storage.delete_prefix(key),
    }
    for name, call in calls.items():
        with pytest.raises(PermanentStorageError, match="refusing"):
            call()
            pytest.fail(f"{name}({key!r}) was not refused")
    assert storage.find("") == ["inside"]


def test_sync_prefix_refuses_escaping_keys_too(request: pytest.FixtureRequest, run_url: str) -> None:
    with pytest.raises(PermanentStorageError):
        open_storage(run_url).sync_prefix("../x")


def test_escaping_keys_cannot_touch_a_sibling_run(run_url: str) -> None:
    storage = open_storage(run_url)
    sibling = open_storage(run_url + "-sibling")
    sibling.write_atomic("secret", b"theirs")
    with pytest.raises(PermanentStorageError):
        storage.write_atomic("../run-sibling/secret", b"ours")
    with pytest.raises(PermanentStorageError):
        storage.delete_prefix("../run-sibling")
    assert sibling.read("secret") == b"theirs"


# -- the commit protocol ----------------------------------------------------------------------------------------------


def test_a_checkpoint_without_manifest_is_invisible(run_url: str) -> None:
    repo = CheckpointRepository(open_storage(run_url))
    good = save(repo, 10)
    pending = repo.begin(20, 1)
    for name, source in Snapshot.capture(20, training_state(20)).blobs():
        pending.write_blob(name, source)
    assert repo.committed() == [good]
    assert repo.candidates() == [good]
    assert repo.folders() == [pending.ref, good]
    restored = load_newest_valid(repo)
    assert restored is not None and restored.step == 10


class Crash(BaseException):
    """The process dies here: nothing after it runs, not even cleanup."""


class Crashing:
    """Delegates to ``inner`` until the crash point; then every call dies (the process is gone)."""

    def __init__(self, inner: Storage, *, after_bytes: int | None = None, on_manifest: bool = False) -> None:
        self.inner = inner
        self.after_bytes = after_bytes
        self.on_manifest = on_manifest
        self.written = 0
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if self.dead and callable(attr):
            raise Crash
        return attr

    def write_stream(self, key: str, source: Any) -> int:
        if self.dead:
            raise Crash

        def counted() -> Iterator[Any]:
            for chunk in source():
                n = memoryview(chunk).nbytes
                if self.after_bytes is not None and self.written + n > self.after_bytes:
                    self.dead = True
                    yield memoryview(chunk)[: self.after_bytes - self.written]
                    raise Crash
                self.written += n
                yield chunk

        return self.inner.write_stream(key, counted)

    def write_atomic(self, key: str, data: bytes) -> None:
        if self.dead or (self.on_manifest and key.endswith(MANIFEST_NAME)):
            self.dead = True
            raise Crash
        self.inner.write_atomic(key, data)

    def delete_prefix(self, prefix: str) -> None:
        if self.dead:
            raise Crash
        self.inner.delete_prefix(prefix)

    def delete(self, key: str) -> None:
        if self.dead:
            raise Crash
        self.inner.delete(key)


@pytest.mark.parametrize("where", ["mid-blob", "before-manifest"])
def test_a_crash_during_a_save_leaves_nothing_visible(run_url: str, where: str) -> None:
    storage = open_storage(run_url)
    repo = CheckpointRepository(storage)
    good = save(repo, 10)
    crashing = Crashing(storage, after_bytes=1000 if where == "mid-blob" else None, on_manifest=where != "mid-blob")
    with pytest.raises(Crash):
        save(CheckpointRepository(crashing), 20)  # type: ignore[arg-type]
    assert crashing.dead
    # What a restarted process sees:
    fresh = CheckpointRepository(open_storage(run_url))
    assert fresh.committed() == [good]
    assert fresh.candidates() == [good]
    restored = load_newest_valid(fresh)
    assert restored is not None and restored.checkpoint.ref == good
    partial = [ref for ref in fresh.folders() if ref != good]
    if where == "before-manifest" or not is_object_store(run_url):
        assert [ref.step for ref in partial] == [20]  # its blobs are there; it is still not a checkpoint
    assert fresh.remove_leftovers() == [ref.key for ref in partial]
    assert fresh.folders() == [good]


def test_a_failed_save_cleans_up_after_itself(run_url: str) -> None:
    storage = open_storage(run_url)
    repo = CheckpointRepository(storage)
    good = save(repo, 10)

    class Refusing:
        def __init__(self, inner: Storage) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def write_atomic(self, key: str, data: bytes) -> None:
            raise PermanentStorageError("simulated: the manifest cannot be written")

    with pytest.raises(PermanentStorageError, match="simulated"):
        save(CheckpointRepository(Refusing(storage)), 20)  # type: ignore[arg-type]
    assert repo.committed() == [good]
    assert repo.folders() == [good]  # persist aborted: the blobs are gone too


# -- the latest.json hint ---------------------------------------------------------------------------------------------


@pytest.fixture
def three(run_url: str) -> tuple[CheckpointRepository, list[CheckpointRef]]:
    repo = CheckpointRepository(open_storage(run_url))
    refs = [save(repo, step) for step in (10, 20, 30)]
    return repo, refs


def _stale(repo: CheckpointRepository, refs: list[CheckpointRef]) -> None:
    repo.write_latest(refs[0])


def _missing(repo: CheckpointRepository, refs: list[CheckpointRef]) -> None:
    repo.storage.delete(LATEST)


def _garbage(repo: CheckpointRepository, refs: list[CheckpointRef]) -> None:
    repo.storage.write_atomic(LATEST, b"\x00\xff{{{ not json")


def _not_an_object(repo: CheckpointRepository, refs: list[CheckpointRef]) -> None:
    repo.storage.write_atomic(LATEST, b'["checkpoint"]')


def _bad_name(repo: CheckpointRepository, refs: list[CheckpointRef]) -> None:
    repo.storage.write_atomic(LATEST, json.dumps({"checkpoint": "../../elsewhere"}).encode())


def _nonexistent(repo: CheckpointRepository, refs: list[CheckpointRef]) -> None:
    # A higher generation than anything real: if it were trusted, it would win.
    ghost = CheckpointRef.parse("g000009-step-000000000999-1700000000000-abcd")
    assert ghost is not None
    repo.write_latest(ghost)


def _uncommitted(repo: CheckpointRepository, refs: list[CheckpointRef]) -> None:
    pending = repo.begin(999, 9)
    pending.write_blob("model.bin", lambda: [b"half"])
    repo.write_latest(pending.ref)


@pytest.mark.parametrize(
    "hint",
    [_stale, _missing, _garbage, _not_an_object, _bad_name, _nonexistent, _uncommitted],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_bad_latest_hint_does_not_change_what_is_restored(
    three: tuple[CheckpointRepository, list[CheckpointRef]], hint: Any
) -> None:
    repo, refs = three
    hint(repo, refs)
    assert repo.candidates() == repo.committed() == refs[::-1]
    restored = load_newest_valid(repo)
    assert restored is not None and restored.checkpoint.ref == refs[-1]


def test_latest_hint_round_trip(three: tuple[CheckpointRepository, list[CheckpointRef]]) -> None:
    repo, refs = three
    assert repo.read_latest() is None
    repo.write_latest(refs[1])
    assert repo.read_latest() == refs[1]
    doc = json.loads(repo.storage.read(LATEST))
    assert (doc["checkpoint"], doc["step"], doc["generation"]) == (refs[1].name, 20, 1)


class Hiding:
    """A listing that lags behind a write: ``find`` and ``list_dirs`` miss one checkpoint folder."""

    def __init__(self, inner: Storage, hidden: str) -> None:
        self.inner = inner
        self.hidden = hidden

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def find(self, prefix: str) -> list[str]:
        return [k for k in self.inner.find(prefix) if self.hidden not in k.split("/")]

    def list_dirs(self, prefix: str) -> list[str]:
        return [n for n in self.inner.list_dirs(prefix) if n != self.hidden]


def test_the_hint_adds_a_checkpoint_the_listing_missed(three: tuple[CheckpointRepository, list[CheckpointRef]]) -> None:
    repo, refs = three
    repo.write_latest(refs[-1])
    lagging = CheckpointRepository(Hiding(repo.storage, refs[-1].name))  # type: ignore[arg-type]
    assert lagging.committed() == refs[1::-1]  # the listing really misses it
    assert lagging.candidates() == refs[::-1]


def test_restore_uses_the_hint_when_the_listing_missed_the_newest(
    three: tuple[CheckpointRepository, list[CheckpointRef]],
) -> None:
    repo, refs = three
    repo.write_latest(refs[-1])
    lagging = CheckpointRepository(Hiding(repo.storage, refs[-1].name))  # type: ignore[arg-type]
    restored = load_newest_valid(lagging)
    assert restored is not None and restored.checkpoint.ref == refs[-1]


# -- a missing bucket -------------------------------------------------------------------------------------------------


def test_listing_a_missing_bucket_fails(object_store: ObjectStore) -> None:
    repo = CheckpointRepository(open_storage(object_store.url(f"no-such-bucket-{secrets.token_hex(4)}"), retry=None))
    with pytest.raises(PermanentStorageError, match="bucket does not exist"):
        repo.committed()


# Words that error messages contain: a bucket or folder named after them must not change what an error means.
KEYWORDS = [
    "bucket",
    "my-bucket",
    "nosuchbucket",
    "the-specified-bucket-does-not-exist",
    "containernotfound",
    "nosuchkey-not-found-404",
    "accessdenied-permission-denied",
    "expiredtoken-invalidaccesskeyid-credentials",
    "slowdown-throttling-timeout-503",
    "internalerror-serviceunavailable",
    "no-space-left-on-device",
]


@pytest.mark.parametrize("bucket", KEYWORDS)
def test_a_run_in_a_bucket_named_like_an_error_works(object_store: ObjectStore, bucket: str) -> None:
    """A fresh run, a save and a resume, in a bucket whose name holds words of error messages (the real server)."""
    _save_then_resume(object_store.url(object_store.new_bucket(bucket), "probe"))


@pytest.mark.parametrize(
    "folder",
    [
        "The specified bucket does not exist/NoSuchBucket",
        "bucket/AccessDenied/ContainerNotFound",
        "SlowDown 503/RequestTimeout/InternalError",
        "NoSuchKey/404 not found/ExpiredToken",
    ],
)
def test_a_run_in_a_folder_named_like_an_error_works(object_store: ObjectStore, folder: str) -> None:
    _save_then_resume(object_store.url(object_store.new_bucket(), folder))


def _save_then_resume(url: str) -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    with spotsafe.Checkpointer(url, model=model, handle_signals=False) as ckpt:
        assert ckpt.restore() == 0
        ckpt.step_done()
        ckpt.save()
        ckpt.wait()
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(1)
    other = nn.Linear(2, 2)
    with spotsafe.Checkpointer(url, model=other, handle_signals=False) as ckpt:
        assert ckpt.restore() == 1
        assert not differences(saved, dict(other.state_dict()))


@pytest.mark.parametrize("bucket", ["plain", "my-bucket", "containernotfound-404", "accessdenied-credentials"])
def test_a_missing_bucket_is_a_clear_error_at_construction(object_store: ObjectStore, bucket: str) -> None:
    url = object_store.url(f"{bucket}-{secrets.token_hex(4)}")
    with pytest.raises(PermanentStorageError, match="the bucket does not exist; create it or fix the URL"):
        spotsafe.Checkpointer(url, model=nn.Linear(2, 2), handle_signals=False)


class _NoCodes:
    """A real s3fs file system whose errors carry no service code (as some backends raise them)."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except FileNotFoundError as err:
                bare = FileNotFoundError(str(err))
            raise bare  # outside the handler: no __context__ either

        return call


@pytest.mark.parametrize("bucket", ["my-bucket", "plain"])
def test_without_codes_a_missing_bucket_is_found_by_asking(s3_server: Any, bucket: str) -> None:
    """Where the backend says only "not found", a write asks whether the bucket exists, whatever its name."""
    name = f"{bucket}-{secrets.token_hex(3)}"
    real = open_storage(f"s3://{name}/run", retry=None)
    assert isinstance(real, FsspecStorage)
    storage = FsspecStorage(_NoCodes(real.fs), real.root, f"s3://{name}/run", bucket=name)
    with pytest.raises(PermanentStorageError, match="the bucket does not exist") as info:
        storage.write_atomic("writers/claim.json", b"{}")
    assert not isinstance(info.value, BlobNotFoundError)
    # A listing or a read that finds nothing asks too (once: gcsfs says "not found" this way for every 404).
    for call in (lambda: storage.list_files(""), lambda: storage.exists("latest.json"), lambda: storage.read("x")):
        with pytest.raises(PermanentStorageError, match="the bucket does not exist") as info:
            call()
        assert not isinstance(info.value, BlobNotFoundError)
    real.fs.mkdir(name)
    storage.write_atomic("writers/claim.json", b"{}")  # the same name, once the bucket exists
    assert storage.read("writers/claim.json") == b"{}"


# -- retention through the Checkpointer -------------------------------------------------------------------------------


def test_retention_keeps_only_the_newest(run_url: str, job_factory: Callable[..., Any]) -> None:
    job = job_factory(run_url, keep=2)
    job.train(35)
    job.ckpt.close()
    repo = CheckpointRepository(open_storage(run_url))
    committed = repo.committed()
    assert [ref.step for ref in committed] == [35, 28]
    assert repo.folders() == committed  # no blobs of deleted checkpoints left behind
    for ref in committed:
        repo.verify(ref)
    assert {key.split("/")[1] for key in repo.storage.find(CHECKPOINTS)} == {ref.name for ref in committed}


# -- URLs -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "extra", "package"),
    [("s3://b/x", "s3", "s3fs"), ("gs://b/x", "gcs", "gcsfs"), ("az://c/x", "azure", "adlfs")],
)
def test_a_backend_that_is_not_installed_says_what_to_install(
    url: str, extra: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = sys.modules["fsspec.registry"]._registry  # ``fsspec.registry`` is a read-only view of it
    # As if it were not installed (the dev extra installs all three): importing it fails, fsspec has not loaded it.
    monkeypatch.setitem(sys.modules, package, None)
    for protocol in (url.split("://")[0], extra):
        monkeypatch.delitem(loaded, protocol, raising=False)
    with pytest.raises(ConfigError) as info:
        open_storage(url)
    assert f"pip install 'spotsafe[{extra}]'" in str(info.value)
    assert package in str(info.value)


@pytest.mark.parametrize("url", ["ftp://x", "ftp://user:hunter2@host/x", "http://example.com/x", "hdfs://nn/x"])
def test_unsupported_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_storage(url)
    assert "hunter2" not in str(info.value)
    if "@" not in url:
        assert "unsupported" in str(info.value)


@pytest.mark.parametrize("url", ["s3://bucketonly", "s3://bucketonly/", "s3://bucketonly//"])
def test_a_bucket_without_a_folder_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="folder") as info:
        open_storage(url)
    assert "s3://bucket/run-name" in str(info.value)


def test_azure_urls_name_the_container_as_az_or_as_abfs_with_the_account(azure_server: Any) -> None:
    """``az://container/path`` and ``abfs://container@account/path`` are the same place."""
    container = azure_server.new_container()
    short = open_storage(f"az://{container}/run")
    long = open_storage(f"abfs://{container}@{AZURITE_ACCOUNT}/run")
    assert long.url == f"abfs://{container}@{AZURITE_ACCOUNT}/run"  # a container is not a credential
    short.write_atomic("checkpoints/a", b"written via az://")
    assert long.read("checkpoints/a") == b"written via az://"
    assert long.find("") == ["checkpoints/a"] == short.find("")
    missing = open_storage(f"abfs://nothere-{secrets.token_hex(3)}@{AZURITE_ACCOUNT}/run", retry=None)
    with pytest.raises(PermanentStorageError, match="the bucket does not exist"):
        missing.list_dirs("")


def test_an_empty_location_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        open_storage("")


def test_memory_storage_end_to_end() -> None:
    url = f"memory://spotsafe-test-{secrets.token_hex(4)}/run"
    storage = open_storage(url)
    inner = storage.inner
    assert isinstance(inner, FsspecStorage)
    try:
        assert storage.url == url
        repo = CheckpointRepository(storage)
        saved = Snapshot.capture(5, training_state(5))
        first = save(repo, 3)
        ref, _ = persist(repo, saved, metadata={"m": 1}, writer={}, generation=1)
        repo.write_latest(ref)
        assert repo.committed() == [ref, first] == repo.candidates()
        assert repo.read_latest() == ref
        restored = load_newest_valid(repo)
        assert restored is not None and restored.step == 5
        assert_bit_equal(restored.components["model"], training_state(5)["model"])
        assert storage.list_dirs("") == [CHECKPOINTS]
        assert sorted(storage.list_files("")) == [LATEST]
        repo.delete(first)
        assert repo.committed() == [ref]
        assert all(key.startswith(f"{CHECKPOINTS}/{ref.name}/") or key == LATEST for key in storage.find(""))
        with pytest.raises(StorageError):
            storage.read("../escape")
    finally:
        inner.fs.rm(inner.root, recursive=True)
