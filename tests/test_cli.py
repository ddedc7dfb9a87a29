"""The spotsafe command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .conftest import make_job

SPOTSAFE = str(Path(sys.executable).with_name("spotsafe"))


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([SPOTSAFE, *args], capture_output=True, text=True, check=False, env=env)


def test_ls_shows_committed_damaged_and_leftover_checkpoints(tmp_path: Path) -> None:
    job = make_job(tmp_path, keep=5)
    job.train(14)
    job.ckpt.close()
    (tmp_path / "checkpoints" / "step-000000000021-1795402769996-abcd").mkdir()
    older = sorted((tmp_path / "checkpoints").glob("step-000000000007-*"))[0]
    (older / "model.bin").write_bytes(b"short")

    proc = run("ls", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.startswith("│ ") and "step-" in line}
    assert len(lines) == 3
    assert "uncommitted" in lines["21"]
    assert "committed" in lines["14"] and "damaged" not in lines["14"]
    assert "damaged" in lines["7"] and "model.bin" in lines["7"]


def test_demo_without_example_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([SPOTSAFE, "demo"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "examples/tiny_lm.py not found" in proc.stderr


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and "spotsafe" in proc.stdout
