"""One exception tree for spotsafe.

Every error the library raises on purpose derives from :class:`SpotsafeError`.
Errors are split into *transient* (retrying the same operation later may
succeed: a throttled or unreachable store) and *permanent* (retrying will not
help until a person changes something). Only transient errors are ever retried,
and only by one retry mechanism (the storage layer's, in a later release).

Each message says what went wrong and what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence

from spotsafe.exit_codes import EXIT_NO_USABLE_CHECKPOINT, EXIT_USAGE


class SpotsafeError(Exception):
    """Root of every error spotsafe raises on purpose."""


class TransientError(SpotsafeError):
    """The operation may succeed if tried again later."""


class PermanentError(SpotsafeError):
    """The operation will not succeed until something is changed."""


class ConfigError(PermanentError, ValueError):
    """A configuration value is invalid; the message names it and the fix."""


class StateError(PermanentError):
    """Training state cannot be captured or applied (unsupported type, mismatch)."""


class StorageError(SpotsafeError):
    """Base of errors raised by a storage backend, translated at the boundary."""


class TransientStorageError(StorageError, TransientError):
    """A storage call failed in a way that may pass on retry."""


class PermanentStorageError(StorageError, PermanentError):
    """A storage call failed in a way that will not pass on retry."""


class CheckpointError(PermanentError):
    """Base of errors about one specific checkpoint."""

    def __init__(self, message: str, *, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class CorruptCheckpointError(CheckpointError):
    """A checkpoint is incomplete, fails its checksums, or is malformed.

    Restore treats it as absent and falls back to an older checkpoint.
    """


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint tries something a checkpoint must never do.

    For example a manifest path that escapes the checkpoint directory, or an
    unknown type tag. Treated like corruption: never followed, never executed.
    """


class CheckpointMismatchError(CheckpointError):
    """A valid checkpoint does not fit the objects it is being loaded into.

    This is not corruption (an older checkpoint would not fit either): the model
    or optimizer changed since the checkpoint was written.
    """


class NoUsableCheckpointError(CheckpointError, SystemExit):
    """The run has committed checkpoints, and none of them can be restored.

    Raised by ``restore()`` instead of starting over from step 0 (which would discard the
    run's progress and, through retention, its evidence). ``damaged`` lists each checkpoint
    tried with what is wrong with it.

    It is an ordinary :class:`Exception` to ``except`` clauses, and also a
    :class:`SystemExit` with code :data:`~spotsafe.exit_codes.EXIT_NO_USABLE_CHECKPOINT`
    (65): left uncaught, the process exits with 65, which ``spotsafe run`` treats as final
    (relaunching would meet the same checkpoints) rather than as a crash.
    """

    def __init__(self, message: str, *, damaged: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.damaged = list(damaged)
        self.code = EXIT_NO_USABLE_CHECKPOINT


class WorldSizeMismatchError(CheckpointMismatchError, SystemExit):
    """The run's checkpoints were written by another number of processes than this job runs.

    Raised by ``restore()`` instead of starting over or resuming only some ranks (see
    :mod:`spotsafe.engine.world`). ``saved`` is the number of processes that wrote them, ``world_size``
    this job's. Left uncaught, the process exits with :data:`~spotsafe.exit_codes.EXIT_USAGE` (2): the
    command must change, so ``spotsafe run`` does not relaunch it as it is.
    """

    def __init__(self, message: str, *, saved: int, world_size: int) -> None:
        super().__init__(message)
        self.saved, self.world_size = saved, world_size
        self.code = EXIT_USAGE
