"""Where a run's checkpoints live: folder names, the ``latest`` hint, and where a blob is stored.

Layout under the run's location::

    writers/gen-000003-3f9c2a1b.json            writer claims (see fencing)
    latest.json                                 a hint naming the newest commit; never trusted alone
    checkpoints/
      g000003-step-000000000120-1763869512345-9f2c/   one folder per save attempt
        model.bin  optimizer.bin  state.json ...        blobs, written and made durable first
        manifest.json                                   written last, atomically: the commit

A job of several ranks keeps one such layout per rank, under ``rank-<r>/`` (five digits) at the run's location.

Folder names sort by writer generation, then step, then creation time (milliseconds),
then four random hex digits, so :class:`CheckpointRef` orders oldest to newest.
A blob of an incremental checkpoint may live in an older checkpoint's folder
(``BlobEntry.checkpoint``): :func:`blob_key` says where.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from spotsafe.storage.base import Storage
from spotsafe.storage.manifest import BlobEntry

CHECKPOINTS = "checkpoints"
RANK_FOLDER = re.compile(r"rank-(\d{5})")
"""A rank's folder at a run's location (see :func:`rank_folder`)."""
LATEST = "latest.json"
_NAME = re.compile(r"^g(\d{6})-step-(\d{12})-(\d{13})-([0-9a-f]{4})$")


@dataclass(frozen=True, order=True)
class CheckpointRef:
    """A checkpoint folder, identified by name. Orders oldest to newest."""

    generation: int
    step: int
    created_ms: int
    name: str

    @property
    def key(self) -> str:
        return f"{CHECKPOINTS}/{self.name}"

    @classmethod
    def parse(cls, name: str) -> CheckpointRef | None:
        match = _NAME.fullmatch(name)
        if match is None:
            return None
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)), name)


def blob_key(ref: CheckpointRef, entry: BlobEntry) -> str:
    """Where ``entry`` of checkpoint ``ref`` is stored (its own folder, or the folder it shares)."""
    return f"{CHECKPOINTS}/{entry.checkpoint or ref.name}/{entry.path}"


def rank_folder(rank: int) -> str:
    """The name of rank ``rank``'s folder at a run's location: ``rank-00003``."""
    return f"rank-{rank:05d}"


def rank_of(name: str) -> int | None:
    """The rank whose folder ``name`` is (``None``: not a rank folder's name)."""
    match = RANK_FOLDER.fullmatch(name)
    return int(match[1]) if match is not None else None


def rank_folders(base: Storage) -> list[str]:
    """The rank folders (``rank-<r>``) at ``base``, a run's location, in rank order."""
    return sorted(name for name in base.list_dirs("") if rank_of(name) is not None)
