"""Slurm for real: a one-node cluster on 127.0.0.1 (Debian's ``slurm-wlm`` and ``munge``), a job submitted by
``spotsafe run`` with ``sbatch``, preempted the way Slurm does it, requeued by itself, resumed bit-identically.

The packages are installed with apt-get when they are missing and the test runs as root; otherwise, or when the
cluster does not come up, the test is skipped and says why. The cluster is private to the test: its own
``slurm.conf`` (``$SLURM_CONF``), state folders and ports; only ``munged`` is the machine's (started when it is not
running: Slurm talks to it on its standard socket).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spotsafe.supervisor.reference import REFERENCE_RUN_ID, compare_final
from spotsafe.telemetry.log import EVENTS_FILE, read_events

from .conftest import HANG_S, PROCESS_HANG_S, TINY_JOB, apt_install, wait_until
from .test_metrics import free_port

SPOTSAFE = Path(sys.executable).with_name("spotsafe")
PACKAGES = ("slurm-wlm", "munge")
TOOLS = ("slurmctld", "slurmd", "sbatch", "scancel", "scontrol", "sinfo", "munged", "munge")
LEAD_S = 60
"""``--signal=B:USR1@60``: the warning's lead, which the job is told (``SPOTSAFE_SLURM_SIGNAL_LEAD``)."""


@dataclass(frozen=True)
class Slurm:
    conf: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str) -> str:
        done = subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"{args}: {done.stdout}{done.stderr}"
        return done.stdout


def _munge_running() -> bool:
    try:
        encoded = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=False)
        return encoded.returncode == 0 and bool(encoded.stdout)
    except (OSError, subprocess.TimeoutExpired):
        return False


def _start_munge() -> str | None:
    """Start the machine's ``munged`` as its own user (what the Debian service does); ``None`` or why not."""
    if _munge_running():
        return None
    if not Path("/etc/munge/munge.key").exists():
        return "no /etc/munge/munge.key (the munge package makes it)"
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True, timeout=30, check=False)
    deadline = time.monotonic() + HANG_S
    while not _munge_running():
        if time.monotonic() > deadline:
            return "munged did not start"
        time.sleep(0.1)
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    if any(shutil.which(tool) is None for tool in TOOLS):
        why = apt_install(*PACKAGES)
        if any(shutil.which(tool) is None for tool in TOOLS):
            pytest.skip(f"no Slurm: {why or 'slurm-wlm or munge still missing after apt-get'}")
    why = _start_munge()
    if why is not None:
        pytest.skip(f"no Slurm: {why}")
    folder = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=spotsafe-test",
                f"SlurmctldHost={host}(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}",
                "AuthType=auth/munge",
                "AuthInfo=cred_expire=10",  # a requeued job waits this long to start again (default 120 s)
                f"StateSaveLocation={folder / 'state'}",
                f"SlurmdSpoolDir={folder / 'spool'}",
                f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
                f"SlurmdPidFile={folder / 'slurmd.pid'}",
                f"SlurmctldLogFile={folder / 'slurmctld.log'}",
                f"SlurmdLogFile={folder / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SchedulerType=sched/backfill",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core",
                "ReturnToService=2",
                "MpiDefault=none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN",
                f"PartitionName=preempt Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    cluster = Slurm(conf)
    daemons = [
        subprocess.Popen(
            [daemon, "-D", "-f", str(conf)], env=cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for daemon in ("slurmctld", "slurmd")
    ]
    try:

        def idle() -> bool:
            for proc in daemons:
                assert proc.poll() is None, f"a Slurm daemon exited: {(folder / 'slurmctld.log').read_text()[-2000:]}"
            done = subprocess.run(
                ["sinfo", "-h", "-o", "%t"], env=cluster.env(), capture_output=True, text=True, check=False
            )
            return done.stdout.strip() == "idle"

        wait_until(idle, "the Slurm node to be idle", timeout=HANG_S, poll_s=0.2)
        yield cluster
    finally:
        for proc in daemons:
            proc.terminate()
        for proc in daemons:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def events(run: Path, kind: str) -> list[dict[str, Any]]:
    return [vars(e.event) for e in read_events(run / EVENTS_FILE) if e.event.type == kind]


@pytest.mark.e2e
def test_spotsafe_run_submits_to_slurm_and_a_warned_job_requeues_itself_and_resumes_bit_identically(
    slurm: Slurm, tmp_path: Path
) -> None:
    """The job (fresh) holds after step 10 until a stop; Slurm's warning signal (``--signal=B:USR1@60``, sent now
    with ``scancel --signal=USR1 --batch`` as Slurm sends it at the lead time) makes it save at once and, with
    ``SPOTSAFE_SLURM_REQUEUE=1``, ``scontrol requeue`` itself; Slurm starts the job again (after its requeue delay,
    ``AuthInfo=cred_expire``: 10 s here, 120 s by default), which resumes from that checkpoint and finishes;
    ``sbatch --wait`` then exits 0."""
    reference = tmp_path / "reference"
    env = {**os.environ, "SPOTSAFE_CHECKPOINT_URL": str(reference), "SPOTSAFE_RUN_ID": REFERENCE_RUN_ID}
    subprocess.run([sys.executable, str(TINY_JOB), "40"], env={**env, "SPOTSAFE_ATTEMPT": "1"}, check=True)

    run, name = tmp_path / "run", f"spotsafe-{os.getpid()}"
    command = json.dumps([sys.executable, str(TINY_JOB), "40", "--hold-fresh", "10"])
    exports = (
        "ALL,SPOTSAFE_CHECKPOINT_URL={url},SPOTSAFE_RUN_ID={job},SPOTSAFE_ATTEMPT={attempt},"
        f"SPOTSAFE_SLURM_SIGNAL_LEAD={LEAD_S},SPOTSAFE_SLURM_REQUEUE=1"
    )
    launch = ["sbatch", "--wait", "--job-name={job}", f"--signal=B:USR1@{LEAD_S}", f"--output={tmp_path}/slurm-%j.out",
              f"--export={exports}", "--wrap=exec {command_line}"]  # fmt: skip
    (tmp_path / "job.toml").write_text(
        f'[job]\nname = "{name}"\ncommand = {command}\ncheckpoint_url = "{run}"\n\n'
        f'[[pools]]\nname = "slurm"\nmarket = "spot"\nprovider = "slurm"\nlaunch = {json.dumps(launch)}\n'
        f'stop = ["scancel", "--name={{job}}"]\n'
    )
    supervisor = subprocess.Popen(
        [str(SPOTSAFE), "run", "-f", str(tmp_path / "job.toml"), "--store", str(tmp_path / "jobs.sqlite")],
        env={**slurm.env(), "SPOTSAFE_NOTICES": "auto"},  # the tests' default is signals only: detect Slurm here
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: any(e["step"] == 10 for e in events(run, "progress")), "the job at step 10",
                   timeout=PROCESS_HANG_S)  # fmt: skip
        [job_id] = slurm.run("squeue", "-h", "-n", name, "-o", "%i").split()
        slurm.run("scancel", "--signal=USR1", "--batch", f"--name={name}")  # Slurm's warning, now
        out, _ = supervisor.communicate(timeout=PROCESS_HANG_S)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            subprocess.run(["scancel", f"--name={name}"], env=slurm.env(), check=False)
    assert supervisor.returncode == 0, out

    [notice] = events(run, "notice_received")
    assert (notice["source"], notice["kind"], notice["detail"]) == ("slurm", "stop", "SIGUSR1")
    [finished] = events(run, "emergency_finished")
    assert finished["committed"] and finished["before_deadline"], finished
    assert finished["step"] == notice["step"]
    acks = [e["message"] for e in events(run, "notice_source") if e["status"] == "acknowledged"]
    assert f"scontrol requeue {job_id}: ok" in acks
    [restored] = events(run, "restore_completed")
    assert restored["step"] == notice["step"]
    exits = [(e["reason"], e["exit_code"]) for e in events(run, "run_exited")]
    assert exits == [("preempted", 75), ("finished", 0)]
    assert "Restarts=1" in slurm.run("scontrol", "show", "job", job_id)  # one job, requeued once by itself
    ref_step, run_step, diffs = compare_final(reference, run)
    assert ref_step == run_step == 40
    assert diffs and not any(diffs.values()), diffs
