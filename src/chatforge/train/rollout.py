"""What the RL stages share: prompts to train on, rollouts through the one engine, token log-probs, the
frozen reference, the iteration set-up and fit on the loop core, and saving the trained policy.

PPO and GRPO sample replies with ``engine.py`` built on the policy module itself (so the rollouts always
come from the current weights, with no copy to sync), then score, pack and learn from them; they differ
only in how they turn rollouts into a batch of experience and in their loss. Under ``torchrun`` the
rollouts (the dominant cost) are split: each process samples, scores and takes log-probs of its share of
an iteration's prompts, then the rows are gathered so every process holds the iteration's whole batch.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from chatforge.checkpoint import load_model, not_a_policy, save_model
from chatforge.config import TrainConfig
from chatforge.data import chat
from chatforge.data.world import build_world
from chatforge.engine import Engine, SamplingParams
from chatforge.errors import ChatforgeError
from chatforge.model import GPT
from chatforge.tokenizer import Tokenizer
from chatforge.train.loop import Runtime, Trainer, is_main_process, seed_everything, setup_runtime


def resolve(run_dir: Path, name: str) -> Path:
    """A checkpoint named inside the run (``sft``, ``rm``) or a path."""
    p = Path(name)
    return p if p.is_absolute() or (p / "config.json").is_file() else run_dir / name


def load_init(
    run_dir: Path,
    name: str,
    what: str,
    seq_len: int = 0,
    seq_len_key: str = "",
    any_backbone: bool = False,
) -> tuple[Path, Tokenizer, GPT]:
    """(path, tokenizer, model) of the checkpoint a stage starts from (``resolve``d), or a one-line error
    when it is not there; the stage's ``seq_len`` (config key ``seq_len_key``) must fit its context.
    A reward model or moderator is refused unless ``any_backbone`` (a stage that trains a new head)."""
    init = resolve(run_dir, name)
    if not (init / "config.json").is_file():
        raise ChatforgeError(f"{init}: no checkpoint to start {what} from; run `chatforge sft` first")
    kind = not_a_policy(init)
    if kind and not any_backbone:
        raise ChatforgeError(f"{init}: {kind}, not a language model to start {what} from")
    model = load_model(init)
    ctx = model.config.max_position_embeddings
    if seq_len > ctx:
        raise ChatforgeError(f"{seq_len_key}: {seq_len} exceeds the model's context ({ctx})")
    return init, Tokenizer.load(init), model


def save_policy(policy: GPT, out_dir: Path, tok: Tokenizer, summary: dict[str, Any]) -> None:
    """The trained policy as a checkpoint, with its training summary beside the weights (rank 0 only:
    every rank holds the same weights, and two ranks swapping the same folder in can collide)."""
    if not is_main_process():
        return
    save_model(
        policy,
        out_dir,
        tokenizer=tok,
        extra_files={"training_summary.json": json.dumps(summary, default=str)},
        chat=True,
    )


def world_prompts(cfg: Any, n: int, seed: int, kinds: list[str] | None = None) -> list[dict]:
    """Train-split world prompts with their grader checks: ``{"input": messages, "check", "kind"}``."""
    world_seed = next((s.seed for s in cfg.chat_data.sources if s.kind == "world"), 0)
    world = build_world(world_seed)
    # Only the asked kinds, n of them: filtering a mixed pool left ~80 arithmetic prompts of 2000, which
    # GRPO learnt by heart (train reward 0.26 -> 0.54, held-out arithmetic 42% -> 35%).
    convs = chat.world_conversations(world, n, seed=50_000 + seed, split="train", kinds=kinds)
    return [
        {
            "input": [{k: v for k, v in m.items() if k in ("role", "content")} for m in c["messages"][:-1]],
            # the eval's subject check too: a right value said of another entity earns no reward
            "check": chat.guard_subject(world, c["kind"], c["messages"], c["meta"], c["meta"]["check"]),
            "kind": c["kind"],
            "ideal": c["messages"][-1]["content"],
        }
        for c in convs
    ]


@dataclass
class Rollout:
    item: int  # index of the prompt within the step's prompts
    prompt_ids: list[int]
    response_ids: list[int]  # the sampled tokens, with the end marker when the reply stopped
    text: str
    finished: bool


def generate(
    engine: Engine, prompts: list[list[dict]], n: int, params: SamplingParams, end_id: int, first: int = 0
) -> list[Rollout]:
    """``n`` sampled replies per prompt (chat messages) through the engine. ``prompts`` are items
    ``first``, ``first + 1``, ... of a larger list (one process's share): each draws the seeds it would
    draw in the whole list, so the replies do not depend on how the list was split."""
    tok = engine.tokenizer
    encoded = [tok.encode_chat_prompt(p) for p in prompts]
    limit = engine.model.config.max_position_embeddings - params.max_new_tokens
    too_long = [i for i, e in enumerate(encoded) if len(e) > limit]
    if too_long:
        raise ChatforgeError(f"prompt {too_long[0]} is longer than the context allows ({limit} tokens)")
    was_training = engine.model.training
    done: dict[tuple[int, int], Any] = {}
    try:
        base = params.seed if params.seed is not None else random.randrange(2**31)
        # Prompt i draws stream (first + i) * n of base, as in the whole list: every prompt its own.
        offsets = [(first + i) * n for i in range(len(encoded))]
        for c in engine.generate(encoded, dataclasses.replace(params, n=n, seed=base), offsets):
            done[(c.prompt_index, c.sample_index)] = c
    finally:
        engine.model.train(was_training)
    out = []
    for (i, _j), c in sorted(done.items()):
        ids = list(c.token_ids)
        stopped = c.finish_reason == "stop"
        if stopped:  # the end marker is an action too: the policy must learn when to stop
            ids.append(end_id)
        out.append(Rollout(i, encoded[i], ids, c.text.strip(), stopped))
    return out


def pack(rollouts: list[Rollout], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` [B, T] and ``action_mask`` [B, T-1]: 1 where position t predicts a
    response token (so ``logprobs[:, t]`` is that token's log-prob)."""
    T = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    ids = torch.full((len(rollouts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rollouts), T - 1), dtype=torch.float32)
    for b, r in enumerate(rollouts):
        seq = r.prompt_ids + r.response_ids
        ids[b, : len(seq)] = torch.tensor(seq)
        p = len(r.prompt_ids)
        mask[b, p - 1 : p - 1 + len(r.response_ids)] = 1.0
    return {"input_ids": ids, "action_mask": mask}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | ...) for every t: [B, T-1], from logits [B, T, V]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the next-token distribution: [B, T-1]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def batched_logprobs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """``token_logprobs`` of ``model`` in chunks (reference / old-policy log-probs; no grad)."""
    dev = next(model.parameters()).device
    parts = [
        token_logprobs(model(input_ids[i : i + batch_size].to(dev)), input_ids[i : i + batch_size].to(dev))
        for i in range(0, len(input_ids), batch_size)
    ]
    return torch.cat(parts).cpu()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def token_mean(x: torch.Tensor, mask: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """``masked_mean`` of a loss term over the tokens of the whole minibatch, which ``ExperienceBatches``
    splits across processes: each divides its token sum by ``batch["token_norm"]`` (the minibatch's
    tokens / processes), so DDP's average of their gradients is the one-process gradient. A per-process
    mean weighed the tokens of a process with shorter replies more. One process: ``masked_mean``."""
    norm = batch.get("token_norm")
    return masked_mean(x, mask) if norm is None else (x * mask).sum() / norm


def step_prompts(pool: list[dict], k: int, seed: int, step: int) -> list[dict]:
    """The ``k`` prompts of RL step ``step``: a pure function of (seed, step), as exact resume needs."""
    return random.Random(f"rl-prompts:{seed}:{step}").sample(pool, min(k, len(pool)))


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_model_copy(model: GPT) -> GPT:
    """A separate GPT with the same weights (the frozen reference)."""
    ref = GPT(model.config)
    ref.load_state_dict(model.state_dict())
    return ref


def start(policy: GPT, tc: TrainConfig) -> tuple[Runtime, GPT]:
    """The runtime and seeds for ``tc``, and a frozen copy of ``policy`` on its device (the reference)."""
    rt = setup_runtime(tc)
    seed_everything(tc.seed)
    return rt, freeze(load_model_copy(policy)).to(rt.device)


@dataclass
class Iterations:
    """How RL iterations map onto the loop core: ``rows`` sequences of experience per iteration, served
    as ``updates`` optimizer steps; ``train`` is the stage's TrainConfig counted in those steps (the
    stage's ``steps`` and ``train.ckpt_every`` are in iterations)."""

    rows: int
    updates: int
    train: TrainConfig


def iterations(rc: Any) -> Iterations:
    rows = rc.prompts_per_step * rc.samples_per_prompt
    upi = (rows // rc.train.batch_size) * rc.epochs
    tc = dataclasses.replace(
        rc.train, steps=rc.steps * upi, ckpt_every=rc.train.ckpt_every * upi, eval_every=0, log_every=1
    )
    return Iterations(rows, upi, tc)


def shard(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``n`` items that process ``rank`` of ``world`` owns (the first
    ``n % world`` ranks take one more): concatenated in rank order, the blocks give back ``range(n)``."""
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return range(lo, lo + size + (rank < extra))


def sample_scored(
    engine: Engine,
    pool: list[dict],
    rc: Any,
    seed: int,
    it: int,
    reward_fn: Any,
    rank: int = 0,
    world: int = 1,
) -> tuple[list[Rollout], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iteration ``it``'s rollouts on process ``rank``'s ``shard`` of its prompts (all of them in one
    process; a prompt's samples stay together, as GRPO's groups need), scored by ``reward_fn`` and packed:
    (rollouts, rewards [B], input_ids [B, T], action_mask [B, T-1])."""
    tok = engine.tokenizer
    items = step_prompts(pool, rc.prompts_per_step, rc.prompt_seed, it)
    mine = shard(len(items), rank, world)
    items = items[mine.start : mine.stop]
    params = SamplingParams(
        max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_k=rc.top_k, seed=seed * 100_003 + it
    )
    rolls = generate(
        engine, [x["input"] for x in items], rc.samples_per_prompt, params, tok.im_end_id, mine.start
    )
    rewards = torch.tensor(
        reward_fn([items[r.item] for r in rolls], [r.text for r in rolls]), dtype=torch.float32
    )
    packed = pack(rolls, tok.pad_id)
    return rolls, rewards, packed["input_ids"], packed["action_mask"]


def gather_rows(parts: dict[str, torch.Tensor], pad_id: int, world: int = 1) -> dict[str, torch.Tensor]:
    """Every process's rows of experience (tensors with one row per sequence, ``input_ids`` among them),
    concatenated in rank order on every process; 2-D tensors are right-padded to the widest ``input_ids``
    (``input_ids`` with ``pad_id``, the rest with 0, as ``pack`` of all the rows would have). With
    ``shard``ed prompts this is the batch one process would have made, so whitening, stats and
    minibatches need nothing distributed. One process: ``parts`` itself."""
    if world == 1:
        return parts
    local = {k: v.detach().cpu() for k, v in parts.items()}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, local)
    width = max(p["input_ids"].shape[1] for p in every)
    out = {}
    for key in parts:
        fill = pad_id if key == "input_ids" else 0
        # Every 2-D tensor is position-aligned with its rank's input_ids: it widens by as many columns.
        vs = [
            F.pad(p[key], (0, width - p["input_ids"].shape[1]), value=fill) if p[key].dim() == 2 else p[key]
            for p in every
        ]
        out[key] = torch.cat(vs)
    return out


def clipped_policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token clipped surrogate (to minimise) and the probability ratio π/π_old."""
    ratio = torch.exp(logp - old_logp)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)), ratio


@torch.no_grad()
def policy_stats(
    logits: torch.Tensor,
    ratio: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    batch: dict[str, Any],
    ent: torch.Tensor | None = None,
) -> dict[str, float]:
    """What every policy-gradient step logs: entropy, clip fraction and the iteration's rollout stats.
    Token means as the loss takes them (``token_mean``), so the loop's average over processes is the
    whole minibatch's."""
    if ent is None:
        ent = token_mean(entropy(logits), mask, batch)
    return {
        "entropy": float(ent),
        "clip_frac": float(token_mean(((ratio - 1).abs() > clip_range).float(), mask, batch)),
        **{k: float(v) for k, v in batch["stats"].items()},
    }


class ExperienceBatches:
    """The loop core's ``batch_fn`` for on-policy RL: each RL step (iteration) makes a fresh batch of
    experience with ``make(iteration)`` (rollouts, rewards, advantages: tensors with one row per sequence),
    then serves ``epochs`` shuffled passes of minibatches over it, one loop-core optimizer step each.

    Loop step ``s`` is minibatch ``s % updates_per_iter`` of iteration ``s // updates_per_iter``; rollouts
    are seeded by the iteration, so resuming from a checkpoint on an iteration boundary replays exactly.
    Under ``torchrun`` each process samples only its ``shard`` of the prompts, but ``make`` returns the
    whole iteration (``gather_rows``) on every process: the same minibatches everywhere, split row by row.
    Times the rollout phase and the learning phase of every iteration (logged as ``rollout`` events).
    """

    def __init__(
        self,
        make: Any,  # (iteration) -> (tensors dict, stats dict)
        rows: int,
        minibatch: int,
        epochs: int,
        seed: int,
        accum: int = 1,
    ) -> None:
        self.make, self.rows, self.minibatch, self.epochs, self.seed = make, rows, minibatch, epochs, seed
        self.accum = accum  # grad_accum: a process's rows of a minibatch come in this many micro-batches
        self.per_epoch = rows // minibatch
        self.updates_per_iter = self.per_epoch * epochs
        self.iteration = -1
        self.data: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}
        self.log: Any = None  # set to the trainer's metrics.log
        self.rollout_s: list[float] = []
        self.learn_s: list[float] = []
        self._learn_start: float | None = None

    def finish(self) -> None:
        """Close the timing of the last iteration's learning phase (call after ``fit``)."""
        import time

        if self._learn_start is not None:
            self.learn_s.append(time.perf_counter() - self._learn_start)
            self._learn_start = None

    def __call__(self, step: int, micro: int, rank: int, world: int) -> dict[str, Any]:
        import time

        it, j = divmod(step, self.updates_per_iter)
        fresh = it != self.iteration
        if fresh:
            self.finish()
            t0 = time.perf_counter()
            self.data, self.stats = self.make(it)
            self.iteration = it
            dt = time.perf_counter() - t0
            self.rollout_s.append(dt)
            self.stats["rollout_s"] = round(dt, 3)
            if self.learn_s:
                self.stats["prev_learn_s"] = round(self.learn_s[-1], 3)
            if self.log is not None:
                self.log("rollout", step, iteration=it, **self.stats)
            self._learn_start = time.perf_counter()
        epoch, k = divmod(j, self.per_epoch)
        perm = torch.randperm(
            self.rows, generator=torch.Generator().manual_seed(hash((self.seed, it, epoch)) % 2**31)
        )
        whole = perm[k * self.minibatch : (k + 1) * self.minibatch]
        idx = whole[rank::world] if world > 1 else whole
        if self.accum > 1:  # micro-batch `micro` of this process's rows (each used to be the whole share)
            per = len(idx) // self.accum
            idx = idx[micro * per : (micro + 1) * per]
        batch: dict[str, Any] = {key: v[idx] for key, v in self.data.items()}
        # Trim padding columns this minibatch does not use.
        if "action_mask" in batch:
            used = int(batch["action_mask"].sum(0).nonzero().max()) + 2
            for key, v in batch.items():
                if v.dim() == 2:
                    batch[key] = v[:, : used if key == "input_ids" else used - 1]
            # The loop divides each micro-batch's loss by grad_accum and DDP averages over processes.
            batch["token_norm"] = self.data["action_mask"][whole].sum().clamp(min=1.0) / (world * self.accum)
        batch["stats"] = {**self.stats, "rollout_s": self.stats["rollout_s"] if fresh and j == 0 else 0.0}
        return batch


def fit(
    model: nn.Module,
    its: Iterations,
    rc: Any,
    work_dir: Path,
    make: Any,  # (iteration) -> (tensors dict, stats dict)
    loss_fn: Any,
    save_fn: Any,
    load_fn: Any,
    runtime: Runtime,
    desc: str,
    resume: bool = True,
    inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on the loop core with fresh experience from ``make`` every iteration; the summary
    adds the iteration counts, the rollout/learning time split and the peak memory."""
    world = runtime.world_size
    parts = world * rc.train.grad_accum
    if rc.train.batch_size % parts:
        # An RL minibatch is global, split row by row across processes and then micro-batches: a part
        # with fewer rows (or none: batch_size=1 on 2 processes crashed) would weigh its rows more.
        over = f"{world} processes x {rc.train.grad_accum} micro-batches (grad_accum)"
        raise ChatforgeError(
            f"{desc}.train.batch_size: {rc.train.batch_size} rows per minibatch do not split evenly over"
            f" {over if rc.train.grad_accum > 1 else f'{world} processes'}; use a multiple of {parts}"
        )
    if rc.prompts_per_step < world:
        # Each process samples its share of an iteration's prompts: one with none would only wait.
        raise ChatforgeError(
            f"{desc}.prompts_per_step: {rc.prompts_per_step} prompts per iteration leave some of the"
            f" {world} processes none to sample; use at least {world}"
        )
    batches = ExperienceBatches(
        make, its.rows, rc.train.batch_size, rc.epochs, its.train.seed, rc.train.grad_accum
    )
    trainer = Trainer(
        model,
        its.train,
        work_dir,
        loss_fn=loss_fn,
        batch_fn=batches,
        save_fn=save_fn,
        load_fn=load_fn,
        runtime=runtime,
        desc=desc,
        resume_every=its.updates,
        inputs=inputs,
    )
    batches.log = trainer.metrics.log
    summary = trainer.fit(resume=resume)
    batches.finish()
    summary.update(
        iterations=rc.steps,
        updates_per_iteration=its.updates,
        rollout_s_per_iter=round(float(np.mean(batches.rollout_s)), 3) if batches.rollout_s else None,
        learn_s_per_iter=round(float(np.mean(batches.learn_s)), 3) if batches.learn_s else None,
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        final=batches.stats,
    )
    trainer.cleanup_checkpoints()
    return summary
