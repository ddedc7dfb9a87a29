"""What a :class:`~spotsafe.data.position.LoaderPosition` saves: an epoch's recorded order, and its checked state.

Nothing here trusts a checkpoint: :meth:`EpochOrder.from_state` and :meth:`SavedPosition.parse` check every
type, shape and range and raise :class:`~spotsafe.errors.CheckpointMismatchError` saying what does not fit.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler

from spotsafe.checks import given
from spotsafe.errors import CheckpointMismatchError, StateError

FORMAT = 1


def indices_of(values: list[Any]) -> torch.Tensor:
    """Integer dataset indices (ints, NumPy or 0-d tensor integers) as an int64 tensor; anything else raises."""
    try:
        return torch.tensor([operator.index(v) for v in values], dtype=torch.int64)
    except TypeError:
        bad = next(v for v in values if not _is_index(v))
        raise StateError(
            f"spotsafe records a sampler's order as integer dataset indices, but the sampler yielded {given(bad)}; "
            "make the sampler yield ints, or give the loader state_dict()/load_state_dict() of its own"
        ) from None


def _is_index(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


class EpochOrder:
    """One epoch's batches as the sampler drew them: flat int64 ``indices`` and run-length batch sizes.

    ``runs`` is an ``(r, 2)`` int64 tensor of ``[size, count]`` rows (``count`` batches of ``size`` indices),
    or ``None`` when each batch is one index (``batch_size=None``). ``originals`` keeps the batches exactly as
    drawn when they are not plain lists of ints, to serve them unchanged in the epoch that drew them.
    """

    def __init__(self, indices: torch.Tensor, runs: torch.Tensor | None, originals: list[Any] | None = None) -> None:
        self.indices = indices
        self.runs = runs
        self.originals = originals

    @classmethod
    def draw(cls, source: Iterable[Any], batched: bool) -> EpochOrder:
        """Read the whole epoch from ``source`` (a batch sampler when ``batched``, else a sampler)."""
        if batched and type(source) is BatchSampler:
            return cls._draw_chunked(source)
        drawn = list(source)
        flat = list(itertools.chain.from_iterable(drawn)) if batched else drawn
        plain = set(map(type, flat)) <= {int} and (not batched or set(map(type, drawn)) <= {list})
        indices = torch.tensor(flat, dtype=torch.int64) if plain else indices_of(flat)
        if not batched:
            return cls(indices, None, None if plain else drawn)
        rows = [[size, sum(1 for _ in run)] for size, run in itertools.groupby(map(len, drawn))]
        return cls(indices, torch.tensor(rows, dtype=torch.int64).reshape(-1, 2), None if plain else drawn)

    @classmethod
    def _draw_chunked(cls, source: BatchSampler) -> EpochOrder:
        """A torch ``BatchSampler``: read its sampler (one pass, as the BatchSampler does) and cut it as it would,
        without building a list per batch."""
        flat = list(source.sampler)
        size = source.batch_size
        full, rest = divmod(len(flat), size)
        if source.drop_last:
            flat, rest = flat[: full * size], 0
        rows = [[s, c] for s, c in ((size, full), (rest, 1)) if s and c]
        plain = set(map(type, flat)) <= {int}
        originals = None if plain else [flat[i : i + size] for i in range(0, len(flat), size)]
        indices = torch.tensor(flat, dtype=torch.int64) if plain else indices_of(flat)
        return cls(indices, torch.tensor(rows, dtype=torch.int64).reshape(-1, 2), originals)

    def __len__(self) -> int:
        """Batches in the epoch."""
        return len(self.indices) if self.runs is None else int(self.runs[:, 1].sum())

    def serve(self, start: int) -> Iterator[Any]:
        """The batches from number ``start`` on (lists of ints; ints when unbatched), without a pass over the rest."""
        if self.originals is not None:
            yield from self.originals[start:]
        elif self.runs is None:
            for k in range(start, len(self.indices)):
                yield int(self.indices[k])
        else:
            first, offset = 0, 0
            for size, count in self.runs.tolist():
                skip = min(max(start - first, 0), count)
                at = offset + skip * size
                for _ in range(skip, count):
                    yield self.indices[at : at + size].tolist()
                    at += size
                first, offset = first + count, offset + size * count

    def state_dict(self) -> dict[str, Any]:
        return {"indices": self.indices, "runs": self.runs}

    @classmethod
    def from_state(cls, state: object, batched: bool) -> EpochOrder:
        """Check a saved order's types and shape and rebuild it."""
        if not isinstance(state, Mapping):
            raise CheckpointMismatchError(f"the checkpoint's data order is {given(state)}, not a mapping")
        indices, runs = state.get("indices"), state.get("runs")
        if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64 or indices.dim() != 1:
            raise CheckpointMismatchError(f"the checkpoint's data order is not a 1-D int64 tensor: {given(indices)}")
        if batched != (runs is not None):
            how = "with" if batched else "without"
            raise CheckpointMismatchError(
                f"the checkpoint's data order was recorded {how} batch_size=None and this loader is set up the "
                "other way: use the same loader settings"
            )
        if runs is not None:
            ok = isinstance(runs, torch.Tensor) and runs.dtype == torch.int64 and runs.dim() == 2
            if not ok or runs.shape[1] != 2 or bool((runs < 0).any()) or bool((runs[:, 1] < 1).any()):
                raise CheckpointMismatchError(f"the checkpoint's batch sizes are malformed: {given(runs)}")
            if int((runs[:, 0] * runs[:, 1]).sum()) != len(indices):
                raise CheckpointMismatchError("the checkpoint's batch sizes do not add up to its index count")
        if len(indices) and int(indices.min()) < 0:
            raise CheckpointMismatchError("the checkpoint's data order has a negative index")
        return cls(indices.clone(), None if runs is None else runs.clone())


def generators_at(places: Mapping[str, object]) -> dict[str, torch.Generator]:
    """The ``torch.Generator`` objects among ``places`` (name -> object), each once, by the first name found."""
    found: dict[str, torch.Generator] = {}
    for name, generator in places.items():
        if isinstance(generator, torch.Generator) and all(g is not generator for g in found.values()):
            found[name] = generator
    return found


def set_generator_states(own: Mapping[str, torch.Generator], states: object) -> None:
    """Put the saved ``states`` (name -> state tensor) into the generators ``own``, which must be at the same names."""
    if not isinstance(states, Mapping) or not all(isinstance(g, torch.Tensor) for g in states.values()):
        raise CheckpointMismatchError(f"the checkpoint's loader generators are {given(states)}")
    if set(own) != set(states):
        raise CheckpointMismatchError(
            f"the checkpoint's data loader had random generators at {sorted(states) or 'no place'} and this one "
            f"has them at {sorted(own) or 'no place'}: its order would differ. Use the same loader settings."
        )
    for name, generator in own.items():
        try:
            generator.set_state(states[name].clone())
        except RuntimeError as err:
            raise CheckpointMismatchError(f"the checkpoint's loader generator {name!r} does not fit: {err}") from err


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass(frozen=True)
class SavedPosition:
    """A :class:`~spotsafe.data.position.LoaderPosition` state, checked (see :meth:`parse`)."""

    epoch: int
    position: int
    started: bool  # the saved epoch had begun (its iterator was made; ``order`` once drawn)
    batched: bool | None
    order: EpochOrder | None
    seed_state: torch.Tensor | None  # base-seed generator state when the epoch's iterator was made
    persistent: bool  # that iterator had persistent workers
    generators: dict[str, torch.Tensor]

    @classmethod
    def parse(cls, state: Mapping[str, Any]) -> SavedPosition:
        if "format" not in state:
            raise CheckpointMismatchError(
                "the checkpoint's loader state was not saved by a LoaderPosition (by a ResumableLoader?): pass the "
                "same kind of loader as the run that saved it"
            )
        if state.get("format") != FORMAT:
            raise CheckpointMismatchError(
                f"the checkpoint's loader position has format {state.get('format')!r}, this spotsafe reads {FORMAT}"
            )
        epoch, position, started = state.get("epoch"), state.get("position"), state.get("started")
        batched, persistent, seed_state = state.get("batched"), state.get("persistent"), state.get("seed_state")
        generators = state.get("generators")
        if not _count(epoch) or not _count(position) or not isinstance(started, bool):
            raise CheckpointMismatchError(f"the checkpoint's loader position {epoch!r}/{position!r} is invalid")
        if not isinstance(persistent, bool) or not (batched is None or isinstance(batched, bool)):
            raise CheckpointMismatchError("the checkpoint's loader settings (batched, persistent) are malformed")
        if seed_state is not None and not (isinstance(seed_state, torch.Tensor) and seed_state.dtype == torch.uint8):
            raise CheckpointMismatchError(f"the checkpoint's worker seed state is {given(seed_state)}")
        if not isinstance(generators, dict) or not all(isinstance(g, torch.Tensor) for g in generators.values()):
            raise CheckpointMismatchError(f"the checkpoint's loader generators are {given(generators)}")
        saved = state.get("order")
        order = None if saved is None else EpochOrder.from_state(saved, bool(batched))
        assert isinstance(epoch, int) and isinstance(position, int)
        if order is not None and (not started or position > len(order)):
            raise CheckpointMismatchError(f"the checkpoint's loader position {position} does not fit its order")
        if order is None and position:
            raise CheckpointMismatchError(f"the checkpoint's loader position {position} has no order to resume")
        return cls(epoch, position, started, batched, order, seed_state, persistent, dict(generators))
