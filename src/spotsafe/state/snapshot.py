"""Training state as named components, turned into blobs and back.

A checkpoint holds one blob of raw tensor bytes per component (``model.bin``,
``optimizer.bin``, ...) and one ``state.json`` with everything else: the
components' non-tensor state in the tagged JSON of :mod:`spotsafe.state.codec`
and each tensor's place in its blob.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from spotsafe.errors import CorruptCheckpointError, StateError, UnsafeCheckpointError
from spotsafe.state import codec
from spotsafe.state.tensors import TensorEntry, pack, plan, unpack
from spotsafe.storage.base import ChunkSource

STATE_BLOB = "state.json"
STATE_FORMAT = 1
_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_component_name(name: str) -> str:
    if not isinstance(name, str) or not _COMPONENT.match(name) or name + ".bin" == STATE_BLOB or ".." in name:
        raise StateError(
            f"component name {name!r} is not allowed: use letters, digits, '_', '-' and '.', at most 64 characters"
        )
    return name


@dataclass
class ComponentSnapshot:
    """One component's state, split into JSON and the tensors it references."""

    name: str
    tree: Any
    tensors: list[torch.Tensor]

    @property
    def blob_name(self) -> str:
        return f"{self.name}.bin"


@dataclass
class Snapshot:
    """The whole training state at one step, ready to be written."""

    step: int
    components: list[ComponentSnapshot]

    @classmethod
    def capture(cls, step: int, states: Mapping[str, Any]) -> Snapshot:
        """Encode each component's ``state_dict()`` result. Tensors are referenced, not copied."""
        parts = []
        for name, state in states.items():
            tensors: list[torch.Tensor] = []
            tree = codec.encode(state, tensors, name)
            parts.append(ComponentSnapshot(name=check_component_name(name), tree=tree, tensors=tensors))
        return cls(step=step, components=parts)

    def blobs(self) -> Iterator[tuple[str, ChunkSource]]:
        """``(blob name, chunk source)`` for each tensor blob, then ``state.json`` last.

        Each source yields the blob's bytes from the start whenever it is called,
        so a write can be retried; the tensors must not change until the save ends.
        """
        index: dict[str, Any] = {}
        for part in self.components:
            entries, _ = plan(part.tensors)
            index[part.name] = {
                "tree": part.tree,
                "blob": part.blob_name if part.tensors else None,
                "tensors": [e.to_json() for e in entries],
            }
            if part.tensors:
                yield part.blob_name, functools.partial(pack, part.tensors, entries)
        doc = {"format_version": STATE_FORMAT, "step": self.step, "components": index}
        state = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
        yield STATE_BLOB, lambda: (state,)


def restore_components(blobs: Mapping[str, bytearray], where: str) -> dict[str, Any]:
    """Decode verified blobs back into ``{component: state}``. Tensors view the blobs' memory."""
    try:
        doc = json.loads(blobs[STATE_BLOB])
    except KeyError:
        raise CorruptCheckpointError(f"{where}: the checkpoint has no {STATE_BLOB}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{where}: {STATE_BLOB} is not valid JSON") from err
    if not isinstance(doc, dict) or doc.get("format_version") != STATE_FORMAT:
        raise CorruptCheckpointError(f"{where}: {STATE_BLOB} has an unsupported format")
    components = doc.get("components")
    if not isinstance(components, dict):
        raise CorruptCheckpointError(f"{where}: {STATE_BLOB} lists no components")
    out: dict[str, Any] = {}
    for name, part in components.items():
        if not isinstance(part, dict) or not isinstance(part.get("tensors"), list):
            raise CorruptCheckpointError(f"{where}: component {name!r} is malformed")
        entries = [TensorEntry.from_json(e) for e in part["tensors"]]
        blob_name = part.get("blob")
        blob: bytearray | None = None
        if entries:
            if not isinstance(blob_name, str) or blob_name not in blobs or blob_name == STATE_BLOB:
                raise UnsafeCheckpointError(f"{where}: component {name!r} refers to a blob not in the manifest")
            blob = blobs[blob_name]
        cache: dict[int, torch.Tensor] = {}

        def tensor_at(
            i: int,
            entries: list[TensorEntry] = entries,
            blob: bytearray | None = blob,
            cache: dict[int, torch.Tensor] = cache,
        ) -> torch.Tensor:
            if i >= len(entries) or blob is None:
                raise UnsafeCheckpointError(f"{where}: tensor reference {i} out of range")
            if i not in cache:
                cache[i] = unpack(blob, entries[i])
            return cache[i]

        out[name] = codec.decode(part.get("tree"), tensor_at, f"{where}:{name}")
    return out
