"""LoaderPosition: a plain DataLoader made resumable in place keeps its order, and resumes it exactly.

Every case runs three ways against real DataLoaders (worker processes included): a plain DataLoader with no
spotsafe at all, the same loader with a LoaderPosition, and runs stopped after k batches whose state goes
through the checkpoint codec into a fresh loader, with the global RNG restored as a checkpoint restores it.
Each "training step" draws from the global RNG (as dropout does), so a loader that drew one number too many
or too few, or at another moment, changes everything after it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    WeightedRandomSampler,
)

from spotsafe import CheckpointMismatchError, ConfigError
from spotsafe.data import LoaderPosition
from spotsafe.errors import StateError
from spotsafe.state.codec import decode, encode
from spotsafe.state.rng import GlobalRNG


class Indexed(Dataset[torch.Tensor]):
    """Sample ``i`` is ``i``, and every read is counted."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return torch.tensor(i)


class Augmented(Indexed):
    """Adds noise drawn at fetch time from the (worker's) global torch RNG."""

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return float(i) + torch.rand(())


def fixed_chunks(n: int) -> Sampler[list[int]]:
    """A user's batch sampler of varying batch sizes (2, 1, 3, 2, 1, 3...) over a global-RNG permutation."""

    class Chunks(Sampler[list[int]]):
        def __iter__(self) -> Iterator[list[int]]:
            order, at, k = torch.randperm(n).tolist(), 0, 0
            while at < n:
                size = (2, 1, 3)[k % 3]
                yield order[at : at + size]
                at, k = at + size, k + 1

        def __len__(self) -> int:
            return sum(1 for _ in self._cuts())

        def _cuts(self) -> Iterator[int]:
            at, k = 0, 0
            while at < n:
                at, k = at + (2, 1, 3)[k % 3], k + 1
                yield at

    return Chunks()


LOADERS: dict[str, Callable[[], DataLoader[Any]]] = {
    "shuffle": lambda: DataLoader(Indexed(10), batch_size=3, shuffle=True),
    "shuffle-drop_last": lambda: DataLoader(Indexed(10), batch_size=3, shuffle=True, drop_last=True),
    "in-order": lambda: DataLoader(Indexed(10), batch_size=3, shuffle=False),
    "in-order-drop_last": lambda: DataLoader(Indexed(10), batch_size=4, drop_last=True),
    "unbatched": lambda: DataLoader(Indexed(7), batch_size=None, shuffle=True),
    "own-generator": lambda: DataLoader(
        Indexed(10), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(5)
    ),
    "sampler-generator": lambda: DataLoader(
        Indexed(10), batch_size=4, sampler=RandomSampler(range(10), generator=torch.Generator().manual_seed(8))
    ),
    "distributed": lambda: DataLoader(
        Indexed(11), batch_size=2, sampler=DistributedSampler(range(11), num_replicas=2, rank=1, seed=3)
    ),
    "distributed-drop_last": lambda: DataLoader(
        Indexed(11),
        batch_size=2,
        drop_last=True,
        sampler=DistributedSampler(range(11), num_replicas=2, rank=0, shuffle=False, drop_last=True),
    ),
    "weighted": lambda: DataLoader(
        Indexed(6), batch_size=4, sampler=WeightedRandomSampler([1.0, 2, 3, 1, 1, 5], num_samples=13)
    ),
    "user-batch-sampler": lambda: DataLoader(Indexed(10), batch_sampler=fixed_chunks(10)),
    "workers": lambda: DataLoader(Indexed(10), batch_size=3, shuffle=True, num_workers=2),
    "persistent-workers": lambda: DataLoader(
        Indexed(10), batch_size=3, shuffle=True, num_workers=2, persistent_workers=True
    ),
}
WORKER_CASES = ("workers", "persistent-workers")


@dataclass
class Snapshot:
    """What a checkpoint holds at a step boundary: the loader's state (through the codec) and the global RNG."""

    loader: dict[str, Any]
    rng: dict[str, Any]
    seen: list[Any]


def through_codec(state: Any) -> Any:
    """``state`` as it comes back from a checkpoint: tensors copied, the rest through JSON."""
    tensors: list[torch.Tensor] = []
    doc = json.loads(json.dumps(encode(state, tensors)))
    return decode(doc, lambda i: tensors[i].clone())


def as_list(batch: Any) -> Any:
    return batch.tolist() if isinstance(batch, torch.Tensor) else [as_list(b) for b in batch]


def train(
    make: Callable[[], DataLoader[Any]],
    total: int,
    *,
    spotsafe: bool = True,
    stop: int | None = None,
    resume: Snapshot | None = None,
) -> tuple[list[Any], Snapshot | None]:
    """A user's loop over ``make()``: per batch, record it and draw from the global RNG (dropout). With ``stop``,
    return a snapshot after that many batches; with ``resume``, continue from one in a fresh loader."""
    torch.manual_seed(1234)
    loader = make()
    position = LoaderPosition(loader) if spotsafe else None
    seen: list[Any] = []
    if resume is not None:
        assert position is not None
        position.load_state_dict(resume.loader)
        GlobalRNG().load_state_dict(resume.rng)
        seen = list(resume.seen)
    epoch = position.epoch if position is not None else 0
    while True:
        set_epoch = getattr(loader.sampler, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        for batch in loader:
            seen.append((as_list(batch), torch.rand(2).tolist()))
            if len(seen) == stop:
                assert position is not None
                state = through_codec(position.state_dict())
                return seen, Snapshot(state, through_codec(GlobalRNG().state_dict()), list(seen))
            if len(seen) == total:
                return seen, None
        epoch += 1


def epoch_length(make: Callable[[], DataLoader[Any]]) -> int:
    return len(make())


@pytest.mark.parametrize("case", list(LOADERS))
def test_a_positioned_loader_serves_what_the_plain_loader_serves(case: str) -> None:
    make = LOADERS[case]
    total = 3 * epoch_length(make) + 1
    plain, _ = train(make, total, spotsafe=False)
    positioned, _ = train(make, total)
    assert positioned == plain
    # Sanity: the order changes between epochs where the loader shuffles (the comparison above means something).
    length = epoch_length(make)
    if case not in ("in-order", "in-order-drop_last", "distributed-drop_last"):
        assert [b for b, _ in plain[:length]] != [b for b, _ in plain[length : 2 * length]]


def cut_points(length: int) -> list[int]:
    return sorted({1, length - 1, length, length + 1, 2 * length + 1})


@pytest.mark.parametrize("case", [c for c in LOADERS if c not in WORKER_CASES])
def test_resuming_anywhere_gives_the_uninterrupted_run(case: str) -> None:
    make = LOADERS[case]
    length = epoch_length(make)
    total = 3 * length + 2
    expected, _ = train(make, total, spotsafe=False)
    for k in cut_points(length):
        _, snapshot = train(make, total, stop=k)
        assert snapshot is not None
        epoch, position = divmod(k, length)
        assert (snapshot.loader["epoch"], snapshot.loader["position"]) == (epoch, position)
        resumed, _ = train(make, total, resume=snapshot)
        assert resumed == expected, f"{case}: resumed after {k} batches differs"


@pytest.mark.parametrize("case", WORKER_CASES)
@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_resuming_with_worker_processes_gives_the_uninterrupted_run(case: str, where: str) -> None:
    make = LOADERS[case]
    length = epoch_length(make)
    total = 2 * length + 2
    k = length + 1 if where == "mid-epoch" else length
    expected, _ = train(make, total, spotsafe=False)
    _, snapshot = train(make, total, stop=k)
    assert snapshot is not None
    resumed, _ = train(make, total, resume=snapshot)
    assert resumed == expected


def test_workers_get_the_same_seeds_after_an_epoch_boundary_resume() -> None:
    """Randomness drawn in worker processes (augmentation) comes out the same when a run resumes at an epoch
    boundary: the workers' base seed is drawn from the restored global RNG, as it was. (Mid-epoch, the workers'
    streams have advanced by the samples they fetched, which no loader can replay: see the README.)"""

    def make() -> DataLoader[Any]:
        return DataLoader(Augmented(8), batch_size=2, shuffle=True, num_workers=2)

    total = 3 * 4
    expected, _ = train(make, total, spotsafe=False)
    noise = [x - int(x) for batch, _ in expected for x in batch]
    assert len(set(noise)) == len(noise)  # the workers really draw random numbers
    _, snapshot = train(make, total, stop=4)
    assert snapshot is not None
    resumed, _ = train(make, total, resume=snapshot)
    assert resumed == expected


def test_a_save_between_iter_and_the_first_batch_resumes_that_epoch() -> None:
    """Single-process: iter(loader) draws the workers' base seed, the first next() the sampler's order."""
    expected, _ = train(LOADERS["shuffle"], 8, spotsafe=False)
    torch.manual_seed(1234)
    loader = LOADERS["shuffle"]()
    position = LoaderPosition(loader)
    seen = [(as_list(b), torch.rand(2).tolist()) for b in loader]
    iterator = iter(loader)
    state = through_codec(position.state_dict())
    assert (state["epoch"], state["position"], state["started"], state["order"]) == (1, 0, True, None)
    rng = GlobalRNG().state_dict()
    torch.manual_seed(99)
    fresh = LOADERS["shuffle"]()
    LoaderPosition(fresh).load_state_dict(state)
    GlobalRNG().load_state_dict(rng)
    seen += [(as_list(b), torch.rand(2).tolist()) for b in fresh]
    assert seen == expected
    del iterator


def test_resume_reads_no_sample_of_the_consumed_batches_and_does_not_ask_the_sampler() -> None:
    class CountingSampler(RandomSampler):
        iterations = 0

        def __iter__(self) -> Iterator[int]:
            CountingSampler.iterations += 1
            return super().__iter__()

    dataset = Indexed(1000)
    loader = DataLoader(dataset, batch_size=10, sampler=CountingSampler(dataset))
    position = LoaderPosition(loader)
    it = iter(loader)
    for _ in range(97):
        next(it)
    state = through_codec(position.state_dict())
    rest = [as_list(b) for b in it]
    fresh_data = Indexed(1000)
    fresh = DataLoader(fresh_data, batch_size=10, sampler=CountingSampler(fresh_data))
    LoaderPosition(fresh).load_state_dict(state)
    before = CountingSampler.iterations
    first = next(iter(fresh))
    assert fresh_data.reads == 10  # the first remaining batch, nothing else
    assert CountingSampler.iterations == before  # the saved order is served; the sampler is not asked
    assert as_list(first) == rest[0]


def test_the_loader_looks_the_same_from_outside() -> None:
    sampler = RandomSampler(range(10))
    loader = DataLoader(Indexed(10), batch_size=3, sampler=sampler)
    batch_sampler, kind = loader.batch_sampler, type(loader)
    position = LoaderPosition(loader)
    assert isinstance(loader, kind) and loader.sampler is sampler and loader.batch_sampler is batch_sampler
    assert len(loader) == 4 and LoaderPosition.of(loader) is position
    with pytest.raises(ValueError, match="should not be set"):  # DataLoader's own guard still works
        loader.batch_size = 5
    position.detach()
    assert type(loader) is kind and LoaderPosition.of(loader) is None


def test_counting_yields_and_the_epoch_index() -> None:
    loader = DataLoader(Indexed(5), batch_size=2)
    position = LoaderPosition(loader)
    assert (position.epoch, position.position) == (0, 0)
    it = iter(loader)
    next(it)
    assert (position.epoch, position.position) == (0, 1)
    list(it)
    assert (position.epoch, position.position) == (0, 3)
    assert (position.state_dict()["epoch"], position.state_dict()["position"]) == (1, 0)
    next(iter(loader))
    assert (position.epoch, position.position) == (1, 1)
    with pytest.raises(ConfigError, match="count='manual'"):
        position.consumed()


def test_manual_count_saves_what_the_caller_consumed_not_what_was_fetched() -> None:
    def make() -> DataLoader[Any]:
        return DataLoader(Indexed(12), batch_size=2, shuffle=True, num_workers=2)

    torch.manual_seed(0)
    loader = make()
    position = LoaderPosition(loader, count="manual")
    it = iter(loader)
    fetched = [as_list(next(it)) for _ in range(4)]  # a framework fetches ahead...
    position.consumed(2)  # ... and trains on two
    assert position.position == 2
    with pytest.raises(StateError, match="consumed"):
        position.consumed(5)
    state = through_codec(position.state_dict())
    rest = fetched[2:] + [as_list(b) for b in it]
    torch.manual_seed(0)
    fresh = make()
    resumed = LoaderPosition(fresh, count="manual")
    resumed.load_state_dict(state)
    assert [as_list(b) for b in fresh] == rest
    assert resumed.position == 2  # manual: nothing counted by itself


def test_a_new_loader_object_keeps_the_position_and_a_state_may_come_first() -> None:
    torch.manual_seed(0)
    expected, _ = train(LOADERS["shuffle"], 8, spotsafe=False)
    _, snapshot = train(LOADERS["shuffle"], 8, stop=5)
    assert snapshot is not None
    position = LoaderPosition()  # restored before the framework builds its loader
    position.load_state_dict(snapshot.loader)
    GlobalRNG().load_state_dict(snapshot.rng)
    first = LOADERS["shuffle"]()
    position.attach(first)
    position.attach(first)  # the same one again: nothing happens
    second = LOADERS["shuffle"]()  # the framework re-created it
    position.attach(second)
    assert type(first) is DataLoader and LoaderPosition.of(second) is position
    seen = list(snapshot.seen)
    while len(seen) < 8:
        for batch in second:
            seen.append((as_list(batch), torch.rand(2).tolist()))
            if len(seen) == 8:
                break
    assert seen == expected
    with pytest.raises(ConfigError, match="already has a LoaderPosition"):
        LoaderPosition(second)


def test_states_that_do_not_fit_raise_mismatch() -> None:
    _, snapshot = train(LOADERS["shuffle"], 8, stop=2)
    assert snapshot is not None
    state = snapshot.loader
    with pytest.raises(CheckpointMismatchError, match="batches"):
        LoaderPosition(DataLoader(Indexed(10), batch_size=4, shuffle=True)).load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match="dataset has 8 samples"):
        LoaderPosition(DataLoader(Indexed(8), batch_size=2, shuffle=True)).load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match="generators"):
        own = DataLoader(Indexed(10), batch_size=3, shuffle=True, generator=torch.Generator())
        LoaderPosition(own).load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match=r"batch_size=None"):
        LoaderPosition(DataLoader(Indexed(10), batch_size=None, shuffle=True)).load_state_dict(state)
    pending = LoaderPosition()
    pending.load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match="batches"):
        pending.attach(DataLoader(Indexed(10), batch_size=5))
    good = DataLoader(Indexed(10), batch_size=3, shuffle=True)
    broken: list[tuple[str, Any]] = [
        ("format", 99),
        ("position", -1),
        ("position", 5),
        ("epoch", "0"),
        ("started", False),
        ("order", {"indices": torch.tensor([1.0]), "runs": None}),
        ("order", {"indices": state["order"]["indices"], "runs": torch.tensor([[3, 1]])}),
        ("order", {"indices": -state["order"]["indices"] - 1, "runs": state["order"]["runs"]}),
        ("seed_state", "abc"),
        ("generators", [1]),
    ]
    for key, value in broken:
        with pytest.raises(CheckpointMismatchError):
            LoaderPosition(DataLoader(Indexed(10), batch_size=3, shuffle=True)).load_state_dict({**state, key: value})
    LoaderPosition(good).load_state_dict(state)  # the untouched state loads


class Stream(IterableDataset[int]):
    def __iter__(self) -> Iterator[int]:
        return iter(range(4))


class Endless(Sampler[int]):
    def __iter__(self) -> Iterator[int]:
        while True:
            yield 0


class Keys(Sampler[str]):
    def __iter__(self) -> Iterator[str]:
        return iter(["a", "b"])

    def __len__(self) -> int:
        return 2


def test_loaders_it_cannot_record_are_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match="IterableDataset"):
        LoaderPosition(DataLoader(Stream(), batch_size=2))
    with pytest.raises(ConfigError, match="len"):
        LoaderPosition(DataLoader(Indexed(3), sampler=Endless()))
    with pytest.raises(ConfigError, match="DataLoader"):
        LoaderPosition([1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="in_order=False"):
        LoaderPosition(DataLoader(Indexed(4), batch_size=2, num_workers=2, in_order=False))
    with pytest.raises(ConfigError, match="count"):
        LoaderPosition(count="fetch")
    keyed = DataLoader({"a": 1, "b": 2}, sampler=Keys(), batch_size=2)  # type: ignore[arg-type]
    LoaderPosition(keyed)
    with pytest.raises(StateError, match="integer dataset indices"):
        next(iter(keyed))


def test_batches_that_are_not_lists_of_ints_are_served_unchanged_in_their_epoch() -> None:
    class TupleBatches(Sampler[tuple[int, ...]]):
        def __iter__(self) -> Iterator[tuple[int, ...]]:
            return iter([(0, 1), (2, 3)])

        def __len__(self) -> int:
            return 2

    got: list[Any] = []

    class Recording(Indexed):
        def __getitems__(self, keys: Any) -> list[torch.Tensor]:
            got.append(keys)
            return [torch.tensor(k) for k in keys]

    loader = DataLoader(Recording(4), batch_sampler=TupleBatches())
    LoaderPosition(loader)
    assert [as_list(b) for b in loader] == [[0, 1], [2, 3]]
    assert got == [(0, 1), (2, 3)]


def test_batch_sampler_that_wraps_a_shuffling_sampler() -> None:
    """A BatchSampler the user built over a generator-driven sampler: the generator is saved with the position."""

    def make() -> DataLoader[Any]:
        inner = RandomSampler(range(9), generator=torch.Generator().manual_seed(2))
        return DataLoader(Indexed(9), batch_sampler=BatchSampler(inner, 2, drop_last=False))

    expected, _ = train(make, 14, spotsafe=False)
    for k in (3, 5, 6):
        _, snapshot = train(make, 14, stop=k)
        assert snapshot is not None and "batch_sampler.sampler" in snapshot.loader["generators"]
        assert train(make, 14, resume=snapshot)[0] == expected


# -- with the Checkpointer: loader= takes a plain DataLoader ---------------------------------------------------------

JOB = r'''
"""A plain loop with dropout and a shuffled DataLoader with 2 worker processes; spotsafe optional."""
import argparse, pathlib, time
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--run-dir")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--hold-at", type=int)   # after this step's optimizer step: say so, wait for a stop notice
parser.add_argument("--hang-at", type=int)   # after this step: say so (last checkpoint committed), hang
args = parser.parse_args()

class Data(Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(7)
        self.x, self.y = torch.randn(22, 6, generator=g), torch.randn(22, 2, generator=g)
    def __len__(self):
        return 22
    def __getitem__(self, i):
        return self.x[i], self.y[i]

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
loader = DataLoader(Data(), batch_size=4, shuffle=True, num_workers=2)
ckpt = None
if args.run_dir:
    import spotsafe
    ckpt = spotsafe.Checkpointer(args.run_dir, model=model, optimizer=opt, loader=loader,
                                 policy=spotsafe.every(steps=3), progress_interval=0)
    ckpt.restore()
step = ckpt.step if ckpt else 0
marker = pathlib.Path(args.out + ".marker")
while step < args.steps:
    for x, y in loader:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if ckpt is not None:
            if step == args.hold_at:
                marker.write_text(str(step))
                while not ckpt.stop_requested:
                    time.sleep(0.01)
            ckpt.step_done()  # on the notice: saves this step and exits 75
            if step == args.hang_at:
                ckpt.wait()
                marker.write_text(str(step))
                while True:
                    time.sleep(1)
        if step >= args.steps:
            break
if ckpt is not None:
    ckpt.finish()
pathlib.Path(args.out).write_bytes(b"".join(p.detach().numpy().tobytes() for p in model.parameters()))
'''


def test_checkpointer_resumes_a_plain_dataloader_in_process(tmp_path: Any) -> None:
    from torch import nn

    import spotsafe

    def job(run_dir: Any) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[Any], spotsafe.Checkpointer | None]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(1, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        loader = DataLoader(Indexed(10), batch_size=3, shuffle=True)
        ckpt = None
        if run_dir is not None:
            ckpt = spotsafe.Checkpointer(
                run_dir,
                model=model,
                optimizer=opt,
                loader=loader,
                handle_signals=False,
                policy=spotsafe.every(steps=10**6),
                progress_interval=0,
            )
        return model, opt, loader, ckpt

    def steps(model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader[Any], ckpt: Any, until: int) -> int:
        done = ckpt.step if ckpt is not None else 0
        while done < until:
            for batch in loader:
                loss = (model(batch.float().unsqueeze(1) / 10) - 1).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if ckpt is not None:
                    ckpt.step_done()
                if done >= until:
                    break
        return done

    def weights(model: nn.Module) -> bytes:
        return b"".join(p.detach().numpy().tobytes() for p in model.parameters())

    plain = job(None)
    steps(*plain, until=11)
    first = job(tmp_path / "run")
    assert first[3] is not None and first[3].loader is first[2]  # the DataLoader as given
    steps(*first, until=6)  # mid-epoch 1 (4 batches an epoch)
    assert first[3].epoch == 1
    first[3].save()
    first[3].close()
    second = job(tmp_path / "run")
    assert second[3] is not None and second[3].restore() == 6 and second[3].epoch == 1
    steps(*second, until=11)
    second[3].close()
    assert torch.isfinite(torch.cat([p.detach().flatten() for p in plain[0].parameters()])).all()
    assert weights(second[0]) == weights(plain[0])


def test_checkpointer_refuses_a_dataloader_it_cannot_record(tmp_path: Any) -> None:
    import spotsafe

    with pytest.raises(ConfigError, match="IterableDataset"):
        spotsafe.Checkpointer(tmp_path / "run", loader=DataLoader(Stream(), batch_size=2), handle_signals=False)
    from accelerate.data_loader import DataLoaderShard

    with pytest.raises(ConfigError, match="count='manual'"):  # it fetches ahead: yields cannot be counted
        spotsafe.Checkpointer(tmp_path / "run", loader=DataLoaderShard(Indexed(4), batch_size=2), handle_signals=False)
    assert not (tmp_path / "run").exists()
    shard = DataLoaderShard(Indexed(4), batch_size=2)
    position = LoaderPosition(shard, count="manual")
    with spotsafe.Checkpointer(tmp_path / "run", loader=position, handle_signals=False) as ckpt:
        assert ckpt.epoch == 0


def _run_job(script: Any, out: Any, *args: str, expect: int, signal_at_marker: int | None = None) -> None:
    import os
    import subprocess
    import sys

    from .conftest import PROCESS_HANG_S, wait_until

    out.unlink(missing_ok=True)
    marker = out.with_name(out.name + ".marker")
    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, str(script), str(out), *args], stderr=subprocess.PIPE)
    try:
        if signal_at_marker is not None:
            wait_until(
                lambda: marker.exists() or proc.poll() is not None, "the job to reach its step", timeout=PROCESS_HANG_S
            )
            os.kill(proc.pid, signal_at_marker)
        _, err = proc.communicate(timeout=PROCESS_HANG_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == expect, err.decode(errors="replace")[-3000:]


def test_interrupted_runs_end_bit_identical_to_an_uninterrupted_one_and_to_no_spotsafe(tmp_path: Any) -> None:
    """Real processes, real signals: SIGTERM mid-epoch (emergency save, exit 75), then SIGKILL two steps after a
    checkpoint taken at an epoch boundary (those steps are replayed). 6 batches an epoch, 20 steps."""
    import signal

    script = tmp_path / "job.py"
    script.write_text(JOB)
    results = {}
    _run_job(script, tmp_path / "plain", expect=0)
    results["no spotsafe"] = (tmp_path / "plain").read_bytes()
    _run_job(script, tmp_path / "whole", "--run-dir", str(tmp_path / "whole-run"), expect=0)
    results["uninterrupted"] = (tmp_path / "whole").read_bytes()
    run = ("--run-dir", str(tmp_path / "run"))
    out = tmp_path / "resumed"
    _run_job(script, out, *run, "--hold-at", "8", expect=75, signal_at_marker=signal.SIGTERM)
    _run_job(script, out, *run, "--hang-at", "14", expect=-signal.SIGKILL, signal_at_marker=signal.SIGKILL)
    _run_job(script, out, *run, expect=0)
    results["interrupted"] = out.read_bytes()
    assert len(results["no spotsafe"]) == 4 * (6 * 16 + 16 + 16 * 2 + 2)
    assert results["uninterrupted"] == results["no spotsafe"]
    assert results["interrupted"] == results["no spotsafe"]


def test_a_state_from_another_kind_of_loader_says_so() -> None:
    from spotsafe import ResumableLoader

    state = ResumableLoader(Indexed(10), batch_size=3).state_dict()
    with pytest.raises(CheckpointMismatchError, match="not saved by a LoaderPosition"):
        LoaderPosition(DataLoader(Indexed(10), batch_size=3)).load_state_dict(state)


def test_copies_and_pickles_of_a_positioned_loader_are_plain_loaders() -> None:
    import copy
    import pickle

    loader = DataLoader(Indexed(10), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(1))
    position = LoaderPosition(loader)
    for twin in (copy.deepcopy(loader), pickle.loads(pickle.dumps(loader))):
        assert type(twin) is DataLoader and LoaderPosition.of(twin) is None
        again = copy.deepcopy(twin)  # the same generator state: the same order
        assert [as_list(b) for b in twin] == [as_list(b) for b in again]
    assert LoaderPosition.of(loader) is position and position.position == 0


def test_accelerates_dataloader_shard_is_recorded_through_the_loader_it_wraps() -> None:
    """What accelerate's prepare() (and so HF Trainer) iterates: a wrapper whose __class__ claims DataLoader. It
    fetches one batch ahead, so a framework counts what it consumed (count="manual")."""
    from accelerate.data_loader import DataLoaderShard

    def make() -> Any:
        return DataLoaderShard(Indexed(10), batch_size=3, shuffle=True)

    def run(total: int, stop: int | None = None, resume: Snapshot | None = None) -> tuple[list[Any], Any]:
        torch.manual_seed(1234)
        shard = make()
        position = LoaderPosition(shard, count="manual")
        seen: list[Any] = []
        if resume is not None:
            position.load_state_dict(resume.loader)
            GlobalRNG().load_state_dict(resume.rng)
            seen = list(resume.seen)
        while True:
            for batch in shard:
                position.consumed()
                seen.append((as_list(batch), torch.rand(2).tolist()))
                if len(seen) == stop:
                    state = through_codec(position.state_dict())
                    return seen, Snapshot(state, through_codec(GlobalRNG().state_dict()), list(seen))
                if len(seen) == total:
                    return seen, None

    torch.manual_seed(1234)
    plain = make()
    expected: list[Any] = []
    while len(expected) < 10:
        expected += [(as_list(b), torch.rand(2).tolist()) for b in plain]
    expected = expected[:10]
    assert run(10)[0] == expected
    for k in (2, 4, 5):
        _, snapshot = run(10, stop=k)
        assert run(10, resume=snapshot)[0] == expected
