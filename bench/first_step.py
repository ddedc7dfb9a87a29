"""spotsafe time-to-first-step benchmark: from process start to the first training step after a restore, split.

Run with ``make bench-first-step`` (or ``.venv/bin/python bench/first_step.py``). For two jobs, the example job
(``examples/tiny_lm.py``'s model, optimizer, scheduler and loader) and a 1 GiB state (square linear layers and
AdamW, as ``bench/run.py`` builds), a first process trains one step and saves; then each repeat starts a fresh
process (the checkpoint's files dropped from the page cache) that builds the job, restores and trains one step.
The child marks the time of each phase; the parent took the time just before it started the child. The split:

- **interpreter start**: from ``Popen`` to the first line of the script;
- **import torch**, **import spotsafe** (``import spotsafe`` alone does not import torch);
- **model build**: the model, optimizer (and for the example, scheduler and loader);
- **Checkpointer()**: opening the run's storage, its event log and the notice sources;
- **restore: read + verify**: the checkpoint's blobs read as ranged parts and checksummed as they arrive;
- **restore: decode**, **restore: load** (``load_state_dict`` into each component);
- **restore: staging**: the loaded bytes made staging slots, and the preparation of the rest started;
- **restore: other**: finding the checkpoint, the manifest, the events;
- **first step**: forward, backward and ``optimizer.step()``, and ``step_done()``.

``--one-stream`` runs the children with the read path before issue 18 (one stream per blob) for comparison.
Results go into ``BENCHMARKS.md`` between the ``<!-- first-step -->`` markers (``--out ''``: none).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

HERE = Path(__file__).parent
START = "<!-- first-step: written by bench/first_step.py -->"
END = "<!-- end of first-step -->"
PHASES = [
    ("interpreter start", "script"),
    ("import torch", "torch"),
    ("import spotsafe", "spotsafe"),
    ("model build", "model"),
    ("Checkpointer()", "built"),
    ("restore: read + verify", None),
    ("restore: decode", None),
    ("restore: load", None),
    ("restore: staging", None),
    ("restore: other", "restored"),
    ("first step", "stepped"),
]


# -- the child: one process that builds, restores and trains a step ------------------------------------


def child(options: dict[str, Any]) -> None:
    marks: dict[str, float] = {"script": time.time()}
    import torch  # noqa: F401 - timed

    marks["torch"] = time.time()
    import spotsafe  # noqa: F401 - timed

    marks["spotsafe"] = time.time()
    if options.get("one_stream"):
        from spotsafe.storage import parallel_read

        parallel_read.READERS, parallel_read.PART = 1, 1 << 62
    spans = instrument()
    ckpt, train_step = build(options, marks)
    marks["built"] = time.time()
    step = ckpt.restore()
    marks["restored"] = time.time()
    train_step()
    ckpt.step_done()
    marks["stepped"] = time.time()
    if options["save"]:
        ckpt.save()
    ckpt.close()
    print(json.dumps({"marks": marks, "spans": spans, "restored_step": step}))


def instrument() -> dict[str, float]:
    """Time the restore's parts by wrapping the functions that do them (seconds, summed)."""
    from spotsafe.engine import components, reader, saver
    from spotsafe.storage import repository

    spans: dict[str, float] = {}

    def timed(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spans[label] = spans.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    timed(repository.CheckpointRepository, "load", "restore: read + verify")
    timed(reader, "decode_state", "restore: decode")
    timed(components.Components, "apply", "restore: load")
    timed(saver.Saver, "adopt", "restore: staging")
    timed(saver.Saver, "prepare", "restore: staging")
    return spans


def build(options: dict[str, Any], marks: dict[str, float]) -> tuple[Any, Callable[[], None]]:
    """The job's model, optimizer (...), then its Checkpointer; ``marks["model"]`` between the two."""
    import torch

    import spotsafe

    if options["job"] == "example":
        import importlib.util

        spec = importlib.util.spec_from_file_location("tiny_lm", HERE.parent / "examples" / "tiny_lm.py")
        assert spec is not None and spec.loader is not None
        tiny_lm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny_lm)
        torch.manual_seed(0)
        model = tiny_lm.TinyLM()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, tiny_lm.warmup_cosine(40, 400))
        loader = spotsafe.ResumableLoader(tiny_lm.MarkovText(2048), batch_size=16, shuffle=True, seed=7)
        marks["model"] = time.time()
        ckpt = spotsafe.Checkpointer(
            options["run"], model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, handle_signals=False
        )
        loss_fn = torch.nn.CrossEntropyLoss()
        batches: Iterator[torch.Tensor] = iter(loader)

        def example_step() -> None:
            batch = next(batches)
            logits = model(batch[:, :-1])
            loss_fn(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

        return ckpt, example_step
    sys.path.insert(0, str(HERE))
    import cases

    state = cases.make_state(options["bytes"])
    marks["model"] = time.time()
    ckpt = spotsafe.Checkpointer(options["run"], model=state.model, optimizer=state.optimizer, handle_signals=False)
    x = torch.randn(8, 2048)

    def big_step() -> None:
        state.model(x).square().mean().backward()
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)

    return ckpt, big_step


# -- the parent: runs the children and splits their time -------------------------------------------------


def run_child(options: dict[str, Any]) -> dict[str, Any]:
    started = time.time()
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(options)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the child failed ({done.returncode}):\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["started"] = started
    return result


def split(result: dict[str, Any]) -> dict[str, float]:
    """Seconds per phase of one child."""
    marks, spans = result["marks"], result["spans"]
    out: dict[str, float] = {}
    previous = result["started"]
    for label, mark in PHASES:
        if mark is None:
            out[label] = spans.get(label, 0.0)
            continue
        out[label] = marks[mark] - previous
        previous = marks[mark]
    restore_total = out.pop("restore: other")
    out["restore: other"] = restore_total - sum(v for k, v in out.items() if k.startswith("restore:"))
    out["total"] = marks["stepped"] - result["started"]
    return out


def measure(job: str, root: Path, repeats: int, one_stream: bool, nbytes: int) -> dict[str, float]:
    sys.path.insert(0, str(HERE))
    import cases

    run = root / job
    shutil.rmtree(run, ignore_errors=True)
    base = {"job": job, "run": str(run), "bytes": nbytes}
    first = run_child({**base, "save": True})
    assert first["restored_step"] == 0
    splits = []
    for _ in range(repeats):
        cases.drop_cache(run)
        result = run_child({**base, "save": False, "one_stream": one_stream})
        assert result["restored_step"] == 1
        splits.append(split(result))
    return {label: statistics.median(s[label] for s in splits) for label in splits[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", default="1GiB", help="the big state's size (model + AdamW)")
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: ./.bench)")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write the results into ('' = none)")
    parser.add_argument("--one-stream", action="store_true", help="also the read path before issue 18, to compare")
    args = parser.parse_args()
    if args.child is not None:
        child(json.loads(args.child))
        return
    sys.path.insert(0, str(HERE))
    from run import machine, markdown, section, write_between

    from spotsafe.engine.staging import parse_budget

    console = Console()
    nbytes = parse_budget(args.size) or 0
    root = Path(args.dir or ".bench").absolute()
    root.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="first-step-", dir=root))
    columns: list[tuple[str, dict[str, float]]] = []
    try:
        for job, label in (("example", "example job"), ("big", f"{args.size} state")):
            for one_stream in (False, True) if args.one_stream else (False,):
                name = label + (", one stream per blob (before)" if one_stream else "")
                console.print(f"[bold]{name}[/]: {args.repeats} restarts")
                columns.append((name, measure(job, root, args.repeats, one_stream, nbytes)))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [["phase (median of the restarts)", *[name for name, _ in columns]]]
    for label in [*[p for p, _ in PHASES], "total"]:
        cells = []
        for _, values in columns:
            share = values[label] / values["total"] if label != "total" else 1.0
            cells.append(f"{values[label] * 1000:.0f} ms ({share:.0%})")
        rows.append([label, *cells])
    table = markdown(rows)
    console.print(table)
    if args.out:
        text = section(START, END, [*machine(), f"repeats: {args.repeats}, page cache dropped before each"], [table])
        write_between(Path(args.out), START, END, text, heading="## Time to the first step after a restore\n\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
