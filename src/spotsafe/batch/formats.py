"""Output and input formats of batch jobs: JSONL (the standard library) and Parquet (pyarrow, ``spotsafe[batch]``).

A shard's rows are encoded whole into one file that pandas, polars, pyarrow or ``jq`` read without spotsafe.
The encoding is deterministic: the same rows give the same bytes, so a rerun of a deterministic job writes
byte-identical parts.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from typing import Any, overload

import fsspec

from spotsafe.errors import ConfigError


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "Parquet needs pyarrow: pip install 'spotsafe[batch]' (or pyarrow), or use format='jsonl'"
        ) from None
    return pa, pq


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def encode(rows: Sequence[Any], fmt: str) -> bytes:
    """The bytes of one part holding ``rows``, in ``fmt`` (``jsonl`` or ``parquet``)."""
    if fmt == "jsonl":
        lines = []
        for row in rows:
            try:
                lines.append(_JSON.encode(row))
            except (TypeError, ValueError) as err:
                raise ConfigError(
                    f"a result cannot be written as JSON ({err}): return dicts, lists, strings, numbers, booleans "
                    "or None (finite numbers), or use format='parquet'"
                ) from None
        return "".join(line + "\n" for line in lines).encode("utf-8")
    pa, pq = _pyarrow()
    if any(not isinstance(row, dict) for row in rows):
        raise ConfigError("Parquet rows must be dicts (column name -> value); return a dict from the function")
    try:
        table = pa.Table.from_pylist(list(rows))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ConfigError(
            f"the results do not make one Parquet table ({err}); keep each column's type the same"
        ) from None
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def jsonl_rows(path: str) -> list[Any]:
    """The rows of a JSONL file (a path or any fsspec URL), as a list for a batch job's ``items``."""
    with fsspec.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class ParquetRows(Sequence[dict[str, Any]]):
    """The rows of a Parquet table as a sequence of dicts (row ``i`` read on demand, in batches of 1024)."""

    def __init__(self, path: str) -> None:
        _, pq = _pyarrow()
        with fsspec.open(path, "rb") as handle:
            self._table = pq.read_table(handle)
        self._cached: tuple[int, list[dict[str, Any]]] = (-1, [])

    def __len__(self) -> int:
        return int(self._table.num_rows)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[dict[str, Any]]: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | Sequence[dict[str, Any]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index - index % 1024
        if self._cached[0] != start:
            self._cached = (start, self._table.slice(start, 1024).to_pylist())
        return self._cached[1][index - start]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


def parquet_rows(path: str) -> ParquetRows:
    """The rows of a Parquet file (a path or any fsspec URL), for a batch job's ``items``."""
    return ParquetRows(path)
