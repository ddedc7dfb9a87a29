"""Parsing untrusted JSON (``manifest.json``, ``state.json``) within explicit limits.

A checkpoint is untrusted input, and its checksums only prove that its bytes are
the ones its manifest names, whoever wrote both. :func:`load` therefore checks a
document's shape before parsing it, without recursing:

* size: at most ``max_bytes``;
* nesting: at most ``max_depth`` levels of objects and arrays (``json.loads``
  recurses once per level and would raise ``RecursionError`` on a deep document);
* entries: at most ``max_containers`` objects and arrays in all (each costs memory).

The check is one pass over the bytes in C (a regular expression removes the
strings, ``bytes.translate`` keeps the brackets) and a running sum over the brackets.
Parsing is then strict where ``json`` is lenient: the text must be UTF-8, a key may
appear once per object, and ``NaN``, ``Infinity`` and numbers too large for a
float are refused (spotsafe never writes them). Every violation raises
:class:`~spotsafe.errors.CorruptCheckpointError` with a reason; nothing else escapes.

Writers check what they produce against the same limits (:func:`check_shape`),
so spotsafe never writes a document it would refuse to read.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from spotsafe.errors import CorruptCheckpointError

MiB = 1024 * 1024


@dataclass(frozen=True)
class JsonLimits:
    """How large a document :func:`load` accepts."""

    max_bytes: int
    max_depth: int
    max_containers: int


MANIFEST_LIMITS = JsonLimits(max_bytes=64 * MiB, max_depth=64, max_containers=1_000_000)
"""``manifest.json``: blob entries plus the user's metadata."""
STATE_LIMITS = JsonLimits(max_bytes=256 * MiB, max_depth=100, max_containers=4_000_000)
"""``state.json``: every component's non-tensor state (tensors are stored as raw bytes elsewhere)."""

# A string, escapes included; one that never ends runs to the end (no rescans: linear time).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1


def check_shape(data: bytes | bytearray | memoryview, limits: JsonLimits, where: str) -> None:
    """Raise :class:`CorruptCheckpointError` if ``data`` is larger, deeper or has more containers than ``limits``."""
    size = len(data)
    if size > limits.max_bytes:
        raise CorruptCheckpointError(f"{where}: {size} bytes, more than the {limits.max_bytes} bytes spotsafe reads")
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKET)
    opened = brackets.count(b"[") + brackets.count(b"{")
    if opened > limits.max_containers:
        raise CorruptCheckpointError(
            f"{where}: {opened} objects and arrays, more than the {limits.max_containers} spotsafe reads"
        )
    if len(brackets) - opened > opened:
        raise CorruptCheckpointError(f"{where}: not valid JSON (unbalanced brackets)")
    depth = max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)
    if depth > limits.max_depth:
        raise CorruptCheckpointError(
            f"{where}: objects and arrays nest {depth} levels deep, more than the {limits.max_depth} spotsafe reads"
        )


def _constant(name: str) -> Any:
    raise CorruptCheckpointError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise CorruptCheckpointError(f"the number {text[:40]} is not finite as a float")
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CorruptCheckpointError(f"the key {key[:80]!r} appears twice in one object")
            seen.add(key)
    return doc


def load(data: bytes | bytearray | memoryview, limits: JsonLimits, where: str) -> Any:
    """Parse ``data`` as strict JSON within ``limits``. Raises only :class:`CorruptCheckpointError`."""
    check_shape(data, limits, where)
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptCheckpointError(f"{where}: not valid JSON (not UTF-8: {err.reason})") from err
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_finite)
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(f"{where}: not valid JSON ({err})") from err
    except ValueError as err:  # json.JSONDecodeError, or an integer with too many digits
        raise CorruptCheckpointError(f"{where}: not valid JSON ({err})") from err
    except RecursionError as err:  # not reachable within the depth limit; kept as a last line of defence
        raise CorruptCheckpointError(f"{where}: objects and arrays nest too deep") from err
