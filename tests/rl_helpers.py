"""Tiny models and preference data shared by the reward / RL tests (trained in seconds on one thread)."""

from __future__ import annotations

import random

from chatforge.config import ModelConfig
from chatforge.data.prefs import world_pairs
from chatforge.data.world import build_world
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer, train_tokenizer

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "happy",
    "quick",
    "slow",
    "house",
    "water",
    "light",
    "night",
]


def toy_pairs(n: int, seed: int) -> list[dict]:
    """A tiny separable preference: the chosen reply says "yes", the rejected one "no"."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + "?"
        tail = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 3)))
        out.append(
            {
                "messages": [{"role": "user", "content": q}],
                "chosen": {"role": "assistant", "content": f"yes {tail}".strip()},
                "rejected": {"role": "assistant", "content": f"no {tail}".strip()},
                "category": "toy",
            }
        )
    return out


def tiny_tokenizer() -> Tokenizer:
    texts = [" ".join(WORDS) + " yes no"] * 5
    for p in world_pairs(build_world(0), 200, 0, "train"):
        texts += [m["content"] for m in p["messages"]] + [p["chosen"]["content"], p["rejected"]["content"]]
    return train_tokenizer(texts, vocab_size=600)


def tiny_model(tok: Tokenizer, seed: int = 0) -> GPT:
    import torch

    torch.manual_seed(seed)
    vocab = (tok.vocab_size + 63) // 64 * 64
    return GPT(
        ModelConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=256,
        )
    )


def tiny_chat_model(tok: Tokenizer, steps: int = 60, seed: int = 0) -> GPT:
    """A tiny model chat-tuned to answer toy questions with "yes ..." or "no ..." about half the time each,
    so an RL test has something to move: reward "yes" and P(yes) should climb."""
    import torch

    from chatforge.train.sft import masked_lm_loss_fn, pad_batch, tokenize_conversations

    model = tiny_model(tok, seed)
    convs = [
        {"messages": [*p["messages"], p["chosen"] if i % 2 else p["rejected"]]}
        for i, p in enumerate(toy_pairs(200, seed + 7))
    ]
    examples, _ = tokenize_conversations(convs, tok, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(examples), (16,), generator=g).tolist()
        loss, _, _ = masked_lm_loss_fn(model, pad_batch([examples[i] for i in idx], tok.pad_id))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model
