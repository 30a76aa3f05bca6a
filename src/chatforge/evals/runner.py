"""Run chat eval items through the engine, ``n`` samples each, and aggregate per behaviour.

Per item we keep every sample's score, so the report can show the mean answer, the median answer and the
worst answer (an item counts for worst-of-n only if all n samples pass).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chatforge.engine import Engine, SamplingParams

Grader = Callable[[dict, str], bool | float]


def generate_replies(
    engine: Engine, items: Sequence[dict], params: SamplingParams, batch_size: int = 64
) -> list[list[str]]:
    """``params.n`` replies per item (``item["input"]`` is a list of chat messages)."""
    tok = engine.tokenizer
    prompts = [tok.apply_chat_template(it["input"], add_generation_prompt=True) for it in items]
    limit = engine.model.config.max_position_embeddings - params.max_new_tokens
    replies: list[list[str]] = [[] for _ in items]
    idx = [i for i, p in enumerate(prompts) if len(p) <= limit]
    for i in set(range(len(items))) - set(idx):  # too long for the context: scored as failures
        replies[i] = [""] * params.n
    for s in range(0, len(idx), max(1, batch_size // params.n)):
        chunk = idx[s : s + max(1, batch_size // params.n)]
        for c in engine.generate([prompts[i] for i in chunk], params):
            replies[chunk[c.prompt_index]].append(c.text.strip())
    return replies


def summarize(rows: list[list[float]]) -> dict[str, float]:
    """Mean over all samples, mean of per-item medians, and worst-of-n, for rows of per-sample scores."""
    return {
        "mean": round(statistics.fmean(x for r in rows for x in r), 4),
        "median": round(statistics.fmean(statistics.median(r) for r in rows), 4),
        "worst": round(statistics.fmean(min(r) for r in rows), 4),
        "items": len(rows),
    }


def aggregate(items: Sequence[dict], scores: list[list[float]]) -> dict[str, Any]:
    """``summarize`` per kind and overall."""
    kinds: dict[str, list[list[float]]] = {}
    for it, sc in zip(items, scores, strict=True):
        kinds.setdefault(it.get("kind", "all"), []).append(sc)
    return {
        "per_kind": {k: summarize(v) for k, v in sorted(kinds.items())},
        "overall": summarize([r for v in kinds.values() for r in v]),
    }


def run_items(
    engine: Engine, items: Sequence[dict], grader: Grader, params: SamplingParams, batch_size: int = 64
) -> dict[str, Any]:
    replies = generate_replies(engine, items, params, batch_size)
    scores = [[float(grader(it, r)) for r in rs] for it, rs in zip(items, replies, strict=True)]
    out = aggregate(items, scores)
    out["samples"] = [
        {
            "id": it.get("id", str(i)),
            "kind": it.get("kind"),
            "input": it["input"],
            "replies": rs,
            "scores": sc,
        }
        for i, (it, rs, sc) in enumerate(zip(items, replies, scores, strict=True))
    ]
    out["n"] = params.n
    return out


def json_valid(item: dict, reply: str) -> bool:
    """The reply parses as a JSON object with exactly the schema's required keys (values not checked)."""
    import json

    try:
        obj = json.loads(reply)
    except json.JSONDecodeError:
        return False
    schema = item["check"]["schema"]
    return isinstance(obj, dict) and set(obj) == set(schema.get("required", obj))


def world_chat_eval(
    model_dir: str | Path,
    items: Sequence[dict],
    n: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """The held-out world behaviour suite on a checkpoint, graded by ``chatforge.data.chat.grade``.

    JSON-schema items run twice: as they are (does the model obey the system message?) and with the
    schema enforced by constrained decoding (``system_json_constrained``); ``json_valid`` reports the
    share of parseable, schema-shaped replies for both.
    """
    import json

    from chatforge.data.chat import grade
    from chatforge.sample import load_engine

    engine = load_engine(model_dir)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed)
    out = run_items(engine, items, grade, params)
    json_items = [it for it in items if it.get("check", {}).get("type") == "json_schema"]
    if json_items:
        by_schema: dict[str, list[dict]] = {}
        for it in json_items:
            by_schema.setdefault(json.dumps(it["check"]["schema"], sort_keys=True), []).append(it)
        constrained: list[dict] = []
        for schema, group in by_schema.items():
            fmt = {"type": "json_schema", "json_schema": {"schema": json.loads(schema)}}
            p = SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed, response_format=fmt
            )
            res = run_items(engine, [{**it, "kind": "system_json_constrained"} for it in group], grade, p)
            constrained += res["samples"]
        unconstrained = [smp for smp in out["samples"] if smp["kind"] == "system_json"]
        lookup = {it.get("id"): it for it in json_items}

        def valid_rate(samples: list[dict]) -> float:
            flags = [json_valid(lookup[smp["id"]], r) for smp in samples for r in smp["replies"]]
            return round(sum(flags) / max(len(flags), 1), 4)

        scores = [smp["scores"] for smp in constrained]
        out["per_kind"]["system_json_constrained"] = summarize(scores)
        out["json_valid"] = {
            "unconstrained": valid_rate(unconstrained),
            "constrained": valid_rate(constrained),
        }
        out["samples"] += constrained
    return out


def run_stage(cfg: Any) -> dict[str, Any]:
    """The speedrun's eval stage: every checkpoint named in ``cfg.evals.models`` on the world suite,
    written to ``<run>/evals/world_<model>.json``."""
    import json

    from chatforge.data.chat import read_jsonl

    run_dir = Path(cfg.run_dir)
    items = read_jsonl(run_dir / "chat" / "eval.jsonl")
    ec = cfg.evals
    out: dict[str, Any] = {}
    for name in ec.models:
        model_dir = run_dir / name
        if not (model_dir / "config.json").is_file():
            continue
        res = world_chat_eval(
            model_dir,
            items,
            n=ec.n,
            temperature=ec.temperature,
            seed=ec.seed,
            max_new_tokens=ec.max_new_tokens,
        )
        dest = run_dir / "evals" / f"world_{name}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(res, indent=1, ensure_ascii=False))
        out[name] = {
            "overall": res["overall"],
            "per_kind": {k: v["mean"] for k, v in res["per_kind"].items()},
        }
    return out
