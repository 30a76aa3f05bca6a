"""GRPO with verifiable rewards (``chatforge grpo``, Shao et al. 2024), on the shared loop core.

Each iteration samples ``samples_per_prompt`` replies per world prompt with the one engine (built on the
policy itself) and grades every reply against ground truth with ``data/chat.py``'s grader: world facts,
arithmetic, JSON-schema validity, system-message rules (persona, word limit, language), declines and
no over-refusal, with −``safety_penalty`` for either safety error — optionally plus ``rm_coef`` × the
reward model's score. The advantage of a reply is its reward standardised within its group (no value
model); the loss is the clipped policy objective per token plus β·KL to the frozen reference (the k3
estimator, always ≥ 0). Writes ``<run>/rlhf/grpo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatforge.checkpoint import load_weights, save_model
from chatforge.data.chat import grade, is_decline
from chatforge.engine import Engine
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer
from chatforge.train import rollout as ro
from chatforge.train.loop import Batch, fingerprint, model_fingerprint, weights_fingerprint
from chatforge.train.reward import load_reward_model, score


def verifiable_reward(items: list[dict], texts: list[str], safety_penalty: float = 0.0) -> list[float]:
    """1.0 where the world grader passes the reply; else −``safety_penalty`` for a safety error (a reply
    that complies where the item wants a decline, or declines where it wants an answer), else 0.0."""
    out = []
    for it, t in zip(items, texts, strict=True):
        if grade(it, t):
            out.append(1.0)
        elif is_decline(t.strip()) != (it["check"]["type"] == "decline"):
            out.append(-safety_penalty)
        else:
            out.append(0.0)
    return out


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(r − mean of its group) / (std of its group + ε); a group with one reward everywhere gives 0."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()


def grpo_loss_fn(gc: Any):
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float], int]:
        ids, mask = batch["input_ids"], batch["action_mask"]
        logits = model(ids)
        logp = ro.token_logprobs(logits, ids)
        pg, ratio = ro.clipped_policy_loss(
            logp, batch["old_logp"], batch["advantages"][:, None], gc.clip_range
        )
        d = batch["ref_logp"] - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased, non-negative per-token KL(π || π_ref)
        loss = ro.token_mean(pg + gc.kl_coef * kl, mask, batch)
        with torch.no_grad():
            extra = {
                "policy_loss": float(ro.token_mean(pg, mask, batch)),
                "kl_token": float(ro.token_mean(kl, mask, batch)),
                **ro.policy_stats(logits, ratio, mask, gc.clip_range, batch),
            }
        return loss, extra, int(mask.sum())

    return loss_fn


def train_grpo(
    policy: GPT,
    tok: Tokenizer,
    reward_fn: Any,  # (prompt items, reply texts) -> list[float]
    pool: list[dict],
    gc: Any,
    work_dir: Path,
    resume: bool = True,
    inputs: dict[str, str] | None = None,
) -> tuple[GPT, dict[str, Any]]:
    """GRPO on ``policy`` (trained in place); ``inputs`` as in ``train_ppo``."""
    inputs = {"data": fingerprint(pool), "init": weights_fingerprint(policy), **(inputs or {})}
    its = ro.iterations(gc)
    rt, ref = ro.start(policy, its.train)
    policy = policy.to(rt.device)
    engine = Engine(policy, tok)
    policy.train()

    @torch.no_grad()
    def make(it: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        # This process's share of the prompts (whole groups: advantages are relative within a group)...
        _, rewards, ids, mask = ro.sample_scored(
            engine, pool, gc, its.train.seed, it, reward_fn, rt.rank, rt.world_size
        )
        policy.eval()
        logp = ro.batched_logprobs(policy, ids)
        policy.train()
        ref_logp = ro.batched_logprobs(ref, ids)
        part = {
            "input_ids": ids,
            "action_mask": mask,
            "old_logp": logp * mask,
            "ref_logp": ref_logp * mask,
            "advantages": group_advantages(rewards, gc.samples_per_prompt),
            "rewards": rewards,
        }
        # ...then every process's rows on every process: the stats and minibatches of one process.
        data = ro.gather_rows(part, tok.pad_id, rt.world_size)
        rewards, mask = data.pop("rewards"), data["action_mask"]
        kl = (data["old_logp"] - data["ref_logp"]).sum(1)
        groups = rewards.view(-1, gc.samples_per_prompt)
        stats = {
            "reward_mean": round(float(rewards.mean()), 4),
            "kl": round(float(kl.mean()), 4),
            "solved_groups": round(float((groups.max(1).values > groups.min(1).values).float().mean()), 3),
            "response_len": round(float(mask.sum(1).mean()), 2),
        }
        return data, stats

    summary = ro.fit(
        policy,
        its,
        gc,
        work_dir,
        make,
        grpo_loss_fn(gc),
        save_fn=lambda m, p, st: save_model(m, p, tokenizer=tok, train_state=st, chat=True),
        load_fn=load_weights,
        runtime=rt,
        desc="grpo",
        resume=resume,
        inputs=inputs,
    )
    return policy, summary


def run(cfg: Any, resume: bool = True) -> dict[str, Any]:
    """The ``chatforge grpo`` stage: ``grpo.init`` (+ optional RM) -> ``<run>/rlhf/grpo``."""
    run_dir = cfg.run_dir
    gc = cfg.grpo
    _, tok, policy = ro.load_init(run_dir, gc.init, "GRPO")

    rm_dir = ro.resolve(run_dir, gc.reward_model) if gc.rm_coef else None
    rm = load_reward_model(rm_dir) if rm_dir else None

    def reward_fn(items: list[dict], texts: list[str]) -> list[float]:
        rewards = verifiable_reward(items, texts, gc.safety_penalty)
        if rm is None:
            return rewards
        rm_s = score(rm, tok, [x["input"] for x in items], texts)
        return [v + gc.rm_coef * s for v, s in zip(rewards, rm_s, strict=True)]

    pool = ro.world_prompts(cfg, gc.prompt_pool, gc.prompt_seed, gc.kinds)
    inputs = {"reward": model_fingerprint(rm_dir)} if rm_dir else {}
    policy, summary = train_grpo(
        policy, tok, reward_fn, pool, gc, run_dir / "train" / "grpo", resume, inputs=inputs
    )
    ro.save_policy(policy, run_dir / "rlhf" / "grpo", tok, summary)
    return summary
