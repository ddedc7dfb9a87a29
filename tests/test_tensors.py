"""Packing tensors into one aligned blob and reading them back, and refusing bad index entries."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from spotsafe.errors import UnsafeCheckpointError
from spotsafe.state.tensors import ALIGN, TensorEntry, dtype_from_name, dtype_name, pack, plan, unpack

_G = torch.Generator().manual_seed(11)


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


def _blob(tensors: list[torch.Tensor]) -> tuple[list[TensorEntry], bytearray, int]:
    entries, size = plan(tensors)
    blob = bytearray(b"".join(bytes(chunk) for chunk in pack(tensors, entries)))
    return entries, blob, size


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
    entries, blob, size = _blob(tensors)
    assert len(blob) == size
    for tensor, entry in zip(tensors, entries, strict=True):
        assert entry.dtype == dtype_name(dtype)
        assert entry.shape == tuple(tensor.shape)
        assert entry.nbytes == tensor.numel() * tensor.element_size()
        out = unpack(blob, entry)
        assert out.dtype == dtype
        assert out.shape == tensor.shape
        assert _raw(out) == _raw(tensor)


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
    entries, blob, _ = _blob(tensors)
    for tensor, entry in zip(tensors, entries, strict=True):
        out = unpack(blob, entry)
        assert torch.equal(out, tensor)
        assert out.is_contiguous()


def test_offsets_are_aligned_and_do_not_overlap() -> None:
    sizes = [1, 3, 17, 64, 65, 0, 100, 5]
    tensors = [torch.ones(n, dtype=torch.uint8) * (i + 1) for i, n in enumerate(sizes)]
    tensors.append(torch.ones(3, dtype=torch.float64))
    entries, blob, size = _blob(tensors)
    assert all(e.offset % ALIGN == 0 for e in entries)
    for before, after in itertools.pairwise(entries):
        assert after.offset >= before.offset + before.nbytes
        assert after.offset - (before.offset + before.nbytes) < ALIGN
    assert size == entries[-1].offset + entries[-1].nbytes
    # Padding is zero and every tensor's bytes are where the index says.
    covered = bytearray(len(blob))
    for tensor, entry in zip(tensors, entries, strict=True):
        assert bytes(blob[entry.offset : entry.offset + entry.nbytes]) == _raw(tensor)
        covered[entry.offset : entry.offset + entry.nbytes] = b"\x01" * entry.nbytes
    assert all(blob[i] == 0 for i in range(len(blob)) if not covered[i])


def test_empty_list_plans_an_empty_blob() -> None:
    entries, size = plan([])
    assert entries == [] and size == 0
    assert list(pack([], [])) == []


def test_entry_json_round_trip() -> None:
    entry = TensorEntry(offset=128, nbytes=24, dtype="float32", shape=(2, 3))
    assert TensorEntry.from_json(entry.to_json()) == entry
    assert TensorEntry.from_json({"offset": 0, "nbytes": 4, "dtype": "int32", "shape": []}).shape == ()


def _entry_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"offset": 0, "nbytes": 12, "dtype": "float32", "shape": [3]}
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
    ],
    ids=repr,
)
def test_from_json_rejects_malformed_entries(doc: Any) -> None:
    with pytest.raises(UnsafeCheckpointError):
        TensorEntry.from_json(doc)


def test_from_json_rejects_a_tuple_shape() -> None:
    with pytest.raises(UnsafeCheckpointError):
        TensorEntry.from_json({"offset": 0, "nbytes": 12, "dtype": "float32", "shape": (3,)})


def _one_float_blob() -> tuple[TensorEntry, bytearray]:
    entries, blob, _ = _blob([torch.arange(6, dtype=torch.float32), torch.arange(3, dtype=torch.float32)])
    return entries[1], blob


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
    entry, blob = _one_float_blob()
    fields = {"offset": entry.offset, "nbytes": entry.nbytes, "dtype": entry.dtype, "shape": entry.shape}
    fields.update(change)
    with pytest.raises(UnsafeCheckpointError):
        unpack(blob, TensorEntry(**fields))


def test_unpack_rejects_entries_that_overrun_the_blob() -> None:
    entry, blob = _one_float_blob()
    assert unpack(blob, entry).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(UnsafeCheckpointError):
        unpack(blob, TensorEntry(offset=len(blob) - 8, nbytes=12, dtype="float32", shape=(3,)))
    with pytest.raises(UnsafeCheckpointError):
        unpack(blob, TensorEntry(offset=len(blob), nbytes=4, dtype="float32", shape=(1,)))
    with pytest.raises(UnsafeCheckpointError):
        unpack(blob[:-1], entry)
    with pytest.raises(UnsafeCheckpointError):
        unpack(bytearray(), TensorEntry(offset=0, nbytes=4, dtype="int32", shape=()))


def test_unpack_rejects_misaligned_offsets() -> None:
    _, blob = _one_float_blob()
    with pytest.raises(UnsafeCheckpointError):
        unpack(blob, TensorEntry(offset=2, nbytes=8, dtype="float32", shape=(2,)))


@pytest.mark.parametrize("name", ["object", "float128", "torch.float32", "FloatTensor", "", "qint8", "__class__"])
def test_unknown_dtype_names_are_refused(name: str) -> None:
    _, blob = _one_float_blob()
    with pytest.raises(UnsafeCheckpointError):
        unpack(blob, TensorEntry(offset=0, nbytes=4, dtype=name, shape=(1,)))
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
    entries, blob, _ = _blob([tensor])
    assert torch.equal(unpack(blob, entries[0]), tensor.resolve_conj().resolve_neg())
