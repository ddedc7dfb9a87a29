"""A Hugging Face Trainer job that survives spot interruptions: one callback, no Trainer subclass.

A tiny GPT-2 (built from a config: nothing is downloaded) learns a synthetic token language with the
Trainer's own AdamW, a cosine schedule with warm-up, dropout and a shuffled loader with two worker
processes. The spotsafe part is two lines: ``spotsafe.protect_startup()`` at the top (a stop during the
slow imports is not lost) and ``callbacks=[SpotsafeCallback(...)]``.

    python examples/hf_gpt2.py --output-dir runs/hf-gpt2

Stop it at any moment (SIGTERM, Ctrl-C, a provider's notice: it saves, stops Trainer at the step boundary
and exits with 75; SIGKILL: it loses the steps since the last checkpoint) and run the same command again:
it resumes and ends with exactly the weights of an uninterrupted run. The model is saved with
``trainer.save_model`` only when training has finished. Under ``spotsafe run`` / ``spotsafe drill`` the
checkpoints go to ``$SPOTSAFE_CHECKPOINT_URL``; otherwise to ``<output-dir>/spotsafe``.

``--no-spotsafe`` runs the same script without the callback (to check that it changes nothing), and
``--hold-at STEP`` makes a test or a drill, not the machine's speed, decide when the job is interrupted.
"""

from __future__ import annotations

import spotsafe

spotsafe.protect_startup()  # before the heavy imports: a SIGTERM from here on is held, not fatal

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from spotsafe.integrations.transformers import SpotsafeCallback  # noqa: E402

VOCAB = 64
SEQ = 16


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Sequences of a fixed random "language" (each token depends on the one before); sample ``i`` is a
    pure function of ``first + i``, so every run sees the same data."""

    def __init__(self, size: int, first: int = 0, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        self.next_token = torch.randint(VOCAB, (VOCAB, 3), generator=g)
        self.size, self.first, self.seed = size, first, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.first + index)
        choice = torch.randint(3, (SEQ,), generator=g)
        tokens = torch.empty(SEQ, dtype=torch.long)
        tokens[0] = int(torch.randint(VOCAB, (1,), generator=g))
        for t in range(1, SEQ):
            tokens[t] = self.next_token[tokens[t - 1], choice[t]]
        return {"input_ids": tokens, "labels": tokens.clone()}


class HoldAt(TrainerCallback):  # type: ignore[misc]
    """For tests and drills: after a step in ``holds`` that this attempt reaches by training, wait until a stop
    notice arrives; the emergency save is then of exactly that step. ``ATTEMPT:STEP`` holds only in attempt
    ATTEMPT (``$SPOTSAFE_ATTEMPT``, set by ``spotsafe run``); a drill's reference run never holds."""

    def __init__(self, holds: list[str], spotsafe_callback: SpotsafeCallback) -> None:
        attempt = os.environ.get("SPOTSAFE_ATTEMPT", "1")
        self.steps = {int(h.rpartition(":")[2]) for h in holds if h.rpartition(":")[0] in ("", attempt)}
        self.spotsafe = spotsafe_callback
        self.reference = os.environ.get("SPOTSAFE_RUN_ID") == "reference"

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.reference or state.global_step not in self.steps:
            return
        print(f"hf_gpt2: holding after step {state.global_step}", flush=True)
        while not self.spotsafe.stop_requested:
            time.sleep(0.01)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/hf-gpt2", help="Trainer's output_dir")
    parser.add_argument(
        "--checkpoint-url", default=None, help="default: $SPOTSAFE_CHECKPOINT_URL or <output-dir>/spotsafe"
    )
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps (-1: use --epochs)")
    parser.add_argument("--epochs", type=float, default=3.0, help="epochs, when --max-steps is -1")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps")
    parser.add_argument("--workers", type=int, default=2, help="dataloader_num_workers")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps of the cosine schedule")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimizer steps")
    parser.add_argument("--eval-every", type=int, default=0, help="evaluate every N optimizer steps (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds to sleep per step (a slower job for drills)")
    parser.add_argument("--final-dir", default=None, help="save the trained model here once training has finished")
    parser.add_argument("--no-spotsafe", action="store_true", help="the same run without the callback")
    parser.add_argument("--hold-at", action="append", default=[], metavar="[ATTEMPT:]STEP", help="(tests, drills)")
    return parser.parse_args()


class Sleep(TrainerCallback):  # type: ignore[misc]
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)


def main() -> None:
    opts = parse()
    torch.set_num_threads(opts.threads)
    set_seed(opts.seed)  # the model's initial weights; Trainer seeds again with args.seed
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=opts.output_dir,
        max_steps=opts.max_steps,
        num_train_epochs=opts.epochs,
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.accumulation,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=opts.warmup,
        weight_decay=0.01,
        dataloader_num_workers=opts.workers,
        dataloader_pin_memory=False,
        seed=opts.seed,
        save_strategy="no",  # spotsafe checkpoints; Trainer's own checkpoints are not needed to resume
        eval_strategy="steps" if opts.eval_every else "no",
        eval_steps=opts.eval_every or None,
        per_device_eval_batch_size=opts.batch_size,
        logging_steps=10,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        ddp_find_unused_parameters=False,  # under torchrun (DDP over gloo)
    )
    callbacks: list[TrainerCallback] = []
    if not opts.no_spotsafe:
        spot = SpotsafeCallback(opts.checkpoint_url, policy=spotsafe.every(steps=opts.save_every), progress_interval=0)
        if opts.hold_at:
            callbacks.append(HoldAt(opts.hold_at, spot))  # before the spotsafe callback: it saves this step
        callbacks.append(spot)
    if opts.sleep:
        callbacks.insert(0, Sleep(opts.sleep))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=Tokens(opts.samples),
        eval_dataset=Tokens(16, first=opts.samples) if opts.eval_every else None,
        callbacks=callbacks,
    )
    trainer.train()  # resumes if there is a checkpoint; on a stop notice it exits 75 (this line does not return)
    print(f"hf_gpt2: finished at step {trainer.state.global_step}", flush=True)
    if opts.final_dir:
        trainer.save_model(opts.final_dir)


if __name__ == "__main__":
    main()
