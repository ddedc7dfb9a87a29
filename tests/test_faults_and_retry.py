"""Error translation, secrets in messages, the one retry mechanism, and saving through injected faults.

The unit tests drive :func:`translate` and :class:`RetryingStorage` with real exception
objects and a fake clock; the rest runs against real storage (a local folder and moto's
S3 server in a subprocess), including a second S3 server that enforces IAM credentials.
"""

from __future__ import annotations

import base64
import copy
import errno
import json
import os
import random
import secrets
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec.exceptions
import pytest
import s3fs.errors
import torch
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from torch import nn

from spotsafe.engine.persist import persist
from spotsafe.engine.reader import load_newest_valid
from spotsafe.errors import ConfigError, PermanentStorageError, StorageError, TransientStorageError
from spotsafe.state.compare import differences
from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.base import BlobNotFoundError, Storage
from spotsafe.storage.errors import redact, redact_url, translate
from spotsafe.storage.faults import FaultyStorage
from spotsafe.storage.fsspec_store import FsspecStorage
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.storage.retry import RetryingStorage, StorageRetry

from .conftest import AZURITE_KEY, ObjectStore, start_moto
from .http_faults import FaultProxy

WHERE = "s3://bucket/run"


def client_error(code: str, status: int, message: str = "the service says no", op: str = "PutObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}, op
    )


# -- translate --------------------------------------------------------------------------------------------------------

# (code, HTTP status, expected class, a phrase that tells the user what to fix)
SERVICE_ERRORS = [
    ("NoSuchBucket", 404, PermanentStorageError, "create it or fix the URL"),
    ("AccessDenied", 403, PermanentStorageError, "lack permission"),
    ("InvalidAccessKeyId", 403, PermanentStorageError, "AWS_SECRET_ACCESS_KEY"),
    ("SignatureDoesNotMatch", 403, PermanentStorageError, "AWS_SECRET_ACCESS_KEY"),
    ("ExpiredToken", 400, PermanentStorageError, "credentials"),
    ("SlowDown", 503, TransientStorageError, "SlowDown"),
    ("InternalError", 500, TransientStorageError, "InternalError"),
    ("ServiceUnavailable", 503, TransientStorageError, "ServiceUnavailable"),
    ("RequestTimeout", 400, TransientStorageError, "RequestTimeout"),
    ("NoSuchKey", 404, BlobNotFoundError, "not found"),
]


def _is_exactly(err: StorageError, cls: type[StorageError]) -> bool:
    if cls is PermanentStorageError:
        return isinstance(err, PermanentStorageError) and not isinstance(err, BlobNotFoundError)
    return isinstance(err, cls)


@pytest.mark.parametrize(("code", "status", "cls", "fix"), SERVICE_ERRORS, ids=[c[0] for c in SERVICE_ERRORS])
def test_translate_botocore_client_errors(code: str, status: int, cls: type[StorageError], fix: str) -> None:
    err = translate(client_error(code, status), "k/blob", WHERE)
    assert _is_exactly(err, cls), err
    assert fix in str(err)
    assert WHERE in str(err)


@pytest.mark.parametrize(("code", "status", "cls", "fix"), SERVICE_ERRORS, ids=[c[0] for c in SERVICE_ERRORS])
def test_translate_s3fs_translated_errors(code: str, status: int, cls: type[StorageError], fix: str) -> None:
    """What s3fs actually raises: an OSError subclass whose cause is the ClientError."""
    raised = s3fs.errors.translate_boto_error(client_error(code, status, message=f"{code} from the service"))
    assert isinstance(raised, OSError)
    err = translate(raised, "k/blob", WHERE)
    assert _is_exactly(err, cls), err
    assert fix in str(err) or fix.lower() in str(err).lower()


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("SlowDown", TransientStorageError),  # OSError(EBUSY)
        ("ServiceUnavailable", TransientStorageError),
        ("InternalError", TransientStorageError),  # OSError(EREMOTEIO)
        ("RequestTimeout", TransientStorageError),  # TimeoutError
        ("AccessDenied", PermanentStorageError),  # PermissionError
        # Without its code, "The specified bucket does not exist" is a bare FileNotFoundError: the message is not
        # read (it holds user data); the storage asks whether the bucket exists when a write says "not found".
        ("NoSuchBucket", BlobNotFoundError),
        ("NoSuchKey", BlobNotFoundError),
    ],
)
def test_translate_s3fs_errors_without_their_cause(code: str, cls: type[StorageError]) -> None:
    """The class and errno alone are enough when the ClientError is not attached."""
    message = "The specified bucket does not exist" if code == "NoSuchBucket" else f"{code} happened"
    raised = s3fs.errors.translate_boto_error(client_error(code, 500), message=message, set_cause=False)
    assert raised.__cause__ is None
    assert _is_exactly(translate(raised, "k", WHERE), cls)


@pytest.mark.parametrize(
    "message",
    ["my-bucket/probe/writers", "The specified bucket does not exist", "AccessDenied SlowDown NoSuchBucket 503"],
)
def test_the_words_of_a_message_never_decide_what_an_error_means(message: str) -> None:
    """Messages hold the user's paths and bucket names; only codes, types and errnos classify."""
    assert _is_exactly(translate(FileNotFoundError(message), "writers", "s3://my-bucket/probe"), BlobNotFoundError)
    assert _is_exactly(translate(OSError(errno.EBUSY, message), "k", WHERE), TransientStorageError)
    assert _is_exactly(translate(ValueError(message), "k", WHERE), PermanentStorageError)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (500, TransientStorageError),
        (502, TransientStorageError),
        (429, TransientStorageError),
        (400, PermanentStorageError),
        (409, PermanentStorageError),
    ],
)
def test_translate_unknown_codes_by_status(status: int, cls: type[StorageError]) -> None:
    assert _is_exactly(translate(client_error("SomethingNew", status), "k", WHERE), cls)


@pytest.mark.parametrize(
    "err",
    [
        TimeoutError("timed out"),
        fsspec.exceptions.FSTimeoutError(),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:9/b/k"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:9/b/k"),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k"),
        ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        BrokenPipeError(errno.EPIPE, "Broken pipe"),
        OSError(errno.ETIMEDOUT, "Connection timed out"),
        OSError(errno.EAGAIN, "Try again"),
        OSError(errno.EIO, "Input/output error"),
    ],
    ids=lambda e: type(e).__name__ + (f"-{errno.errorcode.get(e.errno, '')}" if isinstance(e, OSError) else ""),
)
def test_network_trouble_is_transient(err: BaseException) -> None:
    translated = translate(err, "k", WHERE)
    assert isinstance(translated, TransientStorageError), translated
    assert "k" in str(translated)


def test_aiohttp_connection_errors_are_transient() -> None:
    aiohttp = pytest.importorskip("aiohttp")
    assert isinstance(translate(aiohttp.ServerDisconnectedError(), "k", WHERE), TransientStorageError)
    assert isinstance(translate(aiohttp.ClientConnectionError("reset"), "k", WHERE), TransientStorageError)


@pytest.mark.parametrize(
    ("err", "fix"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "free space"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "free space"),
        (OSError(errno.EROFS, "Read-only file system"), "check the folder's owner and mode"),
        (NoCredentialsError(), "AWS_ACCESS_KEY_ID"),
        (ValueError("something odd"), "something odd"),
    ],
    ids=["ENOSPC", "EDQUOT", "EROFS", "NoCredentials", "other"],
)
def test_permanent_local_and_config_trouble(err: BaseException, fix: str) -> None:
    translated = translate(err, "k", "/runs/x")
    assert isinstance(translated, PermanentStorageError) and not isinstance(translated, BlobNotFoundError)
    assert fix in str(translated)


def test_local_permission_denied_says_to_check_the_folder() -> None:
    err = translate(PermissionError(errno.EACCES, "Permission denied", "/runs/x/blob"), "blob", "/runs/x")
    assert isinstance(err, PermanentStorageError)
    assert "owner and mode" in str(err)


def test_a_real_full_disk_is_permanent_and_says_so(tmp_path: Any) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    # /dev/full is reached through a link, which the generic fsspec backend follows (the local one refuses links).
    storage = FsspecStorage(fsspec.filesystem("file"), str(tmp_path / "run"), str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    os.symlink("/dev/full", tmp_path / "run" / "blob")
    with pytest.raises(PermanentStorageError, match="no space left"):
        storage.write_stream("blob", lambda: [b"x" * 100_000])


def test_translate_keeps_storage_errors_as_they_are() -> None:
    for err in (TransientStorageError("t"), PermanentStorageError("p"), BlobNotFoundError("b")):
        assert translate(err, "k", WHERE) is err


def test_translate_finds_the_service_code_behind_wrappers() -> None:
    try:
        try:
            raise client_error("SlowDown", 503)
        except ClientError as inner:
            raise RuntimeError("the library wrapped it") from inner
    except RuntimeError as outer:
        assert isinstance(translate(outer, "k", WHERE), TransientStorageError)


# What gcsfs and adlfs (azure-core) raise: real exception objects from those libraries.
GS = "gs://bucket/run"
AZ = "az://container/run"


def _azure_error(cls_name: str, status: int | None, code: Any = None) -> BaseException:
    exceptions = pytest.importorskip("azure.core.exceptions")
    err: Any = getattr(exceptions, cls_name)(message="the service says no (container/run/k)")
    err.status_code, err.error_code = status, code
    return err


def _wrapped(inner: BaseException, outer: Exception) -> Exception:
    """``outer`` raised from ``inner`` (as adlfs wraps a failed block upload in a RuntimeError)."""
    outer.__cause__ = inner
    return outer


def test_translate_gcsfs_errors() -> None:
    retry = pytest.importorskip("gcsfs.retry")
    requests = pytest.importorskip("requests")
    unauthorized = translate(retry.HttpError({"code": 401, "message": "Invalid Credentials"}), "k", GS)
    assert _is_exactly(unauthorized, PermanentStorageError)
    assert "credentials were rejected" in str(unauthorized) and "GOOGLE_APPLICATION_CREDENTIALS" in str(unauthorized)
    for status in (429, 500, 503, 504, 408):
        assert _is_exactly(translate(retry.HttpError({"code": status, "message": "x"}), "k", GS), TransientStorageError)
    assert _is_exactly(translate(retry.HttpError({"code": 409, "message": "x"}), "k", GS), PermanentStorageError)
    # gcsfs raises a 502 as requests' ProxyError, a 404 as a bare FileNotFoundError (the storage then asks whether
    # the bucket exists), a 403 as a bare OSError.
    assert _is_exactly(translate(requests.exceptions.ProxyError(), "k", GS), TransientStorageError)
    assert _is_exactly(translate(FileNotFoundError("b/bucket/o/run%2Fk"), "k", GS), BlobNotFoundError)
    assert _is_exactly(translate(OSError("Forbidden: b/bucket/o\nno"), "k", GS), PermanentStorageError)
    no_credentials = pytest.importorskip("google.auth.exceptions").DefaultCredentialsError("none found")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(translate(no_credentials, "k", GS))


def test_translate_azure_errors() -> None:
    blob = pytest.importorskip("azure.storage.blob")
    container_missing = _azure_error("ResourceNotFoundError", 404, blob.StorageErrorCode.CONTAINER_NOT_FOUND)
    assert "the bucket does not exist" in str(translate(container_missing, "k", AZ))
    # adlfs turns it into a FileNotFoundError raised while handling it: the code is still found.
    assert "the bucket does not exist" in str(translate(_wrapped(container_missing, FileNotFoundError()), "k", AZ))
    blob_missing = _azure_error("ResourceNotFoundError", 404, blob.StorageErrorCode.BLOB_NOT_FOUND)
    assert _is_exactly(translate(blob_missing, "k", AZ), BlobNotFoundError)
    for code in ("AuthenticationFailed", "InvalidAuthenticationInfo"):
        err = translate(_azure_error("HttpResponseError", 403, code), "k", AZ)
        assert _is_exactly(err, PermanentStorageError)
        assert "credentials were rejected" in str(err) and "AZURE_STORAGE_CONNECTION_STRING" in str(err)
    denied = translate(_azure_error("HttpResponseError", 403, "AuthorizationPermissionMismatch"), "k", AZ)
    assert _is_exactly(denied, PermanentStorageError) and "access denied" in str(denied)
    no_identity = translate(_azure_error("ClientAuthenticationError", None), "k", AZ)
    assert "credentials" in str(no_identity) and "AZURE_STORAGE_CONNECTION_STRING" in str(no_identity)
    for status, code in [(503, "ServerBusy"), (500, "InternalError"), (500, "OperationTimedOut"), (429, None)]:
        transient = _azure_error("HttpResponseError", status, code)
        assert _is_exactly(translate(transient, "k", AZ), TransientStorageError), (status, code)
        failed_block = _wrapped(transient, RuntimeError("Failed to upload block: ...!"))
        assert _is_exactly(translate(failed_block, "k", AZ), TransientStorageError), (status, code)
    for name in ("ServiceRequestError", "ServiceResponseError", "IncompleteReadError"):
        assert _is_exactly(translate(_azure_error(name, None), "k", AZ), TransientStorageError), name
        dropped = _wrapped(_azure_error(name, None), RuntimeError("Failed to upload block: Server disconnected!"))
        assert _is_exactly(translate(dropped, "k", AZ), TransientStorageError), name
    assert _is_exactly(
        translate(_azure_error("HttpResponseError", 409, "LeaseIdMissing"), "k", AZ), PermanentStorageError
    )


# -- secrets ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("failed for s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/run", "wJalrXUtnFEMI"),
        ("failed for s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/run", "AKIAEXAMPLE"),
        ("ftp://user:hunter22@host/x and more", "hunter22"),
        ("GET https://acct.blob.core.windows.net/c/x?sv=2022-11-02&sp=rw&sig=AbC%2Bdef%3D123 failed", "AbC%2Bdef"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeefcafe&X-Amz-Date=1", "deadbeefcafe"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAQQQQ%2F2024&x=1", "AKIAQQQQ"),
        ("https://b.s3.amazonaws.com/k?X-Amz-Security-Token=FwoGZXIvYXdzEJr", "FwoGZXIvYXdzEJr"),
        ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=bXlrZXk9PQ==;EndpointSuffix=x", "bXlrZXk9PQ=="),
        ("https://host/path?token=ghp_abcdef123456", "ghp_abcdef123456"),
        ("connect failed: password=s3cr3t-pw", "s3cr3t-pw"),
    ],
)
def test_redact_removes_secrets(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out
    assert "***" in out


def test_redact_removes_secret_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-K7MDENG-bPxRfiCY")
    monkeypatch.setenv("AZURE_STORAGE_KEY", "azure-key-value-42")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value")
    text = "boom wJalrXUtnFEMI-K7MDENG-bPxRfiCY and azure-key-value-42 and session-token-value"
    out = redact(text)
    for value in ("wJalrXUtnFEMI-K7MDENG-bPxRfiCY", "azure-key-value-42", "session-token-value"):
        assert value not in out
    assert redact("plain text", extra_secrets=("plain",)) == "*** text"
    # and every translated error goes through it
    err = translate(OSError(errno.EIO, "signing with wJalrXUtnFEMI-K7MDENG-bPxRfiCY failed"), "k", WHERE)
    assert "wJalrXUtnFEMI-K7MDENG-bPxRfiCY" not in str(err)
    err = translate(client_error("AccessDenied", 403, message="denied for azure-key-value-42"), "k", WHERE)
    assert "azure-key-value-42" not in str(err)


def test_redact_leaves_ordinary_text_alone() -> None:
    text = "s3://bucket/run/checkpoints/g000001-step-000000000010 failed: SlowDown (503)"
    assert redact(text) == text


@pytest.mark.parametrize(
    ("url", "secrets_in_it", "kept"),
    [
        ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/run", ["AKIAEXAMPLE", "wJalrXUtnFEMI"], "bucket/run"),
        ("s3://bucket/run?token=abc123&sig=def456", ["abc123", "def456", "?"], "s3://bucket/run"),
        ("http://user:pw1234@host:9000/b/x?X-Amz-Signature=feed1234", ["pw1234", "feed1234"], "host:9000/b/x"),
        ("az://container/run", [], "az://container/run"),
        ("runs/local", [], "runs/local"),
    ],
)
def test_redact_url(url: str, secrets_in_it: list[str], kept: str) -> None:
    shown = redact_url(url)
    assert kept in shown
    for secret in secrets_in_it:
        assert secret not in shown


def test_redact_url_keeps_a_container_name_that_is_not_a_credential() -> None:
    url = "abfs://container@account.dfs.core.windows.net/run"
    assert redact_url(url) == url


@pytest.mark.parametrize("url", ["s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/run", "memory://u:pw123456@x/run"])
def test_credentials_in_a_url_are_refused_without_echoing_them(url: str) -> None:
    with pytest.raises(ConfigError, match="credentials") as info:
        open_storage(url)
    for secret in ("wJalrXUtnFEMI", "pw123456"):
        assert secret not in str(info.value)


def test_storage_urls_never_carry_credentials() -> None:
    fs = fsspec.filesystem("memory")
    storage = FsspecStorage(fs, "/spotsafe-redact/run", "memory://user:pw123456@spotsafe-redact/run?sig=qwerty123")
    assert storage.url.endswith("spotsafe-redact/run")
    assert "pw123456" not in storage.url and "qwerty123" not in storage.url
    with pytest.raises(BlobNotFoundError) as info:
        storage.read("missing")
    assert "pw123456" not in str(info.value) and "qwerty123" not in str(info.value)


# -- StorageRetry and RetryingStorage, with a fake clock ---------------------------------------------------------------


class FakeTime:
    """A clock that only moves when something sleeps (or a call takes ``call_cost``)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


class MaxRng(random.Random):
    """Jitter at its upper bound, so delays are exactly the capped exponential."""

    def uniform(self, a: float, b: float) -> float:
        return b


@dataclass
class Scripted:
    """A storage whose every method first raises the queued errors, then answers ``value``."""

    errors: list[BaseException]
    value: Any = None
    calls: int = 0
    clock: FakeTime | None = None
    call_cost: float = 0.0

    @property
    def url(self) -> str:
        return "scripted://run"

    def _answer(self, *args: Any) -> Any:
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.call_cost
        if self.errors:
            raise self.errors.pop(0)
        return self.value

    write_stream = write_atomic = read = read_into = size = exists = _answer
    list_dirs = list_files = find = delete = delete_prefix = sync_prefix = _answer


METHODS: dict[str, Callable[[Any], Any]] = {
    "write_stream": lambda s: s.write_stream("k", lambda: [b"x"]),
    "write_atomic": lambda s: s.write_atomic("k", b"x"),
    "read": lambda s: s.read("k"),
    "read_into": lambda s: s.read_into("k", bytearray(1)),
    "size": lambda s: s.size("k"),
    "exists": lambda s: s.exists("k"),
    "list_dirs": lambda s: s.list_dirs("p"),
    "list_files": lambda s: s.list_files("p"),
    "find": lambda s: s.find("p"),
    "delete": lambda s: s.delete("k"),
    "delete_prefix": lambda s: s.delete_prefix("p"),
    "sync_prefix": lambda s: s.sync_prefix("p"),
}


def retrying(inner: Any, policy: StorageRetry, time_: FakeTime, **kwargs: Any) -> RetryingStorage:
    return RetryingStorage(inner, policy, sleep=time_.sleep, clock=time_.clock, **kwargs)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_retries_transient_errors(method: str) -> None:
    fake = FakeTime()
    inner = Scripted([TransientStorageError("503"), TransientStorageError("reset")], value="answer")
    seen: list[tuple[str, int, float, str]] = []
    storage = retrying(
        inner, StorageRetry(budget_s=10), fake, on_retry=lambda op, n, d, e: seen.append((op, n, d, str(e)))
    )
    returns = method not in ("write_atomic", "delete", "delete_prefix", "sync_prefix")
    assert METHODS[method](storage) == ("answer" if returns else None)
    assert inner.calls == 3
    assert len(fake.slept) == 2
    assert [(n, e) for _, n, _, e in seen] == [(1, "503"), (2, "reset")]
    assert [d for _, _, d, _ in seen] == fake.slept


@pytest.mark.parametrize(
    "err",
    [
        PermanentStorageError("access denied"),
        BlobNotFoundError("missing"),
        ConfigError("bad"),
        ValueError("not a storage error"),
        KeyboardInterrupt(),
    ],
    ids=lambda e: type(e).__name__,
)
@pytest.mark.parametrize("method", ["write_stream", "read", "find"])
def test_permanent_errors_are_not_retried(method: str, err: BaseException) -> None:
    fake = FakeTime()
    inner = Scripted([err, err])
    storage = retrying(inner, StorageRetry(budget_s=100), fake)
    with pytest.raises(type(err)) as info:
        METHODS[method](storage)
    assert info.value is err
    assert inner.calls == 1
    assert fake.slept == []


def test_gives_up_when_the_budget_is_spent() -> None:
    fake = FakeTime()
    inner = Scripted([TransientStorageError(f"503 number {i}") for i in range(100)])
    policy = StorageRetry(budget_s=5.0, initial=0.5, multiplier=2.0, max_delay=2.0)
    storage = retrying(inner, policy, fake, rng=MaxRng())
    with pytest.raises(TransientStorageError) as info:
        storage.read("ckpt/model.bin")
    # Delays 0.5, 1, 2 are slept; the next 2 would end at 5.5 s > 5 s: give up after the 4th attempt.
    assert fake.slept == [0.5, 1.0, 2.0]
    assert inner.calls == 4
    message = str(info.value)
    assert "after 4 attempts" in message
    assert "retry budget 5 s" in message
    assert "ckpt/model.bin" in message
    assert "503 number 3" in message  # the last error
    assert isinstance(info.value.__cause__, TransientStorageError)
    assert fake.now <= policy.budget_s


def test_time_spent_in_calls_counts_against_the_budget() -> None:
    fake = FakeTime()
    inner = Scripted([TransientStorageError("slow") for _ in range(100)], clock=fake, call_cost=3.0)
    storage = retrying(
        inner, StorageRetry(budget_s=10.0, initial=1.0, multiplier=1.0, max_delay=1.0), fake, rng=MaxRng()
    )
    with pytest.raises(TransientStorageError, match="attempts"):
        storage.read("k")
    # 3 s per call and 1 s per sleep: after 3 calls and 2 sleeps, 11 s > 10 s.
    assert inner.calls == 3
    assert fake.slept == [1.0, 1.0]


def test_a_zero_budget_means_one_attempt() -> None:
    fake = FakeTime()
    inner = Scripted([TransientStorageError("x"), TransientStorageError("y")])
    with pytest.raises(TransientStorageError, match="after 1 attempts"):
        retrying(inner, StorageRetry(budget_s=0.0), fake, rng=random.Random(0)).read("k")
    assert inner.calls == 1 and fake.slept == []


def test_delays_grow_exponentially_up_to_the_cap() -> None:
    policy = StorageRetry(initial=0.1, multiplier=2.0, max_delay=1.0)
    delays = [policy.backoff.delay(n, MaxRng()) for n in range(1, 8)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert StorageRetry(initial=0.25, multiplier=1.0, max_delay=9).backoff.delay(50, MaxRng()) == 0.25


def test_delays_are_jittered_within_bounds() -> None:
    policy = StorageRetry(initial=0.1, multiplier=2.0, max_delay=1.0)
    rng = random.Random(1234)
    for attempt in range(1, 12):
        cap = min(1.0, 0.1 * 2 ** (attempt - 1))
        draws = [policy.backoff.delay(attempt, rng) for _ in range(300)]
        assert all(0.0 <= d <= cap for d in draws)
        assert min(draws) < 0.1 * cap and max(draws) > 0.9 * cap  # full jitter, not a fixed delay
        assert len(set(draws)) > 250


def test_retrying_storage_sleeps_jittered_capped_delays() -> None:
    fake = FakeTime()
    inner = Scripted([TransientStorageError("503") for _ in range(30)], value=b"ok")
    policy = StorageRetry(budget_s=1_000, initial=0.5, multiplier=3.0, max_delay=4.0)
    assert retrying(inner, policy, fake, rng=random.Random(5)).read("k") == b"ok"
    assert len(fake.slept) == 30
    caps = [min(4.0, 0.5 * 3.0**i) for i in range(30)]
    assert all(0 <= d <= cap for d, cap in zip(fake.slept, caps, strict=True))
    assert len(set(fake.slept)) == 30


@pytest.mark.parametrize(
    "kwargs",
    [
        {"budget_s": -1},
        {"initial": -0.1},
        {"max_delay": -1},
        {"budget_s": True},
        {"initial": "1"},
        {"multiplier": 0.5},
        {"multiplier": float("nan")},
    ],
    ids=lambda k: json.dumps(k),
)
def test_retry_policy_refuses_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        StorageRetry(**kwargs)


class FailsMidUpload:
    """The first ``write_stream`` sends half the source, then the connection drops; later ones go through."""

    def __init__(self, inner: Storage, failures: int = 1) -> None:
        self.inner = inner
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write_stream(self, key: str, source: Any) -> int:
        if self.failures:
            self.failures -= 1
            chunks = list(source())
            self.inner.write_stream(key, lambda: chunks[: len(chunks) // 2])
            raise TransientStorageError("connection reset in the middle of the upload")
        return self.inner.write_stream(key, source)


def test_a_retried_write_stream_calls_the_source_again(run_url: str) -> None:
    fake = FakeTime()
    storage = retrying(FailsMidUpload(open_storage(run_url, retry=None), failures=2), StorageRetry(), fake)
    data = os.urandom(100_000)
    source_calls = 0

    def source() -> Iterator[memoryview]:
        nonlocal source_calls
        source_calls += 1
        view = memoryview(data)
        for i in range(0, len(data), 7_000):
            yield view[i : i + 7_000]

    assert storage.write_stream("ckpt/blob", source) == len(data)
    assert source_calls == 3
    assert storage.read("ckpt/blob") == data
    assert len(fake.slept) == 2


def test_a_retried_blob_records_the_checksum_of_the_complete_object(run_url: str) -> None:
    storage = retrying(FailsMidUpload(open_storage(run_url, retry=None)), StorageRetry(), FakeTime())
    repo = CheckpointRepository(storage)
    pending = repo.begin(1, 1)
    data = os.urandom(50_000)
    entry = pending.write_blob("model.bin", lambda: [data[:20_000], memoryview(data)[20_000:]])
    assert entry.size == len(data)
    pending.commit(metadata={}, writer={})
    assert repo.verify(pending.ref).blob("model.bin") == entry
    assert bytes(repo.load(pending.ref).blobs["model.bin"]) == data


# -- against the real S3 server ---------------------------------------------------------------------------------------


class Counting:
    """Counts the calls that reach the backend."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return attr(*args, **kwargs)

        return counted


def no_sleep(seconds: float) -> None:
    raise AssertionError(f"a permanent error must not be retried (asked to sleep {seconds} s)")


@pytest.mark.parametrize("method", [m for m in METHODS if m != "sync_prefix"])
def test_a_missing_bucket_fails_fast(object_store: ObjectStore, method: str) -> None:
    counting = Counting(open_storage(object_store.url(f"missing-{secrets.token_hex(4)}"), retry=None))
    storage = RetryingStorage(counting, StorageRetry(budget_s=120), sleep=no_sleep)  # type: ignore[arg-type]
    with pytest.raises(PermanentStorageError, match="the bucket does not exist; create it or fix the URL") as info:
        METHODS[method](storage)
    assert not isinstance(info.value, BlobNotFoundError)
    assert counting.calls == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens there once the socket is closed


def test_an_unreachable_endpoint_is_transient_and_retried_within_the_budget(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    fake = FakeTime()
    counting = Counting(open_storage("s3://bucket/run", retry=None))
    policy = StorageRetry(budget_s=0.25, initial=0.1, multiplier=2.0, max_delay=0.1)
    storage = RetryingStorage(counting, policy, sleep=fake.sleep, clock=fake.clock, rng=MaxRng())  # type: ignore[arg-type]
    with pytest.raises(TransientStorageError) as info:
        storage.write_atomic("latest.json", b"{}")
    assert counting.calls == 3  # slept 0.1 + 0.1; a third 0.1 would pass the 0.25 s budget
    assert fake.slept == [0.1, 0.1]
    assert "after 3 attempts" in str(info.value)
    assert "retry budget 0.25 s" in str(info.value)


def test_open_storage_retries_an_unreachable_endpoint_and_gives_up(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    retries: list[float] = []
    policy = StorageRetry(budget_s=0.3, initial=0.05, max_delay=0.1)
    storage = open_storage("s3://bucket/run", retry=policy, on_retry=lambda op, n, delay, err: retries.append(delay))
    with pytest.raises(TransientStorageError, match=r"still failing after \d+ attempts") as info:
        storage.read("checkpoints/x/manifest.json")
    assert "retry budget 0.3 s" in str(info.value)
    assert sum(retries) <= policy.budget_s


# -- credentials, against an S3 server that enforces them -------------------------------------------------------------


@dataclass(frozen=True)
class AuthServer:
    endpoint: str
    bucket: str
    key_id: str
    secret: str


@pytest.fixture(scope="module")
def auth_server() -> Iterator[AuthServer]:
    """A second moto server that checks signatures and IAM policies after its first 4 requests.

    moto enforces IAM in server mode once ``INITIAL_NO_AUTH_ACTION_COUNT`` requests have
    been served (moto/core/authorization.py); the first four create a user with an S3
    policy, an access key for it, and a bucket.
    """
    import boto3

    proc, endpoint = start_moto({**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        anon = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        anon |= {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="checkpointer")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="checkpointer", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="checkpointer")["AccessKey"]
        bucket = f"auth-{secrets.token_hex(4)}"
        boto3.client(
            "s3", **(anon | {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]})
        ).create_bucket(Bucket=bucket)
        yield AuthServer(endpoint, bucket, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def auth_env(auth_server: AuthServer, s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> AuthServer:
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", auth_server.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", auth_server.secret)
    return auth_server


def test_the_auth_server_accepts_the_right_credentials(auth_env: AuthServer) -> None:
    storage = open_storage(f"s3://{auth_env.bucket}/run-ok")
    storage.write_atomic("latest.json", b"{}")
    assert storage.read("latest.json") == b"{}"
    assert storage.list_files("") == ["latest.json"]


def test_the_auth_server_really_checks(auth_env: AuthServer) -> None:
    """Without this, the wrong-credentials tests below would prove nothing."""
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=auth_env.endpoint,
        region_name="us-east-1",
        aws_access_key_id=auth_env.key_id,
        aws_secret_access_key="not-the-secret",
    )
    with pytest.raises(ClientError) as info:
        s3.list_objects_v2(Bucket=auth_env.bucket)
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


@pytest.mark.parametrize("method", ["write_atomic", "write_stream", "list_files", "find"])
@pytest.mark.parametrize("via", ["env", "storage_options"])
def test_a_wrong_secret_fails_fast_naming_credentials(
    auth_env: AuthServer, monkeypatch: pytest.MonkeyPatch, method: str, via: str
) -> None:
    wrong = "Wr0ngSecretValue/ThatMustNotLeak+" + secrets.token_hex(4)
    options: dict[str, Any] = {}
    if via == "env":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    else:
        options = {"key": auth_env.key_id, "secret": wrong}
    counting = Counting(open_storage(f"s3://{auth_env.bucket}/run", options, retry=None))
    storage = RetryingStorage(counting, StorageRetry(budget_s=120), sleep=no_sleep)  # type: ignore[arg-type]
    with pytest.raises(PermanentStorageError) as info:
        METHODS[method](storage)
    message = str(info.value)
    assert "credentials were rejected" in message
    assert "AWS_SECRET_ACCESS_KEY" in message
    assert wrong not in message and auth_env.secret not in message
    assert counting.calls == 1


def test_an_unknown_access_key_fails_fast_naming_credentials(
    auth_env: AuthServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOSUCHKEY0000000")
    counting = Counting(open_storage(f"s3://{auth_env.bucket}/run", retry=None))
    storage = RetryingStorage(counting, StorageRetry(budget_s=120), sleep=no_sleep)  # type: ignore[arg-type]
    with pytest.raises(PermanentStorageError, match="credentials were rejected"):
        storage.write_atomic("x", b"1")
    assert counting.calls == 1


def test_reading_with_a_wrong_secret_is_permanent(auth_env: AuthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    open_storage(f"s3://{auth_env.bucket}/run-r").write_atomic("blob", b"data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-for-reading")
    counting = Counting(open_storage(f"s3://{auth_env.bucket}/run-r", retry=None))
    storage = RetryingStorage(counting, StorageRetry(budget_s=120), sleep=no_sleep)  # type: ignore[arg-type]
    for call in (lambda: storage.read("blob"), lambda: storage.size("blob")):
        with pytest.raises(PermanentStorageError) as info:
            call()
        assert "credentials" in str(info.value)
        assert "wrong-secret-for-reading" not in str(info.value)
    assert counting.calls == 2


def test_exists_with_a_wrong_secret_raises(auth_env: AuthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    open_storage(f"s3://{auth_env.bucket}/run-e").write_atomic("blob", b"data")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-for-exists")
    with pytest.raises(PermanentStorageError):
        open_storage(f"s3://{auth_env.bucket}/run-e", retry=None).exists("blob")


def test_exists_on_an_unreachable_endpoint_is_transient(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(TransientStorageError):
        open_storage("s3://bucket/run", retry=None).exists("checkpoints/x/manifest.json")


# -- real network faults between the clients and the object stores (S3, GCS, Azure) ----------------------------------


@pytest.fixture
def proxied(object_store: ObjectStore) -> Iterator[tuple[FaultProxy, str, dict[str, Any]]]:
    """A fresh run in a new bucket, reached through a :class:`FaultProxy`: (proxy, url, storage options)."""
    proxy = FaultProxy(object_store.endpoint)
    try:
        yield proxy, object_store.url(object_store.new_bucket()), object_store.options(proxy.url)
    finally:
        proxy.close()


@pytest.mark.parametrize("fault", ["503", "drop"])
@pytest.mark.parametrize("method", ["write_atomic", "write_stream", "read", "size", "list_files", "delete"])
def test_a_network_fault_is_retried_by_spotsafe_alone(
    proxied: tuple[FaultProxy, str, dict[str, Any]], method: str, fault: str
) -> None:
    """Two requests fail; each failed answer is one attempt of the one retry mechanism (the clients do not retry).

    A dropped connection may cost one attempt less: aiohttp (under gcsfs and adlfs, and s3fs's aiobotocore) resends
    an idempotent request (GET, HEAD, PUT, DELETE) once, at once, when its connection closed without an answer.
    So may gcsfs's ``info`` (behind ``size``): it sends two requests at once (the object, and the folder of that
    name) and, on a loaded machine, both can meet an injected fault within one call. With dropped connections the
    two meet: both faults can be spent inside one ``size`` call (seen once in a full run), so it may take one call.
    """
    proxy, url, options = proxied
    open_storage(url, options).write_atomic("k", b"x")
    fake = FakeTime()
    counting = Counting(open_storage(url, options, retry=None))
    storage = retrying(counting, StorageRetry(budget_s=60), fake)
    proxy.fail(2, fault=fault)
    METHODS[method](storage)
    assert proxy.faults() == 2
    two_requests_a_call = url.startswith("gs://") and method == "size"
    if fault == "drop" and two_requests_a_call:
        assert 1 <= counting.calls <= 3
    elif fault == "drop" or two_requests_a_call:
        assert 2 <= counting.calls <= 3
    else:
        assert counting.calls == 3
    assert len(fake.slept) == counting.calls - 1


@pytest.mark.parametrize("status", ["429", "500", "502", "503", "504"])
def test_server_errors_are_retried(proxied: tuple[FaultProxy, str, dict[str, Any]], status: str) -> None:
    proxy, url, options = proxied
    fake = FakeTime()
    counting = Counting(open_storage(url, options, retry=None))
    storage = retrying(counting, StorageRetry(budget_s=60), fake)
    proxy.fail(1, fault=status)
    storage.write_atomic("latest.json", b"{}")
    assert proxy.faults() == 1 and counting.calls == 2
    assert open_storage(url, options).read("latest.json") == b"{}"


def test_a_failing_service_gives_up_within_the_budget_one_request_per_attempt(
    proxied: tuple[FaultProxy, str, dict[str, Any]],
) -> None:
    proxy, url, options = proxied
    fake = FakeTime()
    counting = Counting(open_storage(url, options, retry=None))
    storage = retrying(counting, StorageRetry(budget_s=1.0, initial=0.1, max_delay=0.2), fake, rng=MaxRng())
    proxy.clear()
    proxy.fail(1000)
    with pytest.raises(TransientStorageError, match=r"still failing after \d+ attempts"):
        storage.write_atomic("latest.json", b"{}")
    assert counting.calls >= 3
    assert len(proxy.seen) == counting.calls  # no retry loop of the client's own underneath
    assert sum(fake.slept) <= 1.0


def test_a_part_that_fails_mid_upload_restarts_the_blob_from_its_source(
    proxied: tuple[FaultProxy, str, dict[str, Any]],
) -> None:
    proxy, url, options = proxied
    inner = open_storage(url, options, retry=None)
    assert isinstance(inner, FsspecStorage)
    backend = FsspecStorage(inner.fs, inner.root, url, block_size=5 * 2**20, bucket=inner.bucket)
    fake = FakeTime()
    storage = retrying(backend, StorageRetry(budget_s=60), fake)
    data = os.urandom(11 * 2**20)
    calls = []

    def source() -> Iterator[memoryview]:
        calls.append(1)
        view = memoryview(data)
        yield from (view[i : i + 2**20] for i in range(0, len(data), 2**20))

    proxy.clear()
    proxy.fail(1, after=2)  # S3: after starting the upload and one part; GCS, Azure: after two chunks
    assert storage.write_stream("blobs/model.bin", source) == len(data)
    assert proxy.faults() == 1 and len(calls) == 2
    assert open_storage(url, options).read("blobs/model.bin") == data


def test_an_unreachable_endpoint_is_transient_on_every_store(object_store: ObjectStore) -> None:
    options = object_store.options(f"http://127.0.0.1:{_closed_port()}")
    storage = open_storage(object_store.url("bucket"), options, retry=None)
    for method in ("write_atomic", "read", "exists", "list_files"):
        with pytest.raises(TransientStorageError):
            METHODS[method](storage)


@pytest.mark.parametrize("method", ["write_atomic", "write_stream", "read", "size", "exists", "list_files", "find"])
def test_azure_with_a_wrong_key_fails_fast_naming_credentials(azure_server: Any, method: str) -> None:
    store = ObjectStore("azure", "az", azure_server.endpoint)
    url = store.url(store.new_bucket())
    open_storage(url).write_atomic("k", b"x")
    open_storage(url).write_atomic("p/k", b"x")
    wrong = base64.b64encode(secrets.token_bytes(64)).decode()
    counting = Counting(open_storage(url, store.options(key=wrong), retry=None))
    storage = RetryingStorage(counting, StorageRetry(budget_s=120), sleep=no_sleep)  # type: ignore[arg-type]
    with pytest.raises(PermanentStorageError) as info:
        METHODS[method](storage)
    message = str(info.value)
    assert "credentials" in message and "AZURE_STORAGE_CONNECTION_STRING" in message
    assert wrong not in message and AZURITE_KEY not in message
    assert counting.calls == 1


# -- saving through injected faults -----------------------------------------------------------------------------------


class Trainer:
    """A real model and optimizer that take real steps."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 4))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def step(self) -> None:
        x = torch.randn(16, 12)
        loss = (self.model(x) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}


def assert_bit_equal(a: Any, b: Any) -> None:
    assert differences(a, b) == []


def quick_retries(inner: Storage, fake: FakeTime | None = None, budget_s: float = 60.0) -> RetryingStorage:
    policy = StorageRetry(budget_s=budget_s, initial=0.001, max_delay=0.01)
    if fake is None:
        return RetryingStorage(inner, policy, sleep=lambda s: None, rng=random.Random(0))
    return RetryingStorage(inner, policy, sleep=fake.sleep, clock=fake.clock, rng=random.Random(0))


def test_saves_commit_through_failures_and_cut_uploads(run_url: str) -> None:
    faulty = FaultyStorage(open_storage(run_url, retry=None), fail_rate=0.2, cut_rate=0.1, seed=11)
    repo = CheckpointRepository(quick_retries(faulty))  # type: ignore[arg-type]
    trainer = Trainer()
    saved: dict[int, dict[str, Any]] = {}
    for step in range(1, 13):
        trainer.step()
        ref, manifest = persist(
            repo, Snapshot.capture(step, trainer.state()), metadata={"step": step}, writer={}, generation=1
        )
        assert ref.step == step and manifest.step == step
        saved[step] = copy.deepcopy(trainer.state())

    assert faulty.failures > 0 and faulty.cuts > 0
    clean = CheckpointRepository(open_storage(run_url, retry=None))
    committed = clean.committed()
    assert [ref.step for ref in committed] == list(range(12, 0, -1))
    assert clean.folders() == committed
    for ref in committed:
        assert clean.verify(ref).metadata == {"step": ref.step}
    restored = load_newest_valid(clean)
    assert restored is not None and restored.step == 12
    assert_bit_equal(restored.components["model"], saved[12]["model"])
    assert_bit_equal(restored.components["optimizer"], saved[12]["optimizer"])
    older = clean.load(committed[5])
    assert older.ref.step == 7


@pytest.mark.parametrize(("fail_rate", "cut_rate"), [(1.0, 0.0), (0.0, 1.0)], ids=["every-call-fails", "every-cut"])
def test_a_save_that_cannot_get_through_leaves_nothing_visible(run_url: str, fail_rate: float, cut_rate: float) -> None:
    base = open_storage(run_url, retry=None)
    trainer = Trainer()
    trainer.step()
    good, _ = persist(CheckpointRepository(base), Snapshot.capture(1, trainer.state()), metadata={}, writer={})
    trainer.step()
    faulty = FaultyStorage(base, fail_rate=fail_rate, cut_rate=cut_rate, seed=3)
    fake = FakeTime()
    repo = CheckpointRepository(quick_retries(faulty, fake, budget_s=0.05))  # type: ignore[arg-type]
    with pytest.raises(TransientStorageError, match="attempts"):
        persist(repo, Snapshot.capture(2, trainer.state()), metadata={}, writer={})
    assert faulty.failures + faulty.cuts > 1  # it was retried before giving up
    clean = CheckpointRepository(base)
    assert clean.committed() == [good]
    assert clean.candidates() == [good]
    assert clean.folders() == [good]  # what the failed save wrote was removed when it aborted
    restored = load_newest_valid(clean)
    assert restored is not None and restored.step == 1
