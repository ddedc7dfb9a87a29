"""What ``spotsafe ls / verify / inspect / gc`` print (the options are in :mod:`spotsafe.cli.inspect_cmds`).

The checks and the plans are the library's (:mod:`spotsafe.storage.inventory`, :mod:`spotsafe.storage.gc`);
this module turns their results into tables, JSON and exit codes, by the rules of :mod:`spotsafe.cli.output`.
Each function returns the command's exit code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from spotsafe.cli.output import EXIT_DAMAGED, EXIT_NOTHING, Bars, err, human_bytes, out, print_json, utc_iso
from spotsafe.engine.reader import RestoredState
from spotsafe.errors import CorruptCheckpointError, UnsafeCheckpointError
from spotsafe.exit_codes import EXIT_CRASH, EXIT_SUCCESS
from spotsafe.state.describe import describe_component
from spotsafe.state.snapshot import decode_state
from spotsafe.storage.gc import GcPlan, apply_gc, plan_gc
from spotsafe.storage.inventory import (
    FolderState,
    FolderStatus,
    RunFolder,
    check_folders,
    committed_to_verify,
    read_manifests,
    select_checkpoint,
    verify_each,
    verify_rows,
)
from spotsafe.storage.redactor import Redactor

MODEL_PARAMS_SHOWN = 50
STYLES = {
    FolderState.COMMITTED: "green",
    FolderState.VERIFIED: "bold green",
    FolderState.DAMAGED: "red",
    FolderState.UNCOMMITTED: "yellow",
    FolderState.SHARED: "cyan",
}
SUMMARY_ORDER = (
    FolderState.VERIFIED,
    FolderState.COMMITTED,
    FolderState.DAMAGED,
    FolderState.SHARED,
    FolderState.UNCOMMITTED,
)

# -- ls ------------------------------------------------------------------------


def _label(row: FolderStatus) -> str:
    if row.state is FolderState.DAMAGED:
        return f"damaged: {row.reason}"
    if row.state is FolderState.UNCOMMITTED:
        return "uncommitted (leftover or in progress)"
    if row.state is FolderState.SHARED:
        return f"shared: {row.reason}"
    return row.state.value


def _folder_json(row: FolderStatus) -> dict[str, Any]:
    return {
        "name": row.ref.name,
        "step": row.ref.step,
        "generation": row.ref.generation,
        "created_at": utc_iso(row.created_at),
        "created_at_unix": row.created_at,
        "bytes": row.size,
        "blobs": row.blobs,
        "status": row.state.value,
        "reason": row.reason,
        "latest": row.latest,
    }


def ls(folder: RunFolder, bars: Bars, redactor: Redactor, *, verify: bool, as_json: bool) -> int:
    rows, latest = check_folders(folder.repo, redactor)
    if verify:
        todo = [r for r in rows if r.state is FolderState.COMMITTED]
        with bars.bar() as bar:
            task = bar.add_task("verifying", total=sum(r.size or 0 for r in todo))
            verify_rows(folder.repo, todo, redactor, lambda n: bar.advance(task, n))
    if as_json:
        print_json([_folder_json(r) for r in rows])
        return EXIT_SUCCESS
    if not rows:
        out.print(f"no checkpoints in {escape(folder.shown)}")
        return EXIT_SUCCESS
    table = Table(title=f"checkpoints in {escape(folder.shown)}", title_justify="left")
    table.add_column("latest", justify="center")
    table.add_column("step", justify="right")
    table.add_column("gen", justify="right")
    table.add_column("name", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("status")
    for row in rows:
        table.add_row(
            "*" if row.latest else "",
            str(row.ref.step),
            str(row.ref.generation),
            row.ref.name,
            utc_iso(row.created_at),
            human_bytes(row.size),
            f"[{STYLES[row.state]}]{escape(_label(row))}[/]",
        )
    out.print(table)
    counts: dict[FolderState, int] = {}
    for row in rows:
        counts[row.state] = counts.get(row.state, 0) + 1
    summary = ", ".join(f"{counts[s]} {s.value}" for s in SUMMARY_ORDER if s in counts)
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


def verify(folder: RunFolder, bars: Bars, redactor: Redactor, *, step: int | None, every: bool) -> int:
    repo = folder.repo
    chosen = committed_to_verify(repo, step=step, every=every)
    if not chosen:
        if step is not None and not every:
            steps = ", ".join(str(s) for s in sorted({r.step for r in repo.committed()})) or "none"
            err.print(escape(f"no committed checkpoint at step {step} in {folder.shown} (committed steps: {steps})"))
        else:
            err.print(escape(f"no committed checkpoints in {folder.shown}"))
        return EXIT_NOTHING
    manifests, unreadable = read_manifests(repo, chosen, redactor)
    with bars.bar() as bar:
        task = bar.add_task("verifying", total=sum(m.total_bytes for m in manifests.values()))
        results = {**unreadable, **verify_each(repo, list(manifests), redactor, lambda n: bar.advance(task, n))}
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


def inspect(
    folder: RunFolder, bars: Bars, redactor: Redactor, *, step: int | None, name: str | None, as_json: bool
) -> int:
    if step is not None and name is not None:
        raise click.UsageError("give --step or --name, not both")
    try:
        ref = select_checkpoint(folder.repo, step=step, name=name)
    except CorruptCheckpointError as error:
        err.print(f"[red]DAMAGED[/] {escape(str(name))}: {escape(redactor.reason(error))}")
        return EXIT_DAMAGED
    if ref is None:
        what = (
            f"checkpoint {name}"
            if name is not None
            else f"committed checkpoint at step {step}"
            if step is not None
            else "committed checkpoint"
        )
        err.print(escape(f"no {what} in {folder.shown}"))
        return EXIT_NOTHING
    try:
        total = folder.repo.read_manifest(ref).total_bytes
        with bars.bar() as bar:
            task = bar.add_task(f"verifying and loading {ref.name}", total=total)
            loaded = folder.repo.load(ref, lambda n: bar.advance(task, n))
        from spotsafe.sharded.layout import consolidate, is_sharded  # DCP is slow to import: only here

        if is_sharded(loaded.manifest):  # all ranks' chunks, assembled into whole tensors
            components = consolidate(loaded.blobs.__getitem__, loaded.manifest, ref.name)
        else:
            components = RestoredState(checkpoint=loaded, decoded=decode_state(loaded.blobs, ref.name)).components
    except (CorruptCheckpointError, UnsafeCheckpointError) as error:
        err.print(f"[red]DAMAGED[/] {escape(ref.name)}: {escape(redactor.reason(error))}")
        return EXIT_DAMAGED
    manifest = loaded.manifest
    doc: dict[str, Any] = {
        "url": folder.shown,
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
        "components": [describe_component(n, s) for n, s in components.items()],
    }
    if as_json:
        print_json(doc)
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


def gc(
    folder: RunFolder,
    bars: Bars,
    redactor: Redactor,
    *,
    keep: int,
    apply: bool,
    partial_older_than: float,
    plan: GcPlan | None = None,
) -> int:
    """``spotsafe gc`` of one run; ``plan``: one made already (a job's ranks plan together)."""
    if plan is None:
        plan = plan_gc(folder.repo, redactor, keep=keep, partial_older_than=partial_older_than, now=time.time())
    items = plan.items
    if not items:
        out.print(f"no checkpoints in {escape(folder.shown)}: nothing to do")
        return EXIT_SUCCESS
    doomed = plan.doomed
    table = Table(title=f"gc of {escape(folder.shown)}: keep the newest {keep}", title_justify="left")
    table.add_column("action", no_wrap=True)
    table.add_column("step", justify="right")
    table.add_column("name", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("why")
    for item in items:
        action = ("[red]delete[/]" if apply else "[yellow]would delete[/]") if item.delete else "keep"
        table.add_row(action, str(item.ref.step), item.ref.name, human_bytes(item.size), escape(item.reason))
    out.print(table)
    if plan.newest_intact is None and any(item.committed for item in items):
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
    with bars.bar(count=True) as bar:
        task = bar.add_task("deleting", total=len(doomed))
        result = apply_gc(folder.repo, doomed, redactor, lambda: bar.advance(task))
    for name in result.skipped:
        out.print(escape(f"skipped {name}: it was committed after it was listed"))
    for failure in result.failures:
        err.print(f"[red]could not delete[/] {escape(failure)}")
    freed = sum(item.size or 0 for item in result.deleted)
    n_ckpt = sum(item.committed for item in result.deleted)
    out.print(
        escape(
            f"deleted {n_ckpt} checkpoint(s) and {len(result.deleted) - n_ckpt} uncommitted folder(s), "
            f"freed {human_bytes(freed)}" + (f"; {len(result.failures)} failed" if result.failures else "")
        )
    )
    return EXIT_CRASH if result.failures else EXIT_SUCCESS
