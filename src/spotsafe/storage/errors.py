"""Translating backend exceptions into spotsafe's tree, and keeping secrets out of messages.

Every storage call goes through :func:`translate` at the backend boundary, so the
rest of spotsafe only ever sees :class:`~spotsafe.errors.TransientStorageError`
(retry it), :class:`~spotsafe.errors.PermanentStorageError` (tell the user what
to fix) or :class:`~spotsafe.storage.base.BlobNotFoundError`.

Classification uses only structured information: the service's error code
(botocore's ``Error.Code``, azure.core's ``error_code``), the HTTP status, the
exception's type and its ``errno``; never words in a message, which carries the
user's own paths and bucket names. Where a backend gives no code for a missing
bucket (a bare ``FileNotFoundError``), the storage asks explicitly whether the
bucket exists (see :meth:`~spotsafe.storage.fsspec_store.FsspecStorage.check_bucket`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
from collections.abc import Iterator
from enum import Enum
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from spotsafe.errors import PermanentStorageError, StorageError, TransientStorageError
from spotsafe.storage.base import BlobNotFoundError

# Environment variables whose values are secrets: never echo them.
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
)
_SECRET_QUERY = re.compile(
    r"(?<![A-Za-z0-9_.-])((?:sig|signature|sas_token|x-amz-signature|x-amz-credential|x-amz-security-token|"
    r"AccountKey|SharedAccessSignature|token|secret|password)=)[^&;\s'\"]+",
    re.IGNORECASE,
)
_USERINFO_PASSWORD = re.compile(r"(?<![A-Za-z0-9_.-])([^\s/@:'\"]+):([^\s/@'\"]+)@")

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthenticationFailed",  # Azure: a wrong account key or SAS signature
    "InvalidAuthenticationInfo",  # Azure: a malformed or expired token
}
_CREDENTIAL_TYPES = {
    "NoCredentialsError",  # botocore
    "PartialCredentialsError",  # botocore
    "ClientAuthenticationError",  # azure.core (azure.identity's errors derive from it)
    "DefaultCredentialsError",  # google.auth: no credentials found
}
_ACCESS_CODES = {
    "AccessDenied",  # S3
    "AuthorizationFailure",  # Azure: not allowed (network rules, SAS scope); Azurite also says it for a wrong key
    "AuthorizationPermissionMismatch",  # Azure: the identity lacks the role
}
_CREDENTIAL_HINTS = {
    "s3": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the profile, or the instance role",
    "gcs": "GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, or the service account",
    "azure": "AZURE_STORAGE_CONNECTION_STRING / AZURE_STORAGE_ACCOUNT_KEY, the SAS token, or the managed identity",
}
_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
_LIBRARIES = {"botocore": "s3", "aiobotocore": "s3", "s3fs": "s3", "gcsfs": "gcs", "google": "gcs", "azure": "azure"}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
}
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ECONNRESET, errno.EREMOTEIO}


def redact(text: str, extra_secrets: tuple[str, ...] = ()) -> str:
    """Remove credentials from ``text``: URL user info, secret query parameters, secret env values."""
    out = _USERINFO_PASSWORD.sub(r"***@", text)
    out = _SECRET_QUERY.sub(r"\1***", out)
    for value in (*extra_secrets, *(os.environ.get(name, "") for name in SECRET_ENV)):
        if value and len(value) >= 4:
            out = out.replace(value, "***")
    return out


def redact_url(url: str) -> str:
    """The URL as shown to users: no password, no query string.

    A user name alone is kept only where it is not a credential (``abfs://container@account``).
    """
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    if parts.username and parts.password is None and parts.scheme in ("az", "abfs", "abfss"):
        netloc = f"{parts.username}@{netloc}"
    elif parts.username:
        netloc = f"***@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_NO_BUCKET_CODES = {
    "NoSuchBucket",  # S3 (botocore's ClientError code)
    "ContainerNotFound",  # Azure Blob Storage (azure.core's HttpResponseError.error_code)
}
"""Service error codes that say the bucket (container) itself is missing, not a key in it."""


def _chain(err: BaseException, *, handled: bool = True) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from, each once.

    With ``handled=False``, only what it explicitly wraps (``raise ... from``), not what was being handled when
    it was raised: adlfs wraps a dropped connection in a ``RuntimeError`` that way.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (current.__context__ if handled else None)


def _client_error(err: BaseException) -> Any:
    """The botocore-style ClientError behind ``err``, if any (it carries the service's error code)."""
    return next((e for e in _chain(err) if isinstance(getattr(e, "response", None), dict)), None)


def _service_code(err: BaseException, client: Any) -> str | None:
    """The service's own error code: botocore's ``Error.Code``, or azure.core's ``error_code``."""
    if client is not None:
        code = client.response.get("Error", {}).get("Code")
        if isinstance(code, str):
            return code
    for current in _chain(err):
        code = getattr(current, "error_code", None)
        if isinstance(code, Enum):  # azure.storage.blob's StorageErrorCode
            code = code.value
        if isinstance(code, str) and code:
            return code
    return None


def _http_status(err: BaseException, client: Any) -> int | None:
    """The HTTP status of the failed request, where the exception carries it.

    botocore's ``ResponseMetadata.HTTPStatusCode``, azure.core's ``status_code``, aiohttp's ``status``, and the
    ``code`` of gcsfs's ``HttpError`` (gcsfs raises a plain ``FileNotFoundError`` for 404 and ``OSError`` for 403).
    """
    if client is not None:
        status = client.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for current in _chain(err):
        candidates = [getattr(current, "status_code", None), getattr(current, "status", None)]
        if type(current).__name__ == "HttpError":
            candidates.append(getattr(current, "code", None))
        for value in candidates:
            if isinstance(value, int) and not isinstance(value, bool) and 100 <= value < 600:
                return value
    return None


def credential_hint(where: str, err: BaseException | None = None) -> str:
    """Where the credentials for the store at ``where`` (a URL) come from, for messages.

    Without a scheme in ``where``, the library that raised ``err`` tells which store it was.
    """
    scheme = where.split("://", 1)[0].lower() if "://" in where else ""
    store = _SCHEMES.get(scheme, "")
    if not store and err is not None:
        modules = {type(e).__module__.split(".", 1)[0] for e in _chain(err)}
        store = next((s for m, s in _LIBRARIES.items() if m in modules), "")
    return _CREDENTIAL_HINTS.get(store, "the credentials given in the storage options or the environment")


def bucket_missing(where: str, detail: str = "") -> PermanentStorageError:
    """The error for a bucket (container) that does not exist."""
    suffix = f" ({detail})" if detail else ""
    return PermanentStorageError(f"{where}: the bucket does not exist; create it or fix the URL{suffix}")


def _is_transient_type(err: BaseException) -> bool:
    if isinstance(err, (TimeoutError, asyncio.TimeoutError, socket.timeout, ConnectionError)):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    return bool(
        names
        & {
            "FSTimeoutError",
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "ClientConnectionError",
            "ClientPayloadError",
            "ServerDisconnectedError",
            "IncompleteRead",
            "ResponseStreamingError",
            "ServiceRequestError",
            "ServiceResponseError",
            "IncompleteReadError",  # azure.core: the body was cut off
            "TransportError",  # google.auth: the token endpoint could not be reached
            "ConnectionError",  # requests' (gcsfs turns a 502 into requests' ProxyError, one of these)
            "Timeout",  # requests'
            "ChunkedEncodingError",  # requests'
        }
    )


def translate(err: BaseException, key: str, where: str) -> StorageError:
    """Map ``err`` (raised while working on ``key`` at ``where``) to spotsafe's error tree."""
    if isinstance(err, StorageError):
        return err
    message = redact(f"{type(err).__name__}: {err}")
    client = _client_error(err)
    code = _service_code(err, client)
    status = _http_status(err, client)
    type_names = {cls.__name__ for e in _chain(err) for cls in type(e).__mro__}
    # Decided by codes and types only: messages contain paths and bucket names, which are the user's words.
    if code in _NO_BUCKET_CODES:
        return bucket_missing(where, message)
    if isinstance(err, FileNotFoundError) or code in ("NoSuchKey", "BlobNotFound", "404") or status == 404:
        return BlobNotFoundError(f"{where}/{key}: not found")
    if code in _CREDENTIAL_CODES or type_names & _CREDENTIAL_TYPES or status == 401:
        return PermanentStorageError(
            f"{where}: the credentials were rejected or are missing; check {credential_hint(where, err)} ({message})"
        )
    if code in _ACCESS_CODES or status == 403 or (isinstance(err, PermissionError) and "://" in where):
        return PermanentStorageError(
            f"{where}/{key}: access denied; the credentials were refused or lack permission for this location; "
            f"check {credential_hint(where, err)} ({message})"
        )
    if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status in (408, 429))):
        return TransientStorageError(f"{where}/{key}: {message}")
    if any(_is_transient_type(e) for e in _chain(err, handled=False)):
        return TransientStorageError(f"{where}/{key}: {message}")
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return PermanentStorageError(
            f"{where}/{key}: no space left on the device; free space or point the run elsewhere"
        )
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermanentStorageError(f"{where}/{key}: permission denied ({message}); check the folder's owner and mode")
    if isinstance(err, OSError) and (err.errno in _TRANSIENT_ERRNOS or (err.errno == errno.EIO and client is None)):
        return TransientStorageError(f"{where}/{key}: {message}")
    return PermanentStorageError(f"{where}/{key}: {message}")
