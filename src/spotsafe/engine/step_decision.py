"""What to do at a step boundary: save now (why)? stop? what to tell the other ranks? A pure function.

:func:`decide` reads only a :class:`StepContext` (the step, what the save policy sees, what the
notice sources posted and, with other ranks, what they agreed) and returns a :class:`StepAction`;
:meth:`~spotsafe.Checkpointer.step_done` carries it out in this order:

1. ``saves``: try these saves in order until one goes through (an interval save may be
   deferred while the previous one is written, ``when_busy="skip"``);
2. ``stop``: then run the stop path (:mod:`spotsafe.engine.emergency_save`) with ``deadline``;
3. ``recheck`` (one process): after the save, look at the notice sources again and stop if a
   stop notice came meanwhile;
4. ``post`` (several ranks, at an exchange step): after the save, post this rank's flags,
   :func:`flags_to_post` over what the policy sees then.

One process acts on its own notices at once. Several ranks act on what they agreed at the previous
exchange step (:mod:`spotsafe.engine.agreement`), all at the same step; only step-count policies,
which say the same on every rank, save between exchange steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from spotsafe.engine.agreement import NOTHING, ExchangeFlags
from spotsafe.policy.interval import SaveContext, SavePolicy
from spotsafe.reasons import SaveReason


@dataclass(frozen=True, kw_only=True)
class Exchange:
    """Where the agreement between ranks stands at this step (distributed runs only).

    ``due``: this is an exchange step (the same on every rank). ``agreed``: what the exchange
    posted at the previous exchange step says, collected at this one (``None`` between exchanges).
    """

    due: bool
    agreed: ExchangeFlags | None = None


@dataclass(frozen=True, kw_only=True)
class StepContext:
    """Everything :func:`decide` looks at.

    ``stop``/``deadline``: a stop notice is pending on this rank, and its deadline (Unix time).
    ``warning``: an early warning arrived since it was last looked at (it is acted on now).
    ``warnings_save``: ``on_notice(warnings="save")``. ``last_save_step``: the step of the last
    save that went through (``None``: none, or it failed). ``exchange``: ``None`` for one process.
    """

    step: int
    policy: SavePolicy
    save: SaveContext
    last_save_step: int | None = None
    stop: bool = False
    deadline: float | None = None
    warning: bool = False
    warnings_save: bool = True
    exchange: Exchange | None = None

    @property
    def saved_this_step(self) -> bool:
        return self.last_save_step == self.step


@dataclass(frozen=True, kw_only=True)
class StepAction:
    """What to do at this step, in the order of the module docstring."""

    saves: tuple[SaveReason, ...] = ()
    stop: bool = False
    deadline: float | None = None
    recheck: bool = False
    post: bool = False


NOTHING_TO_DO = StepAction()


def decide(ctx: StepContext) -> StepAction:
    """The action for ``ctx`` (see the module docstring). Pure: policies are values."""
    if ctx.exchange is not None:
        return _decide_together(ctx, ctx.exchange)
    if ctx.stop:
        return StepAction(stop=True, deadline=ctx.deadline)
    if ctx.warning and ctx.warnings_save and not ctx.saved_this_step:
        return StepAction(saves=(SaveReason.WARNING,))
    if ctx.policy.should_save(ctx.save):
        return StepAction(saves=(SaveReason.INTERVAL,), recheck=True)
    return NOTHING_TO_DO


def _decide_together(ctx: StepContext, exchange: Exchange) -> StepAction:
    """With other ranks: step-count policies at once; notices, warnings and wall-clock policies as agreed."""
    steps_due = any(p.steps_only and p.should_save(ctx.save) for p in ctx.policy.parts())
    saves: tuple[SaveReason, ...] = (SaveReason.INTERVAL,) if steps_due else ()
    if not exchange.due:
        return StepAction(saves=saves)  # between exchange steps: notices and wall-clock saves wait for the next one
    agreed = exchange.agreed or NOTHING
    if agreed.stop:
        return StepAction(saves=saves, stop=True, deadline=agreed.deadline)
    if (agreed.warning or agreed.save) and not ctx.saved_this_step:
        saves += (SaveReason.WARNING if agreed.warning else SaveReason.INTERVAL,)
    return StepAction(saves=saves, post=True)


def flags_to_post(
    policy: SavePolicy, save: SaveContext, *, stop: bool, warning: bool, deadline: float | None
) -> ExchangeFlags:
    """This rank's flags for the next exchange: its stop notice and warning, and whether a wall-clock
    policy asks for a save in ``save`` (what the policy sees after this step's saves)."""
    due = any(not p.steps_only and p.should_save(save) for p in policy.parts())
    return ExchangeFlags(stop=stop, warning=warning, save=due, deadline=deadline)
