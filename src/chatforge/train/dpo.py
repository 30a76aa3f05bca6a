"""Direct preference optimisation (``chatforge dpo``, Rafailov et al. 2023) on the shared loop core.

Offline, on ``<run>/prefs/train.jsonl`` (the reward stage's pairs), against a frozen copy of the starting
checkpoint: loss = −log σ(β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]), with log-probs summed
over the reply's tokens only. At initialisation the policy equals the reference, so the loss is log 2.
Optional label smoothing gives conservative DPO (a share of labels assumed flipped). Writes ``<run>/rlhf/dpo``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from chatforge.checkpoint import load_weights, save_model
from chatforge.data import prefs
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import Batch, Trainer, fingerprint, weights_fingerprint
from chatforge.train.reward import pair_batch, pair_batches, tokenize_pairs, weighted_mean
from chatforge.train.rollout import load_init, save_policy, start, token_logprobs


def reply_logps(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed log-prob of each row's reply tokens: [2B]."""
    lp = token_logprobs(model(batch["input_ids"]), batch["input_ids"])
    return (lp * batch["reply_mask"]).sum(-1)


def dpo_loss_fn(ref: GPT, beta: float, label_smoothing: float = 0.0):
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float], int]:
        with torch.no_grad():
            ref_lp = reply_logps(ref, batch)
        pol_lp = reply_logps(model, batch)
        pc, pr = pol_lp.chunk(2)
        rc, rr = ref_lp.chunk(2)
        logits = beta * ((pc - rc) - (pr - rr))
        loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
        loss = weighted_mean(loss, batch)
        with torch.no_grad():
            extra = {
                "reward_margin": float(logits.mean() / beta),  # implicit reward gap, in nats
                "preference_accuracy": float((logits > 0).float().mean()),
                "logp_chosen": float(pc.mean()),
                "logp_rejected": float(pr.mean()),
            }
        return loss, extra, int(batch["reply_mask"].sum())

    return loss_fn


@torch.no_grad()
def dpo_eval(
    model: nn.Module, ref: GPT, examples: list[tuple], pad_id: int, beta: float, bs: int = 16
) -> dict:
    """Held-out DPO loss, implicit-reward accuracy and margin."""
    was = model.training
    model.eval()
    losses, accs, margins = [], [], []
    dev = next(model.parameters()).device
    for i in range(0, len(examples), bs):
        b = {k: v.to(dev) for k, v in pair_batch(examples[i : i + bs], pad_id).items()}
        pc, pr = reply_logps(model, b).chunk(2)
        rc, rr = reply_logps(ref, b).chunk(2)
        logits = beta * ((pc - rc) - (pr - rr))
        losses += (-F.logsigmoid(logits)).tolist()
        accs += (logits > 0).float().tolist()
        margins += (logits / beta).tolist()
    model.train(was)
    if not losses:
        return {}
    return {
        "heldout_loss": round(float(np.mean(losses)), 5),
        "heldout_accuracy": round(float(np.mean(accs)), 4),
        "heldout_margin": round(float(np.mean(margins)), 4),
    }


def train_dpo(
    policy: GPT,
    tok: Tokenizer,
    train_pairs: list[dict],
    heldout: list[dict],
    dc: Any,
    work_dir: Path,
    resume: bool = True,
    save_fn: Any = None,
) -> tuple[GPT, dict[str, Any]]:
    tc = dc.train
    init = weights_fingerprint(policy)
    rt, ref = start(policy, tc)
    examples = [e for e in tokenize_pairs(train_pairs, tok, tc.seq_len) if any(e[1]) and any(e[3])]
    held = [e for e in tokenize_pairs(heldout, tok, tc.seq_len) if any(e[1]) and any(e[3])]
    held = held[: tc.eval_batches * tc.batch_size]
    batch_fn = pair_batches(examples, tc, pair_batch, tok.pad_id, "dpo")

    trainer = Trainer(
        policy,
        tc,
        work_dir,
        loss_fn=dpo_loss_fn(ref, dc.beta, dc.label_smoothing),
        batch_fn=batch_fn,
        save_fn=save_fn or (lambda m, p, st: save_model(m, p, tokenizer=tok, train_state=st, chat=True)),
        load_fn=load_weights,
        evaluate=lambda m, step: dpo_eval(m, ref, held, tok.pad_id, dc.beta),
        runtime=rt,
        desc="dpo",
        inputs={"data": fingerprint(examples), "init": init},
    )
    summary = trainer.fit(resume=resume)
    summary["init_loss_log2"] = round(math.log(2), 5)
    trainer.cleanup_checkpoints()
    return policy, summary


def run(cfg: Any, resume: bool = True) -> dict[str, Any]:
    """The ``chatforge dpo`` stage: ``<run>/prefs`` + ``dpo.init`` -> ``<run>/rlhf/dpo``."""
    run_dir = cfg.run_dir
    dc = cfg.dpo
    _, tok, policy = load_init(run_dir, dc.init, "DPO", dc.train.seq_len, "dpo.train.seq_len")
    if not (run_dir / "prefs" / "train.jsonl").is_file():
        prefs.prepare(cfg)
    train_pairs, heldout = prefs.prepared(run_dir)
    policy, summary = train_dpo(policy, tok, train_pairs, heldout, dc, run_dir / "train" / "dpo", resume)
    save_policy(policy, run_dir / "rlhf" / "dpo", tok, summary)
    return summary
