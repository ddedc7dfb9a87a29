"""Where checkpoints live, and the commit protocol that makes them appear atomically."""

from spotsafe.storage.base import BlobNotFoundError, Storage
from spotsafe.storage.fsspec_store import FsspecStorage
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.registry import open_storage
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository
from spotsafe.storage.retry import RetryingStorage, StorageRetry

__all__ = [
    "BlobNotFoundError",
    "CheckpointRef",
    "CheckpointRepository",
    "FsspecStorage",
    "LocalStorage",
    "RetryingStorage",
    "Storage",
    "StorageRetry",
    "open_storage",
]
