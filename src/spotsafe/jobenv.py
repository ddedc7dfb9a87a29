"""The job contract: the environment a supervised job receives and reads, in one place.

Whoever launches a job (``spotsafe run``, the drill, the demo, a Slurm/SkyPilot/Kubernetes
launcher) builds a :class:`JobEnv` and passes :meth:`JobEnv.to_env` to the process; the job
(the :class:`~spotsafe.Checkpointer`, the metrics endpoint, notice detection) reads
:meth:`JobEnv.from_env`. No other module spells these variable names.

==============================  ==================  ===========================================
variable                        field               meaning
==============================  ==================  ===========================================
``SPOTSAFE_CHECKPOINT_URL``     ``checkpoint_url``  where the run lives (``Checkpointer(url=None)``)
``SPOTSAFE_RUN_ID``             ``run_id``          the run's name in events (default: the URL's last part)
``SPOTSAFE_ATTEMPT``            ``attempt``         the attempt number, from 1 (default: from the event log)
``SPOTSAFE_JOB_STORE``          ``job_store``       the supervisor's SQLite job store
``SPOTSAFE_POOL``               ``pool``            the capacity pool the attempt runs in
``SPOTSAFE_EVENTS_FILE``        ``events_file``     a local spool for the event log of a remote run
``SPOTSAFE_NOTICES``            ``notices``         notice sources: ``auto``, ``none`` or a comma list
``SPOTSAFE_NOTICE_POLL_SECONDS``  ``notice_poll_s``  the AWS/Azure poll interval override
``SPOTSAFE_METRICS_PORT``       ``metrics_port``    serve Prometheus metrics on this port (0: any free one)
``SPOTSAFE_METRICS_ADDR``       ``metrics_addr``    the address to serve them on (default 0.0.0.0)
``SPOTSAFE_ON_DAMAGED``         ``on_damaged``      ``fail`` (default) or ``start_fresh``
==============================  ==================  ===========================================

Provider-specific knobs that a user sets by hand (``$SPOTSAFE_GRACE_SECONDS``, the Slurm and
Azure ones) are read by :mod:`spotsafe.notices.detect`, next to the sources they configure.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from spotsafe.errors import ConfigError

ENV_CHECKPOINT_URL = "SPOTSAFE_CHECKPOINT_URL"
ENV_RUN_ID = "SPOTSAFE_RUN_ID"
ENV_ATTEMPT = "SPOTSAFE_ATTEMPT"
ENV_JOB_STORE = "SPOTSAFE_JOB_STORE"
ENV_POOL = "SPOTSAFE_POOL"
ENV_EVENTS_FILE = "SPOTSAFE_EVENTS_FILE"
ENV_NOTICES = "SPOTSAFE_NOTICES"
ENV_NOTICE_POLL = "SPOTSAFE_NOTICE_POLL_SECONDS"
ENV_METRICS_PORT = "SPOTSAFE_METRICS_PORT"
ENV_METRICS_ADDR = "SPOTSAFE_METRICS_ADDR"
ENV_ON_DAMAGED = "SPOTSAFE_ON_DAMAGED"

DEFAULT_JOB_STORE = ".spotsafe/jobs.sqlite"

# field name -> environment variable, in the order of the table above
VARIABLES: dict[str, str] = {
    "checkpoint_url": ENV_CHECKPOINT_URL,
    "run_id": ENV_RUN_ID,
    "attempt": ENV_ATTEMPT,
    "job_store": ENV_JOB_STORE,
    "pool": ENV_POOL,
    "events_file": ENV_EVENTS_FILE,
    "notices": ENV_NOTICES,
    "notice_poll_s": ENV_NOTICE_POLL,
    "metrics_port": ENV_METRICS_PORT,
    "metrics_addr": ENV_METRICS_ADDR,
    "on_damaged": ENV_ON_DAMAGED,
}


@dataclass(frozen=True, kw_only=True)
class JobEnv:
    """What a launcher tells a job through its environment; ``None`` is "not set"."""

    checkpoint_url: str | None = None
    run_id: str | None = None
    attempt: int | None = None
    job_store: str | None = None
    pool: str | None = None
    events_file: str | None = None
    notices: str | None = None
    notice_poll_s: float | None = None
    metrics_port: int | None = None
    metrics_addr: str | None = None
    on_damaged: str | None = None

    def __post_init__(self) -> None:
        if self.attempt is not None and (
            isinstance(self.attempt, bool) or not isinstance(self.attempt, int) or self.attempt < 1
        ):
            raise ConfigError(
                f"${ENV_ATTEMPT} must be a whole number >= 1 (attempts count from 1), got {self.attempt!r}"
            )
        if self.notice_poll_s is not None and not (
            isinstance(self.notice_poll_s, (int, float))
            and math.isfinite(self.notice_poll_s)
            and self.notice_poll_s > 0
        ):
            raise ConfigError(f"${ENV_NOTICE_POLL} must be a number of seconds > 0, got {self.notice_poll_s!r}")
        if self.metrics_port is not None and (
            isinstance(self.metrics_port, bool)
            or not isinstance(self.metrics_port, int)
            or not 0 <= self.metrics_port <= 65535
        ):
            raise ConfigError(f"the metrics port must be 0-65535, got {self.metrics_port!r} (${ENV_METRICS_PORT})")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and not value:
                raise ConfigError(f"${VARIABLES[f.name]} is set but empty; unset it or give a value")

    def to_env(self) -> dict[str, str]:
        """The variables to add to the job's environment (only the fields that are set)."""
        env: dict[str, str] = {}
        for name, variable in VARIABLES.items():
            value = getattr(self, name)
            if value is not None:
                env[variable] = repr(value) if isinstance(value, float) else str(value)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> JobEnv:
        """Read the contract from ``environ`` (default ``os.environ``); an empty variable counts as unset.

        Raises :class:`~spotsafe.errors.ConfigError` naming the variable when a value cannot be used.
        """
        env = os.environ if environ is None else environ
        raw = {name: env.get(variable) or None for name, variable in VARIABLES.items()}
        return cls(
            checkpoint_url=raw["checkpoint_url"],
            run_id=raw["run_id"],
            attempt=_whole(raw["attempt"], ENV_ATTEMPT),
            job_store=raw["job_store"],
            pool=raw["pool"],
            events_file=raw["events_file"],
            notices=raw["notices"],
            notice_poll_s=_seconds(raw["notice_poll_s"], ENV_NOTICE_POLL),
            metrics_port=_whole(raw["metrics_port"], ENV_METRICS_PORT),
            metrics_addr=raw["metrics_addr"],
            on_damaged=raw["on_damaged"],
        )

    def with_(self, **changes: object) -> JobEnv:
        """A copy with ``changes`` (field names), validated again."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def store_or_default(self) -> str:
        """The job store a command should read: ``job_store`` or ``.spotsafe/jobs.sqlite``."""
        return self.job_store or DEFAULT_JOB_STORE


def _whole(text: str | None, variable: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"${variable} must be a whole number, got {text!r}") from None


def _seconds(text: str | None, variable: str) -> float | None:
    if text is None:
        return None
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"${variable} must be a number of seconds, got {text!r}") from None


__all__ = [
    "DEFAULT_JOB_STORE",
    "ENV_ATTEMPT",
    "ENV_CHECKPOINT_URL",
    "ENV_EVENTS_FILE",
    "ENV_JOB_STORE",
    "ENV_METRICS_ADDR",
    "ENV_METRICS_PORT",
    "ENV_NOTICES",
    "ENV_NOTICE_POLL",
    "ENV_ON_DAMAGED",
    "ENV_POOL",
    "ENV_RUN_ID",
    "VARIABLES",
    "JobEnv",
]
