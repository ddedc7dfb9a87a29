"""Job files (TOML and YAML), ``spotsafe run -f``, pools and launchers with real subprocesses,
and a job store created by the previous schema."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from spotsafe.errors import ConfigError
from spotsafe.supervisor import jobfile
from spotsafe.supervisor.health import PRESETS, FailoverPolicy
from spotsafe.supervisor.jobfile import JobFile, load_job_file, overlay, parse_job, read_job_doc
from spotsafe.supervisor.pools import LaunchSpec, Pool
from spotsafe.supervisor.process import launch
from spotsafe.supervisor.retry import RelaunchPolicy
from spotsafe.supervisor.run import RunConfig, Supervisor
from spotsafe.supervisor.store import AttemptRecord, JobState, JobStore

from .conftest import HANG_S, StallClock, wait_until

ROOT = Path(__file__).resolve().parents[1]
SPOTSAFE = ROOT / ".venv" / "bin" / "spotsafe"
PY = sys.executable
DEADLINE_UNIX = 1795543200.0  # 2026-11-24T18:00:00Z


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def toml(value: object) -> str:
    """A TOML value for a string or a list of strings (JSON's syntax is TOML's for these)."""
    return json.dumps(value)


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_job_file(path)
    return str(info.value)


# -- the format: TOML and YAML ----------------------------------------------------------------------

FULL_TOML = """
[job]
name = "tiny-lm"
command = ["python", "train.py", "--lr", "0.1"]
checkpoint_url = "s3://bucket/runs/tiny-lm"
criticality = "critical"
deadline = 2026-11-24T18:00:00Z
total_steps = 20000
store = "/var/lib/spotsafe/jobs.sqlite"
grace_seconds = 45
stall_timeout_seconds = 900

[retry]
max_errors = 7
backoff_seconds = 2.5

[failover]
reclaims = 4
window_minutes = 90
cooldown_minutes = 15
escalate = true

[[pools]]
name = "aws-us-east-1a-spot"
market = "spot"
price_per_hour = 0.92
nodes = 2
provider = "aws"
zone = "us-east-1a"
launch = ["sky", "launch", "--zone", "{zone}", "--", "{command_line}"]
stop = ["sky", "cancel", "{job}"]
capacity_exit_codes = [3, 4]
capacity_patterns = ["InsufficientInstanceCapacity"]

[[pools]]
name = "aws-on-demand"
market = "on-demand"
price_per_hour = 3.06
"""

FULL_YAML = """
job:
  name: tiny-lm
  command: [python, train.py, --lr, "0.1"]
  checkpoint_url: s3://bucket/runs/tiny-lm
  criticality: critical
  deadline: 2026-11-24T18:00:00Z
  total_steps: 20000
  store: /var/lib/spotsafe/jobs.sqlite
  grace_seconds: 45
  stall_timeout_seconds: 900
retry:
  max_errors: 7
  backoff_seconds: 2.5
failover:
  reclaims: 4
  window_minutes: 90
  cooldown_minutes: 15
  escalate: true
pools:
  - name: aws-us-east-1a-spot
    market: spot
    price_per_hour: 0.92
    nodes: 2
    provider: aws
    zone: us-east-1a
    launch: [sky, launch, --zone, "{zone}", --, "{command_line}"]
    stop: [sky, cancel, "{job}"]
    capacity_exit_codes: [3, 4]
    capacity_patterns: [InsufficientInstanceCapacity]
  - name: aws-on-demand
    market: on-demand
    price_per_hour: 3.06
"""


@pytest.mark.parametrize("suffix", [".yaml", ".yml"])
def test_toml_and_yaml_give_the_same_job(tmp_path: Path, suffix: str) -> None:
    from_toml: JobFile = load_job_file(write(tmp_path / "job.toml", FULL_TOML))
    from_yaml: JobFile = load_job_file(write(tmp_path / f"job{suffix}", FULL_YAML))
    assert dataclasses.replace(from_yaml, path=from_toml.path) == from_toml

    assert from_toml.name == "tiny-lm"
    assert from_toml.command == ("python", "train.py", "--lr", "0.1")
    assert from_toml.url == "s3://bucket/runs/tiny-lm"
    assert from_toml.store == "/var/lib/spotsafe/jobs.sqlite"
    assert from_toml.criticality == "critical"
    assert from_toml.deadline == DEADLINE_UNIX
    assert from_toml.total_steps == 20000
    assert from_toml.grace_s == 45.0
    assert from_toml.stall_timeout_s == 900.0
    critical = PRESETS["critical"]
    assert from_toml.retry == dataclasses.replace(critical.retry, max_errors=7, initial_s=2.5)
    assert from_toml.failover == dataclasses.replace(
        critical.failover, reclaims=4, window_s=90 * 60.0, cooldown_s=15 * 60.0, escalate=True
    )
    spot, on_demand = from_toml.pools
    assert spot == Pool(
        name="aws-us-east-1a-spot",
        market="spot",
        price_per_hour=0.92,
        nodes=2,
        provider="aws",
        zone="us-east-1a",
        launch=("sky", "launch", "--zone", "{zone}", "--", "{command_line}"),
        stop=("sky", "cancel", "{job}"),
        capacity_exit_codes=frozenset({3, 4}),
        capacity_patterns=("InsufficientInstanceCapacity",),
    )
    assert on_demand == Pool(name="aws-on-demand", market="on-demand", price_per_hour=3.06)
    assert not on_demand.spot and on_demand.local


@pytest.mark.parametrize(
    ("filename", "text"),
    [
        ("job.toml", '[job]\ncommand = ["python", "train.py"]\n'),
        ("job.yaml", "job:\n  command: [python, train.py]\n"),
        ("job.toml", ""),
        ("job.yaml", ""),
    ],
)
def test_a_minimal_job_file_has_the_defaults(tmp_path: Path, filename: str, text: str) -> None:
    job = load_job_file(write(tmp_path / filename, text))
    assert job.pools == (Pool(name="local"),)
    assert job.pools[0].local
    assert job.criticality == "standard"
    assert job.retry == PRESETS["standard"].retry
    assert job.failover == PRESETS["standard"].failover
    assert (job.name, job.url, job.store) == (None, None, None)
    assert (job.deadline, job.total_steps) == (None, None)
    assert job.grace_s == 30.0
    assert job.stall_timeout_s is None
    assert job.command == (("python", "train.py") if text else ())


@pytest.mark.parametrize("criticality", ["critical", "standard", "opportunistic"])
def test_retry_and_failover_sections_override_the_preset_field_by_field(tmp_path: Path, criticality: str) -> None:
    path = write(
        tmp_path / "job.toml",
        f"""
        [job]
        criticality = "{criticality}"
        [retry]
        max_errors = 9
        max_backoff_seconds = 12
        [failover]
        capacity_failures = 5
        window_minutes = 2
        cooldown_minutes = 0.5
        on_demand_when_spot_exhausted = true
        """,
    )
    job = load_job_file(path)
    base = PRESETS[criticality]
    assert job.retry == dataclasses.replace(base.retry, max_errors=9, max_delay_s=12.0)
    assert job.retry.max_preemptions == base.retry.max_preemptions
    assert job.failover == dataclasses.replace(
        base.failover, capacity_failures=5, window_s=120.0, cooldown_s=30.0, on_demand_when_spot_exhausted=True
    )
    assert job.failover.reclaims == base.failover.reclaims
    assert job.failover.escalate == base.failover.escalate


ON_DEMAND_POOL_TOML = '[[pools]]\nname = "od"\nmarket = "on-demand"\n'
ON_DEMAND_POOL_YAML = "pools:\n  - name: od\n    market: on-demand\n"


@pytest.mark.parametrize(
    ("filename", "deadline"),
    [
        ("job.toml", "deadline = 2026-11-24T18:00:00Z"),
        ("job.toml", "deadline = 2026-11-24T20:00:00+02:00"),
        ("job.toml", 'deadline = "2026-11-24T18:00:00Z"'),
        ("job.toml", 'deadline = "2026-11-24T13:00:00-05:00"'),
        ("job.yaml", "deadline: 2026-11-24T18:00:00Z"),
        ("job.yaml", "deadline: 2026-11-24T19:00:00+01:00"),
        ("job.yml", 'deadline: "2026-11-24T18:00:00Z"'),
    ],
)
def test_a_deadline_with_a_zone_is_unix_time(tmp_path: Path, filename: str, deadline: str) -> None:
    if filename.endswith(".toml"):
        text = f"[job]\n{deadline}\ntotal_steps = 100\n{ON_DEMAND_POOL_TOML}"
    else:
        text = f"job:\n  {deadline}\n  total_steps: 100\n{ON_DEMAND_POOL_YAML}"
    job = load_job_file(write(tmp_path / filename, text))
    assert job.deadline == DEADLINE_UNIX
    assert job.deadline == dt.datetime(2026, 11, 24, 18, tzinfo=dt.UTC).timestamp()
    assert job.total_steps == 100


@pytest.mark.parametrize(
    ("filename", "deadline"),
    [
        ("job.toml", "deadline = 2026-11-24T18:00:00"),
        ("job.toml", 'deadline = "2026-11-24T18:00:00"'),
        ("job.toml", "deadline = 2026-11-24"),
        ("job.toml", 'deadline = "tomorrow"'),
        ("job.toml", "deadline = 1795543200"),
        ("job.yaml", "deadline: 2026-11-24 18:00:00"),
        ("job.yaml", "deadline: 2026-11-24"),
    ],
)
def test_a_deadline_without_a_zone_is_rejected(tmp_path: Path, filename: str, deadline: str) -> None:
    if filename.endswith(".toml"):
        text = f"[job]\n{deadline}\ntotal_steps = 100\n{ON_DEMAND_POOL_TOML}"
    else:
        text = f"job:\n  {deadline}\n  total_steps: 100\n{ON_DEMAND_POOL_YAML}"
    path = write(tmp_path / filename, text)
    message = config_error(path)
    assert str(path) in message
    assert "[job]" in message
    assert "deadline" in message
    assert "Z" in message  # says what to write: a zone, e.g. 2026-11-24T18:00:00Z


def test_a_deadline_needs_total_steps(tmp_path: Path) -> None:
    path = write(tmp_path / "job.toml", f"[job]\ndeadline = 2026-11-24T18:00:00Z\n{ON_DEMAND_POOL_TOML}")
    message = config_error(path)
    assert str(path) in message
    assert "[job]" in message
    assert "total_steps" in message


SPOT_ONLY = '[[pools]]\nname = "spot-a"\nmarket = "spot"\nprice_per_hour = 0.5\n'


@pytest.mark.parametrize("criticality", ["critical", "standard"])
def test_a_deadline_that_may_escalate_needs_an_on_demand_pool(tmp_path: Path, criticality: str) -> None:
    head = f'[job]\ncriticality = "{criticality}"\ndeadline = 2026-11-24T18:00:00Z\ntotal_steps = 10\n'
    spot_only = write(tmp_path / "spot.toml", head + SPOT_ONLY)
    message = config_error(spot_only)
    assert str(spot_only) in message
    assert "deadline" in message
    assert 'market = "on-demand"' in message
    assert "opportunistic" in message

    with_od = load_job_file(write(tmp_path / "od.toml", head + SPOT_ONLY + ON_DEMAND_POOL_TOML))
    assert with_od.deadline == DEADLINE_UNIX
    no_escalation = load_job_file(write(tmp_path / "noesc.toml", head + "[failover]\nescalate = false\n" + SPOT_ONLY))
    assert no_escalation.failover.escalate is False


def test_a_deadline_with_opportunistic_criticality_needs_no_on_demand_pool(tmp_path: Path) -> None:
    path = write(
        tmp_path / "job.toml",
        '[job]\ncriticality = "opportunistic"\ndeadline = 2026-11-24T18:00:00Z\ntotal_steps = 10\n' + SPOT_ONLY,
    )
    job = load_job_file(path)
    assert job.deadline == DEADLINE_UNIX
    assert job.failover.escalate is False
    assert [p.market for p in job.pools] == ["spot"]


# -- validation: every error names the file, the section or pool, the key, and the fix ----------------

POOL = '[[pools]]\nname = "a"\n'

BAD_FILES: list[tuple[str, str, list[str]]] = [
    ("unknown-job-key", '[job]\ncomand = ["x"]\n', ["[job]", "'comand'", "did you mean 'command'"]),
    ("unknown-top-key", "[jobs]\n", ["unknown key 'jobs'", "did you mean 'job'"]),
    ("unknown-top-pool", '[[pool]]\nname = "a"\n', ["unknown key 'pool'", "did you mean 'pools'"]),
    ("unknown-retry-key", "[retry]\nmax_error = 3\n", ["[retry]", "'max_error'", "did you mean 'max_errors'"]),
    (
        "unknown-failover-key",
        "[failover]\nwindow_seconds = 60\n",
        ["[failover]", "'window_seconds'", "did you mean 'window_minutes'"],
    ),
    ("unknown-pool-key", POOL + "prcie_per_hour = 1\n", ["pools[0]", "'prcie_per_hour'", "'price_per_hour'"]),
    ("unknown-key-no-match", "[job]\nzzz = 1\n", ["[job]", "'zzz'", "known keys:", "checkpoint_url"]),
    ("price-string", POOL + 'price_per_hour = "0.92"\n', ["pools[0] (a)", "price_per_hour", "'0.92'", "number"]),
    ("nodes-bool", POOL + "nodes = true\n", ["pools[0] (a)", "nodes", "integer >= 1", "True"]),
    ("nodes-negative", POOL + "nodes = -2\n", ["pools[0] (a)", "nodes", "integer >= 1", "-2"]),
    ("market-typo", POOL + 'market = "spto"\n', ["pools[0] (a)", "market", "'spot'", "'on-demand'", "'spto'"]),
    ("launch-one-string", POOL + 'launch = "sky launch"\n', ["pools[0] (a)", "launch", "list of arguments"]),
    ("stop-one-string", POOL + 'stop = "scancel 1"\n', ["pools[0] (a)", "stop", "list of arguments"]),
    ("launch-not-strings", POOL + 'launch = ["x", 3]\n', ["pools[0] (a)", "launch", "string", "3"]),
    ("launch-bogus-field", POOL + 'launch = ["x", "{bogus}"]\n', ["pools[0] (a)", "launch", "{bogus}", "{zone}"]),
    ("stop-bogus-field", POOL + 'stop = ["x", "--{bogus}"]\n', ["pools[0] (a)", "stop", "{bogus}", "{job}"]),
    ("launch-unbalanced", POOL + 'launch = ["x", "{pool"]\n', ["pools[0] (a)", "launch", "'{pool'", "{{"]),
    (
        "launch-command-inside",
        POOL + 'launch = ["x", "--cmd={command}"]\n',
        ["pools[0] (a)", "launch", "{command_line}"],
    ),
    (
        "capacity-pattern-not-regex",
        POOL + 'capacity_patterns = ["(["]\n',
        ["pools[0] (a)", "capacity pattern", "'(['", "regular expression"],
    ),
    (
        "capacity-patterns-not-list",
        POOL + 'capacity_patterns = "Insufficient"\n',
        ["pools[0] (a)", "capacity_patterns", "list"],
    ),
    ("capacity-code-0", POOL + "capacity_exit_codes = [0]\n", ["pools[0] (a)", "capacity_exit_codes", "1-255", "0"]),
    ("capacity-code-300", POOL + "capacity_exit_codes = [300]\n", ["pools[0] (a)", "capacity_exit_codes", "300"]),
    ("capacity-codes-not-list", POOL + "capacity_exit_codes = 3\n", ["pools[0] (a)", "capacity_exit_codes", "list"]),
    ("pool-name-missing", '[[pools]]\nmarket = "spot"\n', ["pools[0]", "needs a name"]),
    ("pool-name-bad", '[[pools]]\nname = "a b"\n', ["pools[0]", "pool name", "letters, digits"]),
    ("duplicate-pools", POOL + POOL, ["pool names must be unique", "'a'"]),
    ("pools-empty", "pools = []\n", ["pools", "list of [[pools]] tables", "at least one"]),
    ("pools-not-list", 'pools = "a"\n', ["pools", "list of [[pools]] tables"]),
    ("pools-a-table", '[pools]\nname = "a"\n', ["pools", "list of [[pools]] tables"]),
    ("pool-not-table", 'pools = ["a"]\n', ["pools[0]", "table"]),
    ("job-not-table", "job = 3\n", ["[job]", "table"]),
    ("command-one-string", '[job]\ncommand = "python train.py"\n', ["[job]", "command", "list of strings"]),
    ("criticality-not-string", "[job]\ncriticality = 3\n", ["[job]", "criticality", "string"]),
    ("name-not-string", "[job]\nname = 3\n", ["[job]", "name", "string"]),
    ("total-steps-zero", "[job]\ntotal_steps = 0\n", ["[job]", "total_steps", "integer >= 1"]),
    ("grace-string", '[job]\ngrace_seconds = "30"\n', ["[job]", "grace_seconds", "number"]),
    ("grace-negative", "[job]\ngrace_seconds = -1\n", ["[job]", "grace_seconds", ">= 0"]),
    ("stall-zero", "[job]\nstall_timeout_seconds = 0\n", ["[job]", "stall_timeout_seconds", "> 0", "leave it out"]),
    ("retry-bool", "[retry]\nmax_errors = true\n", ["[retry]", "max_errors", "integer", "True"]),
    ("retry-negative", "[retry]\nbackoff_seconds = -1\n", ["[retry]", "backoff_seconds", ">= 0"]),
    ("failover-zero", "[failover]\nreclaims = 0\n", ["[failover]", "reclaims", "integer >= 1"]),
    ("failover-slack", "[failover]\ndeadline_slack = 1.5\n", ["[failover]", "deadline_slack", "[0, 1)"]),
    ("failover-bool", '[failover]\nescalate = "yes"\n', ["[failover]", "escalate", "true or false"]),
    ("failover-window", "[failover]\nwindow_minutes = -5\n", ["[failover]", "window_minutes", ">= 0"]),
]


@pytest.mark.parametrize(("text", "fragments"), [(t, f) for _, t, f in BAD_FILES], ids=[i for i, _, _ in BAD_FILES])
def test_every_validation_error_names_the_file_the_place_and_the_key(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path / "job.toml", text)
    message = config_error(path)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_yaml_validation_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", "job:\n  command: [python]\npools:\n  - name: a\n    nodse: 2\n")
    message = config_error(path)
    assert str(path) in message
    assert "pools[0]" in message
    assert "did you mean 'nodes'" in message


def test_unreadable_files_wrong_suffixes_and_syntax_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    assert str(missing) in config_error(missing)
    assert "cannot read" in config_error(missing)
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    assert "cannot read" in config_error(folder)

    json_file = write(tmp_path / "job.json", '{"job": {}}')
    message = config_error(json_file)
    assert str(json_file) in message
    assert ".toml" in message and ".yaml" in message

    bad_toml = write(tmp_path / "bad.toml", '[job\ncommand = ["x"]\n')
    message = config_error(bad_toml)
    assert str(bad_toml) in message and "not valid TOML" in message
    assert "line 1" in message

    bad_yaml = write(tmp_path / "bad.yaml", "job:\n  command: [python, train.py\n")
    message = config_error(bad_yaml)
    assert str(bad_yaml) in message and "not valid YAML" in message

    listed = write(tmp_path / "list.yml", "- job\n- pools\n")
    message = config_error(listed)
    assert str(listed) in message
    assert "must hold a table" in message and "list" in message

    scalar = write(tmp_path / "scalar.yaml", "just words\n")
    assert "must hold a table" in config_error(scalar)


def test_read_job_doc_returns_the_raw_document(tmp_path: Path) -> None:
    doc = read_job_doc(write(tmp_path / "job.toml", FULL_TOML))
    assert doc == tomllib.loads(FULL_TOML)
    assert read_job_doc(write(tmp_path / "empty.yaml", "")) == {}


def test_a_job_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(b'# caf\xe9 (Latin-1)\n[job]\ncommand = ["python", "train.py"]\n')
    message = config_error(path)
    assert str(path) in message


def test_an_unknown_criticality_names_the_file_and_the_section(tmp_path: Path) -> None:
    path = write(tmp_path / "job.toml", '[job]\ncriticality = "urgent"\n')
    message = config_error(path)
    assert "criticality" in message and "'urgent'" in message and "standard" in message
    assert str(path) in message
    assert "[job]" in message


def test_a_nested_list_of_capacity_exit_codes_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "job.toml", POOL + "capacity_exit_codes = [[3]]\n")
    message = config_error(path)
    assert str(path) in message
    assert "capacity_exit_codes" in message


@pytest.mark.parametrize("argument", ["{pool:{bogus}}", "{pool!z}"])
def test_a_template_that_cannot_be_expanded_is_rejected_when_the_pool_is_made(argument: str) -> None:
    with pytest.raises(ConfigError):
        Pool(name="p", launch=("sky", argument))


def documented_example() -> str:
    doc = jobfile.__doc__ or ""
    return textwrap.dedent(doc.split("::", 1)[1].split("Every error", 1)[0])


def test_the_documented_example_is_valid_toml_with_only_known_keys() -> None:
    doc = tomllib.loads(documented_example())
    assert set(doc) == jobfile.TOP_KEYS
    assert set(doc["job"]) == jobfile.JOB_KEYS - {"store"}
    assert set(doc["retry"]) == jobfile.RETRY_KEYS
    assert set(doc["failover"]) == jobfile.FAILOVER_KEYS
    assert set(doc["pools"][0]) == jobfile.POOL_KEYS


def test_the_documented_example_is_a_valid_job_file(tmp_path: Path) -> None:
    job = load_job_file(write(tmp_path / "doc.toml", documented_example()))
    assert job.deadline == DEADLINE_UNIX


# -- JobFile.config: arguments > file > environment > defaults ---------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("SPOTSAFE_CHECKPOINT_URL", raising=False)
    monkeypatch.delenv("SPOTSAFE_JOB_STORE", raising=False)
    return monkeypatch


def test_config_takes_arguments_over_the_file_over_the_environment_over_defaults(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    full = load_job_file(
        write(
            tmp_path / "full.toml",
            """
            [job]
            name = "file-name"
            command = ["python", "file.py"]
            checkpoint_url = "s3://bucket/runs/from-file"
            store = "file.sqlite"
            """,
        )
    )
    bare = load_job_file(write(tmp_path / "bare.toml", ""))
    clean_env.setenv("SPOTSAFE_CHECKPOINT_URL", "s3://bucket/runs/from-env")
    clean_env.setenv("SPOTSAFE_JOB_STORE", "env.sqlite")

    args = full.config(command=("python", "arg.py"), name="arg-name", url="s3://b/from-arg", store="arg.sqlite")
    assert (args.command, args.name, args.url, args.store) == (
        ("python", "arg.py"),
        "arg-name",
        "s3://b/from-arg",
        Path("arg.sqlite"),
    )

    from_file = full.config()
    assert (from_file.command, from_file.name, from_file.url, from_file.store) == (
        ("python", "file.py"),
        "file-name",
        "s3://bucket/runs/from-file",
        Path("file.sqlite"),
    )

    from_env = bare.config(command=("python", "x.py"))
    assert (from_env.name, from_env.url, from_env.store) == (
        "from-env",
        "s3://bucket/runs/from-env",
        Path("env.sqlite"),
    )

    clean_env.delenv("SPOTSAFE_CHECKPOINT_URL")
    clean_env.delenv("SPOTSAFE_JOB_STORE")
    defaults = bare.config(command=("python", "x.py"), url="s3://bucket/runs/tiny-lm")
    assert defaults.store == Path(".spotsafe/jobs.sqlite")
    assert defaults.name == "tiny-lm"


@pytest.mark.parametrize(
    ("url", "name"),
    [("s3://bucket/runs/tiny-lm", "tiny-lm"), ("s3://bucket/runs/tiny-lm/", "tiny-lm"), ("/data/runs/r7", "r7")],
)
def test_the_name_defaults_to_the_urls_last_part(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, url: str, name: str
) -> None:
    job = load_job_file(write(tmp_path / "job.toml", f'[job]\ncommand = ["x"]\ncheckpoint_url = {toml(url)}\n'))
    assert job.config().name == name


def test_config_without_a_command_or_url_anywhere_is_a_config_error(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "job.toml", '[job]\ncheckpoint_url = "s3://b/r"\n')
    job = load_job_file(path)
    with pytest.raises(ConfigError) as info:
        job.config()
    assert str(path) in str(info.value)
    assert "command" in str(info.value) and "--" in str(info.value)
    assert job.config(command=["python", "train.py"]).command == ("python", "train.py")

    no_url = load_job_file(write(tmp_path / "nourl.toml", '[job]\ncommand = ["x"]\n'))
    with pytest.raises(ConfigError) as info:
        no_url.config()
    assert "checkpoint_url" in str(info.value) and "--url" in str(info.value)


def test_config_carries_the_files_policy_pools_and_deadline(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    job = load_job_file(write(tmp_path / "job.toml", FULL_TOML))
    config = job.config()
    assert isinstance(config, RunConfig)
    assert config.pools == job.pools
    assert config.retry == job.retry
    assert config.failover == job.failover
    assert (config.deadline, config.total_steps) == (DEADLINE_UNIX, 20000)
    assert (config.grace_s, config.stall_timeout_s) == (45.0, 900.0)


# -- overlay: command-line values over the file --------------------------------------------------------


def test_overlay_lays_given_values_over_the_file_and_keeps_the_rest() -> None:
    doc: dict[str, object] = {
        "job": {"command": ["python", "train.py"], "criticality": "standard", "total_steps": 5},
        "retry": {"max_errors": 5, "backoff_seconds": 2.0},
        "pools": [{"name": "a"}],
    }
    merged = overlay(
        doc,
        {
            "job": {"criticality": "critical", "deadline": None},
            "retry": {"max_errors": 1, "max_backoff_seconds": None},
            "failover": {"reclaims": None},
        },
    )
    assert merged == {
        "job": {"command": ["python", "train.py"], "criticality": "critical", "total_steps": 5},
        "retry": {"max_errors": 1, "backoff_seconds": 2.0},
        "pools": [{"name": "a"}],
    }
    assert doc["job"] == {"command": ["python", "train.py"], "criticality": "standard", "total_steps": 5}
    assert overlay({}, {"job": {"criticality": "opportunistic"}}) == {"job": {"criticality": "opportunistic"}}
    assert overlay(doc, {"job": {"criticality": None}}) == doc


def test_overlay_then_parse_is_how_flags_win(tmp_path: Path) -> None:
    path = write(tmp_path / "job.toml", '[job]\ncriticality = "standard"\n[retry]\nmax_errors = 5\n')
    merged = overlay(read_job_doc(path), {"job": {"criticality": "critical"}, "retry": {"max_errors": 1}})
    job = parse_job(merged, path)
    assert job.criticality == "critical"
    assert job.retry == dataclasses.replace(PRESETS["critical"].retry, max_errors=1)
    assert job.failover == PRESETS["critical"].failover


# -- spotsafe run -f, as a real subprocess ------------------------------------------------------------


def cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SPOTSAFE_")}


def spotsafe(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SPOTSAFE), *args],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_a_bad_job_file_exits_2_and_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path / "job.toml", '[job]\ncommand = ["python"]\n[[pools]]\nname = "a"\nmarket = "spto"\n')
    result = spotsafe(tmp_path, "run", "-f", str(path), "--store", str(tmp_path / "jobs.sqlite"))
    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr
    assert "market" in result.stderr and "'spto'" in result.stderr and "'on-demand'" in result.stderr
    assert not (tmp_path / "jobs.sqlite").exists()


HI = [PY, "-c", "print('hi')"]


def test_cli_runs_the_job_files_command_and_records_the_attempt(tmp_path: Path) -> None:
    url = tmp_path / "run"
    path = write(
        tmp_path / "job.toml",
        f"[job]\ncommand = {toml(HI)}\ncheckpoint_url = {toml(str(url))}\n",
    )
    store_path = tmp_path / "state" / "jobs.sqlite"
    result = spotsafe(tmp_path, "run", "-f", str(path), "--store", str(store_path))
    assert result.returncode == 0, result.stderr
    assert "hi" in result.stdout
    with JobStore(store_path) as store:
        job = store.job("run")
        assert job.state == JobState.SUCCEEDED
        assert job.command == HI
        assert job.url == str(url)
        [attempt] = store.attempts("run")
        assert (attempt.pool, attempt.exit_code, attempt.exit_class) == ("local", 0, "succeeded")
        assert attempt.ended is not None


def test_cli_flags_override_the_job_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "job.toml",
        f"""
        [job]
        name = "flags"
        command = {toml([PY, "-c", "import sys; sys.exit(1)"])}
        checkpoint_url = {toml(str(tmp_path / "run"))}
        criticality = "standard"
        deadline = 2099-01-01T00:00:00Z
        total_steps = 10
        [retry]
        max_errors = 5
        backoff_seconds = 0
        max_backoff_seconds = 0
        [[pools]]
        name = "spot-a"
        market = "spot"
        """,
    )
    store = str(tmp_path / "jobs.sqlite")
    refused = spotsafe(tmp_path, "run", "-f", str(path), "--store", store)
    assert refused.returncode == 2, refused.stderr
    assert "on-demand" in refused.stderr and "opportunistic" in refused.stderr

    ran = spotsafe(
        tmp_path, "run", "-f", str(path), "--store", store, "--criticality", "opportunistic", "--max-errors", "1"
    )
    assert ran.returncode == 1, ran.stderr  # --max-errors 1 over the file's 5: the first crash ends it
    with JobStore(store) as job_store:
        assert [a.exit_class for a in job_store.attempts("flags")] == ["crashed"]
        assert [a.pool for a in job_store.attempts("flags")] == ["spot-a"]


def test_cli_a_command_after_dashes_overrides_the_files(tmp_path: Path) -> None:
    path = write(
        tmp_path / "job.toml",
        f"[job]\ncommand = {toml([PY, '-c', 'import sys; sys.exit(1)'])}\n"
        f"checkpoint_url = {toml(str(tmp_path / 'run'))}\n",
    )
    result = spotsafe(
        tmp_path,
        "run",
        "-f",
        str(path),
        "--store",
        str(tmp_path / "j.sqlite"),
        "--name",
        "dash",
        "--",
        PY,
        "-c",
        "pass",
    )
    assert result.returncode == 0, result.stderr
    with JobStore(tmp_path / "j.sqlite") as store:
        assert store.job("dash").command == [PY, "-c", "pass"]


def test_cli_without_any_command_is_a_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path / "job.toml", f"[job]\ncheckpoint_url = {toml(str(tmp_path / 'run'))}\n")
    result = spotsafe(tmp_path, "run", "-f", str(path), "--store", str(tmp_path / "jobs.sqlite"))
    assert result.returncode == 2
    assert "--" in result.stderr and "command" in result.stderr


# -- pools and launchers, with real subprocesses --------------------------------------------------------


def test_launch_spec_expands_templates() -> None:
    pool = Pool(name="gcp-od", market="on-demand", zone="us-central1-a", provider="gcp", nodes=4)
    spec = LaunchSpec(
        job="tiny",
        attempt=3,
        url="gs://b/runs/tiny",
        command=("python", "train.py", "--note", "two words", "it's"),
        env={},
        pool=pool,
        exclude=("node-1", "node-7"),
    )
    template = [
        "launch",
        "{command}",
        "--",
        "{command_line}",
        "--exclude={exclude}",
        "{job}-{attempt}",
        "{url}",
        "{pool}/{zone}/{provider}/{market}/{nodes}",
        "{{literal}}",
    ]
    assert spec.expand(template) == [
        "launch",
        "python",
        "train.py",
        "--note",
        "two words",
        "it's",
        "--",
        "python train.py --note 'two words' 'it'\"'\"'s'",
        "--exclude=node-1,node-7",
        "tiny-3",
        "gs://b/runs/tiny",
        "gcp-od/us-central1-a/gcp/on-demand/4",
        "{literal}",
    ]
    nothing_excluded = dataclasses.replace(spec, exclude=())
    assert nothing_excluded.expand(["--exclude={exclude}"]) == ["--exclude="]
    assert spec.fields()["command_line"] == "python train.py --note 'two words' 'it'\"'\"'s'"


def supervise(
    tmp_path: Path,
    pools: tuple[Pool, ...],
    *,
    command: tuple[str, ...] = ("python", "train.py"),
    output: int = subprocess.DEVNULL,
    failover: FailoverPolicy | None = None,
    stall_timeout_s: float | None = None,
    grace_s: float = 5.0,
    clock: Callable[[], float] = time.time,
) -> tuple[int, list[AttemptRecord], list[str]]:
    config = RunConfig(
        name="job",
        command=command,
        url=str(tmp_path / "run"),
        store=tmp_path / "jobs.sqlite",
        retry=RelaunchPolicy(max_errors=1, initial_s=0.01, max_delay_s=0.05),
        grace_s=grace_s,
        stall_timeout_s=stall_timeout_s,
        pools=pools,
        failover=failover or FailoverPolicy(),
    )
    lines: list[str] = []
    code = Supervisor(config, say=lines.append, output=output, clock=clock).run()
    with JobStore(tmp_path / "jobs.sqlite") as store:
        return code, store.attempts("job"), lines


RECORD = (
    "import json, os, sys; open(sys.argv[1], 'w').write(json.dumps(dict(argv=sys.argv[2:], "
    "env=dict((k, v) for k, v in os.environ.items() if k.startswith('SPOTSAFE_')))))"
)


def test_a_launch_template_gets_the_expanded_arguments_and_the_environment(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    pool = Pool(
        name="slurm-a",
        zone="rack-3",
        price_per_hour=2.0,
        launch=(PY, "-c", RECORD, str(seen), "{pool}", "{zone}", "{attempt}", "{command}", "{command_line}"),
    )
    code, attempts, _ = supervise(tmp_path, (pool,), command=("python", "train.py", "--lr", "0.1 0.2"))
    assert code == 0
    got = json.loads(seen.read_text())
    assert got["argv"] == [
        "slurm-a",
        "rack-3",
        "1",
        "python",
        "train.py",
        "--lr",
        "0.1 0.2",
        "python train.py --lr '0.1 0.2'",
    ]
    assert got["env"]["SPOTSAFE_CHECKPOINT_URL"] == str(tmp_path / "run")
    assert got["env"]["SPOTSAFE_ATTEMPT"] == "1"
    assert got["env"]["SPOTSAFE_RUN_ID"] == "job"
    assert got["env"]["SPOTSAFE_POOL"] == "slurm-a"
    assert got["env"]["SPOTSAFE_JOB_STORE"] == str(tmp_path / "jobs.sqlite")
    [attempt] = attempts
    assert (attempt.pool, attempt.exit_class, attempt.exit_code) == ("slurm-a", "succeeded", 0)
    assert attempt.cost is not None and attempt.cost >= 0.0


CAPACITY = (
    "import sys; print('launching attempt', sys.argv[1]); "
    "print('An error occurred (InsufficientInstanceCapacity) when calling RunInstances' if sys.argv[1] == '1' "
    "else 'some other launcher error'); sys.exit(3 if sys.argv[1] != sys.argv[2] else 0)"
)


def test_a_capacity_pattern_in_the_launchers_output_is_no_capacity_and_the_output_is_teed(tmp_path: Path) -> None:
    pool = Pool(
        name="aws-spot",
        price_per_hour=1.0,
        launch=(PY, "-c", CAPACITY, "{attempt}", "2"),
        capacity_patterns=("InsufficientInstanceCapacity", "ResourcesUnavailable"),
    )
    out_path = tmp_path / "out.log"
    with open(out_path, "wb") as out:
        code, attempts, lines = supervise(tmp_path, (pool,), output=out.fileno())
    assert code == 0, lines
    assert [(a.exit_class, a.exit_code) for a in attempts] == [("no_capacity", 3), ("succeeded", 0)]
    assert attempts[0].cost == 0.0  # no machine was held
    teed = out_path.read_text()
    assert "launching attempt 1" in teed
    assert "InsufficientInstanceCapacity" in teed


def test_a_capacity_exit_code_is_no_capacity_without_any_pattern(tmp_path: Path) -> None:
    pool = Pool(name="aws-spot", launch=(PY, "-c", CAPACITY, "{attempt}", "2"), capacity_exit_codes=frozenset({3}))
    out_path = tmp_path / "out.log"
    with open(out_path, "wb") as out:
        code, attempts, _ = supervise(tmp_path, (pool,), output=out.fileno())
    assert code == 0
    assert [a.exit_class for a in attempts] == ["no_capacity", "succeeded"]
    assert "InsufficientInstanceCapacity" in out_path.read_text()


def test_a_capacity_pattern_that_does_not_match_is_a_crash(tmp_path: Path) -> None:
    pool = Pool(
        name="aws-spot",
        launch=(PY, "-c", CAPACITY, "{attempt}", "never"),
        capacity_patterns=("ResourcesUnavailableError",),
    )
    code, attempts, _ = supervise(tmp_path, (pool,))
    assert code == 1
    assert [(a.exit_class, a.exit_code) for a in attempts] == [("crashed", 3)]


def test_no_capacity_fails_over_to_the_next_pool(tmp_path: Path) -> None:
    cheap = Pool(
        name="cheap",
        price_per_hour=0.1,
        launch=(PY, "-c", CAPACITY, "{attempt}", "never"),
        capacity_exit_codes=frozenset({3}),
    )
    dear = Pool(name="dear", price_per_hour=0.9, launch=(PY, "-c", "pass"))
    code, attempts, _ = supervise(tmp_path, (dear, cheap), failover=FailoverPolicy(capacity_failures=1))
    assert code == 0
    assert [(a.pool, a.exit_class) for a in attempts] == [("cheap", "no_capacity"), ("dear", "succeeded")]


STOP = "import sys; open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + chr(10))"
STUBBORN = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1], 'w').close(); time.sleep(120)"
)


def test_the_stop_template_runs_once_when_a_stalled_attempt_is_stopped(tmp_path: Path) -> None:
    stops, started = tmp_path / "stops.txt", tmp_path / "started"
    pool = Pool(
        name="slurm",
        launch=(PY, "-c", STUBBORN, str(started)),
        stop=(PY, "-c", STOP, str(stops), "{job}", "{attempt}", "{pool}"),
    )
    # The stall is declared once the job ignores SIGTERM (it wrote `started`), not after a timeout shorter than a
    # busy machine may take to start Python (its SIGTERM would then end it before it could ignore it).
    clock = StallClock(started.exists)
    code, attempts, _ = supervise(tmp_path, (pool,), stall_timeout_s=HANG_S, grace_s=0.3, clock=clock)
    assert code == 1
    [attempt] = attempts
    assert attempt.exit_class == "no_progress"
    assert attempt.exit_code == -signal.SIGKILL  # SIGTERM was ignored: SIGKILL followed, and no second stop
    assert stops.read_text().splitlines() == ["job 1 slurm"]


def test_the_stop_template_runs_once_when_the_supervisor_gets_sigterm(tmp_path: Path) -> None:
    started, stops = tmp_path / "started", tmp_path / "stops.txt"
    sleeper = "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(120)"
    path = write(
        tmp_path / "job.toml",
        f"""
        [job]
        name = "stopme"
        command = ["python", "train.py"]
        checkpoint_url = {toml(str(tmp_path / "run"))}
        grace_seconds = 5
        [[pools]]
        name = "k8s"
        launch = {toml([PY, "-c", sleeper, str(started)])}
        stop = {toml([PY, "-c", STOP, str(stops), "{job}", "{attempt}"])}
        """,
    )
    store = tmp_path / "jobs.sqlite"
    proc = subprocess.Popen(
        [str(SPOTSAFE), "run", "-f", str(path), "--store", str(store)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: started.exists() or proc.poll() is not None, "the job to start", poll_s=0.05)
        assert started.exists(), proc.communicate(timeout=10)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, err
    assert stops.read_text().splitlines() == ["stopme 1"]
    with JobStore(store) as job_store:
        assert job_store.job("stopme").state == JobState.STOPPED
        [attempt] = job_store.attempts("stopme")
        assert attempt.pool == "k8s" and attempt.ended is not None


def test_launch_keep_tail_tees_the_output_and_keeps_its_end(tmp_path: Path) -> None:
    out_path = tmp_path / "out.log"
    script = "import sys; print('to stdout'); print('to stderr', file=sys.stderr); sys.exit(4)"
    with open(out_path, "wb") as out:
        job = launch([PY, "-c", script], stdout=out.fileno(), stderr=out.fileno(), keep_tail=True)
        assert job.wait(timeout=30) == 4
        tail = job.output_tail()
    assert "to stdout" in tail and "to stderr" in tail
    teed = out_path.read_text()
    assert "to stdout" in teed and "to stderr" in teed

    plain = launch([PY, "-c", "pass"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert plain.wait(timeout=30) == 0
    assert plain.output_tail() == ""


def test_pool_cost_and_properties() -> None:
    pool = Pool(name="p", price_per_hour=0.9, nodes=2)
    assert pool.cost(1800) == pytest.approx(0.9)
    assert pool.cost(3600) == pytest.approx(1.8)
    assert pool.cost(-5) == 0.0
    assert Pool(name="free").cost(3600) == 0.0
    assert pool.spot and pool.local
    assert not Pool(name="od", market="on-demand", launch=("x",)).local
    assert Pool(name="a", provider="aws", zone="z1", price_per_hour=0.5).describe() == "a (spot, $0.5/h, aws/z1)"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": ""}, "pool name"),
        ({"name": "has space"}, "pool name"),
        ({"name": "p", "market": "spto"}, "market"),
        ({"name": "p", "price_per_hour": -1.0}, "price_per_hour"),
        ({"name": "p", "price_per_hour": float("nan")}, "price_per_hour"),
        ({"name": "p", "price_per_hour": "1"}, "price_per_hour"),
        ({"name": "p", "price_per_hour": True}, "price_per_hour"),
        ({"name": "p", "nodes": 0}, "nodes"),
        ({"name": "p", "nodes": 1.5}, "nodes"),
        ({"name": "p", "launch": "sky launch"}, "not one string"),
        ({"name": "p", "launch": ("x", "{bogus}")}, "{bogus}"),
        ({"name": "p", "stop": ("x", "}")}, "not a valid template"),
        ({"name": "p", "capacity_exit_codes": frozenset({0})}, "1-255"),
        ({"name": "p", "capacity_exit_codes": frozenset({256})}, "1-255"),
        ({"name": "p", "capacity_exit_codes": frozenset({True})}, "1-255"),
        ({"name": "p", "capacity_patterns": ("(",)}, "regular expression"),
        ({"name": "p", "capacity_patterns": (3,)}, "regular expression"),
    ],
)
def test_pool_validation_errors(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        Pool(**kwargs)  # type: ignore[arg-type]
    assert fragment in str(info.value)


# -- a job store created by the previous schema ---------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    command TEXT NOT NULL,
    url TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    job TEXT NOT NULL REFERENCES jobs(name),
    number INTEGER NOT NULL,
    pool TEXT NOT NULL DEFAULT 'local',
    host TEXT NOT NULL,
    pid INTEGER,
    started REAL NOT NULL,
    ended REAL,
    exit_code INTEGER,
    exit_class TEXT,
    step_before INTEGER,
    step_after INTEGER,
    cost REAL,
    PRIMARY KEY (job, number)
);
"""


def old_store(path: Path, command: list[str], url: str) -> None:
    db = sqlite3.connect(path)
    with db:
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO jobs (name, command, url, state, reason, created, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("job", json.dumps(command), url, JobState.STOPPED, "stopped by a signal", 100.0, 150.0),
        )
        db.execute(
            "INSERT INTO attempts (job, number, pool, host, pid, started, ended, exit_code, exit_class, "
            "step_before, step_after, cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("job", 1, "local", "old-host", 4242, 100.0, 150.0, 75, "preempted", None, 20, 0.25),
        )
    db.close()


def columns(path: Path, table: str) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    finally:
        db.close()


def test_a_store_of_the_previous_schema_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    old_store(path, ["python", "train.py"], "s3://b/r")
    assert "machine" not in columns(path, "attempts") and "escalated" not in columns(path, "jobs")

    with JobStore(path) as store:
        job = store.job("job")
        assert (job.command, job.url, job.state, job.reason) == (
            ["python", "train.py"],
            "s3://b/r",
            JobState.STOPPED,
            "stopped by a signal",
        )
        assert (job.created, job.updated, job.escalated) == (100.0, 150.0, False)
        assert store.attempts("job") == [
            AttemptRecord("job", 1, "local", "old-host", 4242, 100.0, 150.0, 75, "preempted", None, 20, 0.25, None)
        ]
        number = store.start_attempt("job", step_before=20, pool="aws")
        store.end_attempt("job", number, exit_code=0, exit_class="succeeded", step_after=30, machine="i-0abc")
        store.set_escalated("job")
    assert "machine" in columns(path, "attempts") and "escalated" in columns(path, "jobs")

    with JobStore(path) as again:  # opening a migrated store changes nothing
        assert again.job("job").escalated is True
        assert [(a.number, a.pool, a.machine, a.exit_class) for a in again.attempts("job")] == [
            (1, "local", None, "preempted"),
            (2, "aws", "i-0abc", "succeeded"),
        ]


def test_the_supervisor_continues_a_job_in_a_store_of_the_previous_schema(tmp_path: Path) -> None:
    command = [PY, "-c", "pass"]
    old_store(tmp_path / "jobs.sqlite", command, str(tmp_path / "run"))
    code, attempts, _ = supervise(tmp_path, (Pool(name="local"),), command=tuple(command))
    assert code == 0
    assert attempts[0].host == "old-host"  # the old row, as it was
    assert [(a.number, a.exit_class) for a in attempts] == [(1, "preempted"), (2, "succeeded")]
    assert attempts[1].machine is not None  # a local attempt records its host
    with JobStore(tmp_path / "jobs.sqlite") as store:
        assert store.job("job").state == JobState.SUCCEEDED
