"""Writer generations: a stale writer from a previous attempt cannot publish or delete.

Object stores have no locks, and a preempted machine can keep uploading for a
while after its replacement started (a "zombie"). Each writer therefore claims a
generation for the run before it writes anything::

    writers/gen-000007-3f9c2a1b.json     written once by the writer of generation 7

A writer's generation is one more than the highest it sees. Ties (two writers
starting at once) are broken by the random suffix: the higher ``(generation,
suffix)`` wins and the other is stale from the start. A writer is current while
no higher claim exists; it checks this (one listing) right before every step
that publishes or deletes: committing a manifest, writing the ``latest`` hint,
deleting a checkpoint. Checkpoint folder names carry the generation and readers
order checkpoints by ``(generation, step, time)``, so a checkpoint a zombie
manages to commit in the instant between its check and its write still ranks
below everything the current writer commits.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from spotsafe.errors import PermanentError
from spotsafe.storage.base import Storage

WRITERS = "writers"
_CLAIM = re.compile(r"^gen-(\d{6})-([0-9a-f]{8})\.json$")


class FencedError(PermanentError):
    """A newer writer took over the run; this process is stale and must stop writing."""


@dataclass(frozen=True, order=True)
class Claim:
    generation: int
    token: str

    @property
    def key(self) -> str:
        return f"{WRITERS}/gen-{self.generation:06d}-{self.token}.json"


def claims(storage: Storage) -> list[Claim]:
    """Every claim on the run, highest first."""
    found = []
    for name in storage.list_files(WRITERS):
        match = _CLAIM.match(name)
        if match:
            found.append(Claim(int(match.group(1)), match.group(2)))
    return sorted(found, reverse=True)


class WriterLease:
    """This process's claim on a run. Create with :meth:`acquire`."""

    def __init__(self, storage: Storage, claim: Claim) -> None:
        self.storage = storage
        self.claim = claim

    @property
    def generation(self) -> int:
        return self.claim.generation

    @classmethod
    def acquire(
        cls, storage: Storage, *, run_id: str, attempt: int, clock: Callable[[], float] = time.time
    ) -> WriterLease:
        current = claims(storage)
        generation = current[0].generation + 1 if current else 1
        claim = Claim(generation, secrets.token_hex(4))
        record = {
            "generation": generation,
            "run_id": run_id,
            "attempt": attempt,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "claimed_at": clock(),
        }
        storage.write_atomic(claim.key, json.dumps(record).encode())
        lease = cls(storage, claim)
        lease.check()
        return lease

    def check(self) -> None:
        """Raise :class:`FencedError` if a newer claim exists. One listing."""
        newest = claims(self.storage)
        if newest and newest[0] > self.claim:
            raise FencedError(
                f"writer generation {self.claim.generation} is stale: generation {newest[0].generation} took over "
                f"{self.storage.url}. This process must stop writing (its replacement is running)."
            )
