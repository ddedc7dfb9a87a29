"""The named, stateful parts of a training run, in the order they are restored.

Anything behind the :class:`Stateful` protocol (``state_dict``/``load_state_dict``), or a
``torch``/``numpy`` generator, is a component. The model, optimizer, scheduler, scaler and
loader are components like any other, with one thing each that the checkpointer reads by
name: the ``optimizer``'s parameters (copied last with ``overlap``) and the ``loader``'s
``epoch``. A plain ``torch.utils.data.DataLoader`` registered as ``loader`` is made resumable in
place by a :class:`~spotsafe.data.position.LoaderPosition` (``count="yield"``), which is what is
saved. Two components are always there, last: ``progress`` (:class:`LoopCounters`) and ``rng``
(the global random generators).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader

from spotsafe.errors import CheckpointMismatchError, ConfigError, StateError
from spotsafe.state.rng import GlobalRNG, as_stateful
from spotsafe.state.snapshot import check_component_name

RESERVED = ("progress", "rng")
OPTIMIZER, LOADER = "optimizer", "loader"


@runtime_checkable
class Stateful(Protocol):
    """What the checkpointer saves: ``state_dict()`` returns the state, ``load_state_dict(state)`` puts it back.

    The state may hold tensors, numbers, strings, lists and dicts (saved as raw tensor bytes plus JSON).
    """

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class LoopCounters:
    """The loop's step and epoch, saved as the ``progress`` component."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        step, epoch = state.get("step"), state.get("epoch")
        if not isinstance(step, int) or not isinstance(epoch, int) or step < 0 or epoch < 0:
            raise CheckpointMismatchError(f"bad progress record {dict(state)!r}")
        self.step, self.epoch = step, epoch


class Components:
    """The components of one checkpointer: registered ones in registration order, then ``progress`` and ``rng``.

    :meth:`add` checks a component (its name, that it is stateful, that the name is free) and raises
    :class:`~spotsafe.errors.ConfigError` saying why; nothing is added then. Training thread only.
    """

    def __init__(self, counters: LoopCounters) -> None:
        self.counters = counters
        self._registered: dict[str, Any] = {}  # name -> the object as given
        self._stateful: dict[str, Any] = {}  # name -> the object, or its generator adapter
        self._rng = GlobalRNG()

    def add(self, name: str, obj: object) -> None:
        """Add ``obj`` under ``name`` (see the class docstring)."""
        try:
            check_component_name(name)
        except StateError as err:
            raise ConfigError(f"component name: {err}") from err
        if name in RESERVED:
            raise ConfigError(f"the component name {name!r} is reserved (spotsafe saves its own); pick another name")
        if name in self._registered:
            raise ConfigError(
                f"a component named {name!r} is already registered; each name holds one object, pick another name"
            )
        if name == OPTIMIZER and not isinstance(obj, torch.optim.Optimizer):
            raise ConfigError(f"the component 'optimizer' must be a torch.optim.Optimizer, got {type(obj).__name__}")
        try:
            stateful = loader_stateful(obj) if name == LOADER else as_stateful(obj, name)
        except StateError as err:
            raise ConfigError(f"component {name!r} is not Stateful: {err}") from err
        self._registered[name] = obj
        self._stateful[name] = stateful

    def __contains__(self, name: object) -> bool:
        return name in self._registered

    def get(self, name: str) -> Any:
        """The object registered as ``name`` (as it was given), or ``None``."""
        return self._registered.get(name)

    def objects(self) -> Iterator[Any]:
        """The registered objects, as they were given."""
        yield from self._registered.values()

    def items(self) -> Iterator[tuple[str, Any]]:
        """Every component as ``(name, stateful)``, in restore order."""
        yield from self._stateful.items()
        yield "progress", self.counters
        yield "rng", self._rng

    def states(self) -> dict[str, Any]:
        """Every component's ``state_dict()``, in restore order."""
        return {name: component.state_dict() for name, component in self.items()}

    def optimizer_owned(self) -> set[int]:
        """Addresses of the parameters the registered optimizer updates (copied last with ``overlap``)."""
        optimizer = self._registered.get(OPTIMIZER)
        if optimizer is None:
            return set()
        return {p.data_ptr() for group in optimizer.param_groups for p in group["params"] if p.numel()}

    def loader_epoch(self) -> int | None:
        """The registered loader's ``epoch`` (its LoaderPosition's for a plain DataLoader), if it has one."""
        loader = self._stateful.get(LOADER)
        return int(loader.epoch) if loader is not None and hasattr(loader, "epoch") else None

    def epoch(self) -> int:
        """The loader's epoch when it has one, else the counted one."""
        from_loader = self.loader_epoch()
        return from_loader if from_loader is not None else self.counters.epoch

    def apply(self, states: Mapping[str, Any], *, strict: bool, where: str, warn: Callable[[str], None]) -> None:
        """Load restored ``states`` (see :func:`apply_states`)."""
        apply_states(dict(self.items()), states, strict=strict, where=where, warn=warn)


def loader_stateful(obj: object) -> Any:
    """What is saved for the ``loader`` component: a plain DataLoader's LoaderPosition (attached here unless it
    has one), else the object itself (a ResumableLoader, a DataLoader with its own ``state_dict()``...)."""
    from spotsafe.data.position import LoaderPosition, needs_position

    if needs_position(obj):
        assert isinstance(obj, DataLoader)
        return LoaderPosition.of(obj) or LoaderPosition(obj, count="yield")
    return as_stateful(obj, LOADER)


def apply_states(
    components: Mapping[str, Any],
    states: Mapping[str, Any],
    *,
    strict: bool,
    where: str,
    warn: Callable[[str], None],
) -> None:
    """Load restored ``states`` into ``components`` (in their order); a mismatch raises, never half-guesses."""
    missing = [n for n in components if n not in states]
    if missing and strict:
        raise CheckpointMismatchError(
            f"checkpoint {where} has no state for {', '.join(missing)}; it was written by a run with "
            "different objects. Register the same objects, or call restore(strict=False).",
            checkpoint=where,
        )
    unknown = [n for n in states if n not in components]
    if unknown:
        warn(f"checkpoint {where} holds state for unregistered {', '.join(unknown)}")
    for name, component in components.items():
        if name not in states:
            continue
        try:
            component.load_state_dict(states[name])
        except CheckpointMismatchError:
            raise
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError, OverflowError) as err:
            # What load_state_dict raises for a value of the wrong type, shape or range.
            raise CheckpointMismatchError(
                f"checkpoint {where}: the saved {name} does not fit the current one: {err}", checkpoint=where
            ) from err
