"""What a ``Checkpointer(sharded=True)`` saves for all ranks, what for each rank, and how it is put back.

*Global* components (one copy for all ranks, resharded to any number of ranks by DCP): ``model`` and
``optimizer``, taken with ``torch.distributed.checkpoint.state_dict.get_state_dict`` (parameter names as keys,
``DTensor`` shards under FSDP2, the ``module.`` prefix of DDP removed, the optimizer's state created if it has
taken no step yet, so that a template exists to load into), ``scheduler``, ``scaler``, ``progress`` (step and
epoch), and a ``loader`` that is an :class:`~spotsafe.data.elastic.ElasticLoader` (its position is global).
Their non-tensor values must be the same on every rank, which a save checks.

*Per rank* (``rank_state``): the random generators (``rng``), any other ``loader`` (its position belongs to
its rank) and every ``extra`` component.

The rule at another world size: a rank that existed at the save gets its own per-rank state back. A new rank
(its number at least the saved world size) seeds its random generators from the run's step and its rank
(:func:`seed_new_rank`: the same on every resume of that step, different for each rank); any other per-rank
component it has is missing, which ``strict`` restores refuse, naming it. The per-rank state of ranks that
no longer exist is dropped.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from spotsafe.data.elastic import FORMAT as ELASTIC_FORMAT
from spotsafe.data.loader import mix
from spotsafe.engine.components import Components, apply_states
from spotsafe.errors import CheckpointMismatchError

MODEL, OPTIMIZER, LOADER, RNG = "model", "optimizer", "loader", "rng"
GLOBAL = ("model", "optimizer", "scheduler", "scaler", "progress")


def is_global(name: str, state: Any) -> bool:
    """Whether component ``name`` (with ``state``) is saved once for all ranks."""
    if name == LOADER:
        return isinstance(state, dict) and state.get("format") == ELASTIC_FORMAT
    return name in GLOBAL


def sharded_states(components: Components) -> dict[str, Any]:
    """Every component's state, with ``model`` and ``optimizer`` as ``get_state_dict`` gives them."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    states = components.states()
    model, optimizer = components.get(MODEL), components.get(OPTIMIZER)
    if isinstance(model, torch.nn.Module):
        if isinstance(optimizer, torch.optim.Optimizer):
            states[MODEL], states[OPTIMIZER] = get_state_dict(model, optimizer)
        else:
            states[MODEL] = get_model_state_dict(model)
    return states


def split_states(states: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, per rank) parts of ``states``."""
    shared = {name: state for name, state in states.items() if is_global(name, state)}
    return shared, {name: state for name, state in states.items() if name not in shared}


def seed_new_rank(step: int, rank: int) -> None:
    """The random generators of a rank that did not exist at the save: seeded from the step and the rank."""
    seed = mix(step, rank, 0x5EEDED)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed & ((1 << 63) - 1))


def apply_restored(
    components: Components,
    shared: Mapping[str, Any],
    own: Mapping[str, Any] | None,
    *,
    rank: int,
    step: int,
    saved_world_size: int,
    strict: bool,
    where: str,
    warn: Callable[[str], None],
) -> None:
    """Put a sharded checkpoint's global ``shared`` and this rank's ``own`` state (``None``: this rank did not
    exist at the save) back into ``components`` (see the module docstring)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    states = dict(shared)
    model, optimizer = components.get(MODEL), components.get(OPTIMIZER)
    if isinstance(model, torch.nn.Module) and MODEL in states:
        model_state = states.pop(MODEL)
        try:
            if isinstance(optimizer, torch.optim.Optimizer) and OPTIMIZER in states:
                set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=states.pop(OPTIMIZER))
            else:
                set_model_state_dict(model, model_state)
        except (RuntimeError, KeyError, ValueError, TypeError) as err:
            raise CheckpointMismatchError(
                f"checkpoint {where}: the saved model or optimizer does not fit: {err}", checkpoint=where
            ) from err
    handled = {MODEL, OPTIMIZER} if isinstance(model, torch.nn.Module) else set()
    if own is None:  # a rank the save did not have
        seed_new_rank(step, rank)
        per_rank = [n for n, _ in components.items() if n not in handled and n != RNG and n not in shared]
        if per_rank and strict:
            raise CheckpointMismatchError(
                f"checkpoint {where} was saved by {saved_world_size} rank(s) and this is rank {rank}: the per-rank "
                f"state of {', '.join(per_rank)} does not exist for it. Use spotsafe.ElasticLoader for the data "
                "position, or restore(strict=False) to start those fresh on the new ranks.",
                checkpoint=where,
            )
        if per_rank:
            warn(f"rank {rank} did not exist at the save: {', '.join(per_rank)} start fresh")
        handled |= {RNG, *per_rank}
    states.update(own or {})
    rest = {name: c for name, c in components.items() if name not in handled}
    apply_states(rest, states, strict=strict, where=where, warn=warn)


__all__ = ["apply_restored", "is_global", "seed_new_rank", "sharded_states", "split_states"]
