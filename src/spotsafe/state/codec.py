"""Encode a ``state_dict`` tree as JSON plus a list of tensors, and back, without pickle.

Types are preserved exactly, because bit-exact resume depends on them (an
optimizer's ``betas`` is a tuple, its state is keyed by ``int``, a scheduler's
``_last_lr`` floats must round-trip to the last bit):

=====================  =====================================================
Python value           JSON
=====================  =====================================================
None, bool, int, str   as is
float                  as is (``repr`` round-trips exactly); non-finite
                       values as ``{"$float": "nan" | "inf" | "-inf"}``
list                   list
tuple                  ``{"$tuple": [...]}``
dict (str keys)        object; other keys, or keys starting with ``$``:
                       ``{"$dict": [[key, value], ...]}``
OrderedDict            ``{"$odict": [[key, value], ...], "$meta": ...}``
                       (``$meta`` keeps a module state_dict's ``_metadata``)
torch.Tensor           ``{"$tensor": index}`` into the tensor list
numpy.ndarray          ``{"$ndarray": index}`` (stored as a tensor)
numpy scalar           ``{"$npscalar": dtype, "value": ...}``
torch.dtype            ``{"$dtype": "float32"}``
torch.device           ``{"$device": "cuda:0"}``
bytes                  ``{"$bytes": base64}``
=====================  =====================================================

Decoding knows only these tags and constructs only these types: an unknown
tag is an :class:`~spotsafe.errors.UnsafeCheckpointError`, never an import.
Both directions are bounded: a tree whose JSON would nest deeper than
:data:`MAX_DEPTH` objects and arrays is refused when saved (``StateError``) and
when loaded (``UnsafeCheckpointError``), never a ``RecursionError``.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from spotsafe.errors import StateError, UnsafeCheckpointError
from spotsafe.state.tensors import dtype_from_name, dtype_name
from spotsafe.storage.json_limits import STATE_LIMITS

MAX_DEPTH = STATE_LIMITS.max_depth - 3
"""Deepest nesting of objects and arrays in one component's JSON (``state.json`` wraps it in three more)."""

_NP_SCALARS = {
    "bool": np.bool_,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float16": np.float16,
    "float32": np.float32,
    "float64": np.float64,
}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _encode_float(value: float) -> Any:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return {"$float": "nan"}
    return {"$float": "inf" if value > 0 else "-inf"}


def _too_deep_to_save(path: str) -> StateError:
    return StateError(
        f"{path or 'state'}: nests deeper than {MAX_DEPTH} levels of lists, tuples and dicts (as JSON), "
        "more than spotsafe reads back; flatten it"
    )


def encode(tree: Any, tensors: list[torch.Tensor], path: str = "", *, level: int = 1) -> Any:
    """Return the JSON form of ``tree``, appending its tensors to ``tensors``.

    ``level`` is how deep in the JSON the value lands (1: the top); a container that would land
    deeper than :data:`MAX_DEPTH` raises :class:`~spotsafe.errors.StateError`.
    """
    if tree is None or isinstance(tree, (bool, str)):
        return tree
    if isinstance(tree, int) and not isinstance(tree, np.integer):
        return int(tree)
    if isinstance(tree, float) and not isinstance(tree, np.floating):
        return _encode_float(float(tree))
    if level > MAX_DEPTH:
        raise _too_deep_to_save(path)
    inner = level + 1
    if isinstance(tree, torch.Tensor):
        if tree.is_sparse or tree.is_quantized or tree.layout != torch.strided:
            raise StateError(f"{path or 'state'}: {tree.layout} tensors are not supported; convert to dense first")
        tensors.append(tree)
        return {"$tensor": len(tensors) - 1}
    if isinstance(tree, np.ndarray):
        if tree.dtype.name not in _NP_SCALARS:
            raise StateError(f"{path or 'state'}: numpy dtype {tree.dtype} is not supported")
        native = tree.astype(tree.dtype.newbyteorder("="), copy=False)
        tensors.append(torch.from_numpy(np.ascontiguousarray(native).reshape(tree.shape)))
        return {"$ndarray": len(tensors) - 1}
    if isinstance(tree, np.generic):
        name = tree.dtype.name
        if name not in _NP_SCALARS:
            raise StateError(f"{path or 'state'}: numpy scalar type {name} is not supported")
        item = tree.item()
        return {"$npscalar": name, "value": _encode_float(item) if isinstance(item, float) else item}
    if isinstance(tree, torch.dtype):
        return {"$dtype": dtype_name(tree)}
    if isinstance(tree, torch.device):
        return {"$device": str(tree)}
    if isinstance(tree, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(tree)).decode("ascii")}
    if isinstance(tree, tuple):  # {"$tuple": [...]}: items two levels down
        if level + 1 > MAX_DEPTH:
            raise _too_deep_to_save(path)
        return {"$tuple": [encode(v, tensors, f"{path}[{i}]", level=inner + 1) for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [encode(v, tensors, f"{path}[{i}]", level=inner) for i, v in enumerate(tree)]
    if (
        isinstance(tree, dict)
        and level + 2 > MAX_DEPTH
        and (isinstance(tree, OrderedDict) or not all(isinstance(k, str) and not k.startswith("$") for k in tree))
    ):
        raise _too_deep_to_save(path)  # its [key, value] pairs would nest two levels deeper
    if isinstance(tree, OrderedDict):  # {"$odict": [[key, value], ...]}: keys and values three levels down
        items = [
            [encode(k, tensors, path, level=inner + 2), encode(v, tensors, f"{path}.{k}", level=inner + 2)]
            for k, v in tree.items()
        ]
        out: dict[str, Any] = {"$odict": items}
        meta = getattr(tree, "_metadata", None)
        if meta is not None:
            out["$meta"] = encode(meta, tensors, f"{path}._metadata", level=inner)
        return out
    if isinstance(tree, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in tree):
            return {k: encode(v, tensors, f"{path}.{k}" if path else k, level=inner) for k, v in tree.items()}
        return {
            "$dict": [
                [encode(k, tensors, path, level=inner + 2), encode(v, tensors, f"{path}.{k}", level=inner + 2)]
                for k, v in tree.items()
            ]
        }
    raise StateError(
        f"{path or 'state'}: cannot save a value of type {type(tree).__module__}.{type(tree).__qualname__}; "
        "state must be tensors, numbers, strings, lists, tuples and dicts. Give the object "
        "state_dict()/load_state_dict() methods that return such values."
    )


def _pairs(raw: Any, where: str) -> list[tuple[Any, Any]]:
    if not isinstance(raw, list) or not all(isinstance(p, list) and len(p) == 2 for p in raw):
        raise UnsafeCheckpointError(f"{where}: malformed key/value list")
    return [(p[0], p[1]) for p in raw]


def decode(doc: Any, tensor_at: Callable[[int], torch.Tensor], where: str = "state", *, level: int = 1) -> Any:
    """Rebuild the tree encoded by :func:`encode`. ``tensor_at(i)`` returns tensor ``i``.

    ``level`` is how deep ``doc`` is in the JSON (1: the top); deeper than :data:`MAX_DEPTH` is unsafe.
    """
    if doc is None or isinstance(doc, (bool, int, float, str)):
        return doc
    if level > MAX_DEPTH:
        raise UnsafeCheckpointError(f"{where}: objects and arrays nest deeper than {MAX_DEPTH} levels")
    inner = level + 1
    if isinstance(doc, list):
        return [decode(v, tensor_at, where, level=inner) for v in doc]
    if not isinstance(doc, dict):
        raise UnsafeCheckpointError(f"{where}: unexpected JSON value {type(doc).__name__}")
    tags = [k for k in doc if isinstance(k, str) and k.startswith("$")]
    if not tags:
        return {k: decode(v, tensor_at, where, level=inner) for k, v in doc.items()}
    tag = tags[0]
    value = doc[tag]
    if tag == "$tensor" and len(doc) == 1:
        return tensor_at(_index(value, where))
    if tag == "$ndarray" and len(doc) == 1:
        try:
            return tensor_at(_index(value, where)).numpy()
        except TypeError as err:
            raise UnsafeCheckpointError(f"{where}: $ndarray of a dtype numpy cannot hold") from err
    if tag == "$float" and len(doc) == 1 and isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if tag == "$tuple" and len(doc) == 1 and isinstance(value, list):
        return tuple(decode(v, tensor_at, where, level=inner + 1) for v in value)
    if tag == "$dict" and len(doc) == 1:
        return {
            _hashable(decode(k, tensor_at, where, level=inner + 2), where): decode(v, tensor_at, where, level=inner + 2)
            for k, v in _pairs(value, where)
        }
    if tag == "$odict" and set(doc) <= {"$odict", "$meta"}:
        out: OrderedDict[Any, Any] = OrderedDict(
            (
                _hashable(decode(k, tensor_at, where, level=inner + 2), where),
                decode(v, tensor_at, where, level=inner + 2),
            )
            for k, v in _pairs(value, where)
        )
        if "$meta" in doc:
            out._metadata = decode(doc["$meta"], tensor_at, where, level=inner)  # type: ignore[attr-defined]
        return out
    if tag == "$npscalar" and set(doc) == {"$npscalar", "value"} and isinstance(value, str) and value in _NP_SCALARS:
        item = decode(doc["value"], tensor_at, where, level=inner)
        if not isinstance(item, (bool, int, float)):
            raise UnsafeCheckpointError(f"{where}: bad numpy scalar value")
        try:
            return _NP_SCALARS[value](item)
        except (OverflowError, ValueError, TypeError) as err:
            raise UnsafeCheckpointError(f"{where}: numpy scalar {item!r:.40} does not fit {value}") from err
    if tag == "$dtype" and len(doc) == 1 and isinstance(value, str):
        return dtype_from_name(value)
    if tag == "$device" and len(doc) == 1 and isinstance(value, str):
        try:
            return torch.device(value)
        except (RuntimeError, ValueError, TypeError) as err:
            raise UnsafeCheckpointError(f"{where}: bad device {value!r:.40}") from err
    if tag == "$bytes" and len(doc) == 1 and isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError as err:
            raise UnsafeCheckpointError(f"{where}: bad base64") from err
    raise UnsafeCheckpointError(f"{where}: unknown or malformed tag {tag!r:.40}; refusing to interpret it")


def _index(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UnsafeCheckpointError(f"{where}: bad tensor reference {value!r:.40}")
    return value


def _hashable(key: Any, where: str) -> Any:
    try:
        hash(key)
    except TypeError as err:
        raise UnsafeCheckpointError(f"{where}: unhashable dict key") from err
    return key
