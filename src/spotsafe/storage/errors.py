"""Translating backend exceptions into spotsafe's tree, and keeping secrets out of messages.

Every storage call goes through :func:`translate` at the backend boundary, so the
rest of spotsafe only ever sees :class:`~spotsafe.errors.TransientStorageError`
(retry it), :class:`~spotsafe.errors.PermanentStorageError` (tell the user what
to fix) or :class:`~spotsafe.storage.base.BlobNotFoundError`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
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
}
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


def _client_error(err: BaseException) -> Any:
    """The botocore-style ClientError behind ``err``, if any (it carries the service's error code)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(getattr(current, "response", None), dict):
            return current
        current = current.__cause__ or current.__context__
    return None


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
        }
    )


def translate(err: BaseException, key: str, where: str) -> StorageError:
    """Map ``err`` (raised while working on ``key`` at ``where``) to spotsafe's error tree."""
    if isinstance(err, StorageError):
        return err
    message = redact(f"{type(err).__name__}: {err}")
    client = _client_error(err)
    code = None
    status = None
    if client is not None:
        code = client.response.get("Error", {}).get("Code")
        status = client.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket" or (isinstance(err, FileNotFoundError) and "bucket" in str(err).lower()):
        return PermanentStorageError(f"{where}: the bucket does not exist; create it or fix the URL ({message})")
    if isinstance(err, FileNotFoundError) or code in ("NoSuchKey", "404"):
        return BlobNotFoundError(f"{where}/{key}: not found")
    if code in _CREDENTIAL_CODES or type(err).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return PermanentStorageError(
            f"{where}: the credentials were rejected or are missing; check AWS_ACCESS_KEY_ID / "
            f"AWS_SECRET_ACCESS_KEY, the profile, or the instance role ({message})"
        )
    if code == "AccessDenied" or (isinstance(err, PermissionError) and "://" in where):
        return PermanentStorageError(
            f"{where}/{key}: access denied; the credentials lack permission for this location ({message})"
        )
    if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
        return TransientStorageError(f"{where}/{key}: {message}")
    if _is_transient_type(err):
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
