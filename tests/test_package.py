"""The package a user installs: a wheel and an sdist built by ``python -m build``, checked by twine, and the wheel
installed into a clean virtual environment (torch from the pinned CPU build) that runs the CLI and a drill.

Marked ``package``: ``make package-check`` runs these (CI runs it after ``make test``); they build and install
for minutes, so ``make test`` leaves them out.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spotsafe.version import __version__

from .conftest import PROCESS_HANG_S, ROOT, S3Server

pytestmark = pytest.mark.package

TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
"""What the clean environment installs torch from: the Makefile's pinned CPU build."""

HEAVY = (
    "lightning",
    "pytorch_lightning",
    "transformers",
    "keras",
    "tensorflow",
    "s3fs",
    "gcsfs",
    "adlfs",
    "pyarrow",
    "mlflow",
    "wandb",
    "tensorboard",
)
"""Packages that only an extra brings in: ``import spotsafe`` and its CLI must not need them."""


def run(args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=PROCESS_HANG_S, check=False)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    """``python -m build``: the sdist, then the wheel built from the sdist (so the sdist must be complete)."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)])
    wheels, sdists = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(out.iterdir())
    return Dist(wheels[0], sdists[0])


@dataclass(frozen=True)
class Venv:
    root: Path

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    @property
    def spotsafe(self) -> str:
        return str(self.root / "bin" / "spotsafe")

    def env(self) -> dict[str, str]:
        """This process's environment without anything that points Python at the project's own tree."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env["PATH"] = f"{self.root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def pip(self, *args: str) -> str:
        return run([self.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args])


@pytest.fixture(scope="module")
def venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Venv]:
    """A new virtual environment with torch (the pinned CPU build) and the wheel, nothing else of the project's."""
    root = tmp_path_factory.mktemp("clean") / "venv"
    run([sys.executable, "-m", "venv", str(root)])
    env = Venv(root)
    env.pip(TORCH_SPEC, str(dist.wheel))
    yield env


def test_the_wheel_and_the_sdist_pass_twine_check(dist: Dist) -> None:
    assert dist.wheel.name == f"spotsafe-{__version__}-py3-none-any.whl"
    assert dist.sdist.name == f"spotsafe-{__version__}.tar.gz"
    out = run([sys.executable, "-m", "twine", "check", "--strict", str(dist.wheel), str(dist.sdist)])
    assert out.count("PASSED") == 2, out


def test_the_wheel_carries_the_data_and_the_metadata_a_user_needs(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"spotsafe-{__version__}.dist-info/METADATA").decode()
        entry_points = wheel.read(f"spotsafe-{__version__}.dist-info/entry_points.txt").decode()
    shipped = {
        p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "spotsafe" / "data" / "traces").iterdir()
    }
    assert {n for n in shipped if n.endswith((".json", ".md"))} <= names
    assert "spotsafe/py.typed" in names
    assert any(n.startswith("spotsafe/dashboard/templates/") for n in names)
    assert any(n.startswith("spotsafe/dashboard/static/") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "bench/", "examples/"))]
    assert f"Version: {__version__}" in metadata
    assert "Requires-Dist: torch>=2.2" in metadata
    for extra in (
        "s3",
        "gcs",
        "azure",
        "lightning",
        "transformers",
        "keras",
        "batch",
        "mlflow",
        "wandb",
        "tensorboard",
    ):
        assert f"Provides-Extra: {extra}" in metadata
    assert "spotsafe = spotsafe.cli.main:main" in entry_points


def test_the_changelog_describes_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"\n## {__version__} (" in changelog


def test_the_installed_cli_reports_the_wheels_version(venv: Venv) -> None:
    assert run([venv.spotsafe, "--version"], env=venv.env()).strip() == f"spotsafe, version {__version__}"
    where = run([venv.python, "-c", "import spotsafe; print(spotsafe.__file__)"], env=venv.env(), cwd=venv.root)
    assert str(venv.root) in where, "the clean environment must import the wheel, not the checkout"


def test_without_extras_nothing_heavy_is_imported_and_each_integration_says_what_to_install(venv: Venv) -> None:
    probe = textwrap.dedent(
        f"""
        import importlib, sys
        import spotsafe, spotsafe.cli.main, spotsafe.integrations.lightning
        heavy = [m for m in {HEAVY!r} if m in sys.modules]
        assert not heavy, heavy
        for module, extra in (("transformers", "transformers"), ("keras", "keras")):
            try:
                importlib.import_module("spotsafe.integrations." + module)
            except ImportError as err:
                assert f"pip install 'spotsafe[{{extra}}]'" in str(err), err
            else:
                raise AssertionError(module + " imported without its framework")
        from spotsafe.integrations.lightning import SpotsafeCallback
        try:
            SpotsafeCallback()
        except ImportError as err:
            assert "spotsafe[lightning]" in str(err), err
        else:
            raise AssertionError("a Lightning callback without Lightning")
        from spotsafe import trackers
        for tracker, extra in ((trackers.MLflow, "mlflow"), (trackers.WandB, "wandb")):
            try:
                tracker()
            except ImportError as err:
                assert f"pip install 'spotsafe[{{extra}}]'" in str(err), err
            else:
                raise AssertionError(extra + " tracker without its package")
        from spotsafe.errors import ConfigError
        from spotsafe.storage.registry import open_storage
        for url, extra in (("s3://bucket/run", "s3"), ("gs://bucket/run", "gcs"), ("az://bucket/run", "azure")):
            try:
                open_storage(url)
            except ConfigError as err:
                assert f"spotsafe[{{extra}}]" in str(err), err
            else:
                raise AssertionError(url + " opened without its extra")
        print("ok")
        """
    )
    assert run([venv.python, "-c", probe], env=venv.env(), cwd=venv.root).strip() == "ok"


def test_the_installed_wheel_drills_the_example_job(venv: Venv, tmp_path: Path) -> None:
    """``spotsafe drill`` with its defaults: the example job (from the checkout, run by the clean environment's
    Python, so it imports the wheel), interrupted by a replayed market, resumed bit-identically."""
    out = run([venv.spotsafe, "drill", "--workdir", str(tmp_path / "drill"), "--no-progress"], cwd=ROOT, env=venv.env())
    assert "identical" in out.lower(), out


def test_with_the_s3_extra_a_run_saves_to_s3_and_resumes(venv: Venv, dist: Dist, s3_server: S3Server) -> None:
    venv.pip(f"{dist.wheel}[s3]")
    bucket = s3_server.new_bucket()
    job = textwrap.dedent(
        f"""
        import sys, torch, spotsafe
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        with spotsafe.Checkpointer("s3://{bucket}/run", model=model, handle_signals=False) as ckpt:
            step = ckpt.restore()
            if step == 0:
                ckpt.step_done()
                ckpt.save()
        print(step)
        """
    )
    env = {**venv.env(), **s3_server.env}
    assert run([venv.python, "-c", job], env=env, cwd=venv.root).strip() == "0"
    assert run([venv.python, "-c", job], env=env, cwd=venv.root).strip() == "1"
