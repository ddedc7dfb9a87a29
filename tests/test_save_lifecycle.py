"""One save's lifecycle: the legal transitions, and one report per ending, on every route."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spotsafe.engine.lifecycle import SaveOutcome, SaveState, save_reason
from spotsafe.engine.saver import Saver
from spotsafe.reasons import SaveReason
from spotsafe.storage.local import LocalStorage
from spotsafe.storage.repository import CheckpointRepository

ENDINGS = {SaveState.COMMITTED, SaveState.FAILED, SaveState.ABANDONED}


def test_legal_transitions_are_the_documented_ones() -> None:
    legal = {(a, b) for a in SaveState for b in SaveState if a.can_become(b)}
    assert legal == {
        (SaveState.STAGING, SaveState.STAGED),
        (SaveState.STAGING, SaveState.COMMITTED),
        (SaveState.STAGING, SaveState.FAILED),
        (SaveState.STAGED, SaveState.COMMITTED),
        (SaveState.STAGED, SaveState.FAILED),
        (SaveState.STAGED, SaveState.ABANDONED),
    }
    assert not any(end.can_become(other) for end in ENDINGS for other in SaveState)


def test_save_reason_keeps_a_callers_own_word() -> None:
    assert save_reason("notice") is SaveReason.NOTICE
    assert save_reason("before-eval") == "before-eval"


def _saver(tmp_path: Path, outcomes: list[SaveOutcome], *, background: bool) -> Saver:
    repo = CheckpointRepository(LocalStorage(tmp_path / "run"))
    return Saver(repo, on_done=outcomes.append, budget=None, background=background)


def _save(saver: Saver, step: int) -> None:
    states = {"model": {"w": torch.arange(8, dtype=torch.float32) * step}}
    saver.save(step, "manual", states, generation=0, metadata={}, writer={})


@pytest.mark.parametrize("background", [True, False], ids=["background", "direct"])
def test_every_save_ends_once_and_legally(tmp_path: Path, background: bool) -> None:
    outcomes: list[SaveOutcome] = []
    saver = _saver(tmp_path, outcomes, background=background)
    for step in (1, 2):
        _save(saver, step)
        assert saver.wait()
    saver.close()
    assert [o.job.state for o in outcomes] == [SaveState.COMMITTED, SaveState.COMMITTED]
    assert all(o.manifest is not None and o.error is None for o in outcomes)
    assert [o.job.reason for o in outcomes] == [SaveReason.MANUAL, SaveReason.MANUAL]


def test_a_failed_copy_into_staging_memory_is_reported_and_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes: list[SaveOutcome] = []
    saver = _saver(tmp_path, outcomes, background=True)

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError("no staging memory")

    monkeypatch.setattr(saver.area, "stage", no_memory)
    with pytest.raises(MemoryError):
        _save(saver, 1)
    assert saver.wait()
    saver.close()
    (outcome,) = outcomes
    assert outcome.job.state is SaveState.FAILED
    assert isinstance(outcome.error, MemoryError) and outcome.manifest is None
