"""A tiny real training job for supervisor, report, metrics and dashboard tests.

    python tiny_job.py STEPS [--stop ATTEMPT:STEP ...] [--sleep SECONDS]

It checkpoints every 5 steps with spotsafe and, in attempt ATTEMPT ($SPOTSAFE_ATTEMPT), sends itself
SIGTERM after step STEP: the Checkpointer saves at the next step boundary and exits 75 (preempted).
"""

from __future__ import annotations

import argparse
import os
import signal
import time

import torch

import spotsafe

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("--stop", action="append", default=[], metavar="ATTEMPT:STEP")
parser.add_argument("--sleep", type=float, default=0.01)
args = parser.parse_args()
stops = {int(a): int(s) for a, s in (item.split(":") for item in args.stop)}
attempt = int(os.environ["SPOTSAFE_ATTEMPT"])

torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
ckpt = spotsafe.Checkpointer(model=model, optimizer=opt, policy=spotsafe.every(steps=5), progress_interval=0)
ckpt.restore()
while ckpt.step < args.steps:
    opt.zero_grad()
    model(torch.ones(4)).sum().backward()
    opt.step()
    ckpt.step_done()
    time.sleep(args.sleep)
    if stops.get(attempt) == ckpt.step:
        os.kill(os.getpid(), signal.SIGTERM)
ckpt.finish()
