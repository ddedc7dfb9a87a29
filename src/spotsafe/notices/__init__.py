"""Interruption notices (signals now; cloud metadata endpoints plug in here)."""

from spotsafe.notices.base import Notice, NoticeBoard, NoticeSource
from spotsafe.notices.signals import DEFAULT_SIGNALS, SignalNotices

__all__ = ["DEFAULT_SIGNALS", "Notice", "NoticeBoard", "NoticeSource", "SignalNotices"]
