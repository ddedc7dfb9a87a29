"""Choosing a storage backend from a URL.

=========================  ==========================================  ============================
URL                        backend                                     install
=========================  ==========================================  ============================
``runs/x``, ``file://...``  :class:`~spotsafe.storage.local.LocalStorage`  (built in)
``memory://x``             fsspec memory file system (tests, demos)    (built in)
``s3://bucket/x``          s3fs                                        ``pip install 'spotsafe[s3]'``
``gs://``, ``gcs://``      gcsfs                                       ``pip install 'spotsafe[gcs]'``
``az://``, ``abfs://``     adlfs                                       ``pip install 'spotsafe[azure]'``
=========================  ==========================================  ============================

Every backend is wrapped in :class:`~spotsafe.storage.retry.RetryingStorage`,
the one place transient errors are retried. The clients' own retries are turned
off, so that one time budget governs all retrying: for S3, s3fs's retry loop and
botocore's (``total_max_attempts=1`` unless you pass other ``config_kwargs``;
botocore's ``max_attempts`` counts retries, not attempts); for GCS, gcsfs's
request retry loop and its bucket-type probe's (``retry_timeout=0``); for Azure,
the Azure SDK's retry policy (``retry_total=0``). What remains underneath is
aiohttp's single immediate resend of an idempotent request (GET, HEAD, PUT,
DELETE) whose connection closed before an answer, as HTTP/1.1 allows.
Credentials come from the usual places (environment, profile, instance role),
or from ``storage_options``; they never appear in URLs that spotsafe prints.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from spotsafe.errors import ConfigError
from spotsafe.storage.base import Storage
from spotsafe.storage.errors import redact_url
from spotsafe.storage.fsspec_store import FsspecStorage
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.retry import DEFAULT_RETRY, RetryingStorage, StorageRetry

_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
_PACKAGES = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}},
    # gcsfs probes each bucket's type (hierarchical, zonal) over gRPC, retrying for up to 60 s; one try, and on a
    # failure it falls back to the plain JSON API, as it does for buckets of the common kind.
    "gcs": {"retry_timeout": 0},
}


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


_USER_IS_NOT_A_CREDENTIAL = ("az", "abfs", "abfss")  # abfs://container@account: the "user" is a container


def check_no_credentials(url: str) -> None:
    """Refuse a URL that carries credentials (a password, or user info where it can only be a key)."""
    if "://" not in url:
        return
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    if not userinfo:
        return
    if ":" in userinfo or protocol_of(url) not in _USER_IS_NOT_A_CREDENTIAL:
        bare = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))
        raise ConfigError(
            f"credentials in the URL are not supported (and are not shown): use {bare} and give credentials "
            "through the environment, a profile, an instance role or storage options"
        )


def open_backend(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The backend for ``url``, without retries."""
    text = os.fspath(url)
    protocol = protocol_of(text)
    if protocol == "file":
        return LocalStorage(text)
    import fsspec

    check_no_credentials(text)
    if protocol not in _EXTRAS and protocol != "memory":
        known = ", ".join(sorted({"file", "memory", *_EXTRAS}))
        raise ConfigError(f"unsupported storage URL {redact_url(text)!r}: use a local folder or one of {known}://")
    options: dict[str, Any] = dict(_DEFAULTS.get(_EXTRAS.get(protocol, ""), {}))
    options.update(storage_options or {})
    options.setdefault("use_listings_cache", False)
    options.setdefault("skip_instance_cache", True)
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError as err:
        extra = _EXTRAS.get(protocol, protocol)
        raise ConfigError(
            f"{protocol}:// needs the {_PACKAGES.get(extra, extra)} package: pip install 'spotsafe[{extra}]'"
        ) from err
    _no_client_retries(fs, _EXTRAS.get(protocol, ""))
    root = fs._strip_protocol(text).rstrip("/")
    if not root or (protocol != "memory" and "/" not in root.strip("/")):
        raise ConfigError(f"{redact_url(text)!r} names a bucket but no folder: use {protocol}://bucket/run-name")
    bucket = root.strip("/").split("/", 1)[0] if protocol != "memory" else None
    return FsspecStorage(fs, root, text, bucket=bucket)


def _no_client_retries(fs: Any, extra: str) -> None:
    """Turn off the retry loops that the clients run on their own (none of them is a constructor option)."""
    if extra == "s3" and hasattr(fs, "retries"):
        fs.retries = 1  # s3fs's retry loop: a class attribute
    elif extra == "gcs":
        # gcsfs retries every request up to 6 times with its own backoff; the decorator binds the count when the
        # class is defined, so the request method is replaced by the undecorated one, for this instance only.
        request = getattr(type(fs), "_request", None)
        undecorated = getattr(request, "__wrapped__", None)
        if undecorated is not None:
            fs._request = types.MethodType(undecorated, fs)
    elif extra == "azure":
        # adlfs passes no retry options to the Azure SDK; its clients (and the files' container clients) share
        # the service client's retry policy, read on every request.
        policy = getattr(getattr(getattr(fs, "service_client", None), "_config", None), "retry_policy", None)
        if policy is not None and hasattr(policy, "total_retries"):
            policy.total_retries = 0


def open_storage(
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None = None,
    *,
    retry: StorageRetry | None = DEFAULT_RETRY,
    on_retry: Callable[[str, int, float, Exception], None] | None = None,
) -> Storage:
    """Open ``url`` with retries (``retry=None`` for none)."""
    backend = open_backend(url, storage_options)
    if retry is None:
        return backend
    return RetryingStorage(backend, retry, on_retry=on_retry)
