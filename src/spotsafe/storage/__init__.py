"""Where checkpoints live, and the commit protocol that makes them appear atomically."""

from spotsafe.storage.base import BlobNotFoundError, Storage
from spotsafe.storage.local import LocalStorage, open_storage
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository

__all__ = ["BlobNotFoundError", "CheckpointRef", "CheckpointRepository", "LocalStorage", "Storage", "open_storage"]
