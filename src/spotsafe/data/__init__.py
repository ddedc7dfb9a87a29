"""Resumable data order and position."""

from spotsafe.data.loader import ResumableLoader, epoch_order

__all__ = ["ResumableLoader", "epoch_order"]
