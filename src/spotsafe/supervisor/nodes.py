"""Jobs of several nodes: torchrun's node range, the node count each attempt asks for, and an attempt that is
one process per node.

A torchrun command with ``--nnodes MIN:MAX`` is elastic: torchrun's agents (one per node) meet in a rendezvous
(``--rdzv-backend c10d``) and start the workers once MIN to MAX nodes have joined. The supervisor asks its
pool for ``nodes`` (the pool's size, at most MAX); when the pool has no capacity for that many, it asks again
at once for one node fewer, down to MIN, before it backs off and waits: a job that can run on fewer nodes
runs rather than waits (:class:`NodeSizer`). The next relaunch asks for the full size again, so the job grows
back when the market offers the nodes. Resuming at another node count is another world size: the job must
save with ``Checkpointer(..., sharded=True)`` (a rank-folder job refuses it, naming both world sizes).

Where an attempt of ``n`` nodes runs is the launcher's business: a pool's template gets ``{nodes}``
(``sky launch --num-nodes {nodes}``, ``sbatch --nodes {nodes}``); the drill (and its reference run) start
``n`` copies of the command on this machine, each a torchrun agent joining the same rendezvous, as
:class:`NodesHandle`.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spotsafe.errors import ConfigError
from spotsafe.supervisor.pools import Handle, Pool

TORCHRUN_MODULES = ("torch.distributed.run", "torch.distributed.launch")
_FLAGS = frozenset({"--standalone", "--module", "-m", "--no-python", "--run-path", "--use-env"})
"""torchrun's options that take no value (every other option before the script takes one)."""


@dataclass(frozen=True)
class NodeRange:
    """How many nodes a job runs on: from ``min`` to ``max`` (equal: a fixed size)."""

    min: int
    max: int

    @property
    def elastic(self) -> bool:
        return self.min < self.max

    def __str__(self) -> str:
        return f"{self.min}:{self.max}" if self.elastic else str(self.min)


def torchrun_options(command: Sequence[str]) -> dict[str, str] | None:
    """torchrun's own options in ``command`` (before the training script), ``--opt_name`` spelled ``--opt-name``;
    ``None`` when the command is not torchrun (``torchrun ...``, ``python -m torch.distributed.run ...``)."""
    args = list(command)
    if not args:
        return None
    if os.path.basename(args[0]) == "torchrun":
        args = args[1:]
    elif re.fullmatch(r"python[0-9.]*", os.path.basename(args[0])) and len(args) > 2 and args[1] == "-m":
        if args[2] not in TORCHRUN_MODULES:
            return None
        args = args[3:]
    else:
        return None
    options: dict[str, str] = {}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        name, eq, value = args[i].partition("=")
        name = "--" + name.lstrip("-").replace("_", "-") if name.startswith("--") else name
        if eq or name in _FLAGS:
            options[name] = value if eq else ""
            i += 1
        else:
            options[name] = args[i + 1] if i + 1 < len(args) else ""
            i += 2
    return options


def node_range(command: Sequence[str]) -> NodeRange | None:
    """The node range of a torchrun ``command`` (``--nnodes``; 1 when absent); ``None`` when it is not torchrun."""
    options = torchrun_options(command)
    if options is None:
        return None
    value = options.get("--nnodes", "1")
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", value)
    if match is None:
        raise ConfigError(f"torchrun's --nnodes must be N or MIN:MAX, got {value!r}")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) else low
    if not 1 <= low <= high:
        raise ConfigError(f"torchrun's --nnodes {value} must have 1 <= MIN <= MAX")
    return NodeRange(low, high)


def check_multinode(command: Sequence[str], nodes: int) -> NodeRange:
    """The node range of ``command``, which is to run as ``nodes`` processes on this machine (one per node);
    :class:`ConfigError` unless it is torchrun with a rendezvous those processes can meet in."""
    joined = " ".join(command)
    options = torchrun_options(command)
    found = node_range(command)
    if options is None or found is None:
        raise ConfigError(
            f"a job of {nodes} nodes starts the command once per node, so it must be torchrun with --nnodes "
            f"(for example torchrun --nnodes 1:{nodes} --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:29400 "
            f"--rdzv-id job ...); got {joined!r}"
        )
    if "--standalone" in options or options.get("--rdzv-backend", "static") == "static":
        raise ConfigError(
            f"the {nodes} nodes of {joined!r} cannot meet: use --rdzv-backend c10d with an --rdzv-endpoint "
            "(not --standalone, whose rendezvous is one node's own)"
        )
    if not found.min <= nodes <= found.max:
        raise ConfigError(f"the job runs on --nnodes {found} nodes, not {nodes}: ask for a count in that range")
    return found


class NodeSizer:
    """How many nodes each attempt asks its pool for: the most the pool and the job allow; after an attempt that
    found no capacity, one fewer, down to the job's minimum (then the supervisor backs off, and the next ask is
    the most again). An attempt that found no capacity for more than the minimum is a *probe*: the pool's health
    does not count it against the pool (it had no room for that many, which says little of fewer)."""

    def __init__(self, command: Sequence[str]) -> None:
        self.range = node_range(command)
        self.probes: set[int] = set()
        self._asked: dict[str, int] = {}

    def full(self, pool: Pool) -> int:
        """What ``pool`` is asked for first: its ``nodes``, at most the job's maximum."""
        if self.range is None or not self.range.elastic:
            return pool.nodes
        return max(self.range.min, min(pool.nodes, self.range.max))

    def ask(self, pool: Pool) -> int:
        return self._asked.get(pool.name, self.full(pool))

    def after(self, pool: Pool, nodes: int, no_capacity: bool, number: int) -> str | None:
        """Record how attempt ``number``, of ``nodes`` nodes, ended; a reason when the next ask should come at
        once, for fewer nodes (``None``: the relaunch budget decides as for any attempt)."""
        if no_capacity and self.range is not None and self.range.elastic and nodes > self.range.min:
            self._asked[pool.name] = nodes - 1
            self.probes.add(number)
            return (
                f"{pool.name} had no room for {nodes} nodes; the job runs on {self.range.min} to "
                f"{self.range.max}: asking for {nodes - 1} now rather than waiting"
            )
        self._asked.pop(pool.name, None)
        return None


class NodesHandle:
    """An attempt of several nodes, each one process (a torchrun agent) on this machine: it runs while any node
    does. Its exit code: 0 when every node exited 0, else a node's death by a signal, else the first failure.
    Its pid (what the job store keeps to find the attempt again) is node 0's."""

    def __init__(self, nodes: Sequence[Handle]) -> None:
        if not nodes:
            raise ValueError("an attempt has at least one node")
        self.nodes = tuple(nodes)

    @property
    def pid(self) -> int | None:
        return self.nodes[0].pid

    @property
    def machine(self) -> str | None:
        return self.nodes[0].machine

    def poll(self) -> int | None:
        codes = [node.poll() for node in self.nodes]
        if any(code is None for code in codes):
            return None
        failed = [code for code in codes if code]
        signalled = [code for code in failed if code is not None and code < 0]
        return (signalled or failed or [0])[0]

    def signal(self, sig: int, *, group: bool = False) -> None:
        for node in self.nodes:
            node.signal(sig, group=group)

    def reap_group(self) -> None:
        for node in self.nodes:
            node.reap_group()

    def no_capacity(self, code: int) -> bool:
        return any(node.no_capacity(code) for node in self.nodes)


def start_nodes(nodes: int, start_node: Callable[[int], Handle]) -> Handle:
    """``start_node(i)`` for each node ``i`` of an attempt: the one handle itself for one node."""
    handles: list[Handle] = []
    try:
        for i in range(nodes):
            handles.append(start_node(i))
    except BaseException:
        for handle in handles:
            handle.signal(signal.SIGKILL, group=True)
        raise
    return handles[0] if nodes == 1 else NodesHandle(handles)
