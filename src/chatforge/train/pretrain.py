"""Pretraining: next-token prediction on the token shards, on the shared loop core.

Reads ``<run>/tokenizer`` and ``<run>/data`` (shards), trains in ``<run>/train/pretrain`` (metrics and
checkpoints) and writes the base model to ``<run>/base`` as a Hugging Face model directory.

With ``chat_data.pretrain_fraction`` > 0, that share of each batch's rows are the recipe's chat
conversations (``<run>/chat``), packed end to end, loss on assistant tokens only — "mixed training": a
model that learns to answer questions while it learns the facts can answer about entities it only ever
read about, where answering learnt afterwards (SFT alone) mostly does not (Allen-Zhu & Li, Physics of
Language Models 3.1).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.checkpoint import load_weights, save_model
from chatforge.config import ModelConfig, RunConfig, TrainConfig
from chatforge.data.corpus import TokenShards
from chatforge.errors import ChatforgeError
from chatforge.model import GPT, lm_loss
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import Batch, BatchFn, Trainer, fingerprint, seed_everything, setup_runtime


def model_config_for(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """The model config sized to the tokenizer, padded up to a multiple of 64 (faster matmuls; the extra
    rows are never produced by the tokenizer)."""
    return dataclasses.replace(cfg, vocab_size=(tokenizer_vocab + 63) // 64 * 64)


def lm_batch_fn(shards: TokenShards, tc: TrainConfig) -> BatchFn:
    """Random windows; the batch of (step, micro) is the same for any world size, split across ranks."""

    def batch_fn(step: int, micro: int, rank: int, world: int) -> Batch:
        rng = np.random.default_rng([tc.seed, step, micro])
        rows = shards.sample_windows(rng, tc.batch_size * world, tc.seq_len + 1)
        w = torch.from_numpy(np.ascontiguousarray(rows[rank * tc.batch_size : (rank + 1) * tc.batch_size]))
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    return batch_fn


def mixed_batch_fn(
    shards: TokenShards,
    chats: list[tuple[np.ndarray, np.ndarray]],
    tc: TrainConfig,
    chat_rows: int,
    pad_id: int,
) -> BatchFn:
    """``lm_batch_fn`` whose last ``chat_rows`` rows per rank are conversations packed to ``seq_len`` (their
    own labels: assistant tokens only). A pure function of (step, micro, rank) for exact resume."""
    text = lm_batch_fn(shards, dataclasses.replace(tc, batch_size=tc.batch_size - chat_rows))
    T = tc.seq_len

    def batch_fn(step: int, micro: int, rank: int, world: int) -> Batch:
        b = text(step, micro, rank, world)
        rng = np.random.default_rng([tc.seed, step, micro, 1 + rank])
        ids = torch.full((chat_rows, T), pad_id, dtype=torch.long)
        labels = torch.full((chat_rows, T), -100, dtype=torch.long)
        for r in range(chat_rows):
            pos = 0
            while pos < T:
                x, y = chats[int(rng.integers(len(chats)))]
                n = min(len(x), T - pos)
                ids[r, pos : pos + n] = torch.from_numpy(x[:n])
                labels[r, pos : pos + n] = torch.from_numpy(y[:n])
                pos += n
        return {"input_ids": torch.cat([b["input_ids"], ids]), "labels": torch.cat([b["labels"], labels])}

    return batch_fn


def lm_loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float], int]:
    logits = model(batch["input_ids"])
    return lm_loss(logits, batch["labels"]), {}, int(batch["labels"].numel())


def validation_windows(shards: TokenShards, tc: TrainConfig) -> torch.Tensor:
    n = tc.eval_batches * tc.batch_size
    wins = list(shards.iter_windows(tc.seq_len + 1, max_windows=n))
    if not wins:
        raise ChatforgeError(
            f"validation split has fewer than {tc.seq_len + 1} tokens; raise data.val_fraction or add data"
        )
    return torch.from_numpy(np.stack(wins).astype(np.int64))


@torch.no_grad()
def evaluate_lm(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token loss over fixed validation windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i : i + batch_size].to(device)
        logits = model(w[:, :-1])
        total += float(lm_loss(logits, w[:, 1:])) * w.shape[0]
        count += w.shape[0]
    return total / count


def run(cfg: RunConfig, resume: bool = True) -> dict[str, Any]:
    """The ``chatforge pretrain`` stage."""
    run_dir = cfg.run_dir
    tc = cfg.pretrain
    if not (run_dir / "tokenizer" / "tokenizer.json").is_file():
        raise ChatforgeError(f"{run_dir}/tokenizer: no tokenizer; run `chatforge tokenizer` first")
    tok = Tokenizer.load(run_dir / "tokenizer")
    train = TokenShards(run_dir / "data", "train")
    val_windows = validation_windows(TokenShards(run_dir / "data", "val"), tc)
    rt = setup_runtime(tc)
    seed_everything(tc.seed)
    model = GPT(model_config_for(cfg.model, tok.vocab_size))

    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        loss = evaluate_lm(m, val_windows, tc.batch_size)
        return {"val_loss": round(loss, 5)}

    batch_fn = lm_batch_fn(train, tc)
    chat_rows = min(round(cfg.chat_data.pretrain_fraction * tc.batch_size), tc.batch_size - 1)
    chat_stats: dict[str, Any] = {}
    convs: list = []
    if chat_rows:
        from chatforge.data import chat
        from chatforge.train.sft import tokenize_conversations

        chat_stats = chat.prepare(cfg)
        convs, _ = tokenize_conversations(
            chat.read_jsonl(run_dir / "chat" / "train.jsonl"), tok, tc.seq_len + 1
        )
        if not convs:
            raise ChatforgeError(
                f"chat_data.pretrain_fraction: no conversation fits pretrain.seq_len={tc.seq_len}"
            )
        batch_fn = mixed_batch_fn(train, convs, tc, chat_rows, tok.pad_id)

    trainer = Trainer(
        model,
        tc,
        run_dir / "train" / "pretrain",
        loss_fn=lm_loss_fn,
        batch_fn=batch_fn,
        save_fn=lambda m, p, st: save_model(m, p, tokenizer=tok, train_state=st, chat=False),
        load_fn=load_weights,
        evaluate=evaluate,
        runtime=rt,
        desc="pretrain",
        flops_per_token=model.flops_per_token(tc.seq_len),
        inputs={"data": fingerprint(train.files, convs)},
    )
    summary = trainer.fit(resume=resume)
    summary.update(
        params=model.num_params(non_embedding=False),
        params_non_embedding=model.num_params(),
        train_tokens_available=train.n_tokens,
        chat_rows_per_batch=chat_rows,
    )
    if chat_stats:
        summary["chat_data"] = chat_stats
    if rt.is_main:
        save_model(
            model,
            run_dir / "base",
            tokenizer=tok,
            extra_files={"training_summary.json": json.dumps(summary)},
            chat=False,
        )
        trainer.cleanup_checkpoints()
    return summary
