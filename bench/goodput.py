"""Goodput against the usual practice: one job, one replayed market, three ways of surviving it.

Run with ``make bench-goodput`` (or ``.venv/bin/python bench/goodput.py``). The job is the example's model and
data (``bench/goodput_job.py``), run once uninterrupted (the reference: its wall time is the useful work), then
under each strategy through the same interruptions:

- **spotsafe**: ``Checkpointer`` with its defaults;
- **torch.save + SIGTERM handler**: the product brief's pattern, a ``torch.save`` every 15 minutes (time-scaled)
  and a SIGTERM handler that saves at once without knowing the deadline;
- **periodic torch.save only**: the same saves, nothing on SIGTERM.

The market: a shipped AWS trace (``aws-us-west-2c``) and a rate (exponential, seeded), both time-scaled. At each
preemption the harness sends SIGTERM, SIGKILLs the process when the notice window ends (120 trace seconds), waits
until the trace gives capacity back, and starts the job again at once (no backoff), until it finishes.

Per run: interruptions, steps trained and replayed, wall time split into running and waiting for capacity,
goodput (the steps the job needs times the run's own median step time, over the time a machine was held; and
over the whole wall time), dollars per useful hour on spot against on demand (the drill's default prices), and
whether the final weights and optimizer are bit-identical to an uninterrupted run's (spotsafe's loader has its
own data order, so spotsafe is compared with an uninterrupted spotsafe run). Results go into ``BENCHMARKS.md``
between the ``<!-- goodput -->`` markers.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.supervisor.market import Outage, load_trace, outages_at_rate, outages_from_trace

HERE = Path(__file__).parent
JOB = HERE / "goodput_job.py"
START = "<!-- goodput: written by bench/goodput.py -->"
END = "<!-- end of goodput -->"
SPOT, ON_DEMAND = 0.918, 3.06  # $/h: the drill's defaults (p3.2xlarge in us-east-1)
WINDOW_TRACE_S = 120.0
SAVE_EVERY_TRACE_S = 15 * 60.0
STRATEGIES = {
    "spotsafe": "spotsafe",
    "brief": "torch.save every 15 min + SIGTERM handler",
    "periodic": "periodic torch.save only",
}


@dataclass
class Outcome:
    strategy: str
    market: str
    wall_s: float
    waiting_s: float
    interruptions: int
    steps_trained: int
    step_s: float
    """The median time of a step in this run (steps of one process after one another)."""
    identical: bool

    def held_s(self) -> float:
        return self.wall_s - self.waiting_s


def run_job(
    mode: str, run: Path, steps: int, save_every_s: float, outages: list[Outage], window_s: float
) -> tuple[float, float, int]:
    """Run ``mode`` to the end through ``outages`` (SIGTERM, then SIGKILL ``window_s`` later): (wall seconds,
    seconds waiting for capacity, interruptions)."""
    start = time.monotonic()
    waiting = 0.0
    interruptions = 0
    pending = list(outages)
    while True:
        proc = subprocess.Popen(
            [sys.executable, str(JOB), mode, str(run), str(steps), str(save_every_s)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        now = time.monotonic() - start
        pending = [o for o in pending if o.at_s > now]  # preemptions while no machine was held took nothing
        taken = False
        while proc.poll() is None:
            if pending and time.monotonic() - start >= pending[0].at_s:
                outage = pending.pop(0)
                interruptions += 1
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(window_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                back = start + outage.back_s
                if time.monotonic() < back:
                    waiting += back - time.monotonic()
                    time.sleep(back - time.monotonic())
                taken = True
                break
            time.sleep(0.02)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        if not taken:
            if proc.returncode == 0:
                return time.monotonic() - start, waiting, interruptions
            if proc.returncode != EXIT_PREEMPTED:
                raise SystemExit(f"{mode} failed with {proc.returncode}:\n{stderr[-2000:]}")


def read_steps(log: Path) -> tuple[int, float]:
    """(steps trained, median seconds between consecutive steps of one process) from a job's ``steps.log``."""
    trained, gaps, last = 0, [], None
    for line in log.read_text().splitlines():
        word, at = line.split()
        if word == "start":
            last = None
            continue
        trained += 1
        if last is not None:
            gaps.append(float(at) - last)
        last = float(at)
    return trained, statistics.median(gaps)


def same(a: Path, b: Path) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for part in ("model", "optimizer"):
        flat_x, flat_y = flatten(x[part]), flatten(y[part])
        if flat_x.keys() != flat_y.keys():
            return False
        for key, value in flat_x.items():
            other = flat_y[key]
            if isinstance(value, torch.Tensor):
                if not (isinstance(other, torch.Tensor) and torch.equal(value, other)):
                    return False
            elif value != other:
                return False
    return True


def flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}/{key}"))
        return out
    if isinstance(tree, list | tuple):
        out = {}
        for i, value in enumerate(tree):
            out.update(flatten(value, f"{prefix}/{i}"))
        return out
    return {prefix: tree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--time-scale", type=float, default=60.0, help="trace seconds per bench second")
    parser.add_argument("--trace", default="aws-us-west-2c")
    parser.add_argument(
        "--trace-start-h", type=float, default=16.6, help="where in the trace to start (16.6 h: a busy stretch)"
    )
    parser.add_argument("--rate", type=float, default=3.0, help="interruptions per trace hour, for the rate market")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file to write the results into ('' = none)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from run import machine, markdown, section, write_between

    console = Console()
    window_s = WINDOW_TRACE_S / args.time_scale
    save_every_s = SAVE_EVERY_TRACE_S / args.time_scale
    root = Path(tempfile.mkdtemp(prefix="spotsafe-goodput-"))
    outcomes: list[Outcome] = []
    try:
        console.print(f"references: {args.steps} steps uninterrupted, without checkpoints and with spotsafe")
        reference_s, _, _ = run_job("periodic", root / "reference", args.steps, 1e9, [], window_s)
        run_job("spotsafe", root / "reference-spotsafe", args.steps, 1e9, [], window_s)  # its own data order
        trace = load_trace(args.trace)
        markets = {
            f"{args.trace} from {args.trace_start_h:g} h": outages_from_trace(
                trace, start_s=args.trace_start_h * 3600, time_scale=args.time_scale
            ),
            f"{args.rate:g} interruptions per hour (seed {args.seed})": outages_at_rate(
                args.rate, time_scale=args.time_scale, seed=args.seed, count=100, downtime_s=0.0
            ),
        }
        for market, outages in markets.items():
            for mode in STRATEGIES:
                console.print(f"{market}: {STRATEGIES[mode]}")
                run = root / f"{mode}-{len(outcomes)}"
                wall, waiting, interruptions = run_job(mode, run, args.steps, save_every_s, outages, window_s)
                trained, step_s = read_steps(run / "steps.log")
                reference = root / ("reference-spotsafe" if mode == "spotsafe" else "reference")
                identical = same(run / "final.pt", reference / "final.pt")
                outcomes.append(Outcome(mode, market, wall, waiting, interruptions, trained, step_s, identical))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [
        [
            "market",
            "strategy",
            "interruptions",
            "steps replayed",
            "wall (running + waiting)",
            "goodput (held)",
            "goodput (wall)",
            "$ per useful hour (on demand: $3.06)",
            "bit-identical",
        ]
    ]
    for o in outcomes:
        useful_s = args.steps * o.step_s  # the work itself, at this run's own speed (a shared machine drifts)
        useful_h = useful_s / 3600
        cost = SPOT * o.held_s() / 3600
        rows.append(
            [
                o.market,
                STRATEGIES[o.strategy],
                str(o.interruptions),
                f"{o.steps_trained - args.steps} ({(o.steps_trained - args.steps) / args.steps:.0%})",
                f"{o.wall_s:.0f} s ({o.held_s():.0f} + {o.waiting_s:.0f})",
                f"{useful_s / o.held_s():.0%}",
                f"{useful_s / o.wall_s:.0%}",
                f"${cost / useful_h:.2f} ({cost / useful_h / ON_DEMAND:.0%} of on demand)",
                "yes" if o.identical else "no",
            ]
        )
    table = markdown(rows)
    console.print(f"reference: {reference_s:.0f} s\n{table}")
    if args.out:
        lines = [
            *machine(),
            f"job: the example's model and data, {args.steps} steps, 1 torch thread; reference (uninterrupted) "
            f"{reference_s:.0f} s; time scale {args.time_scale:g} (notice window {window_s:.1f} s, "
            f"torch.save every {save_every_s:.0f} s)",
        ]
        text = section(START, END, lines, [table])
        write_between(Path(args.out), START, END, text, heading="## Goodput against the usual practice\n\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
