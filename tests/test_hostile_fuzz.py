"""Seeded fuzzing of real manifests and ``state.json`` files.

Thousands of mutations (bit flips, truncation, duplicated and removed keys, type swaps, huge numbers,
deep nesting, path traversal, absolute paths, NUL bytes, unicode, pickle and eval payloads) go through
the parsers in memory; a few hundred go through a real ``Checkpointer.restore()`` on a run folder.
``state.json`` mutations get a recomputed checksum in the manifest, so that the parser is reached.

Every case asserts: nothing ran (no unpickling, ``exec``, ``compile`` or process start: an audit hook
watches, and the payloads call a sentinel if they ever run), no exception other than spotsafe's own
escapes, restore either falls back to the intact older checkpoint or loads the newest one exactly as
the parsers read it, and no file outside the run folder is opened.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import pickle
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from spotsafe.cli.output import utc_iso
from spotsafe.errors import CorruptCheckpointError, SpotsafeError
from spotsafe.state.describe import describe_component
from spotsafe.state.snapshot import STATE_BLOB, DecodedState, decode_state
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.manifest import MANIFEST_NAME, Manifest
from spotsafe.storage.repository import CheckpointRepository
from spotsafe.telemetry.events import Event

from .conftest import make_job
from .test_hostile_checkpoints import checksum, needs_proc, opened_files, outside_of, train_run

SEED = 20250613
IN_MEMORY_CASES = 1200  # per document kind
RESTORE_CASES = 100  # per document kind

# -- payloads that must never run -------------------------------------------------------------------------------------

RAN: list[str] = []


def _sentinel(how: str) -> None:
    RAN.append(how)


class _Payload:
    def __reduce__(self) -> tuple[Callable[[str], None], tuple[str]]:
        return _sentinel, ("pickle",)


PICKLED = base64.b64encode(pickle.dumps(_Payload())).decode()
EVAL = f"__import__({__name__!r}, fromlist=['_sentinel'])._sentinel('eval')"
RAN_EVENTS = ("exec", "compile", "pickle.find_class", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork")
AUDITED: list[str] = []
_auditing = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _auditing and (event.startswith(RAN_EVENTS) or event == "subprocess.Popen"):
        AUDITED.append(event)


sys.addaudithook(_audit)  # cannot be removed; ``_auditing`` confines it to the cases


@contextmanager
def watched(run: Path) -> Iterator[None]:
    """Assert that nothing ran and nothing outside ``run`` was opened while the block ran."""
    global _auditing
    RAN.clear()
    AUDITED.clear()
    with opened_files() as seen:
        _auditing = True
        try:
            yield
        finally:
            _auditing = False
    assert RAN == [] and AUDITED == [], (RAN, AUDITED)
    assert outside_of(run, seen) == []


# -- mutations ------------------------------------------------------------------------------------------------------

PATHS = [
    "../../../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "",
    "model.bin/../../x",
    "../model.bin",
    "..\\..\\x",
    "C:\\Windows\\win.ini",
    "model.bin\x00.txt",
    "model.bin\n",
    "\u202emodel.bin",
    "%2e%2e%2fx",
    "~/.ssh/id_rsa",
    "file:///etc/passwd",
    "/proc/self/environ",
    "checkpoints/../../x",
    "a" * 300,
    "state.json",
    MANIFEST_NAME,
]
SCALARS: list[Any] = [None, True, False, 0, -1, 1, 7, 2**31, 2**63, 2**64 + 1, -(10**30), 10**4000, 1.5, -0.0, 1e308]
SCALARS += ["", "x", "\x00", "\ud800", "\U0001f600" * 3, "é", EVAL, "float32", "model.bin"]
HOSTILE: list[Any] = [
    [],
    {},
    [[]],
    {"$tensor": 0},
    {"$tensor": 10**9},
    {"$tensor": -1},
    {"$ndarray": 2},
    {"$pickle": PICKLED},
    {"$reduce": PICKLED},
    {"$bytes": PICKLED},
    {"$eval": EVAL},
    {"$import": "os.system"},
    {"$class": "subprocess.Popen", "args": ["true"]},
    {"$tensor": 0, "$pickle": PICKLED},
    {"__reduce__": EVAL},
    {"$float": []},
    {"$float": "nan"},
    {"$float": EVAL},
    {"$dtype": "object"},
    {"$dtype": EVAL},
    {"$device": "cuda:99999999999999999999"},
    {"$device": EVAL},
    {"$npscalar": "object", "value": EVAL},
    {"$npscalar": "int8", "value": 10**6},
    {"$npscalar": [], "value": 1},
    {"$odict": [[{"a": 1}, 1]]},
    {"$odict": [[EVAL, {"$pickle": PICKLED}]]},
    {"$dict": [[[1, [2]], 3]]},
    {"$tuple": {"a": 1}},
    {"$meta": 1},
]
RAW = [
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "1" + "0" * 5000,
    "0.1e-400",
    *("[" * d + "]" * d for d in (50, 96, 97, 98, 99, 100, 101, 1000, 200_000)),
    '{"a":' * 300 + "1" + "}" * 300,
    "[" * 5000,
    '"\\ud800"',
    '"\\u0000"',
]


@dataclass
class Mutator:
    rng: random.Random
    older: str
    done: dict[str, int] = field(default_factory=dict)

    def pick(self, options: list[Any]) -> Any:
        return copy.deepcopy(self.rng.choice(options))

    def value(self) -> Any:
        kind = self.rng.random()
        if kind < 0.35:
            return self.pick(SCALARS)
        if kind < 0.7:
            return self.pick(HOSTILE)
        if kind < 0.85:
            return self.pick([*PATHS, f"{self.older}/model.bin", self.older])
        return "@@RAW@@"

    def positions(self, doc: Any) -> list[tuple[Any, Any]]:
        """The (container, key) places in ``doc`` (of a long list, its first three items and its last one)."""
        out: list[tuple[Any, Any]] = []
        todo = [doc]
        while todo:
            node = todo.pop()
            if isinstance(node, dict):
                items: Any = node.items()
            elif isinstance(node, list):
                items = [(i, node[i]) for i in sorted({*range(min(3, len(node))), len(node) - 1}) if i >= 0]
            else:
                continue
            for key, child in items:
                out.append((node, key))
                todo.append(child)
        return out

    def structural(self, text: bytes, targets: list[tuple[str, ...]]) -> bytes:
        doc = json.loads(text)
        raw = self.pick(RAW)
        dup = False
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            places = self.positions(doc)
            wanted = [p for p in places if _matches(p, targets)]
            container, key = self.rng.choice(wanted if wanted and self.rng.random() < 0.6 else places)
            action = self.rng.random()
            if action < 0.15 and isinstance(container, dict):
                self.count("remove key")
                del container[key]
            elif action < 0.25 and isinstance(container, dict) and not dup:
                self.count("duplicate key")
                container["@@DUP@@"] = self.value()
                dup_key = key
                dup = True
            elif action < 0.35 and isinstance(container, dict):
                self.count("rename key")
                container[self.pick([*PATHS, "$tensor", "$odict", EVAL, "model", "progress"])] = container.pop(key)
            elif action < 0.45:
                self.count("wrap")
                container[key] = self.rng.choice(([container[key]], {"$tuple": [container[key]]}))
            else:
                self.count("replace value")
                container[key] = self.value()
        out = json.dumps(doc).replace('"@@RAW@@"', raw)
        if dup:
            out = out.replace('"@@DUP@@"', json.dumps(dup_key), 1)
        return out.encode()

    def bytewise(self, text: bytes) -> bytes:
        data = bytearray(text)
        action = self.rng.randrange(7)
        at = self.rng.randrange(len(data) + 1)
        if action == 0:
            self.count("bit flips")
            for _ in range(self.rng.randint(1, 8)):
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        elif action == 1:
            self.count("truncate")
            del data[at:]
        elif action == 2:
            self.count("NUL bytes")
            data[at:at] = b"\x00" * self.rng.randint(1, 4)
        elif action == 3:
            self.count("bad unicode")
            data[at:at] = self.rng.choice([b"\xff\xfe", b"\xc3", "\u202e\U0001f600".encode(), b"\xed\xa0\x80"])
        elif action == 4:
            self.count("deep brackets")
            n = self.rng.choice((10, 100, 101, 5000, 300_000))
            data[at:at] = self.rng.choice((b"[" * n, b"{" * n, b"[" * n + b"]" * n))
        elif action == 5:
            self.count("delete range")
            del data[at : at + self.rng.randint(1, 64)]
        else:
            self.count("duplicate range")
            end = min(len(data), at + self.rng.randint(1, 256))
            data[end:end] = data[at:end]
        return bytes(data)

    def mutate(self, text: bytes, targets: list[tuple[str, ...]]) -> bytes:
        return self.structural(text, targets) if self.rng.random() < 0.75 else self.bytewise(text)

    def count(self, what: str) -> None:
        self.done[what] = self.done.get(what, 0) + 1


def _matches(place: tuple[Any, Any], targets: list[tuple[str, ...]]) -> bool:
    return any(str(place[1]) in target for target in targets)


MANIFEST_TARGETS = [("path", "checkpoint", "size", "checksum", "step", "created_at", "format_version", "metadata")]
STATE_TARGETS = [("tree", "tensors", "segments", "nbytes", "dtype", "shape", "offset", "blob", "components")]


# -- the run the fuzz starts from -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pristine:
    run: Path
    older: Path
    newest: Path
    manifest: bytes
    state: bytes
    blobs: dict[str, bytearray | memoryview]
    weights: dict[str, dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    older, newest = train_run(run)
    repo = CheckpointRepository(LocalStorage(run))
    weights = {}
    blobs: dict[str, bytearray | memoryview] = {}
    for folder in (older, newest):
        [ref] = [r for r in repo.committed() if r.name == folder.name]
        loaded = repo.load(ref)
        blobs = loaded.blobs
        model = decode_state(loaded.blobs, ref.name).components["model"]
        weights[folder.name] = {k: v.clone() for k, v in model.items()}
    return Pristine(
        run, older, newest, (newest / MANIFEST_NAME).read_bytes(), (newest / STATE_BLOB).read_bytes(), blobs, weights
    )


def _inspect_like(manifest: Manifest) -> None:
    """What ``spotsafe inspect`` does with a parsed manifest (it must not raise on anything the parser accepts)."""
    utc_iso(manifest.created_at)
    json.dumps(
        {"writer": manifest.writer, "metadata": manifest.metadata, "blobs": [b.to_json() for b in manifest.blobs]}
    )


def _describe(decoded: DecodedState) -> None:
    """What ``spotsafe inspect`` does with decoded components."""
    json.dumps([describe_component(n, s) for n, s in decoded.components.items()], allow_nan=False)


# -- in memory --------------------------------------------------------------------------------------------------------


def test_fuzzed_manifests_parse_or_are_refused(pristine: Pristine) -> None:
    mutator = Mutator(random.Random(SEED), pristine.older.name)
    accepted = 0
    with watched(pristine.run):
        for case in range(IN_MEMORY_CASES):
            data = mutator.mutate(pristine.manifest, MANIFEST_TARGETS)
            try:
                manifest = Manifest.from_bytes(data)
            except CorruptCheckpointError:
                continue
            except Exception as err:  # noqa: BLE001 - any other exception is the failure this test looks for
                pytest.fail(f"case {case}: {type(err).__name__}: {err!s:.300} from manifest {data[:300]!r}")
            accepted += 1
            _inspect_like(manifest)
    print(f"manifests: {IN_MEMORY_CASES} cases, {accepted} parsed, mutations {mutator.done}")
    assert 0.05 * IN_MEMORY_CASES < accepted < 0.95 * IN_MEMORY_CASES  # both paths are exercised


def test_fuzzed_state_json_decodes_or_is_refused(pristine: Pristine) -> None:
    mutator = Mutator(random.Random(SEED + 1), pristine.older.name)
    accepted = 0
    with watched(pristine.run):
        for case in range(IN_MEMORY_CASES):
            data = mutator.mutate(pristine.state, STATE_TARGETS)
            try:
                decoded = decode_state({**pristine.blobs, STATE_BLOB: bytearray(data)}, "fuzz")
            except CorruptCheckpointError:
                continue
            except Exception as err:  # noqa: BLE001 - any other exception is the failure this test looks for
                pytest.fail(f"case {case}: {type(err).__name__}: {err!s:.300} from state.json {data[:300]!r}")
            accepted += 1
            _describe(decoded)
    print(f"state.json: {IN_MEMORY_CASES} cases, {accepted} decoded, mutations {mutator.done}")
    assert 0.05 * IN_MEMORY_CASES < accepted < 0.95 * IN_MEMORY_CASES


# -- through a real restore -----------------------------------------------------------------------------------------


class Collected:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)


def _restore_case(pristine: Pristine, work: Path, manifest: bytes, state: bytes) -> tuple[Any, list[Any], Any]:
    """Plant the documents in the newest checkpoint of ``work`` (a copy of the pristine run), restore, and put
    the run back as it was. Returns (step or the SpotsafeError raised, skipped events, the model's weights)."""
    newest = work / pristine.newest.relative_to(pristine.run)
    claims = set((work / "writers").iterdir())
    (newest / STATE_BLOB).write_bytes(state)
    (newest / MANIFEST_NAME).write_bytes(manifest)
    sink = Collected()
    try:
        with watched(work):
            job = make_job(work, keep=5, events=sink)
            try:
                outcome: Any = job.ckpt.restore()
            except SpotsafeError as err:
                outcome = err
            finally:
                job.ckpt.close()
    finally:
        (newest / STATE_BLOB).write_bytes(pristine.state)
        (newest / MANIFEST_NAME).write_bytes(pristine.manifest)
        for claim in set((work / "writers").iterdir()) - claims:
            claim.unlink()
    skipped = [e for e in sink.events if e.type == "checkpoint_skipped"]
    return outcome, skipped, {k: v.detach().clone() for k, v in job.model.state_dict().items()}


def _with_state_checksum(manifest: bytes, state: bytes) -> bytes:
    doc = json.loads(manifest)
    for blob in doc["blobs"]:
        if blob["path"] == STATE_BLOB:
            blob["size"], blob["checksum"] = len(state), checksum(state)
    return json.dumps(doc).encode()


def _same(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return weights.keys() == expected.keys() and all(
        torch.equal(weights[k].reshape(-1), expected[k].reshape(-1)) for k in weights
    )


@needs_proc
def test_fuzzed_checkpoints_through_a_real_restore(
    pristine: Pristine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not under test here; speed is welcome
    work = tmp_path / "run"
    shutil.copytree(pristine.run, work)
    rng = random.Random(SEED + 2)
    manifests = Mutator(rng, pristine.older.name)
    states = Mutator(rng, pristine.older.name)
    outcomes: dict[str, int] = {}
    for case in range(2 * RESTORE_CASES):
        on_state = case % 2 == 1
        if on_state:
            state = states.mutate(pristine.state, STATE_TARGETS)
            manifest = _with_state_checksum(pristine.manifest, state)
        else:
            state, manifest = pristine.state, manifests.mutate(pristine.manifest, MANIFEST_TARGETS)
        try:
            decode_state({**pristine.blobs, STATE_BLOB: bytearray(state)}, "fuzz")
            decodes = True
        except CorruptCheckpointError:
            decodes = False
        outcome, skipped, weights = _restore_case(pristine, work, manifest, state)
        where = f"case {case} ({'state.json' if on_state else 'manifest'}): {outcome!s:.300}"
        if isinstance(outcome, int) and skipped:  # fell back past the newest checkpoint, saying so
            assert outcome == 7 and [s.checkpoint for s in skipped] == [pristine.newest.name], where
            assert skipped[0].reason and _same(weights, pristine.weights[pristine.older.name]), where
            assert not (on_state and decodes), where  # skipped only what the parsers refuse
            kind = "fell back"
        elif isinstance(outcome, int):  # loaded the newest, as the parsers read it
            assert decodes, where
            if not on_state:  # the manifest changed, not what it verifies: exactly the intact state
                assert outcome == 14 and _same(weights, pristine.weights[pristine.newest.name]), where
            kind = "loaded the newest"
        else:  # a checkpoint that parses but does not fit the objects: spotsafe's own error, nothing else
            assert on_state and decodes, where
            kind = type(outcome).__name__
        outcomes[kind] = outcomes.get(kind, 0) + 1
    print(f"restore: {2 * RESTORE_CASES} cases: {outcomes}")
    assert outcomes.get("fell back", 0) > 0 and outcomes.get("loaded the newest", 0) > 0
