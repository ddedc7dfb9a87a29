"""Keras state as spotsafe components: variables as arrays, and every random stream fit() draws from.

Variables are read as torch tensors on the torch backend (the parameters' own memory, copied only by the
checkpointer's staging) and as NumPy arrays on the others, and written back with ``Variable.assign``, which
copies in place: the optimizer keeps the variables it holds. Loading checks the number, shape and dtype of
the variables and raises :class:`~spotsafe.errors.CheckpointMismatchError` saying which one differs.

Random streams (:func:`capture_streams`, :func:`apply_streams`): Python's ``random``, NumPy's global
generator, torch's (and CUDA's) global generators (:class:`~spotsafe.state.rng.GlobalRNG`: the torch
backend's unseeded ``Dropout`` and the shuffling ``RandomSampler`` behind ``fit(x, y, shuffle=True)`` draw
from torch's), Keras' global ``SeedGenerator`` (``keras.random.*`` calls without a seed) and TensorFlow's
global ``tf.random.Generator`` when one exists. A layer's own ``SeedGenerator`` (``Dropout`` with the
TensorFlow backend, seeded layers) is a variable of the model, saved with its weights.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

# Keras and TensorFlow ship no type information: their objects are Any here (narrowly, at this boundary).
import keras  # type: ignore[import-untyped]
import numpy as np
import torch
from keras.src.backend.common import global_state  # type: ignore[import-untyped]
from keras.src.random.seed_generator import GLOBAL_SEED_GENERATOR  # type: ignore[import-untyped]

from spotsafe.errors import CheckpointMismatchError
from spotsafe.state.rng import GlobalRNG

Variable = Any
"""A ``keras.Variable`` (untyped)."""


def read_variable(variable: Variable) -> torch.Tensor | np.ndarray[Any, Any]:
    """The variable's value: a detached torch tensor sharing its memory (torch backend), else a NumPy array."""
    value = variable.value
    if isinstance(value, torch.Tensor):
        return value.detach()
    return np.asarray(keras.ops.convert_to_numpy(value))


def _dtype_name(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return str(value.dtype).removeprefix("torch.")
    return str(np.asarray(value).dtype)


def variables_state(variables: Sequence[Variable]) -> dict[str, Any]:
    """``{"paths": [...], "values": [...]}`` for ``variables``, in their order."""
    return {"paths": [str(v.path) for v in variables], "values": [read_variable(v) for v in variables]}


def load_variables(variables: Sequence[Variable], state: dict[str, Any], what: str) -> None:
    """Assign the saved ``state`` (from :func:`variables_state`) to ``variables``; check everything first."""
    paths, values = list(state["paths"]), list(state["values"])
    if len(values) != len(variables) or len(paths) != len(values):
        raise CheckpointMismatchError(
            f"the checkpoint holds {len(values)} {what} variables, this {what} has {len(variables)}: "
            "it was written by a different model or optimizer; resume with the same script"
        )
    for variable, path, value in zip(variables, paths, values, strict=True):
        want = (tuple(variable.shape), keras.backend.standardize_dtype(variable.dtype))
        got = (tuple(value.shape), _dtype_name(value))
        if want != got:
            raise CheckpointMismatchError(
                f"{what} variable {variable.path!r} is {want[1]}{list(want[0])}, the checkpoint's {path!r} is "
                f"{got[1]}{list(got[0])}: it was written by a different model; resume with the same script"
            )
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


class ModelVariables:
    """The ``model`` component: every variable of the model (weights, non-trainable state such as
    BatchNorm's moving averages, and the layers' ``SeedGenerator`` states: ``model.variables``)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return variables_state(self.model.variables)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_variables(self.model.variables, state, "model")


class OptimizerVariables:
    """The ``keras_optimizer`` component: ``optimizer.variables`` (``iterations``, which drives any
    learning-rate schedule, the learning rate when it is a variable, the moments). An optimizer that fit()
    has not built yet (it builds at the first step) is built before a built one's state is loaded."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        optimizer = self.model.optimizer
        return {"built": bool(optimizer.built), **variables_state(optimizer.variables)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        optimizer = self.model.optimizer
        if state["built"] and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        load_variables(optimizer.variables, state, "optimizer")


def _keras_seed_state() -> Any:
    generator = global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)
    return None if generator is None else read_variable(generator.state)


def _apply_keras_seed(state: Any) -> None:
    if state is None:  # none existed: the next unseeded keras.random call makes one from Python's random
        global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, None)
        return
    generator = global_state.get_global_attribute(GLOBAL_SEED_GENERATOR)
    if generator is None:
        generator = keras.random.SeedGenerator(seed=0)  # an explicit seed: draws nothing from Python's random
        global_state.set_global_attribute(GLOBAL_SEED_GENERATOR, generator)
    generator.state.assign(state)


def _tf_generator() -> Any:
    """TensorFlow's global ``tf.random.Generator`` if TensorFlow is loaded and one exists (never creates one)."""
    if "tensorflow" not in sys.modules:
        return None
    from tensorflow.python.ops import stateful_random_ops  # type: ignore[import-untyped]

    return stateful_random_ops.global_generator


def _tf_generator_state() -> Any:
    generator = _tf_generator()
    if generator is None:
        return None
    return {"state": np.asarray(generator.state.numpy()), "algorithm": int(generator.algorithm)}


def _apply_tf_generator(state: Any) -> None:
    if state is None:
        return  # none was used before this point; one created later starts from TensorFlow's global seed
    import tensorflow as tf  # type: ignore[import-untyped]

    generator = _tf_generator() or tf.random.get_global_generator()
    if int(generator.algorithm) != int(state["algorithm"]):
        raise CheckpointMismatchError("TensorFlow's global generator uses another algorithm than the checkpoint's")
    generator.reset(state["state"])


def seed_torch_like_keras() -> None:
    """On a backend other than torch, seed torch's generator with the seed of ``keras.utils.set_random_seed``.

    Keras seeds torch only on the torch backend; elsewhere torch's generator starts from a random seed in every
    process. Nothing in Keras draws from it then, but spotsafe saves it with every checkpoint (and a drill
    compares it), so an unseeded one would make identical runs look different. Without a Keras seed: untouched.
    """
    seed = global_state.get_global_attribute("global_random_seed")
    if keras.backend.backend() != "torch" and isinstance(seed, int):
        torch.manual_seed(seed)


def capture_streams() -> dict[str, Any]:
    """Every random stream's state now (reads only: nothing is drawn or created)."""
    return {"global": GlobalRNG().state_dict(), "keras": _keras_seed_state(), "tensorflow": _tf_generator_state()}


def apply_streams(state: dict[str, Any]) -> None:
    """Put every random stream back to ``state`` (from :func:`capture_streams`)."""
    GlobalRNG().load_state_dict(state["global"])
    _apply_keras_seed(state["keras"])
    _apply_tf_generator(state["tensorflow"])


__all__ = [
    "ModelVariables",
    "OptimizerVariables",
    "apply_streams",
    "capture_streams",
    "load_variables",
    "read_variable",
    "seed_torch_like_keras",
    "variables_state",
]
