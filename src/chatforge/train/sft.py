"""Supervised fine-tuning on conversations (``chatforge sft``), on the shared loop core.

The loss covers assistant replies only (and their ``<|im_end|>``, so the model learns to stop); system and
user turns are context. Conversations are batched by similar length (a length-grouped sampler), padded on
the right, never packed together, so one conversation's system message can't leak into another's.
Reads ``<run>/base``, writes ``<run>/sft``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.checkpoint import load_model, load_weights, save_model
from chatforge.config import RunConfig, TrainConfig
from chatforge.data import chat
from chatforge.data.corpus import TokenShards
from chatforge.errors import ChatforgeError
from chatforge.evals.runner import during_training_hook
from chatforge.model import lm_loss
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import (
    Batch,
    BatchFn,
    Trainer,
    fingerprint,
    seed_everything,
    setup_runtime,
    weights_fingerprint,
)

IGNORE = -100


def tokenize_conversations(
    convs: list[dict], tok: Tokenizer, max_tokens: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """(ids, labels) per conversation, labels = next token where trainable else IGNORE. Conversations
    longer than ``max_tokens`` are dropped (and counted), not truncated: a cut reply teaches bad endings."""
    out, dropped = [], 0
    for c in convs:
        ids, mask = tok.encode_chat(c["messages"])
        if len(ids) > max_tokens or not any(mask[1:]):
            dropped += 1
            continue
        ids_a = np.asarray(ids, dtype=np.int64)
        labels = np.where(np.asarray(mask[1:], dtype=bool), ids_a[1:], IGNORE)
        out.append((ids_a[:-1], labels))
    return out, dropped


def pad_batch(examples: list[tuple[np.ndarray, np.ndarray]], pad_id: int) -> Batch:
    T = max(len(x) for x, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.from_numpy(x)
        labels[i, : len(y)] = torch.from_numpy(y)
    return {"input_ids": ids, "labels": labels}


def length_grouped_batch_fn(
    examples: list[tuple[np.ndarray, np.ndarray]],
    tc: TrainConfig,
    pad_id: int,
    replay: TokenShards | None = None,
    replay_rows: int = 0,
) -> BatchFn:
    """Each global batch is a random run of neighbours in length order, so padding stays small; it is a
    pure function of (step, micro) and split across ranks, as the loop's exact resume needs.

    With ``replay``, the last ``replay_rows`` rows of each rank's batch are pretraining windows as long as
    the padded conversations, trained on every token."""
    order = np.argsort([len(x) for x, _ in examples], kind="stable")
    convs = tc.batch_size - replay_rows

    def batch_fn(step: int, micro: int, rank: int, world: int) -> Batch:
        g = convs * world
        if g > len(order):
            raise ChatforgeError(f"sft: global batch {g} exceeds the {len(order)} training conversations")
        rng = np.random.default_rng([tc.seed, step, micro])
        start = int(rng.integers(0, len(order) - g + 1))
        picked = order[start : start + g][rank * convs : (rank + 1) * convs]
        batch = pad_batch([examples[i] for i in picked], pad_id)
        if replay is None or replay_rows == 0:
            return batch
        T = batch["input_ids"].shape[1]
        rows = replay.sample_windows(
            np.random.default_rng([tc.seed, step, micro, 1 + rank]), replay_rows, T + 1
        )
        w = torch.from_numpy(rows)
        return {
            "input_ids": torch.cat([batch["input_ids"], w[:, :-1]]),
            "labels": torch.cat([batch["labels"], w[:, 1:]]),
        }

    return batch_fn


def masked_lm_loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float], int]:
    logits = model(batch["input_ids"])
    n = int((batch["labels"] != IGNORE).sum())
    return lm_loss(logits, batch["labels"], ignore_index=IGNORE), {}, n


@torch.no_grad()
def masked_val_loss(
    model: nn.Module, examples: list[tuple[np.ndarray, np.ndarray]], batch_size: int, pad_id: int
) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = pad_batch(examples[i : i + batch_size], pad_id)
        labels = b["labels"].to(device)
        n = int((labels != IGNORE).sum())
        total += float(lm_loss(model(b["input_ids"].to(device)), labels, ignore_index=IGNORE)) * n
        count += n
    return total / max(count, 1)


def run(cfg: RunConfig, resume: bool = True) -> dict[str, Any]:
    """The ``chatforge sft`` stage."""
    run_dir = cfg.run_dir
    tc = cfg.sft
    base = run_dir / "base"
    if not (base / "config.json").is_file():
        raise ChatforgeError(f"{base}: no base model; run `chatforge pretrain` first")
    data_stats = chat.prepare(cfg)
    tok = Tokenizer.load(base)
    rt = setup_runtime(tc)
    seed_everything(tc.seed)
    model = load_model(base)
    if tc.seq_len > model.config.max_position_embeddings:
        raise ChatforgeError(
            f"sft.seq_len: {tc.seq_len} exceeds the base model's context ({model.config.max_position_embeddings})"
        )
    train, dropped = tokenize_conversations(
        chat.read_jsonl(run_dir / "chat" / "train.jsonl"), tok, tc.seq_len + 1
    )
    val, _ = tokenize_conversations(chat.read_jsonl(run_dir / "chat" / "val.jsonl"), tok, tc.seq_len + 1)
    if not train:
        raise ChatforgeError(f"sft: no training conversation fits sft.seq_len={tc.seq_len}")
    val = val[: tc.eval_batches * tc.batch_size]

    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        return {"val_loss": round(masked_val_loss(m, val, tc.batch_size, tok.pad_id), 5)} if val else {}

    replay, replay_rows = None, round(cfg.chat_data.replay_fraction * tc.batch_size)
    if replay_rows:
        if not (run_dir / "data" / "index.json").is_file():
            raise ChatforgeError(
                f"chat_data.replay_fraction: no pretraining shards in {run_dir}/data to replay"
            )
        replay = TokenShards(run_dir / "data", "train")
        replay_rows = min(replay_rows, tc.batch_size - 1)  # at least one conversation per batch
    trainer = Trainer(
        model,
        tc,
        run_dir / "train" / "sft",
        loss_fn=masked_lm_loss_fn,
        batch_fn=length_grouped_batch_fn(train, tc, tok.pad_id, replay, replay_rows),
        save_fn=lambda m, p, st: save_model(m, p, tokenizer=tok, train_state=st, chat=True),
        load_fn=load_weights,
        evaluate=evaluate,
        hooks=during_training_hook(cfg, tok, model),
        runtime=rt,
        desc="sft",
        flops_per_token=model.flops_per_token(tc.seq_len),
        inputs={
            "data": fingerprint(train, replay.files if replay else None),
            "init": weights_fingerprint(model),
        },
    )
    summary = trainer.fit(resume=resume)
    summary.update(
        conversations=len(train),
        dropped_too_long=dropped,
        trainable_tokens_per_conv=round(float(np.mean([(y != IGNORE).sum() for _, y in train])), 1),
        replay_rows_per_batch=replay_rows,
        data=data_stats,
    )
    if rt.is_main:
        save_model(
            model,
            run_dir / "sft",
            tokenizer=tok,
            extra_files={"training_summary.json": json.dumps(summary)},
            chat=True,  # from here on a turn ends with <|im_end|>: the tokenizer's eos_token says so
        )
        trainer.cleanup_checkpoints()
    return summary
