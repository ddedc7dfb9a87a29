"""What a resumable batch job keeps at its location, and how a shard is known to be done.

::

    batch.json                 the job: item count, shard size, output format (written once; a rerun must match)
    parts/part-000012.jsonl    shard 12's output (items 12 * size to 13 * size), a plain JSONL or Parquet file
    done/shard-000012.json     shard 12's commit record: its part's size and xxh3-128 checksum, and its own checksum
    writers/attempt-000003     an attempt of the supervised job started (fences older attempts' commits)

A shard is committed in two steps, as a checkpoint is: its part is written whole
(``write_atomic``: a rename on local disk, one PUT on an object store), then its
record, the commit point. Items belong to fixed shards, and a shard's output has
one name, so whatever happens the output folder holds at most one file per shard
and each item's result at most once; a part without a valid record (a machine
died between the two writes) is written again by the next run, in place. A shard
is *done* when its record is intact, belongs to this job, and names a part of the
recorded size (``verify="full"`` also checks the part's checksum).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

import xxhash

from spotsafe.errors import ConfigError
from spotsafe.storage.base import BlobNotFoundError, Storage

SPEC_KEY = "batch.json"
PARTS, DONE, WRITERS = "parts", "done", "writers"
FORMATS = {"jsonl": "jsonl", "parquet": "parquet"}
_RECORD = re.compile(r"^shard-(\d{6,})\.json$")
_WRITER = re.compile(r"^attempt-(\d{6,})$")


def checksum(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


@dataclass(frozen=True)
class BatchSpec:
    """The job's shape: ``items`` items in shards of ``shard_size``, output as ``format``."""

    items: int
    shard_size: int
    format: str

    def __post_init__(self) -> None:
        for name in ("items", "shard_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "shard_size" else 0):
                raise ConfigError(f"a batch job's {name} must be a whole number >= {int(name == 'shard_size')}")
        if self.format not in FORMATS:
            raise ConfigError(f"the output format must be one of {', '.join(FORMATS)}, got {self.format!r}")

    @property
    def shards(self) -> int:
        return math.ceil(self.items / self.shard_size)

    def bounds(self, shard: int) -> tuple[int, int]:
        """The items of ``shard``: ``range(*bounds)``."""
        start = shard * self.shard_size
        return start, min(self.items, start + self.shard_size)

    def part_key(self, shard: int) -> str:
        return f"{PARTS}/part-{shard:06d}.{FORMATS[self.format]}"

    def encode(self) -> bytes:
        return json.dumps({"spotsafe_batch": 1, **asdict(self)}, sort_keys=True).encode()

    @classmethod
    def read(cls, storage: Storage) -> BatchSpec | None:
        try:
            doc = json.loads(storage.read(SPEC_KEY))
        except BlobNotFoundError:
            return None
        except ValueError as err:
            raise ConfigError(f"{storage.url}/{SPEC_KEY} is not a batch job description ({err})") from None
        if not isinstance(doc, dict) or doc.get("spotsafe_batch") != 1:
            raise ConfigError(f"{storage.url}/{SPEC_KEY} is not a spotsafe batch job description")
        try:
            return cls(int(doc["items"]), int(doc["shard_size"]), str(doc["format"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{storage.url}/{SPEC_KEY} is damaged ({err!r}); use another location") from None


@dataclass(frozen=True)
class ShardRecord:
    """Shard ``shard`` (items ``start`` to ``end``) is done: its part ``key`` has ``size`` bytes with ``checksum``
    and ``rows`` rows, written by ``rank`` in ``attempt``."""

    shard: int
    start: int
    end: int
    key: str
    size: int
    checksum: str
    rows: int
    attempt: int
    rank: int
    seconds: float

    @staticmethod
    def key_of(shard: int) -> str:
        return f"{DONE}/shard-{shard:06d}.json"

    def encode(self) -> bytes:
        body = json.dumps(asdict(self), sort_keys=True)
        return json.dumps({"record": json.loads(body), "checksum": checksum(body.encode())}, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> ShardRecord | None:
        """The record in ``data``; ``None`` when it is damaged (its checksum does not match, or it does not parse)."""
        try:
            doc = json.loads(data)
            body = json.dumps(doc["record"], sort_keys=True)
            if checksum(body.encode()) != doc["checksum"]:
                return None
            return cls(**doc["record"])
        except (ValueError, KeyError, TypeError):
            return None


def record_shards(storage: Storage) -> list[int]:
    """The shards with a commit record (valid or not), from one listing."""
    found = []
    for name in storage.list_files(DONE):
        match = _RECORD.match(name.rsplit("/", 1)[-1])
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


def newest_attempt(storage: Storage) -> int:
    """The highest attempt that has started writing this job (0: none recorded)."""
    numbers = [int(m.group(1)) for n in storage.list_files(WRITERS) if (m := _WRITER.match(n.rsplit("/", 1)[-1]))]
    return max(numbers, default=0)
