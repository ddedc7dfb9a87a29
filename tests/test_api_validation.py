"""Every public argument is checked where it is passed: a ConfigError that names the argument and what was given.

A Checkpointer with a bad argument must leave nothing behind: no run folder, no event log, no
writer lease, and the process's signal handlers as they were.
"""

from __future__ import annotations

import math
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

import spotsafe
from spotsafe import ConfigError, ResumableLoader, every, max_loss, on_notice, young_daly
from spotsafe.notices import AwsSpotNotices, AzureScheduledEvents, GcpNotices, SignalNotices, SlurmNotices
from spotsafe.notices.signals import DEFAULT_SIGNALS
from spotsafe.policy import AnyOf
from spotsafe.storage import StorageRetry
from spotsafe.telemetry.log import EVENTS_FILE

NAN, INF = math.nan, math.inf


class Squares(Dataset[torch.Tensor]):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i * i)


class Stream(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(3))

    def __repr__(self) -> str:
        return "Stream()"  # stable test ids


class Stateful:
    def __init__(self) -> None:
        self.value = 0

    def state_dict(self) -> dict[str, int]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.value = state["value"]


class NoSource:
    name = "fake"  # no start/after_stop/stop


def handlers() -> dict[int, Any]:
    return {s: signal.getsignal(s) for s in (*DEFAULT_SIGNALS, signal.SIGUSR2)}


def shown(value: object) -> str:
    """How a message shows a short value: its repr (shortened like the messages do)."""
    return repr(value)[:40]


def message_of(build: Callable[[], object]) -> str:
    with pytest.raises(ConfigError) as info:
        build()
    return str(info.value)


# -- Checkpointer ---------------------------------------------------------------------------------------------------

MODEL = torch.nn.Linear(2, 2)
OPTIMIZER = torch.optim.SGD(MODEL.parameters(), lr=0.1)

# (keyword arguments, fragments the message must contain); the name and the value are always among them.
CHECKPOINTER_BAD: list[tuple[dict[str, Any], list[str]]] = [
    ({"url": 123}, ["url", "123 (int)", "os.PathLike"]),
    ({"url": b"runs/x"}, ["url", "(bytes)"]),
    ({"url": ""}, ["url", "''"]),
    ({"url": "file://"}, ["url", "'file://' (str)"]),
    ({"url": ["runs/x"]}, ["url", "(list)"]),
    ({"model": "model"}, ["model", "'model' (str)", "torch.nn.Module"]),
    ({"model": OPTIMIZER}, ["model", "(SGD)", "extra="]),
    ({"optimizer": MODEL}, ["optimizer", "(Linear)", "torch.optim.Optimizer"]),
    ({"optimizer": "adam"}, ["optimizer", "'adam' (str)"]),
    ({"scheduler": 5}, ["scheduler", "5 (int)", "state_dict()"]),
    ({"scaler": "amp"}, ["scaler", "'amp' (str)", "load_state_dict()"]),
    ({"loader": [1, 2, 3]}, ["loader", "[1, 2, 3] (list)"]),
    ({"extra": ["gen"]}, ["extra", "['gen'] (list)", "mapping"]),
    ({"extra": {"thing": object()}}, ["extra['thing']", "(object)", "state_dict()"]),
    ({"extra": {"thing": None}}, ["extra['thing']", "None (NoneType)"]),
    ({"extra": {1: torch.Generator()}}, ["extra", "1 (int)", "strings"]),
    ({"extra": {"rng": torch.Generator()}}, ["'rng'", "reserved"]),
    ({"extra": {"model": torch.Generator()}, "model": MODEL}, ["'model'", "reserved"]),
    ({"extra": {"no/slash": torch.Generator()}}, ["extra", "'no/slash'"]),
    ({"policy": "every 5"}, ["policy", "'every 5' (str)", "every(steps=500)"]),
    ({"policy": every}, ["policy", "(function)", "call it"]),
    ({"policy": 5}, ["policy", "5 (int)"]),
    ({"keep": 0}, ["keep", "0 (int)", ">= 1"]),
    ({"keep": "3"}, ["keep", "'3' (str)"]),
    ({"keep": 2.0}, ["keep", "2.0 (float)"]),
    ({"keep": True}, ["keep", "True (bool)"]),
    ({"stage_dir": 5}, ["stage_dir", "5 (int)"]),
    ({"stage_dir": "s3://bucket/stage"}, ["stage_dir", "'s3://bucket/stage'", "local folder"]),
    ({"async_save": "false"}, ["async_save", "'false' (str)", "True or False"]),
    ({"incremental": 1}, ["incremental", "1 (int)"]),
    ({"overlap": "yes"}, ["overlap", "'yes' (str)"]),
    ({"overlap": True}, ["overlap=True needs an optimizer"]),
    ({"overlap": True, "optimizer": OPTIMIZER, "async_save": False}, ["overlap=True", "async_save=True"]),
    ({"handle_signals": None}, ["handle_signals", "None (NoneType)"]),
    ({"exit_on_notice": "no"}, ["exit_on_notice", "'no' (str)"]),
    ({"distributed": "yes"}, ["distributed", "'yes' (str)", "or None"]),
    ({"staging_budget": 2.5}, ["staging_budget", "2.5 (float)", "'8GB'"]),
    ({"staging_budget": [1]}, ["staging_budget", "[1] (list)"]),
    ({"staging_budget": "lots"}, ["staging_budget", "'lots'"]),
    ({"staging_budget": -5}, ["staging_budget", "-5"]),
    ({"staging_budget": True}, ["staging_budget", "True"]),
    ({"when_busy": "later"}, ["when_busy", "'later' (str)", "'wait', 'skip'"]),
    ({"when_busy": None}, ["when_busy", "None (NoneType)"]),
    ({"storage_options": "key=value"}, ["storage_options", "'key=value' (str)", "mapping"]),
    ({"storage_options": {1: "x"}}, ["storage_options", "1 (int)"]),
    ({"retry": 3}, ["retry", "3 (int)", "StorageRetry"]),
    ({"retry": {"budget_s": 1}}, ["retry", "(dict)"]),
    ({"signals": "SIGTERM"}, ["signals", "'SIGTERM' (str)", "signal.SIGTERM"]),
    ({"signals": 15}, ["signals", "15 (int)"]),
    ({"signals": [signal.SIGKILL]}, ["signals[0]", "SIGKILL cannot be caught"]),
    ({"signals": [99999]}, ["signals[0]", "99999 (int)", "no such signal"]),
    ({"signals": [True]}, ["signals[0]", "True (bool)"]),
    ({"signals": [15.0]}, ["signals[0]", "15.0 (float)"]),
    ({"grace_s": "soon"}, ["grace_s", "'soon' (str)", "number of seconds >= 0 or None"]),
    ({"grace_s": -1}, ["grace_s", "-1 (int)"]),
    ({"grace_s": NAN}, ["grace_s", "nan (float)"]),
    ({"grace_s": INF}, ["grace_s", "inf (float)", "finite"]),
    ({"grace_s": True}, ["grace_s", "True (bool)"]),
    ({"progress_interval": -1}, ["progress_interval", "-1 (int)", ">= 0"]),
    ({"progress_interval": "1"}, ["progress_interval", "'1' (str)"]),
    ({"progress_interval": None}, ["progress_interval", "None (NoneType)"]),
    ({"metadata": {"x": object()}}, ["metadata", "JSON", "(dict)"]),
    ({"metadata": {"loss": NAN}}, ["metadata", "JSON", "nan"]),
    ({"metadata": [1]}, ["metadata", "[1] (list)", "mapping"]),
    ({"notices": "aws"}, ["notices", "'aws' (str)", "'auto' or a list"]),
    ({"notices": ["aws"]}, ["notices[0]", "'aws' (str)", "notice source"]),
    ({"notices": [NoSource()]}, ["notices[0]", "(NoSource)"]),
    ({"notices": 5}, ["notices", "5 (int)"]),
    ({"notices": None}, ["notices", "None (NoneType)"]),
    ({"process_group": "world"}, ["process_group", "'world' (str)", "ProcessGroup"]),
    ({"storage": "memory://x/run"}, ["storage", "'memory://x/run' (str)", "Storage"]),
    ({"storage": object()}, ["storage", "(object)"]),
    ({"events": "events.jsonl"}, ["events", "'events.jsonl' (str)", "emit"]),
    ({"clock": 5}, ["clock", "5 (int)", "callable"]),
    ({"wall_clock": "time"}, ["wall_clock", "'time' (str)", "callable"]),
    ({"exit": None}, ["exit", "None (NoneType)", "callable"]),
]


def case_id(case: tuple[dict[str, Any], list[str]]) -> str:
    """Stable across processes (no object addresses), so test ids are the same in every run and worker."""
    return ",".join(re.sub(r" (object )?at 0x[0-9a-f]+", "", f"{k}={v!r}")[:40] for k, v in case[0].items())


@pytest.mark.parametrize(("kwargs", "fragments"), CHECKPOINTER_BAD, ids=[case_id(c) for c in CHECKPOINTER_BAD])
def test_checkpointer_rejects_a_bad_argument_before_touching_anything(
    tmp_path: Path, kwargs: dict[str, Any], fragments: list[str]
) -> None:
    run = tmp_path / "run"
    args: dict[str, Any] = {"url": str(run)}
    args.update(kwargs)
    before = handlers()
    message = message_of(lambda: spotsafe.Checkpointer(**args))  # handle_signals=True: the default
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert list(tmp_path.iterdir()) == []  # no run folder, no event log, no lease
    assert handlers() == before


def test_a_location_that_is_a_file_is_refused(tmp_path: Path) -> None:
    afile = tmp_path / "notes.txt"
    afile.write_text("not a run")
    before = handlers()
    for url, where in [(afile, "is a file"), (afile / "run", "is inside"), (f"file://{afile}", "is a file")]:
        message = message_of(lambda url=url: spotsafe.Checkpointer(url, model=MODEL))  # type: ignore[misc]
        assert "url" in message and where in message and "notes.txt" in message, message
        assert "folder" in message
    message = message_of(lambda: spotsafe.Checkpointer(tmp_path / "run", stage_dir=afile))
    assert "stage_dir" in message and "is a file" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert afile.read_text() == "not a run"
    assert handlers() == before


def test_a_stage_dir_that_is_the_run_itself_is_refused(tmp_path: Path) -> None:
    message = message_of(lambda: spotsafe.Checkpointer(tmp_path / "run", stage_dir=str(tmp_path / "run")))
    assert "stage_dir" in message and "differ" in message
    assert not (tmp_path / "run").exists()


def test_a_location_from_the_environment_is_checked_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("SPOTSAFE_CHECKPOINT_URL", str(tmp_path / "file"))
    assert "is a file" in message_of(lambda: spotsafe.Checkpointer(model=MODEL))


def test_good_arguments_in_every_supported_form_still_work(tmp_path: Path) -> None:
    gen, npgen, thing = torch.Generator().manual_seed(3), np.random.default_rng(3), Stateful()
    ckpt = spotsafe.Checkpointer(
        tmp_path / "run",  # os.PathLike
        model=MODEL,
        optimizer=OPTIMIZER,
        scheduler=torch.optim.lr_scheduler.StepLR(OPTIMIZER, step_size=2),
        scaler=torch.amp.GradScaler("cpu"),
        loader=ResumableLoader(Squares(), batch_size=2, seed=np.int64(4)),  # type: ignore[arg-type]
        extra={"gen": gen, "npgen": npgen, "thing": thing},
        policy=every(steps=2) | on_notice(margin_s=0) | young_daly(),
        keep=1,
        stage_dir=tmp_path / "stage",
        staging_budget=np.int64(1 << 20),  # type: ignore[arg-type]
        storage_options={},
        retry=None,
        handle_signals=False,
        signals=iter([signal.SIGTERM]),
        grace_s=0,
        progress_interval=0,
        metadata={"lr": 0.1, "tags": ["a"], "nested": {"x": None}},
        notices=(),
        distributed=None,
    )
    thing.value = 7
    ref = ckpt.save(reason="manual", full=True, via_stage=None)
    assert ref is not None
    ckpt.close()
    thing.value = 0
    again = spotsafe.Checkpointer(f"file://{tmp_path / 'run'}", extra={"thing": thing}, handle_signals=False)
    assert again.restore(strict=False) == 0 and thing.value == 7
    again.close()


def test_signals_given_as_a_generator_are_read_once(tmp_path: Path) -> None:
    before = handlers()
    ckpt = spotsafe.Checkpointer(tmp_path / "run", signals=(s for s in [signal.SIGUSR2]), notices=[])
    try:
        assert signal.getsignal(signal.SIGUSR2) != before[signal.SIGUSR2]
    finally:
        ckpt.close()
    assert handlers() == before


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"reason": 5}, ["reason", "5 (int)"]),
        ({"reason": ""}, ["reason", "''"]),
        ({"full": "yes"}, ["full", "'yes' (str)"]),
        ({"via_stage": "no"}, ["via_stage", "'no' (str)", "or None"]),
    ],
    ids=repr,
)
def test_save_rejects_bad_arguments_before_saving(tmp_path: Path, kwargs: dict[str, Any], fragments: list[str]) -> None:
    ckpt = spotsafe.Checkpointer(tmp_path, model=MODEL, handle_signals=False)
    try:
        message = message_of(lambda: ckpt.save(**kwargs))
        assert all(f in message for f in fragments), message
        assert "save_started" not in (tmp_path / EVENTS_FILE).read_text()
    finally:
        ckpt.close()


# -- policies -------------------------------------------------------------------------------------------------------

POLICY_BAD: list[tuple[Callable[[], object], list[str]]] = [
    (lambda: every(steps="5"), ["every(steps=...)", "'5' (str)", "integer >= 1"]),  # type: ignore[arg-type]
    (lambda: every(steps=1.5), ["every(steps=...)", "1.5 (float)"]),  # type: ignore[arg-type]
    (lambda: every(steps=0), ["every(steps=...)", "0 (int)"]),
    (lambda: every(seconds="x"), ["every(seconds=...)", "'x' (str)"]),  # type: ignore[arg-type]
    (lambda: every(minutes=INF), ["every(minutes=...)", "inf (float)"]),
    (lambda: every(seconds=NAN), ["every(seconds=...)", "nan (float)"]),
    (lambda: every(steps=5) | "often", ["combined with |", "'often' (str)"]),  # type: ignore[operator]
    (lambda: every(steps=5) | every(minutes=1) | None, ["combined with |", "None (NoneType)"]),  # type: ignore[operator]
    (lambda: AnyOf((every(steps=1), 5)), ["policies[1]", "5 (int)"]),  # type: ignore[arg-type]
    (lambda: max_loss(minutes="10"), ["max_loss(minutes=...)", "'10' (str)"]),  # type: ignore[arg-type]
    (lambda: max_loss(dollars=5, price_per_hour="3"), ["price_per_hour", "'3' (str)"]),  # type: ignore[arg-type]
    (lambda: max_loss(minutes=5, nodes=0), ["nodes", "0 (int)"]),
    (lambda: max_loss(dollars=5, price_per_hour=3, nodes=1.5), ["nodes", "1.5 (float)"]),  # type: ignore[arg-type]
    (lambda: max_loss(minutes=5, default_restart_s=-1), ["default_restart_s", "-1"]),
    (lambda: young_daly(prior_mtbi_hours="4"), ["prior_mtbi_hours", "'4' (str)"]),  # type: ignore[arg-type]
    (lambda: young_daly(count="some"), ["count", "'some' (str)", "'unnoticed', 'all'"]),
    (lambda: young_daly(cost=None), ["cost", "None (NoneType)"]),  # type: ignore[arg-type]
    (lambda: young_daly(first_save_s=-1), ["first_save_s", "-1 (int)"]),
    (lambda: on_notice(safety=0.5), ["safety", "0.5 (float)", "multiplied"]),
    (lambda: on_notice(safety="2"), ["safety", "'2' (str)"]),  # type: ignore[arg-type]
    (lambda: on_notice(margin_s=INF), ["margin_s", "inf (float)"]),
    (lambda: on_notice(warnings=True), ["warnings", "True (bool)"]),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("build", "fragments"), POLICY_BAD)
def test_policies_reject_bad_arguments(build: Callable[[], object], fragments: list[str]) -> None:
    message = message_of(build)
    assert all(f in message for f in fragments), message


def test_policies_accept_good_values() -> None:
    assert every(steps=3).describe() == "every 3 steps"
    assert every(seconds=1.5, minutes=1).parts()[0].describe() == "every 61.5 s"
    assert max_loss(dollars=5, price_per_hour=3.06, nodes=4).describe().startswith("max_loss(dollars=5")
    assert len((every(steps=1) | max_loss(minutes=5) | young_daly(cost="stall") | on_notice()).parts()) == 4


# -- StorageRetry ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"budget_s": "1"}, ["StorageRetry.budget_s", "'1' (str)"]),
        ({"budget_s": True}, ["StorageRetry.budget_s", "True (bool)"]),
        ({"budget_s": NAN}, ["StorageRetry.budget_s", "nan"]),
        ({"initial": -1}, ["StorageRetry.initial", "-1 (int)"]),
        ({"initial": INF}, ["StorageRetry.initial", "inf"]),
        ({"max_delay": None}, ["StorageRetry.max_delay", "None (NoneType)"]),
        ({"multiplier": 0.5}, ["StorageRetry.multiplier", "0.5 (float)", ">= 1"]),
        ({"multiplier": "2"}, ["StorageRetry.multiplier", "'2' (str)"]),
    ],
    ids=repr,
)
def test_retry_policy_rejects_bad_values(kwargs: dict[str, Any], fragments: list[str]) -> None:
    message = message_of(lambda: StorageRetry(**kwargs))
    assert all(f in message for f in fragments), message


def test_retry_policy_may_retry_forever_without_a_cap() -> None:
    assert StorageRetry(budget_s=INF, max_delay=INF).budget_s == INF


# -- ResumableLoader ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"dataset": 5}, ["map-style dataset", "5 (int)"]),
        ({"dataset": Stream()}, ["map-style dataset", "(Stream)"]),
        ({"batch_size": "2"}, ["batch_size", "'2' (str)", ">= 1"]),
        ({"batch_size": 0}, ["batch_size", "0 (int)"]),
        ({"batch_size": 2.0}, ["batch_size", "2.0 (float)"]),
        ({"shuffle": "yes"}, ["shuffle", "'yes' (str)"]),
        ({"seed": "1"}, ["seed", "'1' (str)"]),
        ({"seed": 1.5}, ["seed", "1.5 (float)"]),
        ({"drop_last": 1}, ["drop_last", "1 (int)"]),
        ({"reseed_workers": None}, ["reseed_workers", "None (NoneType)"]),
        ({"ignore_signals": "SIGTERM"}, ["ignore_signals", "'SIGTERM' (str)"]),
        ({"ignore_signals": [signal.SIGKILL]}, ["ignore_signals[0]", "SIGKILL"]),
        ({"worker_init_fn": 5}, ["worker_init_fn", "5 (int)", "callable"]),
    ],
    ids=repr,
)
def test_resumable_loader_rejects_bad_arguments(kwargs: dict[str, Any], fragments: list[str]) -> None:
    args: dict[str, Any] = {"dataset": Squares(), "batch_size": 2}
    args.update(kwargs)
    message = message_of(lambda: ResumableLoader(**args))
    assert all(f in message for f in fragments), message


def test_resumable_loader_accepts_numpy_seeds_and_no_ignored_signals() -> None:
    seed: Any = np.int64(5)
    loader = ResumableLoader(Squares(), batch_size=4, seed=seed, ignore_signals=(), worker_init_fn=None)
    assert loader.seed == 5 and [len(b) for b in loader] == [4, 2]
    a_list: Any = [1, 2, 3]  # a list is a map-style dataset
    assert len(ResumableLoader(a_list, batch_size=2)) == 2


# -- notice sources -------------------------------------------------------------------------------------------------

NOTICE_BAD: list[tuple[Callable[[], object], list[str]]] = [
    (lambda: SignalNotices("SIGTERM"), ["signals", "'SIGTERM' (str)"]),  # type: ignore[arg-type]
    (lambda: SignalNotices([0]), ["signals[0]", "0 (int)"]),
    (lambda: SignalNotices(grace_seconds="30"), ["grace_seconds", "'30' (str)"]),  # type: ignore[arg-type]
    (lambda: SignalNotices(grace={signal.SIGTERM: "5"}), ["grace[", "'5' (str)"]),  # type: ignore[dict-item]
    (lambda: SignalNotices(grace={"TERM": 5}), ["grace key", "'TERM' (str)"]),  # type: ignore[dict-item]
    (lambda: SignalNotices(grace=[(15, 5)]), ["grace", "(list)", "mapping"]),  # type: ignore[arg-type]
    (lambda: SignalNotices(source=5), ["source", "5 (int)"]),  # type: ignore[arg-type]
    (lambda: SignalNotices(on_after_stop=5), ["on_after_stop", "5 (int)"]),  # type: ignore[arg-type]
    (lambda: SignalNotices(install=None), ["install", "None (NoneType)"]),  # type: ignore[arg-type]
    (lambda: SignalNotices(clock="now"), ["clock", "'now' (str)"]),  # type: ignore[arg-type]
    (lambda: AwsSpotNotices(endpoint=5, env={}), ["endpoint", "5 (int)"]),  # type: ignore[arg-type]
    (lambda: AwsSpotNotices(token_ttl_s=0, env={}), ["token_ttl_s", "0 (int)", "1 to 21600"]),
    (lambda: AwsSpotNotices(token_ttl_s="60", env={}), ["token_ttl_s", "'60' (str)"]),  # type: ignore[arg-type]
    (lambda: AwsSpotNotices(rebalance="no", env={}), ["rebalance", "'no' (str)"]),  # type: ignore[arg-type]
    (lambda: AwsSpotNotices(timeout_s=0, env={}), ["timeout_s", "0 (int)", "> 0"]),
    (lambda: AwsSpotNotices(poll_s=0, env={}), ["poll_s", "0 (int)"]),
    (lambda: AwsSpotNotices(poll_s="5", env={}), ["poll_s", "'5' (str)"]),  # type: ignore[arg-type]
    (lambda: AwsSpotNotices(env=[("A", "b")]), ["env", "(list)"]),  # type: ignore[arg-type]
    (lambda: GcpNotices(notice_s=-1, env={}), ["notice_s", "-1 (int)"]),
    (lambda: GcpNotices(maintenance="yes", env={}), ["maintenance", "'yes' (str)"]),  # type: ignore[arg-type]
    (lambda: GcpNotices(hang_s=1.5, env={}), ["hang_s", "1.5 (float)"]),  # type: ignore[arg-type]
    (lambda: GcpNotices(retry_s=0, env={}), ["retry_s", "0 (int)"]),
    (lambda: GcpNotices(timeout_s="2", env={}), ["timeout_s", "'2' (str)"]),  # type: ignore[arg-type]
    (lambda: AzureScheduledEvents(stop_types="Preempt", env={}), ["stop_types", "'Preempt' (str)"]),  # type: ignore[arg-type]
    (lambda: AzureScheduledEvents(warn_types=[1], env={}), ["warn_types[0]", "1 (int)"]),  # type: ignore[arg-type]
    (lambda: AzureScheduledEvents(vm_name=5, env={}), ["vm_name", "5 (int)"]),  # type: ignore[arg-type]
    (lambda: AzureScheduledEvents(acknowledge="true", env={}), ["acknowledge", "'true' (str)"]),  # type: ignore[arg-type]
    (lambda: AzureScheduledEvents(first_call_timeout_s=0, env={}), ["first_call_timeout_s", "0 (int)"]),
    (lambda: SlurmNotices(job_id=5), ["job_id", "5 (int)"]),  # type: ignore[arg-type]
    (lambda: SlurmNotices(job_id="1", warning_signal="USR1"), ["warning_signal", "'USR1' (str)"]),  # type: ignore[arg-type]
    (lambda: SlurmNotices(job_id="1", lead_s=-1), ["lead_s", "-1 (int)"]),
    (lambda: SlurmNotices(job_id="1", requeue="1"), ["requeue", "'1' (str)"]),  # type: ignore[arg-type]
    (lambda: SlurmNotices(job_id="1", scontrol="scontrol"), ["scontrol", "'scontrol' (str)"]),
    (lambda: SlurmNotices(job_id="1", scontrol=()), ["scontrol", "() (tuple)", "non-empty"]),
    (lambda: SlurmNotices(job_id="1", run=None), ["run", "None (NoneType)"]),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("build", "fragments"), NOTICE_BAD)
def test_notice_sources_reject_bad_arguments(build: Callable[[], object], fragments: list[str]) -> None:
    message = message_of(build)
    assert all(f in message for f in fragments), message


def test_notice_sources_accept_good_values() -> None:
    numpy_int: Any = np.int64(signal.SIGUSR1)
    a_list: Any = ["Preempt"]
    source = SignalNotices(iter([signal.SIGTERM]), grace_seconds=0, grace={signal.SIGTERM: 5}, source="kubernetes")
    assert source.signals == (signal.SIGTERM,) and source.deadline_after(signal.SIGTERM) == 5.0
    slurm = SlurmNotices(job_id=None, warning_signal=numpy_int, scontrol=["scontrol"])
    assert slurm.signals == (signal.SIGUSR1,) and slurm.scontrol == ("scontrol",)
    azure = AzureScheduledEvents("http://127.0.0.1:1", stop_types=a_list, warn_types=(), env={})
    assert azure.stop_types == ("Preempt",) and azure.warn_types == ()
    gcp = GcpNotices("http://127.0.0.1:1", hang_s=numpy_int, maintenance=False, env={})
    assert gcp.watchers[0].hang_s == int(signal.SIGUSR1)
    assert AwsSpotNotices(env={}, token_ttl_s=numpy_int).token_ttl_s == int(signal.SIGUSR1)


def test_config_errors_are_value_errors_with_the_argument_first(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^keep must be an integer >= 1, got 0 \(int\)$"):
        spotsafe.Checkpointer(tmp_path / "run", keep=0)
