"""Train a tiny GPT with the loop core on a fixed random corpus (used by tests/test_loop.py).

Usage: tiny_train.py OUT_DIR STEPS BATCH [DELAY_S] [OPTIMIZER]. Runs under plain python or torchrun (gloo
on CPU); with TINY_TRAIN_PID_DIR set, each rank writes its pid there (rankN.pid) for a test to signal;
TINY_TRAIN_HOOK_S adds a rank-0 hook that sleeps that long every 2 steps; TINY_TRAIN_DIST_TIMEOUT_S sets
the process group's timeout.
tests/test_loop.py also builds the same Trainer in-process with ``make_trainer``.
"""

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from chatforge.checkpoint import load_weights, save_model
from chatforge.config import ModelConfig, TrainConfig
from chatforge.model import GPT, lm_loss
from chatforge.train.loop import StepHook, Trainer, seed_everything, setup_runtime

corpus = np.random.default_rng(0).integers(0, 64, size=20_000)
# A learnable signal: every even position repeats the previous token.
corpus[1::2] = corpus[0::2][: len(corpus[1::2])]


def make_trainer(
    out_dir: str | Path,
    steps: int,
    batch: int,
    delay: float = 0.0,
    optimizer: str = "muon",
    hook_s: float = 0.0,
    **train: Any,
) -> Trainer:
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch,
        seq_len=32,
        optimizer=optimizer,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        ckpt_every=3,
        log_every=1,
        progress=False,
        keep_checkpoints=2,
        threads=1,
        **train,
    )
    rt = setup_runtime(cfg)
    seed_everything(cfg.seed)
    model = GPT(
        ModelConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        if delay:
            time.sleep(delay)
        rng = np.random.default_rng([cfg.seed, step, micro])
        starts = rng.integers(0, len(corpus) - cfg.seq_len - 1, size=batch * world)[
            rank * batch : (rank + 1) * batch
        ]
        w = torch.from_numpy(np.stack([corpus[s : s + cfg.seq_len + 1] for s in starts]))
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    def lm_loss_fn(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, int]:
        return lm_loss(m(b["input_ids"]), b["labels"]), {}, b["labels"].numel()

    def slow_hook(m: torch.nn.Module, step: int) -> dict[str, float]:
        time.sleep(hook_s)  # a during-training eval that takes its time (rank 0 only)
        return {"slept_s": hook_s}

    return Trainer(
        model,
        cfg,
        out_dir,
        loss_fn=lm_loss_fn,
        batch_fn=batch_fn,
        save_fn=lambda m, p, st: save_model(m, p, train_state=st),
        load_fn=load_weights,
        runtime=rt,
        hooks=[StepHook(every=2, fn=slow_hook)] if hook_s else [],
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    out_dir, steps, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    optimizer = sys.argv[5] if len(sys.argv) > 5 else "muon"
    hook_s = float(os.environ.get("TINY_TRAIN_HOOK_S", "0"))
    timeout = (
        {"dist_timeout_s": float(os.environ["TINY_TRAIN_DIST_TIMEOUT_S"])}
        if "TINY_TRAIN_DIST_TIMEOUT_S" in os.environ
        else {}
    )
    trainer = make_trainer(out_dir, steps, batch, delay, optimizer, hook_s, **timeout)
    if os.environ.get("TINY_TRAIN_PID_DIR"):  # so a test can signal one rank
        Path(os.environ["TINY_TRAIN_PID_DIR"], f"rank{trainer.rt.rank}.pid").write_text(str(os.getpid()))
    try:
        print(trainer.fit())
    except KeyboardInterrupt:  # as the chatforge command does: the loop has said what it saved
        print(f"rank {trainer.rt.rank} stopped at step {trainer.step}", flush=True)
        sys.exit(130)
