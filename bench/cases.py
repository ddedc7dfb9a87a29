"""The measurements of the benchmark suite, each a function over one training state.

Every case returns plain numbers (seconds, bytes); ``run.py`` turns them into
ratios against the floors measured in the same process and run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spotsafe
from spotsafe.engine.reader import load_newest_valid
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRepository

MB = 2**20
IO_BLOCK = 64 * MB


# -- the state --------------------------------------------------------------------------------


@dataclass
class State:
    """A model and its AdamW state (after one step, so every moment exists)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    nbytes: int

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in self.model.state_dict().values()]
        for per_param in self.optimizer.state.values():
            out.extend(v for v in per_param.values() if isinstance(v, torch.Tensor))
        return out

    def flat(self) -> dict[str, torch.Tensor]:
        """Every tensor by a unique name (safetensors wants a flat dict)."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for i, per_param in enumerate(self.optimizer.state.values()):
            out.update({f"optim.{i}.{k}": v for k, v in per_param.items() if isinstance(v, torch.Tensor)})
        return out

    def perturb(self, fraction: float) -> int:
        """Change ``fraction`` of the parameters (and their AdamW moments) in place; return the changed bytes."""
        params = [p for p in self.model.parameters()]
        budget = fraction * sum(p.numel() * p.element_size() for p in params)
        changed = 0
        done = 0.0
        with torch.no_grad():
            for p in params:
                if done >= budget - 1:
                    break
                done += p.numel() * p.element_size()
                p.add_(1e-3)
                changed += p.numel() * p.element_size()
                for value in self.optimizer.state[p].values():
                    if isinstance(value, torch.Tensor):
                        value.add_(1e-3)
                        changed += value.numel() * value.element_size()
        return changed


def make_state(target_bytes: int, width: int = 2048) -> State:
    """Square linear layers until model + AdamW state reaches ``target_bytes``."""
    per_layer = 3 * (width * width + width) * 4 + 2 * 4  # weights, bias, two moments, step counters
    layers = max(1, math.ceil(target_bytes / per_layer))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = State(model, optimizer, 0)
    state.nbytes = sum(t.numel() * t.element_size() for t in state.tensors())
    return state


def checkpointer(state: State, url: Path, **options: Any) -> spotsafe.Checkpointer:
    """A Checkpointer of ``state``'s model and optimizer at ``url``: no signal handlers, one checkpoint kept, no
    staging budget (``options`` change any of that)."""
    settings: dict[str, Any] = {"handle_signals": False, "keep": 1, "staging_budget": None, **options}
    return spotsafe.Checkpointer(str(url), model=state.model, optimizer=state.optimizer, **settings)


# -- helpers --------------------------------------------------------------------------------


def best(times: list[float]) -> float:
    return min(times)


def _files(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every file under it."""
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def _sync(path: Path, *, drop: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """fsync a file, or every file of a folder and the folder itself."""
    for p in _files(path):
        _sync(p)
    if path.is_dir():
        _sync(path)


def drop_cache(path: Path) -> None:
    """Evict a file's (or a folder's files') pages from the page cache, so the next read hits the disk."""
    for p in _files(path):
        _sync(p, drop=True)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in _files(path))


@contextlib.contextmanager
def scratch(root: Path, name: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- floors --------------------------------------------------------------------------------


def memcpy_floor(state: State, repeats: int = 5) -> float:
    """Seconds to copy every tensor of the state into reused, already-touched buffers."""
    tensors = state.tensors()
    buffers = [torch.empty_like(t) for t in tensors]
    for b, t in zip(buffers, tensors, strict=True):
        b.copy_(t)  # touch every page once: reused buffers do not page-fault
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b, t in zip(buffers, tensors, strict=True):
            b.copy_(t)
        times.append(time.perf_counter() - start)
    return best(times)


def write_floor_once(state: State, path: Path, *, direct: bool = False) -> float:
    """Seconds to write the state's bytes to a new file in 64 MiB writes, then fsync (``dd conv=fsync``).

    ``direct``: with ``O_DIRECT`` (``dd oflag=direct``), from one page-aligned 64 MiB buffer holding the first
    bytes of the state, written again and again (the disk does not care which bytes).
    """
    path.unlink(missing_ok=True)
    if direct:
        aligned = memoryview(mmap.mmap(-1, IO_BLOCK))
        at = 0
        for t in state.tensors():
            if at == IO_BLOCK:
                break
            flat = memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())[: IO_BLOCK - at]  # type: ignore[arg-type]
            aligned[at : at + flat.nbytes] = flat
            at += flat.nbytes
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            left = state.nbytes - state.nbytes % 4096
            while left:
                left -= os.write(fd, aligned[: min(left, IO_BLOCK)])
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as handle:
        for t in state.tensors():
            view = memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            for offset in range(0, len(view), IO_BLOCK):
                handle.write(view[offset : offset + IO_BLOCK])
        os.fsync(handle.fileno())
    return time.perf_counter() - start


def paired_write_floor(state: State, path: Path) -> float:
    """The disk's write floor right now: the faster of a buffered and a direct write of the state's bytes."""
    return min(write_floor_once(state, path), write_floor_once(state, path, direct=True))


@dataclass
class WriteFloors:
    python_s: float
    python_direct_s: float
    dd_s: float
    dd_direct_s: float
    file: Path

    @property
    def best_s(self) -> float:
        return min(t for t in (self.python_s, self.python_direct_s, self.dd_s, self.dd_direct_s) if t == t)


def disk_write_floor(state: State, root: Path, repeats: int = 3) -> WriteFloors:
    """Seconds to write the state's bytes + fsync: Python 64 MiB writes and ``dd``, each buffered and direct.

    Best of ``repeats``, each into a new file after deleting the previous one (as a save with
    retention does), so the floor is the disk's best, not its first, write.
    """
    path = root / "floor.bin"
    python_direct_s = best([write_floor_once(state, path, direct=True) for _ in range(repeats)])
    python_s = best([write_floor_once(state, path) for _ in range(repeats)])
    dd_s = {"": float("nan"), "oflag=direct": float("nan")}
    if shutil.which("dd"):
        target = root / "dd.bin"
        count = max(1, round(state.nbytes / IO_BLOCK))
        for flag in dd_s:
            times = []
            for _ in range(repeats):
                target.unlink(missing_ok=True)
                start = time.perf_counter()
                subprocess.run(
                    ["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={count}", "conv=fsync", *flag.split()],
                    check=True,
                    capture_output=True,
                )
                times.append((time.perf_counter() - start) * state.nbytes / (count * IO_BLOCK))
            dd_s[flag] = best(times)
        target.unlink()
    return WriteFloors(python_s, python_direct_s, dd_s[""], dd_s["oflag=direct"], path)


def disk_read_floor(path: Path) -> float:
    """Seconds to read ``path`` cold (page cache dropped) into a preallocated buffer, advised as sequential (the
    kernel doubles its read-ahead)."""
    size = path.stat().st_size
    buffer = bytearray(size)
    view = memoryview(buffer)
    drop_cache(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        got = 0
        while got < size:
            n = handle.readinto(view[got : got + IO_BLOCK])
            if not n:
                break
            got += n
    return time.perf_counter() - start


def disk_read_floor_parallel(path: Path, readers: int = 4, part: int = 32 * MB) -> float:
    """Seconds to read ``path`` cold as ranged reads of ``part`` bytes, ``readers`` in flight, into memory already
    touched: what the disk gives to several requests at once (a cloud disk often gives much more than to one)."""
    size = path.stat().st_size
    view = memoryview(bytearray(size))
    drop_cache(path)
    fd = os.open(path, os.O_RDONLY)

    def read(offset: int) -> None:
        end = min(size, offset + part)
        while offset < end:
            n = os.preadv(fd, [view[offset:end]], offset)
            if not n:
                raise OSError(f"{path} ended at {offset} of {size} bytes")
            offset += n

    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(readers) as pool:
            list(pool.map(read, range(0, size, part)))
        return time.perf_counter() - start
    finally:
        os.close(fd)


# -- baselines --------------------------------------------------------------------------------


@dataclass
class SaveTiming:
    stall_s: float
    total_s: float
    bytes_written: int
    notes: str = ""


def torch_save(state: State, root: Path) -> SaveTiming:
    with scratch(root, "torch-save") as d:
        path = d / "state.pt"
        start = time.perf_counter()
        torch.save(state.state_dict(), path)
        fsync_path(path)
        total = time.perf_counter() - start
        return SaveTiming(total, total, path.stat().st_size)


def safetensors_save(state: State, root: Path) -> SaveTiming:
    from safetensors.torch import save_file

    with scratch(root, "safetensors") as d:
        path = d / "state.safetensors"
        start = time.perf_counter()
        save_file(state.flat(), str(path))
        fsync_path(path)
        total = time.perf_counter() - start
        return SaveTiming(total, total, path.stat().st_size)


def dcp_save(state: State, root: Path) -> SaveTiming:
    import torch.distributed.checkpoint as dcp

    with scratch(root, "dcp") as d:
        start = time.perf_counter()
        dcp.save(state.state_dict(), checkpoint_id=str(d / "ckpt"), no_dist=True)
        total = time.perf_counter() - start
        return SaveTiming(total, total, folder_bytes(d))


def _result(future: Any) -> None:
    (future.upload_completion if hasattr(future, "upload_completion") else future).result()


def dcp_async_save(state: State, root: Path, *, tuned: bool, repeats: int = 2) -> SaveTiming:
    """``async_save``: default, or with one reused stager and pinned memory off (its best set-up on a CPU).

    The stall is the time until ``async_save`` returns; the best of ``repeats`` calls (the
    tuned stager reuses its buffers from the second call on).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = None
    if tuned:
        options = StagingOptions(
            use_pinned_memory=False, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False
        )
        stager = DefaultStager(options)
    timings = []
    with scratch(root, "dcp-async") as d:
        for i in range(repeats):
            start = time.perf_counter()
            kwargs: dict[str, Any] = {"async_stager": stager} if stager is not None else {}
            future = dcp.async_save(state.state_dict(), checkpoint_id=str(d / f"ckpt{i}"), no_dist=True, **kwargs)
            stall = time.perf_counter() - start
            _result(future)
            timings.append(SaveTiming(stall, time.perf_counter() - start, folder_bytes(d / f"ckpt{i}")))
            shutil.rmtree(d / f"ckpt{i}")
    if stager is not None:
        stager.close()
    return min(timings, key=lambda t: t.stall_s)


# -- spotsafe --------------------------------------------------------------------------------


def _events(run: Path, kind: str) -> list[dict[str, Any]]:
    out = []
    with open(run / "events.jsonl") as handle:
        for line in handle:
            doc = json.loads(line)
            if doc["type"] == kind:
                out.append(doc)
    return out


@dataclass
class SpotsafeTiming:
    cold: SaveTiming
    warm: SaveTiming
    persist_bytes_per_s: float
    persist_vs_floor: float
    staging_bytes: int


def spotsafe_save(state: State, root: Path, repeats: int = 5) -> SpotsafeTiming:
    """Stall and persist time of full saves (every byte changed between saves).

    The first save allocates the staging slots (cold); later saves reuse them (warm, the steady
    state). Before each warm save the disk floor is measured again (a plain write + fsync of the
    same bytes) and the persist is compared with it pair by pair: the median of the paired ratios
    is robust to a shared disk whose speed changes from one second to the next.
    """
    with scratch(root, "spotsafe") as d:
        run = d / "run"
        ckpt = checkpointer(state, run)
        timings, floors = [], []
        for i in range(repeats + 1):
            if i:
                floors.append(paired_write_floor(state, d / "floor.bin"))
                state.perturb(1.0)
            start = time.perf_counter()
            ckpt.save()
            stall = time.perf_counter() - start
            ckpt.wait()
            timings.append(SaveTiming(stall, time.perf_counter() - start, 0))
        committed = _events(run, "save_committed")
        staged = _events(run, "save_staged")
        for timing, event in zip(timings, committed, strict=True):
            timing.bytes_written = event["written_bytes"]
        warm = min(timings[1:], key=lambda t: t.stall_s)
        # From the end of the stall to the commit (save_committed is emitted before retention deletes
        # the previous checkpoint, which the disk floor does not pay either).
        persist_s = [e["duration_s"] - e["stall_s"] for e in committed[1:]]
        rate = warm.bytes_written / min(persist_s)
        pairs = zip(committed[1:], persist_s, floors, strict=True)
        ratios = sorted((e["written_bytes"] / p) / (state.nbytes / f) for e, p, f in pairs)
        staging = max(e["staging_bytes"] for e in staged)
        ckpt.close()
        return SpotsafeTiming(timings[0], warm, rate, ratios[len(ratios) // 2], staging)


def spotsafe_overlap(state: State, root: Path, step_s: float, repeats: int = 3) -> tuple[float, float]:
    """(stall at the save call, wait before the optimizer step) with ``overlap=True``.

    Forward/backward is simulated by sleeping ``step_s`` (longer than the copy), as a host
    thread does while a GPU computes.
    """
    with scratch(root, "overlap") as d:
        ckpt = checkpointer(state, d, overlap=True)
        at_save, at_step = [], []
        for i in range(repeats + 1):
            state.perturb(1.0)
            start = time.perf_counter()
            ckpt.save()
            saved = time.perf_counter()
            time.sleep(step_s)  # "forward and backward"
            before = time.perf_counter()
            ckpt.before_optimizer_step()
            after = time.perf_counter()
            ckpt.wait()
            if i:  # the first save allocates the slots
                at_save.append(saved - start)
                at_step.append(after - before)
        failed = _events(d, "save_failed")
        ckpt.close()
        if failed:
            raise RuntimeError(f"overlapped saves failed: {failed}")
        return min(at_save), min(at_step)


def spotsafe_incremental(state: State, root: Path, fractions: tuple[float, ...]) -> list[tuple[float, int, int]]:
    """(fraction, changed bytes, written bytes) for incremental saves after changing that fraction."""
    out = []
    with scratch(root, "incremental") as d:
        ckpt = checkpointer(state, d, keep=2)
        ckpt.save()
        ckpt.wait()
        for fraction in fractions:
            changed = state.perturb(fraction)
            ckpt.save()
            ckpt.wait()
            written = _events(d, "save_committed")[-1]["written_bytes"]
            out.append((fraction, changed, written))
        ckpt.close()
    return out


@dataclass
class RestoreTiming:
    spotsafe_load_s: float
    spotsafe_restore_s: float
    torch_load_s: float
    read_floor_s: float
    """The better of the two floors below, per repeat (the best repeat here)."""
    sequential_floor_s: float
    parallel_floor_s: float
    bytes: int
    fresh_restore_s: float = math.nan
    """``restore()`` into the model and a new optimizer (no state yet: a fresh process's)."""
    fresh_torch_s: float = math.nan
    ratios: dict[str, float] = field(default_factory=dict)
    """Per measure, the median of (measure / read floor) over paired repeats."""


def restore(state: State, root: Path, floor_file: Path, repeats: int = 5) -> RestoreTiming:
    """Cold-cache restore: spotsafe (read + verify + decode; and the whole ``restore()``) vs torch.load.

    Each repeat measures all of them and both read floors (one stream; four ranged reads in flight), each after
    dropping the files from the page cache. The floor of a repeat is the faster of the two: whatever way of reading
    this disk is fastest. Times are the best of ``repeats``, ratios the median of the paired ones.

    ``restore()`` runs twice: into the state as it is (the optimizer holds its moments, so they are read in
    place, as in a process that restores after training), and into a new optimizer with no state (a fresh
    process: the moments need new memory); ``torch.load`` + ``load_state_dict`` runs into both as well.
    """
    with scratch(root, "restore") as d:
        run = d / "run"
        ckpt = spotsafe.Checkpointer(
            str(run), model=state.model, optimizer=state.optimizer, handle_signals=False, incremental=False
        )
        ckpt.save()
        ckpt.close()
        path = d / "state.pt"
        torch.save(state.state_dict(), path)
        times: dict[str, list[float]] = {k: [] for k in ("load", "restore", "torch", "fresh", "fresh_torch")}
        seq_s, par_s = [], []
        nbytes = 0

        def timed(key: str, drop: Path, fn: Callable[[], object]) -> None:
            drop_cache(drop)
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)

        def restore_into(key: str, optimizer: torch.optim.Optimizer) -> None:
            again = spotsafe.Checkpointer(str(run), model=state.model, optimizer=optimizer, handle_signals=False)
            timed(key, run, again.restore)
            again.close()

        def torch_into(optimizer: torch.optim.Optimizer) -> None:
            loaded_pt = torch.load(path, weights_only=True)
            state.model.load_state_dict(loaded_pt["model"])
            optimizer.load_state_dict(loaded_pt["optimizer"])

        for _ in range(repeats):
            drop_cache(run)
            start = time.perf_counter()
            loaded = load_newest_valid(CheckpointRepository(LocalStorage(run)))
            times["load"].append(time.perf_counter() - start)
            assert loaded is not None
            nbytes = loaded.checkpoint.manifest.total_bytes
            del loaded
            restore_into("restore", state.optimizer)
            timed("torch", path, lambda: torch_into(state.optimizer))
            restore_into("fresh", torch.optim.AdamW(state.model.parameters(), lr=1e-3))
            timed("fresh_torch", path, functools.partial(torch_into, torch.optim.AdamW(state.model.parameters())))
            seq_s.append(disk_read_floor(floor_file))
            par_s.append(disk_read_floor_parallel(floor_file))
        floor_s = [min(a, b) for a, b in zip(seq_s, par_s, strict=True)]

        def paired(measured: list[float]) -> float:
            return sorted(t / f for t, f in zip(measured, floor_s, strict=True))[len(measured) // 2]

        def versus(a: list[float], b: list[float]) -> float:
            return sorted(x / y for x, y in zip(a, b, strict=True))[repeats // 2]

        ratios = {key: paired(values) for key, values in times.items()}
        ratios["restore/torch"] = versus(times["restore"], times["torch"])
        ratios["fresh/torch"] = versus(times["fresh"], times["fresh_torch"])
        return RestoreTiming(
            best(times["load"]),
            best(times["restore"]),
            best(times["torch"]),
            best(floor_s),
            best(seq_s),
            best(par_s),
            nbytes,
            fresh_restore_s=best(times["fresh"]),
            fresh_torch_s=best(times["fresh_torch"]),
            ratios=ratios,
        )


def first_save_after_restore(state: State, root: Path, *, busy: bool, lead_s: float = 1.0, repeats: int = 3) -> float:
    """Stall of a process's first save, ``lead_s`` seconds of training after ``restore()`` (best of ``repeats``).

    From the first ``step_done()`` after ``restore()``, a low-priority thread prepares the staging memory the
    loaded bytes could not become (the optimizer keeps those). Training is simulated: ``busy`` changes every
    parameter and moment again and again on every core (CPU training); otherwise the host mostly waits, as it
    does while a GPU computes. Every byte has changed by the save, as in the steady-state row.
    """
    stalls = []
    with scratch(root, "first-save") as d:
        run = d / "run"
        ckpt = checkpointer(state, run)
        ckpt.save()
        ckpt.close()
        for _ in range(repeats):
            again = checkpointer(state, run)
            again.restore()
            until = time.perf_counter() + lead_s
            while time.perf_counter() < until:  # steps: the first step_done() starts preparing staging memory
                if busy:
                    state.perturb(1.0)
                else:
                    time.sleep(0.01)
                again.step_done()
            state.perturb(1.0)
            start = time.perf_counter()
            again.save()
            stalls.append(time.perf_counter() - start)
            again.close()
    return best(stalls)


# -- training throughput --------------------------------------------------------------------------------


def training_throughput(
    root: Path,
    steps: int,
    save_every: int,
    dim: int,
    layers: int,
    rounds: int = 4,
    spread: dict[str, Any] | None = None,
) -> tuple[float, float, int]:
    """(steps/s without checkpoints, steps/s with a background save every ``save_every`` steps, staged bytes).

    The model is the example job's TinyLM, widened so its state is worth persisting. The two
    runs alternate in ``rounds`` windows of ``steps`` steps each and the best window of each
    counts, so a noisy neighbour on a shared machine does not decide the ratio.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_lm", Path(__file__).parent.parent / "examples" / "tiny_lm.py")
    assert spec is not None and spec.loader is not None
    tiny_lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_lm)
    data = tiny_lm.MarkovText(256)
    batch = torch.stack([data[i] for i in range(16)])
    loss_fn = nn.CrossEntropyLoss()

    def setup(ckpt_dir: Path | None) -> Callable[[], None]:
        torch.manual_seed(0)
        model = tiny_lm.TinyLM(dim=dim, layers=layers, heads=8, dropout=0.0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ckpt = None
        if ckpt_dir is not None:
            ckpt = spotsafe.Checkpointer(
                str(ckpt_dir),
                model=model,
                optimizer=optimizer,
                handle_signals=False,
                keep=1,
                policy=spotsafe.every(steps=save_every),
                staging_budget=None,
            )
            holder.append(ckpt)

        def step() -> None:
            logits = model(batch[:, :-1])
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ckpt is not None:
                ckpt.step_done()

        return step

    holder: list[spotsafe.Checkpointer] = []
    spread = {} if spread is None else spread
    with scratch(root, "throughput") as d:
        plain, saving = setup(None), setup(d)
        for _ in range(save_every):  # warm-up; includes the first save, which allocates the staging slots
            plain()
            saving()
        holder[0].wait()
        rates: dict[str, list[float]] = {"plain": [], "saving": []}
        for _ in range(rounds):
            for name, step in (("plain", plain), ("saving", saving)):
                holder[0].wait()  # untimed: no save of the other window runs into this one
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                rates[name].append(steps / (time.perf_counter() - start))
        spread.update(rates)
        nbytes = holder[0].staging_bytes
        holder[0].close()
    return max(rates["plain"]), max(rates["saving"]), nbytes
