"""Bit-for-bit comparison of two decoded training states.

Floats are compared by their bits (so ``nan == nan`` and ``0.0 != -0.0``), tensors
by dtype, shape and raw bytes, containers by type and content: "identical"
means identical, not close.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from spotsafe.state.tensors import tensor_bytes


def _same_float(a: float, b: float) -> bool:
    return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))


def differences(a: Any, b: Any, path: str = "", limit: int = 20) -> list[str]:
    """Human-readable differences between ``a`` and ``b`` (at most ``limit``); empty when identical."""
    out: list[str] = []
    _diff(a, b, path or "state", out, limit)
    return out


def _diff(a: Any, b: Any, path: str, out: list[str], limit: int) -> None:
    if len(out) >= limit:
        return
    if type(a) is not type(b):
        out.append(f"{path}: type {type(a).__name__} vs {type(b).__name__}")
        return
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            out.append(f"{path}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif tensor_bytes(a) != tensor_bytes(b):
            out.append(f"{path}: tensor bytes differ")
        return
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
            out.append(f"{path}: arrays differ")
        return
    if isinstance(a, np.floating):
        if a.tobytes() != b.tobytes() and not (np.isnan(a) and np.isnan(b)):
            out.append(f"{path}: {a!r} vs {b!r}")
        return
    if isinstance(a, float):
        if not _same_float(a, b):
            out.append(f"{path}: {a!r} vs {b!r}")
        return
    if isinstance(a, Mapping):
        if list(a.keys()) != list(b.keys()):
            only_a = [k for k in a if k not in b]
            only_b = [k for k in b if k not in a]
            out.append(f"{path}: keys differ (only left: {only_a[:5]}, only right: {only_b[:5]}, or order)")
            return
        for key in a:
            _diff(a[key], b[key], f"{path}.{key}", out, limit)
        return
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} vs {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out, limit)
        return
    if a != b:
        out.append(f"{path}: {a!r} vs {b!r}")
