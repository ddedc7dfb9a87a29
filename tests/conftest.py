"""Shared fixtures: a small deterministic training job to checkpoint in-process."""

from __future__ import annotations

import math
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import spotsafe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_lm.py"
TINY_JOB = ROOT / "tests" / "jobs" / "tiny_job.py"


class Noisy(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed features plus random noise drawn at fetch time (an augmentation)."""

    def __init__(self, n: int = 40) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 6, generator=g)
        self.y = torch.randn(n, 2, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.01 * torch.randn(6), self.y[i]


class Exited(Exception):
    """Raised by :func:`fake_exit` instead of ending the test process."""

    def __init__(self, code: int) -> None:
        self.code = code


def fake_exit(code: int) -> Any:
    raise Exited(code)


@dataclass
class Job:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: spotsafe.ResumableLoader
    ckpt: spotsafe.Checkpointer

    def train(self, until: int, on_step: Callable[[int], None] | None = None) -> None:
        """Train until ``ckpt.step == until`` (the loop a user writes)."""
        while self.ckpt.step < until:
            for x, y in self.loader:
                loss = nn.functional.mse_loss(self.model(x), y)
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                if on_step is not None:
                    on_step(self.ckpt.step + 1)
                self.ckpt.step_done()
                if self.ckpt.step >= until:
                    break


def make_job(run_dir: Path | str, **checkpointer_kwargs: Any) -> Job:
    """A fresh model/optimizer/scheduler/loader (same init every time) and a Checkpointer on ``run_dir``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, 50) / 50)))
    loader = spotsafe.ResumableLoader(Noisy(), batch_size=8, shuffle=True, seed=1)
    kwargs: dict[str, Any] = {"policy": spotsafe.every(steps=7), "handle_signals": False, "progress_interval": 0}
    kwargs.update(checkpointer_kwargs)
    ckpt = spotsafe.Checkpointer(
        str(run_dir), model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, **kwargs
    )
    return Job(model, optimizer, scheduler, loader, ckpt)


@pytest.fixture
def job_factory() -> Callable[..., Job]:
    return make_job


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(autouse=True)
def _no_inherited_run_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SPOTSAFE_"):
            monkeypatch.delenv(key)
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    # Never let botocore's credential chain reach for the real instance-metadata address.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Notice sources: signals only, whatever machine the tests run on. Auto-detection would poll a real
    # provider's metadata service on a cloud VM (tests talk to 127.0.0.1 only); tests that want a
    # provider point it at an emulator and set this themselves.
    monkeypatch.setenv("SPOTSAFE_NOTICES", "signals")


@dataclass(frozen=True)
class S3Server:
    """moto's standalone S3 server, a real HTTP server on 127.0.0.1, in its own process."""

    endpoint: str
    env: dict[str, str]

    def new_bucket(self) -> str:
        import s3fs

        name = f"spotsafe-{secrets.token_hex(4)}"
        s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing").mkdir(name)
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start moto's standalone server on a free 127.0.0.1 port; return the process and its endpoint."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    proc, endpoint = start_moto()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield S3Server(endpoint, env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(10)


@pytest.fixture(params=["local", "s3"])
def run_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh run location on local disk, then on the S3 server: storage tests run on both."""
    if request.param == "local":
        return str(tmp_path / "run")
    server: S3Server = request.getfixturevalue("s3_server")
    return f"s3://{server.new_bucket()}/run"
