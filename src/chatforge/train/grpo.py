"""GRPO with verifiable rewards (``chatforge grpo``, Shao et al. 2024), on the shared loop core.

Each iteration samples ``samples_per_prompt`` replies per world prompt with the one engine (built on the
policy itself) and grades every reply against ground truth with ``data/chat.py``'s grader: world facts,
arithmetic, JSON-schema validity, system-message rules (persona, word limit, language), declines and
no over-refusal — optionally plus ``rm_coef`` × the reward model's score. The advantage of a reply is its
reward standardised within its group (no value model); the loss is the clipped policy objective per token
plus β·KL to the frozen reference (the k3 estimator, always ≥ 0). Writes ``<run>/rlhf/grpo``.
"""

from __future__ import annotations

import dataclasses
import json
import resource
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from chatforge.checkpoint import load_model, load_weights, save_model
from chatforge.data.chat import grade
from chatforge.engine import Engine, SamplingParams
from chatforge.errors import ChatforgeError
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer
from chatforge.train import rollout as ro
from chatforge.train.dpo import load_model_copy
from chatforge.train.loop import Batch, Trainer, seed_everything, setup_runtime
from chatforge.train.reward import load_reward_model, score


def verifiable_reward(items: list[dict], texts: list[str]) -> list[float]:
    """1.0 where the world grader passes the reply, else 0.0."""
    return [float(grade(it, t)) for it, t in zip(items, texts, strict=True)]


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(r − mean of its group) / (std of its group + ε); a group with one reward everywhere gives 0."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()


def grpo_loss_fn(gc: Any):
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float], int]:
        ids, mask = batch["input_ids"], batch["action_mask"]
        logits = model(ids)
        logp = ro.token_logprobs(logits, ids)
        ratio = torch.exp(logp - batch["old_logp"])
        adv = batch["advantages"][:, None]
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - gc.clip_range, 1 + gc.clip_range))
        d = batch["ref_logp"] - logp
        kl = torch.exp(d) - d - 1  # k3: unbiased, non-negative per-token KL(π || π_ref)
        loss = ro.masked_mean(pg + gc.kl_coef * kl, mask)
        with torch.no_grad():
            extra = {
                "policy_loss": float(ro.masked_mean(pg, mask)),
                "kl_token": float(ro.masked_mean(kl, mask)),
                "entropy": float(ro.masked_mean(ro.entropy(logits), mask)),
                "clip_frac": float(ro.masked_mean(((ratio - 1).abs() > gc.clip_range).float(), mask)),
                **{k: float(v) for k, v in batch["stats"].items()},
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
) -> tuple[GPT, dict[str, Any]]:
    rows = gc.prompts_per_step * gc.samples_per_prompt
    upi = (rows // gc.train.batch_size) * gc.epochs
    tc = dataclasses.replace(
        gc.train, steps=gc.steps * upi, ckpt_every=gc.train.ckpt_every * upi, eval_every=0, log_every=1
    )
    rt = setup_runtime(tc)
    seed_everything(tc.seed)
    ref = ro.freeze(load_model_copy(policy)).to(rt.device)
    policy = policy.to(rt.device)
    engine = Engine(policy, tok)
    policy.train()

    @torch.no_grad()
    def make(it: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        items = ro.step_prompts(pool, gc.prompts_per_step, gc.prompt_seed, it)
        params = SamplingParams(
            max_new_tokens=gc.max_new_tokens,
            temperature=gc.temperature,
            top_k=gc.top_k,
            seed=tc.seed * 100_003 + it,
        )
        rolls = ro.generate(engine, [x["input"] for x in items], gc.samples_per_prompt, params, tok.im_end_id)
        rewards = torch.tensor(
            reward_fn([items[r.item] for r in rolls], [r.text for r in rolls]), dtype=torch.float32
        )
        packed = ro.pack(rolls, tok.pad_id)
        ids, mask = packed["input_ids"], packed["action_mask"]
        policy.eval()
        logp = ro.batched_logprobs(policy, ids)
        policy.train()
        ref_logp = ro.batched_logprobs(ref, ids)
        adv = group_advantages(rewards, gc.samples_per_prompt)
        kl = ((logp - ref_logp) * mask).sum(1)
        groups = rewards.view(-1, gc.samples_per_prompt)
        stats = {
            "reward_mean": round(float(rewards.mean()), 4),
            "kl": round(float(kl.mean()), 4),
            "solved_groups": round(float((groups.max(1).values > groups.min(1).values).float().mean()), 3),
            "response_len": round(float(mask.sum(1).mean()), 2),
        }
        return {
            "input_ids": ids,
            "action_mask": mask,
            "old_logp": logp * mask,
            "ref_logp": ref_logp * mask,
            "advantages": adv,
        }, stats

    batches = ro.ExperienceBatches(make, rows, gc.train.batch_size, gc.epochs, tc.seed)
    trainer = Trainer(
        policy,
        tc,
        work_dir,
        loss_fn=grpo_loss_fn(gc),
        batch_fn=batches,
        save_fn=lambda m, p, st: save_model(m, p, tokenizer=tok, train_state=st),
        load_fn=load_weights,
        runtime=rt,
        desc="grpo",
    )
    batches.log = trainer.metrics.log
    summary = trainer.fit(resume=resume)
    batches.finish()
    summary.update(
        iterations=gc.steps,
        updates_per_iteration=upi,
        rollout_s_per_iter=round(float(np.mean(batches.rollout_s)), 3) if batches.rollout_s else None,
        learn_s_per_iter=round(float(np.mean(batches.learn_s)), 3) if batches.learn_s else None,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        final=batches.stats,
    )
    trainer.cleanup_checkpoints()
    return policy, summary


def run(cfg: Any, resume: bool = True) -> dict[str, Any]:
    """The ``chatforge grpo`` stage: ``grpo.init`` (+ optional RM) -> ``<run>/rlhf/grpo``."""
    run_dir = cfg.run_dir
    gc = cfg.grpo
    init = ro.resolve(run_dir, gc.init)
    if not (init / "config.json").is_file():
        raise ChatforgeError(f"{init}: no checkpoint to start GRPO from; run `chatforge sft` first")
    tok = Tokenizer.load(init)
    reward_fn = verifiable_reward
    if gc.rm_coef:
        rm = load_reward_model(ro.resolve(run_dir, gc.reward_model))

        def reward_fn(items: list[dict], texts: list[str]) -> list[float]:
            rm_s = score(rm, tok, [x["input"] for x in items], texts)
            return [v + gc.rm_coef * s for v, s in zip(verifiable_reward(items, texts), rm_s)]

    pool = ro.world_prompts(cfg, gc.prompt_pool, gc.prompt_seed, gc.kinds)
    policy, summary = train_grpo(
        load_model(init), tok, reward_fn, pool, gc, run_dir / "train" / "grpo", resume
    )
    save_model(
        policy,
        run_dir / "rlhf" / "grpo",
        tokenizer=tok,
        extra_files={"training_summary.json": json.dumps(summary, default=str)},
    )
    return summary
