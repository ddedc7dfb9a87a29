"""Argument checkers shared by every public constructor.

Each checker raises :class:`~spotsafe.errors.ConfigError` naming the argument,
what was given (its repr and type) and what is expected, so that a bad argument
fails where it is passed, not as a raw ``TypeError`` deep inside a save::

    check_number("grace_s", grace_s, at_least=0, allow_none=True)
    # ConfigError: grace_s must be a finite number >= 0 or None, got 'soon' (str)

Checkers only look at a value (no I/O) and return nothing, except those that
normalise (:func:`check_signals` returns a tuple, so a generator is read once).
This module depends on nothing in spotsafe but :mod:`spotsafe.errors`.
"""

from __future__ import annotations

import math
import numbers
import signal
from collections.abc import Collection, Iterable, Mapping
from typing import Any, NoReturn

from spotsafe.errors import ConfigError

_REPR_LIMIT = 80
UNCATCHABLE = frozenset(s for s in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None)) if s)


def given(value: object) -> str:
    """``'soon' (str)``: the value's repr (shortened) and its type, for messages."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
        text = "<unprintable>"
    if len(text) > _REPR_LIMIT:
        text = text[: _REPR_LIMIT - 3] + "..."
    return f"{text} ({type(value).__name__})"


def fail(name: str, expected: str, value: object, hint: str = "") -> NoReturn:
    """Raise ``ConfigError("<name> must be <expected>, got <value> (<type>)<hint>")``."""
    raise ConfigError(f"{name} must be {expected}, got {given(value)}{hint}")


def _or_none(expected: str, allow_none: bool) -> str:
    return f"{expected} or None" if allow_none else expected


def check_bool(name: str, value: object, *, allow_none: bool = False) -> None:
    """``True`` or ``False`` (not ``"false"``, not ``0``)."""
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        fail(name, _or_none("True or False", allow_none), value)


def is_int(value: object, *, integral: bool = False) -> bool:
    """A Python ``int`` (with ``integral``: also a NumPy integer), not a bool."""
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) if integral else isinstance(value, int)


def check_int(
    name: str,
    value: object,
    *,
    at_least: int | None = None,
    at_most: int | None = None,
    allow_none: bool = False,
    integral: bool = False,
    hint: str = "",
) -> None:
    """An ``int`` (not a bool, not a float) within ``[at_least, at_most]``.

    ``integral=True`` also accepts NumPy integers, for callers that convert with ``int()``.
    """
    if value is None and allow_none:
        return
    expected = "an integer"
    if at_least is not None and at_most is not None:
        expected += f" from {at_least} to {at_most}"
    elif at_least is not None:
        expected += f" >= {at_least}"
    elif at_most is not None:
        expected += f" <= {at_most}"
    if not is_int(value, integral=integral):
        fail(name, _or_none(expected, allow_none), value, hint)
    number = int(value)  # type: ignore[call-overload]
    if (at_least is not None and number < at_least) or (at_most is not None and number > at_most):
        fail(name, _or_none(expected, allow_none), value, hint)


def check_number(
    name: str,
    value: object,
    *,
    at_least: float | None = None,
    above: float | None = None,
    finite: bool = True,
    unit: str = "",
    allow_none: bool = False,
    hint: str = "",
) -> None:
    """A real number (int or float, not a bool, never NaN), ``>= at_least`` / ``> above``, finite unless told."""
    if value is None and allow_none:
        return
    expected = ("a finite number" if finite else "a number") + (f" of {unit}" if unit else "")
    if at_least is not None:
        expected += f" >= {at_least:g}"
    if above is not None:
        expected += f" > {above:g}"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        fail(name, _or_none(expected, allow_none), value, hint)
    number = float(value)
    if (
        math.isnan(number)
        or (finite and math.isinf(number))
        or (at_least is not None and number < at_least)
        or (above is not None and number <= above)
    ):
        fail(name, _or_none(expected, allow_none), value, hint)


def check_str(name: str, value: object, *, empty: bool = False, allow_none: bool = False) -> None:
    """A string (non-empty unless ``empty``)."""
    if value is None and allow_none:
        return
    expected = "a string" if empty else "a non-empty string"
    if not isinstance(value, str) or not (empty or value):
        fail(name, _or_none(expected, allow_none), value)


def check_choice(name: str, value: object, choices: Collection[str]) -> None:
    """One of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        fail(name, "one of " + ", ".join(repr(c) for c in choices), value)


def check_callable(name: str, value: object, *, allow_none: bool = False) -> None:
    """Something that can be called (a function, a bound method, a class...)."""
    if value is None and allow_none:
        return
    if not callable(value):
        fail(name, _or_none("callable", allow_none), value)


def check_instance(
    name: str,
    value: object,
    types: type | tuple[type, ...],
    expected: str,
    *,
    allow_none: bool = False,
    hint: str = "",
) -> None:
    """An instance of ``types``, described to the user as ``expected``."""
    if value is None and allow_none:
        return
    if not isinstance(value, types):
        fail(name, _or_none(expected, allow_none), value, hint)


def check_mapping(name: str, value: object, *, keys: str = "", allow_none: bool = False) -> None:
    """A mapping (a ``dict``...); with ``keys="str"`` its keys must be strings."""
    if value is None and allow_none:
        return
    expected = "a mapping of names to values" if keys == "str" else "a mapping"
    if not isinstance(value, Mapping):
        fail(name, _or_none(expected, allow_none), value)
    if keys == "str":
        for key in value:
            if not isinstance(key, str):
                raise ConfigError(f"{name} keys must be strings, got the key {given(key)}")


def check_iterable(name: str, value: object, expected: str) -> tuple[Any, ...]:
    """An iterable that is not a string, as a tuple (a generator is read once, here)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        fail(name, expected, value)
    return tuple(value)


def check_signal(name: str, value: object) -> signal.Signals:
    """A signal that can be handled (``signal.SIGTERM`` or its number; not SIGKILL or SIGSTOP)."""
    expected = "a signal number such as signal.SIGTERM"
    if not is_int(value, integral=True):
        fail(name, expected, value)
    try:
        sig = signal.Signals(int(value))  # type: ignore[call-overload]
    except ValueError:
        fail(name, expected, value, ": there is no such signal")
    if sig in UNCATCHABLE:
        fail(name, "a signal that can be handled", value, f": {sig.name} cannot be caught")
    return sig


def check_signals(name: str, value: object) -> tuple[signal.Signals, ...]:
    """An iterable of signals (see :func:`check_signal`), as a tuple."""
    items = check_iterable(name, value, "a list of signal numbers such as [signal.SIGTERM]")
    return tuple(check_signal(f"{name}[{i}]", item) for i, item in enumerate(items))


def check_strings(name: str, value: object, *, non_empty: bool = True) -> tuple[str, ...]:
    """An iterable of non-empty strings (not one string), as a tuple; at least one unless ``non_empty=False``."""
    items = check_iterable(name, value, "a list of strings such as ('a', 'b')")
    if non_empty and not items:
        fail(name, "a non-empty list of strings", value)
    for i, item in enumerate(items):
        check_str(f"{name}[{i}]", item)
    return items
