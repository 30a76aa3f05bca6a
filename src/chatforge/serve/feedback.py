"""``chatforge feedback``: compare-mode votes -> preference JSONL, a Bradley–Terry leaderboard, rater checks.

- ``export``: one line per decisive vote (A or B won) in the preference format of ARCHITECTURE.md,
  ``{"messages": [...prompt, system message included...], "chosen": {...}, "rejected": {...},
  "source": "ui-vote", "rater": ...}``, which ``chatforge reward`` trains on. Ties, both-bad votes and
  decisive votes between two identical answers carry no preference and are counted, not exported.
- ``leaderboard``: Bradley–Terry strengths of the model versions (ties count half a win each way), fitted by
  Hunter's MM iterations, on the Elo scale (1000 = the geometric mean), with percentile-bootstrap 95%
  intervals over votes.
- ``raters``: per rater, agreement with the consensus of the *other* raters (a leave-one-rater-out
  Bradley–Terry fit predicts each of the rater's decisive votes between two versions), left-position rate
  with a binomial test (a rater who always clicks the left answer is biased whatever the answers), tie and
  both-bad rates, and a weight in [0.1, 1] that ``--weighted`` uses to down-weight careless raters.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from chatforge.data.prefs import pair_problem
from chatforge.errors import ChatforgeError
from chatforge.serve.db import Database


@dataclass
class Pair:
    """A vote reduced to what the statistics need."""

    model_a: str
    model_b: str
    winner: str  # a | b | tie | both_bad
    rater: str
    a_left: bool


def pairs_of(votes: Sequence[Any]) -> list[Pair]:
    return [Pair(v.model_a, v.model_b, v.winner, v.rater, bool(v.a_left)) for v in votes]


# ---------------------------------------------------------------- export


def preference_records(votes: Sequence[Any], weights: dict[str, float] | None = None) -> list[dict]:
    out = []
    for v in votes:
        if v.winner not in ("a", "b"):
            continue
        good, bad = (v.answer_a, v.answer_b) if v.winner == "a" else (v.answer_b, v.answer_a)
        rec: dict[str, Any] = {
            "messages": list(v.prompt),
            "chosen": {"role": "assistant", "content": good},
            "rejected": {"role": "assistant", "content": bad},
            "source": "ui-vote",
            "rater": v.rater,
        }
        if weights is not None:
            rec["weight"] = round(weights.get(v.rater, 1.0), 4)
        out.append(rec)
    return out


def export(db: Database, out: Path, min_weight: float = 0.0, weighted: bool = False) -> dict[str, Any]:
    """Write the preference JSONL atomically; raters whose weight is below ``min_weight`` are left out."""
    votes = db.votes()
    weights = {r["rater"]: r["weight"] for r in rater_stats(pairs_of(votes))}
    kept = [v for v in votes if weights.get(v.rater, 1.0) >= min_weight]
    # An answer that came back empty (stopped, or nothing generated) is no preference `chatforge reward`
    # can learn from: it would count the pair as malformed.
    full = [v for v in kept if (v.answer_a or "").strip() and (v.answer_b or "").strip()]
    recs = preference_records(full, weights if weighted else None)
    # Every line written is one `chatforge reward` reads: a vote whose prompt it would count as malformed
    # (an empty turn, e.g. a reply stopped before its first token; roles out of order, as an API client
    # may send) is counted and left out, with the first reasons, instead of written.
    usable, unusable, identical, reasons = [], 0, 0, []
    for r in recs:
        problem = pair_problem(r)
        if problem == "identical":
            # The same answer twice (two identical samples): `chatforge reward` skips it as a tie, so it
            # is no pair, whatever the rater clicked; counted, not written.
            identical += 1
        elif problem is not None:
            unusable += 1
            if len(reasons) < 20:
                reasons.append(problem)
        else:
            usable.append(r)
    recs = usable
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(out)
    counts = defaultdict(int)
    for v in votes:
        counts[v.winner] += 1
    return {
        "path": str(out),
        "pairs": len(recs),
        "votes": len(votes),
        "dropped_raters": sorted({v.rater for v in votes} - {v.rater for v in kept}),
        "empty_answer_votes": len(kept) - len(full),
        "unusable_prompt_votes": unusable,
        "identical_answer_votes": identical,
        **({"unusable_reasons": reasons} if reasons else {}),
        **{f"votes_{k}": counts[k] for k in ("a", "b", "tie", "both_bad")},
    }


# ---------------------------------------------------------------- Bradley–Terry


def bradley_terry(
    pairs: Sequence[Pair], models: list[str] | None = None, weights: dict[str, float] | None = None
) -> dict[str, float]:
    """Strengths (geometric mean 1) from A/B/tie votes between different models; both-bad is skipped."""
    models = models or sorted({m for p in pairs for m in (p.model_a, p.model_b)})
    idx = {m: i for i, m in enumerate(models)}
    k = len(models)
    wins = np.zeros((k, k))  # wins[i, j]: (weighted) wins of i over j; a tie is half to each
    for p in pairs:
        if p.model_a == p.model_b or p.winner == "both_bad":
            continue
        i, j = idx[p.model_a], idx[p.model_b]
        w = weights.get(p.rater, 1.0) if weights else 1.0
        if p.winner == "a":
            wins[i, j] += w
        elif p.winner == "b":
            wins[j, i] += w
        else:
            wins[i, j] += w / 2
            wins[j, i] += w / 2
    # A tiny prior (one tenth of a tie against every other model) keeps an unbeaten model finite.
    wins += 0.05 * (1 - np.eye(k))
    games = wins + wins.T
    s = np.ones(k)
    for _ in range(1000):  # Hunter's MM update; converges monotonically
        denom = (games / (s[:, None] + s[None, :])).sum(1)
        new = wins.sum(1) / np.maximum(denom, 1e-12)
        new /= math.exp(np.log(new).mean())
        if np.max(np.abs(new - s)) < 1e-9:
            s = new
            break
        s = new
    return {m: float(s[idx[m]]) for m in models}


def elo(strength: float) -> float:
    return 1000.0 + 400.0 * math.log10(strength)


def leaderboard(
    pairs: Sequence[Pair],
    n_boot: int = 200,
    seed: int = 0,
    weights: dict[str, float] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Versions ranked by Bradley–Terry rating, with 95% bootstrap intervals and vote counts."""
    pairs = [p for p in pairs if p.model_a != p.model_b]
    if not pairs:
        return []
    models = sorted({m for p in pairs for m in (p.model_a, p.model_b)})
    point = bradley_terry(pairs, models, weights)
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, len(models)))
    for b in tqdm(range(n_boot), desc="bootstrap", disable=not progress):
        sample = [pairs[i] for i in rng.integers(0, len(pairs), len(pairs))]
        st = bradley_terry(sample, models, weights)
        boots[b] = [elo(st[m]) for m in models]
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0) if n_boot else (None, None)
    games: dict[str, int] = defaultdict(int)
    won: dict[str, float] = defaultdict(float)
    for p in pairs:
        games[p.model_a] += 1
        games[p.model_b] += 1
        if p.winner in ("a", "b"):
            won[p.model_a if p.winner == "a" else p.model_b] += 1
        elif p.winner == "tie":
            won[p.model_a] += 0.5
            won[p.model_b] += 0.5
    rows = [
        {
            "model": m,
            "rating": round(elo(point[m]), 1),
            "ci_low": round(float(lo[i]), 1) if n_boot else None,
            "ci_high": round(float(hi[i]), 1) if n_boot else None,
            "votes": games[m],
            "win_rate": round(won[m] / games[m], 3) if games[m] else None,
        }
        for i, m in enumerate(models)
    ]
    return sorted(rows, key=lambda r: -r["rating"])


# ---------------------------------------------------------------- raters


def rater_stats(pairs: Sequence[Pair]) -> list[dict[str, Any]]:
    """Per-rater agreement with the others' consensus, position bias and a down-weighting factor."""
    from scipy.stats import binomtest

    by_rater: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        by_rater[p.rater].append(p)
    rows = []
    for rater, mine in sorted(by_rater.items()):
        others = [p for p in pairs if p.rater != rater and p.model_a != p.model_b]
        consensus = bradley_terry(others) if others else {}
        agree = total = 0
        for p in mine:
            if p.winner not in ("a", "b") or p.model_a == p.model_b:
                continue
            sa, sb = consensus.get(p.model_a), consensus.get(p.model_b)
            if sa is None or sb is None or abs(math.log(sa / sb)) < 0.1:  # no clear consensus to agree with
                continue
            total += 1
            agree += (p.winner == "a") == (sa > sb)
        decisive = [p for p in mine if p.winner in ("a", "b")]
        left = sum((p.winner == "a") == p.a_left for p in decisive)
        p_left = binomtest(left, len(decisive), 0.5).pvalue if decisive else 1.0
        agreement = agree / total if total else None
        # Weight: 1 for a rater who agrees with the others; falls to 0.1 at chance level (0.5) or below,
        # shrunk towards 1 while there are few votes to judge by; a strong position bias caps it at 0.1.
        weight = 1.0
        if agreement is not None:
            shrink = total / (total + 10)
            weight = 1.0 - shrink * (1.0 - min(1.0, max(0.1, (agreement - 0.5) * 4)))
        if p_left < 0.001:
            weight = 0.1
        rows.append(
            {
                "rater": rater,
                "votes": len(mine),
                "judged": total,
                "agreement": round(agreement, 3) if agreement is not None else None,
                "left_rate": round(left / len(decisive), 3) if decisive else None,
                "left_bias_p": round(float(p_left), 5),
                "tie_rate": round(sum(p.winner == "tie" for p in mine) / len(mine), 3),
                "both_bad_rate": round(sum(p.winner == "both_bad" for p in mine) / len(mine), 3),
                "weight": round(weight, 3),
                "flagged": bool(
                    p_left < 0.001 or (agreement is not None and total >= 10 and agreement < 0.6)
                ),
            }
        )
    return rows


# ---------------------------------------------------------------- CLI and the speedrun step


def _db_url(args: argparse.Namespace, run_dir: Path) -> str:
    if args.db:
        return args.db
    path = run_dir / "serve.db"
    if not path.is_file():
        raise ChatforgeError(f"no feedback database at {path}: run `chatforge serve` first, or pass --db URL")
    return f"sqlite:///{path}"


def main(args: argparse.Namespace, run_dir: Path) -> Any:
    db = Database(_db_url(args, run_dir))
    try:
        pairs = pairs_of(db.votes())
        if args.action == "export":
            out = Path(args.out) if args.out else run_dir / "feedback" / "prefs.jsonl"
            return export(db, out, min_weight=args.min_weight, weighted=args.weighted)
        weights = {r["rater"]: r["weight"] for r in rater_stats(pairs)} if args.weighted else None
        if args.action == "leaderboard":
            return leaderboard(pairs, n_boot=args.bootstrap, seed=args.seed, weights=weights, progress=True)
        return rater_stats(pairs)
    finally:
        db.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["export", "leaderboard", "raters"])
    p.add_argument("--db", default=None, help="SQLAlchemy URL (default: sqlite:///<run>/serve.db)")
    p.add_argument("--out", default=None, help="export: JSONL path (default: <run>/feedback/prefs.jsonl)")
    p.add_argument("--min-weight", dest="min_weight", type=float, default=0.0, help="drop raters below")
    p.add_argument("--weighted", action="store_true", help="weight votes by rater reliability")
    p.add_argument("--bootstrap", type=int, default=200, help="leaderboard: bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)


def run(cfg: Any) -> dict[str, Any]:
    """Speedrun step: export the run's votes and leaderboard if ``chatforge serve`` collected any."""
    run_dir = Path(cfg.run_dir)
    path = run_dir / "serve.db"
    if not path.is_file():
        return {"skipped": f"no {path}"}
    db = Database(f"sqlite:///{path}")
    try:
        summary = export(db, run_dir / "feedback" / "prefs.jsonl")
        board = leaderboard(pairs_of(db.votes()))
    finally:
        db.close()
    (run_dir / "feedback" / "leaderboard.json").write_text(json.dumps(board, indent=2) + "\n")
    return {**summary, "leaderboard": board}
