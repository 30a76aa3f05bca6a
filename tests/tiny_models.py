"""The tiny model the engine, decode and chat tests share: 2 layers × 64 wide, grouped-query attention,
taught one sequence by heart so its greedy continuations are long and unambiguous."""

from __future__ import annotations

import torch

from chatforge.config import ModelConfig
from chatforge.model import GPT, lm_loss


def tiny_config(vocab: int, **overrides: object) -> ModelConfig:
    shape: dict = dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return ModelConfig(**{**shape, **overrides})


def memorize(model: GPT, ids: torch.Tensor, steps: int = 150, lr: float = 3e-3) -> float:
    """Train ``model`` on the one row ``ids`` [1, T] (next-token loss); returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()
