"""The job files in examples/jobs/ are valid, and their launch templates expand to what the README says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spotsafe.supervisor.jobfile import load_job_file
from spotsafe.supervisor.pools import LaunchSpec, Pool

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "jobs"


def spec(pool: Pool, command: tuple[str, ...], exclude: tuple[str, ...] = ()) -> LaunchSpec:
    return LaunchSpec(job="j", attempt=4, url="s3://b/r", command=command, env={}, pool=pool, exclude=exclude)


@pytest.mark.parametrize("name", ["local.toml", "skypilot.toml", "slurm.toml", "kubernetes.yaml"])
def test_every_example_job_file_is_valid(name: str) -> None:
    job = load_job_file(EXAMPLES / name)
    config = job.config()
    assert config.command and config.url and config.pools
    shipped = sorted(p.name for p in EXAMPLES.iterdir())
    assert shipped == ["kubernetes.yaml", "local.toml", "skypilot.toml", "slurm.toml"]


def test_the_local_example_has_a_cheaper_spot_pool_and_runs_here() -> None:
    pools = load_job_file(EXAMPLES / "local.toml").pools
    assert [(p.market, p.local) for p in pools] == [("spot", True), ("on-demand", True)]
    assert pools[0].price_per_hour < pools[1].price_per_hour


def test_the_skypilot_example_passes_the_checkpoint_url_and_one_command_line() -> None:
    job = load_job_file(EXAMPLES / "skypilot.toml")
    config = job.config()
    spot = config.pools[0]
    argv = spec(spot, ("python", "train.py", "--lr", "3e-4 x")).expand(spot.launch)
    assert argv[:2] == ["sky", "launch"] and "--use-spot" in argv
    assert "SPOTSAFE_CHECKPOINT_URL=s3://b/r" in argv and "aws/us-east-1/us-east-1a" in argv
    assert argv[-1] == "python train.py --lr '3e-4 x'"
    od = [p for p in config.pools if p.market == "on-demand"]
    assert od and "--use-spot" not in spec(od[0], ("x",)).expand(od[0].launch)
    assert config.deadline is not None and config.total_steps == 20000


def test_the_slurm_example_excludes_failed_machines_only_when_there_are_some() -> None:
    pool = load_job_file(EXAMPLES / "slurm.toml").pools[0]
    without = spec(pool, ("python", "train.py")).expand(pool.launch)
    assert not any(a.startswith("--exclude") for a in without)
    with_bad = spec(pool, ("python", "train.py"), exclude=("node7", "node9")).expand(pool.launch)
    assert "--exclude=node7,node9" in with_bad
    assert with_bad[0:2] == ["sbatch", "--wait"] and with_bad[-1] == "--wrap=exec python train.py"


def test_the_kubernetes_example_splices_the_command_and_writes_valid_json_overrides() -> None:
    pool = load_job_file(EXAMPLES / "kubernetes.yaml").pools[0]
    argv = spec(pool, ("python", "train.py", "--a b")).expand(pool.launch)
    assert argv[-4:] == ["--", "python", "train.py", "--a b"]
    overrides = next(a for a in argv if a.startswith("--overrides="))
    doc = json.loads(overrides.removeprefix("--overrides="))
    assert doc["spec"]["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert "j-4" in argv
