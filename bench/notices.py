"""spotsafe notice benchmarks: what watching for notices costs a step, and how good the emergency estimate is.

Run with ``make bench-notices`` (or ``.venv/bin/python bench/notices.py``). Every figure is measured in
this run, on this machine, as a ratio against a baseline measured in the same process:

1. **Per-step overhead** of ``step_done()`` (no save due) with signals only, with an AWS watcher polling
   an emulated IMDS on 127.0.0.1, with the cost-based policies, and of the two-rank agreement (one
   gloo ``all_reduce`` per step, two processes) - as microseconds and as a share of one training step
   of the example model.
2. **Emergency estimate vs reality**: after a few measured interval saves of a 256 MiB state, a notice
   arrives; the estimate the plan used is compared with the time the emergency save then took, for a
   dense state (everything changed) and for one with a frozen half (incremental).

Results go into ``BENCHMARKS.md`` between the ``<!-- notices -->`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import cases
from run import disk_description, machine, markdown, section, write_between

import spotsafe
from spotsafe.notices import AwsSpotNotices
from spotsafe.notices.emulator import ProviderEmulator

MB = 2**20
START = "<!-- notices: written by bench/notices.py -->"
END = "<!-- end of notices -->"
STEPS = 20000


def per_step_us(ckpt: spotsafe.Checkpointer | None, steps: int = STEPS) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        if ckpt is not None:
            ckpt.step_done()
    return (time.perf_counter() - started) / steps * 1e6


def overhead_case(root: Path, name: str, **kwargs: Any) -> float:
    model = nn.Linear(8, 8)
    with spotsafe.Checkpointer(root / name, model=model, progress_interval=1e9, **kwargs) as ckpt:
        ckpt.restore()
        per_step_us(ckpt, 500)  # warm up
        return statistics.median(per_step_us(ckpt) for _ in range(3))


def example_step_ms() -> float:
    """One training step of the example TinyLM (batch 16, sequence 32), median of 30."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    import tiny_lm

    torch.manual_seed(0)
    model = tiny_lm.TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(tiny_lm.VOCAB, (16, tiny_lm.SEQ + 1))
    times = []
    for _ in range(35):
        started = time.perf_counter()
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, tiny_lm.VOCAB), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[5:]) * 1e3


def _agreement_worker(rank: int, port: int, out: str) -> None:
    """Both ranks time a loop of small training-like steps (100 matmuls), with and without the
    exchange (pipelined, about every 0.5 s), alternating rounds."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from spotsafe.engine.agreement import Agreement

    agreement = Agreement()
    a = torch.randn(192, 192)

    done = 0

    def steps(n: int, exchange: bool) -> float:
        nonlocal done
        dist.barrier()
        started = time.perf_counter()
        for _ in range(n):
            for _ in range(100):
                a.matmul(a)
            done += 1
            if exchange and agreement.due(done):  # what Checkpointer.step_done does with other ranks
                agreement.collect()
                agreement.post(done, stop=False, warning=False, save=False, deadline=None)
        agreement.collect()
        agreement.next_step = 0
        return (time.perf_counter() - started) / n * 1e6

    steps(50, True)
    rounds = [(steps(200, False), steps(200, True)) for _ in range(3)]
    if rank == 0:
        base = statistics.median(r[0] for r in rounds)
        added = statistics.median(r[1] - r[0] for r in rounds)
        Path(out).write_text(json.dumps([base, added]))
    dist.destroy_process_group()


def agreement_us(root: Path) -> tuple[float, float]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = root / "agreement.json"
    mp.start_processes(_agreement_worker, args=(port, str(out)), nprocs=2, start_method="spawn")
    base, added = json.loads(out.read_text())
    return float(base), float(added)


def emergency_case(root: Path, frozen_half: bool, rounds: int = 3) -> list[tuple[str, float, float, list[float]]]:
    """(choice, estimate, actual) per round: a few measured interval saves, then a notice."""
    state = cases.make_state(256 * MB)
    params = list(state.model.parameters())
    trained = params[len(params) // 2 :] if frozen_half else params
    found = []
    for i in range(rounds):
        run = root / f"emergency-{int(frozen_half)}-{i}"
        with ProviderEmulator() as market:
            exited: list[int] = []

            def stop(code: int, exited: list[int] = exited) -> None:
                exited.append(code)

            ckpt = spotsafe.Checkpointer(
                run,
                model=state.model,
                optimizer=state.optimizer,
                policy=spotsafe.every(steps=2),
                notices=[AwsSpotNotices(env=market.env(), poll_s=0.05)],
                handle_signals=False,
                exit=stop,  # type: ignore[arg-type]
            )
            ckpt.restore()
            step = 0
            while not exited:
                for p in trained:  # an optimizer step changes the trained weights and their moments
                    p.grad = torch.full_like(p, 1e-3)
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
                step += 1
                if step == 7:
                    ckpt.wait()
                    market.aws_interrupt(in_s=600)
                    while not ckpt.stop_requested:
                        time.sleep(0.01)
                ckpt.step_done()
        logged = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        planned = next(e for e in logged if e["type"] == "emergency_planned")
        finished = next(e for e in logged if e["type"] == "emergency_finished")
        measured = [e["duration_s"] for e in logged if e["type"] == "save_committed" and e["reason"] == "interval"]
        found.append((planned["choice"], planned["estimate_s"], finished["duration_s"], measured))
        shutil.rmtree(run, ignore_errors=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="scratch folder (default: ./.bench)")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write the results into ('' = none)")
    args = parser.parse_args()
    os.environ["SPOTSAFE_NOTICES"] = "signals"
    console = Console()
    base = Path(args.dir or ".bench").absolute()
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="notices-", dir=base))
    try:
        step_ms = example_step_ms()
        console.print(f"example TinyLM step: {step_ms:.2f} ms")
        bare = statistics.median(per_step_us(None) for _ in range(3))
        rows = [["step_done() with", "us per step", "vs one example step"]]

        def row(label: str, us: float) -> None:
            rows.append([label, f"{us:.1f}", f"{us / (step_ms * 1e3):.3%}"])
            console.print(f"{label}: {us:.1f} us")

        row("nothing (an empty loop)", bare)
        row("signals, every(steps=N)", overhead_case(root, "signals", policy=spotsafe.every(steps=10**9)))
        with ProviderEmulator() as market:
            aws = AwsSpotNotices(env=market.env(), poll_s=5.0)
            row("signals + AWS watcher (5 s polls), every(steps=N)", overhead_case(root, "aws", notices=[aws]))
        adaptive = spotsafe.young_daly(first_save_s=1e9) | spotsafe.max_loss(minutes=1e6)
        row("signals, young_daly() \\| max_loss(minutes=...)", overhead_case(root, "adaptive", policy=adaptive))
        base_us, added_us = agreement_us(root)
        rows.append(
            [
                f"two ranks, agreement (a gloo all_reduce every ~0.5 s), added to a {base_us / 1e3:.1f} ms step",
                f"{added_us:.1f}",
                f"{added_us / base_us:.3%} of that step",
            ]
        )
        console.print(f"agreement: +{added_us:.1f} us on a {base_us:.0f} us step")

        dense = emergency_case(root, frozen_half=False)
        sparse = emergency_case(root, frozen_half=True)
        header = ["256 MiB state (model + AdamW)", "interval saves before it", "choice", "estimate", "actual"]
        est_rows = [[*header, "actual / estimate"]]
        for label, found in (("every layer trained", dense), ("half the layers frozen", sparse)):
            for choice, estimate, actual, measured in found:
                ratio = actual / estimate if estimate else float("nan")
                before = ", ".join(f"{m:.2f}" for m in measured) + " s"
                est_rows.append([label, before, choice, f"{estimate:.2f} s", f"{actual:.2f} s", f"{ratio:.2f}"])
                console.print(f"{label}: {choice} estimate {estimate:.2f} s, actual {actual:.2f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    text = section(
        START,
        END,
        [*machine(), disk_description(base)],
        [
            f"### Per-step cost of watching for notices\n\n{markdown(rows)}\n",
            "### Emergency save: estimate against what it took\n",
            "The estimate is what the plan compared with the time left (before the safety factor); the "
            "actual time runs from the start of the notice handling to the commit.\n",
            f"{markdown(est_rows)}\n",
        ],
    )
    if args.out:
        write_between(Path(args.out), START, END, text, heading="## Notices\n\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
