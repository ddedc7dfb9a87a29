"""The Checkpointer's shape: components registered late, settings groups, effects closed on a failed start."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import spotsafe
from spotsafe import ConfigError, every
from spotsafe.engine.components import Components, LoopCounters, Stateful
from spotsafe.engine.config import NoticeConfig, SaveConfig, StorageConfig
from spotsafe.notices.base import NoticeBoard
from spotsafe.notices.signals import DEFAULT_SIGNALS
from spotsafe.telemetry import log as telemetry_log


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def train(
    ckpt: spotsafe.Checkpointer, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, until: int
) -> None:
    while ckpt.step < until:
        loss = model(torch.randn(8, 4)).pow(2).mean()  # the global RNG is part of the saved state
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ckpt.step_done()


def state(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    return {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def checkpointer(run: Path, **kwargs: Any) -> spotsafe.Checkpointer:
    return spotsafe.Checkpointer(run, handle_signals=False, notices=[], policy=every(steps=5), **kwargs)


# -- late registration ------------------------------------------------------------------------------------------


def test_an_optimizer_and_scheduler_registered_late_resume_bit_exactly(tmp_path: Path) -> None:
    model, opt, sched = build()
    with checkpointer(tmp_path / "reference", model=model, optimizer=opt, scheduler=sched) as ckpt:
        ckpt.restore()
        train(ckpt, model, opt, sched, 12)
        reference = state(model, opt, sched)

    run = tmp_path / "run"
    model, opt, sched = build()
    first = checkpointer(run, model=model)
    first.register("optimizer", opt)  # a framework builds its optimizer after the callback made the checkpointer
    first.register("scheduler", sched)
    assert first.optimizer is opt
    assert first.restore() == 0
    train(first, model, opt, sched, 8)  # saves at 5, then "crashes" at 8
    first.close()

    model, opt, sched = build()
    second = checkpointer(run, model=model)
    second.register("optimizer", opt)
    second.register("scheduler", sched)
    assert second.restore() == 5
    train(second, model, opt, sched, 12)
    second.close()
    assert same(state(model, opt, sched), reference)


def test_late_registration_saves_what_the_constructor_would(tmp_path: Path) -> None:
    model, opt, sched = build()
    with checkpointer(tmp_path / "a", model=model, optimizer=opt, scheduler=sched) as given:
        ref_given = given.save()
    with checkpointer(tmp_path / "b", model=model) as late:
        late.register("optimizer", opt)
        late.register("scheduler", sched)
        ref_late = late.save()
    assert ref_given is not None and ref_late is not None
    names = [
        sorted(p.name for p in (tmp_path / d / "checkpoints" / r.name).iterdir())
        for d, r in (("a", ref_given), ("b", ref_late))
    ]
    assert names[0] == names[1]


def test_registering_after_restore_says_it_would_not_be_restored(tmp_path: Path) -> None:
    model, opt, _ = build()
    with checkpointer(tmp_path, model=model) as ckpt:
        ckpt.restore()
        with pytest.raises(ConfigError, match=r"would not be restored.*before restore\(\)"):
            ckpt.register("optimizer", opt)
        assert ckpt.optimizer is None


def test_registering_a_taken_or_reserved_name_or_something_not_stateful_fails_and_registers_nothing(
    tmp_path: Path,
) -> None:
    model, opt, _ = build()
    with checkpointer(tmp_path, model=model) as ckpt:
        with pytest.raises(ConfigError, match="'model' is already registered"):
            ckpt.register("model", torch.nn.Linear(1, 1))
        for reserved in ("rng", "progress"):
            with pytest.raises(ConfigError, match="reserved"):
                ckpt.register(reserved, torch.Generator())
        with pytest.raises(ConfigError, match=r"'thing' is not Stateful.*state_dict"):
            ckpt.register("thing", object())
        with pytest.raises(ConfigError, match=r"torch\.optim\.Optimizer"):
            ckpt.register("optimizer", model)
        with pytest.raises(ConfigError, match="component name"):
            ckpt.register("../up", torch.Generator())
        ckpt.register("thing", torch.Generator())  # the name stayed free
        ckpt.register("optimizer", opt)
    with pytest.raises(ConfigError, match="closed"):
        ckpt.register("late", torch.Generator())


def test_a_late_loader_gives_the_epoch(tmp_path: Path) -> None:
    class Loader:
        epoch = 3

        def state_dict(self) -> dict[str, int]:
            return {"epoch": self.epoch}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.epoch = state["epoch"]

    with checkpointer(tmp_path) as ckpt:
        ckpt.epoch = 1
        ckpt.register("loader", Loader())
        assert ckpt.epoch == 3 and isinstance(ckpt.loader, Stateful)
        with pytest.raises(AttributeError, match="loader"):
            ckpt.epoch = 5


def test_the_optimizer_component_knows_the_parameters_it_updates() -> None:
    model, opt, _ = build()
    components = Components(LoopCounters())
    assert components.optimizer_owned() == set()
    components.add("optimizer", opt)
    assert components.optimizer_owned() == {p.data_ptr() for p in model.parameters()}
    assert [name for name, _ in components.items()] == ["optimizer", "progress", "rng"]


# -- settings groups --------------------------------------------------------------------------------------------


def test_settings_groups_can_be_passed_whole_and_are_exposed(tmp_path: Path) -> None:
    saving = SaveConfig(keep=1, policy=every(steps=2), metadata={"lr": 0.1})
    notices = NoticeConfig(notices=(), handle_signals=False, grace_s=5)
    with spotsafe.Checkpointer(
        save_config=saving, notice_config=notices, storage_config=StorageConfig(url=tmp_path / "run")
    ) as ckpt:
        assert ckpt.save_config is saving and ckpt.notice_config is notices
        assert ckpt.policy == every(steps=2) and ckpt.metadata == {"lr": 0.1}
        assert ckpt.storage_config.url == tmp_path / "run"
    # the keyword form builds the same values
    with spotsafe.Checkpointer(
        tmp_path / "run",
        keep=1,
        policy=every(steps=2),
        metadata={"lr": 0.1},
        notices=(),
        handle_signals=False,
        grace_s=5,
    ) as ckpt:
        assert ckpt.save_config == saving and ckpt.notice_config == notices


def test_a_setting_given_both_ways_is_refused_before_anything_is_opened(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="keep given both as keyword and inside save_config="):
        spotsafe.Checkpointer(tmp_path / "run", keep=2, save_config=SaveConfig(keep=5))
    with pytest.raises(ConfigError, match=r"save_config must be a spotsafe\.engine\.config\.SaveConfig"):
        spotsafe.Checkpointer(tmp_path / "run", save_config=NoticeConfig())  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()


def test_settings_say_why_a_value_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"^keep must be an integer >= 1, got 0 \(int\)$"):
        SaveConfig(keep=0)
    with pytest.raises(ConfigError, match=r"overlap=True needs .* async_save=True"):
        SaveConfig(overlap=True, async_save=False)
    with pytest.raises(ConfigError, match="stage_dir must differ"):
        StorageConfig(url="runs/x", stage_dir="runs/x")
    with pytest.raises(ConfigError, match="signals"):
        NoticeConfig(signals="SIGTERM")  # type: ignore[arg-type]
    assert NoticeConfig(signals=iter([signal.SIGTERM])).signals == (signal.SIGTERM,)
    assert SaveConfig(policy=None).policy == every(minutes=10)  # type: ignore[arg-type]
    assert dataclasses.replace(SaveConfig(), staging_budget=1 << 20).staging_bytes == 1 << 20


# -- effects ----------------------------------------------------------------------------------------------------


class BrokenSource:
    name = "broken"

    def start(self, board: NoticeBoard) -> None:
        raise OSError("cannot start")

    def after_stop(self, committed: bool) -> None:
        pass

    def stop(self) -> None:
        pass


def test_a_failure_halfway_through_opening_closes_what_was_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []
    real_close = telemetry_log.EventLog.close

    def close(self: telemetry_log.EventLog) -> None:
        closed.append("log")
        real_close(self)

    monkeypatch.setattr(telemetry_log.EventLog, "close", close)
    before = {s: signal.getsignal(s) for s in DEFAULT_SIGNALS}
    with pytest.raises(OSError, match="cannot start"):
        spotsafe.Checkpointer(tmp_path / "run", notices=[BrokenSource()])  # signal handlers start first
    assert closed == ["log"]
    assert {s: signal.getsignal(s) for s in DEFAULT_SIGNALS} == before
    with checkpointer(tmp_path / "run") as again:  # nothing was left holding the run
        assert again.restore() == 0 and again.attempt == 2
