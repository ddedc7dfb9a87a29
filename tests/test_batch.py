"""Resumable batch jobs (spotsafe.batch): every item's result in the output exactly once, whatever stops the job.

In-process tests drive :class:`BatchJob` and :func:`map` directly (a failing function, damaged records, workers
that come and go); the campaign kills a real job process (tests/jobs/batch_job.py) with SIGKILL and SIGTERM at
100 instants, between any two items and on either side of every kind of write, and checks after every kill
that no item's result is in the output twice, and at the end that the output is byte-identical to an
uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import pyarrow.parquet as pq
import pytest

import spotsafe.batch
from spotsafe.batch import BatchJob, ShardRecord
from spotsafe.errors import ConfigError
from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.notices.base import STOP, Notice, NoticeBoard
from spotsafe.storage.fencing import FencedError
from spotsafe.storage.local import LocalStorage

JOB = Path(__file__).parent / "jobs" / "batch_job.py"
ITEMS = 1400  # as in the job script: 200 shards of 7, so that 100 runs killed early on leave work for the end


def row(item: int) -> dict[str, Any]:
    return {"item": item, "half": item / 2, "name": f"item-{item}"}


def output_rows(url: Path) -> list[dict[str, Any]]:
    """Every row of every part, read as a user would: the JSONL files, without spotsafe."""
    rows = []
    for part in sorted((url / "parts").glob("*.jsonl")):
        rows += [json.loads(line) for line in part.read_text().splitlines()]
    return rows


def output_bytes(url: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((url / "parts").glob("part-*")))


class Stopped(Exception):
    pass


def stop_exit(code: int) -> NoReturn:
    raise Stopped(code)


class NoticeAt:
    """A notice source that posts a stop notice (with ``deadline_in`` seconds, or none) when told."""

    name = "test"

    def __init__(self, deadline_in: float | None) -> None:
        self.deadline_in = deadline_in
        self.board: NoticeBoard | None = None

    def start(self, board: NoticeBoard) -> None:
        self.board = board

    def fire(self) -> None:
        assert self.board is not None
        deadline = None if self.deadline_in is None else time.time() + self.deadline_in
        self.board.post(Notice("test", time.time(), deadline, STOP))

    def after_stop(self, committed: bool) -> None:
        pass

    def stop(self) -> None:
        pass


# -- one process ------------------------------------------------------------------------------------------------


def test_a_job_writes_each_result_once_in_jsonl_parts_and_a_rerun_does_nothing(tmp_path: Path) -> None:
    items = list(range(50))
    result = spotsafe.batch.map(row, items, tmp_path / "out", shard_size=8, notices=[])
    assert (result.shards_committed, result.items_committed, result.shards_total) == (7, 50, 7)
    assert output_rows(tmp_path / "out") == [row(i) for i in items]
    again = spotsafe.batch.map(row, items, tmp_path / "out", shard_size=8, notices=[])
    assert again.shards_committed == 0 and again.shards_done_before == 7


def test_parquet_parts_are_one_table_to_pyarrow(tmp_path: Path) -> None:
    spotsafe.batch.map(row, list(range(30)), tmp_path / "out", shard_size=8, format="parquet", notices=[])
    table = pq.read_table(tmp_path / "out" / "parts")
    assert sorted(table.to_pylist(), key=lambda r: r["item"]) == [row(i) for i in range(30)]
    rows = spotsafe.batch.parquet_rows(str(tmp_path / "out" / "parts" / "part-000001.parquet"))
    assert len(rows) == 8 and rows[0] == row(8) and rows[-1] == row(15) and list(rows)[3] == row(11)


def test_a_function_that_fails_midway_loses_nothing_and_the_rerun_is_byte_identical(tmp_path: Path) -> None:
    spotsafe.batch.map(row, list(range(40)), tmp_path / "clean", shard_size=6, notices=[])

    def flaky(item: int) -> dict[str, Any]:
        if item == 23:
            raise RuntimeError("the machine went away")
        return row(item)

    with pytest.raises(RuntimeError):
        spotsafe.batch.map(flaky, list(range(40)), tmp_path / "out", shard_size=6, notices=[])
    assert [r["item"] for r in output_rows(tmp_path / "out")] == list(range(18))  # shards 0-2 committed
    result = spotsafe.batch.map(row, list(range(40)), tmp_path / "out", shard_size=6, notices=[])
    assert result.shards_done_before == 3 and result.shards_committed == 4
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "clean")


def test_a_rerun_with_other_settings_is_refused_naming_both(tmp_path: Path) -> None:
    spotsafe.batch.map(row, list(range(10)), tmp_path / "out", shard_size=4, notices=[])
    with pytest.raises(ConfigError, match="10 items in shards of 4 as jsonl, not 10 in shards of 5") as err:
        spotsafe.batch.map(row, list(range(10)), tmp_path / "out", shard_size=5, notices=[])
    assert "another location" in str(err.value)
    with pytest.raises(ConfigError, match="not 11 in shards of 4"):
        BatchJob(tmp_path / "out", items=11, shard_size=4)


def test_a_damaged_record_or_part_makes_its_shard_be_done_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spotsafe.batch.map(row, list(range(20)), out, shard_size=5, notices=[])
    clean = output_bytes(out)
    record = out / "done" / "shard-000001.json"
    record.write_bytes(record.read_bytes().replace(b'"rows": 5', b'"rows": 6'))  # checksum no longer matches
    (out / "parts" / "part-000002.jsonl").write_bytes(b"{}\n")  # a part of the wrong size
    part3 = out / "parts" / "part-000003.jsonl"
    part3.write_bytes(part3.read_bytes().replace(b"item-15", b"item-51"))  # same size, other bytes
    assert sorted(BatchJob(out, items=20, shard_size=5).done()) == [0, 3]
    assert sorted(BatchJob(out, items=20, shard_size=5, verify="full").done()) == [0]
    result = spotsafe.batch.map(row, list(range(20)), out, shard_size=5, verify="full", notices=[])
    assert result.shards_committed == 3 and output_bytes(out) == clean
    assert ShardRecord.decode(b"not json") is None


def test_a_result_that_is_not_json_is_refused_with_what_to_return(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be written as JSON"):
        spotsafe.batch.map(lambda i: {"x": object()}, [1], tmp_path / "out", notices=[])
    with pytest.raises(ConfigError, match="Parquet rows must be dicts"):
        spotsafe.batch.map(lambda i: [i], [1], tmp_path / "pq", format="parquet", notices=[])


# -- notices ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("deadline_in", "finished"), [(600.0, True), (None, True), (0.0, False)])
def test_a_stop_notice_finishes_the_shard_in_progress_only_when_it_fits(
    tmp_path: Path, deadline_in: float | None, finished: bool
) -> None:
    source = NoticeAt(deadline_in)

    def fn(item: int) -> dict[str, Any]:
        if item == 9:  # in shard 2 (items 8 to 11)
            source.fire()
        return row(item)

    with pytest.raises(Stopped) as stopped:
        spotsafe.batch.map(fn, list(range(20)), tmp_path / "out", shard_size=4, notices=[source], exit=stop_exit)
    assert stopped.value.args == (EXIT_PREEMPTED,)
    expected = 12 if finished else 8
    assert [r["item"] for r in output_rows(tmp_path / "out")] == list(range(expected))
    result = spotsafe.batch.map(row, list(range(20)), tmp_path / "out", shard_size=4, notices=[])
    assert result.shards_done_before == expected // 4
    assert [r["item"] for r in output_rows(tmp_path / "out")] == list(range(20))


# -- several workers --------------------------------------------------------------------------------------------


def test_workers_that_go_from_two_to_three_to_one_share_out_what_is_left_and_commit_each_shard_once(
    tmp_path: Path,
) -> None:
    out, items = tmp_path / "out", list(range(100))
    commits: list[tuple[int, int, int]] = []  # (run, rank, shard)

    def run(number: int, world: int, shards_each: int | None) -> None:
        jobs = [BatchJob(out, items=100, shard_size=6, rank=r, world_size=world) for r in range(world)]
        plans = [job.todo() for job in jobs]  # every worker plans before any commits, as at a launch
        flat = [s.index for plan in plans for s in plan]
        assert len(flat) == len(set(flat))  # no shard given to two workers
        for rank, (job, plan) in enumerate(zip(jobs, plans, strict=True)):
            for shard in plan[:shards_each]:
                job.commit(shard, [row(i) for i in shard.items])
                commits.append((number, rank, shard.index))

    run(1, 2, 2)
    run(2, 3, 3)
    run(3, 1, None)
    shards = [c[2] for c in commits]
    assert sorted(shards) == list(range(17)) and len(shards) == len(set(shards))
    assert {c[1] for c in commits if c[0] == 2} == {0, 1, 2}
    assert [r["item"] for r in output_rows(out)] == items


def test_the_worker_comes_from_torchrun_or_a_slurm_array_or_is_refused(tmp_path: Path) -> None:
    job = BatchJob(tmp_path, items=10, shard_size=1, env={"RANK": "2", "WORLD_SIZE": "3"})
    assert (job.rank, job.world_size) == (2, 3) and [s.index for s in job.todo()] == [2, 5, 8]
    env = {"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "4"}
    slurm = BatchJob(tmp_path, items=10, shard_size=1, env=env)
    assert (slurm.rank, slurm.world_size) == (1, 4)
    with pytest.raises(ConfigError, match=r"rank must be in 0\.\.1"):
        BatchJob(tmp_path, items=10, shard_size=1, rank=2, world_size=2)


def test_a_worker_of_an_older_attempt_cannot_commit_once_a_newer_one_started(tmp_path: Path) -> None:
    old = BatchJob(tmp_path, items=10, shard_size=5, env={"SPOTSAFE_ATTEMPT": "1"})
    shard = old.todo()[0]
    new = BatchJob(tmp_path, items=10, shard_size=5, env={"SPOTSAFE_ATTEMPT": "2"})
    with pytest.raises(FencedError, match="attempt 1 of this batch job is stale: attempt 2"):
        old.commit(shard, [row(i) for i in shard.items])
    new.commit(shard, [row(i) for i in shard.items])
    assert sorted(new.done()) == [0]


# -- the campaign: a real process killed at 100 instants ---------------------------------------------------------


def launch(url: Path, fmt: str, env: dict[str, str]) -> int:
    proc = subprocess.run(
        [sys.executable, str(JOB), str(url), fmt],
        env={**os.environ, "SPOTSAFE_NOTICES": "signals", **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=120,
        check=False,
    )
    assert proc.returncode in (0, -9, EXIT_PREEMPTED), proc.stderr.decode(errors="replace")[-2000:]
    return proc.returncode


def items_in(url: Path) -> list[int]:
    return [r["item"] for r in output_rows(url)]


@pytest.mark.e2e
def test_killed_at_100_instants_every_result_is_there_once_and_byte_identical(tmp_path: Path) -> None:
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert launch(reference, "jsonl", {}) == 0
    expected = list(range(ITEMS))
    assert items_in(reference) == expected
    rng = random.Random(16)
    codes: list[int] = []
    for n in range(100):
        kind = rng.choice(["item-kill", "item-term", "write-before", "write-after"])
        if kind.startswith("item"):
            env = {"KILL_ITEM": str(rng.randint(1, 12)), "KILL_SIGNAL": "9" if kind == "item-kill" else "15"}
        else:
            env = {"KILL_WRITE": str(rng.randint(1, 5)), "KILL_WHEN": kind.removeprefix("write-")}
        codes.append(launch(out, "jsonl", env))
        got = items_in(out)
        assert len(got) == len(set(got)), f"instant {n} ({kind} {env}): an item's result is there twice"
        assert set(got) <= set(expected)
        if codes[-1] == 0:
            break
    assert codes.count(-9) >= 40 and codes.count(EXIT_PREEMPTED) >= 15, codes
    while launch(out, "jsonl", {}) != 0:
        pass
    assert items_in(out) == expected
    assert output_bytes(out) == output_bytes(reference)
    parts = sorted(p.name for p in (out / "parts").iterdir() if not p.name.startswith("."))
    assert parts == [f"part-{k:06d}.jsonl" for k in range(200)]  # torn writes stay hidden temp files


def test_importing_spotsafe_batch_does_not_import_torch() -> None:
    code = "import sys, spotsafe.batch; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_local_storage_is_accepted_as_the_location(tmp_path: Path) -> None:
    spotsafe.batch.map(row, list(range(5)), LocalStorage(tmp_path), shard_size=2, notices=[])
    assert items_in(tmp_path) == list(range(5))


@pytest.mark.e2e
def test_the_batch_inference_example_stopped_by_sigterm_goes_on_to_the_same_bytes(tmp_path: Path) -> None:
    from .conftest import EXAMPLE, PROCESS_HANG_S, wait_until

    example = EXAMPLE.with_name("batch_infer.py")
    table = tmp_path / "input.parquet"
    common = [sys.executable, str(example), "--input", str(table), "--shard-size", "40"]
    env = {**os.environ, "SPOTSAFE_NOTICES": "signals"}
    subprocess.run([*common, "--out", str(tmp_path / "clean"), "--rows", "400"], env=env, check=True, timeout=300)
    assert table.exists()  # the first run made the synthetic input
    proc = subprocess.Popen([*common, "--out", str(tmp_path / "out")], env=env, stdout=subprocess.DEVNULL)
    wait_until(
        lambda: (tmp_path / "out" / "done").exists() and any((tmp_path / "out" / "done").iterdir()),
        "a first shard",
        timeout=PROCESS_HANG_S,
    )
    proc.send_signal(15)
    assert proc.wait(timeout=PROCESS_HANG_S) in (EXIT_PREEMPTED, 0)
    subprocess.run([*common, "--out", str(tmp_path / "out")], env=env, check=True, timeout=300)
    clean = pq.read_table(tmp_path / "clean" / "parts")
    assert clean.num_rows == 400 and sorted(clean.column("id").to_pylist()) == list(range(400))
    assert output_bytes(tmp_path / "out") == output_bytes(tmp_path / "clean")


@pytest.mark.e2e
def test_a_drill_of_a_batch_job_compares_its_output_with_the_uninterrupted_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spotsafe.supervisor.drill import DrillConfig
    from spotsafe.supervisor.reference import ensure_reference

    from .conftest import PROCESS_HANG_S, wait_until
    from .test_drill import Drill, ended, write_trace

    hold = tmp_path / "go"
    monkeypatch.setenv("HOLD_FILE", str(hold))
    command = (sys.executable, str(JOB), "-", "jsonl")
    hold.touch()  # the reference runs through
    ensure_reference(command, tmp_path / "reference", lambda line: None)
    hold.unlink()
    workdir = tmp_path / "drill"
    config = DrillConfig(
        command=command,
        workdir=workdir,
        reference=tmp_path / "reference",
        trace=str(write_trace(tmp_path / "zone.json", [1, 0] + [1] * 20)),
        trace_start_s=0,
        time_scale=60.0,
        mode="sigterm",
        window_s=60.0,
        max_interruptions=2,
    )

    def driver(drill: Drill) -> None:
        wait_until(lambda: Path(f"{hold}.waiting").exists(), "the job at item 100", timeout=PROCESS_HANG_S)
        drill.clock.set(1.0)  # SIGTERM: the job finishes its shard once item 100 is done, and exits 75
        drill.wait_events(1)
        hold.touch()
        wait_until(lambda: ended(workdir / "jobs.sqlite", 1), "attempt 1 to stop", timeout=PROCESS_HANG_S)
        drill.clock.set(2.0)

    report = Drill(config).run(driver)
    assert report.ok and report.identical, report
    assert report.final_step_reference == report.final_step_drill == ITEMS
    assert set(report.component_diffs) == {"output"} and report.component_diffs["output"] == []
    assert report.interruptions == 1 and report.emergency_saves == 1  # the shard finished on the notice
    assert report.steps_replayed == 0
    assert report.exit_classes == {"preempted": 1, "succeeded": 1} | (
        {"no_capacity": report.no_capacity_attempts} if report.no_capacity_attempts else {}
    )


def test_the_report_counts_items_done_redone_and_shards_of_a_batch_run(tmp_path: Path) -> None:
    from spotsafe.storage.registry import open_storage
    from spotsafe.telemetry.report import build_report
    from spotsafe.telemetry.rows import report_rows
    from spotsafe.telemetry.store import read_run_events

    out = tmp_path / "out"
    env = {"PROGRESS_S": "0"}
    # Killed as item 30 begins: items 28 and 29 (shard 4) were processed and not committed.
    assert launch(out, "jsonl", {**env, "KILL_ITEM": "31", "KILL_SIGNAL": "9"}) == -9
    assert launch(out, "jsonl", {**env, "KILL_ITEM": "10", "KILL_SIGNAL": "15"}) == EXIT_PREEMPTED
    assert launch(out, "jsonl", env) == 0
    report = build_report("out", read_run_events(open_storage(str(out))))
    assert report.unit == "item" and report.final_step == ITEMS and report.attempts == 3
    assert report.replayed_steps.max == 2 and report.replayed_steps.count == 2  # the SIGTERM lost nothing
    assert report.checkpoints == 200 and report.emergency_checkpoints == 1  # each shard once, one on the notice
    rows = dict(report_rows(report, None, []))
    assert rows["state"].startswith(f"finished, {ITEMS} items done")
    assert rows["items redone per interruption"].startswith("items: mean 1, worst 2")
    assert rows["shards committed"].startswith("200 (1 on a notice)") and "items/s" in rows["throughput"]


def test_on_every_storage_a_failed_run_and_a_rerun_leave_each_result_once(run_url: str, tmp_path: Path) -> None:
    from spotsafe.storage.registry import open_storage

    spotsafe.batch.map(row, list(range(30)), tmp_path / "clean", shard_size=4, notices=[])

    def flaky(item: int) -> dict[str, Any]:
        if item == 13:
            raise RuntimeError("the machine went away")
        return row(item)

    with pytest.raises(RuntimeError):
        spotsafe.batch.map(flaky, list(range(30)), run_url, shard_size=4, notices=[])
    result = spotsafe.batch.map(row, list(range(30)), run_url, shard_size=4, notices=[])
    assert (result.shards_done_before, result.shards_committed) == (3, 5)
    storage = open_storage(run_url)
    names = sorted(n.rsplit("/", 1)[-1] for n in storage.list_files("parts"))
    assert names == [f"part-{k:06d}.jsonl" for k in range(8)]
    output = b"".join(storage.read(f"parts/{name}") for name in names)
    assert output == output_bytes(tmp_path / "clean")


def launch_workers(url: Path, world: int, env: dict[str, str]) -> list[int]:
    """``world`` worker processes at once (``RANK``/``WORLD_SIZE`` as torchrun sets them, no process group)."""
    procs = [
        subprocess.Popen(
            [sys.executable, str(JOB), str(url), "jsonl"],
            env={**os.environ, "SPOTSAFE_NOTICES": "signals", "RANK": str(r), "WORLD_SIZE": str(world), **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for r in range(world)
    ]
    return [p.wait(timeout=120) for p in procs]


@pytest.mark.e2e
def test_worker_processes_going_from_two_to_three_to_one_commit_every_shard_once(tmp_path: Path) -> None:
    out, commits = tmp_path / "out", tmp_path / "commits.log"
    log = {"COMMIT_LOG": str(commits)}
    # Each worker is killed as its 150th item begins (about 21 shards in), two, then three at a time.
    assert launch_workers(out, 2, {**log, "KILL_ITEM": "150"}) == [-9, -9]
    first = len(commits.read_text().splitlines())
    assert launch_workers(out, 3, {**log, "KILL_ITEM": "150"}) == [-9, -9, -9]
    assert launch_workers(out, 1, log) == [0]
    keys = [line.split()[1] for line in commits.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 200, "a shard was committed twice, or one is missing"
    pids = [line.split()[0] for line in commits.read_text().splitlines()]
    assert len(set(pids)) == 6 and first >= 40
    assert items_in(out) == list(range(ITEMS))
    reference = tmp_path / "reference"
    assert launch(reference, "jsonl", {}) == 0
    assert output_bytes(out) == output_bytes(reference)
