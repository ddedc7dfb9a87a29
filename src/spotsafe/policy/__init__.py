"""Decisions as small composable values: when to save, what to keep."""

from spotsafe.policy.interval import AnyOf, EverySeconds, EverySteps, Never, SaveContext, SavePolicy, every
from spotsafe.policy.retention import Candidate, KeepLast

__all__ = [
    "AnyOf",
    "Candidate",
    "EverySeconds",
    "EverySteps",
    "KeepLast",
    "Never",
    "SaveContext",
    "SavePolicy",
    "every",
]
