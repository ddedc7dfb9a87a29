"""The no-pickle state codec: exact round trips, and refusal of anything it does not know."""

from __future__ import annotations

import base64
import builtins
import importlib
import json
import math
import os
import pickle
import struct
import sys
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from spotsafe.errors import StateError, UnsafeCheckpointError
from spotsafe.state import codec
from spotsafe.state.compare import differences
from spotsafe.state.snapshot import STATE_BLOB, Snapshot, restore_components
from spotsafe.state.tensors import pack, plan, unpack


def roundtrip(tree: Any) -> Any:
    """encode -> JSON text (strict, as a checkpoint writes it) -> packed blob -> decode."""
    tensors: list[torch.Tensor] = []
    doc = codec.encode(tree, tensors)
    text = json.dumps(doc, allow_nan=False)
    entries, size = plan(tensors)
    blob = bytearray(b"".join(bytes(chunk) for chunk in pack(tensors, entries)))
    assert len(blob) == size
    return codec.decode(json.loads(text), lambda i: unpack({"": blob}, entries[i]))


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def never_called(i: int) -> torch.Tensor:
    raise AssertionError(f"decode asked for tensor {i} of a document it should have refused")


# -- containers and keys --------------------------------------------------------------------------------------------


def test_tuples_and_lists_keep_their_type() -> None:
    tree = {"t": (1, 2), "l": [1, 2], "nested": [(1, [2, (3, ())]), []], "empty_t": (), "empty_l": []}
    out = roundtrip(tree)
    assert out == tree
    assert type(out["t"]) is tuple
    assert type(out["l"]) is list
    assert type(out["nested"][0]) is tuple
    assert type(out["nested"][0][1]) is list
    assert type(out["nested"][0][1][1]) is tuple
    assert out["empty_t"] == () and type(out["empty_t"]) is tuple
    assert differences(tree, out) == []


def test_non_string_dict_keys_keep_their_type() -> None:
    tree = {0: "zero", 1: {"x": 1}, -5: [2], "0": "string zero", (1, 2): "tuple key", None: "none key", 2.5: "f"}
    out = roundtrip(tree)
    assert out == tree
    assert list(out) == list(tree)
    assert [type(k) for k in out] == [type(k) for k in tree]
    assert out[0] == "zero" and out["0"] == "string zero"
    assert differences(tree, out) == []


def test_dict_keys_starting_with_dollar_are_not_mistaken_for_tags() -> None:
    tree = {
        "$tensor": 0,
        "$pickle": "x",
        "$": None,
        "plain": {"$dict": 5, "$class": "os.system"},
        "deeper": [{"$float": "nan"}, {"$tuple": [1, 2]}],
    }
    out = roundtrip(tree)
    assert out == tree
    assert type(out["deeper"][0]["$float"]) is str
    assert type(out["deeper"][1]["$tuple"]) is list


def test_ordered_dict_and_metadata_are_preserved() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    state = model.state_dict()
    assert isinstance(state, OrderedDict) and state._metadata  # type: ignore[attr-defined]
    out = roundtrip(state)
    assert type(out) is OrderedDict
    assert list(out) == list(state)
    assert out._metadata == state._metadata
    assert differences(state, out) == []
    fresh = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    fresh.load_state_dict(out)
    assert differences(fresh.state_dict(), state) == []


def test_ordered_dict_without_metadata_and_order_is_kept() -> None:
    tree = OrderedDict([("b", 1), ("a", 2), (3, "int key")])
    out = roundtrip(tree)
    assert type(out) is OrderedDict
    assert list(out.items()) == list(tree.items())
    assert not hasattr(out, "_metadata")
    # A plain dict stays a plain dict.
    assert type(roundtrip({"b": 1, "a": 2})) is dict


# -- scalars ----------------------------------------------------------------------------------------------------------


def test_floats_round_trip_bit_exactly_including_non_finite_and_negative_zero() -> None:
    values = [-0.0, 0.0, math.inf, -math.inf, 5e-324, 1.7976931348623157e308, 0.1, 1 / 3, -2.5e-310]
    out = roundtrip(values)
    assert [bits(v) for v in out] == [bits(v) for v in values]
    assert all(type(v) is float for v in out)
    nan = roundtrip(math.nan)
    assert type(nan) is float and math.isnan(nan)
    assert differences([*values, math.nan], [*out, nan]) == []


def test_non_finite_floats_use_tags_not_invalid_json() -> None:
    doc = codec.encode({"a": math.nan, "b": math.inf, "c": -math.inf}, [])
    json.dumps(doc, allow_nan=False)  # would raise on a bare nan/inf
    assert doc == {"a": {"$float": "nan"}, "b": {"$float": "inf"}, "c": {"$float": "-inf"}}


def test_ints_bools_none_strings() -> None:
    tree = [0, -1, 2**80, -(2**70), True, False, None, "", "héllo\n\x00"]
    out = roundtrip(tree)
    assert out == tree
    assert [type(v) for v in out] == [type(v) for v in tree]


@pytest.mark.parametrize(
    "value",
    [
        np.float32(1.1),
        np.float32(-0.0),
        np.float32(np.inf),
        np.float32(np.nan),
        np.float16(0.333),
        np.float64(-0.0),
        np.float64(np.nan),
        np.int8(-3),
        np.int16(-300),
        np.int32(2**31 - 1),
        np.int64(-(2**63)),
        np.uint8(255),
        np.uint16(65535),
        np.uint32(2**32 - 1),
        np.uint64(2**64 - 1),
        np.bool_(True),
        np.bool_(False),
    ],
    ids=lambda v: f"{type(v).__name__}({v})",
)
def test_numpy_scalars_keep_type_and_bits(value: np.generic) -> None:
    out = roundtrip(value)
    assert type(out) is type(value)
    assert out.tobytes() == value.tobytes()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([np.nan, -0.0, np.inf], dtype=np.float64),
        np.arange(10, dtype=np.int64)[::3],
        np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
        np.array([7], dtype=np.uint32),
        np.zeros((0, 4), dtype=np.float16),
        np.array([True, False, True]),
        np.array([2**64 - 1, 0], dtype=np.uint64),
        np.array([-1, 1], dtype=np.int8),
    ],
    ids=lambda a: f"{a.dtype}{list(a.shape)}",
)
def test_numpy_arrays_round_trip(array: np.ndarray) -> None:
    out = roundtrip({"a": array})["a"]
    assert type(out) is np.ndarray
    assert out.dtype == array.dtype
    assert out.shape == array.shape
    assert out.tobytes() == array.tobytes()


def test_dtypes_devices_and_bytes() -> None:
    tree = {
        "dtypes": [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool, torch.uint8, torch.complex64],
        "devices": [torch.device("cpu"), torch.device("cuda:1"), torch.device("cuda"), torch.device("meta")],
        "bytes": [b"", bytes(range(256)) * 3, b"\x00"],
    }
    out = roundtrip(tree)
    assert out == tree
    assert all(isinstance(d, torch.dtype) for d in out["dtypes"])
    assert all(isinstance(d, torch.device) for d in out["devices"])
    assert out["devices"][2].index is None
    assert all(type(b) is bytes for b in out["bytes"])


# -- tensors ----------------------------------------------------------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 5, generator=g)
    with_specials = torch.tensor([math.nan, -0.0, math.inf, -math.inf, 1e-45])
    return {
        "float32": base,
        "float32_specials": with_specials,
        "float64": torch.randn(3, generator=g, dtype=torch.float64),
        "bfloat16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "float16": torch.randn(5, generator=g).to(torch.float16),
        "int64": torch.randint(-(2**62), 2**62, (6,), generator=g, dtype=torch.int64),
        "int32": torch.randint(-100, 100, (2, 2), generator=g, dtype=torch.int32),
        "int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "uint8": torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8),
        "complex64": torch.randn(3, generator=g, dtype=torch.complex64),
        "complex128": torch.randn(2, generator=g, dtype=torch.complex128),
        "zero_dim": torch.tensor(3.5),
        "zero_dim_int": torch.tensor(9, dtype=torch.int64),
        "empty": torch.empty(0, 3),
        "empty_bool": torch.empty(2, 0, dtype=torch.bool),
        "transposed": base.t(),
        "strided_slice": base[:, ::2],
        "expanded": torch.arange(3.0).expand(4, 3),
        "narrowed": base[1:3, 2:],
    }


def test_tensors_of_many_dtypes_and_layouts_round_trip_exactly() -> None:
    tensors = _tensors()
    tree = {"flat": tensors, "nested": [{"deep": (tensors["transposed"], [tensors["bfloat16"]])}]}
    out = roundtrip(tree)
    assert differences(tree, out, limit=100) == []
    for name, t in tensors.items():
        got = out["flat"][name]
        assert got.dtype == t.dtype, name
        assert got.shape == t.shape, name
        if t.is_floating_point() or t.is_complex():
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.contiguous().reshape(-1).view(torch.uint8)), name
        else:
            assert torch.equal(got, t), name
    assert torch.equal(out["nested"][0]["deep"][0], tensors["transposed"])


def test_tensor_bytes_are_compared_bitwise_by_differences() -> None:
    # The comparison used in these tests must itself see a one-bit change and a -0.0/0.0 swap.
    a = torch.tensor([0.0, 1.0])
    assert differences(a, torch.tensor([-0.0, 1.0])) != []
    assert differences([0.0], [-0.0]) != []
    assert differences([math.nan], [math.nan]) == []
    assert differences({"x": (1, 2)}, {"x": [1, 2]}) != []
    assert differences({0: 1}, {"0": 1}) != []


def test_snapshot_blobs_restore_the_same_state() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    states = {"model": model.state_dict(), "optimizer": opt.state_dict(), "extra": {"nan": math.nan, "t": (1,)}}
    snap = Snapshot.capture(12, states)
    blobs = {name: bytearray(b"".join(bytes(c) for c in source())) for name, source in snap.blobs()}
    assert STATE_BLOB in blobs and "model.bin" in blobs
    out = restore_components(blobs, "test")
    assert differences(states, out) == []


# -- real optimizer, schedulers and scaler ----------------------------------------------------------------------------


def _model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, torch.randn(16, 4), torch.randn(16, 2)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def test_adamw_state_round_trips_and_loads_into_a_fresh_optimizer() -> None:
    model, x, y = _model_and_data()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        _train_step(model, opt, x, y)
    state = opt.state_dict()
    out = roundtrip(state)
    assert differences(state, out) == []
    assert type(out["param_groups"][0]["betas"]) is tuple
    assert all(type(k) is int for k in out["state"])

    model2, _, _ = _model_and_data()
    model2.load_state_dict(roundtrip(model.state_dict()))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    opt2.load_state_dict(out)
    assert opt2.param_groups[0]["lr"] == 0.01
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95)
    for _ in range(2):
        _train_step(model, opt, x, y)
        _train_step(model2, opt2, x, y)
    assert differences(model.state_dict(), model2.state_dict()) == []
    assert differences(opt.state_dict(), opt2.state_dict()) == []


def _check_scheduler(make: Any, steps: int, metric: bool = False) -> None:
    model, x, y = _model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = make(opt)
    for i in range(steps):
        _train_step(model, opt, x, y)
        if metric:
            sched.step(1.0 / (i + 1))
        else:
            sched.step()
    state = sched.state_dict()
    out = json.loads(json.dumps(codec.encode(state, []), allow_nan=False))
    decoded = codec.decode(out, never_called)
    assert differences(state, decoded) == []

    model2, _, _ = _model_and_data()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    sched2 = make(opt2)  # constructing a scheduler changes the lr: load the optimizer after it, as usual
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    sched2.load_state_dict(decoded)
    assert differences(sched.state_dict(), sched2.state_dict()) == []
    for _ in range(4):
        _train_step(model, opt, x, y)
        _train_step(model2, opt2, x, y)
        if metric:
            sched.step(1.0)
            sched2.step(1.0)
        else:
            sched.step()
            sched2.step()
        assert [bits(v) for v in sched.get_last_lr()] == [bits(v) for v in sched2.get_last_lr()]
    assert [bits(g["lr"]) for g in opt.param_groups] == [bits(g["lr"]) for g in opt2.param_groups]


def test_lambda_lr_round_trip() -> None:
    _check_scheduler(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.97**s / (1 + s)), steps=5)


def test_sequential_lr_round_trip_across_the_milestone() -> None:
    def make(opt: torch.optim.Optimizer) -> Any:
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
        return torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])

    _check_scheduler(make, steps=2)
    _check_scheduler(make, steps=5)


def test_reduce_lr_on_plateau_with_infinite_best_round_trips() -> None:
    make = lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1, factor=0.5)  # noqa: E731
    model, _, _ = _model_and_data()
    fresh = make(torch.optim.SGD(model.parameters(), lr=0.1))
    state = fresh.state_dict()
    assert state["best"] == math.inf and state["mode_worse"] == math.inf
    out = roundtrip(state)
    assert differences(state, out) == []
    assert out["best"] == math.inf and type(out["best"]) is float
    _check_scheduler(make, steps=0, metric=True)
    _check_scheduler(make, steps=3, metric=True)


def test_grad_scaler_round_trip() -> None:
    model, x, y = _model_and_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10, growth_interval=3)
    for _ in range(2):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
    state = scaler.state_dict()
    assert state["_growth_tracker"] == 2
    out = roundtrip(state)
    assert differences(state, out) == []
    scaler2 = torch.amp.GradScaler("cpu", enabled=True)
    scaler2.load_state_dict(out)
    assert differences(scaler2.state_dict(), state) == []


# -- rejections -------------------------------------------------------------------------------------------------------


class Opaque:
    pass


@pytest.mark.parametrize("value", [Opaque(), {1, 2}, lambda: None, object(), 1j, frozenset()])
def test_encoding_an_unsupported_value_raises_state_error(value: Any) -> None:
    with pytest.raises(StateError, match="cannot save a value of type"):
        codec.encode(value, [])


def test_state_error_names_the_path_and_the_fix() -> None:
    with pytest.raises(StateError) as info:
        codec.encode({"optimizer": {"extra": [1, Opaque()]}}, [], "comp")
    message = str(info.value)
    assert "comp.optimizer.extra[1]" in message
    assert "Opaque" in message
    assert "state_dict()" in message


def test_sparse_tensors_are_refused() -> None:
    with pytest.raises(StateError, match="dense"):
        codec.encode({"s": torch.eye(3).to_sparse()}, [])


@pytest.mark.parametrize(
    "doc",
    [
        {"$pickle": "gASVAAAAAAAAAAA="},
        {"$class": "os.system"},
        {"$import": "os", "args": ["ls"]},
        {"$tensor": -1},
        {"$tensor": "x"},
        {"$tensor": True},
        {"$tensor": 1.0},
        {"$tensor": 0, "extra": 1},
        {"$ndarray": -3},
        {"$dict": 5},
        {"$dict": [[1]]},
        {"$dict": [[1, 2, 3]]},
        {"$dict": [[[1, 2], "unhashable key"]]},
        {"$odict": "x"},
        {"$odict": [], "$evil": 1},
        {"$tuple": 5},
        {"$float": "NaN"},
        {"$float": 1.0},
        {"$dtype": "torch.FloatStorage"},
        {"$dtype": "object"},
        {"$device": "not-a-device"},
        {"$device": 0},
        {"$bytes": "!!!not base64"},
        {"$npscalar": "object", "value": 1},
        {"$npscalar": "float32", "value": [1.0]},
        {"$npscalar": "float32"},
        {"x": [1, {"nested": {"$pickle": "x"}}]},
        [{"$class": "builtins.eval"}],
    ],
    ids=lambda d: json.dumps(d)[:40],
)
def test_decoding_unknown_or_malformed_tags_raises_unsafe(doc: Any) -> None:
    with pytest.raises(UnsafeCheckpointError):
        codec.decode(doc, never_called)


def test_decoding_never_imports_or_unpickles(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    active = False
    real_import = builtins.__import__

    def spy_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if active:
            calls.append(f"import {name}")
        return real_import(name, *args, **kwargs)

    def record(what: str) -> Any:
        return lambda *a, **k: calls.append(what)

    monkeypatch.setattr(builtins, "__import__", spy_import)
    monkeypatch.setattr(importlib, "import_module", record("importlib.import_module"))
    monkeypatch.setattr(pickle, "loads", record("pickle.loads"))
    monkeypatch.setattr(os, "system", record("os.system"))
    assert "antigravity" not in sys.modules
    docs = [
        {"$class": "os.system", "args": ["true"]},
        {"$module": "antigravity"},
        {"$pickle": base64.b64encode(pickle.dumps(Opaque())).decode()},
        {"$reduce": ["os.system", ["true"]]},
        {"$dtype": "antigravity"},
        {"$device": "antigravity"},
    ]
    errors = []
    for doc in docs:
        active = True
        try:
            codec.decode(doc, never_called)
        except UnsafeCheckpointError as err:
            errors.append(err)
        finally:
            active = False
    assert len(errors) == len(docs)
    assert calls == []
    assert "antigravity" not in sys.modules


# -- bugs found -------------------------------------------------------------------------------------------------------


def test_npscalar_out_of_range_is_unsafe() -> None:
    with pytest.raises(UnsafeCheckpointError):
        codec.decode({"$npscalar": "int8", "value": 1000}, never_called)


def test_ndarray_reference_to_a_non_numpy_dtype_is_unsafe() -> None:
    tensors = [torch.zeros(2, dtype=torch.bfloat16)]
    with pytest.raises(UnsafeCheckpointError):
        codec.decode({"$ndarray": 0}, tensors.__getitem__)


def test_big_endian_numpy_array_round_trips_or_is_refused_cleanly() -> None:
    array = np.arange(4, dtype=">f4")
    try:
        out = roundtrip(array)
    except StateError:
        return
    assert out.tolist() == array.tolist()


def test_differences_compares_numpy_float_scalars_by_bits() -> None:
    assert differences(np.float32(np.nan), np.float32(np.nan)) == []
    assert differences(np.float32(-0.0), np.float32(0.0)) != []


def test_zero_dim_numpy_array_keeps_its_shape() -> None:
    array = np.array(7.25, dtype=np.float64)
    out = roundtrip({"a": array})["a"]
    assert out.shape == ()
    assert out.tobytes() == array.tobytes()
