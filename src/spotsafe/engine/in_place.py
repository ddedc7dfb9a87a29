"""Restoring straight into the live tensors: which saved tensors are read into which live ones.

``torch.load`` + ``load_state_dict`` reads a checkpoint into fresh memory (every page faulted in) and then copies
it into the model. Like ``torch.distributed.checkpoint``, which loads in place, a restore can instead read the
bytes of a tensor straight into the memory of the live tensor that will hold them: no fresh memory, no copy.
The checksums still cover every byte: the reads are hashed in blob order as they land (the destinations are
just other memory), and the checkpoint counts as restored only once every blob has verified.

Which tensors (:class:`InPlacePlan`): a saved tensor and a live one at the same place in their component's
state (same keys, same dict and list positions), with the same dtype and shape, the live one a contiguous CPU
tensor in memory no other destination shares, and only tensors whose bytes training replaces anyway:

* the trainable parameters (``requires_grad``) of registered ``nn.Module`` components, and
* the tensors that the registered optimizer already holds (its moments, when it has taken a step).

Frozen parameters and buffers are read as before into the checkpoint's own memory, which then becomes the
staging slots of the next save (so a frozen backbone is not written again by the first save after a restart).
Tensors under :data:`MIN_BYTES` are not worth a destination of their own.

Safety: a destination holds unverified bytes until its checkpoint verifies, and damaged bytes when it does
not. ``restore()`` reads in place only where that cannot leak into training: with ``strict=True`` and
``on_damaged="fail"`` (the defaults). A damaged checkpoint then leads either to an older one, whose load
overwrites every such tensor (a strict ``load_state_dict`` copies every key; an optimizer replaces its state),
or to :class:`~spotsafe.errors.NoUsableCheckpointError`, which stops the run. A storage error that outlives
the retry budget also leaves ``restore()`` with tensors partly read: it propagates, and the state is whole
again only after another ``restore()`` (a relaunch by ``spotsafe run`` does one).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from spotsafe.errors import CorruptCheckpointError, StateError
from spotsafe.state import codec
from spotsafe.state.snapshot import STATE_BLOB, component_docs
from spotsafe.state.tensors import TensorEntry, dtype_name, tensor_bytes
from spotsafe.storage.manifest import Manifest
from spotsafe.storage.repository import Placement

MIN_BYTES = 64 * 1024
"""Smallest tensor read in place: below this, a destination of its own saves less than it costs."""


class _Intervals:
    """Disjoint ``[start, end)`` ranges; :meth:`add` refuses one that overlaps."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def free(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start)
        return (i == 0 or self._ends[i - 1] <= start) and (i == len(self._starts) or end <= self._starts[i])

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, end)


class InPlacePlan:
    """Where one checkpoint's tensors are read in place, for :meth:`CheckpointRepository.load`'s ``place``.

    ``live`` is every component's live ``state_dict()``; ``writable`` the data pointers of the tensors that
    may be written in place (see the module docstring). After :meth:`place`, :attr:`given` holds, per
    component, the saved tensor index and the live tensor it is read into (what
    :func:`~spotsafe.state.snapshot.decode_state` takes as ``given``).
    """

    first = STATE_BLOB

    def __init__(self, live: Mapping[str, Any], writable: set[int]) -> None:
        self.live = live
        self.writable = writable
        self.given: dict[str, dict[int, torch.Tensor]] = {}

    def place(self, manifest: Manifest, state_json: bytes | bytearray | memoryview) -> Placement:
        """The destinations of this checkpoint's tensors that can be read in place (none where ``state.json``
        cannot be read: decoding reports that)."""
        self.given = {}
        try:
            saved = component_docs(state_json, f"step {manifest.step}")
        except CorruptCheckpointError:
            return {}
        sizes = {b.ref: b.size for b in manifest.blobs if b.ref != STATE_BLOB}
        placement: dict[str, list[tuple[int, memoryview]]] = {}
        in_blobs: dict[str, _Intervals] = {}
        memory = _Intervals()
        for name, part in saved.items():
            if name not in self.live or not isinstance(part, dict):
                continue
            entries = _entries(part)
            if entries is None:
                continue
            tensors: list[torch.Tensor] = []
            try:
                live_doc = codec.encode(self.live[name], tensors)
            except StateError:
                continue
            for index, live_index in pair_tensors(part.get("tree"), live_doc):
                if index >= len(entries) or live_index >= len(tensors):
                    continue
                entry, tensor = entries[index], tensors[live_index]
                if not self._fits(entry, tensor):
                    continue
                segments = _segments(entry, sizes, in_blobs)
                start = tensor.data_ptr()
                if segments is None or not memory.free(start, start + entry.nbytes):
                    continue
                memory.add(start, start + entry.nbytes)
                view = tensor_bytes(tensor)
                at = 0
                for blob, offset, length in segments:
                    in_blobs.setdefault(blob, _Intervals()).add(offset, offset + length)
                    placement.setdefault(blob, []).append((offset, view[at : at + length]))
                    at += length
                self.given.setdefault(name, {})[index] = tensor
        return placement

    def _fits(self, entry: TensorEntry, tensor: torch.Tensor) -> bool:
        return (
            entry.nbytes >= MIN_BYTES
            and tensor.device.type == "cpu"
            and tensor.layout == torch.strided
            and tensor.is_contiguous()
            and not tensor.is_conj()
            and not tensor.is_neg()
            and tensor.data_ptr() in self.writable
            and dtype_name(tensor.dtype) == entry.dtype
            and tuple(tensor.shape) == entry.shape
            and tensor.numel() * tensor.element_size() == entry.nbytes
        )


def _entries(part: Mapping[str, Any]) -> list[TensorEntry] | None:
    raw, blob = part.get("tensors"), part.get("blob")
    if not isinstance(raw, list) or (blob is not None and not isinstance(blob, str)):
        return None
    try:
        return [TensorEntry.from_json(e, blob) for e in raw]
    except CorruptCheckpointError:
        return None


def _segments(
    entry: TensorEntry, sizes: Mapping[str, int], taken: Mapping[str, _Intervals]
) -> list[tuple[str, int, int]] | None:
    """The entry's segments as ``(blob, offset, length)``, if each lies inside a listed blob, clear of the
    destinations placed so far and of the entry's other segments."""
    mine: dict[str, _Intervals] = {}
    out = []
    for seg in entry.segments:
        end = seg.offset + seg.length
        if seg.blob not in sizes or end > sizes[seg.blob]:
            return None
        if seg.blob in taken and not taken[seg.blob].free(seg.offset, end):
            return None
        own = mine.setdefault(seg.blob, _Intervals())
        if not own.free(seg.offset, end):
            return None
        own.add(seg.offset, end)
        out.append((seg.blob, seg.offset, seg.length))
    return out


def pair_tensors(saved: Any, live: Any) -> Iterable[tuple[int, int]]:
    """``(saved index, live index)`` of the tensors at the same place in two tagged JSON trees
    (:mod:`spotsafe.state.codec`): same dict keys, same list positions. ``saved`` is untrusted; each live
    tensor is paired at most once."""
    used: set[int] = set()
    for i, j in _walk(saved, live):
        if j not in used:
            used.add(j)
            yield i, j


def _walk(saved: Any, live: Any) -> Iterable[tuple[int, int]]:
    if isinstance(saved, list) and isinstance(live, list):
        for s, v in zip(saved, live, strict=False):
            yield from _walk(s, v)
        return
    if not isinstance(saved, dict) or not isinstance(live, dict):
        return
    s_tags = {k for k in saved if isinstance(k, str) and k.startswith("$")}
    l_tags = {k for k in live if k.startswith("$")}
    if s_tags != l_tags:
        return
    if s_tags == {"$tensor"}:
        index = saved["$tensor"]
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            yield index, live["$tensor"]
        return
    if s_tags == {"$tuple"}:
        yield from _walk(saved["$tuple"], live["$tuple"])
        return
    for tag in ("$odict", "$dict"):
        if tag in s_tags:
            by_key = {_key(k): v for k, v in live[tag]}
            for pair in saved[tag] if isinstance(saved[tag], list) else ():
                if isinstance(pair, list) and len(pair) == 2 and _key(pair[0]) in by_key:
                    yield from _walk(pair[1], by_key[_key(pair[0])])
            return
    if not s_tags:
        for key, value in saved.items():
            if key in live:
                yield from _walk(value, live[key])


def _key(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True)


def writable_memory(objects: Iterable[object]) -> set[int]:
    """Data pointers of the tensors training replaces anyway: trainable parameters of the modules among
    ``objects``, and the tensors the optimizers among them hold."""
    out: set[int] = set()
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            out.update(p.data_ptr() for p in obj.parameters() if p.requires_grad and p.numel())
        elif isinstance(obj, torch.optim.Optimizer):
            for per_param in obj.state.values():
                out.update(v.data_ptr() for v in per_param.values() if isinstance(v, torch.Tensor) and v.numel())
    return out
