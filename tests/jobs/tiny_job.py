"""A tiny real training job for supervisor, report, metrics and dashboard tests.

    python tiny_job.py STEPS [--stop ATTEMPT:STEP ...] [--hold ATTEMPT:STEP ...] [--hold-fresh STEP]
                       [--sleep SECONDS] [--say]

It checkpoints every 5 steps with spotsafe and, in attempt ATTEMPT ($SPOTSAFE_ATTEMPT), sends itself
SIGTERM after step STEP: the Checkpointer saves at the next step boundary and exits 75 (preempted).
With --hold, attempt ATTEMPT holds after step STEP until a stop notice (SIGTERM) arrives, then saves at the
next step and exits 75: a test that acts on the running job decides how long it runs, not the machine's speed.
With --hold-fresh, a run that starts from scratch (it restores nothing) holds after step STEP the same way,
whichever attempt it is; one that resumes never holds, and neither does a drill's uninterrupted reference run
(nothing would stop it).
With --say, each attempt prints one line on stdout and one on stderr after its restore.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time

import numpy as np
import torch

import spotsafe
from spotsafe.supervisor.reference import REFERENCE_RUN_ID

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("--stop", action="append", default=[], metavar="ATTEMPT:STEP")
parser.add_argument("--hold", action="append", default=[], metavar="ATTEMPT:STEP")
parser.add_argument("--hold-fresh", type=int, default=None, metavar="STEP")
parser.add_argument("--sleep", type=float, default=0.01)
parser.add_argument("--say", action="store_true")
args = parser.parse_args()
stops = {int(a): int(s) for a, s in (item.split(":") for item in args.stop)}
holds = {int(a): int(s) for a, s in (item.split(":") for item in args.hold)}
attempt = int(os.environ["SPOTSAFE_ATTEMPT"])

random.seed(0)  # every RNG stream spotsafe captures starts the same: a drill compares them all
np.random.seed(0)
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
ckpt = spotsafe.Checkpointer(model=model, optimizer=opt, policy=spotsafe.every(steps=5), progress_interval=0)
ckpt.restore()
if ckpt.step == 0 and os.environ.get("SPOTSAFE_RUN_ID") != REFERENCE_RUN_ID and args.hold_fresh is not None:
    holds[attempt] = args.hold_fresh
if args.say:
    print(f"job output on stdout, attempt {attempt}", flush=True)
    print(f"job output on stderr, attempt {attempt}", file=sys.stderr, flush=True)
while ckpt.step < args.steps:
    opt.zero_grad()
    model(torch.ones(4)).sum().backward()
    opt.step()
    ckpt.step_done()
    time.sleep(args.sleep)
    if stops.get(attempt) == ckpt.step:
        os.kill(os.getpid(), signal.SIGTERM)
    if holds.get(attempt) == ckpt.step:
        while not ckpt.stop_requested:
            time.sleep(0.01)
ckpt.finish()
