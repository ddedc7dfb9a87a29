"""What a run folder holds: every checkpoint folder, its state, and the checks behind ``ls``, ``verify`` and
``inspect``.

Plain functions over a :class:`~spotsafe.storage.repository.CheckpointRepository`; nothing here prints. Error
messages kept in the results (why a checkpoint is damaged) have passed through the command's
:class:`~spotsafe.storage.redactor.Redactor`.

Checks come in two strengths: the cheap one reads the manifest and compares every blob's size
(:meth:`~spotsafe.storage.repository.CheckpointRepository.check_sizes`); the full one also reads every byte and
compares checksums (:meth:`~spotsafe.storage.repository.CheckpointRepository.verify`). Damage
(:class:`~spotsafe.errors.CorruptCheckpointError`) is a result; any other storage error propagates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from spotsafe.errors import ConfigError, CorruptCheckpointError, SpotsafeError
from spotsafe.storage.base import BlobNotFoundError, Storage
from spotsafe.storage.errors import redact_url
from spotsafe.storage.local import local_root
from spotsafe.storage.manifest import Manifest
from spotsafe.storage.redactor import Redactor
from spotsafe.storage.registry import open_storage, protocol_of
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository, ProgressFn
from spotsafe.storage.retry import StorageRetry


@dataclass(frozen=True)
class RunFolder:
    """An opened run location: its URL as given and the repository over it."""

    url: str
    repo: CheckpointRepository

    @property
    def shown(self) -> str:
        """The URL as it may be shown (no credentials)."""
        return redact_url(self.url)

    @property
    def storage(self) -> Storage:
        return self.repo.storage


def open_run_folder(url: str, storage_options: Mapping[str, Any], *, retry_budget: float) -> RunFolder:
    """Open ``url`` for reading and managing its checkpoints; transient storage errors are retried for
    ``retry_budget`` seconds. A local folder must exist (nothing is created): :class:`ConfigError` otherwise."""
    if protocol_of(url) == "file":
        root = local_root(url)
        if not root.exists():
            raise ConfigError(f"{redact_url(url)}: no such folder")
        if not root.is_dir():
            raise ConfigError(f"{redact_url(url)}: not a folder")
    storage = open_storage(url, dict(storage_options) or None, retry=StorageRetry(budget_s=retry_budget))
    return RunFolder(url=url, repo=CheckpointRepository(storage))


class FolderState(StrEnum):
    """What a checkpoint folder is, from the checks made so far.

    ``uncommitted`` -> ``shared`` (its blobs are used by newer checkpoints); ``committed`` (sizes checked) ->
    ``verified`` (checksums too) or ``damaged``.
    """

    COMMITTED = "committed"
    VERIFIED = "verified"
    DAMAGED = "damaged"
    SHARED = "shared"
    UNCOMMITTED = "uncommitted"


@dataclass
class FolderStatus:
    """One checkpoint folder and what the checks found."""

    ref: CheckpointRef
    state: FolderState
    reason: str | None = None
    """Why it is damaged, or what it shares (for ``damaged`` and ``shared``)."""
    manifest: Manifest | None = None
    size: int | None = None
    """Bytes: the manifest's total, else the folder's files added up (``None`` if they could not be listed)."""
    latest: bool = False
    """``latest.json`` points at it."""

    @property
    def created_at(self) -> float:
        """Unix time: the manifest's, else the folder name's."""
        return self.manifest.created_at if self.manifest is not None else self.ref.created_ms / 1000

    @property
    def blobs(self) -> int | None:
        return len(self.manifest.blobs) if self.manifest is not None else None


def all_folders(repo: CheckpointRepository) -> tuple[list[CheckpointRef], set[CheckpointRef]]:
    """Every checkpoint folder newest first, and the committed ones among them."""
    committed = set(repo.committed())
    return sorted(set(repo.folders()) | committed, reverse=True), committed


def folder_bytes(storage: Storage, ref: CheckpointRef) -> int | None:
    """Total size of the files in a folder (for folders without a usable manifest); ``None`` if unlistable."""
    total = 0
    try:
        names = storage.list_files(ref.key)
    except SpotsafeError:
        return None
    for name in names:
        try:
            total += storage.size(f"{ref.key}/{name}")
        except BlobNotFoundError:
            continue
    return total


def check_folders(repo: CheckpointRepository, redactor: Redactor) -> tuple[list[FolderStatus], CheckpointRef | None]:
    """Every folder newest first with the cheap check made on the committed ones, and where ``latest.json``
    points."""
    refs, committed = all_folders(repo)
    latest = repo.read_latest()
    shared = repo.shared_folders() if len(refs) > len(committed) else {}
    rows: list[FolderStatus] = []
    for ref in refs:
        row = FolderStatus(ref=ref, state=FolderState.UNCOMMITTED, latest=ref == latest)
        rows.append(row)
        if ref not in committed:
            row.size = folder_bytes(repo.storage, ref)
            if ref in shared:
                row.state = FolderState.SHARED
                row.reason = f"deleted checkpoint; {shared[ref]} blob(s) still used by newer checkpoints"
            continue
        try:
            row.manifest = repo.check_sizes(ref)
            row.state = FolderState.COMMITTED
            row.size = row.manifest.total_bytes
        except CorruptCheckpointError as error:
            row.state, row.reason = FolderState.DAMAGED, redactor.reason(error)
            try:
                row.manifest = repo.read_manifest(ref)
                row.size = row.manifest.total_bytes
            except CorruptCheckpointError:
                row.size = folder_bytes(repo.storage, ref)
    return rows, latest


def verify_each(
    repo: CheckpointRepository, refs: Sequence[CheckpointRef], redactor: Redactor, progress: ProgressFn | None = None
) -> dict[CheckpointRef, str | None]:
    """Read and checksum every blob of each of ``refs``: ``None`` for an intact one, else why it is damaged.

    ``progress(n)`` is told of the bytes read as they are read.
    """
    results: dict[CheckpointRef, str | None] = {}
    for ref in refs:
        try:
            repo.verify(ref, progress)
            results[ref] = None
        except CorruptCheckpointError as error:
            results[ref] = redactor.reason(error)
    return results


def verify_rows(
    repo: CheckpointRepository, rows: Sequence[FolderStatus], redactor: Redactor, progress: ProgressFn | None = None
) -> None:
    """The full check of the ``committed`` rows among ``rows``: each becomes ``verified`` or ``damaged``."""
    todo = [r for r in rows if r.state is FolderState.COMMITTED]
    found = verify_each(repo, [r.ref for r in todo], redactor, progress)
    for row in todo:
        reason = found[row.ref]
        row.state = FolderState.VERIFIED if reason is None else FolderState.DAMAGED
        row.reason = reason


def committed_to_verify(repo: CheckpointRepository, *, step: int | None, every: bool) -> list[CheckpointRef]:
    """The committed checkpoints ``verify`` checks, newest first: all of them, those at ``step``, or the newest."""
    committed = repo.committed()
    if every:
        return committed
    if step is not None:
        return [r for r in committed if r.step == step]
    return committed[:1]


def read_manifests(
    repo: CheckpointRepository, refs: Sequence[CheckpointRef], redactor: Redactor
) -> tuple[dict[CheckpointRef, Manifest], dict[CheckpointRef, str]]:
    """The manifests of ``refs`` that can be read, and why the others cannot."""
    manifests: dict[CheckpointRef, Manifest] = {}
    unreadable: dict[CheckpointRef, str] = {}
    for ref in refs:
        try:
            manifests[ref] = repo.read_manifest(ref)
        except CorruptCheckpointError as error:
            unreadable[ref] = redactor.reason(error)
    return manifests, unreadable


def select_checkpoint(repo: CheckpointRepository, *, step: int | None, name: str | None) -> CheckpointRef | None:
    """The committed checkpoint named ``name``, else the newest at ``step``, else the newest; ``None`` if there
    is none.

    Raises :class:`ConfigError` when ``name`` is no checkpoint folder name, and
    :class:`~spotsafe.errors.CorruptCheckpointError` when the named folder exists but was never committed.
    """
    if name is not None:
        ref = CheckpointRef.parse(name)
        if ref is None:
            raise ConfigError(f"{name!r} is not a checkpoint folder name (g<generation>-step-<step>-<ms>-<hex>)")
        if not repo.is_committed(ref):
            if ref in set(repo.folders()):
                raise CorruptCheckpointError("the folder has no committed manifest (a leftover or a save in progress)")
            return None
        return ref
    committed = repo.committed()
    if step is not None:
        committed = [r for r in committed if r.step == step]
    return committed[0] if committed else None
