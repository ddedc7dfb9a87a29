"""Reading a job document (TOML or YAML): the raw table, command-line values laid over it, and typed values.

Each reader takes a table, a key and ``at`` (where the table is, for messages: ``job.toml: [retry]``)
and raises :class:`~spotsafe.errors.ConfigError` naming the key and what to write instead. What the
keys mean is :mod:`spotsafe.supervisor.jobfile`'s business.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from spotsafe.errors import ConfigError


def read_job_doc(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The raw document of the job file at ``path`` (TOML or YAML by its suffix)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read the job file {p}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"the job file {p} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            doc = yaml.safe_load(text)
        elif p.suffix == ".toml":
            doc = tomllib.loads(text)
        else:
            raise ConfigError(f"{p}: a job file ends in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{p} is not valid {p.suffix[1:].upper()}: {err}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{p} must hold a table ([job], [[pools]], ...), not a {type(doc).__name__}")
    return doc


def overlay(doc: Mapping[str, Any], changes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``doc`` with ``changes`` (section -> key -> value; ``None`` values ignored) laid over it:
    how command-line options take precedence over the job file."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in doc.items()}
    for section, values in changes.items():
        given = {k: v for k, v in values.items() if v is not None}
        base = out.get(section, {})
        if given and isinstance(base, Mapping):  # a section that is not a table is left for parse_job to reject
            out[section] = {**base, **given}
    return out


def build(factory: Any, base: Any, changes: dict[str, Any], at: str) -> Any:
    try:
        return factory(base, **changes)
    except ConfigError as err:
        raise ConfigError(f"{at}: {err}") from None
    except TypeError as err:  # an unhashable value in a set, say
        raise ConfigError(f"{at}: {err}") from None


def table(doc: Any, at: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{at} must be a table of keys and values, got {type(doc).__name__}")
    return doc


def check_keys(table: Mapping[str, Any], allowed: set[str], at: str) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(allowed))}"
            raise ConfigError(f"{at}: unknown key {key!r}{hint}")


def string(table: Mapping[str, Any], key: str, at: str, default: Any) -> Any:
    value = table.get(key, default)
    if value is not default and not isinstance(value, str):
        raise ConfigError(f"{at}: {key} must be a string, got {value!r}")
    return value


def integer(table: Mapping[str, Any], key: str, at: str, minimum: int) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{at}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def number(table: Mapping[str, Any], key: str, at: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{at}: {key} must be a finite number >= 0, got {value!r}")
    return float(value)


def boolean(table: Mapping[str, Any], key: str, at: str) -> bool | None:
    value = table.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{at}: {key} must be true or false, got {value!r}")
    return value


def deadline(value: Any, at: str) -> float | None:
    """A TOML/YAML datetime or an ISO 8601 string with a UTC offset, as Unix time."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{at}: deadline {value!r} is not an ISO 8601 time, e.g. 2026-11-24T18:00:00Z") from None
    if not isinstance(value, dt.datetime):
        raise ConfigError(f"{at}: deadline must be a date and time, e.g. 2026-11-24T18:00:00Z, got {value!r}")
    if value.tzinfo is None:
        raise ConfigError(f"{at}: deadline {value.isoformat()} needs a time zone: add Z for UTC, or an offset")
    return value.timestamp()
