"""PPO from a reward model (``chatforge ppo``), InstructGPT-style, on the shared loop core.

Each iteration: sample replies to world prompts with the one engine, built on the policy module itself
(rollouts always come from the current weights, nothing to sync); score them with the reward model;
per-token reward = −β·(log π − log π_ref) against the frozen SFT reference, plus the RM score on the last
token (β optionally adaptive, Ziegler et al. 2019); advantages by GAE from a value head on the policy's
own hidden states; then ``epochs`` passes of minibatch updates with the clipped policy loss, the clipped
value loss and an optional entropy bonus. Logs mean reward, KL, entropy, clip fraction, value loss and
the rollout/learning time split per iteration into ``<run>/train/ppo/metrics.jsonl``.
Writes the policy to ``<run>/rlhf/ppo``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chatforge.checkpoint import load_weights, save_model
from chatforge.engine import Engine
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer
from chatforge.train import rollout as ro
from chatforge.train.loop import Batch, fingerprint, model_fingerprint, weights_fingerprint
from chatforge.train.reward import RewardModel, load_reward_model, score

VALUE_FILE = "value_head.safetensors"


class PolicyWithValue(nn.Module):
    """The policy (the one GPT) and a value head reading the same final hidden states."""

    def __init__(self, policy: GPT, kl_coef: float) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        # β lives here so that an adaptive β is saved and restored with the weights.
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef)))

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.policy.hidden_states(input_ids)
        return self.policy.lm_head(h), self.value_head(h.float()).squeeze(-1)


def _save(m: PolicyWithValue, path: Path, tok: Tokenizer, state: dict | None = None) -> None:
    save_model(m.policy, path, tokenizer=tok, train_state=state, chat=True)
    sd = {**{f"value_head.{k}": v for k, v in m.value_head.state_dict().items()}, "kl_coef": m.kl_coef}
    tmp = path / (VALUE_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp))
    os.replace(tmp, path / VALUE_FILE)


def _load(m: PolicyWithValue, path: Path) -> None:
    load_weights(m.policy, path)
    sd = load_file(str(path / VALUE_FILE))
    m.value_head.load_state_dict(
        {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("value_head.")}
    )
    m.kl_coef.copy_(sd["kl_coef"])


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """Generalised advantage estimation over each row's masked (action) positions: [B, T]."""
    adv = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        pos = mask[b].nonzero().flatten().tolist()
        last, nxt_v = 0.0, 0.0
        for t in reversed(pos):
            delta = rewards[b, t] + gamma * nxt_v - values[b, t]
            last = float(delta) + gamma * lam * last
            adv[b, t] = last
            nxt_v = float(values[b, t])
    return adv


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = ro.masked_mean(x, mask)
    var = ro.masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def ppo_loss_fn(pc: Any):
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float], int]:
        ids, mask = batch["input_ids"], batch["action_mask"]
        logits, values = model(ids)
        logp = ro.token_logprobs(logits, ids)
        values = values[:, :-1]
        pg, ratio = ro.clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], pc.clip_range)
        pg_loss = ro.token_mean(pg, mask, batch)
        old_v = batch["old_values"]
        v_clip = old_v + (values - old_v).clamp(-pc.value_clip, pc.value_clip)
        vf = 0.5 * torch.maximum((values - batch["returns"]) ** 2, (v_clip - batch["returns"]) ** 2)
        vf_loss = ro.token_mean(vf, mask, batch)
        loss = pg_loss + pc.vf_coef * vf_loss
        ent = None
        if pc.ent_coef:
            ent = ro.token_mean(ro.entropy(logits), mask, batch)
            loss = loss - pc.ent_coef * ent
        with torch.no_grad():
            extra = {
                "policy_loss": float(pg_loss),
                "value_loss": float(vf_loss),
                "approx_kl_old": float(ro.token_mean(batch["old_logp"] - logp, mask, batch)),
                **ro.policy_stats(logits, ratio, mask, pc.clip_range, batch, ent),
            }
        return loss, extra, int(mask.sum())

    return loss_fn


def train_ppo(
    policy: GPT,
    tok: Tokenizer,
    reward_fn: Any,  # (prompt items, reply texts) -> list[float]
    pool: list[dict],
    pc: Any,
    work_dir: Path,
    resume: bool = True,
    inputs: dict[str, str] | None = None,
) -> tuple[PolicyWithValue, dict[str, Any]]:
    """PPO on ``policy`` (trained in place) against a frozen copy of it; returns (model, summary).
    ``inputs`` names what else the run learns from (its reward model), for the checkpoints' resume check."""
    inputs = {"data": fingerprint(pool), "init": weights_fingerprint(policy), **(inputs or {})}
    its = ro.iterations(pc)
    rt, ref = ro.start(policy, its.train)
    model = PolicyWithValue(policy, pc.kl_coef).to(rt.device)
    engine = Engine(model.policy, tok)
    engine.model.train()

    @torch.no_grad()
    def make(it: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        # This process's share of the prompts, through GAE (each row on its own)...
        rolls, scores, ids, mask = ro.sample_scored(
            engine, pool, pc, its.train.seed, it, reward_fn, rt.rank, rt.world_size
        )
        model.eval()
        old_logp, old_values = [], []
        for i in range(0, len(ids), 16):
            logits, v = model(ids[i : i + 16].to(rt.device))
            old_logp.append(ro.token_logprobs(logits, ids[i : i + 16].to(rt.device)).cpu())
            old_values.append(v[:, :-1].float().cpu())
        model.train()
        logp, values = torch.cat(old_logp), torch.cat(old_values)
        ref_logp = ro.batched_logprobs(ref, ids)
        kl = (logp - ref_logp) * mask
        beta = float(model.kl_coef)
        rewards = -beta * kl
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # each row's last action position
        rewards[torch.arange(len(rolls)), last] += scores
        values = values * mask
        adv = gae(rewards, values, mask, pc.gamma, pc.lam)
        returns = adv + values
        part = {
            "input_ids": ids,
            "action_mask": mask,
            "old_logp": logp * mask,
            "old_values": values,
            "advantages": adv,
            "returns": returns * mask,
            "scores": scores,
            "seq_kl": kl.sum(1),
            "finished": torch.tensor([float(r.finished) for r in rolls], dtype=torch.float64),
        }
        # ...then every process's rows on every process, so that the whitening, the KL controller and the
        # stats below see the whole iteration, the same on every process.
        data = ro.gather_rows(part, tok.pad_id, rt.world_size)
        scores, seq_kl, finished = data.pop("scores"), data.pop("seq_kl"), data.pop("finished")
        mask = data["action_mask"]
        data["advantages"] = whiten(data["advantages"], mask)
        if pc.adaptive_kl:  # proportional controller on the observed KL (Ziegler et al. 2019)
            err = float(np.clip(seq_kl.mean().item() / pc.kl_target - 1, -0.2, 0.2))
            model.kl_coef.mul_(1 + err * its.rows / pc.kl_horizon)
        stats = {
            "reward_mean": round(float(scores.mean()), 4),
            "reward_std": round(float(scores.std()), 4),
            "kl": round(float(seq_kl.mean()), 4),
            "kl_coef": round(beta, 5),
            "response_len": round(float(mask.sum(1).mean()), 2),
            "finished_frac": round(float(finished.mean()), 3),
        }
        return data, stats

    summary = ro.fit(
        model,
        its,
        pc,
        work_dir,
        make,
        ppo_loss_fn(pc),
        save_fn=lambda m, p, st: _save(m, p, tok, st),
        load_fn=_load,
        runtime=rt,
        desc="ppo",
        resume=resume,
        inputs=inputs,
    )
    return model, summary


def rm_reward_fn(rm: RewardModel, tok: Tokenizer):
    """Rewards from the reward model: its normalised score of each reply to its prompt."""

    def reward(items: list[dict], texts: list[str]) -> list[float]:
        return score(rm, tok, [x["input"] for x in items], texts)

    return reward


def run(cfg: Any, resume: bool = True) -> dict[str, Any]:
    """The ``chatforge ppo`` stage: ``ppo.init`` + ``<run>/rm`` -> ``<run>/rlhf/ppo``."""
    run_dir = cfg.run_dir
    pc = cfg.ppo
    _, tok, policy = ro.load_init(run_dir, pc.init, "PPO")
    rm_dir = ro.resolve(run_dir, pc.reward_model)
    rm = load_reward_model(rm_dir)
    pool = ro.world_prompts(cfg, pc.prompt_pool, pc.prompt_seed, pc.kinds)
    model, summary = train_ppo(
        policy,
        tok,
        rm_reward_fn(rm, tok),
        pool,
        pc,
        run_dir / "train" / "ppo",
        resume,
        inputs={"reward": model_fingerprint(rm_dir)},
    )
    ro.save_policy(model.policy, run_dir / "rlhf" / "ppo", tok, summary)
    return summary
