"""The job file: one job, its pools and its knobs, in TOML (``.toml``) or YAML (``.yaml``/``.yml``).

::

    [job]
    name = "tiny-lm"                     # default: the checkpoint URL's last part
    command = ["python", "train.py"]     # or give it after -- on the command line
    checkpoint_url = "s3://bucket/runs/tiny-lm"
    criticality = "standard"             # critical | standard | opportunistic
    deadline = 2026-11-24T18:00:00Z      # optional; needs total_steps
    total_steps = 20000
    grace_seconds = 30
    stall_timeout_seconds = 900

    [retry]                              # optional: overrides the criticality preset
    max_preemptions = 100
    max_errors = 3
    backoff_seconds = 1
    max_backoff_seconds = 60

    [failover]                           # optional: overrides the criticality preset
    reclaims = 3                         # leave a pool reclaimed this often within the window
    capacity_failures = 2                # ... or without capacity this often in a row
    machine_errors = 2                   # leave a machine with this many failed attempts
    window_minutes = 60
    cooldown_minutes = 30
    deadline_slack = 0.1
    escalate = true
    on_demand_when_spot_exhausted = false

    [[pools]]
    name = "aws-us-east-1a-spot"
    market = "spot"                      # spot | on-demand
    price_per_hour = 0.92                # dollars per node-hour
    nodes = 1
    provider = "aws"
    zone = "us-east-1a"
    launch = ["sky", "launch", "--yes", "--down", "--use-spot", "--zone", "{zone}", "--env",
              "SPOTSAFE_CHECKPOINT_URL={url}", "--", "{command_line}"]   # absent: a local process
    stop = ["sky", "cancel", "--yes", "..."]
    capacity_exit_codes = []
    capacity_patterns = ["ResourcesUnavailableError", "InsufficientInstanceCapacity"]

    [[pools]]                            # where the job goes when the deadline is at risk
    name = "aws-us-east-1a-on-demand"
    market = "on-demand"
    price_per_hour = 3.06
    provider = "aws"
    zone = "us-east-1a"
    launch = ["sky", "launch", "--yes", "--down", "--zone", "{zone}", "--env",
              "SPOTSAFE_CHECKPOINT_URL={url}", "--", "{command_line}"]

Every error names the key and says what to write instead; unknown keys are
errors (a misspelt knob would otherwise be silently ignored).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spotsafe.errors import ConfigError
from spotsafe.jobenv import JobEnv
from spotsafe.supervisor import jobdoc
from spotsafe.supervisor.config import RunConfig
from spotsafe.supervisor.health import FailoverPolicy, preset
from spotsafe.supervisor.jobdoc import overlay, read_job_doc
from spotsafe.supervisor.pools import Pool
from spotsafe.supervisor.retry import RelaunchPolicy

JOB_KEYS = {
    "name",
    "command",
    "checkpoint_url",
    "criticality",
    "deadline",
    "total_steps",
    "store",
    "grace_seconds",
    "stall_timeout_seconds",
}
RETRY_KEYS = {"max_preemptions", "max_errors", "backoff_seconds", "max_backoff_seconds"}
FAILOVER_KEYS = {
    "reclaims",
    "capacity_failures",
    "machine_errors",
    "window_minutes",
    "cooldown_minutes",
    "deadline_slack",
    "escalate",
    "on_demand_when_spot_exhausted",
}
POOL_KEYS = {
    "name",
    "market",
    "price_per_hour",
    "nodes",
    "zone",
    "provider",
    "launch",
    "stop",
    "capacity_exit_codes",
    "capacity_patterns",
}
TOP_KEYS = {"job", "retry", "failover", "pools"}


@dataclass(frozen=True)
class JobFile:
    """A parsed, validated job file. :meth:`config` turns it into the supervisor's :class:`RunConfig`."""

    path: Path
    name: str | None
    command: tuple[str, ...]
    url: str | None
    store: str | None
    criticality: str
    retry: RelaunchPolicy
    failover: FailoverPolicy
    pools: tuple[Pool, ...]
    deadline: float | None
    total_steps: int | None
    grace_s: float
    stall_timeout_s: float | None

    def config(
        self,
        *,
        command: Sequence[str] = (),
        name: str | None = None,
        url: str | None = None,
        store: str | None = None,
    ) -> RunConfig:
        """The run configuration, with command-line values (when given) taking precedence."""
        cmd = tuple(command) or self.command
        if not cmd:
            raise ConfigError(f"{self.path}: no command: set [job] command, or give one after --")
        contract = JobEnv() if (url or self.url) and (store or self.store) else JobEnv.from_env()
        the_url = url or self.url or contract.checkpoint_url
        if not the_url:
            raise ConfigError(f"{self.path}: no checkpoint URL: set [job] checkpoint_url, or pass --url")
        the_name = name or self.name or os.path.basename(the_url.rstrip("/")) or "job"
        the_store = Path(store or self.store or contract.store_or_default())
        return RunConfig(
            name=the_name,
            command=cmd,
            url=the_url,
            store=the_store,
            retry=self.retry,
            grace_s=self.grace_s,
            stall_timeout_s=self.stall_timeout_s,
            pools=self.pools,
            failover=self.failover,
            deadline=self.deadline,
            total_steps=self.total_steps,
        )


def load_job_file(path: str | os.PathLike[str]) -> JobFile:
    """Read and validate ``path``; :class:`ConfigError` says what is wrong and where."""
    return parse_job(read_job_doc(path), Path(path))


def parse_job(doc: Any, path: Path) -> JobFile:
    where = str(path)
    top = jobdoc.table(doc, where)
    jobdoc.check_keys(top, TOP_KEYS, where)
    job = jobdoc.table(top.get("job", {}), f"{where}: [job]")
    jobdoc.check_keys(job, JOB_KEYS, f"{where}: [job]")
    at = f"{where}: [job]"

    criticality = jobdoc.string(job, "criticality", at, "standard")
    try:
        base = preset(criticality)
    except ConfigError as err:
        raise ConfigError(f"{at}: {err}") from None

    retry_doc = jobdoc.table(top.get("retry", {}), f"{where}: [retry]")
    jobdoc.check_keys(retry_doc, RETRY_KEYS, f"{where}: [retry]")
    retry_changes = {
        k: v
        for k, v in {
            "max_preemptions": jobdoc.integer(retry_doc, "max_preemptions", f"{where}: [retry]", 0),
            "max_errors": jobdoc.integer(retry_doc, "max_errors", f"{where}: [retry]", 0),
            "initial_s": jobdoc.number(retry_doc, "backoff_seconds", f"{where}: [retry]"),
            "max_delay_s": jobdoc.number(retry_doc, "max_backoff_seconds", f"{where}: [retry]"),
        }.items()
        if v is not None
    }
    retry = jobdoc.build(replace, base.retry, retry_changes, f"{where}: [retry]")

    fo = jobdoc.table(top.get("failover", {}), f"{where}: [failover]")
    fat = f"{where}: [failover]"
    jobdoc.check_keys(fo, FAILOVER_KEYS, fat)
    window = jobdoc.number(fo, "window_minutes", fat)
    cooldown = jobdoc.number(fo, "cooldown_minutes", fat)
    fo_changes = {
        k: v
        for k, v in {
            "reclaims": jobdoc.integer(fo, "reclaims", fat, 1),
            "capacity_failures": jobdoc.integer(fo, "capacity_failures", fat, 1),
            "machine_errors": jobdoc.integer(fo, "machine_errors", fat, 1),
            "window_s": window * 60 if window is not None else None,
            "cooldown_s": cooldown * 60 if cooldown is not None else None,
            "deadline_slack": jobdoc.number(fo, "deadline_slack", fat),
            "escalate": jobdoc.boolean(fo, "escalate", fat),
            "on_demand_when_spot_exhausted": jobdoc.boolean(fo, "on_demand_when_spot_exhausted", fat),
        }.items()
        if v is not None
    }
    failover = jobdoc.build(replace, base.failover, fo_changes, fat)

    pools_doc = top.get("pools")
    if pools_doc is None:
        pools: tuple[Pool, ...] = (Pool(name="local"),)
    else:
        if not isinstance(pools_doc, list) or not pools_doc:
            raise ConfigError(f"{where}: pools must be a list of [[pools]] tables (at least one)")
        pools = tuple(_pool(item, f"{where}: pools[{i}]") for i, item in enumerate(pools_doc))
        names = [pl.name for pl in pools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{where}: pool names must be unique; {dup[0]!r} appears twice")

    command = job.get("command", [])
    if isinstance(command, str) or not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise ConfigError(f'{at}: command must be a list of strings, e.g. ["python", "train.py"]')
    deadline = jobdoc.deadline(job.get("deadline"), at)
    total_steps = jobdoc.integer(job, "total_steps", at, 1)
    if deadline is not None and total_steps is None:
        raise ConfigError(f"{at}: a deadline needs total_steps (how many steps the job runs) to project its finish")
    if (
        deadline is not None
        and failover.escalate
        and not any(not pl.spot for pl in pools)
        and any(pl.spot for pl in pools)
    ):
        raise ConfigError(
            f"{where}: a deadline with criticality {criticality!r} needs an on-demand pool to escalate to; "
            'add a [[pools]] table with market = "on-demand" to the job file, or set criticality = "opportunistic"'
        )
    grace = jobdoc.number(job, "grace_seconds", at)
    stall = jobdoc.number(job, "stall_timeout_seconds", at)
    if stall is not None and stall <= 0:
        raise ConfigError(f"{at}: stall_timeout_seconds must be > 0 (leave it out for no stall timeout)")
    return JobFile(
        path=path,
        name=jobdoc.string(job, "name", at, None),
        command=tuple(command),
        url=jobdoc.string(job, "checkpoint_url", at, None),
        store=jobdoc.string(job, "store", at, None),
        criticality=criticality,
        retry=retry,
        failover=failover,
        pools=pools,
        deadline=deadline,
        total_steps=total_steps,
        grace_s=30.0 if grace is None else grace,
        stall_timeout_s=stall,
    )


def _pool(doc: Any, at: str) -> Pool:
    table = jobdoc.table(doc, at)
    jobdoc.check_keys(table, POOL_KEYS, at)
    name = jobdoc.string(table, "name", at, None)
    if name is None:
        raise ConfigError(f"{at}: every pool needs a name")
    at = f"{at} ({name})"
    codes = table.get("capacity_exit_codes", [])
    patterns = table.get("capacity_patterns", [])
    for key, value in (("capacity_exit_codes", codes), ("capacity_patterns", patterns)):
        if not isinstance(value, list):
            raise ConfigError(f"{at}: {key} must be a list")
    for code in codes:
        if isinstance(code, bool) or not isinstance(code, int):
            raise ConfigError(f"{at}: capacity_exit_codes must be integers 1-255, got {code!r}")
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"{at}: capacity_patterns must be strings (regular expressions), got {pattern!r}")
    for key in ("launch", "stop"):
        value = table.get(key, [])
        if isinstance(value, str) or not isinstance(value, list):
            raise ConfigError(f'{at}: {key} must be a list of arguments, e.g. ["sbatch", "--wait", "job.sh"]')
    price = table.get("price_per_hour", 0.0)
    nodes = table.get("nodes", 1)
    pool: Pool = jobdoc.build(
        lambda _, **kw: Pool(**kw),
        None,
        {
            "name": name,
            "market": jobdoc.string(table, "market", at, "spot"),
            "price_per_hour": price,
            "nodes": nodes,
            "zone": jobdoc.string(table, "zone", at, ""),
            "provider": jobdoc.string(table, "provider", at, ""),
            "launch": tuple(table.get("launch", [])),
            "stop": tuple(table.get("stop", [])),
            "capacity_exit_codes": frozenset(codes),
            "capacity_patterns": tuple(patterns),
        },
        at,
    )
    return pool


__all__ = ["JobFile", "load_job_file", "overlay", "parse_job", "read_job_doc"]
