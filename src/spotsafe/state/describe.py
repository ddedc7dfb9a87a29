"""A JSON description of a decoded component, as ``spotsafe inspect`` shows it.

Works on whatever :func:`~spotsafe.state.snapshot.decode_state` returns for a checkpoint a stranger may have
written: it never raises on a shape the decoder accepts, and the result always serialises with
``json.dumps(..., allow_nan=False)`` (non-finite floats become strings).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor | np.ndarray[Any, Any]


def _tensors(tree: Any) -> Iterator[Tensor]:
    if isinstance(tree, (torch.Tensor, np.ndarray)):
        yield tree
    elif isinstance(tree, Mapping):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _tensors(value)


def _nbytes(t: Tensor) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return int(t.nbytes)


def _dtype(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.generic))


def describe_component(name: str, state: Any) -> dict[str, Any]:
    """The JSON document of component ``name``: its tensor count and bytes; for ``model`` each parameter's name,
    dtype and shape; for ``progress`` and ``loader`` their scalar values."""
    tensors = list(_tensors(state))
    doc: dict[str, Any] = {
        "name": name,
        "tensors": len(tensors),
        "tensor_bytes": sum(_nbytes(t) for t in tensors),
    }
    if name == "model" and isinstance(state, Mapping):
        doc["parameters"] = [
            {"name": str(key), "dtype": _dtype(value), "shape": list(value.shape)}
            for key, value in state.items()
            if isinstance(value, (torch.Tensor, np.ndarray))
        ]
    if name in ("progress", "loader") and isinstance(state, Mapping):
        doc["values"] = {str(k): _scalar(v) for k, v in state.items() if _is_scalar(v)}
    return doc
