"""``SpotsafeCallback``: a Lightning Trainer that survives preemption, bit-exact, with one line.

    trainer = L.Trainer(max_epochs=10, callbacks=[SpotsafeCallback()])

Call sequence (the Trainer's hooks, in the order Lightning calls them in ``fit``):

1. ``setup("fit")``: the :class:`~spotsafe.Checkpointer` is made (storage, writer claim, signal handlers: a
   stop from here on is a notice; one held by :func:`spotsafe.protect_startup` is handed over), the
   LightningModule is registered as ``model``, and the strategy's ``process_dataloader`` is wrapped so that
   the train DataLoader Lightning makes gets a :class:`~spotsafe.data.position.LoaderPosition` before its
   first iteration.
2. ``on_fit_start``: the optimizers, LR schedulers, precision plugin (AMP scaler), Lightning's loop progress
   and the data position are registered, and ``restore()`` loads the newest verified checkpoint into them
   (a pending stop notice ends the process there with 75). Lightning's loops then go on from there.
3. ``on_train_start``: Lightning installed its own SIGTERM handler; spotsafe's is put back, so that a SIGTERM
   is a notice handled at a step boundary (not Lightning's ``SIGTERMException`` between two hooks).
4. After every optimizer step, at the step's boundary, ``step_done()``: it saves when the policy says so,
   and on a stop notice saves and exits 75 (``SystemExit``: Lightning tears down, DataLoader workers stop, and
   the code after ``trainer.fit`` does not run). The boundary is the last moment that belongs to the step:
   ``on_train_batch_end``; ``on_validation_end`` when a validation runs after the batch; and when the epoch or
   the training ends with the batch, after every hook of the epoch: the next ``on_train_epoch_start``, or
   ``on_train_end``. A notice at the last step saves the finished state: the next attempt trains nothing.
5. ``on_fit_end``: ``finish()``, the final checkpoint. ``on_exception`` / ``teardown``: ``close()``.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from collections.abc import Callable
from typing import Any

from spotsafe.engine.checkpointer import Checkpointer
from spotsafe.errors import ConfigError
from spotsafe.integrations.lightning.package import choose
from spotsafe.integrations.lightning.state import BATCH, EPOCH, LoopState, TrainLoader, set_sampler_epoch
from spotsafe.jobenv import JobEnv
from spotsafe.policy.interval import SavePolicy
from spotsafe.trackers import TrainerLoggers

VALIDATION = "validation"
OWNED = ("model", "optimizer", "scheduler", "scaler", "loader")
"""Checkpointer arguments the callback fills in itself, from the Trainer."""
_MID_EPOCH_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"
_LIGHTNING_HANDLER = "_HandlersCompose"
"""The class of the SIGTERM handler Lightning installs in ``fit`` (it raises ``SIGTERMException`` between hooks)."""


class SpotsafeCallback:
    """Checkpoints a Lightning ``fit`` with spotsafe and resumes it, bit-exact, when the same command runs again.

    Args:
        url: where the run lives (a folder, ``s3://...``, ...); default ``$SPOTSAFE_CHECKPOINT_URL`` (set by
            ``spotsafe run``/``drill``), else ``<trainer.default_root_dir>/spotsafe``.
        policy: when to take regular checkpoints (``spotsafe.every(steps=500)``, ...); the Checkpointer's default
            otherwise.
        package: ``"lightning"`` or ``"pytorch_lightning"``: whose ``Callback`` this is. Default: the package the
            program imported (its Trainer's), else ``lightning``.
        **checkpointer_kwargs: every other :class:`~spotsafe.Checkpointer` keyword (``keep``, ``extra``,
            ``grace_s``, ``exit_on_notice``, ``async_save``, ``notices``, ...). ``model``, ``optimizer``,
            ``scheduler``, ``scaler`` and ``loader`` come from the Trainer and cannot be given.

    Saved, every time: the LightningModule's state, every optimizer and LR scheduler, the precision plugin's
    state (AMP's GradScaler), Lightning's loop progress and ``should_stop``, the train DataLoader's order and
    position, every RNG stream, and ``extra``. With ``exit_on_notice=False`` a stop notice saves, sets
    ``trainer.should_stop`` and ``fit`` returns: check :attr:`stop_requested` and exit 75 yourself.

    The instance belongs to the package chosen when it is made: ``isinstance(cb, lightning.pytorch.Callback)``
    (or ``pytorch_lightning.Callback``) holds, and so does ``isinstance(cb, SpotsafeCallback)``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SpotsafeCallback:
        if cls is SpotsafeCallback:
            cls = callback_class(kwargs.get("package"))
        return super().__new__(cls)

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        policy: SavePolicy | None = None,
        package: str | None = None,
        **checkpointer_kwargs: Any,
    ) -> None:
        given = sorted(set(checkpointer_kwargs) & set(OWNED))
        if given:
            raise ConfigError(
                f"SpotsafeCallback takes {', '.join(given)} from the Trainer (the LightningModule, its optimizers, "
                "schedulers, precision plugin and train DataLoader); leave them out"
            )
        super().__init__()
        self.url = url
        self.policy = policy
        self.package = package
        self.checkpointer_kwargs = dict(checkpointer_kwargs)
        self._reset()

    def _reset(self) -> None:
        self._ckpt: Checkpointer | None = None
        self._loops: LoopState | None = None
        self._data: TrainLoader | None = None
        self._pending: str | None = None
        self._stopped = False
        self._own_handlers: dict[int, Any] = {}
        self._wrapped: tuple[Any, Callable[[object], object]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: a live run (its Checkpointer) belongs to the process that made it."""
        state = dict(self.__dict__)
        for key in ("_ckpt", "_loops", "_data", "_own_handlers", "_wrapped"):
            state[key] = {} if key == "_own_handlers" else None
        return state

    # -- what a user may read ---------------------------------------------------------------------------------------
    @property
    def checkpointer(self) -> Checkpointer | None:
        """The run's Checkpointer, between ``setup`` and the end of ``fit``."""
        return self._ckpt

    @property
    def stop_requested(self) -> bool:
        """A stop notice arrived (the run stops at the next step boundary), or was handled: after ``fit`` returns
        with ``exit_on_notice=False``, the emergency checkpoint is the resume point; exit 75."""
        return self._stopped or (self._ckpt is not None and self._ckpt.stop_requested)

    @property
    def step(self) -> int:
        """Optimizer steps counted (``trainer.global_step`` at the last step boundary)."""
        return 0 if self._ckpt is None else self._ckpt.step

    # -- 1. setup ---------------------------------------------------------------------------------------------------
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self._ckpt is not None:
            raise ConfigError("SpotsafeCallback is already in a fit(); give each Trainer its own callback")
        self._belong_to(trainer)
        self._reset()
        url = self.url
        if url is None and JobEnv.from_env().checkpoint_url is None:
            url = os.path.join(str(trainer.default_root_dir), "spotsafe")
        kwargs = dict(self.checkpointer_kwargs)
        if self.policy is not None:
            kwargs["policy"] = self.policy
        if kwargs.get("trackers") == "trainer":  # the spot figures beside the training's, in the Trainer's loggers
            kwargs["trackers"] = [TrainerLoggers(trainer)]
        before = _handlers()
        ckpt = self._ckpt = Checkpointer(url, **kwargs)
        self._own_handlers = {sig: h for sig, h in _handlers().items() if before.get(sig) is not h}
        self._loops = LoopState(trainer)
        self._data = TrainLoader(lambda: int(trainer.current_epoch))
        ckpt.register("model", pl_module)
        self._wrap_process_dataloader(trainer)

    def _belong_to(self, trainer: Any) -> None:
        """Be an instance of the ``Callback`` of the trainer's package (a program that imported both packages got
        ``lightning``'s when it made this callback, and uses ``pytorch_lightning``'s Trainer, or the reverse)."""
        package = "pytorch_lightning" if type(trainer).__module__.startswith("pytorch_lightning") else "lightning"
        cls = callback_class(package)
        if type(self) is not cls:
            self.__class__ = cls

    def _wrap_process_dataloader(self, trainer: Any) -> None:
        """Position the train DataLoader as Lightning makes it (after its DistributedSampler and the strategy's
        processing), before ``fit`` iterates it. ``Strategy.process_dataloader`` is the one public step between
        the two; it is wrapped on this strategy object only, and put back at the end of ``fit``."""
        strategy = trainer.strategy
        original = strategy.process_dataloader

        def process_dataloader(dataloader: object) -> object:
            processed = original(dataloader)
            data, loops = self._data, self._loops
            if data is not None and loops is not None and trainer.training and not trainer.sanity_checking:
                first = data.loader is None
                if data.attach(processed) and first and loops.restored_kind is not None:
                    set_sampler_epoch(processed, int(trainer.current_epoch))  # type: ignore[arg-type]
            return processed

        strategy.process_dataloader = process_dataloader
        self._wrapped = (strategy, process_dataloader)

    def _unwrap(self) -> None:
        wrapped, self._wrapped = self._wrapped, None
        if wrapped is not None and vars(wrapped[0]).get("process_dataloader") is wrapped[1]:
            del wrapped[0].process_dataloader

    # -- 2. restore -------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        ckpt, loops, data = self._ckpt, self._loops, self._data
        if ckpt is None or loops is None or data is None:
            return
        for i, optimizer in enumerate(trainer.optimizers):
            ckpt.register("optimizer" if i == 0 else f"optimizer_{i}", optimizer)
        for i, config in enumerate(trainer.lr_scheduler_configs):
            ckpt.register("scheduler" if i == 0 else f"scheduler_{i}", config.scheduler)
        ckpt.register("precision", trainer.precision_plugin)
        ckpt.register("lightning_loops", loops)
        ckpt.register("loader", data)
        ckpt.restore()  # a stop notice pending here ends the process with 75, having saved nothing new
        if loops.restored_kind == BATCH:
            # Lightning warns that a mid-epoch resume replays or skips data unless the loader has its own state_dict;
            # here the loader's position is spotsafe's, restored above.
            warnings.filterwarnings("ignore", message=_MID_EPOCH_WARNING)
        if loops.restored_kind is not None and trainer.ckpt_path:
            raise ConfigError(
                f"fit(ckpt_path={trainer.ckpt_path!r}) would load a Lightning checkpoint over the one spotsafe just "
                f"restored (step {ckpt.step} of {ckpt.storage_config.url}): spotsafe's is the resume point. Leave "
                "ckpt_path out when running the command again"
            )

    # -- 3. signals -------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._ckpt is None or self._data is None:
            return
        self._data.check(trainer.train_dataloader)
        if threading.current_thread() is threading.main_thread():
            for sig, ours in self._own_handlers.items():
                if type(signal.getsignal(sig)).__name__ == _LIGHTNING_HANDLER:
                    signal.signal(sig, ours)
        connector = getattr(trainer, "_signal_connector", None)
        if getattr(connector, "received_sigterm", False):
            # Lightning's handler saw a SIGTERM in set-up; spotsafe's (which it called too) has the notice and
            # stops at the first step boundary. Lightning would raise SIGTERMException between two hooks instead.
            connector.received_sigterm = False  # type: ignore[union-attr]

    # -- 4. step boundaries -----------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        ckpt, data = self._ckpt, self._data
        if ckpt is None or data is None:
            return
        data.consumed()
        if trainer.global_step <= ckpt.step:
            return  # gradients accumulate: no optimizer step, no boundary
        if _ends_epoch(trainer):
            self._pending = EPOCH
        elif _validation_follows(trainer):
            self._pending = VALIDATION
        else:
            self._boundary(trainer, BATCH)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._pending == VALIDATION and not trainer.sanity_checking:
            self._boundary(trainer, BATCH)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._data is not None:
            self._data.finish_epoch()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self._pending is not None:
            self._boundary(trainer, EPOCH)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._ckpt is not None and (self._pending is not None or self._ckpt.step < trainer.global_step):
            self._boundary(trainer, EPOCH)

    def _boundary(self, trainer: Any, kind: str) -> None:
        """The step is complete: count it (it may save; a stop notice saves and exits 75 here)."""
        self._pending = None
        ckpt, loops = self._ckpt, self._loops
        if ckpt is None or loops is None or self._stopped:
            return
        loops.kind = kind
        while ckpt.step < trainer.global_step:
            ckpt.step_done()
            if _stopped(ckpt):  # exit_on_notice=False: step_done saved and returned
                self._stopped = True
                trainer.should_stop = True
                return

    # -- 5. the end -------------------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        ckpt, loops = self._ckpt, self._loops
        if ckpt is None or loops is None:
            return
        if self._stopped:
            ckpt.close()  # stopped on a notice (exit_on_notice=False): its emergency checkpoint is the resume point
        else:
            loops.kind = EPOCH
            ckpt.finish()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._shutdown(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self._shutdown(trainer)

    def _shutdown(self, trainer: Any) -> None:
        self._unwrap()
        ckpt, self._ckpt = self._ckpt, None
        if ckpt is not None:
            ckpt.close()
        # Lightning's teardown (after on_exception) puts back the handlers it found in fit: spotsafe's, which
        # close() has just replaced by the ones from before. Make it put those back instead.
        saved = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", None)
        if isinstance(saved, dict):
            for sig, ours in self._own_handlers.items():
                if saved.get(sig) == ours:
                    saved[sig] = signal.getsignal(sig)


def _stopped(ckpt: Checkpointer) -> bool:
    """The Checkpointer took its stop path. Not ``stop_requested``: that is true as soon as a notice is pending, and
    with several ranks the stop comes at the step they agree on, a few steps later."""
    return ckpt.stopped


def _handlers() -> dict[int, Any]:
    return {int(sig): signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}


def _ends_epoch(trainer: Any) -> bool:
    """After this batch the epoch ends (its last batch, ``max_steps``, ``should_stop``): the boundary waits for
    the epoch's hooks (validation, ``on_train_epoch_end``)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    last = bool(progress.is_last_batch) or progress.current.ready >= trainer.num_training_batches
    max_steps = trainer.max_steps
    return (
        last or (max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps) or trainer.should_stop
    )


def _validation_follows(trainer: Any) -> bool:
    """Lightning runs a validation after this batch (``val_check_interval``): the boundary waits for its end.

    Asks the epoch loop's own decision (private in Lightning 2.x, ``_should_check_val_fx``): the rules
    (``val_check_interval``, ``check_val_every_n_epoch``, time-based intervals) are Lightning's to keep."""
    loop = trainer.fit_loop.epoch_loop
    decide = getattr(loop, "_should_check_val_fx", None)
    if decide is None:
        return False
    try:
        return bool(decide(getattr(trainer.fit_loop, "_data_fetcher", None)))
    except TypeError:  # an older signature without the data fetcher
        return bool(decide())


_CLASSES: dict[str, type[SpotsafeCallback]] = {}


def callback_class(package: str | None = None) -> type[SpotsafeCallback]:
    """The ``SpotsafeCallback`` class that subclasses ``package``'s ``Callback`` (see :func:`choose`)."""
    module = choose(package)
    cls = _CLASSES.get(module.__name__)
    if cls is None:
        qualname = "SpotsafeCallback_" + module.__name__.replace(".", "_")
        namespace = {"__module__": __name__, "__qualname__": qualname, "__doc__": SpotsafeCallback.__doc__}
        cls = type("SpotsafeCallback", (SpotsafeCallback, module.Callback), namespace)
        globals()[qualname] = cls  # pickle finds it by name
        _CLASSES[module.__name__] = cls
    return cls


__all__ = ["OWNED", "SpotsafeCallback", "callback_class"]
