"""RLHF comparison on the held-out world suite: SFT, best-of-n with the reward model, PPO, DPO, GRPO.

Per policy: fact accuracy, system-message adherence, correct (brief) declines, over-refusal, the mean
reward-model score of its replies and its KL to the SFT model; and the composite score (``composite``,
defined once here), with each policy's difference from SFT and its 95% paired-bootstrap interval
(``composite_delta_ci``: the items resampled within each kind, the same draws for both policies), since a
table of 30 items per kind moves a composite by a couple of points on its own. Best-of-n samples ``n``
replies and keeps the one the reward model scores highest: the baseline every RL method must beat. Its KL
to SFT is the analytic bound log n − (n−1)/n (Stiennon et al.).
``chatforge rlhf-eval`` writes ``<run>/evals/rlhf.json`` and ``<run>/evals/rlhf.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from chatforge.checkpoint import load_model
from chatforge.data.chat import grade, is_decline, read_jsonl
from chatforge.engine import Engine, SamplingParams
from chatforge.errors import ChatforgeError
from chatforge.evals.runner import generate_replies
from chatforge.tokenizer import Tokenizer
from chatforge.train import rollout as ro
from chatforge.train.reward import RewardModel, load_reward_model, score

FACT_KINDS = ("fact", "follow_up")
SYSTEM_KINDS = ("system_json", "system_persona", "system_length", "system_language")
TABLE_KINDS = (*FACT_KINDS, *SYSTEM_KINDS, "decline", "benign_edgy")


RATES = ("fact_accuracy", "system_adherence", "correct_declines", "over_refusal")
_RATE_OF_KIND = {
    **dict.fromkeys(FACT_KINDS, 0),
    **dict.fromkeys(SYSTEM_KINDS, 1),
    "decline": 2,
    "benign_edgy": 3,  # counted by whether the reply refuses
}


def item_scores(items: list[dict], replies: list[str]) -> np.ndarray:
    """Per item: the 0/1 score that its rate counts (``RATES[_RATE_OF_KIND[kind]]``)."""
    return np.array(
        [
            float(is_decline(r)) if it["kind"] == "benign_edgy" else float(grade(it, r))
            for it, r in zip(items, replies, strict=True)
        ]
    )


def _groups(items: list[dict]) -> np.ndarray:
    """Per item, the index in RATES of the rate it counts toward (−1: none)."""
    return np.array([_RATE_OF_KIND.get(it["kind"], -1) for it in items])


def _rates(groups: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Each rate as the mean of its items' scores along the last axis (NaN where it has no items)."""
    return {
        name: scores[..., groups == g].mean(-1) if (groups == g).any() else float("nan")
        for g, name in enumerate(RATES)
    }


def rates_from_scores(items: list[dict], scores: np.ndarray) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in _rates(_groups(items), scores).items()}


def behaviour_rates(items: list[dict], replies: list[str]) -> dict[str, float]:
    """The four behaviour rates of the table from graded replies (one per item)."""
    return rates_from_scores(items, item_scores(items, replies))


def _composite_terms(rates: dict[str, Any]) -> list[Any]:
    """What the composite averages: the rates, over-refusal counted as 1 − rate."""
    return [
        rates["fact_accuracy"],
        rates["system_adherence"],
        rates["correct_declines"],
        1 - rates["over_refusal"],
    ]


def composite(rates: dict[str, float]) -> float:
    """The one composite score: the mean of the behaviour rates, over-refusal counted as 1 − rate."""
    return round(float(np.nanmean(_composite_terms(rates))), 4)


def paired_delta_ci(
    items: list[dict], scores: np.ndarray, ref_scores: np.ndarray, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% interval of composite(scores) − composite(ref_scores) over bootstrap resamples of the items,
    drawn within each kind (so every rate keeps its item count) and shared by both policies (paired)."""
    rng = np.random.default_rng(seed)
    by_kind: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_kind.setdefault(it["kind"], []).append(i)
    idx = np.concatenate(
        [rng.choice(by_kind[k], size=(draws, len(by_kind[k]))) for k in sorted(by_kind)], axis=1
    )
    groups = _groups(items)[idx[0]]  # every draw keeps each column's kind

    def composites(s: np.ndarray) -> np.ndarray:  # one composite per draw
        return np.nanmean(np.broadcast_arrays(*_composite_terms(_rates(groups, s[idx]))), axis=0)

    lo, hi = np.percentile(composites(scores) - composites(ref_scores), [2.5, 97.5])
    return round(float(lo), 4), round(float(hi), 4)


def _graded_row(items: list[dict], replies: list[str]) -> tuple[dict[str, Any], np.ndarray]:
    """A table row's rates and composite from one reply per item, and the per-item scores behind them."""
    scores = item_scores(items, replies)
    row: dict[str, Any] = rates_from_scores(items, scores)
    row["composite"] = composite(row)
    return row, scores


def best_of_n(
    engine: Engine,
    rm: RewardModel,
    items: list[dict],
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int = 0,
) -> tuple[list[str], list[float]]:
    """For each item, ``n`` sampled replies and the one the reward model prefers: (replies, their scores)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed)
    cands = generate_replies(engine, items, params, batch_size=64)
    tok = engine.tokenizer
    flat_p = [it["input"] for it, cs in zip(items, cands) for _ in cs]
    flat_r = [c for cs in cands for c in cs]
    s = np.asarray(score(rm, tok, flat_p, flat_r)).reshape(len(items), n)
    best = s.argmax(1)
    return [cands[i][b] for i, b in enumerate(best)], [float(s[i, b]) for i, b in enumerate(best)]


@torch.no_grad()
def kl_to_reference(
    engine: Engine, ref: Any, items: list[dict], samples: int, max_new_tokens: int, seed: int = 0
) -> float:
    """Monte-Carlo KL(π || π_ref) per reply: mean over sampled replies of Σ_t log π − log π_ref."""
    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    rolls = ro.generate(engine, [it["input"] for it in items], samples, params, tok.im_end_id)
    total = []
    for i in range(0, len(rolls), 32):
        b = ro.pack(rolls[i : i + 32], tok.pad_id)
        lp = ro.batched_logprobs(engine.model, b["input_ids"])
        lr = ro.batched_logprobs(ref, b["input_ids"])
        total += ((lp - lr) * b["action_mask"]).sum(1).tolist()
    return round(float(np.mean(total)), 4)


def evaluate_policy(
    model_dir: Path, items: list[dict], rm: RewardModel | None, ref: Any, bc: Any, max_new_tokens: int
) -> tuple[dict[str, Any], np.ndarray]:
    """The policy's table row (greedy replies) and its per-item scores."""
    engine = Engine(load_model(model_dir), Tokenizer.load(model_dir))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    replies = [r[0] for r in generate_replies(engine, items, params)]
    row, scores = _graded_row(items, replies)
    if rm is not None:
        row["rm_score"] = round(
            float(np.mean(score(rm, engine.tokenizer, [it["input"] for it in items], replies))), 4
        )
    row["kl_to_sft"] = kl_to_reference(engine, ref, items, bc.kl_samples, max_new_tokens)
    return row, scores


def run(cfg: Any) -> dict[str, Any]:
    """The comparison table for every policy that exists in the run, plus best-of-n on SFT."""
    run_dir = Path(cfg.run_dir)
    bc = cfg.bestofn
    eval_path = run_dir / "chat" / "eval.jsonl"
    if not eval_path.is_file():
        raise ChatforgeError(f"{eval_path}: no held-out eval set; run `chatforge sft` first")
    items = [it for it in read_jsonl(eval_path) if it["kind"] in TABLE_KINDS]
    sft_dir = run_dir / "sft"
    if not (sft_dir / "config.json").is_file():
        raise ChatforgeError(f"{sft_dir}: no SFT model; run `chatforge sft` first")
    rm_dir = ro.resolve(run_dir, bc.reward_model)
    rm = load_reward_model(rm_dir) if (rm_dir / "config.json").is_file() else None
    ref = ro.freeze(load_model(sft_dir))
    mnt = cfg.evals.max_new_tokens
    rows: dict[str, dict[str, Any]] = {}
    scores: dict[str, np.ndarray] = {}  # per-item scores of each row, for the paired intervals
    names = [p for p in bc.policies if (ro.resolve(run_dir, p) / "config.json").is_file()]
    for name in tqdm(names, desc="rlhf-eval", disable=not cfg.evals.__dict__.get("progress", True)):
        rows[name], scores[name] = evaluate_policy(ro.resolve(run_dir, name), items, rm, ref, bc, mnt)
        if name == "sft" and rm is not None:
            engine = Engine(ref, Tokenizer.load(sft_dir))  # the frozen SFT copy: sampling only reads it
            replies, rm_scores = best_of_n(engine, rm, items, bc.n, bc.temperature, mnt)
            bon, scores[f"best-of-{bc.n}"] = _graded_row(items, replies)
            bon["rm_score"] = round(float(np.mean(rm_scores)), 4)
            bon["kl_to_sft"] = round(math.log(bc.n) - (bc.n - 1) / bc.n, 4)  # analytic bound
            rows[f"best-of-{bc.n}"] = bon
    if "sft" in rows:
        for name in rows.keys() - {"sft"}:
            rows[name]["composite_delta"] = round(rows[name]["composite"] - rows["sft"]["composite"], 4)
            rows[name]["composite_delta_ci"] = list(paired_delta_ci(items, scores[name], scores["sft"]))
    out = {"items": len(items), "rows": rows}
    dest = run_dir / "evals"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "rlhf.json").write_text(json.dumps(out, indent=1))
    (dest / "rlhf.md").write_text(table_markdown(rows))
    return out


def table_markdown(rows: dict[str, dict[str, Any]]) -> str:
    cols = (
        "fact_accuracy",
        "system_adherence",
        "correct_declines",
        "over_refusal",
        "composite",
        "rm_score",
        "kl_to_sft",
    )
    lines = [
        "| policy | " + " | ".join(cols) + " | composite − SFT [95%] |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for name, r in rows.items():
        cells = [f"{r.get(c, float('nan')):.3f}" for c in cols]
        lo, hi = r.get("composite_delta_ci") or (float("nan"), float("nan"))
        delta = f"{r['composite_delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]" if "composite_delta" in r else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {delta} |")
    notes = "Intervals: paired bootstrap over the items (resampled within each kind, the same draws for SFT)."
    return "\n".join(lines) + "\n\n" + notes + "\n"
