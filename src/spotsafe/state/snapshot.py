"""Training state as named components, turned into blobs and back.

A checkpoint holds blobs of raw tensor bytes (``model.bin``, ``optimizer.bin``,
...) and one ``state.json`` with everything else: the components' non-tensor
state in the tagged JSON of :mod:`spotsafe.state.codec` and, per tensor, the
segments of blobs that hold its bytes. A full checkpoint stores each tensor
whole in its component's blob; an incremental one points unchanged chunks at
blobs of older checkpoints (see :mod:`spotsafe.engine.staging`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from spotsafe.errors import CorruptCheckpointError, StateError, UnsafeCheckpointError
from spotsafe.state import codec
from spotsafe.state.tensors import TensorEntry, pack, plan, unpack
from spotsafe.storage import json_limits
from spotsafe.storage.base import ChunkSource

STATE_BLOB = "state.json"
STATE_FORMAT = 2
_READABLE = (1, 2)
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
        entries: dict[str, list[TensorEntry]] = {}
        for part in self.components:
            entries[part.name], size = plan(part.tensors, part.blob_name)
            if size:
                yield part.blob_name, functools.partial(pack, part.tensors, entries[part.name])
        state = self.state_json(entries)
        yield STATE_BLOB, lambda: (state,)

    def state_json(self, entries: Mapping[str, list[TensorEntry]]) -> bytes:
        """``state.json`` for this snapshot, given where each component's tensors are stored."""
        index = {
            part.name: {"tree": part.tree, "tensors": [e.to_json() for e in entries[part.name]]}
            for part in self.components
        }
        doc = {"format_version": STATE_FORMAT, "step": self.step, "components": index}
        data = json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()
        try:
            json_limits.check_shape(data, json_limits.STATE_LIMITS, STATE_BLOB)
        except CorruptCheckpointError as err:
            raise StateError(
                f"cannot save state that spotsafe could not read back: {err}. Keep large data in tensors"
            ) from err
        return data


@dataclass
class DecodedState:
    """A checkpoint's components, and where each of their tensors is stored.

    ``in_place`` names the tensors (component, index) that were read straight into live tensors: the
    decoded state holds those live tensors, and their entries' blob ranges hold nothing in memory.
    """

    components: dict[str, Any]
    entries: dict[str, list[TensorEntry]]
    in_place: set[tuple[str, int]] = field(default_factory=set)


def restore_components(blobs: Mapping[str, bytearray | memoryview], where: str) -> dict[str, Any]:
    """Decode verified blobs back into ``{component: state}``. Tensors view the blobs' memory."""
    return decode_state(blobs, where).components


_MALFORMED = (RecursionError, MemoryError, OverflowError, RuntimeError, ValueError, TypeError, KeyError, IndexError)
"""What building Python and torch objects from a malformed (but checked) document can still raise."""


def component_docs(data: bytes | bytearray | memoryview, where: str) -> dict[str, Any]:
    """The ``components`` of a verified ``state.json`` (each: its tagged ``tree`` and ``tensors`` entries).

    ``state.json`` is untrusted: it is parsed within :data:`~spotsafe.storage.json_limits.STATE_LIMITS`,
    and anything wrong with its outline raises :class:`~spotsafe.errors.CorruptCheckpointError`.
    """
    doc = json_limits.load(data, json_limits.STATE_LIMITS, f"{where}: {STATE_BLOB}")
    if not isinstance(doc, dict) or doc.get("format_version") not in _READABLE:
        raise CorruptCheckpointError(f"{where}: {STATE_BLOB} has an unsupported format")
    components = doc.get("components")
    if not isinstance(components, dict):
        raise CorruptCheckpointError(f"{where}: {STATE_BLOB} lists no components")
    for name in components:
        if not _COMPONENT.fullmatch(name):
            raise UnsafeCheckpointError(f"{where}: {STATE_BLOB} names a component {name!r:.80}")
    return components


def decode_state(
    blobs: Mapping[str, bytearray | memoryview],
    where: str,
    given: Mapping[str, Mapping[int, torch.Tensor]] | None = None,
) -> DecodedState:
    """Decode verified blobs (keyed as the manifest names them) into components and tensor entries.

    ``given[component][index]``, where present, is that tensor already (read in place), not unpacked from
    the blobs. Anything wrong with ``state.json`` raises :class:`~spotsafe.errors.CorruptCheckpointError`
    (or its subclass :class:`~spotsafe.errors.UnsafeCheckpointError`), never another exception.
    """
    if STATE_BLOB not in blobs:
        raise CorruptCheckpointError(f"{where}: the checkpoint has no {STATE_BLOB}")
    given = given or {}
    out = DecodedState(components={}, entries={})
    for name, part in component_docs(blobs[STATE_BLOB], where).items():
        try:
            out.components[name], out.entries[name] = _decode_component(
                blobs, part, f"{where}:{name}", given.get(name, {})
            )
        except _MALFORMED as err:
            raise UnsafeCheckpointError(
                f"{where}: component {name!r} cannot be decoded ({type(err).__name__}: {err!s:.200})"
            ) from err
    out.in_place = {(name, index) for name, tensors in given.items() if name in out.components for index in tensors}
    return out


def _decode_component(
    blobs: Mapping[str, bytearray | memoryview], part: Any, where: str, given: Mapping[int, torch.Tensor]
) -> tuple[Any, list[TensorEntry]]:
    if not isinstance(part, dict) or not isinstance(part.get("tensors"), list):
        raise CorruptCheckpointError(f"{where}: the component is malformed")
    default_blob = part.get("blob")
    if default_blob is not None and not isinstance(default_blob, str):
        raise UnsafeCheckpointError(f"{where}: the component names a malformed blob")
    entries = [TensorEntry.from_json(e, default_blob) for e in part["tensors"]]
    for entry in entries:
        if any(seg.blob == STATE_BLOB or seg.blob not in blobs for seg in entry.segments):
            raise UnsafeCheckpointError(f"{where}: the component refers to a blob not in the manifest")
    cache: dict[int, torch.Tensor] = {}

    def tensor_at(i: int) -> torch.Tensor:
        if i >= len(entries):
            raise UnsafeCheckpointError(f"{where}: tensor reference {i} out of range")
        if i not in cache:
            cache[i] = given[i] if i in given else unpack(blobs, entries[i])
        return cache[i]

    return codec.decode(part.get("tree"), tensor_at, where), entries
