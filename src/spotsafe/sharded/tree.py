"""A state tree split in two: its tensors for DCP, everything else for spotsafe's codec.

DCP plans and reshards tensors (``DTensor`` shards and replicated tensors alike), but would pickle every
other value. :func:`split` therefore encodes the tree with :mod:`spotsafe.state.codec` (types preserved
exactly, no pickle) and hands DCP only the tensors, each under a key made of its path in the tree
(``model/0.weight``, ``optimizer/state/0.weight/exp_avg``): the same key at any world size, since the
tree's structure (module and parameter names) does not depend on it. :func:`join` puts loaded tensors
back where the saved tree had them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from spotsafe.errors import CheckpointMismatchError, UnsafeCheckpointError
from spotsafe.state import codec

_TENSOR_TAGS = ("$tensor", "$ndarray")


def _escape(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def _walk(doc: Any, path: str) -> Iterator[tuple[int, str]]:
    """(tensor index, key) for every tensor placeholder in an encoded tree, in document order."""
    if isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _walk(value, f"{path}/{i}")
        return
    if not isinstance(doc, dict):
        return
    for tag in _TENSOR_TAGS:
        if tag in doc:
            index = doc[tag]
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise UnsafeCheckpointError(f"{path or '/'}: bad tensor index")
            yield index, path or "/"
            return
    if "$tuple" in doc:
        yield from _walk(doc["$tuple"], path)
        return
    pairs = doc.get("$dict", doc.get("$odict"))
    if isinstance(pairs, list):
        for pair in pairs:
            if isinstance(pair, list) and len(pair) == 2:
                key = pair[0] if isinstance(pair[0], str) else f"{type(pair[0]).__name__}:{pair[0]!r}"
                yield from _walk(pair[1], f"{path}/{_escape(key)}")
        return
    for key, value in doc.items():
        if not key.startswith("$"):
            yield from _walk(value, f"{path}/{_escape(key)}")


def tensor_keys(doc: Any) -> list[str]:
    """The key of each tensor of an encoded tree, by tensor index."""
    found = dict(_walk(doc, ""))
    if sorted(found) != list(range(len(found))):
        raise UnsafeCheckpointError("the saved tree's tensor indices are not 0..n-1")
    keys = [found[i] for i in range(len(found))]
    if len(set(keys)) != len(keys):
        raise UnsafeCheckpointError("two tensors of the saved tree have the same path")
    return keys


def split(tree: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The tree's JSON form (tensors replaced by placeholders) and its tensors by key."""
    tensors: list[torch.Tensor] = []
    doc = codec.encode(tree, tensors)
    return doc, dict(zip(tensor_keys(doc), tensors, strict=True))


def join(doc: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """The tree of ``doc`` (a saved :func:`split` document) with the tensors of ``tensors`` in place."""
    keys = tensor_keys(doc)
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CheckpointMismatchError(f"{where}: the saved state has tensors this job's state lacks: {missing[:5]}")
    return codec.decode(doc, lambda i: tensors[keys[i]], where)


__all__ = ["join", "split", "tensor_keys"]
