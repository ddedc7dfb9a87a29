"""Random streams survive encode -> JSON -> decode: the next draws after restore are identical."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from spotsafe.errors import CheckpointMismatchError, StateError
from spotsafe.state import codec
from spotsafe.state.rng import GlobalRNG, NumpyGeneratorState, TorchGeneratorState, as_stateful
from spotsafe.state.tensors import pack, plan, unpack


def through_checkpoint(tree: Any) -> Any:
    """The path a state takes through a checkpoint: encode, JSON text, packed tensor blob, decode."""
    tensors: list[torch.Tensor] = []
    text = json.dumps(codec.encode(tree, tensors), allow_nan=False)
    entries, _ = plan(tensors)
    blob = bytearray(b"".join(bytes(chunk) for chunk in pack(tensors, entries)))
    return codec.decode(json.loads(text), lambda i: unpack({"": blob}, entries[i]))


@pytest.fixture(autouse=True)
def _restore_global_rngs() -> Iterator[None]:
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(th)


def draw_global() -> dict[str, Any]:
    return {
        "random": [random.random() for _ in range(3)] + [random.gauss(0, 1), random.getrandbits(100)],
        "numpy": np.concatenate([np.random.rand(4), [np.random.standard_normal()], np.random.randint(0, 10**9, 3)]),
        "torch": torch.cat([torch.rand(5), torch.randn(3), torch.randint(0, 10**9, (2,)).double()]),
    }


def assert_same_draws(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["random"] == b["random"]
    assert a["numpy"].tobytes() == b["numpy"].tobytes()
    assert torch.equal(a["torch"], b["torch"])


def scramble_global() -> None:
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)


@pytest.mark.parametrize("pending_gauss", [False, True])
def test_global_rng_round_trip_restores_every_stream(pending_gauss: bool) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw_global()
    # With or without a cached second normal in Python's random and in NumPy's legacy generator.
    while (random.getstate()[2] is not None) != pending_gauss:
        random.gauss(0, 1)
    while np.random.get_state(legacy=False)["has_gauss"] != int(pending_gauss):
        np.random.standard_normal()
    state = through_checkpoint(GlobalRNG().state_dict())
    expected = draw_global()

    scramble_global()
    assert draw_global()["random"] != expected["random"]  # the scramble really changed the streams
    GlobalRNG().load_state_dict(state)
    assert_same_draws(draw_global(), expected)


def test_global_rng_state_is_plain_json_plus_one_tensor() -> None:
    tensors: list[torch.Tensor] = []
    doc = codec.encode(GlobalRNG().state_dict(), tensors)
    json.dumps(doc, allow_nan=False)
    assert len(tensors) == 1 and tensors[0].dtype == torch.uint8


def test_loading_the_same_state_twice_replays_the_same_draws() -> None:
    torch.manual_seed(5)
    state = through_checkpoint(GlobalRNG().state_dict())
    GlobalRNG().load_state_dict(state)
    first = draw_global()
    GlobalRNG().load_state_dict(state)
    assert_same_draws(draw_global(), first)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda s: s.pop("python"),
        lambda s: s.update(python="not a state"),
        lambda s: s.update(numpy={"bit_generator": "PCG64"}),
        lambda s: s.update(torch=torch.zeros(3, dtype=torch.uint8)),
    ],
    ids=["no-python", "bad-python", "bad-numpy", "bad-torch"],
)
def test_malformed_global_state_raises_mismatch(breakage: Any) -> None:
    state = through_checkpoint(GlobalRNG().state_dict())
    breakage(state)
    with pytest.raises(CheckpointMismatchError):
        GlobalRNG().load_state_dict(state)


def test_torch_generator_round_trip() -> None:
    generator = torch.Generator().manual_seed(42)
    torch.rand(7, generator=generator)
    wrapped = as_stateful(generator, "gen")
    assert isinstance(wrapped, TorchGeneratorState)
    state = through_checkpoint(wrapped.state_dict())
    expected = torch.rand(10, generator=generator)

    generator.manual_seed(0)
    assert not torch.equal(torch.rand(10, generator=generator), expected)
    wrapped.load_state_dict(state)
    assert torch.equal(torch.rand(10, generator=generator), expected)

    # Into a different generator object, as after a restart.
    other = torch.Generator()
    as_stateful(other, "gen").load_state_dict(state)
    assert torch.equal(torch.rand(10, generator=other), expected)
    # The decoded state was not consumed by loading it.
    as_stateful(other, "gen").load_state_dict(state)
    assert torch.equal(torch.rand(10, generator=other), expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.random.default_rng(7),
        lambda: np.random.Generator(np.random.MT19937(7)),
        lambda: np.random.Generator(np.random.Philox(7)),
        lambda: np.random.SFC64(7),
    ],
    ids=["PCG64", "MT19937", "Philox", "SFC64-bitgen"],
)
def test_numpy_generator_round_trip(make: Any) -> None:
    original = make()
    gen = original if isinstance(original, np.random.Generator) else np.random.Generator(original)
    gen.random(5)
    gen.integers(0, 2**31, dtype=np.int32)  # leaves a buffered 32-bit half in some bit generators
    wrapped = as_stateful(original, "np")
    assert isinstance(wrapped, NumpyGeneratorState)
    state = through_checkpoint(wrapped.state_dict())

    def draws(g: np.random.Generator) -> bytes:
        return np.concatenate(
            [g.random(4), g.integers(0, 2**31, 3, dtype=np.int32).astype(float), g.standard_normal(3)]
        ).tobytes()

    expected = draws(gen)
    fresh_original = make()
    fresh = fresh_original if isinstance(fresh_original, np.random.Generator) else np.random.Generator(fresh_original)
    assert draws(fresh) != expected
    as_stateful(fresh_original, "np").load_state_dict(state)
    assert draws(fresh) == expected


def test_as_stateful_passes_objects_with_state_methods_through() -> None:
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def state_dict(self) -> dict[str, int]:
            return {"n": self.n}

        def load_state_dict(self, state: dict[str, int]) -> None:
            self.n = state["n"]

    counter = Counter()
    assert as_stateful(counter, "counter") is counter


class OnlySaves:
    def state_dict(self) -> dict[str, int]:
        return {}


class NotCallable:
    state_dict = 1
    load_state_dict = 2


@pytest.mark.parametrize("obj", [object(), 5, "text", OnlySaves(), NotCallable(), random.Random(1)])
def test_as_stateful_refuses_objects_without_state_methods(obj: Any) -> None:
    with pytest.raises(StateError) as info:
        as_stateful(obj, "thing")
    assert "'thing'" in str(info.value)
    assert "state_dict()" in str(info.value)
