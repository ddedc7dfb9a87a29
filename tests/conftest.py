"""Shared fixtures: a small deterministic training job to checkpoint in-process."""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
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

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # Started in the background by a shell (`make test &`), this process and so every job a test starts would
    # ignore SIGINT. The tests press Ctrl-C as a user at a terminal does: give the jobs SIGINT's default.
    signal.signal(signal.SIGINT, signal.default_int_handler)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny_lm.py"
TINY_JOB = ROOT / "tests" / "jobs" / "tiny_job.py"

HANG_S = 120.0
"""How long a test waits for a condition before calling it a hang. It only bounds a hang: on a healthy machine,
however loaded, the condition comes true long before, so it never decides a test's outcome."""
PROCESS_HANG_S = 900.0
"""How long a test lets a whole process (a CLI command, a job, a drill) run before calling it a hang. Generous on
purpose: with the machine ten times oversubscribed a one-second command took over a minute; a real hang still fails
the test instead of the CI job."""


def wait_until(condition: Callable[[], object], what: str, *, timeout: float = HANG_S, poll_s: float = 0.01) -> None:
    """Wait until ``condition()`` is true (tests wait on conditions, never on the machine being fast enough);
    fail naming ``what`` only when it never comes true (a hang). ``condition`` may assert to fail early."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll_s)


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class StallClock:
    """A supervisor's clock for tests of stalled jobs: real time, except that while ``stalled()`` holds, each reading
    is ``jump_s`` later than the one before. The test's stall timeout stays long (:data:`HANG_S`) and fires only once
    the job is known to be stuck where the test wants it, however long it took to get there on a busy machine."""

    def __init__(self, stalled: Callable[[], bool], jump_s: float = 30 * HANG_S) -> None:
        self.stalled = stalled
        self.jump_s = jump_s
        self.skipped = 0.0

    def __call__(self) -> float:
        if self.stalled():
            self.skipped += self.jump_s
        return time.time() + self.skipped


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


@pytest.fixture(autouse=True)
def _no_startup_guard_left() -> Iterator[None]:
    """A test that armed spotsafe.protect_startup() (directly or through a framework callback) in this process and
    created no Checkpointer leaves it to later tests no more: its held signals are dropped."""
    yield
    from spotsafe import startup

    startup.release()


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


@pytest.fixture(params=["local", "s3", "gcs", "azure"])
def run_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh run location on local disk, then on the S3, GCS and Azure emulators: storage tests run on all four."""
    return new_run_url(request, tmp_path, request.param)


def new_run_url(request: pytest.FixtureRequest, tmp_path: Path, where: str) -> str:
    """A fresh run folder ``run`` in a new bucket (container) of ``where``'s server, or on local disk."""
    if where == "local":
        return str(tmp_path / "run")
    if where == "s3":
        server: S3Server = request.getfixturevalue("s3_server")
        return f"s3://{server.new_bucket()}/run"
    if where == "gcs":
        gcs: GcsServer = request.getfixturevalue("gcs_server")
        return f"gs://{gcs.new_bucket()}/run"
    azure: AzureServer = request.getfixturevalue("azure_server")
    return f"az://{azure.new_container()}/run"


# -- Google Cloud Storage and Azure Blob Storage emulators ------------------------------------------------------------
# Like moto's S3 server: real HTTP servers on 127.0.0.1, each in its own process, started once per session by the
# first test that needs one, and reached by the real clients (gcsfs, adlfs) through the settings users would give.

AZURITE_BIN = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
"""Where ``make azurite`` (part of ``make test``) installs Azurite from npm."""
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
"""Azurite's well-known development account and key (public, documented; not a secret)."""
AZURITE_FLAGS = ("--inMemoryPersistence", "--skipApiVersionCheck", "--disableTelemetry", "--silent")
"""In memory; accept the newest API versions that the Azure SDK may send; send nothing home; no access log."""


def wait_for_port(proc: subprocess.Popen[bytes], port: int, what: str, timeout: float = 120.0) -> None:
    """Wait until ``proc`` accepts connections on ``port`` (fail at once if it exits; ``timeout`` bounds a hang)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not start (exit status {proc.poll()})") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class _Environment:
    """Sets environment variables (and fsspec's defaults for some protocols) until :meth:`restore`."""

    def __init__(self, env: dict[str, str], fsspec_defaults: dict[str, dict[str, Any]] | None = None) -> None:
        import fsspec.config

        self._saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self._conf = fsspec.config.conf
        defaults = fsspec_defaults or {}
        self._saved_conf = {p: self._conf.get(p) for p in defaults}
        for protocol, options in defaults.items():
            self._conf[protocol] = {**self._conf.get(protocol, {}), **options}

    def restore(self) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for protocol, options in self._saved_conf.items():
            if options is None:
                self._conf.pop(protocol, None)
            else:
                self._conf[protocol] = options


@dataclass(frozen=True)
class GcsServer:
    """gcp-storage-emulator (Google's JSON API, in memory) on 127.0.0.1, reached through gcsfs.

    gcsfs finds it through ``STORAGE_EMULATOR_HOST`` and sends no credentials (``token="anon"``, set as fsspec's
    default for ``gs://``, as ``FSSPEC_GS_TOKEN=anon`` would).
    """

    endpoint: str

    def filesystem(self) -> Any:
        import gcsfs

        return gcsfs.GCSFileSystem(
            endpoint_url=self.endpoint, token="anon", project="spotsafe-test", skip_instance_cache=True
        )

    def new_bucket(self, prefix: str = "spotsafe") -> str:
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.filesystem().mkdir(name)
        return name


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsServer]:
    pytest.importorskip("gcsfs", reason="gcsfs is not installed: pip install -e '.[dev]'")
    pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is not installed: pip install -e '.[dev]'")
    port = _free_port()
    proc = subprocess.Popen(
        # -M: in memory; -q: critical log lines only.
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port), "-M", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path_factory.mktemp("gcs-emulator"),
    )
    wait_for_port(proc, port, "gcp-storage-emulator")
    endpoint = f"http://127.0.0.1:{port}"
    env = _Environment(
        {"STORAGE_EMULATOR_HOST": endpoint, "FSSPEC_GS_TOKEN": "anon", "FSSPEC_GCS_TOKEN": "anon"},
        {"gs": {"token": "anon"}, "gcs": {"token": "anon"}},
    )
    try:
        yield GcsServer(endpoint)
    finally:
        env.restore()
        stop(proc)


@dataclass(frozen=True)
class AzureServer:
    """Azurite's blob service (in memory) on 127.0.0.1, reached through adlfs with Azurite's development account.

    adlfs finds it through ``AZURE_STORAGE_CONNECTION_STRING``, as a user's connection string would be given.
    """

    endpoint: str

    def connection_string(self, key: str = AZURITE_KEY) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};"
        )

    def filesystem(self) -> Any:
        import adlfs

        return adlfs.AzureBlobFileSystem(connection_string=self.connection_string(), skip_instance_cache=True)

    def new_container(self, prefix: str = "spotsafe") -> str:
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.filesystem().mkdir(name)
        return name


def azurite_command() -> list[str]:
    """How to start Azurite's blob service, or a skip saying what is missing."""
    import shutil

    if shutil.which("node") is None:
        pytest.skip("Azure storage tests need Azurite, which runs on Node.js: node was not found")
    if AZURITE_BIN.exists():
        return [str(AZURITE_BIN)]
    if shutil.which("azurite-blob"):
        return ["azurite-blob"]
    if shutil.which("npm") is None:
        pytest.skip("Azure storage tests need Azurite, installed with npm: npm was not found")
    pytest.skip("Azure storage tests need Azurite: `make azurite` installs it (npm) into .tools/")


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureServer]:
    pytest.importorskip("adlfs", reason="adlfs is not installed: pip install -e '.[dev]'")
    command = azurite_command()
    port = _free_port()
    proc = subprocess.Popen(
        [*command, "--blobHost", "127.0.0.1", "--blobPort", str(port), *AZURITE_FLAGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path_factory.mktemp("azurite"),
    )
    wait_for_port(proc, port, "Azurite")
    server = AzureServer(f"http://127.0.0.1:{port}")
    env = _Environment({"AZURE_STORAGE_CONNECTION_STRING": server.connection_string()})
    try:
        yield server
    finally:
        env.restore()
        stop(proc)


@dataclass(frozen=True)
class ObjectStore:
    """One of the three object stores' servers (moto's S3, gcp-storage-emulator, Azurite), and how to reach it."""

    kind: str
    """``s3``, ``gcs`` or ``azure``."""
    scheme: str
    endpoint: str

    def create_bucket(self, name: str) -> None:
        """Create the bucket (container) ``name``."""
        if self.kind == "s3":
            import s3fs

            s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing").mkdir(name)
        elif self.kind == "gcs":
            GcsServer(self.endpoint).filesystem().mkdir(name)
        else:
            AzureServer(self.endpoint).filesystem().mkdir(name)

    def new_bucket(self, prefix: str = "spotsafe") -> str:
        name = f"{prefix}-{secrets.token_hex(4)}"
        self.create_bucket(name)
        return name

    def url(self, bucket: str, folder: str = "run") -> str:
        return f"{self.scheme}://{bucket}/{folder}"

    def options(self, endpoint: str | None = None, *, key: str = AZURITE_KEY) -> dict[str, Any]:
        """Storage options that reach this store at ``endpoint`` (a proxy in front of it, say) instead."""
        where = endpoint or self.endpoint
        if self.kind == "azure":
            return {"connection_string": AzureServer(where).connection_string(key)}
        return {"endpoint_url": where}


@pytest.fixture(params=["s3", "gcs", "azure"])
def object_store(request: pytest.FixtureRequest) -> ObjectStore:
    """Each object store's server in turn (the tests that are about object stores only)."""
    if request.param == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        return ObjectStore("s3", "s3", s3.endpoint)
    if request.param == "gcs":
        gcs: GcsServer = request.getfixturevalue("gcs_server")
        return ObjectStore("gcs", "gs", gcs.endpoint)
    azure: AzureServer = request.getfixturevalue("azure_server")
    return ObjectStore("azure", "az", azure.endpoint)


# -- a real run with checkpoints at steps 7, 14, 21 and 28, shared by the CLI and inventory tests ----------
RUN_METADATA = {"experiment": "cli-test", "lr": 0.01}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with committed checkpoints at steps 7, 14, 21 and 28, built once by a real training job."""
    path = tmp_path_factory.mktemp("pristine")
    job = make_job(path, keep=10, metadata=RUN_METADATA)
    job.train(28)
    job.ckpt.close()
    return path


@pytest.fixture
def run_dir(pristine: Path, tmp_path: Path) -> Path:
    path = tmp_path / "run"
    shutil.copytree(pristine, path)
    return path


def folder(run_dir: Path, step: int) -> Path:
    (found,) = (run_dir / "checkpoints").glob(f"*-step-{step:012d}-*")
    return found


def apt_install(*packages: str) -> str | None:
    """Install Debian ``packages`` with apt-get (again after ``apt-get update`` if the first try fails): ``None`` on
    success, else why not (a test then skips, saying so)."""
    names = " ".join(packages)
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"not root, so the test cannot apt-get install {names} (install them to run it)"
    if shutil.which("apt-get") is None:
        return f"no apt-get on this machine to install {names}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    for before in ([], ["apt-get", "update"]):
        try:
            if before:
                subprocess.run(before, env=env, capture_output=True, timeout=300, check=False)
            done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            return f"apt-get install {names} timed out"
        if done.returncode == 0:
            return None
    return f"apt-get install {names} failed: {done.stderr.strip().splitlines()[-1:]}"
