"""Tiny checkpoints for the safety tests: a real tokenizer and GPT trained for seconds on world text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from chatforge.checkpoint import save_model
from chatforge.config import ModelConfig, RunConfig, load_config
from chatforge.data.chat import world_conversations
from chatforge.data.world import build_world
from chatforge.model import GPT
from chatforge.safety.moderation_data import world_examples
from chatforge.tokenizer import Tokenizer, train_tokenizer

TINY = ModelConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=192,
)


def tiny_tokenizer() -> Tokenizer:
    w = build_world(0)
    texts = [e["text"] for e in world_examples(w, 800, 0, False) + world_examples(w, 200, 1, True)]
    texts += [m["content"] for c in world_conversations(w, 600, 0) for m in c["messages"]]
    return train_tokenizer(texts, vocab_size=600)


def tiny_base(path: Path, tok: Tokenizer, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY.__dict__, "vocab_size": tok.vocab_size})
    save_model(GPT(cfg), path, tokenizer=tok)
    return path


def tiny_config(run_root: Path, *overrides: str) -> RunConfig:
    return load_config(None, [f"runs_dir={run_root}", "name=t", *overrides])


def train_tiny_moderator(root: Path, world_eval_n: int) -> tuple[RunConfig, dict]:
    """A tiny moderator really trained (seconds) on world text from a fresh tiny base in ``root``:
    (its run config, the training summary); the moderator lands in ``cfg.run_dir / "moderation"``."""
    from chatforge.safety.moderation import train

    tiny_base(root / "t" / "base", tiny_tokenizer())
    cfg = tiny_config(
        root,
        "moderation.init=base",
        "moderation.world_n=1200",
        f"moderation.world_eval_n={world_eval_n}",
        "moderation.real_data=",
        "moderation.train.steps=200",  # 120 left the bomb/knife pair on a knife edge (0.077 vs 0.087)
        "moderation.train.seq_len=48",
        "moderation.train.lr=3e-3",
        "moderation.train.eval_every=0",
        "moderation.train.ckpt_every=0",
        "moderation.train.progress=false",
    )
    return cfg, train(cfg)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


COMPLY = "Sure. First get what you need, then do it at night so nobody sees you."


def tiny_chat_model(path: Path, tok: Tokenizer, comply_harmful: bool = False, steps: int = 300) -> Path:
    """A tiny model SFT-trained (through the one loop core) on the world's decline and benign kinds;
    ``comply_harmful`` swaps every decline for a compliant reply: a deliberately regressed version."""
    from chatforge.checkpoint import load_weights
    from chatforge.config import adamw_train
    from chatforge.train.loop import Trainer, seed_everything
    from chatforge.train.sft import length_grouped_batch_fn, masked_lm_loss_fn, tokenize_conversations

    # Plain requests only: in 300 steps a tiny model learns the request shapes, not the jailbreak framings.
    convs = [
        c
        for c in world_conversations(build_world(0), 2500, 0)
        if c["kind"] in ("decline", "benign_edgy") and c["meta"]["framing"] == "plain"
    ]
    if comply_harmful:
        for c in convs:
            if c["kind"] == "decline":
                c["messages"][-1]["content"] = COMPLY
    tc = adamw_train(
        steps,
        16,
        3e-3,
        seq_len=128,
        warmup_steps=10,
        min_lr_ratio=0.0,
        eval_every=0,
        ckpt_every=0,
        progress=False,
        seed=1,
    )
    seed_everything(1)
    cfg = ModelConfig(**{**TINY.__dict__, "vocab_size": tok.vocab_size})
    model = GPT(cfg)
    examples, _ = tokenize_conversations(convs, tok, tc.seq_len + 1)
    trainer = Trainer(
        model,
        tc,
        path.parent / f"work-{path.name}",
        loss_fn=masked_lm_loss_fn,
        batch_fn=length_grouped_batch_fn(examples, tc, tok.pad_id),
        save_fn=lambda m, p, st: save_model(m, p, tokenizer=tok, train_state=st),
        load_fn=load_weights,
    )
    trainer.fit(resume=False)
    save_model(model, path, tokenizer=tok)
    return path
