"""A small but realistic training job wired to spotsafe.

A two-layer transformer language model learns a synthetic "language" (a fixed
random Markov chain over 64 tokens, with random token noise as augmentation),
with AdamW, linear warm-up then cosine decay, dropout, and a shuffled data
loader with two worker processes. Trains in well under a minute on 2 CPU cores.

    python examples/tiny_lm.py --run-dir runs/tiny-lm

Kill it at any moment (SIGTERM, SIGINT, SIGUSR1, or a provider's preemption
notice: it saves and exits with 75; SIGKILL: it loses the steps since the last
checkpoint) and run the same command again: it resumes and ends with exactly the
same weights as an uninterrupted run.

Under torchrun it trains data-parallel (DDP over gloo, each rank on its own shard
of the data); every rank saves its own state under ``<run-dir>/rank-<r>`` and all
ranks stop, save and resume at the same step:

    torchrun --standalone --nproc-per-node 2 examples/tiny_lm.py --run-dir runs/tiny-lm-ddp
"""

from __future__ import annotations

import argparse
import math
import os
import random

import numpy as np
import torch
from torch import nn

import spotsafe
from spotsafe.engine.agreement import rank_url
from spotsafe.storage.faults import SlowStorage
from spotsafe.storage.registry import open_storage

VOCAB = 64
SEQ = 32


class MarkovText(torch.utils.data.Dataset[torch.Tensor]):
    """Sequences from a fixed random Markov chain; sample ``i`` is a pure function of ``i``,
    plus random token noise drawn from the global RNG (an augmentation, to show that
    randomness inside workers resumes exactly too)."""

    def __init__(self, size: int, seed: int = 1234, noise: float = 0.05) -> None:
        g = torch.Generator().manual_seed(seed)
        logits = torch.randn(VOCAB, VOCAB, generator=g) * 3
        self.transitions = torch.softmax(logits, dim=-1)
        self.size = size
        self.noise = noise
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        tokens = torch.empty(SEQ + 1, dtype=torch.long)
        tokens[0] = int(torch.randint(VOCAB, (1,), generator=g))
        for t in range(1, SEQ + 1):
            tokens[t] = int(torch.multinomial(self.transitions[tokens[t - 1]], 1, generator=g))
        flip = torch.rand(SEQ + 1) < self.noise
        tokens[flip] = torch.randint(VOCAB, (int(flip.sum()),))
        return tokens


class TinyLM(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(SEQ, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=dropout, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(SEQ), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        x = self.blocks(x, mask=self.mask, is_causal=True)
        return self.head(self.norm(x))


def warmup_cosine(warmup: int, total: int):  # type: ignore[no-untyped-def]
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default=None, help="checkpoint folder (default: $SPOTSAFE_CHECKPOINT_URL)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--save-every", type=int, default=40, help="checkpoint every N steps")
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--progress-interval", type=float, default=1.0)
    parser.add_argument("--storage-latency", type=float, default=0.0, help="emulate a slower store (s per write)")
    parser.add_argument("--stage-dir", default=None, help="local-then-upload: commit here first, upload after")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--sharded", action="store_true", help="several ranks: one checkpoint for all (resumable at another world size)"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # started by torchrun: data-parallel over gloo
        torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0

    model = TinyLM()
    trained: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.steps // 10, args.steps))
    data: torch.utils.data.Dataset[torch.Tensor] = MarkovText(args.samples)
    loader: spotsafe.ResumableLoader | spotsafe.ElasticLoader
    if args.sharded:  # a global data position: the rest of an epoch is split among however many ranks resume
        loader = spotsafe.ElasticLoader(data, batch_size=args.batch_size, seed=7, num_workers=args.workers)
    else:
        if world > 1:
            data = torch.utils.data.Subset(data, range(rank, args.samples, world))
        loader = spotsafe.ResumableLoader(
            data, batch_size=args.batch_size, shuffle=True, seed=7, num_workers=args.workers
        )
    storage = None
    if args.storage_latency > 0:
        url = args.run_dir or os.environ["SPOTSAFE_CHECKPOINT_URL"]
        storage = SlowStorage(open_storage(rank_url(url, rank) if world > 1 else url), args.storage_latency)

    ckpt = spotsafe.Checkpointer(
        args.run_dir,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        policy=spotsafe.every(steps=args.save_every),
        keep=args.keep,
        progress_interval=args.progress_interval,
        metadata={"example": "tiny_lm", "steps": args.steps},
        storage=storage,
        stage_dir=args.stage_dir,
        sharded=args.sharded,
    )
    start = ckpt.restore()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"tiny_lm: attempt {ckpt.attempt}, starting at step {start} (epoch {ckpt.epoch})", flush=True)

    loss_fn = nn.CrossEntropyLoss()
    model.train()
    while ckpt.step < args.steps:
        for batch in loader:
            logits = trained(batch[:, :-1])
            loss = loss_fn(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            ckpt.step_done()
            if ckpt.step % args.log_every == 0:
                say(f"step {ckpt.step:5d}  epoch {ckpt.epoch}  loss {loss.item():.4f}", flush=True)
            if ckpt.step >= args.steps:
                break
    ckpt.finish()
    say(f"tiny_lm: finished at step {ckpt.step}", flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
