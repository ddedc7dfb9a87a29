"""The named, stateful parts of a training run, in the order they are restored."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from spotsafe.errors import CheckpointMismatchError, ConfigError
from spotsafe.state.rng import GlobalRNG, as_stateful
from spotsafe.state.snapshot import check_component_name

RESERVED = ("progress", "rng")


class Progress:
    """The loop counters, saved as the ``progress`` component."""

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


def collect(named: Mapping[str, Any], extra: Mapping[str, Any] | None, progress: Progress) -> dict[str, Any]:
    """Components in restore order: the named training objects, extras, progress, then the RNGs last.

    ``named`` maps model/optimizer/scheduler/scaler/loader to objects (``None`` = absent).
    """
    components = {name: as_stateful(obj, name) for name, obj in named.items() if obj is not None}
    for name, obj in (extra or {}).items():
        check_component_name(name)
        if name in components or name in RESERVED:
            raise ConfigError(f"extra object name {name!r} is reserved; pick another name")
        components[name] = as_stateful(obj, name)
    components["progress"] = progress
    components["rng"] = GlobalRNG()
    return components


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
