"""ResumableLoader: stopping anywhere and resuming gives exactly the batches an uninterrupted run gets."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

import spotsafe
from spotsafe import CheckpointMismatchError, ConfigError, ResumableLoader
from spotsafe.state.codec import decode, encode


class Indexed(Dataset[torch.Tensor]):
    """Sample ``i`` is ``i``: batches show exactly which samples were served."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor(i)


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A random augmentation drawn from the (worker's) global torch RNG at fetch time."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(i), float(i) + torch.rand(3)


class Stream(IterableDataset[int]):
    def __iter__(self) -> Any:
        return iter(range(5))

    def __len__(self) -> int:
        return 5


def take(loader: ResumableLoader, n: int) -> list[Any]:
    """Consume ``n`` batches, crossing epochs as a training loop does (``for batch in loader`` per epoch)."""
    out: list[Any] = []
    while len(out) < n:
        it = iter(loader)
        for batch in it:
            out.append(batch)
            if len(out) == n:
                break
        it.close()
    return out


def same_batches(a: list[Any], b: list[Any]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        xs, ys = (x, y) if isinstance(x, (list, tuple)) else ([x], [y])
        if len(xs) != len(ys) or not all(torch.equal(p, q) for p, q in zip(xs, ys, strict=True)):
            return False
    return True


def through_checkpoint(state: Any) -> Any:
    """``state`` as it comes back from a checkpoint: tensors as raw copies, the rest through JSON."""
    tensors: list[torch.Tensor] = []
    doc = json.loads(json.dumps(encode(state, tensors)))
    return decode(doc, lambda i: tensors[i].clone())


def resumed(make: Callable[[], ResumableLoader], k: int, total: int) -> tuple[list[Any], dict[str, Any]]:
    first = make()
    head = take(first, k)
    state = through_checkpoint(first.state_dict())
    del first
    second = make()
    second.load_state_dict(state)
    return head + take(second, total - k), state


K_CASES = ["1", "L-1", "L", "L+1", "2L", "2L+2"]


def _k(case: str, length: int) -> int:
    return {"1": 1, "L-1": length - 1, "L": length, "L+1": length + 1, "2L": 2 * length, "2L+2": 2 * length + 2}[case]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("case", K_CASES)
def test_resume_anywhere_gives_the_uninterrupted_sequence(drop_last: bool, case: str) -> None:
    def make() -> ResumableLoader:
        return ResumableLoader(Indexed(10), batch_size=3, shuffle=True, seed=123, drop_last=drop_last)

    length = len(make())
    assert length == (3 if drop_last else 4)
    total = 3 * length
    expected = take(make(), total)
    # Sanity: the uninterrupted run really is three shuffled epochs with the expected batch sizes.
    sizes = [len(b) for b in expected]
    assert sizes == ([3, 3, 3] if drop_last else [3, 3, 3, 1]) * 3
    k = _k(case, length)
    got, state = resumed(make, k, total)
    assert same_batches(got, expected), f"resumed after {k} batches differs"
    assert (state["epoch"], state["position"]) == divmod(k, length)


def test_epoch_boundary_state_points_at_the_next_epoch() -> None:
    def make() -> ResumableLoader:
        return ResumableLoader(Indexed(10), batch_size=5, seed=1)

    loader = make()
    assert [len(b) for b in take(loader, 2)] == [5, 5]
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0)
    resumed_loader = make()
    resumed_loader.load_state_dict(state)
    assert same_batches(list(resumed_loader), take(make(), 4)[2:])


def test_breaking_mid_epoch_then_iterating_again_continues_where_it_stopped() -> None:
    def make() -> ResumableLoader:
        return ResumableLoader(Indexed(11), batch_size=2, seed=5)

    expected = take(make(), 12)
    loader = make()
    got: list[Any] = []
    for stop_after in (2, 3, 1, 6):  # the training loop breaks out of `for batch in loader` repeatedly
        got += take(loader, stop_after)
    assert same_batches(got, expected)


@pytest.mark.parametrize("case", ["L-1", "L+1"])
def test_resume_with_worker_augmentation_is_bit_identical(case: str) -> None:
    def make() -> ResumableLoader:
        return ResumableLoader(Augmented(10), batch_size=3, shuffle=True, seed=9, num_workers=2)

    length = len(make())
    total = 2 * length + 1
    expected = take(make(), total)
    noise = torch.cat([b[1] for b in expected]) - torch.cat([b[0] for b in expected]).unsqueeze(1)
    assert not torch.equal(noise, noise.round())  # the augmentation really draws random numbers
    # The same sample gets different noise in different epochs (the epoch is part of its seed).
    first_epoch = {int(i): row for b in expected[:length] for i, row in zip(b[0], b[1], strict=True)}
    second_epoch = {int(i): row for b in expected[length : 2 * length] for i, row in zip(b[0], b[1], strict=True)}
    assert any(not torch.equal(first_epoch[i], second_epoch[i]) for i in first_epoch)
    got, _ = resumed(make, _k(case, length), total)
    assert same_batches(got, expected)


def test_worker_augmentation_does_not_depend_on_the_worker_count() -> None:
    def make(workers: int) -> ResumableLoader:
        return ResumableLoader(Augmented(8), batch_size=2, seed=4, num_workers=workers)

    assert same_batches(take(make(1), 4), take(make(2), 4))


@pytest.mark.parametrize("workers", [0, 2])
def test_iterating_does_not_consume_global_rng(workers: int) -> None:
    loader = ResumableLoader(Indexed(17), batch_size=4, shuffle=True, seed=3, num_workers=workers)
    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    torch_before = torch.get_rng_state()
    python_before = random.getstate()
    numpy_before = np.random.get_state(legacy=False)
    batches = take(loader, len(loader))
    assert sum(len(b) for b in batches) == 17
    assert torch.equal(torch.get_rng_state(), torch_before)
    assert random.getstate() == python_before
    numpy_after = np.random.get_state(legacy=False)
    assert np.array_equal(numpy_after["state"]["key"], numpy_before["state"]["key"])
    assert numpy_after["state"]["pos"] == numpy_before["state"]["pos"]


def test_order_does_not_depend_on_global_seed() -> None:
    torch.manual_seed(0)
    a = take(ResumableLoader(Indexed(20), batch_size=4, seed=8), 5)
    torch.manual_seed(99)
    b = take(ResumableLoader(Indexed(20), batch_size=4, seed=8), 5)
    assert same_batches(a, b)


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 2},
        {"batch_size": 4},
        {"dataset": Indexed(11)},
        {"shuffle": False},
        {"drop_last": True},
    ],
    ids=lambda c: next(iter(c)),
)
def test_loading_state_from_different_settings_raises_mismatch(change: dict[str, Any]) -> None:
    settings: dict[str, Any] = {"dataset": Indexed(10), "batch_size": 3, "seed": 1, "shuffle": True, "drop_last": False}
    source = ResumableLoader(**settings)
    take(source, 2)
    state = source.state_dict()
    settings.update(change)
    target = ResumableLoader(**settings)
    with pytest.raises(CheckpointMismatchError):
        target.load_state_dict(state)
    assert (target.epoch, target.position) == (0, 0)


@pytest.mark.parametrize(
    "position_change", [{"position": 4}, {"position": -1}, {"position": "1"}, {"epoch": None}, {"epoch": "0"}]
)
def test_loading_an_invalid_position_raises_mismatch(position_change: dict[str, Any]) -> None:
    loader = ResumableLoader(Indexed(10), batch_size=3, seed=1)
    state = loader.state_dict()
    state.update(position_change)
    with pytest.raises(CheckpointMismatchError):
        ResumableLoader(Indexed(10), batch_size=3, seed=1).load_state_dict(state)


def test_missing_keys_raise_mismatch() -> None:
    with pytest.raises(CheckpointMismatchError):
        ResumableLoader(Indexed(10), batch_size=3).load_state_dict({})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dataset": Stream()},
        {"dataset": [1, 2, 3], "batch_size": 0},
        {"batch_size": 0},
        {"batch_size": -2},
        {"batch_size": 2.0},
        {"sampler": SequentialSampler(range(10)), "shuffle": True},
        {"sampler": SequentialSampler(range(10)), "shuffle": False},
        {"sampler": 5},
        {"sampler": iter(range(10))},
        {"batch_sampler": [[0, 1]]},
        {"generator": torch.Generator()},
        {"dataset": Indexed(3), "batch_size": 4, "drop_last": True},
    ],
    ids=lambda k: ",".join(k),
)
def test_bad_configuration_raises_config_error(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"dataset": Indexed(10), "batch_size": 2}
    args.update(kwargs)
    with pytest.raises(ConfigError):
        ResumableLoader(**args)


def test_config_error_is_exported_and_a_value_error() -> None:
    assert spotsafe.ConfigError is ConfigError
    with pytest.raises(ValueError):
        ResumableLoader(Indexed(4), batch_size=0)


def test_each_epoch_is_a_different_permutation() -> None:
    n = 23
    loader = ResumableLoader(Indexed(n), batch_size=5, shuffle=True, seed=7)
    epochs = []
    for _ in range(3):
        epochs.append(torch.cat(list(loader)).tolist())
    for order in epochs:
        assert sorted(order) == list(range(n))
        assert order != list(range(n))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]
    other_seed = torch.cat(list(ResumableLoader(Indexed(n), batch_size=5, seed=8))).tolist()
    assert other_seed != epochs[0]
    same_seed = torch.cat(list(ResumableLoader(Indexed(n), batch_size=5, seed=7))).tolist()
    assert same_seed == epochs[0]


def test_without_shuffle_every_epoch_is_in_order() -> None:
    loader = ResumableLoader(Indexed(7), batch_size=3, shuffle=False)
    for _ in range(2):
        assert torch.cat(list(loader)).tolist() == list(range(7))
    assert loader.state_dict()["epoch"] == 2


def test_drop_last_skips_the_partial_batch_and_serves_distinct_samples() -> None:
    loader = ResumableLoader(Indexed(10), batch_size=3, shuffle=True, seed=2, drop_last=True)
    batches = list(loader)
    assert [len(b) for b in batches] == [3, 3, 3]
    served = torch.cat(batches).tolist()
    assert len(set(served)) == 9


# -- a user's sampler ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_distributed_sampler_gives_each_rank_what_a_plain_dataloader_gives_it(drop_last: bool) -> None:
    served: list[int] = []
    for rank in (0, 1):
        ours = ResumableLoader(
            Indexed(11), batch_size=2, drop_last=drop_last, sampler=DistributedSampler(range(11), 2, rank, seed=3)
        )
        sampler = DistributedSampler(range(11), 2, rank, seed=3)
        plain = DataLoader(Indexed(11), batch_size=2, drop_last=drop_last, sampler=sampler)
        for epoch in range(3):
            sampler.set_epoch(epoch)  # what users write; ResumableLoader does it itself
            expected = list(plain)
            assert same_batches(list(ours), expected), f"rank {rank} epoch {epoch}"
            if epoch == 0:
                served += torch.cat(expected).tolist()
        assert ours.epoch == 3
    if not drop_last:
        assert set(served) == set(range(11))  # the two ranks cover the dataset


def resumed_with_rng(make: Callable[[], ResumableLoader], k: int, total: int) -> list[Any]:
    """Like resumed(), with the global RNG saved and restored as a checkpoint does (for samplers that draw from it)."""
    first = make()
    head = take(first, k)
    state = through_checkpoint(first.state_dict())
    rng = torch.get_rng_state()
    del first
    torch.manual_seed(99)
    second = make()
    second.load_state_dict(state)
    torch.set_rng_state(rng)
    return head + take(second, total - k)


@pytest.mark.parametrize("generator", [True, False], ids=["sampler-generator", "global-rng"])
@pytest.mark.parametrize("case", K_CASES)
def test_resume_anywhere_with_a_users_sampler(generator: bool, case: str) -> None:
    def make() -> ResumableLoader:
        g = torch.Generator().manual_seed(4) if generator else None
        return ResumableLoader(Indexed(10), batch_size=3, sampler=RandomSampler(range(10), generator=g))

    length = len(make())
    total = 3 * length
    torch.manual_seed(0)
    expected = take(make(), total)
    assert torch.cat(expected[:length]).tolist() != torch.cat(expected[length : 2 * length]).tolist()
    torch.manual_seed(0)
    assert same_batches(resumed_with_rng(make, _k(case, length), total), expected)


def test_a_users_sampler_with_workers_resumes_bit_identically() -> None:
    def make() -> ResumableLoader:
        sampler = DistributedSampler(range(10), num_replicas=1, rank=0, seed=5)
        return ResumableLoader(Augmented(10), batch_size=3, seed=9, num_workers=2, sampler=sampler)

    total = 2 * len(make()) + 1
    expected = take(make(), total)
    got, state = resumed(make, 5, total)
    assert same_batches(got, expected)
    assert sorted(state["order"].tolist()) == list(range(10))  # the epoch's order is saved


def test_a_users_sampler_state_must_match() -> None:
    source = ResumableLoader(Indexed(10), batch_size=3, sampler=RandomSampler(range(10)))
    take(source, 2)
    state = source.state_dict()
    assert state["sampler"] == "RandomSampler" and state["order"] is not None
    with pytest.raises(CheckpointMismatchError, match="sampler"):
        ResumableLoader(Indexed(10), batch_size=3, sampler=SequentialSampler(range(10))).load_state_dict(state)
    with pytest.raises(CheckpointMismatchError, match="sampler=None"):
        ResumableLoader(Indexed(10), batch_size=3).load_state_dict(state)
    short = ResumableLoader(Indexed(10), batch_size=3, sampler=RandomSampler(range(10), num_samples=9))
    with pytest.raises(CheckpointMismatchError, match="9 per epoch"):
        short.load_state_dict(state)
    with pytest.raises(CheckpointMismatchError):
        ResumableLoader(Indexed(10), batch_size=3, sampler=RandomSampler(range(10))).load_state_dict(
            {**state, "order": torch.arange(10) + 5}
        )


def test_a_sampler_that_yields_other_than_its_len_is_reported() -> None:
    class Liar(SequentialSampler):
        def __len__(self) -> int:
            return 4

    loader = ResumableLoader(Indexed(10), batch_size=2, sampler=Liar(range(10)))
    with pytest.raises(spotsafe.errors.StateError, match="len"):
        list(loader)


EXIT_SCRIPT = """
import sys
import torch
from torch.utils.data import Dataset
from spotsafe import ResumableLoader

class Indexed(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        return torch.tensor(i)

loader = ResumableLoader(Indexed(), batch_size=2, num_workers=2, persistent_workers=True)
print(sum(len(b) for b in loader), flush=True)
"""


def test_process_with_persistent_workers_exits(tmp_path: Any) -> None:
    script = tmp_path / "persistent.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=20)  # a hang guard, not a timing assertion: a healthy run takes ~2 s
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its stuck workers
        proc.communicate()
        pytest.fail("the process did not exit after finishing its epoch")
    assert proc.returncode == 0
    assert out.strip() == b"8"
