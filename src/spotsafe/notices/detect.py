"""Which notice sources apply here, decided from the environment without touching the network.

``$SPOTSAFE_NOTICES`` decides when set: ``auto`` (the default), ``none``, or a comma list of
``aws``, ``gcp``, ``azure``, ``kubernetes``, ``slurm``, ``signals``. ``auto`` looks at:

========== ==========================================================================================
aws        ``$AWS_EC2_METADATA_SERVICE_ENDPOINT`` set, or DMI vendor ``Amazon EC2``, or a Xen ``ec2`` UUID
gcp        ``$GCE_METADATA_HOST`` set, or DMI product ``Google Compute Engine``
azure      ``$SPOTSAFE_AZURE_METADATA_ENDPOINT`` set, or Azure's DMI chassis asset tag
kubernetes ``$KUBERNETES_SERVICE_HOST`` set (SIGTERM with ``$SPOTSAFE_GRACE_SECONDS``, default 30 s)
torchrun   ``$TORCHELASTIC_RUN_ID`` set: a torchrun worker, whose SIGTERM from torchrun is followed by SIGKILL
           after torchrun's ``--shutdown-timeout`` (default 30 s; ``$SPOTSAFE_GRACE_SECONDS`` if set otherwise)
slurm      ``$SLURM_JOB_ID`` set (``SIGUSR1`` with ``$SPOTSAFE_SLURM_SIGNAL_LEAD`` seconds;
           ``$SPOTSAFE_SLURM_REQUEUE=1`` runs ``scontrol requeue`` after the emergency save)
========== ==========================================================================================

Reading a few small files under ``/sys`` costs microseconds; the watchers then poll on
their own threads, so detection never stalls start-up. ``$AWS_EC2_METADATA_DISABLED=true``
(botocore's switch) turns AWS off. ``$SPOTSAFE_NOTICE_POLL_SECONDS`` overrides the AWS
and Azure poll intervals (5 s and 1 s), ``$SPOTSAFE_AZURE_ACKNOWLEDGE=1`` approves Azure
events once the emergency checkpoint is durable.
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from spotsafe.errors import ConfigError
from spotsafe.jobenv import ENV_NOTICE_POLL, ENV_NOTICES, JobEnv
from spotsafe.notices.aws import AwsSpotNotices
from spotsafe.notices.azure import ENV_ENDPOINT as ENV_AZURE_ENDPOINT
from spotsafe.notices.azure import AzureScheduledEvents
from spotsafe.notices.base import NoticeSource
from spotsafe.notices.gcp import GcpNotices
from spotsafe.notices.signals import DEFAULT_SIGNALS, SignalNotices
from spotsafe.notices.slurm import SlurmNotices

ENV_GRACE = "SPOTSAFE_GRACE_SECONDS"
ENV_SLURM_LEAD = "SPOTSAFE_SLURM_SIGNAL_LEAD"
ENV_SLURM_REQUEUE = "SPOTSAFE_SLURM_REQUEUE"
ENV_AZURE_ACK = "SPOTSAFE_AZURE_ACKNOWLEDGE"
KNOWN = ("aws", "gcp", "azure", "kubernetes", "torchrun", "slurm", "signals")
PROVIDERS = ("aws", "gcp", "azure")
AZURE_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
KUBERNETES_GRACE_S = 30.0
TORCHRUN_GRACE_S = 30.0
"""torchrun's default ``--shutdown-timeout``: from its SIGTERM to its workers to its SIGKILL."""


@dataclass(frozen=True)
class Detection:
    """What was found, and why (for the ``notice_source`` events)."""

    names: tuple[str, ...]
    reasons: dict[str, str]


def _read(root: str, name: str) -> str:
    try:
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as handle:
            return handle.read(256).strip()
    except OSError:
        return ""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _contract(env: Mapping[str, str]) -> JobEnv:
    """The job contract's notice settings (``$SPOTSAFE_NOTICES``, ``$SPOTSAFE_NOTICE_POLL_SECONDS``) in ``env``;
    the contract's other variables are not this module's to judge."""
    return JobEnv.from_env({k: env[k] for k in (ENV_NOTICES, ENV_NOTICE_POLL) if k in env})


def _seconds(env: Mapping[str, str], key: str) -> float | None:
    value = env.get(key)
    if value in (None, ""):
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except ValueError as err:
        raise ConfigError(f"${key} must be a number of seconds, got {value!r}") from err
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigError(f"${key} must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def detect(
    env: Mapping[str, str] | None = None,
    *,
    dmi_root: str = "/sys/class/dmi/id",
    hypervisor_uuid: str = "/sys/hypervisor/uuid",
) -> Detection:
    """The sources that apply here (see the module docstring). Never uses the network."""
    env = os.environ if env is None else env
    setting = (_contract(env).notices or "auto").strip().lower()
    if setting == "none":
        return Detection((), {})
    if setting != "auto":
        names = tuple(n.strip() for n in setting.split(",") if n.strip())
        unknown = [n for n in names if n not in KNOWN]
        if unknown:
            raise ConfigError(
                f"${ENV_NOTICES}: unknown source(s) {unknown}; use auto, none or a list of {', '.join(KNOWN)}"
            )
        return Detection(names, {n: f"${ENV_NOTICES}" for n in names})
    reasons: dict[str, str] = {}
    vendor, product, board = (
        _read(dmi_root, "sys_vendor"),
        _read(dmi_root, "product_name"),
        _read(dmi_root, "board_vendor"),
    )
    if not _truthy(env.get("AWS_EC2_METADATA_DISABLED")):
        if env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"):
            reasons["aws"] = "$AWS_EC2_METADATA_SERVICE_ENDPOINT"
        elif "Amazon EC2" in (vendor, board):
            reasons["aws"] = "DMI vendor Amazon EC2"
        elif _read("/", hypervisor_uuid.lstrip("/")).lower().startswith("ec2"):
            reasons["aws"] = "Xen ec2 hypervisor UUID"
    if env.get("GCE_METADATA_HOST"):
        reasons["gcp"] = "$GCE_METADATA_HOST"
    elif product == "Google Compute Engine" or vendor == "Google":
        reasons["gcp"] = "DMI product Google Compute Engine"
    if env.get(ENV_AZURE_ENDPOINT):
        reasons["azure"] = f"${ENV_AZURE_ENDPOINT}"
    elif _read(dmi_root, "chassis_asset_tag") == AZURE_ASSET_TAG:
        reasons["azure"] = "Azure chassis asset tag"
    if env.get("KUBERNETES_SERVICE_HOST"):
        reasons["kubernetes"] = "$KUBERNETES_SERVICE_HOST"
    if env.get("TORCHELASTIC_RUN_ID"):
        reasons["torchrun"] = "$TORCHELASTIC_RUN_ID"
    if env.get("SLURM_JOB_ID"):
        reasons["slurm"] = "$SLURM_JOB_ID"
    reasons["signals"] = "always"
    return Detection(tuple(n for n in KNOWN if n in reasons), reasons)


def build_sources(
    names: Iterable[str],
    *,
    env: Mapping[str, str] | None = None,
    signals: Iterable[int] = DEFAULT_SIGNALS,
    handle_signals: bool = True,
    grace_s: float | None = None,
) -> list[NoticeSource]:
    """Notice sources for ``names`` (from :func:`detect`), configured from ``env``.

    Signal handling is one source: the Slurm warning signal goes to :class:`SlurmNotices`,
    the others to a :class:`SignalNotices` named ``kubernetes`` or ``torchrun`` (deadline: the grace
    period, 30 s unless set) or after the signal. Signals are always handled (``signals`` in ``names`` or not);
    ``handle_signals=False`` drops them.
    """
    env = os.environ if env is None else env
    names = tuple(names)
    poll = _contract(env).notice_poll_s  # > 0 when set
    sources: list[NoticeSource] = []
    if "aws" in names:
        sources.append(AwsSpotNotices(env=env, poll_s=poll or 5.0))
    if "gcp" in names:
        sources.append(GcpNotices(env=env))
    if "azure" in names:
        sources.append(AzureScheduledEvents(env=env, acknowledge=_truthy(env.get(ENV_AZURE_ACK)), poll_s=poll or 1.0))
    if not handle_signals:
        return sources
    wanted = [signal.Signals(s) for s in signals]
    grace = grace_s if grace_s is not None else _seconds(env, ENV_GRACE)
    if "slurm" in names and signal.SIGUSR1 in wanted:
        wanted.remove(signal.SIGUSR1)
        sources.append(
            SlurmNotices(
                job_id=env.get("SLURM_JOB_ID"),
                lead_s=_seconds(env, ENV_SLURM_LEAD),
                requeue=_truthy(env.get(ENV_SLURM_REQUEUE)),
            )
        )
    if wanted:
        if "kubernetes" in names or "torchrun" in names:
            # Under both, the pod's SIGTERM reaches the workers through torchrun at once: the shorter grace counts.
            default = min(
                g for n, g in (("kubernetes", KUBERNETES_GRACE_S), ("torchrun", TORCHRUN_GRACE_S)) if n in names
            )
            source = "kubernetes" if "kubernetes" in names else "torchrun"
            sources.append(SignalNotices(wanted, grace_seconds=grace if grace is not None else default, source=source))
        else:
            sources.append(SignalNotices(wanted, grace_seconds=grace))
    return sources
