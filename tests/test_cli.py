"""The spotsafe command line, run as a real subprocess against real checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from spotsafe.state.snapshot import Snapshot
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRepository

from .conftest import PROCESS_HANG_S, RUN_METADATA, S3Server, folder

SPOTSAFE = str(Path(sys.executable).with_name("spotsafe"))
STEPS = (7, 14, 21, 28)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "200", **(extra or {})}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SPOTSAFE, *args], capture_output=True, text=True, check=False, env=_env(env), timeout=PROCESS_HANG_S
    )


def run_all(*commands: Sequence[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Run read-only commands side by side (each pays the interpreter start-up)."""
    procs = [
        subprocess.Popen([SPOTSAFE, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(env))
        for c in commands
    ]
    done = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=PROCESS_HANG_S)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:5])


def leftover(run_dir: Path, step: int, *, age_s: float) -> Path:
    """An uncommitted save folder with one blob, last written ``age_s`` ago."""
    generation = folder(run_dir, STEPS[0]).name[1:7]
    when = time.time() - age_s
    path = run_dir / "checkpoints" / f"g{generation}-step-{step:012d}-{int(when * 1000):013d}-abcd"
    path.mkdir()
    (path / "model.bin").write_bytes(b"partial")
    os.utime(path / "model.bin", (when, when))
    return path


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Rows of a rich table, keyed by the checkpoint folder name in them."""
    rows: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            names = [c for c in cells if "-step-" in c]
            if names:
                rows[names[0]] = cells
    return rows


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- ls ------------------------------------------------------------------------------------------


def test_ls_shows_committed_damaged_and_uncommitted_folders_and_latest(run_dir: Path) -> None:
    truncate(folder(run_dir, 7) / "model.bin")
    partial = leftover(run_dir, 35, age_s=0)
    repo = CheckpointRepository(LocalStorage(run_dir))
    repo.write_latest(repo.committed()[0])

    proc = run("ls", str(run_dir))

    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert list(rows) == [partial.name] + [folder(run_dir, s).name for s in reversed(STEPS)]  # newest first
    assert rows[partial.name][-1] == "uncommitted (leftover or in progress)"
    for step in (28, 21, 14):
        assert rows[folder(run_dir, step).name][-1] == "committed"
    damaged = rows[folder(run_dir, 7).name][-1]
    assert damaged.startswith("damaged:") and "model.bin" in damaged
    assert rows[folder(run_dir, 28).name][0] == "*"  # the latest.json marker
    assert [r[0] for r in rows.values()].count("*") == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows[folder(run_dir, 28).name][4])
    assert "5 checkpoint folders: 3 committed, 1 damaged, 1 uncommitted" in proc.stdout


def test_ls_json_and_verify_catch_a_flipped_byte_the_size_check_misses(run_dir: Path) -> None:
    target = folder(run_dir, 21)
    flip_byte(target / "optimizer.bin")

    plain, verified = run_all(["ls", str(run_dir), "--json"], ["ls", str(run_dir), "--json", "--verify", "--progress"])

    assert plain.returncode == 0 and verified.returncode == 0, plain.stderr + verified.stderr
    before = {row["step"]: row for row in json.loads(plain.stdout)}  # stdout is pure JSON, bar or not
    after = {row["step"]: row for row in json.loads(verified.stdout)}
    assert sorted(before) == list(STEPS)
    assert {s: r["status"] for s, r in before.items()} == dict.fromkeys(STEPS, "committed")
    assert before[21]["name"] == target.name and before[21]["bytes"] > 0 and before[21]["blobs"] >= 2
    assert {s: r["status"] for s, r in after.items()} == {7: "verified", 14: "verified", 21: "damaged", 28: "verified"}
    assert "optimizer.bin" in after[21]["reason"] and "checksum" in after[21]["reason"]
    assert plain.stderr == ""  # stderr is not a terminal: no bar
    assert "verifying" in verified.stderr  # --progress forces the bar, onto stderr only


def test_ls_empty_run(tmp_path: Path) -> None:
    proc = run("ls", str(tmp_path))  # (a missing folder: see the credentials test)

    assert proc.returncode == 0, proc.stderr
    assert "no checkpoints" in proc.stdout


def test_tables_piped_to_a_file_show_every_column_in_full(pristine: Path, tmp_path: Path) -> None:
    """With stdout a pipe there is no terminal width to fit: ``ls --verify | cat`` once squeezed the step and
    status columns to nothing (at rich's 80 columns, or a small ``$COLUMNS``), hiding which checkpoint is damaged."""
    run_dir = tmp_path / "a-run-folder-whose-name-alone-is-wider-than-many-terminals-are" / "run"
    shutil.copytree(pristine, run_dir)
    flip_byte(folder(run_dir, 14) / "model.bin")
    unset = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    commands = [
        (["ls", "--verify", str(run_dir)], unset),
        (["ls", "--verify", str(run_dir)], {**unset, "COLUMNS": "60"}),
        (["gc", str(run_dir), "--keep", "1"], {**unset, "COLUMNS": "60"}),
        (["inspect", str(run_dir), "--step", "21"], {**unset, "COLUMNS": "60"}),
    ]
    procs = [
        subprocess.Popen(
            [SPOTSAFE, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for args, env in commands
    ]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=PROCESS_HANG_S)
        assert proc.returncode == 0, stderr.decode()
        outputs.append(stdout.decode())
    listed, narrow, gc, inspected = outputs

    for out in (listed, narrow):
        assert "…" not in out
        rows = table_rows(out)
        assert list(rows) == [folder(run_dir, s).name for s in reversed(STEPS)]
        for step in STEPS:
            latest, shown_step, gen, name, created, size, status = rows[folder(run_dir, step).name]
            assert latest in ("", "*") and (shown_step, gen, name) == (str(step), "1", folder(run_dir, step).name)
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created) and size.endswith("KiB")
            if step == 14:
                assert status.startswith("damaged:") and "model.bin" in status and "checksum" in status
            else:
                assert status == "verified"
        assert f"checkpoints in {run_dir}" in out
    assert "…" not in gc
    actions = {name: (cells[0], cells[1]) for name, cells in table_rows(gc).items()}
    assert actions == {folder(run_dir, 28).name: ("keep", "28")} | {
        folder(run_dir, s).name: ("would delete", str(s)) for s in (7, 14, 21)
    }
    assert "…" not in inspected and folder(run_dir, 21).name in inspected and "step=21" in inspected


# -- verify --------------------------------------------------------------------------------------


def test_verify_exit_codes_and_damage_report(run_dir: Path) -> None:
    flip_byte(folder(run_dir, 28) / "model.bin")

    newest, at_14, at_99, every = run_all(
        ["verify", str(run_dir)],
        ["verify", str(run_dir), "--step", "14"],
        ["verify", str(run_dir), "--step", "99"],
        ["verify", str(run_dir), "--all"],
    )

    assert newest.returncode == 1, newest.stdout + newest.stderr
    (line,) = [x for x in newest.stdout.splitlines() if "-step-" in x]  # default: only the newest
    assert line.startswith("DAMAGED") and folder(run_dir, 28).name in line
    assert "model.bin" in line and "checksum" in line
    assert at_14.returncode == 0, at_14.stdout + at_14.stderr
    assert at_14.stdout.startswith("OK") and folder(run_dir, 14).name in at_14.stdout
    assert at_99.returncode == 2 and "no committed checkpoint at step 99" in at_99.stderr
    assert every.returncode == 1
    status = {x.split()[1]: x.split()[0] for x in every.stdout.splitlines() if "-step-" in x}
    assert status == {
        folder(run_dir, 28).name: "DAMAGED",
        **{folder(run_dir, s).name: "OK" for s in (7, 14, 21)},
    }


# -- inspect -------------------------------------------------------------------------------------


def test_inspect_shows_metadata_blobs_and_model_parameters(run_dir: Path) -> None:
    truncate(folder(run_dir, 7) / "optimizer.bin")
    manifest = json.loads((folder(run_dir, 14) / "manifest.json").read_text())

    text, as_json, damaged = run_all(
        ["inspect", str(run_dir), "--step", "14"],
        ["inspect", str(run_dir), "--json"],
        ["inspect", str(run_dir), "--step", "7"],
    )

    assert text.returncode == 0, text.stderr
    for expected in (folder(run_dir, 14).name, "cli-test", "experiment", "run_id", "0.weight", "3.bias"):
        assert expected in text.stdout
    assert "(16, 6)" in text.stdout and "(2,)" in text.stdout and "float32" in text.stdout
    for blob in manifest["blobs"]:
        assert blob["path"] in text.stdout and blob["checksum"] in text.stdout
    assert "step=14" in text.stdout  # the progress component's values

    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["step"] == 28 and doc["name"] == folder(run_dir, 28).name  # default: the newest
    assert doc["metadata"] == RUN_METADATA and doc["writer"]
    components = {c["name"]: c for c in doc["components"]}
    assert {"model", "optimizer", "scheduler", "loader", "progress", "rng"} <= set(components)
    params = {p["name"]: (p["dtype"], p["shape"]) for p in components["model"]["parameters"]}
    assert params == {
        "0.weight": ("float32", [16, 6]),
        "0.bias": ("float32", [16]),
        "3.weight": ("float32", [2, 16]),
        "3.bias": ("float32", [2]),
    }
    assert components["model"]["tensors"] == 4 and components["model"]["tensor_bytes"] == (96 + 16 + 32 + 2) * 4
    assert components["progress"]["values"]["step"] == 28
    assert components["loader"]["values"]["batch_size"] == 8

    assert damaged.returncode == 1
    assert "DAMAGED" in damaged.stderr and "optimizer.bin" in damaged.stderr


def test_inspect_lists_the_first_50_parameters(tmp_path: Path) -> None:
    model = nn.Sequential(*(nn.Linear(2, 2) for _ in range(30)))  # 60 parameters
    snapshot = Snapshot.capture(3, {"model": model.state_dict(), "progress": {"step": 3, "epoch": 0}})
    pending = CheckpointRepository(LocalStorage(tmp_path)).begin(3)
    for name, source in snapshot.blobs():
        pending.write_blob(name, source)
    pending.commit(metadata={}, writer={})

    proc = run("inspect", str(tmp_path))

    assert proc.returncode == 0, proc.stderr
    assert "24.weight" in proc.stdout and "24.bias" in proc.stdout  # parameters 49 and 50
    assert "25.weight" not in proc.stdout
    assert "... and 10 more" in proc.stdout


# -- gc ------------------------------------------------------------------------------------------


def test_gc_dry_run_lists_candidates_and_deletes_nothing(run_dir: Path) -> None:
    stale = leftover(run_dir, 3, age_s=7200)
    fresh = leftover(run_dir, 35, age_s=0)
    before = tree(run_dir)

    proc = run("gc", str(run_dir), "--keep", "2")

    assert proc.returncode == 0, proc.stderr
    assert tree(run_dir) == before
    rows = table_rows(proc.stdout)
    actions = {name: cells[0] for name, cells in rows.items()}
    assert actions == {
        fresh.name: "keep",
        folder(run_dir, 28).name: "keep",
        folder(run_dir, 21).name: "keep",
        folder(run_dir, 14).name: "would delete",
        folder(run_dir, 7).name: "would delete",
        stale.name: "would delete",
    }
    assert "beyond the newest 2" in rows[folder(run_dir, 7).name][-1]
    assert "uncommitted" in rows[stale.name][-1] and "may be a save in progress" in rows[fresh.name][-1]
    assert "dry run" in proc.stdout and "nothing was deleted" in proc.stdout


def test_gc_apply_deletes_exactly_the_candidates(run_dir: Path) -> None:
    stale = leftover(run_dir, 3, age_s=7200)
    fresh = leftover(run_dir, 35, age_s=0)

    proc = run("gc", str(run_dir), "--keep", "2", "--apply")

    assert proc.returncode == 0, proc.stderr
    left = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert left == sorted([fresh.name, folder(run_dir, 21).name, folder(run_dir, 28).name])
    assert not stale.exists()
    assert "deleted 2 checkpoint(s) and 1 uncommitted folder(s)" in proc.stdout
    repo = CheckpointRepository(LocalStorage(run_dir))
    assert [r.step for r in repo.committed()] == [28, 21]
    for ref in repo.committed():
        repo.verify(ref)


def test_gc_apply_keeps_the_newest_intact_checkpoint_when_the_newest_are_damaged(run_dir: Path) -> None:
    truncate(folder(run_dir, 28) / "model.bin")
    truncate(folder(run_dir, 21) / "state.json")
    names = {s: folder(run_dir, s).name for s in STEPS}

    refused = run("gc", str(run_dir), "--keep", "0", "--apply")
    assert refused.returncode == 2 and "--keep" in refused.stderr
    assert len(list((run_dir / "checkpoints").iterdir())) == 4

    proc = run("gc", str(run_dir), "--keep", "2", "--apply")

    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == sorted(names[s] for s in (14, 21, 28))
    assert "the newest intact checkpoint" in table_rows(proc.stdout)[names[14]][-1]
    repo = CheckpointRepository(LocalStorage(run_dir))
    repo.verify(repo.committed()[-1])  # step 14 is intact and still there


# -- object stores and credentials ---------------------------------------------------------------


def test_ls_and_verify_on_s3(pristine: Path, s3_server: S3Server) -> None:
    import s3fs

    bucket = s3_server.new_bucket()
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key="testing", secret="testing")
    fs.put(str(pristine / "checkpoints"), f"{bucket}/run/", recursive=True)
    url = f"s3://{bucket}/run"
    # The endpoint comes from --storage-option (a dotted key sets a nested option), not the environment.
    env = {**s3_server.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    option = ["--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint}", "--retry-budget", "5"]

    proc = run("ls", url, "--json", "--verify", *option, env=env)

    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert sorted(r["step"] for r in rows) == list(STEPS)
    assert {r["status"] for r in rows} == {"verified"}


def test_credentials_never_appear_in_output(tmp_path: Path) -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYENV",
        "AWS_SECRET_ACCESS_KEY": "supersecretvalue123",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens: connection refused at once
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    fast = ["--retry-budget", "0"]
    creds = ["--storage-option", "key=AKIAOPTION", "--storage-option", "secret=optionsecret987"]
    secret_dir = tmp_path / "supersecretvalue123"

    in_url, refused, bad_option, local = run_all(
        ["ls", "s3://AKIAEXAMPLEKEY:supersecret@bucket/run", *fast],
        ["verify", "s3://bucket/run", *fast, *creds],
        ["ls", "s3://bucket/run", *fast, "--storage-option", "supersecretvalue123"],
        ["ls", str(secret_dir)],
        env=env,
    )

    assert in_url.returncode == 2 and "credentials in the URL" in in_url.stderr
    assert "s3://bucket/run" in in_url.stderr
    assert refused.returncode == 2 and "connect" in refused.stderr.lower()
    assert "after 1 attempts" in refused.stderr  # --retry-budget 0: one try, no retries
    assert bad_option.returncode == 2 and "OPTION=VALUE" in bad_option.stderr
    assert local.returncode == 2 and "no such folder" in local.stderr
    for proc in (in_url, refused, bad_option, local):
        output = proc.stdout + proc.stderr
        for secret in ("AKIAEXAMPLEKEY", "supersecret", "optionsecret987", "AKIAOPTION"):
            assert secret not in output, (proc.args, output)
        assert "Traceback" not in output


# -- other commands ------------------------------------------------------------------------------


def test_demo_without_example_is_a_usage_error(tmp_path: Path) -> None:
    proc = subprocess.run([SPOTSAFE, "demo"], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "examples/tiny_lm.py not found" in proc.stderr


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0 and "spotsafe" in proc.stdout
