"""Resumable data order and position: :class:`ResumableLoader`, or a plain DataLoader made resumable in place
with :class:`LoaderPosition`."""

from spotsafe.data.loader import ResumableLoader, epoch_order
from spotsafe.data.position import LoaderPosition

__all__ = ["LoaderPosition", "ResumableLoader", "epoch_order"]
