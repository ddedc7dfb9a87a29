"""The Hugging Face Trainer integration: ``callbacks=[SpotsafeCallback()]``, no subclass of ``Trainer``.

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SpotsafeCallback()])
    trainer.train()          # resumes from the newest verified checkpoint, if any; on a notice: exit 75

Running the same command again after an interruption is all a user does. The callback saves what
decides the future of the run (weights, optimizer, scheduler, AMP scaler, ``TrainerState``'s
deterministic fields, every RNG stream, the Trainer's data order and position) and never replaces
the Trainer's own data order: a run with the callback computes what it computes without it.

Trainer's own resume logic is not used (it needs ``resume_from_checkpoint`` before the loop starts
and replays data by reading it). The callback steers the unchanged loop instead, call by call:

1. ``on_init_end``: the :class:`~spotsafe.Checkpointer` is opened (signal handlers, notice sources;
   stops held by :func:`spotsafe.protect_startup` are taken over), with the model registered.
2. ``on_train_begin``: Trainer has built the optimizer, the scheduler and the training loader. They are
   registered, with the loader's position (:class:`~spotsafe.data.position.LoaderPosition`, attached to
   the torch ``DataLoader`` inside accelerate's ``DataLoaderShard``) and ``TrainerState``; then
   ``restore()``. Trainer's loop always starts at epoch 0, so the epochs already trained are made empty
   (:mod:`spotsafe.integrations.transformers.steering`): their iteration yields nothing, without reading data.
3. ``on_epoch_begin``: the restored RNG streams are put back where the uninterrupted run had them, before
   the resumed epoch's iteration (which then draws nothing, or its workers' seed as the uninterrupted run did).
4. ``on_substep_end`` / ``on_step_end``: the micro-batches consumed are counted. An optimizer step is done
   (``step_done()``) once Trainer's own work for it is done: at ``on_step_end``; at ``on_evaluate`` when
   Trainer evaluates at that step; at ``on_epoch_end`` (or the epoch's evaluation) for an epoch's last step.
   Evaluation draws from the global RNG (its loader's worker seed): a checkpoint taken before it would resume
   without that draw. ``step_done()`` saves when due; on a stop (with several ranks: the stop they agree on, at
   the same step on every rank) it makes the emergency save, then ``control.should_training_stop`` stops
   Trainer at this step boundary.
5. ``on_train_end``: after a stop, the process exits with 75 (the script's code after ``trainer.train()``
   does not run: an interrupted run never saves a "final" model); otherwise ``finish()``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import torch

from spotsafe.integrations import missing_extra

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as _err:
    raise missing_extra("transformers", "transformers", _err) from _err

from spotsafe.engine.checkpointer import Checkpointer
from spotsafe.engine.config import NoticeConfig
from spotsafe.errors import ConfigError
from spotsafe.exit_codes import EXIT_PREEMPTED
from spotsafe.integrations.transformers.steering import LoopSteering, SteeredLoader, TrainerProgress
from spotsafe.jobenv import JobEnv
from spotsafe.state.rng import GlobalRNG
from spotsafe.trackers import ReportTo

log = logging.getLogger("spotsafe")

_FOUND = ("model", "optimizer", "scheduler", "scaler", "loader")
"""Components the callback finds in the Trainer; passing them as keywords is an error."""

SUBFOLDER = "spotsafe"
"""Where checkpoints go without a ``url`` and without ``$SPOTSAFE_CHECKPOINT_URL``: ``<output_dir>/spotsafe``."""


class SpotsafeCallback(TrainerCallback):
    """Checkpoint a Hugging Face ``Trainer`` run with spotsafe; resume it by running the same command again.

    Args:
        url: where the run's checkpoints live (a folder, ``s3://...``); default ``$SPOTSAFE_CHECKPOINT_URL``,
            else ``<args.output_dir>/spotsafe``.
        extra: more components (objects with ``state_dict``/``load_state_dict``) saved with every
            checkpoint. Only what decides the future of the run: values that differ between two identical
            runs (timings, ``TrainerState.log_history``, ``total_flos``) make every drill comparison fail.
        exit_on_notice: after the emergency save, Trainer stops at the step boundary and the process exits
            with 75 at ``on_train_end``. ``False``: ``trainer.train()`` returns and :attr:`stopped` is true; the
            script decides (it must not treat the run as finished).
        exit: how the process exits (injectable for tests).
        checkpointer: any other :class:`~spotsafe.Checkpointer` keyword (``policy``, ``keep``, ``notices``,
            ``grace_s``, ``async_save``, ``storage_options``, ``save_config``, ...). The model, optimizer,
            scheduler, scaler and loader are found in the Trainer.

    One ``trainer.train()`` per callback. Do not combine it with ``resume_from_checkpoint`` or
    ``enable_jit_checkpoint`` (two resume mechanisms would fight over the same run).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        exit_on_notice: bool = True,
        exit: Callable[[int], NoReturn] = sys.exit,
        **checkpointer: Any,
    ) -> None:
        if url is not None and not isinstance(url, str):
            raise ConfigError(f"url must be a string (a folder or a URL), got {type(url).__name__}")
        if not isinstance(exit_on_notice, bool):
            raise ConfigError(f"exit_on_notice must be True or False, got {exit_on_notice!r}")
        unknown = sorted(set(checkpointer) - set(inspect.signature(Checkpointer).parameters) - {"self"})
        if unknown:
            raise ConfigError(f"unknown Checkpointer keyword {', '.join(map(repr, unknown))}")
        found = sorted(set(checkpointer) & set(_FOUND))
        if found:
            raise ConfigError(
                f"SpotsafeCallback finds {', '.join(found)} in the Trainer; do not pass "
                f"{'it' if len(found) == 1 else 'them'} (pass other objects as extra={{...}})"
            )
        self.url = url
        self.extra = dict(extra or {})
        self.exit_on_notice = exit_on_notice
        self._exit = exit
        notice_config = checkpointer.get("notice_config")
        if notice_config is not None:
            if not isinstance(notice_config, NoticeConfig):
                raise ConfigError(f"notice_config must be a spotsafe.NoticeConfig, got {type(notice_config).__name__}")
            self.exit_on_notice = exit_on_notice and notice_config.exit_on_notice
            checkpointer["notice_config"] = dataclasses.replace(notice_config, exit_on_notice=False)
        else:
            checkpointer["exit_on_notice"] = False
        # The Checkpointer's stop path returns (Checkpointer.stopped): the callback stops Trainer's loop at that step
        # boundary (the same one on every rank), then exits or returns in on_train_end.
        self._kwargs = checkpointer
        self._ckpt: Checkpointer | None = None
        self._report_to: ReportTo | None = None
        self._steer: LoopSteering | None = None
        self._started = False
        self._stopped = False
        self._due: str | None = None  # where the last optimizer step's step_done() waits: "evaluate", "epoch_end"

    # -- what the script may look at ------------------------------------------------------------
    @property
    def checkpointer(self) -> Checkpointer:
        """The run's :class:`~spotsafe.Checkpointer` (opened when the ``Trainer`` is created)."""
        if self._ckpt is None:
            raise RuntimeError("the checkpointer is opened when the Trainer is created (on_init_end)")
        return self._ckpt

    @property
    def stopped(self) -> bool:
        """Trainer was stopped for a notice (the emergency checkpoint is committed): the run is not finished."""
        return self._stopped

    @property
    def stop_requested(self) -> bool:
        """A stop notice arrived (on this rank), or Trainer was stopped for one."""
        return self._stopped or (self._ckpt is not None and self._ckpt.stop_requested)

    # -- 1. the Trainer is created ----------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._open(args, kwargs.get("model"))

    def _open(self, args: TrainingArguments, model: Any) -> Checkpointer:
        if self._ckpt is not None:
            return self._ckpt
        if getattr(args, "enable_jit_checkpoint", False):
            raise ConfigError(
                "enable_jit_checkpoint=True and SpotsafeCallback both handle SIGTERM; turn enable_jit_checkpoint off"
            )
        if getattr(args, "auto_find_batch_size", False):
            raise ConfigError(
                "auto_find_batch_size=True runs Trainer's loop again with another batch size, which changes the data "
                "order a checkpoint records; set per_device_train_batch_size instead"
            )
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"SpotsafeCallback needs the Trainer's model (a torch.nn.Module), got {type(model).__name__}"
            )
        url = self.url
        if url is None and JobEnv.from_env().checkpoint_url is None and "storage" not in self._kwargs:
            url = f"{str(args.output_dir).rstrip('/')}/{SUBFOLDER}"
        kwargs = dict(self._kwargs)
        if kwargs.get("trackers") == "report_to":  # the spot figures where the Trainer reports its own metrics
            self._report_to = ReportTo()
            kwargs["trackers"] = [self._report_to]
        self._ckpt = Checkpointer(url, model=model, **kwargs)
        return self._ckpt

    # -- 2. training begins: register what Trainer built, restore ----------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self._started:
            raise ConfigError("SpotsafeCallback runs one trainer.train(); create a new callback for another run")
        self._started = True
        if state.global_step != 0:
            raise ConfigError(
                f"Trainer resumed step {state.global_step} itself (resume_from_checkpoint): SpotsafeCallback resumes "
                "the run on its own; call trainer.train() without resume_from_checkpoint"
            )
        ckpt = self._open(args, kwargs.get("model"))
        optimizer = kwargs.get("optimizer")
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            raise ConfigError(f"Trainer has no torch optimizer to save (got {type(optimizer).__name__})")
        ckpt.register("optimizer", inner)
        scheduler = kwargs.get("lr_scheduler")
        if scheduler is not None:
            ckpt.register("scheduler", scheduler)
        scaler = getattr(optimizer, "scaler", None)  # mixed precision with a GradScaler (fp16 on a GPU)
        if scaler is not None:
            ckpt.register("scaler", scaler)
        loader = SteeredLoader(kwargs.get("train_dataloader"))
        ckpt.register("loader", loader.tracker)
        ckpt.register("trainer_state", TrainerProgress(state))
        for name, obj in self.extra.items():
            ckpt.register(name, obj)
        if self._report_to is not None:  # the Trainer's reporters are set up by now (their on_train_begin ran first)
            self._report_to.attach(args.report_to, str(args.output_dir))
        step = ckpt.restore()
        self._stopped = ckpt.stopped  # a stop in start-up or the restore: the restored checkpoint is the resume point
        if state.global_step != step:
            raise ConfigError(
                f"the checkpoint's step ({step}) and its TrainerState's global_step ({state.global_step}) differ; "
                "it was written by another kind of run"
            )
        self._steer = LoopSteering(
            loader,
            args,
            state,
            restored_rng=GlobalRNG().state_dict() if step else None,
            finished=self._stopped or (bool(step) and state.global_step >= state.max_steps),
        )
        if step:
            log.warning(
                "spotsafe: resumed at step %d (epoch %d, batch %d of %d)",
                step,
                loader.tracker.epoch,
                loader.tracker.position,
                loader.batches,
            )
        if self._stopped:
            control.should_training_stop = True
            self._leave()  # exits 75 (nothing was trained), unless exit_on_notice=False
        return control

    # -- 3./4. the loop -----------------------------------------------------------------------------
    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        self._flush(control)
        if self._steer is not None:
            self._steer.epoch_begins()
        return control

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        self._flush(control)
        if self._steer is not None:
            self._steer.step_begins()
        return control

    def on_substep_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._steer is not None:
            self._steer.batch_done(control, optimizer_step=False)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self._steer is None or self._stopped:
            return control
        self._steer.batch_done(control, optimizer_step=True)
        if self._steer.epoch_complete:
            self._due = "epoch_end"  # after the step's and the epoch's evaluation, if any
        elif control.should_evaluate:
            self._due = "evaluate"
        else:
            self._step_done(control)
        return control

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self._due == "evaluate":
            self._step_done(control)
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._steer is not None:
            self._steer.trainer_saved()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        if self._steer is not None:
            self._steer.epoch_ends(control)
        if self._due == "epoch_end":
            if control.should_evaluate:  # the epoch's evaluation comes after this call
                self._due = "evaluate"
            else:
                self._step_done(control)
        if self._stopped:
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False
        return control

    def _flush(self, control: TrainerControl) -> None:
        """A step whose ``step_done()`` waited for an evaluation that did not come: it is done now."""
        if self._due is not None:
            self._step_done(control)

    def _step_done(self, control: TrainerControl) -> None:
        self._due = None
        if self._ckpt is None or self._stopped:
            return
        self._ckpt.step_done()
        self._stopped = self._ckpt.stopped
        if self._stopped:
            # Stop at this step boundary: the emergency checkpoint is committed. Spend none of the time left on
            # Trainer's own evaluation or checkpoint of this step: the machine is going away.
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False

    # -- 5. the end -----------------------------------------------------------------------------------
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush(control)
        if self._steer is not None:
            self._steer.close()
        if self._ckpt is None:
            return
        if self._stopped:
            self._ckpt.close()
            self._leave()
        else:
            self._ckpt.finish()

    def _leave(self) -> None:
        """After a stop (the checkpointer has saved and closed): exit 75, or return with ``exit_on_notice=False``."""
        if not self.exit_on_notice:
            return
        if self._steer is not None:
            self._steer.close()
        log.warning(
            "spotsafe: stopped for a notice; exiting with %d (run the same command again to resume)", EXIT_PREEMPTED
        )
        self._exit(EXIT_PREEMPTED)


__all__ = ["SpotsafeCallback"]
