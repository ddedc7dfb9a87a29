"""The run-management commands behind ``spotsafe ls / verify / inspect / gc``.

Output rules, shared by every command:

* tables and reports go to stdout; progress bars and notes go to stderr, bars only
  when stderr is a terminal (or ``--progress`` forces them), so ``--json`` output
  and redirected output stay clean;
* every URL shown goes through :func:`~spotsafe.storage.errors.redact_url` and every
  error message through :func:`redact` (which also knows the secrets of the URL and
  the ``--storage-option`` values given on this command line).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import click
import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from spotsafe.cli.consoles import console as make_console
from spotsafe.cli.live import bar_console
from spotsafe.engine.reader import RestoredState
from spotsafe.errors import ConfigError, CorruptCheckpointError, SpotsafeError
from spotsafe.exit_codes import EXIT_CRASH, EXIT_SUCCESS, EXIT_USAGE
from spotsafe.policy.retention import Candidate, KeepLast
from spotsafe.state.snapshot import decode_state
from spotsafe.storage import errors as storage_errors
from spotsafe.storage.base import BlobNotFoundError, Storage
from spotsafe.storage.errors import redact_url
from spotsafe.storage.local import local_root
from spotsafe.storage.manifest import Manifest
from spotsafe.storage.registry import open_storage, protocol_of
from spotsafe.storage.repository import CheckpointRef, CheckpointRepository
from spotsafe.storage.retry import RetryPolicy

EXIT_DAMAGED = EXIT_CRASH
"""Exit code when a command found damage (1)."""
EXIT_NOTHING = EXIT_USAGE
"""Exit code when nothing matched the selection (2)."""
MODEL_PARAMS_SHOWN = 50

out = make_console(highlight=False, soft_wrap=True)  # every column in full when piped (see cli.consoles)
err = make_console(stderr=True, highlight=False, soft_wrap=True)

# -- secrets and redaction ---------------------------------------------------

_SECRETS: set[str] = set()
_SECRET_OPTION = re.compile(r"key|secret|token|password|passwd|credential|sas|signature|connection", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` without credentials: the usual redaction plus this command line's own secrets."""
    return storage_errors.redact(text, tuple(sorted(_SECRETS, key=len, reverse=True)))


def _remember_secret(value: object) -> None:
    if isinstance(value, str) and len(value) >= 4:
        _SECRETS.add(value)


def _remember_option_secrets(options: Mapping[str, Any]) -> None:
    for key, value in options.items():
        if isinstance(value, Mapping):
            _remember_option_secrets(value)
        elif _SECRET_OPTION.search(str(key)):
            _remember_secret(value if isinstance(value, str) else json.dumps(value))


def remember_url_secrets(url: str) -> None:
    """Remember the user info and query values of ``url`` so that they are never printed.

    Whether the URL is acceptable at all is the library's decision (``open_storage`` refuses credentials).
    """
    if "://" not in url:
        return
    parts = urlsplit(url)
    for _, value in parse_qsl(parts.query, keep_blank_values=True):
        _remember_secret(value)
    userinfo = parts.netloc.rpartition("@")[0]
    if userinfo:
        user, _, password = userinfo.partition(":")
        for value in (userinfo, user, password):
            _remember_secret(value)


# -- options -----------------------------------------------------------------


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict; VALUE is JSON when it parses, else a string.

    A dotted KEY sets a nested value: ``client_kwargs.endpoint_url=http://...``.
    """
    options: dict[str, Any] = {}
    for n, item in enumerate(items, 1):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            # The item is not echoed: it may be a secret typed in the wrong place.
            raise click.BadParameter(f"item {n} has no '=': give each as OPTION=VALUE", param_hint="'--storage-option'")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        path = key.split(".")
        if any(not p for p in path):
            raise click.BadParameter(f"item {n} has an empty part in its name", param_hint="'--storage-option'")
        target = options
        for part in path[:-1]:
            child = target.setdefault(part, {})
            if not isinstance(child, dict):
                raise click.BadParameter(
                    f"item {n}: {'.'.join(path[:-1])} is set both to a value and to keys",
                    param_hint="'--storage-option'",
                )
            target = child
        target[path[-1]] = value
    _remember_option_secrets(options)
    return options


@dataclass
class Run:
    """An opened run location and how to report on it."""

    url: str
    repo: CheckpointRepository
    progress: bool | None = None

    @property
    def shown(self) -> str:
        return redact_url(self.url)

    @property
    def storage(self) -> Storage:
        return self.repo.storage

    def _bar_console(self) -> Console | None:
        """Where bars go: stderr when it is a terminal, stderr anyway when forced, else nowhere."""
        return bar_console(self.progress, err)

    def bar(self, *, count: bool = False) -> Progress:
        """A progress bar on stderr: shown when stderr is a terminal, or when forced with ``--progress``."""
        console = self._bar_console()
        columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
        if count:
            columns.append(MofNCompleteColumn())
        else:
            columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        columns.append(TimeRemainingColumn())
        return Progress(*columns, console=console or err, disable=console is None, transient=True)


def open_run(url: str, storage_options: Mapping[str, Any], retry_budget: float, progress: bool | None) -> Run:
    """Open ``url`` for management commands. A local folder must exist."""
    remember_url_secrets(url)
    if protocol_of(url) == "file":
        root = local_root(url)
        if not root.exists():
            raise ConfigError(f"{redact_url(url)}: no such folder")
        if not root.is_dir():
            raise ConfigError(f"{redact_url(url)}: not a folder")
    storage = open_storage(url, dict(storage_options) or None, retry=RetryPolicy(budget_s=retry_budget))
    return Run(url=url, repo=CheckpointRepository(storage), progress=progress)


# -- formatting helpers --------------------------------------------------------


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def utc_iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason(error: BaseException) -> str:
    return redact(str(error))


def _folder_bytes(storage: Storage, ref: CheckpointRef) -> int | None:
    """Total size of the files in a folder (for folders without a usable manifest)."""
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


def _print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, allow_nan=False))


# -- ls ------------------------------------------------------------------------


@dataclass
class FolderStatus:
    ref: CheckpointRef
    status: str  # "committed", "verified", "damaged", "shared" or "uncommitted"
    reason: str | None = None
    manifest: Manifest | None = None
    size: int | None = None
    latest: bool = False

    @property
    def created_at(self) -> float:
        return self.manifest.created_at if self.manifest is not None else self.ref.created_ms / 1000

    @property
    def label(self) -> str:
        if self.status == "damaged":
            return f"damaged: {self.reason}"
        if self.status == "uncommitted":
            return "uncommitted (leftover or in progress)"
        if self.status == "shared":
            return f"shared: {self.reason}"
        return self.status

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.ref.name,
            "step": self.ref.step,
            "generation": self.ref.generation,
            "created_at": utc_iso(self.created_at),
            "created_at_unix": self.created_at,
            "bytes": self.size,
            "blobs": len(self.manifest.blobs) if self.manifest is not None else None,
            "status": self.status,
            "reason": self.reason,
            "latest": self.latest,
        }


def _all_folders(repo: CheckpointRepository) -> tuple[list[CheckpointRef], set[CheckpointRef]]:
    """Every checkpoint folder newest first, and the committed ones among them."""
    committed = set(repo.committed())
    return sorted(set(repo.folders()) | committed, reverse=True), committed


def _check_folders(run: Run, *, verify: bool) -> tuple[list[FolderStatus], CheckpointRef | None]:
    repo = run.repo
    refs, committed = _all_folders(repo)
    latest = repo.read_latest()
    shared = repo.shared_folders() if len(refs) > len(committed) else {}
    rows: list[FolderStatus] = []
    for ref in refs:
        row = FolderStatus(ref=ref, status="uncommitted", latest=ref == latest)
        rows.append(row)
        if ref not in committed:
            row.size = _folder_bytes(run.storage, ref)
            if ref in shared:
                row.status = "shared"
                row.reason = f"deleted checkpoint; {shared[ref]} blob(s) still used by newer checkpoints"
            continue
        try:
            row.manifest = repo.check_sizes(ref)
            row.status = "committed"
            row.size = row.manifest.total_bytes
        except CorruptCheckpointError as error:
            row.status, row.reason = "damaged", _reason(error)
            try:
                row.manifest = repo.read_manifest(ref)
                row.size = row.manifest.total_bytes
            except CorruptCheckpointError:
                row.size = _folder_bytes(run.storage, ref)
    if verify:
        todo = [r for r in rows if r.status == "committed"]
        with run.bar() as bar:
            task = bar.add_task("verifying", total=sum(r.size or 0 for r in todo))
            for row in todo:
                try:
                    repo.verify(row.ref, lambda n: bar.advance(task, n))
                    row.status = "verified"
                except CorruptCheckpointError as error:
                    row.status, row.reason = "damaged", _reason(error)
    return rows, latest


def ls(run: Run, *, verify: bool, as_json: bool) -> int:
    rows, latest = _check_folders(run, verify=verify)
    if as_json:
        _print_json([r.to_json() for r in rows])
        return EXIT_SUCCESS
    if not rows:
        out.print(f"no checkpoints in {escape(run.shown)}")
        return EXIT_SUCCESS
    table = Table(title=f"checkpoints in {escape(run.shown)}", title_justify="left")
    table.add_column("latest", justify="center")
    table.add_column("step", justify="right")
    table.add_column("gen", justify="right")
    table.add_column("name", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("status")
    styles = {
        "committed": "green",
        "verified": "bold green",
        "damaged": "red",
        "uncommitted": "yellow",
        "shared": "cyan",
    }
    for row in rows:
        table.add_row(
            "*" if row.latest else "",
            str(row.ref.step),
            str(row.ref.generation),
            row.ref.name,
            utc_iso(row.created_at),
            human_bytes(row.size),
            f"[{styles[row.status]}]{escape(row.label)}[/]",
        )
    out.print(table)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    summary = ", ".join(
        f"{counts[s]} {s}" for s in ("verified", "committed", "damaged", "shared", "uncommitted") if s in counts
    )
    noun = "folder" if len(rows) == 1 else "folders"
    if latest is None:
        hint = "no latest.json"
    elif any(r.latest for r in rows):
        hint = f"* = latest.json points here ({latest.name})"
    else:
        hint = f"latest.json points at {latest.name}, which is not in the listing"
    out.print(escape(f"{len(rows)} checkpoint {noun}: {summary}; {hint}"))
    return EXIT_SUCCESS


# -- verify --------------------------------------------------------------------


def verify(run: Run, *, step: int | None, every: bool) -> int:
    repo = run.repo
    committed = repo.committed()
    if every:
        chosen = committed
    elif step is not None:
        chosen = [r for r in committed if r.step == step]
    else:
        chosen = committed[:1]
    if not chosen:
        if step is not None and not every:
            steps = ", ".join(str(s) for s in sorted({r.step for r in committed})) or "none"
            err.print(escape(f"no committed checkpoint at step {step} in {run.shown} (committed steps: {steps})"))
        else:
            err.print(escape(f"no committed checkpoints in {run.shown}"))
        return EXIT_NOTHING
    manifests: dict[CheckpointRef, Manifest] = {}
    results: dict[CheckpointRef, str | None] = {}
    for ref in chosen:
        try:
            manifests[ref] = repo.read_manifest(ref)
        except CorruptCheckpointError as error:
            results[ref] = _reason(error)
    with run.bar() as bar:
        task = bar.add_task("verifying", total=sum(m.total_bytes for m in manifests.values()))
        for ref in manifests:
            try:
                repo.verify(ref, lambda n: bar.advance(task, n))
                results[ref] = None
            except CorruptCheckpointError as error:
                results[ref] = _reason(error)
    damaged = 0
    for ref in chosen:
        reason = results[ref]
        size = human_bytes(manifests[ref].total_bytes) if ref in manifests else "-"
        where = f"{ref.name}  step {ref.step}  {size}"
        if reason is None:
            out.print(f"[green]OK[/]       {escape(where)}")
        else:
            damaged += 1
            out.print(f"[red]DAMAGED[/]  {escape(where)}: {escape(reason)}")
    verdict = f"{len(chosen) - damaged} of {len(chosen)} verified"
    out.print(escape(verdict + (f", {damaged} damaged" if damaged else "")))
    return EXIT_DAMAGED if damaged else EXIT_SUCCESS


# -- inspect -------------------------------------------------------------------


def _tensors(tree: Any) -> Iterator[torch.Tensor | np.ndarray[Any, Any]]:
    if isinstance(tree, (torch.Tensor, np.ndarray)):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def _nbytes(t: torch.Tensor | np.ndarray[Any, Any]) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return int(t.nbytes)


def _dtype(t: torch.Tensor | np.ndarray[Any, Any]) -> str:
    return str(t.dtype).removeprefix("torch.")


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.generic))


def describe_component(name: str, state: Any) -> dict[str, Any]:
    tensors = list(_tensors(state))
    doc: dict[str, Any] = {
        "name": name,
        "tensors": len(tensors),
        "tensor_bytes": sum(_nbytes(t) for t in tensors),
    }
    if name == "model" and isinstance(state, Mapping):
        doc["parameters"] = [
            {"name": str(key), "dtype": _dtype(value), "shape": list(value.shape)}
            for key, value in state.items()
            if isinstance(value, (torch.Tensor, np.ndarray))
        ]
    if name in ("progress", "loader") and isinstance(state, Mapping):
        doc["values"] = {str(k): _scalar(v) for k, v in state.items() if _is_scalar(v)}
    return doc


def _select_one(run: Run, step: int | None, name: str | None) -> CheckpointRef | None:
    repo = run.repo
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


def inspect(run: Run, *, step: int | None, name: str | None, as_json: bool) -> int:
    if step is not None and name is not None:
        raise click.UsageError("give --step or --name, not both")
    try:
        ref = _select_one(run, step, name)
    except CorruptCheckpointError as error:
        err.print(f"[red]DAMAGED[/] {escape(str(name))}: {escape(_reason(error))}")
        return EXIT_DAMAGED
    if ref is None:
        what = (
            f"checkpoint {name}"
            if name is not None
            else f"committed checkpoint at step {step}"
            if step is not None
            else "committed checkpoint"
        )
        err.print(escape(f"no {what} in {run.shown}"))
        return EXIT_NOTHING
    try:
        total = run.repo.read_manifest(ref).total_bytes
        with run.bar() as bar:
            task = bar.add_task(f"verifying and loading {ref.name}", total=total)
            loaded = run.repo.load(ref, lambda n: bar.advance(task, n))
        restored = RestoredState(checkpoint=loaded, decoded=decode_state(loaded.blobs, ref.name))
    except CorruptCheckpointError as error:
        err.print(f"[red]DAMAGED[/] {escape(ref.name)}: {escape(_reason(error))}")
        return EXIT_DAMAGED
    manifest = restored.checkpoint.manifest
    doc: dict[str, Any] = {
        "url": run.shown,
        "name": ref.name,
        "step": ref.step,
        "generation": ref.generation,
        "created_at": utc_iso(manifest.created_at),
        "created_at_unix": manifest.created_at,
        "bytes": manifest.total_bytes,
        "checksum_algorithm": manifest.checksum_algorithm,
        "writer": manifest.writer,
        "metadata": manifest.metadata,
        "blobs": [b.to_json() for b in manifest.blobs],
        "components": [describe_component(n, s) for n, s in restored.components.items()],
    }
    if as_json:
        _print_json(doc)
    else:
        _print_inspect(doc)
    return EXIT_SUCCESS


def _kv_table(title: str, values: Mapping[str, Any]) -> Table:
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        table.add_row(escape(str(key)), escape(text))
    return table


def _print_inspect(doc: Mapping[str, Any]) -> None:
    out.print(
        _kv_table(
            f"checkpoint in {doc['url']}",
            {
                "name": doc["name"],
                "step": doc["step"],
                "generation": doc["generation"],
                "created (UTC)": doc["created_at"],
                "size": f"{human_bytes(doc['bytes'])} ({doc['bytes']:,} bytes)",
                "status": "verified (every size and checksum)",
            },
        )
    )
    out.print(_kv_table("writer", doc["writer"]) if doc["writer"] else "writer: (none recorded)")
    out.print(_kv_table("metadata", doc["metadata"]) if doc["metadata"] else "metadata: (none)")
    blobs = Table(title=f"blobs ({doc['checksum_algorithm']})", title_justify="left")
    blobs.add_column("path", no_wrap=True)
    blobs.add_column("size", justify="right", no_wrap=True)
    blobs.add_column("checksum", no_wrap=True)
    for blob in doc["blobs"]:
        blobs.add_row(escape(blob["path"]), f"{blob['size']:,}", blob["checksum"])
    out.print(blobs)
    comps = Table(title="components", title_justify="left")
    comps.add_column("component", no_wrap=True)
    comps.add_column("tensors", justify="right")
    comps.add_column("tensor bytes", justify="right", no_wrap=True)
    comps.add_column("values")
    for comp in doc["components"]:
        values = ", ".join(f"{k}={json.dumps(v)}" for k, v in comp.get("values", {}).items())
        comps.add_row(escape(comp["name"]), str(comp["tensors"]), human_bytes(comp["tensor_bytes"]), escape(values))
    out.print(comps)
    for comp in doc["components"]:
        params = comp.get("parameters")
        if params is None:
            continue
        table = Table(title=f"{comp['name']} parameters ({len(params)})", title_justify="left")
        table.add_column("name", no_wrap=True)
        table.add_column("dtype", no_wrap=True)
        table.add_column("shape", no_wrap=True)
        for param in params[:MODEL_PARAMS_SHOWN]:
            table.add_row(escape(param["name"]), param["dtype"], str(tuple(param["shape"])))
        out.print(table)
        if len(params) > MODEL_PARAMS_SHOWN:
            out.print(f"... and {len(params) - MODEL_PARAMS_SHOWN} more")


# -- gc ------------------------------------------------------------------------


@dataclass
class GcItem:
    ref: CheckpointRef
    committed: bool
    delete: bool
    reason: str
    size: int | None = None
    notes: list[str] = field(default_factory=list)


def _timestamp(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, str):
        try:
            return _timestamp(datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _newest_write(storage: Storage, ref: CheckpointRef) -> float | None:
    """Newest modification time of the folder's files, when the backend reports one (best effort)."""
    inner: Any = storage
    while hasattr(inner, "inner"):
        inner = inner.inner
    fs, root = getattr(inner, "fs", None), getattr(inner, "root", None)
    if fs is None or not isinstance(root, str):
        return None
    try:
        entries = fs.ls(f"{root}/{ref.key}", detail=True)
    except Exception:  # noqa: BLE001 - an optional refinement; the folder name's time is the fallback
        return None
    newest: float | None = None
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
            stamp = _timestamp(entry.get(key))
            if stamp is not None:
                newest = stamp if newest is None else max(newest, stamp)
                break
    return newest


def _plan_gc(run: Run, keep: int, partial_older_than: float, now: float) -> tuple[list[GcItem], str | None]:
    repo = run.repo
    refs, committed_set = _all_folders(repo)
    committed = [r for r in refs if r in committed_set]
    damage: dict[CheckpointRef, str] = {}
    sizes: dict[CheckpointRef, int | None] = {}
    for ref in committed:
        try:
            sizes[ref] = repo.check_sizes(ref).total_bytes
        except CorruptCheckpointError as error:
            damage[ref] = _reason(error)
            sizes[ref] = _folder_bytes(run.storage, ref)
    # Only checkpoints older than the newest one that verifies (every checksum) may go: a damaged checkpoint
    # that nothing intact follows is the run's evidence. A storage error here is not damage: it propagates.
    newest_intact: CheckpointRef | None = None
    for ref in committed:
        if ref in damage:
            continue
        try:
            repo.verify(ref)
        except CorruptCheckpointError as error:
            damage[ref] = _reason(error)
            continue
        newest_intact = ref
        break
    candidates = [Candidate(name=r.name, step=r.step, intact=r == newest_intact) for r in committed]
    doomed = {c.name for c in KeepLast(keep).to_delete(candidates)}
    if newest_intact is not None and newest_intact.name in doomed:  # the rule promises this never happens
        raise AssertionError(f"retention chose the newest intact checkpoint {newest_intact.name}")
    items: list[GcItem] = []
    for i, ref in enumerate(committed):
        state = f"damaged: {damage[ref]}" if ref in damage else "verified" if ref == newest_intact else "sizes ok"
        if ref.name in doomed:
            reason = f"beyond the newest {keep} and older than the newest verified checkpoint ({state})"
        elif ref == newest_intact:
            reason = f"the newest intact checkpoint ({state})" if i >= keep else f"one of the newest {keep} ({state})"
        elif i < keep:
            reason = f"one of the newest {keep} ({state})"
        else:
            reason = f"kept: no intact checkpoint is newer, so it is evidence ({state})"
        items.append(GcItem(ref=ref, committed=True, delete=ref.name in doomed, reason=reason, size=sizes[ref]))
    shared = repo.shared_folders() if len(refs) > len(committed) else {}
    for ref in refs:
        if ref in committed_set:
            continue
        if ref in shared:
            reason = f"holds {shared[ref]} blob(s) that committed checkpoints share"
            items.append(
                GcItem(ref=ref, committed=False, delete=False, reason=reason, size=_folder_bytes(run.storage, ref))
            )
            continue
        written = max(ref.created_ms / 1000, _newest_write(run.storage, ref) or 0.0)
        age = now - written
        old = age > partial_older_than
        reason = (
            f"uncommitted, last written {age:.0f} s ago (limit {partial_older_than:g} s)"
            if old
            else f"uncommitted but recent ({max(age, 0):.0f} s ago): may be a save in progress"
        )
        items.append(GcItem(ref=ref, committed=False, delete=old, reason=reason, size=_folder_bytes(run.storage, ref)))
    items.sort(key=lambda item: item.ref, reverse=True)
    return items, newest_intact.name if newest_intact is not None else None


def gc(run: Run, *, keep: int, apply: bool, partial_older_than: float) -> int:
    items, newest_intact = _plan_gc(run, keep, partial_older_than, time.time())
    if not items:
        out.print(f"no checkpoints in {escape(run.shown)}: nothing to do")
        return EXIT_SUCCESS
    doomed = [item for item in items if item.delete]
    table = Table(title=f"gc of {escape(run.shown)}: keep the newest {keep}", title_justify="left")
    table.add_column("action", no_wrap=True)
    table.add_column("step", justify="right")
    table.add_column("name", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("why")
    for item in items:
        action = ("[red]delete[/]" if apply else "[yellow]would delete[/]") if item.delete else "keep"
        table.add_row(action, str(item.ref.step), item.ref.name, human_bytes(item.size), escape(item.reason))
    out.print(table)
    if newest_intact is None and any(item.committed for item in items):
        out.print("[yellow]no intact committed checkpoint found: no committed checkpoint will be deleted[/]")
    total = sum(item.size or 0 for item in doomed)
    n_ckpt = sum(item.committed for item in doomed)
    n_partial = len(doomed) - n_ckpt
    what = f"{n_ckpt} checkpoint(s) and {n_partial} uncommitted folder(s), {human_bytes(total)}"
    if not doomed:
        out.print("nothing to delete")
        return EXIT_SUCCESS
    if not apply:
        out.print(escape(f"dry run: would delete {what}; nothing was deleted (run again with --apply to delete)"))
        return EXIT_SUCCESS
    failures: list[str] = []
    deleted: list[GcItem] = []
    skipped: list[str] = []
    with run.bar(count=True) as bar:
        task = bar.add_task("deleting", total=len(doomed))
        for item in doomed:
            try:
                if item.committed:
                    run.repo.delete(item.ref)
                elif run.repo.is_committed(item.ref):
                    skipped.append(item.ref.name)  # committed since it was listed: not ours to remove
                else:
                    run.repo.sweep(item.ref, run.repo.live_keys())  # never a blob a checkpoint shares
                if item.ref.name not in skipped:
                    deleted.append(item)
            except SpotsafeError as error:
                failures.append(f"{item.ref.name}: {_reason(error)}")
            bar.advance(task)
    for name in skipped:
        out.print(escape(f"skipped {name}: it was committed after it was listed"))
    for failure in failures:
        err.print(f"[red]could not delete[/] {escape(failure)}")
    freed = sum(item.size or 0 for item in deleted)
    n_ckpt = sum(item.committed for item in deleted)
    out.print(
        escape(
            f"deleted {n_ckpt} checkpoint(s) and {len(deleted) - n_ckpt} uncommitted folder(s), "
            f"freed {human_bytes(freed)}" + (f"; {len(failures)} failed" if failures else "")
        )
    )
    return EXIT_CRASH if failures else EXIT_SUCCESS
