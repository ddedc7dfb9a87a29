"""The step-boundary agreement lets go of each exchange's all-reduce on the training thread, never on gloo's.

Gloo's worker thread drops its reference to a work just after completing it. Whichever reference goes last frees
the work and its tensors; on gloo's thread that takes the GIL through a new thread state, which on Python before
3.11.10 can leave a child forked at that instant (a DataLoader worker) hung for good (CPython gh-112275). Seen under
gdb: two ranks exchanging every step created a thread state on gloo's thread for 66-69 of 300 exchanges while
``collect()`` dropped the work at once, and none once it was held until the next ``collect()``.
"""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch

from spotsafe.engine import agreement as agreement_module
from spotsafe.engine.agreement import Agreement


class Work:
    """A completed all-reduce as gloo hands it back (``wait()`` returns at once)."""

    def __init__(self) -> None:
        self.waited = False

    def wait(self) -> bool:
        self.waited = True
        return True


@pytest.fixture
def works(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[Work]]:
    """Every work the agreement starts, as weak references (a dead one: nothing holds that work any more)."""
    started: list[weakref.ref[Work]] = []

    def all_reduce(values: torch.Tensor, **kwargs: Any) -> Work:
        assert kwargs.get("async_op") is True
        work = Work()
        started.append(weakref.ref(work))
        return work

    monkeypatch.setattr(agreement_module.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(agreement_module.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(agreement_module.dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(agreement_module.dist, "all_reduce", all_reduce)
    return started


def post(agreement: Agreement, step: int) -> None:
    agreement.post(step, stop=False, warning=False, save=False, deadline=None)


def test_a_collected_exchange_is_held_until_the_next_collect(works: list[weakref.ref[Work]]) -> None:
    agreement = Agreement(every_s=0.0)
    post(agreement, 1)
    assert not agreement.collect().stop
    first = works[0]()
    assert first is not None and first.waited
    del first
    assert works[0]() is not None  # collected, and still held: gloo's thread cannot be the last to let go
    post(agreement, 2)
    assert works[0]() is not None
    agreement.collect()
    assert works[0]() is None  # let go here, on this thread, once the next exchange is in
    assert works[1]() is not None
    assert agreement.collect().stop is False  # nothing posted: nothing to collect, the last work still held
    assert works[1]() is not None


def test_exchange_holds_the_work_it_collected(works: list[weakref.ref[Work]]) -> None:
    agreement = Agreement(every_s=0.0)
    for step in range(5):
        agreement.exchange(step, stop=False, warning=False, save=False, deadline=None)
        assert [ref() is not None for ref in works][-2:] == ([True] if step == 0 else [False, True])
