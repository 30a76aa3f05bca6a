"""The reward model (``chatforge reward``): our transformer with a scalar head, trained on preference pairs
with the Bradley–Terry loss ``-log σ(r(chosen) − r(rejected) − margin)`` on the shared loop core.

The score of a conversation is the head applied to the final hidden state of its last token (the newline
after the reply's ``<|im_end|>``), so a reply is judged after the model has read all of it. The artifact
``<run>/rm/`` is the backbone as a Hugging Face checkpoint directory plus ``reward_head.safetensors`` and
``reward_config.json`` (score offset/scale so held-out replies score mean 0, std 1); ``load_reward_model``
loads it. Reports held-out pairwise accuracy (per category and source) and calibration (ECE and a
reliability table of predicted P(chosen > rejected) against the observed rate).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from chatforge.checkpoint import load_model, load_weights, save_model
from chatforge.data import prefs
from chatforge.errors import ChatforgeError
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import (
    Batch,
    Trainer,
    fingerprint,
    is_main_process,
    seed_everything,
    setup_runtime,
    weights_fingerprint,
)
from chatforge.train.rollout import load_init, token_logprobs

HEAD_FILE = "reward_head.safetensors"
CONFIG_FILE = "reward_config.json"


class RewardModel(nn.Module):
    """``backbone`` (the one GPT) + ``head``: hidden state -> scalar.

    With ``lm_feature`` the score adds ``lm_weight`` (learnt, from 0.1) × the reply's summed log-likelihood
    under the backbone's own LM head. Why: the language model already ranks right above wrong facts about
    entities the preference data never mention (the cpu-demo SFT's likelihood picks the chosen reply of
    94% of held-out fact pairs), while a head trained on one hidden state learns that for the training
    entities only (63%). Without it the ``lm_head`` is unused."""

    def __init__(self, backbone: GPT, lm_feature: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(backbone.config.hidden_size + 1))
        nn.init.zeros_(self.head.bias)
        self.lm_weight = nn.Parameter(torch.tensor(0.1)) if lm_feature else None
        self.offset, self.scale = 0.0, 1.0  # raw -> normalised score, set after training

    def forward(
        self, input_ids: torch.Tensor, lengths: torch.Tensor, reply_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw scores [B] at each sequence's last real token (right padding); ``reply_mask`` [B, T-1] marks
        the positions that predict a reply token (``pair_batch``'s; needed with ``lm_feature``)."""
        h = self.backbone.hidden_states(input_ids)
        last = h[torch.arange(len(h), device=h.device), lengths - 1]
        r = self.head(last.float()).squeeze(-1)
        if self.lm_weight is None:
            return r
        if reply_mask is None:
            raise ValueError("this reward model scores the reply's likelihood: pass reply_mask")
        lp = token_logprobs(self.backbone.lm_head(h), input_ids)  # [B, T-1]: token t+1 given ..t
        return r + self.lm_weight * (lp * reply_mask).sum(-1)


def save_reward_model(rm: RewardModel, path: str | Path, tok: Tokenizer, **extra: Any) -> Path:
    """Backbone as an HF checkpoint dir (atomic), then the head and the score normalisation beside it."""
    p = save_model(rm.backbone, path, tokenizer=tok, train_state=extra.pop("train_state", None), chat=True)
    tmp = p / (HEAD_FILE + ".tmp")
    tensors = dict(rm.head.state_dict())
    if rm.lm_weight is not None:
        tensors["lm_weight"] = rm.lm_weight
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, p / HEAD_FILE)
    cfg = {"offset": rm.offset, "scale": rm.scale, "pooling": "last_token", **extra}
    (p / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, default=str))
    return p


def _load_head(rm: RewardModel, path: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """The head (and ``lm_weight``) from ``path``'s head file, or from its already-read ``tensors``."""
    tensors = dict(tensors if tensors is not None else load_file(str(path / HEAD_FILE)))
    lm_weight = tensors.pop("lm_weight", None)
    if (lm_weight is None) != (rm.lm_weight is None):
        raise ChatforgeError(f"{path}: reward head and model disagree on the likelihood feature")
    rm.head.load_state_dict(tensors)
    if lm_weight is not None:
        with torch.no_grad():
            rm.lm_weight.copy_(lm_weight)  # type: ignore[union-attr]


def _load_rm_weights(rm: nn.Module, path: Path) -> None:
    load_weights(rm.backbone, path)  # type: ignore[arg-type]
    _load_head(rm, path)  # type: ignore[arg-type]


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> RewardModel:
    """Load ``<run>/rm`` (or any directory written by ``save_reward_model``)."""
    p = Path(path)
    if not (p / HEAD_FILE).is_file():
        raise ChatforgeError(f"{p}: not a reward model (no {HEAD_FILE}); run `chatforge reward` first")
    head = load_file(str(p / HEAD_FILE))
    rm = RewardModel(load_model(p), lm_feature="lm_weight" in head)
    _load_head(rm, p, head)
    if (p / CONFIG_FILE).is_file():
        cfg = json.loads((p / CONFIG_FILE).read_text())
        rm.offset, rm.scale = float(cfg.get("offset", 0.0)), float(cfg.get("scale", 1.0))
    return rm.to(device).eval()


# ---------------------------------------------------------------- tokenizing pairs


def encode_reply(
    tok: Tokenizer, messages: list[dict], reply: str, max_len: int
) -> tuple[list[int], list[int]]:
    """Ids of ``messages`` + the assistant ``reply`` and a 0/1 mask over that reply's tokens only.

    Longer than ``max_len``: the last ``max_len`` tokens are kept, so the prompt is cut from the front and
    the reply survives whole when it fits (keeping the front would drop both replies of a long prompt and
    leave the two sides of a pair identical, as on half of OASST's pairs at 384 tokens)."""
    msgs = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in messages]
    ids, mask = tok.encode_chat([*msgs, {"role": "assistant", "content": reply}])
    return ids[-max_len:], mask[-max_len:]


def tokenize_pairs(
    pairs: list[dict], tok: Tokenizer, max_len: int
) -> list[tuple[list[int], list[int], list[int], list[int], float]]:
    """(chosen ids, chosen mask, rejected ids, rejected mask, weight) per pair; the weight (1 unless the
    pair says otherwise: a rater's reliability from ``feedback export --weighted``) scales its loss."""
    out = []
    for p in pairs:
        c, cm = encode_reply(tok, p["messages"], p["chosen"]["content"], max_len)
        r, rmask = encode_reply(tok, p["messages"], p["rejected"]["content"], max_len)
        out.append((c, cm, r, rmask, float(p.get("weight", 1.0))))
    return out


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


def reply_positions(masks: list[list[int]]) -> torch.Tensor:
    """0/1 reply-token masks (``encode_reply``'s) -> [B, T-1] floats marking the positions whose next
    token is a reply token: what multiplies ``token_logprobs`` to sum a reply's log-likelihood."""
    return pad(masks, 0)[0][:, 1:].float()


def pair_batch(examples: list[tuple], pad_id: int) -> Batch:
    """Chosen rows first, then rejected rows, in one padded batch (one forward pass), with each row's
    ``reply_mask`` [2B, T-1] (the reward model's likelihood feature and DPO read it)."""
    ids, lengths = pad([e[0] for e in examples] + [e[2] for e in examples], pad_id)
    mask = reply_positions([e[1] for e in examples] + [e[3] for e in examples])
    weight = torch.tensor([e[4] if len(e) > 4 else 1.0 for e in examples])
    return {"input_ids": ids, "lengths": lengths, "reply_mask": mask, "weight": weight}


def weighted_mean(losses: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The pairs' losses averaged by their weights (a plain mean when all are 1)."""
    w = batch.get("weight")
    if w is None:
        return losses.mean()
    w = w.to(losses)
    return (losses * w).sum() / w.sum().clamp_min(1e-8)


def pair_batches(examples: list[tuple], tc: Any, collate: Any, pad_id: int, stage: str) -> Any:
    """The loop core's ``batch_fn`` over preference pairs: ``tc.batch_size`` distinct pairs a step, drawn
    as a pure function of (seed, step, micro, rank) so resume replays exactly, then ``collate``d."""
    if len(examples) < tc.batch_size:
        raise ChatforgeError(f"{stage}: {len(examples)} training pairs, fewer than {stage}.train.batch_size")

    def batch_fn(step: int, micro: int, rank: int, world: int) -> Batch:
        rng = np.random.default_rng([tc.seed, step, micro, rank])
        return collate([examples[i] for i in rng.choice(len(examples), tc.batch_size, replace=False)], pad_id)

    return batch_fn


def bt_loss_fn(margin: float):
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float], int]:
        scores = model(batch["input_ids"], batch["lengths"], batch["reply_mask"])
        rc, rr = scores.chunk(2)
        diff = rc - rr
        loss = weighted_mean(-F.logsigmoid(diff - margin), batch)
        d = diff.detach()
        extra = {"accuracy": float((d > 0).float().mean()), "reward_gap": float(d.mean())}
        return loss, extra, int(batch["lengths"].sum())

    return loss_fn


# ---------------------------------------------------------------- scoring and evaluation


@torch.no_grad()
def score_ids(
    rm: RewardModel,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int = 32,
    masks: list[list[int]] | None = None,
) -> list[float]:
    """Normalised scores of already-tokenized conversations (``masks``: their reply tokens, which a
    reward model with the likelihood feature needs)."""
    dev = next(rm.parameters()).device
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        ids, lengths = pad(seqs[i : i + batch_size], pad_id)
        mask = reply_positions(masks[i : i + batch_size]).to(dev) if masks is not None else None
        raw = rm(ids.to(dev), lengths.to(dev), mask)
        out += ((raw - rm.offset) / rm.scale).tolist()
    return out


def score(
    rm: RewardModel, tok: Tokenizer, prompts: list[list[dict]], replies: list[str], batch_size: int = 32
) -> list[float]:
    """Normalised reward of each ``reply`` to its prompt (chat messages)."""
    limit = rm.backbone.config.max_position_embeddings
    enc = [encode_reply(tok, p, r, limit) for p, r in zip(prompts, replies, strict=True)]
    return score_ids(rm, [e[0] for e in enc], tok.pad_id, batch_size, [e[1] for e in enc])


def calibration(diffs: np.ndarray, bins: int) -> dict[str, Any]:
    """ECE of P(chosen wins) = σ(r_c − r_r), scored per pair in both orders (so it is symmetric and the
    observed rate in a bin is meaningful), and the reliability table."""
    p = 1.0 / (1.0 + np.exp(-np.concatenate([diffs, -diffs])))
    y = np.concatenate([np.ones_like(diffs), np.zeros_like(diffs)])
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = idx == b
        if not sel.any():
            continue
        conf, acc = float(p[sel].mean()), float(y[sel].mean())
        ece += sel.mean() * abs(conf - acc)
        table.append(
            {
                "bin": [round(edges[b], 2), round(edges[b + 1], 2)],
                "n": int(sel.sum()),
                "predicted": round(conf, 4),
                "observed": round(acc, 4),
            }
        )
    return {"ece": round(float(ece), 4), "reliability": table}


@torch.no_grad()
def evaluate_pairs(
    rm: RewardModel, tok: Tokenizer, pairs: list[dict], max_len: int, bins: int = 10, batch_size: int = 32
) -> dict[str, Any]:
    """Held-out pairwise accuracy (overall, per category/source), mean gap and calibration."""
    if not pairs:
        return {}
    was = rm.training
    rm.eval()
    enc = tokenize_pairs(pairs, tok, max_len)
    raw_c = score_ids(rm, [e[0] for e in enc], tok.pad_id, batch_size, [e[1] for e in enc])
    raw_r = score_ids(rm, [e[2] for e in enc], tok.pad_id, batch_size, [e[3] for e in enc])
    rm.train(was)
    diffs = np.asarray(raw_c) - np.asarray(raw_r)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(_group(p), []).append(i)
    return {
        "accuracy": round(float((diffs > 0).mean()), 4),
        "pairs": len(pairs),
        "mean_gap": round(float(diffs.mean()), 4),
        "by_group": {k: round(float((diffs[v] > 0).mean()), 4) for k, v in sorted(groups.items())},
        "pairs_by_group": {k: len(v) for k, v in sorted(groups.items())},
        # calibration of the trained (unnormalised) BT probability, overall and per group
        "ece_by_group": {k: calibration(diffs[v] * rm.scale, bins)["ece"] for k, v in sorted(groups.items())},
        "by_length": _by_length(pairs, diffs),
        **calibration(diffs * rm.scale, bins),
    }


def _by_length(pairs: list[dict], diffs: np.ndarray) -> dict[str, dict[str, Any]]:
    """Accuracy split by whether the chosen reply is the longer one: an RM that only learned "longer is
    better" scores high on the first and low on the second."""
    longer = np.array([len(p["chosen"]["content"]) > len(p["rejected"]["content"]) for p in pairs])
    shorter = np.array([len(p["chosen"]["content"]) < len(p["rejected"]["content"]) for p in pairs])
    return {
        name: {
            "accuracy": round(float((diffs[sel] > 0).mean()), 4) if sel.any() else None,
            "pairs": int(sel.sum()),
        }
        for name, sel in (("chosen_longer", longer), ("chosen_shorter", shorter))
    }


def _group(pair: dict) -> str:
    return pair.get("category") or pair.get("source", "?")


def length_baseline(pairs: list[dict]) -> dict[str, Any]:
    """Accuracy of "the longer reply wins" (characters; equal lengths count half): the bar an RM must clear
    to show it learned more than length, per group as in ``evaluate_pairs``. Chance is 0.5."""
    groups: dict[str, list[float]] = {}
    for p in pairs:
        c, r = len(p["chosen"]["content"]), len(p["rejected"]["content"])
        groups.setdefault(_group(p), []).append(1.0 if c > r else 0.5 if c == r else 0.0)
    every = [x for v in groups.values() for x in v]
    return {
        "accuracy": round(float(np.mean(every)), 4) if every else None,
        "by_group": {k: round(float(np.mean(v)), 4) for k, v in sorted(groups.items())},
    }


# ---------------------------------------------------------------- the stage


def train_reward_model(
    backbone: GPT,
    tok: Tokenizer,
    train_pairs: list[dict],
    heldout: list[dict],
    rc: Any,
    work_dir: Path,
    resume: bool = True,
) -> tuple[RewardModel, dict[str, Any]]:
    """Bradley–Terry training of a fresh head on ``backbone`` with the loop core; returns (rm, summary)."""
    tc = rc.train
    rt = setup_runtime(tc)
    seed_everything(tc.seed)
    init = weights_fingerprint(backbone)
    rm = RewardModel(backbone, lm_feature=rc.lm_feature)
    encoded = tokenize_pairs(train_pairs, tok, tc.seq_len)
    batch_fn = pair_batches(encoded, tc, pair_batch, tok.pad_id, "reward")
    n_eval = max(tc.eval_batches * tc.batch_size, 1)
    held_eval = heldout[:: max(1, len(heldout) // n_eval)][:n_eval]  # spread over every source

    def evaluate(m: nn.Module, step: int) -> dict[str, float]:
        res = evaluate_pairs(m, tok, held_eval, tc.seq_len, rc.calibration_bins)  # type: ignore[arg-type]
        return {"heldout_accuracy": res["accuracy"], "heldout_ece": res["ece"]} if res else {}

    trainer = Trainer(
        rm,
        tc,
        work_dir,
        loss_fn=bt_loss_fn(rc.margin),
        batch_fn=batch_fn,
        save_fn=lambda m, p, st: save_reward_model(m, p, tok, train_state=st),  # type: ignore[arg-type]
        load_fn=_load_rm_weights,
        evaluate=evaluate,
        runtime=rt,
        desc="reward",
        inputs={"data": fingerprint(encoded), "init": init},
    )
    summary = trainer.fit(resume=resume)
    # Normalise so that held-out replies (chosen and rejected alike) score mean 0, std 1.
    rm.eval()
    sample = heldout[:256] or train_pairs[:256]
    enc = tokenize_pairs(sample, tok, tc.seq_len)
    seqs, masks = [e[0] for e in enc] + [e[2] for e in enc], [e[1] for e in enc] + [e[3] for e in enc]
    raw = np.asarray(score_ids(rm, seqs, tok.pad_id, masks=masks))
    rm.offset, rm.scale = float(raw.mean()), float(raw.std() + 1e-6)
    summary["heldout"] = evaluate_pairs(rm, tok, heldout, tc.seq_len, rc.calibration_bins)
    summary["baselines"] = {"chance": 0.5, "longer_wins": length_baseline(heldout)}
    summary["train_pairs"] = len(train_pairs)
    trainer.cleanup_checkpoints()
    return rm, summary


def run(cfg: Any, resume: bool = True) -> dict[str, Any]:
    """The ``chatforge reward`` stage: ``<run>/prefs/`` pairs -> ``<run>/rm/``."""
    run_dir = cfg.run_dir
    rc = cfg.reward
    init, tok, backbone = load_init(  # any backbone: a reward model may start from another one's
        run_dir, rc.init, "the reward model", rc.train.seq_len, "reward.train.seq_len", any_backbone=True
    )
    if rc.init_random:  # same architecture and tokenizer, no pretraining: what does pretraining add?
        seed_everything(rc.train.seed)
        backbone.reset_parameters()
    data_stats = prefs.prepare(cfg)
    train_pairs, heldout = prefs.prepared(run_dir)
    # a second RM (reward.out) gets its own work dir, so it never resumes from the first one's checkpoints
    work_dir = run_dir / "train" / ("reward" if rc.out == "rm" else rc.out)
    rm, summary = train_reward_model(backbone, tok, train_pairs, heldout, rc, work_dir, resume)
    summary["data"] = data_stats
    summary["init"] = f"{init} (re-initialised)" if rc.init_random else str(init)
    out = run_dir / rc.out
    if is_main_process():  # one writer: every rank holds the same weights
        save_reward_model(rm, out, tok, init=summary["init"], heldout=summary["heldout"])
        (out / "training_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
