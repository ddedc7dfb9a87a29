"""ElasticLoader: DistributedSampler's batches, and a global cursor that survives a change of world size.

Ranks are simulated in one process (one loader per rank, given ``num_replicas``/``rank``, iterated in
lockstep); tests/test_sharded.py runs real ranks through 2 -> 1 -> 3.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from spotsafe.data.elastic import ElasticLoader
from spotsafe.errors import CheckpointMismatchError

from .jobs.ids import Ids


def ranks(n: int, world: int, **kwargs: Any) -> list[ElasticLoader]:
    return [ElasticLoader(Ids(n), num_replicas=world, rank=r, **kwargs) for r in range(world)]


def take(loaders: list[ElasticLoader], batches: int | None) -> list[int]:
    """Every rank takes ``batches`` batches (``None``: to the end of the epoch), in lockstep; the ids seen."""
    iterators = [iter(loader) for loader in loaders]
    seen: list[int] = []
    count = 0
    while batches is None or count < batches:
        got = [next(it, None) for it in iterators]
        if got[0] is None:
            assert all(g is None for g in got), "ranks ran out of batches at different steps"
            break
        for batch in got:
            assert batch is not None
            seen.extend(batch.tolist())
        count += 1
    return seen


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_without_a_resize_the_batches_are_distributed_samplers(world: int, drop_last: bool) -> None:
    n, batch = 23, 4
    for rank in range(world):
        mine = ElasticLoader(Ids(n), batch, seed=5, drop_last=drop_last, num_replicas=world, rank=rank)
        sampler = DistributedSampler(Ids(n), num_replicas=world, rank=rank, seed=5, drop_last=drop_last)
        plain = DataLoader(Ids(n), batch, sampler=sampler, drop_last=drop_last)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            expected = [b.tolist() for b in plain]
            assert [b.tolist() for b in mine] == expected, (rank, epoch)
            assert mine.epoch == epoch + 1


def test_a_run_through_2_then_1_then_3_ranks_consumes_every_sample_once() -> None:
    n, batch = 60, 2
    first = ranks(n, 2, batch_size=batch, seed=1)
    seen = take(first, 3)  # 3 batches x 2 samples x 2 ranks
    states = [loader.state_dict() for loader in first]
    assert all(s == states[0] for s in states) and states[0]["consumed"] == 12
    second = ranks(n, 1, batch_size=batch, seed=1)
    second[0].load_state_dict(states[0])
    seen += take(second, 6)
    state = second[0].state_dict()
    assert state["consumed"] == 24
    third = ranks(n, 3, batch_size=batch, seed=1)
    for loader in third:
        loader.load_state_dict(state)
    seen += take(third, None)
    assert sorted(seen) == list(range(n))  # each sample once: 36 left split among 3 ranks, no padding
    assert third[0].state_dict()["epoch"] == 1 and third[0].state_dict()["consumed"] == 0


@pytest.mark.parametrize("case", range(200))
def test_any_sequence_of_world_sizes_and_stops_consumes_each_sample_once_but_the_declared_padding(case: int) -> None:
    rng = random.Random(case)
    n, batch, drop_last = rng.randint(1, 40), rng.randint(1, 5), rng.random() < 0.3
    world = rng.randint(1, 4)
    loaders = ranks(n, world, batch_size=batch, seed=case, drop_last=drop_last)
    seen: list[int] = []
    padding = 0
    while loaders[0].epoch == 0:
        world = rng.randint(1, 4)
        state = loaders[0].state_dict()
        loaders = ranks(n, world, batch_size=batch, seed=case, drop_last=drop_last)
        for loader in loaders:
            loader.load_state_dict(state)
        if loaders[0].epoch != 0:
            break
        padding = loaders[0].padding
        before = loaders[0].consumed
        new = take(loaders, rng.randint(0, 4))
        seen += new
        if loaders[0].epoch == 0:  # the cursor moved by exactly what the ranks were served
            assert loaders[0].consumed - before == len(new)
    counts = Counter(seen)
    if drop_last:
        assert all(c == 1 for c in counts.values())  # the cut tail is never served; nothing twice
    else:
        assert set(counts) == set(range(n))
        assert sum(c - 1 for c in counts.values()) == padding  # repeats only in the last segment's padding


def test_state_is_checked() -> None:
    loader = ElasticLoader(Ids(10), 2, seed=3)
    good = loader.state_dict()
    for change in ({"seed": 4}, {"dataset_length": 11}, {"consumed": 11}, {"epoch": -1}, {"format": "x"}):
        with pytest.raises(CheckpointMismatchError):
            ElasticLoader(Ids(10), 2, seed=3).load_state_dict({**good, **change})
    other = ElasticLoader(Ids(10), 5, seed=3, num_replicas=2, rank=1)  # batch size and world size may differ
    other.load_state_dict({**good, "consumed": 4})
    assert other.consumed == 4 and torch.equal(other.share(), other.share())


def test_iterating_does_not_draw_from_the_global_rng() -> None:
    """A DataLoader draws its workers' base seed when an iteration starts; a resumed run starts one at
    another moment, so the draw must not come from the global RNG that the checkpoint restores."""
    loader = ElasticLoader(Ids(10), 2, seed=3)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)
