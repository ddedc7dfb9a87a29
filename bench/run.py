"""spotsafe benchmark suite: checkpoint stall, persist, incremental bytes and restore, as ratios.

Run with ``make bench`` (or ``.venv/bin/python bench/run.py``). Every figure is measured in
this one run, on this machine, against baselines and physical floors measured in the same
process; the table is printed and written, with the machine's description, into
``BENCHMARKS.md`` (between the ``<!-- results -->`` markers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
import cases

import spotsafe

MB = 2**20
START = "<!-- results: written by bench/run.py -->"
END = "<!-- end of results -->"


def machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return [
        f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"host: {socket.gethostname()}; {platform.platform()}",
        f"cpu: {cpu}, {os.cpu_count()} logical CPUs (torch uses {torch.get_num_threads()} threads)",
        f"memory: {memory:.1f} GiB",
        f"python {platform.python_version()}, torch {torch.__version__}, spotsafe {spotsafe.__version__}",
        "load average when the results were written: {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min; a busy machine "
        "slows every row, so compare the ratios)".format(*os.getloadavg()),
    ]


def disk_description(root: Path) -> str:
    usage = shutil.disk_usage(root)
    device = "?"
    try:
        best = ""
        with open("/proc/mounts") as handle:
            for line in handle:
                dev, mount, fstype = line.split()[:3]
                if str(root.resolve()).startswith(mount) and len(mount) >= len(best):
                    best, device = mount, f"{dev} ({fstype}) mounted at {mount}"
    except OSError:
        pass
    return f"disk: {device}, {usage.total / 2**30:.0f} GiB, {usage.free / 2**30:.0f} GiB free; scratch {root}"


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def bench_size(label: str, target: int, root: Path, console: Console) -> dict[str, Any]:
    console.print(f"[bold]state {label}[/]: building model + AdamW state")
    state = cases.make_state(target)
    r: dict[str, Any] = {"label": label, "bytes": state.nbytes}
    console.print(f"  {state.nbytes / MB:.0f} MiB; floors")
    r["memcpy"] = cases.memcpy_floor(state)
    floors = cases.disk_write_floor(state, root)
    r["write_py"], r["write_py_direct"], r["write_dd"], r["write_dd_direct"] = (
        floors.python_s,
        floors.python_direct_s,
        floors.dd_s,
        floors.dd_direct_s,
    )
    r["write_floor"], floor_file = floors.best_s, floors.file
    console.print("  baselines: torch.save, safetensors, DCP save, DCP async_save x2")
    r["torch.save"] = cases.torch_save(state, root)
    r["safetensors"] = cases.safetensors_save(state, root)
    r["dcp.save"] = cases.dcp_save(state, root)
    r["dcp.async"] = cases.dcp_async_save(state, root, tuned=False)
    r["dcp.async.tuned"] = cases.dcp_async_save(state, root, tuned=True)
    console.print("  spotsafe: full saves, overlap, incremental, restore, first save after a restore")
    r["spotsafe"] = cases.spotsafe_save(state, root)
    step_s = max(0.05, 2 * r["memcpy"])
    r["overlap_step_s"] = step_s
    r["overlap"] = cases.spotsafe_overlap(state, root, step_s)
    r["incremental"] = cases.spotsafe_incremental(state, root, (0.0, 0.1, 1.0))
    r["restore"] = cases.restore(state, root, floor_file)
    r["first_idle"] = cases.first_save_after_restore(state, root, busy=False)
    r["first_busy"] = cases.first_save_after_restore(state, root, busy=True)
    floor_file.unlink()
    return r


def stall_table(results: list[dict[str, Any]]) -> tuple[Table, list[list[str]]]:
    headers = ["method", *[f"stall {r['label']}" for r in results], *[f"x memcpy {r['label']}" for r in results]]
    rows: list[list[str]] = []

    def add(name: str, stalls: list[float]) -> None:
        ratios = [ratio(s, r["memcpy"]) for s, r in zip(stalls, results, strict=True)]
        rows.append([name, *[fmt_s(s) for s in stalls], *ratios])

    add("floor: memcpy into reused buffers", [r["memcpy"] for r in results])
    add("torch.save + fsync", [r["torch.save"].stall_s for r in results])
    add("safetensors save_file + fsync", [r["safetensors"].stall_s for r in results])
    add("DCP save", [r["dcp.save"].stall_s for r in results])
    add("DCP async_save (default)", [r["dcp.async"].stall_s for r in results])
    add("DCP async_save (reused stager, no pinning)", [r["dcp.async.tuned"].stall_s for r in results])
    add(
        "spotsafe, first save, save() before any step (allocates staging)",
        [r["spotsafe"].cold.stall_s for r in results],
    )
    add("spotsafe, first save 1 s after restore(), host idle (GPU job)", [r["first_idle"] for r in results])
    add("spotsafe, first save 1 s after restore(), host busy (CPU job)", [r["first_busy"] for r in results])
    add("spotsafe, steady state (all bytes changed)", [r["spotsafe"].warm.stall_s for r in results])
    add("spotsafe overlap: wait before optimizer.step", [r["overlap"][1] for r in results])
    add("spotsafe overlap: at the save call", [r["overlap"][0] for r in results])
    table = Table(title="Training stall per checkpoint", title_justify="left")
    for h in headers:
        table.add_column(h, justify="left" if h == "method" else "right")
    for row in rows:
        table.add_row(*row)
    return table, [headers, *rows]


def io_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["measure", *[r["label"] for r in results]]]
    for name, key in (
        ("floor: Python 64 MiB writes + fsync", "write_py"),
        ("floor: Python 64 MiB O_DIRECT writes + fsync", "write_py_direct"),
        ("floor: dd bs=64M conv=fsync", "write_dd"),
        ("floor: dd bs=64M oflag=direct conv=fsync", "write_dd_direct"),
    ):
        rows.append([name, *[_bw(r["bytes"], r[key]) for r in results]])
    rows.append(
        [
            "spotsafe persist (background, all bytes changed)",
            *[f"{r['spotsafe'].persist_bytes_per_s / MB:.0f} MiB/s" for r in results],
        ]
    )
    rows.append(
        [
            "persist / disk floor (median of paired runs)",
            *[f"{r['spotsafe'].persist_vs_floor:.0%}" for r in results],
        ]
    )
    rows.append(["torch.save + fsync (whole save)", *[_bw(r["bytes"], r["torch.save"].total_s) for r in results]])
    rows.append(["DCP async_save (until durable)", *[_bw(r["bytes"], r["dcp.async.tuned"].total_s) for r in results]])
    rows.append(["staging memory held", *[f"{r['spotsafe'].staging_bytes / MB:.0f} MiB" for r in results]])
    return rows


def _bw(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / MB:.0f} MiB/s ({fmt_s(seconds)})" if seconds == seconds else "n/a"


def incremental_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["state", "parameters changed", "changed bytes", "written bytes", "written - changed", "of state"]]
    for r in results:
        for fraction, changed, written in r["incremental"]:
            rows.append(
                [
                    r["label"],
                    f"{fraction:.0%}",
                    f"{changed / MB:.1f} MiB",
                    f"{written / MB:.1f} MiB",
                    f"{(written - changed) / 1024:.0f} KiB",
                    f"{(written - changed) / r['bytes']:.3%}",
                ]
            )
    return rows


def restore_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["measure (cold page cache)", *[r["label"] for r in results]]]
    stream = [fmt_s(r["restore"].sequential_floor_s) for r in results]
    rows.append(["floor: one stream (advised sequential) into touched memory", *stream])
    rows.append(["floor: 4 ranged reads in flight", *[fmt_s(r["restore"].parallel_floor_s) for r in results]])
    rows.append(["floor: the faster of the two, per repeat", *[fmt_s(r["restore"].read_floor_s) for r in results]])
    rows.append(["spotsafe read + verify + decode", *[_vs(r, "spotsafe_load_s", "load") for r in results]])
    rows.append(["spotsafe restore() into the model", *[_vs(r, "spotsafe_restore_s", "restore") for r in results]])
    rows.append(["torch.load + load_state_dict", *[_vs(r, "torch_load_s", "torch") for r in results]])
    rows.append(
        ["spotsafe restore(), new optimizer (fresh process)", *[_vs(r, "fresh_restore_s", "fresh") for r in results]]
    )
    rows.append(
        ["torch.load + load_state_dict, new optimizer", *[_vs(r, "fresh_torch_s", "fresh_torch") for r in results]]
    )
    return rows


def _vs(r: dict[str, Any], field: str, key: str) -> str:
    timing = r["restore"]
    return f"{fmt_s(getattr(timing, field))} ({timing.ratios[key]:.2f}x floor)"


def markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(out)


def targets(results: list[dict[str, Any]], throughput: tuple[float, float, int] | None) -> list[list[str]]:
    rows = [["target", *[r["label"] for r in results]]]

    def verdict(ok: bool, text: str) -> str:
        return ("met: " if ok else "NOT met: ") + text

    rows.append(
        [
            "stall <= 1.1x memcpy floor",
            *[
                verdict(r["spotsafe"].warm.stall_s <= 1.1 * r["memcpy"], ratio(r["spotsafe"].warm.stall_s, r["memcpy"]))
                for r in results
            ],
        ]
    )
    rows.append(
        [
            "stall <= best async_save",
            *[
                verdict(
                    r["spotsafe"].warm.stall_s <= min(r["dcp.async"].stall_s, r["dcp.async.tuned"].stall_s),
                    f"{fmt_s(r['spotsafe'].warm.stall_s)} vs "
                    f"{fmt_s(min(r['dcp.async'].stall_s, r['dcp.async.tuned'].stall_s))}",
                )
                for r in results
            ],
        ]
    )
    rows.append(
        [
            "overlap: stall < 10% of memcpy floor",
            *[
                verdict(
                    r["overlap"][0] + r["overlap"][1] < 0.1 * r["memcpy"],
                    f"{(r['overlap'][0] + r['overlap'][1]) / r['memcpy']:.1%}",
                )
                for r in results
            ],
        ]
    )
    rows.append(
        [
            "persist >= 85% of disk floor",
            *[
                verdict(r["spotsafe"].persist_vs_floor >= 0.85, f"{r['spotsafe'].persist_vs_floor:.0%}")
                for r in results
            ],
        ]
    )
    rows.append(
        [
            "incremental bytes <= changed + 1%",
            *[
                verdict(
                    all(w <= c + 0.01 * max(c, r["bytes"] * 0.01) + 0.01 * r["bytes"] for _, c, w in r["incremental"]),
                    ", ".join(f"{f:.0%}: +{(w - c) / 1024:.0f} KiB" for f, c, w in r["incremental"]),
                )
                for r in results
            ],
        ]
    )
    rows.append(
        [
            "restore <= 1.1x read floor",
            *[
                verdict(r["restore"].ratios["restore"] <= 1.1, f"{r['restore'].ratios['restore']:.2f}x")
                for r in results
            ],
        ]
    )
    rows.append(
        [
            "restore faster than torch.load + load_state_dict",
            *[
                verdict(r["restore"].ratios["restore/torch"] < 1, f"{r['restore'].ratios['restore/torch']:.2f}x")
                for r in results
            ],
        ]
    )
    rows.append(
        [
            "restore faster than torch.load, new optimizer (fresh process)",
            *[
                verdict(r["restore"].ratios["fresh/torch"] < 1, f"{r['restore'].ratios['fresh/torch']:.2f}x")
                for r in results
            ],
        ]
    )
    for key, where in (("first_idle", "host idle"), ("first_busy", "host busy")):
        rows.append(
            [
                f"first save after restore <= 2x memcpy ({where})",
                *[verdict(r[key] <= 2 * r["memcpy"], ratio(r[key], r["memcpy"])) for r in results],
            ]
        )
    if throughput is not None:
        base, with_saves, _ = throughput
        rows.append(
            [
                "training throughput >= 97% of no checkpoints",
                verdict(with_saves >= 0.97 * base, f"{with_saves / base:.1%}"),
            ]
            + [""] * (len(results) - 1)
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256MiB,1GiB", help="state sizes (model + AdamW), comma-separated")
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: ./.bench)")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write the results into ('' = none)")
    parser.add_argument("--throughput-steps", type=int, default=40)
    args = parser.parse_args()
    console = Console()
    root = Path(args.dir or ".bench").absolute()
    root.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    results = []
    try:
        for label in args.sizes.split(","):
            results.append(bench_size(label, spotsafe.engine.staging.parse_budget(label) or 0, root, console))
        console.print("[bold]training throughput[/] of the example model (widened), with and without saves")
        throughput = cases.training_throughput(root, args.throughput_steps, save_every=10, dim=768, layers=4, rounds=5)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    description = [*machine(), disk_description(root.parent)]
    stall, stall_md = stall_table(results)
    console.print(stall)
    sections = {
        "Training stall per checkpoint": markdown(stall_md),
        "Persist and disk bandwidth": markdown(io_rows(results)),
        "Incremental checkpoints": markdown(incremental_rows(results)),
        "Restore": markdown(restore_rows(results)),
    }
    base, with_saves, nbytes = throughput
    sections["Training throughput"] = markdown(
        [
            ["run", "steps/s", "vs no checkpoints"],
            ["example TinyLM (dim 768, 4 layers), no checkpoints", f"{base:.2f}", "100%"],
            [
                f"same, spotsafe save every 10 steps ({nbytes / MB:.0f} MiB staged)",
                f"{with_saves:.2f}",
                f"{with_saves / base:.1%}",
            ],
        ]
    )
    sections["Targets"] = markdown(targets(results, throughput))
    for title, body in sections.items():
        if title != "Training stall per checkpoint":
            console.print(f"\n[bold]{title}[/]\n{body}")
    text = section(START, END, description, [f"### {title}\n\n{body}\n" for title, body in sections.items()])
    if args.out:
        write_between(Path(args.out), START, END, text)
        console.print(f"\nwrote {args.out}")


def section(start: str, end: str, machine_lines: list[str], body: list[str]) -> str:
    """One results section of BENCHMARKS.md: its start marker, the machine (a line each), ``body``, its end marker."""
    return "\n".join([start, "", "Machine:", "", *[f"- {line}" for line in machine_lines], "", *body, end])


def write_between(path: Path, start: str, end: str, text: str, heading: str = "") -> None:
    """Put ``text`` (which begins with ``start`` and ends with ``end``) in place of what ``path`` holds
    between those markers, or append it (after ``heading``) when the markers are not there yet."""
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        new = old[: old.index(start)] + text + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + heading + text + "\n"
    path.write_text(new)


if __name__ == "__main__":
    main()
