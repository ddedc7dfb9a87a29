"""Capacity pools, and the launchers that start an attempt in one.

A :class:`Pool` is somewhere the job can run: this machine, or an existing
launcher (SkyPilot, Slurm, Kubernetes) given as a command template. It carries
what the supervisor decides with: spot or on-demand, the price per hour (times
``nodes``), a zone and provider label, and how to recognise "no capacity".

A template is a list of arguments. An argument that is exactly ``{command}`` is
replaced by the job's command, argument by argument; every other argument is
formatted with these fields::

    {command_line}  the job's command as one shell-quoted string
    {job} {attempt} {url}     job name, attempt number, checkpoint URL
    {pool} {zone} {provider} {market}
    {nodes}         how many nodes this attempt asks for (the pool's, or fewer for an elastic torchrun job)
    {exclude}       machines of this pool to avoid, comma-separated ("" if none)

An argument that starts with ``?`` is optional: it is dropped when any field in
it is empty (``"?--exclude={exclude}"`` disappears while no machine is excluded).

The launcher's process stands for the attempt: its exit code is the job's (use
the launcher's "wait" mode: ``sbatch --wait``, ``kubectl run --attach``,
``sky launch`` without ``--detach-run``). SIGTERM to it must reach the job; a
``stop`` template runs as well when the supervisor stops an attempt (``scancel``,
``kubectl delete pod``, ``sky cancel``).
"""

from __future__ import annotations

import math
import re
import shlex
import signal
import socket
import string
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from spotsafe.errors import ConfigError
from spotsafe.supervisor.process import Job, launch

SPOT, ON_DEMAND = "spot", "on-demand"
TEMPLATE_FIELDS = frozenset(
    {"command_line", "job", "attempt", "url", "pool", "zone", "provider", "market", "nodes", "exclude"}
)


def check_template(template: Sequence[str], where: str) -> None:
    """Raise :class:`ConfigError` unless ``template`` is a list of strings using only known fields."""
    if isinstance(template, str):
        raise ConfigError(f"{where} must be a list of arguments, not one string (got {template!r})")
    for arg in template:
        if not isinstance(arg, str):
            raise ConfigError(f"{where}: every argument must be a string, got {arg!r}")
        arg = arg.removeprefix("?")
        if arg == "{command}":
            continue
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(arg) if name is not None]
        except ValueError as err:
            raise ConfigError(
                f"{where}: {arg!r} is not a valid template ({err}); write {{{{ for a literal {{"
            ) from None
        if "command" in names:
            raise ConfigError(
                f"{where}: {{command}} must be a whole argument (it becomes the command's arguments); inside "
                f"{arg!r} use {{command_line}} (the command as one shell-quoted string)"
            )
        unknown = [n for n in names if n not in TEMPLATE_FIELDS]
        if unknown:
            raise ConfigError(
                f"{where}: unknown field {{{unknown[0]}}} in {arg!r}; known: "
                + ", ".join(f"{{{n}}}" for n in sorted(TEMPLATE_FIELDS | {"command"}))
            )
        try:
            arg.format_map(dict.fromkeys(TEMPLATE_FIELDS, "x"))
        except (KeyError, ValueError, IndexError, AttributeError, TypeError) as err:
            raise ConfigError(
                f"{where}: {arg!r} is not a valid template ({type(err).__name__}: {err}); use plain fields like "
                "{zone}, and {{ }} for literal braces"
            ) from None


@dataclass(frozen=True, kw_only=True)
class Pool:
    """One kind of capacity. ``launch`` empty: run the command as a local process."""

    name: str
    market: str = SPOT
    price_per_hour: float = 0.0
    nodes: int = 1
    zone: str = ""
    provider: str = ""
    launch: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()
    capacity_exit_codes: frozenset[int] = field(default_factory=frozenset)
    capacity_patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"pool {self.name!r}"
        if not self.name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]*", self.name):
            raise ConfigError(f"a pool name must be letters, digits and _ . : - (got {self.name!r})")
        if self.market not in (SPOT, ON_DEMAND):
            raise ConfigError(f"{where}: market must be {SPOT!r} or {ON_DEMAND!r}, got {self.market!r}")
        price = self.price_per_hour
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not 0 <= price < math.inf:
            raise ConfigError(f"{where}: price_per_hour must be a number >= 0 (dollars per node-hour), got {price!r}")
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) or self.nodes < 1:
            raise ConfigError(f"{where}: nodes must be an integer >= 1, got {self.nodes!r}")
        for name in ("launch", "stop"):
            check_template(getattr(self, name), f"{where}: {name}")
        for code in self.capacity_exit_codes:
            if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
                raise ConfigError(f"{where}: capacity_exit_codes must be integers 1-255, got {code!r}")
        for pattern in self.capacity_patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                raise ConfigError(f"{where}: capacity pattern {pattern!r} is not a regular expression: {err}") from None

    @property
    def spot(self) -> bool:
        return self.market == SPOT

    @property
    def local(self) -> bool:
        return not self.launch

    def cost(self, seconds: float, nodes: int | None = None) -> float:
        """Dollars for holding ``nodes`` of this pool (``None``: its ``nodes``) for ``seconds``."""
        return self.price_per_hour * (self.nodes if nodes is None else nodes) * max(0.0, seconds) / 3600.0

    def describe(self) -> str:
        where = "/".join(x for x in (self.provider, self.zone) if x)
        return f"{self.name} ({self.market}, ${self.price_per_hour:g}/h" + (f", {where})" if where else ")")


LOCAL_POOL = Pool(name="local")


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """What to start: the job's ``command`` in ``pool``, with ``env`` added to the environment."""

    job: str
    attempt: int
    url: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    pool: Pool
    exclude: tuple[str, ...] = ()
    output: int | None = None
    nodes: int | None = None
    """How many nodes to start (``None``: the pool's ``nodes``; fewer for an elastic job the pool cannot fill)."""

    @property
    def node_count(self) -> int:
        return self.pool.nodes if self.nodes is None else self.nodes

    def fields(self) -> dict[str, str]:
        pool = self.pool
        return {
            "command_line": shlex.join(self.command),
            "job": self.job,
            "attempt": str(self.attempt),
            "url": self.url,
            "pool": pool.name,
            "zone": pool.zone,
            "provider": pool.provider,
            "market": pool.market,
            "nodes": str(self.node_count),
            "exclude": ",".join(self.exclude),
        }

    def expand(self, template: Sequence[str]) -> list[str]:
        out: list[str] = []
        values = self.fields()
        for arg in template:
            if arg == "{command}":
                out.extend(self.command)
            elif arg.startswith("?"):
                names = [name for _, name, _, _ in string.Formatter().parse(arg[1:]) if name]
                if all(values.get(name) for name in names):
                    out.append(arg[1:].format_map(values))
            else:
                out.append(arg.format_map(values))
        return out


class Handle(Protocol):
    """A started attempt, as the supervisor sees it."""

    @property
    def pid(self) -> int | None: ...

    @property
    def machine(self) -> str | None:
        """The machine it runs on, when the launcher knows (``None``: learn it from the job's events)."""

    def poll(self) -> int | None: ...

    def signal(self, sig: int, *, group: bool = False) -> None: ...

    def reap_group(self) -> None: ...

    def no_capacity(self, code: int) -> bool:
        """Whether exit ``code`` means the pool had no capacity (the job never started)."""


class Launcher(Protocol):
    """Starts attempts. Only launchers start processes (DESIGN: only ``supervisor/`` does)."""

    def start(self, spec: LaunchSpec) -> Handle: ...


class ProcessHandle:
    """An attempt that is one local process: the job itself, or a launcher command standing for it."""

    def __init__(self, job: Job, pool: Pool, machine: str | None, stop: list[str] | None) -> None:
        self._job = job
        self._pool = pool
        self._machine = machine
        self._stop = stop

    @property
    def pid(self) -> int | None:
        return self._job.pid

    @property
    def machine(self) -> str | None:
        return self._machine

    def poll(self) -> int | None:
        return self._job.poll()

    def signal(self, sig: int, *, group: bool = False) -> None:
        self._job.signal(sig, group=group)
        if self._stop and sig in (signal.SIGTERM, signal.SIGKILL):
            stop, self._stop = self._stop, None  # once per attempt
            subprocess.run(stop, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False, timeout=60)

    def reap_group(self) -> None:
        self._job.reap_group()

    def no_capacity(self, code: int) -> bool:
        if code in self._pool.capacity_exit_codes:
            return True
        tail = self._job.output_tail()
        return any(re.search(p, tail) for p in self._pool.capacity_patterns)


class PoolLauncher:
    """The default launcher: a local process, or the pool's command template."""

    def start(self, spec: LaunchSpec) -> Handle:
        pool = spec.pool
        if pool.local:
            job = launch(
                spec.command,
                env=spec.env,
                stdout=spec.output,
                stderr=spec.output,
                parent_death_signal=signal.SIGTERM,
                keep_tail=bool(pool.capacity_patterns),
            )
            return ProcessHandle(job, pool, socket.gethostname(), None)
        job = launch(
            spec.expand(pool.launch),
            env=spec.env,
            stdout=spec.output,
            stderr=spec.output,
            parent_death_signal=signal.SIGTERM,
            keep_tail=bool(pool.capacity_patterns),
        )
        return ProcessHandle(job, pool, None, spec.expand(pool.stop) if pool.stop else None)
