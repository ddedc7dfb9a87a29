"""Interruption notices: signals, provider metadata endpoints, Kubernetes and Slurm."""

from spotsafe.notices.aws import AwsSpotNotices
from spotsafe.notices.azure import AzureScheduledEvents
from spotsafe.notices.base import STOP, WARNING, Notice, NoticeBoard, NoticeSource, SourceReport
from spotsafe.notices.detect import Detection, build_sources, detect
from spotsafe.notices.gcp import GcpNotices
from spotsafe.notices.signals import DEFAULT_SIGNALS, SignalNotices
from spotsafe.notices.slurm import SlurmNotices

__all__ = [
    "DEFAULT_SIGNALS",
    "STOP",
    "WARNING",
    "AwsSpotNotices",
    "AzureScheduledEvents",
    "Detection",
    "GcpNotices",
    "Notice",
    "NoticeBoard",
    "NoticeSource",
    "SignalNotices",
    "SlurmNotices",
    "SourceReport",
    "build_sources",
    "detect",
]
