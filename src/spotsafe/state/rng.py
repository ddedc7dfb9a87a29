"""Every global random stream a training step can draw from.

Captured: Python's ``random``, NumPy's legacy global generator
(``np.random.*``), torch's CPU generator, and each CUDA device's generator
when CUDA is initialised. Generators a user owns (``torch.Generator``,
``numpy.random.Generator``) are passed to the checkpointer as extra objects
and wrapped by :func:`as_stateful`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from spotsafe.errors import CheckpointMismatchError, StateError


def _cuda_ready() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


class GlobalRNG:
    """A stateful view of the process-wide random generators."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state(legacy=False)
        assert isinstance(np_state, dict)
        np_state = dict(np_state)
        np_state["state"] = {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"])}
        return {
            "python": random.getstate(),
            "numpy": np_state,
            "torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if _cuda_ready() else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            random.setstate(state["python"])
            np_state = dict(state["numpy"])
            np_state["state"] = {
                "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
                "pos": np_state["state"]["pos"],
            }
            np.random.set_state(np_state)
            torch.set_rng_state(state["torch"].clone())
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as err:
            raise CheckpointMismatchError(f"the checkpoint's RNG state cannot be applied: {err}") from err
        cuda = state.get("cuda")
        if cuda is not None and torch.cuda.is_available():
            if len(cuda) != torch.cuda.device_count():
                raise CheckpointMismatchError(
                    f"the checkpoint holds RNG state for {len(cuda)} CUDA devices but this machine has "
                    f"{torch.cuda.device_count()}; resume on the same number of GPUs for a bit-exact run"
                )
            torch.cuda.set_rng_state_all([t.clone() for t in cuda])


class TorchGeneratorState:
    """Adapts a ``torch.Generator`` to ``state_dict``/``load_state_dict``."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"].clone())


class NumpyGeneratorState:
    """Adapts a ``numpy.random.Generator`` (or a bit generator) to ``state_dict``."""

    def __init__(self, generator: np.random.Generator | np.random.BitGenerator) -> None:
        self.bit_generator = generator.bit_generator if isinstance(generator, np.random.Generator) else generator

    def state_dict(self) -> dict[str, Any]:
        return dict(self.bit_generator.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bit_generator.state = state


def as_stateful(obj: Any, name: str) -> Any:
    """Return ``obj`` if it has ``state_dict``/``load_state_dict``, or an adapter for a generator."""
    if isinstance(obj, torch.Generator):
        return TorchGeneratorState(obj)
    if isinstance(obj, (np.random.Generator, np.random.BitGenerator)):
        return NumpyGeneratorState(obj)
    if callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None)):
        return obj
    raise StateError(
        f"{name!r} ({type(obj).__name__}) has no state_dict()/load_state_dict(); spotsafe saves objects "
        "through those two methods. Add them, or wrap the object in one that has them."
    )
