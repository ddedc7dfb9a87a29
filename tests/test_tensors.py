"""Packing tensors into aligned blobs and reading them back (one or several segments), and refusing bad entries."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from spotsafe.errors import UnsafeCheckpointError
from spotsafe.state.tensors import ALIGN, Segment, TensorEntry, dtype_from_name, dtype_name, pack, plan, unpack

_G = torch.Generator().manual_seed(11)

BLOB = "model.bin"


def _make(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape, generator=_G) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=_G, dtype=dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=_G) * 4).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(low, high, shape, generator=_G, dtype=torch.int64).to(dtype)


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _blob(tensors: list[torch.Tensor]) -> tuple[list[TensorEntry], dict[str, bytearray], int]:
    """Pack ``tensors`` into blob :data:`BLOB`; return the entries, ``{BLOB: bytes}`` and the planned size."""
    entries, size = plan(tensors, BLOB)
    blob = bytearray(b"".join(bytes(chunk) for chunk in pack(tensors, entries)))
    return entries, {BLOB: blob}, size


def _entry(offset: int, nbytes: int, dtype: str, shape: tuple[int, ...], blob: str = BLOB) -> TensorEntry:
    """An entry of one segment (what a fully written tensor has)."""
    return TensorEntry(nbytes=nbytes, dtype=dtype, shape=shape, segments=(Segment(blob, offset, nbytes),))


DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    *[getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)],
]
SHAPES = [(), (1,), (7,), (3, 5), (2, 3, 4), (0,), (4, 0, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_every_dtype_and_shape(dtype: torch.dtype) -> None:
    tensors = [_make(dtype, shape) for shape in SHAPES]
    entries, blobs, _ = _blob(tensors)
    assert len(blobs[BLOB]) == max(e.offset + e.nbytes for e in entries)
    for tensor, entry in zip(tensors, entries, strict=True):
        assert entry.dtype == dtype_name(dtype)
        assert entry.shape == tuple(tensor.shape)
        assert entry.nbytes == tensor.numel() * tensor.element_size()
        if entry.nbytes:
            assert entry.segments == (Segment(BLOB, entry.offset, entry.nbytes),)
        else:
            assert entry.segments == ()
        out = unpack(blobs, entry)
        assert out.dtype == dtype
        assert out.shape == tensor.shape
        assert _raw(out) == _raw(tensor)


def test_plan_names_the_blob_in_every_segment() -> None:
    entries, _ = plan([torch.ones(3), torch.ones(2, dtype=torch.int8)], "optimizer.bin")
    assert [s.blob for e in entries for s in e.segments] == ["optimizer.bin", "optimizer.bin"]
    default, _ = plan([torch.ones(3)])
    assert default[0].segments == (Segment("", 0, 12),)


def test_mixed_dtypes_in_one_blob_and_views() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = [
        torch.tensor([1], dtype=torch.int8),  # 1 byte, so the next offset needs padding
        base.t(),
        base[:, 1::2],
        torch.arange(3, dtype=torch.int16).expand(5, 3),
        torch.tensor(2.5, dtype=torch.float64),
        torch.ones(3, dtype=torch.bfloat16),
        torch.empty(0, dtype=torch.complex64),
        torch.tensor([True, False, True]),
    ]
    entries, blobs, _ = _blob(tensors)
    for tensor, entry in zip(tensors, entries, strict=True):
        out = unpack(blobs, entry)
        assert torch.equal(out, tensor)
        assert out.is_contiguous()


def test_one_aligned_segment_views_the_blob_without_copying() -> None:
    entries, blobs, _ = _blob([torch.arange(5, dtype=torch.float32), torch.arange(4, dtype=torch.int64)])
    out = unpack(blobs, entries[1])
    assert out.tolist() == [0, 1, 2, 3]
    blobs[BLOB][entries[1].offset] = 9  # the blob's memory is the tensor's memory
    assert out[0].item() == 9


def test_offsets_are_aligned_and_do_not_overlap() -> None:
    sizes = [1, 3, 17, 64, 65, 0, 100, 5]
    tensors = [torch.ones(n, dtype=torch.uint8) * (i + 1) for i, n in enumerate(sizes)]
    tensors.append(torch.ones(3, dtype=torch.float64))
    entries, blobs, size = _blob(tensors)
    blob = blobs[BLOB]
    assert all(e.offset % ALIGN == 0 for e in entries)
    assert all(len(e.segments) == (1 if e.nbytes else 0) for e in entries)
    for before, after in itertools.pairwise(e for e in entries if e.nbytes):
        assert after.offset >= before.offset + before.nbytes
        assert after.offset - (before.offset + before.nbytes) < ALIGN
    assert size == entries[-1].offset + entries[-1].nbytes
    # Padding is zero and every tensor's bytes are where the index says.
    covered = bytearray(len(blob))
    for tensor, entry in zip(tensors, entries, strict=True):
        assert bytes(blob[entry.offset : entry.offset + entry.nbytes]) == _raw(tensor)
        covered[entry.offset : entry.offset + entry.nbytes] = b"\x01" * entry.nbytes
    assert all(blob[i] == 0 for i in range(len(blob)) if not covered[i])


@pytest.mark.parametrize(
    "shapes",
    [[(3,), (1,)], [(1,), (0,), (5,)], [(0,), (4, 0, 2)], [(0,)], [(7,), (3, 5), (2, 3, 4)]],
    ids=repr,
)
def test_planned_size_is_the_packed_size(shapes: list[tuple[int, ...]]) -> None:
    tensors = [_make(torch.int8, shape) for shape in shapes]
    _, blobs, size = _blob(tensors)
    assert size == len(blobs[BLOB])


@pytest.mark.parametrize("shapes", [[(1,), (0,)], [(3, 5), (0,), (4, 0, 2)], SHAPES], ids=repr)
def test_planned_size_ignores_trailing_empty_tensors(shapes: list[tuple[int, ...]]) -> None:
    tensors = [_make(torch.int8, shape) for shape in shapes]
    _, blobs, size = _blob(tensors)
    assert size == len(blobs[BLOB])


def test_empty_list_plans_an_empty_blob() -> None:
    entries, size = plan([])
    assert entries == [] and size == 0
    assert list(pack([], [])) == []


# -- several segments ------------------------------------------------------------------


def test_several_segments_in_several_blobs_are_assembled_in_order() -> None:
    values = torch.arange(10, dtype=torch.float64)
    raw = _raw(values)
    # Bytes 0-23 in "old", 24-55 in "new", 56-79 back in "old", at odd (unaligned) offsets.
    old = bytearray(b"\xee" * 3 + raw[:24] + b"\xee" * 5 + raw[56:] + b"\xee")
    new = bytearray(b"\xdd" * 7 + raw[24:56])
    entry = TensorEntry(
        nbytes=80,
        dtype="float64",
        shape=(2, 5),
        segments=(Segment("g1/old.bin", 3, 24), Segment("new.bin", 7, 32), Segment("g1/old.bin", 32, 24)),
    )
    blobs = {"g1/old.bin": old, "new.bin": new}
    out = unpack(blobs, entry)
    assert out.shape == (2, 5) and out.dtype == torch.float64
    assert _raw(out) == raw
    old[3] ^= 0xFF  # assembled into new memory: later changes to the blobs do not show
    assert _raw(out) == raw


def test_segments_split_inside_an_element() -> None:
    values = torch.tensor([1.5, -2.25, 3.0], dtype=torch.float32)
    raw = _raw(values)
    blobs = {"a": bytearray(raw[:5]), "b": bytearray(b"\x00" + raw[5:])}
    entry = TensorEntry(nbytes=12, dtype="float32", shape=(3,), segments=(Segment("a", 0, 5), Segment("b", 1, 7)))
    assert torch.equal(unpack(blobs, entry), values)


def test_multi_segment_entry_json_round_trip() -> None:
    entry = TensorEntry(
        nbytes=3 << 20,
        dtype="float32",
        shape=(3, 1 << 18),
        segments=(
            Segment("g000001-step-000000000007-1763869512345-9f2c/model.bin", 0, 1 << 20),
            Segment("model.bin", 64, 2 << 20),
        ),
    )
    doc = entry.to_json()
    assert doc["segments"] == [
        ["g000001-step-000000000007-1763869512345-9f2c/model.bin", 0, 1 << 20],
        ["model.bin", 64, 2 << 20],
    ]
    assert "offset" not in doc
    assert TensorEntry.from_json(doc) == entry
    assert TensorEntry.from_json(doc, "other.bin") == entry, "a format-2 entry ignores the default blob"


@pytest.mark.parametrize(
    "segments",
    [
        [["a", 0, 4], ["b", 0, 4]],  # 8 of 12 bytes
        [["a", 0, 8], ["b", 0, 8]],  # 16 of 12
        [["a", 0, 12], ["b", 0, 4]],
        [],
    ],
    ids=repr,
)
def test_from_json_rejects_segments_that_do_not_sum_to_nbytes(segments: list[Any]) -> None:
    with pytest.raises(UnsafeCheckpointError, match="segments hold"):
        TensorEntry.from_json({"nbytes": 12, "dtype": "float32", "shape": [3], "segments": segments})


@pytest.mark.parametrize(
    "segments",
    [(Segment("a", 0, 4), Segment("a", 16, 4)), ()],
    ids=["short", "none"],
)
def test_unpack_rejects_segments_that_do_not_sum_to_nbytes(segments: tuple[Segment, ...]) -> None:
    blobs = {"a": bytearray(_raw(torch.arange(8, dtype=torch.float32)))}
    with pytest.raises(UnsafeCheckpointError):
        unpack(blobs, TensorEntry(nbytes=12, dtype="float32", shape=(3,), segments=segments))


def test_unpack_rejects_segments_of_a_blob_not_in_the_manifest() -> None:
    raw = _raw(torch.arange(4, dtype=torch.int32))
    blobs = {"model.bin": bytearray(raw)}
    good = TensorEntry(16, "int32", (4,), (Segment("model.bin", 0, 8), Segment("model.bin", 8, 8)))
    assert unpack(blobs, good).tolist() == [0, 1, 2, 3]
    for entry in (
        TensorEntry(16, "int32", (4,), (Segment("model.bin", 0, 8), Segment("g1/model.bin", 8, 8))),
        TensorEntry(16, "int32", (4,), (Segment("g1/model.bin", 0, 16),)),
        TensorEntry(16, "int32", (4,), (Segment("", 0, 16),)),
    ):
        with pytest.raises(UnsafeCheckpointError, match="does not list"):
            unpack(blobs, entry)


def test_unpack_rejects_a_segment_that_overruns_its_blob_among_several() -> None:
    blobs = {"a": bytearray(8), "b": bytearray(8)}
    ok = TensorEntry(12, "float32", (3,), (Segment("a", 0, 8), Segment("b", 4, 4)))
    assert unpack(blobs, ok).tolist() == [0.0, 0.0, 0.0]
    for bad in (
        TensorEntry(12, "float32", (3,), (Segment("a", 0, 8), Segment("b", 5, 4))),
        TensorEntry(12, "float32", (3,), (Segment("a", 4, 8), Segment("b", 0, 4))),
        TensorEntry(12, "float32", (3,), (Segment("a", 0, 4), Segment("b", 8, 8))),
    ):
        with pytest.raises(UnsafeCheckpointError, match="overruns"):
            unpack(blobs, bad)


# -- JSON --------------------------------------------------------------------------------


def test_entry_json_round_trip() -> None:
    entry = _entry(128, 24, "float32", (2, 3))
    doc = entry.to_json()
    assert doc == {"nbytes": 24, "dtype": "float32", "shape": [2, 3], "segments": [[BLOB, 128, 24]]}
    assert TensorEntry.from_json(doc) == entry
    empty = TensorEntry(nbytes=0, dtype="float32", shape=(0, 3), segments=())
    assert TensorEntry.from_json(empty.to_json()) == empty


def test_format_1_entries_parse_as_one_segment_of_the_default_blob() -> None:
    doc = {"offset": 128, "nbytes": 24, "dtype": "float32", "shape": [2, 3]}
    assert TensorEntry.from_json(doc, BLOB) == _entry(128, 24, "float32", (2, 3))
    scalar = TensorEntry.from_json({"offset": 0, "nbytes": 4, "dtype": "int32", "shape": []}, BLOB)
    assert scalar.shape == () and scalar.segments == (Segment(BLOB, 0, 4),)
    # An empty tensor has no bytes and so no segment (and needs no blob).
    empty = TensorEntry.from_json({"offset": 64, "nbytes": 0, "dtype": "int8", "shape": [0]})
    assert empty.segments == () and empty.offset == 0
    # A format-1 entry with bytes but no blob to put them in is refused.
    with pytest.raises(UnsafeCheckpointError, match="no blob"):
        TensorEntry.from_json({"offset": 0, "nbytes": 4, "dtype": "int32", "shape": []})


def test_a_format_1_entry_reads_the_same_bytes_as_before() -> None:
    tensors = [torch.arange(7, dtype=torch.int16), torch.randn(3, 2, generator=_G, dtype=torch.float64)]
    entries, blobs, _ = _blob(tensors)
    for tensor, entry in zip(tensors, entries, strict=True):
        old = {"offset": entry.offset, "nbytes": entry.nbytes, "dtype": entry.dtype, "shape": list(entry.shape)}
        assert _raw(unpack(blobs, TensorEntry.from_json(old, BLOB))) == _raw(tensor)


def _entry_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"offset": 0, "nbytes": 12, "dtype": "float32", "shape": [3]}
    doc.update(changes)
    return doc


def _segment_doc(segments: Any, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"nbytes": 12, "dtype": "float32", "shape": [3], "segments": segments}
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        None,
        [0, 12, "float32", [3]],
        "offset",
        _entry_doc(offset=True),
        _entry_doc(nbytes=False),
        _entry_doc(offset=-64),
        _entry_doc(nbytes=-1),
        _entry_doc(offset="0"),
        _entry_doc(offset=0.0),
        _entry_doc(offset=None),
        _entry_doc(nbytes=None),
        _entry_doc(shape="3"),
        _entry_doc(shape=3),
        _entry_doc(shape=None),
        _entry_doc(shape=[True]),
        _entry_doc(shape=[-1]),
        _entry_doc(shape=[3.0]),
        _entry_doc(shape=[[3]]),
        _entry_doc(dtype=5),
        _entry_doc(dtype=None),
        {"offset": 0, "nbytes": 12, "dtype": "float32"},
        _segment_doc("model.bin"),
        _segment_doc({"model.bin": [0, 12]}),
        _segment_doc([["model.bin", 0]]),
        _segment_doc([["model.bin", 0, 12, 0]]),
        _segment_doc([("model.bin", 0, 12)]),
        _segment_doc([[5, 0, 12]]),
        _segment_doc([[None, 0, 12]]),
        _segment_doc([["model.bin", -64, 12]]),
        _segment_doc([["model.bin", "0", 12]]),
        _segment_doc([["model.bin", 0.0, 12]]),
        _segment_doc([["model.bin", True, 12]]),
        _segment_doc([["model.bin", 0, 12.0]]),
        _segment_doc([["model.bin", 0, 0], ["model.bin", 0, 12]]),
        _segment_doc([["model.bin", 0, -4], ["model.bin", 0, 16]]),
        _segment_doc([["model.bin", 0, 12]], nbytes="12"),
    ],
    ids=repr,
)
def test_from_json_rejects_malformed_entries(doc: Any) -> None:
    with pytest.raises(UnsafeCheckpointError):
        TensorEntry.from_json(doc, BLOB)


def test_from_json_rejects_a_tuple_shape() -> None:
    with pytest.raises(UnsafeCheckpointError):
        TensorEntry.from_json({"offset": 0, "nbytes": 12, "dtype": "float32", "shape": (3,)}, BLOB)
    with pytest.raises(UnsafeCheckpointError):
        TensorEntry.from_json(_segment_doc([[BLOB, 0, 12]], shape=(3,)))


# -- rejecting bad entries at unpack -----------------------------------------------------


def _one_float_blob() -> tuple[TensorEntry, dict[str, bytearray]]:
    entries, blobs, _ = _blob([torch.arange(6, dtype=torch.float32), torch.arange(3, dtype=torch.float32)])
    return entries[1], blobs


@pytest.mark.parametrize(
    "change",
    [
        {"nbytes": 8},  # 3 float32 need 12
        {"nbytes": 16},
        {"shape": (4,)},
        {"shape": (3, 2)},
        {"dtype": "float64"},  # 3 x 8 bytes != 12
        {"dtype": "bool"},
    ],
    ids=repr,
)
def test_unpack_rejects_size_that_does_not_match_shape_and_dtype(change: dict[str, Any]) -> None:
    entry, blobs = _one_float_blob()
    fields: dict[str, Any] = {
        "offset": entry.offset,
        "nbytes": entry.nbytes,
        "dtype": entry.dtype,
        "shape": entry.shape,
    }
    fields.update(change)
    with pytest.raises(UnsafeCheckpointError):
        unpack(blobs, _entry(**fields))
    # The same mismatch is refused when the bytes come in several segments.
    half = fields["nbytes"] // 2
    split = (Segment(BLOB, entry.offset, half), Segment(BLOB, entry.offset + half, fields["nbytes"] - half))
    with pytest.raises(UnsafeCheckpointError):
        unpack(blobs, TensorEntry(fields["nbytes"], fields["dtype"], fields["shape"], split))


def test_unpack_rejects_entries_that_overrun_the_blob() -> None:
    entry, blobs = _one_float_blob()
    blob = blobs[BLOB]
    assert unpack(blobs, entry).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(UnsafeCheckpointError):
        unpack(blobs, _entry(len(blob) - 8, 12, "float32", (3,)))
    with pytest.raises(UnsafeCheckpointError):
        unpack(blobs, _entry(len(blob), 4, "float32", (1,)))
    with pytest.raises(UnsafeCheckpointError):
        unpack({BLOB: blob[:-1]}, entry)
    with pytest.raises(UnsafeCheckpointError):
        unpack({BLOB: bytearray()}, _entry(0, 4, "int32", ()))


def test_unpack_rejects_misaligned_offsets() -> None:
    _, blobs = _one_float_blob()
    with pytest.raises(UnsafeCheckpointError, match="misaligned"):
        unpack(blobs, _entry(2, 8, "float32", (2,)))
    with pytest.raises(UnsafeCheckpointError, match="misaligned"):
        unpack(blobs, _entry(4, 8, "float64", (1,)))


@pytest.mark.parametrize("name", ["object", "float128", "torch.float32", "FloatTensor", "", "qint8", "__class__"])
def test_unknown_dtype_names_are_refused(name: str) -> None:
    _, blobs = _one_float_blob()
    with pytest.raises(UnsafeCheckpointError):
        unpack(blobs, _entry(0, 4, name, (1,)))
    with pytest.raises(UnsafeCheckpointError):
        dtype_from_name(name)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unsupported_dtype_cannot_be_planned() -> None:
    with pytest.raises(UnsafeCheckpointError):
        plan([torch.zeros(2, dtype=torch.complex32)])


def test_dtype_names_round_trip() -> None:
    for dtype in DTYPES:
        assert dtype_from_name(dtype_name(dtype)) is dtype


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),
        lambda: torch.tensor([1.0, -2.0])._neg_view(),
    ],
    ids=["conj", "neg"],
)
def test_conjugate_and_negative_views_pack_their_values(make: Any) -> None:
    tensor = make()
    entries, blobs, _ = _blob([tensor])
    assert torch.equal(unpack(blobs, entries[0]), tensor.resolve_conj().resolve_neg())
