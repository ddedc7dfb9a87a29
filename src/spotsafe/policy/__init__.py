"""Decisions as small composable values: when to save, what to keep."""

from spotsafe.policy.adaptive import MaxLoss, OnNotice, YoungDaly, daly_interval, max_loss, on_notice, young_daly
from spotsafe.policy.interval import AnyOf, Choice, EverySeconds, EverySteps, Never, SaveContext, SavePolicy, every
from spotsafe.policy.retention import Candidate, KeepLast

__all__ = [
    "AnyOf",
    "Candidate",
    "Choice",
    "EverySeconds",
    "EverySteps",
    "KeepLast",
    "MaxLoss",
    "Never",
    "OnNotice",
    "SaveContext",
    "SavePolicy",
    "YoungDaly",
    "daly_interval",
    "every",
    "max_loss",
    "on_notice",
    "young_daly",
]
