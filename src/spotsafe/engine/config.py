"""The Checkpointer's settings, one frozen value per concern, each checked when it is made.

* :class:`SaveConfig`: what and when to save (the policy, retention, how a save is written);
* :class:`NoticeConfig`: where stop notices come from and what a stop does;
* :class:`StorageConfig`: where the run lives and how storage is reached.

``Checkpointer(url, keep=5, grace_s=20, ...)`` builds them from its keyword arguments (each
keyword is a field of exactly one of them); ``Checkpointer(save_config=SaveConfig(keep=5), ...)``
passes one whole. A wrong value raises :class:`~spotsafe.errors.ConfigError` in
``__post_init__``, naming the setting, what was given and what is expected, before anything is
opened. Values given as iterators are read once, here (``signals``, ``notices``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from spotsafe.checks import (
    check_bool,
    check_choice,
    check_instance,
    check_int,
    check_mapping,
    check_number,
    check_signals,
    fail,
    given,
)
from spotsafe.engine.options import OVERLAP_NEEDS, check_budget, check_location, check_metadata, check_notices
from spotsafe.errors import ConfigError
from spotsafe.jobenv import ENV_CHECKPOINT_URL
from spotsafe.notices.base import NoticeSource
from spotsafe.notices.signals import DEFAULT_SIGNALS
from spotsafe.policy.interval import SavePolicy, every
from spotsafe.storage.retry import DEFAULT_RETRY, StorageRetry

DEFAULT_POLICY: SavePolicy = every(minutes=10)
WHEN_BUSY = ("wait", "skip")

C = TypeVar("C", "SaveConfig", "NoticeConfig", "StorageConfig")


@dataclass(frozen=True, kw_only=True)
class SaveConfig:
    """What and when to save.

    Attributes:
        policy: when to take regular checkpoints (``None``: ``every(minutes=10)``).
        keep: committed checkpoints to keep (the newest intact one is never deleted).
        async_save: snapshot into staging memory and write in the background; ``False`` writes
            on the training thread.
        incremental: write only the chunks that changed since the last commit; share the rest.
        overlap: copy the optimizer-owned state while forward/backward run; block only before
            ``optimizer.step()`` (needs an optimizer and ``async_save``).
        staging_budget: most host memory for staging (bytes, or ``"8GB"``); ``"auto"``: half the
            machine's memory; ``None``: no limit. :attr:`staging_bytes` is the resolved number.
        when_busy: an interval save while the previous one is still written: ``"wait"`` or ``"skip"``.
        metadata: JSON values stored in every manifest (kept as a copy).
        progress_interval: seconds between ``progress`` events (0: every step).
        sharded: one checkpoint for all ranks through torch.distributed.checkpoint (see
            :mod:`spotsafe.engine.sharded_state`): resumable at another number of ranks. ``False``: each
            rank saves its whole state under ``<url>/rank-<r>``.
    """

    policy: SavePolicy = DEFAULT_POLICY
    keep: int = 3
    async_save: bool = True
    incremental: bool = True
    overlap: bool = False
    staging_budget: int | str | None = "auto"
    when_busy: str = "wait"
    metadata: Mapping[str, Any] | None = None
    progress_interval: float = 1.0
    sharded: bool = False
    staging_bytes: int | None = field(init=False, default=None, compare=False)

    def __post_init__(self) -> None:
        hint = "; call it: every(steps=500)" if callable(self.policy) else ""
        expected = "a save policy such as spotsafe.every(steps=500)"
        check_instance("policy", self.policy, SavePolicy, expected, allow_none=True, hint=hint)
        if self.policy is None:
            object.__setattr__(self, "policy", DEFAULT_POLICY)
        check_int("keep", self.keep, at_least=1)
        for name in ("async_save", "incremental", "overlap", "sharded"):
            check_bool(name, getattr(self, name))
        if self.overlap and not self.async_save:
            raise ConfigError(OVERLAP_NEEDS)
        if self.overlap and self.sharded:
            raise ConfigError("overlap=True is not available with sharded=True (DCP copies the state at once)")
        object.__setattr__(self, "staging_bytes", check_budget(self.staging_budget))
        check_choice("when_busy", self.when_busy, WHEN_BUSY)
        object.__setattr__(self, "metadata", check_metadata(self.metadata))
        check_number("progress_interval", self.progress_interval, at_least=0, unit="seconds")


@dataclass(frozen=True, kw_only=True)
class NoticeConfig:
    """Where stop notices come from, and what a stop does.

    Attributes:
        notices: ``"auto"``: detect the provider (AWS, GCP, Azure), Kubernetes and Slurm from the
            environment (see :mod:`spotsafe.notices.detect`); or notice sources, used as given
            (plus signal handling when ``handle_signals``). Kept as a tuple.
        handle_signals: install handlers for ``signals`` (main thread only).
        signals: the signals that mean "about to be stopped" (kept as a tuple).
        grace_s: seconds from a signal to the hard stop; ``None``: unknown, or
            ``$SPOTSAFE_GRACE_SECONDS``, or 30 s under Kubernetes.
        exit_on_notice: after the emergency save exit with 75; ``False``: ``step_done`` returns and
            ``stop_requested`` is true (the caller must stop).
    """

    notices: Iterable[NoticeSource] | str = "auto"
    handle_signals: bool = True
    signals: Iterable[int] = DEFAULT_SIGNALS
    grace_s: float | None = None
    exit_on_notice: bool = True

    def __post_init__(self) -> None:
        check_bool("handle_signals", self.handle_signals)
        object.__setattr__(self, "signals", check_signals("signals", self.signals))
        check_number("grace_s", self.grace_s, at_least=0, unit="seconds", allow_none=True)
        check_bool("exit_on_notice", self.exit_on_notice)
        object.__setattr__(self, "notices", check_notices(self.notices))


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Where the run lives and how its storage is reached.

    Attributes:
        url: a local folder, ``s3://bucket/run``, ``gs://...``, ``az://...``, ``memory://...``
            (``None``: ``$SPOTSAFE_CHECKPOINT_URL``, or an injected ``storage``).
        stage_dir: a fast local folder: saves commit there first, then upload (local-then-upload).
        storage_options: passed to the fsspec file system (credentials, endpoint, ...).
        retry: how transient storage errors are retried (default: a 120 s budget); ``None``: never.
    """

    url: str | os.PathLike[str] | None = None
    stage_dir: str | os.PathLike[str] | None = None
    storage_options: Mapping[str, Any] | None = None
    retry: StorageRetry | None = DEFAULT_RETRY

    def __post_init__(self) -> None:
        root = check_location("url", self.url, allow_none=True)
        stage_root = check_location("stage_dir", self.stage_dir, allow_none=True)
        if self.stage_dir is not None and stage_root is None:
            fail("stage_dir", "a local folder (a fast local disk) or None", self.stage_dir)
        if stage_root is not None and stage_root == root:
            raise ConfigError(
                "stage_dir must differ from the run's location (the local copies would mix with the run's), "
                f"got {given(self.stage_dir)} for both"
            )
        check_mapping("storage_options", self.storage_options, keys="str", allow_none=True)
        check_instance("retry", self.retry, StorageRetry, "a spotsafe.storage.StorageRetry", allow_none=True)


def settings(kind: type[C], whole: C | None, keywords: Mapping[str, Any]) -> C:
    """The ``kind`` settings: ``whole`` as given, or built from the Checkpointer's ``keywords`` (its field names).

    Passing ``whole`` together with a keyword of its group that is not at its default raises
    :class:`~spotsafe.errors.ConfigError`: each setting is given once.
    """
    own = {f.name: keywords[f.name] for f in fields(kind) if f.init}
    if whole is None:
        return kind(**own)
    name = {SaveConfig: "save_config", NoticeConfig: "notice_config", StorageConfig: "storage_config"}[kind]
    check_instance(name, whole, kind, f"a spotsafe.engine.config.{kind.__name__}", allow_none=True)
    defaults = {f.name: f.default for f in fields(kind) if f.init}
    twice = [k for k, v in own.items() if not _unset(v, defaults[k])]
    if twice:
        raise ConfigError(
            f"{', '.join(twice)} given both as keyword and inside {name}=; give each setting once "
            f"(dataclasses.replace({name}, {twice[0]}=...) makes a changed copy)"
        )
    return whole


def _unset(value: object, default: object) -> bool:
    """Whether a keyword still holds its default (``policy=None`` means the default policy)."""
    if value is default or (value is None and default is DEFAULT_POLICY):
        return True
    return type(value) is type(default) and value == default


def replace_url(config: StorageConfig, url: str | os.PathLike[str]) -> StorageConfig:
    """A copy of ``config`` with another ``url`` (checked again)."""
    return dataclasses.replace(config, url=url)


def located(config: StorageConfig, storage: object, env_url: str | None) -> StorageConfig:
    """``config`` with a location: its ``url``, an injected ``storage``, or ``env_url`` (the environment's)."""
    if config.url is not None or storage is not None:
        return config
    if not env_url:
        raise ConfigError(
            f"no checkpoint location: pass Checkpointer(url=...) or set ${ENV_CHECKPOINT_URL} (for example runs/my-run)"
        )
    return replace_url(config, env_url)


__all__ = ["DEFAULT_POLICY", "NoticeConfig", "SaveConfig", "StorageConfig", "settings"]
