"""The job contract: JobEnv round-trips through the environment, rejects what a job could not use, and is the
only place that spells the SPOTSAFE_* variable names."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest

from spotsafe.errors import ConfigError
from spotsafe.jobenv import (
    DEFAULT_JOB_STORE,
    ENV_ATTEMPT,
    ENV_CHECKPOINT_URL,
    ENV_METRICS_PORT,
    ENV_NOTICE_POLL,
    ENV_NOTICES,
    VARIABLES,
    JobEnv,
)

SRC = Path(__file__).resolve().parents[1] / "src" / "spotsafe"

FULL = JobEnv(
    checkpoint_url="s3://bucket/runs/lm",
    run_id="lm",
    attempt=3,
    job_store="/var/lib/spotsafe/jobs.sqlite",
    pool="aws-us-east-1a-spot",
    events_file="/tmp/lm.events.jsonl",
    notices="aws,signals",
    notice_poll_s=0.5,
    metrics_port=9100,
    metrics_addr="127.0.0.1",
    on_damaged="start_fresh",
)


def test_every_field_round_trips_through_the_environment() -> None:
    env = FULL.to_env()
    assert set(env) == set(VARIABLES.values())
    assert JobEnv.from_env(env) == FULL


def test_only_the_fields_that_are_set_are_written() -> None:
    assert JobEnv().to_env() == {}
    env = JobEnv(checkpoint_url="runs/lm", attempt=1, notice_poll_s=0.5).to_env()
    assert env == {ENV_CHECKPOINT_URL: "runs/lm", ENV_ATTEMPT: "1", ENV_NOTICE_POLL: "0.5"}
    assert JobEnv.from_env(env) == JobEnv(checkpoint_url="runs/lm", attempt=1, notice_poll_s=0.5)


def test_a_float_keeps_its_exact_value() -> None:
    value = 0.1 + 0.2
    assert JobEnv.from_env(JobEnv(notice_poll_s=value).to_env()).notice_poll_s == value


def test_an_empty_variable_reads_as_unset_and_other_variables_are_ignored() -> None:
    env = {ENV_CHECKPOINT_URL: "", ENV_ATTEMPT: "", "SPOTSAFE_GRACE_SECONDS": "30", "PATH": "/bin"}
    assert JobEnv.from_env(env) == JobEnv()


def test_numbers_are_read_with_surrounding_spaces() -> None:
    env = {ENV_ATTEMPT: " 2 ", ENV_NOTICE_POLL: " 1.5", ENV_METRICS_PORT: "0"}
    assert JobEnv.from_env(env) == JobEnv(attempt=2, notice_poll_s=1.5, metrics_port=0)


def test_from_env_reads_the_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(ENV_CHECKPOINT_URL, "runs/here")
    monkeypatch.setenv(ENV_NOTICES, "none")
    assert JobEnv.from_env() == JobEnv(checkpoint_url="runs/here", notices="none")


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({ENV_ATTEMPT: "first"}, r"\$SPOTSAFE_ATTEMPT must be a whole number"),
        ({ENV_ATTEMPT: "1.5"}, r"\$SPOTSAFE_ATTEMPT must be a whole number"),
        ({ENV_ATTEMPT: "0"}, r"\$SPOTSAFE_ATTEMPT must be a whole number >= 1"),
        ({ENV_ATTEMPT: "-2"}, r"\$SPOTSAFE_ATTEMPT"),
        ({ENV_NOTICE_POLL: "fast"}, r"\$SPOTSAFE_NOTICE_POLL_SECONDS must be a number"),
        ({ENV_NOTICE_POLL: "0"}, r"\$SPOTSAFE_NOTICE_POLL_SECONDS must be a number of seconds > 0"),
        ({ENV_NOTICE_POLL: "-1"}, r"\$SPOTSAFE_NOTICE_POLL_SECONDS"),
        ({ENV_NOTICE_POLL: "nan"}, r"\$SPOTSAFE_NOTICE_POLL_SECONDS"),
        ({ENV_NOTICE_POLL: "inf"}, r"\$SPOTSAFE_NOTICE_POLL_SECONDS"),
        ({ENV_METRICS_PORT: "http"}, r"\$SPOTSAFE_METRICS_PORT must be a whole number"),
        ({ENV_METRICS_PORT: "70000"}, r"0-65535.*\$SPOTSAFE_METRICS_PORT"),
    ],
)
def test_a_value_a_job_cannot_use_is_a_config_error_naming_the_variable(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        JobEnv.from_env(env)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"attempt": True}, "SPOTSAFE_ATTEMPT"),
        ({"attempt": 0}, "SPOTSAFE_ATTEMPT"),
        ({"notice_poll_s": math.nan}, "SPOTSAFE_NOTICE_POLL_SECONDS"),
        ({"metrics_port": -1}, "0-65535"),
        ({"metrics_port": False}, "0-65535"),
        ({"run_id": ""}, r"\$SPOTSAFE_RUN_ID is set but empty"),
        ({"checkpoint_url": ""}, r"\$SPOTSAFE_CHECKPOINT_URL is set but empty"),
    ],
)
def test_a_contract_built_in_code_is_validated_too(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        JobEnv(**fields)  # type: ignore[arg-type]


def test_with_returns_a_validated_copy() -> None:
    base = JobEnv(checkpoint_url="runs/lm", attempt=1)
    assert base.with_(attempt=2) == JobEnv(checkpoint_url="runs/lm", attempt=2)
    assert base.attempt == 1
    with pytest.raises(ConfigError, match="SPOTSAFE_ATTEMPT"):
        base.with_(attempt=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.attempt = 5  # type: ignore[misc]


def test_the_job_store_defaults_to_the_working_folder() -> None:
    assert JobEnv().store_or_default() == DEFAULT_JOB_STORE
    assert JobEnv(job_store="/data/jobs.sqlite").store_or_default() == "/data/jobs.sqlite"


def test_the_table_names_one_spotsafe_variable_per_field() -> None:
    assert list(VARIABLES) == [f.name for f in dataclasses.fields(JobEnv)]
    assert all(v.startswith("SPOTSAFE_") for v in VARIABLES.values())
    assert len(set(VARIABLES.values())) == len(VARIABLES)


def test_no_other_module_spells_the_contract_variables() -> None:
    """The names are spelt once, in spotsafe.jobenv; docstrings and messages may still mention them."""
    names = set(VARIABLES.values())
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "jobenv.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value}")
    assert not found, found
