"""Persisting a whole snapshot through the commit protocol, straight from the live tensors.

This is the *direct* save (:mod:`spotsafe.engine.saver` uses it when the state
does not fit the staging budget, or with ``async_save=False``): it takes a
:class:`~spotsafe.state.snapshot.Snapshot` whose tensors must not change while it
runs, streams every tensor into its component's blob, and either commits the
whole checkpoint or leaves nothing visible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.manifest import Manifest
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository


def persist(
    repo: CheckpointRepository,
    snapshot: Snapshot,
    *,
    metadata: Mapping[str, Any],
    writer: Mapping[str, Any],
    generation: int = 0,
) -> tuple[CheckpointRef, Manifest]:
    """Write every blob of ``snapshot``, then commit its manifest.

    Durable and visible when it returns. On any error the partial folder is
    removed (best effort: a process killed here leaves it for the next start's
    cleanup) and the error propagates.
    """
    pending = repo.begin(snapshot.step, generation)
    try:
        for name, source in snapshot.blobs():
            pending.write_blob(name, source)
        manifest = pending.commit(metadata=dict(metadata), writer=dict(writer))
    except BaseException:
        if not pending.committed:
            with contextlib.suppress(Exception):
                pending.abort()
        raise
    return pending.ref, manifest
