"""The shipped launcher examples, checked by the launchers' own code where it can run here.

* **SkyPilot**: every pool of ``examples/jobs/skypilot.toml``, expanded by spotsafe exactly as the supervisor
  launches it, is parsed by SkyPilot's own ``sky launch`` / ``sky cancel`` command-line parser, and its task
  (``sky.Task``) and resources (``sky.Resources``: cloud, region and zone, accelerators, spot) are built and
  validated by SkyPilot's Python API. The real ``skypilot`` package is installed into a virtual environment of
  its own (it pins an older ``click`` than spotsafe's tests use). Not run: ``sky launch --dryrun``, which starts
  SkyPilot's API server and downloads its instance catalog from GitHub (no network here), and a real launch.
* **Kubernetes**: the pod that ``kubectl run`` makes from ``examples/jobs/kubernetes.yaml`` (with its overrides) is
  read by the official ``kubernetes`` Python client into its typed models and written back unchanged (an unknown or
  misspelled field would be dropped). Not run: ``kubectl`` itself and a cluster.

Marked ``package``: ``make package-check`` runs these (they install packages for a minute or two).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from spotsafe.supervisor.jobfile import load_job_file
from spotsafe.supervisor.pools import LaunchSpec

from .conftest import PROCESS_HANG_S, ROOT

pytestmark = pytest.mark.package

SPECS = ("skypilot==0.14.1", "kubernetes==35.0.0")
"""The versions these checks were written against (SkyPilot's CLI and Python API change between releases)."""


def launches(job_file: Path) -> list[dict[str, list[str]]]:
    """Each pool's launch and stop commands, expanded by spotsafe as for attempt 1."""
    job = load_job_file(job_file)
    out = []
    for pool in job.pools:
        spec = LaunchSpec(
            job=job.name or "job", attempt=1, url=job.url or "s3://bucket/run", command=job.command, env={}, pool=pool
        )
        out.append({"pool": [pool.name], "launch": spec.expand(pool.launch), "stop": spec.expand(pool.stop)})
    return out


@pytest.fixture(scope="module")
def launcher_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A virtual environment with the real ``skypilot`` and ``kubernetes`` packages, nothing of spotsafe's."""
    root = tmp_path_factory.mktemp("launchers") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=PROCESS_HANG_S)
    done = subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *SPECS],
        capture_output=True,
        text=True,
        timeout=PROCESS_HANG_S,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return str(root / "bin" / "python")


def check(python: str, script: str, pools: list[dict[str, list[str]]]) -> list[dict[str, object]]:
    """Run ``script`` (reading ``pools`` as JSON on stdin, printing one JSON line per pool) in ``python``."""
    done = subprocess.run(
        [python, "-c", script], input=json.dumps(pools), capture_output=True, text=True, timeout=PROCESS_HANG_S
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


CHECK = textwrap.dedent(
    """
    import json, shlex, sys
    import sky
    from sky.client.cli import command as cli

    for item in json.load(sys.stdin):
        launch, stop = item["launch"], item["stop"]
        assert launch[:2] == ["sky", "launch"], launch
        params = cli.launch.make_context("launch", launch[2:]).params  # SkyPilot's own parser: unknown options fail
        resources = sky.Resources(
            infra=params["infra"], accelerators=params["gpus"], use_spot=bool(params["use_spot"])
        )
        [entrypoint] = params["entrypoint"]
        task = sky.Task(name=params["cluster"], run=entrypoint, envs=dict(params["env"]))
        task.set_resources(resources)
        assert stop[:2] == ["sky", "cancel"], stop
        cancelled = cli.cancel.make_context("cancel", stop[2:]).params
        print(json.dumps({
            "pool": item["pool"][0],
            "cloud": str(resources.cloud), "region": resources.region, "zone": resources.zone,
            "accelerators": resources.accelerators, "spot": resources.use_spot,
            "envs": task.envs, "run": task.run, "down": params["down"], "cluster": params["cluster"],
            "cancel": cancelled["cluster"], "cancel_all": cancelled["all"],
        }))
    """
)


def test_skypilot_accepts_every_pool_of_the_shipped_job_file(launcher_python: str) -> None:
    pools = launches(ROOT / "examples" / "jobs" / "skypilot.toml")
    assert len(pools) == 3
    checked: list[dict[str, Any]] = check(launcher_python, CHECK, pools)
    assert [c["pool"] for c in checked] == ["aws-us-east-1a-spot", "aws-us-east-1b-spot", "aws-us-east-1-on-demand"]
    for c in checked:
        assert c["cloud"] == "AWS" and c["region"] == "us-east-1" and c["accelerators"] == {"V100": 1}
        assert c["envs"]["SPOTSAFE_ATTEMPT"] == "1" and c["envs"]["SPOTSAFE_CHECKPOINT_URL"].startswith("s3://")
        assert c["run"].startswith("python train.py") and c["down"] is True
        assert c["cancel"] == c["cluster"] and c["cancel_all"]  # the stop cancels every job of the launched cluster
    assert [(c["zone"], c["spot"]) for c in checked] == [("us-east-1a", True), ("us-east-1b", True), (None, False)]


POD = textwrap.dedent(
    """
    import json, sys
    import kubernetes

    client = kubernetes.client.ApiClient()
    for item in json.load(sys.stdin):
        argv, stop = item["launch"], item["stop"]
        assert argv[:2] == ["kubectl", "run"], argv
        name, options, command = argv[2], argv[3 : argv.index("--")], argv[argv.index("--") + 1 :]
        value = lambda flag: [a.split("=", 1)[1] for a in options if a.startswith(flag + "=")]
        overrides = json.loads(value("--overrides")[0])
        pod = {  # what `kubectl run` sends: its own pod, with the overrides merged in
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                **overrides["spec"],
                "restartPolicy": value("--restart")[0],
                "containers": [{
                    "name": name,
                    "image": value("--image")[0],
                    "command": command,
                    "env": [dict(zip(("name", "value"), e.split("=", 1))) for e in value("--env")],
                }],
            },
        }
        built = client._ApiClient__deserialize(pod, "V1Pod")  # the client's own typed decoding
        again = client.sanitize_for_serialization(built)
        print(json.dumps({"pool": item["pool"][0], "same": again == pod, "pod": again, "stop": stop}))
    """
)


def test_the_kubernetes_example_makes_a_pod_the_kubernetes_client_accepts(launcher_python: str) -> None:
    """Every field of the pod that ``kubectl run`` would send (with the example's overrides) is one the client's
    models know, with the right type: a misspelled or unknown field would be dropped, and the pod would differ."""
    pools = launches(ROOT / "examples" / "jobs" / "kubernetes.yaml")
    [checked] = check(launcher_python, POD, pools)
    assert checked["same"], checked["pod"]
    pod: dict[str, Any] = checked["pod"]
    assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert pod["spec"]["terminationGracePeriodSeconds"] == 30
    assert pod["spec"]["containers"][0]["command"] == ["python", "train.py"]
    assert checked["stop"][:3] == ["kubectl", "delete", "pod"] and checked["stop"][3] == pod["metadata"]["name"]
